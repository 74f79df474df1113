//! The whole daemon, in process: arbitrary bytes from several client
//! connections and from a VM agent's ctl and io channels.
//!
//! One current-thread tokio runtime and one daemon state (`Shared`, as
//! `server::run` builds it; connections are served by `conn::serve` on
//! socket pairs) live for the whole run. Each iteration registers a fresh
//! VM (unique container id) whose agent the harness plays, then feeds the
//! input's chunks, each addressed by its first byte:
//!
//! | `sel % 16` | chunk                                                    |
//! |------------|----------------------------------------------------------|
//! | 0–3        | raw bytes from client connection `sel` (0 = the runtime) |
//! | 4          | raw bytes from the agent on ctl                          |
//! | 5          | raw bytes from the agent on io                           |
//! | 6          | a ConnectShim frame for token `b0 % 2` on connection `b1 % 4` |
//! | 7          | a Hyper `execcmd`/`newcontainer` with token `b0 % 2` (runtime) |
//! | 8          | an agent ctl reply: ACK (`b0` even, data = rest) or ERROR |
//! | 9          | an agent io message on seq `3 + b0 % 4` (data = rest; empty = EOF) |
//! | 10         | a stdin frame (data = rest) on connection `b0 % 4`       |
//! | 11         | a Signal frame (`b0` as signal) on connection `b1 % 4`   |
//! | 12         | close client connection `b0 % 4` (a later chunk reopens it) |
//! | 13         | close the agent's ctl (`b0` even) or io channel          |
//! | 14         | a DisconnectShim frame on connection `b0 % 4`            |
//! | 15         | an AttachVM / UnregisterVM of this VM on connection `b1 % 4` |
//!
//! After each chunk the daemon runs until it is quiet (bounded). At the end
//! every socket is closed and the VM unregistered. Every 64th iteration a
//! fresh VM must register and answer a Hyper `ping`; every 512th, after
//! the daemon's timers (300 ms) have run out, no VM, token or task may
//! remain.
//! A panic in any daemon task aborts (libFuzzer's panic hook).
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use proxy_proto::hyper::ctl::{Code, CtlDecoder, CtlMessage};
use proxy_proto::hyper::io::IoMessage;
use proxy_proto::hyper::MAX_MESSAGE_LEN;
use proxy_proto::payload::RegisterVmResponse;
use proxy_proto::{Command, Frame, FrameDecoder, FrameKind, Limits, Stream};
use proxy_server::config::Config;
use proxy_server::server::Shared;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::runtime::Runtime;

/// How long a step the harness waits for (registration, a ping) may take.
const STEP: Duration = Duration::from_secs(5);
/// The daemon's waits for what the input controls (the agent's replies,
/// a shim, a process start): short, so that nothing lingers long after its
/// iteration. Iterations never wait for them.
const SHORT: &str = "300ms";
/// How long every such wait is over after.
const SHORT_OVER: Duration = Duration::from_millis(600);

struct World {
    rt: Runtime,
    shared: Arc<Shared>,
    dir: PathBuf,
    next: AtomicU64,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        ignore_sigpipe();
        let dir = std::env::temp_dir().join(format!("proxy-fuzz-daemon-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let sock = dir.join("proxy.sock");
        let config = Config::parse_args([
            "cc-proxy",
            "-socket-path",
            sock.to_str().expect("utf-8 temp dir"),
            "--ksm",
            "initial",
            // READY comes from the harness itself, at once; a loaded machine
            // must not make it late.
            "--ready-timeout",
            "5s",
            "--dial-timeout",
            "50ms",
            "--ctl-timeout",
            SHORT,
            "--shim-timeout",
            SHORT,
            "--process-timeout",
            SHORT,
            "--max-frame-size",
            "64KiB",
            "--session-buffer",
            "64KiB",
        ])
        .expect("config");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let shared = Shared::new(config, &sock, false, None);
        World {
            rt,
            shared,
            dir,
            next: AtomicU64::new(0),
        }
    })
}

