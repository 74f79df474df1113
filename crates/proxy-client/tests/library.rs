//! The library against the real `cc-proxy` and a mock agent: a runtime
//! registering a VM and starting processes, shims streaming both ways,
//! signals, errors, reconnects, and the blocking wrapper.

mod common;

use std::time::Duration;

use common::{proxy, Relay, Vm};
use proxy_client::{Client, Command, Error, Output, ReconnectPolicy, Shim, ShimEvent, VmSpec};
use proxy_test_support::hyper::Code;

#[tokio::test]
async fn a_shim_round_trip_stdin_in_stdout_stderr_and_exit_code_out() {
    let p = proxy().await;
    let mut vm = Vm::register(&p, 1).await;
    let token = vm.tokens[0].clone();
    let (shim, mut events) = vm.client.connect_shim(&token).await.unwrap();
    assert_eq!(shim.token(), &token);
    let io_base = vm.newcontainer("c1", &token).await;
    assert_eq!(io_base, 3);

    shim.send_stdin(&b"hello"[..]).await.unwrap();
    assert_eq!(&vm.agent.expect_io(io_base).await[..], b"hello");
    // Any size: 1 MiB goes through in order (split for the agent by the
    // proxy).
    let big: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    shim.send_stdin(big.clone()).await.unwrap();
    let got = vm.agent.read_io_until(io_base, big.len()).await;
    assert!(got[..] == big[..], "1 MiB of stdin arrives intact");
    shim.close_stdin().await.unwrap();
    vm.agent.expect_io_eof(io_base).await;

    vm.agent.send_io(io_base, b"out").await;
    vm.agent.send_io(io_base + 1, b"err").await;
    vm.agent.send_exit(io_base, 3).await;
    let out = events.collect().await.unwrap();
    assert_eq!(
        out,
        Output {
            stdout: b"out".to_vec(),
            stderr: b"err".to_vec(),
            code: 3
        }
    );
    shim.disconnect().await.unwrap();
    assert_eq!(events.recv().await.unwrap_err(), Error::Closed);
}

/// The usual shape of a shim: stdin from one task that drops its handle
/// when done, output read in another.
#[tokio::test]
async fn output_keeps_coming_after_the_stdin_task_dropped_its_handle() {
    let p = proxy().await;
    let mut vm = Vm::register(&p, 1).await;
    let token = vm.tokens[0].clone();
    let (shim, mut events) = Shim::connect(p.url(), &token).await.unwrap();
    let io_base = vm.newcontainer("c-drop", &token).await;
    tokio::spawn(async move {
        shim.send_stdin(&b"in"[..]).await.unwrap();
        shim.close_stdin().await.unwrap();
    })
    .await
    .unwrap();
    assert_eq!(&vm.agent.expect_io(io_base).await[..], b"in");
    vm.agent.expect_io_eof(io_base).await;
    vm.agent.send_io(io_base, b"out").await;
    vm.agent.send_exit(io_base, 0).await;
    let out = events.collect().await.unwrap();
    assert_eq!((&out.stdout[..], out.code), (&b"out"[..], 0));
}

#[tokio::test]
async fn hyper_returns_the_agents_raw_reply() {
    let p = proxy().await;
    let mut vm = Vm::register(&p, 0).await;
    let data = r#"{"hostname": "pod",  "shareDir":"rootfs" }"#;
    let (reply, ()) = tokio::join!(vm.client.hyper("startpod", &[], Some(data)), async {
        let m = vm.agent.expect_ctl(Code::StartPod).await;
        assert_eq!(&m.payload[..], data.as_bytes(), "data passes byte for byte");
        vm.agent.reply_ack(b"\x00\x00\x10\x92").await;
    });
    assert_eq!(&reply.unwrap()[..], b"\x00\x00\x10\x92");
    let e = vm
        .client
        .hyper("ping", &[], Some("{not json"))
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument(ref m) if m.contains("not JSON")),
        "{e}"
    );
}

