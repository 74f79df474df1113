//! The shim's side: one connection per container process.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use proxy_proto::payload::{ConnectShim, Signal};
use proxy_proto::{Command, FrameKind, Stream};
use tokio::sync::mpsc;

use crate::addr::ProxyAddr;
use crate::client::{log_entry, to_json, LogLevel, Token};
use crate::conn::{Conn, EventItem, Received};
use crate::error::{Error, Result};

/// Events buffered for a [`ShimEvents`] consumer before the proxy is slowed
/// down.
const EVENT_QUEUE: usize = 256;

/// The largest stdin frame sent. The proxy splits it into agent messages
/// of at most 10228 bytes; larger frames mean fewer headers, bounded well
/// below the proxy's 4 MiB default frame limit.
pub const STDIN_CHUNK: usize = 256 * 1024;

/// SIGWINCH, which is [`Shim::resize`]'s business.
const SIGWINCH: i64 = proxy_proto::payload::SIGWINCH;

/// What the process in the VM did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShimEvent {
    /// Bytes it wrote to stdout (or its terminal).
    Stdout(Bytes),
    /// Bytes it wrote to stderr.
    Stderr(Bytes),
    /// It exited with this code (128 + N when killed by signal N).
    Exited(u8),
}

impl ShimEvent {
    pub(crate) fn kind_name(&self) -> &'static str {
        match self {
            Self::Stdout(_) => "stdout",
            Self::Stderr(_) => "stderr",
            Self::Exited(_) => "ProcessExited",
        }
    }
}

/// Everything a process wrote, and its exit code: what
/// [`ShimEvents::collect`] gathers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    /// All of its stdout.
    pub stdout: Vec<u8>,
    /// All of its stderr.
    pub stderr: Vec<u8>,
    /// Its exit code.
    pub code: u8,
}

/// How [`Shim::reconnect`] retries: every `interval`, for at most `total`
/// (the reference shim's 100 ms for 10 s by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconnectPolicy {
    /// Pause between attempts.
    pub interval: Duration,
    /// Give up after this long.
    pub total: Duration,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(100),
            total: Duration::from_secs(10),
        }
    }
}

/// The output of a shim's process, in order: stdout and stderr bytes, then
/// the exit code. Keeps working across [`Shim::reconnect`].
///
/// It keeps the connection open by itself: a [`Shim`] handle may be moved
/// into a task that writes stdin and be dropped when it is done, while the
/// output is still read here.
pub struct ShimEvents {
    rx: mpsc::Receiver<EventItem>,
    /// Disconnected on purpose: nothing more will come.
    closed: bool,
    _conn: Arc<Inner>,
}

impl std::fmt::Debug for ShimEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShimEvents")
            .field("token", &self._conn.token)
            .finish_non_exhaustive()
    }
}

impl ShimEvents {
    /// The next event.
    ///
    /// `Err(e)` with [`Error::is_connection`] when the connection to the
    /// proxy was lost (call [`Shim::reconnect`], then go on receiving:
    /// the proxy kept the output that came meanwhile), [`Error::Protocol`]
    /// when the proxy broke the protocol, and [`Error::Closed`] once the shim
    /// is disconnected ([`Shim::disconnect`]) and everything was received.
    pub async fn recv(&mut self) -> Result<ShimEvent> {
        if self.closed {
            return Err(Error::Closed);
        }
        match self.rx.recv().await {
            Some(Err(Error::Closed)) | None => {
                self.closed = true;
                Err(Error::Closed)
            }
            Some(item) => item,
        }
    }

    /// Receive until the process exits: all of its stdout and stderr and its
    /// exit code. Fails on a lost connection (the partial output is lost
    /// with it; use [`recv`](Self::recv) to handle reconnects).
    pub async fn collect(&mut self) -> Result<Output> {
        let mut out = Output::default();
        loop {
            match self.recv().await? {
                ShimEvent::Stdout(b) => out.stdout.extend_from_slice(&b),
                ShimEvent::Stderr(b) => out.stderr.extend_from_slice(&b),
                ShimEvent::Exited(code) => {
                    out.code = code;
                    return Ok(out);
                }
            }
        }
    }
}

struct Inner {
    addr: ProxyAddr,
    token: Token,
    /// What was received, for resuming exactly there after a reconnect.
    received: Arc<Received>,
    events: mpsc::Sender<EventItem>,
    conn: Mutex<Arc<Conn>>,
}

