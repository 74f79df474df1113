//! Connecting to an agent channel, with retries and a bounded total time.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::time::Duration;

use tokio::net::UnixStream;
use tokio::time::Instant;
use tokio_vsock::{VsockAddr, VsockStream};

use crate::addr::AgentAddr;
use crate::handshake::{client_handshake, HandshakeError};
use crate::stream::AgentStream;

/// What [`AgentConnector::connect`] returns: a boxed future, so that the
/// trait can be a trait object.
pub type ConnectFuture<'a> =
    Pin<Box<dyn Future<Output = Result<AgentStream, ConnectError>> + Send + 'a>>;

/// What the proxy needs from a transport: a byte stream to one agent
/// channel, and nothing more.
///
/// Object safe: the daemon holds an `Arc<dyn AgentConnector>` —
/// [`Connector`], the real transports, unless a test substitutes its own
/// (an in-memory [`AgentStream::Other`], a transport that fails on
/// purpose…).
pub trait AgentConnector: Send + Sync + std::fmt::Debug {
    /// Open a new connection to the channel at `addr`, trying as hard as
    /// `opts` says.
    fn connect<'a>(&'a self, addr: &'a AgentAddr, opts: &'a ConnectOptions) -> ConnectFuture<'a>;
}

/// How hard [`connect`] tries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectOptions {
    /// Total time allowed for all attempts together (default 10 s).
    pub timeout: Duration,
    /// Time allowed for one hybrid vsock handshake, from the `CONNECT` line
    /// to the `OK` line (default 5 s). A handshake that takes longer is not
    /// retried.
    pub handshake_timeout: Duration,
    /// First pause between attempts (default 10 ms); doubled after each
    /// failed attempt.
    pub retry_initial: Duration,
    /// Longest pause between attempts (default 200 ms).
    pub retry_max: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(5),
            retry_initial: Duration::from_millis(10),
            retry_max: Duration::from_millis(200),
        }
    }
}

impl ConnectOptions {
    /// These options with a different total timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// These options with a different handshake timeout.
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }
}

/// Why a connection to an agent channel could not be made. Every variant
/// names the address and the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The socket connect itself failed.
    #[error("connect to {addr} failed: {source}")]
    Connect {
        /// The address.
        addr: AgentAddr,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The hybrid vsock handshake failed (write, read, unexpected reply…).
    #[error("hybrid vsock handshake with {addr} failed: {source}")]
    Handshake {
        /// The address.
        addr: AgentAddr,
        /// What went wrong.
        #[source]
        source: HandshakeError,
    },
    /// The hybrid vsock handshake did not finish in time.
    #[error("hybrid vsock handshake with {addr} timed out after {waited:?} without an OK line")]
    HandshakeTimeout {
        /// The address.
        addr: AgentAddr,
        /// The handshake timeout.
        waited: Duration,
    },
    /// No attempt succeeded within the total timeout.
    #[error(
        "connecting to {addr} timed out after {waited:?} ({attempts} attempts); last error: {}",
        describe_last(.last)
    )]
    Timeout {
        /// The address.
        addr: AgentAddr,
        /// The total timeout ([`ConnectOptions::timeout`]).
        waited: Duration,
        /// How many attempts were started.
        attempts: u32,
        /// The error of the last attempt that finished, if any did.
        #[source]
        last: Option<Box<ConnectError>>,
    },
}

fn describe_last(last: &Option<Box<ConnectError>>) -> String {
    match last {
        Some(e) => e.to_string(),
        None => "none (the first attempt did not finish)".to_owned(),
    }
}

impl ConnectError {
    /// The address this error is about.
    pub fn addr(&self) -> &AgentAddr {
        match self {
            ConnectError::Connect { addr, .. }
            | ConnectError::Handshake { addr, .. }
            | ConnectError::HandshakeTimeout { addr, .. }
            | ConnectError::Timeout { addr, .. } => addr,
        }
    }

