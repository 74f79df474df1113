//! One client connection: a reader that decodes frames and feeds them to
//! the connection's rules ([`crate::rules::client`]), carrying out what
//! they decide and writing each response itself; once the connection is
//! a shim, a writer task sends the responses and its session's output.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use proxy_proto::hyper::ctl::Code;
use proxy_proto::payload::{
    AttachVm, ConnectShim, Hyper, LogEntry, LogLevel, RegisterVm, RegisterVmResponse, Signal,
    UnregisterVm,
};
use proxy_proto::{
    Command, Decode, Frame, FrameDecoder, FrameError, FrameKind, Header, Limits, RawHeader, Stream,
};
use serde::de::DeserializeOwned;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{watch, OwnedSemaphorePermit};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn, Instrument};

use crate::driver::inbox::{self, TryRecvError};
use crate::driver::wire::{write_frame, Batch};
use crate::registry::{ConnId, HyperPlan, ProxyError, SignalPlan, VmId};
use crate::rules::client::{self, Action, Client, CloseReason, StdinAction};
use crate::rules::output::{Gather, Held, Inflight, Step};
use crate::server::Shared;
use crate::session::{Budget, Flag, IoFlow, Output, OutputQueue, Session, WriteOutcome};
use crate::timer::Deadline;
use crate::vm::{GoneWait, Vm};

/// First read size on a connection; doubled while reads fill it.
const MIN_READ: usize = 4 * 1024;
/// Largest read size.
const MAX_READ: usize = 256 * 1024;

thread_local! {
    /// One emptied read buffer of [`MIN_READ`] bytes, kept for the next
    /// read of any connection on this thread (see `release_if_idle`).
    static SPARE_READ: std::cell::RefCell<Option<BytesMut>> = const { std::cell::RefCell::new(None) };
}

/// Frames the reader may queue for the writer before it waits (a client
/// that does not read its responses is not read either).
const TO_WRITER: usize = 64;

/// How long a closing connection's writer may take to flush.
const WRITER_GRACE: Duration = Duration::from_secs(2);

/// What the reader asks the writer to do.
#[derive(Debug)]
enum ToWriter {
    /// Send a frame.
    Frame(Frame),
    /// From now on, also send this session's output.
    Attach(Arc<Session>),
    /// The VM is gone: write what is queued, then stop.
    Drain,
}

/// The handles of a shim connection's session (the rules hold its role).
#[derive(Debug)]
struct ShimRole {
    token: String,
    vm: Arc<Vm>,
    session: Arc<Session>,
}

enum Flow {
    Continue,
    Close,
}

/// Serve one client connection until it closes.
pub async fn serve(shared: Arc<Shared>, stream: UnixStream, conn: ConnId) {
    let span = tracing::debug_span!("conn", conn = conn.0);
    let _open = Open(shared.clone());
    shared.metrics.conn_accepted();
    serve_inner(shared, stream, conn).instrument(span).await
}

/// One open connection, counted in `Shared::connections` (which the
/// accept loop increments) until it ends, however it ends.
struct Open(Arc<Shared>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0
            .connections
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

async fn serve_inner(shared: Arc<Shared>, stream: UnixStream, conn: ConnId) {
    debug!("client connected");
    let (r, w) = stream.into_split();
    let mut reader = ClientReader::new(r, &shared);
    let mut c = Conn::new(shared, conn, w);
    let end = c.run(&mut reader).await;
    drop(reader);
    // Boxed: run once, at the end, and kept out of every connection's task.
    Box::pin(c.end(end)).await;
}

/// Where a connection's frames go out.
enum Out {
    /// Not a shim yet: the connection's own task writes each response
    /// (one task fewer to wake per command). A client that does not read
    /// its responses is not read either.
    Inline(OwnedWriteHalf),
    /// The writer task, started when the connection first takes a
    /// session: it interleaves the responses with the session's output.
    Writer {
        tx: inbox::Sender<ToWriter>,
        task: JoinHandle<()>,
    },
    /// A write failed: nothing more goes out.
    Failed,
}

impl Out {
    /// The socket, while this task still holds it (to see its peer go).
    fn peer(&self) -> Option<&UnixStream> {
        match self {
            Out::Inline(w) => Some(w.as_ref()),
            Out::Writer { .. } | Out::Failed => None,
        }
    }
}

/// How a connection's read loop ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The connection closes: the writer writes what it was given.
    Close,
    /// The VM is gone: the writer also writes what its session queued.
    Drain,
}

/// What woke a connection's reader.
enum Wake {
    /// The socket is readable.
    Readable,
    /// The shim's process started: the stdin that waited for it goes.
    Started,
    /// The rules' deadline passed.
    Deadline,
    /// The connection ends.
    End(End),
}

/// A wait for the connection's end that lives as long as the connection:
/// made once, so that each turn of the read loop polls it rather than
/// registering (and unregistering) a waiter again.
type EndWait = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// What a connection's reader waits for besides its socket.
struct Waits {
    /// The daemon's shutdown.
    shutdown: EndWait,
    /// The VM's end, once the connection is a shim.
    gone: Option<GoneWait>,
    /// The rules' next deadline (a partial frame's, waiting stdin's).
    timer: Deadline,
}

/// The read half of a client connection, its buffer and its decoder.
struct ClientReader {
    r: OwnedReadHalf,
    dec: FrameDecoder,
    /// The read buffer is allocated only while bytes are pending: an idle
    /// connection (1000 waiting shims) holds no buffer at all.
    buf: BytesMut,
    read_size: usize,
    single_threaded: bool,
    /// The memory budget the read buffer holds beyond its first MIN_READ
    /// bytes (a large frame, or large reads).
    held: Option<OwnedSemaphorePermit>,
}

/// What filling the read buffer came to.
enum Fill {
    /// It read, or there was nothing to read yet.
    Read,
    /// The connection ends (end of stream, a failed read, shutdown).
    Closed,
    /// No memory budget came before the rules' deadline: what is due is
    /// carried out, and the connection ends.
    Starved,
}

