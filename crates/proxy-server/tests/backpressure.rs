//! Output flow (docs/PROTOCOL.md §7, §10.3, §10.5): a shim that stops reading
//! holds back only its own session until its bound, loses nothing, and a
//! shim may drop and reconnect any number of times mid-stream.

mod common;

use std::time::Duration;

use common::{check_pattern, metric_max, pattern, proxy_with, wait_metric, wait_metric_at_most};
use proxy_test_support::scenario::Vm;
use proxy_test_support::{assert_serves_fresh_vm, MockClient, ProxyProcess};

/// ConnectShim with `token`, retrying while the proxy has not yet seen the
/// previous shim of that token go. Returns the shim and the retries.
async fn claim(p: &ProxyProcess, token: &str) -> (MockClient, u32) {
    let mut shim = p.client().await;
    let mut retries = 0;
    loop {
        match shim.connect_shim(token).await {
            Ok(()) => return (shim, retries),
            Err(e) if retries < 100 => {
                assert!(
                    e.contains("claim") || e.contains("connected") || e.contains("live"),
                    "only a live claim may refuse: {e}"
                );
                retries += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("ConnectShim {token} still refused after 100 tries: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_shim_below_its_bound_does_not_stall_other_sessions() {
    // A bound well above what the kernel buffers for one socket, so that a
    // proxy without per-session queues would stall here.
    let mut p = proxy_with(&["--session-buffer", "1MiB"]).await;
    let mut vm = Vm::register(&p, 2).await;
    let (ta, tb) = (vm.tokens[0].clone(), vm.tokens[1].clone());
    let mut a = vm.start_container(&p, &ta).await;
    let mut b = vm.start_container(&p, &tb).await;
    b.shim.set_timeout(Duration::from_secs(30));

    let writer = vm.agent.io_writer_task().await;
    const A_LEN: usize = 640 << 10;
    const B_LEN: usize = 4 << 20;
    writer.send_io(a.io_base, pattern(0, A_LEN));
    writer.send_io(b.io_base, pattern(0, B_LEN));
    // A's shim reads nothing; B's gets everything.
    let got = b.shim.expect_stdout(B_LEN).await;
    check_pattern(0, &got).unwrap();
    writer.flushed(Duration::from_secs(10)).await;

    // Then A reads all of its bytes, in order.
    let got = a.shim.expect_stdout(A_LEN).await;
    check_pattern(0, &got).unwrap();
    writer.send_exit(a.io_base, 1);
    writer.send_exit(b.io_base, 2);
    assert_eq!(a.shim.expect_exit().await, 1);
    assert_eq!(b.shim.expect_exit().await, 2);
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_shim_gets_every_byte_after_back_pressure() {
    const BOUND: usize = 65536;
    let dir = proxy_test_support::TempDir::new();
    let msock = dir.socket("metrics.sock");
    let mut p = proxy_with(&[
        "--session-buffer",
        "65536",
        "--metrics-socket",
        msock.to_str().expect("a UTF-8 temp path"),
    ])
    .await;
    let mut vm = Vm::register(&p, 2).await;
    let (ta, tb) = (vm.tokens[0].clone(), vm.tokens[1].clone());
    let mut a = vm.start_container(&p, &ta).await;
    let mut b = vm.start_container(&p, &tb).await;
    a.shim.set_timeout(Duration::from_secs(30));
    b.shim.set_timeout(Duration::from_secs(30));
    let writer = vm.agent.io_writer_task().await;

    // Phase 1: A's backlog stays under its bound; B flows at full speed.
    let a1 = BOUND * 3 / 4;
    writer.send_io(a.io_base, pattern(0, a1));
    let b1 = 1 << 20;
    writer.send_io(b.io_base, pattern(0, b1));
    check_pattern(0, &b.shim.expect_stdout(b1).await).unwrap();
    writer.flushed(Duration::from_secs(10)).await;

    // Phase 2: far more than the bound for A, then more for B. The proxy
    // must push back on io rather than buffer all of it.
    let a2 = 8 << 20;
    let b2 = 256 << 10;
    let before = writer.written();
    writer.send_io(a.io_base, pattern(a1, a2));
    writer.send_io(b.io_base, pattern(b1, b2));
    // Wait for the event: A's queue full (less than one more message of
    // room), the io reader waiting for it. Then the proxy holds no more
    // than the bound, and the agent cannot have written everything.
    // (The bound as applied: --session-buffer raised to one largest
    // agent message.)
    let bound = wait_metric(
        &msock,
        "cc_proxy_session_buffer_bytes",
        BOUND as f64,
        "the bound",
    )
    .await;
    let full = bound - 65536.0;
    wait_metric(
        &msock,
        "cc_proxy_vm_output_queued_max_session_bytes",
        full,
        "A's queue to fill",
    )
    .await;
    let queued = metric_max(&msock, "cc_proxy_vm_output_queued_max_session_bytes").await;
    assert!(
        queued.is_some_and(|q| q <= bound),
        "A's queue holds {queued:?} bytes, above its bound {bound}"
    );
    let taken = writer.written() - before;
    assert!(
        taken < (a2 + b2) as u64,
        "the proxy took all {taken} bytes without back-pressure while A's shim read nothing"
    );

    // Phase 3: A reads again; every byte of both sessions arrives, in order.
    let (ga, gb) = tokio::join!(a.shim.expect_stdout(a1 + a2), b.shim.expect_stdout(b2));
    check_pattern(0, &ga).unwrap();
    check_pattern(b1, &gb).unwrap();
    writer.flushed(Duration::from_secs(10)).await;
    writer.send_exit(a.io_base, 0);
    writer.send_exit(b.io_base, 0);
    assert_eq!(a.shim.expect_exit().await, 0);
    assert_eq!(b.shim.expect_exit().await, 0);
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn a_shim_reconnecting_a_hundred_times_mid_stream_loses_and_repeats_nothing() {
    let mut p = proxy_with(&[]).await;
    let mut vm = Vm::register(&p, 1).await;
    let t = vm.tokens[0].clone();
    let c = vm.start_container(&p, &t).await;
    let io_base = c.io_base;
    let mut shim = c.shim;
    let mut next_line = 0u64;
    let mut total_retries = 0;
    let lines = |from: u64, n: u64| -> Vec<u8> {
        (from..from + n)
            .flat_map(|i| format!("{i:08}\n").into_bytes())
            .collect()
    };
    for round in 0..100u64 {
        // Output while this shim is connected.
        let n = 1 + (round * 37) % 300;
        let chunk = lines(next_line, n);
        vm.agent.send_io(io_base, &chunk).await;
        let got = shim.expect_stdout(chunk.len()).await;
        assert_eq!(
            got,
            chunk,
            "round {round}: lines {next_line}..{} not contiguous",
            next_line + n
        );
        next_line += n;
        // stdin from this shim reaches the process, in order.
        let line = format!("in {round}\n");
        shim.stdin(line.clone().into_bytes()).await;
        assert_eq!(vm.agent.expect_io(io_base).await, line.as_bytes());

        // Drop without DisconnectShim; output comes while no shim is there.
        drop(shim);
        let n = 1 + (round * 53) % 200;
        let held = lines(next_line, n);
        vm.agent.send_io(io_base, &held).await;
        let (s, retries) = claim(&p, &t).await;
        shim = s;
        total_retries += retries;
        let got = shim.expect_stdout(held.len()).await;
        assert_eq!(
            got,
            held,
            "round {round}: held lines {next_line}..{} lost or repeated",
            next_line + n
        );
        next_line += n;
    }
    vm.agent.send_exit(io_base, 7).await;
    assert_eq!(shim.expect_exit().await, 7);
    // Nothing more: no duplicate delivered late.
    shim.expect_silence(Duration::from_millis(200)).await;
    eprintln!("ConnectShim retries while the old shim was going: {total_retries}");
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_output_is_bounded_and_all_delivered_to_the_next_shim() {
    let dir = proxy_test_support::TempDir::new();
    let msock = dir.socket("metrics.sock");
    let mut p = proxy_with(&[
        "--session-buffer",
        "1MiB",
        "--metrics-socket",
        msock.to_str().expect("a UTF-8 temp path"),
    ])
    .await;
    let mut vm = Vm::register(&p, 1).await;
    let t = vm.tokens[0].clone();
    let c = vm.start_container(&p, &t).await;
    drop(c.shim);
    // The proxy has seen the shim go: what comes now is held for the next.
    wait_metric_at_most(&msock, "cc_proxy_shims_connected", 0.0, "the shim to go").await;
    let writer = vm.agent.io_writer_task().await;
    const LEN: usize = 24 << 20;
    writer.send_io(c.io_base, pattern(0, LEN));
    // The session's queue fills to its bound (the event), and stays there.
    // (The bound as applied: --session-buffer raised to one largest
    // agent message.)
    let bound = wait_metric(
        &msock,
        "cc_proxy_session_buffer_bytes",
        (1 << 20) as f64,
        "the bound",
    )
    .await;
    let full = bound - 65536.0;
    wait_metric(
        &msock,
        "cc_proxy_vm_output_queued_max_session_bytes",
        full,
        "the session's queue to fill",
    )
    .await;
    let queued = metric_max(&msock, "cc_proxy_vm_output_queued_max_session_bytes").await;
    assert!(
        queued.is_some_and(|q| q <= bound),
        "the queue holds {queued:?} bytes, above its bound {bound}"
    );
    let taken = writer.written();
    assert!(
        taken < LEN as u64 / 2,
        "with no shim the proxy took {taken} bytes for a session bounded at 1 MiB"
    );
    let (mut shim, _) = claim(&p, &t).await;
    shim.set_timeout(Duration::from_secs(30));
    let got = shim.expect_stdout(LEN).await;
    check_pattern(0, &got).unwrap();
    writer.flushed(Duration::from_secs(10)).await;
    writer.send_exit(c.io_base, 0);
    assert_eq!(shim.expect_exit().await, 0);
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_to_an_agent_that_does_not_read_pushes_back_on_the_shim() {
    use proxy_test_support::proxy_proto::{Frame, Stream};
    use tokio::io::AsyncWriteExt;
    let mut p = proxy_with(&[]).await;
    let mut vm = Vm::register(&p, 1).await;
    let t = vm.tokens[0].clone();
    let mut c = vm.start_container(&p, &t).await;
    const FRAME: usize = 64 << 10;
    const FRAMES: usize = 1024;
    // The agent reads nothing on io while the shim writes 64 MiB.
    let mut frames = 0usize;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while frames < FRAMES {
            let f = Frame::stream(Stream::Stdin, pattern(frames * FRAME, FRAME)).to_bytes();
            c.shim.raw().write_all(&f).await.unwrap();
            frames += 1;
        }
    })
    .await;
    assert!(
        frames < FRAMES,
        "the proxy accepted all {} MiB of stdin for an agent that reads nothing",
        (FRAMES * FRAME) >> 20
    );
    // Every whole frame written reaches the agent, in order, once it reads.
    vm.agent.set_timeout(Duration::from_secs(30));
    let got = vm.agent.read_io_until(c.io_base, frames * FRAME).await;
    check_pattern(0, &got).unwrap();
    vm.agent.send_exit(c.io_base, 0).await;
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn regression_immediate_reconnect_after_a_drop_is_accepted() {
    let mut p = proxy_with(&[]).await;
    let mut vm = Vm::register(&p, 1).await;
    let t = vm.tokens[0].clone();
    let c = vm.start_container(&p, &t).await;
    let mut shim = c.shim;
    for round in 0..20 {
        drop(shim);
        shim = p.client().await;
        if let Err(e) = shim.connect_shim(&t).await {
            panic!("round {round}: a dropped shim's token must be claimable again: {e}");
        }
    }
    vm.agent.send_exit(c.io_base, 0).await;
    assert_eq!(shim.expect_exit().await, 0);
    p.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_end_of_a_burst_is_delivered_with_nothing_after_it() {
    // A large read of io means the agent is streaming, and a shim writer
    // holding little then waits for the next read to write more at once.
    // A burst that stops there must still be delivered in full — including
    // another session's few bytes read in the same burst — with nothing
    // following it: no more output, no exit, the agent silent.
    use proxy_proto::hyper::io::IoMessage;
    use proxy_proto::hyper::MAX_MESSAGE_LEN;

    let mut p = proxy_with(&[]).await;
    let mut vm = Vm::register(&p, 2).await;
    let (ta, tb) = (vm.tokens[0].clone(), vm.tokens[1].clone());
    let mut a = vm.start_container(&p, &ta).await;
    let mut b = vm.start_container(&p, &tb).await;
    a.shim.set_timeout(Duration::from_secs(5));
    b.shim.set_timeout(Duration::from_secs(5));
    const A_LEN: usize = 48 << 10;
    for round in 0..20 {
        // One write: a few bytes for B between A's messages.
        let mut burst = bytes::BytesMut::new();
        let a_data = pattern(round * A_LEN, A_LEN);
        for (i, chunk) in a_data.chunks(8192).enumerate() {
            if i == 3 {
                IoMessage::new(b.io_base, pattern(round * 100, 100))
                    .encode(&mut burst, MAX_MESSAGE_LEN)
                    .unwrap();
            }
            IoMessage::new(a.io_base, chunk.to_vec())
                .encode(&mut burst, MAX_MESSAGE_LEN)
                .unwrap();
        }
        vm.agent.send_garbage_io(&burst).await;
        let got = a.shim.expect_stdout(A_LEN).await;
        check_pattern(round * A_LEN, &got).unwrap();
        let got = b.shim.expect_stdout(100).await;
        check_pattern(round * 100, &got).unwrap();
    }
    vm.agent.send_exit(a.io_base, 3).await;
    vm.agent.send_exit(b.io_base, 4).await;
    assert_eq!(a.shim.expect_exit().await, 3);
    assert_eq!(b.shim.expect_exit().await, 4);
    p.assert_running();
}

/// The daemon's resident memory, in bytes.
fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {status}"));
    kib * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_flood_of_one_byte_messages_is_bounded_in_memory_not_only_in_bytes() {
    // A hostile agent floods two sessions whose shims read nothing with
    // one-byte messages. Their queues fill to their bound: that bound must
    // hold the memory they take, not only their bytes (counted by payload
    // alone, 2 MiB of bound took over 150 MiB here).
    const BOUND: usize = 1 << 20;
    let m = common::proxy_metered(&["--session-buffer", "1MiB"]).await;
    let mut vm = Vm::register(&m.p, 2).await;
    let (ta, tb) = (vm.tokens[0].clone(), vm.tokens[1].clone());
    let a = vm.start_container(&m.p, &ta).await;
    let b = vm.start_container(&m.p, &tb).await;
    let before = rss_of(m.p.pid());
    let writer = vm.agent.io_writer_task().await;
    let mut chunk = Vec::new();
    for i in 0..(64 << 10) {
        let seq = if i % 2 == 0 { a.io_base } else { b.io_base };
        chunk.extend_from_slice(&seq.to_be_bytes());
        chunk.extend_from_slice(&13u32.to_be_bytes());
        chunk.push(b'x');
    }
    // 64 × 64 Ki messages: far more than both bounds hold.
    for _ in 0..64 {
        writer.send_raw(chunk.clone());
    }
    // Both queues full: the reader waits for room (the agent is stalled).
    common::wait_metric(
        &m.metrics,
        "cc_proxy_memory_budget_used_bytes",
        (2 * BOUND - 4096) as f64,
        "both sessions' queues are full",
    )
    .await;
    let grew = rss_of(m.p.pid()).saturating_sub(before);
    assert!(
        grew < 16 << 20,
        "2 MiB of bound took {} MiB of memory",
        grew >> 20
    );
    // Nothing was lost: the agent's writer is stalled, not failed, and the
    // daemon serves on.
    assert!(writer.written() < 64 * chunk.len() as u64);
    let mut m = m;
    m.p.assert_running();
    assert_serves_fresh_vm(&m.p).await;
}
