//! Typed payloads of the hyperstart commands a guest agent serves.
//!
//! Lenient on input (every field has a default) so that what a runtime
//! sends through the proxy is accepted as hyperstart accepts it.

use alloc::string::String;
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

/// An environment variable of a process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvironmentVar {
    /// Name.
    pub env: String,
    /// Value.
    pub value: String,
}

/// A process to start in the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Process {
    /// Optional process id (hyperstart's exec id).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub id: String,
    /// User to run as (name or number); empty = root.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub user: String,
    /// Group to run as; empty = the user's.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub group: String,
    /// Whether the process gets a terminal (then stderr is merged).
    pub terminal: bool,
    /// io seq of stdin/stdout (set by the proxy).
    pub stdio: u64,
    /// io seq of stderr (set by the proxy; 0 with a terminal).
    pub stderr: u64,
    /// argv.
    pub args: Vec<String>,
    /// Environment.
    pub envs: Vec<EnvironmentVar>,
    /// Working directory.
    pub workdir: String,
}

/// `newcontainer` data.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Container {
    /// Container id.
    pub id: String,
    /// Root filesystem path (relative to the agent's share), may be empty.
    pub rootfs: String,
    /// The container's init process.
    pub process: Process,
}

/// `execcmd` data.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ExecCommand {
    /// The container to run in.
    pub container: String,
    /// The process.
    pub process: Process,
}

/// `killcontainer` data.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KillCommand {
    /// The container.
    pub container: String,
    /// Signal number.
    pub signal: i32,
    /// Signal every process of the container, not only its init.
    #[serde(rename = "allProcesses")]
    pub all_processes: bool,
}

/// `winsize` data.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct WindowSize {
    /// The process's io seq (its session's `io_base`).
    pub seq: u64,
    /// Rows.
    pub row: u16,
    /// Columns.
    pub column: u16,
}

/// `removecontainer` data.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RemoveContainer {
    /// The container.
    pub container: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names() {
        let k = KillCommand {
            container: "c".into(),
            signal: 15,
            all_processes: false,
        };
        assert_eq!(
            serde_json::to_string(&k).unwrap(),
            r#"{"container":"c","signal":15,"allProcesses":false}"#
        );
        let w = WindowSize {
            seq: 3,
            row: 24,
            column: 80,
        };
        assert_eq!(
            serde_json::to_string(&w).unwrap(),
            r#"{"seq":3,"row":24,"column":80}"#
        );
        let c: Container = serde_json::from_str(
            r#"{"id":"x","process":{"args":["sh"],"terminal":true,"stdio":3,"envs":[{"env":"A","value":"b"}]},"extra":1}"#,
        )
        .unwrap();
        assert_eq!(c.process.args, ["sh"]);
        assert!(c.process.terminal);
        assert_eq!(c.process.stdio, 3);
    }
}
