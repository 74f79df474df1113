//! The daemon dials agents through the `AgentConnector` it is given, not a
//! fixed transport: an in-memory connector (tokio duplex pipes) serving a
//! fake agent is enough to register a VM, and a connector's failure is the
//! RegisterVM's error with its cause attached.

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use proxy_proto::hyper::ctl::{Code, CtlMessage};
use proxy_proto::payload::RegisterVm;
use proxy_server::config::Config;
use proxy_server::registry::ProxyError;
use proxy_server::server::Shared;
use proxy_vsock::{
    AgentAddr, AgentConnector, AgentStream, ConnectError, ConnectFuture, ConnectOptions,
};
use tokio::io::{AsyncWriteExt, DuplexStream};

/// Every dial gets a fresh in-memory pipe; the ctl one starts with READY.
#[derive(Debug, Default)]
struct InMemory {
    dialed: Mutex<Vec<String>>,
    /// The agent's ends, kept open for the test's length.
    agent_ends: Mutex<Vec<DuplexStream>>,
}

impl AgentConnector for InMemory {
    fn connect<'a>(&'a self, addr: &'a AgentAddr, _opts: &'a ConnectOptions) -> ConnectFuture<'a> {
        Box::pin(async move {
            let (proxy_end, mut agent_end) = tokio::io::duplex(64 * 1024);
            let name = addr.to_string();
            if name.ends_with("ctl") {
                let mut ready = BytesMut::new();
                CtlMessage::new(Code::Ready, bytes::Bytes::new())
                    .encode(&mut ready, 1024)
                    .expect("READY fits");
                agent_end.write_all(&ready).await.expect("pipe open");
            }
            self.dialed.lock().unwrap().push(name);
            self.agent_ends.lock().unwrap().push(agent_end);
            Ok(AgentStream::Other(Box::new(proxy_end)))
        })
    }
}

/// Refuses every dial.
#[derive(Debug)]
struct Refusing;

impl AgentConnector for Refusing {
    fn connect<'a>(&'a self, addr: &'a AgentAddr, _opts: &'a ConnectOptions) -> ConnectFuture<'a> {
        Box::pin(async move {
            Err(ConnectError::Connect {
                addr: addr.clone(),
                source: io::Error::new(io::ErrorKind::ConnectionRefused, "refused by the test"),
            })
        })
    }
}

fn shared(connector: Arc<dyn AgentConnector>) -> Arc<Shared> {
    let config = Config::parse_args(["cc-proxy"]).unwrap();
    Shared::with_connector(
        config,
        Path::new("/nonexistent/p.sock"),
        false,
        None,
        connector,
    )
}

fn register(id: &str) -> RegisterVm {
    RegisterVm {
        container_id: id.into(),
        // Paths nothing listens on: only the substituted connector can
        // reach them.
        ctl_serial: "/nonexistent/agent/ctl".into(),
        io_serial: "/nonexistent/agent/io".into(),
        num_io_streams: 2,
        ..Default::default()
    }
}

#[tokio::test]
async fn register_vm_dials_through_the_substituted_connector() {
    let connector = Arc::new(InMemory::default());
    let shared = shared(connector.clone());
    let (_vm, io) = shared
        .register_vm(register("in-memory"))
        .await
        .expect("registered over the in-memory transport");
    assert_eq!(io.tokens.len(), 2);
    assert_eq!(
        *connector.dialed.lock().unwrap(),
        ["/nonexistent/agent/ctl", "/nonexistent/agent/io"]
    );
}

#[tokio::test]
async fn a_connector_failure_is_agent_dial_with_its_cause() {
    let shared = shared(Arc::new(Refusing));
    let e = shared.register_vm(register("refused")).await.unwrap_err();
    match &e {
        ProxyError::AgentDial { channel, source } => {
            assert_eq!(*channel, "ctl");
            assert!(
                source.to_string().contains("refused by the test"),
                "{source}"
            );
        }
        other => panic!("not AgentDial: {other:?}"),
    }
    assert!(std::error::Error::source(&e).is_some(), "the cause is kept");
    assert_eq!(
        shared.state().registry.vm_count(),
        0,
        "nothing stays registered"
    );
}
