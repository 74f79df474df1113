//! The io channel's demultiplexer and the reader's half of the corking
//! policy, sans IO.
//!
//! [`IoDemux`] turns the bytes the agent writes on its io channel into
//! per-session output: it decodes io messages and routes each by its seq
//! (docs/PROTOCOL.md: an odd seq is a session's stdout, the even one above
//! it the same session's stderr; an empty message is a stream's EOF, and a
//! one-byte message on stdout after its EOF is the process's exit code).
//! [`Streaming`] decides, from the reads and the session queues, whether
//! the agent is streaming the output of many sessions at once, when the
//! shim writers waiting for the next read are to be woken and when that
//! state times out. Neither touches a socket, a task or a clock: the VM's
//! io reader ([`crate::vm`]) feeds them its reads and `now`, and carries
//! out what they return. [`simulate`] drives both with a simulated agent.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use proxy_proto::hyper::io::{IoDecoder, IoHeader, IoMessage, IO_HEADER_LEN, NULL_SEQ};

use crate::registry::{Channel, During, ProxyError};
use crate::session::Output;

/// An io read at least this large, with messages of several sessions
/// interleaved, means the agent is streaming output of many sessions at
/// once (see [`crate::session::IoFlow`]). A single stream gathers enough
/// from one read.
pub const STREAMING_READ: usize = 16 * 1024;

/// Streaming stops when io has been quiet this long (tokio's timers tick
/// in milliseconds).
pub const STREAM_PAUSE: Duration = Duration::from_millis(1);

/// A map keyed by io seq. Its keys are the VM's own sessions (output for
/// any other seq is looked up and dropped, never inserted), so a
/// multiplicative hash serves where SipHash would cost more per message.
pub type SeqMap<V> = HashMap<u64, V, BuildHasherDefault<SeqHasher>>;

/// A map keyed by an id the daemon hands out itself (a [`VmId`], a
/// [`TxnId`]): no peer picks its keys, so the cheap hash of [`SeqMap`]
/// serves here too.
///
/// [`VmId`]: crate::rules::registry::VmId
/// [`TxnId`]: crate::rules::ctl::TxnId
pub type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<SeqHasher>>;

/// The hasher of [`SeqMap`] and [`IdMap`].
#[derive(Debug, Default)]
pub struct SeqHasher(u64);

impl Hasher for SeqHasher {
    fn finish(&self) -> u64 {
        // The product's high bits are its well-mixed ones; the table
        // indexes by the low ones (and io seqs are all odd).
        self.0.rotate_left(26)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// Where a session's stdout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Output flows.
    Open,
    /// Its EOF was seen: a one-byte message next is the exit code (longer
    /// messages are still data).
    AtEof,
}

/// A session the demux routes to, with the driver's handle on it.
#[derive(Debug)]
struct Route<R> {
    phase: Stream,
    to: R,
}

/// Why a message was delivered to nobody.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discarded {
    /// Seq 1 or 2: the null session's output is discarded.
    NullSession,
    /// Seq 0 belongs to no session.
    SeqZero,
    /// No session has this seq (or it went).
    UnknownSeq {
        /// The message's seq.
        seq: u64,
    },
    /// The empty message on a session's stdout: its EOF (the exit code
    /// may follow).
    StdoutEof,
    /// The empty message on a session's stderr: its EOF.
    StderrEof,
}

/// What becomes of one io message.
#[derive(Debug)]
pub enum Routed<T = ()> {
    /// Queue `item` on the session at `base`.
    Deliver {
        /// The session's io base (its stdout seq).
        base: u64,
        /// [`Output::Stdout`], [`Output::Stderr`] or [`Output::Exited`]
        /// (after which nothing more comes: the driver
        /// [`forget`](IoDemux::forget)s the session).
        item: Output,
        /// The driver's handle on the session.
        to: T,
    },
    /// Nobody gets it.
    Discard(Discarded),
}

/// Decoded and not yet counted in the VM's stats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Data bytes.
    pub bytes: u64,
    /// Messages.
    pub msgs: u64,
}

/// The io demultiplexer of one VM. `R` is the driver's handle on a
/// session (`Arc<Session>` in the daemon, `()` in the tests), cached per
/// session so that a message costs one lookup in a [`SeqMap`] and no lock.
#[derive(Debug)]
pub struct IoDemux<R = ()> {
    dec: IoDecoder,
    routes: SeqMap<Route<R>>,
    /// How often consecutive messages changed sessions since
    /// [`take_switches`](Self::take_switches).
    switches: u32,
    last_base: u64,
    counts: Counts,
}

impl<R> IoDemux<R> {
    /// A demux refusing messages over `max_message` bytes (header
    /// included).
    pub fn new(max_message: usize) -> Self {
        Self {
            dec: IoDecoder::new(max_message),
            routes: SeqMap::default(),
            switches: 0,
            last_base: 0,
            counts: Counts::default(),
        }
    }

