//! [`MockClient`]: a runtime or a shim speaking the proxy protocol.

use std::collections::VecDeque;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use proxy_proto::payload::{ErrorResponse, IoResponse, RegisterVmResponse};
use proxy_proto::{Command, Frame, FrameDecoder, FrameKind, Limits, Notification, Stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::{lossy, DEFAULT_TIMEOUT};

/// What a read from the proxy gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recv {
    /// A frame.
    Frame(Frame),
    /// The proxy closed the connection (EOF or reset).
    Closed,
    /// Nothing within the time allowed.
    TimedOut,
}

/// A short description of a frame for failure messages.
pub fn describe(f: &Frame) -> String {
    let kind = match f.kind {
        FrameKind::Command(c) => format!("command {c}"),
        FrameKind::Response {
            command,
            error: false,
        } => format!("response to {command}"),
        FrameKind::Response {
            command,
            error: true,
        } => format!("error response to {command}"),
        FrameKind::Stream(s) => format!("{} stream", s.name()),
        FrameKind::Notification(Notification::ProcessExited) => "ProcessExited".to_owned(),
    };
    format!(
        "{kind} ({} bytes: {:?})",
        f.payload.len(),
        lossy(&f.payload, 200)
    )
}

/// The `msg` of an error response's payload (or the payload itself when it
/// is not `{"msg":…}`).
pub fn error_msg(payload: &[u8]) -> String {
    match serde_json::from_slice::<ErrorResponse>(payload) {
        Ok(e) => e.msg,
        Err(_) => String::from_utf8_lossy(payload).into_owned(),
    }
}

/// A client connection to the proxy: a runtime (RegisterVM, Hyper, …) or a
/// shim (ConnectShim, stdin, Signal, …).
///
/// Frames that arrive while a helper waits for something else (stdout
/// while waiting for a Signal response, say) are kept in order and handed
/// out by later calls.
pub struct MockClient {
    stream: UnixStream,
    buf: BytesMut,
    dec: FrameDecoder,
    pending: VecDeque<Frame>,
    stdout_left: Bytes,
    stderr_left: Bytes,
    timeout: Duration,
    closed: bool,
}

