//! One timer per task, for the deadlines a sans-IO machine asks for
//! (`poll_timeout`).
//!
//! Arming a tokio timer for every deadline costs a timer-wheel insert and,
//! often, a wake-up of the I/O driver (a system call); a task whose
//! machine's deadline moves with every command or read would pay that per
//! command. A [`Deadline`] is moved only when the machine's deadline comes
//! earlier than where it is set, or after it fired: firing early (the
//! deadline moved later) is harmless, as the machine's `handle_timeout`
//! finds nothing due and the timer is set again. The sleep is boxed and
//! made only once a deadline exists, so an idle connection pays a pointer.

use std::pin::Pin;
use std::time::Instant;

use tokio::time::Sleep;

/// A lazily moved timer.
#[derive(Debug, Default)]
pub struct Deadline {
    sleep: Option<Pin<Box<Sleep>>>,
    /// Where the timer is set, while it waits (None: not armed).
    armed: Option<Instant>,
}

impl Deadline {
    /// A timer that is not armed.
    pub fn new() -> Self {
        Self::default()
    }

    /// Follow the machine's next deadline (`poll_timeout()`). `None`
    /// leaves a timer that is set where it is: it fires once more, for
    /// nothing, rather than be moved again for the machine's next
    /// deadline (a ctl channel between two commands has none: were the
    /// timer cleared then, every command would move it).
    pub fn set(&mut self, deadline: Option<Instant>) {
        let Some(d) = deadline else {
            return;
        };
        if self.armed.is_some_and(|at| at <= d) {
            return; // set earlier: it fires, finds nothing due, is moved on
        }
        let at = tokio::time::Instant::from_std(d);
        match &mut self.sleep {
            Some(s) => s.as_mut().reset(at),
            None => self.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
        }
        self.armed = Some(d);
    }

    /// Whether a deadline is set.
    pub fn is_armed(&self) -> bool {
        self.armed.is_some()
    }

    /// Completes when the deadline passes (never while none is set). Call
    /// the machine's `handle_timeout`, then [`set`](Self::set) again.
    pub async fn fired(&mut self) {
        match (&mut self.sleep, self.armed) {
            (Some(s), Some(_)) => {
                s.as_mut().await;
                self.armed = None;
            }
            _ => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn it_fires_at_the_earliest_deadline_and_is_moved_only_earlier() {
        let t0 = tokio::time::Instant::now();
        let mut d = Deadline::new();
        d.set(Some((t0 + Duration::from_secs(10)).into_std()));
        // A later deadline does not move it.
        d.set(Some((t0 + Duration::from_secs(20)).into_std()));
        d.fired().await;
        assert_eq!(t0.elapsed(), Duration::from_secs(10));
        assert!(!d.is_armed());
        // An earlier one does.
        d.set(Some((t0 + Duration::from_secs(30)).into_std()));
        d.set(Some((t0 + Duration::from_secs(15)).into_std()));
        d.fired().await;
        assert_eq!(t0.elapsed(), Duration::from_secs(15));
        // No deadline, while it is set: it fires where it was set.
        d.set(Some((t0 + Duration::from_secs(25)).into_std()));
        d.set(None);
        assert!(d.is_armed());
        d.fired().await;
        assert_eq!(t0.elapsed(), Duration::from_secs(25));
        // No deadline: it never fires.
        d.set(None);
        let r = tokio::time::timeout(Duration::from_secs(3600), d.fired()).await;
        assert!(r.is_err());
    }
}