#[tokio::test]
async fn signals_and_resize_reach_the_agent_as_killcontainer_and_winsize() {
    let p = proxy().await;
    let mut vm = Vm::register(&p, 1).await;
    let token = vm.tokens[0].clone();
    let (shim, mut events) = vm.client.connect_shim(&token).await.unwrap();
    let io_base = vm.newcontainer("c-sig", &token).await;

    let (r, ()) = tokio::join!(shim.signal(15), async {
        let v = vm.agent.expect_ctl_json(Code::KillContainer).await;
        assert_eq!(v["container"], "c-sig");
        assert_eq!(v["signal"], 15);
        vm.agent.reply_ack(b"").await;
    });
    r.unwrap();
    let (r, ()) = tokio::join!(shim.resize(24, 80), async {
        let v = vm.agent.expect_ctl_json(Code::WinSize).await;
        assert_eq!(v["seq"], io_base);
        assert_eq!(v["row"], 24);
        assert_eq!(v["column"], 80);
        vm.agent.reply_ack(b"").await;
    });
    r.unwrap();

    // Refused before sending (an InvalidArgument, not the proxy's error
    // response), in the proxy's own words: proxy-proto's rules.
    for (sig, why) in [
        (28, "use resize(rows, columns)"),
        (31, "invalid signal number 31 (accepted: 0 to 30)"),
        (-1, "invalid signal number -1 (accepted: 0 to 30)"),
    ] {
        let e = shim.signal(sig).await.unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument(ref m) if m.contains(why)),
            "{e}"
        );
    }
    for (rows, columns) in [(0, 80), (24, 0)] {
        let e = shim.resize(rows, columns).await.unwrap_err();
        let want = format!(
            "SIGWINCH needs non-zero columns and rows (got columns {columns}, rows {rows})"
        );
        assert_eq!(e, Error::InvalidArgument(want));
    }

    // The agent's ERROR becomes the proxy's error response, typed.
    let (r, ()) = tokio::join!(shim.signal(9), async {
        vm.agent.expect_ctl(Code::KillContainer).await;
        vm.agent.reply_error("no such process").await;
    });
    let e = r.unwrap_err();
    assert!(
        matches!(
            e,
            Error::Proxy {
                command: Command::Signal,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.proxy_msg().unwrap().contains("no such process"), "{e}");

    vm.agent.send_exit(io_base, 143).await;
    assert_eq!(events.recv().await.unwrap(), ShimEvent::Exited(143));
}

#[tokio::test]
async fn a_proxy_error_is_typed_and_carries_its_message() {
    let p = proxy().await;
    let client = Client::connect(p.url().as_str()).await.unwrap();
    let e = client.attach_vm("no-such-vm", 1).await.unwrap_err();
    match &e {
        Error::Proxy { command, msg } => {
            assert_eq!(*command, Command::AttachVm);
            assert!(msg.contains("no-such-vm"), "{msg}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!e.is_connection());
    let e = client.hyper("ping", &[], None).await.unwrap_err();
    assert!(
        e.proxy_msg().is_some_and(|m| m.contains("not attached")),
        "{e}"
    );
    let e = Shim::connect(p.socket_path(), "not-a-token")
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Proxy {
                command: Command::ConnectShim,
                ..
            }
        ),
        "{e}"
    );
    // The connection is still good after error responses.
    let vm = Vm::register(&p, 0).await;
    let e = client
        .register_vm(VmSpec::new(&vm.id, "/nonexistent/ctl", "/nonexistent/io"))
        .await
        .unwrap_err();
    assert!(
        e.proxy_msg()
            .is_some_and(|m| m.contains("already registered")),
        "{e}"
    );
    client.attach_vm(&vm.id, 2).await.unwrap();
    // Refused before sending.
    let e = client
        .register_vm(VmSpec::new("", "a", "b"))
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument(ref m) if m.contains("containerId")),
        "{e}"
    );
    // More tokens than one request may allocate: the proxy's rule, here.
    let too_many = "numIOStreams 4097 is more than the 4096 one request may allocate";
    let e = client
        .register_vm(VmSpec::new("many", "a", "b").tokens(4097))
        .await
        .unwrap_err();
    assert_eq!(e, Error::InvalidArgument(too_many.into()));
    let e = client.attach_vm(&vm.id, 4097).await.unwrap_err();
    assert_eq!(e, Error::InvalidArgument(too_many.into()));
    client.attach_vm(&vm.id, 1).await.unwrap();

    // A lost connection is told apart.
    let missing = p.socket_path().with_file_name("missing.sock");
    let e = Client::connect(missing.as_path()).await.unwrap_err();
    assert!(
        matches!(e, Error::Connect { .. }) && e.is_connection(),
        "{e}"
    );
    let e = Client::connect("tcp://host:1").await.unwrap_err();
    assert!(matches!(e, Error::InvalidAddress { .. }), "{e}");
}

