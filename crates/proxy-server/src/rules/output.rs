//! A shim writer's rules, sans IO: when a batch of output is written
//! ([`Gather`], the writer's half of the corking policy) and what a failed
//! write leaves ([`Inflight::settle`]). The writer in [`crate::conn`] owns
//! the socket and the waits.

use bytes::Bytes;
use proxy_proto::{Frame, FrameKind, Header, Stream};

use crate::session::Output;

/// The frame an output item goes to its shim as: its header and payload
/// (a replayed item as what it was).
pub fn frame_of(o: &Output) -> Option<(Header, Bytes)> {
    match o.live() {
        Output::Stdout(b) => Some((
            Header::new(FrameKind::Stream(Stream::Stdout), b.len() as u32),
            b.clone(),
        )),
        Output::Stderr(b) => Some((
            Header::new(FrameKind::Stream(Stream::Stderr), b.len() as u32),
            b.clone(),
        )),
        Output::Exited(code) => {
            let f = Frame::process_exited(*code);
            Some((f.header(), f.payload))
        }
        Output::Replayed(_) => None,
    }
}

/// A batch of output at least this large is written without waiting for
/// more.
pub const SMALL_BATCH: usize = 64 * 1024;

/// A small batch waits at most this many turns of the scheduler (while
/// each brings more) before it is written or corked.
pub const MAX_YIELDS: u32 = 3;

/// Every output frame's header: the standard 12 bytes.
pub const FRAME_HEADER_LEN: usize = 12;

/// The batch a writer holds, as [`Gather`] judges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// Bytes in the batch.
    pub len: usize,
    /// It holds session output.
    pub output: bool,
    /// It holds a frame other than output (a response): no waiting.
    pub urgent: bool,
    /// The connection closes or drains: no waiting.
    pub closing: bool,
    /// The agent streams (the io reader's [`Streaming`] state, through
    /// [`crate::session::IoFlow`]).
    ///
    /// [`Streaming`]: crate::rules::demux::Streaming
    pub streaming: bool,
}

/// What the writer does next with its batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Step {
    /// Write it.
    Write,
    /// Let the scheduler run once (the io reader may be about to queue
    /// more for this session), gather what came, and ask again.
    Yield,
    /// Wait for the io reader's next read (or a message from the
    /// connection's reader), gather what came, and ask again.
    WaitNextRead,
}

/// Where a batch's gathering is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Gathering without waiting for a read.
    Gathering,
    /// It waited for a read: the next that brings nothing ends it.
    Corked,
}

/// The writer's half of the corking policy, one per batch: a small batch
/// of output waits a turn of the scheduler (up to [`MAX_YIELDS`], while
/// each brings more): the io reader may be about to queue more for this
/// session (many busy sessions on one VM), and one write of several
/// messages costs far less than one write each. A lone interactive session
/// stops after one turn that brought nothing. While the agent streams, a
/// small batch also waits for the io reader's next read, as long as each
/// read brings more for this session.
#[derive(Debug, Clone)]
pub struct Gather {
    yields: u32,
    /// The batch's length when last asked.
    before: usize,
    phase: Phase,
}

impl Default for Gather {
    fn default() -> Self {
        Self::new()
    }
}

impl Gather {
    /// A batch starts gathering (from empty).
    pub fn new() -> Self {
        Self {
            yields: 0,
            before: 0,
            phase: Phase::Gathering,
        }
    }

    /// The writer gathered what came without waiting; the batch is `held`.
    pub fn step(&mut self, held: Held) -> Step {
        let grew = held.len > self.before;
        self.before = held.len;
        let small = !held.closing && !held.urgent && held.output && held.len < SMALL_BATCH;
        if !small || (self.phase == Phase::Corked && !grew) {
            return Step::Write;
        }
        if grew && self.yields < MAX_YIELDS {
            self.yields += 1;
            return Step::Yield;
        }
        if !held.streaming {
            return Step::Write;
        }
        self.phase = Phase::Corked;
        Step::WaitNextRead
    }
}

