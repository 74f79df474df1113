//! Where the reference daemon answers and ours once did not, or was
//! stricter than any client expects (docs/PROTOCOL.md §3, §6–§8, §10).
//! Each test failed on the daemon before its fix.

mod common;

use std::time::Duration;

use bytes::BytesMut;
use common::{assert_vm_answers, check_pattern, header, pattern, proxy, proxy_with};
use proxy_test_support::hyper::Code;
use proxy_test_support::proxy_proto::hyper::io::IoMessage;
use proxy_test_support::proxy_proto::{Command, FrameKind};
use proxy_test_support::scenario::{newcontainer_data, unique_id, Vm};
use proxy_test_support::{assert_serves_fresh_vm, MockAgent, MockClient, ProxyProcess};

/// One io message of any size, as an agent may write it.
fn io_message(seq: u64, data: &[u8]) -> BytesMut {
    let mut b = BytesMut::new();
    IoMessage::new(seq, data.to_vec())
        .encode(&mut b, usize::MAX)
        .unwrap();
    b
}

#[tokio::test]
async fn regression_register_vm_with_a_missing_channel_fails_at_once_naming_it() {
    // A READY timeout far beyond the client's patience: a daemon that
    // retried the dial would leave the client without an answer.
    let p = proxy_with(&["--ready-timeout", "120s"]).await;
    let mut c = p.client().await;
    c.set_timeout(Duration::from_secs(20));
    let dir = proxy_test_support::TempDir::new();
    let missing = dir.path().join("ctl.sock");
    let id = unique_id("typo");
    let agent = MockAgent::start().await;

    let msg = c
        .register_vm(
            &id,
            missing.to_str().unwrap(),
            agent.io_path().to_str().unwrap(),
            1,
        )
        .await
        .unwrap_err();
    assert!(msg.contains("ctl channel"), "names the channel: {msg}");
    assert!(
        msg.contains(missing.to_str().unwrap()),
        "names the path: {msg}"
    );
    assert!(
        msg.contains("No such file or directory"),
        "names the OS error: {msg}"
    );

    // The io channel: a socket file nobody listens on.
    let stale = dir.path().join("io.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let msg = c
        .register_vm(
            &id,
            agent.ctl_path().to_str().unwrap(),
            stale.to_str().unwrap(),
            1,
        )
        .await
        .unwrap_err();
    assert!(msg.contains("io channel"), "names the channel: {msg}");
    assert!(
        msg.contains(stale.to_str().unwrap()),
        "names the path: {msg}"
    );
    assert!(
        msg.contains("Connection refused"),
        "names the OS error: {msg}"
    );

    // The containerId is free again.
    let healthy = MockAgent::start().await;
    c.register_agent(&id, &healthy, 0).await.unwrap();
}

#[tokio::test]
async fn regression_agent_io_messages_above_10240_bytes_are_delivered_intact() {
    let mut p = proxy().await;
    let mut vm = Vm::register(&p, 1).await;
    let t = vm.tokens[0].clone();
    let mut c = vm.start_container(&p, &t).await;
    let data = pattern(0, 64 * 1024);
    vm.agent
        .send_garbage_io(&io_message(c.io_base, &data))
        .await;
    let err = pattern(7, 20_000);
    vm.agent
        .send_garbage_io(&io_message(c.io_base + 1, &err))
        .await;
    let got = c.shim.expect_stdout(data.len()).await;
    check_pattern(0, &got).unwrap();
    let got = c.shim.expect_stderr(err.len()).await;
    check_pattern(7, &got).unwrap();
    assert_vm_answers(&mut vm).await;
    p.assert_running();
}

#[tokio::test]
async fn regression_a_ctl_reply_above_10240_bytes_is_delivered_intact() {
    let mut p = proxy().await;
    let mut vm = Vm::register(&p, 0).await;
    let file = pattern(3, 100_000);
    let (r, ()) = tokio::join!(
        vm.runtime.hyper(
            "readfile",
            &[],
            Some(r#"{"container":"c","file":"/etc/x"}"#)
        ),
        async {
            vm.agent.expect_ctl(Code::ReadFile).await;
            vm.agent.reply_ack(&file).await;
        }
    );
    let got = r.expect("a large ACK is an answer");
    check_pattern(3, &got).unwrap();
    assert_eq!(got.len(), file.len());
    assert_vm_answers(&mut vm).await;
    p.assert_running();
}

#[tokio::test]
async fn regression_clients_are_told_why_their_vm_went() {
    let mut p = proxy_with(&["--max-frame-size", "64KiB"]).await;
    let mut vm = Vm::register(&p, 1).await;
    let t = vm.tokens[0].clone();
    let mut c = vm.start_container(&p, &t).await;
    // Right at the bound: delivered.
    let fits = pattern(0, 64 * 1024);
    vm.agent
        .send_garbage_io(&io_message(c.io_base, &fits))
        .await;
    check_pattern(0, &c.shim.expect_stdout(fits.len()).await).unwrap();
    // One byte above: garbage, the VM goes.
    let above = 64 * 1024 + 1;
    vm.agent
        .send_garbage_io(&io_message(c.io_base, &vec![0; above]))
        .await;
    c.shim.expect_closed().await;
    let msg = vm.runtime.hyper("ping", &[], None).await.unwrap_err();
    let declared = above + 12;
    let limit = 64 * 1024 + 12;
    assert!(
        msg.contains(&format!("io message of {declared} bytes"))
            && msg.contains(&format!("limit of {limit} bytes")),
        "the runtime is told the actual reason: {msg}"
    );
    // A later AttachVM is told too.
    let mut other = p.client().await;
    let msg = other.attach_vm(&vm.id, 0).await.unwrap_err();
    assert!(
        msg.contains(&format!("io message of {declared} bytes")),
        "{msg}"
    );
    vm.runtime.unregister_vm(&vm.id).await.unwrap();
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn regression_a_ctl_reply_waiting_when_the_vm_goes_names_the_reason() {
    let mut p = proxy_with(&["--max-frame-size", "64KiB"]).await;
    let mut vm = Vm::register(&p, 0).await;
    vm.runtime.send_hyper("ping", &[], None).await;
    vm.agent.expect_ctl(Code::Ping).await;
    // Instead of the reply, an io message above the bound.
    vm.agent
        .send_garbage_io(&io_message(1, &vec![0; 70_000]))
        .await;
    let msg = vm.runtime.expect_error(Command::Hyper).await;
    assert!(
        msg.contains("io message of 70012 bytes") && msg.contains("limit"),
        "{msg}"
    );
    p.assert_running();
}

#[tokio::test]
async fn regression_disconnect_shim_from_a_non_shim_is_an_error_and_the_connection_stays() {
    let mut p = proxy().await;
    let mut vm = Vm::register(&p, 0).await;
    let msg = vm
        .runtime
        .call(Command::DisconnectShim, &b"{}"[..])
        .await
        .unwrap_err();
    assert!(msg.contains("client isn't a shim"), "{msg}");
    // The same connection goes on: its VM still answers through it.
    assert_vm_answers(&mut vm).await;
    // And a fresh connection, too.
    let mut c = p.client().await;
    let msg = c.call(Command::DisconnectShim, &b""[..]).await.unwrap_err();
    assert!(msg.contains("client isn't a shim"), "{msg}");
    let msg = c.attach_vm("nobody", 0).await.unwrap_err();
    assert!(msg.contains("unknown container"), "{msg}");
    p.assert_running();
}

#[tokio::test]
async fn regression_the_error_flag_on_a_command_is_ignored_and_it_runs() {
    let mut p = proxy().await;
    let mut vm = Vm::register(&p, 0).await;
    let payload = serde_json::json!({ "containerId": vm.id, "numIOStreams": 1 }).to_string();
    let mut c = p.client().await;
    let mut wire = header(2, 3, 0x10, Command::AttachVm as u8, payload.len() as u32).to_vec();
    wire.extend_from_slice(payload.as_bytes());
    c.send_raw(&wire).await;
    let r = c.expect_response(Command::AttachVm).await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&r).unwrap();
    assert_eq!(v["io"]["tokens"].as_array().map(Vec::len), Some(1), "{v}");
    // Flagged again, on a Hyper that is answered through this connection.
    let hyper = serde_json::json!({ "hyperName": "ping" }).to_string();
    let mut wire = header(2, 3, 0x10, Command::Hyper as u8, hyper.len() as u32).to_vec();
    wire.extend_from_slice(hyper.as_bytes());
    c.send_raw(&wire).await;
    vm.agent.expect_ctl(Code::Ping).await;
    vm.agent.reply_ack(b"pong").await;
    assert_eq!(
        &c.expect_response(Command::Hyper).await.unwrap()[..],
        b"pong"
    );
    p.assert_running();
}

/// A shim whose stdin came before its process: the connection must keep
/// being read.
async fn shim_with_early_stdin(p: &ProxyProcess, vm: &mut Vm) -> MockClient {
    let t = vm.tokens[0].clone();
    let mut shim = p.client().await;
    shim.connect_shim(&t).await.unwrap();
    // cc-shim with stdin from /dev/null: EOF at once.
    shim.stdin(&b"early"[..]).await;
    shim.stdin(&b""[..]).await;
    shim
}

#[tokio::test]
async fn regression_a_signal_behind_waiting_stdin_is_served_at_once() {
    // The process never starts here: with a process timeout far beyond the
    // client's patience, a daemon that stopped reading the connection
    // behind the stdin would leave the signal unanswered.
    let p = proxy_with(&["--process-timeout", "120s"]).await;
    let mut vm = Vm::register(&p, 1).await;
    let mut shim = shim_with_early_stdin(&p, &mut vm).await;
    shim.set_timeout(Duration::from_secs(20));
    // SIGTERM before the start: the process counts as exited with 0.
    shim.signal(15, 0, 0).await.unwrap();
    assert_eq!(shim.expect_exit().await, 0);
    // Nothing of the stdin reached the agent.
    vm.agent.expect_no_io(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn regression_disconnect_shim_behind_waiting_stdin_is_served_at_once() {
    let p = proxy_with(&["--process-timeout", "120s"]).await;
    let mut vm = Vm::register(&p, 1).await;
    let t = vm.tokens[0].clone();
    let mut shim = shim_with_early_stdin(&p, &mut vm).await;
    shim.set_timeout(Duration::from_secs(20));
    shim.disconnect_shim().await;
    // The token was freed: a Hyper with it is refused.
    let data = newcontainer_data("c1");
    let msg = vm
        .runtime
        .hyper("newcontainer", &[&t], Some(&data))
        .await
        .unwrap_err();
    assert!(msg.contains("unknown token"), "{msg}");
}

#[tokio::test]
async fn stdin_that_waited_for_its_process_reaches_the_agent_in_order_after_the_start() {
    let p = proxy().await;
    let mut vm = Vm::register(&p, 1).await;
    let t = vm.tokens[0].clone();
    let mut shim = p.client().await;
    shim.connect_shim(&t).await.unwrap();
    shim.stdin(&b"one "[..]).await;
    shim.stdin(&b"two"[..]).await;
    // A window-size signal waits for the start too, but the connection is
    // read: the signal is in flight while the stdin waits.
    let data = newcontainer_data("c1");
    let io_base = {
        let tokens = [t.as_str()];
        let (r, io_base) = tokio::join!(
            vm.runtime.hyper("newcontainer", &tokens, Some(&data)),
            async {
                let v = vm.agent.expect_ctl_json(Code::NewContainer).await;
                // Nothing was sent on io before the process existed.
                vm.agent.expect_no_io(Duration::from_millis(100)).await;
                vm.agent.reply_ack(b"").await;
                v["process"]["stdio"].as_u64().unwrap()
            }
        );
        r.unwrap();
        io_base
    };
    assert_eq!(&vm.agent.read_io_until(io_base, 7).await[..], b"one two");
    shim.stdin(&b"!"[..]).await;
    assert_eq!(&vm.agent.expect_io(io_base).await[..], b"!");
}

#[tokio::test]
async fn stdin_waiting_beyond_the_process_timeout_closes_the_shim() {
    let p = proxy_with(&["--process-timeout", "300ms"]).await;
    let mut vm = Vm::register(&p, 1).await;
    let mut shim = shim_with_early_stdin(&p, &mut vm).await;
    let frames = shim.expect_closed().await;
    assert!(
        frames
            .iter()
            .all(|f| !matches!(f.kind, FrameKind::Stream(_))),
        "no output for a process that never started"
    );
}
