//! Decoding a buffer of 4 KiB stdin frames against a plain memcpy of the same
//! bytes, in the same run. Decoding splits payloads off the buffer without
//! copying them, so it should be at least as fast as the copy.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use proxy_proto::{Frame, FrameDecoder, Limits, Stream};

const FRAMES: usize = 1024;
const PAYLOAD: usize = 4096;

fn wire() -> Bytes {
    let payload = Bytes::from(vec![0x5au8; PAYLOAD]);
    let mut buf = BytesMut::with_capacity(FRAMES * (PAYLOAD + 12));
    for _ in 0..FRAMES {
        Frame::stream(Stream::Stdin, payload.clone()).encode(&mut buf);
    }
    buf.freeze()
}

fn bench(c: &mut Criterion) {
    let wire = wire();
    let mut g = c.benchmark_group("stdin-4k");
    g.throughput(Throughput::Bytes(wire.len() as u64));

    g.bench_function("memcpy", |b| {
        let mut dst = vec![0u8; wire.len()];
        b.iter(|| {
            dst.copy_from_slice(black_box(&wire));
            black_box(&dst);
        })
    });

    g.bench_function("decode", |b| {
        b.iter_batched(
            || wire.clone(),
            |mut src| {
                let mut dec = FrameDecoder::new(Limits::default());
                let mut n = 0usize;
                while let Some(f) = dec.decode_bytes(&mut src).expect("valid frames") {
                    n += f.payload.len();
                    black_box(&f);
                }
                assert_eq!(n, FRAMES * PAYLOAD);
            },
            BatchSize::SmallInput,
        )
    });

    g.bench_function("decode-bytesmut", |b| {
        b.iter_batched(
            || BytesMut::from(&wire[..]),
            |mut src| {
                let mut dec = FrameDecoder::new(Limits::default());
                let mut n = 0usize;
                while let Some(f) = dec.decode(&mut src).expect("valid frames") {
                    n += f.payload.len();
                    black_box(&f);
                }
                assert_eq!(n, FRAMES * PAYLOAD);
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
