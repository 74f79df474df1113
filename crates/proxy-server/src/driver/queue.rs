//! A bounded FIFO queue with one consumer, embedded in its owner: what a
//! VM's tasks take their requests from.
//!
//! A tokio `mpsc` channel allocates its shared state (half a KiB, cache-line
//! aligned) and a first block of 32 slots when it is made, and keeps them
//! as long as it lives: some 2 KiB per channel, two channels per VM, for
//! queues that are empty nearly all the time. This one lives inside its
//! owner (the [`Vm`](crate::vm::Vm)), allocates its slots only when items
//! are queued, and gives them back when its consumer finds it empty.
//!
//! The semantics are a bounded mpsc's: [`send`](Queue::send) waits, never
//! fails, while the queue is full, and waiting senders are let in first
//! come, first served (a fair semaphore counts the free slots); items come
//! out in the order they went in; [`close`](Queue::close) makes every
//! send, waiting or not, fail with its item, while what was queued can
//! still be received; [`close_and_clear`](Queue::close_and_clear), which
//! the consumer's owner calls when it is dropped (as dropping a tokio mpsc
//! receiver does), also drops what was queued, so that nobody waits for a
//! consumer that is gone.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

use tokio::sync::{Notify, Semaphore};

/// See the module docs.
#[derive(Debug)]
pub struct Queue<T> {
    state: Mutex<State<T>>,
    /// Free slots. A sender takes one before it queues its item, and the
    /// consumer gives one back per item it takes.
    room: Semaphore,
    /// Wakes the consumer when an item is queued (or the queue closes).
    ready: Notify,
    /// Slots kept while idle (see [`Queue::keeping`]).
    keep: usize,
}

#[derive(Debug)]
struct State<T> {
    items: VecDeque<T>,
    closed: bool,
}

/// Why [`Queue::try_recv`] gave nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryRecvError {
    /// Nothing queued now.
    Empty,
    /// Nothing queued, and nothing will be: the queue is closed.
    Closed,
}

impl<T> Queue<T> {
    /// An empty queue of at most `bound` items (at least one).
    pub fn new(bound: usize) -> Self {
        Queue {
            state: Mutex::new(State {
                items: VecDeque::new(),
                closed: false,
            }),
            room: Semaphore::new(bound.clamp(1, Semaphore::MAX_PERMITS)),
            ready: Notify::new(),
            keep: 0,
        }
    }

    /// The same queue, keeping up to `slots` slots' memory while idle
    /// instead of none: for a queue that empties after nearly every item
    /// (a VM's ctl requests, one per command), where giving the memory
    /// back costs an allocation and a free per item.
    pub fn keeping(mut self, slots: usize) -> Self {
        self.keep = slots;
        self
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Nothing panics while the lock is held; were it poisoned, the
        // state is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue `item`, waiting while the queue is full. `Err(item)`: the
    /// queue is closed. Dropped while it waits, it queues nothing.
    pub async fn send(&self, item: T) -> Result<(), T> {
        match self.room.acquire().await {
            // The slot is given back by the consumer when it takes the item.
            Ok(permit) => permit.forget(),
            Err(_) => return Err(item),
        }
        self.push_into_slot(item)
    }

    /// Queue `item` if there is a free slot, without waiting. `Err(item)`:
    /// the queue is full or closed ([`is_closed`](Self::is_closed) tells).
    pub fn try_send(&self, item: T) -> Result<(), T> {
        match self.room.try_acquire() {
            Ok(permit) => permit.forget(),
            Err(_) => return Err(item),
        }
        self.push_into_slot(item)
    }

    /// Queue `item` in the slot its sender took.
    fn push_into_slot(&self, item: T) -> Result<(), T> {
        {
            let mut st = self.lock();
            // Closed after the slot was taken: the consumer may be done
            // draining, so the item must not stay behind.
            if st.closed {
                return Err(item);
            }
            st.items.push_back(item);
        }
        self.ready.notify_one();
        Ok(())
    }

    /// Whether the queue is closed.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Take the next item, if one is queued. For the consumer only.
    pub fn try_recv(&self) -> Result<T, TryRecvError> {
        let mut st = self.lock();
        match st.items.pop_front() {
            Some(item) => {
                drop(st);
                self.room.add_permits(1);
                Ok(item)
            }
            None if st.closed => Err(TryRecvError::Closed),
            None => {
                // Idle: the slots' memory goes back until items come.
                if st.items.capacity() > self.keep {
                    st.items = VecDeque::new();
                }
                Err(TryRecvError::Empty)
            }
        }
    }

    /// The next item, waiting for one; `None` once the queue is closed and
    /// empty. For the consumer only (one at a time). Cancel-safe: dropped
    /// while waiting, it takes nothing.
    pub async fn recv(&self) -> Option<T> {
        loop {
            match self.try_recv() {
                Ok(item) => return Some(item),
                Err(TryRecvError::Closed) => return None,
                // A send between the check and the wait leaves a permit
                // in `ready`: the wait then ends at once.
                Err(TryRecvError::Empty) => self.ready.notified().await,
            }
        }
    }

    /// Refuse every send from now on (those waiting for room too). What
    /// is queued stays, for [`recv`](Self::recv) to drain.
    pub fn close(&self) {
        self.lock().closed = true;
        self.room.close();
        self.ready.notify_one();
    }

    /// Close, and drop what is queued.
    pub fn close_and_clear(&self) {
        let items = {
            let mut st = self.lock();
            st.closed = true;
            std::mem::take(&mut st.items)
        };
        self.room.close();
        self.ready.notify_one();
        // Outside the lock: dropping an item may wake someone.
        drop(items);
    }

    /// Items queued now (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().items.len()
    }

