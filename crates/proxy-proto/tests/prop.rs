//! Property tests: encode→decode round trips, arbitrary bytes never panic a
//! decoder, and arbitrary splits of a valid stream decode to the same frames.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use proxy_proto::hyper::ctl::{Code, CtlDecoder, CtlMessage};
use proxy_proto::hyper::io::{encode_split, IoDecoder, IoMessage, IO_HEADER_LEN, MAX_IO_DATA};
use proxy_proto::hyper::relocate::{container_id, relocate};
use proxy_proto::hyper::{types, MAX_MESSAGE_LEN};
use proxy_proto::payload::{
    AttachVm, ConnectShim, DisconnectShim, ErrorResponse, Hyper, LogEntry, RegisterVm,
    RegisterVmResponse, Signal, UnregisterVm,
};
use proxy_proto::{
    decode_slice, peek_frame, Command, Frame, FrameDecoder, FrameError, FrameKind, Limits,
    Notification, RawHeader, Stream,
};

fn kind() -> impl Strategy<Value = FrameKind> {
    prop_oneof![
        proptest::sample::select(&Command::ALL[..]).prop_map(FrameKind::Command),
        (proptest::sample::select(&Command::ALL[..]), any::<bool>())
            .prop_map(|(command, error)| FrameKind::Response { command, error }),
        proptest::sample::select(&Stream::ALL[..]).prop_map(FrameKind::Stream),
        proptest::sample::select(&Notification::ALL[..]).prop_map(FrameKind::Notification),
    ]
}

fn frame(max_payload: usize) -> impl Strategy<Value = Frame> {
    (
        kind(),
        proptest::collection::vec(any::<u8>(), 0..=max_payload),
    )
        .prop_map(|(k, p)| Frame::new(k, p))
}

/// Bytes that start like a frame (version 2) more often than chance would.
fn frame_like_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..512),
        (
            0u8..8,
            any::<u8>(),
            any::<u8>(),
            0u32..600,
            proptest::collection::vec(any::<u8>(), 0..512)
        )
            .prop_map(|(words, ty, op, len, rest)| {
                let mut v = vec![0, 2, words, 0, 0, 0, ty & 0x1f, op % 8];
                v.extend_from_slice(&len.to_be_bytes());
                v.extend(rest);
                v
            }),
    ]
}

