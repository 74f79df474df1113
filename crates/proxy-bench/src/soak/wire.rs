//! Frames on the daemon's client socket, for the soak's runtimes and shims.

use std::path::Path;
use std::time::Duration;

use proxy_proto::{Command, Frame, FrameDecoder, FrameKind, Header, Limits, Stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// How long any response may take (the daemon's own waits are shorter).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// One frame's bytes.
pub fn frame(kind: FrameKind, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(proxy_proto::HEADER_LEN + payload.len());
    let len = u32::try_from(payload.len()).expect("soak frames are small");
    v.extend_from_slice(&Header::new(kind, len).to_bytes());
    v.extend_from_slice(payload);
    v
}

pub fn command(c: Command, payload: &serde_json::Value) -> Vec<u8> {
    frame(FrameKind::Command(c), payload.to_string().as_bytes())
}

pub fn stdin(data: &[u8]) -> Vec<u8> {
    frame(FrameKind::Stream(Stream::Stdin), data)
}

/// A reply: `Ok(payload)` or `Err(the error message)`.
pub type Reply = Result<Vec<u8>, String>;

/// The message of an error response.
pub fn error_msg(payload: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(payload)
        .ok()
        .and_then(|v| v["msg"].as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(payload).into_owned())
}

/// Frames off a read half.
#[derive(Debug)]
pub struct Reader {
    rd: OwnedReadHalf,
    buf: bytes::BytesMut,
    dec: FrameDecoder,
}

impl Reader {
    pub fn new(rd: OwnedReadHalf) -> Self {
        Self {
            rd,
            buf: bytes::BytesMut::with_capacity(64 * 1024),
            dec: FrameDecoder::new(Limits {
                max_payload: 1 << 24,
            }),
        }
    }

    /// The next frame; `Ok(None)` at a clean EOF.
    pub async fn next(&mut self) -> Result<Option<Frame>, String> {
        loop {
            match self.dec.decode(&mut self.buf) {
                Ok(Some(f)) => return Ok(Some(f)),
                Ok(None) => {}
                Err(e) => return Err(format!("malformed frame from the daemon: {e}")),
            }
            self.buf.reserve(64 * 1024);
            match self.rd.read_buf(&mut self.buf).await {
                Ok(0) if self.buf.is_empty() => return Ok(None),
                Ok(0) => return Err("the daemon closed in the middle of a frame".into()),
                Ok(_) => {}
                // A reset by the daemon is an end too.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(None),
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }
}

/// A runtime's connection: commands and their responses, nothing else.
#[derive(Debug)]
pub struct Rt {
    rd: Reader,
    wr: OwnedWriteHalf,
}

impl Rt {
    pub async fn connect(socket: &Path) -> Result<Self, String> {
        let s = UnixStream::connect(socket)
            .await
            .map_err(|e| format!("connect {}: {e}", socket.display()))?;
        let (rd, wr) = s.into_split();
        Ok(Self {
            rd: Reader::new(rd),
            wr,
        })
    }

    /// Send `cmd` and wait for its response. The outer error is the
    /// connection failing or the daemon breaking the protocol.
    pub async fn call(
        &mut self,
        cmd: Command,
        payload: &serde_json::Value,
    ) -> Result<Reply, String> {
        self.wr
            .write_all(&command(cmd, payload))
            .await
            .map_err(|e| format!("write {}: {e}", cmd.name()))?;
        let r = tokio::time::timeout(REPLY_TIMEOUT, self.rd.next())
            .await
            .map_err(|_| format!("no {} response within {REPLY_TIMEOUT:?}", cmd.name()))??;
        match r {
            None => Err(format!(
                "the daemon closed the connection instead of answering {}",
                cmd.name()
            )),
            Some(f) => match f.kind {
                FrameKind::Response { command, error } if command == cmd => Ok(if error {
                    Err(error_msg(&f.payload))
                } else {
                    Ok(f.payload.to_vec())
                }),
                other => Err(format!(
                    "{other:?} on a runtime connection while waiting for {}",
                    cmd.name()
                )),
            },
        }
    }
}
