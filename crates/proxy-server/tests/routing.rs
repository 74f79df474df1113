//! Who may do what, and where bytes go (docs/PROTOCOL.md §3–§7, §10.2–§10.5):
//! duplicate ids, tokens, roles, signals, stdin splitting and EOF, held
//! output, and many concurrent Hyper calls.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{
    assert_vm_answers, proxy, proxy_metered, wait_metric, wait_metric_at_most, Metered, SHORT,
};
use proxy_test_support::hyper::{Code, MAX_IO_DATA};
use proxy_test_support::proxy_proto::{Command, FrameKind, Notification};
use proxy_test_support::scenario::{newcontainer_data, unique_id, Vm};
use proxy_test_support::{assert_serves_fresh_vm, describe, AutoReply, MockAgent, Recv};

#[tokio::test]
async fn duplicate_container_id_is_refused_and_the_first_vm_is_untouched() {
    let mut p = proxy().await;
    let mut vm = Vm::register(&p, 0).await;
    let other = MockAgent::start().await;
    let mut c = p.client().await;
    let msg = c.register_agent(&vm.id, &other, 1).await.unwrap_err();
    assert!(msg.contains(&vm.id), "the error names the id: {msg}");
    assert!(
        !other.is_connected(),
        "the proxy did not dial the second agent"
    );
    assert_vm_answers(&mut vm).await;
    // The refused client is not attached to anything.
    let msg = c.hyper("ping", &[], None).await.unwrap_err();
    assert!(msg.contains("attach"), "{msg}");
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn unknown_and_doubly_claimed_tokens_are_refused() {
    let mut p = proxy().await;
    let mut vm = Vm::register(&p, 2).await;
    let t0 = vm.tokens[0].clone();
    let t1 = vm.tokens[1].clone();
    assert_ne!(t0, t1, "tokens are distinct");

    let mut s = p.client().await;
    let msg = s.connect_shim("no-such-token").await.unwrap_err();
    assert!(!msg.is_empty());

    let mut c = vm.start_container(&p, &t0).await;
    // A second live shim for the same token.
    let mut s2 = p.client().await;
    let msg = s2.connect_shim(&t0).await.unwrap_err();
    assert!(msg.contains("claim") || msg.contains(&t0), "{msg}");
    // The first shim still owns the session.
    vm.agent.send_io(c.io_base, b"still mine").await;
    assert_eq!(&c.shim.expect_stdout(10).await[..], b"still mine");

    // A shim connection claiming a second token: refused, and its own
    // session still flows.
    let msg = c.shim.connect_shim(&t1).await.unwrap_err();
    assert!(msg.contains("already the shim of a token"), "{msg}");
    vm.agent.send_io(c.io_base, b"x").await;
    assert_eq!(&c.shim.expect_stdout(1).await[..], b"x");

    // Repeated or several tokens in one Hyper; unknown token in Hyper.
    let data = newcontainer_data(&unique_id("c"));
    for tokens in [
        vec![t1.as_str(), t1.as_str()],
        vec![t0.as_str(), t1.as_str()],
    ] {
        let msg = vm
            .runtime
            .hyper("newcontainer", &tokens, Some(&data))
            .await
            .unwrap_err();
        assert!(!msg.is_empty(), "{tokens:?}");
    }
    let msg = vm
        .runtime
        .hyper("newcontainer", &["no-such-token"], Some(&data))
        .await
        .unwrap_err();
    assert!(!msg.is_empty());
    vm.agent.expect_no_ctl(SHORT).await;

    assert_vm_answers(&mut vm).await;
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn tokens_with_a_command_that_takes_none_are_refused() {
    let mut p = proxy().await;
    let mut vm = Vm::register(&p, 1).await;
    let t = vm.tokens[0].clone();
    for name in ["ping", "version", "killcontainer", "winsize", "destroypod"] {
        let msg = vm.runtime.hyper(name, &[&t], Some("{}")).await.unwrap_err();
        assert!(msg.contains("token"), "{name}: {msg}");
    }
    let msg = vm
        .runtime
        .hyper("nosuchcommand", &[], None)
        .await
        .unwrap_err();
    assert!(msg.contains("nosuchcommand"), "{msg}");
    vm.agent.expect_no_ctl(SHORT).await;
    // The token is still good for newcontainer.
    let mut c = vm.start_container(&p, &t).await;
    vm.agent.send_exit(c.io_base, 3).await;
    assert_eq!(c.shim.expect_exit().await, 3);
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn commands_from_the_wrong_role_are_refused() {
    let mut p = proxy().await;
    let mut vm = Vm::register(&p, 1).await;

    // Hyper before attaching.
    let mut stranger = p.client().await;
    let msg = stranger.hyper("ping", &[], None).await.unwrap_err();
    assert!(msg.contains("attach"), "{msg}");
    // Signal from a non-shim.
    let msg = stranger.signal(15, 0, 0).await.unwrap_err();
    assert!(msg.contains("shim"), "{msg}");
    let msg = vm.runtime.signal(9, 0, 0).await.unwrap_err();
    assert!(msg.contains("shim"), "{msg}");
    // stdin from a non-shim: a protocol error for that connection.
    stranger.stdin(&b"hello"[..]).await;
    for f in stranger.expect_closed().await {
        assert!(
            matches!(f.kind, FrameKind::Response { error: true, .. }),
            "only an error may come before the close: {}",
            describe(&f)
        );
    }
    vm.agent.expect_no_io(SHORT).await;

    // After AttachVM the stranger may use Hyper.
    let mut late = p.client().await;
    let io = late.attach_vm(&vm.id, 1).await.unwrap();
    assert_eq!(io.tokens.len(), 1);
    assert_eq!(io.url, p.url());
    assert!(!vm.tokens.contains(&io.tokens[0]), "fresh token");
    let (r, ()) = tokio::join!(late.hyper("ping", &[], None), async {
        vm.agent.expect_ctl(Code::Ping).await;
        vm.agent.reply_ack(b"").await;
    });
    r.unwrap();
    let msg = late.attach_vm("no-such-vm", 0).await.unwrap_err();
    assert!(msg.contains("no-such-vm"), "{msg}");

    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn signals_are_checked_and_translated() {
    let mut p = proxy().await;
    let mut vm = Vm::register(&p, 2).await;
    let (t0, t1) = (vm.tokens[0].clone(), vm.tokens[1].clone());

    // SIGKILL / SIGTERM before the process starts: ProcessExited(0), then
    // the success response, in that order.
    for (sig, token) in [(9, &t0), (15, &t1)] {
        let mut shim = p.client().await;
        shim.connect_shim(token).await.unwrap();
        shim.send_command(
            Command::Signal,
            format!(r#"{{"signalNumber":{sig}}}"#).into_bytes(),
        )
        .await;
        let first = shim.recv().await;
        assert_eq!(
            (first.kind, &first.payload[..]),
            (
                FrameKind::Notification(Notification::ProcessExited),
                &[0u8][..]
            ),
            "signal {sig}: ProcessExited(0) first, got {}",
            describe(&first)
        );
        shim.expect_response(Command::Signal).await.unwrap();
    }
    vm.agent.expect_no_ctl(SHORT).await;

    // A started container.
    let token = vm.runtime.attach_vm(&vm.id, 1).await.unwrap().tokens[0].clone();
    let mut c = vm.start_container(&p, &token).await;
    for (sig, cols, rows) in [
        (-1, 0, 0),
        (31, 0, 0),
        (64, 0, 0),
        (28, 0, 0),
        (28, 80, 0),
        (28, 0, 24),
        (9, 80, 24),
    ] {
        let msg = c.shim.signal(sig, cols, rows).await.unwrap_err();
        assert!(!msg.is_empty(), "signal {sig} {cols}x{rows}");
    }
    vm.agent.expect_no_ctl(SHORT).await;

    let (r, ()) = tokio::join!(c.shim.signal(28, 132, 43), async {
        let v = vm.agent.expect_ctl_json(Code::WinSize).await;
        assert_eq!(
            v,
            serde_json::json!({"seq": c.io_base, "row": 43, "column": 132})
        );
        vm.agent.reply_ack(b"").await;
    });
    r.unwrap();
    let (r, ()) = tokio::join!(c.shim.signal(15, 0, 0), async {
        let v = vm.agent.expect_ctl_json(Code::KillContainer).await;
        assert_eq!(
            v,
            serde_json::json!({"container": c.id, "signal": 15, "allProcesses": false})
        );
        vm.agent.reply_ack(b"").await;
    });
    r.unwrap();
    // Signal 0 is valid (a liveness probe).
    let (r, ()) = tokio::join!(c.shim.signal(0, 0, 0), async {
        let v = vm.agent.expect_ctl_json(Code::KillContainer).await;
        assert_eq!(v["signal"], 0);
        vm.agent.reply_ack(b"").await;
    });
    r.unwrap();
    // An agent ERROR becomes an error response with its message.
    let (r, ()) = tokio::join!(c.shim.signal(2, 0, 0), async {
        vm.agent.expect_ctl(Code::KillContainer).await;
        vm.agent.reply_error("no such process").await;
    });
    assert!(r.unwrap_err().contains("no such process"));

    vm.agent.send_exit(c.io_base, 143).await;
    assert_eq!(c.shim.expect_exit().await, 143);
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn large_stdin_is_split_in_order_and_empty_stdin_is_eof() {
    let mut p = proxy().await;
    let mut vm = Vm::register(&p, 1).await;
    let t = vm.tokens[0].clone();
    let mut c = vm.start_container(&p, &t).await;

    // Exactly the limit: one message.
    let exact = common::pattern(0, MAX_IO_DATA);
    c.shim.stdin(exact.clone()).await;
    assert_eq!(vm.agent.expect_io(c.io_base).await, exact);
    // One byte over: two messages, in order.
    let over = common::pattern(1, MAX_IO_DATA + 1);
    c.shim.stdin(over.clone()).await;
    let a = vm.agent.expect_io(c.io_base).await;
    let b = vm.agent.expect_io(c.io_base).await;
    assert_eq!(a.len() + b.len(), over.len());
    assert_eq!([&a[..], &b[..]].concat(), over);

    // 1 MiB in one frame: each io message at most 10240 bytes with its
    // header (the mock's decoder enforces it), all in order.
    let big = common::pattern(7, 1 << 20);
    c.shim.stdin(big.clone()).await;
    let got = vm.agent.read_io_until(c.io_base, big.len()).await;
    common::check_pattern(7, &got).unwrap();

    // Zero-length stdin is EOF: a zero-length io message, never dropped,
    // after the data before it.
    c.shim.stdin(&b"tail"[..]).await;
    c.shim.stdin(&b""[..]).await;
    assert_eq!(&vm.agent.expect_io(c.io_base).await[..], b"tail");
    vm.agent.expect_io_eof(c.io_base).await;

    vm.agent.send_exit(c.io_base, 0).await;
    assert_eq!(c.shim.expect_exit().await, 0);
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn output_without_a_shim_is_held_and_delivered_in_order() {
    let Metered {
        mut p,
        metrics,
        dir: _dir,
    } = proxy_metered(&[]).await;
    let mut vm = Vm::register(&p, 1).await;
    let t = vm.tokens[0].clone();
    let c = vm.start_container(&p, &t).await;
    drop(c.shim);
    // The proxy has seen the shim go before the output comes.
    wait_metric_at_most(&metrics, "cc_proxy_shims_connected", 0.0, "the shim to go").await;

    let mut sent = 0;
    for i in 0..100 {
        let chunk = common::pattern(sent, 100 + i * 37);
        vm.agent.send_io(c.io_base, &chunk).await;
        sent += chunk.len();
    }
    vm.agent.send_io(c.io_base + 1, b"err").await;
    vm.agent.send_exit(c.io_base, 9).await;
    // All of the output is held before a shim comes back for it.
    wait_metric(
        &metrics,
        "cc_proxy_vm_output_queued_bytes",
        (sent + 3) as f64,
        "the output to be held",
    )
    .await;

    let mut shim = p.client().await;
    let mut claimed = shim.connect_shim(&t).await;
    for _ in 0..50 {
        if claimed.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        claimed = shim.connect_shim(&t).await;
    }
    claimed.unwrap();
    let got = shim.expect_stdout(sent).await;
    common::check_pattern(0, &got).unwrap();
    assert_eq!(&shim.expect_stderr(3).await[..], b"err");
    assert_eq!(shim.expect_exit().await, 9);
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn hyper_with_a_token_waits_for_the_shim() {
    let mut p = proxy().await;
    let mut vm = Vm::register(&p, 1).await;
    let t = vm.tokens[0].clone();
    let id = unique_id("c");
    let data = newcontainer_data(&id);
    vm.runtime
        .send_hyper("newcontainer", &[&t], Some(&data))
        .await;
    // Not forwarded while no shim holds the token.
    vm.agent.expect_no_ctl(SHORT).await;
    vm.runtime.expect_silence(Duration::from_millis(10)).await;

    let mut shim = p.client().await;
    shim.connect_shim(&t).await.unwrap();
    let v = vm.agent.expect_ctl_json(Code::NewContainer).await;
    let io_base = v["process"]["stdio"].as_u64().unwrap();
    assert_eq!(io_base, 3, "the first token's session is at ioBase 3");
    // Output that the agent sends before it even ACKs reaches the shim.
    vm.agent.send_io(io_base, b"early").await;
    vm.agent.reply_ack(b"").await;
    vm.runtime.expect_response(Command::Hyper).await.unwrap();
    assert_eq!(&shim.expect_stdout(5).await[..], b"early");
    vm.agent.send_exit(io_base, 1).await;
    assert_eq!(shim.expect_exit().await, 1);
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn a_caller_leaving_while_its_hyper_waits_for_the_shim_frees_the_start() {
    // The shim wait outlasts the test's: only seeing the caller go ends it.
    let Metered {
        mut p,
        metrics,
        dir: _dir,
    } = proxy_metered(&["--shim-timeout", "300s"]).await;
    let mut vm = Vm::register(&p, 1).await;
    let t = vm.tokens[0].clone();
    let mut quitter = p.client().await;
    quitter.attach_vm(&vm.id, 0).await.unwrap();
    let gone_id = unique_id("gone");
    quitter
        .send_hyper("newcontainer", &[&t], Some(&newcontainer_data(&gone_id)))
        .await;
    vm.agent.expect_no_ctl(SHORT).await;
    drop(quitter);
    wait_metric_at_most(
        &metrics,
        "cc_proxy_connections_open",
        1.0,
        "the quitter to go",
    )
    .await;
    // Its start was never sent: the token's shim comes, and the process
    // the runtime starts now is the only one the agent hears of.
    let mut shim = p.client().await;
    shim.connect_shim(&t).await.unwrap();
    let id = unique_id("kept");
    vm.runtime
        .send_hyper("newcontainer", &[&t], Some(&newcontainer_data(&id)))
        .await;
    let v = vm.agent.expect_ctl_json(Code::NewContainer).await;
    assert_eq!(v["id"], id.as_str(), "{v}");
    vm.agent.reply_ack(b"").await;
    vm.runtime.expect_response(Command::Hyper).await.unwrap();
    vm.agent.expect_no_ctl(SHORT).await;
    vm.agent
        .send_exit(v["process"]["stdio"].as_u64().unwrap(), 4)
        .await;
    assert_eq!(shim.expect_exit().await, 4);
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn a_caller_that_only_shuts_down_its_writing_still_gets_its_reply() {
    use tokio::io::AsyncWriteExt;
    let mut p = proxy().await;
    let mut vm = Vm::register(&p, 0).await;
    let mut c = p.client().await;
    c.attach_vm(&vm.id, 0).await.unwrap();
    c.send_hyper("ping", &[], Some(r#"{"who":"half"}"#)).await;
    c.raw().shutdown().await.unwrap();
    let m = vm.agent.expect_ctl(Code::Ping).await;
    assert_eq!(&m.payload[..], br#"{"who":"half"}"#);
    vm.agent.reply_ack(b"for the half-closed").await;
    assert_eq!(
        &c.expect_response(Command::Hyper).await.unwrap()[..],
        b"for the half-closed"
    );
    assert_vm_answers(&mut vm).await;
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn shim_timeout_fails_the_hyper_and_names_the_wait() {
    let mut p = common::proxy_with(&["--shim-timeout", "300ms"]).await;
    let mut vm = Vm::register(&p, 1).await;
    let t = vm.tokens[0].clone();
    let data = newcontainer_data(&unique_id("c"));
    let msg = vm
        .runtime
        .hyper("newcontainer", &[&t], Some(&data))
        .await
        .unwrap_err();
    assert!(msg.contains("shim"), "{msg}");
    vm.agent.expect_no_ctl(SHORT).await;
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_hyper_calls_from_fifty_clients_each_get_their_own_reply() {
    const CLIENTS: usize = 50;
    const CALLS: usize = 20;
    let mut p = proxy().await;
    let mut vm = Vm::register(&p, 0).await;
    let auto = vm.agent.auto_respond(AutoReply::Echo).await;
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let mut client = p.client().await;
        let id = vm.id.clone();
        tasks.push(tokio::spawn(async move {
            client.attach_vm(&id, 0).await.unwrap();
            for n in 0..CALLS {
                let data = format!(
                    r#"{{"client":{c},"call":{n},"pad":"{}"}}"#,
                    "x".repeat(n * 13)
                );
                let reply = client.hyper("ping", &[], Some(&data)).await;
                assert_eq!(
                    reply.as_deref(),
                    Ok(data.as_bytes()),
                    "client {c} call {n} got another caller's reply"
                );
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let got = auto
        .wait_for(CLIENTS * CALLS, Duration::from_secs(10))
        .await;
    assert_eq!(got.len(), CLIENTS * CALLS, "no extra ctl traffic");
    let distinct: HashSet<_> = got.iter().map(|m| m.payload.clone()).collect();
    assert_eq!(distinct.len(), CLIENTS * CALLS, "each call forwarded once");
    assert!(got.iter().all(|m| m.code == Code::Ping as u32));
    drop(auto);
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn unregister_then_attach_is_refused_and_the_id_is_free() {
    let mut p = proxy().await;
    let mut vm = Vm::register(&p, 0).await;
    vm.runtime.unregister_vm(&vm.id).await.unwrap();
    let mut c = p.client().await;
    assert!(c.attach_vm(&vm.id, 0).await.is_err());
    assert!(vm.runtime.unregister_vm(&vm.id).await.is_err());
    let agent = MockAgent::start().await;
    c.register_agent(&vm.id, &agent, 0).await.unwrap();
    match c.recv_within(Duration::from_millis(10)).await {
        Recv::TimedOut => {}
        other => panic!("nothing more expected: {other:?}"),
    }
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn disconnect_shim_frees_the_token_without_a_response() {
    let mut p = proxy().await;
    let mut vm = Vm::register(&p, 1).await;
    let t = vm.tokens[0].clone();
    let mut c = vm.start_container(&p, &t).await;
    c.shim.disconnect_shim().await;
    let mut again = p.client().await;
    assert!(
        again.connect_shim(&t).await.is_err(),
        "DisconnectShim frees the token"
    );
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn a_one_byte_message_is_data_unless_it_follows_eof() {
    let mut p = proxy().await;
    let mut vm = Vm::register(&p, 1).await;
    let t = vm.tokens[0].clone();
    let mut c = vm.start_container(&p, &t).await;
    vm.agent.send_io(c.io_base, b"x").await;
    vm.agent.send_io(c.io_base, b"y").await;
    assert_eq!(&c.shim.expect_stdout(2).await[..], b"xy");
    vm.agent.send_io(c.io_base + 1, b"!").await;
    assert_eq!(&c.shim.expect_stderr(1).await[..], b"!");
    c.shim.expect_silence(Duration::from_millis(100)).await;
    vm.agent.send_exit(c.io_base, 255).await;
    assert_eq!(c.shim.expect_exit().await, 255);
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn a_caller_leaving_mid_command_does_not_shift_later_replies() {
    let Metered {
        mut p,
        metrics,
        dir: _dir,
    } = proxy_metered(&["--ctl-timeout", "300s"]).await;
    let mut vm = Vm::register(&p, 0).await;
    let mut quitter = p.client().await;
    quitter.attach_vm(&vm.id, 0).await.unwrap();
    quitter
        .send_hyper("ping", &[], Some(r#"{"who":"quitter"}"#))
        .await;
    let m = vm.agent.expect_ctl(Code::Ping).await;
    assert_eq!(&m.payload[..], br#"{"who":"quitter"}"#);
    drop(quitter);
    // The proxy sees the quitter go while its command is with the agent
    // (not when the agent answers, nor at the ctl timeout, which is
    // longer than this wait): the runtime's is the one connection left.
    wait_metric_at_most(
        &metrics,
        "cc_proxy_connections_open",
        1.0,
        "the quitter to go",
    )
    .await;
    // A second caller queues behind the orphaned transaction.
    vm.runtime
        .send_hyper("ping", &[], Some(r#"{"who":"runtime"}"#))
        .await;
    vm.agent.reply_ack(b"for the quitter").await;
    let m = vm.agent.expect_ctl(Code::Ping).await;
    assert_eq!(&m.payload[..], br#"{"who":"runtime"}"#);
    vm.agent.reply_ack(b"for the runtime").await;
    assert_eq!(
        &vm.runtime.expect_response(Command::Hyper).await.unwrap()[..],
        b"for the runtime"
    );
    assert_vm_answers(&mut vm).await;
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_simultaneous_claims_of_one_token_have_one_winner() {
    let mut p = proxy().await;
    let mut vm = Vm::register(&p, 1).await;
    let t = vm.tokens[0].clone();
    let mut shims = Vec::new();
    for _ in 0..20 {
        shims.push(p.client().await);
    }
    let results = futures_join_all(shims.iter_mut().map(|s| s.connect_shim(&t))).await;
    let winners = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(winners, 1, "{results:?}");
    let w = results.iter().position(|r| r.is_ok()).unwrap();
    let mut shim = shims.swap_remove(w);
    let io_base = vm.newcontainer(&unique_id("c"), &t).await;
    vm.agent.send_io(io_base, b"winner").await;
    assert_eq!(&shim.expect_stdout(6).await[..], b"winner");
    for mut s in shims {
        s.expect_silence(Duration::from_millis(10)).await;
    }
    vm.agent.send_exit(io_base, 0).await;
    assert_eq!(shim.expect_exit().await, 0);
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

/// `join_all` without the futures crate: poll every future concurrently.
async fn futures_join_all<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut set: Vec<_> = futs.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = set.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in set.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(|o| o.expect("ready")).collect()
}
