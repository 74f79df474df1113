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

use crate::rules::output::Inflight;
use tokio::sync::{Notify, Semaphore};

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

/// How a write of a batch to a shim's socket ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// All of it reached the socket.
    Done,
    /// The write failed after the kernel took the batch's first
    /// `progress` bytes.
    Failed {
        /// Bytes the kernel took.
        progress: usize,
    },
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
    /// Output sent again from the replay window to a resuming shim
    /// (docs/PROTOCOL.md §10.8): it holds no budget, and is in the window
    /// already.
    Replayed(Box<Output>),
}

/// What a queued item of output costs beyond its payload, in bytes of
/// budget: about what it takes besides its payload — its slot in the queue
/// (40 bytes, up to twice that as the queue grows), its share of the
/// buffer it was read into (its message's 12-byte header) and its entry
/// in the writer's batch. Counted, a flood of tiny messages is bounded in
/// memory as its bytes are: uncounted, two queues of 1 MiB of one-byte
/// messages took 44 MiB.
pub const ITEM_COST: u32 = 128;

impl Output {
    /// The permits (bytes of budget) this item holds: its payload and
    /// [`ITEM_COST`].
    pub fn cost(&self) -> u32 {
        match self {
            Output::Stdout(b) | Output::Stderr(b) => u32::try_from(b.len())
                .unwrap_or(u32::MAX)
                .saturating_add(ITEM_COST),
            Output::Exited(_) => ITEM_COST,
            Output::Replayed(_) => 0,
        }
    }

    /// The item as it goes on the wire (a replayed one as what it was).
    pub fn live(&self) -> &Output {
        match self {
            Output::Replayed(o) => o.live(),
            o => o,
        }
    }
}

/// Output kept per stream for shims that resume (docs/PROTOCOL.md §10.8):
/// the last this many bytes each of stdout and stderr handed to a shim
/// connection's socket. It covers what a dead connection's socket can
/// hold unread (the socket's send buffer, about 208 KiB by default).
pub const REPLAY_WINDOW: usize = 512 * 1024;

/// One stream's replay window.
#[derive(Debug, Default)]
struct ReplayStream {
    /// Payload bytes handed to shim sockets since the session began.
    sent: u64,
    /// The last of them, at most [`REPLAY_WINDOW`].
    window: VecDeque<u8>,
}

impl ReplayStream {
    fn record(&mut self, b: &[u8]) {
        self.sent = self.sent.saturating_add(b.len() as u64);
        let b = &b[b.len().saturating_sub(REPLAY_WINDOW)..];
        let over = (self.window.len() + b.len()).saturating_sub(REPLAY_WINDOW);
        self.window.drain(..over);
        self.window.extend(b);
    }

    /// The bytes from `from` on, as far as the window holds them, and how
    /// many before them it no longer holds.
    fn from(&self, from: u64) -> (Option<Bytes>, u64) {
        let held_from = self.sent - self.window.len() as u64;
        let start = from.clamp(held_from, self.sent);
        let lost = start.saturating_sub(from);
        let skip = usize::try_from(start - held_from).unwrap_or(usize::MAX);
        let rest: Vec<u8> = self.window.iter().skip(skip).copied().collect();
        ((!rest.is_empty()).then(|| Bytes::from(rest)), lost)
    }
}

/// A session's replay state.
#[derive(Debug, Default)]
struct Replay {
    stdout: ReplayStream,
    stderr: ReplayStream,
    /// The exit code was handed to a shim socket.
    exit: Option<u8>,
}

/// What a resuming shim is sent again.
#[derive(Debug, Default)]
pub struct Resumed {
    /// The items, in order, ahead of anything queued.
    pub items: Vec<Output>,
    /// Bytes before the resume points the window no longer held.
    pub lost: u64,
    /// The resume points were past what was sent (clamped).
    pub ahead: bool,
}

/// A session's queue proper, shared by the producer (the session, for the
/// VM's io reader) and the consumer ([`OutputQueue`]). Its bound is the
/// session's budget semaphore, not the queue. A plain locked deque: an
/// idle session allocates nothing, a busy one reuses the same two buffers
/// (the consumer swaps the whole deque out in one lock), and a push takes
/// one uncontended lock.
#[derive(Debug, Default)]
struct Chan {
    items: Mutex<VecDeque<Output>>,
    /// A push to an empty queue, or the session went: wakes the consumer
    /// (a permit is kept if it is not waiting yet, so no wake-up is lost).
    ready: Notify,
    /// The consumer is gone: pushes fail.
    rx_gone: AtomicBool,
    /// The session is gone: nothing more comes.
    tx_gone: AtomicBool,
}