impl ClientReader {
    fn new(r: OwnedReadHalf, shared: &Shared) -> Self {
        let limits = Limits {
            max_payload: shared.config.max_frame_size,
        };
        Self {
            r,
            dec: FrameDecoder::new(limits),
            buf: BytesMut::new(),
            read_size: MIN_READ,
            single_threaded: tokio::runtime::Handle::current().runtime_flavor()
                == tokio::runtime::RuntimeFlavor::CurrentThread,
            held: None,
        }
    }

    /// The next whole frame in the buffer.
    fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if let Some(opcode) = client::ignored_error_flag(&self.buf) {
            debug!(
                opcode,
                "the Error flag is set on a command; ignored, as the reference does"
            );
        }
        Decode::decode(&mut self.dec, &mut self.buf)
    }

    /// Nothing is pending: let go of the buffer and its budget. A small
    /// buffer is kept as the thread's spare, for the
    /// next connection's read (a runtime that calls Hyper again and again
    /// then reads with one buffer instead of a `malloc` of 4 KiB per call,
    /// which glibc pays for with a consolidation of its fast bins).
    fn release_if_idle(&mut self) {
        if self.buf.is_empty() {
            let buf = std::mem::take(&mut self.buf);
            // What is left of a small buffer (frames were split off its
            // front; `reserve` takes the whole allocation back once they
            // are dropped). One per thread: the memory is bounded.
            if buf.capacity() > 0 && buf.capacity() <= MIN_READ {
                SPARE_READ.with(|s| {
                    if let Ok(mut s) = s.try_borrow_mut() {
                        if s.is_none() {
                            *s = Some(buf);
                        }
                    }
                });
            }
            self.held = None;
        }
    }

    /// Read what the socket holds, with room for what is pending.
    async fn fill(&mut self, shared: &Shared, rules: &Client) -> Fill {
        // Room for what is pending: the rest of a partial frame, or more.
        let want = RawHeader::peek(&self.buf)
            .map(|h| (h.header_len() + h.payload_len as usize).saturating_sub(self.buf.len()))
            .unwrap_or(0)
            .max(self.read_size);
        if let Err(end) = self.budget(shared, rules, want).await {
            return end;
        }
        self.read(want)
    }

    /// Beyond its first MIN_READ bytes the buffer draws from the memory
    /// budget; while none is left, this peer is not read (the rest of its
    /// frame waits in its socket), until its frame times out.
    async fn budget(&mut self, shared: &Shared, rules: &Client, want: usize) -> Result<(), Fill> {
        let need = (self.buf.len() + want).saturating_sub(MIN_READ);
        let have = self.held.as_ref().map_or(0, |p| p.num_permits());
        if need <= have {
            return Ok(());
        }
        let more = u32::try_from(need - have).unwrap_or(u32::MAX);
        let p = match shared.budget.clone().try_acquire_many_owned(more) {
            Ok(p) => p,
            Err(_) => {
                debug!(
                    bytes = more,
                    "memory budget spent; not reading this client until some is free"
                );
                // Boxed: a rare wait, kept out of every connection's task.
                let budget = shared.budget.clone();
                let stop = shared.shutdown.subscribe();
                Box::pin(wait_budget(budget, more, stop, rules.poll_timeout())).await?
            }
        };
        match &mut self.held {
            Some(h) => h.merge(p),
            h @ None => *h = Some(p),
        }
        Ok(())
    }

    fn read(&mut self, want: usize) -> Fill {
        if self.buf.capacity() == 0 {
            if let Some(spare) =
                SPARE_READ.with(|s| s.try_borrow_mut().ok().and_then(|mut s| s.take()))
            {
                self.buf = spare;
            }
        }
        self.buf.reserve(want);
        let room = self.buf.capacity() - self.buf.len();
        match self.r.try_read_buf(&mut self.buf) {
            Ok(0) => {
                if !self.buf.is_empty() {
                    debug!(left = self.buf.len(), "client closed mid-frame");
                }
                Fill::Closed
            }
            Ok(n) => {
                if n >= self.read_size {
                    self.read_size = (self.read_size * 2).min(MAX_READ);
                }
                if n < room && self.single_threaded {
                    // A short read drained the socket: forget the
                    // readiness now rather than learn it from one more
                    // read that fails with EAGAIN (a syscall per command).
                    // Only on the single-threaded runtime: there the I/O
                    // driver cannot record a newer event between the read
                    // and this, so only readiness the read consumed is
                    // cleared; data arriving later brings a new event.
                    let _ = self.r.as_ref().try_io(tokio::io::Interest::READABLE, || {
                        Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
                    });
                }
                Fill::Read
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Fill::Read,
            Err(e) => {
                debug!(error = %e, "read failed");
                Fill::Closed
            }
        }
    }
}

/// Wait for `more` of the memory budget, until shutdown or `deadline`.
async fn wait_budget(
    budget: Budget,
    more: u32,
    mut stop: watch::Receiver<bool>,
    deadline: Option<std::time::Instant>,
) -> Result<OwnedSemaphorePermit, Fill> {
    let deadline = deadline.map(tokio::time::Instant::from_std);
    tokio::select! {
        p = budget.acquire_many_owned(more) => p.map_err(|_| Fill::Starved),
        _ = stop.wait_for(|s| *s) => Err(Fill::Closed),
        () = sleep_until(deadline) => Err(Fill::Starved),
    }
}

/// The rules' clock: tokio's (paused in tests), as a std instant.
fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// Wait until the shim's process starts (forever for a connection that is
/// not a shim).
async fn process_start(shim: &Option<ShimRole>) {
    match shim {
        Some(s) => s.session.started.wait_for(true).await,
        None => std::future::pending().await,
    }
}

/// Sleep until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn vm_gone(g: &mut Option<GoneWait>) {
    match g {
        Some(g) => g.wait().await,
        None => std::future::pending().await,
    }
}

