//! The ctl transaction protocol as a state machine, sans IO.
//!
//! hyperstart's ctl channel carries no transaction ids: the agent answers
//! each command, in order, with ACK (its result) or ERROR (a message). So
//! the proxy keeps one transaction in flight and matches each reply to the
//! command that is waiting. A command that times out still owes its reply;
//! the machine counts those (`stale`) and discards that many replies when
//! they come, so later replies go to their own commands.
//!
//! [`CtlChannel`] never touches a socket, a task or a clock. The driver
//! (`crate::vm`) feeds it what happened — bytes read, the channel closed,
//! a write failed, a deadline passed, the VM went — with the time as an
//! input, and carries out what it asks: [`CtlChannel::poll_transmit`] (the
//! next request to write), [`CtlChannel::poll_event`] (READY, a reply for
//! a caller, the channel broke) and [`CtlChannel::poll_timeout`] (when to
//! call [`CtlChannel::handle_timeout`] next). [`simulate`] drives it
//! against a simulated agent and checks its invariants after every step.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use proxy_proto::hyper::ctl::{Code, CtlDecoder, CtlMessage, CTL_HEADER_LEN};
use proxy_proto::hyper::MAX_MESSAGE_LEN;
use proxy_proto::HyperError;
use tracing::{debug, warn};

use crate::registry::{Channel, During, ProxyError};

/// Largest ctl data the agent takes in one message.
pub const MAX_CTL_DATA: usize = MAX_MESSAGE_LEN - CTL_HEADER_LEN;

/// What the READY wait is called in its timeout error.
/// Queued requests' and events' slots an idle channel keeps: each command
/// queues one of each and drains them, and freeing their memory after
/// every command, to allocate it again for the next, cost more than the
/// few hundred bytes a VM keeps.
pub const KEEP_SLOTS: usize = 4;

const READY_WAITED_FOR: &str = "the agent's READY on the ctl channel";

/// One transaction, from [`CtlChannel::submit`] to its
/// [`CtlEvent::Reply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TxnId(pub u64);

/// The limits of a ctl channel.
#[derive(Debug, Clone)]
pub struct CtlOptions {
    /// How long each transaction waits for its reply, from the moment its
    /// request is released ([`CtlChannel::poll_transmit`]).
    pub timeout: Duration,
    /// How long READY is waited for in all (for the timeout's message; the
    /// deadline is given to [`CtlChannel::new`]).
    pub ready_timeout: Duration,
    /// Largest message accepted from the agent, header included; a longer
    /// one is garbage.
    pub max_message: usize,
    /// Requests queued behind the one in flight; [`CtlChannel::submit`]
    /// refuses more with [`ProxyError::CtlQueueFull`].
    pub max_queue: usize,
}

/// What the driver must act on.
#[derive(Debug)]
pub enum CtlEvent {
    /// The agent's READY came: the channel takes commands.
    Ready,
    /// Transaction `id` ended: hand `result` to its caller.
    Reply {
        /// The transaction.
        id: TxnId,
        /// Its command.
        code: Code,
        /// ACK's payload, or why it failed.
        result: Result<Bytes, ProxyError>,
        /// When its request was released to be written (for the
        /// round-trip metric); `None` if it never was (failed while queued,
        /// or its write failed).
        sent_at: Option<Instant>,
    },
    /// The channel is unusable: the VM must be torn down. `error` says why
    /// (`error.to_string()` is the teardown's reason); every transaction
    /// got its reply already.
    Broken {
        /// What broke it: the agent closed ctl, a read or write failed, it
        /// sent garbage, or READY did not come in time.
        error: ProxyError,
    },
}

/// Where the channel is.
#[derive(Debug)]
enum Phase {
    /// Connected; nothing may be sent before the agent's READY.
    AwaitingReady { deadline: Instant },
    /// Nothing in flight.
    Idle,
    /// One transaction in flight. `deadline` is `None` only if `sent_at +
    /// timeout` does not fit an `Instant` (it never times out).
    Waiting {
        id: TxnId,
        code: Code,
        deadline: Option<Instant>,
        sent_at: Instant,
    },
    /// Broken or torn down, for `reason`: every submit fails.
    Broken { reason: String },
}

/// A request waiting for its turn, encoded.
#[derive(Debug)]
struct Queued {
    id: TxnId,
    code: Code,
    bytes: Bytes,
}

/// A VM's ctl channel: one transaction in flight, replies matched in order.
#[derive(Debug)]
pub struct CtlChannel {
    opts: CtlOptions,
    phase: Phase,
    dec: CtlDecoder,
    queue: VecDeque<Queued>,
    events: VecDeque<CtlEvent>,
    /// Replies still owed for transactions that timed out: discarded when
    /// they come, so later replies match their requests.
    stale: usize,
    next_id: u64,
}

impl CtlChannel {
    /// A freshly connected channel, waiting for the agent's READY until
    /// `ready_deadline`.
    pub fn new(opts: CtlOptions, ready_deadline: Instant) -> Self {
        CtlChannel {
            dec: CtlDecoder::new(opts.max_message),
            opts,
            phase: Phase::AwaitingReady {
                deadline: ready_deadline,
            },
            queue: VecDeque::new(),
            events: VecDeque::new(),
            stale: 0,
            next_id: 0,
        }
    }

    /// Queue the command `code` with `data`. Refused, with the error the
    /// caller gets, when `data` is larger than the agent takes, when the
    /// channel is broken or torn down, or when the queue is full. Before
    /// READY, requests wait for it.
    pub fn submit(&mut self, code: Code, data: Bytes) -> Result<TxnId, ProxyError> {
        if data.len() > MAX_CTL_DATA {
            return Err(ProxyError::CtlTooLarge {
                code,
                len: data.len(),
                max: MAX_CTL_DATA,
            });
        }
        if let Phase::Broken { reason } = &self.phase {
            return Err(ProxyError::VmTornDown {
                during: During::Idle,
                reason: reason.clone(),
            });
        }
        if self.queue.len() >= self.opts.max_queue {
            return Err(ProxyError::CtlQueueFull {
                code,
                max: self.opts.max_queue,
            });
        }
        let mut out = BytesMut::with_capacity(CTL_HEADER_LEN + data.len());
        CtlMessage {
            code: code as u32,
            payload: data,
        }
        .encode(&mut out, MAX_MESSAGE_LEN)
        .map_err(|_| ProxyError::CtlTooLarge {
            code,
            len: out.len(),
            max: MAX_CTL_DATA,
        })?;
        let id = TxnId(self.next_id);
        self.next_id = self.next_id.wrapping_add(1);
        self.queue.push_back(Queued {
            id,
            code,
            bytes: out.freeze(),
        });
        Ok(id)
    }

