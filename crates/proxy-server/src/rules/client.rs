//! One client connection's rules, sans IO (docs/PROTOCOL.md §3–§4, §10.1,
//! §10.9): what a decoded frame means for this connection, given its role;
//! where stdin that came before its process goes; when a partial frame or
//! waiting stdin has waited too long.
//!
//! [`Client`] touches no socket, task or clock: time is an input (`now`),
//! and every decision comes back as an [`Action`] for the driver
//! ([`crate::conn`]) to carry out. What needs the daemon's shared state —
//! the registry, the VMs, the memory budget — stays in the driver, which
//! tells the machine the outcome ([`Client::attached`],
//! [`Client::became_shim`], [`Client::process_started`], …).
//!
//! ```
//! use std::time::{Duration, Instant};
//! use bytes::Bytes;
//! use proxy_proto::{Frame, Stream};
//! use proxy_server::registry::VmId;
//! use proxy_server::rules::client::{Action, Client, Limits, StdinAction};
//!
//! let now = Instant::now();
//! let mut c = Client::new(Limits {
//!     frame_timeout: Duration::from_secs(10),
//!     process_timeout: Duration::from_secs(30),
//!     session_buffer: 1024,
//! });
//! c.became_shim(VmId(1), "tok".into(), 3, false).unwrap();
//! // Stdin before the process started waits for it…
//! let a = c.on_frame(Frame::stream(Stream::Stdin, &b"ls\n"[..]), now, &mut |_| true);
//! assert!(matches!(a, Action::Stdin(StdinAction::Queued)));
//! assert_eq!(c.poll_timeout(), Some(now + Duration::from_secs(30)));
//! // …and goes first once it starts.
//! assert_eq!(c.process_started().collect::<Vec<_>>(), [Bytes::from_static(b"ls\n")]);
//! ```

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proxy_proto::payload::LogEntry;
use proxy_proto::{Command, Frame, FrameError, FrameKind, RawHeader, Stream};

use crate::registry::{ProxyError, VmId};

/// The bounds one connection's rules apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `--frame-timeout`: a frame must be complete this long after its
    /// first byte came.
    pub frame_timeout: Duration,
    /// `--process-timeout`: the process must start this long after the
    /// oldest stdin waiting for it came.
    pub process_timeout: Duration,
    /// `--session-buffer`: the most stdin bytes that wait for the start.
    pub session_buffer: usize,
}

/// What the connection is to the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Nothing yet.
    Fresh,
    /// A runtime that registered or attached `vm` (its Hyper commands go
    /// there).
    Attached {
        /// The VM.
        vm: VmId,
    },
    /// The shim of `token`, the session at `io_base` of `vm`.
    Shim {
        /// The VM a RegisterVM/AttachVM on this connection named, if any
        /// (where its Hyper commands go; not necessarily `vm`).
        attached: Option<VmId>,
        /// The token's VM.
        vm: VmId,
        /// The token.
        token: String,
        /// The session's first io seq.
        io_base: u64,
        /// Whether the driver told the machine the token's process started.
        started: bool,
    },
    /// The connection closes: no frame is served any more.
    Closed,
}

/// What the driver does for one input.
#[derive(Debug)]
pub enum Action {
    /// Serve this command (the role checks that need no shared state
    /// passed): the driver parses the payload, asks the registry and
    /// responds.
    Command(Command, Bytes),
    /// Refuse the command with this error; the connection stays usable.
    ErrorResponse(Command, ProxyError),
    /// Stdin from the shim.
    Stdin(StdinAction),
    /// Write this entry to the proxy's log.
    Log(LogEntry),
    /// Send [`CloseReason::response`] if any, then close the connection.
    Close(CloseReason),
}

/// Where one stdin frame goes.
#[derive(Debug)]
pub enum StdinAction {
    /// To the agent now: the process runs and nothing waits before it.
    Forward(Bytes),
    /// It waits in the connection's queue for the start (the driver may
    /// go on reading the connection).
    Queued,
    /// The queue is full (its bound, or the memory budget): the driver
    /// stops reading the connection until the process starts, at most
    /// until `deadline` (`None`: no bound representable), then sends what
    /// [`Client::process_started`] gives, then `data`. Not started by
    /// then: the connection closes.
    WaitForStart {
        /// The stdin that did not fit.
        data: Bytes,
        /// When to give up.
        deadline: Option<Instant>,
    },
}

/// Why the connection closes.
#[derive(Debug)]
pub enum CloseReason {
    /// A frame header broke the rules of §2; nothing after it can be
    /// trusted.
    Malformed {
        /// What was wrong.
        error: FrameError,
        /// The command its header names, to address an error response.
        command: Option<Command>,
    },
    /// A frame was not complete `timeout` after its first byte (§10.9).
    Incomplete {
        /// Bytes of it that came.
        have: usize,
        /// Its length, header included, if its header came.
        frame_len: Option<usize>,
        /// `--frame-timeout`.
        timeout: Duration,
        /// The command its header names, to address an error response.
        command: Option<Command>,
    },
    /// Clients may not send this stream (stdout, stderr).
    ClientStream(Stream),
    /// Clients may only send commands and streams.
    NotClientFrame(FrameKind),
    /// Stdin from a connection that is not a shim.
    StdinNotShim,
    /// A log entry that is not the JSON §4 describes.
    InvalidLog(serde_json::Error),
    /// Stdin waited for its process longer than `--process-timeout`.
    ProcessTimeout(ProxyError),
    /// DisconnectShim: the token is freed, the connection closes (no
    /// response).
    Disconnected,
    /// An input after the connection was closed.
    Closed,
}

impl CloseReason {
    /// Whether the client sent a frame it may not (the BadFrame metric).
    pub fn bad_frame(&self) -> bool {
        matches!(
            self,
            Self::Malformed { .. } | Self::ClientStream(_) | Self::NotClientFrame(_)
        )
    }

    /// The error response to send before closing, where one can be
    /// addressed (a command header).
    pub fn response(&self) -> Option<Frame> {
        match self {
            Self::Malformed {
                error,
                command: Some(cmd),
            } => Some(Frame::error_response(
                *cmd,
                &format!("malformed frame: {error}"),
            )),
            Self::Incomplete {
                have,
                frame_len: Some(len),
                timeout,
                command: Some(cmd),
            } => Some(Frame::error_response(
                *cmd,
                &format!("incomplete frame: {have} of {len} bytes came within {timeout:?}"),
            )),
            _ => None,
        }
    }
}