    /// Slots allocated now (for tests of its memory).
    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.lock().items.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::sync::Arc;
    use std::task::{Context, Poll};

    /// Poll `f` once with a waker that does nothing.
    fn poll_once<F: Future>(f: std::pin::Pin<&mut F>) -> Poll<F::Output> {
        f.poll(&mut Context::from_waker(std::task::Waker::noop()))
    }

    #[tokio::test]
    async fn items_come_out_in_order_and_the_slots_go_back_when_idle() {
        let q = Queue::new(100);
        assert_eq!(q.capacity(), 0, "nothing allocated before an item");
        for i in 0..50 {
            q.send(i).await.unwrap();
        }
        assert!(q.capacity() >= 50);
        for i in 0..50 {
            assert_eq!(q.recv().await, Some(i));
        }
        // Found empty: the slots are freed.
        assert_eq!(q.try_recv(), Err(TryRecvError::Empty));
        assert_eq!(q.capacity(), 0);
    }

    #[tokio::test]
    async fn a_keeping_queue_keeps_a_few_slots_when_idle_and_frees_a_burst() {
        let q = Queue::new(100).keeping(4);
        q.send(1).await.unwrap();
        assert_eq!(q.recv().await, Some(1));
        assert_eq!(q.try_recv(), Err(TryRecvError::Empty));
        let kept = q.capacity();
        assert!((1..=4).contains(&kept), "{kept}");
        // One item after another: the same slots, never freed.
        for i in 0..10 {
            q.send(i).await.unwrap();
            assert_eq!(q.recv().await, Some(i));
            assert_eq!(q.try_recv(), Err(TryRecvError::Empty));
            assert_eq!(q.capacity(), kept);
        }
        for i in 0..50 {
            q.send(i).await.unwrap();
        }
        for i in 0..50 {
            assert_eq!(q.recv().await, Some(i));
        }
        assert_eq!(q.try_recv(), Err(TryRecvError::Empty));
        assert_eq!(q.capacity(), 0, "more than it keeps: all freed");
    }

