//! [`MockAgent`]: the VM's hyperstart agent, as the proxy sees it through
//! QEMU's virtio-serial chardevs.
//!
//! QEMU is the *server* of those unix sockets and the proxy connects, so the
//! mock listens on two sockets (`ctl.sock`, `io.sock`) in its own temp dir
//! and accepts the proxy's connections in the background (RegisterVM blocks
//! until READY, so a test cannot accept by hand while it waits for the
//! response unless it joins both futures).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use proxy_proto::hyper::ctl::{Code, CtlDecoder, CtlMessage};
use proxy_proto::hyper::io::{IoDecoder, IoMessage, MAX_IO_DATA};
use proxy_proto::hyper::MAX_MESSAGE_LEN;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;

use crate::tempdir::TempDir;
use crate::{lossy, DEFAULT_TIMEOUT};

/// What the agent does when the proxy connects to its ctl channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadyMode {
    /// Send READY as soon as the proxy connects to ctl (a healthy agent).
    #[default]
    OnConnect,
    /// Accept both channels but send nothing: the test calls
    /// [`MockAgent::send_ready`] itself, or never (an agent that hangs).
    Manual,
    /// Accept both channels and close them at once, before READY (an agent
    /// that dies while booting).
    CloseOnConnect,
}

/// Builder of a [`MockAgent`].
#[derive(Debug, Clone)]
pub struct MockAgentBuilder {
    ready: ReadyMode,
    timeout: Duration,
}

impl MockAgentBuilder {
    /// When to send READY (default: on connect).
    pub fn ready(mut self, mode: ReadyMode) -> Self {
        self.ready = mode;
        self
    }

    /// How long each `expect_*` waits before it panics (default 10 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Bind the two sockets and start accepting.
    ///
    /// # Panics
    ///
    /// If the sockets cannot be bound.
    pub async fn start(self) -> MockAgent {
        let dir = TempDir::new();
        let ctl_path = dir.socket("ctl.sock");
        let io_path = dir.socket("io.sock");
        let ctl_l = UnixListener::bind(&ctl_path)
            .unwrap_or_else(|e| panic!("mock agent: bind {}: {e}", ctl_path.display()));
        let io_l = UnixListener::bind(&io_path)
            .unwrap_or_else(|e| panic!("mock agent: bind {}: {e}", io_path.display()));
        let mode = self.ready;
        let accept = tokio::spawn(accept_channels(ctl_l, io_l, mode));
        MockAgent {
            _dir: dir,
            ctl_path,
            io_path,
            timeout: self.timeout,
            mode,
            accept: Some(accept),
            ctl: None,
            ctl_buf: BytesMut::new(),
            io_rd: None,
            io_wr: None,
            io_buf: BytesMut::new(),
        }
    }
}

type Accepted = io::Result<Option<(UnixStream, UnixStream)>>;

async fn accept_channels(ctl_l: UnixListener, io_l: UnixListener, mode: ReadyMode) -> Accepted {
    let (mut ctl, _) = ctl_l.accept().await?;
    match mode {
        ReadyMode::OnConnect => ctl.write_all(&encode_ctl(Code::Ready, &[])).await?,
        ReadyMode::Manual => {}
        ReadyMode::CloseOnConnect => {}
    }
    let (io, _) = io_l.accept().await?;
    if mode == ReadyMode::CloseOnConnect {
        return Ok(None);
    }
    Ok(Some((ctl, io)))
}

fn encode_ctl(code: Code, payload: &[u8]) -> BytesMut {
    encode_ctl_raw(code as u32, payload)
}

fn encode_ctl_raw(code: u32, payload: &[u8]) -> BytesMut {
    let mut b = BytesMut::with_capacity(8 + payload.len());
    CtlMessage {
        code,
        payload: Bytes::copy_from_slice(payload),
    }
    .encode(&mut b, usize::MAX)
    .expect("u32-sized test messages");
    b
}

