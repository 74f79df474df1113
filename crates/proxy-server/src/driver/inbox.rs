//! A client connection's reader-to-writer queue (responses, the session to
//! attach, the drain order) and the flag that tells the writer to give up:
//! a [`Queue`] shared by the two halves, with the ends of a tokio mpsc.
//!
//! tokio's bounded `mpsc` allocates its channel (512 bytes, cache-line
//! aligned) and a first block of 32 slots up front: about 1.8 KiB per
//! connection, most of a thousand idle shims' memory. This is one small
//! allocation; its slots are allocated only while something is queued.
//! What the connection relies on:
//! - a full queue makes the sender wait (back-pressure on a client that
//!   does not read its responses), never fail;
//! - the receiver gets items in order, then `None` once the sender is
//!   gone (or closed) and the queue is empty;
//! - a sender whose receiver is gone gets its item back, and what was
//!   queued is dropped with the receiver.

use std::sync::Arc;

use crate::driver::queue::{self, Queue};
use crate::session::Flag;

/// Why [`Receiver::try_recv`] has nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryRecvError {
    /// Nothing queued, the sender is still there.
    Empty,
    /// Nothing queued and the sender is gone.
    Disconnected,
}

#[derive(Debug)]
struct Shared<T> {
    queue: Queue<T>,
    /// Raised by the sender's side: the receiver should give up.
    stop: Flag,
}

/// The sending half.
#[derive(Debug)]
pub struct Sender<T> {
    shared: Arc<Shared<T>>,
}

/// The receiving half.
#[derive(Debug)]
pub struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

/// A queue of at most `cap` items (at least one).
pub fn channel<T>(cap: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        queue: Queue::new(cap),
        stop: Flag::default(),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

impl<T> Sender<T> {
    /// Queue `item` if there is room. `Err(item)`: the queue is full or
    /// the receiver is gone ([`is_orphaned`](Self::is_orphaned) tells).
    pub fn try_send(&self, item: T) -> Result<(), T> {
        self.shared.queue.try_send(item)
    }

    /// Queue `item`, waiting while the queue is full. `Err(item)`: the
    /// receiver is gone.
    pub async fn send(&self, item: T) -> Result<(), T> {
        self.shared.queue.send(item).await
    }

    /// Whether the receiver is gone (or this side closed the queue).
    pub fn is_orphaned(&self) -> bool {
        self.shared.queue.is_closed()
    }

    /// Nothing more comes: the receiver gets what is queued, then `None`
    /// (as when the sender is dropped).
    pub fn close(&self) {
        self.shared.queue.close();
    }

    /// Tell the receiver to give up ([`Receiver::stopped`]).
    pub fn stop(&self) {
        self.shared.stop.set(true);
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        self.close();
    }
}

impl<T> Receiver<T> {
    /// The next item, if one is queued.
    pub fn try_recv(&mut self) -> Result<T, TryRecvError> {
        self.shared.queue.try_recv().map_err(|e| match e {
            queue::TryRecvError::Empty => TryRecvError::Empty,
            queue::TryRecvError::Closed => TryRecvError::Disconnected,
        })
    }

    /// The next item, waiting for one; `None` once the sender is gone and
    /// nothing is left. Cancel-safe: an item is taken only by a call that
    /// returns it.
    pub async fn recv(&mut self) -> Option<T> {
        self.shared.queue.recv().await
    }

    /// Completes once the sender's side called [`Sender::stop`].
    pub async fn stopped(&self) {
        self.shared.stop.wait_for(true).await;
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        // What nobody will receive goes now, not with the last handle.
        self.shared.queue.close_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    /// Poll `f` once.
    fn poll_once<F: Future>(f: std::pin::Pin<&mut F>) -> Poll<F::Output> {
        f.poll(&mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn items_come_out_in_order_then_none_once_the_sender_is_gone() {
        let (tx, mut rx) = channel(4);
        for i in 0..4 {
            tx.try_send(i).unwrap();
        }
        drop(tx);
        let mut got = Vec::new();
        loop {
            let mut f = pin!(rx.recv());
            match poll_once(f.as_mut()) {
                Poll::Ready(Some(i)) => got.push(i),
                Poll::Ready(None) => break,
                Poll::Pending => panic!("recv waited with items queued or the sender gone"),
            }
        }
        assert_eq!(got, [0, 1, 2, 3]);
        assert_eq!(rx.try_recv(), Err(TryRecvError::Disconnected));
    }

    #[test]
    fn the_queue_is_bounded_and_a_full_sender_waits_until_an_item_is_taken() {
        let (tx, mut rx) = channel(2);
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        assert_eq!(tx.try_send(3), Err(3), "a third item fit in a queue of two");
        let mut send = pin!(tx.send(3));
        assert!(poll_once(send.as_mut()).is_pending(), "send did not wait");
        assert!(poll_once(send.as_mut()).is_pending(), "send did not wait");
        assert_eq!(rx.try_recv(), Ok(1));
        assert_eq!(poll_once(send.as_mut()), Poll::Ready(Ok(())));
        assert_eq!(rx.try_recv(), Ok(2));
        assert_eq!(rx.try_recv(), Ok(3));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
    }

    #[tokio::test]
    async fn a_waiting_receiver_is_woken_by_an_item_and_by_the_sender_leaving() {
        let (tx, mut rx) = channel::<u32>(1);
        let waiting = tokio::spawn(async move {
            let first = rx.recv().await;
            let second = rx.recv().await;
            (first, second)
        });
        tokio::task::yield_now().await;
        tx.send(7).await.unwrap();
        tokio::task::yield_now().await;
        drop(tx);
        assert_eq!(waiting.await.unwrap(), (Some(7), None));
    }

    #[test]
    fn a_sender_whose_receiver_is_gone_gets_its_item_back_even_while_waiting() {
        let (tx, rx) = channel(1);
        tx.try_send(1).unwrap();
        let mut send = pin!(tx.send(2));
        assert!(poll_once(send.as_mut()).is_pending());
        drop(rx);
        assert_eq!(poll_once(send.as_mut()), Poll::Ready(Err(2)));
        assert!(tx.is_orphaned());
        assert_eq!(tx.try_send(3), Err(3));
    }

    #[test]
    fn stop_completes_stopped_whether_it_came_before_or_after() {
        let (tx, rx) = channel::<()>(1);
        let mut waiting = pin!(rx.stopped());
        assert!(poll_once(waiting.as_mut()).is_pending());
        tx.stop();
        assert_eq!(poll_once(waiting.as_mut()), Poll::Ready(()));
        let mut later = pin!(rx.stopped());
        assert_eq!(poll_once(later.as_mut()), Poll::Ready(()));
    }

    #[test]
    fn a_dropped_receiver_frees_what_was_queued_at_once() {
        let (tx, rx) = channel(2);
        let item = Arc::new(());
        tx.try_send(item.clone()).unwrap();
        assert_eq!(Arc::strong_count(&item), 2);
        drop(rx);
        assert_eq!(
            Arc::strong_count(&item),
            1,
            "the queued item outlived its receiver"
        );
    }
}
