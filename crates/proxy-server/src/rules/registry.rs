//! The proxy's rules, sans IO: which VMs exist, which token belongs to which
//! session, who may send what, what a signal turns into.
//!
//! [`Registry`] is a plain struct. Its methods take what a client asked for
//! and answer with what to do, or with the [`ProxyError`] the client gets as
//! an error response. It never touches a socket, a timer or a task: the
//! drivers in [`crate::conn`] and [`crate::vm`] own those and call in here
//! under a short, never-awaited lock. Every rule of docs/PROTOCOL.md §3 and §7
//! that does not need I/O has a unit test at the bottom of this file.

use std::collections::HashMap;

use proxy_proto::hyper::ctl::Code;
use proxy_proto::hyper::io::FIRST_IO_BASE;
use proxy_proto::hyper::relocate::{relocate, RelocateError};
use proxy_proto::hyper::types::{KillCommand, WindowSize};
use proxy_proto::payload::{
    AttachVm, Hyper, MissingField, RegisterVm, Signal, SignalError, TooManyStreams, UnregisterVm,
};

/// A VM's identity inside the daemon (container ids can be reused after an
/// unregister; this cannot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VmId(pub u64);

/// A client connection's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// SIGKILL.
pub const SIGKILL: i64 = 9;
/// SIGTERM.
pub const SIGTERM: i64 = 15;
/// SIGWINCH, and the signal range, are proxy-proto's rules.
pub use proxy_proto::payload::{MAX_IO_STREAMS, MAX_SIGNAL, SIGWINCH};

/// Why a client's command was refused. The `Display` text is what the
/// client reads in the error response's `msg`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// A required field is missing or empty.
    #[error(transparent)]
    MissingField(#[from] MissingField),
    /// The payload is not the JSON the command takes.
    #[error("{command}: invalid payload: {source}")]
    InvalidPayload {
        /// The command.
        command: &'static str,
        /// The parser's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// More tokens than the limits allow to live at once.
    #[error(
        "{asked} more tokens would pass the limit of {limit} live tokens in {scope} ({live} live)"
    )]
    TokenLimit {
        /// Tokens asked for.
        asked: u32,
        /// Tokens alive now.
        live: u32,
        /// The limit.
        limit: u32,
        /// "the proxy" or "this VM".
        scope: &'static str,
    },
    /// More tokens asked for than one request may allocate.
    #[error(transparent)]
    TooManyStreams(#[from] TooManyStreams),
    /// RegisterVM of a containerId that is registered already.
    #[error("container {0} is already registered")]
    DuplicateContainer(String),
    /// AttachVM/UnregisterVM of an unknown containerId.
    #[error("unknown container {0}")]
    UnknownContainer(String),
    /// Hyper from a client that has not registered or attached a VM.
    #[error("{0}: the client is not attached to a VM (send RegisterVM or AttachVM first)")]
    NotAttached(&'static str),
    /// The VM behind this client is gone.
    #[error("the VM of this client is gone")]
    VmGone,
    /// The VM's agent closed its channels; the VM awaits UnregisterVM.
    #[error("the agent of VM {container} is gone ({reason}); only UnregisterVM is accepted")]
    AgentGone {
        /// The VM's container id.
        container: String,
        /// Why its VM was torn down.
        reason: String,
    },
    /// Hyper with an unknown or not accepted command name.
    #[error("unknown hyperstart command {0:?}")]
    UnknownHyperCommand(String),
    /// Tokens with a command that starts no process.
    #[error("{0} does not start a process and takes no token")]
    TokensNotAccepted(Code),
    /// More than one token.
    #[error("{0} takes at most one token, got {1}")]
    TooManyTokens(Code, usize),
    /// An unknown token.
    #[error("unknown token {0:?}")]
    UnknownToken(String),
    /// A token of another VM.
    #[error("token {0:?} does not belong to this client's VM")]
    ForeignToken(String),
    /// A token already given to a process.
    #[error("token {0:?} is already used by a process")]
    TokenInUse(String),
    /// ConnectShim with a token a live shim holds.
    #[error("token {0:?} is already claimed by a connected shim")]
    TokenClaimed(String),
    /// The process data could not be relocated.
    #[error(transparent)]
    Relocate(#[from] RelocateError),
    /// A command only shims may send.
    #[error("client isn't a shim: {0} is only accepted from a shim (send ConnectShim first)")]
    NotAShim(&'static str),
    /// ConnectShim with a token whose previous shim's connection is still
    /// being closed (the caller waits for it and tries again).
    #[error("token {0:?} is being released by its previous shim")]
    TokenReleasing(String),
    /// ConnectShim on a connection that is a shim already.
    #[error("this connection is already the shim of a token")]
    AlreadyAShim,
    /// A Signal payload that breaks the rules of
    /// [`Signal::validate`]: the number's range, SIGWINCH's size.
    #[error(transparent)]
    Signal(#[from] SignalError),
    /// A signal for a process started by execcmd, which has no container id.
    #[error("signal {0} cannot be delivered: the process was started by execcmd and has no container id")]
    NoContainerToSignal(i64),
    /// A signal for a process that has exited.
    #[error("signal {0} cannot be delivered: the process has exited")]
    ProcessExited(i64),
    /// A ctl message longer than the agent accepts.
    #[error("{code} data is {len} bytes; the agent accepts at most {max} per message")]
    CtlTooLarge {
        /// The command.
        code: Code,
        /// The data length.
        len: usize,
        /// The agent's limit for data.
        max: usize,
    },
    /// More ctl commands queued for a VM than its channel holds.
    #[error("{code}: {max} ctl commands are queued for this VM already; try again later")]
    CtlQueueFull {
        /// The command.
        code: Code,
        /// The queue's bound.
        max: usize,
    },
    /// Waiting for something took too long.
    #[error("timed out after {after:?} waiting for {waited_for}")]
    Timeout {
        /// What was awaited.
        waited_for: String,
        /// For how long.
        after: std::time::Duration,
    },
    /// The agent refused the command.
    #[error("agent error on {code}: {msg}")]
    Agent {
        /// The command.
        code: Code,
        /// The agent's ERROR payload.
        msg: String,
    },
    /// The agent closed one of its channels.
    #[error("the agent closed the {channel} channel{during}")]
    AgentClosed {
        /// The channel.
        channel: Channel,
        /// What was going on.
        during: During,
    },
    /// Reading an agent channel failed.
    #[error("reading {channel}{during}: {source}")]
    AgentRead {
        /// The channel.
        channel: Channel,
        /// What was going on.
        during: During,
        /// What the socket said.
        #[source]
        source: std::io::Error,
    },
    /// Writing to an agent channel failed.
    #[error("writing {what} to {channel}: {source}")]
    AgentWrite {
        /// The channel.
        channel: Channel,
        /// What was written: a ctl command's name, or "stdin".
        what: &'static str,
        /// What the socket said.
        #[source]
        source: std::io::Error,
    },
    /// The agent sent bytes that are not its framing.
    #[error("the agent sent garbage on {channel}{during}: {source}")]
    AgentGarbage {
        /// The channel.
        channel: Channel,
        /// What was going on.
        during: During,
        /// What the decoder found.
        #[source]
        source: proxy_proto::HyperError,
    },
    /// The VM was torn down (for `reason`) while this request needed it.
    #[error("the VM is gone{during}: {reason}")]
    VmTornDown {
        /// What was going on.
        during: During,
        /// Why the VM went.
        reason: String,
    },
    /// Encoding a JSON payload failed (a bug: our own types always encode).
    #[error("encoding {what}: {source}")]
    Encode {
        /// What was encoded.
        what: &'static str,
        /// The encoder's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// An agent channel's address does not parse.
    #[error("the {channel} address is invalid: {source}")]
    AgentAddr {
        /// "ctl", "io" or "console".
        channel: &'static str,
        /// Why.
        #[source]
        source: proxy_vsock::AddrParseError,
    },
    /// An agent channel could not be dialled.
    #[error("cannot reach the agent's {channel} channel: {source}")]
    AgentDial {
        /// "ctl", "io" or "console".
        channel: &'static str,
        /// What the transport said.
        #[source]
        source: proxy_vsock::ConnectError,
    },
    /// The daemon is shutting down.
    #[error("the proxy is shutting down")]
    ShuttingDown,
}

/// How far a failure reaches: what it takes down with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// This request failed; everything else goes on.
    Request,
    /// The VM is unusable (its agent failed or it was torn down): the VM
    /// is torn down, its clients are told why.
    Vm,
    /// The daemon is stopping.
    Daemon,
}

impl ProxyError {
    /// How far this failure reaches. The drivers decide from this, never
    /// from the text, whether to tear a VM down.
    pub fn scope(&self) -> Scope {
        match self {
            ProxyError::AgentClosed { .. }
            | ProxyError::AgentRead { .. }
            | ProxyError::AgentWrite { .. }
            | ProxyError::AgentGarbage { .. }
            | ProxyError::VmTornDown { .. }
            | ProxyError::AgentGone { .. }
            | ProxyError::VmGone => Scope::Vm,
            ProxyError::ShuttingDown => Scope::Daemon,
            _ => Scope::Request,
        }
    }

    /// Whether this error, ending a ctl transaction, means the agent's
    /// channel is unusable (the VM is torn down).
    pub fn breaks_channel(&self) -> bool {
        matches!(
            self,
            ProxyError::AgentClosed { .. }
                | ProxyError::AgentRead { .. }
                | ProxyError::AgentWrite { .. }
                | ProxyError::AgentGarbage { .. }
        )
    }
}

/// One of an agent's channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// Commands and replies.
    Ctl,
    /// Process stdio.
    Io,
    /// The VM's console.
    Console,
}

impl std::fmt::Display for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Channel::Ctl => "ctl",
            Channel::Io => "io",
            Channel::Console => "console",
        })
    }
}

