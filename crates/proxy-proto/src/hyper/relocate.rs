//! Relocation (docs/PROTOCOL.md §7): point a process's stdio at its session's
//! sequence numbers, leaving every other field of the command untouched.

use alloc::string::{String, ToString};
use alloc::vec::Vec;

use serde_json::{Map, Value};

use super::ctl::Code;

/// The command data after relocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relocated {
    /// The JSON to send on ctl.
    pub data: Vec<u8>,
    /// For `newcontainer`, the container's `id` (the session's container).
    pub container_id: Option<String>,
}

/// Why a command's data could not be relocated.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelocateError {
    /// Only newcontainer and execcmd start processes.
    #[error("{code} does not start a process and cannot take a token")]
    NotAProcessCommand {
        /// The command.
        code: Code,
    },
    /// The data is not valid JSON.
    #[error("invalid {code} data: {source}")]
    InvalidJson {
        /// The command.
        code: Code,
        /// The parser's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// The data is not a JSON object.
    #[error("{code} data must be a JSON object")]
    NotAnObject {
        /// The command.
        code: Code,
    },
    /// `.process` is missing or not an object.
    #[error("{code} data has no `process` object")]
    MissingProcess {
        /// The command.
        code: Code,
    },
    /// The client set `process.stdio` or `process.stderr` itself.
    #[error("{code} data sets `process.{field}` to {value}; it must be left at 0 for the proxy to assign")]
    StdioAlreadySet {
        /// The command.
        code: Code,
        /// `stdio` or `stderr`.
        field: &'static str,
        /// What the client put there.
        value: String,
    },
    /// `process.terminal` is not a boolean.
    #[error("{code} data has a non-boolean `process.terminal`")]
    InvalidTerminal {
        /// The command.
        code: Code,
    },
    /// `newcontainer` without a string `id`.
    #[error("newcontainer data has no string `id`")]
    MissingContainerId,
    /// `io_base + 1` (the session's stderr seq) does not fit in a u64.
    #[error("io_base {io_base} leaves no room for the session's stderr seq")]
    IoBaseOverflow {
        /// The base asked for.
        io_base: u64,
    },
}

/// Relocate the process in `data` (the JSON of a `newcontainer` or
/// `execcmd`) to `io_base`: `process.stdio = io_base`, and
/// `process.stderr = io_base + 1` unless `process.terminal` is true.
///
/// ```
/// use proxy_proto::hyper::{ctl::Code, relocate::relocate};
///
/// let r = relocate(Code::NewContainer, br#"{"id":"c1","process":{"args":["sh"]}}"#, 3).unwrap();
/// assert_eq!(r.container_id.as_deref(), Some("c1"));
/// assert_eq!(r.data, br#"{"id":"c1","process":{"args":["sh"],"stdio":3,"stderr":4}}"#);
/// ```
pub fn relocate(code: Code, data: &[u8], io_base: u64) -> Result<Relocated, RelocateError> {
    if !code.starts_process() {
        return Err(RelocateError::NotAProcessCommand { code });
    }
    // A session owns io_base and io_base + 1, terminal or not.
    let stderr_seq = io_base
        .checked_add(1)
        .ok_or(RelocateError::IoBaseOverflow { io_base })?;
    let mut root: Value = serde_json::from_slice(data)
        .map_err(|source| RelocateError::InvalidJson { code, source })?;
    let obj = root
        .as_object_mut()
        .ok_or(RelocateError::NotAnObject { code })?;
    let container_id = if code == Code::NewContainer {
        match obj.get("id") {
            Some(Value::String(s)) => Some(s.clone()),
            _ => return Err(RelocateError::MissingContainerId),
        }
    } else {
        None
    };
    let process = obj
        .get_mut("process")
        .and_then(Value::as_object_mut)
        .ok_or(RelocateError::MissingProcess { code })?;
    check_unset(code, process, "stdio")?;
    check_unset(code, process, "stderr")?;
    let terminal = match process.get("terminal") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(RelocateError::InvalidTerminal { code }),
    };
    process.insert("stdio".into(), Value::from(io_base));
    if !terminal {
        process.insert("stderr".into(), Value::from(stderr_seq));
    }
    // Serializing a Value we just parsed cannot fail (keys are strings).
    let data = serde_json::to_vec(&root).unwrap_or_default();
    Ok(Relocated { data, container_id })
}

