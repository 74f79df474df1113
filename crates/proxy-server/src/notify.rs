//! systemd readiness notification for `Type=notify` units: `READY=1` once
//! the socket listens, `STOPPING=1` when shutdown begins. Without
//! `NOTIFY_SOCKET` in the environment (not started by systemd) both do
//! nothing.

use std::path::Path;

use sd_notify::NotifyState;
use tracing::{debug, warn};

/// The daemon listens on `socket` and accepts connections.
pub fn ready(socket: &Path) {
    let status = format!("listening on {}", socket.display());
    send(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// The daemon stops: no new connections, VMs are being torn down.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("shutting down")]);
}

fn send(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    match sd_notify::notify(states) {
        Ok(()) => debug!(states = ?states, "notified the service manager"),
        Err(e) => warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET)"),
    }
}