/// What was going on when an agent channel failed (for the message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum During {
    /// Nothing in particular.
    Idle,
    /// The daemon was waiting for READY (the agent had not sent it).
    Ready,
    /// A ctl command was waiting for its reply.
    Reply(Code),
}

impl std::fmt::Display for During {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            During::Idle => Ok(()),
            During::Ready => f.write_str(" before sending READY"),
            During::Reply(code) => write!(f, " while {code} was waiting for its reply"),
        }
    }
}

/// Where a token's process is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessState {
    /// No process was asked for yet.
    None,
    /// A newcontainer/execcmd with this token is on its way to the agent.
    Starting,
    /// The agent acknowledged the process. `container` is the newcontainer
    /// id (None for execcmd).
    Started {
        /// The container to signal.
        container: Option<String>,
    },
    /// The process exited (exit code seen on io).
    Exited,
    /// SIGKILL/SIGTERM came before the process was started: the shim was
    /// told it exited with 0.
    KilledBeforeStart,
}

/// Who holds a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// No shim: the next ConnectShim claims it.
    Free,
    /// A live shim connection holds it.
    Held(ConnId),
    /// The holding connection is closing (its reader ended); the claim is
    /// released as soon as its writer has handed the session back.
    Releasing(ConnId),
}

impl Claim {
    /// The connection holding (or releasing) the claim.
    pub fn holder(self) -> Option<ConnId> {
        match self {
            Claim::Free => None,
            Claim::Held(c) | Claim::Releasing(c) => Some(c),
        }
    }
}

/// A token and its session.
#[derive(Debug, Clone)]
pub struct TokenEntry {
    /// The VM the token was allocated on.
    pub vm: VmId,
    /// The session's stdin/stdout seq; stderr is `io_base + 1`.
    pub io_base: u64,
    /// Which shim holds it.
    pub claim: Claim,
    /// The session's process.
    pub process: ProcessState,
}

/// Where a VM is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmPhase {
    /// RegisterVM is bringing it up (dialling, waiting for READY): its
    /// container id is taken, it is not attachable yet.
    Reserved,
    /// Registered, READY seen, its agent alive: attachable.
    Live,
    /// Its agent's channels closed ([`Registry::vm_gone`]): it stays known,
    /// under its container id, until UnregisterVM, as in the reference —
    /// runtimes send `destroypod` (the agent powers the VM off) and then
    /// UnregisterVM. Holds why it went, for the clients that ask.
    AgentGone(String),
    /// UnregisterVM came: no longer attachable (its container id may be
    /// registered again); its channels live until the agent closes them.
    Unregistered,
}

#[derive(Debug)]
struct VmEntry<V> {
    container_id: String,
    phase: VmPhase,
    /// The driver's handle on the running VM (its tasks and sessions),
    /// from READY until its agent is gone.
    handle: Option<V>,
    next_io_base: u64,
    /// Its tokens in `Registry::tokens`.
    live_tokens: u32,
}

/// A newly allocated token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewToken {
    /// The token string handed to the client.
    pub token: String,
    /// Its session's io base.
    pub io_base: u64,
}

/// What to send to the agent for a Hyper command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HyperPlan {
    /// The VM.
    pub vm: VmId,
    /// The ctl code.
    pub code: Code,
    /// The (relocated) data.
    pub data: Vec<u8>,
    /// The token's session, when a process is started with one.
    pub session: Option<(String, u64)>,
    /// The new container's id (newcontainer).
    pub container_id: Option<String>,
}