    /// Whether another attempt may succeed. A unix socket (a virtio-serial
    /// channel, or the hybrid vsock socket of the hypervisor) that is
    /// missing, refuses, is no socket or may not be opened will not mend
    /// itself: the hypervisor creates it before anyone dials, so that is
    /// an error at once. What does mend is a guest that is not listening
    /// yet: a hybrid vsock socket that accepts and then closes the
    /// `CONNECT`, or an AF_VSOCK port that refuses or resets.
    pub fn is_retryable(&self) -> bool {
        match self {
            ConnectError::Connect {
                addr: AgentAddr::Vsock { .. },
                source,
            } => {
                matches!(
                    source.kind(),
                    io::ErrorKind::ConnectionRefused
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::WouldBlock
                        | io::ErrorKind::Interrupted
                ) || matches!(
                    source.raw_os_error(),
                    Some(libc::ECONNREFUSED | libc::EAGAIN | libc::ECONNRESET | libc::ENODEV)
                )
            }
            ConnectError::Connect { source, .. } => {
                // A unix socket: only a signal's interruption is worth
                // another try.
                source.kind() == io::ErrorKind::Interrupted
            }
            ConnectError::Handshake { source, .. } => source.is_peer_gone(),
            ConnectError::HandshakeTimeout { .. } | ConnectError::Timeout { .. } => false,
        }
    }
}

/// For callers that speak `io::Result`: the kind is `TimedOut` for
/// timeouts, the underlying kind for connect errors, and otherwise
/// `ConnectionAborted` (handshake failures); the message is kept whole.
impl From<ConnectError> for io::Error {
    fn from(e: ConnectError) -> Self {
        let kind = match &e {
            ConnectError::Connect { source, .. } => source.kind(),
            ConnectError::HandshakeTimeout { .. } | ConnectError::Timeout { .. } => {
                io::ErrorKind::TimedOut
            }
            ConnectError::Handshake { .. } => io::ErrorKind::ConnectionAborted,
        };
        io::Error::new(kind, e)
    }
}

/// One attempt, without retries.
async fn connect_once(
    addr: &AgentAddr,
    opts: &ConnectOptions,
) -> Result<AgentStream, ConnectError> {
    let connect_err = |source| ConnectError::Connect {
        addr: addr.clone(),
        source,
    };
    match addr {
        AgentAddr::Unix(path) => {
            let s = UnixStream::connect(path).await.map_err(connect_err)?;
            Ok(AgentStream::Unix(s))
        }
        AgentAddr::Vsock { cid, port } => {
            let s = VsockStream::connect(VsockAddr::new(*cid, *port))
                .await
                .map_err(connect_err)?;
            Ok(AgentStream::Vsock(s))
        }
        AgentAddr::HybridVsock { path, port } => {
            let mut s = UnixStream::connect(path).await.map_err(connect_err)?;
            match tokio::time::timeout(opts.handshake_timeout, client_handshake(&mut s, *port))
                .await
            {
                Ok(Ok(local_port)) => {
                    tracing::debug!(%addr, local_port, "hybrid vsock handshake done");
                    Ok(AgentStream::Unix(s))
                }
                Ok(Err(source)) => Err(ConnectError::Handshake {
                    addr: addr.clone(),
                    source,
                }),
                Err(_elapsed) => Err(ConnectError::HandshakeTimeout {
                    addr: addr.clone(),
                    waited: opts.handshake_timeout,
                }),
            }
        }
    }
}

/// Connect to `addr`, retrying with backoff while the guest is not
/// listening yet (see [`ConnectError::is_retryable`]), for at most
/// `opts.timeout` in total.
pub async fn connect(addr: &AgentAddr, opts: &ConnectOptions) -> Result<AgentStream, ConnectError> {
    let start = Instant::now();
    let deadline = start + opts.timeout;
    let mut backoff = opts.retry_initial;
    let mut attempts = 0u32;
    let mut last: Option<ConnectError> = None;
    let timeout_err = |attempts, last: Option<ConnectError>| ConnectError::Timeout {
        addr: addr.clone(),
        waited: opts.timeout,
        attempts,
        last: last.map(Box::new),
    };
    loop {
        attempts += 1;
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, connect_once(addr, opts)).await {
            Ok(Ok(stream)) => {
                tracing::debug!(%addr, attempts, "agent channel connected");
                return Ok(stream);
            }
            Ok(Err(e)) if e.is_retryable() => {
                tracing::debug!(%addr, attempts, error = %e, "agent channel not ready, retrying");
                last = Some(e);
            }
            Ok(Err(e)) => return Err(e),
            Err(_elapsed) => return Err(timeout_err(attempts, last)),
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(timeout_err(attempts, last));
        }
        tokio::time::sleep(backoff.min(remaining)).await;
        backoff = (backoff * 2).min(opts.retry_max);
    }
}

