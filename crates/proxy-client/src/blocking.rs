//! The same API for callers without an async runtime: every call blocks
//! until it is done. No tokio types appear in the signatures; each
//! [`Client`] runs a small private runtime (one worker thread) that its
//! shims share.
//!
//! Do not use these types from inside an async runtime (blocking there
//! stalls the runtime, and dropping them there panics); use the async API.
//!
//! ```no_run
//! use proxy_client::blocking::Client;
//! use proxy_client::VmSpec;
//!
//! # fn main() -> Result<(), proxy_client::Error> {
//! let client = Client::connect("/run/cc-proxy/proxy.sock")?;
//! let io = client.register_vm(VmSpec::new("pod-1", "/run/vm/ctl.sock", "/run/vm/io.sock").tokens(1))?;
//! let (shim, mut events) = client.connect_shim(&io.tokens[0])?;
//! client.hyper(
//!     "execcmd",
//!     &io.tokens,
//!     Some(r#"{"container":"c1","process":{"args":["cat"]}}"#),
//! )?;
//! shim.send_stdin(&b"hello"[..])?;
//! shim.close_stdin()?;
//! let out = events.collect()?;
//! assert_eq!(out.stdout, b"hello");
//! # Ok(())
//! # }
//! ```

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;

use crate::addr::ProxyAddr;
use crate::client::{LogLevel, Token, VmIo, VmSpec};
use crate::error::{Error, Result};
use crate::shim::{Output, ReconnectPolicy, ShimEvent};

fn runtime() -> Result<Arc<tokio::runtime::Runtime>> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("proxy-client")
        .enable_all()
        .build()
        .map(Arc::new)
        .map_err(|e| Error::InvalidArgument(format!("cannot start the client's runtime: {e}")))
}

/// A runtime's connection to the proxy; see [`crate::Client`].
#[derive(Debug)]
pub struct Client {
    inner: crate::Client,
    rt: Arc<tokio::runtime::Runtime>,
}

impl Client {
    /// Connect to the proxy at `addr`: a socket path, or `unix:///path`.
    pub fn connect(addr: impl TryInto<ProxyAddr, Error = Error>) -> Result<Client> {
        let addr = addr.try_into()?;
        let rt = runtime()?;
        let inner = rt.block_on(crate::Client::connect(&addr))?;
        Ok(Client { inner, rt })
    }

    /// See [`crate::Client::register_vm`].
    pub fn register_vm(&self, vm: VmSpec) -> Result<VmIo> {
        self.rt.block_on(self.inner.register_vm(vm))
    }

    /// See [`crate::Client::attach_vm`].
    pub fn attach_vm(&self, container_id: &str, tokens: u32) -> Result<VmIo> {
        self.rt.block_on(self.inner.attach_vm(container_id, tokens))
    }

    /// See [`crate::Client::unregister_vm`].
    pub fn unregister_vm(&self, container_id: &str) -> Result<()> {
        self.rt.block_on(self.inner.unregister_vm(container_id))
    }

    /// See [`crate::Client::hyper`].
    pub fn hyper(&self, name: &str, tokens: &[Token], data: Option<&str>) -> Result<Bytes> {
        self.rt.block_on(self.inner.hyper(name, tokens, data))
    }

    /// See [`crate::Client::hyper_json`].
    pub fn hyper_json<T: Serialize>(
        &self,
        name: &str,
        tokens: &[Token],
        data: &T,
    ) -> Result<Bytes> {
        self.rt.block_on(self.inner.hyper_json(name, tokens, data))
    }

    /// See [`crate::Client::log`]; returns once the line is written.
    pub fn log(&self, level: LogLevel, msg: &str) -> Result<()> {
        self.rt.block_on(self.inner.log(level, msg))
    }

    /// See [`crate::Client::connect_shim`]. The shim shares this client's
    /// runtime and outlives it if need be.
    pub fn connect_shim(&self, token: impl Into<Token>) -> Result<(Shim, ShimEvents)> {
        let (inner, events) = self.rt.block_on(self.inner.connect_shim(token))?;
        Ok(wrap(inner, events, self.rt.clone()))
    }
}

