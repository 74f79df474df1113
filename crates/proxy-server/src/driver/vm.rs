//! A VM at run time: its ctl task (one transaction in flight, replies
//! matched in order), its io reader (demultiplexes the agent's output into
//! per-session queues) and its io writer (stdin to the agent).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use proxy_proto::hyper::ctl::{Code, CtlDecoder};
use proxy_proto::hyper::io::{IoHeader, IoMessage, IO_HEADER_LEN, MAX_IO_DATA};
use proxy_proto::hyper::MAX_MESSAGE_LEN;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, info, Instrument};

use crate::driver::queue::{Queue, TryRecvError};
use crate::driver::wire::Batch;
use crate::metrics::Metrics;
use crate::reader::MessageReader;
use crate::registry::{During, ProxyError, VmId};
use crate::rules::ctl::{CtlChannel, CtlEvent, CtlOptions, TxnId};
use crate::rules::demux::{Discarded, IdMap, IoDemux, Routed, Streaming, Wake};
use crate::session::{Budget, IoFlow, Output, Session};
use crate::timer::Deadline;

/// Read half of an agent channel.
pub type AgentRead = Box<dyn AsyncRead + Send + Unpin>;
/// Write half of an agent channel.
pub type AgentWrite = Box<dyn AsyncWrite + Send + Unpin>;
/// The ctl channel's reader (made with [`CtlChannel::decoder`]).
pub type CtlReader = MessageReader<AgentRead, CtlDecoder>;
/// The io channel's reader: its decoder is the demux.
type IoReadHalf = MessageReader<AgentRead, IoDemux<Arc<Session>>>;

/// The io reader makes room for the next read when less than this is free
/// in its buffer...
const IO_LOW_ROOM: usize = 16 * 1024;
/// ...this much.
const IO_CHUNK: usize = 64 * 1024;
/// While the agent's output is a trickle (no read fills this many bytes),
/// the io reader holds a buffer of this size only, not an [`IO_CHUNK`].
const IO_SMALL: usize = 512;
/// The ctl reader's buffer while replies are small.
pub const CTL_SMALL: usize = 256;

/// A caller waiting for its ctl transaction's result.
type CtlReply = oneshot::Sender<Result<Bytes, ProxyError>>;

/// A ctl command in the VM's queue, its reply still to come
/// ([`Vm::ctl_reply`]).
/// Resolves to the reply, or to `None` when the VM went first.
#[derive(Debug)]
pub struct CtlPending(oneshot::Receiver<Result<Bytes, ProxyError>>);

impl std::future::Future for CtlPending {
    type Output = Option<Result<Bytes, ProxyError>>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx).map(Result::ok)
    }
}

/// Largest ctl data the agent takes in one message.
pub use crate::rules::ctl::MAX_CTL_DATA;

/// Ctl requests queued in a VM's ctl channel behind the one in flight
/// (more wait in the VM's ctl queue: callers feel backpressure, not errors).
const CTL_QUEUE: usize = 64;

/// Ctl requests waiting for room in the ctl channel; more callers wait.
const CTL_WAITING: usize = 64;
/// Slots of the ctl queue kept while idle (see
/// [`crate::rules::ctl::KEEP_SLOTS`]).
const CTL_KEEP: usize = crate::rules::ctl::KEEP_SLOTS;

/// stdin messages waiting for the io writer; more callers wait.
const IO_QUEUE: usize = 256;

/// After a batch of more stdin messages than this, the io writer lets its
/// batch's lists go.
const BIG_BATCH: u64 = 16;

struct CtlRequest {
    code: Code,
    data: Bytes,
    reply: CtlReply,
}

/// stdin on its way to the agent.
#[derive(Debug)]
struct IoOut {
    header: [u8; 12],
    data: Bytes,
}

/// Why a VM went away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gone {
    /// Still here.
    No,
    /// Torn down, with the reason.
    Yes(String),
}

/// A wait for the VM's teardown, made once per task: each turn of a
/// task's loop polls it instead of subscribing to the watch again (a
/// waiter registered and removed per turn, under the watch's lock).
/// While the watch has not changed, a poll with the same waker as the
/// last is answered from the watch's version alone: polling the waiter
/// itself takes the watch's lock, and the tasks' `select!`s poll this on
/// every wake-up. Pending forever once it has completed.
pub(crate) struct GoneWait {
    /// Compared with the waiter's: whether anything was sent.
    rx: watch::Receiver<Gone>,
    fut: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
    /// The waker the waiter holds (from its last poll).
    waker: Option<std::task::Waker>,
}

impl GoneWait {
    /// Completes once `vm` is torn down (at once if it is).
    pub(crate) fn new(vm: &Vm) -> Self {
        let mut rx = vm.gone.subscribe();
        Self {
            rx: vm.gone.subscribe(),
            fut: Some(Box::pin(async move {
                // Err: the sender is gone, and with it the VM.
                let _ = rx.wait_for(|g| *g != Gone::No).await;
            })),
            waker: None,
        }
    }

    /// Until the VM is torn down (forever, after the first time).
    pub(crate) async fn wait(&mut self) {
        std::future::poll_fn(|cx| self.poll_gone(cx)).await
    }

    fn poll_gone(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        let Some(fut) = self.fut.as_mut() else {
            return std::task::Poll::Pending;
        };
        // Err: the sender is gone: poll, and let the waiter say.
        let unchanged = !self.rx.has_changed().unwrap_or(true);
        if unchanged && self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            return std::task::Poll::Pending;
        }
        match fut.as_mut().poll(cx) {
            std::task::Poll::Ready(()) => {
                self.fut = None;
                self.waker = None;
                std::task::Poll::Ready(())
            }
            std::task::Poll::Pending => {
                self.waker = Some(cx.waker().clone());
                std::task::Poll::Pending
            }
        }
    }
}

/// A registered VM's channels and sessions.
#[derive(Debug)]
pub struct Vm {
    /// Daemon-internal id.
    pub id: VmId,
    /// The container id it was registered with.
    pub container_id: String,
    /// Requests for the ctl task (inside the VM: no allocation while
    /// empty).
    ctl_q: Queue<CtlRequest>,
    /// stdin for the io writer.
    io_q: Queue<IoOut>,
    sessions: Mutex<HashMap<u64, Arc<Session>>>,
    /// Flips once, when the VM is torn down.
    pub gone: watch::Sender<Gone>,
    /// Bytes received from the agent on io.
    pub bytes_from_agent: AtomicU64,
    /// Bytes sent to the agent on io.
    pub bytes_to_agent: AtomicU64,
    /// Messages received from the agent on io.
    pub msgs_from_agent: AtomicU64,
    /// Messages sent to the agent on io.
    pub msgs_to_agent: AtomicU64,
    session_bound: usize,
    budget: Budget,
    io_flow: Arc<IoFlow>,
}

impl std::fmt::Debug for CtlRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CtlRequest")
            .field("code", &self.code)
            .field("len", &self.data.len())
            .finish()
    }
}

/// Limits and timeouts of a VM's tasks.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// Per ctl transaction.
    pub ctl_timeout: Duration,
    /// Output bytes queued per session before the io reader waits.
    pub session_bound: usize,
    /// Largest ctl or io message accepted from the agent, header included
    /// (`--max-frame-size` plus the header). Hyperstart itself reads at
    /// most [`MAX_MESSAGE_LEN`] bytes, but an agent may write more: only a
    /// message above this bound is garbage.
    pub max_agent_message: usize,
    /// The daemon's memory budget, which session queues draw from.
    pub budget: Budget,
}

