//! A hostile length costs nothing: a header declaring a 4 GiB payload is
//! refused from its 12 bytes alone, before anything is buffered.
//!
//! This test binary installs a global allocator that records the largest
//! allocation made by a thread while it is being watched, so "nothing was
//! allocated" is measured, not assumed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::BytesMut;
use proxy_proto::hyper::ctl::{CtlDecoder, CtlHeader};
use proxy_proto::hyper::io::{IoDecoder, IoHeader};
use proxy_proto::{
    decode_slice, peek_frame, Command, FrameDecoder, FrameError, FrameKind, Header, Limits, Stream,
    DEFAULT_MAX_PAYLOAD,
};

struct Watching;

thread_local! {
    static WATCHED: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}
static WATCHED_ALLOCS: AtomicUsize = AtomicUsize::new(0);

fn note(size: usize) {
    // try_with: the thread's locals may be gone while it is exiting.
    let _ = WATCHED.try_with(|w| {
        if w.get() {
            WATCHED_ALLOCS.fetch_add(1, Ordering::Relaxed);
            let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
        }
    });
}

// SAFETY: every method forwards to the system allocator with the caller's
// arguments unchanged; the bookkeeping touches only const-initialized
// thread-locals and an atomic, which do not allocate.
unsafe impl GlobalAlloc for Watching {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded from our caller, who upholds alloc's contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as for alloc.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: ptr was allocated by System (every allocation goes
        // through us to System) with `layout`, as the caller guarantees.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: ptr was allocated by System with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Watching = Watching;

/// Run `f` and return its result with the largest allocation it made.
fn watch<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    WATCHED.with(|w| w.set(true));
    let out = f();
    WATCHED.with(|w| w.set(false));
    (out, LARGEST.with(Cell::get))
}

const MIB: usize = 1 << 20;

#[test]
fn declared_4gib_payload_is_refused_without_allocating() {
    let header = Header::new(FrameKind::Command(Command::Hyper), u32::MAX).to_bytes();
    let too_large = FrameError::FrameTooLarge {
        len: u64::from(u32::MAX),
        max: u64::from(DEFAULT_MAX_PAYLOAD),
    };

    let mut buf = BytesMut::with_capacity(64);
    buf.extend_from_slice(&header);
    let cap = buf.capacity();
    let mut dec = FrameDecoder::new(Limits::default());
    let (res, largest) = watch(|| dec.decode(&mut buf));
    assert_eq!(res, Err(too_large));
    assert!(largest < MIB, "decode allocated {largest} bytes");
    assert_eq!(buf.capacity(), cap, "the buffer did not grow");
    assert_eq!(&buf[..], &header[..], "nothing was consumed");

    // With some of the payload already there, still refused at once.
    buf.extend_from_slice(&[0u8; 40]);
    let (res, largest) = watch(|| dec.decode(&mut buf));
    assert_eq!(res, Err(too_large));
    assert!(largest < MIB, "decode allocated {largest} bytes");

    let (res, largest) = watch(|| {
        (
            peek_frame(&header, &Limits::default()),
            decode_slice(&header, &Limits::default()).map(|o| o.is_some()),
        )
    });
    assert_eq!(res, (Err(too_large), Err(too_large)));
    assert!(largest < MIB);

    let mut shared = bytes::Bytes::copy_from_slice(&header);
    let (res, largest) = watch(|| dec.decode_bytes(&mut shared));
    assert_eq!(res, Err(too_large));
    assert!(largest < MIB);
}

#[test]
fn a_partial_frame_reserves_at_most_what_the_limit_allows() {
    // Just under the limit: the decoder reserves room for the rest of this
    // frame (bounded by the limit), and nothing beyond it.
    let limits = Limits { max_payload: 64 };
    let header = Header::new(FrameKind::Stream(Stream::Stdin), 64).to_bytes();
    let mut buf = BytesMut::from(&header[..]);
    let (res, largest) = watch(|| FrameDecoder::new(limits).decode(&mut buf));
    assert_eq!(res, Ok(None));
    assert!(
        largest <= 1024,
        "reserved {largest} bytes for a 76-byte frame"
    );
}

#[test]
fn agent_messages_declaring_4gib_are_refused_without_allocating() {
    let mut ctl = BytesMut::from(
        &CtlHeader {
            code: 9,
            len: u32::MAX,
        }
        .to_bytes()[..],
    );
    let cap = ctl.capacity();
    let (res, largest) = watch(|| CtlDecoder::default().decode(&mut ctl));
    assert!(res.is_err());
    assert!(largest < MIB);
    assert_eq!(ctl.capacity(), cap);

    let mut io = BytesMut::from(
        &IoHeader {
            seq: 3,
            len: u32::MAX,
        }
        .to_bytes()[..],
    );
    let cap = io.capacity();
    let (res, largest) = watch(|| IoDecoder::default().decode(&mut io));
    assert!(res.is_err());
    assert!(largest < MIB);
    assert_eq!(io.capacity(), cap);
}

#[test]
fn the_watch_itself_sees_allocations() {
    let before = WATCHED_ALLOCS.load(Ordering::Relaxed);
    let (v, largest) = watch(|| vec![0u8; 2 * MIB]);
    assert_eq!(v.len(), 2 * MIB);
    assert!(largest >= 2 * MIB, "the allocator hook works");
    assert!(WATCHED_ALLOCS.load(Ordering::Relaxed) > before);
}
