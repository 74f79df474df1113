//! Owned frames, encoding into a caller's buffer, and the incremental decoder.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::FrameError;
use crate::frame::{Command, FrameKind, Header, Notification, RawHeader, Stream, HEADER_LEN};

/// Default bound on a frame payload: 4 MiB.
pub const DEFAULT_MAX_PAYLOAD: u32 = 4 * 1024 * 1024;

/// Bounds the decoder enforces before buffering anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted payload, in bytes.
    pub max_payload: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload: DEFAULT_MAX_PAYLOAD,
        }
    }
}

/// A whole frame: what it is, and its payload (zero-copy, shared).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Type, opcode and Error flag.
    pub kind: FrameKind,
    /// The payload bytes (JSON for commands and responses, raw for streams).
    pub payload: Bytes,
}

impl Frame {
    /// A frame of any kind.
    pub fn new(kind: FrameKind, payload: impl Into<Bytes>) -> Self {
        Self {
            kind,
            payload: payload.into(),
        }
    }

    /// A command frame.
    pub fn command(command: Command, payload: impl Into<Bytes>) -> Self {
        Self::new(FrameKind::Command(command), payload)
    }

    /// A successful response.
    pub fn response(command: Command, payload: impl Into<Bytes>) -> Self {
        Self::new(
            FrameKind::Response {
                command,
                error: false,
            },
            payload,
        )
    }

    /// An error response with payload `{"msg":"<msg>"}` (JSON-escaped).
    pub fn error_response(command: Command, msg: &str) -> Self {
        let mut out = alloc::vec::Vec::with_capacity(msg.len() + 10);
        out.extend_from_slice(b"{\"msg\":");
        crate::json::write_str(&mut out, msg);
        out.push(b'}');
        Self::new(
            FrameKind::Response {
                command,
                error: true,
            },
            out,
        )
    }

    /// A stream frame.
    pub fn stream(stream: Stream, payload: impl Into<Bytes>) -> Self {
        Self::new(FrameKind::Stream(stream), payload)
    }

    /// The ProcessExited notification carrying `code`.
    pub fn process_exited(code: u8) -> Self {
        Self::new(
            FrameKind::Notification(Notification::ProcessExited),
            Bytes::copy_from_slice(&[code]),
        )
    }

    /// The header this frame encodes with.
    ///
    /// # Panics
    /// If the payload is 4 GiB or more, which no frame can carry.
    pub fn header(&self) -> Header {
        let len = u32::try_from(self.payload.len()).expect("frame payloads are below 4 GiB");
        Header::new(self.kind, len)
    }

    /// Bytes this frame takes on the wire.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }

    /// Append header and payload to `dst`. Allocates nothing of its own.
    pub fn encode<B: BufMut + ?Sized>(&self, dst: &mut B) {
        dst.put_slice(&self.header().to_bytes());
        dst.put_slice(&self.payload);
    }

    /// The frame as one contiguous buffer (convenience for tests and clients).
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(self.encoded_len());
        self.encode(&mut b);
        b.freeze()
    }
}

/// Look at the start of `src`: need more bytes (`Ok(None)`), a frame whose
/// header is `Header` and whose total length is the `usize` (`Ok(Some)`), or
/// a malformed frame. The payload length is checked against `limits` before
/// anything else is looked at, so a hostile length costs nothing.
pub fn peek_frame(src: &[u8], limits: &Limits) -> Result<Option<(Header, usize)>, FrameError> {
    let Some(raw) = RawHeader::peek(src) else {
        return Ok(None);
    };
    let header = check(&raw, limits)?;
    // Bounded: header_len ≤ 1020 and payload_len ≤ max_payload.
    let total = header.header_len + header.payload_len as usize;
    if src.len() < total {
        return Ok(None);
    }
    Ok(Some((header, total)))
}

fn check(raw: &RawHeader, limits: &Limits) -> Result<Header, FrameError> {
    let header = raw.validate()?;
    if header.payload_len > limits.max_payload {
        return Err(FrameError::FrameTooLarge {
            len: u64::from(header.payload_len),
            max: u64::from(limits.max_payload),
        });
    }
    Ok(header)
}

