//! Writing batches of frames with vectored I/O. Large payloads go to the
//! kernel straight from where they are; frame headers and payloads up to
//! [`COPY_MAX`] bytes are copied into an arena, a run of them one slice.
//! The batch keeps its slices ready for `writev`: nothing is split off a
//! buffer per header, and nothing is collected per write.
//!
//! Why copy payloads of up to 2 KiB: the kernel pays per `iovec` segment
//! (a user-access window and a copy started per segment), and for small
//! messages that costs more than a copy in user space. Measured here with
//! one thread writing 1 GiB of io messages to a unix socket, header and
//! payload as two segments against both copied into one buffer: 512-byte
//! payloads 0.28–0.32 against 0.20–0.21 s of CPU per GiB, 1024-byte
//! 0.21–0.26 against 0.16–0.18, 2048-byte 0.17–0.20 against 0.15–0.17, and
//! 4096-byte 0.17–0.19 either way.

use std::io::{self, IoSlice};

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Payloads up to this many bytes are copied into the arena.
pub const COPY_MAX: usize = 2048;

/// A frame header's length (the proxy's; hyperstart's io header is as
/// long, which the io writer's use of [`Batch::push_frame`] checks).
pub const FRAME_HEADER: usize = proxy_proto::frame::HEADER_LEN;

/// The arena is blocks of at least this size, each twice the last up to
/// [`MAX_BLOCK`]: a response takes one small block, a stream of small
/// messages few large ones. A block never grows (slices point into it);
/// blocks are freed once their batch is written, so an idle connection
/// keeps none.
const BLOCK: usize = 4 * 1024;
const MAX_BLOCK: usize = 64 * 1024;
/// The first block of a batch is smaller: a response's header fits, and
/// glibc serves it from its thread cache (a request of 1 KiB or more makes
/// it consolidate its fast bins first, once per response).
const FIRST_BLOCK: usize = 1000;

/// At most this many slices per `writev` (Linux's IOV_MAX is 1024).
const MAX_SLICES: usize = 256;

/// Write one frame, `header` then `payload`, as one `writev` where the
/// socket takes it all (no batch, no copy: a response's way out).
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    header: &[u8],
    payload: &[u8],
) -> io::Result<()> {
    let mut done = 0usize;
    loop {
        // `done` never passes the frame's length (a write returns at most
        // the bytes it was given), so at most one of these is non-empty
        // past the header.
        let h = header.get(done..).unwrap_or_default();
        let p = payload
            .get(done.saturating_sub(header.len())..)
            .unwrap_or_default();
        let n = if !h.is_empty() {
            w.write_vectored(&[IoSlice::new(h), IoSlice::new(payload)])
                .await
        } else if !p.is_empty() {
            w.write(p).await
        } else {
            break;
        };
        match n {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "peer accepts no more bytes",
                ))
            }
            Ok(n) => done = done.saturating_add(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    w.flush().await
}

/// A batch of byte chunks to write in order.
#[derive(Debug, Default)]
pub struct Batch {
    /// The slices to write, in order. They point into `arena` and `held`
    /// only, and are cleared before them: the `'static` never leaves the
    /// batch.
    slices: Vec<IoSlice<'static>>,
    len: usize,
    /// Copied headers and small payloads.
    arena: Vec<Vec<u8>>,
    /// Where in the last arena block the last slice starts, if it is a
    /// run of copies ending where that block ends (the next copy joins it).
    run: Option<usize>,
    /// The payloads the slices point into.
    held: Vec<Bytes>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Append a chunk (empty chunks are skipped; small ones are copied).
    pub fn push(&mut self, b: Bytes) {
        if b.len() <= COPY_MAX {
            self.push_small(&b);
            return;
        }
        // SAFETY: `b`'s bytes stay where they are and unchanged while `b`
        // lives (moving a `Bytes` does not move its buffer); `b` goes into
        // `held`, which is cleared only after the slices are.
        let s: &'static [u8] = unsafe { std::slice::from_raw_parts(b.as_ptr(), b.len()) };
        self.len += b.len();
        self.slices.push(IoSlice::new(s));
        self.held.push(b);
        self.run = None;
    }

