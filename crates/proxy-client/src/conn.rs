//! One connection to the proxy, shared by [`Client`](crate::Client) and
//! [`Shim`](crate::Shim): a writer task and a reader task around a unix
//! stream.
//!
//! - Commands are answered in order (docs/PROTOCOL.md §3), so a command's waiter
//!   is queued, under one lock, in the same order as its frame is queued for
//!   the writer. The reader pops the waiter at the head for each response.
//!   A caller that gives up waiting (a dropped future) never desynchronises
//!   the connection: its response is read and discarded.
//! - Stream frames and notifications become [`ShimEvent`]s on a bounded
//!   channel: a consumer that does not keep up slows the proxy down (TCP-like
//!   back-pressure) instead of growing memory — except while a command waits
//!   for its response: then the reader keeps reading (queueing events) so
//!   that a shim calling `signal()` without reading its output cannot
//!   deadlock.
//! - The writer batches queued frames into vectored writes.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use proxy_proto::payload::ErrorResponse;
use proxy_proto::{Command, Frame, FrameDecoder, FrameKind, Limits, Notification, Stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;

use crate::addr::ProxyAddr;
use crate::error::{Error, Result};
use crate::shim::ShimEvent;

/// Frames queued for the writer before senders wait.
const WRITE_QUEUE: usize = 64;
/// Frames written in one vectored write, at most.
const WRITE_BATCH: usize = 64;
/// Read size.
const READ_CHUNK: usize = 64 * 1024;
/// The largest payload accepted from the proxy.
const MAX_PAYLOAD: u32 = 16 * 1024 * 1024;

/// What the event channel carries: an event, or the end of a connection.
pub(crate) type EventItem = Result<ShimEvent>;

enum Outgoing {
    Frame {
        header: [u8; proxy_proto::HEADER_LEN],
        payload: Bytes,
    },
    /// Answered once every frame queued before it is written.
    Flush(oneshot::Sender<()>),
}

struct Waiter {
    command: Command,
    reply: oneshot::Sender<Result<Bytes>>,
}

#[derive(Default)]
struct State {
    waiters: VecDeque<Waiter>,
    /// Set once the connection can carry nothing more.
    closed: Option<Error>,
    /// DisconnectShim was sent: the proxy closing the connection is the
    /// expected end.
    disconnecting: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// A command was queued: the reader must read its response even when
    /// the event consumer is behind.
    command_queued: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain data behind; go on.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn has_waiters(&self) -> bool {
        !self.lock().waiters.is_empty()
    }

    /// The connection is over: fail every waiter with `err`.
    fn close(&self, err: Error) {
        let waiters = {
            let mut st = self.lock();
            if st.closed.is_none() {
                st.closed = Some(err.clone());
            }
            std::mem::take(&mut st.waiters)
        };
        for w in waiters {
            let _ = w.reply.send(Err(err.clone()));
        }
    }
}

/// A live connection. Dropping it stops reading at once and closes the
/// socket once the frames already queued are written.
pub(crate) struct Conn {
    tx: mpsc::Sender<Outgoing>,
    shared: Arc<Shared>,
    reader: JoinHandle<()>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.shared.lock();
        f.debug_struct("Conn")
            .field("waiting", &st.waiters.len())
            .field("closed", &st.closed)
            .finish()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Conn {
    /// Connect to `addr`. With `events`, stream frames and notifications
    /// are delivered there (a shim); without, they are protocol violations
    /// (a runtime).
    pub(crate) async fn connect(
        addr: &ProxyAddr,
        events: Option<mpsc::Sender<EventItem>>,
    ) -> Result<Self> {
        Self::connect_counting(addr, events, None).await
    }

    /// [`connect`](Self::connect), counting the stdout and stderr bytes
    /// received into `received` (a shim that resumes).
    pub(crate) async fn connect_counting(
        addr: &ProxyAddr,
        events: Option<mpsc::Sender<EventItem>>,
        received: Option<Arc<Received>>,
    ) -> Result<Self> {
        let stream = UnixStream::connect(addr.path())
            .await
            .map_err(|e| Error::Connect {
                path: addr.path().to_owned(),
                reason: e.to_string(),
            })?;
        Ok(Self::from_stream_counting(stream, events, received))
    }

    pub(crate) fn from_stream(stream: UnixStream, events: Option<mpsc::Sender<EventItem>>) -> Self {
        Self::from_stream_counting(stream, events, None)
    }

    fn from_stream_counting(
        stream: UnixStream,
        events: Option<mpsc::Sender<EventItem>>,
        received: Option<Arc<Received>>,
    ) -> Self {
        let (rd, wr) = stream.into_split();
        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        tokio::spawn(write_loop(wr, rx, shared.clone()));
        let reader = tokio::spawn(read_loop(rd, shared.clone(), events, received));
        Self { tx, shared, reader }
    }

    /// Send a command and wait for its response's payload.
    pub(crate) async fn call(&self, command: Command, payload: Bytes) -> Result<Bytes> {
        let (reply, answer) = oneshot::channel();
        let waiter = Waiter { command, reply };
        self.enqueue(FrameKind::Command(command), payload, Some(waiter))
            .await?;
        self.shared.command_queued.notify_one();
        answer.await.map_err(|_| self.closed_error())?
    }

    /// Queue a frame that gets no response (a stream frame).
    pub(crate) async fn send(&self, kind: FrameKind, payload: Bytes) -> Result<()> {
        self.enqueue(kind, payload, None).await
    }

    /// Queue a frame for the writer, with the waiter of its response if it
    /// has one: both under one lock, so waiters are in the frames' order.
    /// DisconnectShim marks the connection as closing; nothing may follow.
    async fn enqueue(&self, kind: FrameKind, payload: Bytes, waiter: Option<Waiter>) -> Result<()> {
        let permit = self.tx.reserve().await.map_err(|_| self.closed_error())?;
        let mut st = self.shared.lock();
        if let Some(e) = &st.closed {
            return Err(e.clone());
        }
        if kind == FrameKind::Command(Command::DisconnectShim) {
            st.disconnecting = true;
        } else if st.disconnecting {
            return Err(Error::Closed);
        }
        if let Some(w) = waiter {
            st.waiters.push_back(w);
        }
        permit.send(outgoing(kind, payload));
        Ok(())
    }

    /// Wait until every frame queued so far is written to the socket.
    pub(crate) async fn flush(&self) -> Result<()> {
        let (done, written) = oneshot::channel();
        self.tx
            .send(Outgoing::Flush(done))
            .await
            .map_err(|_| self.closed_error())?;
        written.await.map_err(|_| self.closed_error())
    }

    /// Send DisconnectShim, after which the proxy closes the connection.
    pub(crate) async fn disconnect(&self) -> Result<()> {
        self.enqueue(
            FrameKind::Command(Command::DisconnectShim),
            Bytes::from_static(b"{}"),
            None,
        )
        .await
    }

    /// Why the connection is unusable, if it is.
    pub(crate) fn closed_error(&self) -> Error {
        self.shared
            .lock()
            .closed
            .clone()
            .unwrap_or_else(|| Error::lost("the connection's tasks ended"))
    }

    /// True once the connection can carry nothing more.
    pub(crate) fn is_closed(&self) -> bool {
        self.shared.lock().closed.is_some()
    }
}

fn outgoing(kind: FrameKind, payload: Bytes) -> Outgoing {
    // The proxy's own limit refuses oversized payloads with a clear error;
    // a payload beyond u32 cannot be framed at all and is cut by the
    // callers' chunking long before.
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    Outgoing::Frame {
        header: proxy_proto::Header::new(kind, len).to_bytes(),
        payload,
    }
}

async fn write_loop(mut wr: OwnedWriteHalf, mut rx: mpsc::Receiver<Outgoing>, shared: Arc<Shared>) {
    let mut batch: Vec<([u8; proxy_proto::HEADER_LEN], Bytes)> = Vec::with_capacity(WRITE_BATCH);
    let mut flushes: Vec<oneshot::Sender<()>> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(o) = next.take() {
            match o {
                Outgoing::Frame { header, payload } => batch.push((header, payload)),
                Outgoing::Flush(done) => flushes.push(done),
            }
            if batch.len() < WRITE_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if let Err(e) = write_batch(&mut wr, &batch).await {
            shared.close(Error::lost(format!("write: {e}")));
            rx.close();
            return;
        }
        batch.clear();
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
    // Every handle is gone: the frames queued before are written; say so.
    let _ = wr.shutdown().await;
}

async fn write_batch(
    wr: &mut OwnedWriteHalf,
    batch: &[([u8; proxy_proto::HEADER_LEN], Bytes)],
) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = batch
        .iter()
        .flat_map(|(header, payload)| [&header[..], &payload[..]])
        .filter(|part| !part.is_empty())
        .map(IoSlice::new)
        .collect();
    let mut left = &mut slices[..];
    while !left.is_empty() {
        let n = wr.write_vectored(left).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut left, n);
    }
    Ok(())
}

/// Stdout and stderr payload bytes a shim received from the proxy, over
/// every connection that held its token: where it resumes
/// (docs/PROTOCOL.md §10.8). Counted as frames are read, so output still
/// queued for the application when a connection drops counts as received.
#[derive(Debug, Default)]
pub(crate) struct Received {
    pub(crate) stdout: std::sync::atomic::AtomicU64,
    pub(crate) stderr: std::sync::atomic::AtomicU64,
}

impl Received {
    fn count(&self, frame: &proxy_proto::Frame) {
        use std::sync::atomic::Ordering::Relaxed;
        let n = frame.payload.len() as u64;
        match frame.kind {
            FrameKind::Stream(Stream::Stdout) => self.stdout.fetch_add(n, Relaxed),
            FrameKind::Stream(Stream::Stderr) => self.stderr.fetch_add(n, Relaxed),
            _ => 0,
        };
    }
}

async fn read_loop(
    mut rd: OwnedReadHalf,
    shared: Arc<Shared>,
    events: Option<mpsc::Sender<EventItem>>,
    received: Option<Arc<Received>>,
) {
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut dec = FrameDecoder::new(Limits {
        max_payload: MAX_PAYLOAD,
    });
    let mut backlog: VecDeque<EventItem> = VecDeque::new();
    let end = loop {
        deliver_ready(events.as_ref(), &mut backlog);
        match dec.decode(&mut buf) {
            Ok(Some(frame)) => {
                if let Some(r) = &received {
                    r.count(&frame);
                }
                if let Err(e) = dispatch(frame, &shared, events.is_some(), &mut backlog) {
                    break e;
                }
                continue;
            }
            Ok(None) => {}
            Err(e) => break Error::Protocol(format!("malformed frame: {e}")),
        }
        if let (Some(tx), false) = (events.as_ref(), backlog.is_empty()) {
            if !shared.has_waiters() {
                // The consumer is behind and no command needs a response:
                // let the back-pressure reach the proxy.
                tokio::select! {
                    permit = tx.reserve() => match permit {
                        Ok(p) => {
                            if let Some(ev) = backlog.pop_front() {
                                p.send(ev);
                            }
                        }
                        Err(_) => backlog.clear(),
                    },
                    () = shared.command_queued.notified() => {}
                }
                continue;
            }
        }
        buf.reserve(READ_CHUNK);
        match rd.read_buf(&mut buf).await {
            Ok(0) if buf.is_empty() => {
                break if shared.lock().disconnecting {
                    Error::Closed
                } else {
                    Error::lost("the proxy closed the connection")
                };
            }
            // Cut mid-frame (a proxy or a relay that went away while
            // writing): the connection is lost, and a shim that resumes gets
            // the frame's bytes again (they were not counted as received).
            Ok(0) => {
                break Error::lost(format!(
                    "the connection closed in the middle of a frame ({} bytes of it)",
                    buf.len()
                ))
            }
            Ok(_) => {}
            Err(e) => break Error::lost(format!("read: {e}")),
        }
    };
    shared.close(end.clone());
    if let Some(tx) = events {
        for ev in backlog {
            if tx.send(ev).await.is_err() {
                return;
            }
        }
        // The end of this connection: lost (the shim may reconnect), or
        // closed on purpose.
        let _ = tx.send(Err(end)).await;
    }
}

/// Move what the consumer has room for from the backlog to the channel.
fn deliver_ready(events: Option<&mpsc::Sender<EventItem>>, backlog: &mut VecDeque<EventItem>) {
    let Some(tx) = events else {
        backlog.clear();
        return;
    };
    while !backlog.is_empty() {
        match tx.try_reserve() {
            Ok(permit) => {
                if let Some(ev) = backlog.pop_front() {
                    permit.send(ev);
                }
            }
            Err(mpsc::error::TrySendError::Full(())) => return,
            Err(mpsc::error::TrySendError::Closed(())) => {
                // Nobody listens any more: output is discarded, as the
                // reference's shim does once it stops reading.
                backlog.clear();
                return;
            }
        }
    }
}

fn dispatch(
    frame: Frame,
    shared: &Shared,
    is_shim: bool,
    backlog: &mut VecDeque<EventItem>,
) -> Result<()> {
    let event = match frame.kind {
        FrameKind::Response { command, error } => {
            let waiter = shared.lock().waiters.pop_front();
            let Some(waiter) = waiter else {
                return Err(Error::Protocol(format!(
                    "a {} response to no command",
                    command.name()
                )));
            };
            if waiter.command != command {
                let e = Error::Protocol(format!(
                    "a {} response while waiting for {}",
                    command.name(),
                    waiter.command.name()
                ));
                let _ = waiter.reply.send(Err(e.clone()));
                return Err(e);
            }
            let answer = if error {
                Err(Error::Proxy {
                    command,
                    msg: error_msg(&frame.payload),
                })
            } else {
                Ok(frame.payload)
            };
            // The caller may have given up waiting; that is fine.
            let _ = waiter.reply.send(answer);
            return Ok(());
        }
        FrameKind::Stream(Stream::Stdout) => ShimEvent::Stdout(frame.payload),
        FrameKind::Stream(Stream::Stderr) => ShimEvent::Stderr(frame.payload),
        FrameKind::Notification(Notification::ProcessExited) => match frame.payload[..] {
            [code] => ShimEvent::Exited(code),
            _ => {
                return Err(Error::Protocol(format!(
                    "ProcessExited with a {}-byte payload (1 expected)",
                    frame.payload.len()
                )))
            }
        },
        FrameKind::Stream(s) => {
            return Err(Error::Protocol(format!(
                "a {} stream frame from the proxy",
                s.name()
            )))
        }
        FrameKind::Command(c) => {
            return Err(Error::Protocol(format!(
                "a {} command from the proxy",
                c.name()
            )))
        }
    };
    if !is_shim {
        return Err(Error::Protocol(format!(
            "{} on a connection that is not a shim's",
            event.kind_name()
        )));
    }
    backlog.push_back(Ok(event));
    Ok(())
}

/// An error response's message: `{"msg": …}`, or the payload as text when
/// it is not that JSON.
fn error_msg(payload: &[u8]) -> String {
    match serde_json::from_slice::<ErrorResponse>(payload) {
        Ok(e) => e.msg,
        Err(_) => String::from_utf8_lossy(payload).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair(shim: bool) -> (Conn, UnixStream, Option<mpsc::Receiver<EventItem>>) {
        let (a, b) = UnixStream::pair().unwrap();
        let (tx, rx) = mpsc::channel(4);
        let conn = Conn::from_stream(a, shim.then_some(tx));
        (conn, b, shim.then_some(rx))
    }

    /// A call on its own task, so the test can play the proxy meanwhile.
    fn spawn_call(conn: &Arc<Conn>, command: Command) -> tokio::task::JoinHandle<Result<Bytes>> {
        let c = conn.clone();
        tokio::spawn(async move { c.call(command, Bytes::from_static(b"{}")).await })
    }

    async fn read_frame(peer: &mut UnixStream, buf: &mut BytesMut) -> Frame {
        let mut dec = FrameDecoder::new(Limits::default());
        loop {
            if let Some(f) = dec.decode(buf).unwrap() {
                return f;
            }
            assert_ne!(peer.read_buf(buf).await.unwrap(), 0, "closed");
        }
    }

    #[tokio::test]
    async fn responses_go_to_their_callers_in_order() {
        let (conn, mut peer, _) = pair(false).await;
        let conn = Arc::new(conn);
        let a = spawn_call(&conn, Command::Hyper);
        let mut buf = BytesMut::new();
        let f = read_frame(&mut peer, &mut buf).await;
        assert_eq!(f.kind, FrameKind::Command(Command::Hyper));
        let b = spawn_call(&conn, Command::AttachVm);
        let f = read_frame(&mut peer, &mut buf).await;
        assert_eq!(f.kind, FrameKind::Command(Command::AttachVm));
        peer.write_all(&Frame::response(Command::Hyper, &b"one"[..]).to_bytes())
            .await
            .unwrap();
        peer.write_all(&Frame::error_response(Command::AttachVm, "no such VM").to_bytes())
            .await
            .unwrap();
        assert_eq!(&a.await.unwrap().unwrap()[..], b"one");
        let e = b.await.unwrap().unwrap_err();
        assert_eq!(e.proxy_msg(), Some("no such VM"));
        assert_eq!(e.to_string(), "AttachVM failed: no such VM");
    }

    #[tokio::test]
    async fn an_unasked_response_is_a_protocol_violation() {
        let (conn, mut peer, _) = pair(false).await;
        peer.write_all(&Frame::response(Command::Signal, Bytes::new()).to_bytes())
            .await
            .unwrap();
        let e = conn.call(Command::Hyper, Bytes::new()).await.unwrap_err();
        assert!(
            matches!(e, Error::Protocol(ref m) if m.contains("Signal")),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_mismatched_response_fails_the_caller() {
        let (conn, mut peer, _) = pair(false).await;
        let conn = Arc::new(conn);
        let call = spawn_call(&conn, Command::Hyper);
        let mut buf = BytesMut::new();
        read_frame(&mut peer, &mut buf).await;
        peer.write_all(&Frame::response(Command::Signal, Bytes::new()).to_bytes())
            .await
            .unwrap();
        let e = call.await.unwrap().unwrap_err();
        assert!(
            matches!(e, Error::Protocol(ref m) if m.contains("while waiting for Hyper")),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_lost_connection_fails_waiters_and_later_calls() {
        let (conn, mut peer, _) = pair(false).await;
        let conn = Arc::new(conn);
        let call = spawn_call(&conn, Command::Hyper);
        let mut buf = BytesMut::new();
        read_frame(&mut peer, &mut buf).await;
        drop(peer);
        let e = call.await.unwrap().unwrap_err();
        assert!(e.is_connection(), "{e}");
        let e = conn.call(Command::Hyper, Bytes::new()).await.unwrap_err();
        assert!(e.is_connection(), "{e}");
    }

    #[tokio::test]
    async fn garbage_from_the_proxy_is_a_protocol_violation() {
        let (conn, mut peer, _) = pair(false).await;
        peer.write_all(&[0, 9, 3, 0, 0, 0, 1, 0, 0, 0, 0, 0])
            .await
            .unwrap();
        let e = conn.call(Command::Hyper, Bytes::new()).await.unwrap_err();
        assert!(
            matches!(e, Error::Protocol(ref m) if m.contains("malformed")),
            "{e}"
        );
    }

    #[tokio::test]
    async fn output_on_a_runtime_connection_is_a_protocol_violation() {
        let (conn, mut peer, _) = pair(false).await;
        peer.write_all(&Frame::stream(Stream::Stdout, &b"x"[..]).to_bytes())
            .await
            .unwrap();
        let e = conn.call(Command::Hyper, Bytes::new()).await.unwrap_err();
        assert!(
            matches!(e, Error::Protocol(ref m) if m.contains("stdout")),
            "{e}"
        );
    }

    /// The event channel (capacity 4) is full and nobody reads it, yet a
    /// command's response behind 100 output frames still arrives.
    #[tokio::test]
    async fn a_command_is_answered_while_output_is_not_read() {
        let (conn, mut peer, events) = pair(true).await;
        let mut events = events.unwrap();
        for i in 0..100u8 {
            peer.write_all(&Frame::stream(Stream::Stdout, vec![i]).to_bytes())
                .await
                .unwrap();
        }
        let conn = Arc::new(conn);
        let call = spawn_call(&conn, Command::Signal);
        let mut buf = BytesMut::new();
        read_frame(&mut peer, &mut buf).await;
        peer.write_all(&Frame::response(Command::Signal, Bytes::new()).to_bytes())
            .await
            .unwrap();
        call.await.unwrap().unwrap();
        for i in 0..100u8 {
            match events.recv().await {
                Some(Ok(ShimEvent::Stdout(b))) => assert_eq!(&b[..], &[i]),
                other => panic!("{other:?}"),
            }
        }
    }

    /// Without a waiting command, a consumer that does not read stops the
    /// reading: the bytes stay in the socket (back-pressure).
    #[tokio::test]
    async fn unread_output_is_back_pressure_not_memory() {
        let (_conn, mut peer, events) = pair(true).await;
        let _events = events.unwrap();
        let frame = Frame::stream(Stream::Stdout, vec![7u8; 64 * 1024]).to_bytes();
        let mut sent = 0usize;
        loop {
            match tokio::time::timeout(
                std::time::Duration::from_millis(300),
                peer.write_all(&frame),
            )
            .await
            {
                Ok(r) => {
                    r.unwrap();
                    sent += frame.len();
                }
                Err(_) => break,
            }
            assert!(sent < 256 << 20, "the client buffered {sent} bytes");
        }
    }
}
