//! What can be wrong with bytes on the wire.

use crate::frame::FrameType;

/// A proxy frame that must be refused (docs/PROTOCOL.md §2, §10.1).
///
/// When a decoder returns one of these it has consumed nothing: the caller
/// can still read the offending header (e.g. with
/// [`RawHeader::peek`](crate::frame::RawHeader::peek)) to address an error
/// response before closing the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The version field is not 2.
    #[error("unsupported protocol version {version} (this proxy speaks version 2)")]
    UnsupportedVersion {
        /// The version the frame declared.
        version: u16,
    },
    /// The header length is below 3 words (12 bytes).
    #[error("header length of {words} words is below the minimum of 3")]
    HeaderTooShort {
        /// The declared header length in 32-bit words.
        words: u8,
    },
    /// The type nibble is not 0–3.
    #[error("unknown frame type {frame_type} (expected 0 to 3)")]
    UnknownFrameType {
        /// The raw type nibble.
        frame_type: u8,
    },
    /// The opcode is out of range for the frame type.
    #[error("unknown {frame_type} opcode {opcode} (expected 0 to {max})", max = frame_type.opcode_count() - 1)]
    UnknownOpcode {
        /// The frame's type.
        frame_type: FrameType,
        /// The raw opcode.
        opcode: u8,
    },
    /// The Error flag is set on a frame that is not a response.
    #[error("the Error flag is set on a {frame_type} frame (only responses may carry it)")]
    ErrorFlagOnNonResponse {
        /// The frame's type.
        frame_type: FrameType,
    },
    /// The declared payload is larger than the configured limit.
    #[error("frame payload of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// The declared payload length.
        len: u64,
        /// The limit in force.
        max: u64,
    },
}

/// A hyperstart ctl or io message that must be refused (docs/PROTOCOL.md §6–§7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HyperError {
    /// The length field is smaller than the header itself.
    #[error("hyperstart {channel} message length {len} is shorter than its {min}-byte header")]
    LengthTooShort {
        /// "ctl" or "io".
        channel: &'static str,
        /// The declared length (header included).
        len: u32,
        /// The header size.
        min: u32,
    },
    /// The message is larger than the agent's buffer (or the configured limit).
    #[error("hyperstart {channel} message of {len} bytes exceeds the limit of {max} bytes")]
    MessageTooLarge {
        /// "ctl" or "io".
        channel: &'static str,
        /// The declared or requested length (header included).
        len: u64,
        /// The limit in force.
        max: u64,
    },
}
