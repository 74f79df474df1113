//! Golden vectors: real frames and agent messages as bytes, in
//! `tests/vectors/`, each decoded and re-encoded byte for byte (as rustls
//! keeps its testdata).
//!
//! # File format
//!
//! One vector per file. `NAME.hex` is hex text: whitespace is ignored and
//! `#` starts a comment that runs to the end of the line; `NAME.bin` is raw
//! bytes. The file name says what the bytes must decode to:
//!
//! - `command_<op>_…`, `response_<op>_…`, `stream_<op>_…`,
//!   `notification_<op>_…`: one proxy frame of that type and opcode. A
//!   response whose name contains `_error` must carry the Error flag (type
//!   byte `0x11`); no other frame may.
//! - `ctl_<code>_…`: one hyperstart ctl message with that code.
//! - `io_<seq>_…`: one hyperstart io message on that seq.
//!
//! Directives in comments (`# @name value`):
//!
//! - `@json <Type> exact|decode`: the payload decodes as that typed payload;
//!   with `exact`, serializing it again gives the same bytes (the key order
//!   of our structs is the Go structs' order, so this holds for what the Go
//!   runtime sends).
//! - `@canonical <file>`: re-encoding does not give the vector's own bytes
//!   but those of `<file>`. Used by the frame with a 4-word header: the
//!   decoder skips the extension, and this crate only ever writes the
//!   canonical 3-word (12-byte) header.

use std::collections::BTreeMap;
use std::path::PathBuf;