/// What a Signal becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignalPlan {
    /// Tell the shim its process exited with 0, then answer success.
    ExitedBeforeStart,
    /// Wait for the process to be started, then ask again.
    WaitForStart,
    /// Send this ctl command.
    Send {
        /// winsize or killcontainer.
        code: Code,
        /// Its JSON data.
        data: Vec<u8>,
    },
}

/// What [`Registry::vm_gone`] took away.
#[derive(Debug)]
pub struct GoneVm<V> {
    /// The VM's tokens, forgotten.
    pub tokens: Vec<String>,
    /// The driver's handle, to shut the VM's tasks down.
    pub handle: Option<V>,
}

/// The proxy's state, without I/O: the single owner of every VM, token,
/// claim and process. `V` is the driver's handle on a running VM (the
/// daemon's `Arc<Vm>`; `()` in tests and the simulation), kept here so
/// that a VM is never known in one place and missing in another.
#[derive(Debug)]
pub struct Registry<V = ()> {
    vms: crate::rules::demux::IdMap<VmId, VmEntry<V>>,
    by_container: HashMap<String, VmId>,
    tokens: HashMap<String, TokenEntry>,
    next_vm: u64,
    limits: TokenLimits,
}

/// How many tokens may live at once: each is a session with its queues,
/// so their number bounds memory too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenLimits {
    /// Per VM (`--max-tokens-per-vm`).
    pub per_vm: u32,
    /// In the whole daemon (`--max-tokens`).
    pub total: u32,
}

impl Default for TokenLimits {
    fn default() -> Self {
        TokenLimits {
            per_vm: MAX_IO_STREAMS,
            total: 16384,
        }
    }
}

impl<V> Default for Registry<V> {
    fn default() -> Self {
        Registry {
            vms: Default::default(),
            by_container: HashMap::new(),
            tokens: HashMap::new(),
            next_vm: 0,
            limits: TokenLimits::default(),
        }
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty registry with these token limits.
    pub fn with_limits(limits: TokenLimits) -> Self {
        Self::with_handles(limits)
    }
}

impl<V> Registry<V> {
    /// An empty registry with these token limits, keeping handles of type
    /// `V` for running VMs.
    pub fn with_handles(limits: TokenLimits) -> Self {
        Registry {
            limits,
            ..Self::default()
        }
    }

    /// Refuse `n` more tokens for `vm` if they would pass a limit.
    fn check_token_limits(&self, vm: Option<VmId>, n: u32) -> Result<(), ProxyError> {
        let live = u32::try_from(self.tokens.len()).unwrap_or(u32::MAX);
        if live.saturating_add(n) > self.limits.total {
            return Err(ProxyError::TokenLimit {
                asked: n,
                live,
                limit: self.limits.total,
                scope: "the proxy",
            });
        }
        let on_vm = vm
            .and_then(|v| self.vms.get(&v))
            .map_or(0, |v| v.live_tokens);
        if on_vm.saturating_add(n) > self.limits.per_vm {
            return Err(ProxyError::TokenLimit {
                asked: n,
                live: on_vm,
                limit: self.limits.per_vm,
                scope: "this VM",
            });
        }
        Ok(())
    }

    /// RegisterVM: validates and reserves the container id, allocates the
    /// tokens. The VM is not attachable until [`vm_ready`](Self::vm_ready);
    /// on failure call [`remove_vm`](Self::remove_vm).
    pub fn register_vm(
        &mut self,
        req: &RegisterVm,
        mut new_token: impl FnMut() -> String,
    ) -> Result<(VmId, Vec<NewToken>), ProxyError> {
        req.validate()?;
        req.validate_streams()?;
        if self.by_container.contains_key(&req.container_id) {
            return Err(ProxyError::DuplicateContainer(req.container_id.clone()));
        }
        self.check_token_limits(None, req.num_io_streams)?;
        self.next_vm += 1;
        let vm = VmId(self.next_vm);
        self.vms.insert(
            vm,
            VmEntry {
                container_id: req.container_id.clone(),
                phase: VmPhase::Reserved,
                handle: None,
                next_io_base: FIRST_IO_BASE,
                live_tokens: 0,
            },
        );
        self.by_container.insert(req.container_id.clone(), vm);
        let tokens = self.allocate(vm, req.num_io_streams, &mut new_token);
        Ok((vm, tokens))
    }

    /// The agent sent READY and the VM runs (its driver's `handle`): it
    /// becomes attachable. `false` if it is no longer reserved (the
    /// registration was abandoned, e.g. at shutdown): the handle is given
    /// back in `Err` to be shut down.
    pub fn vm_ready(&mut self, vm: VmId, handle: V) -> Result<(), V> {
        match self.vms.get_mut(&vm) {
            Some(v) if v.phase == VmPhase::Reserved => {
                v.phase = VmPhase::Live;
                v.handle = Some(handle);
                Ok(())
            }
            _ => Err(handle),
        }
    }

    /// The driver's handle on a running VM (none once its agent is gone).
    pub fn vm_handle(&self, vm: VmId) -> Option<&V> {
        self.vms.get(&vm).and_then(|v| v.handle.as_ref())
    }

    /// The handles of every running VM.
    pub fn vm_handles(&self) -> impl Iterator<Item = (VmId, &V)> {
        self.vms
            .iter()
            .filter_map(|(id, v)| v.handle.as_ref().map(|h| (*id, h)))
    }

    /// AttachVM: allocates more tokens on a registered VM.
    pub fn attach_vm(
        &mut self,
        req: &AttachVm,
        mut new_token: impl FnMut() -> String,
    ) -> Result<(VmId, Vec<NewToken>), ProxyError> {
        req.validate()?;
        req.validate_streams()?;
        let vm = self.attachable(&req.container_id)?;
        self.check_token_limits(Some(vm), req.num_io_streams)?;
        let tokens = self.allocate(vm, req.num_io_streams, &mut new_token);
        Ok((vm, tokens))
    }

    /// UnregisterVM: the VM is no longer attachable (its container id may be
    /// registered again); its channels live until the agent closes them.
    pub fn unregister_vm(&mut self, req: &UnregisterVm) -> Result<VmId, ProxyError> {
        req.validate()?;
        let vm = match self.by_container.get(&req.container_id) {
            Some(vm)
                if self
                    .vms
                    .get(vm)
                    .is_some_and(|v| matches!(v.phase, VmPhase::Live | VmPhase::AgentGone(_))) =>
            {
                *vm
            }
            _ => return Err(ProxyError::UnknownContainer(req.container_id.clone())),
        };
        self.by_container.remove(&req.container_id);
        match self.vms.get_mut(&vm) {
            Some(v) if v.phase == VmPhase::Live => v.phase = VmPhase::Unregistered,
            _ => {
                self.vms.remove(&vm);
            }
        }
        Ok(vm)
    }