impl VmOptions {
    /// The ctl channel's limits, READY awaited for `ready_timeout`.
    pub fn ctl_options(&self, ready_timeout: Duration) -> CtlOptions {
        CtlOptions {
            timeout: self.ctl_timeout,
            ready_timeout,
            max_message: self.max_agent_message,
            max_queue: CTL_QUEUE,
        }
    }

    /// The options the daemon's configuration gives.
    pub fn from_config(c: &crate::config::Config, budget: Budget) -> Self {
        let max_agent_message = agent_message_bound(c.max_frame_size);
        VmOptions {
            ctl_timeout: c.ctl_timeout,
            session_bound: session_bound(c.session_buffer, max_agent_message),
            max_agent_message,
            budget,
        }
    }
}

/// A session queue's bound as applied: `--session-buffer`, raised so that
/// one message of the largest size fits, with what its item costs beyond
/// its payload.
pub fn session_bound(session_buffer: u32, max_agent_message: usize) -> usize {
    (session_buffer as usize)
        .max(max_agent_message.saturating_add(crate::session::ITEM_COST as usize))
}

/// The largest agent message for a payload bound of `max_payload` bytes:
/// never below what hyperstart itself sends.
pub fn agent_message_bound(max_payload: u32) -> usize {
    (max_payload as usize)
        .saturating_add(IO_HEADER_LEN)
        .max(MAX_MESSAGE_LEN)
}

/// The agent's two channels, connected, READY seen.
pub struct Channels {
    /// ctl read half, with the bytes read after READY.
    pub ctl_r: CtlReader,
    /// ctl write half.
    pub ctl_w: AgentWrite,
    /// The ctl channel's rules, READY seen ([`wait_ready`]).
    pub ctl: CtlChannel,
    /// io read half.
    pub io_r: AgentRead,
    /// io write half.
    pub io_w: AgentWrite,
}

impl std::fmt::Debug for Channels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channels").finish_non_exhaustive()
    }
}

/// Wait for READY on a freshly connected ctl channel: feed `ctl` (made
/// with the READY deadline) what is read until it says READY came, or why
/// not (garbage, the channel closed or failed, the deadline passed).
/// Messages before READY (there should be none) are logged and skipped;
/// bytes read past it stay in `ctl_r` for the ctl task.
pub async fn wait_ready(ctl_r: &mut CtlReader, ctl: &mut CtlChannel) -> Result<(), ProxyError> {
    let mut timer = Deadline::new();
    loop {
        while let Some(ev) = ctl.poll_event() {
            match ev {
                CtlEvent::Ready => return Ok(()),
                CtlEvent::Broken { error } => return Err(error),
                // Nothing was submitted.
                CtlEvent::Reply { .. } => {}
            }
        }
        timer.set(ctl.poll_timeout());
        tokio::select! {
            n = ctl_r.read_more() => ctl_input(ctl, ctl_r, n),
            () = timer.fired() => ctl.handle_timeout(Instant::now().into_std()),
        }
    }
}

/// Feed `ctl` what one read of `r` brought (`read`, the read's result):
/// every whole message buffered, or the end of the channel.
fn ctl_input(ctl: &mut CtlChannel, r: &mut CtlReader, read: std::io::Result<usize>) {
    match read {
        Ok(0) => ctl.handle_closed(None),
        Ok(_) => {
            while !ctl.is_broken() {
                match r.decode_buffered() {
                    Ok(Some(m)) => ctl.handle_message(m),
                    Ok(None) => break,
                    Err(e) => ctl.handle_garbage(e),
                }
            }
        }
        Err(e) => ctl.handle_closed(Some(e)),
    }
}

/// What a VM's tasks need from the rest of the daemon.
pub trait VmEvents: Send + Sync + 'static {
    /// The VM's channels failed or closed: tear it down.
    fn vm_failed(&self, vm: VmId, reason: String);
    /// The exit code of `token`'s process arrived.
    fn process_exited(&self, vm: VmId, token: &str, code: u8);
    /// Where to count ctl round trips and agent garbage, if anywhere
    /// (asked once per task).
    fn metrics(&self) -> Option<Arc<crate::metrics::Metrics>> {
        None
    }
}

impl Vm {
    /// Start the VM's tasks on its connected channels.
    pub fn start(
        id: VmId,
        container_id: String,
        ch: Channels,
        opts: VmOptions,
        events: Arc<dyn VmEvents>,
    ) -> Arc<Vm> {
        let vm = Arc::new(Vm {
            id,
            container_id: container_id.clone(),
            ctl_q: Queue::new(CTL_WAITING).keeping(CTL_KEEP),
            io_q: Queue::new(IO_QUEUE),
            sessions: Mutex::new(HashMap::new()),
            gone: watch::channel(Gone::No).0,
            bytes_from_agent: AtomicU64::new(0),
            bytes_to_agent: AtomicU64::new(0),
            msgs_from_agent: AtomicU64::new(0),
            msgs_to_agent: AtomicU64::new(0),
            session_bound: opts.session_bound,
            budget: opts.budget.clone(),
            io_flow: Arc::default(),
        });
        let max_agent_message = opts.max_agent_message;
        let span = tracing::info_span!("vm", vm = %container_id);
        let ctl = ctl_task(vm.clone(), ch.ctl_r, ch.ctl_w, ch.ctl, events.clone());
        vm.spawn_task("ctl", &events, ctl.instrument(span.clone()));
        let reader = io_reader(vm.clone(), ch.io_r, max_agent_message, events.clone());
        vm.spawn_task("io reader", &events, reader.instrument(span.clone()));
        let writer = io_writer(vm.clone(), ch.io_w, events.clone());
        vm.spawn_task("io writer", &events, writer.instrument(span));
        vm
    }

    /// Run one of the VM's tasks. A panic in it (a bug) tears down this VM
    /// alone, with a log line, instead of leaving it half alive.
    fn spawn_task(
        self: &Arc<Self>,
        what: &'static str,
        events: &Arc<dyn VmEvents>,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        // The VM itself, not a copy of its name per task.
        let (vm, events) = (self.clone(), events.clone());
        tokio::spawn(crate::panics::CatchPanic::new(task, move |msg| {
            tracing::error!(vm = %vm.container_id, task = what, panic = %msg, "a VM task panicked; tearing the VM down");
            events.vm_failed(
                vm.id,
                format!("internal error: the VM's {what} task panicked: {msg}"),
            );
        }));
    }

    /// Create the session of a new token.
    pub fn add_session(&self, token: String, io_base: u64) -> Arc<Session> {
        let s = Session::with_budget(
            token,
            io_base,
            self.session_bound,
            self.io_flow.clone(),
            self.budget.clone(),
        );
        if let Ok(mut m) = self.sessions.lock() {
            m.insert(io_base, s.clone());
        }
        s
    }

    /// The session at `io_base`.
    pub fn session(&self, io_base: u64) -> Option<Arc<Session>> {
        self.sessions.lock().ok()?.get(&io_base).cloned()
    }

    /// Forget a session (DisconnectShim).
    pub fn remove_session(&self, io_base: u64) {
        let s = self
            .sessions
            .lock()
            .ok()
            .and_then(|mut m| m.remove(&io_base));
        if let Some(s) = s {
            s.close();
        }
    }

