//! Hybrid vsock connections against in-test listeners speaking the
//! handshake over real unix sockets.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proxy_vsock::{
    connect, AgentAddr, AgentConnector, AgentStream, ConnectError, ConnectOptions, Connector,
    HandshakeError, HybridListener,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::sleep;

fn hv(path: &Path, port: u32) -> AgentAddr {
    AgentAddr::HybridVsock {
        path: path.to_owned(),
        port,
    }
}

fn sock(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("hv.sock")
}

fn quick() -> ConnectOptions {
    ConnectOptions::default()
        .with_timeout(Duration::from_secs(5))
        .with_handshake_timeout(Duration::from_secs(2))
}

/// Read the client's `CONNECT <port>\n` line (byte at a time) and check it.
async fn expect_connect(s: &mut UnixStream, port: u32) {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        s.read_exact(&mut b).await.unwrap();
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
    }
    assert_eq!(String::from_utf8(line).unwrap(), format!("CONNECT {port}"));
}

#[tokio::test]
async fn accepts_and_carries_bytes_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir);
    let listener = HybridListener::bind(&path, 1024).unwrap();
    assert_eq!(listener.port(), Some(1024));
    assert_eq!(listener.addr_for(1024), hv(&path, 1024));
    let guest = tokio::spawn(async move {
        let (mut s, port) = listener.accept().await.unwrap();
        assert_eq!(port, 1024);
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        s.write_all(b"pong").await.unwrap();
    });
    let mut s = connect(&hv(&path, 1024), &quick()).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
    guest.await.unwrap();
}

#[tokio::test]
async fn bind_any_hands_back_the_port() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir);
    let listener = HybridListener::bind_any(&path).unwrap();
    assert_eq!(listener.port(), None);
    let guest = tokio::spawn(async move {
        let mut ports = Vec::new();
        for _ in 0..2 {
            let (_s, port) = listener.accept().await.unwrap();
            ports.push(port);
        }
        ports
    });
    let _a = connect(&hv(&path, 7), &quick()).await.unwrap();
    let _b = connect(&hv(&path, 4_000_000_000), &quick()).await.unwrap();
    assert_eq!(guest.await.unwrap(), vec![7, 4_000_000_000]);
}

#[tokio::test]
async fn vmm_closes_until_guest_listens_then_accepts() {
    // Like Firecracker: the VMM accepts the unix connection, reads CONNECT,
    // and closes it while nothing in the guest listens on the port.
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir);
    let listener = UnixListener::bind(&path).unwrap();
    let seen = Arc::new(AtomicU32::new(0));
    let seen2 = seen.clone();
    let vmm = tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            expect_connect(&mut s, 52).await;
            if seen2.fetch_add(1, Ordering::SeqCst) < 2 {
                drop(s);
                continue;
            }
            s.write_all(b"OK 1073741824\n").await.unwrap();
            return s;
        }
    });
    let mut s = connect(&hv(&path, 52), &quick()).await.unwrap();
    let mut guest = vmm.await.unwrap();
    assert_eq!(seen.load(Ordering::SeqCst), 3);
    s.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    guest.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"x");
}

#[tokio::test]
async fn garbage_reply_fails_at_once_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir);
    let listener = UnixListener::bind(&path).unwrap();
    let accepted = Arc::new(AtomicU32::new(0));
    let acc2 = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            acc2.fetch_add(1, Ordering::SeqCst);
            expect_connect(&mut s, 5).await;
            s.write_all(b"HTTP/1.1 400 Bad Request\n").await.unwrap();
        }
    });
    let err = connect(&hv(&path, 5), &quick()).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            &err,
            ConnectError::Handshake { source: HandshakeError::UnexpectedReply { line }, .. }
                if line == "HTTP/1.1 400 Bad Request"
        ),
        "{err:?}"
    );
    assert!(msg.contains("HTTP/1.1 400 Bad Request"), "{msg}");
    assert!(
        msg.contains(&format!("hvsock://{}:5", path.display())),
        "{msg}"
    );
    assert!(msg.contains("handshake"), "{msg}");
    assert!(!err.is_retryable());
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "a garbage reply is not retried"
    );
}

