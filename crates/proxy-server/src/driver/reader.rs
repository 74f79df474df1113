//! One frame-reading loop for every wire format: a byte stream and a
//! [`Decode`]r give messages, one `next().await` at a time.

use bytes::BytesMut;
use proxy_proto::Decode;
use tokio::io::{AsyncRead, AsyncReadExt};

/// First read size; doubled while reads fill it.
const MIN_READ: usize = 4 * 1024;
/// Largest read size.
const MAX_READ: usize = 256 * 1024;
/// A [`lazy`](MessageReader::lazy) reader goes back to its small buffer
/// after this many reads in a row smaller than it, each leaving nothing
/// buffered: a stream that pauses between bursts keeps its big buffer.
const QUIET_READS: u8 = 8;

/// Why [`MessageReader::next`] gave no message.
#[derive(Debug, thiserror::Error)]
pub enum ReadError<E> {
    /// The stream failed.
    #[error("read failed: {0}")]
    Io(#[source] std::io::Error),
    /// The bytes at the front are not a message; nothing after them can be
    /// trusted.
    #[error("malformed message: {0}")]
    Decode(#[source] E),
    /// The stream ended in the middle of a message.
    #[error("the stream ended in the middle of a message ({buffered} bytes of it came)")]
    Truncated {
        /// The bytes of the unfinished message.
        buffered: usize,
    },
}

/// How a [`MessageReader`] makes room in its buffer before a read.
#[derive(Debug, Clone, Copy)]
enum Room {
    /// Reserve the read size, which starts at 4 KiB and doubles while
    /// reads fill it, up to 256 KiB.
    Growing { read_size: usize },
    /// Reserve `chunk` bytes when fewer than `low` are free. The messages
    /// split off the buffer share its allocation, so reserving more than
    /// is free allocates anew: this does so once per `chunk - low` bytes
    /// or so, not once per read.
    Chunked { low: usize, chunk: usize },
}

/// A [`lazy`](MessageReader::lazy) reader's state.
#[derive(Debug, Clone, Copy)]
struct Lazy {
    /// The small buffer's size.
    small: usize,
    /// Whether a read filled the small buffer: reads go by [`Room`] until
    /// the stream is quiet again.
    big: bool,
    /// Reads in a row smaller than `small`, in the big buffer.
    quiet: u8,
}

/// Reads `R` and decodes it with `D`.
///
/// The buffer is kept and reused from one message to the next (it grows to
/// the largest message and the read size, which doubles while reads fill
/// it, up to 256 KiB; or see [`MessageReader::chunked`]).
/// [`MessageReader::next`] and [`MessageReader::read_more`] are
/// cancel-safe: dropped between reads, they lose nothing (the bytes read
/// stay buffered), so either may be one branch of a `select!`.
///
/// [`MessageReader::next`] reads until a message comes; a driver that
/// acts on every read ([`crate::vm`]'s io reader judges each read's size)
/// calls [`MessageReader::read_more`] and then
/// [`MessageReader::decode_buffered`] until it gives nothing.
///
/// A [`lazy`](MessageReader::lazy) reader of a mostly quiet stream (a
/// VM's channels) holds a small buffer, and the big one only while reads
/// fill the small one.
#[derive(Debug)]
pub struct MessageReader<R, D> {
    io: R,
    decoder: D,
    buf: BytesMut,
    room: Room,
    lazy: Option<Lazy>,
}

impl<R: AsyncRead + Unpin, D: Decode> MessageReader<R, D> {
    /// A reader of `io` decoding with `decoder`.
    pub fn new(io: R, decoder: D) -> Self {
        Self {
            io,
            decoder,
            buf: BytesMut::new(),
            room: Room::Growing {
                read_size: MIN_READ,
            },
            lazy: None,
        }
    }

    /// A reader whose buffer starts with `chunk` bytes of room and is given
    /// `chunk` more whenever fewer than `low` are free before a read.
    pub fn chunked(io: R, decoder: D, low: usize, chunk: usize) -> Self {
        Self {
            io,
            decoder,
            buf: BytesMut::with_capacity(chunk),
            room: Room::Chunked { low, chunk },
            lazy: None,
        }
    }

    /// Read into a buffer of only `small` bytes (allocated at the first
    /// read) until a read fills it; then make room as this reader would
    /// otherwise, until `QUIET_READS` (8) reads in a row brought less than
    /// `small` bytes and left nothing buffered, when the big buffer is let
    /// go (its messages keep their bytes) and reads are small again. A
    /// mostly idle stream so holds `small` bytes, not a big buffer whose
    /// pages its trickle of messages would touch one after the other; a
    /// streaming one allocates its big buffer once per burst, not per
    /// read.
    pub fn lazy(mut self, small: usize) -> Self {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
        self.lazy = Some(Lazy {
            small: small.max(1),
            big: false,
            quiet: 0,
        });
        self
    }

    /// The next message. `Ok(None)`: the stream ended between messages.
    pub async fn next(&mut self) -> Result<Option<D::Item>, ReadError<D::Error>> {
        loop {
            if let Some(m) = self.decode_buffered().map_err(ReadError::Decode)? {
                return Ok(Some(m));
            }
            if self.read_more().await.map_err(ReadError::Io)? == 0 {
                return match self.buf.len() {
                    0 => Ok(None),
                    buffered => Err(ReadError::Truncated { buffered }),
                };
            }
        }
    }

    /// Read once into the buffer, decoding nothing: the bytes read (0: the
    /// stream ended, maybe in the middle of a message, see
    /// [`buffered`](Self::buffered)).
    pub async fn read_more(&mut self) -> std::io::Result<usize> {
        if let Some(Lazy {
            small, big: false, ..
        }) = self.lazy
        {
            self.buf.reserve(small);
            let room = self.buf.capacity().saturating_sub(self.buf.len());
            let n = self.io.read_buf(&mut self.buf).await?;
            if n > 0 && n >= room {
                // More is probably waiting: the big buffer from now on.
                if let Some(l) = &mut self.lazy {
                    l.big = true;
                    l.quiet = 0;
                }
            }
            return Ok(n);
        }
        let room = match self.room {
            Room::Growing { read_size } => {
                self.buf.reserve(read_size);
                self.buf.capacity().saturating_sub(self.buf.len())
            }
            Room::Chunked { low, chunk } => {
                if self.buf.capacity().saturating_sub(self.buf.len()) < low {
                    self.buf.reserve(chunk);
                }
                0
            }
        };
        let n = self.io.read_buf(&mut self.buf).await?;
        if let Room::Growing { read_size } = &mut self.room {
            if n >= room.min(*read_size) {
                *read_size = read_size.saturating_mul(2).min(MAX_READ);
            }
        }
        if let Some(l) = &mut self.lazy {
            l.quiet = if n < l.small {
                l.quiet.saturating_add(1)
            } else {
                0
            };
        }
        Ok(n)
    }

    /// The next message among the bytes already read, reading nothing.
    /// `Ok(None)`: no whole message is buffered.
    pub fn decode_buffered(&mut self) -> Result<Option<D::Item>, D::Error> {
        let m = self.decoder.decode(&mut self.buf)?;
        if m.is_none() {
            self.maybe_go_small();
        }
        Ok(m)
    }

    /// A lazy reader whose stream went quiet lets its big buffer go.
    fn maybe_go_small(&mut self) {
        let Some(l) = &mut self.lazy else {
            return;
        };
        if l.big && l.quiet >= QUIET_READS && self.buf.is_empty() {
            l.big = false;
            l.quiet = 0;
            self.buf = BytesMut::new();
            if let Room::Growing { read_size } = &mut self.room {
                *read_size = MIN_READ;
            }
        }
    }

    /// The buffer's capacity (for tests of its memory).
    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Bytes read but not decoded yet (the start of the next message).
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    /// The decoder.
    pub fn decoder(&self) -> &D {
        &self.decoder
    }

    /// The decoder, mutably (a decoder with state of its own, such as
    /// [`crate::rules::demux::IoDemux`]'s routes).
    pub fn decoder_mut(&mut self) -> &mut D {
        &mut self.decoder
    }

    /// The stream.
    pub fn get_ref(&self) -> &R {
        &self.io
    }

    /// The stream and the bytes read past the last message.
    pub fn into_parts(self) -> (R, BytesMut) {
        (self.io, self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_proto::hyper::io::{IoDecoder, IoMessage};
    use proxy_proto::{Command, Frame, FrameDecoder, FrameKind, Limits};
    use tokio::io::{AsyncWrite, AsyncWriteExt};

    #[tokio::test]
    async fn messages_across_reads_then_a_clean_end() {
        let (mut w, r) = tokio::io::duplex(7);
        let mut wire = BytesMut::new();
        for i in 0..50u8 {
            Frame::command(Command::Hyper, vec![i; usize::from(i) * 100]).encode(&mut wire);
        }
        let writer = tokio::spawn(async move {
            w.write_all(&wire).await.unwrap();
        });
        let mut reader = MessageReader::new(r, FrameDecoder::new(Limits::default()));
        for i in 0..50u8 {
            let f = reader.next().await.unwrap().expect("a frame");
            assert_eq!(f.kind, FrameKind::Command(Command::Hyper));
            assert_eq!(f.payload.len(), usize::from(i) * 100);
            assert!(f.payload.iter().all(|&b| b == i));
        }
        writer.await.unwrap();
        assert!(matches!(reader.next().await, Ok(None)));
        assert!(reader.buffered().is_empty());
    }

    #[tokio::test]
    async fn an_end_mid_message_is_not_a_clean_end() {
        let (mut w, r) = tokio::io::duplex(64);
        let mut wire = BytesMut::new();
        IoMessage::new(3, &b"whole"[..])
            .encode(&mut wire, 10240)
            .unwrap();
        IoMessage::new(3, &b"cut short"[..])
            .encode(&mut wire, 10240)
            .unwrap();
        w.write_all(&wire[..wire.len() - 4]).await.unwrap();
        drop(w);
        let mut reader = MessageReader::new(r, IoDecoder::default());
        let m = reader.next().await.unwrap().expect("the whole one");
        assert_eq!((m.seq, &m.data[..]), (3, &b"whole"[..]));
        match reader.next().await {
            Err(ReadError::Truncated { buffered }) => assert_eq!(buffered, 12 + 5),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_malformed_message_is_a_decode_error() {
        let (mut w, r) = tokio::io::duplex(64);
        // An io header declaring a length shorter than itself.
        w.write_all(&[0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 1])
            .await
            .unwrap();
        let mut reader = MessageReader::new(r, IoDecoder::default());
        assert!(matches!(reader.next().await, Err(ReadError::Decode(_))));
        assert_eq!(reader.buffered().len(), 12);
    }

    #[tokio::test]
    async fn next_is_cancel_safe() {
        let (mut w, r) = tokio::io::duplex(64);
        let mut reader = MessageReader::new(r, IoDecoder::default());
        let mut wire = BytesMut::new();
        IoMessage::new(9, &b"late"[..])
            .encode(&mut wire, 10240)
            .unwrap();
        w.write_all(&wire[..6]).await.unwrap();
        // Cancelled with half a header buffered.
        let r = tokio::time::timeout(std::time::Duration::from_millis(20), reader.next()).await;
        assert!(r.is_err());
        w.write_all(&wire[6..]).await.unwrap();
        let m = reader.next().await.unwrap().expect("the message");
        assert_eq!((m.seq, &m.data[..]), (9, &b"late"[..]));
    }

    #[tokio::test]
    async fn read_more_reads_once_and_decode_buffered_drains_without_reading() {
        let (mut w, r) = tokio::io::duplex(1 << 16);
        let mut wire = BytesMut::new();
        for i in 0..3u8 {
            IoMessage::new(3, vec![i; 100])
                .encode(&mut wire, 10240)
                .unwrap();
        }
        // Two whole messages and the header of the third.
        let cut = 2 * 112 + 12;
        w.write_all(&wire[..cut]).await.unwrap();
        let mut reader = MessageReader::chunked(r, IoDecoder::default(), 256, 1024);
        assert_eq!(reader.read_more().await.unwrap(), cut);
        for i in 0..2u8 {
            let m = reader.decode_buffered().unwrap().expect("buffered");
            assert_eq!(m.data[..], [i; 100]);
        }
        assert!(reader.decode_buffered().unwrap().is_none());
        assert_eq!(reader.buffered().len(), 12);
        w.write_all(&wire[cut..]).await.unwrap();
        drop(w);
        assert_eq!(reader.read_more().await.unwrap(), 100);
        assert_eq!(
            reader.decode_buffered().unwrap().unwrap().data[..],
            [2; 100]
        );
        assert_eq!(reader.read_more().await.unwrap(), 0);
    }

    fn io_wire(seq: u64, sizes: impl IntoIterator<Item = usize>) -> BytesMut {
        let mut wire = BytesMut::new();
        for (i, n) in sizes.into_iter().enumerate() {
            IoMessage::new(seq, vec![i as u8; n])
                .encode(&mut wire, 1 << 20)
                .unwrap();
        }
        wire
    }

    /// Write `wire`, read it all, and decode every message: their sizes.
    async fn round<W: AsyncWrite + Unpin, R: AsyncRead + Unpin>(
        w: &mut W,
        reader: &mut MessageReader<R, IoDecoder>,
        wire: &[u8],
    ) -> Vec<usize> {
        w.write_all(wire).await.unwrap();
        let mut got = Vec::new();
        let mut read = 0;
        while read < wire.len() {
            read += reader.read_more().await.unwrap();
            while let Some(m) = reader.decode_buffered().unwrap() {
                got.push(m.data.len());
            }
        }
        got
    }

    const SMALL: usize = 256;
    const CHUNK: usize = 64 * 1024;

    fn lazy_reader(
        r: tokio::io::DuplexStream,
    ) -> MessageReader<tokio::io::DuplexStream, IoDecoder> {
        MessageReader::chunked(r, IoDecoder::new(1 << 20), 16 * 1024, CHUNK).lazy(SMALL)
    }

    #[tokio::test]
    async fn a_lazy_reader_of_a_trickle_holds_only_its_small_buffer() {
        let (mut w, r) = tokio::io::duplex(1 << 20);
        let mut reader = lazy_reader(r);
        assert_eq!(reader.capacity(), 0, "nothing before the first read");
        for _ in 0..100 {
            let got = round(&mut w, &mut reader, &io_wire(3, [50, 60])).await;
            assert_eq!(got, [50, 60]);
            assert!(reader.capacity() <= SMALL, "{}", reader.capacity());
        }
    }

    #[tokio::test]
    async fn a_burst_gets_the_big_buffer_which_goes_after_quiet_reads_only() {
        let (mut w, r) = tokio::io::duplex(1 << 20);
        let mut reader = lazy_reader(r);
        // A burst: the first read fills the small buffer, then big reads.
        let burst = io_wire(3, [4000; 100]);
        let got = round(&mut w, &mut reader, &burst).await;
        assert_eq!(got, [4000; 100]);
        assert!(reader.capacity() >= 16 * 1024, "{}", reader.capacity());
        // Small reads, each followed by a big one: the big buffer stays.
        for _ in 0..3 * QUIET_READS {
            round(&mut w, &mut reader, &io_wire(3, [10])).await;
            assert!(reader.capacity() > SMALL);
            round(&mut w, &mut reader, &io_wire(3, [5000])).await;
            assert!(reader.capacity() > SMALL);
        }
        // Quiet: small reads in a row, each draining the buffer.
        for i in 1..=QUIET_READS {
            assert!(reader.capacity() > SMALL, "let go after {i} quiet reads");
            assert_eq!(round(&mut w, &mut reader, &io_wire(3, [10])).await, [10]);
        }
        assert_eq!(reader.capacity(), 0, "the big buffer is let go");
        assert_eq!(round(&mut w, &mut reader, &io_wire(3, [10])).await, [10]);
        assert!(reader.capacity() <= SMALL);
    }

    #[tokio::test]
    async fn a_lazy_reader_keeps_a_message_cut_across_the_small_and_the_big_buffer() {
        let (mut w, r) = tokio::io::duplex(1 << 20);
        let mut reader = lazy_reader(r);
        let wire = io_wire(5, [SMALL * 3, 7, 100_000, 1]);
        let (a, b) = wire.split_at(SMALL - 5);
        w.write_all(a).await.unwrap();
        assert_eq!(reader.read_more().await.unwrap(), a.len());
        assert!(reader.decode_buffered().unwrap().is_none());
        assert_eq!(reader.buffered().len(), a.len());
        let got = round(&mut w, &mut reader, b).await;
        assert_eq!(got, [SMALL * 3, 7, 100_000, 1]);
        assert!(reader.buffered().is_empty());
    }
}