/// A borrowed frame: decoded in place from a slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRef<'a> {
    /// Type, opcode and Error flag.
    pub kind: FrameKind,
    /// The payload, borrowed.
    pub payload: &'a [u8],
}

/// Decode one frame borrowed from the start of `src`, with the number of
/// bytes it took. See [`peek_frame`] for the three answers.
pub fn decode_slice<'a>(
    src: &'a [u8],
    limits: &Limits,
) -> Result<Option<(FrameRef<'a>, usize)>, FrameError> {
    Ok(peek_frame(src, limits)?.map(|(h, total)| {
        (
            FrameRef {
                kind: h.kind,
                // In range: peek_frame checked src.len() >= total.
                payload: &src[h.header_len..total],
            },
            total,
        )
    }))
}

/// Incremental decoder over a growing byte buffer, in the style of
/// tokio-util's codecs.
///
/// ```
/// use bytes::BytesMut;
/// use proxy_proto::{Command, Frame, FrameDecoder, Limits};
///
/// let frame = Frame::command(Command::ConnectShim, &br#"{"token":"t"}"#[..]);
/// let wire = frame.to_bytes();
/// let mut dec = FrameDecoder::new(Limits::default());
/// let mut buf = BytesMut::new();
/// buf.extend_from_slice(&wire[..5]); // half a header: need more
/// assert_eq!(dec.decode(&mut buf).unwrap(), None);
/// buf.extend_from_slice(&wire[5..]);
/// assert_eq!(dec.decode(&mut buf).unwrap(), Some(frame));
/// assert!(buf.is_empty());
/// ```
#[derive(Debug, Clone, Default)]
pub struct FrameDecoder {
    limits: Limits,
}

impl FrameDecoder {
    /// A decoder enforcing `limits`.
    pub fn new(limits: Limits) -> Self {
        Self { limits }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Take one frame off the front of `src`.
    ///
    /// `Ok(None)`: not enough bytes yet (room for the rest of the frame is
    /// reserved, bounded by the limits). `Ok(Some(frame))`: the frame's bytes
    /// were split off `src`; the payload shares `src`'s allocation (no copy).
    /// `Err`: the frame is malformed; `src` is left untouched.
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        let Some(raw) = RawHeader::peek(src) else {
            return Ok(None);
        };
        let header = check(&raw, &self.limits)?;
        let total = header.header_len + header.payload_len as usize;
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        let mut bytes = src.split_to(total);
        bytes.advance(header.header_len);
        Ok(Some(Frame {
            kind: header.kind,
            payload: bytes.freeze(),
        }))
    }