/// A shim: the host-side stand-in of one process in the VM, holding its
/// I/O token. Cheap to clone (all clones share one connection), so stdin,
/// signals and output can be driven from different tasks.
///
/// Made by [`Shim::connect`] or [`Client::connect_shim`](crate::Client::connect_shim),
/// which also return the [`ShimEvents`] to read the process's output from.
#[derive(Clone)]
pub struct Shim {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Shim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shim")
            .field("addr", &self.inner.addr)
            .field("token", &self.inner.token)
            .finish_non_exhaustive()
    }
}

impl Shim {
    /// Connect to the proxy at `addr` and claim `token` (ConnectShim).
    ///
    /// The token may be claimed before the process it is for is started;
    /// the proxy keeps the process's output until the shim is there.
    pub async fn connect(
        addr: impl TryInto<ProxyAddr, Error = Error>,
        token: impl Into<Token>,
    ) -> Result<(Shim, ShimEvents)> {
        let addr = addr.try_into()?;
        let token = token.into();
        if token.as_str().is_empty() {
            return Err(Error::InvalidArgument("the token is empty".into()));
        }
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let received = Arc::new(Received::default());
        let conn = claim(&addr, &token, tx.clone(), &received).await?;
        let inner = Arc::new(Inner {
            addr,
            token,
            received,
            events: tx,
            conn: Mutex::new(Arc::new(conn)),
        });
        let events = ShimEvents {
            rx,
            closed: false,
            _conn: inner.clone(),
        };
        Ok((Shim { inner }, events))
    }

    /// The token this shim holds.
    pub fn token(&self) -> &Token {
        &self.inner.token
    }

    /// The proxy's address.
    pub fn addr(&self) -> &ProxyAddr {
        &self.inner.addr
    }

