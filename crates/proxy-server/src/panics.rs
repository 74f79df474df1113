//! Containing a panic (a bug) to the task it happened in.

use std::any::Any;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context, Poll};

/// A future that catches a panic of the one it wraps, ends, and reports
/// the panic's message once.
pub struct CatchPanic<F> {
    inner: Pin<Box<F>>,
    on_panic: Option<Box<dyn FnOnce(String) + Send>>,
}

impl<F> std::fmt::Debug for CatchPanic<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CatchPanic").finish_non_exhaustive()
    }
}

impl<F: Future<Output = ()>> CatchPanic<F> {
    /// Wrap `inner`; `on_panic` gets the message if it panics.
    pub fn new(inner: F, on_panic: impl FnOnce(String) + Send + 'static) -> Self {
        CatchPanic {
            inner: Box::pin(inner),
            on_panic: Some(Box::new(on_panic)),
        }
    }
}

impl<F: Future<Output = ()>> Future for CatchPanic<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        // The wrapped future is dropped after a panic and never polled
        // again, so no broken invariant of its own can be observed.
        match catch_unwind(AssertUnwindSafe(|| this.inner.as_mut().poll(cx))) {
            Ok(p) => p,
            Err(payload) => {
                if let Some(f) = this.on_panic.take() {
                    f(message(payload.as_ref()));
                }
                Poll::Ready(())
            }
        }
    }
}

/// A panic payload's message.
pub fn message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    }
}