    /// Like [`FrameDecoder::decode`] on an immutable buffer: the payload is a
    /// zero-copy slice of `src`.
    pub fn decode_bytes(&mut self, src: &mut Bytes) -> Result<Option<Frame>, FrameError> {
        let Some((header, total)) = peek_frame(src, &self.limits)? else {
            return Ok(None);
        };
        let mut bytes = src.split_to(total);
        bytes.advance(header.header_len);
        Ok(Some(Frame {
            kind: header.kind,
            payload: bytes,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FrameType;

    #[test]
    fn need_more_until_whole_frame() {
        let f = Frame::stream(Stream::Stdin, &b"hello"[..]);
        let wire = f.to_bytes();
        let mut dec = FrameDecoder::default();
        for cut in 0..wire.len() {
            let mut buf = BytesMut::from(&wire[..cut]);
            assert_eq!(dec.decode(&mut buf).unwrap(), None, "cut at {cut}");
            assert_eq!(buf.len(), cut, "nothing consumed");
        }
        let mut buf = BytesMut::from(&wire[..]);
        assert_eq!(dec.decode(&mut buf).unwrap(), Some(f));
    }

    #[test]
    fn extra_header_words_are_skipped() {
        let mut wire = alloc::vec![0, 2, 5, 0, 0, 0, 2, 0, 0, 0, 0, 3];
        wire.extend_from_slice(&[0xee; 8]);
        wire.extend_from_slice(b"abc");
        let mut buf = BytesMut::from(&wire[..]);
        let f = FrameDecoder::default().decode(&mut buf).unwrap().unwrap();
        assert_eq!(f.kind, FrameKind::Stream(Stream::Stdin));
        assert_eq!(&f.payload[..], b"abc");
    }

    #[test]
    fn oversized_payload_rejected_from_header_alone() {
        let mut dec = FrameDecoder::new(Limits { max_payload: 16 });
        let h = Header::new(FrameKind::Stream(Stream::Stdin), 17).to_bytes();
        let mut buf = BytesMut::from(&h[..]);
        assert_eq!(
            dec.decode(&mut buf).unwrap_err(),
            FrameError::FrameTooLarge { len: 17, max: 16 }
        );
        assert_eq!(buf.len(), 12, "error leaves the buffer untouched");
    }

    #[test]
    fn declared_4gib_payload_rejected_without_allocating() {
        let h = Header::new(FrameKind::Command(Command::Hyper), u32::MAX).to_bytes();
        let mut buf = BytesMut::from(&h[..]);
        let cap_before = buf.capacity();
        let err = FrameDecoder::default().decode(&mut buf).unwrap_err();
        assert_eq!(
            err,
            FrameError::FrameTooLarge {
                len: u64::from(u32::MAX),
                max: u64::from(DEFAULT_MAX_PAYLOAD)
            }
        );
        assert_eq!(buf.capacity(), cap_before, "no reservation was made");
        // Even with the largest possible limit, a partial frame reserves at
        // most what the limit allows, never more.
        let mut dec = FrameDecoder::new(Limits { max_payload: 64 });
        let h = Header::new(FrameKind::Stream(Stream::Stdin), 64).to_bytes();
        let mut buf = BytesMut::from(&h[..]);
        assert_eq!(dec.decode(&mut buf).unwrap(), None);
        assert!(buf.capacity() >= 76 && buf.capacity() < 1024);
    }

    #[test]
    fn malformed_header_is_an_error_and_leaves_buffer() {
        let mut buf = BytesMut::from(&[0u8, 2, 3, 0, 0, 0, 0, 7, 0, 0, 0, 0][..]);
        let e = FrameDecoder::default().decode(&mut buf).unwrap_err();
        assert_eq!(
            e,
            FrameError::UnknownOpcode {
                frame_type: FrameType::Command,
                opcode: 7
            }
        );
        assert_eq!(buf.len(), 12);
    }

    #[test]
    fn error_messages_say_what_was_wrong() {
        let e = FrameError::FrameTooLarge { len: 5, max: 4 };
        assert_eq!(
            alloc::format!("{e}"),
            "frame payload of 5 bytes exceeds the limit of 4 bytes"
        );
        let e = FrameError::UnknownOpcode {
            frame_type: FrameType::Stream,
            opcode: 9,
        };
        assert_eq!(
            alloc::format!("{e}"),
            "unknown stream opcode 9 (expected 0 to 3)"
        );
    }

    #[test]
    fn several_frames_in_one_buffer_decode_in_order() {
        let frames = [
            Frame::command(Command::ConnectShim, &br#"{"token":"a"}"#[..]),
            Frame::stream(Stream::Stdin, Bytes::new()),
            Frame::process_exited(3),
            Frame::error_response(Command::Hyper, "bad \"name\"\n"),
        ];
        let mut buf = BytesMut::new();
        for f in &frames {
            f.encode(&mut buf);
        }
        let mut bytes = buf.clone().freeze();
        let mut dec = FrameDecoder::default();
        for f in &frames {
            assert_eq!(dec.decode(&mut buf).unwrap().as_ref(), Some(f));
            assert_eq!(dec.decode_bytes(&mut bytes).unwrap().as_ref(), Some(f));
        }
        assert!(buf.is_empty() && bytes.is_empty());
    }

    #[test]
    fn error_response_payload_is_escaped_json() {
        let f = Frame::error_response(Command::Hyper, "a\"b\\c\n\u{1}");
        assert_eq!(&f.payload[..], br#"{"msg":"a\"b\\c\n\u0001"}"#);
        assert_eq!(f.kind.type_byte(), 0x11);
    }
}