/// The driver of one connection's rules ([`Client`]): it carries out their
/// actions with the shared state (registry, VMs, memory budget) and tells
/// them the outcome.
struct Conn {
    shared: Arc<Shared>,
    id: ConnId,
    out: Out,
    rules: Client,
    /// The handles of the shim role the rules hold.
    shim: Option<ShimRole>,
    /// The memory budget the stdin waiting in the rules holds.
    stdin_budget: Option<OwnedSemaphorePermit>,
}

/// The read loop and the ending.
impl Conn {
    fn new(shared: Arc<Shared>, id: ConnId, w: OwnedWriteHalf) -> Self {
        let rules = Client::new(client::Limits {
            frame_timeout: shared.config.frame_timeout,
            process_timeout: shared.config.process_timeout,
            session_buffer: usize::try_from(shared.config.session_buffer).unwrap_or(usize::MAX),
        });
        Self {
            shared,
            id,
            out: Out::Inline(w),
            rules,
            shim: None,
            stdin_budget: None,
        }
    }

    /// Read frames and carry them out until the connection ends.
    async fn run(&mut self, rd: &mut ClientReader) -> End {
        let mut waits = Waits {
            shutdown: {
                let mut rx = self.shared.shutdown.subscribe();
                Box::pin(async move {
                    let _ = rx.wait_for(|s| *s).await;
                })
            },
            gone: None,
            timer: Deadline::new(),
        };
        // What is carried out after a read (frames, the stdin that waited
        // for the start, a close) is boxed, once per read: inline, the
        // largest of those futures would size every connection's task,
        // while an idle connection only waits.
        loop {
            if let Flow::Close = Box::pin(self.take_frames(rd, &mut waits.gone)).await {
                return End::Close;
            }
            waits.timer.set(self.rules.poll_timeout());
            match self.wait(rd, &mut waits).await {
                Wake::Readable => {}
                Wake::End(end) => return end,
                Wake::Started => match Box::pin(self.flush_stdin()).await {
                    Flow::Continue => continue,
                    Flow::Close => return End::Close,
                },
                // None: it fired before anything was due (a deadline moved
                // later); the timer is set again.
                Wake::Deadline => {
                    if let Some(close) = self.rules.handle_timeout(now()) {
                        Box::pin(self.perform(close)).await;
                        return End::Close;
                    }
                }
            }
            match rd.fill(&self.shared, &self.rules).await {
                Fill::Read => {}
                Fill::Closed => return End::Close,
                Fill::Starved => {
                    if let Some(close) = self.rules.handle_timeout(now()) {
                        Box::pin(self.perform(close)).await;
                    }
                    return End::Close;
                }
            }
        }
    }

    /// Carry out the whole frames the buffer holds, then tell the rules
    /// what is left of it (a partial frame has a deadline).
    async fn take_frames(&mut self, rd: &mut ClientReader, gone: &mut Option<GoneWait>) -> Flow {
        let mut decoded = false;
        loop {
            match rd.next_frame() {
                Ok(Some(frame)) => {
                    decoded = true;
                    if let Flow::Close = self.handle(frame).await {
                        return Flow::Close;
                    }
                    if gone.is_none() {
                        *gone = self.shim.as_ref().map(|s| GoneWait::new(&s.vm));
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let close = self.rules.on_malformed(&rd.buf, e);
                    self.perform(close).await;
                    return Flow::Close;
                }
            }
        }
        rd.release_if_idle();
        self.rules.partial_frame(&rd.buf, decoded, now());
        Flow::Continue
    }

    /// Wait for the socket, the process's start, the rules' deadline, or
    /// the connection's end.
    async fn wait(&mut self, rd: &ClientReader, w: &mut Waits) -> Wake {
        tokio::select! {
            r = rd.r.readable() => match r {
                Ok(()) => Wake::Readable,
                Err(e) => {
                    debug!(error = %e, "read failed");
                    Wake::End(End::Close)
                }
            },
            () = w.shutdown.as_mut() => Wake::End(End::Close),
            () = vm_gone(&mut w.gone) => Wake::End(End::Drain),
            () = process_start(&self.shim), if self.rules.waiting_for_start() => Wake::Started,
            () = w.timer.fired(), if w.timer.is_armed() => Wake::Deadline,
        }
    }

    /// Ending: the writer flushes what it was given, gives the session's
    /// queue back, and only then is the token claimable again.
    async fn end(mut self, end: End) {
        self.rules.closed();
        if let Some(s) = &self.shim {
            self.shared.state().registry.shim_closing(self.id, &s.token);
        }
        if end == End::Drain {
            self.send_out(ToWriter::Drain).await;
        }
        let Conn {
            shared,
            id,
            out,
            shim,
            ..
        } = self;
        match out {
            Out::Inline(mut w) => {
                use tokio::io::AsyncWriteExt;
                let _ = w.shutdown().await;
            }
            Out::Writer { tx, mut task } => {
                tx.close();
                // A peer that stopped reading cannot hold the session's
                // queue hostage: after a grace period the writer gives up
                // and hands the queue back.
                if tokio::time::timeout(WRITER_GRACE, &mut task).await.is_err() {
                    debug!("client not reading; abandoning its pending output");
                    tx.stop();
                    let _ = task.await;
                }
            }
            Out::Failed => {}
        }
        if let Some(s) = shim {
            shared.state().registry.shim_gone(id, &s.token);
            s.session.shim.set(false);
            debug!(token = %crate::redact::Token(&s.token), "shim gone; token claimable again");
        }
        debug!("client disconnected");
    }
}
/// Take `n` bytes of `budget` for stdin that waits for its process.
fn reserve(budget: &Budget, held: &mut Option<OwnedSemaphorePermit>, n: usize) -> bool {
    let Some(permit) = u32::try_from(n)
        .ok()
        .and_then(|n| budget.clone().try_acquire_many_owned(n).ok())
    else {
        return false;
    };
    match held {
        Some(h) => h.merge(permit),
        h @ None => *h = Some(permit),
    }
    true
}

fn parse<T: DeserializeOwned>(command: Command, payload: &[u8]) -> Result<T, ProxyError> {
    let payload: &[u8] = if payload.is_empty() { b"{}" } else { payload };
    serde_json::from_slice(payload).map_err(|source| ProxyError::InvalidPayload {
        command: command.name(),
        source,
    })
}

impl Conn {
    async fn send(&mut self, f: Frame) {
        self.send_out(ToWriter::Frame(f)).await;
    }