#[tokio::test]
async fn overlong_reply_is_capped() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir);
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        expect_connect(&mut s, 5).await;
        s.write_all(&[b'O'; 4096]).await.unwrap();
        sleep(Duration::from_secs(5)).await;
    });
    let err = connect(&hv(&path, 5), &quick()).await.unwrap_err();
    assert!(
        matches!(
            &err,
            ConnectError::Handshake {
                source: HandshakeError::LineTooLong { max: 64, .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("no newline within 64 bytes"),
        "{err}"
    );
}

#[tokio::test]
async fn slow_reply_within_timeout_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir);
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        expect_connect(&mut s, 5).await;
        sleep(Duration::from_millis(300)).await;
        s.write_all(b"OK 1\n").await.unwrap();
        sleep(Duration::from_secs(1)).await;
    });
    let opts = quick().with_handshake_timeout(Duration::from_secs(2));
    let start = Instant::now();
    connect(&hv(&path, 5), &opts).await.unwrap();
    assert!(start.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn too_slow_reply_times_out_saying_how_long() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir);
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                expect_connect(&mut s, 5).await;
                sleep(Duration::from_secs(30)).await;
                let _ = s.write_all(b"OK 1\n").await;
            });
        }
    });
    // The handshake timeout fires first.
    let opts = quick().with_handshake_timeout(Duration::from_millis(200));
    let err = connect(&hv(&path, 5), &opts).await.unwrap_err();
    assert!(
        matches!(err, ConnectError::HandshakeTimeout { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("timed out after 200ms"), "{msg}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");

    // The total timeout fires first.
    let opts = quick()
        .with_timeout(Duration::from_millis(250))
        .with_handshake_timeout(Duration::from_secs(5));
    let err = connect(&hv(&path, 5), &opts).await.unwrap_err();
    assert!(matches!(err, ConnectError::Timeout { .. }), "{err:?}");
    assert!(err.to_string().contains("timed out after 250ms"), "{err}");
}

#[tokio::test]
async fn peer_closing_mid_handshake_is_retried_then_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir);
    let listener = UnixListener::bind(&path).unwrap();
    let attempts = Arc::new(AtomicU32::new(0));
    let a2 = attempts.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            a2.fetch_add(1, Ordering::SeqCst);
            expect_connect(&mut s, 5).await;
            s.write_all(b"OK").await.unwrap();
            // ...and close before the newline.
        }
    });
    let opts = quick().with_timeout(Duration::from_millis(300));
    let err = connect(&hv(&path, 5), &opts).await.unwrap_err();
    let msg = err.to_string();
    let ConnectError::Timeout {
        attempts: n, last, ..
    } = &err
    else {
        panic!("{err:?}");
    };
    assert!(*n >= 2, "retried: {n} attempts");
    assert!(attempts.load(Ordering::SeqCst) >= 2);
    assert!(
        matches!(
            last.as_deref(),
            Some(ConnectError::Handshake { source: HandshakeError::Closed { received, .. }, .. })
                if received == "OK"
        ),
        "{last:?}"
    );
    assert!(msg.contains("timed out after 300ms"), "{msg}");
    assert!(
        msg.contains("peer closed the connection before a whole OK line, after \"OK\""),
        "{msg}"
    );
}

#[tokio::test]
async fn peer_closing_once_then_answering_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir);
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        expect_connect(&mut s, 5).await;
        s.write_all(b"OK 1").await.unwrap();
        drop(s);
        let (mut s, _) = listener.accept().await.unwrap();
        expect_connect(&mut s, 5).await;
        s.write_all(b"OK 2\n").await.unwrap();
        sleep(Duration::from_secs(1)).await;
    });
    connect(&hv(&path, 5), &quick()).await.unwrap();
}