    /// All sessions.
    pub fn sessions(&self) -> Vec<Arc<Session>> {
        self.sessions
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Whether the VM was torn down.
    pub fn is_gone(&self) -> bool {
        *self.gone.borrow() != Gone::No
    }

    /// Tear down: stop the tasks, close every session.
    pub fn shut(&self, reason: &str) {
        let changed = self.gone.send_if_modified(|g| {
            if *g == Gone::No {
                *g = Gone::Yes(reason.to_owned());
                true
            } else {
                false
            }
        });
        if changed {
            info!(vm = %self.container_id, reason, "VM torn down");
            for s in self.sessions() {
                s.close();
            }
        }
    }

    /// One ctl transaction: send `code` with `data`, wait for ACK (its
    /// payload) or ERROR (an error carrying the agent's message).
    /// Data larger than [`MAX_CTL_DATA`] is refused
    /// ([`ProxyError::CtlTooLarge`]) and the VM stays.
    pub async fn ctl(&self, code: Code, data: Bytes) -> Result<Bytes, ProxyError> {
        let reply = self.ctl_queue(code, data).await?;
        self.ctl_reply(reply).await
    }

    /// Queue a ctl command (waiting for room in the VM's queue). Once
    /// queued it is sent and answered whether or not the reply is awaited:
    /// a reply nobody waits for is dropped, and never shifts onto the next
    /// caller's.
    pub async fn ctl_queue(&self, code: Code, data: Bytes) -> Result<CtlPending, ProxyError> {
        let (reply, rx) = oneshot::channel();
        self.ctl_q
            .send(CtlRequest { code, data, reply })
            .await
            .map_err(|_| self.gone_error())?;
        Ok(CtlPending(rx))
    }

    /// The reply to a queued ctl command ([`CtlPending`] resolved).
    pub async fn ctl_reply(&self, pending: CtlPending) -> Result<Bytes, ProxyError> {
        self.ctl_outcome(pending.await)
    }

    /// What a resolved [`CtlPending`] means: its reply, or the VM's end.
    pub fn ctl_outcome(&self, r: Option<Result<Bytes, ProxyError>>) -> Result<Bytes, ProxyError> {
        r.unwrap_or_else(|| Err(self.gone_error()))
    }

    pub(crate) fn gone_error(&self) -> ProxyError {
        ProxyError::VmTornDown {
            during: During::Idle,
            reason: self.gone_reason(),
        }
    }

    /// Why the VM was torn down (or "VM torn down" while it is not).
    pub fn gone_reason(&self) -> String {
        match &*self.gone.borrow() {
            Gone::Yes(r) => r.clone(),
            Gone::No => "VM torn down".into(),
        }
    }

    /// Forward stdin for the session at `io_base`: split into messages the
    /// agent accepts; an empty `data` is EOF (one zero-length message).
    pub async fn stdin(&self, io_base: u64, data: Bytes) -> Result<(), ProxyError> {
        if data.len() <= MAX_IO_DATA {
            return self.send_io(io_base, data).await;
        }
        // A frame longer than one message goes in copies: a queued piece
        // must not keep the whole frame's buffer (up to --max-frame-size)
        // alive once the connection has let go of it, and of its budget.
        for piece in data.chunks(MAX_IO_DATA) {
            self.send_io(io_base, Bytes::copy_from_slice(piece)).await?;
        }
        Ok(())
    }

    async fn send_io(&self, seq: u64, data: Bytes) -> Result<(), ProxyError> {
        let header = IoHeader::for_data(seq, data.len()).to_bytes();
        self.io_q
            .send(IoOut { header, data })
            .await
            .map_err(|_| self.gone_error())
    }
}

/// The ctl task: carries out what the VM's [`CtlChannel`] says. It reads
/// ctl, takes requests from the VM's ctl queue, times the transaction in
/// flight and notices the VM going; every rule is the channel's.
///
/// Everything the task keeps is in one [`CtlTask`], which the task's
/// future holds once (an `async fn` taking these arguments would hold
/// them twice, as arguments and as moved locals).
fn ctl_task(
    vm: Arc<Vm>,
    r: CtlReader,
    w: AgentWrite,
    ctl: CtlChannel,
    events: Arc<dyn VmEvents>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let metrics = events.metrics();
    let mut t = CtlTask {
        gone: GoneWait::new(&vm),
        vm,
        r,
        w,
        ctl,
        events,
        metrics,
        callers: IdMap::default(),
        timer: Deadline::new(),
    };
    async move {
        let went = t.run().await;
        t.finish(went).await;
    }
}

/// What the ctl task carries out the channel's word with. Dropped (the
/// task ended, or panicked), it closes the VM's ctl queue: callers fail
/// instead of waiting for nobody.
struct CtlTask {
    vm: Arc<Vm>,
    r: CtlReader,
    w: AgentWrite,
    ctl: CtlChannel,
    events: Arc<dyn VmEvents>,
    metrics: Option<Arc<Metrics>>,
    callers: IdMap<TxnId, CtlReply>,
    /// The reply timeout. Arming a timer for every transaction costs a
    /// timer-wheel insert and, often, a wake-up of the I/O driver (a
    /// syscall) per command; instead one timer lives as long as the task
    /// and is moved only when it would fire after the channel's deadline,
    /// or when it fired before it (the transaction it was set for has
    /// ended): so it is re-armed at most once per timeout however many
    /// commands pass.
    timer: Deadline,
    gone: GoneWait,
}

impl Drop for CtlTask {
    fn drop(&mut self) {
        self.vm.ctl_q.close_and_clear();
    }
}

impl CtlTask {
    /// Until the channel breaks or is torn down: whether the VM went for
    /// a reason of its own (not a broken channel).
    async fn run(&mut self) -> bool {
        let max_queue = self.ctl.options().max_queue;
        let mut went = false;
        loop {
            self.carry_out().await;
            if self.ctl.is_broken() {
                return went;
            }
            self.timer.set(self.ctl.poll_timeout());
            tokio::select! {
                req = self.vm.ctl_q.recv(), if self.ctl.queued() < max_queue => match req {
                    Some(req) => self.submit(req),
                    None => {
                        went = true;
                        self.ctl.teardown("no more requests");
                    }
                },
                n = self.r.read_more() => ctl_input(&mut self.ctl, &mut self.r, n),
                () = self.timer.fired() => self.ctl.handle_timeout(Instant::now().into_std()),
                () = self.gone.wait() => {
                    went = true;
                    self.ctl.teardown(&self.vm.gone_reason());
                }
            }
        }
    }

    /// Carry out what the channel says: its events, then the next request
    /// to write, until it says nothing more.
    async fn carry_out(&mut self) {
        loop {
            while let Some(ev) = self.ctl.poll_event() {
                self.event(ev);
            }
            let Some(out) = self.ctl.poll_transmit(Instant::now().into_std()) else {
                return;
            };
            if let Err(e) = self.w.write_all(&out).await {
                self.ctl.handle_write_failed(e);
            }
        }
    }

    fn event(&mut self, ev: CtlEvent) {
        match ev {
            CtlEvent::Ready => {}
            CtlEvent::Reply {
                id,
                result,
                sent_at,
                ..
            } => {
                if let (Some(m), Some(sent)) = (&self.metrics, sent_at) {
                    let took = Instant::now().into_std().saturating_duration_since(sent);
                    m.ctl_done(took, &result);
                }
                if let Some(reply) = self.callers.remove(&id) {
                    let _ = reply.send(result);
                }
                if self.callers.is_empty() && self.callers.capacity() > 4 {
                    // No transaction waits: nothing much held while idle
                    // (a table of a few, kept: freeing it and building it
                    // again cost an allocation and a rehash per command).
                    self.callers.shrink_to_fit();
                }
            }
            CtlEvent::Broken { error } => {
                if let (Some(m), ProxyError::AgentGarbage { .. }) = (&self.metrics, &error) {
                    m.error(crate::metrics::ErrorKind::AgentGarbage);
                }
                self.events.vm_failed(self.vm.id, error.to_string());
            }
        }
    }

