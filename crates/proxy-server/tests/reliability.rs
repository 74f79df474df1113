//! What hostile tests found (docs/RELIABILITY.md): signals that killed the
//! daemon, forged log lines, a log flood. Each `regression_` test failed on
//! the daemon before its fix.

mod common;

use std::time::Duration;

use common::{assert_vm_answers, proxy};
use nix::sys::signal::Signal;
use proxy_test_support::assert_serves_fresh_vm;
use proxy_test_support::scenario::Vm;

#[tokio::test]
async fn regression_sighup_and_other_signals_do_not_kill_the_daemon() {
    let mut p = proxy().await;
    let mut vm = Vm::register(&p, 1).await;
    let t = vm.tokens[0].clone();
    let mut c = vm.start_container(&p, &t).await;
    for sig in [
        Signal::SIGHUP,
        Signal::SIGUSR2,
        Signal::SIGALRM,
        Signal::SIGPIPE,
        Signal::SIGHUP,
    ] {
        p.signal(sig);
    }
    p.wait_for_log(
        "SIGHUP: there is no configuration to reload",
        Duration::from_secs(10),
    )
    .await;
    p.wait_for_log("SIGALRM", Duration::from_secs(10)).await;
    p.assert_running();
    // The VM and its session are untouched.
    vm.agent.send_io(c.io_base, b"still here").await;
    assert_eq!(&c.shim.expect_stdout(10).await[..], b"still here");
    assert_vm_answers(&mut vm).await;
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn regression_sigquit_shuts_down_cleanly_and_removes_the_socket() {
    let mut p = proxy().await;
    let mut vm = Vm::register(&p, 1).await;
    let t = vm.tokens[0].clone();
    let mut c = vm.start_container(&p, &t).await;
    p.signal(Signal::SIGQUIT);
    let status = p.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "{status}");
    assert!(!p.socket_path().exists(), "the socket is removed on exit");
    c.shim.expect_closed().await;
    vm.runtime.expect_closed().await;
    assert!(
        p.log().contains("SIGQUIT: shutting down"),
        "{}",
        p.log_tail()
    );
}

/// No line of the log may start with what a client smuggled after a
/// newline.
fn assert_no_forged_line(log: &str, forged: &str) {
    for line in log.lines() {
        assert!(
            !line.trim_start().starts_with(forged),
            "a forged log line: {line:?}"
        );
    }
}

