//! The runtime's side: registering VMs and forwarding agent commands.

use std::fmt;

use bytes::Bytes;
use proxy_proto::payload::{self, AttachVm, Hyper, RegisterVm, RegisterVmResponse, UnregisterVm};
use proxy_proto::{Command, FrameKind, Stream};
use serde::Serialize;

use crate::addr::ProxyAddr;
use crate::conn::Conn;
use crate::error::{Error, Result};
use crate::shim::{Shim, ShimEvents};

/// An I/O token: the proxy hands them out (RegisterVM, AttachVM), the
/// runtime passes one with the Hyper command that starts a process, and the
/// process's shim claims it (ConnectShim).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Token(String);

impl Token {
    /// The token as the wire carries it.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The token's string.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl From<String> for Token {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl From<&str> for Token {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

impl From<&Token> for Token {
    fn from(t: &Token) -> Self {
        t.clone()
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a VM's shims connect, and the tokens they claim: the answer to
/// RegisterVM and AttachVM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmIo {
    /// The proxy's socket, as the `unix://` URL that `cc-shim -u` takes.
    pub url: String,
    /// The tokens allocated by this request, in order.
    pub tokens: Vec<Token>,
}

impl From<RegisterVmResponse> for VmIo {
    fn from(r: RegisterVmResponse) -> Self {
        Self {
            url: r.io.url,
            tokens: r.io.tokens.into_iter().map(Token).collect(),
        }
    }
}

/// A VM to register: its id and the addresses of its agent's channels
/// (a path or `unix://path` for virtio-serial, `vsock://cid:port`,
/// `hvsock://path:port`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmSpec {
    /// The VM's (pod's) container id.
    pub container_id: String,
    /// The agent's control channel.
    pub ctl: String,
    /// The agent's I/O channel.
    pub io: String,
    /// The VM console, read and logged by the proxy (optional).
    pub console: Option<String>,
    /// How many I/O tokens to allocate now.
    pub tokens: u32,
}

impl VmSpec {
    /// A VM with its id and agent channels, no console and no tokens.
    pub fn new(
        container_id: impl Into<String>,
        ctl: impl Into<String>,
        io: impl Into<String>,
    ) -> Self {
        Self {
            container_id: container_id.into(),
            ctl: ctl.into(),
            io: io.into(),
            console: None,
            tokens: 0,
        }
    }

    /// Allocate `n` I/O tokens with the registration.
    pub fn tokens(mut self, n: u32) -> Self {
        self.tokens = n;
        self
    }

    /// Have the proxy read and log the VM console at `addr`.
    pub fn console(mut self, addr: impl Into<String>) -> Self {
        self.console = Some(addr.into());
        self
    }
}

/// A log line's level, for [`Client::log`] and [`Shim::log`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    /// Debug.
    Debug,
    /// Info.
    Info,
    /// Warning.
    Warn,
    /// Error.
    Error,
}

impl From<LogLevel> for payload::LogLevel {
    fn from(l: LogLevel) -> Self {
        match l {
            LogLevel::Debug => Self::Debug,
            LogLevel::Info => Self::Info,
            LogLevel::Warn => Self::Warn,
            LogLevel::Error => Self::Error,
        }
    }
}

pub(crate) fn to_json<T: Serialize>(v: &T) -> Result<Bytes> {
    serde_json::to_vec(v)
        .map(Bytes::from)
        .map_err(|e| Error::InvalidArgument(format!("cannot encode the payload: {e}")))
}

pub(crate) fn log_entry(shim: bool, level: LogLevel, msg: &str) -> Result<Bytes> {
    to_json(&payload::LogEntry {
        source: if shim {
            payload::LogSource::Shim
        } else {
            payload::LogSource::Runtime
        },
        container_id: String::new(),
        level: level.into(),
        msg: msg.to_owned(),
    })
}

/// A runtime's connection to the proxy.
///
/// Commands may be issued from several tasks at once (`&self`); the proxy
/// answers them in order and each caller gets its own answer.
#[derive(Debug)]
pub struct Client {
    addr: ProxyAddr,
    conn: Conn,
}

impl Client {
    /// Connect to the proxy at `addr`: a socket path, or `unix:///path`.
    pub async fn connect(addr: impl TryInto<ProxyAddr, Error = Error>) -> Result<Client> {
        let addr = addr.try_into()?;
        let conn = Conn::connect(&addr, None).await?;
        Ok(Client { addr, conn })
    }

    /// The proxy's address.
    pub fn addr(&self) -> &ProxyAddr {
        &self.addr
    }

