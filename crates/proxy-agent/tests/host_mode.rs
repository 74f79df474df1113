//! The agent in host mode, spoken to in raw hyperstart ctl/io.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use proxy_proto::hyper::ctl::{Code, CtlDecoder, CtlMessage};
use proxy_proto::hyper::io::{IoDecoder, IoMessage};
use proxy_proto::hyper::MAX_MESSAGE_LEN;
use serde_json::json;

static N: AtomicUsize = AtomicUsize::new(0);

struct Agent {
    child: Child,
    dir: PathBuf,
    ctl: UnixStream,
    io: UnixStream,
    ctl_buf: BytesMut,
    io_buf: BytesMut,
}

impl Agent {
    fn start() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "pa-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let ctl_path = dir.join("ctl.sock");
        let io_path = dir.join("io.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_proxy-agent"))
            .arg("--ctl-sock")
            .arg(&ctl_path)
            .arg("--io-sock")
            .arg(&io_path)
            .spawn()
            .unwrap();
        let connect = |p: &PathBuf| {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match UnixStream::connect(p) {
                    Ok(s) => {
                        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                        return s;
                    }
                    Err(e) if Instant::now() > deadline => panic!("connect {p:?}: {e}"),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        };
        let ctl = connect(&ctl_path);
        let io = connect(&io_path);
        let mut a = Agent {
            child,
            dir,
            ctl,
            io,
            ctl_buf: BytesMut::new(),
            io_buf: BytesMut::new(),
        };
        let ready = a.read_ctl();
        assert_eq!(ready.code(), Some(Code::Ready));
        assert!(ready.payload.is_empty());
        a
    }

    fn read_ctl(&mut self) -> CtlMessage {
        let mut dec = CtlDecoder::default();
        loop {
            if let Some(m) = dec.decode(&mut self.ctl_buf).unwrap() {
                return m;
            }
            let mut b = [0u8; 4096];
            let n = self.ctl.read(&mut b).unwrap();
            assert!(n > 0, "ctl closed");
            self.ctl_buf.extend_from_slice(&b[..n]);
        }
    }

    fn raw(&mut self, code: u32, payload: &[u8]) -> CtlMessage {
        let mut buf = BytesMut::new();
        CtlMessage {
            code,
            payload: payload.to_vec().into(),
        }
        .encode(&mut buf, MAX_MESSAGE_LEN)
        .unwrap();
        self.ctl.write_all(&buf).unwrap();
        self.read_ctl()
    }

    fn ack(&mut self, code: Code, data: serde_json::Value) -> Vec<u8> {
        let r = self.raw(code as u32, data.to_string().as_bytes());
        assert_eq!(
            r.code(),
            Some(Code::Ack),
            "{code}: {}",
            String::from_utf8_lossy(&r.payload)
        );
        r.payload.to_vec()
    }

    fn error(&mut self, code: u32, payload: &[u8]) -> String {
        let r = self.raw(code, payload);
        assert_eq!(r.code(), Some(Code::Error));
        String::from_utf8(r.payload.to_vec()).unwrap()
    }

    fn stdin(&mut self, seq: u64, data: &[u8]) {
        let mut buf = BytesMut::new();
        proxy_proto::hyper::io::encode_split(seq, data, &mut buf, MAX_MESSAGE_LEN);
        self.io.write_all(&buf).unwrap();
    }

    fn read_io(&mut self) -> IoMessage {
        let mut dec = IoDecoder::default();
        loop {
            if let Some(m) = dec.decode(&mut self.io_buf).unwrap() {
                return m;
            }
            let mut b = [0u8; 16384];
            let n = self.io.read(&mut b).unwrap();
            assert!(n > 0, "io closed");
            self.io_buf.extend_from_slice(&b[..n]);
        }
    }

    /// Output of the process on `stdio`/`stderr` until its exit code.
    fn collect(&mut self, stdio: u64, stderr: u64) -> (Vec<u8>, Vec<u8>, u8) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut eof = false;
        loop {
            let m = self.read_io();
            if m.seq == stdio {
                if eof {
                    assert_eq!(m.data.len(), 1, "exit code message");
                    return (out, err, m.data[0]);
                }
                if m.data.is_empty() {
                    eof = true;
                } else {
                    out.extend_from_slice(&m.data);
                }
            } else if m.seq == stderr {
                assert!(!eof || m.data.is_empty(), "stderr after stdout EOF");
                err.extend_from_slice(&m.data);
            } else {
                panic!("unexpected seq {}", m.seq);
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn process(args: &[&str], stdio: u64, stderr: u64, terminal: bool) -> serde_json::Value {
    json!({
        "terminal": terminal,
        "stdio": stdio,
        "stderr": stderr,
        "args": args,
        "envs": [{"env": "GREETING", "value": "hi"}],
        "workdir": "/",
    })
}

#[test]
fn version_ping_and_unknown_commands() {
    let mut a = Agent::start();
    assert_eq!(a.ack(Code::Version, json!({})), 4242u32.to_be_bytes());
    assert!(a.ack(Code::Ping, json!({})).is_empty());
    assert!(a.ack(Code::StartPod, json!({"hostname": "x"})).is_empty());
    assert!(a.error(Code::ReadFile as u32, b"{}").contains("readfile"));
    assert!(a
        .error(Code::PsContainer as u32, b"{}")
        .contains("pscontainer"));
    assert!(a.error(99, b"").contains("99"));
    assert!(a
        .error(Code::NewContainer as u32, b"not json")
        .contains("newcontainer"));
    // Still serving after all that.
    assert!(a.ack(Code::Ping, json!({})).is_empty());
}

#[test]
fn container_stdio_stderr_exit_code_and_exec() {
    let mut a = Agent::start();
    a.ack(
        Code::NewContainer,
        json!({"id": "c1", "rootfs": "rootfs", "image": "busybox",
               "process": process(&["sh", "-c", "cat; echo err >&2; exit 3"], 3, 4, false)}),
    );
    a.stdin(3, b"hello\n");
    let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    a.stdin(3, &big);
    a.stdin(3, b"");
    let (out, err, code) = a.collect(3, 4);
    let mut want = b"hello\n".to_vec();
    want.extend_from_slice(&big);
    assert_eq!(out.len(), want.len());
    assert!(out == want);
    assert_eq!(err, b"err\n");
    assert_eq!(code, 3);

    a.ack(
        Code::ExecCmd,
        json!({"container": "c1", "process": process(&["sh", "-c", "echo $GREETING; pwd"], 5, 6, false)}),
    );
    let (out, err, code) = a.collect(5, 6);
    assert_eq!(out, b"hi\n/\n");
    assert!(err.is_empty());
    assert_eq!(code, 0);

    let e = a.error(
        Code::ExecCmd as u32,
        json!({"container": "nope", "process": process(&["true"], 7, 8, false)})
            .to_string()
            .as_bytes(),
    );
    assert!(e.contains("nope"), "{e}");
    let e = a.error(
        Code::NewContainer as u32,
        json!({"id": "c2", "process": process(&["/no/such/program"], 7, 8, false)})
            .to_string()
            .as_bytes(),
    );
    assert!(e.contains("/no/such/program"), "{e}");
    a.ack(Code::RemoveContainer, json!({"container": "c1"}));
    a.error(
        Code::RemoveContainer as u32,
        json!({"container": "c1"}).to_string().as_bytes(),
    );
}

#[test]
fn killcontainer_sigterm_gives_143() {
    let mut a = Agent::start();
    a.ack(
        Code::NewContainer,
        json!({"id": "s", "process": process(&["sleep", "100"], 3, 4, false)}),
    );
    a.ack(
        Code::KillContainer,
        json!({"container": "s", "signal": 15, "allProcesses": false}),
    );
    let (out, err, code) = a.collect(3, 4);
    assert!(out.is_empty() && err.is_empty());
    assert_eq!(code, 143);
    // Signalling a finished container is harmless.
    a.ack(
        Code::KillContainer,
        json!({"container": "s", "signal": 9, "allProcesses": true}),
    );
    a.error(
        Code::KillContainer as u32,
        json!({"container": "x", "signal": 9})
            .to_string()
            .as_bytes(),
    );
}

#[test]
fn terminal_with_winsize() {
    let mut a = Agent::start();
    a.ack(
        Code::NewContainer,
        json!({"id": "t", "process": process(&["sh", "-c", "read x; stty size; exit 5"], 3, 0, true)}),
    );
    a.ack(Code::WinSize, json!({"seq": 3, "row": 33, "column": 101}));
    a.stdin(3, b"go\n");
    let (out, err, code) = a.collect(3, 0);
    let out = String::from_utf8_lossy(&out);
    assert!(out.contains("33 101"), "{out:?}");
    assert!(err.is_empty());
    assert_eq!(code, 5);
    a.error(
        Code::WinSize as u32,
        json!({"seq": 9, "row": 1, "column": 1})
            .to_string()
            .as_bytes(),
    );
}

#[test]
fn destroypod_ends_the_agent() {
    let mut a = Agent::start();
    a.ack(
        Code::NewContainer,
        json!({"id": "s", "process": process(&["sleep", "100"], 3, 4, false)}),
    );
    a.ack(Code::DestroyPod, json!({}));
    let (_, _, code) = a.collect(3, 4);
    assert_eq!(code, 128 + 9);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = a.child.try_wait().unwrap() {
            assert!(s.success());
            break;
        }
        assert!(Instant::now() < deadline, "agent still running");
        std::thread::sleep(Duration::from_millis(20));
    }
}