    /// Take the next whole message off the front of `buf`. Bytes that are
    /// not io framing are [`ProxyError::AgentGarbage`] on [`Channel::Io`]:
    /// the channel is unusable (`buf` is left as it was, so decoding again
    /// says the same).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<IoMessage>, ProxyError> {
        match self.dec.decode(buf) {
            Ok(Some(m)) => {
                self.counts.bytes = self.counts.bytes.saturating_add(m.data.len() as u64);
                self.counts.msgs = self.counts.msgs.saturating_add(1);
                Ok(Some(m))
            }
            Ok(None) => Ok(None),
            Err(source) => Err(ProxyError::AgentGarbage {
                channel: Channel::Io,
                during: During::Idle,
                source,
            }),
        }
    }

    /// Route `msg`. `attach` is asked for the driver's handle on a session
    /// the demux holds no route to (None: there is no such session; it is
    /// asked again for the next message).
    pub fn route_to(
        &mut self,
        msg: IoMessage,
        attach: impl FnOnce(u64) -> Option<R>,
    ) -> Routed<&R> {
        let seq = msg.seq;
        if seq == NULL_SEQ || seq == NULL_SEQ + 1 {
            return Routed::Discard(Discarded::NullSession);
        }
        // Odd seqs are a session's stdin/stdout, even ones its stderr.
        let base = if seq % 2 == 1 {
            seq
        } else if let Some(base) = seq.checked_sub(1) {
            base
        } else {
            return Routed::Discard(Discarded::SeqZero);
        };
        if base != self.last_base {
            self.switches = self.switches.saturating_add(1);
            self.last_base = base;
        }
        let route = match self.routes.entry(base) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => match attach(base) {
                Some(to) => e.insert(Route {
                    phase: Stream::Open,
                    to,
                }),
                None => return Routed::Discard(Discarded::UnknownSeq { seq }),
            },
        };
        let item = if seq == base {
            match (route.phase, msg.data.len()) {
                (_, 0) => {
                    route.phase = Stream::AtEof;
                    return Routed::Discard(Discarded::StdoutEof);
                }
                (Stream::AtEof, 1) => {
                    route.phase = Stream::Open;
                    Output::Exited(msg.data[0])
                }
                _ => Output::Stdout(msg.data),
            }
        } else if msg.data.is_empty() {
            return Routed::Discard(Discarded::StderrEof);
        } else {
            Output::Stderr(msg.data)
        };
        Routed::Deliver {
            base,
            item,
            to: &route.to,
        }
    }

    /// Let go of the session at `base`: it went, or its process exited
    /// (nothing more comes for it). The demux so holds only sessions with
    /// output still coming, however many processes a long-lived VM runs.
    pub fn forget(&mut self, base: u64) {
        self.routes.remove(&base);
    }

    /// The phase of the session at `base`'s stdout, if routed to.
    pub fn phase(&self, base: u64) -> Option<Stream> {
        self.routes.get(&base).map(|r| r.phase)
    }

    /// Sessions routed to.
    pub fn routes(&self) -> usize {
        self.routes.len()
    }

    /// How often consecutive messages changed sessions since the last
    /// call (for [`Streaming::read_done`]).
    pub fn take_switches(&mut self) -> u32 {
        std::mem::take(&mut self.switches)
    }

    /// What was decoded since the last call (for the VM's stats).
    pub fn take_counts(&mut self) -> Counts {
        std::mem::take(&mut self.counts)
    }
}

/// The demux is the io reader's decoder ([`crate::reader::MessageReader`]):
/// [`IoDemux::decode`], counted.
impl<R> proxy_proto::Decode for IoDemux<R> {
    type Item = IoMessage;
    type Error = ProxyError;
    #[inline]
    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<IoMessage>, ProxyError> {
        IoDemux::decode(self, src)
    }
}

impl IoDemux<()> {
    /// Route `msg`; `is_session` says whether a session has the io base
    /// it is asked about.
    pub fn route(&mut self, msg: IoMessage, is_session: impl FnOnce(u64) -> bool) -> Routed {
        match self.route_to(msg, |base| is_session(base).then_some(())) {
            Routed::Deliver { base, item, .. } => Routed::Deliver { base, item, to: () },
            Routed::Discard(d) => Routed::Discard(d),
        }
    }
}

/// Whether the shim writers waiting for the io reader's next read (see
/// [`crate::session::IoFlow`]) are to be woken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Wake {
    /// Nobody waits, or they are to wait on.
    Nobody,
    /// Wake them.
    Writers,
}

/// Whether the agent streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    /// Writers write what they have.
    Off,
    /// Writers holding a small batch wait for the next read.
    Streaming {
        /// When the last read came.
        last_read: Instant,
    },
}

/// The io reader's half of the corking policy: whether the agent streams
/// output of many sessions at once. A read at least [`STREAMING_READ`]
/// bytes long whose messages changed sessions more than once turns it on;
/// any other read, no read for [`STREAM_PAUSE`], or a full session queue
/// (the reader stops until it has room) turns it off. Writers waiting for
/// the next read are woken after every read while streaming, and whenever
/// it stops.
#[derive(Debug, Clone)]
pub struct Streaming {
    flow: Flow,
}

impl Default for Streaming {
    fn default() -> Self {
        Self::new()
    }
}

impl Streaming {
    /// Not streaming.
    pub fn new() -> Self {
        Self { flow: Flow::Off }
    }

    /// Whether the agent streams (the driver mirrors it in
    /// [`crate::session::IoFlow`]).
    pub fn is_streaming(&self) -> bool {
        matches!(self.flow, Flow::Streaming { .. })
    }

