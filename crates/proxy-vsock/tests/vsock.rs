//! AF_VSOCK without a VM: a round trip over the loopback transport (cid 1,
//! `VMADDR_CID_LOCAL`, the `vsock_loopback` module). Few hosts have it
//! (`CONFIG_VSOCKETS_LOOPBACK`), so the test is ignored by default and,
//! when run, fails loudly if it cannot run; it never passes by skipping.
//! `cargo xtask e2e` runs the same round trip for real inside each guest
//! (docs/E2E.md).

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
#[ignore = "needs AF_VSOCK with the vsock_loopback transport (cid 1), which most hosts lack; \
            run with `cargo test -p proxy-vsock --test vsock -- --ignored` where it exists; \
            `cargo xtask e2e` runs the round trip inside its guests"]
async fn vsock_loopback_round_trip() {
    assert!(
        std::path::Path::new("/dev/vsock").exists(),
        "/dev/vsock does not exist: this host has no AF_VSOCK (load the vsock module)"
    );
    let port = test_port();
    let listener = VsockListener::bind(VMADDR_CID_ANY, port)
        .unwrap_or_else(|e| panic!("cannot bind vsock port {port}: {e}"));
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
            panic!(
                "no vsock loopback transport (is the vsock_loopback module loaded? \
                 /sys/module/vsock_loopback exists: {}): {e}",
                std::path::Path::new("/sys/module/vsock_loopback").exists()
            );
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
    let listener = AgentListener::bind(&AgentAddr::Vsock {
        cid: VMADDR_CID_ANY,
        port,
    })
    .unwrap_or_else(|e| panic!("cannot bind vsock port {port}: {e}"));
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
