//! Typed JSON payloads of the proxy protocol (docs/PROTOCOL.md §3–§5), with the
//! wire's exact key names.
//!
//! Decoding is lenient about absent optional fields (as the reference's Go
//! decoder is) and strict about types; [`validate`](RegisterVm::validate)
//! methods apply the rules that the types alone cannot.

use alloc::borrow::ToOwned;
use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

/// A required field is missing or empty.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{command}: `{field}` is required and must not be empty")]
pub struct MissingField {
    /// The command whose payload it is.
    pub command: &'static str,
    /// The JSON key.
    pub field: &'static str,
}

fn require(command: &'static str, field: &'static str, v: &str) -> Result<(), MissingField> {
    if v.is_empty() {
        Err(MissingField { command, field })
    } else {
        Ok(())
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Most tokens one RegisterVM or AttachVM may allocate.
pub const MAX_IO_STREAMS: u32 = 4096;

/// A RegisterVM or AttachVM asks for more tokens than one request may
/// allocate ([`MAX_IO_STREAMS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("numIOStreams {0} is more than the {MAX_IO_STREAMS} one request may allocate")]
pub struct TooManyStreams(pub u32);

fn check_streams(n: u32) -> Result<(), TooManyStreams> {
    if n > MAX_IO_STREAMS {
        Err(TooManyStreams(n))
    } else {
        Ok(())
    }
}

/// `tokens`: `null` on the wire when empty (the reference's nil slice);
/// `null` or absent read as empty.
mod null_tokens {
    use super::*;

    pub fn serialize<S: Serializer>(v: &[String], s: S) -> Result<S::Ok, S::Error> {
        if v.is_empty() {
            s.serialize_none()
        } else {
            v.serialize(s)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        Ok(Option::<Vec<String>>::deserialize(d)?.unwrap_or_default())
    }
}

/// RegisterVM (command 0).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterVm {
    /// The VM's container (pod) id.
    #[serde(rename = "containerId", default)]
    pub container_id: String,
    /// Address of the agent's ctl channel.
    #[serde(rename = "ctlSerial", default)]
    pub ctl_serial: String,
    /// Address of the agent's io channel.
    #[serde(rename = "ioSerial", default)]
    pub io_serial: String,
    /// Address of the VM console (optional).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub console: String,
    /// How many I/O tokens to allocate.
    #[serde(rename = "numIOStreams", default, skip_serializing_if = "is_zero")]
    pub num_io_streams: u32,
}

impl RegisterVm {
    /// containerId, ctlSerial and ioSerial are required and non-empty.
    /// See also [`validate_streams`](Self::validate_streams).
    pub fn validate(&self) -> Result<(), MissingField> {
        require("RegisterVM", "containerId", &self.container_id)?;
        require("RegisterVM", "ctlSerial", &self.ctl_serial)?;
        require("RegisterVM", "ioSerial", &self.io_serial)
    }

    /// numIOStreams is at most [`MAX_IO_STREAMS`].
    pub fn validate_streams(&self) -> Result<(), TooManyStreams> {
        check_streams(self.num_io_streams)
    }
}

/// AttachVM (command 2).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachVm {
    /// The VM to attach to.
    #[serde(rename = "containerId", default)]
    pub container_id: String,
    /// How many more I/O tokens to allocate.
    #[serde(rename = "numIOStreams", default, skip_serializing_if = "is_zero")]
    pub num_io_streams: u32,
}

impl AttachVm {
    /// containerId is required. See also
    /// [`validate_streams`](Self::validate_streams).
    pub fn validate(&self) -> Result<(), MissingField> {
        require("AttachVM", "containerId", &self.container_id)
    }

    /// numIOStreams is at most [`MAX_IO_STREAMS`].
    pub fn validate_streams(&self) -> Result<(), TooManyStreams> {
        check_streams(self.num_io_streams)
    }
}

/// UnregisterVM (command 1).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnregisterVm {
    /// The VM to unregister.
    #[serde(rename = "containerId", default)]
    pub container_id: String,
}

impl UnregisterVm {
    /// containerId is required.
    pub fn validate(&self) -> Result<(), MissingField> {
        require("UnregisterVM", "containerId", &self.container_id)
    }
}

/// Hyper (command 3). `data` is kept as raw JSON, byte for byte.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hyper {
    /// hyperstart command name.
    #[serde(rename = "hyperName", default)]
    pub hyper_name: String,
    /// I/O tokens (0 or 1, only for newcontainer and execcmd).
    #[serde(default, with = "null_tokens")]
    pub tokens: Vec<String>,
    /// The command's data, untouched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Box<RawValue>>,
}