    /// Hand `m` to the writer, waiting while its queue is full (boxed: the
    /// rare wait stays out of every connection's task). A writer that is
    /// gone (its shim's socket failed) takes nothing more. Before the
    /// connection takes a session, a frame is written here; anything else
    /// starts the writer first.
    async fn send_out(&mut self, m: ToWriter) {
        let m = match (&mut self.out, m) {
            (Out::Inline(w), ToWriter::Frame(f)) => {
                if let Err(e) = write_frame(w, &f.header().to_bytes(), &f.payload).await {
                    debug!(error = %e, "write to client failed");
                    self.out = Out::Failed;
                }
                return;
            }
            (Out::Failed, _) => return,
            (_, m) => m,
        };
        self.start_writer();
        let Out::Writer { tx, .. } = &self.out else {
            return;
        };
        if let Err(m) = tx.try_send(m) {
            if !tx.is_orphaned() {
                let _ = Box::pin(tx.send(m)).await;
            }
        }
    }

    /// From now on a writer task sends this connection's frames (no-op
    /// once it does).
    fn start_writer(&mut self) {
        self.out = match std::mem::replace(&mut self.out, Out::Failed) {
            Out::Inline(w) => {
                let (tx, rx) = inbox::channel::<ToWriter>(TO_WRITER);
                let task = tokio::spawn(ShimWriter::new(w, rx).run().in_current_span());
                Out::Writer { tx, task }
            }
            other => other,
        };
    }

    async fn respond(&mut self, cmd: Command, r: Result<Bytes, ProxyError>) {
        if let Err(e) = &r {
            self.shared.metrics.error_response(e);
        }
        match r {
            Ok(p) => self.send(Frame::response(cmd, p)).await,
            Err(e) => {
                debug!(
                    command = cmd.name(),
                    error = %crate::redact::tokens_in(&e.to_string()),
                    "command refused"
                );
                self.send(Frame::error_response(cmd, &e.to_string())).await
            }
        }
    }

    /// Feed one frame to the rules and carry out what they say.
    async fn handle(&mut self, f: Frame) -> Flow {
        // A start the rules have not been told of yet: what waited for it
        // goes before this stdin.
        if f.kind == FrameKind::Stream(Stream::Stdin) && !self.rules.process_running() {
            let started = self.shim.as_ref().is_some_and(|s| s.session.started.get());
            if started {
                if let Flow::Close = self.flush_stdin().await {
                    return Flow::Close;
                }
            }
        }
        let budget = &self.shared.budget;
        let held = &mut self.stdin_budget;
        let action = self
            .rules
            .on_frame(f, now(), &mut |n| reserve(budget, held, n));
        self.perform(action).await
    }

    async fn perform(&mut self, action: Action) -> Flow {
        match action {
            // Boxed: the command futures (RegisterVM waiting for READY,
            // Hyper waiting for the agent…) are large, and inline they
            // would size every connection's task — 1000 idle shims — by
            // the largest of them. Stream frames, the hot path, stay inline.
            Action::Command(cmd, payload) => Box::pin(self.command(cmd, payload)).await,
            Action::ErrorResponse(cmd, e) => {
                self.respond(cmd, Err(e)).await;
                Flow::Continue
            }
            // Boxed too: stdin's future (to the VM's writer) is larger
            // than the rest, and every read carries this one inline.
            Action::Stdin(s) => Box::pin(self.stdin(s)).await,
            Action::Log(entry) => {
                log(&entry);
                Flow::Continue
            }
            Action::Close(reason) => {
                self.close(reason).await;
                Flow::Close
            }
        }
    }

    /// The rules close the connection: say why, and answer where an error
    /// response can be addressed.
    async fn close(&mut self, reason: CloseReason) {
        match &reason {
            CloseReason::Malformed { error, .. } => {
                warn!(error = %error, "malformed frame; closing the connection")
            }
            CloseReason::Incomplete {
                have,
                frame_len,
                timeout,
                ..
            } => warn!(
                have,
                frame_len,
                "a client frame was not completed within {timeout:?}; closing the connection"
            ),
            CloseReason::ClientStream(s) => warn!(
                stream = s.name(),
                "clients may not send this stream; closing"
            ),
            CloseReason::NotClientFrame(kind) => {
                warn!(kind = ?kind, "clients may only send commands and streams; closing")
            }
            CloseReason::StdinNotShim => {
                warn!("stdin from a connection that is not a shim; closing")
            }
            CloseReason::InvalidLog(e) => warn!(error = %e, "invalid log entry; closing"),
            // The error names the token: shortened.
            CloseReason::ProcessTimeout(e) => warn!(
                error = %crate::redact::tokens_in(&e.to_string()),
                "stdin cannot be delivered; closing"
            ),
            CloseReason::Disconnected | CloseReason::Closed => {}
        }
        if reason.bad_frame() {
            self.shared
                .metrics
                .error(crate::metrics::ErrorKind::BadFrame);
        }
        if let Some(f) = reason.response() {
            self.send(f).await;
        }
    }

