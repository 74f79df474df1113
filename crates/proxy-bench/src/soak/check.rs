//! Self-describing streams and their checks.
//!
//! Every byte stream of a session (stdout, stderr, stdin) is made of 8-byte
//! little-endian words; word `i` encodes the session id, the stream and `i`
//! itself (XORed with a constant so that no word is zero). Senders write
//! whole words at word-aligned offsets, so whatever piece of the stream a
//! receiver gets, it can tell where in the stream the piece belongs and
//! whether every byte of it is right — without trusting frame boundaries.
//!
//! [`RecvCheck`] follows one received stream under "at most once, in
//! order" rules: each piece must continue the stream or, once after each
//! reconnect, skip ahead (bytes lost in a dead socket's buffer: counted);
//! a piece that goes back is a duplication, one that skips ahead without a
//! reconnect is a loss the rules do not allow, one whose bytes match no
//! offset is garbled: all three are failures.

use crate::hash::Xxh64;

const K: u64 = 0x5a5a_a5a5_0f0f_f0f0;
const IDX_BITS: u32 = 42;
const IDX_MASK: u64 = (1 << IDX_BITS) - 1;
const SID_MASK: u64 = (1 << 20) - 1;

/// Which stream of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Stdout = 0,
    Stderr = 1,
    Stdin = 2,
}

impl Which {
    pub fn name(self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
            Self::Stdin => "stdin",
        }
    }
}

/// Word `idx` of stream `which` of session `sid`.
pub fn word(sid: u32, which: Which, idx: u64) -> u64 {
    K ^ ((u64::from(sid) & SID_MASK) << (IDX_BITS + 2))
        ^ ((which as u64) << IDX_BITS)
        ^ (idx & IDX_MASK)
}

/// The word index a word claims, if it belongs to `sid`/`which`.
fn index_of(sid: u32, which: Which, w: u64) -> Option<u64> {
    let v = w ^ K;
    let ok = (v >> (IDX_BITS + 2)) == (u64::from(sid) & SID_MASK)
        && ((v >> IDX_BITS) & 3) == which as u64;
    ok.then_some(v & IDX_MASK)
}

/// `len` bytes of the stream from word-aligned offset `off`.
pub fn fill(sid: u32, which: Which, off: u64, len: usize) -> Vec<u8> {
    debug_assert_eq!(off % 8, 0);
    let mut v = Vec::with_capacity(len);
    let mut i = off / 8;
    while v.len() < len {
        let b = word(sid, which, i).to_le_bytes();
        let take = (len - v.len()).min(8);
        v.extend_from_slice(&b[..take]);
        i += 1;
    }
    v
}

/// Whether `p` is the stream's bytes at offset `off`.
fn matches_at(sid: u32, which: Which, off: u64, p: &[u8]) -> bool {
    let mut pos = off;
    let mut rest = p;
    // Leading partial word.
    let head = (8 - (pos % 8) as usize) % 8;
    if head > 0 {
        let b = word(sid, which, pos / 8).to_le_bytes();
        let start = (pos % 8) as usize;
        let n = head.min(rest.len());
        if rest[..n] != b[start..start + n] {
            return false;
        }
        rest = &rest[n..];
        pos += n as u64;
    }
    let mut chunks = rest.chunks_exact(8);
    let mut idx = pos / 8;
    for c in &mut chunks {
        let mut a = [0u8; 8];
        a.copy_from_slice(c);
        if u64::from_le_bytes(a) != word(sid, which, idx) {
            return false;
        }
        idx += 1;
    }
    let tail = chunks.remainder();
    tail.is_empty() || tail[..] == word(sid, which, idx).to_le_bytes()[..tail.len()]
}

/// One received stream, checked piece by piece.
#[derive(Debug, Clone)]
pub struct RecvCheck {
    sid: u32,
    which: Which,
    /// The offset the next piece should start at.
    pub next: u64,
    /// Bytes received, all of them hashed.
    pub hash: Xxh64,
    /// Bytes skipped over at reconnects (lost in a dead socket's buffer).
    pub lost: u64,
    /// Bytes received twice (a failure).
    pub duplicated: u64,
    /// A reconnect happened since the last gap: one gap is allowed.
    pub gap_allowed: bool,
    /// Gaps seen.
    pub gaps: u32,
    /// The first failure, if any.
    pub failure: Option<String>,
    /// A piece after a reconnect too short to tell where it sits (the
    /// rest of a message the dead connection's socket took the start of,
    /// a few bytes long): it is joined with the next piece, which follows
    /// it on the same connection.
    pending: Vec<u8>,
}

impl RecvCheck {
    pub fn new(sid: u32, which: Which) -> Self {
        Self {
            sid,
            which,
            next: 0,
            hash: Xxh64::new(0),
            lost: 0,
            duplicated: 0,
            gap_allowed: false,
            gaps: 0,
            failure: None,
            pending: Vec::new(),
        }
    }

    fn fail(&mut self, msg: String) {
        if self.failure.is_none() {
            self.failure = Some(format!("session {} {}: {msg}", self.sid, self.which.name()));
        }
    }