    /// A caller's request: queued on the channel, or refused at once.
    fn submit(&mut self, req: CtlRequest) {
        match self.ctl.submit(req.code, req.data) {
            Ok(id) => {
                self.callers.insert(id, req.reply);
            }
            Err(e) => {
                let _ = req.reply.send(Err(e));
            }
        }
    }

    /// The channel broke or was torn down (`went`: for a reason of the
    /// VM's own): fail the callers still waiting in the queue.
    async fn finish(&mut self, went: bool) {
        let reason = self
            .ctl
            .broken_reason()
            .unwrap_or("VM torn down")
            .to_owned();
        if went {
            self.events.vm_failed(self.vm.id, reason.clone());
        }
        let q = &self.vm.ctl_q;
        q.close();
        while let Some(req) = q.recv().await {
            let _ = req.reply.send(Err(ProxyError::VmTornDown {
                during: During::Idle,
                reason: reason.clone(),
            }));
        }
    }
}

/// The io reader task (its state is one [`IoReader`], held once: see
/// [`ctl_task`]).
fn io_reader(
    vm: Arc<Vm>,
    r: AgentRead,
    max_message: usize,
    events: Arc<dyn VmEvents>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let demux = IoDemux::new(max_message);
    let mut io = IoReader {
        gone: GoneWait::new(&vm),
        metrics: events.metrics(),
        vm,
        events,
        reader: MessageReader::chunked(r, demux, IO_LOW_ROOM, IO_CHUNK).lazy(IO_SMALL),
        streaming: Streaming::new(),
        pause: Deadline::new(),
        run: None,
        spare: Vec::new(),
        join: Join::default(),
    };
    async move {
        let reason = io.run().await;
        // Nobody waits for io that will not come.
        let wake = io.streaming.close();
        tell(&io.vm.io_flow, &io.streaming, wake);
        io.events.vm_failed(io.vm.id, reason);
    }
}

/// The io reader: demultiplexes the agent's output into the sessions'
/// queues and tells the writers what the streaming machine says.
struct IoReader {
    vm: Arc<Vm>,
    events: Arc<dyn VmEvents>,
    metrics: Option<Arc<Metrics>>,
    /// Reads io. Its decoder, the demux, holds the routes to the sessions
    /// output went to: its own map spares the VM's shared one's lock per
    /// message.
    reader: IoReadHalf,
    streaming: Streaming,
    /// Fires the streaming machine's timeout.
    pause: Deadline,
    gone: GoneWait,
    /// Output of one read for one session, queued on it together (one
    /// take of the budget and one lock for a run of messages, not one
    /// each): (its base, the session, the items).
    run: Option<(u64, Arc<Session>, Vec<Output>)>,
    /// The last run's emptied vector, for the next.
    spare: Vec<Output>,
    /// Small output of the run's session being joined into one item.
    join: Join,
}

/// A run of output queued together holds at most this many items.
const RUN_MAX: usize = 64;

/// A read at least this long is bulk output: consecutive small messages of
/// one stream of one session in it are joined into one item (one frame to
/// the shim), so the cost per message (queueing, a frame header, a write
/// vector entry) is paid once per item. Shorter reads (interactive output)
/// keep one frame per message.
const JOIN_READ: usize = 16 * 1024;

/// Messages up to this many data bytes are joined (bigger ones are passed
/// on as they are, without a copy).
const JOIN_SMALL: usize = crate::driver::wire::COPY_MAX;

/// A joined item holds at most this many bytes: no more than one agent
/// message may, so every bound on items holds for joined ones.
const JOIN_MAX: usize = MAX_IO_DATA;

/// Room the join buffer takes at a time (the items joined in it share it,
/// as messages share the read buffer they were read into).
const JOIN_BLOCK: usize = 64 * 1024;

impl IoReader {
    /// Read and route until io ends or fails or the VM goes: why it did.
    async fn run(&mut self) -> String {
        loop {
            self.pause.set(self.streaming.poll_timeout());
            let n = tokio::select! {
                n = self.reader.read_more() => match n {
                    Ok(0) => return "the agent closed the io channel".to_string(),
                    Ok(n) => n,
                    Err(e) => return format!("reading io: {e}"),
                },
                () = self.pause.fired(), if self.streaming.is_streaming() => {
                    let wake = self.streaming.handle_timeout(Instant::now().into_std());
                    tell(&self.vm.io_flow, &self.streaming, wake);
                    continue;
                }
                () = self.gone.wait() => return "VM torn down".to_string(),
            };
            let at = Instant::now();
            self.join.read(n);
            if let Err(reason) = self.route_buffered().await {
                return reason;
            }
            self.read_done(n, at);
        }
    }

    /// Queue every whole message read on its session. Err: why reading
    /// ends (garbage, or the VM went while a queue was full).
    async fn route_buffered(&mut self) -> Result<(), String> {
        loop {
            let m = match self.reader.decode_buffered() {
                Ok(Some(m)) => m,
                Ok(None) => return self.flush_run().await,
                Err(e) => {
                    if let Some(m) = &self.metrics {
                        m.error(crate::metrics::ErrorKind::AgentGarbage);
                    }
                    // What came before the garbage is delivered.
                    self.flush_run().await?;
                    return Err(e.to_string());
                }
            };
            self.deliver(m).await?;
        }
    }

    /// Queue the run of output gathered so far on its session: all at once
    /// when its budget allows, else one item after the other (waiting for
    /// room as [`deliver`](Self::deliver) does).
    async fn flush_run(&mut self) -> Result<(), String> {
        let Some((base, session, mut items)) = self.run.take() else {
            return Ok(());
        };
        self.join.end(&mut items);
        let pushed = match session.try_push_all(&mut items) {
            Some(pushed) => pushed,
            None => {
                let mut pushed = true;
                for item in items.drain(..) {
                    if !self.push(&session, item).await? {
                        pushed = false;
                        break;
                    }
                }
                pushed
            }
        };
        if !pushed {
            self.reader.decoder_mut().forget(base);
        }
        items.clear();
        self.spare = items;
        Ok(())
    }

    /// Queue `item` on `session`, waiting for room if need be: whether the
    /// session took it (`false`: it is gone). Err: the VM went meanwhile.
    async fn push(&mut self, session: &Session, item: Output) -> Result<bool, String> {
        match session.try_push(item) {
            Ok(pushed) => Ok(pushed),
            Err(item) => {
                // Reading stops until this queue has room: writers
                // waiting for the next read must write what they hold
                // (some of it may be what makes the room).
                let wake = self.streaming.queue_full();
                tell(&self.vm.io_flow, &self.streaming, wake);
                Box::pin(push_waiting(session, item, &mut self.gone))
                    .await
                    .ok_or_else(|| "VM torn down".to_string())
            }
        }
    }

    /// Route one message: output joins the run for its session (queued
    /// with the rest of the read's, see [`flush_run`](Self::flush_run));
    /// an exit, after everything before it, is queued at once, and the
    /// session is forgotten (nothing more comes for it).
    async fn deliver(&mut self, m: IoMessage) -> Result<(), String> {
        let len = m.data.len();
        let vm = &self.vm;
        let (base, item, session) = match self
            .reader
            .decoder_mut()
            .route_to(m, |base| vm.session(base))
        {
            Routed::Deliver { base, item, to } => (base, item, to),
            Routed::Discard(d) => {
                log_discarded(d, len);
                return Ok(());
            }
        };
        // The hot path: more output for the session of the run.
        if let (Output::Stdout(_) | Output::Stderr(_), Some((_, to, items))) =
            (&item, &mut self.run)
        {
            if Arc::ptr_eq(to, session) && items.len() < RUN_MAX {
                self.join.add(item, items);
                return Ok(());
            }
        }
        let session = session.clone();
        self.flush_run().await?;
        if let Output::Exited(code) = item {
            self.events.process_exited(self.vm.id, &session.token, code);
            self.push(&session, item).await?;
            self.reader.decoder_mut().forget(base);
            return Ok(());
        }
        let mut items = std::mem::take(&mut self.spare);
        self.join.add(item, &mut items);
        self.run = Some((base, session, items));
        Ok(())
    }

