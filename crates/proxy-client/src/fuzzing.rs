//! Not API: the entry point of the `client_reader` fuzz target
//! (`fuzz/fuzz_targets/client_reader.rs`). Hidden from the documentation
//! and free to change.
//!
//! It runs a real connection (the reader and writer tasks of
//! `conn.rs`) over a socket pair whose other end plays the proxy: the
//! commands are sent first (their frames are read off the socket, so
//! every waiter is queued before any byte arrives), then the proxy's bytes
//! are written in the given chunks and the socket is closed.

use std::sync::Arc;

use bytes::Bytes;
use proxy_proto::Command;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::conn::Conn;
use crate::error::Result;
use crate::shim::ShimEvent;

/// What the connection made of the proxy's bytes.
#[derive(Debug)]
pub struct ReaderOutcome {
    /// Each command's answer, in the order the commands were given.
    pub answers: Vec<Result<Bytes>>,
    /// A shim's events in the order they were delivered; the last one is
    /// the end of the connection (an error). Empty for a runtime.
    pub events: Vec<Result<ShimEvent>>,
    /// Whether the connection said it is closed afterwards.
    pub closed: bool,
}

/// Send `commands` (payload `{}`), then feed `chunks` to the connection's
/// reader as the proxy's bytes and close. `shim`: stream frames are
/// wanted, on an event channel of `queue` slots whose consumer yields to
/// the runtime after every `slow_every` events (back-pressure).
///
/// Must run inside a tokio runtime (current-thread is fine).
pub async fn read_from_proxy(
    chunks: &[&[u8]],
    commands: &[Command],
    shim: bool,
    queue: usize,
    slow_every: usize,
) -> std::io::Result<ReaderOutcome> {
    let (ours, peer) = UnixStream::pair()?;
    let (tx, mut rx) = if shim {
        let (tx, rx) = mpsc::channel(queue.max(1));
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let conn = Arc::new(Conn::from_stream(ours, tx));
    let (mut peer_r, mut peer_w) = peer.into_split();

    let mut calls = Vec::with_capacity(commands.len());
    for &c in commands {
        let conn = conn.clone();
        calls.push(tokio::spawn(async move {
            conn.call(c, Bytes::from_static(b"{}")).await
        }));
    }
    // Every command frame is a 12-byte header and `{}`: once they are all
    // read, every waiter is queued.
    let mut sent = vec![0u8; commands.len() * (proxy_proto::HEADER_LEN + 2)];
    peer_r.read_exact(&mut sent).await?;

    let owned: Vec<Vec<u8>> = chunks.iter().map(|c| c.to_vec()).collect();
    let feeder = tokio::spawn(async move {
        for c in owned {
            if peer_w.write_all(&c).await.is_err() {
                break;
            }
            tokio::task::yield_now().await;
        }
        // Dropping both halves closes the socket: EOF after the bytes.
        drop(peer_w);
        drop(peer_r);
    });

    let mut events = Vec::new();
    if let Some(rx) = rx.as_mut() {
        let every = slow_every.max(1);
        while let Some(ev) = rx.recv().await {
            let end = ev.is_err();
            events.push(ev);
            if end {
                break;
            }
            if events.len() % every == 0 {
                tokio::task::yield_now().await;
            }
        }
    }
    let mut answers = Vec::with_capacity(calls.len());
    for c in calls {
        answers.push(c.await.map_err(std::io::Error::other)?);
    }
    // The reader ends at EOF (once the feeder is done) or at the first
    // violation — after which nobody reads, and the feeder may be stuck on
    // a full socket: it is stopped then. Still open 5 s after the feeder
    // is done is the caller's finding.
    let mut deadline = None;
    while !conn.is_closed() {
        if feeder.is_finished() {
            let d = *deadline.get_or_insert_with(|| {
                tokio::time::Instant::now() + std::time::Duration::from_secs(5)
            });
            if tokio::time::Instant::now() >= d {
                break;
            }
        }
        tokio::task::yield_now().await;
    }
    feeder.abort();
    let _ = feeder.await;
    Ok(ReaderOutcome {
        answers,
        events,
        closed: conn.is_closed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the fuzzer: a reader that stops at a malformed header
    /// must not leave the feeder (hundreds of 1-byte writes, each taking a
    /// socket buffer slot) blocked forever.
    #[tokio::test]
    async fn a_reader_that_stops_early_does_not_block_the_feeder() {
        let mut stream = vec![6u8, 0, 0, 0, 50, 0, 50, 0, 6, 0, 0, 0];
        stream.resize(4096, 0);
        let chunks: Vec<&[u8]> = stream.chunks(1).collect();
        for shim in [true, false] {
            let r = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                read_from_proxy(&chunks, &[], shim, 8, 2),
            )
            .await
            .expect("no hang")
            .expect("socket pair");
            assert!(r.closed);
            if shim {
                assert!(matches!(
                    r.events.last(),
                    Some(Err(crate::Error::Protocol(_)))
                ));
            }
        }
    }
}
