//! The proxy frame header (docs/PROTOCOL.md §2): what the 12 bytes say, and what
//! we accept.
//!
//! Parsing is two steps, as in h2: [`RawHeader::parse`] never fails and gives
//! the raw fields; [`RawHeader::validate`] turns them into a typed [`Header`]
//! or a [`FrameError`] that says what was wrong.

use crate::error::FrameError;

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 2;
/// Size of the fixed part of the header, in bytes.
pub const HEADER_LEN: usize = 12;
/// Minimum header length, in 32-bit words.
pub const MIN_HEADER_WORDS: u8 = 3;
/// The Error flag, as it sits in byte 6 (high nibble, bit 4).
pub const ERROR_FLAG: u8 = 0x10;

/// The frame type (low nibble of byte 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// Client → proxy request.
    Command = 0,
    /// Proxy → client answer to a command.
    Response = 1,
    /// Raw data: stdin, stdout, stderr, log.
    Stream = 2,
    /// Proxy → shim event (process exited).
    Notification = 3,
}

impl FrameType {
    /// The type for a raw nibble, if it is one.
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Command),
            1 => Some(Self::Response),
            2 => Some(Self::Stream),
            3 => Some(Self::Notification),
            _ => None,
        }
    }

    /// How many opcodes exist for this type; an opcode ≥ this is rejected.
    pub const fn opcode_count(self) -> u8 {
        match self {
            Self::Command | Self::Response => 7,
            Self::Stream => 4,
            Self::Notification => 1,
        }
    }

    /// Lower-case name, for messages.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Command => "command",
            Self::Response => "response",
            Self::Stream => "stream",
            Self::Notification => "notification",
        }
    }
}

impl core::fmt::Display for FrameType {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// Command opcodes (type 0); responses (type 1) reuse them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Command {
    /// Register a new VM and connect to its agent.
    RegisterVm = 0,
    /// Remove a VM from the set clients can attach to.
    UnregisterVm = 1,
    /// Attach to an already-registered VM.
    AttachVm = 2,
    /// Forward a hyperstart command to the agent.
    Hyper = 3,
    /// Claim an I/O token: the connection becomes a shim.
    ConnectShim = 4,
    /// Release the token and close (no response).
    DisconnectShim = 5,
    /// Send a signal (or a window size) to the shim's process.
    Signal = 6,
}

impl Command {
    /// All commands, in opcode order.
    pub const ALL: [Command; 7] = [
        Self::RegisterVm,
        Self::UnregisterVm,
        Self::AttachVm,
        Self::Hyper,
        Self::ConnectShim,
        Self::DisconnectShim,
        Self::Signal,
    ];

    /// The command for a raw opcode, if it is one.
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::RegisterVm),
            1 => Some(Self::UnregisterVm),
            2 => Some(Self::AttachVm),
            3 => Some(Self::Hyper),
            4 => Some(Self::ConnectShim),
            5 => Some(Self::DisconnectShim),
            6 => Some(Self::Signal),
            _ => None,
        }
    }

    /// The name the reference uses.
    pub const fn name(self) -> &'static str {
        match self {
            Self::RegisterVm => "RegisterVM",
            Self::UnregisterVm => "UnregisterVM",
            Self::AttachVm => "AttachVM",
            Self::Hyper => "Hyper",
            Self::ConnectShim => "ConnectShim",
            Self::DisconnectShim => "DisconnectShim",
            Self::Signal => "Signal",
        }
    }
}

impl core::fmt::Display for Command {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// Stream opcodes (type 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Stream {
    /// Shim → proxy: the process's input. Empty payload = end of input.
    Stdin = 0,
    /// Proxy → shim: the process's output.
    Stdout = 1,
    /// Proxy → shim: the process's error output.
    Stderr = 2,
    /// Client → proxy: a JSON log entry for the proxy's log.
    Log = 3,
}

