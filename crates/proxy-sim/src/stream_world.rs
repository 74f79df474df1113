//! One session's output from the agent to its shims, through the real
//! demultiplexer, the real session queue (its bound, the daemon's budget,
//! the replay window) and the real write accounting of the shim writer
//! ([`Session::write_done`]), to shims that read slowly, die with bytes
//! unread in their socket or half a frame read, and reconnect — resuming
//! from what they received (as `proxy-client` does) or not (as `cc-shim`
//! does). The agent's bytes arrive in reads split at random points.
//!
//! Invariants, after every step: a resuming shim gets every byte of stdout
//! and stderr in order, exactly once, and the exit code exactly once after
//! them; a shim that does not resume never gets a byte twice, and what it
//! misses is never more than the session counted as maybe lost; the queue
//! stays within its bound; at the end the daemon's budget is whole again.

use std::sync::Arc;

use bytes::BytesMut;
use proxy_proto::hyper::io::{IoMessage, MAX_IO_DATA};
use proxy_proto::hyper::MAX_MESSAGE_LEN;
use proxy_proto::{FrameDecoder, FrameKind, Limits, Notification, Stream};
use proxy_server::rules::demux::{IoDemux, Routed};
use proxy_server::rules::output::{frame_of, Inflight};
use proxy_server::session::{self, Output, OutputQueue, Session, WriteOutcome};

use crate::rng::Rng;

const BASE: u64 = 3;

/// What one run moved.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// Stream bytes the shims received and checked.
    pub bytes: u64,
    /// Shim connections that died.
    pub deaths: u64,
}

/// The byte at `pos` of stream `s` (0 stdout, 1 stderr): well mixed, so
/// that a run of them says where it came from.
fn byte_at(s: u64, pos: u64) -> u8 {
    let mut z = pos.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (s << 61);
    z = (z ^ (z >> 31)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    (z >> 56) as u8
}

fn expected(s: u64, from: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| byte_at(s, from + i)).collect()
}

/// A shim's connection.
struct Conn {
    q: OutputQueue,
    inflight: Inflight,
    /// The batch being written, and how much of it the kernel took.
    batch: Option<(Vec<u8>, usize)>,
    /// Bytes in the socket, not yet read by the shim.
    socket: Vec<u8>,
    /// The socket's capacity.
    cap: usize,
    /// What the socket held unread after the last complete write.
    unread: usize,
    /// Read by the shim, not yet a whole frame.
    partial: BytesMut,
    decoder: FrameDecoder,
}