use bytes::BytesMut;
use proxy_proto::hyper::ctl::{Code, CtlDecoder, CtlMessage};
use proxy_proto::hyper::io::{IoDecoder, IoMessage};
use proxy_proto::hyper::relocate::relocate;
use proxy_proto::hyper::{types, MAX_MESSAGE_LEN};
use proxy_proto::payload::{
    AttachVm, ConnectShim, DisconnectShim, ErrorResponse, Hyper, LogEntry, RegisterVm,
    RegisterVmResponse, Signal, UnregisterVm,
};
use proxy_proto::{
    decode_slice, peek_frame, Command, Frame, FrameDecoder, FrameKind, FrameType, Limits,
    Notification, Stream,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Channel {
    Frame(FrameType),
    Ctl,
    Io,
}

#[derive(Debug)]
struct Vector {
    name: String,
    channel: Channel,
    /// Opcode (frames), code (ctl) or seq (io), from the file name.
    number: u64,
    bytes: Vec<u8>,
    directives: BTreeMap<String, String>,
}

impl Vector {
    fn is_error(&self) -> bool {
        self.name.contains("_error")
    }
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

fn parse_hex(name: &str, text: &str) -> (Vec<u8>, BTreeMap<String, String>) {
    let mut hex = String::new();
    let mut directives = BTreeMap::new();
    for line in text.lines() {
        let (data, comment) = match line.split_once('#') {
            Some((d, c)) => (d, Some(c.trim())),
            None => (line, None),
        };
        hex.extend(data.chars().filter(|c| !c.is_whitespace()));
        if let Some(d) = comment.and_then(|c| c.strip_prefix('@')) {
            let (k, v) = d.split_once(' ').unwrap_or((d, ""));
            let old = directives.insert(k.to_string(), v.trim().to_string());
            assert!(old.is_none(), "{name}: directive @{k} given twice");
        }
    }
    let bytes = hex::decode(&hex).unwrap_or_else(|e| panic!("{name}: bad hex: {e}"));
    (bytes, directives)
}

fn load(name: &str) -> Vector {
    let path = dir().join(name);
    let (bytes, directives) = if name.ends_with(".hex") {
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        parse_hex(name, &text)
    } else {
        let b = std::fs::read(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        (b, BTreeMap::new())
    };
    let mut parts = name.split(['_', '.']);
    let prefix = parts.next().unwrap_or_default();
    let channel = match prefix {
        "command" => Channel::Frame(FrameType::Command),
        "response" => Channel::Frame(FrameType::Response),
        "stream" => Channel::Frame(FrameType::Stream),
        "notification" => Channel::Frame(FrameType::Notification),
        "ctl" => Channel::Ctl,
        "io" => Channel::Io,
        other => panic!("{name}: unknown vector prefix `{other}`"),
    };
    let number = parts
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{name}: expected `<prefix>_<number>_…`"));
    Vector {
        name: name.to_string(),
        channel,
        number,
        bytes,
        directives,
    }
}

fn all() -> Vec<Vector> {
    let mut names: Vec<String> = std::fs::read_dir(dir())
        .expect("tests/vectors exists")
        .map(|e| e.expect("readable dir entry").file_name())
        .map(|n| n.into_string().expect("UTF-8 file names"))
        .filter(|n| n.ends_with(".hex") || n.ends_with(".bin"))
        .collect();
    names.sort();
    assert!(names.len() >= 30, "vectors are missing: {names:?}");
    names.iter().map(|n| load(n)).collect()
}

fn frames() -> impl Iterator<Item = Vector> {
    all()
        .into_iter()
        .filter(|v| matches!(v.channel, Channel::Frame(_)))
}

/// The frame a vector must decode to, judged from its name.
fn expected_kind(v: &Vector) -> FrameKind {
    let Channel::Frame(ft) = v.channel else {
        panic!("{}: not a frame", v.name)
    };
    let op = u8::try_from(v.number).expect("opcodes are bytes");
    let name = &v.name;
    let command = || Command::from_u8(op).unwrap_or_else(|| panic!("{name}: opcode {op}"));
    match ft {
        FrameType::Command => FrameKind::Command(command()),
        FrameType::Response => FrameKind::Response {
            command: command(),
            error: v.is_error(),
        },
        FrameType::Stream => {
            FrameKind::Stream(Stream::from_u8(op).unwrap_or_else(|| panic!("{name}: opcode {op}")))
        }
        FrameType::Notification => FrameKind::Notification(
            Notification::from_u8(op).unwrap_or_else(|| panic!("{name}: opcode {op}")),
        ),
    }
}

/// The bytes re-encoding must produce: the vector's own, or its canonical form.
fn expected_encoding(v: &Vector) -> Vec<u8> {
    match v.directives.get("canonical") {
        Some(other) => load(other).bytes,
        None => v.bytes.clone(),
    }
}

#[test]
fn frames_decode_to_the_named_kind_and_reencode_byte_for_byte() {
    let limits = Limits::default();
    for v in frames() {
        let name = &v.name;
        let kind = expected_kind(&v);
        assert_eq!(
            v.bytes[6],
            kind.type_byte() | (v.bytes[6] & 0xe0),
            "{name}: type byte"
        );

        let mut buf = BytesMut::from(&v.bytes[..]);
        let frame = FrameDecoder::new(limits)
            .decode(&mut buf)
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .unwrap_or_else(|| panic!("{name}: incomplete"));
        assert!(buf.is_empty(), "{name}: trailing bytes");
        assert_eq!(frame.kind, kind, "{name}");

        // The borrowed decoders agree.
        let (fref, used) = decode_slice(&v.bytes, &limits).unwrap().unwrap();
        assert_eq!(used, v.bytes.len(), "{name}");
        assert_eq!((fref.kind, fref.payload), (kind, &frame.payload[..]));
        let (header, total) = peek_frame(&v.bytes, &limits).unwrap().unwrap();
        assert_eq!((header.kind, total), (kind, v.bytes.len()), "{name}");
        assert_eq!(header.payload_len as usize, frame.payload.len(), "{name}");

        let mut out = BytesMut::new();
        frame.encode(&mut out);
        assert_eq!(
            hex::encode(&out),
            hex::encode(expected_encoding(&v)),
            "{name}: re-encoding"
        );
        assert_eq!(frame.to_bytes(), out.freeze(), "{name}");
    }
}

#[test]
fn frames_decode_the_same_when_fed_one_byte_at_a_time() {
    for v in frames() {
        let mut dec = FrameDecoder::default();
        let mut buf = BytesMut::new();
        let mut got = None;
        for (i, b) in v.bytes.iter().enumerate() {
            assert!(got.is_none(), "{}: frame before byte {i}", v.name);
            buf.extend_from_slice(&[*b]);
            got = dec.decode(&mut buf).unwrap();
        }
        let got = got.unwrap_or_else(|| panic!("{}: never complete", v.name));
        assert_eq!(got.kind, expected_kind(&v), "{}", v.name);
        assert!(buf.is_empty());
    }
}

#[test]
fn canonical_form_of_a_long_header_decodes_to_the_same_frame() {
    let long = load("stream_1_stdout_header_4_words.hex");
    let short = load("stream_1_stdout.hex");
    assert_eq!(long.bytes[2], 4, "4-word header");
    assert_eq!(long.bytes.len(), short.bytes.len() + 4);
    let dec = |b: &[u8]| {
        FrameDecoder::default()
            .decode(&mut BytesMut::from(b))
            .unwrap()
            .unwrap()
    };
    assert_eq!(dec(&long.bytes), dec(&short.bytes));
    assert_eq!(&dec(&long.bytes).payload[..], b"hello\r\n");
}

#[test]
fn error_flag_only_where_the_name_says() {
    let mut error_responses = 0;
    for v in frames() {
        let flag = v.bytes[6] & 0x10 != 0;
        assert_eq!(flag, v.is_error(), "{}", v.name);
        if flag {
            assert_eq!(v.bytes[6], 0x11, "{}", v.name);
            error_responses += 1;
        }
    }
    assert!(error_responses >= 1);
}

#[test]
fn ctl_messages_decode_to_the_named_code_and_reencode() {
    for v in all().into_iter().filter(|v| v.channel == Channel::Ctl) {
        let name = &v.name;
        let mut buf = BytesMut::from(&v.bytes[..]);
        let m = CtlDecoder::default()
            .decode(&mut buf)
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .unwrap_or_else(|| panic!("{name}: incomplete"));
        assert!(buf.is_empty(), "{name}: trailing bytes");
        assert_eq!(u64::from(m.code), v.number, "{name}");
        assert!(m.code().is_some(), "{name}: a known code");
        let mut out = BytesMut::new();
        m.encode(&mut out, MAX_MESSAGE_LEN).unwrap();
        assert_eq!(hex::encode(&out), hex::encode(&v.bytes), "{name}");
    }
}

#[test]
fn io_messages_decode_to_the_named_seq_and_reencode() {
    for v in all().into_iter().filter(|v| v.channel == Channel::Io) {
        let name = &v.name;
        let mut buf = BytesMut::from(&v.bytes[..]);
        let m = IoDecoder::default()
            .decode(&mut buf)
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .unwrap_or_else(|| panic!("{name}: incomplete"));
        assert!(buf.is_empty(), "{name}: trailing bytes");
        assert_eq!(m.seq, v.number, "{name}");
        if name.contains("_eof") {
            assert!(m.data.is_empty(), "{name}");
        }
        if name.contains("_exit_code") {
            assert_eq!(m.data.len(), 1, "{name}");
        }
        let mut out = BytesMut::new();
        m.encode(&mut out, MAX_MESSAGE_LEN).unwrap();
        assert_eq!(hex::encode(&out), hex::encode(&v.bytes), "{name}");
    }
}

/// Decode as `T`, then serialize again.
fn reserialize<T: DeserializeOwned + Serialize>(name: &str, payload: &[u8]) -> (T, Vec<u8>) {
    let value: T = serde_json::from_slice(payload).unwrap_or_else(|e| panic!("{name}: {e}"));
    let again = serde_json::to_vec(&value).unwrap_or_else(|e| panic!("{name}: {e}"));
    (value, again)
}

/// The payload of a vector (frame, ctl or io), header stripped.
fn payload_of(v: &Vector) -> Vec<u8> {
    let mut buf = BytesMut::from(&v.bytes[..]);
    match v.channel {
        Channel::Frame(_) => FrameDecoder::default()
            .decode(&mut buf)
            .unwrap()
            .unwrap()
            .payload
            .to_vec(),
        Channel::Ctl => CtlDecoder::default()
            .decode(&mut buf)
            .unwrap()
            .unwrap()
            .payload
            .to_vec(),
        Channel::Io => IoDecoder::default()
            .decode(&mut buf)
            .unwrap()
            .unwrap()
            .data
            .to_vec(),
    }
}

#[test]
fn json_payloads_decode_as_their_types_and_reserialize() {
    let mut checked = 0;
    for v in all() {
        let Some(spec) = v.directives.get("json") else {
            continue;
        };
        let name = &v.name;
        let (ty, mode) = spec
            .split_once(' ')
            .unwrap_or_else(|| panic!("{name}: `@json <Type> exact|decode`"));
        let payload = payload_of(&v);
        let again = match ty {
            "RegisterVm" => {
                let (r, b) = reserialize::<RegisterVm>(name, &payload);
                r.validate().unwrap();
                b
            }
            "UnregisterVm" => {
                let (r, b) = reserialize::<UnregisterVm>(name, &payload);
                r.validate().unwrap();
                b
            }
            "AttachVm" => {
                let (r, b) = reserialize::<AttachVm>(name, &payload);
                r.validate().unwrap();
                b
            }
            "Hyper" => {
                let (h, b) = reserialize::<Hyper>(name, &payload);
                h.validate().unwrap();
                assert!(Code::from_hyper_name(&h.hyper_name).is_some(), "{name}");
                b
            }
            "ConnectShim" => {
                let (c, b) = reserialize::<ConnectShim>(name, &payload);
                c.validate().unwrap();
                b
            }
            "DisconnectShim" => reserialize::<DisconnectShim>(name, &payload).1,
            "Signal" => {
                let (s, b) = reserialize::<Signal>(name, &payload);
                assert!((0..31).contains(&s.signal_number), "{name}");
                b
            }
            "RegisterVmResponse" => {
                let (r, b) = reserialize::<RegisterVmResponse>(name, &payload);
                assert!(r.io.url.starts_with("unix://"), "{name}");
                b
            }
            "ErrorResponse" => {
                let (e, b) = reserialize::<ErrorResponse>(name, &payload);
                assert!(!e.msg.is_empty(), "{name}");
                b
            }
            "LogEntry" => reserialize::<LogEntry>(name, &payload).1,
            "Container" => reserialize::<types::Container>(name, &payload).1,
            "ExecCommand" => reserialize::<types::ExecCommand>(name, &payload).1,
            "KillCommand" => reserialize::<types::KillCommand>(name, &payload).1,
            "WindowSize" => reserialize::<types::WindowSize>(name, &payload).1,
            other => panic!("{name}: no payload type `{other}`"),
        };
        match mode {
            "exact" => assert_eq!(
                String::from_utf8_lossy(&again),
                String::from_utf8_lossy(&payload),
                "{name}: re-serialized"
            ),
            "decode" => {}
            other => panic!("{name}: mode `{other}`"),
        }
        checked += 1;
    }
    assert!(checked >= 15, "only {checked} typed payloads");
}

/// Every JSON payload a client or the proxy sends has a typed check: commands
/// with a payload, error responses, RegisterVM/AttachVM responses, log.
#[test]
fn every_json_frame_has_a_typed_check() {
    for v in frames() {
        let kind = expected_kind(&v);
        let json = match kind {
            FrameKind::Command(_) => !payload_of(&v).is_empty(),
            FrameKind::Response { error: true, .. } => true,
            FrameKind::Response {
                command: Command::RegisterVm | Command::AttachVm,
                ..
            } => true,
            FrameKind::Stream(Stream::Log) => true,
            _ => false,
        };
        assert_eq!(
            json,
            v.directives.contains_key("json"),
            "{}: @json directive",
            v.name
        );
    }
}

#[test]
fn every_error_response_is_the_msg_object() {
    for v in frames().filter(|v| v.is_error()) {
        let e: ErrorResponse = serde_json::from_slice(&payload_of(&v)).unwrap();
        let again = Frame::error_response(expected_kind(&v).opcode_command(), &e.msg);
        assert_eq!(again.to_bytes()[..], v.bytes[..], "{}", v.name);
    }
}

trait OpcodeCommand {
    fn opcode_command(self) -> Command;
}

impl OpcodeCommand for FrameKind {
    fn opcode_command(self) -> Command {
        match self {
            FrameKind::Response { command, .. } | FrameKind::Command(command) => command,
            other => panic!("{other:?} has no command"),
        }
    }
}

#[test]
fn the_hyper_newcontainer_relocates_to_the_ctl_vector() {
    let cmd = load("command_3_hyper_newcontainer.hex");
    let hyper: Hyper = serde_json::from_slice(&payload_of(&cmd)).unwrap();
    assert_eq!(hyper.tokens.len(), 1);
    let code = Code::from_hyper_name(&hyper.hyper_name).unwrap();
    let r = relocate(code, hyper.data_bytes(), 3).unwrap();
    let ctl = load("ctl_17_newcontainer.hex");
    assert_eq!(
        String::from_utf8_lossy(&r.data),
        String::from_utf8_lossy(&payload_of(&ctl))
    );
    let c: types::Container = serde_json::from_slice(&r.data).unwrap();
    assert_eq!(r.container_id.as_deref(), Some(c.id.as_str()));
    assert_eq!((c.process.stdio, c.process.stderr), (3, 4));
}

#[test]
fn vectors_cover_every_opcode_of_every_type() {
    let mut kinds = Vec::new();
    let mut ctl = Vec::new();
    let mut io = Vec::new();
    for v in all() {
        match v.channel {
            Channel::Frame(_) => kinds.push(expected_kind(&v)),
            Channel::Ctl => ctl.push(Code::from_u32(v.number as u32).unwrap()),
            Channel::Io => io.push(payload_of(&v).len()),
        }
    }
    for c in Command::ALL {
        assert!(kinds.contains(&FrameKind::Command(c)), "command {c}");
        assert!(
            kinds
                .iter()
                .any(|k| matches!(k, FrameKind::Response { command, .. } if *command == c)),
            "response {c}"
        );
    }
    assert!(kinds
        .iter()
        .any(|k| matches!(k, FrameKind::Response { error: true, .. })));
    for s in Stream::ALL {
        assert!(kinds.contains(&FrameKind::Stream(s)), "stream {}", s.name());
    }
    for n in Notification::ALL {
        assert!(kinds.contains(&FrameKind::Notification(n)), "{n:?}");
    }
    for c in [Code::Ready, Code::Ack, Code::Error, Code::NewContainer] {
        assert!(ctl.contains(&c), "ctl {c}");
    }
    assert!(io.contains(&0), "io EOF");
    assert!(io.contains(&1), "io exit code");
    assert!(io.iter().any(|&n| n > 1), "io data");
}

#[test]
fn vectors_agree_with_the_constructors() {
    // What the proxy itself writes must be what the vectors hold.
    let p = |name: &str| load(name).bytes;
    assert_eq!(
        Frame::process_exited(2).to_bytes()[..],
        p("notification_0_process_exited.hex")[..]
    );
    assert_eq!(
        Frame::stream(Stream::Stdin, &b""[..]).to_bytes()[..],
        p("stream_0_stdin_eof.hex")[..]
    );
    let mut ready = BytesMut::new();
    CtlMessage::new(Code::Ready, &b""[..])
        .encode(&mut ready, MAX_MESSAGE_LEN)
        .unwrap();
    assert_eq!(ready[..], p("ctl_8_ready.hex")[..]);
    let mut eof = BytesMut::new();
    IoMessage::new(3, &b""[..])
        .encode(&mut eof, MAX_MESSAGE_LEN)
        .unwrap();
    assert_eq!(eof[..], p("io_3_eof.hex")[..]);
}
