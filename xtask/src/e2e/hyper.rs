//! A tiny std-only hyperstart client: ctl `u32 code | u32 len | payload`,
//! io `u64 seq | u32 len | data` (docs/PROTOCOL.md §6–§7).

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// ctl codes used here.
pub mod code {
    pub const VERSION: u32 = 0;
    pub const STARTPOD: u32 = 1;
    pub const DESTROYPOD: u32 = 4;
    pub const EXECCMD: u32 = 6;
    pub const READY: u32 = 8;
    pub const ACK: u32 = 9;
    pub const ERROR: u32 = 10;
    pub const WINSIZE: u32 = 11;
    pub const PING: u32 = 12;
    pub const READFILE: u32 = 16;
    pub const NEWCONTAINER: u32 = 17;
    pub const KILLCONTAINER: u32 = 18;
}

/// Most data bytes per io message (10240 − 12).
pub const MAX_IO_DATA: usize = 10228;

/// A connection to an agent's two channels.
#[derive(Debug)]
pub struct Hyper {
    ctl: UnixStream,
    io: UnixStream,
    pending: HashMap<u64, VecDeque<Vec<u8>>>,
}

/// What a process said and how it ended: the client library's type.
pub use proxy_client::Output;

impl Hyper {
    /// Wrap connected channels.
    pub fn new(ctl: UnixStream, io: UnixStream) -> Self {
        Self {
            ctl,
            io,
            pending: HashMap::new(),
        }
    }

    /// Read one ctl message.
    pub fn read_ctl(&mut self, timeout: Duration) -> Result<(u32, Vec<u8>), String> {
        self.ctl
            .set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let mut h = [0u8; 8];
        self.ctl
            .read_exact(&mut h)
            .map_err(|e| format!("ctl read: {e}"))?;
        let code = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        let len = u32::from_be_bytes([h[4], h[5], h[6], h[7]]) as usize;
        if !(8..=10240).contains(&len) {
            return Err(format!("ctl message length {len}"));
        }
        let mut p = vec![0u8; len - 8];
        self.ctl
            .read_exact(&mut p)
            .map_err(|e| format!("ctl read: {e}"))?;
        Ok((code, p))
    }

    /// Send a command; `Ok(ack payload)` or `Err(error message)`.
    pub fn cmd(&mut self, code: u32, payload: &str) -> Result<Vec<u8>, String> {
        let mut m = Vec::with_capacity(8 + payload.len());
        m.extend_from_slice(&code.to_be_bytes());
        m.extend_from_slice(&((8 + payload.len()) as u32).to_be_bytes());
        m.extend_from_slice(payload.as_bytes());
        self.ctl
            .write_all(&m)
            .map_err(|e| format!("ctl write: {e}"))?;
        match self.read_ctl(Duration::from_secs(60))? {
            (code::ACK, p) => Ok(p),
            (code::ERROR, p) => Err(String::from_utf8_lossy(&p).into_owned()),
            (c, _) => Err(format!("unexpected ctl reply code {c}")),
        }
    }

    /// Like [`Hyper::cmd`], but an ERROR is a failure naming the command.
    pub fn ack(&mut self, code: u32, payload: &str) -> Result<Vec<u8>, String> {
        self.cmd(code, payload)
            .map_err(|e| format!("command {code} refused: {e}"))
    }

    /// A writer for stdin that can run on another thread.
    pub fn stdin_writer(&self) -> Result<StdinWriter, String> {
        Ok(StdinWriter(self.io.try_clone().map_err(|e| e.to_string())?))
    }

    fn read_io(&mut self, deadline: Instant) -> Result<(u64, Vec<u8>), String> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("timed out waiting for process output".into());
        }
        self.io
            .set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        let mut h = [0u8; 12];
        self.io
            .read_exact(&mut h)
            .map_err(|e| format!("io read: {e}"))?;
        let mut s = [0u8; 8];
        s.copy_from_slice(&h[..8]);
        let seq = u64::from_be_bytes(s);
        let len = u32::from_be_bytes([h[8], h[9], h[10], h[11]]) as usize;
        if !(12..=10240).contains(&len) {
            return Err(format!("io message length {len}"));
        }
        let mut d = vec![0u8; len - 12];
        self.io
            .read_exact(&mut d)
            .map_err(|e| format!("io read: {e}"))?;
        Ok((seq, d))
    }

    fn next_for(&mut self, seqs: [u64; 2], deadline: Instant) -> Result<(u64, Vec<u8>), String> {
        for s in seqs {
            if let Some(d) = self.pending.get_mut(&s).and_then(|q| q.pop_front()) {
                return Ok((s, d));
            }
        }
        loop {
            let (seq, d) = self.read_io(deadline)?;
            if seqs.contains(&seq) {
                return Ok((seq, d));
            }
            self.pending.entry(seq).or_default().push_back(d);
        }
    }

    /// Everything the process on `stdio`/`stderr` writes, up to its exit code.
    pub fn collect(
        &mut self,
        stdio: u64,
        stderr: u64,
        timeout: Duration,
    ) -> Result<Output, String> {
        let deadline = Instant::now() + timeout;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut eof = false;
        loop {
            let (seq, d) = self.next_for([stdio, stderr], deadline)?;
            if seq == stdio {
                if eof {
                    if d.len() != 1 {
                        return Err(format!("{} bytes after EOF on seq {stdio}", d.len()));
                    }
                    return Ok(Output {
                        stdout: out,
                        stderr: err,
                        code: d[0],
                    });
                }
                if d.is_empty() {
                    eof = true;
                } else {
                    out.extend_from_slice(&d);
                }
            } else {
                err.extend_from_slice(&d);
            }
        }
    }
}

/// The io channel's writing half.
#[derive(Debug)]
pub struct StdinWriter(UnixStream);

impl StdinWriter {
    /// `data` on `seq`, split into messages; empty = EOF.
    pub fn send(&mut self, seq: u64, data: &[u8]) -> Result<(), String> {
        let mut buf = Vec::with_capacity(data.len() + 12 * (data.len() / MAX_IO_DATA + 1));
        let mut push = |chunk: &[u8]| {
            buf.extend_from_slice(&seq.to_be_bytes());
            buf.extend_from_slice(&((12 + chunk.len()) as u32).to_be_bytes());
            buf.extend_from_slice(chunk);
        };
        if data.is_empty() {
            push(&[]);
        }
        for c in data.chunks(MAX_IO_DATA) {
            push(c);
        }
        self.0.write_all(&buf).map_err(|e| format!("io write: {e}"))
    }
}

/// A JSON string literal.
pub fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// A hyperstart `process` object.
pub fn process(args: &[&str], stdio: u64, stderr: u64, terminal: bool) -> String {
    let args: Vec<String> = args.iter().map(|a| json_str(a)).collect();
    format!(
        r#"{{"terminal":{terminal},"stdio":{stdio},"stderr":{stderr},"args":[{}],"envs":[{{"env":"PATH","value":"/bin:/sbin:/usr/bin"}}],"workdir":"/"}}"#,
        args.join(",")
    )
}
