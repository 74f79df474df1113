//! Shared by the daemon's integration tests (each test file includes it).

#![allow(dead_code)]

use std::time::Duration;

use proxy_test_support::hyper::Code;
use proxy_test_support::scenario::Vm;
use proxy_test_support::ProxyProcess;

pub const BIN: &str = env!("CARGO_BIN_EXE_cc-proxy");

/// A daemon with default settings.
pub async fn proxy() -> ProxyProcess {
    ProxyProcess::start(BIN).await
}

/// A daemon with extra arguments.
pub async fn proxy_with(args: &[&str]) -> ProxyProcess {
    ProxyProcess::builder(BIN).args(args).start().await
}

/// The 12-byte header of a proxy frame, every field given.
pub fn header(version: u16, words: u8, type_byte: u8, opcode: u8, len: u32) -> [u8; 12] {
    let v = version.to_be_bytes();
    let l = len.to_be_bytes();
    [
        v[0], v[1], words, 0, 0, 0, type_byte, opcode, l[0], l[1], l[2], l[3],
    ]
}

/// A `ping` through `vm`'s runtime, answered by its agent: the VM still
/// works end to end.
pub async fn assert_vm_answers(vm: &mut Vm) {
    let (r, ()) = tokio::join!(vm.runtime.hyper("ping", &[], None), async {
        vm.agent.expect_ctl(Code::Ping).await;
        vm.agent.reply_ack(b"pong").await;
    });
    assert_eq!(&r.expect("ping on a healthy VM")[..], b"pong");
}

/// A pattern whose every byte depends on its offset (detects loss,
/// duplication and reordering).
pub fn pattern(offset: usize, len: usize) -> Vec<u8> {
    (offset..offset + len)
        .map(|i| (i % 251) as u8 ^ ((i / 251) % 256) as u8)
        .collect()
}

/// The first offset where `got` differs from the pattern at `offset`.
pub fn check_pattern(offset: usize, got: &[u8]) -> Result<(), String> {
    let want = pattern(offset, got.len());
    match got.iter().zip(&want).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(i) => Err(format!(
            "byte {} (stream offset {}) differs: got {}, want {}",
            i,
            offset + i,
            got[i],
            want[i]
        )),
    }
}

pub const SHORT: Duration = Duration::from_millis(300);

/// The largest value of the metric `name` (every label set) in one scrape
/// of the daemon's `--metrics-socket` at `sock`; `None` while the endpoint
/// is not up or the series does not exist yet.
#[allow(dead_code)]
pub async fn metric_max(sock: &std::path::Path, name: &str) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::UnixStream::connect(sock).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: cc-proxy\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).await.ok()?;
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .reduce(f64::max)
}

/// Wait until the metric `name` reaches at least `at_least`: the event a
/// test waits for, not a guess of how long it takes. Fails the test, naming
/// `what`, if it does not within a generous bound.
#[allow(dead_code)]
pub async fn wait_metric(sock: &std::path::Path, name: &str, at_least: f64, what: &str) -> f64 {
    wait_metric_until(
        sock,
        name,
        |v| v >= at_least,
        &format!("≥ {at_least}"),
        what,
    )
    .await
}

/// Wait until the metric `name` falls to at most `at_most` (a gauge going
/// down: a connection or a shim the daemon has seen go).
#[allow(dead_code)]
pub async fn wait_metric_at_most(
    sock: &std::path::Path,
    name: &str,
    at_most: f64,
    what: &str,
) -> f64 {
    wait_metric_until(sock, name, |v| v <= at_most, &format!("≤ {at_most}"), what).await
}

async fn wait_metric_until(
    sock: &std::path::Path,
    name: &str,
    ok: impl Fn(f64) -> bool,
    wanted: &str,
    what: &str,
) -> f64 {
    let mut last = None;
    for _ in 0..3000 {
        last = metric_max(sock, name).await;
        if let Some(v) = last.filter(|v| ok(*v)) {
            return v;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("waited 30 s in vain for {what}: {name} is {last:?}, wanted {wanted}");
}

/// A daemon serving metrics on a socket of its own, so that a test can
/// wait for what the daemon has seen rather than for a guessed while.
pub struct Metered {
    pub p: ProxyProcess,
    /// The `--metrics-socket`.
    pub metrics: std::path::PathBuf,
    /// Holds the socket's directory while the test runs.
    pub dir: proxy_test_support::TempDir,
}

/// A daemon with extra arguments and a metrics socket.
pub async fn proxy_metered(args: &[&str]) -> Metered {
    let dir = proxy_test_support::TempDir::new();
    let metrics = dir.socket("metrics.sock");
    let mut all = vec![
        "--metrics-socket",
        metrics.to_str().expect("a UTF-8 temp path"),
    ];
    all.extend_from_slice(args);
    let p = proxy_with(&all).await;
    Metered { p, metrics, dir }
}