impl Stream {
    /// All streams, in opcode order.
    pub const ALL: [Stream; 4] = [Self::Stdin, Self::Stdout, Self::Stderr, Self::Log];

    /// The stream for a raw opcode, if it is one.
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Stdin),
            1 => Some(Self::Stdout),
            2 => Some(Self::Stderr),
            3 => Some(Self::Log),
            _ => None,
        }
    }

    /// Lower-case name, for messages.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Stdin => "stdin",
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
            Self::Log => "log",
        }
    }
}

/// Notification opcodes (type 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Notification {
    /// The shim's process exited; payload is one byte, the exit code.
    ProcessExited = 0,
}

impl Notification {
    /// All notifications, in opcode order.
    pub const ALL: [Notification; 1] = [Self::ProcessExited];

    /// The notification for a raw opcode, if it is one.
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::ProcessExited),
            _ => None,
        }
    }
}

/// What a frame is: type, opcode and (for responses) the Error flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// A command (type 0).
    Command(Command),
    /// A response (type 1) to `command`; `error` is the Error flag.
    Response {
        /// The command answered.
        command: Command,
        /// Whether the Error flag is set (payload is `{"msg":…}`).
        error: bool,
    },
    /// A stream frame (type 2).
    Stream(Stream),
    /// A notification (type 3).
    Notification(Notification),
}

impl FrameKind {
    /// The frame type.
    pub const fn frame_type(self) -> FrameType {
        match self {
            Self::Command(_) => FrameType::Command,
            Self::Response { .. } => FrameType::Response,
            Self::Stream(_) => FrameType::Stream,
            Self::Notification(_) => FrameType::Notification,
        }
    }

    /// The opcode byte.
    pub const fn opcode(self) -> u8 {
        match self {
            Self::Command(c) | Self::Response { command: c, .. } => c as u8,
            Self::Stream(s) => s as u8,
            Self::Notification(n) => n as u8,
        }
    }

    /// Byte 6 of the header: flags in the high nibble, type in the low one.
    pub const fn type_byte(self) -> u8 {
        let flags = match self {
            Self::Response { error: true, .. } => ERROR_FLAG,
            _ => 0,
        };
        flags | self.frame_type() as u8
    }
}

/// The twelve header bytes as fields, with no judgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RawHeader {
    /// Protocol version (bytes 0–1).
    pub version: u16,
    /// Header length in 32-bit words (byte 2).
    pub header_words: u8,
    /// Reserved (byte 3).
    pub reserved0: u8,
    /// Reserved (bytes 4–5).
    pub reserved1: u16,
    /// High nibble of byte 6, shifted down (bit 0 = Error).
    pub flags: u8,
    /// Low nibble of byte 6.
    pub frame_type: u8,
    /// Byte 7.
    pub opcode: u8,
    /// Payload length in bytes (bytes 8–11).
    pub payload_len: u32,
}

impl RawHeader {
    /// Read the fields. Never fails: judging them is [`RawHeader::validate`].
    pub const fn parse(b: &[u8; HEADER_LEN]) -> Self {
        Self {
            version: u16::from_be_bytes([b[0], b[1]]),
            header_words: b[2],
            reserved0: b[3],
            reserved1: u16::from_be_bytes([b[4], b[5]]),
            flags: b[6] >> 4,
            frame_type: b[6] & 0x0f,
            opcode: b[7],
            payload_len: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
        }
    }

    /// Like [`RawHeader::parse`] on the first 12 bytes of `src`, if there are 12.
    pub fn peek(src: &[u8]) -> Option<Self> {
        let b: &[u8; HEADER_LEN] = src.get(..HEADER_LEN)?.try_into().ok()?;
        Some(Self::parse(b))
    }

    /// Header length in bytes, as declared.
    pub const fn header_len(&self) -> usize {
        self.header_words as usize * 4
    }