#[tokio::test]
async fn regression_newlines_from_clients_do_not_forge_log_lines() {
    let mut p = proxy().await;
    let mut vm = Vm::register(&p, 1).await;
    // A containerId with a line of its own.
    let mut c = p.client().await;
    let evil_id = "pod\nFORGED-1 INFO cc-proxy: all is well";
    let _ = c.attach_vm(evil_id, 0).await;
    let _ = c.unregister_vm(evil_id).await;
    // A log stream message, and one with other control characters.
    c.log(r#"{"level":"warn","containerId":"c\nFORGED-2","source":"shim","msg":"one\nFORGED-3 ERROR x\r\u001b[2J"}"#)
        .await;
    // An agent error message.
    let (r, ()) = tokio::join!(vm.runtime.hyper("ping", &[], None), async {
        vm.agent
            .expect_ctl(proxy_test_support::hyper::Code::Ping)
            .await;
        vm.agent.reply_error("no\nFORGED-4 agent").await;
    });
    assert!(r.is_err());
    // Wait until the last of them was logged (escaped).
    p.wait_for_log("FORGED-4", Duration::from_secs(10)).await;
    p.wait_for_log("FORGED-3", Duration::from_secs(10)).await;
    let log = p.log();
    for n in 1..=4 {
        assert_no_forged_line(&log, &format!("FORGED-{n}"));
    }
    assert!(log.contains(r"\nFORGED-3"), "escaped, not dropped: {log}");
    assert!(
        !log.contains('\u{1b}'),
        "no raw escape sequence reaches the log"
    );
    p.assert_running();
}

#[tokio::test]
async fn regression_running_out_of_descriptors_logs_once_and_a_summary_and_serves_existing_clients()
{
    // The daemon runs at debug level: it logs each retry after the first
    // failure.
    let mut p = proxy_test_support::ProxyProcess::builder(common::BIN)
        .nofile_limit(48)
        .start()
        .await;
    let mut vm = Vm::register(&p, 0).await;
    // Connect until the daemon cannot accept any more: the kernel takes
    // the connections (backlog), the daemon's accept fails with EMFILE.
    let mut held = Vec::new();
    for _ in 0..64 {
        held.push(
            tokio::net::UnixStream::connect(p.socket_path())
                .await
                .unwrap(),
        );
        if p.log().contains("accept failed") {
            break;
        }
        tokio::task::yield_now().await;
    }
    p.wait_for_log("accept failed", Duration::from_secs(10))
        .await;
    // While descriptors are short, existing clients are served.
    assert_vm_answers(&mut vm).await;
    // The daemon keeps retrying while descriptors are short.
    p.wait_for_log("failed_accepts=3", Duration::from_secs(10))
        .await;
    drop(held);
    // A new client is accepted once descriptors are free again.
    let mut fresh = p.client().await;
    assert!(fresh.attach_vm("nobody", 0).await.is_err());
    p.wait_for_log("accepting connections again", Duration::from_secs(10))
        .await;
    let log = p.log();
    let summary = log
        .lines()
        .find(|l| l.contains("accepting connections again"))
        .unwrap();
    let n: u64 = summary
        .split("failed_accepts=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the summary counts the failures: {summary}"));
    assert!(n >= 3, "the daemon retried while exhausted: {summary}");
    assert_eq!(
        log.matches("accept failed").count(),
        1,
        "one line for {n} failed accepts, not one each:\n{log}"
    );
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

/// A stream whose every 8-byte word holds its own offset: any piece of it
/// says where in the stream it lies.
fn offsets(len: usize) -> Vec<u8> {
    (0..len / 8)
        .flat_map(|w| ((w * 8) as u64).to_le_bytes())
        .collect()
}

/// Where in the stream of [`offsets`] the piece `got` starts, checking
/// every byte of it.
fn locate(got: &[u8], want: &[u8]) -> usize {
    let stream_len = want.len();
    for a in 0..8.min(got.len().saturating_sub(8)) {
        let word = u64::from_le_bytes(got[a..a + 8].try_into().unwrap()) as usize;
        if word % 8 != 0 || word < a || word >= stream_len {
            continue;
        }
        let start = word - a;
        if start + got.len() <= stream_len && want[start..start + got.len()] == *got {
            return start;
        }
    }
    panic!(
        "a piece of {} bytes that is no part of the stream",
        got.len()
    );
}

#[tokio::test]
async fn regression_stdout_is_never_duplicated_across_shim_reconnects() {
    const LEN: usize = 16 << 20;
    let mut p = proxy().await;
    let mut vm = Vm::register(&p, 1).await;
    let t = vm.tokens[0].clone();
    let c = vm.start_container(&p, &t).await;
    let io_base = c.io_base;
    let mut shim = c.shim;
    let writer = vm.agent.io_writer_task().await;
    let stream = offsets(LEN);
    writer.send_io(io_base, &stream);
    writer.send_exit(io_base, 5);

    // Ten shims each read a part and vanish with output unread in their
    // socket; the eleventh reads to the end.
    let mut pieces: Vec<(usize, usize)> = Vec::new();
    for k in 0..10 {
        let got = shim.expect_stdout(200_000 + k * 37_000).await;
        pieces.push((locate(&got, &stream), got.len()));
        drop(shim);
        shim = p.client().await;
        shim.connect_shim(&t).await.unwrap();
    }
    let mut last = Vec::new();
    let code = loop {
        let f = shim.recv().await;
        match f.kind {
            proxy_test_support::proxy_proto::FrameKind::Stream(
                proxy_test_support::proxy_proto::Stream::Stdout,
            ) => last.extend_from_slice(&f.payload),
            proxy_test_support::proxy_proto::FrameKind::Notification(_) => break f.payload[0],
            _ => panic!("unexpected {}", proxy_test_support::describe(&f)),
        }
    };
    assert_eq!(code, 5);
    pieces.push((locate(&last, &stream), last.len()));
    assert_eq!(
        pieces.last().map(|(s, l)| s + l),
        Some(LEN),
        "the end of the stream reached the last shim"
    );
    let mut end = 0;
    let mut lost = 0;
    for (i, &(start, len)) in pieces.iter().enumerate() {
        assert!(
            start >= end,
            "shim {i} got bytes {start}..{} again (an earlier shim got up to {end})",
            start + len
        );
        lost += start - end;
        end = start + len;
    }
    // What was lost sat in the dead shims' sockets: bounded by their
    // kernel buffers, and logged.
    assert!(lost <= 10 * (4 << 20), "lost {lost} bytes");
    if lost > 0 {
        assert!(p.log().contains("output is lost"), "{}", p.log_tail());
    }
    p.assert_running();
}

/// The daemon's peak resident memory so far (VmHWM), in bytes.
fn peak_rss(p: &proxy_test_support::ProxyProcess) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", p.pid())).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

const MIB: u64 = 1 << 20;

#[tokio::test]
async fn regression_slow_large_frames_stay_within_the_memory_budget_and_time_out() {
    let mut p = common::proxy_with(&["--memory-budget", "32MiB", "--frame-timeout", "2s"]).await;
    let before = peak_rss(&p);
    // 64 clients each send a 4 MiB Hyper frame's first 3 MiB, then stall.
    let mut clients = Vec::new();
    for _ in 0..64 {
        let mut c = p.client().await;
        clients.push(tokio::spawn(async move {
            let mut wire = common::header(2, 3, 0, 3, 4 << 20).to_vec();
            wire.resize(12 + (3 << 20), b' ');
            // The daemon stops reading once the budget is spent: this
            // write may never finish, and fails when the daemon closes.
            let _ = c.try_send_raw(&wire).await;
            c.expect_closed().await
        }));
    }
    p.wait_for_log("memory budget spent", Duration::from_secs(20))
        .await;
    // Every half-sent frame is timed out with an error response.
    for c in clients {
        let frames = c.await.unwrap();
        let msgs: Vec<String> = frames
            .iter()
            .map(|f| proxy_test_support::error_msg(&f.payload))
            .collect();
        assert!(
            msgs.len() == 1 && msgs[0].starts_with("incomplete frame: "),
            "{msgs:?}"
        );
    }
    let peak = peak_rss(&p);
    assert!(
        peak < before + 32 * MIB + 64 * MIB,
        "peak RSS {} MiB (from {} MiB) with a 32 MiB budget",
        peak / MIB,
        before / MIB
    );
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn regression_output_for_unclaimed_sessions_is_not_hoarded() {
    let mut p = proxy().await;
    let mut vm = Vm::register(&p, 64).await;
    let before = peak_rss(&p);
    let writer = vm.agent.io_writer_task().await;
    // 1 MiB to each of the 64 sessions no shim has claimed (seqs 3, 5, …).
    let chunk = vec![b'x'; 1 << 20];
    for i in 0..64u64 {
        writer.send_io(3 + 2 * i, &chunk);
    }
    writer.flushed(Duration::from_secs(30)).await;
    // The daemon read it all (the agent's writes finished): measure.
    assert_vm_answers(&mut vm).await;
    let grew = peak_rss(&p).saturating_sub(before);
    assert!(
        grew < 24 * MIB,
        "64 MiB for unclaimed sessions grew the daemon by {} MiB",
        grew / MIB
    );
    p.wait_for_log("no shim has claimed", Duration::from_secs(10))
        .await;
    assert_vm_answers(&mut vm).await;
    p.assert_running();
}

#[tokio::test]
async fn regression_tokens_and_connections_are_limited() {
    let mut p = common::proxy_with(&[
        "--max-tokens",
        "10000",
        "--max-tokens-per-vm",
        "20000",
        "--max-connections",
        "12",
    ])
    .await;
    let mut vm = Vm::register(&p, 0).await;
    let before = peak_rss(&p);
    let mut c = p.client().await;
    c.attach_vm(&vm.id, 4096).await.unwrap();
    c.attach_vm(&vm.id, 4096).await.unwrap();
    for _ in 0..100 {
        let msg = c.attach_vm(&vm.id, 4096).await.unwrap_err();
        assert!(msg.contains("limit of 10000 live tokens"), "{msg}");
    }
    let grew = peak_rss(&p).saturating_sub(before);
    assert!(grew < 64 * MIB, "8192 tokens took {} MiB", grew / MIB);
    // Two connections are open (the runtime's and c); ten more fit.
    let mut open = Vec::new();
    for _ in 0..10 {
        let mut o = p.client().await;
        assert!(o.attach_vm("nobody", 0).await.is_err(), "served");
        open.push(o);
    }
    let mut over = p.client().await;
    over.expect_closed().await;
    p.wait_for_log("connection limit reached", Duration::from_secs(10))
        .await;
    // One ends: a new one is served again.
    drop(open.pop());
    let mut again = None;
    for _ in 0..100 {
        let mut o = p.client().await;
        match o.recv_within(Duration::from_millis(50)).await {
            proxy_test_support::Recv::Closed => continue,
            _ => {
                again = Some(o);
                break;
            }
        }
    }
    let mut again = again.expect("a connection is served once another ended");
    assert!(again.attach_vm("nobody", 0).await.is_err());
    assert_vm_answers(&mut vm).await;
    p.assert_running();
}
