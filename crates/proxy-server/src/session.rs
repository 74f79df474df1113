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

/// What a session that no shim ever claimed may queue: no process can
/// have been started with its token (a Hyper with a token waits for the
/// token's shim), so its output is an agent's mistake, and more is dropped
/// rather than held.
pub const UNCLAIMED_BOUND: usize = 64 * 1024;

/// The daemon-wide memory budget (`--memory-budget`): every session's
/// queued output, every client frame being read and every stdin waiting
/// for its process draw from it, and wait when it is spent.
pub type Budget = Arc<Semaphore>;

/// A budget of `bytes`.
pub fn budget(bytes: usize) -> Budget {
    Arc::new(Semaphore::new(bytes.min(Semaphore::MAX_PERMITS)))
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
    /// The session's bound (`budget`'s permits when nothing is queued).
    capacity: usize,
    /// The daemon's budget, and how much of it this session's queue holds.
    global: Budget,
    global_held: AtomicU64,
    /// A shim claimed the token at least once.
    claimed: AtomicBool,
    /// Output dropped because nobody ever claimed the session.
    pub bytes_dropped_unclaimed: AtomicU64,
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
        Self::with_budget(token, io_base, bound, flow, budget(usize::MAX))
    }

    /// A session whose output queue holds at most `bound` bytes, drawn
    /// from `global` too.
    pub fn with_budget(
        token: String,
        io_base: u64,
        bound: usize,
        flow: Arc<IoFlow>,
        global: Budget,
    ) -> Arc<Self> {
        let capacity = bound.max(proxy_proto::hyper::MAX_MESSAGE_LEN);
        let (tx, rx) = mpsc::unbounded_channel();
        Arc::new(Self {
            token,
            io_base,
            tx,
            queue: Mutex::new(Some(OutputQueue {
                front: VecDeque::new(),
                rx,
            })),
            budget: Arc::new(Semaphore::new(capacity)),
            capacity,
            global,
            global_held: AtomicU64::new(0),
            claimed: AtomicBool::new(false),
            bytes_dropped_unclaimed: AtomicU64::new(0),
            flow,
            shim: watch::channel(false).0,
            started: watch::channel(false).0,
            bytes_out: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_maybe_lost: AtomicU64::new(0),
        })
    }

    /// Queue output, waiting while the queue or the daemon's budget is
    /// full (back-pressure on the caller, the VM's io reader). Returns
    /// false if the session is gone.
    pub async fn push(&self, item: Output) -> bool {
        let item = match self.try_push(item) {
            Ok(pushed) => return pushed,
            Err(item) => item,
        };
        let cost = item.cost();
        match self.budget.acquire_many(cost).await {
            Ok(permit) => permit.forget(),
            Err(_) => return false,
        }
        match self.global.acquire_many(cost).await {
            Ok(g) => g.forget(),
            Err(_) => return false,
        }
        self.global_held
            .fetch_add(u64::from(cost), Ordering::Relaxed);
        self.queue_now(item)
    }

    /// Queue output if the queue and the budget have room for it now;
    /// otherwise hand it back (`Err`) for [`push`](Self::push) to wait
    /// with. `Ok(false)` if the session is gone. Output for a session that
    /// no shim ever claimed beyond [`UNCLAIMED_BOUND`] is dropped (and
    /// counted): `Ok(true)`.
    pub fn try_push(&self, item: Output) -> Result<bool, Output> {
        let cost = item.cost();
        if !self.claimed.load(Ordering::Relaxed)
            && self.queued_bytes().saturating_add(cost as usize) > UNCLAIMED_BOUND
        {
            return Ok(self.drop_unclaimed(&item));
        }
        match self.budget.try_acquire_many(cost) {
            Ok(permit) => permit.forget(),
            Err(tokio::sync::TryAcquireError::Closed) => return Ok(false),
            Err(tokio::sync::TryAcquireError::NoPermits) => return Err(item),
        }
        match self.global.try_acquire_many(cost) {
            Ok(permit) => permit.forget(),
            Err(_) => {
                self.budget.add_permits(cost as usize);
                return Err(item);
            }
        }
        self.global_held
            .fetch_add(u64::from(cost), Ordering::Relaxed);
        Ok(self.queue_now(item))
    }

    fn drop_unclaimed(&self, item: &Output) -> bool {
        if self.budget.is_closed() {
            return false;
        }
        let n = match item {
            Output::Stdout(b) | Output::Stderr(b) => b.len() as u64,
            Output::Exited(_) => 0,
        };
        if self.bytes_dropped_unclaimed.fetch_add(n, Ordering::Relaxed) == 0 {
            tracing::warn!(
                io_base = self.io_base,
                "the agent sends output for a session no shim has claimed; beyond {UNCLAIMED_BOUND} bytes it is dropped"
            );
        }
        true
    }

    /// A shim claimed the token: from now on its output is queued up to
    /// the session's whole bound.
    pub fn claimed(&self) {
        self.claimed.store(true, Ordering::Relaxed);
    }

    /// Queue `item`, whose permits are taken.
    fn queue_now(&self, item: Output) -> bool {
        if self.budget.is_closed() {
            // Closed while the permits were awaited: give them back.
            self.release(item.cost() as usize);
            return false;
        }
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
            let n64 = n as u64;
            let held = self
                .global_held
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| {
                    Some(h.saturating_sub(n64))
                })
                .unwrap_or(0);
            self.global
                .add_permits(usize::try_from(held.min(n64)).unwrap_or(0));
        }
    }

    /// Bytes of output queued and not yet written to a shim.
    pub fn queued_bytes(&self) -> usize {
        self.capacity
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

impl Drop for Session {
    fn drop(&mut self) {
        // Output still queued dies with the session: its share of the
        // daemon's budget goes back.
        let held = *self.global_held.get_mut();
        self.global.add_permits(
            usize::try_from(held)
                .unwrap_or(usize::MAX)
                .min(Semaphore::MAX_PERMITS),
        );
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