#[tokio::test]
async fn many_tasks_share_one_client_and_each_gets_its_own_reply() {
    let p = proxy().await;
    let vm = Vm::register(&p, 0).await;
    let Vm {
        mut agent, client, ..
    } = vm;
    let responder = agent
        .auto_respond(proxy_test_support::AutoReply::with(|m| {
            // Echo the request data back as the ACK payload.
            Some(proxy_test_support::hyper::CtlMessage::new(
                Code::Ack,
                m.payload.clone(),
            ))
        }))
        .await;
    let client = std::sync::Arc::new(client);
    let calls: Vec<_> = (0..50)
        .map(|i| {
            let c = client.clone();
            tokio::spawn(async move {
                let data = format!(r#"{{"n":{i}}}"#);
                let r = c.hyper("ping", &[], Some(&data)).await.unwrap();
                assert_eq!(&r[..], data.as_bytes());
            })
        })
        .collect();
    for c in calls {
        c.await.unwrap();
    }
    assert_eq!(responder.count(), 50);
}

#[tokio::test]
async fn a_shim_reconnects_after_its_connection_drops_and_loses_nothing() {
    let p = proxy().await;
    let relay = Relay::start(p.socket_path()).await;
    let mut vm = Vm::register(&p, 1).await;
    let token = vm.tokens[0].clone();
    let (shim, mut events) = Shim::connect(relay.url(), &token).await.unwrap();
    let io_base = vm.newcontainer("c-re", &token).await;

    vm.agent.send_io(io_base, b"before").await;
    assert_eq!(
        events.recv().await.unwrap(),
        ShimEvent::Stdout((&b"before"[..]).into())
    );
    relay.cut().await;
    let e = events.recv().await.unwrap_err();
    assert!(e.is_connection() && e != Error::Closed, "{e}");
    assert!(shim.is_disconnected());
    // Output while no shim is connected is kept by the proxy.
    vm.agent.send_io(io_base, b"while away").await;
    vm.agent.send_io(io_base + 1, b"err away").await;

    shim.reconnect(ReconnectPolicy {
        interval: Duration::from_millis(50),
        total: Duration::from_secs(5),
    })
    .await
    .unwrap();
    assert!(!shim.is_disconnected());
    shim.send_stdin(&b"after"[..]).await.unwrap();
    assert_eq!(&vm.agent.expect_io(io_base).await[..], b"after");
    vm.agent.send_exit(io_base, 0).await;
    let out = events.collect().await.unwrap();
    assert_eq!(out.stdout, b"while away");
    assert_eq!(out.stderr, b"err away");
    assert_eq!(out.code, 0);
}

#[tokio::test]
async fn reconnect_gives_up_after_its_time_with_the_last_error() {
    let p = proxy().await;
    let relay = Relay::start(p.socket_path()).await;
    let vm = Vm::register(&p, 1).await;
    let (shim, _events) = Shim::connect(relay.path(), &vm.tokens[0]).await.unwrap();
    let gone = relay.path().to_owned();
    drop(relay);
    let _ = std::fs::remove_file(&gone);
    let t0 = std::time::Instant::now();
    let e = shim
        .reconnect(ReconnectPolicy {
            interval: Duration::from_millis(50),
            total: Duration::from_millis(400),
        })
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Connect { .. }), "{e}");
    assert!(t0.elapsed() >= Duration::from_millis(300));
}