    /// Register a VM (RegisterVM). The proxy connects to the agent and
    /// answers once the agent is READY; this connection is then attached to
    /// the VM.
    ///
    /// Missing fields, and more tokens than one request may allocate
    /// ([`MAX_IO_STREAMS`](proxy_proto::payload::MAX_IO_STREAMS)), are an
    /// [`Error::InvalidArgument`] before anything is sent.
    pub async fn register_vm(&self, vm: VmSpec) -> Result<VmIo> {
        for (field, v) in [
            ("containerId", &vm.container_id),
            ("ctlSerial", &vm.ctl),
            ("ioSerial", &vm.io),
        ] {
            if v.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "RegisterVM: {field} is empty"
                )));
            }
        }
        let req = RegisterVm {
            container_id: vm.container_id,
            ctl_serial: vm.ctl,
            io_serial: vm.io,
            console: vm.console.unwrap_or_default(),
            num_io_streams: vm.tokens,
        };
        req.validate_streams()
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        self.io_response(Command::RegisterVm, to_json(&req)?).await
    }

    /// Attach this connection to a registered VM (AttachVM) and allocate
    /// `tokens` more I/O tokens.
    /// More than [`MAX_IO_STREAMS`](proxy_proto::payload::MAX_IO_STREAMS)
    /// is an [`Error::InvalidArgument`] before anything is sent.
    pub async fn attach_vm(&self, container_id: &str, tokens: u32) -> Result<VmIo> {
        if container_id.is_empty() {
            return Err(Error::InvalidArgument(
                "AttachVM: containerId is empty".into(),
            ));
        }
        let req = AttachVm {
            container_id: container_id.to_owned(),
            num_io_streams: tokens,
        };
        req.validate_streams()
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        self.io_response(Command::AttachVm, to_json(&req)?).await
    }

    async fn io_response(&self, command: Command, req: Bytes) -> Result<VmIo> {
        let r = self.conn.call(command, req).await?;
        let r: RegisterVmResponse = serde_json::from_slice(&r).map_err(|e| {
            Error::Protocol(format!(
                "{} response is not the expected JSON: {e}",
                command.name()
            ))
        })?;
        Ok(r.into())
    }

    /// Unregister a VM (UnregisterVM): new clients can no longer attach; a
    /// pod-mode proxy exits.
    pub async fn unregister_vm(&self, container_id: &str) -> Result<()> {
        if container_id.is_empty() {
            return Err(Error::InvalidArgument(
                "UnregisterVM: containerId is empty".into(),
            ));
        }
        let req = UnregisterVm {
            container_id: container_id.to_owned(),
        };
        self.conn
            .call(Command::UnregisterVm, to_json(&req)?)
            .await
            .map(drop)
    }

    /// Send a hyperstart command to the agent of the attached VM (Hyper)
    /// and return the agent's reply payload, raw. `data` is the command's
    /// JSON, passed byte for byte (`None` for commands without data). With a
    /// token (only for `newcontainer` and `execcmd`), the process's stdio
    /// goes to that token's shim.
    pub async fn hyper(&self, name: &str, tokens: &[Token], data: Option<&str>) -> Result<Bytes> {
        if name.is_empty() {
            return Err(Error::InvalidArgument("Hyper: hyperName is empty".into()));
        }
        let req = Hyper::new(
            name,
            tokens.iter().map(|t| t.as_str().to_owned()).collect(),
            data,
        )
        .map_err(|e| Error::InvalidArgument(format!("Hyper {name}: data is not JSON: {e}")))?;
        self.conn.call(Command::Hyper, to_json(&req)?).await
    }

    /// [`hyper`](Self::hyper) with data serialized from a value.
    pub async fn hyper_json<T: Serialize>(
        &self,
        name: &str,
        tokens: &[Token],
        data: &T,
    ) -> Result<Bytes> {
        let data = serde_json::to_string(data)
            .map_err(|e| Error::InvalidArgument(format!("Hyper {name}: {e}")))?;
        self.hyper(name, tokens, Some(&data)).await
    }

    /// Write a line to the proxy's log, as a runtime.
    pub async fn log(&self, level: LogLevel, msg: &str) -> Result<()> {
        let entry = log_entry(false, level, msg)?;
        self.conn.send(FrameKind::Stream(Stream::Log), entry).await
    }

    /// Open a shim connection to the same proxy and claim `token` (see
    /// [`Shim::connect`]).
    pub async fn connect_shim(&self, token: impl Into<Token>) -> Result<(Shim, ShimEvents)> {
        Shim::connect(&self.addr, token).await
    }
}