    /// A read of `n` bytes came at `now`, and its messages are queued;
    /// they changed sessions `switches` times.
    pub fn read_done(&mut self, n: usize, switches: u32, now: Instant) -> Wake {
        let was = self.is_streaming();
        self.flow = if n >= STREAMING_READ && switches > 1 {
            Flow::Streaming { last_read: now }
        } else {
            Flow::Off
        };
        // Writers wait only while streaming, and every other place that
        // ends it wakes them: when it was off, nobody waits.
        if was {
            Wake::Writers
        } else {
            Wake::Nobody
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.flow {
            Flow::Off => None,
            Flow::Streaming { last_read } => last_read.checked_add(STREAM_PAUSE),
        }
    }

    /// It is `now` (a timer fired, maybe early).
    pub fn handle_timeout(&mut self, now: Instant) -> Wake {
        match self.flow {
            Flow::Streaming { last_read }
                if now.saturating_duration_since(last_read) >= STREAM_PAUSE =>
            {
                self.flow = Flow::Off;
                Wake::Writers
            }
            _ => Wake::Nobody,
        }
    }

    /// A session's queue is full: reading stops until it has room, so
    /// writers waiting for the next read write what they hold (some of it
    /// may be what makes the room).
    pub fn queue_full(&mut self) -> Wake {
        self.flow = Flow::Off;
        Wake::Writers
    }

    /// The reader ends: nobody waits for io that will not come.
    pub fn close(&mut self) -> Wake {
        self.flow = Flow::Off;
        Wake::Writers
    }
}

/// What [`simulate`] saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Steps run.
    pub steps: usize,
    /// Io messages decoded.
    pub messages: u64,
    /// Payload bytes delivered to sessions.
    pub bytes_delivered: u64,
    /// Exit codes delivered.
    pub exits: u64,
    /// Messages discarded.
    pub discarded: u64,
    /// Sessions that went.
    pub forgotten: u64,
    /// Reads that turned (or kept) streaming on.
    pub streaming_reads: u64,
    /// Times the pause ended streaming.
    pub timeouts: u64,
    /// The agent sent garbage and the demux stopped on it.
    pub garbage: bool,
}

use super::rng::SplitMix64 as Rng;

/// Whether a simulated session exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Life {
    /// Not registered yet: its output is unknown seq.
    NotYet,
    Live,
    Gone,
}

/// The simulated agent's idea of a session's process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proc {
    Running,
    /// Its stdout EOF is sent.
    Eof,
    /// Its exit code is sent: nothing more comes.
    Exited,
}

#[derive(Debug)]
struct SimSession {
    base: u64,
    life: Life,
    proc: Proc,
    /// Payload bytes of messages decoded while the session was live.
    due: u64,
    delivered: u64,
    /// The exit message was decoded while the session was live.
    exit_due: bool,
    exits: u32,
}

/// What the simulated agent meant by a message.
#[derive(Debug, Clone)]
enum Meant {
    Stdout(usize, Bytes),
    Stderr(usize, Bytes),
    StdoutEof(usize),
    StderrEof(usize),
    Exit(usize, u8),
    Null,
    Zero,
    Unknown(u64),
    Garbage,
}

/// What routing a message must give.
#[derive(Debug)]
enum Want {
    Deliver(usize, Output),
    Discard(Discarded),
}

/// A message on the simulated wire, ending at byte `end` of the stream
/// (a garbage header: where its 12 bytes end).
#[derive(Debug)]
struct OnWire {
    end: u64,
    meant: Meant,
}

/// The simulated agent, the wire and the expectations.
struct Sim {
    rng: Rng,
    now: Instant,
    max_message: usize,
    /// Random bytes payloads are cut from.
    pool: Bytes,
    sessions: Vec<SimSession>,
    /// Written by the agent, not read yet.
    wire: BytesMut,
    written: u64,
    fed: u64,
    on_wire: std::collections::VecDeque<OnWire>,
    garbage_sent: bool,
    /// The read buffer.
    buf: BytesMut,
    demux: IoDemux<usize>,
    streaming: Streaming,
    /// The model of [`Streaming`].
    model_on: Option<Instant>,
    /// A queue was full since the last read that turned streaming on.
    full_since: bool,
    last_base: u64,
    stats: SimStats,
}

/// Seqs no session ever has.
const UNKNOWN_BASE: u64 = 1001;

impl Sim {
    fn new(seed: u64) -> Self {
        let mut rng = Rng(seed);
        let max_message = if rng.chance(1, 2) {
            proxy_proto::hyper::MAX_MESSAGE_LEN
        } else {
            IO_HEADER_LEN + 64 + rng.upto(20_000)
        };
        let pool: Vec<u8> = (0..32 * 1024).map(|_| rng.next() as u8).collect();
        let n = 1 + rng.upto(7);
        let sessions = (0..n)
            .map(|i| SimSession {
                base: 3 + 2 * i as u64,
                life: if rng.chance(1, 4) {
                    Life::NotYet
                } else {
                    Life::Live
                },
                proc: Proc::Running,
                due: 0,
                delivered: 0,
                exit_due: false,
                exits: 0,
            })
            .collect();
        Sim {
            rng,
            now: Instant::now(),
            max_message,
            pool: Bytes::from(pool),
            sessions,
            wire: BytesMut::new(),
            written: 0,
            fed: 0,
            on_wire: std::collections::VecDeque::new(),
            garbage_sent: false,
            buf: BytesMut::new(),
            demux: IoDemux::new(max_message),
            streaming: Streaming::new(),
            model_on: None,
            full_since: false,
            last_base: 0,
            stats: SimStats::default(),
        }
    }