    /// A read of `n` bytes at `at` is routed: count its messages, and let
    /// the streaming machine judge it.
    fn read_done(&mut self, n: usize, at: Instant) {
        let demux = self.reader.decoder_mut();
        let counts = demux.take_counts();
        if counts.bytes > 0 {
            self.vm
                .bytes_from_agent
                .fetch_add(counts.bytes, Ordering::Relaxed);
        }
        if counts.msgs > 0 {
            self.vm
                .msgs_from_agent
                .fetch_add(counts.msgs, Ordering::Relaxed);
        }
        let wake = self
            .streaming
            .read_done(n, demux.take_switches(), at.into_std());
        tell(&self.vm.io_flow, &self.streaming, wake);
    }
}

/// The io reader's joining of small output (see [`JOIN_READ`]): the
/// item being joined for the run's session, which goes after everything
/// already in the run.
#[derive(Debug, Default)]
struct Join {
    /// Whether the read being routed is a bulk one.
    bulk: bool,
    /// What is joined so far: empty when nothing is.
    buf: BytesMut,
    /// Whether `buf` holds stderr (else stdout).
    stderr: bool,
}

impl Join {
    /// A read of `n` bytes is to be routed.
    fn read(&mut self, n: usize) {
        self.bulk = n >= JOIN_READ;
        if !self.bulk && self.buf.capacity() > 0 {
            // Bulk output ended: the block is kept only by the items
            // still queued.
            self.buf = BytesMut::new();
        }
    }

    /// Add `item`, for the run's session, to the run `items`: small output
    /// of a bulk read is joined with what came before it of the same
    /// stream; anything else ends the join and goes after it.
    fn add(&mut self, item: Output, items: &mut Vec<Output>) {
        let (stderr, data) = match &item {
            Output::Stdout(d) => (false, d),
            Output::Stderr(d) => (true, d),
            _ => {
                self.end(items);
                items.push(item);
                return;
            }
        };
        if !self.bulk || data.is_empty() || data.len() > JOIN_SMALL {
            self.end(items);
            items.push(item);
            return;
        }
        if self.stderr != stderr || self.buf.len() + data.len() > JOIN_MAX {
            self.end(items);
        }
        if self.buf.is_empty() {
            self.stderr = stderr;
            // Room for a whole joined item: in the block the last items
            // share while it has that much left, else in a new one.
            if self.buf.capacity() < JOIN_MAX {
                self.buf = BytesMut::with_capacity(JOIN_BLOCK);
            }
        }
        self.buf.extend_from_slice(data);
    }

