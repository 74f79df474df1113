//! Plain unix socket channels over real sockets.

use std::time::{Duration, Instant};

use proxy_vsock::{connect, AgentAddr, AgentListener, AgentStream, ConnectError, ConnectOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::time::sleep;

#[tokio::test]
async fn unix_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 1 << 20];
        s.read_exact(&mut buf).await.unwrap();
        s.write_all(&buf).await.unwrap();
    });
    let addr: AgentAddr = path.to_str().unwrap().parse().unwrap();
    let mut s = connect(&addr, &ConnectOptions::default()).await.unwrap();
    assert!(matches!(s, AgentStream::Unix(_)));
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7) as u8).collect();
    let (mut r, mut w) = tokio::io::split(&mut s);
    let (_, back) = tokio::join!(async { w.write_all(&data).await.unwrap() }, async {
        let mut back = vec![0u8; data.len()];
        r.read_exact(&mut back).await.unwrap();
        back
    });
    assert!(back == data);
    server.await.unwrap();
}

#[tokio::test]
async fn unix_waits_for_the_socket_to_appear() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("late.sock");
    let p2 = path.clone();
    let server = tokio::spawn(async move {
        sleep(Duration::from_millis(120)).await;
        let l = UnixListener::bind(&p2).unwrap();
        l.accept().await.unwrap();
    });
    let start = Instant::now();
    connect(&AgentAddr::Unix(path), &ConnectOptions::default())
        .await
        .unwrap();
    assert!(start.elapsed() >= Duration::from_millis(100));
    server.await.unwrap();
}

#[tokio::test]
async fn unix_missing_socket_times_out_with_last_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("never.sock");
    let addr = AgentAddr::Unix(path.clone());
    let opts = ConnectOptions::default().with_timeout(Duration::from_millis(200));
    let start = Instant::now();
    let err = connect(&addr, &opts).await.unwrap_err();
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(2),
        "{took:?}"
    );
    let ConnectError::Timeout { attempts, last, .. } = &err else {
        panic!("{err:?}");
    };
    // 10, 20, 40, 80 ms backoff fits about five attempts in 200 ms.
    assert!((3..=8).contains(attempts), "{attempts}");
    let Some(ConnectError::Connect { source, .. }) = last.as_deref() else {
        panic!("{last:?}");
    };
    assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
    let msg = err.to_string();
    assert!(
        msg.contains(&format!(
            "connecting to {} timed out after 200ms",
            path.display()
        )),
        "{msg}"
    );
    assert!(msg.contains("last error: connect to"), "{msg}");
}

#[tokio::test]
async fn unix_final_error_is_not_retried() {
    // A path below a regular file fails with ENOTDIR, which no retry fixes.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain");
    std::fs::write(&file, b"").unwrap();
    let addr = AgentAddr::Unix(file.join("x.sock"));
    let start = Instant::now();
    let err = connect(&addr, &ConnectOptions::default())
        .await
        .unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(1));
    assert!(matches!(err, ConnectError::Connect { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with(&format!("connect to {addr} failed")),
        "{err}"
    );
}

#[tokio::test]
async fn agent_listener_unix_and_hybrid() {
    let dir = tempfile::tempdir().unwrap();
    for addr in [
        AgentAddr::Unix(dir.path().join("u.sock")),
        AgentAddr::HybridVsock {
            path: dir.path().join("h.sock"),
            port: 77,
        },
    ] {
        let listener = AgentListener::bind(&addr).unwrap();
        let server = tokio::spawn(async move {
            let mut s = listener.accept().await.unwrap();
            s.write_all(b"hi").await.unwrap();
        });
        let mut s = connect(&addr, &ConnectOptions::default()).await.unwrap();
        let mut buf = [0u8; 2];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hi", "{addr}");
        server.await.unwrap();
    }
}