    fn payload(&mut self) -> Bytes {
        let room = self
            .max_message
            .saturating_sub(IO_HEADER_LEN)
            .min(self.pool.len());
        let len = match self.rng.below(10) {
            0 => 0,
            1 => 1,
            2..=6 => self.rng.upto(200),
            _ => self.rng.upto(room),
        }
        .min(room);
        let at = self.rng.upto(self.pool.len() - len);
        self.pool.slice(at..at + len)
    }

    fn put(&mut self, seq: u64, data: &Bytes, meant: Meant) {
        self.wire
            .extend_from_slice(&IoHeader::for_data(seq, data.len()).to_bytes());
        self.wire.extend_from_slice(data);
        self.written += (IO_HEADER_LEN + data.len()) as u64;
        self.on_wire.push_back(OnWire {
            end: self.written,
            meant,
        });
    }

    /// The agent writes a burst of messages.
    fn agent_writes(&mut self) {
        for _ in 0..1 + self.rng.below(12) {
            if self.garbage_sent {
                return;
            }
            let data = self.payload();
            let pick = self.rng.below(100);
            if pick < 2 {
                let seq = NULL_SEQ + self.rng.below(2);
                self.put(seq, &data, Meant::Null);
            } else if pick < 3 {
                self.put(0, &data, Meant::Zero);
            } else if pick < 7 {
                let seq = UNKNOWN_BASE + self.rng.below(6);
                self.put(seq, &data, Meant::Unknown(seq));
            } else if pick < 8 && self.rng.chance(1, 4) {
                let seq = self.rng.next();
                let len = if self.rng.chance(1, 2) {
                    self.rng.below(IO_HEADER_LEN as u64) as u32
                } else {
                    let over = self.max_message as u64 + 1;
                    (over + self.rng.below(u64::from(u32::MAX) - over)) as u32
                };
                self.wire
                    .extend_from_slice(&IoHeader { seq, len }.to_bytes());
                self.written += IO_HEADER_LEN as u64;
                self.on_wire.push_back(OnWire {
                    end: self.written,
                    meant: Meant::Garbage,
                });
                // What follows garbage does not matter.
                let junk = self.payload();
                self.wire.extend_from_slice(&junk);
                self.written += junk.len() as u64;
                self.garbage_sent = true;
            } else {
                let i = self.rng.upto(self.sessions.len() - 1);
                let (base, life, proc) = {
                    let s = &self.sessions[i];
                    (s.base, s.life, s.proc)
                };
                if proc == Proc::Exited {
                    continue; // nothing comes after the exit code
                }
                let stderr = self.rng.chance(1, 4);
                if stderr {
                    if data.is_empty() {
                        self.put(base + 1, &data, Meant::StderrEof(i));
                    } else {
                        self.put(base + 1, &data, Meant::Stderr(i, data.clone()));
                    }
                    continue;
                }
                // A session not live yet gets no EOF or exit (the process
                // of a session the proxy does not know is not started).
                let settled = life == Life::Live;
                match (proc, data.len()) {
                    (Proc::Running, 0) if settled && self.rng.chance(1, 3) => {
                        self.put(base, &data, Meant::StdoutEof(i));
                        self.sessions[i].proc = Proc::Eof;
                    }
                    (Proc::Running, 0) => {}
                    (Proc::Running, _) => self.put(base, &data, Meant::Stdout(i, data.clone())),
                    (Proc::Eof, _) if self.rng.chance(1, 2) => {
                        let code = self.rng.next() as u8;
                        self.put(base, &Bytes::from(vec![code]), Meant::Exit(i, code));
                        self.sessions[i].proc = Proc::Exited;
                    }
                    (Proc::Eof, 0) => self.put(base, &data, Meant::StdoutEof(i)),
                    // Data after EOF is data (never one byte: that would be
                    // the exit code).
                    (Proc::Eof, 1) => {}
                    (Proc::Eof, _) => self.put(base, &data, Meant::Stdout(i, data.clone())),
                    (Proc::Exited, _) => {}
                }
            }
        }
    }

    /// What routing the message meant as `meant` must give.
    fn expected(&self, meant: &Meant) -> Result<Want, String> {
        let live = |i: usize| self.sessions[i].life == Life::Live;
        let unknown = |i: usize, stderr: bool| {
            Want::Discard(Discarded::UnknownSeq {
                seq: self.sessions[i].base + u64::from(stderr),
            })
        };
        Ok(match meant {
            Meant::Null => Want::Discard(Discarded::NullSession),
            Meant::Zero => Want::Discard(Discarded::SeqZero),
            Meant::Unknown(seq) => Want::Discard(Discarded::UnknownSeq { seq: *seq }),
            Meant::Garbage => return Err("garbage was decoded as a message".into()),
            Meant::Stdout(i, _) | Meant::StdoutEof(i) | Meant::Exit(i, _) if !live(*i) => {
                unknown(*i, false)
            }
            Meant::Stderr(i, _) | Meant::StderrEof(i) if !live(*i) => unknown(*i, true),
            Meant::Stdout(i, d) => Want::Deliver(*i, Output::Stdout(d.clone())),
            Meant::Stderr(i, d) => Want::Deliver(*i, Output::Stderr(d.clone())),
            Meant::Exit(i, c) => Want::Deliver(*i, Output::Exited(*c)),
            Meant::StdoutEof(_) => Want::Discard(Discarded::StdoutEof),
            Meant::StderrEof(_) => Want::Discard(Discarded::StderrEof),
        })
    }