impl Hyper {
    /// A Hyper payload; `data` must be valid JSON.
    pub fn new(
        hyper_name: impl Into<String>,
        tokens: Vec<String>,
        data: Option<&str>,
    ) -> Result<Self, serde_json::Error> {
        Ok(Self {
            hyper_name: hyper_name.into(),
            tokens,
            data: data
                .map(|d| RawValue::from_string(d.to_owned()))
                .transpose()?,
        })
    }

    /// The data's bytes, or empty.
    pub fn data_bytes(&self) -> &[u8] {
        self.data.as_deref().map_or(&[][..], |d| d.get().as_bytes())
    }

    /// hyperName is required.
    pub fn validate(&self) -> Result<(), MissingField> {
        require("Hyper", "hyperName", &self.hyper_name)
    }
}

impl PartialEq for Hyper {
    fn eq(&self, other: &Self) -> bool {
        self.hyper_name == other.hyper_name
            && self.tokens == other.tokens
            && self.data.as_deref().map(RawValue::get) == other.data.as_deref().map(RawValue::get)
    }
}

/// ConnectShim (command 4).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectShim {
    /// The I/O token to claim.
    #[serde(default)]
    pub token: String,
    /// This project's extension (docs/PROTOCOL.md §10.8): how much of the
    /// session's output the shim side has received, to resume exactly
    /// there. Reference clients never send it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<Resume>,
}

/// Where a shim resumes: payload bytes of stdout and of stderr received
/// since the session began, across every connection that held the token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    /// stdout bytes received.
    #[serde(default)]
    pub stdout: u64,
    /// stderr bytes received.
    #[serde(default)]
    pub stderr: u64,
}

impl ConnectShim {
    /// token is required.
    pub fn validate(&self) -> Result<(), MissingField> {
        require("ConnectShim", "token", &self.token)
    }
}

/// DisconnectShim (command 5): `{}` or no payload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisconnectShim {}

/// Signal (command 6). Numbers are signed on the wire (Go `int`), so a
/// negative number decodes and is then refused by the proxy's rules.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signal {
    /// Signal number (0–30 accepted).
    #[serde(rename = "signalNumber", default)]
    pub signal_number: i64,
    /// Terminal columns, SIGWINCH only.
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub columns: i64,
    /// Terminal rows, SIGWINCH only.
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub rows: i64,
}

fn is_zero_i64(n: &i64) -> bool {
    *n == 0
}

/// SIGWINCH: the one signal that carries a terminal size.
pub const SIGWINCH: i64 = 28;
/// Signals `0..MAX_SIGNAL` are accepted (the reference rejects ≥ 31).
pub const MAX_SIGNAL: i64 = 31;

/// Why a [`Signal`] payload is refused. The `Display` text is the proxy's
/// error response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignalError {
    /// A signal number outside `0..MAX_SIGNAL`.
    #[error("invalid signal number {0} (accepted: 0 to 30)")]
    OutOfRange(i64),
    /// SIGWINCH without a size.
    #[error("SIGWINCH needs non-zero columns and rows (got columns {columns}, rows {rows})")]
    WinchWithoutSize {
        /// Columns given.
        columns: i64,
        /// Rows given.
        rows: i64,
    },
    /// A size given with a signal other than SIGWINCH.
    #[error("signal {0} must not carry columns or rows (only SIGWINCH does)")]
    SizeWithoutWinch(i64),
    /// A terminal size that does not fit the agent's 16-bit fields.
    #[error("terminal size out of range (columns {columns}, rows {rows})")]
    SizeOutOfRange {
        /// Columns given.
        columns: i64,
        /// Rows given.
        rows: i64,
    },
}

impl Signal {
    /// The rules of docs/PROTOCOL.md §3 (Signal): the number is in `0..=30`;
    /// SIGWINCH carries non-zero columns and rows that fit in 16 bits;
    /// any other signal carries neither.
    pub fn validate(&self) -> Result<(), SignalError> {
        let (n, columns, rows) = (self.signal_number, self.columns, self.rows);
        if !(0..MAX_SIGNAL).contains(&n) {
            return Err(SignalError::OutOfRange(n));
        }
        if n != SIGWINCH {
            return if columns != 0 || rows != 0 {
                Err(SignalError::SizeWithoutWinch(n))
            } else {
                Ok(())
            };
        }
        if columns == 0 || rows == 0 {
            return Err(SignalError::WinchWithoutSize { columns, rows });
        }
        let fits = |v: i64| (1..=i64::from(u16::MAX)).contains(&v);
        if !fits(columns) || !fits(rows) {
            return Err(SignalError::SizeOutOfRange { columns, rows });
        }
        Ok(())
    }
}

