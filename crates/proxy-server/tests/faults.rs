//! Agents that misbehave (docs/PROTOCOL.md §6–§7, §10.4–§10.5): no READY, death
//! before READY, vanishing mid-command, garbage on ctl or io, silence. Each
//! gets a clear error, never a hang or a crash, and every other VM carries
//! on.

mod common;

use std::time::{Duration, Instant};

use common::{assert_vm_answers, proxy, proxy_with, SHORT};
use proxy_test_support::hyper::{Code, CtlMessage};
use proxy_test_support::proxy_proto::Command;
use proxy_test_support::scenario::{unique_id, Vm};
use proxy_test_support::{assert_serves_fresh_vm, MockAgent, ReadyMode};

#[tokio::test]
async fn an_agent_that_never_sends_ready_fails_register_vm_in_time() {
    let mut p = proxy_with(&["--ready-timeout", "500ms"]).await;
    let mut other = Vm::register(&p, 0).await;
    let mut agent = MockAgent::builder().ready(ReadyMode::Manual).start().await;
    let id = unique_id("mute");
    let mut c = p.client().await;
    let t0 = Instant::now();
    let msg = c.register_agent(&id, &agent, 1).await.unwrap_err();
    let waited = t0.elapsed();
    assert!(msg.contains("READY"), "the error names READY: {msg:?}");
    assert!(waited >= Duration::from_millis(400), "waited {waited:?}");
    // The proxy dropped the agent's channels.
    agent.expect_ctl_closed().await;
    // Nothing stayed registered.
    assert!(c.attach_vm(&id, 0).await.is_err());
    let healthy = MockAgent::start().await;
    c.register_agent(&id, &healthy, 0).await.unwrap();
    assert_vm_answers(&mut other).await;
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn an_agent_that_closes_before_ready_fails_register_vm_at_once() {
    // A READY timeout far beyond the client's patience: a proxy that
    // waited for it instead of failing at once leaves the client without
    // an answer.
    let mut p = proxy_with(&["--ready-timeout", "120s"]).await;
    let mut other = Vm::register(&p, 0).await;
    let agent = MockAgent::builder()
        .ready(ReadyMode::CloseOnConnect)
        .start()
        .await;
    let id = unique_id("dying");
    let mut c = p.client().await;
    c.set_timeout(Duration::from_secs(20));
    let msg = c.register_agent(&id, &agent, 1).await.unwrap_err();
    assert!(msg.contains("before sending READY"), "{msg}");
    assert!(
        c.attach_vm(&id, 0).await.is_err(),
        "nothing stays registered"
    );
    // Unreachable sockets: the agent is gone entirely.
    agent.vanish();
    let gone = MockAgent::start().await;
    let (ctl, io) = (gone.ctl_path().to_owned(), gone.io_path().to_owned());
    gone.vanish();
    let msg = c.register_vm(&id, &ctl, &io, 0).await.unwrap_err();
    assert!(
        msg.contains("cannot reach the agent's ctl channel"),
        "{msg}"
    );
    assert_vm_answers(&mut other).await;
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn an_agent_that_vanishes_mid_command_fails_the_command_and_tears_down_the_vm() {
    let mut p = proxy().await;
    let mut other = Vm::register(&p, 0).await;
    let mut vm = Vm::register(&p, 1).await;
    let t = vm.tokens[0].clone();
    let mut c = vm.start_container(&p, &t).await;

    vm.runtime.send_hyper("ping", &[], None).await;
    vm.agent.expect_ctl(Code::Ping).await;
    let Vm {
        id,
        agent,
        mut runtime,
        ..
    } = vm;
    agent.vanish();
    let msg = runtime.expect_error(Command::Hyper).await;
    assert!(!msg.is_empty());
    // The VM's shims are closed; later commands fail without hanging.
    c.shim.expect_closed().await;
    let msg = runtime.hyper("ping", &[], None).await.unwrap_err();
    assert!(!msg.is_empty());
    // Registered until UnregisterVM, but not attachable: its agent is gone.
    let mut late = p.client().await;
    let msg = late.attach_vm(&id, 0).await.unwrap_err();
    assert!(msg.contains("is gone"), "{msg}");
    assert_vm_answers(&mut other).await;
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn an_agent_that_never_answers_times_out_and_the_vm_stays_usable() {
    let mut p = proxy_with(&["--ctl-timeout", "400ms"]).await;
    let mut vm = Vm::register(&p, 0).await;
    let (r, ()) = tokio::join!(vm.runtime.hyper("ping", &[], None), async {
        vm.agent.expect_ctl(Code::Ping).await;
    });
    let msg = r.unwrap_err();
    assert!(msg.contains("ping") || msg.contains("reply"), "{msg}");
    // The late reply must not be taken for the next command's reply (it
    // comes first on ctl, so the proxy reads it first and discards it).
    vm.agent.reply_ack(b"late").await;
    let (r, ()) = tokio::join!(vm.runtime.hyper("version", &[], None), async {
        vm.agent.expect_ctl(Code::Version).await;
        vm.agent.reply_ack(b"v2").await;
    });
    assert_eq!(
        &r.expect("a timeout leaves the VM usable")[..],
        b"v2",
        "no stale reply"
    );
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn garbage_on_ctl_fails_the_pending_command_not_the_proxy() {
    let mut p = proxy().await;
    let mut other = Vm::register(&p, 0).await;

    // Garbage in place of a reply: a ctl header claiming 3 bytes.
    let mut vm = Vm::register(&p, 0).await;
    let (r, ()) = tokio::join!(vm.runtime.hyper("ping", &[], None), async {
        vm.agent.expect_ctl(Code::Ping).await;
        vm.agent
            .send_garbage_ctl(&[0, 0, 0, 9, 0, 0, 0, 3, 0xde, 0xad])
            .await;
    });
    assert!(r.is_err(), "a garbage reply is an error: {r:?}");
    // Never a hang afterwards, and no answer: its ctl framing is lost.
    let r = tokio::time::timeout(Duration::from_secs(10), vm.runtime.hyper("ping", &[], None))
        .await
        .expect("no hang after a garbage reply");
    assert!(
        r.is_err(),
        "a VM whose ctl framing is lost cannot answer: {r:?}"
    );

    // Garbage while idle: a length far over the limit.
    let mut vm2 = Vm::register(&p, 0).await;
    vm2.agent
        .send_garbage_ctl(&[0, 0, 0, 9, 0x7f, 0xff, 0xff, 0xff])
        .await;
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        vm2.runtime.hyper("ping", &[], None),
    )
    .await
    .expect("no hang after garbage on ctl");
    assert!(r.is_err(), "{r:?}");

    assert_vm_answers(&mut other).await;
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn harmless_noise_on_ctl_is_ignored() {
    let mut p = proxy().await;
    let mut vm = Vm::register(&p, 0).await;
    // NEXT hints and async events while idle and before a reply.
    vm.agent.send_next().await;
    vm.agent
        .send_ctl(CtlMessage::new(
            Code::ProcessAsyncEvent,
            &br#"{"container":"x","process":"y","event":"finished","status":0}"#[..],
        ))
        .await;
    let (r, ()) = tokio::join!(vm.runtime.hyper("ping", &[], None), async {
        vm.agent.expect_ctl(Code::Ping).await;
        vm.agent.send_next().await;
        vm.agent
            .send_ctl(CtlMessage::new(Code::ProcessAsyncEvent, &b"{}"[..]))
            .await;
        vm.agent.reply_ack(b"the reply").await;
    });
    assert_eq!(&r.unwrap()[..], b"the reply");
    // An agent ERROR is an error response carrying its message.
    let (r, ()) = tokio::join!(vm.runtime.hyper("ping", &[], None), async {
        vm.agent.expect_ctl(Code::Ping).await;
        vm.agent.reply_error("agent says no").await;
    });
    assert!(r.unwrap_err().contains("agent says no"));
    assert_vm_answers(&mut vm).await;
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn garbage_on_io_tears_down_only_that_vm() {
    let mut p = proxy().await;
    let mut other = Vm::register(&p, 1).await;
    let ot = other.tokens[0].clone();
    let mut oc = other.start_container(&p, &ot).await;

    let mut vm = Vm::register(&p, 1).await;
    let t = vm.tokens[0].clone();
    let mut c = vm.start_container(&p, &t).await;
    // Data for an unknown seq is dropped, the session carries on.
    vm.agent.send_io(99, b"nobody's").await;
    vm.agent.send_io(1, b"null session").await;
    vm.agent.send_io(c.io_base, b"mine").await;
    assert_eq!(&c.shim.expect_stdout(4).await[..], b"mine");
    // A header claiming 5 bytes (below the 12-byte header): framing lost.
    vm.agent
        .send_garbage_io(&[0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 5, 1, 2, 3])
        .await;
    c.shim.expect_closed().await;
    let r = tokio::time::timeout(Duration::from_secs(10), vm.runtime.hyper("ping", &[], None))
        .await
        .expect("no hang after garbage on io");
    assert!(r.is_err(), "{r:?}");

    // The other VM's session is untouched.
    other.agent.send_io(oc.io_base, b"fine").await;
    assert_eq!(&oc.shim.expect_stdout(4).await[..], b"fine");
    oc.shim.stdin(&b"in"[..]).await;
    assert_eq!(&other.agent.expect_io(oc.io_base).await[..], b"in");
    assert_vm_answers(&mut other).await;
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn an_agent_closing_io_tears_down_the_vm_and_frees_its_id() {
    let mut p = proxy().await;
    let mut vm = Vm::register(&p, 1).await;
    let t = vm.tokens[0].clone();
    let mut c = vm.start_container(&p, &t).await;
    vm.agent.close_io().await;
    c.shim.expect_closed().await;
    let r = tokio::time::timeout(Duration::from_secs(10), vm.runtime.hyper("ping", &[], None))
        .await
        .expect("no hang after the io channel closed");
    assert!(r.is_err(), "{r:?}");
    vm.agent.expect_ctl_closed().await;
    // Unregister the dead VM (it may be gone already); then its id is free.
    let _ = vm.runtime.unregister_vm(&vm.id).await;
    let fresh = MockAgent::start().await;
    let mut c2 = p.client().await;
    c2.register_agent(&vm.id, &fresh, 0).await.unwrap();
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn sigterm_exits_cleanly_with_live_vms_and_shims() {
    let mut p = proxy().await;
    let mut vm = Vm::register(&p, 1).await;
    let t = vm.tokens[0].clone();
    let mut c = vm.start_container(&p, &t).await;
    let status = p.terminate().await;
    assert!(status.success(), "{status}");
    c.shim.expect_closed().await;
    vm.runtime.expect_closed().await;
    assert!(!p.socket_path().exists(), "the socket is removed on exit");
    // Quiet unused warnings for SHORT in this file.
    let _ = SHORT;
}

#[tokio::test]
async fn pod_mode_serves_its_vm_and_exits_after_unregister() {
    let mut p = proxy_test_support::ProxyProcess::builder(common::BIN)
        .pod_mode()
        .start()
        .await;
    let mut vm = Vm::register(&p, 1).await;
    let t = vm.tokens[0].clone();
    let mut c = vm.start_container(&p, &t).await;
    vm.agent.send_io(c.io_base, b"pod").await;
    assert_eq!(&c.shim.expect_stdout(3).await[..], b"pod");
    vm.runtime.unregister_vm(&vm.id).await.unwrap();
    let status = p.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "{status}");
    assert!(!p.socket_path().exists(), "the socket is removed on exit");
}

/// What runtimes do at the end of a pod: `destroypod` (the agent powers
/// the VM off, its channels close), then UnregisterVM. The VM stays known
/// until then, as in the reference; meanwhile Hyper says the agent is gone.
#[tokio::test]
async fn unregister_vm_after_the_agent_closed_its_channels_succeeds() {
    let p = proxy().await;
    let mut vm = Vm::register(&p, 1).await;
    let (reply, _) = tokio::join!(vm.runtime.hyper("destroypod", &[], Some("{}")), async {
        vm.agent.expect_ctl(Code::DestroyPod).await;
        vm.agent.reply_ack(b"").await;
    });
    reply.unwrap();
    let Vm {
        id,
        agent,
        mut runtime,
        ..
    } = vm;
    agent.close().await;
    // The proxy notices the closed channels.
    let deadline = Instant::now() + SHORT * 10;
    loop {
        match runtime.hyper("ping", &[], None).await {
            Err(msg) if msg.contains("agent of VM") && msg.contains("gone") => break,
            other => assert!(
                Instant::now() < deadline,
                "Hyper after the agent closed: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    runtime.unregister_vm(&id).await.unwrap();
    // Now it is unknown, and its id can be registered again.
    assert!(runtime
        .unregister_vm(&id)
        .await
        .unwrap_err()
        .contains("unknown container"));
    let fresh = MockAgent::start().await;
    runtime.register_agent(&id, &fresh, 0).await.unwrap();
    assert_serves_fresh_vm(&p).await;
}