/// Encode `data` for `seq` as the agent would: messages of at most 10240
/// bytes, a zero-length message when `data` is empty.
fn encode_io(seq: u64, data: &[u8]) -> BytesMut {
    let mut b = BytesMut::with_capacity(data.len() + 12 * (1 + data.len() / MAX_IO_DATA));
    proxy_proto::hyper::io::encode_split(seq, data, &mut b, MAX_MESSAGE_LEN);
    b
}

/// The name of a ctl code for messages: `newcontainer (17)`.
fn code_name(code: u32) -> String {
    match Code::from_u32(code) {
        Some(c) => format!("`{c}` ({code})"),
        None => format!("unknown code {code}"),
    }
}

fn describe_ctl(m: &CtlMessage) -> String {
    format!(
        "{} with payload {:?}",
        code_name(m.code),
        lossy(&m.payload, 300)
    )
}

/// Something that names a hyperstart ctl code: a [`Code`] or its name
/// (`"newcontainer"`).
pub trait AsCode {
    /// The code.
    ///
    /// # Panics
    ///
    /// If a name is not a hyperstart command name.
    fn as_code(&self) -> Code;
}

impl AsCode for Code {
    fn as_code(&self) -> Code {
        *self
    }
}

impl AsCode for &str {
    fn as_code(&self) -> Code {
        Code::ALL
            .iter()
            .copied()
            .find(|c| c.name() == *self)
            .unwrap_or_else(|| panic!("{self:?} is not a hyperstart command name"))
    }
}

/// A mock hyperstart agent listening on two unix sockets.
///
/// Every `expect_*` method panics after the agent's timeout with a message
/// that names what it waited for and what came instead.
pub struct MockAgent {
    _dir: TempDir,
    ctl_path: PathBuf,
    io_path: PathBuf,
    timeout: Duration,
    mode: ReadyMode,
    accept: Option<JoinHandle<Accepted>>,
    ctl: Option<UnixStream>,
    ctl_buf: BytesMut,
    io_rd: Option<OwnedReadHalf>,
    io_wr: Option<OwnedWriteHalf>,
    io_buf: BytesMut,
}

impl fmt::Debug for MockAgent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockAgent")
            .field("ctl_path", &self.ctl_path)
            .field("io_path", &self.io_path)
            .field("mode", &self.mode)
            .field("ctl_connected", &self.ctl.is_some())
            .field("io_connected", &self.io_rd.is_some())
            .finish_non_exhaustive()
    }
}

impl MockAgent {
    /// A healthy agent: READY on connect, 10 s timeouts.
    pub async fn start() -> Self {
        Self::builder().start().await
    }