/// The opcode of the command at the head of `buf` if its header carries
/// the Error flag, which is ignored on commands as the reference does
/// (§2): the driver logs it at debug level.
pub fn ignored_error_flag(buf: &[u8]) -> Option<u8> {
    RawHeader::peek(buf)
        .filter(|raw| raw.frame_type == 0 && raw.error_flag())
        .map(|raw| raw.opcode)
}

/// The command a header at the head of `buf` names, if it is a command
/// header with a known opcode (an error response can be addressed to it).
fn addressable(head: Option<&RawHeader>) -> Option<Command> {
    head.filter(|raw| raw.frame_type == 0)
        .and_then(|raw| Command::from_u8(raw.opcode))
}

fn frame_len(raw: &RawHeader) -> usize {
    raw.header_len()
        .saturating_add(usize::try_from(raw.payload_len).unwrap_or(usize::MAX))
}

/// What a frame of stdin waiting for its process counts beyond its
/// payload (its slot in the queue and its share of the buffer it was read
/// into): a flood of tiny frames, or of empty ones, is bounded in memory
/// as its bytes are (counted by payload alone, empty frames were free).
pub const STDIN_ITEM_COST: usize = 128;

/// Stdin that came before its process started.
#[derive(Debug, Default)]
struct Pending {
    data: VecDeque<Bytes>,
    /// Its payload bytes.
    bytes: usize,
    /// What it counts against `--session-buffer` and the memory budget:
    /// its bytes and [`STDIN_ITEM_COST`] per frame.
    held: usize,
    /// When the oldest of it came.
    since: Option<Instant>,
}

/// The partial frame at the head of the read buffer.
#[derive(Debug, Clone, Copy)]
struct Partial {
    /// When its first byte came (as far as the driver could tell: when a
    /// read left it unfinished).
    since: Instant,
    /// Its bytes so far.
    have: usize,
    head: Option<RawHeader>,
}

/// One client connection's rules (see the module docs).
#[derive(Debug)]
pub struct Client {
    limits: Limits,
    role: Role,
    stdin: Pending,
    partial: Option<Partial>,
}