impl fmt::Debug for MockClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockClient")
            .field("pending", &self.pending.len())
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl MockClient {
    /// Connect to the proxy's socket.
    ///
    /// # Panics
    ///
    /// If the connection fails.
    pub async fn connect(socket: impl AsRef<Path>) -> Self {
        let socket = socket.as_ref();
        let stream = UnixStream::connect(socket)
            .await
            .unwrap_or_else(|e| panic!("mock client: connect {}: {e}", socket.display()));
        Self {
            stream,
            buf: BytesMut::new(),
            // Accept whatever the proxy sends; its frames are not under test
            // for size here.
            dec: FrameDecoder::new(Limits {
                max_payload: u32::MAX,
            }),
            pending: VecDeque::new(),
            stdout_left: Bytes::new(),
            stderr_left: Bytes::new(),
            timeout: DEFAULT_TIMEOUT,
            closed: false,
        }
    }

    /// Change how long each `recv`/`expect_*` waits (default 10 s).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The wait of each `recv`/`expect_*`.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The raw stream, for fault injection.
    pub fn raw(&mut self) -> &mut UnixStream {
        &mut self.stream
    }

    // ----- sending -----

    /// Send one frame.
    ///
    /// # Panics
    ///
    /// If the write fails (use [`try_send_raw`](Self::try_send_raw) when
    /// the proxy may have closed).
    pub async fn send(&mut self, f: Frame) {
        self.send_raw(&f.to_bytes()).await;
    }

    /// Write raw bytes (split headers, malformed frames).
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        if let Err(e) = self.try_send_raw(bytes).await {
            panic!("mock client: write of {} bytes: {e}", bytes.len());
        }
    }

    /// Write raw bytes, returning the error (the proxy may have closed).
    pub async fn try_send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let t = self.timeout;
        match tokio::time::timeout(t, self.stream.write_all(bytes)).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("write blocked for {t:?}"),
            )),
        }
    }

    /// Send a command with a JSON (or any) payload.
    pub async fn send_command(&mut self, command: Command, payload: impl Into<Bytes>) {
        self.send(Frame::command(command, payload)).await;
    }

    // ----- receiving -----

    /// Read one frame from the socket (not from the pending queue).
    async fn recv_wire(&mut self, d: Duration) -> Recv {
        if self.closed {
            return Recv::Closed;
        }
        let deadline = tokio::time::Instant::now() + d;
        loop {
            match self.dec.decode(&mut self.buf) {
                Ok(Some(f)) => return Recv::Frame(f),
                Ok(None) => {}
                Err(e) => panic!(
                    "mock client: the proxy sent a malformed frame: {e} (bytes {:?})",
                    lossy(&self.buf, 64)
                ),
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return Recv::TimedOut,
                Ok(Ok(0)) | Ok(Err(_)) => {
                    self.closed = true;
                    return Recv::Closed;
                }
                Ok(Ok(_)) => {}
            }
        }
    }

    /// The next frame within `d`.
    pub async fn recv_within(&mut self, d: Duration) -> Recv {
        if let Some(f) = self.pending.pop_front() {
            return Recv::Frame(f);
        }
        self.recv_wire(d).await
    }

    /// The next frame.
    ///
    /// # Panics
    ///
    /// On timeout or if the proxy closed the connection.
    pub async fn recv(&mut self) -> Frame {
        let t = self.timeout;
        match self.recv_within(t).await {
            Recv::Frame(f) => f,
            Recv::Closed => {
                panic!("mock client: expected a frame, but the proxy closed the connection")
            }
            Recv::TimedOut => panic!("mock client: expected a frame, got nothing within {t:?}"),
        }
    }

    /// Assert that nothing arrives within `d` (and the connection stays open).
    pub async fn expect_silence(&mut self, d: Duration) {
        match self.recv_within(d).await {
            Recv::TimedOut => {}
            Recv::Closed => {
                panic!("mock client: expected silence, but the proxy closed the connection")
            }
            Recv::Frame(f) => panic!("mock client: expected silence, got {}", describe(&f)),
        }
    }

    /// The response to `command`: its payload, or the error's `msg`.
    /// Other frames that come first (output, notifications) are kept for
    /// later calls.
    ///
    /// # Panics
    ///
    /// On timeout, on close, or on a response to another command.
    pub async fn expect_response(&mut self, command: Command) -> Result<Bytes, String> {
        let t = self.timeout;
        let deadline = tokio::time::Instant::now() + t;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv_wire(left).await {
                Recv::TimedOut => {
                    panic!("mock client: expected the response to {command}, got nothing within {t:?}")
                }
                Recv::Closed => panic!(
                    "mock client: expected the response to {command}, but the proxy closed the connection"
                ),
                Recv::Frame(f) => match f.kind {
                    FrameKind::Response { command: c, error } if c == command => {
                        return if error {
                            Err(error_msg(&f.payload))
                        } else {
                            Ok(f.payload)
                        };
                    }
                    FrameKind::Response { .. } => panic!(
                        "mock client: expected the response to {command}, got {}",
                        describe(&f)
                    ),
                    _ => self.pending.push_back(f),
                },
            }
        }
    }

    /// The error response to `command`; its `msg`.
    ///
    /// # Panics
    ///
    /// If the response is a success.
    pub async fn expect_error(&mut self, command: Command) -> String {
        match self.expect_response(command).await {
            Err(msg) => msg,
            Ok(p) => panic!(
                "mock client: expected an error response to {command}, got success with payload {:?}",
                lossy(&p, 200)
            ),
        }
    }

    /// Send `command` and wait for its response.
    pub async fn call(
        &mut self,
        command: Command,
        payload: impl Into<Bytes>,
    ) -> Result<Bytes, String> {
        self.send_command(command, payload).await;
        self.expect_response(command).await
    }

    /// Assert that the proxy closes the connection within the timeout;
    /// returns the frames that came before the close.
    pub async fn expect_closed(&mut self) -> Vec<Frame> {
        let t = self.timeout;
        let deadline = tokio::time::Instant::now() + t;
        let mut got: Vec<Frame> = self.pending.drain(..).collect();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv_wire(left).await {
                Recv::Closed => return got,
                Recv::Frame(f) => got.push(f),
                Recv::TimedOut => panic!(
                    "mock client: expected the proxy to close the connection within {t:?}; it stayed open after {}",
                    if got.is_empty() {
                        "no frame".to_owned()
                    } else {
                        got.iter().map(describe).collect::<Vec<_>>().join(", ")
                    }
                ),
            }
        }
    }

    /// Whether the proxy was seen closing the connection.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    // ----- runtime helpers -----

    /// RegisterVM; the `io` object of the response or the error's `msg`.
    pub async fn register_vm(
        &mut self,
        container_id: &str,
        ctl: impl AsRef<Path>,
        io: impl AsRef<Path>,
        num_io_streams: u32,
    ) -> Result<IoResponse, String> {
        let mut v = serde_json::json!({
            "containerId": container_id,
            "ctlSerial": path_str(ctl.as_ref()),
            "ioSerial": path_str(io.as_ref()),
        });
        if num_io_streams > 0 {
            v["numIOStreams"] = num_io_streams.into();
        }
        let p = self.call(Command::RegisterVm, to_vec(&v)).await?;
        Ok(parse_io(Command::RegisterVm, &p))
    }

    /// RegisterVM for a [`MockAgent`](crate::MockAgent)'s two sockets.
    pub async fn register_agent(
        &mut self,
        container_id: &str,
        agent: &crate::MockAgent,
        num_io_streams: u32,
    ) -> Result<IoResponse, String> {
        self.register_vm(
            container_id,
            agent.ctl_path(),
            agent.io_path(),
            num_io_streams,
        )
        .await
    }

    /// AttachVM.
    pub async fn attach_vm(
        &mut self,
        container_id: &str,
        num_io_streams: u32,
    ) -> Result<IoResponse, String> {
        let mut v = serde_json::json!({ "containerId": container_id });
        if num_io_streams > 0 {
            v["numIOStreams"] = num_io_streams.into();
        }
        let p = self.call(Command::AttachVm, to_vec(&v)).await?;
        Ok(parse_io(Command::AttachVm, &p))
    }

    /// UnregisterVM.
    pub async fn unregister_vm(&mut self, container_id: &str) -> Result<(), String> {
        let v = serde_json::json!({ "containerId": container_id });
        self.call(Command::UnregisterVm, to_vec(&v)).await.map(drop)
    }

    /// Hyper: `data` is raw JSON (`None` leaves the key out); the agent's
    /// ACK payload or the error's `msg`.
    ///
    /// # Panics
    ///
    /// If `data` is not valid JSON (send such payloads with
    /// [`call`](Self::call)).
    pub async fn hyper(
        &mut self,
        name: &str,
        tokens: &[&str],
        data: Option<&str>,
    ) -> Result<Bytes, String> {
        self.send_hyper(name, tokens, data).await;
        self.expect_response(Command::Hyper).await
    }

    /// Send a Hyper command without waiting for its response.
    pub async fn send_hyper(&mut self, name: &str, tokens: &[&str], data: Option<&str>) {
        let h = proxy_proto::payload::Hyper::new(
            name,
            tokens.iter().map(|t| (*t).to_owned()).collect(),
            data,
        )
        .unwrap_or_else(|e| panic!("mock client: Hyper data {data:?} is not JSON: {e}"));
        self.send_command(Command::Hyper, to_vec(&h)).await;
    }

    // ----- shim helpers -----

    /// ConnectShim.
    pub async fn connect_shim(&mut self, token: &str) -> Result<(), String> {
        let v = serde_json::json!({ "token": token });
        self.call(Command::ConnectShim, to_vec(&v)).await.map(drop)
    }

    /// DisconnectShim, then assert that the proxy closes the connection
    /// without a response.
    pub async fn disconnect_shim(&mut self) {
        self.send_command(Command::DisconnectShim, &b"{}"[..]).await;
        let got = self.expect_closed().await;
        if let Some(f) = got.iter().find(|f| {
            matches!(
                f.kind,
                FrameKind::Response {
                    command: Command::DisconnectShim,
                    ..
                }
            )
        }) {
            panic!(
                "mock client: DisconnectShim must get no response, got {}",
                describe(f)
            );
        }
    }

    /// A stdin stream frame (empty `data` = end of input).
    pub async fn stdin(&mut self, data: impl Into<Bytes>) {
        self.send(Frame::stream(Stream::Stdin, data)).await;
    }

    /// Signal; columns and rows are sent only when non-zero.
    pub async fn signal(&mut self, signal: i64, columns: i64, rows: i64) -> Result<(), String> {
        let s = proxy_proto::payload::Signal {
            signal_number: signal,
            columns,
            rows,
        };
        self.call(Command::Signal, to_vec(&s)).await.map(drop)
    }

    /// A log stream frame with this JSON.
    pub async fn log(&mut self, json: &str) {
        self.send(Frame::stream(Stream::Log, json.as_bytes().to_vec()))
            .await;
    }

    /// Exactly `n` bytes of stdout, across as many frames as needed. Bytes
    /// of a frame beyond `n`, and stderr that comes meanwhile, are kept for
    /// the next calls.
    ///
    /// # Panics
    ///
    /// On another kind of frame, timeout or close.
    pub async fn expect_stdout(&mut self, n: usize) -> Bytes {
        self.expect_output(Stream::Stdout, n).await
    }

    /// Exactly `n` bytes of stderr (as [`expect_stdout`](Self::expect_stdout)).
    pub async fn expect_stderr(&mut self, n: usize) -> Bytes {
        self.expect_output(Stream::Stderr, n).await
    }

    async fn expect_output(&mut self, stream: Stream, n: usize) -> Bytes {
        let mut out = BytesMut::with_capacity(n);
        let left = match stream {
            Stream::Stderr => &mut self.stderr_left,
            _ => &mut self.stdout_left,
        };
        let take = left.len().min(n);
        out.extend_from_slice(&left.split_to(take));
        let t = self.timeout;
        while out.len() < n {
            match self.recv_within(t).await {
                Recv::Frame(f) if f.kind == FrameKind::Stream(stream) => {
                    let want = n - out.len();
                    if f.payload.len() > want {
                        out.extend_from_slice(&f.payload[..want]);
                        let rest = f.payload.slice(want..);
                        match stream {
                            Stream::Stderr => self.stderr_left = rest,
                            _ => self.stdout_left = rest,
                        }
                    } else {
                        out.extend_from_slice(&f.payload);
                    }
                }
                // The other output stream: kept for its own expect call
                // (stdout and stderr of a session have no order between them).
                Recv::Frame(f)
                    if matches!(f.kind, FrameKind::Stream(Stream::Stdout | Stream::Stderr)) =>
                {
                    let other = match stream {
                        Stream::Stderr => &mut self.stdout_left,
                        _ => &mut self.stderr_left,
                    };
                    let mut b = BytesMut::with_capacity(other.len() + f.payload.len());
                    b.extend_from_slice(other);
                    b.extend_from_slice(&f.payload);
                    *other = b.freeze();
                }
                Recv::Frame(f) => panic!(
                    "mock client: expected {} more bytes of {} ({} so far), got {}",
                    n - out.len(),
                    stream.name(),
                    out.len(),
                    describe(&f)
                ),
                Recv::Closed => panic!(
                    "mock client: expected {} more bytes of {} ({} so far), but the proxy closed the connection",
                    n - out.len(),
                    stream.name(),
                    out.len()
                ),
                Recv::TimedOut => panic!(
                    "mock client: expected {} more bytes of {} ({} so far), got nothing within {t:?}",
                    n - out.len(),
                    stream.name(),
                    out.len()
                ),
            }
        }
        out.freeze()
    }

    /// The ProcessExited notification; its exit code.
    ///
    /// # Panics
    ///
    /// On any other frame (output left unread is a failure too).
    pub async fn expect_exit(&mut self) -> u8 {
        assert!(
            self.stdout_left.is_empty() && self.stderr_left.is_empty(),
            "mock client: expected ProcessExited, but {} bytes of stdout and {} of stderr were left unread",
            self.stdout_left.len(),
            self.stderr_left.len()
        );
        let f = self.recv().await;
        match f.kind {
            FrameKind::Notification(Notification::ProcessExited) if f.payload.len() == 1 => {
                f.payload[0]
            }
            _ => panic!("mock client: expected ProcessExited, got {}", describe(&f)),
        }
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str()
        .unwrap_or_else(|| panic!("path {} is not UTF-8", p.display()))
}

fn to_vec<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("JSON of test payloads")
}

fn parse_io(command: Command, payload: &[u8]) -> IoResponse {
    serde_json::from_slice::<RegisterVmResponse>(payload)
        .unwrap_or_else(|e| {
            panic!(
                "mock client: the {command} response {:?} is not {{\"io\":{{…}}}}: {e}",
                lossy(payload, 300)
            )
        })
        .io
}
