//! The real `cc-proxy` daemon, and a small blocking client speaking its
//! frames (PROTOCOL.md §2–§5) with proxy-proto's codec: the runtime's
//! commands and the shim's streams, signals and exit notification.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use proxy_proto::bytes::{Bytes, BytesMut};
use proxy_proto::payload::{
    ConnectShim, ErrorResponse, Hyper, RegisterVm, RegisterVmResponse, Signal, UnregisterVm,
};
use proxy_proto::{Command, Frame, FrameDecoder, FrameKind, Limits, Notification, Stream};

/// A running daemon. Dropping it kills it; [`Proxy::shutdown`] stops it
/// cleanly.
#[derive(Debug)]
pub struct Proxy {
    child: Option<Child>,
    /// Its listening socket.
    pub socket: PathBuf,
}

impl Proxy {
    /// Start `bin -socket-path <dir>/proxy.sock` and wait for the socket.
    pub fn start(bin: &Path, dir: &Path, log: &Path) -> Result<Self, String> {
        let socket = dir.join("proxy.sock");
        let out = File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Process::new(bin);
        cmd.arg("-socket-path")
            .arg(&socket)
            .args(["-log", "debug", "-ksm", "off", "--ready-timeout", "120s"])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        eprintln!("$ {}", crate::util::describe(&cmd));
        let child = cmd.spawn().map_err(|e| format!("{}: {e}", bin.display()))?;
        let mut p = Self {
            child: Some(child),
            socket,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&p.socket).is_err() {
            if let Some(c) = &mut p.child {
                if let Ok(Some(s)) = c.try_wait() {
                    return Err(format!("cc-proxy exited at start: {s}"));
                }
            }
            if Instant::now() > deadline {
                return Err("cc-proxy did not listen within 20 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(p)
    }

    /// SIGTERM, then wait for the exit status.
    pub fn shutdown(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let Some(mut c) = self.child.take() else {
            return Err("already stopped".into());
        };
        let pid = c.id().to_string();
        let _ = Process::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = c.try_wait().map_err(|e| e.to_string())? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return Err(format!("cc-proxy still running {timeout:?} after SIGTERM"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = fs::remove_file(&self.socket);
    }
}

/// One client connection to the proxy.
#[derive(Debug)]
pub struct Conn {
    s: UnixStream,
    buf: BytesMut,
    dec: FrameDecoder,
    /// Stream and notification frames read while waiting for a response.
    stashed: VecDeque<Frame>,
}

impl Conn {
    /// Connect to the proxy's socket.
    pub fn connect(socket: &Path) -> Result<Self, String> {
        let s = UnixStream::connect(socket).map_err(|e| format!("connect proxy: {e}"))?;
        Ok(Self {
            s,
            buf: BytesMut::new(),
            dec: FrameDecoder::new(Limits::default()),
            stashed: VecDeque::new(),
        })
    }

    fn send(&mut self, f: &Frame) -> Result<(), String> {
        self.s
            .write_all(&f.to_bytes())
            .map_err(|e| format!("proxy write: {e}"))
    }

    fn read_frame(&mut self, deadline: Instant) -> Result<Frame, String> {
        loop {
            if let Some(f) = self
                .dec
                .decode(&mut self.buf)
                .map_err(|e| format!("bad frame from the proxy: {e}"))?
            {
                return Ok(f);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("timed out waiting for the proxy".into());
            }
            self.s
                .set_read_timeout(Some(left))
                .map_err(|e| e.to_string())?;
            let mut b = [0u8; 65536];
            let n = self
                .s
                .read(&mut b)
                .map_err(|e| format!("proxy read: {e}"))?;
            if n == 0 {
                return Err("the proxy closed the connection".into());
            }
            self.buf.extend_from_slice(&b[..n]);
        }
    }

    /// A command and its response: `Ok(payload)` or `Err(msg)`.
    pub fn call(&mut self, cmd: Command, payload: Vec<u8>) -> Result<Bytes, String> {
        self.send(&Frame::command(cmd, payload))?;
        let deadline = Instant::now() + Duration::from_secs(150);
        loop {
            let f = self.read_frame(deadline)?;
            match f.kind {
                FrameKind::Response { command, error } if command == cmd => {
                    if error {
                        let e: ErrorResponse =
                            serde_json::from_slice(&f.payload).unwrap_or_default();
                        return Err(format!("{}: {}", cmd.name(), e.msg));
                    }
                    return Ok(f.payload);
                }
                FrameKind::Stream(_) | FrameKind::Notification(_) => self.stashed.push_back(f),
                other => return Err(format!("unexpected {other:?} waiting for {}", cmd.name())),
            }
        }
    }

    /// RegisterVM; returns the tokens.
    pub fn register_vm(
        &mut self,
        id: &str,
        ctl: &str,
        io: &str,
        tokens: u32,
    ) -> Result<Vec<String>, String> {
        let p = RegisterVm {
            container_id: id.into(),
            ctl_serial: ctl.into(),
            io_serial: io.into(),
            num_io_streams: tokens,
            ..Default::default()
        };
        let r = self.call(Command::RegisterVm, to_json(&p)?)?;
        let r: RegisterVmResponse =
            serde_json::from_slice(&r).map_err(|e| format!("RegisterVM response: {e}"))?;
        Ok(r.io.tokens)
    }

    /// UnregisterVM.
    pub fn unregister_vm(&mut self, id: &str) -> Result<(), String> {
        let p = UnregisterVm {
            container_id: id.into(),
        };
        self.call(Command::UnregisterVm, to_json(&p)?).map(drop)
    }

    /// Hyper with optional token; returns the agent's ACK payload.
    pub fn hyper(&mut self, name: &str, token: Option<&str>, data: &str) -> Result<Bytes, String> {
        let tokens = token.map(|t| vec![t.to_string()]).unwrap_or_default();
        let p = Hyper::new(name, tokens, Some(data)).map_err(|e| e.to_string())?;
        self.call(Command::Hyper, to_json(&p)?)
    }

    /// ConnectShim: this connection becomes the token's shim.
    pub fn connect_shim(&mut self, token: &str) -> Result<(), String> {
        let p = ConnectShim {
            token: token.into(),
        };
        self.call(Command::ConnectShim, to_json(&p)?).map(drop)
    }

    /// Signal (from a shim); `size` = (columns, rows) for SIGWINCH.
    pub fn signal(&mut self, n: i64, size: Option<(i64, i64)>) -> Result<(), String> {
        let (columns, rows) = size.unwrap_or((0, 0));
        let p = Signal {
            signal_number: n,
            columns,
            rows,
        };
        self.call(Command::Signal, to_json(&p)?).map(drop)
    }

    /// A writer for stdin that can run on another thread.
    pub fn stdin_writer(&self) -> Result<StdinWriter, String> {
        Ok(StdinWriter(self.s.try_clone().map_err(|e| e.to_string())?))
    }

    /// A shim's view of its process: stdout, stderr, then the exit code.
    pub fn collect(&mut self, timeout: Duration) -> Result<super::hyper::Output, String> {
        let deadline = Instant::now() + timeout;
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        loop {
            let f = match self.stashed.pop_front() {
                Some(f) => f,
                None => self.read_frame(deadline)?,
            };
            match f.kind {
                FrameKind::Stream(Stream::Stdout) => stdout.extend_from_slice(&f.payload),
                FrameKind::Stream(Stream::Stderr) => stderr.extend_from_slice(&f.payload),
                FrameKind::Notification(Notification::ProcessExited) => {
                    let code = *f.payload.first().ok_or("empty ProcessExited")?;
                    return Ok(super::hyper::Output {
                        stdout,
                        stderr,
                        code,
                    });
                }
                other => return Err(format!("unexpected {other:?} on a shim connection")),
            }
        }
    }
}

/// A shim connection's writing half, for stdin.
#[derive(Debug)]
pub struct StdinWriter(UnixStream);

impl StdinWriter {
    /// Stdin frames of at most 64 KiB (the proxy splits them for the agent);
    /// empty `data` sends the zero-length frame that means EOF.
    pub fn send(&mut self, data: &[u8]) -> Result<(), String> {
        let mut chunks: Vec<&[u8]> = data.chunks(64 * 1024).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        for c in chunks {
            let f = Frame::stream(Stream::Stdin, Bytes::copy_from_slice(c));
            self.0
                .write_all(&f.to_bytes())
                .map_err(|e| format!("stdin write: {e}"))?;
        }
        Ok(())
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, String> {
    serde_json::to_vec(v).map_err(|e| e.to_string())
}
