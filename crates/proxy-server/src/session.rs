//! A token's session at run time: the bounded output queue between the VM's
//! io task and whichever shim connection holds the token, and the two
//! things others wait for (a shim connected, the process started).
//!
//! The queue is bounded in bytes by a semaphore: the io task takes permits
//! before it queues a message and the shim's writer gives them back once
//! the bytes are written to the shim's socket. Memory is taken only as
//! output arrives; a full queue stalls only the VM's io reader (the bound
//! is large enough that one slow shim does not stall its siblings for
//! long), and nothing is ever dropped.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::futures::Notified;
use tokio::sync::{mpsc, watch, Notify, Semaphore};

/// How a VM's io channel flows, for the shim writers of its sessions.
///
/// While the agent streams the output of several sessions at once (its io
/// reads come back large, with the sessions' messages interleaved), each
/// read holds little for any one session, and a shim writer holding a
/// small batch waits for the next read of io before writing: one `writev`
/// of many messages costs far less than one per message. The io reader
/// says when streaming stops — a small read, a read of one session's
/// output, no read for a millisecond, or a full queue that stops it — and
/// wakes the waiting writers, so the end of a burst is not held back.
#[derive(Debug, Default)]
pub struct IoFlow {
    streaming: AtomicBool,
    read: Notify,
}

impl IoFlow {
    /// Whether the agent is streaming output.
    pub fn streaming(&self) -> bool {
        // Acquire/Release: a writer on another worker thread that misses a
        // wake-up (its `next_read` created after it) sees the flag set
        // before that wake-up.
        self.streaming.load(Ordering::Acquire)
    }

    /// Set by the io reader.
    pub fn set_streaming(&self, on: bool) {
        self.streaming.store(on, Ordering::Release);
    }

    /// Completes after the io reader's next read (its messages queued), or
    /// when streaming stops. Create it before checking
    /// [`streaming`](Self::streaming): it counts from its creation.
    pub fn next_read(&self) -> Notified<'_> {
        self.read.notified()
    }

    /// The io reader queued what it read, or streaming stopped.
    pub fn wake_writers(&self) {
        self.read.notify_waiters();
    }
}

/// One item of a session's output, in order.
#[derive(Debug, Clone)]
pub enum Output {
    /// Bytes the process wrote to stdout.
    Stdout(Bytes),
    /// Bytes the process wrote to stderr.
    Stderr(Bytes),
    /// The process exited with this code.
    Exited(u8),
}

impl Output {
    /// The permits (bytes of budget) this item holds.
    pub fn cost(&self) -> u32 {
        match self {
            Output::Stdout(b) | Output::Stderr(b) => {
                u32::try_from(b.len()).unwrap_or(u32::MAX).max(1)
            }
            Output::Exited(_) => 1,
        }
    }
}

/// The receiving side of a session's output queue, handed to the shim
/// connection that holds the token and given back when it goes.
#[derive(Debug)]
pub struct OutputQueue {
    /// Items taken from `rx` but not (fully) written to a shim; they go first.
    pub front: VecDeque<Output>,
    /// The queue.
    pub rx: mpsc::UnboundedReceiver<Output>,
}

impl OutputQueue {
    /// The next item without waiting.
    pub fn try_next(&mut self) -> Option<Output> {
        self.front.pop_front().or_else(|| self.rx.try_recv().ok())
    }

    /// The next item.
    pub async fn next(&mut self) -> Option<Output> {
        if let Some(o) = self.front.pop_front() {
            return Some(o);
        }
        self.rx.recv().await
    }
}

/// A session at run time.
#[derive(Debug)]
pub struct Session {
    /// The token.
    pub token: String,
    /// stdin/stdout seq; stderr is `io_base + 1`.
    pub io_base: u64,
    tx: mpsc::UnboundedSender<Output>,
    queue: Mutex<Option<OutputQueue>>,
    budget: Arc<Semaphore>,
    /// The VM's io flow.
    pub flow: Arc<IoFlow>,
    /// Whether a shim holds the token.
    pub shim: watch::Sender<bool>,
    /// Whether the process was started.
    pub started: watch::Sender<bool>,
    /// Output bytes queued so far (stats).
    pub bytes_out: AtomicU64,
    /// Input bytes forwarded so far (stats).
    pub bytes_in: AtomicU64,
    /// Output bytes that were in a failed shim connection's socket, unread
    /// (at most that many were lost with it).
    pub bytes_maybe_lost: AtomicU64,
}