    fn attachable(&self, container_id: &str) -> Result<VmId, ProxyError> {
        match self.by_container.get(container_id) {
            Some(vm) => match self.vms.get(vm).map(|v| &v.phase) {
                Some(VmPhase::AgentGone(reason)) => Err(ProxyError::AgentGone {
                    container: container_id.to_owned(),
                    reason: reason.clone(),
                }),
                Some(VmPhase::Live) => Ok(*vm),
                _ => Err(ProxyError::UnknownContainer(container_id.to_owned())),
            },
            None => Err(ProxyError::UnknownContainer(container_id.to_owned())),
        }
    }

    fn allocate(
        &mut self,
        vm: VmId,
        n: u32,
        new_token: &mut impl FnMut() -> String,
    ) -> Vec<NewToken> {
        let mut out = Vec::with_capacity(n.min(1024) as usize);
        let Some(entry) = self.vms.get_mut(&vm) else {
            return out;
        };
        for _ in 0..n {
            let mut token = new_token();
            while self.tokens.contains_key(&token) {
                token = new_token();
            }
            let io_base = entry.next_io_base;
            entry.next_io_base += 2;
            entry.live_tokens = entry.live_tokens.saturating_add(1);
            self.tokens.insert(
                token.clone(),
                TokenEntry {
                    vm,
                    io_base,
                    claim: Claim::Free,
                    process: ProcessState::None,
                },
            );
            out.push(NewToken { token, io_base });
        }
        out
    }

    /// The VM is gone (agent channels closed, or registration failed):
    /// forget it and every token allocated on it. Returns the tokens.
    pub fn remove_vm(&mut self, vm: VmId) -> Vec<String> {
        if let Some(v) = self.vms.remove(&vm) {
            if self.by_container.get(&v.container_id) == Some(&vm) {
                self.by_container.remove(&v.container_id);
            }
        }
        self.remove_tokens(vm)
    }

    /// The VM's agent is gone (its channels closed): its tokens are
    /// forgotten; a registered VM stays known by its container id (Hyper
    /// and AttachVM are refused) until UnregisterVM, an unregistered one is
    /// forgotten at once. Returns the tokens.
    pub fn vm_gone(&mut self, vm: VmId, reason: &str) -> GoneVm<V> {
        let handle = self.vms.get_mut(&vm).and_then(|v| v.handle.take());
        let tokens = match self.vms.get_mut(&vm) {
            Some(v) if v.phase == VmPhase::Live => {
                v.phase = VmPhase::AgentGone(reason.to_owned());
                self.remove_tokens(vm)
            }
            Some(v) if matches!(v.phase, VmPhase::AgentGone(_)) => self.remove_tokens(vm),
            _ => self.remove_vm(vm),
        };
        GoneVm { tokens, handle }
    }

    fn remove_tokens(&mut self, vm: VmId) -> Vec<String> {
        let gone: Vec<String> = self
            .tokens
            .iter()
            .filter(|(_, t)| t.vm == vm)
            .map(|(k, _)| k.clone())
            .collect();
        for t in &gone {
            self.tokens.remove(t);
        }
        if let Some(v) = self.vms.get_mut(&vm) {
            v.live_tokens = 0;
        }
        gone
    }

    /// Whether the VM still exists with a live agent.
    pub fn vm_exists(&self, vm: VmId) -> bool {
        self.vms
            .get(&vm)
            .is_some_and(|v| !matches!(v.phase, VmPhase::AgentGone(_)))
    }

    /// The container id a VM was registered with.
    pub fn vm_container_id(&self, vm: VmId) -> Option<&str> {
        self.vms.get(&vm).map(|v| v.container_id.as_str())
    }

    /// Whether the VM is registered (not yet unregistered).
    pub fn vm_registered(&self, vm: VmId) -> bool {
        self.vms
            .get(&vm)
            .is_some_and(|v| v.phase != VmPhase::Unregistered)
    }

    /// Where the VM is in its life.
    pub fn vm_phase(&self, vm: VmId) -> Option<&VmPhase> {
        self.vms.get(&vm).map(|v| &v.phase)
    }

    /// Number of VMs known (registered or not yet torn down).
    pub fn vm_count(&self) -> usize {
        self.vms.len()
    }

    /// Number of live tokens.
    pub fn token_count(&self) -> usize {
        self.tokens.len()
    }

    /// A token's entry.
    pub fn token(&self, token: &str) -> Option<&TokenEntry> {
        self.tokens.get(token)
    }

    /// Hyper: checks the client may send it, the name, the tokens, and
    /// relocates a process onto its token's session. Marks the token's
    /// process as starting; report the outcome with
    /// [`process_started`](Self::process_started) or
    /// [`process_start_failed`](Self::process_start_failed).
    pub fn plan_hyper(
        &mut self,
        client_vm: Option<VmId>,
        req: &Hyper,
    ) -> Result<HyperPlan, ProxyError> {
        let vm = client_vm.ok_or(ProxyError::NotAttached("Hyper"))?;
        match self.vms.get(&vm) {
            None => return Err(ProxyError::VmGone),
            Some(VmEntry {
                container_id,
                phase: VmPhase::AgentGone(reason),
                ..
            }) => {
                return Err(ProxyError::AgentGone {
                    container: container_id.clone(),
                    reason: reason.clone(),
                })
            }
            Some(_) => {}
        }
        req.validate()?;
        let code = Code::from_hyper_name(&req.hyper_name)
            .ok_or_else(|| ProxyError::UnknownHyperCommand(req.hyper_name.clone()))?;
        let data = req.data_bytes();
        if req.tokens.is_empty() {
            return Ok(HyperPlan {
                vm,
                code,
                data: data.to_vec(),
                session: None,
                container_id: None,
            });
        }
        if !code.starts_process() {
            return Err(ProxyError::TokensNotAccepted(code));
        }
        if req.tokens.len() > 1 {
            return Err(ProxyError::TooManyTokens(code, req.tokens.len()));
        }
        let token = &req.tokens[0];
        let entry = self
            .tokens
            .get_mut(token)
            .ok_or_else(|| ProxyError::UnknownToken(token.clone()))?;
        if entry.vm != vm {
            return Err(ProxyError::ForeignToken(token.clone()));
        }
        if entry.process != ProcessState::None {
            return Err(ProxyError::TokenInUse(token.clone()));
        }
        let relocated = relocate(code, data, entry.io_base)?;
        entry.process = ProcessState::Starting;
        Ok(HyperPlan {
            vm,
            code,
            data: relocated.data,
            session: Some((token.clone(), entry.io_base)),
            container_id: relocated.container_id,
        })
    }

    /// The agent acknowledged the process of `token`.
    pub fn process_started(&mut self, token: &str, container: Option<String>) {
        if let Some(t) = self.tokens.get_mut(token) {
            if t.process == ProcessState::Starting {
                t.process = ProcessState::Started { container };
            }
        }
    }