/// As the daemon's own `main` (Rust's runtime) does: a write to a closed
/// socket is an EPIPE error, not a signal. libFuzzer's C `main` does not.
fn ignore_sigpipe() {
    // SAFETY: setting SIGPIPE's disposition to SIG_IGN, once, before any
    // thread of ours writes to a socket; no handler code is involved.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

/// A client connection served by the daemon; our end.
fn client(shared: &Arc<Shared>) -> UnixStream {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let id = shared.next_conn();
    tokio::spawn(proxy_server::conn::serve(shared.clone(), theirs, id));
    ours
}

fn frame(kind: FrameKind, payload: impl Into<Bytes>) -> Bytes {
    Frame::new(kind, payload).to_bytes()
}

fn command(c: Command, payload: String) -> Bytes {
    frame(FrameKind::Command(c), payload)
}

fn ctl(code: Code, payload: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    CtlMessage::new(code, Bytes::copy_from_slice(payload))
        .encode(&mut b, MAX_MESSAGE_LEN)
        .expect("small ctl message");
    b.to_vec()
}

fn io_msg(seq: u64, data: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    IoMessage::new(seq, Bytes::copy_from_slice(data))
        .encode(&mut b, MAX_MESSAGE_LEN)
        .expect("small io message");
    b.to_vec()
}

/// Read frames from `s` until a response to `cmd` comes; stream frames
/// before it are skipped.
async fn response(s: &mut UnixStream, cmd: Command) -> (bool, Bytes) {
    let mut buf = BytesMut::new();
    let mut dec = FrameDecoder::new(Limits {
        max_payload: 1 << 24,
    });
    let fut = async {
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(f)) => match f.kind {
                    FrameKind::Response { command, error } if command == cmd => {
                        return (error, f.payload)
                    }
                    FrameKind::Response { command, .. } => {
                        panic!(
                            "a {} response while waiting for {}",
                            command.name(),
                            cmd.name()
                        )
                    }
                    _ => continue,
                },
                Ok(None) => {}
                Err(e) => panic!("the daemon sent a malformed frame: {e}"),
            }
            let n = s.read_buf(&mut buf).await.expect("read from the daemon");
            assert!(
                n > 0,
                "the daemon closed the connection instead of answering {}",
                cmd.name()
            );
        }
    };
    tokio::time::timeout(STEP, fut)
        .await
        .unwrap_or_else(|_| panic!("no {} response within {STEP:?}", cmd.name()))
}

/// A well-behaved agent's two channels, accepted after RegisterVM dials.
struct Agent {
    ctl: Option<UnixStream>,
    io: Option<UnixStream>,
}

/// Register VM `cid` with an agent the harness plays; returns the
/// runtime's connection, the agent and the tokens.
async fn register(
    shared: &Arc<Shared>,
    dir: &Path,
    cid: &str,
    tokens: u32,
) -> (UnixStream, Agent, Vec<String>) {
    let ctl_path = dir.join(format!("{cid}.c"));
    let io_path = dir.join(format!("{cid}.i"));
    let ctl_l = UnixListener::bind(&ctl_path).expect("bind ctl");
    let io_l = UnixListener::bind(&io_path).expect("bind io");
    let mut rt = client(shared);
    let req = serde_json::json!({
        "containerId": cid,
        "ctlSerial": ctl_path,
        "ioSerial": io_path,
        "numIOStreams": tokens,
    });
    rt.write_all(&command(Command::RegisterVm, req.to_string()))
        .await
        .expect("write RegisterVM");
    let accept = async {
        let (mut c, _) = ctl_l.accept().await.expect("accept ctl");
        let (i, _) = io_l.accept().await.expect("accept io");
        c.write_all(&ctl(Code::Ready, b"")).await.expect("READY");
        (c, i)
    };
    let (c, i) = tokio::time::timeout(STEP, accept)
        .await
        .expect("the daemon dials the agent");
    let _ = std::fs::remove_file(&ctl_path);
    let _ = std::fs::remove_file(&io_path);
    let (error, payload) = response(&mut rt, Command::RegisterVm).await;
    assert!(
        !error,
        "RegisterVM of a fresh VM failed: {}",
        String::from_utf8_lossy(&payload)
    );
    let r: RegisterVmResponse = serde_json::from_slice(&payload).expect("RegisterVM response");
    assert_eq!(r.io.tokens.len(), tokens as usize);
    (
        rt,
        Agent {
            ctl: Some(c),
            io: Some(i),
        },
        r.io.tokens,
    )
}