    /// Options.
    pub fn builder() -> MockAgentBuilder {
        MockAgentBuilder {
            ready: ReadyMode::OnConnect,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The ctl socket: RegisterVM's `ctlSerial`.
    pub fn ctl_path(&self) -> &Path {
        &self.ctl_path
    }

    /// The io socket: RegisterVM's `ioSerial`.
    pub fn io_path(&self) -> &Path {
        &self.io_path
    }

    /// The `expect_*` timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Change the `expect_*` timeout.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Wait until the proxy has connected to both channels (no-op once
    /// done). With [`ReadyMode::CloseOnConnect`], waits until ctl was
    /// accepted and closed.
    ///
    /// # Panics
    ///
    /// If the proxy does not connect within the timeout.
    pub async fn accept(&mut self) {
        let Some(task) = self.accept.as_mut() else {
            return;
        };
        let accepted = match tokio::time::timeout(self.timeout, task).await {
            Err(_) => panic!(
                "mock agent: the proxy did not connect to ctl ({}) and io ({}) within {:?}",
                self.ctl_path.display(),
                self.io_path.display(),
                self.timeout
            ),
            Ok(joined) => joined.expect("accept task"),
        };
        self.accept = None;
        match accepted {
            Ok(Some((ctl, io))) => {
                self.ctl = Some(ctl);
                let (rd, wr) = io.into_split();
                self.io_rd = Some(rd);
                self.io_wr = Some(wr);
            }
            Ok(None) => {}
            Err(e) => panic!("mock agent: accepting the proxy's connections: {e}"),
        }
    }

    /// Whether the proxy has connected to both channels yet (without waiting).
    pub fn is_connected(&self) -> bool {
        self.ctl.is_some() && self.io_rd.is_some()
    }

    async fn ctl_stream(&mut self) -> &mut UnixStream {
        self.accept().await;
        self.ctl
            .as_mut()
            .expect("mock agent: ctl is not connected (closed, or handed to an auto-responder)")
    }

    async fn io_writer(&mut self) -> &mut OwnedWriteHalf {
        self.accept().await;
        self.io_wr
            .as_mut()
            .expect("mock agent: io is not connected (closed, or handed to an IoWriter)")
    }

    // ----- ctl -----

    /// Write a raw ctl message.
    pub async fn send_ctl(&mut self, msg: CtlMessage) {
        let b = encode_ctl_raw(msg.code, &msg.payload);
        self.write_ctl(&b, "a ctl message").await;
    }

    async fn write_ctl(&mut self, b: &[u8], what: &str) {
        let t = self.timeout;
        let s = self.ctl_stream().await;
        match tokio::time::timeout(t, s.write_all(b)).await {
            Err(_) => panic!("mock agent: writing {what} on ctl blocked for {t:?}"),
            Ok(Err(e)) => panic!("mock agent: writing {what} on ctl: {e}"),
            Ok(Ok(())) => {}
        }
    }

    /// Send READY (with [`ReadyMode::Manual`]).
    pub async fn send_ready(&mut self) {
        self.write_ctl(&encode_ctl(Code::Ready, &[]), "READY").await;
    }

    /// Answer the current command with ACK and `payload`.
    pub async fn reply_ack(&mut self, payload: impl AsRef<[u8]>) {
        self.write_ctl(&encode_ctl(Code::Ack, payload.as_ref()), "ACK")
            .await;
    }

    /// Answer the current command with ERROR carrying `msg`.
    pub async fn reply_error(&mut self, msg: &str) {
        self.write_ctl(&encode_ctl(Code::Error, msg.as_bytes()), "ERROR")
            .await;
    }

    /// Send a NEXT flow-control hint (which the proxy must ignore).
    pub async fn send_next(&mut self) {
        self.write_ctl(&encode_ctl(Code::Next, &[]), "NEXT").await;
    }

    /// Write arbitrary bytes on ctl.
    pub async fn send_garbage_ctl(&mut self, bytes: &[u8]) {
        self.write_ctl(bytes, "garbage").await;
    }

    /// The next ctl message, `None` if the proxy closed ctl. Panics on
    /// timeout or on bytes that are not a ctl message.
    pub async fn recv_ctl(&mut self) -> Option<CtlMessage> {
        let t = self.timeout;
        match self.recv_ctl_within(t).await {
            Ok(m) => m,
            Err(Elapsed) => panic!("mock agent: no ctl message from the proxy within {t:?}"),
        }
    }

    /// The next ctl message within `d`; `Ok(None)` if the proxy closed ctl.
    pub async fn recv_ctl_within(&mut self, d: Duration) -> Result<Option<CtlMessage>, Elapsed> {
        // Accept outside the timeout: the caller's `d` is about messages.
        self.accept().await;
        let Self { ctl, ctl_buf, .. } = self;
        let Some(s) = ctl.as_mut() else {
            panic!("mock agent: ctl is not connected (closed, or handed to an auto-responder)")
        };
        tokio::time::timeout(d, read_ctl(s, ctl_buf))
            .await
            .map_err(|_| Elapsed)
    }

    /// The next ctl message, which must be `what`.
    ///
    /// # Panics
    ///
    /// On timeout, on a closed ctl, or on another message, naming both.
    pub async fn expect_ctl(&mut self, what: impl AsCode) -> CtlMessage {
        let code = what.as_code();
        let t = self.timeout;
        match self.recv_ctl_within(t).await {
            Err(Elapsed) => {
                panic!("mock agent: expected ctl `{code}` from the proxy, got nothing within {t:?}")
            }
            Ok(None) => panic!("mock agent: expected ctl `{code}`, but the proxy closed ctl"),
            Ok(Some(m)) if m.code == code as u32 => m,
            Ok(Some(m)) => panic!(
                "mock agent: expected ctl `{code}`, got {}",
                describe_ctl(&m)
            ),
        }
    }

    /// [`expect_ctl`](Self::expect_ctl) and parse its payload as JSON.
    pub async fn expect_ctl_json(&mut self, what: impl AsCode) -> serde_json::Value {
        let m = self.expect_ctl(what).await;
        serde_json::from_slice(&m.payload)
            .unwrap_or_else(|e| panic!("mock agent: {} is not JSON: {e}", describe_ctl(&m)))
    }

    /// Assert that no ctl message arrives within `d` (ctl may close).
    pub async fn expect_no_ctl(&mut self, d: Duration) {
        if let Ok(Some(m)) = self.recv_ctl_within(d).await {
            panic!(
                "mock agent: expected no ctl message, got {}",
                describe_ctl(&m)
            );
        }
    }

    /// Assert that the proxy closes ctl within the timeout (messages before
    /// the close are returned).
    pub async fn expect_ctl_closed(&mut self) -> Vec<CtlMessage> {
        let t = self.timeout;
        let mut got = Vec::new();
        loop {
            match self.recv_ctl_within(t).await {
                Err(Elapsed) => panic!(
                    "mock agent: expected the proxy to close ctl within {t:?}; got {} message(s) and no close",
                    got.len()
                ),
                Ok(None) => return got,
                Ok(Some(m)) => got.push(m),
            }
        }
    }

    /// Hand ctl to a background task that answers every command with
    /// `reply` and records what it received. The test keeps io.
    pub async fn auto_respond(&mut self, reply: AutoReply) -> AutoResponder {
        self.accept().await;
        let s = self
            .ctl
            .take()
            .expect("mock agent: ctl is not connected or already handed over");
        let buf = std::mem::take(&mut self.ctl_buf);
        AutoResponder::spawn(s, buf, reply)
    }

    // ----- io -----

    /// Send `data` on `seq` as the agent does: split into messages of at
    /// most 10240 bytes; empty `data` sends a zero-length message (EOF).
    pub async fn send_io(&mut self, seq: u64, data: impl AsRef<[u8]>) {
        let b = encode_io(seq, data.as_ref());
        self.write_io(&b, "io data").await;
    }

    /// End of output for the session at `io_base` (zero-length message).
    pub async fn send_eof(&mut self, io_base: u64) {
        self.send_io(io_base, []).await;
    }

    /// The process of the session at `io_base` exited with `code`: a
    /// zero-length message then a one-byte message with the code.
    pub async fn send_exit(&mut self, io_base: u64, code: u8) {
        let mut b = encode_io(io_base, &[]);
        b.extend_from_slice(&encode_io(io_base, &[code]));
        self.write_io(&b, "EOF and exit code").await;
    }

    /// Write arbitrary bytes on io.
    pub async fn send_garbage_io(&mut self, bytes: &[u8]) {
        self.write_io(bytes, "garbage").await;
    }

    async fn write_io(&mut self, b: &[u8], what: &str) {
        let t = self.timeout;
        let s = self.io_writer().await;
        match tokio::time::timeout(t, s.write_all(b)).await {
            Err(_) => panic!("mock agent: writing {what} on io blocked for {t:?}"),
            Ok(Err(e)) => panic!("mock agent: writing {what} on io: {e}"),
            Ok(Ok(())) => {}
        }
    }

    /// Hand io's write side to a background task, for writes that may block
    /// on back-pressure. The test keeps io's read side.
    pub async fn io_writer_task(&mut self) -> IoWriter {
        self.accept().await;
        let wr = self
            .io_wr
            .take()
            .expect("mock agent: io is not connected or already handed over");
        IoWriter::spawn(wr)
    }

    /// The next io message within `d`: `Ok(None)` if the proxy closed io.
    pub async fn recv_io_within(&mut self, d: Duration) -> Result<Option<IoMessage>, Elapsed> {
        self.accept().await;
        let Self { io_rd, io_buf, .. } = self;
        let Some(s) = io_rd.as_mut() else {
            panic!("mock agent: io is not connected")
        };
        tokio::time::timeout(d, read_io(s, io_buf))
            .await
            .map_err(|_| Elapsed)
    }

    /// The next io message, `None` if the proxy closed io.
    pub async fn recv_io(&mut self) -> Option<IoMessage> {
        let t = self.timeout;
        match self.recv_io_within(t).await {
            Ok(m) => m,
            Err(Elapsed) => panic!("mock agent: no io message from the proxy within {t:?}"),
        }
    }

    async fn expect_io_msg(&mut self, seq: u64, what: &str) -> IoMessage {
        let t = self.timeout;
        match self.recv_io_within(t).await {
            Err(Elapsed) => {
                panic!("mock agent: expected {what} on io seq {seq}, got nothing within {t:?}")
            }
            Ok(None) => {
                panic!("mock agent: expected {what} on io seq {seq}, but the proxy closed io")
            }
            Ok(Some(m)) if m.seq == seq => m,
            Ok(Some(m)) => panic!(
                "mock agent: expected {what} on io seq {seq}, got {} bytes on seq {}: {:?}",
                m.data.len(),
                m.seq,
                lossy(&m.data, 100)
            ),
        }
    }

    /// The next io message, which must be for `seq`; its data.
    pub async fn expect_io(&mut self, seq: u64) -> Bytes {
        self.expect_io_msg(seq, "a message").await.data
    }

    /// The next io message must be a zero-length message (EOF) for `seq`.
    pub async fn expect_io_eof(&mut self, seq: u64) {
        let m = self.expect_io_msg(seq, "EOF (a zero-length message)").await;
        assert!(
            m.data.is_empty(),
            "mock agent: expected EOF (a zero-length message) on io seq {seq}, got {} bytes: {:?}",
            m.data.len(),
            lossy(&m.data, 100)
        );
    }

    /// Read io messages for `seq` until `n` bytes have come; returns
    /// exactly `n` bytes. Panics on another seq, on a zero-length message,
    /// or on a message that would overshoot `n`.
    pub async fn read_io_until(&mut self, seq: u64, n: usize) -> Bytes {
        let mut out = BytesMut::with_capacity(n);
        while out.len() < n {
            let m = self
                .expect_io_msg(seq, &format!("{} more bytes", n - out.len()))
                .await;
            assert!(
                !m.data.is_empty(),
                "mock agent: a zero-length message (EOF) on seq {seq} after {} of {n} bytes",
                out.len()
            );
            assert!(
                out.len() + m.data.len() <= n,
                "mock agent: {} bytes on seq {seq} overshoot the {n} expected (had {})",
                m.data.len(),
                out.len()
            );
            out.extend_from_slice(&m.data);
        }
        out.freeze()
    }

    /// Assert that no io message arrives within `d`.
    pub async fn expect_no_io(&mut self, d: Duration) {
        if let Ok(Some(m)) = self.recv_io_within(d).await {
            panic!(
                "mock agent: expected no io message, got {} bytes on seq {}",
                m.data.len(),
                m.seq
            );
        }
    }

    /// Assert that the proxy closes io within the timeout.
    pub async fn expect_io_closed(&mut self) {
        let t = self.timeout;
        loop {
            match self.recv_io_within(t).await {
                Err(Elapsed) => panic!("mock agent: expected the proxy to close io within {t:?}"),
                Ok(None) => return,
                Ok(Some(_)) => {}
            }
        }
    }

    // ----- faults -----

    /// The raw ctl stream (after accepting), for fault injection.
    pub async fn ctl_raw(&mut self) -> &mut UnixStream {
        self.ctl_stream().await
    }

    /// The raw write side of io (after accepting), for fault injection.
    pub async fn io_raw_writer(&mut self) -> &mut OwnedWriteHalf {
        self.io_writer().await
    }

    /// Close ctl (the proxy sees EOF on ctl); io stays.
    pub async fn close_ctl(&mut self) {
        self.accept().await;
        if let Some(mut s) = self.ctl.take() {
            let _ = s.shutdown().await;
        }
    }

    /// Close io (the proxy sees EOF on io); ctl stays.
    pub async fn close_io(&mut self) {
        self.accept().await;
        self.io_rd = None;
        if let Some(mut w) = self.io_wr.take() {
            let _ = w.shutdown().await;
        }
    }

    /// Close both channels, as an agent that shuts down.
    pub async fn close(mut self) {
        self.close_ctl().await;
        self.close_io().await;
    }

    /// Disappear at once: both channels and both listening sockets go
    /// (a VM that was killed). Does not wait for the proxy to connect.
    pub fn vanish(mut self) {
        if let Some(t) = self.accept.take() {
            t.abort();
        }
        let _ = std::fs::remove_file(&self.ctl_path);
        let _ = std::fs::remove_file(&self.io_path);
        // Dropping self closes the streams.
    }
}

/// A wait ran out of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

impl fmt::Display for Elapsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("timed out")
    }
}