/// The `io` object of RegisterVM and AttachVM responses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoResponse {
    /// The proxy's socket as `unix://…` (key is upper-case `URL`).
    #[serde(rename = "URL", alias = "url", default)]
    pub url: String,
    /// The allocated tokens; `null` when none.
    #[serde(default, with = "null_tokens")]
    pub tokens: Vec<String>,
}

/// RegisterVM's (and AttachVM's) success payload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterVmResponse {
    /// Where shims connect, and their tokens.
    pub io: IoResponse,
}

/// AttachVM's success payload: the same shape as RegisterVM's.
pub type AttachVmResponse = RegisterVmResponse;

/// An error response's payload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// What went wrong.
    #[serde(default)]
    pub msg: String,
}

/// Who wrote a log entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogSource {
    /// A shim.
    Shim,
    /// A runtime.
    Runtime,
}

/// A log entry's level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Debug.
    Debug,
    /// Info.
    Info,
    /// Warning.
    Warn,
    /// Error.
    Error,
}

/// The log stream's payload (stream 3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Who wrote it.
    pub source: LogSource,
    /// The container it is about (optional).
    #[serde(
        rename = "containerId",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub container_id: String,
    /// Level.
    pub level: LogLevel,
    /// Message.
    pub msg: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_vm_wire_names_and_validation() {
        let r: RegisterVm = serde_json::from_str(
            r#"{"containerId":"c","ctlSerial":"/a","ioSerial":"/b","numIOStreams":2}"#,
        )
        .unwrap();
        assert_eq!(r.num_io_streams, 2);
        r.validate().unwrap();
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"containerId":"c","ctlSerial":"/a","ioSerial":"/b","numIOStreams":2}"#
        );
        let r: RegisterVm = serde_json::from_str(r#"{"containerId":"c","ioSerial":"/b"}"#).unwrap();
        let e = r.validate().unwrap_err();
        assert_eq!(e.field, "ctlSerial");
        assert_eq!(
            alloc::format!("{e}"),
            "RegisterVM: `ctlSerial` is required and must not be empty"
        );
        assert!(serde_json::from_str::<RegisterVm>(r#"{"numIOStreams":-1}"#).is_err());
    }

    #[test]
    fn io_response_url_upper_case_and_null_tokens() {
        let r = RegisterVmResponse {
            io: IoResponse {
                url: "unix:///run/p.sock".into(),
                tokens: Vec::new(),
            },
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"io":{"URL":"unix:///run/p.sock","tokens":null}}"#
        );
        let r2: RegisterVmResponse =
            serde_json::from_str(r#"{"io":{"url":"unix:///x","tokens":["a","b"]}}"#).unwrap();
        assert_eq!(r2.io.tokens, ["a", "b"]);
        assert_eq!(r2.io.url, "unix:///x");
    }

    #[test]
    fn hyper_keeps_data_byte_for_byte() {
        let wire = r#"{"hyperName":"execcmd","tokens":null,"data":{"b":1,  "a":[ 2 ,3]}}"#;
        let h: Hyper = serde_json::from_str(wire).unwrap();
        assert!(h.tokens.is_empty());
        assert_eq!(h.data_bytes(), br#"{"b":1,  "a":[ 2 ,3]}"#);
        assert_eq!(
            serde_json::to_string(&h).unwrap(),
            r#"{"hyperName":"execcmd","tokens":null,"data":{"b":1,  "a":[ 2 ,3]}}"#
        );
        let h: Hyper = serde_json::from_str(r#"{"hyperName":"ping"}"#).unwrap();
        assert!(h.data.is_none() && h.tokens.is_empty());
        let h = Hyper::new("ping", Vec::new(), None).unwrap();
        assert_eq!(h.data_bytes(), b"");
        let h: Hyper = serde_json::from_str(r#"{"hyperName":"","tokens":[]}"#).unwrap();
        assert_eq!(h.validate().unwrap_err().field, "hyperName");
    }

    #[test]
    fn signal_and_log_entry() {
        let s: Signal =
            serde_json::from_str(r#"{"signalNumber":28,"columns":80,"rows":24}"#).unwrap();
        assert_eq!((s.signal_number, s.columns, s.rows), (28, 80, 24));
        assert_eq!(
            serde_json::to_string(&Signal {
                signal_number: 15,
                ..Default::default()
            })
            .unwrap(),
            r#"{"signalNumber":15}"#
        );
        let s: Signal = serde_json::from_str(r#"{"signalNumber":-1}"#).unwrap();
        assert_eq!(s.signal_number, -1);
        let l: LogEntry =
            serde_json::from_str(r#"{"source":"shim","level":"warn","msg":"m"}"#).unwrap();
        assert_eq!(l.level, LogLevel::Warn);
        assert!(
            serde_json::from_str::<LogEntry>(r#"{"source":"x","level":"warn","msg":"m"}"#).is_err()
        );
        assert!(
            serde_json::from_str::<LogEntry>(r#"{"source":"shim","level":"loud","msg":"m"}"#)
                .is_err()
        );
    }

    fn sig(signal_number: i64, columns: i64, rows: i64) -> Signal {
        Signal {
            signal_number,
            columns,
            rows,
        }
    }

    #[test]
    fn signal_numbers_0_to_30_are_accepted_and_others_refused() {
        for n in 0..MAX_SIGNAL {
            if n != SIGWINCH {
                assert_eq!(sig(n, 0, 0).validate(), Ok(()), "signal {n}");
            }
        }
        for n in [-1, 31, 64, i64::MIN, i64::MAX] {
            let e = sig(n, 0, 0).validate().unwrap_err();
            assert_eq!(e, SignalError::OutOfRange(n));
            assert_eq!(
                alloc::format!("{e}"),
                alloc::format!("invalid signal number {n} (accepted: 0 to 30)")
            );
        }
        // The range is checked before the size.
        assert_eq!(sig(31, 80, 24).validate(), Err(SignalError::OutOfRange(31)));
    }

    #[test]
    fn sigwinch_needs_non_zero_columns_and_rows() {
        assert_eq!(sig(SIGWINCH, 80, 24).validate(), Ok(()));
        assert_eq!(sig(SIGWINCH, 1, 1).validate(), Ok(()));
        assert_eq!(sig(SIGWINCH, 65535, 65535).validate(), Ok(()));
        for (c, r) in [(0, 0), (0, 24), (80, 0)] {
            let e = sig(SIGWINCH, c, r).validate().unwrap_err();
            assert_eq!(
                e,
                SignalError::WinchWithoutSize {
                    columns: c,
                    rows: r
                }
            );
            assert_eq!(
                alloc::format!("{e}"),
                alloc::format!(
                    "SIGWINCH needs non-zero columns and rows (got columns {c}, rows {r})"
                )
            );
        }
    }

    #[test]
    fn sigwinch_size_must_fit_16_bits() {
        for (c, r) in [(65536, 24), (80, 65536), (-1, 24), (80, -5), (i64::MAX, 1)] {
            let e = sig(SIGWINCH, c, r).validate().unwrap_err();
            assert_eq!(
                e,
                SignalError::SizeOutOfRange {
                    columns: c,
                    rows: r
                }
            );
            assert_eq!(
                alloc::format!("{e}"),
                alloc::format!("terminal size out of range (columns {c}, rows {r})")
            );
        }
    }

    #[test]
    fn only_sigwinch_carries_a_size() {
        for (c, r) in [(80, 24), (80, 0), (0, 24), (-1, 0)] {
            let e = sig(15, c, r).validate().unwrap_err();
            assert_eq!(e, SignalError::SizeWithoutWinch(15));
            assert_eq!(
                alloc::format!("{e}"),
                "signal 15 must not carry columns or rows (only SIGWINCH does)"
            );
        }
    }

    #[test]
    fn num_io_streams_is_at_most_4096_per_request() {
        let mut r = RegisterVm {
            num_io_streams: MAX_IO_STREAMS,
            ..Default::default()
        };
        assert_eq!(r.validate_streams(), Ok(()));
        r.num_io_streams = 0;
        assert_eq!(r.validate_streams(), Ok(()));
        r.num_io_streams = MAX_IO_STREAMS + 1;
        let e = r.validate_streams().unwrap_err();
        assert_eq!(e, TooManyStreams(4097));
        assert_eq!(
            alloc::format!("{e}"),
            "numIOStreams 4097 is more than the 4096 one request may allocate"
        );
        let mut a = AttachVm {
            container_id: "c".into(),
            num_io_streams: MAX_IO_STREAMS,
        };
        assert_eq!(a.validate_streams(), Ok(()));
        a.num_io_streams = u32::MAX;
        assert_eq!(a.validate_streams(), Err(TooManyStreams(u32::MAX)));
    }
}