    /// Whether the Error flag is set.
    pub const fn error_flag(&self) -> bool {
        self.flags & (ERROR_FLAG >> 4) != 0
    }

    /// Apply the rules of §2: version 2, header ≥ 3 words, known type,
    /// opcode in range for its type, no Error flag on streams and
    /// notifications (on a command it is ignored).
    pub fn validate(&self) -> Result<Header, FrameError> {
        if self.version != PROTOCOL_VERSION {
            return Err(FrameError::UnsupportedVersion {
                version: self.version,
            });
        }
        if self.header_words < MIN_HEADER_WORDS {
            return Err(FrameError::HeaderTooShort {
                words: self.header_words,
            });
        }
        let ft = FrameType::from_u8(self.frame_type).ok_or(FrameError::UnknownFrameType {
            frame_type: self.frame_type,
        })?;
        let unknown = FrameError::UnknownOpcode {
            frame_type: ft,
            opcode: self.opcode,
        };
        let error = self.error_flag();
        // The reference ignores the flag on a command and runs it; only
        // streams and notifications carrying it are refused.
        if error && matches!(ft, FrameType::Stream | FrameType::Notification) {
            return Err(FrameError::ErrorFlagOnNonResponse { frame_type: ft });
        }
        let kind = match ft {
            FrameType::Command => FrameKind::Command(Command::from_u8(self.opcode).ok_or(unknown)?),
            FrameType::Response => FrameKind::Response {
                command: Command::from_u8(self.opcode).ok_or(unknown)?,
                error,
            },
            FrameType::Stream => FrameKind::Stream(Stream::from_u8(self.opcode).ok_or(unknown)?),
            FrameType::Notification => {
                FrameKind::Notification(Notification::from_u8(self.opcode).ok_or(unknown)?)
            }
        };
        Ok(Header {
            kind,
            header_len: self.header_len(),
            payload_len: self.payload_len,
        })
    }
}

/// A validated header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Header {
    /// What the frame is.
    pub kind: FrameKind,
    /// Header length in bytes (12, or more: extra bytes are skipped).
    pub header_len: usize,
    /// Payload length in bytes.
    pub payload_len: u32,
}

impl Header {
    /// A standard 12-byte header.
    pub const fn new(kind: FrameKind, payload_len: u32) -> Self {
        Self {
            kind,
            header_len: HEADER_LEN,
            payload_len,
        }
    }

    /// Total frame length: header plus payload.
    pub const fn frame_len(&self) -> u64 {
        self.header_len as u64 + self.payload_len as u64
    }