/// Let the daemon run until nothing has moved for a while (bounded),
/// discarding whatever it sends to our ends.
async fn pump(conns: &mut [Option<UnixStream>], agent: &mut Agent) {
    let mut scratch = [0u8; 16 * 1024];
    let mut quiet = 0;
    for _ in 0..400 {
        tokio::task::yield_now().await;
        let mut moved = false;
        let all = conns
            .iter_mut()
            .chain([&mut agent.ctl, &mut agent.io])
            .flatten();
        for s in all {
            while let Ok(n) = s.try_read(&mut scratch) {
                if n == 0 {
                    break;
                }
                moved = true;
            }
        }
        if moved {
            quiet = 0;
        } else {
            quiet += 1;
            if quiet >= 8 {
                break;
            }
        }
    }
}

/// Write without waiting on a full socket: what does not fit is dropped
/// (the daemon may be applying back-pressure; that is its right).
fn send(s: &mut Option<UnixStream>, b: &[u8]) {
    if let Some(st) = s {
        let mut off = 0;
        while off < b.len() {
            match st.try_write(&b[off..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => off += n,
            }
        }
    }
}

async fn iteration(w: &World, data: &[u8]) {
    let shared = &w.shared;
    let n = w.next.fetch_add(1, Ordering::Relaxed);
    let cid = format!("fz{n}");
    let (rt, mut agent, tokens) = register(shared, &w.dir, &cid, 2).await;
    let mut conns: [Option<UnixStream>; 4] = [Some(rt), None, None, None];

    let mut rest = data;
    while let Some((&sel, tail)) = rest.split_first() {
        let (&len, tail) = tail.split_first().unwrap_or((&0, &[]));
        let len = usize::from(len).min(tail.len());
        let (chunk, tail) = tail.split_at(len);
        rest = tail;
        let b0 = chunk.first().copied().unwrap_or(0);
        let b1 = chunk.get(1).copied().unwrap_or(0);
        let body = chunk.get(2..).unwrap_or(&[]);
        let conn = |i: u8, conns: &mut [Option<UnixStream>; 4]| -> usize {
            let i = usize::from(i % 4);
            if conns[i].is_none() {
                conns[i] = Some(client(shared));
            }
            i
        };
        match sel % 16 {
            s @ 0..=3 => {
                let i = conn(s, &mut conns);
                send(&mut conns[i], chunk);
            }
            4 => send(&mut agent.ctl, chunk),
            5 => send(&mut agent.io, chunk),
            6 => {
                let i = conn(b1, &mut conns);
                let t = &tokens[usize::from(b0 % 2)];
                let p = serde_json::json!({ "token": t }).to_string();
                send(&mut conns[i], &command(Command::ConnectShim, p));
            }
            7 => {
                let t = &tokens[usize::from(b0 % 2)];
                let name = if b1 % 2 == 0 {
                    "execcmd"
                } else {
                    "newcontainer"
                };
                let p = serde_json::json!({
                    "hyperName": name,
                    "tokens": [t],
                    "data": {
                        "container": format!("c{}", b1 % 3),
                        "process": { "args": ["sh"], "terminal": b0 & 4 != 0 },
                    },
                })
                .to_string();
                let i = conn(0, &mut conns);
                send(&mut conns[i], &command(Command::Hyper, p));
            }
            8 => {
                let code = if b0 % 2 == 0 { Code::Ack } else { Code::Error };
                send(&mut agent.ctl, &ctl(code, body));
            }
            9 => {
                let seq = 3 + u64::from(b0 % 4);
                send(&mut agent.io, &io_msg(seq, chunk.get(1..).unwrap_or(&[])));
            }
            10 => {
                let i = conn(b0, &mut conns);
                let f = frame(
                    FrameKind::Stream(Stream::Stdin),
                    Bytes::copy_from_slice(chunk.get(1..).unwrap_or(&[])),
                );
                send(&mut conns[i], &f);
            }
            11 => {
                let i = conn(b1, &mut conns);
                let p = if b0 & 0x80 != 0 {
                    serde_json::json!({ "signalNumber": 28, "rows": b1, "columns": b0 })
                } else {
                    serde_json::json!({ "signalNumber": b0 })
                };
                send(&mut conns[i], &command(Command::Signal, p.to_string()));
            }
            12 => conns[usize::from(b0 % 4)] = None,
            13 => {
                if b0 % 2 == 0 {
                    agent.ctl = None;
                } else {
                    agent.io = None;
                }
            }
            14 => {
                let i = conn(b0, &mut conns);
                send(
                    &mut conns[i],
                    &command(Command::DisconnectShim, "{}".into()),
                );
            }
            _ => {
                let i = conn(b1, &mut conns);
                let f = if b0 % 2 == 0 {
                    let p = serde_json::json!({ "containerId": cid, "numIOStreams": b0 % 3 });
                    command(Command::AttachVm, p.to_string())
                } else {
                    let p = serde_json::json!({ "containerId": cid });
                    command(Command::UnregisterVm, p.to_string())
                };
                send(&mut conns[i], &f);
            }
        }
        pump(&mut conns, &mut agent).await;
    }

    // Tear down: the agent goes (the VM is torn down), every client goes,
    // and the VM is unregistered (it may already be).
    drop(agent);
    drop(conns);
    let mut c = client(shared);
    let p = serde_json::json!({ "containerId": cid }).to_string();
    c.write_all(&command(Command::UnregisterVm, p))
        .await
        .expect("write UnregisterVM");
    let _ = response(&mut c, Command::UnregisterVm).await;

    if n % 64 == 63 {
        // A ping's ACK later than --ctl-timeout on a loaded machine is not
        // a finding: try again; anything else is.
        let mut attempt = 0;
        while !serves_fresh_vm(w, n, attempt).await {
            attempt += 1;
            assert!(attempt < 5, "five pings of fresh VMs timed out");
        }
    }
    if n % 512 == 511 {
        // Let every daemon wait run out.
        tokio::time::sleep(SHORT_OVER).await;
        let st = shared.state();
        assert_eq!(st.registry.vm_count(), 0, "VMs left after their iteration");
        assert_eq!(
            st.registry.token_count(),
            0,
            "tokens left after their iteration"
        );
        assert!(
            st.registry.vm_handles().next().is_none(),
            "VM tasks left after their iteration"
        );
        drop(st);
        // Every connection is closed and every wait over: the daemon's
        // tasks are gone too (a few may be finishing their last poll).
        let tasks = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        assert!(tasks <= 16, "{tasks} tasks alive after their iterations");
    }
}

/// The daemon is alive and serves: RegisterVM, Hyper ping, UnregisterVM.
/// False if the ping timed out (the harness was too slow to ACK).
async fn serves_fresh_vm(w: &World, n: u64, attempt: u32) -> bool {
    let cid = format!("fresh{n}-{attempt}");
    let (mut rt, mut agent, _tokens) = register(&w.shared, &w.dir, &cid, 1).await;
    let p = serde_json::json!({ "hyperName": "ping", "tokens": [] }).to_string();
    rt.write_all(&command(Command::Hyper, p))
        .await
        .expect("write Hyper");
    let ctl_s = agent.ctl.as_mut().expect("ctl");
    let mut buf = BytesMut::new();
    let mut dec = CtlDecoder::new(MAX_MESSAGE_LEN);
    let got = tokio::time::timeout(STEP, async {
        loop {
            if let Some(m) = dec.decode(&mut buf).expect("the daemon's ctl framing") {
                return m;
            }
            let n = ctl_s.read_buf(&mut buf).await.expect("read ctl");
            assert!(n > 0, "the daemon closed ctl instead of sending PING");
        }
    })
    .await
    .expect("PING reaches the agent");
    assert_eq!(got.code(), Some(Code::Ping));
    ctl_s.write_all(&ctl(Code::Ack, b"")).await.expect("ACK");
    let (error, payload) = response(&mut rt, Command::Hyper).await;
    let msg = String::from_utf8_lossy(&payload).into_owned();
    assert!(!error || msg.contains("timed out"), "ping failed: {msg}");
    drop(agent);
    let p = serde_json::json!({ "containerId": cid }).to_string();
    rt.write_all(&command(Command::UnregisterVm, p))
        .await
        .expect("write UnregisterVM");
    let (error, payload) = response(&mut rt, Command::UnregisterVm).await;
    assert!(
        !error,
        "UnregisterVM failed: {}",
        String::from_utf8_lossy(&payload)
    );
    !msg.contains("timed out")
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    w.rt.block_on(iteration(w, data));
});
