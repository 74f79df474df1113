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