/// Patience for events that come in milliseconds; only a hang reaches it.
const HANG: Duration = Duration::from_secs(60);

fn quick_reconnect() -> ReconnectPolicy {
    ReconnectPolicy {
        interval: Duration::from_millis(50),
        total: HANG,
    }
}

#[tokio::test]
async fn a_reconnecting_shim_retries_while_the_proxy_still_holds_its_old_claim() {
    let p = proxy().await;
    let relay = Relay::start(p.socket_path()).await;
    let mut vm = Vm::register(&p, 1).await;
    let token = vm.tokens[0].clone();
    let (shim, mut events) = Shim::connect(relay.url(), &token).await.unwrap();
    let io_base = vm.newcontainer("c-held", &token).await;
    assert_eq!(relay.accepted(), 1);
    // The shim's connection dies; the proxy's end of it lives on.
    relay.cut_client_side().await;
    let e = events.recv().await.unwrap_err();
    assert!(e.is_connection() && e != Error::Closed, "{e}");

    let reconnect = tokio::spawn({
        let shim = shim.clone();
        async move { shim.reconnect(quick_reconnect()).await }
    });
    // A third connection means the second was refused (the old claim is
    // alive) and the shim tried again rather than giving up.
    relay.wait_accepted(3, HANG).await;
    relay.release_held();
    tokio::time::timeout(HANG, reconnect)
        .await
        .expect("reconnect ends")
        .unwrap()
        .expect("reclaimed once the proxy let go of the old claim");
    shim.send_stdin(&b"after"[..]).await.unwrap();
    assert_eq!(&vm.agent.expect_io(io_base).await[..], b"after");
}

#[tokio::test]
async fn a_reconnecting_shim_believes_a_refusal_after_its_attempts() {
    let p = proxy().await;
    let relay = Relay::start(p.socket_path()).await;
    let vm = Vm::register(&p, 1).await;
    let (shim, mut events) = Shim::connect(relay.url(), &vm.tokens[0]).await.unwrap();
    relay.cut_client_side().await;
    assert!(events.recv().await.unwrap_err().is_connection());
    // The old claim is never released: every attempt is refused.
    let e = tokio::time::timeout(HANG, shim.reconnect(quick_reconnect()))
        .await
        .expect("a bounded number of attempts, not the policy's total")
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Proxy {
                command: Command::ConnectShim,
                ..
            }
        ),
        "{e}"
    );
    let attempts = usize::try_from(proxy_client::RECLAIM_ATTEMPTS).unwrap();
    assert_eq!(relay.accepted(), 1 + attempts);
}