    /// Append a frame: its 12-byte header copied into the arena, its
    /// payload as [`push`](Self::push) takes it (a small one copied right
    /// after the header, in one go).
    #[inline]
    pub fn push_frame(&mut self, header: &[u8; FRAME_HEADER], payload: Bytes) {
        if payload.len() <= COPY_MAX {
            self.copy_in(header, &payload);
        } else {
            self.copy_in(header, &[]);
            self.push(payload);
        }
    }

    /// [`push_frame`](Self::push_frame) of a payload the caller keeps: a
    /// small one is only copied (no reference taken).
    #[inline]
    pub fn push_frame_ref(&mut self, header: &[u8; FRAME_HEADER], payload: &Bytes) {
        if payload.len() <= COPY_MAX {
            self.copy_in(header, payload);
        } else {
            self.copy_in(header, &[]);
            self.push(payload.clone());
        }
    }

    /// Append a small chunk (a frame header) by copying it into the
    /// batch's arena.
    #[inline]
    pub fn push_small(&mut self, b: &[u8]) {
        self.copy_in(b, &[]);
    }

    /// Copy `a` then `b` into the arena, joining the run of copies the
    /// last slice is when it ends where they go.
    fn copy_in(&mut self, a: &[u8], b: &[u8]) {
        let n = a.len() + b.len();
        if n == 0 {
            return;
        }
        let fits = self
            .arena
            .last()
            .is_some_and(|blk| blk.capacity() - blk.len() >= n);
        if !fits {
            let next = self.arena.last().map_or(FIRST_BLOCK, |blk| {
                blk.capacity().saturating_mul(2).clamp(BLOCK, MAX_BLOCK)
            });
            self.arena.push(Vec::with_capacity(next.max(n)));
            self.run = None;
        }
        let Some(blk) = self.arena.last_mut() else {
            return;
        };
        let at = blk.len();
        // Does not reallocate: there is room (checked above).
        blk.extend_from_slice(a);
        blk.extend_from_slice(b);
        self.len += n;
        let start = match self.run {
            Some(start) => {
                self.slices.pop();
                start
            }
            None => at,
        };
        self.run = Some(start);
        let run = &blk[start..];
        // SAFETY: the run is in an arena block's buffer, which never moves
        // (a block is never grown: see above) and whose bytes in `..len()`
        // never change; the block is freed only after the slices are
        // cleared.
        let s: &'static [u8] = unsafe { std::slice::from_raw_parts(run.as_ptr(), run.len()) };
        self.slices.push(IoSlice::new(s));
    }

    /// Bytes in the batch.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of chunks (slices of the `writev`s).
    pub fn chunks(&self) -> usize {
        self.slices.len()
    }

    /// Write everything, returning how many bytes were written before an
    /// error (on error the count tells what reached the peer's socket).
    pub async fn write_all<W: AsyncWrite + Unpin>(
        &mut self,
        w: &mut W,
    ) -> Result<(), (usize, io::Error)> {
        let mut written = 0usize;
        self.write_counted(w, &mut written)
            .await
            .map_err(|e| (written, e))
    }

