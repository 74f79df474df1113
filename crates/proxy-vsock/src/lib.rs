//! Agent transports for `cc-proxy` (docs/PROTOCOL.md §8).
//!
//! Both agent channels (control and I/O) are byte streams, and the proxy
//! must not care which transport carries them. This crate gives it one
//! narrow trait, [`AgentConnector`], and one concrete implementation,
//! [`Connector`], driven by a parsed [`AgentAddr`]:
//!
//! - **unix**: `/run/vm/ctl.sock` or `unix:///run/vm/ctl.sock`;
//! - **vsock**: `vsock://<cid>:<port>` (AF_VSOCK, via `tokio-vsock`);
//! - **hybrid vsock**: `hvsock://<unix path>:<port>` (Firecracker, Cloud
//!   Hypervisor, vhost-device-vsock): connect to the unix socket, write
//!   `CONNECT <port>\n`, read `OK <n>\n` **one byte at a time** (so no byte
//!   of the raw stream that follows is swallowed), then the stream is raw.
//!
//! [`connect`] retries with backoff (10 ms doubling to 200 ms by default)
//! while the socket does not exist yet, refuses, or closes during the
//! handshake, for at most [`ConnectOptions::timeout`] in total. Every
//! [`ConnectError`] names the address and the step that failed.
//!
//! The listening side ([`HybridListener`], [`VsockListener`],
//! [`AgentListener`]) serves guest agents and tests.
//!
//! # Example
//!
//! ```
//! use proxy_vsock::{connect, AgentAddr, ConnectOptions, HybridListener};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! // Addresses parse and display back the same.
//! let addr: AgentAddr = "vsock://3:1024".parse()?;
//! assert_eq!(addr, AgentAddr::Vsock { cid: 3, port: 1024 });
//! assert_eq!(addr.to_string(), "vsock://3:1024");
//! let refused = "vsock://3".parse::<AgentAddr>().unwrap_err();
//! assert!(refused.to_string().contains("missing port"));
//!
//! // A hybrid vsock round trip against an in-process listener.
//! let dir = std::env::temp_dir().join(format!("proxy-vsock-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let path = dir.join("hv.sock");
//! let _ = std::fs::remove_file(&path);
//!
//! let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
//! rt.block_on(async {
//!     let listener = HybridListener::bind(&path, 1024)?;
//!     let addr: AgentAddr = format!("hvsock://{}:1024", path.display()).parse()?;
//!     let guest = tokio::spawn(async move {
//!         let (mut s, port) = listener.accept().await?;
//!         assert_eq!(port, 1024);
//!         s.write_all(b"hello").await?;
//!         Ok::<_, std::io::Error>(())
//!     });
//!     let mut stream = connect(&addr, &ConnectOptions::default()).await?;
//!     let mut buf = [0u8; 5];
//!     stream.read_exact(&mut buf).await?;
//!     assert_eq!(&buf, b"hello");
//!     guest.await??;
//!     Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
//! })?;
//! std::fs::remove_dir_all(&dir)?;
//! # Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
//! ```

mod addr;
mod connect;
pub mod handshake;
mod listener;
mod stream;

pub use addr::{AddrParseError, AgentAddr, MAX_UNIX_PATH_LEN};
pub use connect::{
    connect, AgentConnector, ConnectError, ConnectFuture, ConnectOptions, Connector,
};
pub use handshake::HandshakeError;
pub use listener::{AgentListener, HybridListener, VsockListener};
pub use stream::{AgentIo, AgentStream};
pub use tokio_vsock::{VMADDR_CID_ANY, VMADDR_CID_HOST, VMADDR_CID_HYPERVISOR, VMADDR_CID_LOCAL};