/// Run one seeded schedule.
pub fn run(seed: u64, steps: usize) -> Result<Stats, String> {
    let mut rng = Rng::new(seed ^ 0x5354_5245_414d);
    let resumes = rng.chance(70);
    let total = [rng.below(600_000), rng.below(200_000)];
    let bound = (64 * 1024 + rng.below(1 << 20)) as usize;
    let budget_bytes = MAX_MESSAGE_LEN * 2 + rng.below(4 << 20) as usize;
    let budget = session::budget(budget_bytes);
    let s = Session::with_budget("t".into(), BASE, bound, Arc::default(), budget.clone());
    let mut demux = IoDemux::new(MAX_MESSAGE_LEN);
    // The agent: what it has written of each stream, its encoded bytes not
    // yet read by the proxy, and a routed item waiting for room.
    let mut sent = [0u64; 2];
    let mut exit_sent = false;
    let code = rng.below(256) as u8;
    let mut wire = BytesMut::new();
    let mut rbuf = BytesMut::new();
    let mut blocked: Option<Output> = None;
    // The shim side: what was received, whether the exit came.
    let mut recv = [0u64; 2];
    let mut exits = 0u32;
    let mut conn: Option<Conn> = None;
    let mut stats = Stats::default();
    let mut step = 0usize;
    let mut calm = false;
    let mut in_flight_at_deaths = 0u64;
    let mut claimed = false;
    loop {
        step += 1;
        if step > steps {
            calm = true; // no more deaths: let everything drain
        }
        if step > steps * 20 + 10_000 {
            return Err(format!(
                "did not drain: sent {sent:?} exit {exit_sent}, received {recv:?} exits {exits}, queued {}",
                s.queued_bytes()
            ));
        }
        let done = exit_sent && wire.is_empty() && rbuf.is_empty() && blocked.is_none();
        match rng.below(10) {
            // The agent writes a message.
            // (Only once a shim claimed the session: a process is started
            // with its token only then, as Hyper waits for the token's shim.)
            0 | 1 if !exit_sent && claimed => {
                let which = rng.below(2) as usize;
                let left = total[which] - sent[which];
                if left == 0 && sent[0] == total[0] && sent[1] == total[1] {
                    IoMessage::new(BASE, Vec::new())
                        .encode(&mut wire, MAX_MESSAGE_LEN)
                        .map_err(|e| e.to_string())?;
                    IoMessage::new(BASE, vec![code])
                        .encode(&mut wire, MAX_MESSAGE_LEN)
                        .map_err(|e| e.to_string())?;
                    exit_sent = true;
                } else if left > 0 {
                    // Never a 1-byte stdout message: after an EOF it is
                    // the exit code; before one it is data, but the
                    // shim could not tell a late exit from it here.
                    let n = (1 + rng.below(MAX_IO_DATA as u64))
                        .min(left)
                        .max(if which == 0 { 2.min(left) } else { 1 });
                    let data = expected(which as u64, sent[which], n as usize);
                    IoMessage::new(BASE + which as u64, data)
                        .encode(&mut wire, MAX_MESSAGE_LEN)
                        .map_err(|e| e.to_string())?;
                    sent[which] += n;
                }
                if rng.chance(5) {
                    // Noise: the null session and a seq nobody has.
                    IoMessage::new(1, vec![9; 10])
                        .encode(&mut wire, MAX_MESSAGE_LEN)
                        .map_err(|e| e.to_string())?;
                    IoMessage::new(99, vec![9; 3])
                        .encode(&mut wire, MAX_MESSAGE_LEN)
                        .map_err(|e| e.to_string())?;
                }
            }
            // The proxy's io reader reads and routes (unless it waits for
            // room in the queue).
            0..=3 => {
                if let Some(item) = blocked.take() {
                    if let Err(item) = s.try_push(item) {
                        blocked = Some(item);
                    }
                    continue_checks(&s, bound)?;
                    continue;
                }
                let n = (1 + rng.below(64 * 1024) as usize).min(wire.len());
                rbuf.extend_from_slice(&wire.split_to(n));
                while blocked.is_none() {
                    let Some(m) = demux
                        .decode(&mut rbuf)
                        .map_err(|e| format!("step {step}: {e}"))?
                    else {
                        break;
                    };
                    match demux.route(m, |b| b == BASE) {
                        Routed::Deliver { item, .. } => match s.try_push(item) {
                            Ok(true) => {}
                            Ok(false) => {
                                return Err(format!("step {step}: the session refused output"))
                            }
                            Err(item) => blocked = Some(item),
                        },
                        Routed::Discard(_) => {}
                    }
                }
            }
            // The shim connects.
            4 if conn.is_none() => {
                // As ConnectShim does: the claim (and its replay) first,
                // then the writer takes the queue.
                s.shim_claims(resumes.then_some((recv[0], recv[1])));
                claimed = true;
                let Some(q) = s.take_queue() else {
                    return Err(format!("step {step}: the queue is held elsewhere"));
                };
                conn = Some(Conn {
                    q,
                    inflight: Inflight::default(),
                    batch: None,
                    socket: Vec::new(),
                    cap: 4096 + rng.below(256 * 1024) as usize,
                    unread: 0,
                    partial: BytesMut::new(),
                    decoder: FrameDecoder::new(Limits {
                        max_payload: 8 << 20,
                    }),
                });
            }
            // The writer writes.
            4..=6 => {
                let Some(c) = conn.as_mut() else { continue };
                if c.batch.is_none() {
                    let mut bytes = Vec::new();
                    let want = 1 + rng.below(256 * 1024) as usize;
                    while bytes.len() < want {
                        let Some(o) = c.q.try_next() else { break };
                        c.inflight.push(bytes.len(), o.clone());
                        if let Some((h, p)) = frame_of(&o) {
                            bytes.extend_from_slice(&h.to_bytes());
                            bytes.extend_from_slice(&p);
                        }
                    }
                    if bytes.is_empty() {
                        continue;
                    }
                    c.batch = Some((bytes, 0));
                }
                if let Some((b, progress)) = c.batch.as_mut() {
                    let room = c.cap.saturating_sub(c.socket.len());
                    let take = room
                        .min(b.len() - *progress)
                        .min(1 + rng.below(128 * 1024) as usize);
                    c.socket.extend_from_slice(&b[*progress..*progress + take]);
                    *progress += take;
                    if *progress == b.len() {
                        c.batch = None;
                        s.write_done(&mut c.inflight, &mut c.q, WriteOutcome::Done, 0);
                        c.unread = c.socket.len();
                    }
                }
            }
            // The shim reads.
            7 | 8 => {
                let Some(c) = conn.as_mut() else { continue };
                let n = (1 + rng.below(1 << 20) as usize).min(c.socket.len());
                c.partial.extend_from_slice(&c.socket[..n]);
                c.socket.drain(..n);
                while let Some(f) = c
                    .decoder
                    .decode(&mut c.partial)
                    .map_err(|e| format!("step {step}: the shim got a bad frame: {e}"))?
                {
                    match f.kind {
                        FrameKind::Stream(st @ (Stream::Stdout | Stream::Stderr)) => {
                            let i = usize::from(st == Stream::Stderr);
                            if exits > 0 {
                                return Err(format!(
                                    "step {step}: {} bytes of stream {i} after the exit code",
                                    f.payload.len()
                                ));
                            }
                            let at = place(i as u64, recv[i], &f.payload, resumes).ok_or_else(|| {
                                let really = place(i as u64, 0, &f.payload, false);
                                format!(
                                    "step {step}: stream {i}: {} bytes after {} are not the next ones (nor later ones){} (resuming: {resumes})",
                                    f.payload.len(),
                                    recv[i],
                                    match really {
                                        Some(p) => format!("; they are bytes {p}.. again"),
                                        None => String::new(),
                                    }
                                )
                            })?;
                            if at != recv[i] && resumes {
                                return Err(format!("step {step}: stream {i}: a resuming shim missed bytes {}..{at}", recv[i]));
                            }
                            recv[i] = at + f.payload.len() as u64;
                            stats.bytes += f.payload.len() as u64;
                        }
                        FrameKind::Notification(Notification::ProcessExited) => {
                            if f.payload[..] != [code] {
                                return Err(format!(
                                    "step {step}: exit code {:?}, sent {code}",
                                    f.payload
                                ));
                            }
                            exits += 1;
                            if exits > 1 {
                                return Err(format!("step {step}: the exit code came twice"));
                            }
                            if resumes && (recv[0] != total[0] || recv[1] != total[1]) {
                                return Err(format!(
                                    "step {step}: the exit came after {recv:?} of {total:?}"
                                ));
                            }
                        }
                        other => return Err(format!("step {step}: unexpected frame {other:?}")),
                    }
                }
            }
            // The shim dies: what its socket held and half a frame are gone.
            _ if !calm && rng.chance(40) => {
                let Some(mut c) = conn.take() else { continue };
                stats.deaths += 1;
                // What the dead connection held: unread in its socket, and
                // half a frame the shim had read. A shim that does not
                // resume may miss this much, no more.
                in_flight_at_deaths += (c.socket.len() + c.partial.len()) as u64;
                let progress = c.batch.take().map_or(0, |(_, p)| p);
                s.write_done(
                    &mut c.inflight,
                    &mut c.q,
                    WriteOutcome::Failed { progress },
                    c.unread,
                );
                s.return_queue(c.q);
            }
            _ => {}
        }
        continue_checks(&s, bound)?;
        let lost = s
            .bytes_maybe_lost
            .load(std::sync::atomic::Ordering::Relaxed);
        if !resumes {
            // What a non-resuming shim misses is bounded by what was counted.
            let gaps = gap_total(&recv, &stats);
            if gaps > lost + in_flight_at_deaths {
                return Err(format!("step {step}: the shim missed {gaps} bytes; {lost} were counted as maybe lost, {in_flight_at_deaths} were in dead connections"));
            }
        }
        if done
            && conn
                .as_ref()
                .is_some_and(|c| c.batch.is_none() && c.socket.is_empty() && c.partial.is_empty())
            && s.queued_bytes() == 0
            && (exits == 1 || !resumes)
        {
            let q_empty = conn.as_mut().is_some_and(|c| c.q.try_next().is_none());
            if q_empty && (exits == 1 || step > steps * 20) {
                break;
            }
        }
    }
    if resumes && (recv != total || exits != 1) {
        return Err(format!("ended with {recv:?} of {total:?}, {exits} exits"));
    }
    drop(conn);
    drop(s);
    if budget.available_permits() != budget_bytes {
        return Err(format!(
            "the budget holds {} of {budget_bytes} after the session went",
            budget.available_permits()
        ));
    }
    Ok(stats)
}

/// Bytes the shim skipped so far: received positions minus bytes received.
fn gap_total(recv: &[u64; 2], stats: &Stats) -> u64 {
    (recv[0] + recv[1]).saturating_sub(stats.bytes)
}

/// Where `data` sits in stream `s`, searching from `from` (a non-resuming
/// shim may have missed what a dead socket held): `None` if it is not the
/// stream's bytes at or after `from`.
fn place(s: u64, from: u64, data: &[u8], resumes: bool) -> Option<u64> {
    let probe = &data[..data.len().min(24)];
    let reach = if resumes { 0 } else { 2 << 20 };
    (from..=from + reach)
        .find(|p| {
            probe
                .iter()
                .enumerate()
                .all(|(i, b)| byte_at(s, p + i as u64) == *b)
        })
        .filter(|p| {
            data.iter()
                .enumerate()
                .all(|(i, b)| byte_at(s, p + i as u64) == *b)
        })
}

fn continue_checks(s: &Session, bound: usize) -> Result<(), String> {
    let cap = bound.max(MAX_MESSAGE_LEN);
    if s.queued_bytes() > cap {
        return Err(format!(
            "the queue holds {} bytes, above its bound {cap}",
            s.queued_bytes()
        ));
    }
    Ok(())
}
