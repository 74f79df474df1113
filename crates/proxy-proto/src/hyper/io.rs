//! hyperstart io channel: `u64 seq | u32 length (header included) | data`.
//!
//! Per VM, seqs 1 and 2 belong to the null session; each token's session
//! owns `io_base` (stdin/stdout) and `io_base + 1` (stderr), from 3 upwards.
//! An empty message marks a stream's end (EOF); after it, a one-byte
//! message on the session carries the exit code.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::ctl::check_len;
use crate::error::HyperError;

/// Size of an io message header.
pub const IO_HEADER_LEN: usize = 12;
/// Most data bytes one io message can carry within the agent's buffer.
pub const MAX_IO_DATA: usize = super::MAX_MESSAGE_LEN - IO_HEADER_LEN;
/// The null session's stdio seq (its stderr is `NULL_SEQ + 1`).
pub const NULL_SEQ: u64 = 1;
/// The first token's `io_base`.
pub const FIRST_IO_BASE: u64 = 3;

/// The 12 header bytes of an io message, unjudged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoHeader {
    /// Stream sequence number.
    pub seq: u64,
    /// Length including the 12-byte header.
    pub len: u32,
}

impl IoHeader {
    /// Read the fields.
    pub fn parse(b: &[u8; IO_HEADER_LEN]) -> Self {
        let mut s = [0u8; 8];
        s.copy_from_slice(&b[..8]);
        Self {
            seq: u64::from_be_bytes(s),
            len: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
        }
    }

    /// The header for `seq` carrying `data_len` bytes.
    ///
    /// # Panics
    /// If `data_len` does not fit the u32 length field with the header.
    pub fn for_data(seq: u64, data_len: usize) -> Self {
        let len =
            u32::try_from(data_len + IO_HEADER_LEN).expect("io data is bounded by the caller");
        Self { seq, len }
    }

    /// The header bytes.
    pub fn to_bytes(&self) -> [u8; IO_HEADER_LEN] {
        let mut b = [0u8; IO_HEADER_LEN];
        b[..8].copy_from_slice(&self.seq.to_be_bytes());
        b[8..].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// One io message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoMessage {
    /// Stream sequence number.
    pub seq: u64,
    /// The data, zero-copy. Empty = EOF.
    pub data: Bytes,
}

impl IoMessage {
    /// A message.
    pub fn new(seq: u64, data: impl Into<Bytes>) -> Self {
        Self {
            seq,
            data: data.into(),
        }
    }

    /// Bytes on the wire.
    pub fn encoded_len(&self) -> usize {
        IO_HEADER_LEN + self.data.len()
    }

    /// Append the message to `dst`, refusing one over `max_len` bytes.
    pub fn encode<B: BufMut + ?Sized>(
        &self,
        dst: &mut B,
        max_len: usize,
    ) -> Result<(), HyperError> {
        let len = self.encoded_len();
        if len > max_len || u32::try_from(len).is_err() {
            return Err(HyperError::MessageTooLarge {
                channel: "io",
                len: len as u64,
                max: max_len as u64,
            });
        }
        dst.put_slice(&IoHeader::for_data(self.seq, self.data.len()).to_bytes());
        dst.put_slice(&self.data);
        Ok(())
    }
}

/// Append `data` for `seq` to `dst`, split into as many messages of at most
/// `max_len` bytes (header included) as it takes, in order. Empty `data`
/// writes one empty message (EOF). Returns how many messages were written.
///
/// # Panics
/// If `max_len` leaves no room for data (≤ 12).
pub fn encode_split<B: BufMut + ?Sized>(
    seq: u64,
    data: &[u8],
    dst: &mut B,
    max_len: usize,
) -> usize {
    assert!(max_len > IO_HEADER_LEN, "io max_len must exceed the header");
    let room = max_len - IO_HEADER_LEN;
    if data.is_empty() {
        dst.put_slice(&IoHeader::for_data(seq, 0).to_bytes());
        return 1;
    }
    let mut n = 0;
    for chunk in data.chunks(room) {
        dst.put_slice(&IoHeader::for_data(seq, chunk.len()).to_bytes());
        dst.put_slice(chunk);
        n += 1;
    }
    n
}

/// Incremental io decoder (same answers as [`crate::FrameDecoder`]).
#[derive(Debug, Clone)]
pub struct IoDecoder {
    max_len: usize,
}

impl Default for IoDecoder {
    fn default() -> Self {
        Self::new(super::MAX_MESSAGE_LEN)
    }
}

impl IoDecoder {
    /// A decoder refusing messages over `max_len` bytes (header included).
    pub fn new(max_len: usize) -> Self {
        Self { max_len }
    }

    /// Take one message off the front of `src`; on error `src` is untouched.
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<IoMessage>, HyperError> {
        let Some(b) = src.get(..IO_HEADER_LEN) else {
            return Ok(None);
        };
        let mut h = [0u8; IO_HEADER_LEN];
        h.copy_from_slice(b);
        let h = IoHeader::parse(&h);
        let total = check_len("io", h.len, IO_HEADER_LEN, self.max_len)?;
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        let mut msg = src.split_to(total);
        msg.advance(IO_HEADER_LEN);
        Ok(Some(IoMessage {
            seq: h.seq,
            data: msg.freeze(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_round_trip() {
        let m = IoMessage::new(3, &b"hi"[..]);
        let mut buf = BytesMut::new();
        m.encode(&mut buf, 10240).unwrap();
        assert_eq!(&buf[..], &[0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 14, b'h', b'i']);
        assert_eq!(IoDecoder::default().decode(&mut buf).unwrap(), Some(m));
    }

    #[test]
    fn split_keeps_order_and_bounds() {
        let data: alloc::vec::Vec<u8> = (0..25_000u32).map(|i| i as u8).collect();
        let mut buf = BytesMut::new();
        let n = encode_split(5, &data, &mut buf, 10240);
        assert_eq!(n, 3);
        let mut dec = IoDecoder::default();
        let mut back = alloc::vec::Vec::new();
        while let Some(m) = dec.decode(&mut buf).unwrap() {
            assert_eq!(m.seq, 5);
            assert!(m.data.len() <= MAX_IO_DATA);
            back.extend_from_slice(&m.data);
        }
        assert_eq!(back, data);
        let mut eof = BytesMut::new();
        assert_eq!(encode_split(7, &[], &mut eof, 10240), 1);
        assert_eq!(
            dec.decode(&mut eof).unwrap(),
            Some(IoMessage::new(7, Bytes::new()))
        );
    }

    #[test]
    fn io_limits() {
        let mut dec = IoDecoder::default();
        let mut short = BytesMut::from(&IoHeader { seq: 1, len: 11 }.to_bytes()[..]);
        assert_eq!(
            dec.decode(&mut short).unwrap_err(),
            HyperError::LengthTooShort {
                channel: "io",
                len: 11,
                min: 12
            }
        );
        let mut big = BytesMut::from(&IoHeader { seq: 1, len: 10241 }.to_bytes()[..]);
        assert_eq!(
            dec.decode(&mut big).unwrap_err(),
            HyperError::MessageTooLarge {
                channel: "io",
                len: 10241,
                max: 10240
            }
        );
        let m = IoMessage::new(1, alloc::vec![0u8; MAX_IO_DATA + 1]);
        assert!(m.encode(&mut BytesMut::new(), 10240).is_err());
    }
}