    /// The 12 bytes of a version-2 header for this kind and payload length.
    /// (We always write 3-word headers; longer ones are only read.)
    pub const fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let v = PROTOCOL_VERSION.to_be_bytes();
        let l = self.payload_len.to_be_bytes();
        [
            v[0],
            v[1],
            MIN_HEADER_WORDS,
            0,
            0,
            0,
            self.kind.type_byte(),
            self.kind.opcode(),
            l[0],
            l[1],
            l[2],
            l[3],
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(version: u16, words: u8, type_byte: u8, opcode: u8, len: u32) -> [u8; 12] {
        let v = version.to_be_bytes();
        let l = len.to_be_bytes();
        [
            v[0], v[1], words, 0, 0, 0, type_byte, opcode, l[0], l[1], l[2], l[3],
        ]
    }

    #[test]
    fn parse_reads_every_field_and_never_judges() {
        let b = [0xff, 0xfe, 1, 9, 0xab, 0xcd, 0xf7, 0x99, 0, 0, 1, 0];
        let r = RawHeader::parse(&b);
        assert_eq!(r.version, 0xfffe);
        assert_eq!(r.header_words, 1);
        assert_eq!(r.reserved0, 9);
        assert_eq!(r.reserved1, 0xabcd);
        assert_eq!(r.flags, 0xf);
        assert_eq!(r.frame_type, 7);
        assert_eq!(r.opcode, 0x99);
        assert_eq!(r.payload_len, 256);
    }

    #[test]
    fn rejects_version_below_and_above_2() {
        for v in [0u16, 1, 3, 0xffff] {
            let e = RawHeader::parse(&hdr(v, 3, 0, 0, 0))
                .validate()
                .unwrap_err();
            assert_eq!(e, FrameError::UnsupportedVersion { version: v });
        }
    }

    #[test]
    fn rejects_short_header_length() {
        for w in 0..3 {
            let e = RawHeader::parse(&hdr(2, w, 0, 0, 0))
                .validate()
                .unwrap_err();
            assert_eq!(e, FrameError::HeaderTooShort { words: w });
        }
    }

    #[test]
    fn honours_longer_header() {
        let h = RawHeader::parse(&hdr(2, 5, 2, 1, 7)).validate().unwrap();
        assert_eq!(h.header_len, 20);
        assert_eq!(h.frame_len(), 27);
    }

    #[test]
    fn rejects_unknown_type() {
        for t in 4..16 {
            let e = RawHeader::parse(&hdr(2, 3, t, 0, 0))
                .validate()
                .unwrap_err();
            assert_eq!(e, FrameError::UnknownFrameType { frame_type: t });
        }
    }

    #[test]
    fn rejects_opcode_out_of_range_for_each_type() {
        for (t, count) in [(0u8, 7u8), (1, 7), (2, 4), (3, 1)] {
            let ft = FrameType::from_u8(t).unwrap();
            assert_eq!(ft.opcode_count(), count);
            for op in 0..count {
                assert!(RawHeader::parse(&hdr(2, 3, t, op, 0)).validate().is_ok());
            }
            for op in [count, count + 1, 0xff] {
                let e = RawHeader::parse(&hdr(2, 3, t, op, 0))
                    .validate()
                    .unwrap_err();
                assert_eq!(
                    e,
                    FrameError::UnknownOpcode {
                        frame_type: ft,
                        opcode: op
                    }
                );
            }
        }
    }

    #[test]
    fn error_flag_only_on_responses() {
        let h = RawHeader::parse(&hdr(2, 3, 0x11, 3, 0)).validate().unwrap();
        assert_eq!(
            h.kind,
            FrameKind::Response {
                command: Command::Hyper,
                error: true
            }
        );
        // On a command the flag is ignored, as the reference does.
        let h = RawHeader::parse(&hdr(2, 3, 0x10, 4, 0)).validate().unwrap();
        assert_eq!(h.kind, FrameKind::Command(Command::ConnectShim));
        for (t, op) in [(2u8, 1u8), (3, 0)] {
            let e = RawHeader::parse(&hdr(2, 3, 0x10 | t, op, 0))
                .validate()
                .unwrap_err();
            assert_eq!(
                e,
                FrameError::ErrorFlagOnNonResponse {
                    frame_type: FrameType::from_u8(t).unwrap()
                }
            );
        }
    }

    #[test]
    fn other_flag_bits_and_reserved_fields_are_ignored() {
        let mut b = hdr(2, 3, 0xe2, 1, 5);
        b[3] = 0xaa;
        b[4] = 0xbb;
        b[5] = 0xcc;
        let h = RawHeader::parse(&b).validate().unwrap();
        assert_eq!(h.kind, FrameKind::Stream(Stream::Stdout));
    }

    #[test]
    fn to_bytes_round_trips() {
        let kinds = [
            FrameKind::Command(Command::Signal),
            FrameKind::Response {
                command: Command::AttachVm,
                error: true,
            },
            FrameKind::Stream(Stream::Log),
            FrameKind::Notification(Notification::ProcessExited),
        ];
        for k in kinds {
            let h = Header::new(k, 0x0102_0304);
            let back = RawHeader::parse(&h.to_bytes()).validate().unwrap();
            assert_eq!(back, h);
        }
    }
}
