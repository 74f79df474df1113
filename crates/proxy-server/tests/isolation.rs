//! No head-of-line blocking between clients and VMs (docs/PROTOCOL.md §10.3,
//! §10.5): a slow RegisterVM, a Hyper waiting for its shim, a client that
//! never reads its responses, or a shim that dies mid-frame holds back
//! nobody else.

mod common;

use std::time::Duration;

use common::{assert_vm_answers, check_pattern, pattern, proxy, proxy_with, SHORT};
use proxy_test_support::hyper::Code;
use proxy_test_support::proxy_proto::{Command, Frame, Stream};
use proxy_test_support::scenario::{newcontainer_data, unique_id, Vm};
use proxy_test_support::{assert_serves_fresh_vm, AutoReply, MockAgent, ProxyProcess, ReadyMode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_register_vm_does_not_block_other_registrations() {
    // The mute VM's READY wait outlasts the healthy client's patience
    // (its default timeout): a healthy registration queued behind it fails
    // by timing out, whatever the machine's speed.
    let mut p = proxy_with(&["--ready-timeout", "300s"]).await;
    let mut mute = MockAgent::builder().ready(ReadyMode::Manual).start().await;
    let mut slow = p.client().await;
    slow.set_timeout(Duration::from_secs(600));
    let id = unique_id("mute");
    let ctl = mute.ctl_path().to_owned();
    let io = mute.io_path().to_owned();
    let pending = tokio::spawn(async move { slow.register_vm(&id, &ctl, &io, 0).await });
    // The slow RegisterVM has reached the proxy: it connected to the mute
    // agent and waits for its READY.
    mute.accept().await;
    let mut vm = Vm::register(&p, 0).await;
    assert_vm_answers(&mut vm).await;
    assert!(
        !pending.is_finished(),
        "the mute VM's registration was still waiting meanwhile"
    );
    // READY at last: the slow registration completes.
    mute.send_ready().await;
    pending.await.unwrap().expect("registered once READY came");
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn a_hyper_waiting_for_its_shim_does_not_hold_the_ctl_channel() {
    let mut p = proxy().await;
    let mut vm = Vm::register(&p, 1).await;
    let t = vm.tokens[0].clone();
    let data = newcontainer_data(&unique_id("c"));
    vm.runtime
        .send_hyper("newcontainer", &[&t], Some(&data))
        .await;

    // Meanwhile another client's commands go through.
    let mut other = p.client().await;
    other.attach_vm(&vm.id, 0).await.unwrap();
    for i in 0..3 {
        let (r, ()) = tokio::join!(other.hyper("ping", &[], None), async {
            vm.agent.expect_ctl(Code::Ping).await;
            vm.agent.reply_ack(format!("{i}")).await;
        });
        assert_eq!(r.unwrap(), format!("{i}").as_bytes());
    }
    // Then the shim comes and the waiting Hyper proceeds.
    let mut shim = p.client().await;
    shim.connect_shim(&t).await.unwrap();
    let v = vm.agent.expect_ctl_json(Code::NewContainer).await;
    let io_base = v["process"]["stdio"].as_u64().unwrap();
    vm.agent.reply_ack(b"").await;
    vm.runtime.expect_response(Command::Hyper).await.unwrap();
    vm.agent.send_exit(io_base, 0).await;
    assert_eq!(shim.expect_exit().await, 0);
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_responses_blocks_only_itself() {
    let mut p = proxy().await;
    let mut vm = Vm::register(&p, 1).await;
    let t = vm.tokens[0].clone();
    let mut c = vm.start_container(&p, &t).await;
    let auto = vm.agent.auto_respond(AutoReply::Echo).await;

    // AttachVM and 400 pipelined pings with 8 KiB replies: far more than
    // the socket buffers hold, and this client reads none of them.
    let mut wire = Vec::new();
    Frame::command(
        Command::AttachVm,
        format!(r#"{{"containerId":"{}"}}"#, vm.id).into_bytes(),
    )
    .encode(&mut wire);
    let pad = "y".repeat(8000);
    for i in 0..400 {
        let h = proxy_test_support::proxy_proto::payload::Hyper::new(
            "ping",
            Vec::new(),
            Some(&format!(r#"{{"i":{i},"pad":"{pad}"}}"#)),
        )
        .unwrap();
        Frame::command(Command::Hyper, serde_json::to_vec(&h).unwrap()).encode(&mut wire);
    }
    let mut greedy = tokio::net::UnixStream::connect(p.socket_path())
        .await
        .unwrap();
    // Writing blocks once the proxy stops reading this client: a task.
    let writer = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let _ = greedy.write_all(&wire).await;
        greedy
    });
    // The greedy client's pings reach the agent (wait for that, not for a
    // guessed while).
    let mut piled = auto.count();
    for _ in 0..3000 {
        if piled > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        piled = auto.count();
    }
    assert!(piled > 0, "the greedy client's pings reached the agent");

    // Another client on the same VM is answered; the shim's I/O flows.
    let mut other = p.client().await;
    other.attach_vm(&vm.id, 0).await.unwrap();
    for i in 0..5 {
        let data = format!(r#"{{"other":{i}}}"#);
        let r = other.hyper("ping", &[], Some(&data)).await;
        assert_eq!(r.unwrap(), data.as_bytes());
    }
    vm.agent.send_io(c.io_base, b"flowing").await;
    assert_eq!(&c.shim.expect_stdout(7).await[..], b"flowing");
    c.shim.stdin(&b"in"[..]).await;
    assert_eq!(&vm.agent.expect_io(c.io_base).await[..], b"in");

    writer.abort();
    drop(auto);
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn a_shim_dying_mid_frame_forwards_nothing_of_it() {
    let mut p = proxy().await;
    let mut vm = Vm::register(&p, 1).await;
    let t = vm.tokens[0].clone();
    let c = vm.start_container(&p, &t).await;
    let mut shim = c.shim;
    // Half of a 100 KB stdin frame, then the shim dies.
    let f = Frame::stream(Stream::Stdin, vec![b'z'; 100_000]).to_bytes();
    shim.send_raw(&f[..50_000]).await;
    drop(shim);
    vm.agent.expect_no_io(SHORT).await;
    // A new shim takes over the session.
    let mut shim = p.client().await;
    let mut tries = 0;
    while let Err(e) = shim.connect_shim(&t).await {
        tries += 1;
        assert!(tries < 100, "{e}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shim.stdin(&b"whole"[..]).await;
    assert_eq!(&vm.agent.expect_io(c.io_base).await[..], b"whole");
    vm.agent.send_exit(c.io_base, 5).await;
    assert_eq!(shim.expect_exit().await, 5);
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn unregister_vm_leaves_running_sessions_alone() {
    let mut p = proxy().await;
    let mut vm = Vm::register(&p, 1).await;
    let t = vm.tokens[0].clone();
    let mut c = vm.start_container(&p, &t).await;
    vm.runtime.unregister_vm(&vm.id).await.unwrap();
    // The VM's channels stay until the agent closes them.
    vm.agent.send_io(c.io_base, b"after").await;
    assert_eq!(&c.shim.expect_stdout(5).await[..], b"after");
    c.shim.stdin(&b"still"[..]).await;
    assert_eq!(&vm.agent.expect_io(c.io_base).await[..], b"still");
    // Nobody can attach to it any more; the id can be registered again.
    let mut late = p.client().await;
    assert!(late.attach_vm(&vm.id, 0).await.is_err());
    let fresh = MockAgent::start().await;
    late.register_agent(&vm.id, &fresh, 0).await.unwrap();
    vm.agent.send_exit(c.io_base, 0).await;
    assert_eq!(c.shim.expect_exit().await, 0);
    // The agent going away closes the old VM's shim.
    vm.agent.close().await;
    c.shim.expect_closed().await;
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_vms_with_two_sessions_each_stream_both_ways_without_misrouting() {
    twenty_vms_streaming(proxy().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_on_a_daemon_with_four_worker_threads() {
    // `--threads`: VMs' tasks and shim writers run on different threads,
    // and wake each other across them.
    twenty_vms_streaming(proxy_with(&["--threads", "4"]).await).await;
}

async fn twenty_vms_streaming(p: ProxyProcess) {
    const LEN: usize = 64 << 10;
    let p = std::sync::Arc::new(p);
    let mut tasks = Vec::new();
    for v in 0..20usize {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            let mut vm = Vm::register(&p, 2).await;
            let (ta, tb) = (vm.tokens[0].clone(), vm.tokens[1].clone());
            let mut a = vm.start_container(&p, &ta).await;
            let mut b = vm.start_container(&p, &tb).await;
            // Distinct streams per VM and session: offsets never overlap.
            let (oa, ob) = (v * 4 * LEN, v * 4 * LEN + 2 * LEN);
            let writer = vm.agent.io_writer_task().await;
            writer.send_io(a.io_base, pattern(oa, LEN));
            writer.send_io(b.io_base, pattern(ob, LEN));
            writer.send_io(b.io_base + 1, pattern(ob + LEN, 1000));
            a.shim.stdin(pattern(oa + LEN, LEN)).await;
            b.shim.stdin(pattern(ob + 1000, LEN)).await;
            let (ga, (gb, ge)) = tokio::join!(a.shim.expect_stdout(LEN), async {
                let gb = b.shim.expect_stdout(LEN).await;
                (gb, b.shim.expect_stderr(1000).await)
            });
            check_pattern(oa, &ga).unwrap();
            check_pattern(ob, &gb).unwrap();
            check_pattern(ob + LEN, &ge).unwrap();
            // stdin of both sessions, demultiplexed by seq.
            let mut got_a = Vec::new();
            let mut got_b = Vec::new();
            while got_a.len() < LEN || got_b.len() < LEN {
                let m = vm.agent.recv_io().await.expect("io open");
                if m.seq == a.io_base {
                    got_a.extend_from_slice(&m.data);
                } else if m.seq == b.io_base {
                    got_b.extend_from_slice(&m.data);
                } else {
                    panic!("vm {v}: stdin on unexpected seq {}", m.seq);
                }
            }
            check_pattern(oa + LEN, &got_a).unwrap();
            check_pattern(ob + 1000, &got_b).unwrap();
            writer.flushed(Duration::from_secs(10)).await;
            writer.send_exit(a.io_base, v as u8);
            writer.send_exit(b.io_base, 100 + v as u8);
            assert_eq!(a.shim.expect_exit().await, v as u8);
            assert_eq!(b.shim.expect_exit().await, 100 + v as u8);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut p = std::sync::Arc::try_unwrap(p).expect("tasks are done");
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}