#[tokio::test]
async fn ok_line_split_over_several_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir);
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        expect_connect(&mut s, 5).await;
        for part in [&b"O"[..], b"K", b" 10", b"737", b"41824", b"\nda", b"ta"] {
            s.write_all(part).await.unwrap();
            s.flush().await.unwrap();
            sleep(Duration::from_millis(20)).await;
        }
        sleep(Duration::from_secs(1)).await;
    });
    let mut s = connect(&hv(&path, 5), &quick()).await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"data");
}

#[tokio::test]
async fn payload_in_the_same_write_as_ok_reaches_the_reader_intact() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir);
    let listener = UnixListener::bind(&path).unwrap();
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let expected = payload.clone();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        expect_connect(&mut s, 5).await;
        let mut out = b"OK 1\n".to_vec();
        out.extend_from_slice(&payload);
        s.write_all(&out).await.unwrap();
        s.shutdown().await.unwrap();
    });
    let mut s = connect(&hv(&path, 5), &quick()).await.unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "payload bytes changed");
}

#[tokio::test]
async fn hybrid_listener_closes_wrong_port_and_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir);
    let listener = HybridListener::bind(&path, 6)
        .unwrap()
        .with_handshake_timeout(Duration::from_millis(500));
    let guest = tokio::spawn(async move {
        let (_s, port) = listener.accept().await.unwrap();
        port
    });
    // Port 5 is not served: closed each time, retried, timed out.
    let opts = quick().with_timeout(Duration::from_millis(200));
    let err = connect(&hv(&path, 5), &opts).await.unwrap_err();
    assert!(matches!(err, ConnectError::Timeout { .. }), "{err:?}");
    assert!(err.to_string().contains("peer closed"), "{err}");
    // A client that sends nothing is dropped after the handshake timeout.
    let _silent = UnixStream::connect(&path).await.unwrap();
    // Port 6 is served.
    connect(&hv(&path, 6), &quick()).await.unwrap();
    assert_eq!(guest.await.unwrap(), 6);
}

#[tokio::test]
async fn hybrid_listener_handshake_reports_wrong_port() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir);
    let listener = HybridListener::bind(&path, 6).unwrap();
    let client = tokio::spawn({
        let path = path.clone();
        async move {
            let mut s = UnixStream::connect(&path).await.unwrap();
            s.write_all(b"CONNECT 5\n").await.unwrap();
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await.unwrap();
            rest
        }
    });
    let raw = listener.accept_raw().await.unwrap();
    let err = listener.handshake(raw).await.unwrap_err();
    assert!(
        matches!(
            err,
            HandshakeError::WrongPort {
                requested: 5,
                served: 6
            }
        ),
        "{err:?}"
    );
    assert!(err
        .to_string()
        .contains("port 5 was requested, but this listener serves port 6"));
    assert!(client.await.unwrap().is_empty(), "closed without an answer");
}

async fn via_trait(c: &dyn AgentConnector, addr: &AgentAddr) -> AgentStream {
    match c.connect(addr, &quick()).await {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn connector_trait_over_hybrid() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir);
    let listener = HybridListener::bind(&path, 11).unwrap();
    let guest = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"!").await.unwrap();
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"?").await.unwrap();
    });
    let connector: Arc<dyn AgentConnector> = Arc::new(Connector);
    let addr = hv(&path, 11);
    let mut s = via_trait(connector.as_ref(), &addr).await;
    assert!(matches!(s, AgentStream::Unix(_)), "{s:?}");
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"!");
    let mut s = via_trait(&Connector, &addr).await;
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"?");
    guest.await.unwrap();
}

#[tokio::test]
async fn closed_right_after_accept_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir);
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        for _ in 0..3 {
            // Close without reading: the client's write or read fails with
            // EPIPE, ECONNRESET or end of stream.
            drop(listener.accept().await.unwrap());
        }
        let (mut s, _) = listener.accept().await.unwrap();
        expect_connect(&mut s, 8).await;
        s.write_all(b"OK 4\n").await.unwrap();
        sleep(Duration::from_secs(1)).await;
    });
    connect(&hv(&path, 8), &quick()).await.unwrap();
}