/// The real transports, for any [`AgentAddr`]: [`connect`] as an
/// [`AgentConnector`]. What the daemon uses unless told otherwise.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Connector;

impl AgentConnector for Connector {
    fn connect<'a>(&'a self, addr: &'a AgentAddr, opts: &'a ConnectOptions) -> ConnectFuture<'a> {
        Box::pin(connect(addr, opts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_classification() {
        let addr: AgentAddr = "/x".parse().unwrap();
        let c = |errno| ConnectError::Connect {
            addr: addr.clone(),
            source: io::Error::from_raw_os_error(errno),
        };
        // A unix socket that is missing, refuses, is no socket or may not
        // be opened: an error at once.
        for errno in [
            libc::ECONNREFUSED,
            libc::ENOENT,
            libc::EACCES,
            libc::ENOTSOCK,
        ] {
            assert!(!c(errno).is_retryable(), "errno {errno}");
        }
        // An AF_VSOCK port the guest has not opened yet: try again.
        let vsock: AgentAddr = "vsock://3:1024".parse().unwrap();
        let v = |errno| ConnectError::Connect {
            addr: vsock.clone(),
            source: io::Error::from_raw_os_error(errno),
        };
        assert!(v(libc::ECONNREFUSED).is_retryable());
        assert!(v(libc::ECONNRESET).is_retryable());
        assert!(!v(libc::EACCES).is_retryable());
        let h = |source| ConnectError::Handshake {
            addr: addr.clone(),
            source,
        };
        assert!(h(HandshakeError::Closed {
            expected: "OK",
            received: String::new()
        })
        .is_retryable());
        assert!(h(HandshakeError::Write {
            line: "CONNECT 1".into(),
            source: io::Error::from_raw_os_error(libc::EPIPE)
        })
        .is_retryable());
        assert!(h(HandshakeError::Read {
            expected: "OK",
            received: String::new(),
            source: io::Error::from_raw_os_error(libc::ECONNRESET)
        })
        .is_retryable());
        assert!(!h(HandshakeError::UnexpectedReply { line: "NO".into() }).is_retryable());
    }

    #[test]
    fn timeout_message_names_duration_and_last_error() {
        let addr: AgentAddr = "/x".parse().unwrap();
        let e = ConnectError::Timeout {
            addr: addr.clone(),
            waited: Duration::from_millis(300),
            attempts: 4,
            last: Some(Box::new(ConnectError::Connect {
                addr,
                source: io::Error::from_raw_os_error(libc::ENOENT),
            })),
        };
        let s = e.to_string();
        assert!(
            s.contains("connecting to /x timed out after 300ms (4 attempts)"),
            "{s}"
        );
        assert!(s.contains("last error: connect to /x failed"), "{s}");
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn converts_to_io_error_keeping_the_message() {
        let addr: AgentAddr = "/x".parse().unwrap();
        let e = ConnectError::HandshakeTimeout {
            addr,
            waited: Duration::from_millis(5),
        };
        let msg = e.to_string();
        let io: io::Error = e.into();
        assert_eq!(io.kind(), io::ErrorKind::TimedOut);
        assert_eq!(io.to_string(), msg);
    }

    #[test]
    fn the_connector_is_a_trait_object() {
        let c: std::sync::Arc<dyn AgentConnector> = std::sync::Arc::new(Connector);
        drop(c);
    }
}