/// The receiving side of a session's output queue, handed to the shim
/// connection that holds the token and given back when it goes.
#[derive(Debug)]
pub struct OutputQueue {
    /// Items taken from the queue but not (fully) written to a shim; they
    /// go first.
    pub front: VecDeque<Output>,
    chan: Arc<Chan>,
}

impl OutputQueue {
    /// The next item without waiting.
    pub fn try_next(&mut self) -> Option<Output> {
        if let Some(o) = self.front.pop_front() {
            return Some(o);
        }
        // `front` is empty: take everything queued at once.
        if let Ok(mut items) = self.chan.items.lock() {
            std::mem::swap(&mut *items, &mut self.front);
        }
        self.front.pop_front()
    }

    /// The next item; `None` once the session is gone and nothing is left.
    /// Cancel safe: nothing is taken from the queue but into `front`.
    pub async fn next(&mut self) -> Option<Output> {
        loop {
            if let Some(o) = self.try_next() {
                return Some(o);
            }
            if self.chan.tx_gone.load(Ordering::Acquire) {
                return self.try_next();
            }
            self.chan.ready.notified().await;
        }
    }
}

impl Drop for OutputQueue {
    fn drop(&mut self) {
        self.chan.rx_gone.store(true, Ordering::Release);
    }
}

/// A boolean others wait for (a shim connected, the process started): a
/// `watch<bool>` in a few bytes inside the session, where tokio's watch
/// channel is a separate allocation of about 344 bytes (eight wait lists),
/// two per session.
#[derive(Debug, Default)]
pub struct Flag {
    value: AtomicBool,
    changed: Notify,
}

impl Flag {
    /// The value.
    pub fn get(&self) -> bool {
        self.value.load(Ordering::Acquire)
    }

    /// Set the value, waking whoever waits for it.
    pub fn set(&self, value: bool) {
        if self.value.swap(value, Ordering::AcqRel) != value {
            self.changed.notify_waiters();
        }
    }

    /// Completes once the value is `want` (at once if it is).
    pub async fn wait_for(&self, want: bool) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the check: a change after it wakes us.
            changed.as_mut().enable();
            if self.get() == want {
                return;
            }
            changed.await;
        }
    }
}

