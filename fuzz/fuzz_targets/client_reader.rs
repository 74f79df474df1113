//! Arbitrary bytes from "the proxy" into the client library's connection
//! reader (`proxy-client`'s `conn.rs`, through its hidden `fuzzing` entry
//! point): never a panic or a hang, and exactly what the protocol says
//! reaches the caller. An oracle decodes the same bytes with
//! `FrameDecoder` and plays the reader's rules (responses in order to the
//! waiting commands; stdout, stderr and exit frames to a shim; anything
//! else ends the connection); each command's answer and the shim's event
//! sequence must match it, however the bytes are split and however slowly
//! the events are consumed.
//!
//! Input: byte 0 = flags (bit 0 shim, bits 1–3 event queue size − 1, bits
//! 4–7 how often the consumer yields), byte 1 = split knob, byte 2 = number
//! of commands (mod 8), then that many opcode bytes, then the proxy's bytes.
#![no_main]

use std::collections::VecDeque;
use std::sync::OnceLock;

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use proxy_client::fuzzing::read_from_proxy;
use proxy_client::{Error, ShimEvent};
use proxy_proto::{Command, FrameDecoder, FrameKind, Limits, Notification, Stream};
use tokio::runtime::Runtime;

/// The client's own payload limit (`conn.rs`).
const MAX_PAYLOAD: u32 = 16 * 1024 * 1024;
/// Everything is written before the reader may stop reading: keep it
/// within a socket buffer.
const MAX_INPUT: usize = 64 * 1024;

fn rt() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        // SAFETY: SIGPIPE ignored (as Rust's own `main` does, which
        // libFuzzer's replaces), once, before any socket is written.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

/// What the oracle expects for one command.
#[derive(Debug)]
enum Want {
    Ok(Bytes),
    ProxyError(Command),
    /// Unanswered: the connection's end (lost, closed or a violation).
    Ended,
}

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_INPUT || data.len() < 3 {
        return;
    }
    let flags = data[0];
    let knob = data[1];
    let n = usize::from(data[2] % 8);
    let Some(ops) = data.get(3..3 + n) else {
        return;
    };
    let stream = &data[3 + n..];
    let shim = flags & 1 != 0;
    let queue = usize::from((flags >> 1) & 7) + 1;
    let slow_every = usize::from(flags >> 4) + 1;
    // DisconnectShim gets no response and ends what may be sent after it.
    let commands: Vec<Command> = ops
        .iter()
        .map(|&b| match b % 6 {
            5 => Command::Signal,
            o => Command::from_u8(o).expect("opcodes 0..=4"),
        })
        .collect();

    let mut chunks: Vec<&[u8]> = Vec::new();
    let mut rest = stream;
    let mut i = 0usize;
    while !rest.is_empty() {
        let len = (1 + (usize::from(knob) * (i + 1)) % 97).min(rest.len());
        let (a, b) = rest.split_at(len);
        chunks.push(a);
        rest = b;
        i += 1;
    }

    // The oracle.
    let mut waiting: VecDeque<(usize, Command)> = commands.iter().copied().enumerate().collect();
    let mut want: Vec<Want> = commands.iter().map(|_| Want::Ended).collect();
    let mut events: Vec<ShimEvent> = Vec::new();
    let mut buf = BytesMut::from(stream);
    let mut dec = FrameDecoder::new(Limits {
        max_payload: MAX_PAYLOAD,
    });
    while let Ok(Some(f)) = dec.decode(&mut buf) {
        match f.kind {
            FrameKind::Response { command, error } => {
                let Some((i, w)) = waiting.pop_front() else {
                    break;
                };
                if w != command {
                    break;
                }
                want[i] = if error {
                    Want::ProxyError(command)
                } else {
                    Want::Ok(f.payload)
                };
            }
            FrameKind::Stream(Stream::Stdout) if shim => events.push(ShimEvent::Stdout(f.payload)),
            FrameKind::Stream(Stream::Stderr) if shim => events.push(ShimEvent::Stderr(f.payload)),
            FrameKind::Notification(Notification::ProcessExited)
                if shim && f.payload.len() == 1 =>
            {
                events.push(ShimEvent::Exited(f.payload[0]))
            }
            _ => break,
        }
    }

    let out = rt()
        .block_on(read_from_proxy(&chunks, &commands, shim, queue, slow_every))
        .expect("socket pair");

    assert!(out.closed, "the connection is closed after EOF");
    assert_eq!(out.answers.len(), commands.len());
    for (i, (got, want)) in out.answers.iter().zip(&want).enumerate() {
        match (want, got) {
            (Want::Ok(p), Ok(g)) => assert_eq!(p, g, "command {i}'s response payload"),
            (Want::ProxyError(c), Err(Error::Proxy { command, .. })) => {
                assert_eq!(c, command, "command {i}'s error response")
            }
            (Want::Ended, Err(e)) if !matches!(e, Error::Proxy { .. }) => {}
            (w, g) => panic!("command {i} ({:?}): expected {w:?}, got {g:?}", commands[i]),
        }
    }
    if shim {
        let (last, delivered) = out.events.split_last().expect("a shim's events end");
        assert!(
            last.is_err(),
            "the last event is the connection's end: {last:?}"
        );
        let delivered: Vec<&ShimEvent> = delivered
            .iter()
            .map(|e| e.as_ref().expect("only the last event is an end"))
            .collect();
        let expected: Vec<&ShimEvent> = events.iter().collect();
        assert_eq!(delivered, expected, "the shim's events");
    } else {
        assert!(out.events.is_empty());
    }
});
