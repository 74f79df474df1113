//! Hostile and clumsy frames from clients (docs/PROTOCOL.md §2, §10.1): each
//! gets an error response where one can be addressed, then its connection
//! closes; other connections carry on and the daemon still serves.

mod common;

use std::time::Duration;

use common::{assert_vm_answers, header, proxy, proxy_with};
use proxy_test_support::proxy_proto::{Command, Frame, FrameKind};
use proxy_test_support::scenario::{unique_id, Vm};
use proxy_test_support::{assert_serves_fresh_vm, describe, error_msg, MockAgent};
use tokio::io::AsyncWriteExt;

/// The frames a connection got before the proxy closed it must all be
/// error responses; returns them.
fn only_error_responses(frames: &[Frame]) -> Vec<(Command, String)> {
    frames
        .iter()
        .map(|f| match f.kind {
            FrameKind::Response {
                command,
                error: true,
            } => (command, error_msg(&f.payload)),
            _ => panic!("expected only error responses, got {}", describe(f)),
        })
        .collect()
}

#[tokio::test]
async fn oversized_payload_is_refused_without_reading_it_then_closed() {
    let mut p = proxy().await;
    let mut vm = Vm::register(&p, 0).await;

    // Only the header: a correct proxy answers from the header alone.
    let mut c = p.client().await;
    c.send_raw(&header(2, 3, 0, Command::Hyper as u8, 4 * 1024 * 1024 + 1))
        .await;
    let got = only_error_responses(&c.expect_closed().await);
    assert_eq!(got.len(), 1, "one error response, got {got:?}");
    assert_eq!(got[0].0, Command::Hyper);
    assert!(
        got[0].1.contains("4194305")
            || got[0].1.to_lowercase().contains("large")
            || got[0].1.contains("limit"),
        "the message says the frame is too large: {:?}",
        got[0].1
    );

    // A 4 GiB claim on a stream frame: nothing addressable, just closed.
    let mut c = p.client().await;
    c.send_raw(&header(2, 3, 2, 0, u32::MAX)).await;
    only_error_responses(&c.expect_closed().await);

    assert_vm_answers(&mut vm).await;
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn max_frame_size_flag_sets_the_bound() {
    let mut p = proxy_with(&["--max-frame-size", "1024"]).await;

    // Exactly at the bound: an ordinary (error) response, still open.
    let mut c = p.client().await;
    let mut payload = br#"{"hyperName":"ping"}"#.to_vec();
    payload.resize(1024, b' ');
    let msg = c.call(Command::Hyper, payload.clone()).await.unwrap_err();
    assert!(!msg.contains("malformed"), "{msg}");
    let e = c
        .call(Command::UnregisterVm, &br#"{"containerId":"nope"}"#[..])
        .await;
    assert!(e.is_err(), "the connection still answers");

    // One byte over (payload actually sent): error response, then closed.
    payload.push(b' ');
    c.send(Frame::command(Command::Hyper, payload)).await;
    let got = only_error_responses(&c.expect_closed().await);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, Command::Hyper);

    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn truncated_frames_close_only_their_connection() {
    let mut p = proxy().await;
    let mut vm = Vm::register(&p, 0).await;

    // Half a header, then EOF.
    let mut c = p.client().await;
    c.send_raw(&header(2, 3, 0, 0, 10)[..5]).await;
    c.raw().shutdown().await.unwrap();
    only_error_responses(&c.expect_closed().await);

    // A whole header and part of its payload, then EOF.
    let mut c = p.client().await;
    c.send_raw(&header(2, 3, 0, Command::RegisterVm as u8, 100))
        .await;
    c.send_raw(br#"{"containerId":"#).await;
    c.raw().shutdown().await.unwrap();
    only_error_responses(&c.expect_closed().await);

    // A truncated frame whose sender just goes away (no shutdown).
    let mut c = p.client().await;
    c.send_raw(&header(2, 3, 2, 0, 50)).await;
    c.send_raw(b"abc").await;
    drop(c);

    assert_vm_answers(&mut vm).await;
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn malformed_headers_get_an_error_where_addressable_then_close() {
    let mut p = proxy().await;
    let mut vm = Vm::register(&p, 0).await;

    struct Case {
        what: &'static str,
        bytes: [u8; 12],
        /// The error response that must come, if the header names a command.
        must_answer: Option<Command>,
    }
    let cases = [
        Case {
            what: "version 1",
            bytes: header(1, 3, 0, 3, 0),
            must_answer: None,
        },
        Case {
            what: "version 3",
            bytes: header(3, 3, 0, 3, 0),
            must_answer: None,
        },
        Case {
            what: "version 0",
            bytes: header(0, 3, 0, 0, 0),
            must_answer: None,
        },
        Case {
            what: "header length 2 words",
            bytes: header(2, 2, 0, 3, 0),
            must_answer: None,
        },
        Case {
            what: "header length 0 words",
            bytes: header(2, 0, 0, 3, 0),
            must_answer: None,
        },
        Case {
            what: "type 4",
            bytes: header(2, 3, 4, 0, 0),
            must_answer: None,
        },
        Case {
            what: "type 15",
            bytes: header(2, 3, 15, 0, 0),
            must_answer: None,
        },
        Case {
            what: "command opcode 7",
            bytes: header(2, 3, 0, 7, 0),
            must_answer: None,
        },
        Case {
            what: "command opcode 255",
            bytes: header(2, 3, 0, 255, 0),
            must_answer: None,
        },
        Case {
            what: "stream opcode 4",
            bytes: header(2, 3, 2, 4, 0),
            must_answer: None,
        },
        Case {
            what: "notification opcode 1",
            bytes: header(2, 3, 3, 1, 0),
            must_answer: None,
        },
        Case {
            what: "Error flag on a stdin stream",
            bytes: header(2, 3, 0x12, 0, 0),
            must_answer: None,
        },
    ];
    for case in &cases {
        let mut c = p.client().await;
        c.send_raw(&case.bytes).await;
        let got = c.expect_closed().await;
        let errors = only_error_responses(&got);
        assert!(errors.len() <= 1, "{}: {errors:?}", case.what);
        if let Some(cmd) = case.must_answer {
            assert_eq!(
                errors.first().map(|e| e.0),
                Some(cmd),
                "{}: an error response to {cmd}, got {errors:?}",
                case.what
            );
        }
    }

    // Client-sent frames that are well formed but not for clients:
    // responses, notifications, stdout/stderr streams.
    for f in [
        Frame::response(Command::Hyper, &b""[..]),
        Frame::error_response(Command::Hyper, "x"),
        Frame::process_exited(0),
        Frame::stream(proxy_test_support::proxy_proto::Stream::Stdout, &b"x"[..]),
        Frame::stream(proxy_test_support::proxy_proto::Stream::Stderr, &b"x"[..]),
    ] {
        let mut c = p.client().await;
        c.send(f.clone()).await;
        only_error_responses(&c.expect_closed().await);
    }

    assert_vm_answers(&mut vm).await;
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn frames_split_over_many_writes_are_reassembled() {
    let p = proxy().await;
    let agent = MockAgent::start().await;
    let id = unique_id("split");
    let payload = serde_json::json!({
        "containerId": id,
        "ctlSerial": agent.ctl_path(),
        "ioSerial": agent.io_path(),
        "numIOStreams": 1,
    })
    .to_string();
    let wire = Frame::command(Command::RegisterVm, payload.into_bytes()).to_bytes();
    let mut c = p.client().await;
    // Byte by byte through the header, then uneven pieces of the payload.
    for b in &wire[..12] {
        c.send_raw(std::slice::from_ref(b)).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for piece in wire[12..].chunks(7) {
        c.send_raw(piece).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let r = c.expect_response(Command::RegisterVm).await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&r).unwrap();
    assert_eq!(v["io"]["URL"], p.url());
    let token = v["io"]["tokens"][0].as_str().unwrap().to_owned();

    // A header cut 5 + 7, and two frames glued in one write.
    let shim_wire = Frame::command(
        Command::ConnectShim,
        serde_json::json!({ "token": token })
            .to_string()
            .into_bytes(),
    )
    .to_bytes();
    let mut shim = p.client().await;
    shim.send_raw(&shim_wire[..5]).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    shim.send_raw(&shim_wire[5..12]).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    shim.send_raw(&shim_wire[12..]).await;
    shim.expect_response(Command::ConnectShim).await.unwrap();

    let mut glued = Frame::command(Command::UnregisterVm, &br#"{"containerId":"nope-1"}"#[..])
        .to_bytes()
        .to_vec();
    glued.extend_from_slice(
        &Frame::command(Command::UnregisterVm, &br#"{"containerId":"nope-2"}"#[..]).to_bytes(),
    );
    c.send_raw(&glued).await;
    let e1 = c.expect_error(Command::UnregisterVm).await;
    let e2 = c.expect_error(Command::UnregisterVm).await;
    assert!(e1.contains("nope-1") || !e1.is_empty(), "{e1}");
    assert!(e2.contains("nope-2") || !e2.is_empty(), "{e2}");

    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn invalid_json_is_an_error_response() {
    let mut p = proxy().await;
    for (cmd, payload) in [
        (Command::RegisterVm, &br#"{"containerId":"#[..]),
        (Command::RegisterVm, &b"not json"[..]),
        (
            Command::RegisterVm,
            &br#"{"containerId":5,"ctlSerial":"/a","ioSerial":"/b"}"#[..],
        ),
        (Command::RegisterVm, &br#"["containerId"]"#[..]),
        (Command::AttachVm, &b"\xff\xfe"[..]),
        (Command::Hyper, &br#"{"hyperName":"ping","data":}"#[..]),
        (
            Command::Hyper,
            &br#"{"hyperName":"ping","tokens":"abc"}"#[..],
        ),
        (Command::ConnectShim, &br#"{"token":["a"]}"#[..]),
        (Command::Signal, &br#"{"signalNumber":"nine"}"#[..]),
    ] {
        let mut c = p.client().await;
        let msg = c
            .call(cmd, payload)
            .await
            .expect_err("invalid JSON is refused");
        assert!(!msg.is_empty(), "{cmd}: the error says why");
    }
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn missing_or_empty_required_fields_are_named() {
    let mut p = proxy().await;
    let agent = MockAgent::start().await;
    let ctl = agent.ctl_path().to_str().unwrap().to_owned();
    let io = agent.io_path().to_str().unwrap().to_owned();
    let id = unique_id("fields");
    let cases = [
        (
            Command::RegisterVm,
            serde_json::json!({"containerId": id, "ioSerial": io}),
            "ctlSerial",
        ),
        (
            Command::RegisterVm,
            serde_json::json!({"containerId": id, "ctlSerial": "", "ioSerial": io}),
            "ctlSerial",
        ),
        (
            Command::RegisterVm,
            serde_json::json!({"containerId": id, "ctlSerial": ctl}),
            "ioSerial",
        ),
        (
            Command::RegisterVm,
            serde_json::json!({"containerId": id, "ctlSerial": ctl, "ioSerial": ""}),
            "ioSerial",
        ),
        (
            Command::RegisterVm,
            serde_json::json!({"ctlSerial": ctl, "ioSerial": io}),
            "containerId",
        ),
        (
            Command::RegisterVm,
            serde_json::json!({"containerId": "", "ctlSerial": ctl, "ioSerial": io}),
            "containerId",
        ),
        (Command::AttachVm, serde_json::json!({}), "containerId"),
        (Command::UnregisterVm, serde_json::json!({}), "containerId"),
        (Command::ConnectShim, serde_json::json!({}), "token"),
        (
            Command::ConnectShim,
            serde_json::json!({"token": ""}),
            "token",
        ),
    ];
    let mut c = p.client().await;
    for (cmd, payload, field) in &cases {
        let msg = c
            .call(*cmd, payload.to_string().into_bytes())
            .await
            .expect_err("a missing field is refused");
        assert!(
            msg.contains(field),
            "{cmd} {payload}: the error names `{field}`: {msg:?}"
        );
    }
    // An empty payload is a missing everything.
    let msg = c.call(Command::RegisterVm, &b""[..]).await.unwrap_err();
    assert!(msg.contains("containerId"), "{msg}");

    // Nothing stayed registered: the same id registers fine now.
    let io = c.register_agent(&id, &agent, 0).await.unwrap();
    assert_eq!(io.url, p.url());
    assert!(io.tokens.is_empty());
    // Attached now: Hyper without a name names it.
    for payload in [r#"{"tokens":[]}"#, r#"{"hyperName":""}"#] {
        let msg = c
            .call(Command::Hyper, payload.as_bytes())
            .await
            .unwrap_err();
        assert!(msg.contains("hyperName"), "{payload}: {msg}");
    }
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn log_entries_are_accepted_and_invalid_ones_close_the_connection() {
    let mut p = proxy().await;
    let mut c = p.client().await;
    c.log(r#"{"source":"shim","containerId":"c1","level":"warn","msg":"hello from a test"}"#)
        .await;
    c.log(r#"{"source":"runtime","level":"debug","msg":"no container"}"#)
        .await;
    p.wait_for_log("hello from a test", Duration::from_secs(5))
        .await;
    // Still open: a command gets its response.
    assert!(c.attach_vm("nope", 0).await.is_err());
    for bad in [
        r#"{"source":"kernel","level":"info","msg":"x"}"#,
        r#"{"source":"shim","level":"loud","msg":"x"}"#,
        r#"not json"#,
    ] {
        let mut c = p.client().await;
        c.log(bad).await;
        only_error_responses(&c.expect_closed().await);
    }
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn regression_a_huge_num_io_streams_is_refused() {
    let mut p = proxy().await;
    let agent = MockAgent::start().await;
    let mut c = p.client().await;
    let payload = serde_json::json!({
        "containerId": unique_id("greedy"),
        "ctlSerial": agent.ctl_path(),
        "ioSerial": agent.io_path(),
        "numIOStreams": u32::MAX,
    })
    .to_string();
    let msg = c
        .call(Command::RegisterVm, payload.into_bytes())
        .await
        .unwrap_err();
    assert!(msg.contains("numIOStreams"), "{msg}");
    let mut vm = Vm::register(&p, 0).await;
    let msg = vm.runtime.attach_vm(&vm.id, u32::MAX).await.unwrap_err();
    assert!(msg.contains("numIOStreams"), "{msg}");
    assert_vm_answers(&mut vm).await;
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn longer_headers_and_reserved_fields_are_accepted() {
    let mut p = proxy().await;
    let agent = MockAgent::start().await;
    let id = unique_id("hdr");
    let payload = serde_json::json!({
        "containerId": id,
        "ctlSerial": agent.ctl_path(),
        "ioSerial": agent.io_path(),
        "numIOStreams": 1,
    })
    .to_string();
    // A 5-word header (8 bytes to skip) with every reserved field set.
    let mut wire = header(2, 5, 0, Command::RegisterVm as u8, payload.len() as u32).to_vec();
    wire[3] = 0xaa;
    wire[4] = 0xbb;
    wire[5] = 0xcc;
    wire.extend_from_slice(&[0xee; 8]);
    wire.extend_from_slice(payload.as_bytes());
    let mut c = p.client().await;
    c.send_raw(&wire).await;
    let r = c.expect_response(Command::RegisterVm).await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&r).unwrap();
    let token = v["io"]["tokens"][0].as_str().unwrap().to_owned();
    // The longest header there is: 255 words, then the payload.
    let payload = serde_json::json!({ "token": token }).to_string();
    let mut wire = header(2, 255, 0, Command::ConnectShim as u8, payload.len() as u32).to_vec();
    wire.resize(255 * 4, 0x55);
    wire.extend_from_slice(payload.as_bytes());
    let mut shim = p.client().await;
    shim.send_raw(&wire).await;
    shim.expect_response(Command::ConnectShim).await.unwrap();
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}
