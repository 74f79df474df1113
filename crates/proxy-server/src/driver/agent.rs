//! Reaching the agent's channels. The daemon does not care which transport
//! carries them (docs/PROTOCOL.md §8): the address picks it — a plain path or
//! `unix:///path` (virtio-serial), `vsock://cid:port` (AF_VSOCK) or
//! `hvsock://path:port` (hybrid vsock) — and `proxy-vsock` does the rest.
//!
//! A unix socket that is missing, refuses, is not a socket or may not be
//! opened is an error at once, as in the reference: the hypervisor creates
//! these sockets before the runtime registers the VM, so waiting only hides
//! a typo. Retrying is kept where waiting is the point — a hybrid vsock
//! `CONNECT` before the guest listens, an AF_VSOCK port the guest has not
//! opened yet — bounded by `--dial-timeout`.
//!
//! The dialing goes through an [`AgentConnector`] trait object —
//! [`Connector`](proxy_vsock::Connector), the real transports, unless a
//! test gave [`Shared`](crate::server::Shared) another one.

use std::sync::Arc;
use std::time::Duration;

use proxy_vsock::{AgentAddr, AgentConnector, AgentStream, ConnectOptions};
use tokio::time::Instant;

use crate::registry::ProxyError;
use crate::vm::{AgentRead, AgentWrite};

/// How one channel is dialed, and how long that may take.
#[derive(Debug, Clone)]
pub struct Dial {
    /// The whole registration's deadline (`--ready-timeout`).
    pub deadline: Instant,
    /// The longest a single channel's dial may retry (`--dial-timeout`).
    pub dial_timeout: Duration,
    /// The transports.
    pub connector: Arc<dyn AgentConnector>,
}

impl Dial {
    /// Connect to one agent channel (`channel` is "ctl", "io" or
    /// "console").
    pub async fn connect(
        &self,
        channel: &'static str,
        addr: &str,
    ) -> Result<(AgentRead, AgentWrite), ProxyError> {
        let parsed: AgentAddr = addr
            .parse()
            .map_err(|source| ProxyError::AgentAddr { channel, source })?;
        let budget = self
            .deadline
            .saturating_duration_since(Instant::now())
            .min(self.dial_timeout)
            .max(Duration::from_millis(1));
        let opts = ConnectOptions::default()
            .with_timeout(budget)
            .with_handshake_timeout(budget);
        let stream = self
            .connector
            .connect(&parsed, &opts)
            .await
            .map_err(|source| ProxyError::AgentDial { channel, source })?;
        Ok(match stream {
            // Owned halves: no lock between the reading and the writing task.
            AgentStream::Unix(s) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            other => {
                let (r, w) = tokio::io::split(other);
                (Box::new(r), Box::new(w))
            }
        })
    }
}