    /// Bytes read from ctl: decode every complete message in `buf` (an
    /// incomplete one stays for the next read).
    pub fn handle_input(&mut self, buf: &mut BytesMut) {
        loop {
            if let Phase::Broken { .. } = self.phase {
                buf.clear();
                return;
            }
            match self.dec.decode(buf) {
                Ok(Some(m)) => self.message(m),
                Ok(None) => return,
                Err(e) => return self.handle_garbage(e),
            }
        }
    }

    /// A decoder with this channel's message bound, for a driver that
    /// decodes what it reads itself and hands over each message
    /// ([`CtlChannel::handle_message`], [`CtlChannel::handle_garbage`])
    /// instead of the bytes ([`CtlChannel::handle_input`]).
    pub fn decoder(&self) -> CtlDecoder {
        CtlDecoder::new(self.opts.max_message)
    }

    /// One message decoded from ctl (ignored once the channel is broken).
    pub fn handle_message(&mut self, m: CtlMessage) {
        self.message(m);
    }

    /// What came on ctl is not ctl framing: the channel is unusable.
    pub fn handle_garbage(&mut self, error: HyperError) {
        self.fail(true, |during| ProxyError::AgentGarbage {
            channel: Channel::Ctl,
            during,
            source: error,
        });
    }

    fn message(&mut self, m: CtlMessage) {
        match &self.phase {
            Phase::AwaitingReady { .. } => {
                if m.code() == Some(Code::Ready) {
                    self.phase = Phase::Idle;
                    self.events.push_back(CtlEvent::Ready);
                } else {
                    debug!(code = m.code, "skipping ctl message before READY");
                }
            }
            Phase::Waiting {
                id, code, sent_at, ..
            } => {
                let (id, code, sent_at) = (*id, *code, *sent_at);
                let result = match m.code() {
                    Some(Code::Ack | Code::Error) if self.stale > 0 => {
                        self.stale -= 1;
                        debug!("discarding a late reply to a timed-out command");
                        return;
                    }
                    Some(Code::Ack) => Ok(m.payload),
                    Some(Code::Error) => Err(ProxyError::Agent {
                        code,
                        msg: String::from_utf8_lossy(&m.payload).trim().to_owned(),
                    }),
                    _ => return self.idle_message(&m),
                };
                self.phase = Phase::Idle;
                self.events.push_back(CtlEvent::Reply {
                    id,
                    code,
                    result,
                    sent_at: Some(sent_at),
                });
            }
            Phase::Idle => self.idle_message(&m),
            Phase::Broken { .. } => {}
        }
    }

    /// A message no transaction waits for.
    fn idle_message(&mut self, m: &CtlMessage) {
        match m.code() {
            Some(Code::Next | Code::Ready) => {}
            Some(Code::ProcessAsyncEvent) => {
                debug!(payload = %String::from_utf8_lossy(&m.payload), "agent event")
            }
            Some(Code::Ack | Code::Error) if self.stale > 0 => {
                self.stale -= 1;
                debug!("discarding a late reply to a timed-out command");
            }
            _ => warn!(
                code = m.code,
                len = m.payload.len(),
                "unexpected ctl message ignored"
            ),
        }
    }

    /// The agent closed ctl (`error` is `None`) or reading it failed.
    pub fn handle_closed(&mut self, error: Option<std::io::Error>) {
        match error {
            None => self.fail(true, |during| ProxyError::AgentClosed {
                channel: Channel::Ctl,
                during,
            }),
            Some(e) => self.fail(true, |during| ProxyError::AgentRead {
                channel: Channel::Ctl,
                during,
                source: copy_io_error(&e),
            }),
        }
    }

    /// Writing the request last released by [`CtlChannel::poll_transmit`]
    /// failed.
    pub fn handle_write_failed(&mut self, error: std::io::Error) {
        let what = match &self.phase {
            Phase::Waiting { code, .. } => code.name(),
            _ => "a request",
        };
        self.fail(false, |_| ProxyError::AgentWrite {
            channel: Channel::Ctl,
            what,
            source: copy_io_error(&error),
        });
    }

    /// Time passed: at `now`, is READY or the reply in flight overdue?
    pub fn handle_timeout(&mut self, now: Instant) {
        match &self.phase {
            Phase::AwaitingReady { deadline } if now >= *deadline => {
                let after = self.opts.ready_timeout;
                self.fail(true, |_| ProxyError::Timeout {
                    waited_for: READY_WAITED_FOR.into(),
                    after,
                });
            }
            Phase::Waiting {
                id,
                code,
                deadline: Some(deadline),
                sent_at,
            } if now >= *deadline => {
                let (id, code, sent_at) = (*id, *code, *sent_at);
                self.stale = self.stale.saturating_add(1);
                self.phase = Phase::Idle;
                self.events.push_back(CtlEvent::Reply {
                    id,
                    code,
                    result: Err(ProxyError::Timeout {
                        waited_for: format!("the agent's reply to {code}"),
                        after: self.opts.timeout,
                    }),
                    sent_at: Some(sent_at),
                });
            }
            _ => {}
        }
    }

