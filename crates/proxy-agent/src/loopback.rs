//! An AF_VSOCK round trip inside the guest, over the loopback transport
//! (CID 1, `vsock_loopback.ko`), with the daemon's own transport code:
//! `proxy_vsock::VsockListener` listens, `proxy_vsock::connect` dials
//! `vsock://1:<port>`. The host has no vsock loopback of its own, so this is
//! where the AF_VSOCK path of `proxy-vsock` runs for real (docs/E2E.md).
//!
//! It runs when the kernel command line carries `agent.vsock_loopback=PORT`
//! and prints one line on the console that the host's e2e driver looks
//! for: `vsock-loopback: ok …` or `vsock-loopback: FAILED: …`.

use std::time::{Duration, Instant};

use proxy_vsock::{
    connect, AgentAddr, AgentStream, ConnectOptions, VsockListener, VMADDR_CID_ANY,
    VMADDR_CID_LOCAL,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::log;

/// The console marker of the result line.
pub const MARKER: &str = "vsock-loopback:";

/// Bytes sent each way.
const LEN: usize = 256 * 1024;

/// Everything together may take this long (TCG is slow, not this slow).
const TIMEOUT: Duration = Duration::from_secs(30);

/// Run the round trip on `port` and print the result line.
pub fn run_and_report(port: u32) {
    let t = Instant::now();
    match round_trip(port) {
        Ok(detail) => log!("{MARKER} ok, {detail} in {:.0?}", t.elapsed()),
        Err(e) if !std::path::Path::new("/sys/module/vsock_loopback").exists() => {
            log!("{MARKER} FAILED: {e} (the vsock_loopback module is not loaded)")
        }
        Err(e) => log!("{MARKER} FAILED: {e}"),
    }
}

fn round_trip(port: u32) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    rt.block_on(async {
        tokio::time::timeout(TIMEOUT, exchange(port))
            .await
            .map_err(|_| format!("no answer within {TIMEOUT:?}"))?
    })
}

/// Bytes that are not all alike.
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

async fn exchange(port: u32) -> Result<String, String> {
    let listener = VsockListener::bind(VMADDR_CID_ANY, port)
        .map_err(|e| format!("bind vsock port {port}: {e}"))?;
    // The echo side: everything read until EOF, written back, then EOF.
    let echo = tokio::spawn(async move {
        let (mut s, peer) = listener
            .accept()
            .await
            .map_err(|e| format!("accept: {e}"))?;
        let mut got = Vec::with_capacity(LEN);
        s.read_to_end(&mut got)
            .await
            .map_err(|e| format!("echo read: {e}"))?;
        s.write_all(&got)
            .await
            .map_err(|e| format!("echo write: {e}"))?;
        AsyncWriteExt::shutdown(&mut s)
            .await
            .map_err(|e| format!("echo shutdown: {e}"))?;
        Ok::<_, String>(peer)
    });
    let addr = AgentAddr::Vsock {
        cid: VMADDR_CID_LOCAL,
        port,
    };
    let opts = ConnectOptions::default().with_timeout(Duration::from_secs(5));
    let stream = connect(&addr, &opts).await.map_err(|e| e.to_string())?;
    let AgentStream::Vsock(_) = &stream else {
        return Err(format!("connect({addr}) gave a unix stream, not AF_VSOCK"));
    };
    let (mut r, mut w) = tokio::io::split(stream);
    let data = pattern(LEN);
    let sent = data.clone();
    // Write and read at once: the echo answers only after EOF, but a
    // writer that waited for it would not care; a reader is there anyway.
    let writer = async move {
        w.write_all(&sent)
            .await
            .map_err(|e| format!("write: {e}"))?;
        w.shutdown().await.map_err(|e| format!("shutdown: {e}"))
    };
    let reader = async move {
        let mut back = Vec::with_capacity(LEN);
        r.read_to_end(&mut back)
            .await
            .map_err(|e| format!("read: {e}"))?;
        Ok::<_, String>(back)
    };
    let (wrote, back) = tokio::join!(writer, reader);
    wrote?;
    let back = back?;
    let (peer_cid, peer_port) = echo.await.map_err(|e| format!("echo task: {e}"))??;
    if back != data {
        let first_diff = back
            .iter()
            .zip(&data)
            .position(|(a, b)| a != b)
            .unwrap_or(back.len().min(data.len()));
        return Err(format!(
            "{} bytes came back of {LEN}, first difference at byte {first_diff}",
            back.len()
        ));
    }
    Ok(format!(
        "{LEN} bytes each way over {addr} (the listener saw peer cid {peer_cid} port {peer_port})"
    ))
}