    fn conn(&self) -> Arc<Conn> {
        self.inner
            .conn
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Send bytes to the process's stdin, any amount (they go in frames of
    /// at most [`STDIN_CHUNK`] bytes, without copying). Returns once they
    /// are queued for the socket; waits while the queue is full. Empty
    /// `data` sends nothing: use [`close_stdin`](Self::close_stdin) for EOF.
    pub async fn send_stdin(&self, data: impl Into<Bytes>) -> Result<()> {
        let mut data = data.into();
        let conn = self.conn();
        while !data.is_empty() {
            let chunk = data.split_to(data.len().min(STDIN_CHUNK));
            conn.send(FrameKind::Stream(Stream::Stdin), chunk).await?;
        }
        Ok(())
    }

    /// Wait until everything queued so far (stdin, EOF, log lines) is
    /// written to the proxy's socket.
    pub async fn flush(&self) -> Result<()> {
        self.conn().flush().await
    }

    /// End the process's input: a zero-length stdin frame, which the proxy
    /// forwards as EOF.
    pub async fn close_stdin(&self) -> Result<()> {
        self.conn()
            .send(FrameKind::Stream(Stream::Stdin), Bytes::new())
            .await
    }

    /// Send signal `signal` (0–30, not SIGWINCH: see
    /// [`resize`](Self::resize)) to the process; answered once the proxy
    /// has delivered it. SIGKILL or SIGTERM before the process started ends
    /// it at once with exit code 0 (an [`ShimEvent::Exited`] comes first).
    ///
    /// A signal the proxy would refuse ([`Signal::validate`], the rules
    /// the proxy applies) is an [`Error::InvalidArgument`] with the proxy's
    /// own words, and nothing is sent.
    pub async fn signal(&self, signal: i32) -> Result<()> {
        if i64::from(signal) == SIGWINCH {
            return Err(Error::InvalidArgument(
                "SIGWINCH carries a window size: use resize(rows, columns)".into(),
            ));
        }
        self.send_signal(Signal {
            signal_number: signal.into(),
            columns: 0,
            rows: 0,
        })
        .await
    }

    /// Tell the process's terminal its new size (SIGWINCH → hyperstart
    /// `winsize`). Zero rows or columns are refused before sending, as
    /// the proxy would.
    pub async fn resize(&self, rows: u16, columns: u16) -> Result<()> {
        self.send_signal(Signal {
            signal_number: SIGWINCH,
            columns: columns.into(),
            rows: rows.into(),
        })
        .await
    }

    /// Checked with the proxy's own rules first: a bad signal is a local
    /// error.
    async fn send_signal(&self, s: Signal) -> Result<()> {
        s.validate()
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        self.conn()
            .call(Command::Signal, to_json(&s)?)
            .await
            .map(drop)
    }

    /// Write a line to the proxy's log, as this shim.
    pub async fn log(&self, level: LogLevel, msg: &str) -> Result<()> {
        let entry = log_entry(true, level, msg)?;
        self.conn()
            .send(FrameKind::Stream(Stream::Log), entry)
            .await
    }

    /// Give the token back (DisconnectShim): the proxy frees the session and
    /// closes the connection. Output that arrived before is still delivered
    /// to [`ShimEvents`], which then ends with [`Error::Closed`].
    pub async fn disconnect(self) -> Result<()> {
        let conn = self.conn();
        conn.disconnect().await?;
        // Written before returning: the caller may drop everything next.
        conn.flush().await
    }

    /// True when the connection to the proxy is gone.
    pub fn is_disconnected(&self) -> bool {
        self.conn().is_closed()
    }

    /// Reconnect after the connection to the proxy was lost and claim the
    /// token again, retrying per `policy`; events continue on the same
    /// [`ShimEvents`]. The proxy kept the session's output meanwhile.
    ///
    /// While the proxy cannot be reached, it is tried every
    /// `policy.interval`. An error response to the new ConnectShim is
    /// retried too, with backoff and at most [`RECLAIM_ATTEMPTS`] times,
    /// when this shim knows its previous connection died: the claim in the
    /// way is then its own, which the proxy releases once it notices. A
    /// refusal while the previous connection was still up is final, as is
    /// the last one. Everything stops at `policy.total`.
    pub async fn reconnect(&self, policy: ReconnectPolicy) -> Result<()> {
        let deadline = Instant::now() + policy.total;
        // Local knowledge, not the proxy's words: this shim held the token
        // on a connection that is dead now.
        let held_on_dead = self.conn().is_closed();
        let mut refused = 0u32;
        loop {
            let (last, pause) = match claim(
                &self.inner.addr,
                &self.inner.token,
                self.inner.events.clone(),
                &self.inner.received,
            )
            .await
            {
                Ok(conn) => {
                    *self.inner.conn.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(conn);
                    return Ok(());
                }
                Err(e @ Error::Proxy { .. }) => {
                    refused = refused.saturating_add(1);
                    if !held_on_dead || refused >= RECLAIM_ATTEMPTS {
                        return Err(e);
                    }
                    (e, reclaim_pause(policy.interval, refused))
                }
                Err(e) => (e, policy.interval),
            };
            if Instant::now() + pause > deadline {
                return Err(last);
            }
            tokio::time::sleep(pause).await;
        }
    }
}

/// How many error responses to its ConnectShim a reconnecting shim takes
/// for its own old claim, not released by the proxy yet, before it believes
/// the refusal ([`Shim::reconnect`]).
pub const RECLAIM_ATTEMPTS: u32 = 6;

/// The pause after the `refused`-th refusal of a reconnect: `interval`,
/// doubled after each refusal, at most [`RECLAIM_MAX_PAUSE`] (or
/// `interval` if that is longer).
fn reclaim_pause(interval: Duration, refused: u32) -> Duration {
    let doublings = refused.saturating_sub(1).min(16);
    interval
        .saturating_mul(1u32 << doublings)
        .min(RECLAIM_MAX_PAUSE.max(interval))
}

/// The longest pause between two reclaims.
const RECLAIM_MAX_PAUSE: Duration = Duration::from_secs(1);

/// ConnectShim on a new connection, resuming where `received` says: the
/// proxy sends again what the last connection's socket held unread, so
/// every byte arrives exactly once across reconnects (docs/PROTOCOL.md
/// §10.8; a proxy that does not know the field ignores it).
async fn claim(
    addr: &ProxyAddr,
    token: &Token,
    events: mpsc::Sender<EventItem>,
    received: &Arc<Received>,
) -> Result<Conn> {
    use std::sync::atomic::Ordering::Relaxed;
    let conn = Conn::connect_counting(addr, Some(events), Some(received.clone())).await?;
    let req = ConnectShim {
        token: token.as_str().to_owned(),
        resume: Some(proxy_proto::payload::Resume {
            stdout: received.stdout.load(Relaxed),
            stderr: received.stderr.load(Relaxed),
        }),
    };
    conn.call(Command::ConnectShim, to_json(&req)?).await?;
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reclaim_pauses_double_up_to_a_second() {
        let ms = Duration::from_millis;
        let got: Vec<Duration> = (1..=RECLAIM_ATTEMPTS)
            .map(|n| reclaim_pause(ms(100), n))
            .collect();
        assert_eq!(
            got,
            [ms(100), ms(200), ms(400), ms(800), ms(1000), ms(1000)]
        );
        assert_eq!(
            reclaim_pause(ms(3000), 4),
            ms(3000),
            "never below the interval"
        );
        assert_eq!(reclaim_pause(Duration::MAX, u32::MAX), Duration::MAX);
        assert_eq!(reclaim_pause(ms(0), 3), ms(0));
    }
}
