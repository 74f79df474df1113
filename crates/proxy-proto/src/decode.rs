//! One shape for every incremental decoder of this crate, so that a driver
//! can read any of the wire formats with one loop (feature `alloc`).

use bytes::BytesMut;

use crate::codec::{Frame, FrameDecoder};
use crate::error::{FrameError, HyperError};
use crate::hyper::ctl::{CtlDecoder, CtlMessage};
use crate::hyper::io::{IoDecoder, IoMessage};

/// An incremental decoder over a byte buffer.
///
/// `Ok(None)`: not enough bytes yet (the decoder may reserve room for the
/// rest). `Ok(Some(item))`: one item's bytes were split off the front of
/// `src`. `Err`: what is at the front of `src` is malformed; `src` is left
/// untouched, and nothing after it can be trusted.
///
/// ```
/// use bytes::BytesMut;
/// use proxy_proto::hyper::io::{IoDecoder, IoMessage};
/// use proxy_proto::Decode;
///
/// fn count<D: Decode>(d: &mut D, src: &mut BytesMut) -> usize {
///     let mut n = 0;
///     while let Ok(Some(_)) = d.decode(src) {
///         n += 1;
///     }
///     n
/// }
///
/// let mut wire = BytesMut::new();
/// IoMessage::new(3, &b"hi"[..]).encode(&mut wire, 10240).unwrap();
/// IoMessage::new(3, &b""[..]).encode(&mut wire, 10240).unwrap();
/// assert_eq!(count(&mut IoDecoder::default(), &mut wire), 2);
/// ```
pub trait Decode {
    /// What one decoded message is.
    type Item;
    /// Why the bytes at the front cannot be a message.
    type Error;
    /// Take one item off the front of `src`.
    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, Self::Error>;
}

impl Decode for FrameDecoder {
    type Item = Frame;
    type Error = FrameError;
    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        FrameDecoder::decode(self, src)
    }
}

impl Decode for CtlDecoder {
    type Item = CtlMessage;
    type Error = HyperError;
    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<CtlMessage>, HyperError> {
        CtlDecoder::decode(self, src)
    }
}

impl Decode for IoDecoder {
    type Item = IoMessage;
    type Error = HyperError;
    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<IoMessage>, HyperError> {
        IoDecoder::decode(self, src)
    }
}

impl<D: Decode + ?Sized> Decode for &mut D {
    type Item = D::Item;
    type Error = D::Error;
    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<D::Item>, D::Error> {
        (**self).decode(src)
    }
}

#[cfg(test)]
mod tests {
    use alloc::vec::Vec;

    use super::*;
    use crate::codec::Limits;
    use crate::frame::Command;
    use crate::hyper::ctl::Code;

    /// Everything `d` decodes from `wire` fed one byte at a time, and what
    /// is left.
    fn trickle<D: Decode>(mut d: D, wire: &[u8]) -> (Vec<D::Item>, usize)
    where
        D::Error: core::fmt::Debug,
    {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for b in wire {
            buf.extend_from_slice(&[*b]);
            while let Some(m) = d.decode(&mut buf).expect("well-formed") {
                out.push(m);
            }
        }
        (out, buf.len())
    }

    #[test]
    fn every_decoder_answers_through_the_trait() {
        let mut wire = BytesMut::new();
        Frame::command(Command::Hyper, &b"{}"[..]).encode(&mut wire);
        Frame::command(Command::Signal, &b""[..]).encode(&mut wire);
        let (frames, left) = trickle(FrameDecoder::new(Limits::default()), &wire);
        assert_eq!((frames.len(), left), (2, 0));

        let mut wire = BytesMut::new();
        CtlMessage::new(Code::Ready, &b""[..])
            .encode(&mut wire, 10240)
            .unwrap();
        CtlMessage::new(Code::Ack, &b"x"[..])
            .encode(&mut wire, 10240)
            .unwrap();
        let (msgs, left) = trickle(CtlDecoder::default(), &wire[..wire.len() - 1]);
        assert_eq!((msgs.len(), left), (1, 8));

        let mut wire = BytesMut::new();
        IoMessage::new(5, &b"abc"[..])
            .encode(&mut wire, 10240)
            .unwrap();
        let mut d = IoDecoder::default();
        let (msgs, left) = trickle(&mut d, &wire);
        assert_eq!((msgs[0].seq, &msgs[0].data[..], left), (5, &b"abc"[..], 0));
    }

    #[test]
    fn a_malformed_front_is_an_error_and_leaves_the_buffer() {
        let mut buf = BytesMut::from(&[0u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0][..]);
        let mut d = IoDecoder::default();
        assert!(Decode::decode(&mut d, &mut buf).is_err());
        assert_eq!(buf.len(), 12);
    }
}