    fn seq_of(&self, meant: &Meant) -> Option<u64> {
        match meant {
            Meant::Null | Meant::Garbage => None,
            Meant::Zero => Some(0),
            Meant::Unknown(seq) => Some(*seq),
            Meant::Stdout(i, _) | Meant::StdoutEof(i) | Meant::Exit(i, _) => {
                Some(self.sessions[*i].base)
            }
            Meant::Stderr(i, _) | Meant::StderrEof(i) => Some(self.sessions[*i].base + 1),
        }
    }

    /// The agent's next read returns up to `n` bytes; the reader decodes
    /// and routes them. Ok(true): the demux stopped on garbage.
    fn read(&mut self, n: usize) -> Result<bool, String> {
        let n = n.min(self.wire.len());
        if n == 0 {
            return Ok(false);
        }
        let chunk = self.wire.split_to(n);
        self.buf.extend_from_slice(&chunk);
        self.fed += n as u64;
        let mut switches = 0u32;
        let mut decoded = Counts::default();
        loop {
            let m = match self.demux.decode(&mut self.buf) {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => {
                    let next = self.on_wire.front();
                    if !matches!(next, Some(w) if matches!(w.meant, Meant::Garbage) && w.end <= self.fed)
                    {
                        return Err(format!("decode failed on a good stream: {e}"));
                    }
                    if !matches!(
                        e,
                        ProxyError::AgentGarbage {
                            channel: Channel::Io,
                            ..
                        }
                    ) || !e.to_string().starts_with("the agent sent garbage on io: ")
                    {
                        return Err(format!("garbage gave the wrong error: {e}"));
                    }
                    if self.demux.decode(&mut self.buf).is_ok() {
                        return Err("the demux went on after garbage".into());
                    }
                    self.stats.garbage = true;
                    return Ok(true);
                }
            };
            let Some(w) = self.on_wire.pop_front() else {
                return Err("a message was decoded that the agent never sent".into());
            };
            if w.end > self.fed {
                return Err(format!(
                    "a message ending at byte {} was decoded with {} fed",
                    w.end, self.fed
                ));
            }
            let seq = self.seq_of(&w.meant);
            if seq.is_some_and(|seq| seq != m.seq) {
                return Err(format!("{:?} was decoded with seq {}", w.meant, m.seq));
            }
            if let Some(seq) = seq {
                let base = if seq % 2 == 1 {
                    seq
                } else {
                    seq.saturating_sub(1)
                };
                if seq != 0 && base != self.last_base {
                    switches += 1;
                    self.last_base = base;
                }
            }
            decoded.bytes += m.data.len() as u64;
            decoded.msgs += 1;
            self.stats.messages += 1;
            let want = self.expected(&w.meant)?;
            let sessions = &self.sessions;
            let routed = self.demux.route_to(m, |base| {
                sessions
                    .iter()
                    .position(|s| s.base == base && s.life == Life::Live)
            });
            match (routed, want) {
                (Routed::Discard(got), Want::Discard(want)) if got == want => {
                    self.stats.discarded += 1;
                    if let (Meant::StdoutEof(i), Discarded::StdoutEof) = (&w.meant, want) {
                        let i = *i;
                        let base = self.sessions[i].base;
                        if self.demux.phase(base) != Some(Stream::AtEof) {
                            return Err(format!("session {base} is not at EOF after its EOF"));
                        }
                    }
                }
                (Routed::Deliver { base, item, to }, Want::Deliver(i, want)) => {
                    let to = *to;
                    let s = &mut self.sessions[i];
                    if to != i || base != s.base || !same(&item, &want) {
                        return Err(format!(
                            "{item:?} was delivered to session {base} (#{to}); meant was {want:?} for {}",
                            s.base
                        ));
                    }
                    match item {
                        Output::Exited(_) => {
                            s.exit_due = true;
                            s.exits += 1;
                            if s.exits > 1 || s.proc != Proc::Exited {
                                return Err(format!(
                                    "session {base}: exit delivered {} times",
                                    s.exits
                                ));
                            }
                            self.stats.exits += 1;
                            // The driver lets go of a session whose
                            // process exited.
                            self.demux.forget(base);
                        }
                        Output::Stdout(b) | Output::Stderr(b) => {
                            s.due += b.len() as u64;
                            s.delivered += b.len() as u64;
                            self.stats.bytes_delivered += b.len() as u64;
                        }
                        Output::Replayed(_) => return Err("a replay was routed".into()),
                    }
                }
                (got, want) => {
                    return Err(format!(
                        "{:?} was routed as {got:?}; expected {want:?}",
                        w.meant
                    ));
                }
            }
        }
        if let Some(w) = self.on_wire.front() {
            if w.end <= self.fed {
                return Err(format!(
                    "a message ending at byte {} was not decoded with {} fed",
                    w.end, self.fed
                ));
            }
        }
        let counts = self.demux.take_counts();
        if counts != decoded {
            return Err(format!("counted {counts:?}, decoded {decoded:?}"));
        }
        let got = self.demux.take_switches();
        if got != switches {
            return Err(format!("{got} switches counted, {switches} made"));
        }
        let was = self.model_on.is_some();
        let wake = self.streaming.read_done(n, switches, self.now);
        let on = n >= STREAMING_READ && switches > 1;
        self.model_on = on.then_some(self.now);
        if on {
            self.full_since = false;
            self.stats.streaming_reads += 1;
        }
        let want = if was { Wake::Writers } else { Wake::Nobody };
        if wake != want {
            return Err(format!("a read woke {wake:?}, not {want:?}"));
        }
        Ok(false)
    }