    /// What is joined, if anything, goes to the end of `items` as one item.
    fn end(&mut self, items: &mut Vec<Output>) {
        if self.buf.is_empty() {
            return;
        }
        let data = self.buf.split().freeze();
        items.push(if self.stderr {
            Output::Stderr(data)
        } else {
            Output::Stdout(data)
        });
    }
}

/// The slow path: wait for room in `session`'s queue. None: the VM went
/// first.
async fn push_waiting(session: &Session, item: Output, gone: &mut GoneWait) -> Option<bool> {
    tokio::select! {
        pushed = session.push(item) => Some(pushed),
        () = gone.wait() => None,
    }
}

fn log_discarded(d: Discarded, len: usize) {
    match d {
        Discarded::UnknownSeq { seq } => debug!(seq, len, "io for an unknown seq dropped"),
        Discarded::SeqZero => debug!(len, "io for seq 0 dropped"),
        _ => {}
    }
}

/// Tell the writers what the streaming machine says.
fn tell(flow: &IoFlow, s: &Streaming, wake: Wake) {
    flow.set_streaming(s.is_streaming());
    if wake == Wake::Writers {
        flow.wake_writers();
    }
}

/// The io writer task (its state is one [`IoWriter`], held once: see
/// [`ctl_task`]).
fn io_writer(
    vm: Arc<Vm>,
    w: AgentWrite,
    events: Arc<dyn VmEvents>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let mut t = IoWriter {
        gone: GoneWait::new(&vm),
        vm,
        w,
        events,
        batch: Batch::new(),
    };
    async move { t.run().await }
}

/// The io writer: writes the VM's queued stdin in batches. Dropped (the
/// task ended, or panicked), it closes the VM's io queue: callers fail
/// instead of waiting for nobody, and what was queued is dropped.
struct IoWriter {
    vm: Arc<Vm>,
    w: AgentWrite,
    events: Arc<dyn VmEvents>,
    batch: Batch,
    gone: GoneWait,
}

impl Drop for IoWriter {
    fn drop(&mut self) {
        self.vm.io_q.close_and_clear();
    }
}

impl IoWriter {
    async fn run(&mut self) {
        let q = &self.vm.io_q;
        loop {
            let first = tokio::select! {
                m = q.recv() => match m {
                    Some(m) => m,
                    None => return,
                },
                () = self.gone.wait() => return,
            };
            let mut n = 0u64;
            let mut msgs = 0u64;
            let mut add = |m: IoOut, batch: &mut Batch| {
                n += m.data.len() as u64;
                msgs += 1;
                batch.push_frame(&m.header, m.data);
            };
            add(first, &mut self.batch);
            while self.batch.len() < 256 * 1024 {
                match q.try_recv() {
                    Ok(m) => add(m, &mut self.batch),
                    Err(TryRecvError::Empty | TryRecvError::Closed) => break,
                }
            }
            if let Err((_, e)) = self.batch.write_all(&mut self.w).await {
                self.events
                    .vm_failed(self.vm.id, format!("writing io: {e}"));
                return;
            }
            self.vm.bytes_to_agent.fetch_add(n, Ordering::Relaxed);
            self.vm.msgs_to_agent.fetch_add(msgs, Ordering::Relaxed);
            if msgs > BIG_BATCH {
                // The batch's lists keep the capacity of its largest
                // batch (up to 1024 slices and payloads, ~48 KiB): a VM
                // that once took a burst of stdin would keep it. Small
                // batches (typing) reuse theirs.
                self.batch = Batch::new();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use proxy_proto::hyper::ctl::CtlMessage;
    use proxy_proto::hyper::io::{IoDecoder, IoMessage};
    use tokio::io::AsyncReadExt;

    /// A ctl channel past READY (the tests' agents send none).
    fn ready_ctl(opts: &VmOptions) -> CtlChannel {
        let mut ctl = CtlChannel::new(
            opts.ctl_options(Duration::from_secs(1)),
            Instant::now().into_std() + Duration::from_secs(1),
        );
        let mut b = BytesMut::new();
        CtlMessage::new(Code::Ready, Bytes::new())
            .encode(&mut b, MAX_MESSAGE_LEN)
            .unwrap();
        ctl.handle_input(&mut b);
        assert!(matches!(ctl.poll_event(), Some(CtlEvent::Ready)));
        ctl
    }
    use tokio::io::{duplex, DuplexStream};

    #[derive(Debug, Default)]
    struct Recorder {
        failed: Mutex<Vec<String>>,
        exited: Mutex<Vec<(String, u8)>>,
    }

    impl VmEvents for Recorder {
        fn vm_failed(&self, _vm: VmId, reason: String) {
            self.failed.lock().unwrap().push(reason);
        }
        fn process_exited(&self, _vm: VmId, token: &str, code: u8) {
            self.exited.lock().unwrap().push((token.to_owned(), code));
        }
    }

    struct Agent {
        ctl: DuplexStream,
        io: DuplexStream,
        ctl_buf: BytesMut,
        io_buf: BytesMut,
    }

    impl Agent {
        async fn ctl_msg(&mut self) -> CtlMessage {
            let mut dec = CtlDecoder::new(MAX_MESSAGE_LEN);
            loop {
                if let Some(m) = dec.decode(&mut self.ctl_buf).unwrap() {
                    return m;
                }
                assert!(self.ctl.read_buf(&mut self.ctl_buf).await.unwrap() > 0);
            }
        }
        async fn reply(&mut self, code: Code, payload: &[u8]) {
            let mut b = BytesMut::new();
            CtlMessage::new(code, payload.to_vec())
                .encode(&mut b, MAX_MESSAGE_LEN)
                .unwrap();
            self.ctl.write_all(&b).await.unwrap();
        }
        async fn io_msg(&mut self) -> IoMessage {
            let mut dec = IoDecoder::new(MAX_MESSAGE_LEN);
            loop {
                if let Some(m) = dec.decode(&mut self.io_buf).unwrap() {
                    return m;
                }
                assert!(self.io.read_buf(&mut self.io_buf).await.unwrap() > 0);
            }
        }
        async fn send_io(&mut self, seq: u64, data: &[u8]) {
            let mut b = BytesMut::new();
            IoMessage::new(seq, data.to_vec())
                .encode(&mut b, MAX_MESSAGE_LEN)
                .unwrap();
            self.io.write_all(&b).await.unwrap();
        }
    }

    fn vm(ctl_timeout: Duration) -> (Arc<Vm>, Agent, Arc<Recorder>) {
        let (ctl_a, ctl_p) = duplex(1 << 16);
        let (io_a, io_p) = duplex(1 << 16);
        let (ctl_r, ctl_w) = tokio::io::split(ctl_p);
        let (io_r, io_w) = tokio::io::split(io_p);
        let rec = Arc::new(Recorder::default());
        let opts = VmOptions {
            ctl_timeout,
            session_bound: 1 << 20,
            max_agent_message: agent_message_bound(4 << 20),
            budget: crate::session::budget(usize::MAX),
        };
        let ctl = ready_ctl(&opts);
        let vm = Vm::start(
            VmId(1),
            "vm".into(),
            Channels {
                ctl_r: MessageReader::new(Box::new(ctl_r) as AgentRead, ctl.decoder())
                    .lazy(CTL_SMALL),
                ctl_w: Box::new(ctl_w),
                ctl,
                io_r: Box::new(io_r),
                io_w: Box::new(io_w),
            },
            opts,
            rec.clone(),
        );
        let agent = Agent {
            ctl: ctl_a,
            io: io_a,
            ctl_buf: BytesMut::new(),
            io_buf: BytesMut::new(),
        };
        (vm, agent, rec)
    }

    #[tokio::test]
    async fn one_transaction_at_a_time_replies_in_order() {
        let (vm, mut agent, _) = vm(Duration::from_secs(5));
        let mut calls = Vec::new();
        for i in 0..5u8 {
            let vm = vm.clone();
            calls.push(tokio::spawn(async move {
                vm.ctl(Code::Ping, Bytes::from(vec![b'0' + i])).await
            }));
            tokio::task::yield_now().await;
        }
        for _ in 0..5 {
            let m = agent.ctl_msg().await;
            // The next request is not on the wire before this reply.
            assert!(agent.ctl_buf.is_empty());
            let more = tokio::time::timeout(
                Duration::from_millis(20),
                agent.ctl.read_buf(&mut agent.ctl_buf),
            )
            .await;
            assert!(more.is_err(), "a second request was sent before the reply");
            agent.reply(Code::Next, b"").await; // flow-control hint, ignored
            agent.reply(Code::Ack, &m.payload).await;
        }
        for (i, c) in calls.into_iter().enumerate() {
            assert_eq!(c.await.unwrap().unwrap(), Bytes::from(vec![b'0' + i as u8]));
        }
    }

    #[tokio::test]
    async fn callers_waiting_behind_full_ctl_queues_fail_when_the_vm_goes() {
        // More callers than the channel's queue and the VM's ctl queue
        // hold: the last ones wait for room. A teardown fails every one
        // of them with the reason; none is left waiting.
        let (vm, mut agent, _) = vm(Duration::from_secs(60));
        let n = CTL_QUEUE + CTL_WAITING + 10;
        let mut calls = Vec::new();
        for _ in 0..n {
            let vm = vm.clone();
            calls.push(tokio::spawn(async move {
                vm.ctl(Code::Ping, Bytes::new()).await
            }));
        }
        // The first request is on the wire: the rest are queued or wait.
        agent.ctl_msg().await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        vm.shut("the runtime said so");
        for c in calls {
            let e = c.await.unwrap().unwrap_err();
            assert!(
                matches!(&e, ProxyError::VmTornDown { reason, .. } if reason == "the runtime said so"),
                "{e}"
            );
        }
        // And a caller coming later fails at once.
        let e = vm.ctl(Code::Ping, Bytes::new()).await.unwrap_err();
        assert!(matches!(e, ProxyError::VmTornDown { .. }), "{e}");
    }

    // Paused: were the wake-up missed, the timeout below would fire as soon
    // as nothing else is left to run, not after ten seconds.
    #[tokio::test(start_paused = true)]
    async fn a_gone_wait_completes_once_on_teardown_and_stays_pending_after() {
        use std::task::Poll;
        let (v, _agent, _) = vm(Duration::from_secs(5));
        let mut w = GoneWait::new(&v);
        let poll = |w: &mut GoneWait| {
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            w.poll_gone(&mut cx)
        };
        // Pending, polled again and again (the fast path), until the
        // teardown: then ready, whatever polled it last.
        for _ in 0..3 {
            assert_eq!(poll(&mut w), Poll::Pending);
        }
        v.shut("gone");
        assert_eq!(poll(&mut w), Poll::Ready(()));
        assert_eq!(poll(&mut w), Poll::Pending, "it completed once");
        // Made after the teardown: ready at once.
        let mut late = GoneWait::new(&v);
        assert_eq!(poll(&mut late), Poll::Ready(()));
        // And a task waiting on it is woken (not only a poller).
        let (vm2, _agent2, _) = vm(Duration::from_secs(5));
        let mut w2 = GoneWait::new(&vm2);
        let waiting = tokio::spawn(async move { w2.wait().await });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        vm2.shut("gone");
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("woken by the teardown")
            .unwrap();
    }

    #[tokio::test]
    async fn stdin_after_the_io_writer_ended_fails_instead_of_waiting() {
        let (vm, _agent, _) = vm(Duration::from_secs(5));
        vm.shut("gone");
        // The writer ends on the teardown and closes the io queue: more
        // stdin than the queue holds must fail, not wait for nobody.
        let mut failed = false;
        for _ in 0..IO_QUEUE + 1 {
            if vm.stdin(3, Bytes::from_static(b"x")).await.is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed);
    }

    #[tokio::test]
    async fn agent_error_carries_its_message() {
        let (vm, mut agent, _) = vm(Duration::from_secs(5));
        let call = tokio::spawn({
            let vm = vm.clone();
            async move { vm.ctl(Code::StartPod, Bytes::from_static(b"{}")).await }
        });
        agent.ctl_msg().await;
        agent.reply(Code::Error, b"no such pod\n").await;
        let e = call.await.unwrap().unwrap_err();
        assert_eq!(e.to_string(), "agent error on startpod: no such pod");
        assert!(!vm.is_gone());
    }

    #[tokio::test]
    async fn a_late_reply_after_a_timeout_is_not_given_to_the_next_command() {
        let (vm, mut agent, _) = vm(Duration::from_millis(100));
        let e = vm.ctl(Code::Ping, Bytes::new()).await.unwrap_err();
        assert!(e.to_string().contains("reply to ping"), "{e}");
        agent.ctl_msg().await;
        agent.reply(Code::Ack, b"late").await;
        let call = tokio::spawn({
            let vm = vm.clone();
            async move { vm.ctl(Code::Version, Bytes::new()).await }
        });
        agent.ctl_msg().await;
        agent.reply(Code::Ack, b"v1").await;
        assert_eq!(call.await.unwrap().unwrap(), Bytes::from_static(b"v1"));
    }

    #[tokio::test(start_paused = true)]
    async fn each_transaction_gets_its_whole_timeout_however_late_it_starts() {
        // One timer serves every transaction and is moved only when it
        // fires: a command sent late in the timer's period must still get
        // its full timeout, and no more than it.
        let timeout = Duration::from_secs(10);
        let (vm, mut agent, _) = vm(timeout);
        let answered = tokio::spawn({
            let vm = vm.clone();
            async move { vm.ctl(Code::Ping, Bytes::new()).await }
        });
        agent.ctl_msg().await;
        agent.reply(Code::Ack, b"").await;
        answered.await.unwrap().unwrap();
        // 7 s into the timer's first period, a command the agent ignores.
        tokio::time::sleep(Duration::from_secs(7)).await;
        let t0 = Instant::now();
        let e = vm.ctl(Code::Version, Bytes::new()).await.unwrap_err();
        assert!(
            matches!(&e, ProxyError::Timeout { after, .. } if *after == timeout),
            "{e}"
        );
        let waited = t0.elapsed();
        assert!(
            waited >= timeout && waited < timeout + Duration::from_millis(10),
            "timed out after {waited:?}, not {timeout:?}"
        );
        // And again right away: the timer had fired, it is re-armed.
        let t1 = Instant::now();
        vm.ctl(Code::Version, Bytes::new()).await.unwrap_err();
        let waited = t1.elapsed();
        assert!(
            waited >= timeout && waited < timeout + Duration::from_millis(10),
            "the second timeout came after {waited:?}"
        );
        assert!(!vm.is_gone());
    }

    #[tokio::test]
    async fn oversized_ctl_data_is_refused_and_the_vm_stays() {
        let (vm, mut agent, _) = vm(Duration::from_secs(5));
        let e = vm
            .ctl(
                Code::NewContainer,
                Bytes::from(vec![b' '; MAX_CTL_DATA + 1]),
            )
            .await
            .unwrap_err();
        assert!(matches!(e, ProxyError::CtlTooLarge { .. }), "{e}");
        let call = tokio::spawn({
            let vm = vm.clone();
            async move { vm.ctl(Code::Ping, Bytes::new()).await }
        });
        agent.ctl_msg().await;
        agent.reply(Code::Ack, b"").await;
        call.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn agent_vanishing_mid_command_fails_it_and_the_vm() {
        let (vm, mut agent, rec) = vm(Duration::from_secs(5));
        let call = tokio::spawn({
            let vm = vm.clone();
            async move { vm.ctl(Code::Ping, Bytes::new()).await }
        });
        agent.ctl_msg().await;
        drop(agent);
        let e = call.await.unwrap().unwrap_err();
        assert!(e.to_string().contains("closed the ctl channel"), "{e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!rec.failed.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn garbage_on_ctl_fails_the_vm() {
        let (vm, mut agent, rec) = vm(Duration::from_secs(5));
        let call = tokio::spawn({
            let vm = vm.clone();
            async move { vm.ctl(Code::Ping, Bytes::new()).await }
        });
        agent.ctl_msg().await;
        // length 3 < the 8-byte header
        agent
            .ctl
            .write_all(&[0, 0, 0, 9, 0, 0, 0, 3])
            .await
            .unwrap();
        let e = call.await.unwrap().unwrap_err();
        assert!(e.to_string().contains("garbage"), "{e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(rec.failed.lock().unwrap()[0].contains("garbage"));
    }

    #[tokio::test]
    async fn stdin_is_split_at_the_agent_limit_and_eof_is_forwarded() {
        let (vm, mut agent, _) = vm(Duration::from_secs(5));
        let data: Vec<u8> = (0..25_000u32).map(|i| (i % 251) as u8).collect();
        vm.stdin(3, Bytes::from(data.clone())).await.unwrap();
        vm.stdin(3, Bytes::new()).await.unwrap();
        let mut got = Vec::new();
        for want in [MAX_IO_DATA, MAX_IO_DATA, 25_000 - 2 * MAX_IO_DATA] {
            let m = agent.io_msg().await;
            assert_eq!((m.seq, m.data.len()), (3, want));
            got.extend_from_slice(&m.data);
        }
        assert_eq!(got, data);
        let eof = agent.io_msg().await;
        assert_eq!((eof.seq, eof.data.len()), (3, 0));
    }

    #[tokio::test]
    async fn regression_queued_pieces_of_a_long_stdin_frame_do_not_keep_the_frame() {
        // The agent reads nothing yet: the pipe (64 KiB) fills, and the
        // rest of the 300 KiB frame waits in the VM's io queue. Slices of
        // the frame would keep its whole buffer (up to --max-frame-size)
        // alive there after the connection let go of it and its budget.
        let (vm, mut agent, _) = vm(Duration::from_secs(5));
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let frame = Bytes::from(data.clone());
        vm.stdin(3, frame.clone()).await.unwrap();
        assert!(frame.is_unique(), "a queued piece holds the frame's buffer");
        let mut got = Vec::new();
        while got.len() < data.len() {
            got.extend_from_slice(&agent.io_msg().await.data);
        }
        assert_eq!(got, data);
    }

    #[tokio::test]
    async fn output_is_routed_by_seq_with_eof_then_exit_code() {
        let (vm, mut agent, rec) = vm(Duration::from_secs(5));
        let s = vm.add_session("t".into(), 3);
        let other = vm.add_session("u".into(), 5);
        agent.send_io(1, b"null session").await;
        agent.send_io(3, b"out").await;
        agent.send_io(4, b"err").await;
        agent.send_io(99, b"unknown").await;
        agent.send_io(6, b"other").await;
        agent.send_io(3, b"").await;
        agent.send_io(3, &[7]).await;
        let mut q = s.take_queue().unwrap();
        assert!(matches!(q.next().await, Some(Output::Stdout(b)) if &b[..] == b"out"));
        assert!(matches!(q.next().await, Some(Output::Stderr(b)) if &b[..] == b"err"));
        assert!(matches!(q.next().await, Some(Output::Exited(7))));
        let mut oq = other.take_queue().unwrap();
        assert!(matches!(oq.next().await, Some(Output::Stderr(b)) if &b[..] == b"other"));
        assert_eq!(rec.exited.lock().unwrap()[0], ("t".to_string(), 7));
    }

    #[tokio::test]
    async fn regression_the_io_reader_lets_go_of_a_session_once_its_process_exited() {
        // A long-lived VM runs many processes: the io reader must not keep
        // every session it ever routed to.
        let (vm, mut agent, _) = vm(Duration::from_secs(5));
        let s = vm.add_session("t".into(), 3);
        agent.send_io(3, b"out").await;
        agent.send_io(3, b"").await;
        agent.send_io(3, &[0]).await;
        let mut q = s.take_queue().unwrap();
        assert!(matches!(q.next().await, Some(Output::Stdout(_))));
        assert!(matches!(q.next().await, Some(Output::Exited(0))));
        // Held by this test and the VM's session map only.
        assert_eq!(Arc::strong_count(&s), 2);
    }

    /// The io messages `msgs` (seq, data) as the agent writes them.
    fn wire_of<'a>(msgs: impl IntoIterator<Item = (u64, &'a [u8])>) -> BytesMut {
        let mut wire = BytesMut::new();
        for (seq, data) in msgs {
            IoMessage::new(seq, data.to_vec())
                .encode(&mut wire, MAX_MESSAGE_LEN)
                .unwrap();
        }
        wire
    }

    /// Everything `q` delivers up to and including the exit, as (stream,
    /// bytes) items: 'o' stdout, 'e' stderr, 'x' the exit code.
    async fn items_until_exit(q: &mut crate::session::OutputQueue) -> Vec<(char, Bytes)> {
        let mut got = Vec::new();
        loop {
            match q.next().await {
                Some(Output::Stdout(b)) => got.push(('o', b)),
                Some(Output::Stderr(b)) => got.push(('e', b)),
                Some(Output::Exited(c)) => {
                    got.push(('x', Bytes::from(vec![c])));
                    return got;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// `items` with consecutive items of one stream concatenated.
    fn streams(items: &[(char, Bytes)]) -> Vec<(char, Vec<u8>)> {
        let mut out: Vec<(char, Vec<u8>)> = Vec::new();
        for (k, b) in items {
            match out.last_mut() {
                Some((last, v)) if last == k => v.extend_from_slice(b),
                _ => out.push((*k, b.to_vec())),
            }
        }
        out
    }

    #[tokio::test]
    async fn small_messages_of_a_bulk_read_are_joined_per_stream_in_order() {
        let (vm, mut agent, _) = vm(Duration::from_secs(5));
        let s = vm.add_session("t".into(), 3);
        let other = vm.add_session("u".into(), 5);
        // One write of 70 small messages (about 35 KiB, a bulk read):
        // stdout, then stderr, a message for another session, stdout
        // again, then EOF and the exit code.
        let msg = |seq: u64, i: usize| {
            let data: Vec<u8> = (0..500).map(|j| (i * 7 + j) as u8).collect();
            (seq, data)
        };
        let mut plan: Vec<(u64, Vec<u8>)> = Vec::new();
        plan.extend((0..30).map(|i| msg(3, i)));
        plan.extend((30..35).map(|i| msg(4, i)));
        plan.push(msg(5, 99));
        plan.extend((35..69).map(|i| msg(3, i)));
        let mut wire = wire_of(plan.iter().map(|(seq, d)| (*seq, &d[..])));
        wire.extend_from_slice(&wire_of([(3, &b""[..]), (3, &[9][..])]));
        agent.io.write_all(&wire).await.unwrap();

        let mut q = s.take_queue().unwrap();
        let got = items_until_exit(&mut q).await;
        let cat = |seq: u64, range: std::ops::Range<usize>| -> Vec<u8> {
            plan.iter()
                .filter(|(s, _)| *s == seq)
                .flat_map(|(_, d)| d.clone())
                .skip(range.start * 500)
                .take(range.len() * 500)
                .collect()
        };
        assert_eq!(
            streams(&got),
            vec![
                ('o', cat(3, 0..30)),
                ('e', cat(4, 0..5)),
                ('o', cat(3, 30..64)),
                ('x', vec![9]),
            ],
            "every byte once, in order, each stream apart"
        );
        assert!(
            got.iter().all(|(_, b)| b.len() <= MAX_IO_DATA),
            "a joined item is no longer than one agent message may be: {:?}",
            got.iter().map(|(k, b)| (*k, b.len())).collect::<Vec<_>>()
        );
        // 69 messages of output came: joined, they are a handful of items
        // (one each, they would be 69).
        assert!(got.len() <= 12, "{} items", got.len());
        let mut oq = other.take_queue().unwrap();
        assert!(matches!(oq.next().await, Some(Output::Stdout(b)) if b[..] == msg(5, 99).1[..]));
    }

    #[tokio::test]
    async fn small_messages_of_a_short_read_keep_their_frames() {
        // Interactive output (a read shorter than a bulk one) is passed on
        // message by message, never held back or joined.
        let (vm, mut agent, _) = vm(Duration::from_secs(5));
        let s = vm.add_session("t".into(), 3);
        let wire = wire_of([
            (3, &b"one\n"[..]),
            (3, b"two\n"),
            (3, b"three\n"),
            (3, b""),
            (3, &[0]),
        ]);
        agent.io.write_all(&wire).await.unwrap();
        let mut q = s.take_queue().unwrap();
        let got = items_until_exit(&mut q).await;
        let got: Vec<(char, &[u8])> = got.iter().map(|(k, b)| (*k, &b[..])).collect();
        assert_eq!(
            got,
            vec![
                ('o', &b"one\n"[..]),
                ('o', b"two\n"),
                ('o', b"three\n"),
                ('x', &[0][..]),
            ]
        );
    }

    #[tokio::test]
    async fn a_one_byte_message_without_eof_is_data() {
        let (vm, mut agent, _) = vm(Duration::from_secs(5));
        let s = vm.add_session("t".into(), 3);
        agent.send_io(3, b"x").await;
        let mut q = s.take_queue().unwrap();
        assert!(matches!(q.next().await, Some(Output::Stdout(b)) if &b[..] == b"x"));
    }

    /// An io channel whose read panics: stands for any bug in a VM task.
    struct PanickingRead;

    impl AsyncRead for PanickingRead {
        fn poll_read(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            panic!("injected bug")
        }
    }

    #[tokio::test]
    async fn regression_a_panic_in_a_vm_task_tears_that_vm_down() {
        let (ctl_a, ctl_p) = duplex(1 << 16);
        let (_io_a, io_p) = duplex(1 << 16);
        let (ctl_r, ctl_w) = tokio::io::split(ctl_p);
        let (_, io_w) = tokio::io::split(io_p);
        let rec = Arc::new(Recorder::default());
        let opts = VmOptions {
            ctl_timeout: Duration::from_secs(5),
            session_bound: 1 << 20,
            max_agent_message: MAX_MESSAGE_LEN,
            budget: crate::session::budget(usize::MAX),
        };
        let ctl = ready_ctl(&opts);
        let _vm = Vm::start(
            VmId(7),
            "vm".into(),
            Channels {
                ctl_r: MessageReader::new(Box::new(ctl_r) as AgentRead, ctl.decoder())
                    .lazy(CTL_SMALL),
                ctl_w: Box::new(ctl_w),
                ctl,
                io_r: Box::new(PanickingRead),
                io_w: Box::new(io_w),
            },
            opts,
            rec.clone(),
        );
        // The reader runs (and panics) on the next turns of the scheduler.
        for _ in 0..100 {
            if !rec.failed.lock().unwrap().is_empty() {
                break;
            }
            tokio::task::yield_now().await;
        }
        let failed = rec.failed.lock().unwrap().clone();
        assert_eq!(
            failed,
            ["internal error: the VM's io reader task panicked: injected bug"]
        );
        drop(ctl_a);
    }

    #[tokio::test]
    async fn garbage_on_io_tears_the_vm_down() {
        let (vm, mut agent, rec) = vm(Duration::from_secs(5));
        // length 5 < the 12-byte header
        agent
            .io
            .write_all(&[0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 5])
            .await
            .unwrap();
        for _ in 0..100 {
            if !rec.failed.lock().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(rec.failed.lock().unwrap()[0].contains("garbage on io"));
        drop(vm);
    }
}
