//! Sessions and relocation (docs/PROTOCOL.md §3, §6–§7, §10.2): ioBase
//! allocation, isolation between VMs, relocation rules, waits for the
//! process to start, ctl size limits.

mod common;

use std::time::Duration;

use common::{assert_vm_answers, proxy, proxy_with, SHORT};
use proxy_test_support::hyper::Code;
use proxy_test_support::proxy_proto::Command;
use proxy_test_support::scenario::{newcontainer_data, unique_id, Vm};
use proxy_test_support::{assert_serves_fresh_vm, MockAgent};

#[tokio::test]
async fn register_vm_response_is_wire_compatible() {
    let mut p = proxy().await;
    let agent = MockAgent::start().await;
    let mut c = p.client().await;
    let id = unique_id("wire");
    let payload = serde_json::json!({
        "containerId": id,
        "ctlSerial": agent.ctl_path(),
        "ioSerial": agent.io_path(),
    })
    .to_string();
    let r = c
        .call(Command::RegisterVm, payload.into_bytes())
        .await
        .unwrap();
    // No token asked: `tokens` is null, `URL` upper-case.
    assert_eq!(
        String::from_utf8_lossy(&r),
        format!(r#"{{"io":{{"URL":"{}","tokens":null}}}}"#, p.url())
    );
    let mut c2 = p.client().await;
    let r = c2
        .call(
            Command::AttachVm,
            format!(r#"{{"containerId":"{id}","numIOStreams":2}}"#).into_bytes(),
        )
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&r).unwrap();
    assert_eq!(v["io"]["URL"], p.url());
    assert_eq!(v["io"]["tokens"].as_array().unwrap().len(), 2);
    p.assert_running();
}

#[tokio::test]
async fn io_bases_are_allocated_per_vm_and_never_cross() {
    let mut p = proxy().await;
    let mut vm1 = Vm::register(&p, 2).await;
    let mut vm2 = Vm::register(&p, 1).await;
    let (a, b) = (vm1.tokens[0].clone(), vm1.tokens[1].clone());
    let t2 = vm2.tokens[0].clone();
    let mut c1a = vm1.start_container(&p, &a).await;
    let mut c1b = vm1.start_container(&p, &b).await;
    let mut c2 = vm2.start_container(&p, &t2).await;
    assert_eq!((c1a.io_base, c1b.io_base), (3, 5), "first token 3, then 5");
    assert_eq!(c2.io_base, 3, "each VM starts at 3");
    // AttachVM's tokens continue the sequence.
    let t3 = vm1.runtime.attach_vm(&vm1.id, 1).await.unwrap().tokens[0].clone();
    let mut c1c = vm1.start_container(&p, &t3).await;
    assert_eq!(c1c.io_base, 7);

    // Same seq on two VMs: each to its own shim.
    vm1.agent.send_io(3, b"vm1").await;
    vm2.agent.send_io(3, b"vm2").await;
    vm1.agent.send_io(6, b"err7").await;
    vm1.agent.send_io(5, b"five").await;
    assert_eq!(&c2.shim.expect_stdout(3).await[..], b"vm2");
    assert_eq!(&c1a.shim.expect_stdout(3).await[..], b"vm1");
    assert_eq!(&c1b.shim.expect_stderr(4).await[..], b"err7");
    assert_eq!(&c1b.shim.expect_stdout(4).await[..], b"five");
    // stdin goes to the right VM and seq.
    c2.shim.stdin(&b"to vm2"[..]).await;
    c1c.shim.stdin(&b"to 7"[..]).await;
    assert_eq!(&vm2.agent.expect_io(3).await[..], b"to vm2");
    assert_eq!(&vm1.agent.expect_io(7).await[..], b"to 7");
    vm1.agent.expect_no_io(SHORT).await;
    c1a.shim.expect_silence(SHORT).await;

    // A token of VM 2 is not usable on VM 1.
    let data = newcontainer_data(&unique_id("c"));
    let mut extra = vm2.runtime.attach_vm(&vm2.id, 1).await.unwrap().tokens;
    let foreign = extra.pop().unwrap();
    let msg = vm1
        .runtime
        .hyper("newcontainer", &[&foreign], Some(&data))
        .await
        .unwrap_err();
    assert!(!msg.is_empty());
    vm1.agent.expect_no_ctl(SHORT).await;
    vm2.agent.expect_no_ctl(SHORT).await;

    for (shim, base, code) in [
        (&mut c1a.shim, 3, 1),
        (&mut c1b.shim, 5, 2),
        (&mut c1c.shim, 7, 3),
    ] {
        vm1.agent.send_exit(base, code).await;
        assert_eq!(shim.expect_exit().await, code);
    }
    vm2.agent.send_exit(3, 4).await;
    assert_eq!(c2.shim.expect_exit().await, 4);
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn execcmd_relocation_follows_the_terminal_flag() {
    let mut p = proxy().await;
    let mut vm = Vm::register(&p, 3).await;
    let toks = vm.tokens.clone();
    let (t0, t1) = ([toks[0].as_str()], [toks[1].as_str()]);
    let mut shims = Vec::new();
    for t in &toks {
        let mut s = p.client().await;
        s.connect_shim(t).await.unwrap();
        shims.push(s);
    }
    // Not a terminal: stderr = ioBase + 1; other fields untouched.
    let data = r#"{"container":"c1","process":{"terminal":false,"args":["ls","-l"],"envs":[{"env":"A","value":"b"}],"workdir":"/w","user":"u"}}"#;
    let (r, ()) = tokio::join!(vm.runtime.hyper("execcmd", &t0, Some(data)), async {
        let v = vm.agent.expect_ctl_json(Code::ExecCmd).await;
        assert_eq!(
            v,
            serde_json::json!({"container":"c1","process":{"terminal":false,"stdio":3,"stderr":4,
                "args":["ls","-l"],"envs":[{"env":"A","value":"b"}],"workdir":"/w","user":"u"}})
        );
        vm.agent.reply_ack(b"").await;
    });
    r.unwrap();
    // A terminal: stderr stays 0.
    let data = r#"{"container":"c1","process":{"terminal":true,"args":["sh"]}}"#;
    let (r, ()) = tokio::join!(vm.runtime.hyper("execcmd", &t1, Some(data)), async {
        let v = vm.agent.expect_ctl_json(Code::ExecCmd).await;
        assert_eq!(v["process"]["stdio"], 5);
        assert_eq!(v["process"]["stderr"].as_u64().unwrap_or(0), 0, "{v}");
        vm.agent.reply_ack(b"").await;
    });
    r.unwrap();
    // A client that sets stdio or stderr itself is refused.
    for data in [
        r#"{"container":"c1","process":{"stdio":9,"args":["sh"]}}"#,
        r#"{"container":"c1","process":{"stderr":9,"args":["sh"]}}"#,
        r#"{"container":"c1"}"#,
        r#"{"container":"c1","process":"sh"}"#,
    ] {
        let msg = vm
            .runtime
            .hyper("execcmd", &[&toks[2]], Some(data))
            .await
            .unwrap_err();
        assert!(!msg.is_empty(), "{data}");
    }
    vm.agent.expect_no_ctl(SHORT).await;
    // Signalling an execcmd process (no container id) is an error.
    let msg = shims[0].signal(15, 0, 0).await.unwrap_err();
    assert!(!msg.is_empty());
    vm.agent.expect_no_ctl(SHORT).await;
    vm.agent.send_exit(3, 0).await;
    assert_eq!(shims[0].expect_exit().await, 0);
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn stdin_and_signals_wait_for_the_process_to_start() {
    let mut p = proxy().await;
    let mut vm = Vm::register(&p, 1).await;
    let t = vm.tokens[0].clone();
    let mut shim = p.client().await;
    shim.connect_shim(&t).await.unwrap();
    // Before the process exists: stdin and a resize are held.
    shim.stdin(&b"early input"[..]).await;
    shim.send_command(
        Command::Signal,
        &br#"{"signalNumber":28,"columns":100,"rows":30}"#[..],
    )
    .await;
    vm.agent.expect_no_io(SHORT).await;
    vm.agent.expect_no_ctl(SHORT).await;

    let id = unique_id("c");
    let io_base = vm.newcontainer(&id, &t).await;
    assert_eq!(&vm.agent.expect_io(io_base).await[..], b"early input");
    let v = vm.agent.expect_ctl_json(Code::WinSize).await;
    assert_eq!(
        v,
        serde_json::json!({"seq": io_base, "row": 30, "column": 100})
    );
    vm.agent.reply_ack(b"").await;
    shim.expect_response(Command::Signal).await.unwrap();
    vm.agent.send_exit(io_base, 0).await;
    assert_eq!(shim.expect_exit().await, 0);
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn process_timeout_bounds_a_signal_waiting_for_its_process() {
    let mut p = proxy_with(&["--process-timeout", "300ms"]).await;
    let mut vm = Vm::register(&p, 1).await;
    let t = vm.tokens[0].clone();
    let mut shim = p.client().await;
    shim.connect_shim(&t).await.unwrap();
    let msg = shim.signal(2, 0, 0).await.unwrap_err();
    assert!(msg.contains("start"), "the error names the wait: {msg}");
    vm.agent.expect_no_ctl(SHORT).await;
    assert_vm_answers(&mut vm).await;
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn ctl_payloads_over_the_agent_limit_are_refused_and_the_vm_stays_usable() {
    let mut p = proxy().await;
    let mut vm = Vm::register(&p, 0).await;
    // 10240 bytes with the 8-byte header is the most the agent takes.
    let fits = format!(r#"{{"pad":"{}"}}"#, "x".repeat(10232 - 10));
    assert_eq!(fits.len(), 10232);
    let too_big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(10232 - 9));
    let msg = vm
        .runtime
        .hyper("writefile", &[], Some(&too_big))
        .await
        .unwrap_err();
    assert!(
        msg.contains("10232") || msg.contains("10240") || msg.contains("large"),
        "a clear error: {msg}"
    );
    vm.agent.expect_no_ctl(SHORT).await;
    let (r, ()) = tokio::join!(vm.runtime.hyper("writefile", &[], Some(&fits)), async {
        let m = vm.agent.expect_ctl(Code::WriteFile).await;
        assert_eq!(m.payload.len(), 10232);
        vm.agent.reply_ack(b"").await;
    });
    r.unwrap();
    assert_vm_answers(&mut vm).await;
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn hyper_without_a_token_sends_output_to_the_null_session() {
    let mut p = proxy().await;
    let mut vm = Vm::register(&p, 1).await;
    let t = vm.tokens[0].clone();
    let mut c = vm.start_container(&p, &t).await;
    let data = newcontainer_data(&unique_id("bg"));
    let (r, ()) = tokio::join!(vm.runtime.hyper("newcontainer", &[], Some(&data)), async {
        vm.agent.expect_ctl(Code::NewContainer).await;
        vm.agent.reply_ack(b"").await;
    });
    r.unwrap();
    // Null-session output is discarded; nobody gets it.
    vm.agent.send_io(1, b"discarded").await;
    vm.agent.send_io(2, b"discarded too").await;
    vm.agent.send_io(c.io_base, b"kept").await;
    assert_eq!(&c.shim.expect_stdout(4).await[..], b"kept");
    c.shim.expect_silence(Duration::from_millis(100)).await;
    vm.agent.send_exit(c.io_base, 0).await;
    assert_eq!(c.shim.expect_exit().await, 0);
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn the_vm_console_is_read_into_the_log() {
    use tokio::io::AsyncWriteExt;
    let mut p = proxy().await;
    let agent = MockAgent::start().await;
    let dir = proxy_test_support::TempDir::new();
    let console_path = dir.socket("console.sock");
    let console = tokio::net::UnixListener::bind(&console_path).unwrap();
    let mut c = p.client().await;
    let id = unique_id("console");
    let payload = serde_json::json!({
        "containerId": id,
        "ctlSerial": agent.ctl_path(),
        "ioSerial": agent.io_path(),
        "console": console_path,
    })
    .to_string();
    c.call(Command::RegisterVm, payload.into_bytes())
        .await
        .unwrap();
    let (mut s, _) = tokio::time::timeout(Duration::from_secs(10), console.accept())
        .await
        .expect("the proxy connects to the console")
        .unwrap();
    s.write_all(b"[    0.000000] Linux version 6.1 marker-line\n")
        .await
        .unwrap();
    p.wait_for_log("marker-line", Duration::from_secs(5)).await;
    // A console that goes away is not the VM going away.
    drop(s);
    let mut vm_runtime = c;
    let mut agent = agent;
    let (r, ()) = tokio::join!(vm_runtime.hyper("ping", &[], None), async {
        agent.expect_ctl(Code::Ping).await;
        agent.reply_ack(b"").await;
    });
    r.unwrap();
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn hyper_data_and_ack_payloads_pass_through_byte_for_byte() {
    let mut p = proxy().await;
    let mut vm = Vm::register(&p, 0).await;
    let odd = "{ \"z\" : 1,\n\t\"a\":\"\\u00e9\u{e9}\", \"n\":[ 1.50, -0, 1e3 ] }";
    let payload = format!(r#"{{"hyperName":"writefile","tokens":[],"data":{odd}}}"#);
    vm.runtime
        .send_command(Command::Hyper, payload.into_bytes())
        .await;
    let m = vm.agent.expect_ctl(Code::WriteFile).await;
    assert_eq!(
        String::from_utf8_lossy(&m.payload),
        odd,
        "data reaches the agent untouched"
    );
    // The agent's ACK payload comes back raw, JSON or not.
    vm.agent.reply_ack(b"\x00not json\xff").await;
    assert_eq!(
        &vm.runtime.expect_response(Command::Hyper).await.unwrap()[..],
        b"\x00not json\xff"
    );
    // No data: an empty payload to the agent.
    let (r, ()) = tokio::join!(vm.runtime.hyper("ping", &[], None), async {
        let m = vm.agent.expect_ctl(Code::Ping).await;
        assert!(m.payload.is_empty() || &m.payload[..] == b"null", "{m:?}");
        vm.agent.reply_ack(b"").await;
    });
    assert!(r.unwrap().is_empty());
    p.assert_running();
}