fn wrap(
    inner: crate::Shim,
    events: crate::ShimEvents,
    rt: Arc<tokio::runtime::Runtime>,
) -> (Shim, ShimEvents) {
    (
        Shim {
            inner,
            rt: rt.clone(),
        },
        ShimEvents { inner: events, rt },
    )
}

/// A shim; see [`crate::Shim`]. Clones share the connection and may be
/// used from different threads.
#[derive(Debug, Clone)]
pub struct Shim {
    inner: crate::Shim,
    rt: Arc<tokio::runtime::Runtime>,
}

impl Shim {
    /// Connect to the proxy at `addr` and claim `token`, with a runtime of
    /// its own.
    pub fn connect(
        addr: impl TryInto<ProxyAddr, Error = Error>,
        token: impl Into<Token>,
    ) -> Result<(Shim, ShimEvents)> {
        let addr = addr.try_into()?;
        let rt = runtime()?;
        let (inner, events) = rt.block_on(crate::Shim::connect(&addr, token))?;
        Ok(wrap(inner, events, rt))
    }

    /// The token this shim holds.
    pub fn token(&self) -> &Token {
        self.inner.token()
    }

    /// Send bytes to the process's stdin; returns once they are written to
    /// the proxy's socket.
    pub fn send_stdin(&self, data: impl Into<Bytes>) -> Result<()> {
        self.rt.block_on(async {
            self.inner.send_stdin(data).await?;
            self.inner.flush().await
        })
    }

    /// End the process's input (EOF); returns once it is written.
    pub fn close_stdin(&self) -> Result<()> {
        self.rt.block_on(async {
            self.inner.close_stdin().await?;
            self.inner.flush().await
        })
    }

    /// See [`crate::Shim::signal`].
    pub fn signal(&self, signal: i32) -> Result<()> {
        self.rt.block_on(self.inner.signal(signal))
    }

    /// See [`crate::Shim::resize`].
    pub fn resize(&self, rows: u16, columns: u16) -> Result<()> {
        self.rt.block_on(self.inner.resize(rows, columns))
    }

    /// See [`crate::Shim::log`]; returns once the line is written.
    pub fn log(&self, level: LogLevel, msg: &str) -> Result<()> {
        self.rt.block_on(async {
            self.inner.log(level, msg).await?;
            self.inner.flush().await
        })
    }

    /// See [`crate::Shim::reconnect`].
    pub fn reconnect(&self, policy: ReconnectPolicy) -> Result<()> {
        self.rt.block_on(self.inner.reconnect(policy))
    }

    /// True when the connection to the proxy is gone.
    pub fn is_disconnected(&self) -> bool {
        self.inner.is_disconnected()
    }

    /// See [`crate::Shim::disconnect`].
    pub fn disconnect(self) -> Result<()> {
        let Shim { inner, rt } = self;
        rt.block_on(inner.disconnect())
    }
}

/// A shim's process output; see [`crate::ShimEvents`].
#[derive(Debug)]
pub struct ShimEvents {
    inner: crate::ShimEvents,
    rt: Arc<tokio::runtime::Runtime>,
}

impl ShimEvents {
    /// The next event; see [`crate::ShimEvents::recv`].
    pub fn recv(&mut self) -> Result<ShimEvent> {
        self.rt.block_on(self.inner.recv())
    }

    /// The next event, or `None` if none comes within `timeout`.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<ShimEvent>> {
        self.rt.block_on(async {
            match tokio::time::timeout(timeout, self.inner.recv()).await {
                Ok(r) => r.map(Some),
                Err(_) => Ok(None),
            }
        })
    }

    /// All output until the process exits; see
    /// [`crate::ShimEvents::collect`].
    pub fn collect(&mut self) -> Result<Output> {
        self.rt.block_on(self.inner.collect())
    }
}