impl Session {
    /// A session whose output queue holds at most `bound` bytes.
    pub fn new(token: String, io_base: u64, bound: usize, flow: Arc<IoFlow>) -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        Arc::new(Self {
            token,
            io_base,
            tx,
            queue: Mutex::new(Some(OutputQueue {
                front: VecDeque::new(),
                rx,
            })),
            budget: Arc::new(Semaphore::new(
                bound.max(proxy_proto::hyper::MAX_MESSAGE_LEN),
            )),
            flow,
            shim: watch::channel(false).0,
            started: watch::channel(false).0,
            bytes_out: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_maybe_lost: AtomicU64::new(0),
        })
    }

    /// Queue output, waiting while the queue is full (back-pressure on the
    /// caller, the VM's io reader). Returns false if the session is gone.
    pub async fn push(&self, item: Output) -> bool {
        let item = match self.try_push(item) {
            Ok(pushed) => return pushed,
            Err(item) => item,
        };
        match self.budget.acquire_many(item.cost()).await {
            Ok(permit) => permit.forget(),
            Err(_) => return false,
        }
        self.queue_now(item)
    }

    /// Queue output if the queue has room for it now; otherwise hand it
    /// back (`Err`) for [`push`](Self::push) to wait with. `Ok(false)` if
    /// the session is gone.
    pub fn try_push(&self, item: Output) -> Result<bool, Output> {
        match self.budget.try_acquire_many(item.cost()) {
            Ok(permit) => permit.forget(),
            Err(tokio::sync::TryAcquireError::Closed) => return Ok(false),
            Err(tokio::sync::TryAcquireError::NoPermits) => return Err(item),
        }
        Ok(self.queue_now(item))
    }

    /// Queue `item`, whose permits are taken.
    fn queue_now(&self, item: Output) -> bool {
        if let Output::Stdout(b) | Output::Stderr(b) = &item {
            self.bytes_out.fetch_add(b.len() as u64, Ordering::Relaxed);
        }
        self.tx.send(item).is_ok()
    }

    /// The writer wrote `items` to the shim: their budget is free again
    /// (one update of the semaphore for a whole batch).
    pub fn written<'a>(&self, items: impl IntoIterator<Item = &'a Output>) {
        self.release(items.into_iter().map(|o| o.cost() as usize).sum());
    }

    /// `n` bytes of budget are free again.
    pub fn release(&self, n: usize) {
        if n > 0 {
            self.budget.add_permits(n);
        }
    }

    /// Bytes of output queued and not yet written to a shim.
    pub fn queued_bytes(&self, bound: usize) -> usize {
        bound
            .max(proxy_proto::hyper::MAX_MESSAGE_LEN)
            .saturating_sub(self.budget.available_permits())
    }

    /// Take the output queue (the shim that claimed the token).
    pub fn take_queue(&self) -> Option<OutputQueue> {
        self.queue.lock().ok()?.take()
    }

    /// Give the output queue back (the shim's connection ended).
    pub fn return_queue(&self, q: OutputQueue) {
        if let Ok(mut g) = self.queue.lock() {
            *g = Some(q);
        }
    }

    /// The session ends (token freed or VM gone): wake and refuse producers.
    pub fn close(&self) {
        self.budget.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_queue_waits_and_nothing_is_dropped() {
        let s = Session::new("t".into(), 3, 10240, Arc::default());
        let chunk = Bytes::from(vec![7u8; 10240]);
        assert!(s.push(Output::Stdout(chunk.clone())).await);
        // The queue is full: the next push waits.
        let s2 = s.clone();
        let pusher =
            tokio::spawn(async move { s2.push(Output::Stderr(Bytes::from_static(b"x"))).await });
        tokio::task::yield_now().await;
        assert!(!pusher.is_finished());
        let mut q = s.take_queue().unwrap();
        let first = q.next().await.unwrap();
        assert!(matches!(&first, Output::Stdout(b) if b.len() == 10240));
        s.written([&first]);
        assert!(pusher.await.unwrap());
        assert!(matches!(q.next().await.unwrap(), Output::Stderr(_)));
    }

    #[tokio::test]
    async fn the_queue_survives_a_shim_handover_in_order() {
        let s = Session::new("t".into(), 3, 1 << 20, Arc::default());
        for i in 0..3u8 {
            s.push(Output::Stdout(Bytes::from(vec![i]))).await;
        }
        let mut q = s.take_queue().unwrap();
        assert!(s.take_queue().is_none(), "one holder at a time");
        let first = q.next().await.unwrap();
        // Not written: goes back in front.
        q.front.push_front(first);
        s.return_queue(q);
        let mut q = s.take_queue().unwrap();
        for i in 0..3u8 {
            assert!(matches!(q.next().await.unwrap(), Output::Stdout(b) if b[0] == i));
        }
    }

    #[tokio::test]
    async fn closing_releases_a_waiting_producer() {
        let s = Session::new("t".into(), 3, 10240, Arc::default());
        s.push(Output::Stdout(Bytes::from(vec![0; 10240]))).await;
        let s2 = s.clone();
        let pusher = tokio::spawn(async move { s2.push(Output::Exited(0)).await });
        tokio::task::yield_now().await;
        s.close();
        assert!(!pusher.await.unwrap());
    }
}