    fn check(&self) -> Result<(), String> {
        if self.streaming.is_streaming() != self.model_on.is_some() {
            return Err(format!(
                "streaming is {}, the model says {}",
                self.streaming.is_streaming(),
                self.model_on.is_some()
            ));
        }
        if self.full_since && self.streaming.is_streaming() {
            return Err("streaming after a full queue without a streaming read since".into());
        }
        let want = self.model_on.and_then(|t| t.checked_add(STREAM_PAUSE));
        if self.streaming.poll_timeout() != want {
            return Err(format!(
                "the timeout is {:?}, not {want:?}",
                self.streaming.poll_timeout()
            ));
        }
        for s in &self.sessions {
            if s.delivered != s.due {
                return Err(format!(
                    "session {}: {} bytes delivered, {} due",
                    s.base, s.delivered, s.due
                ));
            }
            if s.exits != u32::from(s.exit_due) {
                return Err(format!("session {}: {} exits delivered", s.base, s.exits));
            }
            if s.life != Life::Live && self.demux.phase(s.base).is_some() {
                return Err(format!("session {} is routed to while not live", s.base));
            }
        }
        Ok(())
    }

    fn step(&mut self) -> Result<bool, String> {
        match self.rng.below(100) {
            0..=34 => self.agent_writes(),
            35..=69 => {
                let n = match self.rng.below(4) {
                    0 => 1 + self.rng.upto(32),
                    1 => 1 + self.rng.upto(4096),
                    _ => STREAMING_READ / 2 + self.rng.upto(3 * STREAMING_READ),
                };
                return self.read(n);
            }
            70..=74 => {
                // A session goes, or one not registered yet arrives.
                let i = self.rng.upto(self.sessions.len() - 1);
                let s = &mut self.sessions[i];
                match s.life {
                    Life::NotYet => s.life = Life::Live,
                    Life::Live if self.rng.chance(1, 3) => {
                        s.life = Life::Gone;
                        self.demux.forget(s.base);
                        self.stats.forgotten += 1;
                    }
                    _ => {}
                }
            }
            75..=79 => {
                let wake = self.streaming.queue_full();
                self.model_on = None;
                self.full_since = true;
                if wake != Wake::Writers {
                    return Err("a full queue did not wake the writers".into());
                }
            }
            _ => {
                // Time passes; the timer fires when due (or early).
                let us = match self.rng.below(3) {
                    0 => 0,
                    1 => self.rng.below(1000),
                    _ => self.rng.below(3000),
                };
                self.now += Duration::from_micros(us);
                let due = self.streaming.poll_timeout();
                let early = self.rng.chance(1, 4);
                if due.is_some_and(|d| d <= self.now) || early {
                    let was = self.model_on;
                    let wake = self.streaming.handle_timeout(self.now);
                    let ends = was.is_some_and(|t| self.now.duration_since(t) >= STREAM_PAUSE);
                    if ends {
                        self.model_on = None;
                        self.stats.timeouts += 1;
                    }
                    let want = if ends { Wake::Writers } else { Wake::Nobody };
                    if wake != want {
                        return Err(format!("a timeout woke {wake:?}, not {want:?}"));
                    }
                }
            }
        }
        Ok(false)
    }
}

fn same(a: &Output, b: &Output) -> bool {
    match (a, b) {
        (Output::Stdout(x), Output::Stdout(y)) | (Output::Stderr(x), Output::Stderr(y)) => x == y,
        (Output::Exited(x), Output::Exited(y)) => x == y,
        _ => false,
    }
}