    /// Starting the process of `token` failed: the token can be used again.
    pub fn process_start_failed(&mut self, token: &str) {
        if let Some(t) = self.tokens.get_mut(token) {
            if t.process == ProcessState::Starting {
                t.process = ProcessState::None;
            }
        }
    }

    /// The exit code of `token`'s process was seen.
    pub fn process_exited(&mut self, token: &str) {
        if let Some(t) = self.tokens.get_mut(token) {
            t.process = ProcessState::Exited;
        }
    }

    /// ConnectShim: `conn` claims `token`.
    pub fn connect_shim(&mut self, conn: ConnId, token: &str) -> Result<(VmId, u64), ProxyError> {
        let t = self
            .tokens
            .get_mut(token)
            .ok_or_else(|| ProxyError::UnknownToken(token.to_owned()))?;
        match t.claim {
            Claim::Releasing(c) if c != conn => Err(ProxyError::TokenReleasing(token.to_owned())),
            Claim::Held(c) if c != conn => Err(ProxyError::TokenClaimed(token.to_owned())),
            _ => {
                t.claim = Claim::Held(conn);
                Ok((t.vm, t.io_base))
            }
        }
    }

    /// The shim's connection is closing: a new claim will be accepted once
    /// [`shim_gone`](Self::shim_gone) releases this one.
    pub fn shim_closing(&mut self, conn: ConnId, token: &str) {
        if let Some(t) = self.tokens.get_mut(token) {
            if t.claim == Claim::Held(conn) {
                t.claim = Claim::Releasing(conn);
            }
        }
    }

    /// The shim's connection dropped without DisconnectShim: the token is
    /// claimable again and its session carries on.
    pub fn shim_gone(&mut self, conn: ConnId, token: &str) {
        if let Some(t) = self.tokens.get_mut(token) {
            if t.claim.holder() == Some(conn) {
                t.claim = Claim::Free;
            }
        }
    }

    /// DisconnectShim: the token and its session are freed.
    pub fn disconnect_shim(&mut self, conn: ConnId, token: &str) -> Option<TokenEntry> {
        match self.tokens.get(token) {
            Some(t) if t.claim.holder() == Some(conn) => {
                let t = self.tokens.remove(token)?;
                if let Some(v) = self.vms.get_mut(&t.vm) {
                    v.live_tokens = v.live_tokens.saturating_sub(1);
                }
                Some(t)
            }
            _ => None,
        }
    }

    /// Check that the registry's state is one the rules can reach: every
    /// index agrees with what it indexes, every count with what it counts,
    /// every token's session is unique on its VM. The simulation calls this
    /// after every step; it costs a walk over everything.
    pub fn check_invariants(&self) -> Result<(), String> {
        for (name, vm) in &self.by_container {
            let v = self
                .vms
                .get(vm)
                .ok_or_else(|| format!("container {name} indexes VM {vm:?}, which is not known"))?;
            if &v.container_id != name {
                return Err(format!(
                    "container {name} indexes VM {vm:?}, registered as {}",
                    v.container_id
                ));
            }
            if v.phase == VmPhase::Unregistered {
                return Err(format!("container {name} still indexes an unregistered VM"));
            }
        }
        for (id, v) in &self.vms {
            let listed = self.by_container.get(&v.container_id) == Some(id);
            if v.phase != VmPhase::Unregistered && !listed {
                return Err(format!(
                    "VM {id:?} ({}, {:?}) is not indexed by its container id",
                    v.container_id, v.phase
                ));
            }
            let tokens: Vec<&TokenEntry> = self.tokens.values().filter(|t| t.vm == *id).collect();
            if tokens.len() != v.live_tokens as usize {
                return Err(format!(
                    "VM {id:?} counts {} live tokens and has {}",
                    v.live_tokens,
                    tokens.len()
                ));
            }
            let runs = matches!(v.phase, VmPhase::Live | VmPhase::Unregistered);
            if runs != v.handle.is_some() {
                return Err(format!(
                    "VM {id:?} is {:?} and {} a running VM's handle",
                    v.phase,
                    if v.handle.is_some() { "has" } else { "lacks" }
                ));
            }
            if matches!(v.phase, VmPhase::AgentGone(_)) && !tokens.is_empty() {
                return Err(format!("VM {id:?}'s agent is gone and it keeps tokens"));
            }
            if v.live_tokens > self.limits.per_vm {
                return Err(format!("VM {id:?} holds {} tokens", v.live_tokens));
            }
            let mut bases: Vec<u64> = tokens.iter().map(|t| t.io_base).collect();
            bases.sort_unstable();
            if bases.windows(2).any(|w| w[0] == w[1]) {
                return Err(format!("two sessions of VM {id:?} share an io base"));
            }
            if let Some(b) = bases
                .iter()
                .find(|b| **b < FIRST_IO_BASE || **b % 2 == 0 || **b >= v.next_io_base)
            {
                return Err(format!("VM {id:?} has a session at io base {b}"));
            }
        }
        for t in self.tokens.values() {
            if !self.vms.contains_key(&t.vm) {
                return Err(format!("a token belongs to VM {:?}, which is gone", t.vm));
            }
        }
        if self.tokens.len() > self.limits.total as usize {
            return Err(format!(
                "{} tokens live, above the limit",
                self.tokens.len()
            ));
        }
        Ok(())
    }