#[tokio::test]
async fn refusals_are_final_when_the_token_was_never_lost() {
    let p = proxy().await;
    let relay = Relay::start(p.socket_path()).await;
    let vm = Vm::register(&p, 1).await;
    let token = vm.tokens[0].clone();
    let (_holder, _events) = Shim::connect(p.socket_path(), &token).await.unwrap();
    // A first ConnectShim of a token someone else holds: one attempt.
    let e = Shim::connect(relay.url(), &token).await.unwrap_err();
    assert!(e.proxy_msg().is_some(), "{e}");
    assert_eq!(relay.accepted(), 1);

    // A reconnect while this shim's own connection is still up: the claim
    // in the way is not a dead one, so the refusal is not retried.
    let vm2 = Vm::register(&p, 1).await;
    let (shim, _events2) = Shim::connect(relay.url(), &vm2.tokens[0]).await.unwrap();
    assert_eq!(relay.accepted(), 2);
    let e = tokio::time::timeout(HANG, shim.reconnect(quick_reconnect()))
        .await
        .expect("no retries")
        .unwrap_err();
    assert!(e.proxy_msg().is_some(), "{e}");
    assert_eq!(relay.accepted(), 3, "one attempt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_blocking_wrapper_does_the_same_without_async() {
    let p = proxy().await;
    let mut agent = proxy_test_support::MockAgent::start().await;
    let socket = p.socket_path().to_owned();
    let (ctl, io) = (
        agent.ctl_path().display().to_string(),
        agent.io_path().display().to_string(),
    );
    let user = std::thread::spawn(move || -> Result<Output, Error> {
        use proxy_client::blocking;
        let client = blocking::Client::connect(socket.as_path())?;
        let vmio = client.register_vm(VmSpec::new("blocking-vm", ctl, io).tokens(1))?;
        let (shim, mut events) = client.connect_shim(&vmio.tokens[0])?;
        client.hyper(
            "execcmd",
            &vmio.tokens,
            Some(r#"{"container":"c1","process":{"args":["cat"]}}"#),
        )?;
        shim.send_stdin(&b"ping"[..])?;
        // Nothing comes before the agent has seen EOF.
        assert_eq!(events.recv_timeout(Duration::from_millis(10))?, None);
        shim.close_stdin()?;
        let out = events.collect()?;
        shim.disconnect()?;
        client.unregister_vm("blocking-vm")?;
        Ok(out)
    });
    let v = agent.expect_ctl_json(Code::ExecCmd).await;
    assert_eq!(v["process"]["stdio"], 3);
    agent.reply_ack(b"").await;
    assert_eq!(&agent.expect_io(3).await[..], b"ping");
    agent.expect_io_eof(3).await;
    agent.send_io(3, b"pong").await;
    agent.send_exit(3, 5).await;
    let out = tokio::task::spawn_blocking(move || user.join().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.stdout, b"pong");
    assert_eq!(out.code, 5);
}

#[tokio::test]
async fn regression_a_resuming_shim_gets_every_byte_exactly_once_across_cuts() {
    // 8 MiB of stdout whose every 8-byte word holds its offset; the
    // connection is cut under it every 512 KiB received, with output in
    // flight in the relay and its sockets (lost there).
    const LEN: usize = 8 << 20;
    let stream: Vec<u8> = (0..LEN / 8)
        .flat_map(|w| ((w * 8) as u64).to_le_bytes())
        .collect();
    let p = proxy().await;
    let relay = Relay::start(p.socket_path()).await;
    let mut vm = Vm::register(&p, 1).await;
    let token = vm.tokens[0].clone();
    let (shim, mut events) = Shim::connect(relay.url(), &token).await.unwrap();
    let io_base = vm.newcontainer("c-resume", &token).await;
    let writer = vm.agent.io_writer_task().await;
    writer.send_io(io_base, &stream);
    writer.send_io(io_base + 1, b"and stderr");
    writer.send_exit(io_base, 3);

    let mut out = Vec::with_capacity(LEN);
    let mut err = Vec::new();
    let mut next_cut = 512 * 1024;
    let mut cuts = 0;
    let code = loop {
        match events.recv().await {
            Ok(ShimEvent::Stdout(b)) => out.extend_from_slice(&b),
            Ok(ShimEvent::Stderr(b)) => err.extend_from_slice(&b),
            Ok(ShimEvent::Exited(code)) => break code,
            Err(e) if e.is_connection() => {
                shim.reconnect(ReconnectPolicy {
                    interval: Duration::from_millis(20),
                    total: Duration::from_secs(10),
                })
                .await
                .unwrap();
                continue;
            }
            Err(e) => panic!("{e}"),
        }
        if out.len() >= next_cut && cuts < 12 {
            relay.cut().await;
            cuts += 1;
            next_cut = out.len() + 512 * 1024;
        }
    };
    assert!(cuts >= 10, "only {cuts} cuts");
    assert_eq!(code, 3);
    assert_eq!(err, b"and stderr");
    assert_eq!(out.len(), LEN, "every byte once: not lost, not twice");
    if let Some(i) = out.iter().zip(&stream).position(|(a, b)| a != b) {
        panic!("byte {i} differs: the stream is out of order");
    }
}
