//! The one error type of the client.

use std::path::PathBuf;

use proxy_proto::Command;

/// What went wrong talking to the proxy.
///
/// Three kinds are kept apart, because callers react to them differently:
///
/// - the **connection** is gone ([`Error::Connect`], [`Error::ConnectionLost`],
///   [`Error::Closed`]): reconnect, or give up;
/// - the proxy **violated the protocol** ([`Error::Protocol`]): a bug or a
///   peer that is not a cc-proxy; the connection is closed;
/// - the proxy **refused the command** ([`Error::Proxy`]), with its message:
///   the connection is still good.
///
/// Arguments that could never be valid on the wire are refused before
/// anything is sent ([`Error::InvalidArgument`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The proxy address is not a path or a `unix://` URL.
    #[error("invalid proxy address `{addr}`: {reason}")]
    InvalidAddress {
        /// The address as given.
        addr: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// Connecting to the proxy's socket failed.
    #[error("cannot connect to the proxy at {}: {reason}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The operating system's reason.
        reason: String,
    },
    /// The connection to the proxy broke (closed by the proxy, or an I/O
    /// error) before the answer came.
    #[error("connection to the proxy lost: {reason}")]
    ConnectionLost {
        /// What happened.
        reason: String,
    },
    /// The handle was closed on purpose (disconnected or dropped); nothing
    /// more will come.
    #[error("the connection was closed")]
    Closed,
    /// The proxy sent something the protocol does not allow (a malformed
    /// frame, a response to nothing, a stream on a runtime connection…).
    /// The connection is closed.
    #[error("protocol violation by the proxy: {0}")]
    Protocol(String),
    /// The proxy answered the command with an error response.
    #[error("{} failed: {msg}", command.name())]
    Proxy {
        /// The command that failed.
        command: Command,
        /// The proxy's message (for Hyper, often the agent's).
        msg: String,
    },
    /// An argument that the proxy would refuse, caught before sending.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl Error {
    /// The connection is gone ([`Error::Connect`], [`Error::ConnectionLost`]
    /// or [`Error::Closed`]): the cases where reconnecting may help.
    pub fn is_connection(&self) -> bool {
        matches!(
            self,
            Self::Connect { .. } | Self::ConnectionLost { .. } | Self::Closed
        )
    }

    /// The proxy's message, for an error response.
    pub fn proxy_msg(&self) -> Option<&str> {
        match self {
            Self::Proxy { msg, .. } => Some(msg),
            _ => None,
        }
    }

    pub(crate) fn lost(reason: impl Into<String>) -> Self {
        Self::ConnectionLost {
            reason: reason.into(),
        }
    }
}

/// The client's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