impl std::error::Error for Elapsed {}

/// Read one ctl message; `None` on EOF or a reset connection.
async fn read_ctl(s: &mut UnixStream, buf: &mut BytesMut) -> Option<CtlMessage> {
    let mut dec = CtlDecoder::new(MAX_MESSAGE_LEN);
    loop {
        match dec.decode(buf) {
            Ok(Some(m)) => return Some(m),
            Ok(None) => {}
            Err(e) => panic!(
                "mock agent: the proxy wrote a malformed ctl message: {e} (bytes {:?})",
                lossy(buf, 64)
            ),
        }
        match s.read_buf(buf).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

/// Read one io message; `None` on EOF or a reset connection.
async fn read_io(s: &mut OwnedReadHalf, buf: &mut BytesMut) -> Option<IoMessage> {
    let mut dec = IoDecoder::new(MAX_MESSAGE_LEN);
    loop {
        match dec.decode(buf) {
            Ok(Some(m)) => return Some(m),
            Ok(None) => {}
            Err(e) => panic!(
                "mock agent: the proxy wrote a malformed io message: {e} (bytes {:?})",
                lossy(buf, 64)
            ),
        }
        match s.read_buf(buf).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

// ----- auto-responder -----

type ReplyFn = dyn Fn(&CtlMessage) -> Option<CtlMessage> + Send + Sync;

/// How an [`AutoResponder`] answers.
#[derive(Clone)]
pub enum AutoReply {
    /// ACK with an empty payload.
    AckEmpty,
    /// ACK with the command's own payload (replies identify their request).
    Echo,
    /// ACK with this payload.
    Ack(Bytes),
    /// ERROR with this message.
    Error(String),
    /// Whatever the function says; `None` sends nothing.
    With(Arc<ReplyFn>),
}

impl fmt::Debug for AutoReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AckEmpty => f.write_str("AckEmpty"),
            Self::Echo => f.write_str("Echo"),
            Self::Ack(b) => f.debug_tuple("Ack").field(b).finish(),
            Self::Error(m) => f.debug_tuple("Error").field(m).finish(),
            Self::With(_) => f.write_str("With(..)"),
        }
    }
}

impl AutoReply {
    /// A reply computed from each command.
    pub fn with(f: impl Fn(&CtlMessage) -> Option<CtlMessage> + Send + Sync + 'static) -> Self {
        Self::With(Arc::new(f))
    }

    fn reply(&self, m: &CtlMessage) -> Option<CtlMessage> {
        Some(match self {
            Self::AckEmpty => CtlMessage::new(Code::Ack, Bytes::new()),
            Self::Echo => CtlMessage::new(Code::Ack, m.payload.clone()),
            Self::Ack(b) => CtlMessage::new(Code::Ack, b.clone()),
            Self::Error(s) => CtlMessage::new(Code::Error, Bytes::copy_from_slice(s.as_bytes())),
            Self::With(f) => return f(m),
        })
    }
}

#[derive(Debug, Default)]
struct Record {
    received: Mutex<Vec<CtlMessage>>,
    changed: Notify,
    closed: Mutex<bool>,
}

/// A background task answering every ctl command (see
/// [`MockAgent::auto_respond`]). Aborted on drop.
#[derive(Debug)]
pub struct AutoResponder {
    record: Arc<Record>,
    task: JoinHandle<()>,
}

impl AutoResponder {
    fn spawn(mut s: UnixStream, mut buf: BytesMut, reply: AutoReply) -> Self {
        let record = Arc::new(Record::default());
        let r = record.clone();
        let task = tokio::spawn(async move {
            while let Some(m) = read_ctl(&mut s, &mut buf).await {
                let answer = reply.reply(&m);
                r.received.lock().expect("record").push(m);
                r.changed.notify_waiters();
                if let Some(a) = answer {
                    if s.write_all(&encode_ctl_raw(a.code, &a.payload))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
            *r.closed.lock().expect("record") = true;
            r.changed.notify_waiters();
        });
        Self { record, task }
    }

    /// Every command received so far, in order.
    pub fn received(&self) -> Vec<CtlMessage> {
        self.record.received.lock().expect("record").clone()
    }

    /// How many commands were received.
    pub fn count(&self) -> usize {
        self.record.received.lock().expect("record").len()
    }

    /// Whether the proxy closed ctl.
    pub fn is_closed(&self) -> bool {
        *self.record.closed.lock().expect("record")
    }

    /// Wait until at least `n` commands were received.
    ///
    /// # Panics
    ///
    /// After `timeout`, with the count reached.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<CtlMessage> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.record.changed.notified();
            if self.count() >= n {
                return self.received();
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                panic!(
                    "auto-responder: expected {n} ctl commands within {timeout:?}, got {}",
                    self.count()
                );
            }
        }
    }
}

impl Drop for AutoResponder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ----- io writer task -----

enum WriterCmd {
    Data(BytesMut),
    Flush(oneshot::Sender<()>),
}

/// io's write side in a background task: sends never block the test, even
/// when back-pressure stops the proxy reading io (see
/// [`MockAgent::io_writer_task`]).
#[derive(Debug)]
pub struct IoWriter {
    tx: mpsc::UnboundedSender<WriterCmd>,
    written: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl fmt::Debug for WriterCmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Data(b) => write!(f, "Data({} bytes)", b.len()),
            Self::Flush(_) => f.write_str("Flush"),
        }
    }
}

