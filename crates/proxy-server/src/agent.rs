//! Reaching the agent's channels. The daemon does not care which transport
//! carries them (PROTOCOL.md §8): the address picks it.

use std::time::Duration;

use tokio::net::UnixStream;
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
    let path = addr.strip_prefix("unix://").unwrap_or(addr);
    let mut delay = Duration::from_millis(5);
    loop {
        match UnixStream::connect(path).await {
            Ok(s) => {
                let (r, w) = s.into_split();
                return Ok((Box::new(r), Box::new(w)));
            }
            Err(e) if Instant::now() + delay < deadline => {
                tracing::trace!(error = %e, "retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(200));
            }
            Err(e) => {
                return Err(ProxyError::AgentIo(format!(
                    "connecting to the agent's {what} channel at {addr}: {e}"
                )))
            }
        }
    }
}