/// A seeded randomized run of [`IoDemux`] and [`Streaming`] against a
/// simulated agent: random interleavings of io messages for random
/// sessions (of random sizes, 0 and 1 included; EOF then the exit code;
/// the null session, seq 0 and unknown seqs; now and then garbage), split
/// at random byte boundaries into reads, while sessions come and go and
/// time passes. After every step: each session got exactly the bytes meant
/// for it while it was live, in order, and nothing else; its exit code
/// once, after its EOF; nothing went to a seq without a live session;
/// garbage stopped the demux with [`ProxyError::AgentGarbage`]; the
/// streaming state is what its rules say (off after a full queue until
/// the next large read of several sessions; off once the pause passed).
/// `Err` says which step broke what.
pub fn simulate(seed: u64, steps: usize) -> Result<SimStats, String> {
    let mut sim = Sim::new(seed);
    for step in 0..steps {
        let stopped = sim.step().and_then(|stopped| {
            sim.check()?;
            Ok(stopped)
        });
        sim.stats.steps = step + 1;
        match stopped {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => return Err(format!("seed {seed}, step {step}: {e}")),
        }
    }
    Ok(sim.stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: u64, data: &[u8]) -> IoMessage {
        IoMessage::new(seq, Bytes::copy_from_slice(data))
    }

    /// Sessions 3 and 5 exist.
    fn known(base: u64) -> bool {
        base == 3 || base == 5
    }

    fn route(d: &mut IoDemux, seq: u64, data: &[u8]) -> Routed {
        d.route(msg(seq, data), known)
    }

    fn delivered(r: Routed) -> (u64, String) {
        match r {
            Routed::Deliver { base, item, .. } => (base, format!("{item:?}")),
            r => panic!("not delivered: {r:?}"),
        }
    }

    fn discarded(r: Routed) -> Discarded {
        match r {
            Routed::Discard(d) => d,
            r => panic!("delivered: {r:?}"),
        }
    }

    #[test]
    fn the_null_session_is_discarded() {
        let mut d = IoDemux::new(10240);
        assert_eq!(discarded(route(&mut d, 1, b"x")), Discarded::NullSession);
        assert_eq!(discarded(route(&mut d, 2, b"x")), Discarded::NullSession);
        assert_eq!(d.routes(), 0);
    }

    #[test]
    fn seq_zero_is_dropped() {
        let mut d = IoDemux::new(10240);
        assert_eq!(discarded(route(&mut d, 0, b"x")), Discarded::SeqZero);
    }

    #[test]
    fn an_unknown_seq_is_dropped_and_asked_about_again() {
        let mut d = IoDemux::new(10240);
        assert_eq!(
            discarded(route(&mut d, 99, b"x")),
            Discarded::UnknownSeq { seq: 99 }
        );
        assert_eq!(
            discarded(route(&mut d, 100, b"x")),
            Discarded::UnknownSeq { seq: 100 }
        );
        assert_eq!(d.routes(), 0, "no route for a seq nobody has");
        // The session registers later: its output flows.
        let r = d.route(msg(99, b"y"), |b| b == 99);
        assert_eq!(delivered(r), (99, "Stdout(b\"y\")".into()));
    }

    #[test]
    fn odd_seqs_are_stdout_even_ones_stderr_of_the_session_below() {
        let mut d = IoDemux::new(10240);
        assert_eq!(
            delivered(route(&mut d, 3, b"out")),
            (3, "Stdout(b\"out\")".into())
        );
        assert_eq!(
            delivered(route(&mut d, 4, b"err")),
            (3, "Stderr(b\"err\")".into())
        );
        assert_eq!(
            delivered(route(&mut d, 6, b"e5")),
            (5, "Stderr(b\"e5\")".into())
        );
    }

    #[test]
    fn an_empty_stdout_message_is_eof_then_one_byte_is_the_exit_code() {
        let mut d = IoDemux::new(10240);
        assert_eq!(discarded(route(&mut d, 3, b"")), Discarded::StdoutEof);
        assert_eq!(d.phase(3), Some(Stream::AtEof));
        assert_eq!(delivered(route(&mut d, 3, &[7])), (3, "Exited(7)".into()));
        assert_eq!(d.phase(3), Some(Stream::Open));
    }

    #[test]
    fn a_one_byte_message_without_eof_is_data() {
        let mut d = IoDemux::new(10240);
        assert_eq!(
            delivered(route(&mut d, 3, b"x")),
            (3, "Stdout(b\"x\")".into())
        );
        // Another session's EOF does not count.
        assert_eq!(discarded(route(&mut d, 5, b"")), Discarded::StdoutEof);
        assert_eq!(
            delivered(route(&mut d, 3, b"y")),
            (3, "Stdout(b\"y\")".into())
        );
        // Nor does a stderr EOF.
        assert_eq!(discarded(route(&mut d, 4, b"")), Discarded::StderrEof);
        assert_eq!(
            delivered(route(&mut d, 3, b"z")),
            (3, "Stdout(b\"z\")".into())
        );
    }

    #[test]
    fn data_after_eof_is_data_again() {
        let mut d = IoDemux::new(10240);
        assert_eq!(discarded(route(&mut d, 3, b"")), Discarded::StdoutEof);
        assert_eq!(
            delivered(route(&mut d, 3, b"late")),
            (3, "Stdout(b\"late\")".into())
        );
        assert_eq!(
            delivered(route(&mut d, 4, b"e")),
            (3, "Stderr(b\"e\")".into())
        );
        // Still after the EOF: one byte is the exit code.
        assert_eq!(delivered(route(&mut d, 3, &[0])), (3, "Exited(0)".into()));
    }

    #[test]
    fn an_empty_stderr_message_is_its_eof_and_ignored() {
        let mut d = IoDemux::new(10240);
        assert_eq!(discarded(route(&mut d, 4, b"")), Discarded::StderrEof);
        assert_eq!(d.phase(3), Some(Stream::Open));
    }

    #[test]
    fn a_forgotten_session_gets_nothing_and_its_route_is_gone() {
        let mut d = IoDemux::new(10240);
        let mut live = true;
        let r = d.route(msg(3, b"a"), |_| live);
        assert_eq!(delivered(r), (3, "Stdout(b\"a\")".into()));
        assert_eq!(d.routes(), 1);
        live = false;
        d.forget(3);
        assert_eq!(d.routes(), 0);
        let r = d.route(msg(3, b"b"), |_| live);
        assert_eq!(discarded(r), Discarded::UnknownSeq { seq: 3 });
    }

    #[test]
    fn routes_carry_the_drivers_handle() {
        let mut d: IoDemux<&str> = IoDemux::new(10240);
        match d.route_to(msg(5, b"x"), |_| Some("five")) {
            Routed::Deliver { to, .. } => assert_eq!(*to, "five"),
            r => panic!("{r:?}"),
        }
        // Cached: not asked again.
        match d.route_to(msg(6, b"y"), |_| panic!("asked again")) {
            Routed::Deliver { to, base, .. } => assert_eq!((*to, base), ("five", 5)),
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn garbage_is_agent_garbage_on_io() {
        let mut d: IoDemux = IoDemux::new(10240);
        let mut buf = BytesMut::from(&[0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 5][..]);
        let e = d.decode(&mut buf).unwrap_err();
        assert!(matches!(
            e,
            ProxyError::AgentGarbage {
                channel: Channel::Io,
                ..
            }
        ));
        assert!(
            e.to_string().starts_with("the agent sent garbage on io: "),
            "{e}"
        );
        assert_eq!(buf.len(), 12, "left as it was");
    }

    #[test]
    fn decoding_counts_messages_and_bytes_and_routing_counts_switches() {
        let mut d: IoDemux = IoDemux::new(10240);
        let mut buf = BytesMut::new();
        for (seq, data) in [
            (3u64, &b"ab"[..]),
            (4, b"c"),
            (5, b""),
            (3, b"d"),
            (1, b"n"),
        ] {
            msg(seq, data).encode(&mut buf, 10240).unwrap();
        }
        buf.extend_from_slice(&[0, 0]); // the start of the next
        while let Some(m) = d.decode(&mut buf).unwrap() {
            let _ = d.route(m, known);
        }
        assert_eq!(d.take_counts(), Counts { bytes: 5, msgs: 5 });
        assert_eq!(d.take_counts(), Counts::default());
        // 0 → 3, 3 → 5, 5 → 3 (the null session does not count).
        assert_eq!(d.take_switches(), 3);
        assert_eq!(d.take_switches(), 0);
    }

    #[test]
    fn a_large_read_of_several_sessions_streams_and_the_next_read_wakes() {
        let t0 = Instant::now();
        let mut s = Streaming::new();
        assert_eq!(s.read_done(STREAMING_READ, 2, t0), Wake::Nobody);
        assert!(s.is_streaming());
        assert_eq!(s.poll_timeout(), Some(t0 + STREAM_PAUSE));
        assert_eq!(
            s.read_done(STREAMING_READ, 5, t0),
            Wake::Writers,
            "still on"
        );
        assert!(s.is_streaming());
    }

    #[test]
    fn a_small_read_or_one_sessions_read_ends_streaming() {
        let t0 = Instant::now();
        let mut s = Streaming::new();
        assert_eq!(s.read_done(STREAMING_READ - 1, 9, t0), Wake::Nobody);
        assert!(!s.is_streaming());
        let _ = s.read_done(STREAMING_READ, 2, t0);
        assert_eq!(s.read_done(100, 9, t0), Wake::Writers);
        assert!(!s.is_streaming());
        let _ = s.read_done(STREAMING_READ, 2, t0);
        assert_eq!(s.read_done(1 << 20, 1, t0), Wake::Writers);
        assert!(!s.is_streaming());
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn no_read_for_the_pause_ends_streaming() {
        let t0 = Instant::now();
        let mut s = Streaming::new();
        let _ = s.read_done(STREAMING_READ, 2, t0);
        let early = t0 + STREAM_PAUSE / 2;
        assert_eq!(s.handle_timeout(early), Wake::Nobody, "early");
        assert!(s.is_streaming());
        assert_eq!(s.handle_timeout(t0 + STREAM_PAUSE), Wake::Writers);
        assert!(!s.is_streaming());
        assert_eq!(s.poll_timeout(), None);
        assert_eq!(s.handle_timeout(t0 + 2 * STREAM_PAUSE), Wake::Nobody);
    }

    #[test]
    fn a_full_queue_ends_streaming_and_wakes() {
        let t0 = Instant::now();
        let mut s = Streaming::new();
        let _ = s.read_done(STREAMING_READ, 2, t0);
        assert_eq!(s.queue_full(), Wake::Writers);
        assert!(!s.is_streaming());
        assert_eq!(s.close(), Wake::Writers);
    }

    #[test]
    fn simulate_2000_seeds() {
        let mut garbage = 0;
        let mut streaming = 0;
        let mut exits = 0;
        let mut timeouts = 0;
        for seed in 0..2000 {
            let stats = simulate(seed, 200).unwrap_or_else(|e| panic!("{e}"));
            garbage += u32::from(stats.garbage);
            streaming += stats.streaming_reads;
            exits += stats.exits;
            timeouts += stats.timeouts;
        }
        // The runs cover what they are meant to.
        assert!(garbage > 20, "{garbage} runs saw garbage");
        assert!(streaming > 100, "{streaming} streaming reads");
        assert!(exits > 100, "{exits} exits");
        assert!(timeouts > 20, "{timeouts} timeouts");
    }

    #[test]
    fn simulate_is_deterministic() {
        assert_eq!(simulate(7, 300), simulate(7, 300));
    }
}
