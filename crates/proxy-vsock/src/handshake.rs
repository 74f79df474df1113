//! The hybrid vsock handshake (Firecracker, Cloud Hypervisor,
//! vhost-device-vsock): the host writes `CONNECT <port>\n` on the VMM's unix
//! socket and reads back `OK <n>\n`; after that the stream is raw.
//!
//! Lines are read **one byte at a time** so that no byte following the
//! newline is consumed: a guest may start talking in the same segment that
//! carries the `OK` line, and those bytes belong to the caller.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Longest handshake line accepted, newline included.
pub const MAX_LINE_LEN: usize = 64;

/// What went wrong in a hybrid vsock handshake, on either side.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Writing our line failed.
    #[error("writing {line:?} failed: {source}")]
    Write {
        /// The line we tried to write.
        line: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Reading the peer's line failed.
    #[error("reading the {expected} line failed after {received:?}: {source}")]
    Read {
        /// Which line was expected (`"OK"` or `"CONNECT"`).
        expected: &'static str,
        /// The bytes received before the failure.
        received: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The peer closed the connection before sending a whole line.
    #[error("peer closed the connection before a whole {expected} line, after {received:?}")]
    Closed {
        /// Which line was expected (`"OK"` or `"CONNECT"`).
        expected: &'static str,
        /// The bytes received before the end of stream.
        received: String,
    },
    /// No newline within [`MAX_LINE_LEN`] bytes.
    #[error("{expected} line too long: no newline within {max} bytes, received {line:?}")]
    LineTooLong {
        /// Which line was expected (`"OK"` or `"CONNECT"`).
        expected: &'static str,
        /// The bytes received.
        line: String,
        /// The limit.
        max: usize,
    },
    /// The peer answered something other than `OK <n>`.
    #[error("unexpected reply {line:?} (expected \"OK <port>\")")]
    UnexpectedReply {
        /// The line received, without its newline.
        line: String,
    },
    /// The peer asked something other than `CONNECT <port>`.
    #[error("unexpected request {line:?} (expected \"CONNECT <port>\")")]
    UnexpectedRequest {
        /// The line received, without its newline.
        line: String,
    },
    /// The peer asked for a port this listener does not serve.
    #[error("port {requested} was requested, but this listener serves port {served}")]
    WrongPort {
        /// The port asked for.
        requested: u32,
        /// The port served.
        served: u32,
    },
}

impl HandshakeError {
    /// Whether the peer went away (reset, broken pipe, end of stream): what a
    /// hybrid vsock socket does while nothing in the guest listens yet, so
    /// worth a retry.
    pub fn is_peer_gone(&self) -> bool {
        match self {
            HandshakeError::Closed { .. } => true,
            HandshakeError::Write { source, .. } | HandshakeError::Read { source, .. } => {
                matches!(
                    source.kind(),
                    io::ErrorKind::ConnectionReset
                        | io::ErrorKind::BrokenPipe
                        | io::ErrorKind::UnexpectedEof
                        | io::ErrorKind::ConnectionAborted
                )
            }
            _ => false,
        }
    }
}

/// Read one `\n`-terminated line, byte by byte, never past the newline.
/// Returns the line without its newline.
async fn read_line<S>(stream: &mut S, expected: &'static str) -> Result<String, HandshakeError>
where
    S: AsyncRead + Unpin + ?Sized,
{
    let mut line = Vec::with_capacity(16);
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte).await {
            Ok(0) => {
                return Err(HandshakeError::Closed {
                    expected,
                    received: String::from_utf8_lossy(&line).into_owned(),
                })
            }
            Ok(_) => {
                if byte[0] == b'\n' {
                    return Ok(String::from_utf8_lossy(&line).into_owned());
                }
                line.push(byte[0]);
                if line.len() >= MAX_LINE_LEN {
                    return Err(HandshakeError::LineTooLong {
                        expected,
                        line: String::from_utf8_lossy(&line).into_owned(),
                        max: MAX_LINE_LEN,
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(HandshakeError::Read {
                    expected,
                    received: String::from_utf8_lossy(&line).into_owned(),
                    source,
                })
            }
        }
    }
}

/// Parse `<word> <u32>`, exactly one space, decimal digits only.
fn parse_word_number(line: &str, word: &str) -> Option<u32> {
    let n = line.strip_prefix(word)?.strip_prefix(' ')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

async fn write_line<S>(stream: &mut S, line: String) -> Result<(), HandshakeError>
where
    S: AsyncWrite + Unpin + ?Sized,
{
    let res = async {
        stream.write_all(line.as_bytes()).await?;
        stream.flush().await
    }
    .await;
    res.map_err(|source| HandshakeError::Write {
        line: line.trim_end().to_owned(),
        source,
    })
}

/// Host side: write `CONNECT <port>\n` and read `OK <n>\n`, returning `n`
/// (the VMM's local port). Nothing after the newline is read.
pub async fn client_handshake<S>(stream: &mut S, port: u32) -> Result<u32, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    write_line(stream, format!("CONNECT {port}\n")).await?;
    let line = read_line(stream, "OK").await?;
    parse_word_number(&line, "OK").ok_or(HandshakeError::UnexpectedReply { line })
}

/// Listener side, first half: read `CONNECT <port>\n` and return the port.
/// Nothing after the newline is read.
pub async fn read_connect<S>(stream: &mut S) -> Result<u32, HandshakeError>
where
    S: AsyncRead + Unpin + ?Sized,
{
    let line = read_line(stream, "CONNECT").await?;
    parse_word_number(&line, "CONNECT").ok_or(HandshakeError::UnexpectedRequest { line })
}

/// Listener side, second half: write `OK <n>\n`.
pub async fn write_ok<S>(stream: &mut S, n: u32) -> Result<(), HandshakeError>
where
    S: AsyncWrite + Unpin + ?Sized,
{
    write_line(stream, format!("OK {n}\n")).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    #[tokio::test]
    async fn client_reads_nothing_past_the_newline() {
        let (mut a, mut b) = duplex(256);
        b.write_all(b"OK 77\nPAYLOAD").await.unwrap();
        let n = client_handshake(&mut a, 5).await.unwrap();
        assert_eq!(n, 77);
        let mut req = [0u8; 10];
        b.read_exact(&mut req).await.unwrap();
        assert_eq!(&req, b"CONNECT 5\n");
        let mut rest = [0u8; 7];
        a.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"PAYLOAD");
    }

    #[tokio::test]
    async fn server_side_round_trip() {
        let (mut a, mut b) = duplex(256);
        let server = tokio::spawn(async move {
            let port = read_connect(&mut b).await.unwrap();
            write_ok(&mut b, port + 1).await.unwrap();
            b
        });
        assert_eq!(client_handshake(&mut a, 41).await.unwrap(), 42);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn rejects_bad_lines() {
        for (reply, want) in [
            (&b"NO\n"[..], "unexpected reply \"NO\""),
            (b"OK\n", "unexpected reply \"OK\""),
            (b"OK x\n", "unexpected reply \"OK x\""),
            (b"OK 1 2\n", "unexpected reply \"OK 1 2\""),
            (b"OK 99999999999\n", "unexpected reply"),
            (
                b"OK 1",
                "peer closed the connection before a whole OK line, after \"OK 1\"",
            ),
        ] {
            let (mut a, mut b) = duplex(256);
            b.write_all(reply).await.unwrap();
            b.shutdown().await.unwrap();
            let e = client_handshake(&mut a, 1).await.unwrap_err();
            assert!(e.to_string().contains(want), "{e} should contain {want}");
        }
        let (mut a, mut b) = duplex(256);
        b.write_all(&[b'A'; 100]).await.unwrap();
        let e = client_handshake(&mut a, 1).await.unwrap_err();
        assert!(
            matches!(e, HandshakeError::LineTooLong { max: 64, .. }),
            "{e}"
        );
        // Stopped at the cap: the rest is still unread.
        let mut rest = vec![0u8; 100 - MAX_LINE_LEN];
        a.read_exact(&mut rest).await.unwrap();

        let (mut a, mut b) = duplex(256);
        b.write_all(b"HELLO 3\n").await.unwrap();
        let e = read_connect(&mut a).await.unwrap_err();
        assert!(
            e.to_string().contains("unexpected request \"HELLO 3\""),
            "{e}"
        );
    }
}