impl Client {
    /// A new connection's rules.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            role: Role::Fresh,
            stdin: Pending::default(),
            partial: None,
        }
    }

    /// The bounds in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The connection's role.
    pub fn role(&self) -> &Role {
        &self.role
    }

    /// Whether the connection is a shim.
    pub fn is_shim(&self) -> bool {
        matches!(self.role, Role::Shim { .. })
    }

    /// The VM a RegisterVM or AttachVM on this connection named.
    pub fn attached_vm(&self) -> Option<VmId> {
        match &self.role {
            Role::Attached { vm } => Some(*vm),
            Role::Shim { attached, .. } => *attached,
            Role::Fresh | Role::Closed => None,
        }
    }

    /// Where a Hyper command goes: the attached VM, or NotAttached. (The
    /// driver asks after parsing the payload, so that an invalid payload is
    /// the error a client sees first, as before.)
    pub fn vm_for_hyper(&self) -> Result<VmId, ProxyError> {
        self.attached_vm().ok_or(ProxyError::NotAttached("Hyper"))
    }

    /// The shim's token.
    pub fn token(&self) -> Option<&str> {
        match &self.role {
            Role::Shim { token, .. } => Some(token),
            _ => None,
        }
    }

    /// Whether the shim's process is known to have started.
    pub fn process_running(&self) -> bool {
        matches!(self.role, Role::Shim { started: true, .. })
    }

    /// Whether stdin waits for the start (the driver watches for it).
    pub fn waiting_for_start(&self) -> bool {
        !self.stdin.data.is_empty()
    }

    /// Bytes of stdin waiting for the start.
    pub fn pending_bytes(&self) -> usize {
        self.stdin.bytes
    }

    /// What the stdin waiting for the start counts against
    /// `--session-buffer` and the memory budget (see [`STDIN_ITEM_COST`]).
    pub fn pending_cost(&self) -> usize {
        self.stdin.held
    }

    /// Whether stdin of `len` bytes fits in the queue that waits for the
    /// start, beside what waits there: its cost within `--session-buffer`,
    /// or, in an empty queue, its bytes (the bound always admits one frame
    /// it holds the bytes of).
    pub fn stdin_fits(&self, len: usize) -> bool {
        let bound = self.limits.session_buffer;
        let within = self
            .stdin
            .held
            .checked_add(len.saturating_add(STDIN_ITEM_COST))
            .is_some_and(|n| n <= bound);
        within || (self.stdin.data.is_empty() && len <= bound)
    }

    /// The stdin waiting for the start, oldest first.
    pub fn pending(&self) -> impl Iterator<Item = &Bytes> + '_ {
        self.stdin.data.iter()
    }

    /// One decoded frame. `budget(n)` is asked for `n` bytes of the memory
    /// budget for stdin that would wait for the start (the driver holds
    /// what it grants until [`Client::process_started`] or the close).
    pub fn on_frame(
        &mut self,
        frame: Frame,
        now: Instant,
        budget: &mut dyn FnMut(usize) -> bool,
    ) -> Action {
        if self.role == Role::Closed {
            return Action::Close(CloseReason::Closed);
        }
        match frame.kind {
            FrameKind::Command(cmd) => self.on_command(cmd, frame.payload),
            FrameKind::Stream(Stream::Stdin) => self.on_stdin(frame.payload, now, budget),
            FrameKind::Stream(Stream::Log) => {
                match serde_json::from_slice::<LogEntry>(&frame.payload) {
                    Ok(entry) => Action::Log(entry),
                    Err(e) => self.close(CloseReason::InvalidLog(e)),
                }
            }
            FrameKind::Stream(s) => self.close(CloseReason::ClientStream(s)),
            other => self.close(CloseReason::NotClientFrame(other)),
        }
    }

    fn on_command(&mut self, cmd: Command, payload: Bytes) -> Action {
        let shim = self.is_shim();
        match cmd {
            Command::ConnectShim if shim => Action::ErrorResponse(cmd, ProxyError::AlreadyAShim),
            // As the reference: an error response, and the connection
            // stays usable.
            Command::DisconnectShim if !shim => {
                Action::ErrorResponse(cmd, ProxyError::NotAShim("DisconnectShim"))
            }
            Command::Signal if !shim => Action::ErrorResponse(cmd, ProxyError::NotAShim("Signal")),
            _ => Action::Command(cmd, payload),
        }
    }

    fn on_stdin(
        &mut self,
        data: Bytes,
        now: Instant,
        budget: &mut dyn FnMut(usize) -> bool,
    ) -> Action {
        let Role::Shim { started, .. } = &self.role else {
            return self.close(CloseReason::StdinNotShim);
        };
        if *started && self.stdin.data.is_empty() {
            return Action::Stdin(StdinAction::Forward(data));
        }
        let cost = data.len().saturating_add(STDIN_ITEM_COST);
        match self.stdin_fits(data.len()) {
            true if budget(cost) => {
                self.stdin.bytes = self.stdin.bytes.saturating_add(data.len());
                self.stdin.held = self.stdin.held.saturating_add(cost);
                self.stdin.data.push_back(data);
                self.stdin.since.get_or_insert(now);
                Action::Stdin(StdinAction::Queued)
            }
            // The queue is full: back-pressure until the start, then what
            // waited goes first.
            _ => {
                let since = self.stdin.since.unwrap_or(now);
                Action::Stdin(StdinAction::WaitForStart {
                    data,
                    deadline: since.checked_add(self.limits.process_timeout),
                })
            }
        }
    }

    /// The frame at the head of the read buffer is malformed.
    pub fn on_malformed(&mut self, buf: &[u8], error: FrameError) -> Action {
        let head = RawHeader::peek(buf);
        self.close(CloseReason::Malformed {
            error,
            command: addressable(head.as_ref()),
        })
    }

    /// After decoding what a read brought: `buf` is what is left (the
    /// start of a frame, or nothing), `decoded_any` whether a frame was
    /// decoded since the last call. A partial frame's clock starts when it
    /// is first seen unfinished (or when the frame before it completed).
    pub fn partial_frame(&mut self, buf: &[u8], decoded_any: bool, now: Instant) {
        if buf.is_empty() {
            self.partial = None;
            return;
        }
        let since = match &self.partial {
            Some(p) if !decoded_any => p.since,
            _ => now,
        };
        self.partial = Some(Partial {
            since,
            have: buf.len(),
            head: RawHeader::peek(buf),
        });
    }

    /// When the partial frame times out.
    pub fn frame_deadline(&self) -> Option<Instant> {
        let p = self.partial.as_ref()?;
        p.since.checked_add(self.limits.frame_timeout)
    }

    /// When the stdin waiting for the start times out.
    pub fn stdin_deadline(&self) -> Option<Instant> {
        self.stdin
            .since
            .and_then(|t| t.checked_add(self.limits.process_timeout))
    }

    /// The next time [`Client::handle_timeout`] has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.role == Role::Closed {
            return None;
        }
        match (self.frame_deadline(), self.stdin_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Time passed: a partial frame or waiting stdin that is due closes the
    /// connection.
    pub fn handle_timeout(&mut self, now: Instant) -> Option<Action> {
        if self.role == Role::Closed {
            return None;
        }
        if self.frame_deadline().is_some_and(|d| d <= now) {
            let p = self.partial.take()?;
            return Some(self.close(CloseReason::Incomplete {
                have: p.have,
                frame_len: p.head.as_ref().map(frame_len),
                timeout: self.limits.frame_timeout,
                command: addressable(p.head.as_ref()),
            }));
        }
        if self.stdin_deadline().is_some_and(|d| d <= now) {
            let token = self.token().unwrap_or_default();
            let e = ProxyError::Timeout {
                waited_for: format!("the process of token {token:?} to start"),
                after: self.limits.process_timeout,
            };
            return Some(self.close(CloseReason::ProcessTimeout(e)));
        }
        None
    }

    /// RegisterVM or AttachVM of `vm` succeeded.
    pub fn attached(&mut self, vm: VmId) {
        match &mut self.role {
            Role::Fresh | Role::Attached { .. } => self.role = Role::Attached { vm },
            Role::Shim { attached, .. } => *attached = Some(vm),
            Role::Closed => {}
        }
    }

    /// UnregisterVM of `vm` succeeded: if it is this connection's, the
    /// connection is attached to none.
    pub fn unregistered(&mut self, vm: VmId) {
        match &mut self.role {
            Role::Attached { vm: v } if *v == vm => self.role = Role::Fresh,
            Role::Shim { attached, .. } if *attached == Some(vm) => *attached = None,
            _ => {}
        }
    }

    /// ConnectShim claimed `token`: the connection is its shim. `started`:
    /// whether its process runs already.
    pub fn became_shim(
        &mut self,
        vm: VmId,
        token: String,
        io_base: u64,
        started: bool,
    ) -> Result<(), ProxyError> {
        let attached = match &self.role {
            Role::Fresh => None,
            Role::Attached { vm } => Some(*vm),
            Role::Shim { .. } => return Err(ProxyError::AlreadyAShim),
            Role::Closed => return Err(ProxyError::VmGone),
        };
        self.role = Role::Shim {
            attached,
            vm,
            token,
            io_base,
            started,
        };
        Ok(())
    }

    /// The shim's process started: the stdin that waited for it, in order,
    /// goes to the agent first (before the frame that comes next, and
    /// before a signal that waited for the start).
    pub fn process_started(&mut self) -> std::collections::vec_deque::IntoIter<Bytes> {
        if let Role::Shim { started, .. } = &mut self.role {
            *started = true;
        }
        std::mem::take(&mut self.stdin).data.into_iter()
    }

    /// DisconnectShim freed the token: the connection closes. From a
    /// connection that is not a shim, the error response (it stays usable).
    pub fn disconnected(&mut self) -> Action {
        if self.is_shim() {
            self.close(CloseReason::Disconnected)
        } else {
            Action::ErrorResponse(
                Command::DisconnectShim,
                ProxyError::NotAShim("DisconnectShim"),
            )
        }
    }

    /// The connection closes (for `reason`, or because the driver ended
    /// it): the stdin still waiting is dropped. Returns how many bytes.
    pub fn closed(&mut self) -> usize {
        self.role = Role::Closed;
        self.partial = None;
        std::mem::take(&mut self.stdin).bytes
    }

    fn close(&mut self, reason: CloseReason) -> Action {
        self.closed();
        Action::Close(reason)
    }
}

/// What [`simulate`] saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Steps run.
    pub steps: usize,
    /// Connections opened (one more after each close).
    pub connections: usize,
    /// Connections closed, by any reason.
    pub closes: usize,
    /// Closed by a partial frame's timeout.
    pub frame_timeouts: usize,
    /// Closed by stdin's wait for its process.
    pub process_timeouts: usize,
    /// Closed by a bad frame (malformed, a stream or type clients may not
    /// send).
    pub bad_frames: usize,
    /// Error responses (the connection stayed usable).
    pub error_responses: usize,
    /// Stdin frames a shim sent.
    pub stdin_sent: usize,
    /// Of those, forwarded to the agent.
    pub stdin_forwarded: usize,
    /// Of those, that waited in the queue.
    pub stdin_queued: usize,
    /// Of those, dropped because their connection closed first.
    pub stdin_lost_on_close: usize,
    /// Times a full queue made the connection wait for the start.
    pub back_pressure: usize,
    /// The most stdin bytes that waited at once.
    pub max_pending_bytes: usize,
}