    async fn command(&mut self, cmd: Command, payload: Bytes) -> Flow {
        let r = match cmd {
            Command::RegisterVm => self.register(&payload).await,
            Command::UnregisterVm => self.unregister(&payload),
            Command::AttachVm => self.attach(&payload),
            Command::Hyper => match self.hyper(&payload).await {
                Some(r) => r,
                None => return Flow::Close,
            },
            Command::ConnectShim => match self.connect_shim(&payload).await {
                Ok(()) => return Flow::Continue,
                Err(e) => Err(e),
            },
            Command::DisconnectShim => match self.disconnect_shim() {
                Action::Close(reason) => {
                    self.close(reason).await;
                    return Flow::Close;
                }
                Action::ErrorResponse(_, e) => Err(e),
                _ => return Flow::Continue,
            },
            Command::Signal => match self.signal(&payload).await {
                Ok(Some(r)) => Ok(r),
                Ok(None) => return Flow::Continue,
                Err(e) => Err(e),
            },
        };
        let unregistered = cmd == Command::UnregisterVm && r.is_ok();
        self.respond(cmd, r).await;
        if unregistered && self.shared.pod_mode {
            info!("pod mode: VM unregistered, exiting");
            self.shared.stop();
        }
        Flow::Continue
    }

    async fn register(&mut self, payload: &[u8]) -> Result<Bytes, ProxyError> {
        let req: RegisterVm = parse(Command::RegisterVm, payload)?;
        let (vm, io) = self.shared.register_vm(req).await?;
        self.rules.attached(vm);
        json(&RegisterVmResponse { io })
    }

    fn attach(&mut self, payload: &[u8]) -> Result<Bytes, ProxyError> {
        let req: AttachVm = parse(Command::AttachVm, payload)?;
        let (vm, io) = self.shared.attach_vm(&req)?;
        self.rules.attached(vm);
        json(&RegisterVmResponse { io })
    }

    fn unregister(&mut self, payload: &[u8]) -> Result<Bytes, ProxyError> {
        let req: UnregisterVm = parse(Command::UnregisterVm, payload)?;
        let vm = self.shared.state().registry.unregister_vm(&req)?;
        info!(vm = %req.container_id, "VM unregistered");
        self.rules.unregistered(vm);
        Ok(Bytes::new())
    }

    /// Hyper: `None` when the caller left (closed its socket) while the
    /// call waited; the connection then ends without a response. What
    /// was already queued to the agent still completes, and its outcome
    /// (a process started or not) is still recorded.
    async fn hyper(&mut self, payload: &[u8]) -> Option<Result<Bytes, ProxyError>> {
        let (plan, vm) = match self.plan_hyper(payload) {
            Ok(p) => p,
            Err(e) => return Some(Err(e)),
        };
        if plan.code == Code::DestroyPod {
            debug!("destroypod forwarded");
        }
        let start = Start {
            token: plan.session.as_ref().map(|(t, _)| t.clone()),
            container_id: plan.container_id,
        };
        let shared = &self.shared;
        let peer = self.out.peer();
        let queue = async {
            let vm = vm.ok_or(ProxyError::VmGone)?;
            let session = match &plan.session {
                Some((_, io_base)) => Some(vm.session(*io_base).ok_or(ProxyError::VmGone)?),
                None => None,
            };
            if let Some(s) = &session {
                let t = shared.config.shim_timeout;
                wait_true(&s.shim, t, || {
                    format!("the shim of token {:?} to connect", s.token)
                })
                .await?;
            }
            let pending = vm.ctl_queue(plan.code, Bytes::from(plan.data)).await?;
            Ok((vm, session, pending))
        };
        let (vm, session, mut pending) = tokio::select! {
            biased;
            r = queue => match r {
                Ok(q) => q,
                Err(e) => {
                    start.finish(shared, None, false);
                    return Some(Err(e));
                }
            },
            () = peer_gone(peer) => {
                debug!("the caller left before its Hyper was sent; dropped");
                start.finish(shared, None, false);
                return None;
            }
        };
        let result = tokio::select! {
            biased;
            r = &mut pending => vm.ctl_outcome(r),
            () = peer_gone(peer) => {
                // The agent answers in its own time; the outcome is
                // recorded then, without holding the caller's socket.
                debug!("the caller left while its Hyper was with the agent; the reply will be dropped");
                let shared = Arc::clone(shared);
                tokio::spawn(async move {
                    let r = vm.ctl_outcome(pending.await);
                    start.finish(&shared, session.as_deref(), r.is_ok());
                });
                return None;
            }
        };
        start.finish(shared, session.as_deref(), result.is_ok());
        Some(result)
    }

    /// What a Hyper asks for, and of which VM (if it is still there).
    fn plan_hyper(&self, payload: &[u8]) -> Result<(HyperPlan, Option<Arc<Vm>>), ProxyError> {
        let req: Hyper = parse(Command::Hyper, payload)?;
        let client_vm = self.rules.vm_for_hyper()?;
        let mut st = self.shared.state();
        let plan = st.registry.plan_hyper(Some(client_vm), &req)?;
        let vm = st.registry.vm_handle(plan.vm).cloned();
        Ok((plan, vm))
    }

    /// On success the response is sent here, before the session's output.
    async fn connect_shim(&mut self, payload: &[u8]) -> Result<(), ProxyError> {
        let req: ConnectShim = parse(Command::ConnectShim, payload)?;
        req.validate()?;
        // A shim that just dropped may not have been noticed yet (or its
        // connection may still be closing): give it a moment to let go.
        let (vm_id, vm, session) = match self.claim(&req.token) {
            Err(ProxyError::TokenClaimed(_) | ProxyError::TokenReleasing(_)) => {
                self.wait_released(&req.token).await;
                self.claim(&req.token)?
            }
            other => other?,
        };
        let started = session.started.get();
        if let Err(e) = self
            .rules
            .became_shim(vm_id, req.token.clone(), session.io_base, started)
        {
            self.shared.state().registry.shim_gone(self.id, &req.token);
            return Err(e);
        }
        let (lost, ahead) = session.shim_claims(req.resume.map(|r| (r.stdout, r.stderr)));
        if lost > 0 || ahead {
            info!(
                token = %crate::redact::Token(&req.token),
                lost,
                ahead,
                "a shim resumes from a point the replay window does not cover; it gets what the window holds"
            );
        }
        // Response first, then the session's output.
        self.send(Frame::response(Command::ConnectShim, Bytes::new()))
            .await;
        self.send_out(ToWriter::Attach(session.clone())).await;
        session.shim.set(true);
        info!(token = %crate::redact::Token(&req.token), io_base = session.io_base, "shim connected");
        self.shim = Some(ShimRole {
            token: req.token,
            vm,
            session,
        });
        Ok(())
    }