    /// The next request to write, if one may go now (READY seen, nothing
    /// in flight). Its transaction's timeout runs from `now`.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Bytes> {
        if !matches!(self.phase, Phase::Idle) {
            return None;
        }
        let q = self.queue.pop_front()?;
        if self.queue.is_empty() && self.queue.capacity() > KEEP_SLOTS {
            // Between bursts a VM's channel queues nothing: its slots'
            // memory goes back (as the events' below).
            self.queue = VecDeque::new();
        }
        debug!(code = %q.code, len = q.bytes.len(), "ctl request");
        self.phase = Phase::Waiting {
            id: q.id,
            code: q.code,
            deadline: now.checked_add(self.opts.timeout),
            sent_at: now,
        };
        Some(q.bytes)
    }

    /// The next thing the driver must act on.
    pub fn poll_event(&mut self) -> Option<CtlEvent> {
        let ev = self.events.pop_front();
        if ev.is_none() && self.events.capacity() > KEEP_SLOTS {
            // Drained: an idle channel holds few event slots (an event is
            // 136 bytes; a VM spends nearly all its time idle).
            self.events = VecDeque::new();
        }
        ev
    }

    /// When [`CtlChannel::handle_timeout`] is due: READY's deadline, or
    /// the reply in flight's.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.phase {
            Phase::AwaitingReady { deadline } => Some(*deadline),
            Phase::Waiting { deadline, .. } => *deadline,
            Phase::Idle | Phase::Broken { .. } => None,
        }
    }

    /// The VM went for another reason: every queued or in-flight
    /// transaction fails with [`ProxyError::VmTornDown`], later submits
    /// too. No [`CtlEvent::Broken`] follows (the VM is gone already).
    pub fn teardown(&mut self, reason: &str) {
        let phase = std::mem::replace(
            &mut self.phase,
            Phase::Broken {
                reason: reason.to_owned(),
            },
        );
        match phase {
            Phase::Broken { reason } => {
                self.phase = Phase::Broken { reason };
                return;
            }
            Phase::Waiting {
                id, code, sent_at, ..
            } => self.events.push_back(CtlEvent::Reply {
                id,
                code,
                result: Err(ProxyError::VmTornDown {
                    during: During::Reply(code),
                    reason: reason.to_owned(),
                }),
                sent_at: Some(sent_at),
            }),
            Phase::AwaitingReady { .. } | Phase::Idle => {}
        }
        self.fail_queue(reason);
    }

    /// Whether the channel broke or was torn down.
    pub fn is_broken(&self) -> bool {
        matches!(self.phase, Phase::Broken { .. })
    }

    /// Why the channel broke or was torn down.
    pub fn broken_reason(&self) -> Option<&str> {
        match &self.phase {
            Phase::Broken { reason } => Some(reason),
            _ => None,
        }
    }

    /// Whether the agent's READY was seen (and the channel is not broken).
    pub fn is_ready(&self) -> bool {
        matches!(self.phase, Phase::Idle | Phase::Waiting { .. })
    }

    /// The transaction waiting for its reply.
    pub fn in_flight(&self) -> Option<TxnId> {
        match &self.phase {
            Phase::Waiting { id, .. } => Some(*id),
            _ => None,
        }
    }

    /// Requests waiting behind the one in flight.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Queue and event slots allocated (for tests of an idle channel's
    /// memory).
    #[cfg(test)]
    fn slots(&self) -> usize {
        self.queue.capacity() + self.events.capacity()
    }

    /// Replies still owed by the agent for timed-out transactions.
    pub fn stale(&self) -> usize {
        self.stale
    }

    /// The limits the channel was made with.
    pub fn options(&self) -> &CtlOptions {
        &self.opts
    }

    /// Break the channel with the error `make` builds for what was going
    /// on: the transaction in flight gets one (its request `written`, or
    /// its write failed), [`CtlEvent::Broken`] another, the queue fails.
    fn fail(&mut self, written: bool, make: impl Fn(During) -> ProxyError) {
        let phase = std::mem::replace(
            &mut self.phase,
            Phase::Broken {
                reason: String::new(),
            },
        );
        let during = match &phase {
            Phase::Broken { reason } => {
                self.phase = Phase::Broken {
                    reason: reason.clone(),
                };
                return;
            }
            Phase::AwaitingReady { .. } => During::Ready,
            Phase::Idle => During::Idle,
            Phase::Waiting { code, .. } => During::Reply(*code),
        };
        if let Phase::Waiting {
            id, code, sent_at, ..
        } = phase
        {
            self.events.push_back(CtlEvent::Reply {
                id,
                code,
                result: Err(make(during)),
                sent_at: written.then_some(sent_at),
            });
        }
        let error = make(during);
        let reason = error.to_string();
        self.events.push_back(CtlEvent::Broken { error });
        self.fail_queue(&reason);
        self.phase = Phase::Broken { reason };
    }

    fn fail_queue(&mut self, reason: &str) {
        for q in self.queue.drain(..) {
            self.events.push_back(CtlEvent::Reply {
                id: q.id,
                code: q.code,
                result: Err(ProxyError::VmTornDown {
                    during: During::Idle,
                    reason: reason.to_owned(),
                }),
                sent_at: None,
            });
        }
    }
}

/// An `io::Error` with the same kind and message (they do not clone).
fn copy_io_error(e: &std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), e.to_string())
}

// ---------------------------------------------------------------------
// Randomized simulation.

/// What a [`simulate`] run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Steps run.
    pub steps: usize,
    /// Channels (simulated VMs) used: a new one follows each broken one.
    pub channels: usize,
    /// Submits accepted.
    pub submitted: usize,
    /// Submits refused (too large, queue full, broken).
    pub refused: usize,
    /// Transactions answered with ACK.
    pub acked: usize,
    /// Transactions answered with ERROR.
    pub agent_errors: usize,
    /// Transactions that timed out.
    pub timed_out: usize,
    /// Transactions failed by a broken or torn-down channel.
    pub failed: usize,
    /// Late replies the agent sent after their transaction timed out.
    pub late_replies: usize,
    /// Channels that broke (garbage, close, write failure, no READY).
    pub broken: usize,
}

use super::rng::SplitMix64 as Rng;

/// How the simulated agent answers one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// ACK within the timeout.
    Prompt,
    /// ERROR within the timeout.
    Error,
    /// ACK after the timeout.
    Late,
    /// No answer at all.
    Never,
    /// ACK twice, back to back, within the timeout.
    Twice,
}

/// Bytes the simulated agent sends at `at` (kept in order: the channel is
/// a byte stream).
#[derive(Debug)]
struct Pending {
    at: Instant,
    bytes: Vec<u8>,
}

/// The caller's side of one accepted transaction.
#[derive(Debug)]
struct Caller {
    nonce: Vec<u8>,
    replied: bool,
}

/// Drive a [`CtlChannel`] for `steps` random steps (from `seed`) against a
/// simulated agent that answers promptly, late, never, twice, with ERROR,
/// with NEXT/event noise or garbage, or closes; with random submits
/// (oversized ones too), write failures, teardowns and time advancing.
/// Invariants are checked after every step: each reply reaches its own
/// caller (the agent echoes a per-request nonce), each accepted
/// transaction gets exactly one reply, at most one is in flight and its
/// request is released only after the previous one ended, nothing is sent
/// before READY, no transaction times out early, the queue stays within
/// its bound, `stale` never exceeds the transactions timed out, and once
/// broken every submit fails. `Err` describes the first violation and its
/// step.
pub fn simulate(seed: u64, steps: usize) -> Result<SimStats, String> {
    let mut rng = Rng(seed);
    let mut stats = SimStats::default();
    let mut step = 0usize;
    while step < steps {
        stats.channels += 1;
        sim_channel(&mut rng, &mut step, steps, &mut stats)
            .map_err(|e| format!("seed {seed}, step {step}: {e}"))?;
    }
    stats.steps = step;
    Ok(stats)
}