    #[tokio::test]
    async fn a_full_queue_makes_senders_wait_first_come_first_served() {
        let q = Arc::new(Queue::new(2));
        q.send(0).await.unwrap();
        q.send(1).await.unwrap();
        let mut third = pin!(q.send(2));
        let mut fourth = pin!(q.send(3));
        assert!(poll_once(third.as_mut()).is_pending(), "bounded at 2");
        assert!(poll_once(fourth.as_mut()).is_pending());
        assert_eq!(q.len(), 2);
        // One slot freed: the sender that waited first gets it.
        assert_eq!(q.try_recv(), Ok(0));
        assert!(poll_once(fourth.as_mut()).is_pending());
        assert_eq!(poll_once(third.as_mut()), Poll::Ready(Ok(())));
        assert!(poll_once(fourth.as_mut()).is_pending(), "full again");
        assert_eq!(q.try_recv(), Ok(1));
        assert_eq!(poll_once(fourth.as_mut()), Poll::Ready(Ok(())));
        assert_eq!(q.try_recv(), Ok(2));
        assert_eq!(q.try_recv(), Ok(3));
        assert_eq!(q.try_recv(), Err(TryRecvError::Empty));
    }

    #[tokio::test]
    async fn a_send_dropped_while_it_waits_queues_nothing_and_frees_its_turn() {
        let q = Queue::new(1);
        q.send(0).await.unwrap();
        {
            let mut dropped = pin!(q.send(1));
            assert!(poll_once(dropped.as_mut()).is_pending());
        }
        let mut next = pin!(q.send(2));
        assert!(poll_once(next.as_mut()).is_pending());
        assert_eq!(q.try_recv(), Ok(0));
        assert_eq!(poll_once(next.as_mut()), Poll::Ready(Ok(())));
        assert_eq!(q.try_recv(), Ok(2));
        assert_eq!(q.try_recv(), Err(TryRecvError::Empty));
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_consumer_is_woken_by_a_send() {
        let q = Arc::new(Queue::new(4));
        let consumer = tokio::spawn({
            let q = q.clone();
            async move { (q.recv().await, q.recv().await) }
        });
        // Let it wait on the empty queue.
        tokio::task::yield_now().await;
        assert!(!consumer.is_finished());
        q.send("a").await.unwrap();
        q.send("b").await.unwrap();
        assert_eq!(consumer.await.unwrap(), (Some("a"), Some("b")));
    }

    #[tokio::test]
    async fn a_recv_dropped_while_it_waits_loses_nothing() {
        let q = Queue::new(4);
        {
            let mut r = pin!(q.recv());
            assert!(poll_once(r.as_mut()).is_pending());
        }
        q.send(7).await.unwrap();
        let mut r = pin!(q.recv());
        assert_eq!(poll_once(r.as_mut()), Poll::Ready(Some(7)));
    }

    #[tokio::test]
    async fn close_fails_every_send_waiting_or_not_and_keeps_what_is_queued() {
        let q = Queue::new(1);
        q.send(1).await.unwrap();
        let mut waiting = pin!(q.send(2));
        assert!(poll_once(waiting.as_mut()).is_pending());
        q.close();
        assert_eq!(poll_once(waiting.as_mut()), Poll::Ready(Err(2)));
        assert_eq!(q.send(3).await, Err(3));
        // Still drained in order, then the end.
        assert_eq!(q.recv().await, Some(1));
        assert_eq!(q.recv().await, None);
        assert_eq!(q.try_recv(), Err(TryRecvError::Closed));
    }

    #[tokio::test]
    async fn a_consumer_waiting_when_the_queue_closes_sees_the_end() {
        let q = Arc::new(Queue::<u8>::new(1));
        let mut r = pin!(q.recv());
        assert!(poll_once(r.as_mut()).is_pending());
        q.close();
        assert_eq!(poll_once(r.as_mut()), Poll::Ready(None));
    }

    #[tokio::test]
    async fn close_and_clear_drops_what_was_queued_and_fails_waiting_senders() {
        let q = Queue::new(1);
        let item = Arc::new(());
        q.send(item.clone()).await.unwrap();
        let mut waiting = pin!(q.send(item.clone()));
        assert!(poll_once(waiting.as_mut()).is_pending());
        q.close_and_clear();
        assert_eq!(Arc::strong_count(&item), 2, "the queued item is dropped");
        assert!(matches!(poll_once(waiting.as_mut()), Poll::Ready(Err(_))));
        assert!(q.send(item.clone()).await.is_err());
        assert_eq!(q.len(), 0);
        assert_eq!(q.try_recv(), Err(TryRecvError::Closed));
    }
}