    fn claim(&self, token: &str) -> Result<(VmId, Arc<Vm>, Arc<Session>), ProxyError> {
        let mut st = self.shared.state();
        let (vm_id, io_base) = st.registry.connect_shim(self.id, token)?;
        let vm = st.registry.vm_handle(vm_id).cloned();
        let session = vm.as_ref().and_then(|v| v.session(io_base));
        match (vm, session) {
            (Some(vm), Some(s)) => Ok((vm_id, vm, s)),
            _ => {
                st.registry.shim_gone(self.id, token);
                Err(ProxyError::VmGone)
            }
        }
    }

    /// Wait until the token's current shim lets go: up to the writer's
    /// grace period if its connection is known to be closing, briefly
    /// otherwise (time for its end of stream to be read).
    async fn wait_released(&self, token: &str) {
        let (session, releasing) = {
            let st = self.shared.state();
            let Some(t) = st.registry.token(token) else {
                return;
            };
            let s = st
                .registry
                .vm_handle(t.vm)
                .and_then(|v| v.session(t.io_base));
            (s, matches!(t.claim, crate::registry::Claim::Releasing(_)))
        };
        let Some(session) = session else { return };
        let patience = if releasing {
            WRITER_GRACE + Duration::from_millis(500)
        } else {
            Duration::from_millis(250)
        };
        let _ = tokio::time::timeout(patience, session.shim.wait_for(false)).await;
    }

    /// Free the token; the rules then close the connection.
    fn disconnect_shim(&mut self) -> Action {
        if let Some(s) = self.shim.take() {
            self.shared
                .state()
                .registry
                .disconnect_shim(self.id, &s.token);
            s.vm.remove_session(s.session.io_base);
            self.stdin_budget = None;
            info!(token = %crate::redact::Token(&s.token), "shim disconnected; token freed");
        }
        self.rules.disconnected()
    }

    /// `Ok(None)`: the response was already sent.
    async fn signal(&mut self, payload: &[u8]) -> Result<Option<Bytes>, ProxyError> {
        let Some(shim) = &self.shim else {
            return Err(ProxyError::NotAShim("Signal"));
        };
        let sig: Signal = parse(Command::Signal, payload)?;
        let (token, session, vm) = (shim.token.clone(), shim.session.clone(), shim.vm.clone());
        let mut waited = false;
        loop {
            let plan = self.shared.state().registry.plan_signal(&token, &sig)?;
            match plan {
                SignalPlan::ExitedBeforeStart => {
                    info!(
                        signal = sig.signal_number,
                        "signal before the process started: exit 0"
                    );
                    self.send(Frame::process_exited(0)).await;
                    self.send(Frame::response(Command::Signal, Bytes::new()))
                        .await;
                    return Ok(None);
                }
                SignalPlan::WaitForStart if !waited => {
                    let t = self.shared.config.process_timeout;
                    wait_true(&session.started, t, || {
                        format!("the process of token {token:?} to start")
                    })
                    .await?;
                    // Stdin that waited for the start goes first, as it
                    // came first (and this connection is not read while the
                    // signal's reply is awaited).
                    if let Flow::Close = self.flush_stdin().await {
                        return Err(vm.gone_error());
                    }
                    waited = true;
                }
                SignalPlan::WaitForStart => {
                    return Err(ProxyError::Timeout {
                        waited_for: format!("the process of token {token:?} to start"),
                        after: self.shared.config.process_timeout,
                    })
                }
                SignalPlan::Send { code, data } => {
                    return vm
                        .ctl(code, Bytes::from(data))
                        .await
                        .map(|_| Some(Bytes::new()));
                }
            }
        }
    }

    async fn stdin(&mut self, action: StdinAction) -> Flow {
        match action {
            StdinAction::Forward(data) => self.forward_stdin(data).await,
            // Waits for the start in the bounded queue; the connection goes
            // on being read.
            StdinAction::Queued => Flow::Continue,
            // The queue is full: this connection waits for the start (the
            // bound's back-pressure), then what waited goes first.
            StdinAction::WaitForStart { data, deadline } => {
                if let Err(e) = self.process_started(deadline).await {
                    // The error names the token: shortened.
                    warn!(
                        error = %crate::redact::tokens_in(&e.to_string()),
                        "stdin cannot be delivered; closing"
                    );
                    return Flow::Close;
                }
                if let Flow::Close = self.flush_stdin().await {
                    return Flow::Close;
                }
                self.forward_stdin(data).await
            }
        }
    }

    /// Wait until the shim's process starts, at most until `deadline`
    /// (`--process-timeout` after the oldest stdin that waits for it).
    async fn process_started(
        &self,
        deadline: Option<std::time::Instant>,
    ) -> Result<(), ProxyError> {
        let Some(shim) = &self.shim else {
            return Err(ProxyError::NotAShim("stdin"));
        };
        let t = self.shared.config.process_timeout;
        let left = deadline.map_or(Duration::MAX, |d| {
            tokio::time::Instant::from_std(d).saturating_duration_since(tokio::time::Instant::now())
        });
        let token = &shim.token;
        wait_true(&shim.session.started, left, || {
            format!("the process of token {token:?} to start")
        })
        .await
        .map_err(|e| match e {
            ProxyError::Timeout { waited_for, .. } => ProxyError::Timeout {
                waited_for,
                after: t,
            },
            e => e,
        })
    }

    /// The process started: what waited for it goes to the agent, in order.
    async fn flush_stdin(&mut self) -> Flow {
        let pending = self.rules.process_started();
        let budget = self.stdin_budget.take();
        for data in pending {
            if let Flow::Close = self.forward_stdin(data).await {
                return Flow::Close;
            }
        }
        drop(budget);
        Flow::Continue
    }