impl IoWriter {
    fn spawn(mut wr: OwnedWriteHalf) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<WriterCmd>();
        let written = Arc::new(AtomicU64::new(0));
        let w = written.clone();
        let task = tokio::spawn(async move {
            while let Some(cmd) = rx.recv().await {
                match cmd {
                    WriterCmd::Data(b) => {
                        if wr.write_all(&b).await.is_err() {
                            return;
                        }
                        w.fetch_add(b.len() as u64, Ordering::Relaxed);
                    }
                    WriterCmd::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
        Self { tx, written, task }
    }

    /// Queue `data` for `seq` (split as the agent does; empty = EOF).
    pub fn send_io(&self, seq: u64, data: impl AsRef<[u8]>) {
        let _ = self.tx.send(WriterCmd::Data(encode_io(seq, data.as_ref())));
    }

    /// Queue bytes to write as they are (framed by the caller).
    pub fn send_raw(&self, bytes: impl Into<Vec<u8>>) {
        let _ = self
            .tx
            .send(WriterCmd::Data(BytesMut::from(&bytes.into()[..])));
    }

    /// Queue EOF and the exit code of the session at `io_base`.
    pub fn send_exit(&self, io_base: u64, code: u8) {
        self.send_io(io_base, []);
        self.send_io(io_base, [code]);
    }

    /// Bytes (with headers) fully written to the socket so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Wait until everything queued so far is written.
    ///
    /// # Panics
    ///
    /// After `timeout`, or if the writer failed.
    pub async fn flushed(&self, timeout: Duration) {
        let (done, wait) = oneshot::channel();
        let _ = self.tx.send(WriterCmd::Flush(done));
        match tokio::time::timeout(timeout, wait).await {
            Err(_) => panic!(
                "io writer: queued data not written within {timeout:?} ({} bytes written)",
                self.written()
            ),
            Ok(Err(_)) => panic!("io writer: the proxy closed io (write failed)"),
            Ok(Ok(())) => {}
        }
    }
}

impl Drop for IoWriter {
    fn drop(&mut self) {
        self.task.abort();
    }
}