fn check_unset(
    code: Code,
    process: &Map<String, Value>,
    field: &'static str,
) -> Result<(), RelocateError> {
    match process.get(field) {
        None | Some(Value::Null) => Ok(()),
        Some(v) if v.as_u64() == Some(0) => Ok(()),
        Some(v) => Err(RelocateError::StdioAlreadySet {
            code,
            field,
            value: v.to_string(),
        }),
    }
}

/// The `id` of a `newcontainer` command's data, if it has a string one.
pub fn container_id(data: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Id {
        id: String,
    }
    serde_json::from_slice::<Id>(data).ok().map(|i| i.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn execcmd_is_relocated_and_others_untouched() {
        let input = br#"{"container":"c","process":{"terminal":false,"stdio":0,"stderr":0,"args":["ls","-l"],"envs":[{"env":"A","value":"1"}],"workdir":"/","x":{"y":[1,2.5,null]}}}"#;
        let r = relocate(Code::ExecCmd, input, 7).unwrap();
        assert_eq!(r.container_id, None);
        let expect = br#"{"container":"c","process":{"terminal":false,"stdio":7,"stderr":8,"args":["ls","-l"],"envs":[{"env":"A","value":"1"}],"workdir":"/","x":{"y":[1,2.5,null]}}}"#;
        assert_eq!(
            core::str::from_utf8(&r.data).unwrap(),
            core::str::from_utf8(expect).unwrap()
        );
    }

    #[test]
    fn terminal_leaves_stderr_at_zero() {
        let r = relocate(
            Code::NewContainer,
            br#"{"id":"c","process":{"terminal":true,"stderr":0}}"#,
            3,
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&r.data).unwrap();
        assert_eq!(v["process"]["stdio"], 3);
        assert_eq!(v["process"]["stderr"], 0);
    }

    #[test]
    fn rejects_client_set_stdio() {
        let e = relocate(Code::ExecCmd, br#"{"process":{"stdio":5}}"#, 3).unwrap_err();
        assert!(matches!(
            e,
            RelocateError::StdioAlreadySet { field: "stdio", .. }
        ));
        assert!(alloc::format!("{e}").contains("process.stdio"));
        let e = relocate(Code::ExecCmd, br#"{"process":{"stderr":"x"}}"#, 3).unwrap_err();
        assert!(matches!(
            e,
            RelocateError::StdioAlreadySet {
                field: "stderr",
                ..
            }
        ));
    }

    #[test]
    fn rejects_bad_shapes() {
        assert!(matches!(
            relocate(Code::Ping, b"{}", 3).unwrap_err(),
            RelocateError::NotAProcessCommand { .. }
        ));
        assert!(matches!(
            relocate(Code::ExecCmd, b"{", 3).unwrap_err(),
            RelocateError::InvalidJson { .. }
        ));
        assert!(matches!(
            relocate(Code::ExecCmd, b"[]", 3).unwrap_err(),
            RelocateError::NotAnObject { .. }
        ));
        assert!(matches!(
            relocate(Code::ExecCmd, br#"{"process":1}"#, 3).unwrap_err(),
            RelocateError::MissingProcess { .. }
        ));
        assert!(matches!(
            relocate(Code::NewContainer, br#"{"process":{}}"#, 3).unwrap_err(),
            RelocateError::MissingContainerId
        ));
        assert!(matches!(
            relocate(Code::ExecCmd, br#"{"process":{"terminal":"yes"}}"#, 3).unwrap_err(),
            RelocateError::InvalidTerminal { .. }
        ));
    }

    #[test]
    fn regression_io_base_max_does_not_overflow() {
        // io_base + 1 (the stderr seq) overflowed and panicked in debug builds.
        let data = br#"{"container":"c","process":{"args":["sh"]}}"#;
        assert!(matches!(
            relocate(Code::ExecCmd, data, u64::MAX).unwrap_err(),
            RelocateError::IoBaseOverflow { io_base: u64::MAX }
        ));
        let r = relocate(Code::ExecCmd, data, u64::MAX - 1).unwrap();
        let v: Value = serde_json::from_slice(&r.data).unwrap();
        assert_eq!(v["process"]["stderr"], u64::MAX);
    }

    #[test]
    fn reads_container_id() {
        assert_eq!(
            container_id(br#"{"id":"abc","x":1}"#).as_deref(),
            Some("abc")
        );
        assert_eq!(container_id(br#"{"id":1}"#), None);
    }
}