    async fn forward_stdin(&self, data: Bytes) -> Flow {
        let Some(shim) = &self.shim else {
            return Flow::Close;
        };
        let n = data.len() as u64;
        match shim.vm.stdin(shim.session.io_base, data).await {
            Ok(()) => {
                shim.session
                    .bytes_in
                    .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                Flow::Continue
            }
            Err(e) => {
                warn!(error = %e, "stdin cannot be delivered; closing");
                Flow::Close
            }
        }
    }
}

/// A client's log entry, in the proxy's log.
fn log(entry: &LogEntry) {
    let source = match entry.source {
        proxy_proto::payload::LogSource::Shim => "shim",
        proxy_proto::payload::LogSource::Runtime => "runtime",
    };
    let cid = entry.container_id.as_str();
    match entry.level {
        LogLevel::Debug => {
            tracing::debug!(target: "cc_proxy::client", source, container = cid, "{}", entry.msg)
        }
        LogLevel::Info => {
            tracing::info!(target: "cc_proxy::client", source, container = cid, "{}", entry.msg)
        }
        LogLevel::Warn => {
            tracing::warn!(target: "cc_proxy::client", source, container = cid, "{}", entry.msg)
        }
        LogLevel::Error => {
            tracing::error!(target: "cc_proxy::client", source, container = cid, "{}", entry.msg)
        }
    }
}

fn json<T: serde::Serialize>(v: &T) -> Result<Bytes, ProxyError> {
    serde_json::to_vec(v)
        .map(Bytes::from)
        .map_err(|source| ProxyError::Encode {
            what: "a response",
            source,
        })
}

/// A Hyper call's process start, recorded when the agent has answered.
struct Start {
    /// The session's token, for a call that starts its process.
    token: Option<String>,
    container_id: Option<String>,
}

impl Start {
    /// Record the outcome: a process started (the agent said yes, and
    /// `session` is the call's), or none (the call failed, or never
    /// reached the agent).
    fn finish(self, shared: &Shared, session: Option<&Session>, started: bool) {
        if started {
            if let Some(s) = session {
                s.started.set(true);
            }
        }
        if let Some(t) = self.token {
            let mut st = shared.state();
            if started {
                st.registry.process_started(&t, self.container_id);
            } else {
                st.registry.process_start_failed(&t);
            }
        }
    }
}

/// Resolves when the peer has closed its socket entirely: the reply to a
/// call cannot reach it any more. A peer that has only shut down its
/// writing (it still reads its reply), or that has sent more frames, is
/// not gone: that is pending for good, as is a connection whose writer
/// task owns the socket.
async fn peer_gone(peer: Option<&UnixStream>) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let Some(s) = peer else {
        return std::future::pending().await;
    };
    if s.readable().await.is_err() {
        return;
    }
    // Readable: data, a half-close, or a hang-up; only the last says gone.
    let mut fds = [PollFd::new(s.as_fd(), PollFlags::POLLIN)];
    let hup = PollFlags::POLLHUP | PollFlags::POLLERR;
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) if fds[0].revents().is_some_and(|r| r.intersects(hup)) => {}
        _ => std::future::pending().await,
    }
}

async fn wait_true(
    flag: &Flag,
    t: Duration,
    what: impl FnOnce() -> String,
) -> Result<(), ProxyError> {
    match tokio::time::timeout(t, flag.wait_for(true)).await {
        Ok(()) => Ok(()),
        Err(_) => Err(ProxyError::Timeout {
            waited_for: what(),
            after: t,
        }),
    }
}

/// Frames and session output to the client, batched into vectored writes.
struct ShimWriter {
    w: OwnedWriteHalf,
    rx: inbox::Receiver<ToWriter>,
    session: Option<(Arc<Session>, OutputQueue)>,
    batch: Batch,
    /// Output items in the batch, to account for (or put back) after
    /// writing.
    inflight: Inflight,
    /// What the shim's socket held unread after the last write (SIOCOUTQ):
    /// lost if the shim dies without reading it.
    unread: usize,
    closing: bool,
    drain: bool,
    /// The batch holds a frame other than output (a response): no waiting.
    urgent: bool,
    /// The session's io flow (the corking policy's input), kept from batch
    /// to batch.
    flow: Option<Arc<IoFlow>>,
}

impl ShimWriter {
    fn new(w: OwnedWriteHalf, rx: inbox::Receiver<ToWriter>) -> Self {
        Self {
            w,
            rx,
            session: None,
            batch: Batch::new(),
            inflight: Inflight::default(),
            unread: 0,
            closing: false,
            drain: false,
            urgent: false,
            flow: None,
        }
    }

    async fn run(mut self) {
        loop {
            if self.batch.is_empty() {
                self.wait_for_work().await;
            }
            self.gather().await;
            self.urgent = false;
            if self.drain {
                if let Some((_, q)) = self.session.as_mut() {
                    while let Some(o) = q.try_next() {
                        queue_output(&mut self.inflight, &mut self.batch, o);
                    }
                }
            }
            if !self.batch.is_empty() && self.write().await.is_break() {
                break;
            }
            if self.closing || self.drain {
                break;
            }
        }
        if let Some((s, q)) = self.session.take() {
            s.return_queue(q);
        }
        use tokio::io::AsyncWriteExt;
        let _ = self.w.shutdown().await;
    }

    /// Wait for something to write.
    async fn wait_for_work(&mut self) {
        let msg = match &mut self.session {
            Some((_, q)) => tokio::select! {
                biased;
                m = self.rx.recv() => Some(m),
                o = q.next() => {
                    if let Some(o) = o {
                        queue_output(&mut self.inflight, &mut self.batch, o);
                    }
                    None
                }
            },
            None => Some(self.rx.recv().await),
        };
        match msg {
            Some(Some(m)) => self.urgent = self.take(m),
            Some(None) => self.closing = true,
            None => {}
        }
    }

