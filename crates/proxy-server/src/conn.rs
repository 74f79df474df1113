//! One client connection: a reader that decodes frames and feeds them to
//! the connection's rules ([`crate::rules::client`]), carrying out what
//! they decide, and a writer that sends responses and, once the connection is a
//! shim, its session's output.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use proxy_proto::hyper::ctl::Code;
use proxy_proto::payload::{
    AttachVm, ConnectShim, Hyper, LogEntry, LogLevel, RegisterVm, RegisterVmResponse, Signal,
    UnregisterVm,
};
use proxy_proto::{
    Command, Decode, Frame, FrameDecoder, FrameKind, Header, Limits, RawHeader, Stream,
};
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};
use tracing::{debug, info, warn, Instrument};

use crate::registry::{ConnId, ProxyError, SignalPlan, VmId};
use crate::rules::client::{self, Action, Client, CloseReason, StdinAction};
use crate::rules::output::{Gather, Held, Inflight, Step};
use crate::server::Shared;
use crate::session::{Budget, IoFlow, Output, OutputQueue, Session, WriteOutcome};
use crate::vm::{Gone, Vm};
use crate::wire::Batch;

/// First read size on a connection; doubled while reads fill it.
const MIN_READ: usize = 4 * 1024;
/// Largest read size.
const MAX_READ: usize = 256 * 1024;

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
    /// Watches for the process's start.
    started: watch::Receiver<bool>,
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
    let (tx, rx) = mpsc::channel::<ToWriter>(64);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut writer = tokio::spawn(writer(w, rx, stop_rx).in_current_span());
    let mut c = Conn {
        shared: shared.clone(),
        id: conn,
        tx,
        rules: Client::new(client::Limits {
            frame_timeout: shared.config.frame_timeout,
            process_timeout: shared.config.process_timeout,
            session_buffer: usize::try_from(shared.config.session_buffer).unwrap_or(usize::MAX),
        }),
        shim: None,
        stdin_budget: None,
    };
    let limits = Limits {
        max_payload: shared.config.max_frame_size,
    };
    let mut dec = FrameDecoder::new(limits);
    // The read buffer is allocated only while bytes are pending: an idle
    // connection (1000 waiting shims) holds no buffer at all.
    let mut buf = BytesMut::new();
    let mut read_size = MIN_READ;
    let single_threaded = tokio::runtime::Handle::current().runtime_flavor()
        == tokio::runtime::RuntimeFlavor::CurrentThread;
    let mut shutdown = shared.shutdown.subscribe();
    let mut gone: Option<watch::Receiver<Gone>> = None;
    let mut drain = false;
    // The memory budget the read buffer holds beyond its first MIN_READ
    // bytes (a large frame, or large reads).
    let mut held: Option<OwnedSemaphorePermit> = None;
    // The timer for the rules' next deadline (a partial frame's, waiting
    // stdin's). Boxed (only connections that ever had a deadline pay for
    // one) and moved only when the deadline comes earlier than it, or when
    // it fires before anything is due, like the ctl timer: not once per
    // read.
    let mut timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    'conn: loop {
        let mut decoded = false;
        loop {
            if let Some(opcode) = client::ignored_error_flag(&buf) {
                debug!(
                    opcode,
                    "the Error flag is set on a command; ignored, as the reference does"
                );
            }
            match Decode::decode(&mut dec, &mut buf) {
                Ok(Some(frame)) => {
                    decoded = true;
                    match c.handle(frame).await {
                        Flow::Continue => {
                            if gone.is_none() {
                                gone = c.shim.as_ref().map(|s| s.vm.gone.subscribe());
                            }
                        }
                        Flow::Close => break 'conn,
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let close = c.rules.on_malformed(&buf, e);
                    c.perform(close).await;
                    break 'conn;
                }
            }
        }
        if buf.is_empty() {
            buf = BytesMut::new();
            held = None;
        }
        c.rules.partial_frame(&buf, decoded, now());
        let deadline = c.rules.poll_timeout().map(tokio::time::Instant::from_std);
        if let Some(d) = deadline {
            match &mut timer {
                None => timer = Some(Box::pin(tokio::time::sleep_until(d))),
                Some(t) if d < t.deadline() || t.is_elapsed() => t.as_mut().reset(d),
                Some(_) => {}
            }
        }
        let mut started = false;
        let mut timed_out = false;
        tokio::select! {
            r = r.readable() => {
                if let Err(e) = r {
                    debug!(error = %e, "read failed");
                    break;
                }
            }
            _ = shutdown.wait_for(|s| *s) => break,
            _ = vm_gone(&mut gone) => {
                drain = true;
                break;
            }
            r = process_start(&mut c.shim), if c.rules.waiting_for_start() => match r {
                Ok(()) => started = true,
                Err(e) => {
                    warn!(error = %e, "stdin cannot be delivered; closing");
                    break;
                }
            },
            () = poll_timer(&mut timer), if deadline.is_some() => timed_out = true,
        }
        if timed_out {
            match c.rules.handle_timeout(now()) {
                Some(close) => {
                    c.perform(close).await;
                    break;
                }
                // Fired before anything was due (a deadline moved later).
                None => {
                    if let (Some(d), Some(t)) = (c.rules.poll_timeout(), timer.as_mut()) {
                        t.as_mut().reset(tokio::time::Instant::from_std(d));
                    }
                }
            }
        }
        if started {
            match c.flush_stdin().await {
                Flow::Continue => continue,
                Flow::Close => break,
            }
        }
        // Room for what is pending: the rest of a partial frame, or more.
        let want = RawHeader::peek(&buf)
            .map(|h| (h.header_len() + h.payload_len as usize).saturating_sub(buf.len()))
            .unwrap_or(0)
            .max(read_size);
        // Beyond its first MIN_READ bytes the buffer draws from the memory
        // budget; while none is left, this peer is not read (the rest of
        // its frame waits in its socket), until its frame times out.
        let need = (buf.len() + want).saturating_sub(MIN_READ);
        let have = held.as_ref().map_or(0, |p| p.num_permits());
        if need > have {
            let more = u32::try_from(need - have).unwrap_or(u32::MAX);
            let got = match shared.budget.clone().try_acquire_many_owned(more) {
                Ok(p) => Some(p),
                Err(_) => {
                    debug!(
                        bytes = more,
                        "memory budget spent; not reading this client until some is free"
                    );
                    // Boxed: a rare wait, kept out of every connection's
                    // task.
                    let budget = shared.budget.clone();
                    let mut stop = shared.shutdown.subscribe();
                    let deadline = c.rules.poll_timeout().map(tokio::time::Instant::from_std);
                    let got = Box::pin(async move {
                        tokio::select! {
                            p = budget.acquire_many_owned(more) => Ok(p.ok()),
                            _ = stop.wait_for(|s| *s) => Err(()),
                            () = sleep_until(deadline) => Ok(None),
                        }
                    })
                    .await;
                    let Ok(got) = got else { break };
                    if got.is_none() {
                        if let Some(close) = c.rules.handle_timeout(now()) {
                            c.perform(close).await;
                        }
                        break;
                    }
                    got
                }
            };
            match (&mut held, got) {
                (Some(h), Some(p)) => h.merge(p),
                (h @ None, Some(p)) => *h = Some(p),
                (_, None) => break,
            }
        }
        buf.reserve(want);
        let room = buf.capacity() - buf.len();
        match r.try_read_buf(&mut buf) {
            Ok(0) => {
                if !buf.is_empty() {
                    debug!(left = buf.len(), "client closed mid-frame");
                }
                break;
            }
            Ok(n) => {
                if n >= read_size {
                    read_size = (read_size * 2).min(MAX_READ);
                }
                if n < room && single_threaded {
                    // A short read drained the socket: forget the
                    // readiness now rather than learn it from one more
                    // read that fails with EAGAIN (a syscall per command).
                    // Only on the single-threaded runtime: there the I/O
                    // driver cannot record a newer event between the read
                    // and this, so only readiness the read consumed is
                    // cleared; data arriving later brings a new event.
                    let _ = r.as_ref().try_io(tokio::io::Interest::READABLE, || {
                        Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
                    });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                debug!(error = %e, "read failed");
                break;
            }
        }
    }
    // Ending: the writer flushes what it was given, gives the session's
    // queue back, and only then is the token claimable again.
    c.rules.closed();
    if let Some(s) = &c.shim {
        shared.state().registry.shim_closing(conn, &s.token);
    }
    if drain {
        let _ = c.tx.send(ToWriter::Drain).await;
    }
    let Conn { tx, shim, .. } = c;
    drop(tx);
    // A peer that stopped reading cannot hold the session's queue hostage:
    // after a grace period the writer gives up and hands the queue back.
    if tokio::time::timeout(WRITER_GRACE, &mut writer)
        .await
        .is_err()
    {
        debug!("client not reading; abandoning its pending output");
        stop_tx.send_replace(true);
        let _ = writer.await;
    }
    if let Some(s) = shim {
        shared.state().registry.shim_gone(conn, &s.token);
        s.session.shim.send_replace(false);
        debug!(token = %crate::redact::Token(&s.token), "shim gone; token claimable again");
    }
    debug!("client disconnected");
}