    /// Every live token with its entry (the simulation walks them).
    pub fn tokens(&self) -> impl Iterator<Item = (&str, &TokenEntry)> {
        self.tokens.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Signal from the shim of `token`.
    pub fn plan_signal(&mut self, token: &str, sig: &Signal) -> Result<SignalPlan, ProxyError> {
        sig.validate()?;
        let n = sig.signal_number;
        let t = self
            .tokens
            .get_mut(token)
            .ok_or_else(|| ProxyError::UnknownToken(token.to_owned()))?;
        match &t.process {
            ProcessState::None | ProcessState::KilledBeforeStart
                if n == SIGKILL || n == SIGTERM =>
            {
                t.process = ProcessState::KilledBeforeStart;
                Ok(SignalPlan::ExitedBeforeStart)
            }
            ProcessState::None | ProcessState::Starting | ProcessState::KilledBeforeStart => {
                Ok(SignalPlan::WaitForStart)
            }
            _ if n == SIGWINCH => {
                let data = serde_json::to_vec(&WindowSize {
                    seq: t.io_base,
                    row: u16::try_from(sig.rows).unwrap_or(u16::MAX),
                    column: u16::try_from(sig.columns).unwrap_or(u16::MAX),
                })
                .map_err(|source| ProxyError::Encode {
                    what: "a signal's ctl data",
                    source,
                })?;
                Ok(SignalPlan::Send {
                    code: Code::WinSize,
                    data,
                })
            }
            ProcessState::Started {
                container: Some(container),
            } => {
                let data = serde_json::to_vec(&KillCommand {
                    container: container.clone(),
                    signal: i32::try_from(n).unwrap_or(0),
                    all_processes: false,
                })
                .map_err(|source| ProxyError::Encode {
                    what: "a signal's ctl data",
                    source,
                })?;
                Ok(SignalPlan::Send {
                    code: Code::KillContainer,
                    data,
                })
            }
            ProcessState::Started { container: None } => Err(ProxyError::NoContainerToSignal(n)),
            ProcessState::Exited => Err(ProxyError::ProcessExited(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokgen() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("tok-{n}")
        }
    }

    fn reg(id: &str, n: u32) -> RegisterVm {
        RegisterVm {
            container_id: id.into(),
            ctl_serial: "/c".into(),
            io_serial: "/i".into(),
            num_io_streams: n,
            ..Default::default()
        }
    }

    fn ready_vm(r: &mut Registry, id: &str, n: u32) -> (VmId, Vec<NewToken>) {
        let mut g = tokgen();
        let (vm, t) = r
            .register_vm(&reg(id, n), || format!("{id}-{}", g()))
            .unwrap();
        r.vm_ready(vm, ()).unwrap();
        (vm, t)
    }

    fn hyper(name: &str, tokens: &[&str], data: Option<&str>) -> Hyper {
        Hyper::new(name, tokens.iter().map(|s| s.to_string()).collect(), data).unwrap()
    }

    #[test]
    fn register_requires_fields() {
        let mut r = Registry::new();
        for (c, s, i, field) in [
            ("", "/c", "/i", "containerId"),
            ("x", "", "/i", "ctlSerial"),
            ("x", "/c", "", "ioSerial"),
        ] {
            let req = RegisterVm {
                container_id: c.into(),
                ctl_serial: s.into(),
                io_serial: i.into(),
                ..Default::default()
            };
            let e = r.register_vm(&req, tokgen()).unwrap_err();
            assert!(e.to_string().contains(field), "{e}");
        }
        assert_eq!(r.vm_count(), 0);
    }

    #[test]
    fn register_allocates_io_bases_3_5_7() {
        let mut r = Registry::new();
        let (_, t) = ready_vm(&mut r, "a", 3);
        let bases: Vec<u64> = t.iter().map(|t| t.io_base).collect();
        assert_eq!(bases, [3, 5, 7]);
        // Per VM: a second VM starts at 3 again.
        let (_, t) = ready_vm(&mut r, "b", 1);
        assert_eq!(t[0].io_base, 3);
    }

    #[test]
    fn num_io_streams_is_bounded() {
        let mut r = Registry::new();
        let e = r.register_vm(&reg("a", u32::MAX), tokgen()).unwrap_err();
        assert!(e.to_string().contains("numIOStreams"), "{e}");
        assert_eq!(r.vm_count(), 0);
        let (_, t) = ready_vm(&mut r, "a", MAX_IO_STREAMS);
        assert_eq!(t.len(), MAX_IO_STREAMS as usize);
        let attach = AttachVm {
            container_id: "a".into(),
            num_io_streams: MAX_IO_STREAMS + 1,
        };
        assert!(matches!(
            r.attach_vm(&attach, tokgen()),
            Err(ProxyError::TooManyStreams(_))
        ));
    }

    #[test]
    fn duplicate_container_is_refused_even_while_pending() {
        let mut r = Registry::new();
        r.register_vm(&reg("a", 0), tokgen()).unwrap();
        let e = r.register_vm(&reg("a", 0), tokgen()).unwrap_err();
        assert!(matches!(e, ProxyError::DuplicateContainer(ref c) if c == "a"));
    }

    #[test]
    fn failed_registration_leaves_nothing() {
        let mut r = Registry::new();
        let (vm, _) = r.register_vm(&reg("a", 2), tokgen()).unwrap();
        assert_eq!(r.remove_vm(vm).len(), 2);
        assert_eq!(r.token_count(), 0);
        r.register_vm(&reg("a", 0), tokgen()).unwrap();
    }

    #[test]
    fn attach_needs_a_ready_registered_vm_and_continues_io_bases() {
        let mut r = Registry::new();
        let attach = AttachVm {
            container_id: "a".into(),
            num_io_streams: 2,
        };
        assert!(matches!(
            r.attach_vm(&attach, tokgen()),
            Err(ProxyError::UnknownContainer(_))
        ));
        let (vm, _) = r.register_vm(&reg("a", 1), tokgen()).unwrap();
        assert!(r.attach_vm(&attach, tokgen()).is_err(), "not ready yet");
        r.vm_ready(vm, ()).unwrap();
        let mut g = || "x".to_string() + &r.token_count().to_string();
        let _ = &mut g;
        let (vm2, t) = r
            .attach_vm(&attach, {
                let mut n = 100;
                move || {
                    n += 1;
                    format!("t{n}")
                }
            })
            .unwrap();
        assert_eq!(vm2, vm);
        assert_eq!(t.iter().map(|t| t.io_base).collect::<Vec<_>>(), [5, 7]);
        assert!(r
            .attach_vm(&AttachVm::default(), tokgen())
            .unwrap_err()
            .to_string()
            .contains("containerId"));
    }

    #[test]
    fn unregister_makes_the_id_reusable_and_unknown_ids_fail() {
        let mut r = Registry::new();
        let (_vm, _) = ready_vm(&mut r, "a", 0);
        let un = UnregisterVm {
            container_id: "a".into(),
        };
        r.unregister_vm(&un).unwrap();
        assert!(matches!(
            r.unregister_vm(&un),
            Err(ProxyError::UnknownContainer(_))
        ));
        ready_vm(&mut r, "a", 0);
    }

    #[test]
    fn hyper_requires_attachment_and_known_names() {
        let mut r = Registry::new();
        assert!(matches!(
            r.plan_hyper(None, &hyper("ping", &[], None)),
            Err(ProxyError::NotAttached(_))
        ));
        let (vm, _) = ready_vm(&mut r, "a", 0);
        assert!(matches!(
            r.plan_hyper(Some(vm), &hyper("bogus", &[], None)),
            Err(ProxyError::UnknownHyperCommand(_))
        ));
        // Deprecated commands are not accepted.
        assert!(r.plan_hyper(Some(vm), &hyper("getpod", &[], None)).is_err());
        assert!(r.plan_hyper(Some(vm), &hyper("", &[], None)).is_err());
        let p = r
            .plan_hyper(
                Some(vm),
                &hyper("startpod", &[], Some(r#"{"hostname":"h"}"#)),
            )
            .unwrap();
        assert_eq!(p.code, Code::StartPod);
        assert_eq!(p.data, br#"{"hostname":"h"}"#);
        assert_eq!(p.session, None);
    }

    #[test]
    fn tokens_only_with_process_commands_and_at_most_one() {
        let mut r = Registry::new();
        let (vm, t) = ready_vm(&mut r, "a", 2);
        let (a, b) = (t[0].token.as_str(), t[1].token.as_str());
        assert!(matches!(
            r.plan_hyper(Some(vm), &hyper("ping", &[a], None)),
            Err(ProxyError::TokensNotAccepted(Code::Ping))
        ));
        assert!(matches!(
            r.plan_hyper(
                Some(vm),
                &hyper("execcmd", &[a, b], Some(r#"{"process":{}}"#))
            ),
            Err(ProxyError::TooManyTokens(Code::ExecCmd, 2))
        ));
        assert!(matches!(
            r.plan_hyper(
                Some(vm),
                &hyper("execcmd", &["nope"], Some(r#"{"process":{}}"#))
            ),
            Err(ProxyError::UnknownToken(_))
        ));
    }

    #[test]
    fn token_of_another_vm_is_refused() {
        let mut r = Registry::new();
        let (vm_a, _) = ready_vm(&mut r, "a", 1);
        let (_, tb) = ready_vm(&mut r, "b", 1);
        let e = r
            .plan_hyper(
                Some(vm_a),
                &hyper("execcmd", &[&tb[0].token], Some(r#"{"process":{}}"#)),
            )
            .unwrap_err();
        assert!(matches!(e, ProxyError::ForeignToken(_)));
    }

    #[test]
    fn newcontainer_relocates_and_a_token_serves_one_process() {
        let mut r = Registry::new();
        let (vm, t) = ready_vm(&mut r, "a", 2);
        let tok = t[1].token.as_str();
        let p = r
            .plan_hyper(
                Some(vm),
                &hyper(
                    "newcontainer",
                    &[tok],
                    Some(r#"{"id":"c1","process":{"terminal":false,"args":["sh"]}}"#),
                ),
            )
            .unwrap();
        assert_eq!(p.session, Some((tok.to_string(), 5)));
        assert_eq!(p.container_id.as_deref(), Some("c1"));
        assert_eq!(
            p.data,
            br#"{"id":"c1","process":{"terminal":false,"args":["sh"],"stdio":5,"stderr":6}}"#
        );
        let again = hyper("execcmd", &[tok], Some(r#"{"process":{}}"#));
        assert!(matches!(
            r.plan_hyper(Some(vm), &again),
            Err(ProxyError::TokenInUse(_))
        ));
        // A failed start frees the token for another try.
        r.process_start_failed(tok);
        r.plan_hyper(Some(vm), &again).unwrap();
    }

    #[test]
    fn client_set_stdio_is_refused() {
        let mut r = Registry::new();
        let (vm, t) = ready_vm(&mut r, "a", 1);
        let e = r
            .plan_hyper(
                Some(vm),
                &hyper(
                    "execcmd",
                    &[&t[0].token],
                    Some(r#"{"process":{"stdio":9}}"#),
                ),
            )
            .unwrap_err();
        assert!(e.to_string().contains("stdio"), "{e}");
        // and the token stays usable
        assert_eq!(r.token(&t[0].token).unwrap().process, ProcessState::None);
    }

    #[test]
    fn shim_claims_are_exclusive_and_released_on_drop() {
        let mut r = Registry::new();
        let (vm, t) = ready_vm(&mut r, "a", 1);
        let tok = &t[0].token;
        assert_eq!(r.connect_shim(ConnId(1), tok).unwrap(), (vm, 3));
        assert!(matches!(
            r.connect_shim(ConnId(2), tok),
            Err(ProxyError::TokenClaimed(_))
        ));
        r.shim_closing(ConnId(1), tok);
        assert!(matches!(
            r.connect_shim(ConnId(2), tok),
            Err(ProxyError::TokenReleasing(_))
        ));
        r.shim_gone(ConnId(1), tok);
        r.connect_shim(ConnId(2), tok).unwrap();
        // A stale drop by the old connection changes nothing.
        r.shim_gone(ConnId(1), tok);
        assert!(r.connect_shim(ConnId(3), tok).is_err());
        assert!(matches!(
            r.connect_shim(ConnId(3), "nope"),
            Err(ProxyError::UnknownToken(_))
        ));
    }

    #[test]
    fn disconnect_frees_token_and_session() {
        let mut r = Registry::new();
        let (_, t) = ready_vm(&mut r, "a", 1);
        let tok = &t[0].token;
        r.connect_shim(ConnId(1), tok).unwrap();
        assert!(r.disconnect_shim(ConnId(2), tok).is_none());
        assert!(r.disconnect_shim(ConnId(1), tok).is_some());
        assert!(matches!(
            r.connect_shim(ConnId(1), tok),
            Err(ProxyError::UnknownToken(_))
        ));
    }

    #[test]
    fn vm_removal_drops_its_tokens_only() {
        let mut r = Registry::new();
        let (a, ta) = ready_vm(&mut r, "a", 2);
        let (_, tb) = ready_vm(&mut r, "b", 1);
        r.remove_vm(a);
        assert!(r.token(&ta[0].token).is_none());
        assert!(r.token(&tb[0].token).is_some());
        assert!(matches!(
            r.plan_hyper(Some(a), &hyper("ping", &[], None)),
            Err(ProxyError::VmGone)
        ));
    }

    #[test]
    fn regression_tokens_are_limited_per_vm_and_in_total() {
        let mut r = Registry::with_limits(TokenLimits {
            per_vm: 5,
            total: 8,
        });
        let (a, _) = ready_vm(&mut r, "a", 3);
        let mut g = tokgen();
        let mut attach = |r: &mut Registry, id: &str, n| {
            r.attach_vm(
                &AttachVm {
                    container_id: id.into(),
                    num_io_streams: n,
                },
                || format!("x{}", g()),
            )
        };
        let e = attach(&mut r, "a", 3).unwrap_err();
        assert_eq!(
            e.to_string(),
            "3 more tokens would pass the limit of 5 live tokens in this VM (3 live)"
        );
        let (_, t) = attach(&mut r, "a", 2).unwrap();
        // A token given back (DisconnectShim) makes room again.
        r.connect_shim(ConnId(9), &t[0].token).unwrap();
        assert!(r.disconnect_shim(ConnId(9), &t[0].token).is_some());
        attach(&mut r, "a", 1).unwrap();
        // The daemon's total: 5 live, 3 more fit, 4 do not.
        let e = r.register_vm(&reg("b", 4), || "y".into()).unwrap_err();
        assert!(
            e.to_string()
                .contains("limit of 8 live tokens in the proxy"),
            "{e}"
        );
        let (b, _) = ready_vm(&mut r, "b", 3);
        assert!(attach(&mut r, "b", 1).is_err());
        // A VM that goes gives its tokens back.
        r.vm_gone(a, "gone");
        attach(&mut r, "b", 2).unwrap();
        assert_eq!(r.token_count(), 5);
        let _ = b;
    }

    #[test]
    fn a_vm_whose_agent_is_gone_stays_until_unregister() {
        let mut r = Registry::new();
        let (a, ta) = ready_vm(&mut r, "a", 1);
        assert_eq!(
            r.vm_gone(a, "its channels closed").tokens,
            vec![ta[0].token.clone()]
        );
        assert!(!r.vm_exists(a));
        let e = r
            .plan_hyper(Some(a), &hyper("ping", &[], None))
            .unwrap_err();
        assert!(e.to_string().contains("agent of VM a is gone"), "{e}");
        let attach = AttachVm {
            container_id: "a".into(),
            num_io_streams: 1,
        };
        let e = r.attach_vm(&attach, tokgen()).unwrap_err();
        assert!(matches!(e, ProxyError::AgentGone { .. }), "{e}");
        assert!(matches!(
            r.register_vm(&reg("a", 0), tokgen()),
            Err(ProxyError::DuplicateContainer(_))
        ));
        r.unregister_vm(&UnregisterVm {
            container_id: "a".into(),
        })
        .unwrap();
        assert_eq!(r.vm_count(), 0);
        ready_vm(&mut r, "a", 0);
    }

    #[test]
    fn an_unregistered_vm_is_forgotten_when_its_agent_goes() {
        let mut r = Registry::new();
        let (a, _) = ready_vm(&mut r, "a", 0);
        r.unregister_vm(&UnregisterVm {
            container_id: "a".into(),
        })
        .unwrap();
        assert_eq!(r.vm_count(), 1);
        r.vm_gone(a, "its channels closed");
        assert_eq!(r.vm_count(), 0);
    }

    fn sig(n: i64, columns: i64, rows: i64) -> Signal {
        Signal {
            signal_number: n,
            columns,
            rows,
        }
    }

    fn started(r: &mut Registry, cmd: &str) -> String {
        let (vm, t) = ready_vm(r, cmd, 1);
        let tok = t[0].token.clone();
        let data = if cmd == "newcontainer" {
            r#"{"id":"c1","process":{}}"#
        } else {
            r#"{"container":"c1","process":{}}"#
        };
        let p = r
            .plan_hyper(Some(vm), &hyper(cmd, &[&tok], Some(data)))
            .unwrap();
        r.process_started(&tok, p.container_id);
        tok
    }

    #[test]
    fn signal_range_is_0_to_30() {
        let mut r = Registry::new();
        let tok = started(&mut r, "newcontainer");
        for bad in [-1, 31, 64] {
            assert!(matches!(
                r.plan_signal(&tok, &sig(bad, 0, 0)),
                Err(ProxyError::Signal(SignalError::OutOfRange(n))) if n == bad
            ));
        }
        assert!(r.plan_signal(&tok, &sig(0, 0, 0)).is_ok());
        assert!(r.plan_signal(&tok, &sig(30, 0, 0)).is_ok());
    }

    #[test]
    fn sigwinch_needs_a_size_and_others_must_not_have_one() {
        let mut r = Registry::new();
        let tok = started(&mut r, "newcontainer");
        assert!(matches!(
            r.plan_signal(&tok, &sig(28, 0, 24)),
            Err(ProxyError::Signal(SignalError::WinchWithoutSize { .. }))
        ));
        assert!(matches!(
            r.plan_signal(&tok, &sig(28, 80, 0)),
            Err(ProxyError::Signal(SignalError::WinchWithoutSize { .. }))
        ));
        assert!(matches!(
            r.plan_signal(&tok, &sig(15, 80, 24)),
            Err(ProxyError::Signal(SignalError::SizeWithoutWinch(15)))
        ));
        assert!(matches!(
            r.plan_signal(&tok, &sig(28, 70000, 24)),
            Err(ProxyError::Signal(SignalError::SizeOutOfRange { .. }))
        ));
    }

    #[test]
    fn sigwinch_becomes_winsize_on_the_session_seq() {
        let mut r = Registry::new();
        let tok = started(&mut r, "execcmd");
        assert_eq!(
            r.plan_signal(&tok, &sig(28, 80, 24)).unwrap(),
            SignalPlan::Send {
                code: Code::WinSize,
                data: br#"{"seq":3,"row":24,"column":80}"#.to_vec()
            }
        );
    }

    #[test]
    fn signals_become_killcontainer_for_the_container() {
        let mut r = Registry::new();
        let tok = started(&mut r, "newcontainer");
        assert_eq!(
            r.plan_signal(&tok, &sig(15, 0, 0)).unwrap(),
            SignalPlan::Send {
                code: Code::KillContainer,
                data: br#"{"container":"c1","signal":15,"allProcesses":false}"#.to_vec()
            }
        );
    }

    #[test]
    fn signalling_an_execcmd_process_is_an_error() {
        let mut r = Registry::new();
        let tok = started(&mut r, "execcmd");
        assert!(matches!(
            r.plan_signal(&tok, &sig(15, 0, 0)),
            Err(ProxyError::NoContainerToSignal(15))
        ));
    }

    #[test]
    fn kill_or_term_before_start_exits_0_other_signals_wait() {
        let mut r = Registry::new();
        let (_, t) = ready_vm(&mut r, "a", 1);
        let tok = &t[0].token;
        assert_eq!(
            r.plan_signal(tok, &sig(1, 0, 0)).unwrap(),
            SignalPlan::WaitForStart
        );
        assert_eq!(
            r.plan_signal(tok, &sig(28, 80, 24)).unwrap(),
            SignalPlan::WaitForStart
        );
        assert_eq!(
            r.plan_signal(tok, &sig(9, 0, 0)).unwrap(),
            SignalPlan::ExitedBeforeStart
        );
        assert_eq!(
            r.plan_signal(tok, &sig(15, 0, 0)).unwrap(),
            SignalPlan::ExitedBeforeStart
        );
    }

    #[test]
    fn signal_while_starting_waits() {
        let mut r = Registry::new();
        let (vm, t) = ready_vm(&mut r, "a", 1);
        let tok = &t[0].token;
        r.plan_hyper(
            Some(vm),
            &hyper("newcontainer", &[tok], Some(r#"{"id":"c","process":{}}"#)),
        )
        .unwrap();
        assert_eq!(
            r.plan_signal(tok, &sig(15, 0, 0)).unwrap(),
            SignalPlan::WaitForStart
        );
    }
}
