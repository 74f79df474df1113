//! Reaching the agent's channels. The daemon does not care which transport
//! carries them (docs/PROTOCOL.md §8): the address picks it — a plain path or
//! `unix:///path` (virtio-serial), `vsock://cid:port` (AF_VSOCK) or
//! `hvsock://path:port` (hybrid vsock) — and `proxy-vsock` does the rest.

use std::time::Duration;

use proxy_vsock::{AgentAddr, AgentStream, ConnectOptions};
use tokio::time::Instant;

use crate::registry::ProxyError;
use crate::vm::{AgentRead, AgentWrite};

/// Connect to one agent channel (`what` is "ctl", "io" or "console"),
/// retrying until `deadline` while the hypervisor brings it up.
pub async fn connect(
    what: &str,
    addr: &str,
    deadline: Instant,
) -> Result<(AgentRead, AgentWrite), ProxyError> {
    let parsed: AgentAddr = addr
        .parse()
        .map_err(|e| ProxyError::AgentIo(format!("the {what} address {addr:?} is invalid: {e}")))?;
    let budget = deadline.saturating_duration_since(Instant::now());
    let opts = ConnectOptions::default()
        .with_timeout(budget.max(Duration::from_millis(1)))
        .with_handshake_timeout(budget.max(Duration::from_millis(1)));
    let stream = proxy_vsock::connect(&parsed, &opts).await.map_err(|e| {
        ProxyError::AgentIo(format!("connecting to the agent's {what} channel: {e}"))
    })?;
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
