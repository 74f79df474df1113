//! AF_VSOCK, where the host can do it without a VM: a round trip over the
//! loopback transport (cid 1, `VMADDR_CID_LOCAL`). Without `/dev/vsock` or
//! a loopback transport the test says why it was skipped and passes.

use std::time::Duration;

use proxy_vsock::{
    connect, AgentAddr, AgentListener, AgentStream, ConnectOptions, VsockListener, VMADDR_CID_ANY,
    VMADDR_CID_LOCAL,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn test_port() -> u32 {
    // Unlikely to collide with other runs: 20000..60000 by pid.
    20_000 + std::process::id() % 40_000
}

#[tokio::test]
async fn vsock_loopback_round_trip_or_skip() {
    if !std::path::Path::new("/dev/vsock").exists() {
        eprintln!("SKIPPED vsock_loopback_round_trip: /dev/vsock does not exist");
        return;
    }
    let port = test_port();
    let listener = match VsockListener::bind(VMADDR_CID_ANY, port) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("SKIPPED vsock_loopback_round_trip: cannot bind vsock port {port}: {e}");
            return;
        }
    };
    assert_eq!(listener.local_addr().unwrap().1, port);
    let server = tokio::spawn(async move {
        let (mut s, _peer) = listener.accept().await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        s.write_all(&buf).await.unwrap();
    });
    let addr = AgentAddr::Vsock {
        cid: VMADDR_CID_LOCAL,
        port,
    };
    let opts = ConnectOptions::default().with_timeout(Duration::from_secs(1));
    let mut s = match connect(&addr, &opts).await {
        Ok(s) => s,
        Err(e) => {
            server.abort();
            eprintln!(
                "SKIPPED vsock_loopback_round_trip: no vsock loopback transport \
                 (is the vsock_loopback module loaded?): {e}"
            );
            return;
        }
    };
    assert!(matches!(s, AgentStream::Vsock(_)));
    s.write_all(b"vsok").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"vsok");
    server.await.unwrap();

    // And the same through AgentListener.
    let port = port + 1;
    let Ok(listener) = AgentListener::bind(&AgentAddr::Vsock {
        cid: VMADDR_CID_ANY,
        port,
    }) else {
        eprintln!("SKIPPED AgentListener part: cannot bind vsock port {port}");
        return;
    };
    let server = tokio::spawn(async move {
        let mut s = listener.accept().await.unwrap();
        s.write_all(b"ok").await.unwrap();
    });
    let mut s = connect(
        &AgentAddr::Vsock {
            cid: VMADDR_CID_LOCAL,
            port,
        },
        &opts,
    )
    .await
    .unwrap();
    let mut buf = [0u8; 2];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ok");
    server.await.unwrap();
}