/// Drain every frame the decoder can take off `buf`, stopping at an error.
fn drain(dec: &mut FrameDecoder, buf: &mut BytesMut) -> (Vec<Frame>, Option<FrameError>) {
    let mut out = Vec::new();
    loop {
        match dec.decode(buf) {
            Ok(Some(f)) => out.push(f),
            Ok(None) => return (out, None),
            Err(e) => return (out, Some(e)),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn frame_round_trips(f in frame(64 * 1024)) {
        let wire = f.to_bytes();
        prop_assert_eq!(wire.len(), f.encoded_len());
        let limits = Limits::default();

        let mut buf = BytesMut::from(&wire[..]);
        prop_assert_eq!(FrameDecoder::new(limits).decode(&mut buf).unwrap(), Some(f.clone()));
        prop_assert!(buf.is_empty());

        let mut shared = wire.clone();
        prop_assert_eq!(FrameDecoder::new(limits).decode_bytes(&mut shared).unwrap(), Some(f.clone()));
        prop_assert!(shared.is_empty());

        let (r, used) = decode_slice(&wire, &limits).unwrap().unwrap();
        prop_assert_eq!((r.kind, r.payload, used), (f.kind, &f.payload[..], wire.len()));
        let (h, total) = peek_frame(&wire, &limits).unwrap().unwrap();
        prop_assert_eq!((h, total), (f.header(), wire.len()));
        prop_assert_eq!(RawHeader::peek(&wire).unwrap().validate().unwrap(), f.header());
    }
}

proptest! {
    #[test]
    fn frames_split_anywhere_decode_the_same(
        frames in proptest::collection::vec(frame(2048), 1..8),
        chunks in proptest::collection::vec(1usize..300, 1..32),
    ) {
        let mut wire = BytesMut::new();
        for f in &frames {
            f.encode(&mut wire);
        }
        let mut dec = FrameDecoder::default();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut rest = &wire[..];
        let mut sizes = chunks.iter().cycle();
        while !rest.is_empty() {
            let n = (*sizes.next().unwrap()).min(rest.len());
            buf.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            let (fs, err) = drain(&mut dec, &mut buf);
            prop_assert!(err.is_none());
            got.extend(fs);
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(got, frames);
    }

    #[test]
    fn ctl_round_trips(code in any::<u32>(), payload in proptest::collection::vec(any::<u8>(), 0..=MAX_MESSAGE_LEN - 8)) {
        let m = CtlMessage { code, payload: Bytes::from(payload) };
        let mut buf = BytesMut::new();
        m.encode(&mut buf, MAX_MESSAGE_LEN).unwrap();
        prop_assert_eq!(buf.len(), m.encoded_len());
        prop_assert_eq!(CtlDecoder::default().decode(&mut buf).unwrap(), Some(m));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn io_round_trips(seq in any::<u64>(), data in proptest::collection::vec(any::<u8>(), 0..=MAX_IO_DATA)) {
        let m = IoMessage::new(seq, data);
        let mut buf = BytesMut::new();
        m.encode(&mut buf, MAX_MESSAGE_LEN).unwrap();
        prop_assert_eq!(IoDecoder::default().decode(&mut buf).unwrap(), Some(m));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn io_split_round_trips(
        seq in any::<u64>(),
        data in proptest::collection::vec(any::<u8>(), 0..30_000),
        max_len in (IO_HEADER_LEN + 1)..=MAX_MESSAGE_LEN,
    ) {
        let mut buf = BytesMut::new();
        let n = encode_split(seq, &data, &mut buf, max_len);
        let mut dec = IoDecoder::new(max_len);
        let mut back = Vec::new();
        let mut count = 0;
        while let Some(m) = dec.decode(&mut buf).unwrap() {
            prop_assert_eq!(m.seq, seq);
            prop_assert!(m.encoded_len() <= max_len);
            prop_assert!(!m.data.is_empty() || data.is_empty());
            back.extend_from_slice(&m.data);
            count += 1;
        }
        prop_assert_eq!(count, n);
        prop_assert_eq!(back, data);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_frame_decoders(
        bytes in frame_like_bytes(),
        // Not u32::MAX: a partial frame reserves room for what the limit allows.
        max_payload in prop_oneof![Just(proxy_proto::DEFAULT_MAX_PAYLOAD), 0u32..1024],
    ) {
        let limits = Limits { max_payload };
        // The three decoders agree on every answer.
        let mut owned = BytesMut::from(&bytes[..]);
        let mut shared = Bytes::copy_from_slice(&bytes);
        let mut slice = &bytes[..];
        let mut dec = FrameDecoder::new(limits);
        loop {
            let a = dec.decode(&mut owned);
            let b = dec.decode_bytes(&mut shared);
            let c = decode_slice(slice, &limits);
            let p = peek_frame(slice, &limits);
            match (a, b, c, p) {
                (Ok(Some(a)), Ok(Some(b)), Ok(Some((c, used))), Ok(Some((h, total)))) => {
                    prop_assert_eq!(&a, &b);
                    prop_assert_eq!((a.kind, &a.payload[..]), (c.kind, c.payload));
                    prop_assert_eq!((h.kind, total), (c.kind, used));
                    slice = &slice[used..];
                }
                (Ok(None), Ok(None), Ok(None), Ok(None)) => break,
                (Err(a), Err(b), Err(c), Err(p)) => {
                    prop_assert_eq!(a, b);
                    prop_assert_eq!(a, c);
                    prop_assert_eq!(a, p);
                    // An error consumes nothing.
                    prop_assert_eq!(owned.len(), slice.len());
                    break;
                }
                other => prop_assert!(false, "decoders disagree: {:?}", other),
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_agent_decoders(
        bytes in proptest::collection::vec(any::<u8>(), 0..1024),
        max_len in prop_oneof![Just(MAX_MESSAGE_LEN), 0usize..64, Just(1 << 20)],
    ) {
        let mut src = BytesMut::from(&bytes[..]);
        let mut dec = CtlDecoder::new(max_len);
        while let Ok(Some(m)) = dec.decode(&mut src) {
            let _ = m.code().map(Code::name);
        }
        let mut src = BytesMut::from(&bytes[..]);
        let mut dec = IoDecoder::new(max_len);
        while let Ok(Some(m)) = dec.decode(&mut src) {
            prop_assert!(m.encoded_len() <= max_len);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_relocation(
        bytes in proptest::collection::vec(any::<u8>(), 0..256),
        code in proptest::sample::select(&Code::ALL[..]),
        io_base in any::<u64>(),
    ) {
        let _ = relocate(code, &bytes, io_base);
        let _ = container_id(&bytes);
    }

    #[test]
    fn relocation_sets_the_session_seqs_for_any_base(
        id in "[a-z0-9]{0,12}",
        terminal in proptest::option::of(any::<bool>()),
        io_base in prop_oneof![any::<u64>(), Just(u64::MAX), Just(u64::MAX - 1), Just(0u64)],
        exec in any::<bool>(),
    ) {
        let mut process = serde_json::json!({"args": ["sh"], "stdio": 0});
        if let Some(t) = terminal {
            process["terminal"] = serde_json::Value::Bool(t);
        }
        let (code, data) = if exec {
            (Code::ExecCmd, serde_json::json!({"container": id, "process": process}))
        } else {
            (Code::NewContainer, serde_json::json!({"id": id, "process": process}))
        };
        let input = serde_json::to_vec(&data).unwrap();
        match relocate(code, &input, io_base) {
            Ok(r) => {
                let v: serde_json::Value = serde_json::from_slice(&r.data).unwrap();
                prop_assert_eq!(v["process"]["stdio"].as_u64(), Some(io_base));
                let stderr = if terminal == Some(true) { None } else { Some(io_base + 1) };
                prop_assert_eq!(v["process"]["stderr"].as_u64(), stderr);
                prop_assert_eq!(r.container_id, (!exec).then(|| id.clone()));
            }
            Err(e) => prop_assert_eq!(io_base, u64::MAX, "{}", e),
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_payload_parsers(
        bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..256),
            "\\{(\"[a-zA-Z]{1,12}\":(\"[ -~]{0,8}\"|-?[0-9]{1,20}|null|true|\\[\\]|\\{\\}),?){0,6}\\}"
                .prop_map(String::into_bytes),
        ],
    ) {
        let b = &bytes[..];
        let _ = serde_json::from_slice::<RegisterVm>(b).map(|r| r.validate());
        let _ = serde_json::from_slice::<UnregisterVm>(b).map(|r| r.validate());
        let _ = serde_json::from_slice::<AttachVm>(b).map(|r| r.validate());
        let _ = serde_json::from_slice::<Hyper>(b).map(|h| h.validate());
        let _ = serde_json::from_slice::<ConnectShim>(b).map(|c| c.validate());
        let _ = serde_json::from_slice::<DisconnectShim>(b);
        let _ = serde_json::from_slice::<Signal>(b);
        let _ = serde_json::from_slice::<RegisterVmResponse>(b);
        let _ = serde_json::from_slice::<ErrorResponse>(b);
        let _ = serde_json::from_slice::<LogEntry>(b);
        let _ = serde_json::from_slice::<types::Container>(b);
        let _ = serde_json::from_slice::<types::ExecCommand>(b);
        let _ = serde_json::from_slice::<types::KillCommand>(b);
        let _ = serde_json::from_slice::<types::WindowSize>(b);
    }

    #[test]
    fn error_response_msg_round_trips_through_json(msg in any::<String>(), op in proptest::sample::select(&Command::ALL[..])) {
        let f = Frame::error_response(op, &msg);
        prop_assert_eq!(f.kind.type_byte(), 0x11);
        let e: ErrorResponse = serde_json::from_slice(&f.payload).unwrap();
        prop_assert_eq!(e.msg, msg);
    }

    #[test]
    fn register_vm_round_trips_through_json(
        container_id in any::<String>(),
        ctl_serial in any::<String>(),
        io_serial in any::<String>(),
        console in any::<String>(),
        num_io_streams in any::<u32>(),
    ) {
        let r = RegisterVm { container_id, ctl_serial, io_serial, console, num_io_streams };
        let json = serde_json::to_vec(&r).unwrap();
        prop_assert_eq!(serde_json::from_slice::<RegisterVm>(&json).unwrap(), r);
    }
}