/// One simulated VM: runs until its channel broke (and a few submits
/// after) or the steps are done.
fn sim_channel(
    rng: &mut Rng,
    step: &mut usize,
    steps: usize,
    stats: &mut SimStats,
) -> Result<(), String> {
    let timeout = Duration::from_millis(100);
    let opts = CtlOptions {
        timeout,
        ready_timeout: Duration::from_millis(500),
        max_message: MAX_MESSAGE_LEN,
        max_queue: 1 + rng.below(8) as usize,
    };
    let start = Instant::now();
    let mut now = start;
    let ready_deadline = start + opts.ready_timeout;
    let mut ch = CtlChannel::new(opts.clone(), ready_deadline);
    let mut callers: HashMap<TxnId, Caller> = HashMap::new();
    // The agent's output, in order, and its READY time.
    let mut agent_out: VecDeque<Pending> = VecDeque::new();
    let max_ready = if rng.percent(5) { 700 } else { 300 };
    let ready_at = start + rng.millis(max_ready);
    for _ in 0..rng.below(3) {
        let at = start + rng.millis(300).min(ready_at - start);
        agent_out.push_back(Pending {
            at,
            bytes: noise(rng),
        });
    }
    agent_out.push_back(Pending {
        at: ready_at,
        bytes: encode(Code::Ready, b""),
    });
    let mut agent_dec = CtlDecoder::new(MAX_MESSAGE_LEN);
    let mut agent_in = BytesMut::new();
    let mut input = BytesMut::new();
    // The transaction whose request was released last and not yet ended.
    let mut outstanding: Option<TxnId> = None;
    let mut timed_out = 0usize;
    let mut seen_ready = false;
    let mut closed = false;
    let mut after_broken = 0usize;
    let mut next_nonce = 0u64;

    while *step < steps {
        *step += 1;
        match rng.below(100) {
            // Submit.
            0..=29 => {
                let oversized = rng.percent(3);
                let nonce = format!("n{next_nonce}").into_bytes();
                next_nonce = next_nonce.wrapping_add(1);
                let data = if oversized {
                    vec![b' '; MAX_CTL_DATA + 1 + rng.below(16) as usize]
                } else {
                    nonce.clone()
                };
                let code = [Code::Ping, Code::Version, Code::ExecCmd, Code::WinSize]
                    [rng.below(4) as usize];
                let broken = ch.is_broken();
                let full = ch.queued() >= opts.max_queue;
                match ch.submit(code, Bytes::from(data)) {
                    Ok(id) => {
                        if oversized || broken || full {
                            return Err(format!(
                                "submit accepted (oversized {oversized}, broken {broken}, queue full {full})"
                            ));
                        }
                        if callers
                            .insert(
                                id,
                                Caller {
                                    nonce,
                                    replied: false,
                                },
                            )
                            .is_some()
                        {
                            return Err(format!("{id:?} given out twice"));
                        }
                        stats.submitted += 1;
                    }
                    Err(e) => {
                        stats.refused += 1;
                        let expected = match &e {
                            ProxyError::CtlTooLarge { .. } => oversized,
                            ProxyError::VmTornDown { .. } => broken && !oversized,
                            ProxyError::CtlQueueFull { .. } => full && !broken && !oversized,
                            _ => false,
                        };
                        if !expected {
                            return Err(format!(
                                "submit refused with {e} (oversized {oversized}, broken {broken}, queue full {full})"
                            ));
                        }
                    }
                }
            }
            // Time passes: deliver what the agent sent meanwhile and fire
            // the timeouts that are due, in time order.
            30..=59 => {
                let max_step = if rng.percent(20) { 250 } else { 40 };
                let until = now + rng.millis(max_step);
                loop {
                    let msg_at = agent_out.front().map(|p| p.at).filter(|at| *at <= until);
                    let timer_at = ch.poll_timeout().filter(|at| *at <= until);
                    let deliver = match (msg_at, timer_at) {
                        (None, None) => break,
                        (Some(_), None) => true,
                        (None, Some(_)) => false,
                        (Some(m), Some(t)) => m < t || (m == t && rng.percent(50)),
                    };
                    match (deliver, msg_at, timer_at) {
                        (true, Some(m), _) => {
                            now = now.max(m);
                            let mut chunk = Vec::new();
                            // Everything sent at the same instant comes in
                            // one read.
                            while let Some(p) = agent_out.front() {
                                if p.at > m {
                                    break;
                                }
                                if let Some(p) = agent_out.pop_front() {
                                    chunk.extend_from_slice(&p.bytes);
                                }
                            }
                            if !closed {
                                input.extend_from_slice(&chunk);
                                ch.handle_input(&mut input);
                            }
                        }
                        (_, _, Some(t)) => {
                            now = now.max(t);
                            ch.handle_timeout(now);
                        }
                        _ => break,
                    }
                    drain(
                        &mut ch,
                        now,
                        timeout,
                        &mut callers,
                        &mut outstanding,
                        &mut timed_out,
                        &mut seen_ready,
                        stats,
                    )?;
                    transmit(
                        rng,
                        &mut ch,
                        now,
                        timeout,
                        &mut outstanding,
                        &mut agent_dec,
                        &mut agent_in,
                        &mut agent_out,
                        seen_ready,
                        stats,
                    )?;
                }
                now = now.max(until);
                // A spurious timer: nothing that is not due may fire.
                ch.handle_timeout(now);
            }
            // Noise from the agent: NEXT, an event, an unknown code.
            60..=66 => {
                let at = agent_out.back().map_or(now, |p| p.at.max(now));
                agent_out.push_back(Pending {
                    at,
                    bytes: noise(rng),
                });
            }
            // Garbage.
            67 if rng.percent(30) => {
                let at = agent_out.back().map_or(now, |p| p.at.max(now));
                // A length below the header's.
                agent_out.push_back(Pending {
                    at,
                    bytes: vec![0, 0, 0, 9, 0, 0, 0, rng.below(8) as u8],
                });
            }
            // The agent closes ctl (or reading it fails).
            68 if !closed && rng.percent(30) => {
                closed = true;
                let err = rng
                    .percent(50)
                    .then(|| std::io::Error::from(std::io::ErrorKind::ConnectionReset));
                ch.handle_closed(err);
            }
            // The VM is torn down for another reason.
            69 if rng.percent(20) => ch.teardown("simulated teardown"),
            // The driver writes what it may.
            _ => {}
        }
        drain(
            &mut ch,
            now,
            timeout,
            &mut callers,
            &mut outstanding,
            &mut timed_out,
            &mut seen_ready,
            stats,
        )?;
        transmit(
            rng,
            &mut ch,
            now,
            timeout,
            &mut outstanding,
            &mut agent_dec,
            &mut agent_in,
            &mut agent_out,
            seen_ready,
            stats,
        )?;
        drain(
            &mut ch,
            now,
            timeout,
            &mut callers,
            &mut outstanding,
            &mut timed_out,
            &mut seen_ready,
            stats,
        )?;

        // Invariants.
        if ch.queued() > opts.max_queue {
            return Err(format!("{} queued, bound {}", ch.queued(), opts.max_queue));
        }
        if ch.stale() > timed_out {
            return Err(format!("stale {} > {timed_out} timed out", ch.stale()));
        }
        if ch.in_flight() != outstanding {
            return Err(format!(
                "in flight {:?}, but the last released request is {outstanding:?}",
                ch.in_flight()
            ));
        }
        let unanswered = callers.values().filter(|c| !c.replied).count();
        let held = ch.queued() + usize::from(ch.in_flight().is_some());
        if unanswered != held {
            return Err(format!(
                "{unanswered} transactions unanswered, the channel holds {held}"
            ));
        }
        if ch.is_broken() {
            if unanswered != 0 || ch.poll_timeout().is_some() {
                return Err("broken with transactions left or a deadline".into());
            }
            after_broken += 1;
            if after_broken > 5 {
                return Ok(());
            }
        } else if !seen_ready && ch.is_ready() {
            return Err("ready without a Ready event".into());
        }
    }
    Ok(())
}