use super::rng::SplitMix64;

/// One simulated connection and the world around it.
#[derive(Debug)]
struct SimConn {
    client: Client,
    /// Whether the token's process runs (the session's view).
    world_started: bool,
    /// Stdin the machine accepted (forwarded, queued or held back), in the
    /// order the shim sent it.
    accepted: Vec<Bytes>,
    /// Stdin that went to the agent, in order.
    forwarded: Vec<Bytes>,
    /// When the partial frame's clock started, as the simulation tracks it.
    partial_since: Option<Instant>,
}

impl SimConn {
    fn new(limits: Limits, rng: &mut SplitMix64) -> Self {
        Self {
            client: Client::new(limits),
            world_started: rng.percent(30),
            accepted: Vec::new(),
            forwarded: Vec::new(),
            partial_since: None,
        }
    }

    /// What the driver does when it sees the process started.
    fn flush(&mut self) {
        let queued: Vec<Bytes> = self.client.process_started().collect();
        self.forwarded.extend(queued);
    }
}

/// Drive [`Client`] with `steps` random inputs from `seed` — valid and
/// invalid commands, stdin before and after the start, signals,
/// DisconnectShim, log entries, bad frames, partial frames, time passing,
/// the process starting, the memory budget refusing — carrying out its
/// actions as the driver does, and check after every step that:
///
/// - stdin reaches the forward list in the order it was sent, exactly once;
///   what is not forwarded is in the queue, or was dropped by a close (and
///   counted);
/// - the queue never holds more than `--session-buffer` bytes;
/// - shim-only actions (stdin, Signal, DisconnectShim) never happen for a
///   connection that is not a shim, and are refused as the rules say;
/// - a shim never becomes anything else but closed;
/// - the deadlines are what the rules say, and a partial frame that timed
///   out always closes the connection.
///
/// Deterministic: the same seed gives the same statistics.
pub fn simulate(seed: u64, steps: usize) -> Result<SimStats, String> {
    let mut rng = SplitMix64(seed);
    let limits = Limits {
        frame_timeout: Duration::from_millis(1_000 + rng.below(9_000)),
        process_timeout: Duration::from_millis(1_000 + rng.below(29_000)),
        session_buffer: usize::try_from(16 + rng.below(256)).unwrap_or(256),
    };
    let mut now = Instant::now();
    let mut stats = SimStats {
        connections: 1,
        ..SimStats::default()
    };
    let mut conn = SimConn::new(limits, &mut rng);
    let mut next_stdin: u64 = 0;
    for step in 0..steps {
        stats.steps = step + 1;
        let before = conn.client.role().clone();
        let mut closed: Option<CloseReason> = None;
        let fail = |what: String| Err(format!("seed {seed} step {step}: {what}"));
        match rng.below(100) {
            // A command.
            0..=29 => {
                let cmd = Command::ALL[usize::try_from(rng.below(7)).unwrap_or(0)];
                let payload = Bytes::from_static(if rng.percent(80) { b"{}" } else { b"{" });
                let a = conn
                    .client
                    .on_frame(Frame::command(cmd, payload), now, &mut |_| true);
                let shim = matches!(before, Role::Shim { .. });
                match a {
                    Action::ErrorResponse(c, e) => {
                        stats.error_responses += 1;
                        let ok = match (&e, c) {
                            (ProxyError::AlreadyAShim, Command::ConnectShim) => shim,
                            (
                                ProxyError::NotAShim(_),
                                Command::DisconnectShim | Command::Signal,
                            ) => !shim,
                            _ => false,
                        };
                        if !ok || c != cmd {
                            return fail(format!("{cmd:?} refused with {e:?} as {before:?}"));
                        }
                    }
                    Action::Command(c, _) => {
                        if c != cmd {
                            return fail(format!("{cmd:?} became {c:?}"));
                        }
                        match c {
                            Command::Signal | Command::DisconnectShim if !shim => {
                                return fail(format!("{c:?} served for {before:?}"));
                            }
                            Command::ConnectShim if shim => {
                                return fail("ConnectShim served for a shim".into());
                            }
                            _ => {}
                        }
                        match c {
                            Command::RegisterVm | Command::AttachVm => {
                                if rng.percent(70) {
                                    conn.client.attached(VmId(rng.below(3)));
                                } else {
                                    stats.error_responses += 1;
                                }
                            }
                            Command::UnregisterVm => {
                                if rng.percent(50) {
                                    conn.client.unregistered(VmId(rng.below(3)));
                                }
                            }
                            Command::Hyper => {
                                let attached = conn.client.attached_vm();
                                if conn.client.vm_for_hyper().ok() != attached {
                                    return fail("Hyper's VM is not the attached one".into());
                                }
                                // Some Hyper starts the token's process.
                                if rng.percent(30) {
                                    conn.world_started = true;
                                }
                            }
                            Command::ConnectShim => {
                                if rng.percent(70) {
                                    let r = conn.client.became_shim(
                                        VmId(rng.below(3)),
                                        format!("token-{}", rng.below(5)),
                                        3,
                                        conn.world_started,
                                    );
                                    if let Err(e) = r {
                                        return fail(format!("became_shim: {e:?}"));
                                    }
                                } else {
                                    stats.error_responses += 1;
                                }
                            }
                            Command::DisconnectShim => match conn.client.disconnected() {
                                Action::Close(r @ CloseReason::Disconnected) => closed = Some(r),
                                a => return fail(format!("DisconnectShim gave {a:?}")),
                            },
                            Command::Signal => {
                                // The registry's plan: before the start, a
                                // wait for it (or an exit for SIGKILL).
                                if !conn.world_started && rng.percent(50) {
                                    if rng.percent(50) {
                                        conn.world_started = true;
                                        conn.flush();
                                    } else {
                                        stats.error_responses += 1;
                                    }
                                } else if conn.world_started && conn.client.waiting_for_start() {
                                    conn.flush();
                                }
                            }
                        }
                    }
                    a => return fail(format!("{cmd:?} gave {a:?}")),
                }
            }
            // Stdin.
            30..=54 => {
                let data = if rng.percent(5) {
                    Bytes::new()
                } else {
                    let mut v = next_stdin.to_be_bytes().to_vec();
                    next_stdin = next_stdin.wrapping_add(1);
                    v.resize(8 + usize::try_from(rng.below(48)).unwrap_or(0), 0xaa);
                    Bytes::from(v)
                };
                // The driver tells the machine of a start it sees first.
                if conn.client.is_shim() && !conn.client.process_running() && conn.world_started {
                    conn.flush();
                }
                let grant = rng.percent(90);
                let a = conn.client.on_frame(
                    Frame::stream(Stream::Stdin, data.clone()),
                    now,
                    &mut |_| grant,
                );
                match a {
                    Action::Stdin(s) => {
                        if !matches!(before, Role::Shim { .. }) {
                            return fail(format!("stdin served for {before:?}"));
                        }
                        stats.stdin_sent += 1;
                        conn.accepted.push(data);
                        match s {
                            StdinAction::Forward(d) => conn.forwarded.push(d),
                            StdinAction::Queued => stats.stdin_queued += 1,
                            StdinAction::WaitForStart { data, deadline } => {
                                stats.back_pressure += 1;
                                if conn.client.stdin_fits(data.len()) && grant {
                                    return fail("stdin held back though it fits".into());
                                }
                                if rng.percent(60) {
                                    conn.world_started = true;
                                    conn.flush();
                                    conn.forwarded.push(data);
                                } else {
                                    // Not started by the deadline.
                                    if let Some(d) = deadline {
                                        now = now.max(d);
                                    }
                                    conn.client.closed();
                                    stats.process_timeouts += 1;
                                    closed = Some(CloseReason::Closed);
                                }
                            }
                        }
                    }
                    Action::Close(r @ CloseReason::StdinNotShim) => {
                        if matches!(before, Role::Shim { .. }) {
                            return fail("a shim's stdin closed it".into());
                        }
                        closed = Some(r);
                    }
                    a => return fail(format!("stdin gave {a:?}")),
                }
            }
            // A log entry.
            55..=59 => {
                let valid = rng.percent(70);
                let payload: &'static [u8] = if valid {
                    br#"{"source":"shim","level":"debug","msg":"m"}"#
                } else {
                    br#"{"source":"nobody"}"#
                };
                match conn
                    .client
                    .on_frame(Frame::stream(Stream::Log, payload), now, &mut |_| true)
                {
                    Action::Log(_) if valid => {}
                    Action::Close(r @ CloseReason::InvalidLog(_)) if !valid => closed = Some(r),
                    a => return fail(format!("log entry (valid: {valid}) gave {a:?}")),
                }
            }
            // A frame clients may not send, or a malformed one.
            60..=62 => {
                let a = match rng.below(4) {
                    0 => conn.client.on_frame(
                        Frame::stream(Stream::Stdout, Bytes::new()),
                        now,
                        &mut |_| true,
                    ),
                    1 => conn.client.on_frame(
                        Frame::response(Command::Hyper, Bytes::new()),
                        now,
                        &mut |_| true,
                    ),
                    2 => conn
                        .client
                        .on_frame(Frame::process_exited(0), now, &mut |_| true),
                    _ => {
                        let mut head = Frame::command(Command::Signal, Bytes::new())
                            .to_bytes()
                            .to_vec();
                        head[0] = 9;
                        let cut = usize::try_from(rng.below(13)).unwrap_or(0);
                        let a = conn.client.on_malformed(
                            &head[..cut],
                            FrameError::UnsupportedVersion {
                                version: 9 * 256 + 2,
                            },
                        );
                        if let Action::Close(r) = &a {
                            if r.response().is_some() != (cut == 12) {
                                return fail(format!("malformed ({cut} bytes): response {r:?}"));
                            }
                        }
                        a
                    }
                };
                match a {
                    Action::Close(r) if r.bad_frame() => {
                        stats.bad_frames += 1;
                        closed = Some(r);
                    }
                    a => return fail(format!("a bad frame gave {a:?}")),
                }
            }
            // A read that leaves a partial frame (or nothing).
            63..=77 => {
                let decoded = rng.percent(40);
                let buf = if rng.percent(25) {
                    Vec::new()
                } else {
                    let mut b = Frame::command(Command::Hyper, vec![0u8; 64])
                        .to_bytes()
                        .to_vec();
                    b.truncate(1 + usize::try_from(rng.below(70)).unwrap_or(0));
                    b
                };
                conn.client.partial_frame(&buf, decoded, now);
                conn.partial_since = match conn.partial_since {
                    _ if buf.is_empty() => None,
                    Some(t) if !decoded => Some(t),
                    _ => Some(now),
                };
                let want = conn.partial_since.map(|t| t + limits.frame_timeout);
                if conn.client.frame_deadline() != want {
                    return fail(format!(
                        "frame deadline {:?}, expected {want:?}",
                        conn.client.frame_deadline()
                    ));
                }
            }
            // The process starts (the driver's wait for it fires).
            78..=84 => {
                conn.world_started = true;
                if conn.client.waiting_for_start() {
                    conn.flush();
                }
            }
            // Time passes.
            _ => {
                now += Duration::from_millis(rng.below(12_000));
                let frame_due = conn.partial_since.map(|t| t + limits.frame_timeout <= now);
                while let Some(t) = conn.client.poll_timeout() {
                    if t > now {
                        break;
                    }
                    match conn.client.handle_timeout(now) {
                        Some(Action::Close(r @ CloseReason::Incomplete { .. })) => {
                            stats.frame_timeouts += 1;
                            closed = Some(r);
                        }
                        Some(Action::Close(r @ CloseReason::ProcessTimeout(_))) => {
                            if frame_due == Some(true) {
                                return fail("a due partial frame lost to stdin's timeout".into());
                            }
                            stats.process_timeouts += 1;
                            closed = Some(r);
                        }
                        other => return fail(format!("due at {t:?}, handle_timeout: {other:?}")),
                    }
                }
                if frame_due == Some(true)
                    && !matches!(closed, Some(CloseReason::Incomplete { .. }))
                {
                    return fail("a timed-out partial frame did not close".into());
                }
            }
        }

        // Invariants.
        let after = conn.client.role().clone();
        if matches!(before, Role::Shim { .. })
            && matches!(after, Role::Fresh | Role::Attached { .. })
        {
            return fail(format!("a shim became {after:?}"));
        }
        if closed.is_some() != (after == Role::Closed) {
            return fail(format!("closed {closed:?} but the role is {after:?}"));
        }
        let pending: Vec<Bytes> = conn.client.pending().cloned().collect();
        let pending_bytes: usize = pending.iter().map(Bytes::len).sum();
        let pending_cost = pending_bytes + pending.len() * STDIN_ITEM_COST;
        // One frame may wait whose bytes the bound holds; more only as far
        // as their cost is within it.
        if pending_bytes != conn.client.pending_bytes()
            || pending_cost != conn.client.pending_cost()
            || pending_bytes > limits.session_buffer
            || (pending.len() > 1 && pending_cost > limits.session_buffer)
        {
            return fail(format!(
                "{} frames, {pending_bytes} bytes pending (counted {}, cost {}), bound {}",
                pending.len(),
                conn.client.pending_bytes(),
                conn.client.pending_cost(),
                limits.session_buffer
            ));
        }
        stats.max_pending_bytes = stats.max_pending_bytes.max(pending_bytes);
        if !conn.accepted.starts_with(&conn.forwarded) {
            return fail("stdin forwarded out of order, twice or never sent".into());
        }
        let rest = &conn.accepted[conn.forwarded.len()..];
        if closed.is_none() && rest != &pending[..] {
            return fail(format!(
                "{} stdin frames neither forwarded nor pending ({} pending)",
                rest.len(),
                pending.len()
            ));
        }
        if !pending.is_empty() && !matches!(after, Role::Shim { started: false, .. }) {
            return fail(format!("stdin pending for {after:?}"));
        }
        let expect = match (conn.client.frame_deadline(), conn.client.stdin_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if closed.is_none() && conn.client.poll_timeout() != expect {
            return fail("poll_timeout is not the earliest deadline".into());
        }
        if let Some(_reason) = closed {
            stats.closes += 1;
            stats.stdin_forwarded += conn.forwarded.len();
            stats.stdin_lost_on_close += rest.len();
            if conn.client.poll_timeout().is_some() || conn.client.waiting_for_start() {
                return fail("a closed connection still has deadlines or stdin".into());
            }
            stats.connections += 1;
            conn = SimConn::new(limits, &mut rng);
        }
    }
    stats.stdin_forwarded += conn.forwarded.len();
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn limits() -> Limits {
        Limits {
            frame_timeout: 10 * SECOND,
            process_timeout: 30 * SECOND,
            session_buffer: 10,
        }
    }

    fn yes() -> impl FnMut(usize) -> bool {
        |_| true
    }

    fn shim(started: bool) -> Client {
        shim_with(started, limits())
    }

    /// A shim whose process has not started, with room for a few frames
    /// of stdin (`--session-buffer` 1000).
    fn roomy_shim() -> Client {
        shim_with(
            false,
            Limits {
                session_buffer: 1000,
                ..limits()
            },
        )
    }

    fn shim_with(started: bool, limits: Limits) -> Client {
        let mut c = Client::new(limits);
        c.became_shim(VmId(1), "tok".into(), 3, started).unwrap();
        c
    }

    fn stdin(b: &'static [u8]) -> Frame {
        Frame::stream(Stream::Stdin, b)
    }

    fn command(cmd: Command) -> Frame {
        Frame::command(cmd, &b"{}"[..])
    }

    #[test]
    fn commands_pass_to_the_driver() {
        let now = Instant::now();
        let mut c = Client::new(limits());
        for cmd in [
            Command::RegisterVm,
            Command::AttachVm,
            Command::UnregisterVm,
            Command::Hyper,
            Command::ConnectShim,
        ] {
            match c.on_frame(command(cmd), now, &mut yes()) {
                Action::Command(got, p) => assert_eq!((got, &p[..]), (cmd, &b"{}"[..])),
                a => panic!("{cmd:?}: {a:?}"),
            }
        }
    }

    #[test]
    fn signal_and_disconnect_from_a_non_shim_are_refused_and_the_connection_stays() {
        let now = Instant::now();
        let mut c = Client::new(limits());
        for cmd in [Command::Signal, Command::DisconnectShim] {
            match c.on_frame(command(cmd), now, &mut yes()) {
                Action::ErrorResponse(got, e) => {
                    assert_eq!(got, cmd);
                    assert!(e.to_string().starts_with("client isn't a shim"), "{e}");
                }
                a => panic!("{a:?}"),
            }
        }
        assert_eq!(c.role(), &Role::Fresh);
        assert!(matches!(
            c.disconnected(),
            Action::ErrorResponse(Command::DisconnectShim, ProxyError::NotAShim(_))
        ));
        // A shim's are served.
        let mut s = shim(true);
        assert!(matches!(
            s.on_frame(command(Command::Signal), now, &mut yes()),
            Action::Command(Command::Signal, _)
        ));
    }

    #[test]
    fn connect_shim_twice_is_already_a_shim() {
        let mut c = shim(false);
        assert!(matches!(
            c.on_frame(command(Command::ConnectShim), Instant::now(), &mut yes()),
            Action::ErrorResponse(Command::ConnectShim, ProxyError::AlreadyAShim)
        ));
        assert!(matches!(
            c.became_shim(VmId(2), "other".into(), 5, true),
            Err(ProxyError::AlreadyAShim)
        ));
        assert_eq!(c.token(), Some("tok"));
    }

    #[test]
    fn disconnect_shim_closes_after_the_driver_freed_the_token() {
        let mut c = shim(false);
        let now = Instant::now();
        c.on_frame(stdin(b"x"), now, &mut yes());
        assert!(matches!(
            c.on_frame(command(Command::DisconnectShim), now, &mut yes()),
            Action::Command(Command::DisconnectShim, _)
        ));
        assert!(matches!(
            c.disconnected(),
            Action::Close(CloseReason::Disconnected)
        ));
        assert_eq!(c.role(), &Role::Closed);
        assert!(!c.waiting_for_start());
        assert!(matches!(
            c.on_frame(stdin(b"y"), now, &mut yes()),
            Action::Close(CloseReason::Closed)
        ));
    }

    #[test]
    fn the_role_follows_register_attach_and_unregister() {
        let mut c = Client::new(limits());
        assert!(matches!(
            c.vm_for_hyper(),
            Err(ProxyError::NotAttached("Hyper"))
        ));
        c.attached(VmId(1));
        assert_eq!(c.role(), &Role::Attached { vm: VmId(1) });
        assert_eq!(c.vm_for_hyper().unwrap(), VmId(1));
        c.attached(VmId(2));
        // Another VM's unregister leaves this one.
        c.unregistered(VmId(1));
        assert_eq!(c.attached_vm(), Some(VmId(2)));
        c.unregistered(VmId(2));
        assert_eq!(c.role(), &Role::Fresh);
        // A runtime that becomes a shim keeps its VM for Hyper.
        c.attached(VmId(3));
        c.became_shim(VmId(4), "t".into(), 7, false).unwrap();
        assert_eq!(c.vm_for_hyper().unwrap(), VmId(3));
        c.unregistered(VmId(3));
        assert!(c.vm_for_hyper().is_err());
        assert!(c.is_shim(), "unregistering never ends the shim role");
    }

    #[test]
    fn stdin_from_a_non_shim_closes() {
        let mut c = Client::new(limits());
        c.attached(VmId(1));
        assert!(matches!(
            c.on_frame(stdin(b"x"), Instant::now(), &mut yes()),
            Action::Close(CloseReason::StdinNotShim)
        ));
        assert_eq!(c.role(), &Role::Closed);
    }

    #[test]
    fn stdin_of_a_running_process_is_forwarded() {
        let mut c = shim(true);
        match c.on_frame(stdin(b"abc"), Instant::now(), &mut yes()) {
            Action::Stdin(StdinAction::Forward(b)) => assert_eq!(&b[..], b"abc"),
            a => panic!("{a:?}"),
        }
        assert!(c.poll_timeout().is_none());
    }

    #[test]
    fn stdin_before_the_start_waits_and_goes_first_in_order() {
        let t0 = Instant::now();
        let mut c = roomy_shim();
        for (i, b) in [&b"a"[..], b"bc", b""].into_iter().enumerate() {
            let now = t0 + SECOND * u32::try_from(i).unwrap();
            assert!(matches!(
                c.on_frame(Frame::stream(Stream::Stdin, b), now, &mut yes()),
                Action::Stdin(StdinAction::Queued)
            ));
        }
        assert_eq!(c.pending_bytes(), 3);
        assert_eq!(c.pending_cost(), 3 + 3 * STDIN_ITEM_COST);
        // The oldest sets the deadline.
        assert_eq!(c.stdin_deadline(), Some(t0 + 30 * SECOND));
        // A signal behind it is served at once.
        assert!(matches!(
            c.on_frame(command(Command::Signal), t0, &mut yes()),
            Action::Command(Command::Signal, _)
        ));
        let got: Vec<Bytes> = c.process_started().collect();
        assert_eq!(got, [&b"a"[..], b"bc", b""]);
        assert!(c.process_running() && !c.waiting_for_start());
        assert_eq!(c.poll_timeout(), None);
        assert!(matches!(
            c.on_frame(stdin(b"d"), t0, &mut yes()),
            Action::Stdin(StdinAction::Forward(_))
        ));
    }

    #[test]
    fn regression_empty_or_tiny_stdin_frames_before_the_start_are_bounded_by_their_count_too() {
        // Counted by payload alone, empty frames were free: a client could
        // queue any number of them before its process started.
        let t0 = Instant::now();
        let mut c = roomy_shim();
        let mut queued = 0;
        let mut budget_asked = 0;
        loop {
            let mut ask = |n: usize| {
                budget_asked += n;
                true
            };
            match c.on_frame(stdin(b""), t0, &mut ask) {
                Action::Stdin(StdinAction::Queued) => queued += 1,
                Action::Stdin(StdinAction::WaitForStart { .. }) => break,
                a => panic!("{a:?}"),
            }
            assert!(queued < 100, "empty frames are never refused");
        }
        // 1000 / 128: seven frames, and the budget was asked for what
        // they count.
        assert_eq!(queued, 1000 / STDIN_ITEM_COST);
        assert_eq!(c.pending_bytes(), 0);
        assert_eq!(c.pending_cost(), queued * STDIN_ITEM_COST);
        assert_eq!(budget_asked, queued * STDIN_ITEM_COST);
        assert_eq!(
            c.process_started().count(),
            queued,
            "every one goes, in order"
        );
    }

    #[test]
    fn a_full_queue_waits_for_the_start() {
        let t0 = Instant::now();
        let mut c = shim(false);
        assert!(matches!(
            c.on_frame(stdin(b"12345678"), t0, &mut yes()),
            Action::Stdin(StdinAction::Queued)
        ));
        // Over --session-buffer (10).
        match c.on_frame(stdin(b"xyz"), t0 + SECOND, &mut yes()) {
            Action::Stdin(StdinAction::WaitForStart { data, deadline }) => {
                assert_eq!(&data[..], b"xyz");
                assert_eq!(deadline, Some(t0 + 30 * SECOND), "from the oldest stdin");
            }
            a => panic!("{a:?}"),
        }
        assert_eq!(c.pending_bytes(), 8, "the bound holds");
        // The memory budget refusing is the same back-pressure.
        let mut c = shim(false);
        match c.on_frame(stdin(b"x"), t0, &mut |_| false) {
            Action::Stdin(StdinAction::WaitForStart { deadline, .. }) => {
                assert_eq!(deadline, Some(t0 + 30 * SECOND), "from now when none waits");
            }
            a => panic!("{a:?}"),
        }
        assert!(!c.waiting_for_start());
    }

    #[test]
    fn waiting_stdin_must_see_its_process_start_in_time() {
        let t0 = Instant::now();
        let mut c = shim(false);
        c.on_frame(stdin(b"x"), t0, &mut yes());
        c.on_frame(stdin(b"y"), t0 + 20 * SECOND, &mut yes());
        assert!(c.handle_timeout(t0 + 29 * SECOND).is_none());
        match c.handle_timeout(t0 + 30 * SECOND) {
            Some(Action::Close(CloseReason::ProcessTimeout(e))) => assert_eq!(
                e.to_string(),
                ProxyError::Timeout {
                    waited_for: "the process of token \"tok\" to start".into(),
                    after: 30 * SECOND
                }
                .to_string()
            ),
            a => panic!("{a:?}"),
        }
        assert_eq!(c.role(), &Role::Closed);
    }

    #[test]
    fn log_entries_are_logged_and_invalid_ones_close() {
        let now = Instant::now();
        let mut c = Client::new(limits());
        let ok = br#"{"source":"runtime","containerId":"c","level":"info","msg":"hi"}"#;
        match c.on_frame(Frame::stream(Stream::Log, &ok[..]), now, &mut yes()) {
            Action::Log(e) => assert_eq!((e.msg.as_str(), e.container_id.as_str()), ("hi", "c")),
            a => panic!("{a:?}"),
        }
        let bad = c.on_frame(Frame::stream(Stream::Log, &b"{"[..]), now, &mut yes());
        match bad {
            Action::Close(r @ CloseReason::InvalidLog(_)) => {
                assert!(!r.bad_frame() && r.response().is_none())
            }
            a => panic!("{a:?}"),
        }
    }

    #[test]
    fn streams_notifications_and_responses_from_a_client_close_as_bad_frames() {
        let now = Instant::now();
        for f in [
            Frame::stream(Stream::Stdout, Bytes::new()),
            Frame::stream(Stream::Stderr, Bytes::new()),
            Frame::response(Command::Hyper, Bytes::new()),
            Frame::error_response(Command::Hyper, "x"),
            Frame::process_exited(1),
        ] {
            let mut c = shim(true);
            match c.on_frame(f.clone(), now, &mut yes()) {
                Action::Close(r) => assert!(r.bad_frame() && r.response().is_none(), "{f:?}"),
                a => panic!("{f:?}: {a:?}"),
            }
        }
    }

    #[test]
    fn a_malformed_command_header_gets_an_addressed_error_response() {
        let mut head = Frame::command(Command::Hyper, Bytes::new())
            .to_bytes()
            .to_vec();
        head[0] = 7;
        let e = FrameError::UnsupportedVersion { version: 0x0702 };
        let mut c = Client::new(limits());
        match c.on_malformed(&head, e) {
            Action::Close(r) => {
                assert!(r.bad_frame());
                let f = r.response().expect("a command header");
                assert_eq!(
                    f.kind,
                    FrameKind::Response {
                        command: Command::Hyper,
                        error: true
                    }
                );
                let msg = String::from_utf8_lossy(&f.payload).into_owned();
                assert!(msg.contains(&format!("malformed frame: {e}")), "{msg}");
            }
            a => panic!("{a:?}"),
        }
        // A stream header cannot be answered.
        let head = Frame::stream(Stream::Stdin, Bytes::new()).to_bytes();
        match Client::new(limits()).on_malformed(&head, e) {
            Action::Close(r) => assert!(r.response().is_none()),
            a => panic!("{a:?}"),
        }
    }

    #[test]
    fn the_error_flag_on_a_command_is_only_noticed() {
        let mut head = Frame::command(Command::Signal, Bytes::new())
            .to_bytes()
            .to_vec();
        assert_eq!(ignored_error_flag(&head), None);
        head[6] |= 0x10;
        assert_eq!(ignored_error_flag(&head), Some(Command::Signal as u8));
        assert_eq!(ignored_error_flag(&head[..11]), None);
    }

    #[test]
    fn a_partial_frame_times_out_from_its_first_unfinished_read() {
        let t0 = Instant::now();
        let mut c = Client::new(limits());
        let wire = Frame::command(Command::Hyper, vec![b'x'; 100]).to_bytes();
        c.partial_frame(&wire[..5], false, t0);
        // More of it later does not move the clock…
        c.partial_frame(&wire[..50], false, t0 + 5 * SECOND);
        assert_eq!(c.poll_timeout(), Some(t0 + 10 * SECOND));
        // …a frame completing before it does.
        c.partial_frame(&wire[..40], true, t0 + 6 * SECOND);
        assert_eq!(c.poll_timeout(), Some(t0 + 16 * SECOND));
        assert!(c.handle_timeout(t0 + 15 * SECOND).is_none());
        match c.handle_timeout(t0 + 16 * SECOND) {
            Some(Action::Close(r)) => {
                assert!(!r.bad_frame());
                let f = r.response().expect("a command header");
                let msg = String::from_utf8_lossy(&f.payload).into_owned();
                assert!(
                    msg.contains("incomplete frame: 40 of 112 bytes came within 10s"),
                    "{msg}"
                );
            }
            a => panic!("{a:?}"),
        }
        assert_eq!(c.role(), &Role::Closed);
        // Nothing buffered: no deadline, whatever came before.
        let mut c = Client::new(limits());
        c.partial_frame(&wire[..3], false, t0);
        c.partial_frame(&[], true, t0);
        assert_eq!(c.poll_timeout(), None);
        // Half a header: closed without a response.
        c.partial_frame(&wire[..3], false, t0);
        match c.handle_timeout(t0 + 10 * SECOND) {
            Some(Action::Close(r)) => assert!(r.response().is_none()),
            a => panic!("{a:?}"),
        }
    }

    #[test]
    fn the_earlier_deadline_comes_first() {
        let t0 = Instant::now();
        let mut c = shim(false);
        c.on_frame(stdin(b"x"), t0, &mut yes());
        c.partial_frame(&[0, 2], false, t0 + 25 * SECOND);
        assert_eq!(c.poll_timeout(), Some(t0 + 30 * SECOND));
        assert!(matches!(
            c.handle_timeout(t0 + 30 * SECOND),
            Some(Action::Close(CloseReason::ProcessTimeout(_)))
        ));
    }

    #[test]
    fn simulate_is_deterministic() {
        assert_eq!(simulate(7, 500), simulate(7, 500));
    }

    #[test]
    fn simulate_2000_seeds() {
        let mut total = SimStats::default();
        for seed in 0..2000 {
            let s = simulate(seed, 300).unwrap_or_else(|e| panic!("{e}"));
            total.steps += s.steps;
            total.connections += s.connections;
            total.bad_frames += s.bad_frames;
            total.max_pending_bytes = total.max_pending_bytes.max(s.max_pending_bytes);
            total.closes += s.closes;
            total.frame_timeouts += s.frame_timeouts;
            total.process_timeouts += s.process_timeouts;
            total.stdin_sent += s.stdin_sent;
            total.stdin_queued += s.stdin_queued;
            total.stdin_forwarded += s.stdin_forwarded;
            total.stdin_lost_on_close += s.stdin_lost_on_close;
            total.back_pressure += s.back_pressure;
            total.error_responses += s.error_responses;
        }
        eprintln!("2000 seeds x 300 steps: {total:?}");
        // Every path was taken.
        assert!(
            total.frame_timeouts > 0 && total.process_timeouts > 0,
            "{total:?}"
        );
        assert!(
            total.stdin_queued > 0 && total.back_pressure > 0,
            "{total:?}"
        );
        assert!(
            total.stdin_lost_on_close > 0 && total.error_responses > 0,
            "{total:?}"
        );
        assert!(total.stdin_forwarded > 0, "{total:?}");
        assert!(
            total.stdin_forwarded + total.stdin_lost_on_close <= total.stdin_sent,
            "{total:?}"
        );
    }
}
