//! The listening side: what a guest agent (or a test) binds.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio_vsock::VsockAddr;

use crate::addr::AgentAddr;
use crate::handshake::{read_connect, write_ok, HandshakeError};
use crate::stream::AgentStream;

/// An AF_VSOCK listener.
#[derive(Debug)]
pub struct VsockListener {
    inner: tokio_vsock::VsockListener,
}

impl VsockListener {
    /// Listen on `cid:port`; use [`VMADDR_CID_ANY`](crate::VMADDR_CID_ANY)
    /// for any local cid.
    pub fn bind(cid: u32, port: u32) -> io::Result<Self> {
        Ok(VsockListener {
            inner: tokio_vsock::VsockListener::bind(VsockAddr::new(cid, port))?,
        })
    }

    /// Accept one connection; returns the stream and the peer's `(cid, port)`.
    pub async fn accept(&self) -> io::Result<(tokio_vsock::VsockStream, (u32, u32))> {
        let (s, peer) = self.inner.accept().await?;
        Ok((s, (peer.cid(), peer.port())))
    }

    /// The local `(cid, port)`.
    pub fn local_addr(&self) -> io::Result<(u32, u32)> {
        let a = self.inner.local_addr()?;
        Ok((a.cid(), a.port()))
    }
}

/// A hybrid-vsock-style unix listener, as a VMM serves it: each accepted
/// unix connection must first send `CONNECT <port>\n`; if the port is the
/// one served (or the listener serves any port) it is answered `OK <n>\n`
/// and the stream is handed over raw, otherwise it is closed.
///
/// Handshakes are done one at a time inside [`accept`](Self::accept), each
/// bounded by the handshake timeout (default 5 s). The `OK <n>` numbers are
/// handed out from 1 upwards, like a VMM's local ports. The socket file is
/// left in place on drop; removing it is the caller's business.
#[derive(Debug)]
pub struct HybridListener {
    inner: UnixListener,
    path: PathBuf,
    port: Option<u32>,
    handshake_timeout: Duration,
    next_local_port: AtomicU32,
}

impl HybridListener {
    /// Bind a unix socket at `path` that serves guest port `port`.
    pub fn bind(path: impl AsRef<Path>, port: u32) -> io::Result<Self> {
        Self::bind_inner(path.as_ref(), Some(port))
    }

    /// Bind a unix socket at `path` that accepts `CONNECT` for any port;
    /// [`accept`](Self::accept) hands back the port asked for.
    pub fn bind_any(path: impl AsRef<Path>) -> io::Result<Self> {
        Self::bind_inner(path.as_ref(), None)
    }

    fn bind_inner(path: &Path, port: Option<u32>) -> io::Result<Self> {
        Ok(HybridListener {
            inner: UnixListener::bind(path)?,
            path: path.to_owned(),
            port,
            handshake_timeout: Duration::from_secs(5),
            next_local_port: AtomicU32::new(1),
        })
    }

    /// Set how long one client may take to send its `CONNECT` line.
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The port served, or `None` for any.
    pub fn port(&self) -> Option<u32> {
        self.port
    }

    /// The `hvsock://` address for `port` on this listener.
    pub fn addr_for(&self, port: u32) -> AgentAddr {
        AgentAddr::HybridVsock {
            path: self.path.clone(),
            port,
        }
    }

    /// Accept the next client whose handshake succeeds; returns the raw
    /// stream (positioned right after `OK <n>\n`) and the port it asked for.
    /// Clients that fail the handshake are closed and skipped.
    pub async fn accept(&self) -> io::Result<(UnixStream, u32)> {
        loop {
            let (stream, _) = self.inner.accept().await?;
            match tokio::time::timeout(self.handshake_timeout, self.handshake(stream)).await {
                Ok(Ok(accepted)) => return Ok(accepted),
                Ok(Err(e)) => {
                    tracing::debug!(path = %self.path.display(), error = %e, "hybrid vsock client refused");
                }
                Err(_elapsed) => {
                    tracing::debug!(
                        path = %self.path.display(),
                        timeout = ?self.handshake_timeout,
                        "hybrid vsock client sent no CONNECT line in time"
                    );
                }
            }
        }
    }

    /// Run the listener's side of the handshake on an already accepted
    /// stream (for callers that accept themselves).
    pub async fn handshake(
        &self,
        mut stream: UnixStream,
    ) -> Result<(UnixStream, u32), HandshakeError> {
        let requested = read_connect(&mut stream).await?;
        if let Some(served) = self.port {
            if requested != served {
                return Err(HandshakeError::WrongPort { requested, served });
            }
        }
        let n = self.next_local_port.fetch_add(1, Ordering::Relaxed);
        write_ok(&mut stream, n).await?;
        Ok((stream, requested))
    }

    /// Accept a unix connection without any handshake.
    pub async fn accept_raw(&self) -> io::Result<UnixStream> {
        Ok(self.inner.accept().await?.0)
    }
}

/// A listener for any [`AgentAddr`], yielding [`AgentStream`]s: the
/// listening counterpart of [`connect`](crate::connect).
#[derive(Debug)]
pub enum AgentListener {
    /// A plain unix socket listener.
    Unix(UnixListener),
    /// An AF_VSOCK listener.
    Vsock(VsockListener),
    /// A hybrid vsock listener serving one port.
    Hybrid(HybridListener),
}

impl AgentListener {
    /// Bind the listening side of `addr`. For `vsock://<cid>:<port>` the cid
    /// is the local one to bind (`vsock://4294967295:<port>` for any).
    pub fn bind(addr: &AgentAddr) -> io::Result<Self> {
        Ok(match addr {
            AgentAddr::Unix(path) => AgentListener::Unix(UnixListener::bind(path)?),
            AgentAddr::Vsock { cid, port } => {
                AgentListener::Vsock(VsockListener::bind(*cid, *port)?)
            }
            AgentAddr::HybridVsock { path, port } => {
                AgentListener::Hybrid(HybridListener::bind(path, *port)?)
            }
        })
    }

    /// Accept one connection (for hybrid vsock, one whose handshake
    /// succeeded).
    pub async fn accept(&self) -> io::Result<AgentStream> {
        Ok(match self {
            AgentListener::Unix(l) => AgentStream::Unix(l.accept().await?.0),
            AgentListener::Vsock(l) => AgentStream::Vsock(l.accept().await?.0),
            AgentListener::Hybrid(l) => AgentStream::Unix(l.accept().await?.0),
        })
    }
}