/// Hand every event to its caller, checking it.
#[allow(clippy::too_many_arguments)]
fn drain(
    ch: &mut CtlChannel,
    now: Instant,
    timeout: Duration,
    callers: &mut HashMap<TxnId, Caller>,
    outstanding: &mut Option<TxnId>,
    timed_out: &mut usize,
    seen_ready: &mut bool,
    stats: &mut SimStats,
) -> Result<(), String> {
    while let Some(ev) = ch.poll_event() {
        match ev {
            CtlEvent::Ready => {
                if *seen_ready {
                    return Err("Ready twice".into());
                }
                *seen_ready = true;
            }
            CtlEvent::Broken { error } => {
                stats.broken += 1;
                if !error.breaks_channel() && !matches!(error, ProxyError::Timeout { .. }) {
                    return Err(format!("broken by {error}, which does not break a channel"));
                }
            }
            CtlEvent::Reply {
                id,
                result,
                sent_at,
                ..
            } => {
                let c = callers
                    .get_mut(&id)
                    .ok_or_else(|| format!("a reply for {id:?}, never submitted"))?;
                if c.replied {
                    return Err(format!("a second reply for {id:?}"));
                }
                c.replied = true;
                if *outstanding == Some(id) {
                    *outstanding = None;
                } else if sent_at.is_some() {
                    return Err(format!("{id:?} replied as sent, but it is not in flight"));
                }
                match &result {
                    Ok(payload) if payload[..] == c.nonce[..] => stats.acked += 1,
                    Ok(payload) => {
                        return Err(format!(
                            "{id:?} (nonce {:?}) got the payload {:?}",
                            String::from_utf8_lossy(&c.nonce),
                            String::from_utf8_lossy(payload)
                        ))
                    }
                    Err(ProxyError::Agent { msg, .. }) if msg.as_bytes() == &c.nonce[..] => {
                        stats.agent_errors += 1
                    }
                    Err(ProxyError::Agent { msg, .. }) => {
                        return Err(format!(
                            "{id:?} (nonce {:?}) got the agent error {msg:?}",
                            String::from_utf8_lossy(&c.nonce)
                        ))
                    }
                    Err(ProxyError::Timeout { .. }) => {
                        let early = sent_at.is_none_or(|s| now < s + timeout);
                        if early {
                            return Err(format!("{id:?} timed out early (sent {sent_at:?})"));
                        }
                        *timed_out += 1;
                        stats.timed_out += 1;
                    }
                    Err(_) => stats.failed += 1,
                }
            }
        }
    }
    Ok(())
}