/// The output items of a batch, with where each starts in it.
#[derive(Debug, Default)]
pub struct Inflight {
    /// (offset of its frame in the batch, the item).
    pub items: Vec<(usize, Output)>,
}

/// What a failed write of a batch leaves.
#[derive(Debug, Default)]
pub struct Settled {
    /// The items the kernel took (all of, or the first bytes of), with how
    /// many payload bytes, for the replay window.
    pub handed: Vec<(Output, usize)>,
    /// Budget of the bytes the kernel took.
    pub handed_cost: usize,
    /// Payload bytes the kernel took.
    pub handed_bytes: usize,
    /// What did not reach the kernel, in order: whole items, and the rest
    /// of one the kernel took a part of.
    pub back: Vec<Output>,
}

impl Inflight {
    /// `o`'s frame was put in the batch at byte `at`.
    pub fn push(&mut self, at: usize, o: Output) {
        self.items.push((at, o));
    }

    /// No output in the batch.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The batch was written.
    pub fn clear(&mut self) {
        self.items.clear();
    }

    /// The budget the items hold.
    pub fn cost(&self) -> usize {
        self.items.iter().map(|(_, o)| o.cost() as usize).sum()
    }

    /// The kernel took the batch's first `progress` bytes, then the write
    /// failed. A byte the kernel took is never sent again: what was handed
    /// over went to this shim (or is lost with its socket); only the rest
    /// goes back.
    pub fn settle(&mut self, progress: usize) -> Settled {
        let mut out = Settled::default();
        for (start, o) in self.items.drain(..) {
            let payload_at = start.saturating_add(FRAME_HEADER_LEN);
            let (len, data) = match o.live() {
                Output::Stdout(b) | Output::Stderr(b) => (b.len(), Some(b.clone())),
                _ => (1, None),
            };
            if progress >= payload_at.saturating_add(len) {
                out.handed_cost += o.cost() as usize;
                out.handed_bytes += len;
                out.handed.push((o, len));
            } else if progress <= payload_at {
                out.back.push(o);
            } else if let Some(b) = data {
                let took = progress - payload_at;
                let rest = b.slice(took..);
                let rest = match o.live() {
                    Output::Stderr(_) => Output::Stderr(rest),
                    _ => Output::Stdout(rest),
                };
                let rest = match &o {
                    Output::Replayed(_) => Output::Replayed(Box::new(rest)),
                    _ => rest,
                };
                out.handed_cost += o.cost().saturating_sub(rest.cost()) as usize;
                out.handed_bytes += took;
                out.handed.push((o, took));
                out.back.push(rest);
            } else {
                out.back.push(o);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn stdout(n: usize, byte: u8) -> Output {
        Output::Stdout(Bytes::from(vec![byte; n]))
    }

    fn lens(v: &[Output]) -> Vec<usize> {
        v.iter()
            .map(|o| match o.live() {
                Output::Stdout(b) | Output::Stderr(b) => b.len(),
                _ => 1,
            })
            .collect()
    }

    #[test]
    fn regression_what_the_kernel_took_is_never_put_back() {
        // Three messages of 100 bytes (112 with their headers) and the exit.
        let fill = |inflight: &mut Inflight| {
            for i in 0..3 {
                inflight.push(112 * i, stdout(100, i as u8));
            }
            inflight.push(3 * 112, Output::Exited(3));
        };
        let mut f = Inflight::default();
        fill(&mut f);
        // Nothing taken: everything goes back.
        let s = f.settle(0);
        assert_eq!((s.handed_bytes, lens(&s.back)), (0, vec![100, 100, 100, 1]));
        // The first message and half of the second taken.
        fill(&mut f);
        let s = f.settle(112 + 12 + 50);
        // The first item's cost is handed whole; the second keeps its
        // item cost with what goes back.
        let item = crate::session::ITEM_COST as usize;
        assert_eq!((s.handed_bytes, s.handed_cost), (150, 150 + item));
        assert_eq!(lens(&s.back), vec![50, 100, 1]);
        match &s.back[0] {
            Output::Stdout(b) => assert!(b.iter().all(|&x| x == 1)),
            o => panic!("{o:?}"),
        }
        // Only part of the second header: its payload goes back whole.
        fill(&mut f);
        let s = f.settle(112 + 5);
        assert_eq!(lens(&s.back), vec![100, 100, 1]);
        // All but the exit's code byte.
        fill(&mut f);
        let s = f.settle(3 * 112 + 12);
        assert_eq!((s.handed_bytes, lens(&s.back)), (300, vec![1]));
        // All of it.
        fill(&mut f);
        let s = f.settle(3 * 112 + 13);
        assert!(s.back.is_empty());
        assert_eq!(s.handed_cost, 300 + 4 * item);
    }

    #[test]
    fn a_replayed_item_cut_short_goes_back_replayed() {
        let mut f = Inflight::default();
        f.push(0, Output::Replayed(Box::new(stdout(100, 1))));
        let s = f.settle(12 + 40);
        assert_eq!((s.handed_bytes, s.handed_cost), (40, 0));
        assert!(matches!(&s.back[..], [Output::Replayed(o)] if lens(&[(**o).clone()]) == [60]));
    }

    fn held(len: usize) -> Held {
        Held {
            len,
            output: true,
            urgent: false,
            closing: false,
            streaming: false,
        }
    }

    #[test]
    fn a_large_batch_an_urgent_one_or_a_closing_one_is_written_at_once() {
        assert_eq!(Gather::new().step(held(SMALL_BATCH)), Step::Write);
        let urgent = Held {
            urgent: true,
            ..held(10)
        };
        assert_eq!(Gather::new().step(urgent), Step::Write);
        let closing = Held {
            closing: true,
            streaming: true,
            ..held(10)
        };
        assert_eq!(Gather::new().step(closing), Step::Write);
        let frames_only = Held {
            output: false,
            ..held(10)
        };
        assert_eq!(Gather::new().step(frames_only), Step::Write);
    }

    #[test]
    fn a_small_batch_yields_while_it_grows_up_to_three_times() {
        let mut g = Gather::new();
        assert_eq!(g.step(held(10)), Step::Yield);
        assert_eq!(g.step(held(20)), Step::Yield);
        assert_eq!(g.step(held(30)), Step::Yield);
        assert_eq!(g.step(held(40)), Step::Write, "three yields: not streaming");
        // A lone interactive session: one turn that brought nothing.
        let mut g = Gather::new();
        assert_eq!(g.step(held(10)), Step::Yield);
        assert_eq!(g.step(held(10)), Step::Write);
    }

    #[test]
    fn while_streaming_a_small_batch_waits_for_reads_that_bring_more() {
        let s = |len| Held {
            streaming: true,
            ..held(len)
        };
        let mut g = Gather::new();
        assert_eq!(g.step(s(10)), Step::Yield);
        assert_eq!(g.step(s(10)), Step::WaitNextRead, "nothing came: cork");
        assert_eq!(g.step(s(50)), Step::Yield, "the read brought more");
        assert_eq!(g.step(s(60)), Step::Yield);
        assert_eq!(g.step(s(70)), Step::WaitNextRead, "yields spent");
        assert_eq!(g.step(s(80)), Step::WaitNextRead, "the read brought more");
        assert_eq!(g.step(s(80)), Step::Write, "a read that brought nothing");
        let mut g = Gather::new();
        assert_eq!(g.step(s(10)), Step::Yield);
        assert_eq!(g.step(s(10)), Step::WaitNextRead);
        assert_eq!(g.step(s(SMALL_BATCH)), Step::Write, "large now");
        // Streaming stopped while corked: the wake-up brings nothing.
        let mut g = Gather::new();
        assert_eq!(g.step(s(10)), Step::Yield);
        assert_eq!(g.step(s(10)), Step::WaitNextRead);
        assert_eq!(g.step(held(10)), Step::Write);
    }
}
