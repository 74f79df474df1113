//! The bench's hot paths: a receive buffer that reads in large chunks and
//! parses frames in place, pre-built cycles of framed messages written
//! without copying, and the sinks that hash what arrives.
//!
//! Nothing here allocates or logs per message.

use std::io::{self, IoSlice, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use proxy_proto::hyper::io::IO_HEADER_LEN;
use proxy_proto::hyper::MAX_MESSAGE_LEN;
use proxy_proto::{peek_frame, FrameKind, Header, Limits, Notification, Stream, HEADER_LEN};

use crate::hash::{Digest, Xxh64};

/// Receive buffer of the readers whose speed matters.
pub const BIG_BUF: usize = 512 << 10;

/// Largest write handed to the kernel at once.
const WRITE_CHUNK: usize = 1 << 20;

/// Bytes read from a socket and not yet parsed: `buf[start..end]`.
#[derive(Debug)]
pub struct RecvBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl RecvBuf {
    /// A buffer of `cap` bytes (allocated once).
    pub fn new(cap: usize) -> Self {
        Self {
            buf: vec![0; cap],
            start: 0,
            end: 0,
        }
    }

    /// The unparsed bytes.
    #[inline]
    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Drop `n` parsed bytes from the front.
    #[inline]
    pub fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start >= self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Room to read into, keeping reads large: a partial frame at the end
    /// of the buffer is moved to the front first (it is at most one frame).
    pub fn spare(&mut self) -> Result<&mut [u8], String> {
        let min_room = (self.buf.len() / 4).min(64 << 10);
        if self.buf.len() - self.end < min_room && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            return Err(format!(
                "a frame larger than the {}-byte receive buffer",
                self.buf.len()
            ));
        }
        Ok(&mut self.buf[self.end..])
    }

    /// `n` bytes were read into [`spare`](Self::spare).
    #[inline]
    pub fn filled(&mut self, n: usize) {
        self.end += n;
    }

    /// One `read` from `r`; `Ok(0)` at EOF.
    pub fn read_from<R: Read>(&mut self, r: &mut R) -> Result<usize, String> {
        self.spare()?;
        self.read_into(r, self.buf.len())
    }

    /// One `read` of at most `max` bytes from `r`, the unparsed bytes moved
    /// to the front first, so that the read has all of `max` when the
    /// buffer holds that much beyond them; `Ok(0)` at EOF.
    pub fn read_front<R: Read>(&mut self, r: &mut R, max: usize) -> Result<usize, String> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        self.read_into(r, max)
    }

    fn read_into<R: Read>(&mut self, r: &mut R, max: usize) -> Result<usize, String> {
        let end = self.end.saturating_add(max).min(self.buf.len());
        if end == self.end {
            return Err(format!(
                "a frame larger than the {}-byte receive buffer",
                self.buf.len()
            ));
        }
        loop {
            match r.read(&mut self.buf[self.end..end]) {
                Ok(n) => {
                    self.filled(n);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => return Err("timed out waiting to read".into()),
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// The next whole proxy frame in `rb` (as [`proxy_frame`] gives it),
/// reading from `r` as needed; `None` at EOF between frames.
pub fn next_frame<R: Read>(
    rb: &mut RecvBuf,
    r: &mut R,
) -> Result<Option<(FrameKind, usize, usize)>, String> {
    loop {
        if let Some(f) = proxy_frame(rb.data())? {
            return Ok(Some(f));
        }
        if rb.read_from(r)? == 0 {
            return if rb.data().is_empty() {
                Ok(None)
            } else {
                Err("closed mid-frame".into())
            };
        }
    }
}

/// A whole proxy frame at the front of `b`: its kind, the offset of its
/// payload and its total length; `None` if more bytes are needed.
#[inline]
pub fn proxy_frame(b: &[u8]) -> Result<Option<(FrameKind, usize, usize)>, String> {
    match peek_frame(b, &Limits::default()) {
        Ok(Some((h, total))) => Ok(Some((h.kind, h.header_len, total))),
        Ok(None) => Ok(None),
        Err(e) => Err(format!("malformed proxy frame: {e}")),
    }
}

/// A whole hyperstart io message at the front of `b`: its seq and total
/// length (data starts at 12); `None` if more bytes are needed.
#[inline]
pub fn io_message(b: &[u8]) -> Result<Option<(u64, usize)>, String> {
    let Some(h) = b.get(..IO_HEADER_LEN) else {
        return Ok(None);
    };
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&h[..8]);
    let len = u32::from_be_bytes([h[8], h[9], h[10], h[11]]) as usize;
    if !(IO_HEADER_LEN..=MAX_MESSAGE_LEN).contains(&len) {
        return Err(format!(
            "malformed io message: length {len} outside 12..={MAX_MESSAGE_LEN}"
        ));
    }
    if b.len() < len {
        return Ok(None);
    }
    Ok(Some((u64::from_be_bytes(seq), len)))
}

/// The 12 bytes of an io message header.
pub fn io_header(seq: u64, data_len: usize) -> [u8; IO_HEADER_LEN] {
    let mut h = [0u8; IO_HEADER_LEN];
    h[..8].copy_from_slice(&seq.to_be_bytes());
    // Bounded by the callers: data_len ≤ MAX_IO_DATA.
    h[8..].copy_from_slice(&((data_len + IO_HEADER_LEN) as u32).to_be_bytes());
    h
}

/// The 12 bytes of a proxy stream frame header.
pub fn stream_header(stream: Stream, data_len: usize) -> [u8; HEADER_LEN] {
    Header::new(FrameKind::Stream(stream), data_len as u32).to_bytes()
}

/// The io messages a process's exit puts on the wire: EOF (zero-length)
/// then the one-byte exit code.
pub fn io_exit(seq: u64, code: u8) -> Vec<u8> {
    let mut v = io_header(seq, 0).to_vec();
    v.extend_from_slice(&io_header(seq, 1));
    v.push(code);
    v
}

// ----- data -----

/// Deterministic pseudo-random bytes that streams are cut from: stream `i`
/// of a cycle starts at its own offset, so misrouted bytes change hashes.
#[derive(Debug)]
pub struct Pattern {
    bytes: Vec<u8>,
    period: usize,
}

impl Pattern {
    /// A pattern of a little more than 1 MiB (an odd period, so message
    /// boundaries wander over it).
    pub fn new() -> Self {
        let period = (1 << 20) + 4099;
        let mut bytes = Vec::with_capacity(period + MAX_MESSAGE_LEN);
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        while bytes.len() < period {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            bytes.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        bytes.truncate(period);
        bytes.extend_from_within(..MAX_MESSAGE_LEN);
        Self { bytes, period }
    }

    /// `len` (≤ 10240) bytes from `off` (taken modulo the period).
    #[inline]
    pub fn slice(&self, off: usize, len: usize) -> &[u8] {
        let off = off % self.period;
        &self.bytes[off..off + len]
    }
}

/// Which header a cycle's messages carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// hyperstart io messages (the agent's output, or direct baselines).
    Io,
    /// Proxy stdin stream frames (a shim's input).
    Stdin,
}

/// One cycle of framed messages, built once and written as often as
/// needed: every message has the same size; message `k` of the cycle
/// belongs to stream `k % streams`.
#[derive(Debug)]
pub struct Cycle {
    bytes: Vec<u8>,
    frame_len: usize,
    data_len: usize,
    /// Per message of the cycle: (stream index, pattern offset).
    msgs: Vec<(usize, usize)>,
}

impl Cycle {
    /// Round-robin messages of `data_len` bytes for each of `seqs` (for
    /// [`Framing::Stdin`] the seq is unused), at least `min_bytes` in all.
    pub fn new(
        pattern: &Pattern,
        framing: Framing,
        seqs: &[u64],
        data_len: usize,
        min_bytes: usize,
    ) -> Self {
        let frame_len = data_len + 12;
        let round = frame_len * seqs.len();
        let rounds = min_bytes.div_ceil(round).max(1);
        let mut bytes = Vec::with_capacity(rounds * round);
        let mut msgs = Vec::with_capacity(rounds * seqs.len());
        for r in 0..rounds {
            for (i, &seq) in seqs.iter().enumerate() {
                let off = i * 7919 * 131 + r * data_len;
                match framing {
                    Framing::Io => bytes.extend_from_slice(&io_header(seq, data_len)),
                    Framing::Stdin => {
                        bytes.extend_from_slice(&stream_header(Stream::Stdin, data_len))
                    }
                }
                bytes.extend_from_slice(pattern.slice(off, data_len));
                msgs.push((i, off));
            }
        }
        Self {
            bytes,
            frame_len,
            data_len,
            msgs,
        }
    }

    /// What each stream receives when `n_msgs` messages are written.
    pub fn expected(&self, pattern: &Pattern, streams: usize, n_msgs: u64) -> Vec<Digest> {
        let mut h = vec![Xxh64::new(0); streams];
        let k = self.msgs.len() as u64;
        for m in 0..n_msgs {
            let (i, off) = self.msgs[(m % k) as usize];
            h[i].update(pattern.slice(off, self.data_len));
        }
        h.iter().map(Xxh64::finish).collect()
    }

    /// Message `m` (cycling): its stream's index and its data.
    pub fn message(&self, m: u64) -> (usize, &[u8]) {
        let k = (m % self.msgs.len() as u64) as usize;
        let at = k * self.frame_len + (self.frame_len - self.data_len);
        (self.msgs[k].0, &self.bytes[at..at + self.data_len])
    }

    /// Write `n_msgs` messages (cycling), then `tail`.
    pub fn write<W: Write>(&self, w: &mut W, n_msgs: u64, tail: &[u8]) -> Result<(), String> {
        let mut left = n_msgs * self.frame_len as u64;
        let mut pos = 0usize;
        while left > 0 {
            let n = (self.bytes.len() - pos).min(WRITE_CHUNK);
            let n = n.min(usize::try_from(left).unwrap_or(usize::MAX));
            write_all(w, &self.bytes[pos..pos + n])?;
            left -= n as u64;
            pos += n;
            if pos == self.bytes.len() {
                pos = 0;
            }
        }
        write_all(w, tail)
    }
}

/// `write_all` with a message that says what went wrong.
pub fn write_all<W: Write>(w: &mut W, b: &[u8]) -> Result<(), String> {
    w.write_all(b).map_err(|e| {
        if is_timeout(&e) {
            "timed out writing (the peer stopped reading)".to_string()
        } else {
            format!("write: {e}")
        }
    })
}

/// All of `iov` in one `writev`, or more if the kernel takes less (or the
/// slices are more than it takes at once).
pub fn writev_all(s: &UnixStream, mut iov: &mut [IoSlice<'_>]) -> Result<(), String> {
    while !iov.is_empty() {
        match (&*s).write_vectored(iov) {
            Ok(0) => return Err("writev: the socket took nothing".into()),
            Ok(n) => IoSlice::advance_slices(&mut iov, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => {
                return Err("timed out writing (the peer stopped reading)".into())
            }
            Err(e) => return Err(format!("writev: {e}")),
        }
    }
    Ok(())
}

// ----- sinks -----

/// Something that consumes whole frames from a [`RecvBuf`].
pub trait Sink {
    /// Consume what is buffered; `Ok(true)` when the stream is complete.
    fn consume(&mut self, rb: &mut RecvBuf) -> Result<bool, String>;
    /// Where the stream stands, for error messages.
    fn progress(&self) -> String;
}

/// Read from `r` into `rb` until `sink` is complete.
pub fn drain<R: Read, S: Sink>(r: &mut R, rb: &mut RecvBuf, sink: &mut S) -> Result<(), String> {
    loop {
        if sink.consume(rb)? {
            return Ok(());
        }
        let n = rb
            .read_from(r)
            .map_err(|e| format!("{e} ({})", sink.progress()))?;
        if n == 0 {
            return Err(format!("connection closed ({})", sink.progress()));
        }
    }
}

/// How a proxy-framed stream ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyEnd {
    /// A ProcessExited notification (a shim's output).
    Exit,
    /// A zero-length frame of the data stream (stdin's EOF).
    EmptyFrame,
}

/// Counts and hashes the payloads of proxy stream frames of one kind.
#[derive(Debug)]
pub struct ProxySink {
    stream: Stream,
    end: ProxyEnd,
    want: u64,
    hash: Xxh64,
    /// When the last wanted byte arrived.
    pub done_at: Option<Instant>,
    /// The exit code, with [`ProxyEnd::Exit`].
    pub exit: Option<u8>,
}

impl ProxySink {
    /// Expect `want` bytes of `stream`, then `end`.
    pub fn new(stream: Stream, want: u64, end: ProxyEnd) -> Self {
        Self {
            stream,
            end,
            want,
            hash: Xxh64::new(0),
            done_at: (want == 0).then(Instant::now),
            exit: None,
        }
    }

    /// What arrived.
    pub fn digest(&self) -> Digest {
        self.hash.finish()
    }
}

impl Sink for ProxySink {
    #[inline]
    fn consume(&mut self, rb: &mut RecvBuf) -> Result<bool, String> {
        loop {
            let Some((kind, at, total)) = proxy_frame(rb.data())? else {
                return Ok(false);
            };
            let payload = &rb.data()[at..total];
            let mut finished = false;
            match kind {
                FrameKind::Stream(s) if s == self.stream && !payload.is_empty() => {
                    let got = self.hash.len() + payload.len() as u64;
                    if got > self.want {
                        return Err(format!(
                            "{} bytes of {} arrived where {} were sent",
                            got,
                            s.name(),
                            self.want
                        ));
                    }
                    self.hash.update(payload);
                    if got == self.want {
                        self.done_at = Some(Instant::now());
                    }
                }
                FrameKind::Stream(s) if s == self.stream => {
                    if self.end == ProxyEnd::EmptyFrame {
                        finished = true;
                    }
                }
                FrameKind::Notification(Notification::ProcessExited)
                    if self.end == ProxyEnd::Exit =>
                {
                    let &[code] = payload else {
                        return Err(format!(
                            "ProcessExited with a {}-byte payload",
                            payload.len()
                        ));
                    };
                    self.exit = Some(code);
                    finished = true;
                }
                other => {
                    return Err(format!(
                        "unexpected {other:?} frame ({} bytes) ({})",
                        payload.len(),
                        self.progress()
                    ))
                }
            }
            rb.consume(total);
            if finished {
                if self.hash.len() != self.want {
                    return Err(format!("the stream ended early ({})", self.progress()));
                }
                return Ok(true);
            }
        }
    }

    fn progress(&self) -> String {
        format!(
            "{} of {} bytes of {}",
            self.hash.len(),
            self.want,
            self.stream.name()
        )
    }
}

/// How an io stream ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoEnd {
    /// A zero-length message (stdin's EOF as the agent sees it).
    Eof,
    /// A zero-length message, then a one-byte exit code (what the agent
    /// writes when a process exits).
    EofExit,
}

/// Counts and hashes io messages of one seq.
#[derive(Debug)]
pub struct IoSink {
    seq: u64,
    end: IoEnd,
    want: u64,
    hash: Xxh64,
    eof: bool,
    /// When the last wanted byte arrived.
    pub done_at: Option<Instant>,
    /// The exit code, with [`IoEnd::EofExit`].
    pub exit: Option<u8>,
}

impl IoSink {
    /// Expect `want` bytes on `seq`, then `end`.
    pub fn new(seq: u64, want: u64, end: IoEnd) -> Self {
        Self {
            seq,
            end,
            want,
            hash: Xxh64::new(0),
            eof: false,
            done_at: (want == 0).then(Instant::now),
            exit: None,
        }
    }

    /// What arrived.
    pub fn digest(&self) -> Digest {
        self.hash.finish()
    }
}

impl Sink for IoSink {
    #[inline]
    fn consume(&mut self, rb: &mut RecvBuf) -> Result<bool, String> {
        loop {
            let Some((seq, total)) = io_message(rb.data())? else {
                return Ok(false);
            };
            if seq != self.seq {
                return Err(format!(
                    "an io message for seq {seq} where only {} was used ({})",
                    self.seq,
                    self.progress()
                ));
            }
            let data = &rb.data()[IO_HEADER_LEN..total];
            let mut finished = false;
            if self.eof {
                let &[code] = data else {
                    return Err(format!(
                        "a {}-byte io message after EOF, not an exit code",
                        data.len()
                    ));
                };
                self.exit = Some(code);
                finished = true;
            } else if data.is_empty() {
                if self.hash.len() != self.want {
                    return Err(format!("EOF came early ({})", self.progress()));
                }
                self.eof = true;
                finished = self.end == IoEnd::Eof;
            } else {
                let got = self.hash.len() + data.len() as u64;
                if got > self.want {
                    return Err(format!(
                        "{got} bytes arrived on seq {} where {} were sent",
                        self.seq, self.want
                    ));
                }
                self.hash.update(data);
                if got == self.want {
                    self.done_at = Some(Instant::now());
                }
            }
            rb.consume(total);
            if finished {
                return Ok(true);
            }
        }
    }

    fn progress(&self) -> String {
        format!(
            "{} of {} bytes on io seq {}",
            self.hash.len(),
            self.want,
            self.seq
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_cycle_written_through_a_socket_hashes_as_expected() {
        let p = Pattern::new();
        for (framing, size) in [
            (Framing::Io, 512),
            (Framing::Io, 10228),
            (Framing::Stdin, 4096),
        ] {
            let c = Cycle::new(&p, framing, &[5], size, 100_000);
            let n = 1000u64;
            let want = c.expected(&p, 1, n)[0];
            assert_eq!(want.len, n * size as u64);
            let (mut a, mut b) = UnixStream::pair().unwrap();
            let tail = match framing {
                Framing::Io => io_exit(5, 9),
                Framing::Stdin => stream_header(Stream::Stdin, 0).to_vec(),
            };
            let t = std::thread::spawn(move || c.write(&mut a, n, &tail));
            let mut rb = RecvBuf::new(64 << 10);
            match framing {
                Framing::Io => {
                    let mut s = IoSink::new(5, want.len, IoEnd::EofExit);
                    drain(&mut b, &mut rb, &mut s).unwrap();
                    assert_eq!(s.digest(), want);
                    assert_eq!(s.exit, Some(9));
                }
                Framing::Stdin => {
                    let mut s = ProxySink::new(Stream::Stdin, want.len, ProxyEnd::EmptyFrame);
                    drain(&mut b, &mut rb, &mut s).unwrap();
                    assert_eq!(s.digest(), want);
                }
            }
            t.join().unwrap().unwrap();
        }
    }

    #[test]
    fn streams_of_a_cycle_differ_and_a_wrong_seq_fails() {
        let p = Pattern::new();
        let c = Cycle::new(&p, Framing::Io, &[3, 5], 4096, 50_000);
        let d = c.expected(&p, 2, 100);
        assert_eq!(d[0].len, d[1].len);
        assert_ne!(d[0].hash, d[1].hash);
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || c.write(&mut a, 100, &[]));
        let mut rb = RecvBuf::new(64 << 10);
        let mut s = IoSink::new(3, d[0].len, IoEnd::Eof);
        let e = drain(&mut b, &mut rb, &mut s).unwrap_err();
        assert!(e.contains("seq 5"), "{e}");
        drop(b);
        let _ = t.join();
    }

    #[test]
    fn read_front_reads_at_most_max_after_what_is_left() {
        let wire: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let mut r = &wire[..];
        let mut rb = RecvBuf::new(300);
        assert_eq!(rb.read_front(&mut r, 200).unwrap(), 200);
        rb.consume(150);
        // The 50 bytes left move to the front; 200 more fit behind them.
        assert_eq!(rb.read_front(&mut r, 200).unwrap(), 200);
        assert_eq!(rb.data(), &wire[150..400]);
        // 50 of room is all a read may take now.
        assert_eq!(rb.read_front(&mut r, 200).unwrap(), 50);
        assert_eq!(rb.data(), &wire[150..450]);
        assert!(rb.read_front(&mut r, 200).is_err());
    }

    #[test]
    fn writev_all_writes_every_slice() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let parts: Vec<Vec<u8>> = (0..2000u32).map(|i| i.to_be_bytes().to_vec()).collect();
        let t = std::thread::spawn(move || {
            // More slices than one writev takes (IOV_MAX is 1024).
            let mut iov: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
            writev_all(&a, &mut iov)
        });
        let mut got = Vec::new();
        b.read_to_end(&mut got).unwrap();
        t.join().unwrap().unwrap();
        let want: Vec<u8> = (0..2000u32).flat_map(u32::to_be_bytes).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn one_corrupted_byte_is_caught() {
        let p = Pattern::new();
        let c = Cycle::new(&p, Framing::Io, &[3], 4096, 100_000);
        let want = c.expected(&p, 1, 50)[0];
        let mut wire = Vec::new();
        c.write(&mut wire, 50, &io_exit(3, 0)).unwrap();
        wire[12 + 4108 * 20 + 100] ^= 1;
        let mut rb = RecvBuf::new(1 << 20);
        let mut s = IoSink::new(3, want.len, IoEnd::EofExit);
        drain(&mut &wire[..], &mut rb, &mut s).unwrap();
        assert_eq!(s.digest().len, want.len);
        assert_ne!(s.digest(), want);
    }
}