    /// A piece of the stream arrived.
    pub fn feed(&mut self, p: &[u8]) {
        if p.is_empty() {
            return;
        }
        self.hash.update(p);
        let joined;
        let p = if self.pending.is_empty() {
            p
        } else {
            joined = [std::mem::take(&mut self.pending).as_slice(), p].concat();
            &joined[..]
        };
        if matches_at(self.sid, self.which, self.next, p) {
            self.next += p.len() as u64;
            return;
        }
        match self.locate(p) {
            Some(s) if s > self.next => {
                if self.gap_allowed {
                    self.lost += s - self.next;
                    self.gaps += 1;
                    self.gap_allowed = false;
                } else {
                    self.fail(format!(
                        "{} bytes missing at offset {} without a reconnect",
                        s - self.next,
                        self.next
                    ));
                }
                self.next = s + p.len() as u64;
            }
            Some(s) => {
                let end = s + p.len() as u64;
                let dup = end.min(self.next) - s;
                self.duplicated += dup;
                self.fail(format!(
                    "{dup} bytes at offset {s} received again (the stream was at {})",
                    self.next
                ));
                self.next = self.next.max(end);
            }
            None if self.gap_allowed && p.len() < 64 => self.pending = p.to_vec(),
            None => self.fail(format!(
                "a {}-byte piece after offset {} matches no offset of the stream",
                p.len(),
                self.next
            )),
        }
    }

    /// The stream ended after `total` bytes were sent: a short piece still
    /// waiting to be placed is looked for between where the stream was and
    /// its end (it is the stream's last bytes, after a gap).
    pub fn finish(&mut self, total: u64) {
        if self.pending.is_empty() {
            return;
        }
        let p = std::mem::take(&mut self.pending);
        let len = p.len() as u64;
        let found = (self.next..=total.saturating_sub(len))
            .rev()
            .find(|&s| matches_at(self.sid, self.which, s, &p));
        match found {
            Some(s) => {
                self.lost += s - self.next;
                self.gaps += 1;
                self.gap_allowed = false;
                self.next = s + len;
            }
            None => self.fail(format!(
                "a {len}-byte piece after offset {} matches no offset of the stream",
                self.next
            )),
        }
    }

    /// Where `p` sits in the stream, from any whole word in it.
    fn locate(&self, p: &[u8]) -> Option<u64> {
        for k in 0..8usize.min(p.len().saturating_sub(7)) {
            let mut a = [0u8; 8];
            a.copy_from_slice(&p[k..k + 8]);
            let Some(idx) = index_of(self.sid, self.which, u64::from_le_bytes(a)) else {
                continue;
            };
            let Some(s) = (idx * 8).checked_sub(k as u64) else {
                continue;
            };
            if matches_at(self.sid, self.which, s, p) {
                return Some(s);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_pieces_of_any_size_pass() {
        let data = fill(7, Which::Stdout, 0, 1000);
        let mut c = RecvCheck::new(7, Which::Stdout);
        for p in data.chunks(13) {
            c.feed(p);
        }
        assert_eq!(c.next, 1000);
        assert!(c.failure.is_none());
        let mut h = Xxh64::new(0);
        h.update(&data);
        assert_eq!(c.hash.finish(), h.finish());
    }

    #[test]
    fn a_short_piece_after_a_reconnect_is_placed_by_what_follows_it() {
        let data = fill(7, Which::Stdout, 0, 800);
        let mut c = RecvCheck::new(7, Which::Stdout);
        c.feed(&data[..80]);
        c.gap_allowed = true;
        // The last 4 bytes of a message, then the next message.
        c.feed(&data[204..208]);
        c.feed(&data[208..400]);
        assert_eq!((c.next, c.lost, c.gaps), (400, 124, 1));
        assert!(c.failure.is_none(), "{:?}", c.failure);
        // A short piece at the very end is placed by finish().
        c.gap_allowed = true;
        c.feed(&data[797..800]);
        c.finish(800);
        assert_eq!((c.next, c.lost, c.gaps), (800, 124 + 397, 2));
        assert!(c.failure.is_none(), "{:?}", c.failure);
        // Without a reconnect a short stray piece is still a failure.
        let mut d = RecvCheck::new(7, Which::Stdout);
        d.feed(&data[..80]);
        d.feed(&data[204..208]);
        assert!(d.failure.is_some());
    }

    #[test]
    fn a_gap_needs_a_reconnect_and_a_repeat_is_a_failure() {
        let data = fill(7, Which::Stdout, 0, 800);
        let mut c = RecvCheck::new(7, Which::Stdout);
        c.feed(&data[..80]);
        c.gap_allowed = true;
        c.feed(&data[160..240]);
        assert_eq!((c.lost, c.gaps, c.failure.is_none()), (80, 1, true));
        c.feed(&data[320..400]);
        assert!(c
            .failure
            .as_deref()
            .unwrap()
            .contains("without a reconnect"));

        let mut d = RecvCheck::new(7, Which::Stdout);
        d.feed(&data[..80]);
        d.feed(&data[40..120]);
        assert_eq!(d.duplicated, 40);
        assert!(d.failure.as_deref().unwrap().contains("again"));
    }

    #[test]
    fn another_streams_bytes_are_garbled() {
        let mut c = RecvCheck::new(7, Which::Stdout);
        c.feed(&fill(7, Which::Stderr, 0, 64));
        assert!(c.failure.is_some());
        let mut d = RecvCheck::new(7, Which::Stdout);
        d.feed(&fill(8, Which::Stdout, 0, 64));
        assert!(d.failure.is_some());
    }
}