/// The rules' clock: tokio's (paused in tests), as a std instant.
fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// Wait until the shim's process starts (forever for a connection that is
/// not a shim).
async fn process_start(shim: &mut Option<ShimRole>) -> Result<(), ProxyError> {
    match shim {
        Some(s) => s
            .started
            .wait_for(|v| *v)
            .await
            .map(|_| ())
            .map_err(|_| ProxyError::VmGone),
        None => std::future::pending().await,
    }
}

/// Await a boxed timer if there is one.
async fn poll_timer(t: &mut Option<std::pin::Pin<Box<tokio::time::Sleep>>>) {
    match t {
        Some(t) => t.as_mut().await,
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

async fn vm_gone(g: &mut Option<watch::Receiver<Gone>>) {
    match g {
        Some(g) => {
            let _ = g.wait_for(|g| *g != Gone::No).await;
        }
        None => std::future::pending().await,
    }
}

/// The driver of one connection's rules ([`Client`]): it carries out their
/// actions with the shared state (registry, VMs, memory budget) and tells
/// them the outcome.
struct Conn {
    shared: Arc<Shared>,
    id: ConnId,
    tx: mpsc::Sender<ToWriter>,
    rules: Client,
    /// The handles of the shim role the rules hold.
    shim: Option<ShimRole>,
    /// The memory budget the stdin waiting in the rules holds.
    stdin_budget: Option<OwnedSemaphorePermit>,
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
    async fn send(&self, f: Frame) {
        let _ = self.tx.send(ToWriter::Frame(f)).await;
    }

    async fn respond(&self, cmd: Command, r: Result<Bytes, ProxyError>) {
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
            let started = self
                .shim
                .as_ref()
                .is_some_and(|s| *s.session.started.borrow());
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
            Action::Stdin(s) => self.stdin(s).await,
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
            Command::Hyper => self.hyper(&payload).await,
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

    async fn hyper(&mut self, payload: &[u8]) -> Result<Bytes, ProxyError> {
        let req: Hyper = parse(Command::Hyper, payload)?;
        let client_vm = self.rules.vm_for_hyper()?;
        let (plan, vm) = {
            let mut st = self.shared.state();
            let plan = st.registry.plan_hyper(Some(client_vm), &req)?;
            let vm = st.registry.vm_handle(plan.vm).cloned();
            (plan, vm)
        };
        let token = plan.session.as_ref().map(|(t, _)| t.clone());
        let result = async {
            let vm = vm.ok_or(ProxyError::VmGone)?;
            let session = match &plan.session {
                Some((_, io_base)) => Some(vm.session(*io_base).ok_or(ProxyError::VmGone)?),
                None => None,
            };
            if let Some(s) = &session {
                let t = self.shared.config.shim_timeout;
                wait_true(&s.shim, t, || {
                    format!("the shim of token {:?} to connect", s.token)
                })
                .await?;
            }
            let reply = vm.ctl(plan.code, Bytes::from(plan.data)).await?;
            if let Some(s) = &session {
                s.started.send_replace(true);
            }
            Ok(reply)
        }
        .await;
        if let Some(t) = token {
            let mut st = self.shared.state();
            match &result {
                Ok(_) => st.registry.process_started(&t, plan.container_id.clone()),
                Err(_) => st.registry.process_start_failed(&t),
            }
        }
        if plan.code == Code::DestroyPod {
            debug!("destroypod forwarded");
        }
        result
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
        let started = *session.started.borrow();
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
        let _ = self.tx.send(ToWriter::Attach(session.clone())).await;
        session.shim.send_replace(true);
        info!(token = %crate::redact::Token(&req.token), io_base = session.io_base, "shim connected");
        self.shim = Some(ShimRole {
            token: req.token,
            vm,
            started: session.started.subscribe(),
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
        let mut rx = session.shim.subscribe();
        let _ = tokio::time::timeout(patience, rx.wait_for(|connected| !*connected)).await;
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

async fn wait_true(
    w: &watch::Sender<bool>,
    t: Duration,
    what: impl FnOnce() -> String,
) -> Result<(), ProxyError> {
    let mut rx = w.subscribe();
    let r = tokio::time::timeout(t, rx.wait_for(|v| *v))
        .await
        .map(|r| r.is_ok());
    match r {
        Ok(true) => Ok(()),
        Ok(false) => Err(ProxyError::VmGone),
        Err(_) => Err(ProxyError::Timeout {
            waited_for: what(),
            after: t,
        }),
    }
}

/// Frames and session output to the client, batched into vectored writes.
async fn writer(
    mut w: tokio::net::unix::OwnedWriteHalf,
    mut rx: mpsc::Receiver<ToWriter>,
    mut stop: watch::Receiver<bool>,
) {
    let mut session: Option<(Arc<Session>, OutputQueue)> = None;
    let mut batch = Batch::new();
    // Output items in the batch, to account for (or put back) after writing.
    let mut inflight = Inflight::default();
    // What the shim's socket held unread after the last write (SIOCOUTQ):
    // lost if the shim dies without reading it.
    let mut unread = 0usize;
    let mut closing = false;
    let mut drain = false;
    // The batch holds a frame other than output (a response): no waiting.
    let mut urgent = false;
    // The session's io flow (the corking policy's input), kept from batch
    // to batch.
    let mut flow: Option<Arc<IoFlow>> = None;
    loop {
        // Wait for something to write.
        if batch.is_empty() {
            let msg = match &mut session {
                Some((_, q)) => tokio::select! {
                    biased;
                    m = rx.recv() => Some(m),
                    o = q.next() => {
                        if let Some(o) = o {
                            queue_output(&mut inflight, &mut batch, o);
                        }
                        None
                    }
                },
                None => Some(rx.recv().await),
            };
            match msg {
                Some(Some(m)) => urgent = handle_msg(m, &mut batch, &mut session, &mut drain),
                Some(None) => closing = true,
                None => {}
            }
        }
        // Gather more without waiting, and ask the corking policy
        // (`Gather`) whether to write, to yield a turn of the scheduler,
        // or, while the agent streams, to wait for the io reader's next
        // read (see `IoFlow`).
        match (&flow, &session) {
            (Some(f), Some((s, _))) if Arc::ptr_eq(f, &s.flow) => {}
            _ => flow = session.as_ref().map(|(s, _)| s.flow.clone()),
        }
        let mut gather = Gather::new();
        loop {
            while !closing && batch.len() < 256 * 1024 && batch.chunks() < 512 {
                match rx.try_recv() {
                    Ok(m) => {
                        urgent |= handle_msg(m, &mut batch, &mut session, &mut drain);
                        continue;
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        closing = true;
                        break;
                    }
                    Err(mpsc::error::TryRecvError::Empty) => {}
                }
                match session.as_mut().and_then(|(_, q)| q.try_next()) {
                    Some(o) => queue_output(&mut inflight, &mut batch, o),
                    None => break,
                }
            }
            // Created before the flag is read: a wake-up in between is
            // not missed.
            let next_read = flow.as_ref().map(|f| f.next_read());
            let held = Held {
                len: batch.len(),
                output: !inflight.is_empty(),
                urgent,
                closing: closing || drain,
                streaming: flow.as_ref().is_some_and(|f| f.streaming()),
            };
            match gather.step(held) {
                Step::Write => break,
                Step::Yield => tokio::task::yield_now().await,
                Step::WaitNextRead => {
                    let Some(next_read) = next_read else { break };
                    tokio::select! {
                        biased;
                        m = rx.recv() => match m {
                            Some(m) => urgent |= handle_msg(m, &mut batch, &mut session, &mut drain),
                            None => closing = true,
                        },
                        () = next_read => {}
                    }
                }
            }
        }
        urgent = false;
        if drain {
            if let Some((_, q)) = session.as_mut() {
                while let Some(o) = q.try_next() {
                    queue_output(&mut inflight, &mut batch, o);
                }
            }
        }
        if !batch.is_empty() {
            let mut progress = 0usize;
            let r = tokio::select! {
                r = batch.write_counted(&mut w, &mut progress) => r,
                _ = stop.wait_for(|s| *s) => Err(std::io::Error::other("abandoned")),
            };
            if let Err(e) = r {
                debug!(error = %e, "write to client failed");
                // A byte the kernel took is never sent again: what was
                // handed over went to this shim (or is lost with its
                // socket); only the rest goes back in front, for the next.
                if let Some((s, q)) = session.as_mut() {
                    let lost =
                        s.write_done(&mut inflight, q, WriteOutcome::Failed { progress }, unread);
                    if lost > 0 {
                        info!(
                            token = %crate::redact::Token(&s.token),
                            up_to_bytes = lost,
                            "a shim's connection failed with output unread in its socket; that output is lost"
                        );
                    }
                }
                batch = Batch::new();
                break;
            }
            if let Some((s, q)) = session.as_mut() {
                s.write_done(&mut inflight, q, WriteOutcome::Done, 0);
                unread = unread_in_kernel(&w);
            }
            inflight.clear();
        }
        if closing || drain {
            break;
        }
    }
    let _ = batch;
    if let Some((s, q)) = session.take() {
        s.return_queue(q);
    }
    use tokio::io::AsyncWriteExt;
    let _ = w.shutdown().await;
}

/// Returns whether `m` put a frame other than output in the batch.
fn handle_msg(
    m: ToWriter,
    batch: &mut Batch,
    session: &mut Option<(Arc<Session>, OutputQueue)>,
    drain: &mut bool,
) -> bool {
    match m {
        ToWriter::Frame(f) => {
            push_frame(batch, f.header(), f.payload);
            return true;
        }
        ToWriter::Attach(s) => {
            if let Some(q) = s.take_queue() {
                *session = Some((s, q));
            } else {
                warn!(token = %crate::redact::Token(&s.token), "session output queue is held elsewhere");
            }
        }
        ToWriter::Drain => *drain = true,
    }
    false
}

fn push_frame(batch: &mut Batch, h: Header, payload: Bytes) {
    batch.push_small(&h.to_bytes());
    batch.push(payload);
}

fn push_output(batch: &mut Batch, o: &Output) {
    if let Some((h, payload)) = crate::rules::output::frame_of(o) {
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
fn unread_in_kernel(w: &tokio::net::unix::OwnedWriteHalf) -> usize {
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
