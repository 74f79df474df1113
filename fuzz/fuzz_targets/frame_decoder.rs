//! Arbitrary bytes into the proxy frame decoders: never a panic, and the
//! three decoders (owned `BytesMut`, owned `Bytes`, borrowed slice) agree
//! frame by frame. The first byte picks the payload limit and a split point,
//! so split input and small limits are exercised too.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use proxy_proto::{decode_slice, peek_frame, FrameDecoder, Limits, RawHeader};

fuzz_target!(|data: &[u8]| {
    let Some((&knob, input)) = data.split_first() else {
        return;
    };
    let limits = Limits {
        max_payload: if knob & 1 == 0 {
            1 << 22
        } else {
            u32::from(knob)
        },
    };

    // Whole buffer: BytesMut, Bytes and slice decoders agree.
    let mut owned = BytesMut::from(input);
    let mut shared = Bytes::copy_from_slice(input);
    let mut slice = input;
    let mut dec = FrameDecoder::new(limits);
    loop {
        let a = dec.decode(&mut owned);
        let b = dec.decode_bytes(&mut shared);
        let c = decode_slice(slice, &limits);
        let p = peek_frame(slice, &limits);
        let _ = RawHeader::peek(slice).map(|r| r.validate());
        match (a, b, c, p) {
            (Ok(Some(a)), Ok(Some(b)), Ok(Some((c, used))), Ok(Some((h, total)))) => {
                assert_eq!(a, b);
                assert_eq!((a.kind, &a.payload[..]), (c.kind, c.payload));
                assert_eq!((h.kind, total), (c.kind, used));
                // Re-encoding is the canonical form of what was read.
                let enc = a.to_bytes();
                assert_eq!(&enc[12..], c.payload);
                slice = &slice[used..];
            }
            (Ok(None), Ok(None), Ok(None), Ok(None)) => break,
            (Err(a), Err(b), Err(c), Err(p)) => {
                assert_eq!(a, b);
                assert_eq!(a, c);
                assert_eq!(a, p);
                break;
            }
            other => panic!("decoders disagree: {other:?}"),
        }
    }

    // Split at an arbitrary point: the frames are the same as whole.
    let cut = usize::from(knob).min(input.len());
    let mut whole = BytesMut::from(input);
    let mut expect = Vec::new();
    let mut d = FrameDecoder::new(limits);
    while let Ok(Some(f)) = d.decode(&mut whole) {
        expect.push(f);
    }
    let mut buf = BytesMut::from(&input[..cut]);
    let mut got = Vec::new();
    let mut failed = false;
    for chunk in [&input[cut..], &[][..]] {
        loop {
            match d.decode(&mut buf) {
                Ok(Some(f)) => got.push(f),
                Ok(None) => break,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            break;
        }
        buf.extend_from_slice(chunk);
    }
    assert_eq!(got, expect);
});