/// The cost of the largest item of output: one agent message's payload
/// (a joined item is never larger).
pub const LARGEST_ITEM: usize = proxy_proto::hyper::MAX_MESSAGE_LEN + ITEM_COST as usize;

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
    chan: Arc<Chan>,
    queue: Mutex<Option<OutputQueue>>,
    budget: Arc<Semaphore>,
    /// The session's bound (`budget`'s permits when nothing is queued).
    capacity: usize,
    /// The daemon's budget, and how much of it this session's queue holds.
    global: Budget,
    global_held: AtomicU64,
    /// A shim claimed the token at least once.
    claimed: AtomicBool,
    /// A shim asked to resume: what is handed to shims is kept.
    replay_on: AtomicBool,
    replay: Mutex<Replay>,
    /// Output dropped because nobody ever claimed the session.
    pub bytes_dropped_unclaimed: AtomicU64,
    /// The VM's io flow.
    pub flow: Arc<IoFlow>,
    /// Whether a shim holds the token.
    pub shim: Flag,
    /// Whether the process was started.
    pub started: Flag,
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
        // Room for the largest item, whatever the bound.
        let capacity = bound.max(LARGEST_ITEM);
        let chan = Arc::new(Chan::default());
        Arc::new(Self {
            token,
            io_base,
            queue: Mutex::new(Some(OutputQueue {
                front: VecDeque::new(),
                chan: chan.clone(),
            })),
            chan,
            budget: Arc::new(Semaphore::new(capacity)),
            capacity,
            global,
            global_held: AtomicU64::new(0),
            claimed: AtomicBool::new(false),
            replay_on: AtomicBool::new(false),
            replay: Mutex::default(),
            bytes_dropped_unclaimed: AtomicU64::new(0),
            flow,
            shim: Flag::default(),
            started: Flag::default(),
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

    /// [`try_push`](Self::try_push) of every item of `items` at once (the
    /// messages of one read for this session): one take of the budgets,
    /// one lock, one wake-up. `Some(pushed)`: all were handled, `items` is
    /// empty, and `pushed` is `false` if the session is gone. `None`:
    /// nothing was done (not enough budget for all of them now, or no shim
    /// ever claimed the session): the caller pushes them one by one.
    pub fn try_push_all(&self, items: &mut Vec<Output>) -> Option<bool> {
        if !self.claimed.load(Ordering::Relaxed) {
            return None;
        }
        let cost = items
            .iter()
            .try_fold(0u32, |sum, o| sum.checked_add(o.cost()))?;
        match self.budget.try_acquire_many(cost) {
            Ok(permit) => permit.forget(),
            Err(tokio::sync::TryAcquireError::Closed) => {
                items.clear();
                return Some(false);
            }
            Err(tokio::sync::TryAcquireError::NoPermits) => return None,
        }
        match self.global.try_acquire_many(cost) {
            Ok(permit) => permit.forget(),
            Err(_) => {
                self.budget.add_permits(cost as usize);
                return None;
            }
        }
        self.global_held
            .fetch_add(u64::from(cost), Ordering::Relaxed);
        Some(self.queue_all_now(items, cost))
    }

    /// [`queue_now`](Self::queue_now) for all of `items` (costing `cost`),
    /// leaving it empty.
    fn queue_all_now(&self, items: &mut Vec<Output>, cost: u32) -> bool {
        if self.budget.is_closed() {
            self.release(cost as usize);
            items.clear();
            return false;
        }
        let bytes: u64 = items
            .iter()
            .map(|o| match o {
                Output::Stdout(b) | Output::Stderr(b) => b.len() as u64,
                _ => 0,
            })
            .sum();
        self.bytes_out.fetch_add(bytes, Ordering::Relaxed);
        if self.chan.rx_gone.load(Ordering::Acquire) {
            items.clear();
            return false;
        }
        let Ok(mut queue) = self.chan.items.lock() else {
            items.clear();
            return false;
        };
        let was_empty = queue.is_empty();
        queue.extend(items.drain(..));
        drop(queue);
        if was_empty {
            self.chan.ready.notify_one();
        }
        true
    }

    fn drop_unclaimed(&self, item: &Output) -> bool {
        if self.budget.is_closed() {
            return false;
        }
        let n = match item.live() {
            Output::Stdout(b) | Output::Stderr(b) => b.len() as u64,
            _ => 0,
        };
        if self.bytes_dropped_unclaimed.fetch_add(n, Ordering::Relaxed) == 0 {
            tracing::warn!(
                io_base = self.io_base,
                "the agent sends output for a session no shim has claimed; beyond {UNCLAIMED_BOUND} bytes it is dropped"
            );
        }
        true
    }

    /// Whether shims of this session resume ([`record`](Self::record)
    /// has work to do).
    pub fn replay_on(&self) -> bool {
        self.replay_on.load(Ordering::Relaxed)
    }

    /// The first `handed` payload bytes of `o` went to a shim's socket:
    /// keep them for a resume. Replayed items are in the window already.
    pub fn record(&self, o: &Output, handed: usize) {
        let Ok(mut r) = self.replay.lock() else {
            return;
        };
        match o {
            Output::Stdout(b) => r.stdout.record(&b[..handed.min(b.len())]),
            Output::Stderr(b) => r.stderr.record(&b[..handed.min(b.len())]),
            Output::Exited(code) if handed > 0 => r.exit = Some(*code),
            Output::Exited(_) | Output::Replayed(_) => {}
        }
    }

    /// A shim resumes having received `stdout` and `stderr` bytes: what
    /// to send it again, from the window, before anything queued. From now
    /// on what is handed to shims is kept.
    pub fn resume(&self, stdout: u64, stderr: u64) -> Resumed {
        self.replay_on.store(true, Ordering::Relaxed);
        let Ok(r) = self.replay.lock() else {
            return Resumed::default();
        };
        let mut out = Resumed {
            ahead: stdout > r.stdout.sent || stderr > r.stderr.sent,
            ..Resumed::default()
        };
        let (o, lost_o) = r.stdout.from(stdout);
        let (e, lost_e) = r.stderr.from(stderr);
        out.lost = lost_o.saturating_add(lost_e);
        if let Some(b) = o {
            out.items
                .push(Output::Replayed(Box::new(Output::Stdout(b))));
        }
        if let Some(b) = e {
            out.items
                .push(Output::Replayed(Box::new(Output::Stderr(b))));
        }
        if let Some(code) = r.exit {
            out.items
                .push(Output::Replayed(Box::new(Output::Exited(code))));
        }
        out
    }

    /// A shim claims the session: a resume (`Some((stdout, stderr))`, the
    /// bytes it received of each) puts what the replay window holds past
    /// those points at the head of the queue. Returns the bytes before the
    /// resume points the window no longer held (counted as maybe lost),
    /// and whether the points were past what was sent. Then output is
    /// queued up to the session's whole bound.
    pub fn shim_claims(&self, resume: Option<(u64, u64)>) -> (u64, bool) {
        let mut out = (0, false);
        if let Some((stdout, stderr)) = resume {
            let resumed = self.resume(stdout, stderr);
            if resumed.lost > 0 {
                self.bytes_maybe_lost
                    .fetch_add(resumed.lost, Ordering::Relaxed);
            }
            out = (resumed.lost, resumed.ahead);
            self.push_front(resumed.items);
        }
        self.claimed();
        out
    }

    /// A write of a batch holding `inflight`'s output ended. What reached
    /// the shim's socket frees its budget and is recorded for a resume;
    /// after a failure, a byte the kernel took is never sent again (it went
    /// to this shim, or is lost with its socket) and only what it did not
    /// take goes back to the head of `q`, for the next shim. `unread` is
    /// what the socket held unread after the previous write. Returns the
    /// bytes that may be lost with a failed socket (0 after a success).
    pub fn write_done(
        &self,
        inflight: &mut Inflight,
        q: &mut OutputQueue,
        outcome: WriteOutcome,
        unread: usize,
    ) -> usize {
        match outcome {
            WriteOutcome::Done => {
                self.release(inflight.cost());
                if self.replay_on() {
                    for (_, o) in &inflight.items {
                        self.record(o, usize::MAX);
                    }
                }
                inflight.clear();
                0
            }
            WriteOutcome::Failed { progress } => {
                let settled = inflight.settle(progress);
                self.release(settled.handed_cost);
                if self.replay_on() {
                    for (o, n) in &settled.handed {
                        self.record(o, *n);
                    }
                }
                for o in settled.back.into_iter().rev() {
                    q.front.push_front(o);
                }
                let lost = unread.saturating_add(settled.handed_bytes);
                if lost > 0 {
                    self.bytes_maybe_lost
                        .fetch_add(lost as u64, Ordering::Relaxed);
                }
                lost
            }
        }
    }

    /// Put `items` at the head of the queue (a resume's replay). What an
    /// earlier resume queued to be sent again and no shim got is dropped
    /// first: this replay starts from the new resume point and covers it
    /// (found by the simulation: a shim that resumed and died before its
    /// replay was written, then resumed again, got the replay twice).
    pub fn push_front(&self, items: Vec<Output>) {
        if let Ok(mut g) = self.queue.lock() {
            if let Some(q) = g.as_mut() {
                q.front.retain(|o| !matches!(o, Output::Replayed(_)));
                for o in items.into_iter().rev() {
                    q.front.push_front(o);
                }
            }
        }
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
        if self.chan.rx_gone.load(Ordering::Acquire) {
            return false;
        }
        let Ok(mut items) = self.chan.items.lock() else {
            return false;
        };
        let was_empty = items.is_empty();
        items.push_back(item);
        drop(items);
        // The consumer waits only after it found the queue empty.
        if was_empty {
            self.chan.ready.notify_one();
        }
        true
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
        self.chan.tx_gone.store(true, Ordering::Release);
        self.chan.ready.notify_one();
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
    async fn a_run_is_queued_whole_in_order_or_not_at_all() {
        // The bound is never below one agent message and its item cost
        // (10240 + 128 bytes); an item of 1000 bytes costs 1128.
        let s = Session::new("t".into(), 3, 10240, Arc::default());
        assert_eq!(LARGEST_ITEM, 10368);
        let run = |n: usize, len: usize| -> Vec<Output> {
            (0..n)
                .map(|i| Output::Stdout(Bytes::from(vec![i as u8; len])))
                .collect()
        };
        // Never claimed: the one-by-one path (with its bound) decides.
        let mut items = run(3, 10);
        assert_eq!(s.try_push_all(&mut items), None);
        assert_eq!(items.len(), 3, "nothing taken");
        s.claimed();
        let mut items = run(3, 1000);
        assert_eq!(s.try_push_all(&mut items), Some(true));
        assert!(items.is_empty());
        assert_eq!(s.queued_bytes(), 3 * 1128);
        // More than the budget has left (10368 - 3384 = 6984): nothing
        // taken, and the budget is untouched (a run that fits still goes).
        let mut big = run(7, 1000);
        assert_eq!(s.try_push_all(&mut big), None);
        assert_eq!(big.len(), 7);
        let mut items = run(6, 1000);
        assert_eq!(s.try_push_all(&mut items), Some(true));
        let mut q = s.take_queue().unwrap();
        let mut got = Vec::new();
        while let Some(o) = q.try_next() {
            got.push(o);
        }
        let firsts: Vec<u8> = got
            .iter()
            .map(|o| match o {
                Output::Stdout(b) => b[0],
                o => panic!("{o:?}"),
            })
            .collect();
        assert_eq!(firsts, [0, 1, 2, 0, 1, 2, 3, 4, 5]);
        s.written(got.iter());
        // Closed: refused, and the items are dropped.
        s.close();
        let mut items = run(2, 10);
        assert_eq!(s.try_push_all(&mut items), Some(false));
        assert!(items.is_empty());
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

    #[test]
    fn the_replay_window_serves_from_any_point_it_holds() {
        let mut r = ReplayStream::default();
        r.record(b"hello ");
        r.record(b"world");
        assert_eq!(r.from(6), (Some(Bytes::from_static(b"world")), 0));
        assert_eq!(r.from(11), (None, 0), "all received");
        assert_eq!(r.from(99), (None, 0), "ahead: nothing to send");
        // More than the window: only its last REPLAY_WINDOW bytes stay.
        r.record(&vec![7u8; REPLAY_WINDOW + 10]);
        assert_eq!(r.window.len(), REPLAY_WINDOW);
        let sent = 11 + REPLAY_WINDOW as u64 + 10;
        assert_eq!(r.sent, sent);
        let (b, lost) = r.from(0);
        assert_eq!((b.map(|b| b.len()), lost), (Some(REPLAY_WINDOW), 21));
        let (b, lost) = r.from(sent - 3);
        assert_eq!((b.map(|b| b.to_vec()), lost), (Some(vec![7; 3]), 0));
    }

    #[test]
    fn a_resume_replays_stdout_stderr_then_the_exit() {
        let s = Session::new("t".into(), 3, 1 << 20, Arc::default());
        assert!(!s.replay_on());
        s.resume(0, 0);
        assert!(s.replay_on());
        s.record(&Output::Stdout(Bytes::from_static(b"abcdef")), usize::MAX);
        s.record(&Output::Stderr(Bytes::from_static(b"xyz")), 2);
        s.record(&Output::Exited(4), 1);
        let r = s.resume(2, 0);
        assert_eq!((r.lost, r.ahead), (0, false));
        let got: Vec<String> = r.items.iter().map(|o| format!("{:?}", o.live())).collect();
        assert_eq!(got, ["Stdout(b\"cdef\")", "Stderr(b\"xy\")", "Exited(4)"]);
        assert!(
            r.items.iter().all(|o| o.cost() == 0),
            "replays hold no budget"
        );
        assert!(s.resume(7, 0).ahead);
    }

    #[test]
    fn regression_a_second_resume_does_not_replay_the_first_ones_items_again() {
        // Found by `cargo xtask sim` (seed 30): a shim resumed, died before
        // its replay was written, and resumed again from the same point.
        let s = Session::new("t".into(), 3, 1 << 20, Arc::default());
        s.shim_claims(Some((0, 0)));
        s.record(&Output::Stdout(Bytes::from_static(b"abcdef")), usize::MAX);
        s.shim_claims(Some((2, 0)));
        s.shim_claims(Some((2, 0)));
        let mut q = s.take_queue().unwrap();
        let mut got = Vec::new();
        while let Some(o) = q.try_next() {
            got.push(format!("{:?}", o.live()));
        }
        assert_eq!(got, ["Stdout(b\"cdef\")"]);
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

    #[test]
    fn a_flag_wakes_its_waiters_when_it_changes_to_what_they_wait_for() {
        use std::future::Future;
        use std::task::{Context, Poll, Waker};
        let poll = |f: std::pin::Pin<&mut dyn Future<Output = ()>>| {
            f.poll(&mut Context::from_waker(Waker::noop()))
        };
        let flag = Flag::default();
        assert!(!flag.get());
        let mut up = std::pin::pin!(flag.wait_for(true));
        let mut down = std::pin::pin!(flag.wait_for(false));
        assert_eq!(poll(down.as_mut()), Poll::Ready(()), "false is the start");
        assert!(poll(up.as_mut()).is_pending());
        flag.set(false);
        assert!(poll(up.as_mut()).is_pending(), "woke for no change");
        flag.set(true);
        assert!(flag.get());
        assert_eq!(poll(up.as_mut()), Poll::Ready(()));
        let mut down = std::pin::pin!(flag.wait_for(false));
        assert!(poll(down.as_mut()).is_pending());
        flag.set(false);
        assert_eq!(poll(down.as_mut()), Poll::Ready(()));
    }
}
