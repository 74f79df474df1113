//! Bytes per second through an established hybrid vsock connection (made
//! by `proxy_vsock::connect` against an in-process `HybridListener`) versus
//! a plain unix socket pair, in the same run: 64 MiB in 64 KiB writes.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use proxy_vsock::{connect, AgentAddr, ConnectOptions, HybridListener};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::runtime::Runtime;

const TOTAL: usize = 64 << 20;
const CHUNK: usize = 64 << 10;

async fn transfer<W, R>(w: &mut W, r: &mut R, chunk: &[u8], sink: &mut [u8])
where
    W: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    let write = async {
        let mut sent = 0;
        while sent < TOTAL {
            w.write_all(chunk).await.expect("bench write");
            sent += chunk.len();
        }
    };
    let read = async {
        let mut got = 0;
        while got < TOTAL {
            let n = r.read(sink).await.expect("bench read");
            assert!(n > 0, "unexpected end of stream");
            got += n;
        }
    };
    tokio::join!(write, read);
}

fn throughput(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let chunk = vec![0xa5u8; CHUNK];
    let mut sink = vec![0u8; CHUNK];

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bench.sock");
    let (mut hv_client, mut hv_guest) = hybrid_pair(&rt, &path);
    let (mut plain_a, mut plain_b) = rt
        .block_on(async { UnixStream::pair() })
        .expect("unix pair");

    let mut group = c.benchmark_group("64MiB_in_64KiB_writes");
    group.throughput(Throughput::Bytes(TOTAL as u64));
    group.sample_size(10);
    group.bench_function("unix_pair", |b| {
        b.iter(|| rt.block_on(transfer(&mut plain_a, &mut plain_b, &chunk, &mut sink)))
    });
    group.bench_function("hybrid_vsock", |b| {
        b.iter(|| rt.block_on(transfer(&mut hv_client, &mut hv_guest, &chunk, &mut sink)))
    });
    group.finish();
}

fn hybrid_pair(rt: &Runtime, path: &std::path::Path) -> (proxy_vsock::AgentStream, UnixStream) {
    rt.block_on(async {
        let listener = HybridListener::bind(path, 1024).expect("bind hybrid listener");
        let addr = AgentAddr::HybridVsock {
            path: path.to_owned(),
            port: 1024,
        };
        let opts = ConnectOptions::default().with_timeout(Duration::from_secs(5));
        let (client, guest) = tokio::join!(connect(&addr, &opts), listener.accept());
        (
            client.expect("hybrid connect"),
            guest.expect("hybrid accept").0,
        )
    })
}

criterion_group!(benches, throughput);
criterion_main!(benches);