    /// Gather more without waiting, and ask the corking policy (`Gather`)
    /// whether to write, to yield a turn of the scheduler, or, while the
    /// agent streams, to wait for the io reader's next read (see `IoFlow`).
    async fn gather(&mut self) {
        match (&self.flow, &self.session) {
            (Some(f), Some((s, _))) if Arc::ptr_eq(f, &s.flow) => {}
            _ => self.flow = self.session.as_ref().map(|(s, _)| s.flow.clone()),
        }
        let mut gather = Gather::new();
        loop {
            self.gather_ready();
            // Created before the flag is read: a wake-up in between is
            // not missed.
            let next_read = self.flow.as_ref().map(|f| f.next_read());
            let held = Held {
                len: self.batch.len(),
                output: !self.inflight.is_empty(),
                urgent: self.urgent,
                closing: self.closing || self.drain,
                streaming: self.flow.as_ref().is_some_and(|f| f.streaming()),
            };
            // `next_read` moved whole into the match: no borrow of `flow`
            // outlives it.
            let next_read = match (gather.step(held), next_read) {
                (Step::Write, _) | (Step::WaitNextRead, None) => break,
                (Step::Yield, _) => {
                    tokio::task::yield_now().await;
                    continue;
                }
                (Step::WaitNextRead, Some(next_read)) => next_read,
            };
            let m = tokio::select! {
                biased;
                m = self.rx.recv() => Some(m),
                () = next_read => None,
            };
            match m {
                Some(Some(m)) => self.urgent |= self.take(m),
                Some(None) => self.closing = true,
                None => {}
            }
        }
    }

    /// Put in the batch what is ready: messages first, then output.
    /// (The messages are looked at once per call, not once per output
    /// item: a message that comes meanwhile is taken on the next call,
    /// before any more output.)
    fn gather_ready(&mut self) {
        let room = |b: &Batch| b.len() < 256 * 1024 && b.chunks() < 512;
        while !self.closing && room(&self.batch) {
            match self.rx.try_recv() {
                Ok(m) => self.urgent |= self.take(m),
                Err(TryRecvError::Disconnected) => self.closing = true,
                Err(TryRecvError::Empty) => break,
            }
        }
        if self.closing {
            return;
        }
        if let Some((_, q)) = self.session.as_mut() {
            while room(&self.batch) {
                let Some(o) = q.try_next() else { break };
                queue_output(&mut self.inflight, &mut self.batch, o);
            }
        }
    }

    /// Write the batch, and account for its output. Break: the write
    /// failed (or was abandoned); the writer stops.
    async fn write(&mut self) -> ControlFlow<()> {
        let mut progress = 0usize;
        let r = tokio::select! {
            r = self.batch.write_counted(&mut self.w, &mut progress) => r,
            () = self.rx.stopped() => Err(std::io::Error::other("abandoned")),
        };
        if let Err(e) = r {
            debug!(error = %e, "write to client failed");
            self.write_failed(progress);
            self.batch = Batch::new();
            return ControlFlow::Break(());
        }
        if let Some((s, q)) = self.session.as_mut() {
            s.write_done(&mut self.inflight, q, WriteOutcome::Done, 0);
            self.unread = unread_in_kernel(&self.w);
        }
        self.inflight.clear();
        ControlFlow::Continue(())
    }

    /// A byte the kernel took is never sent again: what was handed over
    /// went to this shim (or is lost with its socket); only the rest goes
    /// back in front, for the next.
    fn write_failed(&mut self, progress: usize) {
        let Some((s, q)) = self.session.as_mut() else {
            return;
        };
        let lost = s.write_done(
            &mut self.inflight,
            q,
            WriteOutcome::Failed { progress },
            self.unread,
        );
        if lost > 0 {
            info!(
                token = %crate::redact::Token(&s.token),
                up_to_bytes = lost,
                "a shim's connection failed with output unread in its socket; that output is lost"
            );
        }
    }

    /// Returns whether `m` put a frame other than output in the batch.
    fn take(&mut self, m: ToWriter) -> bool {
        match m {
            ToWriter::Frame(f) => {
                push_frame(&mut self.batch, f.header(), f.payload);
                return true;
            }
            ToWriter::Attach(s) => {
                if let Some(q) = s.take_queue() {
                    self.session = Some((s, q));
                } else {
                    warn!(token = %crate::redact::Token(&s.token), "session output queue is held elsewhere");
                }
            }
            ToWriter::Drain => self.drain = true,
        }
        false
    }
}

fn push_frame(batch: &mut Batch, h: Header, payload: Bytes) {
    batch.push_frame(&h.to_bytes(), payload);
}

fn push_output(batch: &mut Batch, o: &Output) {
    // Output of a stream (the hot path): its payload copied or referenced
    // from where it is, no reference counted per message.
    let stream = match o.live() {
        Output::Stdout(b) => Some((Stream::Stdout, b)),
        Output::Stderr(b) => Some((Stream::Stderr, b)),
        _ => None,
    };
    if let Some((s, b)) = stream {
        let h = Header::new(FrameKind::Stream(s), b.len() as u32);
        batch.push_frame_ref(&h.to_bytes(), b);
    } else if let Some((h, payload)) = crate::rules::output::frame_of(o) {
        push_frame(batch, h, payload);
    }
}

/// Put `o`'s frame in the batch, and account for it in `inflight`.
fn queue_output(inflight: &mut Inflight, batch: &mut Batch, o: Output) {
    let at = batch.len();
    push_output(batch, &o);
    inflight.push(at, o);
}

/// Bytes written to `w` that its reader has not read yet (SIOCOUTQ).
fn unread_in_kernel(w: &OwnedWriteHalf) -> usize {
    use std::os::fd::AsRawFd;
    let fd = w.as_ref().as_raw_fd();
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) on a socket stores one c_int through the
    // pointer, which points at a live local; `fd` stays open for the call
    // (the write half is borrowed).
    let r = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) };
    if r == 0 {
        usize::try_from(n).unwrap_or(0)
    } else {
        0
    }
}