/// Write what the channel releases; the agent decides how to answer.
#[allow(clippy::too_many_arguments)]
fn transmit(
    rng: &mut Rng,
    ch: &mut CtlChannel,
    now: Instant,
    timeout: Duration,
    outstanding: &mut Option<TxnId>,
    agent_dec: &mut CtlDecoder,
    agent_in: &mut BytesMut,
    agent_out: &mut VecDeque<Pending>,
    seen_ready: bool,
    stats: &mut SimStats,
) -> Result<(), String> {
    let before = ch.in_flight();
    let Some(bytes) = ch.poll_transmit(now) else {
        return Ok(());
    };
    if !seen_ready {
        return Err("a request released before READY".into());
    }
    if let Some(prev) = before.or(*outstanding) {
        return Err(format!("a request released while {prev:?} is in flight"));
    }
    *outstanding = ch.in_flight();
    if outstanding.is_none() {
        return Err("a request released but nothing in flight".into());
    }
    if rng.percent(1) {
        ch.handle_write_failed(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        return Ok(());
    }
    agent_in.extend_from_slice(&bytes);
    let m = match agent_dec.decode(agent_in) {
        Ok(Some(m)) => m,
        other => return Err(format!("the request does not decode: {other:?}")),
    };
    let answer = match rng.below(100) {
        0..=59 => Answer::Prompt,
        60..=69 => Answer::Error,
        70..=79 => Answer::Late,
        80..=89 => Answer::Never,
        // A duplicate reply cannot be told from a real one: arriving after
        // its transaction timed out it would be taken for a later one's.
        // The agent repeats itself only when it owes nothing else, back to
        // back and within the timeout (the copy then finds its transaction
        // waiting, or nothing in flight).
        _ if agent_out.is_empty() => Answer::Twice,
        _ => Answer::Prompt,
    };
    let last = agent_out.back().map_or(now, |p| p.at.max(now));
    let at = match answer {
        Answer::Late => {
            stats.late_replies += 1;
            last.max(now + timeout + rng.millis(150))
        }
        _ => last.max(now + rng.millis(90)),
    };
    let bytes = match answer {
        Answer::Never => return Ok(()),
        Answer::Prompt | Answer::Late => encode(Code::Ack, &m.payload),
        Answer::Twice => {
            let mut b = encode(Code::Ack, &m.payload);
            b.extend_from_slice(&encode(Code::Ack, &m.payload));
            b
        }
        Answer::Error => {
            let mut msg = b" ".to_vec();
            msg.extend_from_slice(&m.payload);
            msg.extend_from_slice(b"\n");
            encode(Code::Error, &msg)
        }
    };
    if rng.percent(10) {
        agent_out.push_back(Pending {
            at,
            bytes: noise(rng),
        });
    }
    agent_out.push_back(Pending { at, bytes });
    Ok(())
}

fn encode(code: Code, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(CTL_HEADER_LEN + payload.len());
    b.extend_from_slice(&(code as u32).to_be_bytes());
    let len = u32::try_from(CTL_HEADER_LEN + payload.len()).unwrap_or(u32::MAX);
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(payload);
    b
}

/// A message that is no reply: NEXT, an event, an unknown code.
fn noise(rng: &mut Rng) -> Vec<u8> {
    match rng.below(3) {
        0 => encode(Code::Next, b""),
        1 => encode(Code::ProcessAsyncEvent, b"{\"container\":\"c\"}"),
        _ => {
            let mut b = encode(Code::Next, b"??");
            b[..4].copy_from_slice(&999u32.to_be_bytes());
            b
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(10);

    fn opts() -> CtlOptions {
        CtlOptions {
            timeout: T,
            ready_timeout: Duration::from_secs(1),
            max_message: MAX_MESSAGE_LEN,
            max_queue: 4,
        }
    }

    fn msg(code: Code, payload: &[u8]) -> BytesMut {
        BytesMut::from(&encode(code, payload)[..])
    }

    fn feed(ch: &mut CtlChannel, b: BytesMut) -> BytesMut {
        let mut b = b;
        ch.handle_input(&mut b);
        b
    }

    /// A channel past READY, at `t0`.
    fn ready() -> (CtlChannel, Instant) {
        let t0 = Instant::now();
        let mut ch = CtlChannel::new(opts(), t0 + Duration::from_secs(1));
        feed(&mut ch, msg(Code::Ready, b""));
        assert!(matches!(ch.poll_event(), Some(CtlEvent::Ready)));
        (ch, t0)
    }

    fn reply(ch: &mut CtlChannel) -> (TxnId, Result<Bytes, ProxyError>) {
        match ch.poll_event() {
            Some(CtlEvent::Reply { id, result, .. }) => (id, result),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    fn decode(b: &Bytes) -> CtlMessage {
        let mut b = BytesMut::from(&b[..]);
        CtlDecoder::default().decode(&mut b).unwrap().unwrap()
    }

    #[test]
    fn ready_before_anything() {
        let t0 = Instant::now();
        let mut ch = CtlChannel::new(opts(), t0 + Duration::from_secs(1));
        assert_eq!(ch.poll_timeout(), Some(t0 + Duration::from_secs(1)));
        let id = ch.submit(Code::Ping, Bytes::new()).unwrap();
        assert_eq!(ch.poll_transmit(t0), None, "nothing is sent before READY");
        assert!(!ch.is_ready());
        feed(&mut ch, msg(Code::Ready, b""));
        assert!(matches!(ch.poll_event(), Some(CtlEvent::Ready)));
        let out = ch.poll_transmit(t0).unwrap();
        assert_eq!(decode(&out).code(), Some(Code::Ping));
        assert_eq!(ch.in_flight(), Some(id));
    }

    #[test]
    fn messages_before_ready_are_skipped() {
        let t0 = Instant::now();
        let mut ch = CtlChannel::new(opts(), t0 + Duration::from_secs(1));
        let mut b = msg(Code::Ack, b"x");
        b.extend_from_slice(&msg(Code::Next, b""));
        b.extend_from_slice(&msg(Code::ProcessAsyncEvent, b"{}"));
        b = feed(&mut ch, b);
        assert!(b.is_empty());
        assert!(ch.poll_event().is_none());
        // READY split across reads.
        let r = msg(Code::Ready, b"");
        let b = feed(&mut ch, BytesMut::from(&r[..5]));
        assert!(ch.poll_event().is_none());
        let mut b = b;
        b.extend_from_slice(&r[5..]);
        feed(&mut ch, b);
        assert!(matches!(ch.poll_event(), Some(CtlEvent::Ready)));
        assert_eq!(ch.stale(), 0, "an ACK before READY owes nothing");
    }

    #[test]
    fn no_ready_in_time_breaks_with_a_timeout() {
        let t0 = Instant::now();
        let mut ch = CtlChannel::new(opts(), t0 + Duration::from_secs(1));
        let id = ch.submit(Code::Ping, Bytes::new()).unwrap();
        ch.handle_timeout(t0 + Duration::from_millis(999));
        assert!(ch.poll_event().is_none());
        ch.handle_timeout(t0 + Duration::from_secs(1));
        match ch.poll_event() {
            Some(CtlEvent::Broken { error }) => assert_eq!(
                error.to_string(),
                "timed out after 1s waiting for the agent's READY on the ctl channel"
            ),
            other => panic!("{other:?}"),
        }
        let (got, r) = reply(&mut ch);
        assert_eq!(got, id);
        assert!(matches!(r, Err(ProxyError::VmTornDown { .. })));
        assert!(ch.is_broken());
        assert_eq!(ch.poll_timeout(), None);
    }

    #[test]
    fn garbage_before_ready_breaks() {
        let t0 = Instant::now();
        let mut ch = CtlChannel::new(opts(), t0 + Duration::from_secs(1));
        feed(&mut ch, BytesMut::from(&[0u8, 0, 0, 8, 0, 0, 0, 3][..]));
        match ch.poll_event() {
            Some(CtlEvent::Broken { error }) => {
                assert!(matches!(
                    error,
                    ProxyError::AgentGarbage {
                        during: During::Ready,
                        ..
                    }
                ));
                assert!(error
                    .to_string()
                    .starts_with("the agent sent garbage on ctl before sending READY: "));
            }
            other => panic!("{other:?}"),
        }
        assert!(ch.is_broken());
    }

    #[test]
    fn closed_or_unreadable_before_ready() {
        let t0 = Instant::now();
        let mut ch = CtlChannel::new(opts(), t0 + Duration::from_secs(1));
        ch.handle_closed(None);
        let Some(CtlEvent::Broken { error }) = ch.poll_event() else {
            panic!()
        };
        assert_eq!(
            error.to_string(),
            "the agent closed the ctl channel before sending READY"
        );
        let mut ch = CtlChannel::new(opts(), t0 + Duration::from_secs(1));
        ch.handle_closed(Some(std::io::Error::other("boom")));
        let Some(CtlEvent::Broken { error }) = ch.poll_event() else {
            panic!()
        };
        assert_eq!(error.to_string(), "reading ctl before sending READY: boom");
    }

    #[test]
    fn one_in_flight_replies_in_order() {
        let (mut ch, t0) = ready();
        let ids: Vec<_> = (0..3u8)
            .map(|i| ch.submit(Code::Ping, Bytes::from(vec![b'0' + i])).unwrap())
            .collect();
        for (i, id) in ids.iter().enumerate() {
            let out = ch.poll_transmit(t0).expect("released");
            assert_eq!(ch.in_flight(), Some(*id));
            assert_eq!(ch.poll_transmit(t0), None, "one transaction in flight");
            let m = decode(&out);
            assert_eq!(m.payload[..], [b'0' + i as u8]);
            feed(&mut ch, msg(Code::Ack, &m.payload));
            let (got, r) = reply(&mut ch);
            assert_eq!(got, *id);
            assert_eq!(r.unwrap(), m.payload);
        }
        assert_eq!(ch.in_flight(), None);
        assert_eq!(ch.queued(), 0);
    }

    #[test]
    fn an_idle_channel_keeps_few_slots() {
        let (mut ch, t0) = ready();
        assert!(ch.poll_event().is_none());
        assert!(ch.slots() <= 2 * KEEP_SLOTS, "after READY: {}", ch.slots());
        // Bursts as large as the queue allows: a channel idle again keeps
        // at most what it is meant to.
        for round in 0..3 {
            let ids: Vec<_> = (0..4)
                .map(|_| ch.submit(Code::Ping, Bytes::new()).unwrap())
                .collect();
            for id in ids {
                ch.poll_transmit(t0).expect("released");
                feed(&mut ch, msg(Code::Ack, b""));
                assert_eq!(reply(&mut ch).0, id);
            }
            assert!(ch.poll_event().is_none());
            assert!(
                ch.slots() <= 2 * KEEP_SLOTS,
                "after round {round}: {}",
                ch.slots()
            );
        }
    }

    #[test]
    fn next_and_events_are_ignored_while_waiting_and_idle() {
        let (mut ch, t0) = ready();
        let mut b = msg(Code::Next, b"");
        b.extend_from_slice(&msg(Code::ProcessAsyncEvent, b"{}"));
        b.extend_from_slice(&msg(Code::Ready, b""));
        feed(&mut ch, b.clone());
        assert!(ch.poll_event().is_none());
        let id = ch.submit(Code::Ping, Bytes::new()).unwrap();
        ch.poll_transmit(t0).unwrap();
        b.extend_from_slice(&msg(Code::Ack, b"ok"));
        feed(&mut ch, b);
        let (got, r) = reply(&mut ch);
        assert_eq!((got, r.unwrap()), (id, Bytes::from_static(b"ok")));
    }

    #[test]
    fn error_carries_the_trimmed_message() {
        let (mut ch, t0) = ready();
        ch.submit(Code::StartPod, Bytes::from_static(b"{}"))
            .unwrap();
        ch.poll_transmit(t0).unwrap();
        feed(&mut ch, msg(Code::Error, b"  no such pod\n"));
        let (_, r) = reply(&mut ch);
        assert_eq!(
            r.unwrap_err().to_string(),
            "agent error on startpod: no such pod"
        );
        assert!(!ch.is_broken());
    }

    #[test]
    fn a_late_reply_after_a_timeout_is_discarded() {
        let (mut ch, t0) = ready();
        let a = ch.submit(Code::Ping, Bytes::from_static(b"a")).unwrap();
        let b = ch.submit(Code::Version, Bytes::from_static(b"b")).unwrap();
        ch.poll_transmit(t0).unwrap();
        assert_eq!(ch.poll_timeout(), Some(t0 + T));
        ch.handle_timeout(t0 + T);
        let (got, r) = reply(&mut ch);
        assert_eq!(got, a);
        let e = r.unwrap_err();
        assert_eq!(
            e.to_string(),
            "timed out after 10s waiting for the agent's reply to ping"
        );
        assert_eq!(ch.stale(), 1);
        let t1 = t0 + T;
        ch.poll_transmit(t1).unwrap();
        assert_eq!(ch.in_flight(), Some(b));
        feed(&mut ch, msg(Code::Ack, b"a"));
        assert!(ch.poll_event().is_none(), "the late reply is discarded");
        assert_eq!(ch.stale(), 0);
        feed(&mut ch, msg(Code::Ack, b"b"));
        let (got, r) = reply(&mut ch);
        assert_eq!((got, r.unwrap()), (b, Bytes::from_static(b"b")));
    }

    #[test]
    fn a_late_reply_while_idle_is_discarded_too() {
        let (mut ch, t0) = ready();
        ch.submit(Code::Ping, Bytes::new()).unwrap();
        ch.poll_transmit(t0).unwrap();
        ch.handle_timeout(t0 + T);
        reply(&mut ch).1.unwrap_err();
        feed(&mut ch, msg(Code::Error, b"late"));
        assert_eq!(ch.stale(), 0);
        let id = ch.submit(Code::Ping, Bytes::new()).unwrap();
        ch.poll_transmit(t0 + T).unwrap();
        feed(&mut ch, msg(Code::Ack, b"mine"));
        let (got, r) = reply(&mut ch);
        assert_eq!((got, r.unwrap()), (id, Bytes::from_static(b"mine")));
    }

    #[test]
    fn each_transaction_gets_its_whole_timeout_however_late_it_starts() {
        let (mut ch, t0) = ready();
        ch.submit(Code::Ping, Bytes::new()).unwrap();
        ch.poll_transmit(t0).unwrap();
        feed(&mut ch, msg(Code::Ack, b""));
        reply(&mut ch).1.unwrap();
        assert_eq!(ch.poll_timeout(), None);
        let t7 = t0 + Duration::from_secs(7);
        // Queued at 7 s, behind nothing: its timeout runs from its release.
        ch.submit(Code::Version, Bytes::new()).unwrap();
        let t8 = t0 + Duration::from_secs(8);
        ch.poll_transmit(t8).unwrap();
        assert_eq!(ch.poll_timeout(), Some(t8 + T));
        ch.handle_timeout(t7 + T);
        assert!(ch.poll_event().is_none(), "timed out early");
        ch.handle_timeout(t8 + T);
        assert!(matches!(
            reply(&mut ch).1,
            Err(ProxyError::Timeout { after, .. }) if after == T
        ));
        // Queued behind a transaction: its whole timeout from its release.
        let t9 = t8 + T;
        ch.submit(Code::Ping, Bytes::new()).unwrap();
        ch.submit(Code::Ping, Bytes::new()).unwrap();
        ch.poll_transmit(t9).unwrap();
        let t10 = t9 + Duration::from_secs(9);
        ch.handle_timeout(t10);
        feed(&mut ch, msg(Code::Ack, b"")); // discarded: stale 1
        feed(&mut ch, msg(Code::Ack, b""));
        reply(&mut ch).1.unwrap();
        ch.poll_transmit(t10).unwrap();
        assert_eq!(ch.poll_timeout(), Some(t10 + T));
    }

    #[test]
    fn garbage_while_waiting_fails_it_and_breaks() {
        let (mut ch, t0) = ready();
        let a = ch.submit(Code::Ping, Bytes::new()).unwrap();
        let b = ch.submit(Code::Ping, Bytes::new()).unwrap();
        ch.poll_transmit(t0).unwrap();
        feed(&mut ch, BytesMut::from(&[0u8, 0, 0, 9, 0, 0, 0, 3][..]));
        let (got, r) = reply(&mut ch);
        assert_eq!(got, a);
        let e = r.unwrap_err();
        assert!(e.breaks_channel());
        assert!(
            e.to_string()
                .starts_with("the agent sent garbage on ctl while ping was waiting for its reply"),
            "{e}"
        );
        let Some(CtlEvent::Broken { error }) = ch.poll_event() else {
            panic!()
        };
        assert_eq!(error.to_string(), e.to_string());
        let (got, r) = reply(&mut ch);
        assert_eq!(got, b);
        assert!(matches!(
            r,
            Err(ProxyError::VmTornDown {
                during: During::Idle,
                ..
            })
        ));
        assert!(ch.submit(Code::Ping, Bytes::new()).is_err());
    }

    #[test]
    fn garbage_while_idle_breaks() {
        let (mut ch, _) = ready();
        feed(&mut ch, BytesMut::from(&[0u8, 0, 0, 9, 0, 0, 0, 3][..]));
        let Some(CtlEvent::Broken { error }) = ch.poll_event() else {
            panic!()
        };
        assert!(error
            .to_string()
            .starts_with("the agent sent garbage on ctl: "));
        let e = ch.submit(Code::Ping, Bytes::new()).unwrap_err();
        assert_eq!(e.to_string(), format!("the VM is gone: {error}"));
    }

    #[test]
    fn close_while_waiting() {
        let (mut ch, t0) = ready();
        ch.submit(Code::Ping, Bytes::new()).unwrap();
        ch.submit(Code::Ping, Bytes::new()).unwrap();
        ch.poll_transmit(t0).unwrap();
        ch.handle_closed(None);
        let (_, r) = reply(&mut ch);
        let e = r.unwrap_err();
        assert_eq!(
            e.to_string(),
            "the agent closed the ctl channel while ping was waiting for its reply"
        );
        let Some(CtlEvent::Broken { error }) = ch.poll_event() else {
            panic!()
        };
        assert_eq!(error.to_string(), e.to_string());
        let (_, r) = reply(&mut ch);
        assert_eq!(r.unwrap_err().to_string(), format!("the VM is gone: {e}"));
        assert!(ch.poll_event().is_none());
        ch.handle_closed(None);
        assert!(ch.poll_event().is_none(), "broken once");
    }

    #[test]
    fn close_while_idle() {
        let (mut ch, _) = ready();
        ch.handle_closed(Some(std::io::Error::other("reset")));
        let Some(CtlEvent::Broken { error }) = ch.poll_event() else {
            panic!()
        };
        assert_eq!(error.to_string(), "reading ctl: reset");
        assert_eq!(ch.broken_reason(), Some("reading ctl: reset"));
    }

    #[test]
    fn write_failure_fails_it_and_breaks() {
        let (mut ch, t0) = ready();
        ch.submit(Code::NewContainer, Bytes::new()).unwrap();
        ch.submit(Code::Ping, Bytes::new()).unwrap();
        ch.poll_transmit(t0).unwrap();
        ch.handle_write_failed(std::io::Error::other("broken pipe"));
        match ch.poll_event() {
            Some(CtlEvent::Reply {
                result: Err(e),
                sent_at,
                ..
            }) => {
                assert_eq!(e.to_string(), "writing newcontainer to ctl: broken pipe");
                assert_eq!(sent_at, None);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(ch.poll_event(), Some(CtlEvent::Broken { .. })));
        assert!(matches!(
            reply(&mut ch).1,
            Err(ProxyError::VmTornDown { .. })
        ));
        assert_eq!(ch.poll_transmit(t0), None);
    }

    #[test]
    fn too_large_is_refused_and_the_channel_stays() {
        let (mut ch, t0) = ready();
        let e = ch
            .submit(
                Code::NewContainer,
                Bytes::from(vec![b' '; MAX_CTL_DATA + 1]),
            )
            .unwrap_err();
        assert!(matches!(e, ProxyError::CtlTooLarge { .. }), "{e}");
        assert_eq!(ch.queued(), 0);
        ch.submit(Code::NewContainer, Bytes::from(vec![b' '; MAX_CTL_DATA]))
            .unwrap();
        let out = ch.poll_transmit(t0).unwrap();
        assert_eq!(out.len(), MAX_MESSAGE_LEN);
    }

    #[test]
    fn the_queue_is_bounded() {
        let (mut ch, t0) = ready();
        ch.submit(Code::Ping, Bytes::new()).unwrap();
        ch.poll_transmit(t0).unwrap();
        for _ in 0..4 {
            ch.submit(Code::Ping, Bytes::new()).unwrap();
        }
        let e = ch.submit(Code::Ping, Bytes::new()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "ping: 4 ctl commands are queued for this VM already; try again later"
        );
        assert_eq!(ch.queued(), 4);
        feed(&mut ch, msg(Code::Ack, b""));
        reply(&mut ch).1.unwrap();
        ch.poll_transmit(t0).unwrap();
        ch.submit(Code::Ping, Bytes::new()).unwrap();
    }

    #[test]
    fn teardown_fails_everything_queued() {
        let (mut ch, t0) = ready();
        let a = ch.submit(Code::Ping, Bytes::new()).unwrap();
        let b = ch.submit(Code::Version, Bytes::new()).unwrap();
        ch.poll_transmit(t0).unwrap();
        ch.teardown("unregistered");
        let (got, r) = reply(&mut ch);
        assert_eq!(got, a);
        assert_eq!(
            r.unwrap_err().to_string(),
            "the VM is gone while ping was waiting for its reply: unregistered"
        );
        let (got, r) = reply(&mut ch);
        assert_eq!(got, b);
        assert_eq!(r.unwrap_err().to_string(), "the VM is gone: unregistered");
        assert!(
            ch.poll_event().is_none(),
            "no Broken: the VM is gone already"
        );
        assert_eq!(
            ch.submit(Code::Ping, Bytes::new()).unwrap_err().to_string(),
            "the VM is gone: unregistered"
        );
        ch.teardown("again");
        assert_eq!(ch.broken_reason(), Some("unregistered"));
        assert!(ch.poll_event().is_none());
    }

    #[test]
    fn simulate_many_seeds() {
        let mut total = SimStats::default();
        for seed in 0..2000 {
            let s = simulate(seed, 400).unwrap_or_else(|e| panic!("{e}"));
            total.channels += s.channels;
            total.submitted += s.submitted;
            total.acked += s.acked;
            total.agent_errors += s.agent_errors;
            total.timed_out += s.timed_out;
            total.failed += s.failed;
            total.refused += s.refused;
            total.late_replies += s.late_replies;
            total.broken += s.broken;
        }
        // Every path was taken.
        assert!(total.acked > 0 && total.agent_errors > 0, "{total:?}");
        assert!(total.timed_out > 0 && total.late_replies > 0, "{total:?}");
        assert!(
            total.failed > 0 && total.refused > 0 && total.broken > 0,
            "{total:?}"
        );
    }

    #[test]
    fn simulate_is_deterministic() {
        assert_eq!(simulate(42, 500), simulate(42, 500));
    }
}
