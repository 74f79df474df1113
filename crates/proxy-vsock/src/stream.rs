//! [`AgentStream`]: one concrete stream type for every transport.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio_vsock::VsockStream;

/// Any byte stream that can carry an agent channel: what
/// [`AgentStream::Other`] holds.
pub trait AgentIo: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> AgentIo for T {}

/// A connected agent channel. Hybrid vsock connections are unix streams
/// once the handshake is done.
pub enum AgentStream {
    /// A unix stream (plain unix or hybrid vsock).
    Unix(UnixStream),
    /// An AF_VSOCK stream.
    Vsock(VsockStream),
    /// Any other stream, from a substituted
    /// [`AgentConnector`](crate::AgentConnector) (an in-memory
    /// `tokio::io::duplex` in tests, a wrapper that injects faults…).
    Other(Box<dyn AgentIo>),
}

impl std::fmt::Debug for AgentStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentStream::Unix(s) => f.debug_tuple("Unix").field(s).finish(),
            AgentStream::Vsock(s) => f.debug_tuple("Vsock").field(s).finish(),
            AgentStream::Other(_) => f.write_str("Other(..)"),
        }
    }
}

impl From<UnixStream> for AgentStream {
    fn from(s: UnixStream) -> Self {
        AgentStream::Unix(s)
    }
}

impl From<VsockStream> for AgentStream {
    fn from(s: VsockStream) -> Self {
        AgentStream::Vsock(s)
    }
}

impl AsyncRead for AgentStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            AgentStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            AgentStream::Vsock(s) => Pin::new(s).poll_read(cx, buf),
            AgentStream::Other(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for AgentStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            AgentStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            AgentStream::Vsock(s) => Pin::new(s).poll_write(cx, buf),
            AgentStream::Other(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            AgentStream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            AgentStream::Vsock(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            AgentStream::Other(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            AgentStream::Unix(s) => s.is_write_vectored(),
            AgentStream::Vsock(s) => s.is_write_vectored(),
            AgentStream::Other(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            AgentStream::Unix(s) => Pin::new(s).poll_flush(cx),
            AgentStream::Vsock(s) => Pin::new(s).poll_flush(cx),
            AgentStream::Other(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            AgentStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            AgentStream::Vsock(s) => Pin::new(s).poll_shutdown(cx),
            AgentStream::Other(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn delegates_to_unix() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut a = AgentStream::from(a);
        a.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        b.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        b.write_all(b"pong").await.unwrap();
        a.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
        a.shutdown().await.unwrap();
        assert_eq!(b.read(&mut buf).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn delegates_to_any_other_stream() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut a = AgentStream::Other(Box::new(a));
        assert_eq!(format!("{a:?}"), "Other(..)");
        a.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        b.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        b.write_all(b"pong").await.unwrap();
        a.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
        a.shutdown().await.unwrap();
        assert_eq!(b.read(&mut buf).await.unwrap(), 0);
    }
}
