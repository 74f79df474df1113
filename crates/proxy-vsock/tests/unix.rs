//! Plain unix socket channels over real sockets.

use std::time::Duration;

use proxy_vsock::{connect, AgentAddr, AgentListener, AgentStream, ConnectError, ConnectOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

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

/// A retrying dial would end in `ConnectError::Timeout` after the paused
/// clock ran through its backoff; an error at once is `ConnectError::Connect`.
async fn dial_once(addr: &AgentAddr) -> ConnectError {
    let opts = ConnectOptions::default().with_timeout(Duration::from_secs(30));
    connect(addr, &opts).await.unwrap_err()
}

#[tokio::test(start_paused = true)]
async fn regression_a_missing_unix_socket_is_an_error_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl.sock");
    let addr = AgentAddr::Unix(path.clone());
    let err = dial_once(&addr).await;
    let ConnectError::Connect { source, .. } = &err else {
        panic!("retried instead of failing at once: {err}");
    };
    assert_eq!(source.raw_os_error(), Some(libc::ENOENT));
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("connect to {} failed: ", path.display())),
        "{msg}"
    );
    assert!(msg.contains("No such file or directory"), "{msg}");
}

#[tokio::test(start_paused = true)]
async fn regression_a_refusing_or_non_socket_path_is_an_error_at_once() {
    let dir = tempfile::tempdir().unwrap();
    // A socket file nobody listens on any more: ECONNREFUSED.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    // A regular file: ECONNREFUSED on Linux too (it is no socket).
    let plain = dir.path().join("plain");
    std::fs::write(&plain, b"").unwrap();
    for path in [stale, plain] {
        let addr = AgentAddr::Unix(path.clone());
        let err = dial_once(&addr).await;
        let ConnectError::Connect { source, .. } = &err else {
            panic!(
                "{}: retried instead of failing at once: {err}",
                path.display()
            );
        };
        assert!(
            matches!(
                source.raw_os_error(),
                Some(libc::ECONNREFUSED | libc::ENOTSOCK)
            ),
            "{}: {source}",
            path.display()
        );
    }
    // The hybrid vsock socket of a hypervisor that is not there, or not
    // listening: only the guest's port is waited for, never the VMM.
    let stale_hv = dir.path().join("stale-hv.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale_hv).unwrap());
    for path in [dir.path().join("hv.sock"), stale_hv] {
        let addr = AgentAddr::HybridVsock { path, port: 1024 };
        let err = dial_once(&addr).await;
        assert!(matches!(err, ConnectError::Connect { .. }), "{addr}: {err}");
    }
}

#[tokio::test]
async fn unix_final_error_is_not_retried() {
    // A path below a regular file fails with ENOTDIR, which no retry fixes.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain");
    std::fs::write(&file, b"").unwrap();
    let addr = AgentAddr::Unix(file.join("x.sock"));
    let err = connect(&addr, &ConnectOptions::default())
        .await
        .unwrap_err();
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