    /// Write everything, adding to `written` each byte the kernel took as
    /// it goes: if this future is dropped half way (an abandoned write),
    /// `written` still says how much of the batch reached the socket.
    pub async fn write_counted<W: AsyncWrite + Unpin>(
        &mut self,
        w: &mut W,
        written: &mut usize,
    ) -> io::Result<()> {
        let mut idx = 0usize;
        while idx < self.slices.len() {
            let end = (idx + MAX_SLICES).min(self.slices.len());
            let n = match w.write_vectored(&self.slices[idx..end]).await {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "peer accepts no more bytes",
                    ))
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            *written += n;
            let mut left = n;
            while left > 0 {
                let s = &mut self.slices[idx];
                if left >= s.len() {
                    left -= s.len();
                    idx += 1;
                } else {
                    s.advance(left);
                    left = 0;
                }
            }
        }
        self.clear();
        w.flush().await
    }

    /// Empty the batch: the slices first, then what they point into.
    fn clear(&mut self) {
        self.slices.clear();
        if self.slices.capacity() > 1024 {
            self.slices = Vec::new();
        }
        self.run = None;
        self.held.clear();
        if self.held.capacity() > 1024 {
            self.held = Vec::new();
        }
        self.arena = Vec::new();
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tokio::io::AsyncReadExt;

    /// Takes at most `step` bytes per write (of the first slice only, as a
    /// short `writev` may), then, once `cap` bytes are in, nothing.
    struct Trickle {
        got: Vec<u8>,
        step: usize,
        cap: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.step).min(self.cap - self.got.len());
            self.got.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_frame_goes_out_whole_and_in_order_through_short_writes() {
        let header: Vec<u8> = (0..12).collect();
        let payload: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let want = [&header[..], &payload[..]].concat();
        for step in [1, 5, 11, 12, 13, 4096, 1 << 20] {
            let mut w = Trickle {
                got: Vec::new(),
                step,
                cap: usize::MAX,
            };
            write_frame(&mut w, &header, &payload).await.unwrap();
            assert_eq!(w.got, want, "step {step}");
        }
        // An empty payload: the header alone.
        let mut w = Trickle {
            got: Vec::new(),
            step: 5,
            cap: usize::MAX,
        };
        write_frame(&mut w, &header, &[]).await.unwrap();
        assert_eq!(w.got, header);
        // A peer that stops taking bytes is an error, not a hang, and what
        // it took is the frame's start.
        let mut w = Trickle {
            got: Vec::new(),
            step: 7,
            cap: 100,
        };
        let e = write_frame(&mut w, &header, &payload).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WriteZero);
        assert_eq!(w.got, want[..100]);
    }

    #[tokio::test]
    async fn writes_everything_in_order() {
        let (mut a, mut b) = tokio::net::UnixStream::pair().unwrap();
        let reader = tokio::spawn(async move {
            let mut v = Vec::new();
            b.read_to_end(&mut v).await.unwrap();
            v
        });
        let mut batch = Batch::new();
        let mut expect = Vec::new();
        for i in 0..1000u32 {
            let c = vec![(i % 251) as u8; (i as usize * 37) % 5000];
            expect.extend_from_slice(&c);
            batch.push(Bytes::from(c));
        }
        batch.write_all(&mut a).await.unwrap();
        assert!(batch.is_empty());
        drop(a);
        assert_eq!(reader.await.unwrap(), expect);
    }

    #[tokio::test]
    async fn small_chunks_share_slices_and_a_short_write_resumes_in_order() {
        let (mut a, mut b) = tokio::net::UnixStream::pair().unwrap();
        let mut batch = Batch::new();
        let mut expect = Vec::new();
        let sizes = [0, 1, 12, COPY_MAX, COPY_MAX + 1, 512, 3000, 5000];
        for i in 0..3000u32 {
            let h = [(i % 7) as u8; 12];
            let c = vec![(i % 253) as u8; sizes[i as usize % sizes.len()]];
            expect.extend_from_slice(&h);
            expect.extend_from_slice(&c);
            batch.push_small(&h);
            batch.push(Bytes::from(c));
        }
        // A header and the small payloads after it are one slice.
        assert!(batch.chunks() < 3000 * 2 * 5 / 8 + 10, "{}", batch.chunks());
        assert_eq!(batch.len(), expect.len());
        // The reader is slow: the writes are short, and resume mid-slice.
        let reader = tokio::spawn(async move {
            let mut v = Vec::new();
            let mut buf = [0u8; 777];
            loop {
                let n = b.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                v.extend_from_slice(&buf[..n]);
                tokio::task::yield_now().await;
            }
            v
        });
        batch.write_all(&mut a).await.unwrap();
        assert!(batch.is_empty());
        assert_eq!(batch.chunks(), 0);
        drop(a);
        assert_eq!(reader.await.unwrap(), expect);
    }
}
