//! Writing batches of frames with vectored I/O: headers and payloads go to
//! the kernel straight from where they are, without being copied into one
//! buffer first.

use std::io::{self, IoSlice};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Header arena allocation size.
const ARENA: usize = 768;

/// At most this many slices per `writev` (Linux's IOV_MAX is 1024).
const MAX_SLICES: usize = 256;

/// A batch of byte chunks to write in order.
#[derive(Debug, Default)]
pub struct Batch {
    chunks: Vec<Bytes>,
    len: usize,
    /// Small headers are carved out of one buffer instead of one
    /// allocation each.
    arena: BytesMut,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Append a chunk (empty chunks are skipped).
    pub fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.len += b.len();
            self.chunks.push(b);
        }
    }

    /// Append a small chunk (a frame header) by copying it into the
    /// batch's arena.
    pub fn push_small(&mut self, b: &[u8]) {
        if self.arena.capacity() < b.len() {
            self.arena = BytesMut::with_capacity(ARENA);
        }
        self.arena.extend_from_slice(b);
        let chunk = self.arena.split().freeze();
        self.push(chunk);
    }

    /// Bytes in the batch.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of chunks.
    pub fn chunks(&self) -> usize {
        self.chunks.len()
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
        while idx < self.chunks.len() {
            let end = (idx + MAX_SLICES).min(self.chunks.len());
            let slices: Vec<IoSlice<'_>> = self.chunks[idx..end]
                .iter()
                .map(|c| IoSlice::new(c))
                .collect();
            let n = match w.write_vectored(&slices).await {
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
            drop(slices);
            *written += n;
            let mut left = n;
            while left > 0 {
                let c = &mut self.chunks[idx];
                if left >= c.len() {
                    left -= c.len();
                    idx += 1;
                } else {
                    c.advance(left);
                    left = 0;
                }
            }
        }
        self.chunks.clear();
        if self.chunks.capacity() > 1024 {
            self.chunks = Vec::new();
        }
        self.len = 0;
        w.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

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
}
