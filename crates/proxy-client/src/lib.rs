//! Client library of `cc-proxy`, for the programs on the host side of a VM:
//! container **runtimes** (register VMs, send agent commands, hand out I/O
//! tokens) and **shims** (one per container process: stdin in, stdout,
//! stderr and the exit code out, signals and window size).
//!
//! - [`Client`]: a runtime's connection. [`register_vm`](Client::register_vm),
//!   [`attach_vm`](Client::attach_vm), [`unregister_vm`](Client::unregister_vm),
//!   [`hyper`](Client::hyper) (returns the agent's raw reply), [`log`](Client::log).
//! - [`Shim`] and [`ShimEvents`]: a shim's connection, from
//!   [`Shim::connect`] or [`Client::connect_shim`].
//!   [`send_stdin`](Shim::send_stdin) (any size), [`close_stdin`](Shim::close_stdin),
//!   [`signal`](Shim::signal), [`resize`](Shim::resize),
//!   [`disconnect`](Shim::disconnect), [`reconnect`](Shim::reconnect);
//!   the events are [`ShimEvent::Stdout`], [`ShimEvent::Stderr`] and
//!   [`ShimEvent::Exited`].
//! - [`blocking`]: the same API without async.
//! - [`Error`] keeps apart a lost connection, a protocol violation by the
//!   proxy, and the proxy's refusal of a command (with its message).
//!
//! The crate also builds two programs (feature `cli`, on by default; turn
//! it off with `default-features = false` to link the library without
//! clap and nix): `cc-proxy-shim`, a drop-in replacement of Clear
//! Containers' `cc-shim` (`-c <container> -t <token> -u unix://<socket>`),
//! and `cc-proxy-ctl`, a command line for people.
//!
//! # A runtime starting a process, and its shim
//!
//! This example runs as it is (`cargo test --doc`): its hidden lines start
//! a real `cc-proxy` in the background and a mock hyperstart agent that
//! plays the VM.
//!
//! ```
//! use proxy_client::{Client, VmSpec};
//! # use proxy_test_support::{hyper::Code, MockAgent, TempDir};
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = TempDir::new();
//! # let proxy_socket = dir.socket("proxy.sock");
//! # let config = proxy_server::config::Config::parse_args([
//! #     "cc-proxy", "-socket-path", proxy_socket.to_str().unwrap(), "-ksm", "initial", "-log", "error",
//! # ]).unwrap();
//! # std::thread::spawn(move || {
//! #     let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
//! #     let _ = rt.block_on(proxy_server::server::run(config));
//! # });
//! # while std::os::unix::net::UnixStream::connect(&proxy_socket).is_err() {
//! #     tokio::time::sleep(std::time::Duration::from_millis(10)).await;
//! # }
//! # let mut agent = MockAgent::start().await;
//! # let ctl_sock = agent.ctl_path().display().to_string();
//! # let io_sock = agent.io_path().display().to_string();
//! # let vm = tokio::spawn(async move {
//! #     let newcontainer = agent.expect_ctl_json(Code::NewContainer).await;
//! #     let seq = newcontainer["process"]["stdio"].as_u64().unwrap();
//! #     agent.reply_ack(b"").await;
//! #     assert_eq!(&agent.expect_io(seq).await[..], b"hello\n");
//! #     agent.send_io(seq, b"hello\n").await;
//! #     agent.send_exit(seq, 0).await;
//! #     agent
//! # });
//! // The runtime registers the VM: the proxy connects to the agent's
//! // channels (here virtio-serial sockets) and answers once it is READY.
//! let runtime = Client::connect(proxy_socket.as_path()).await?;
//! let io = runtime
//!     .register_vm(VmSpec::new("pod-1", ctl_sock, io_sock).tokens(1))
//!     .await?;
//!
//! // The shim claims the token (cc-proxy-shim -t <token> -u <io.url> does
//! // this in its own process)…
//! let (shim, mut events) = runtime.connect_shim(&io.tokens[0]).await?;
//!
//! // …and the runtime starts the process with it: the proxy points the
//! // process's stdio at the token's session.
//! let data = r#"{"id":"c1","process":{"args":["cat"],"terminal":false}}"#;
//! runtime.hyper("newcontainer", &io.tokens, Some(data)).await?;
//!
//! shim.send_stdin(&b"hello\n"[..]).await?;
//! shim.close_stdin().await?;
//! let out = events.collect().await?;
//! assert_eq!((&out.stdout[..], out.code), (&b"hello\n"[..], 0));
//! # vm.await?;
//! # Ok(())
//! # }
//! ```
//!
//! # A shim streaming its process's output
//!
//! ```no_run
//! use proxy_client::{Shim, ShimEvent};
//! use tokio::io::AsyncWriteExt;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let (shim, mut events) = Shim::connect("unix:///run/cc-proxy/proxy.sock", "the-token").await?;
//! shim.send_stdin(&b"input\n"[..]).await?;
//! shim.close_stdin().await?;
//! let code = loop {
//!     match events.recv().await? {
//!         ShimEvent::Stdout(b) => tokio::io::stdout().write_all(&b).await?,
//!         ShimEvent::Stderr(b) => tokio::io::stderr().write_all(&b).await?,
//!         ShimEvent::Exited(code) => break code,
//!     }
//! };
//! std::process::exit(code.into());
//! # }
//! ```
//!
//! `examples/runtime.rs` and `examples/shim.rs` are these two as programs
//! (`cargo run -p proxy-client --example runtime -- --help`).

#![warn(missing_docs)]

mod addr;
pub mod blocking;
mod client;
mod conn;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod shim;

pub use addr::{ProxyAddr, MAX_SOCKET_PATH_LEN};
pub use client::{Client, LogLevel, Token, VmIo, VmSpec};
pub use error::{Error, Result};
pub use shim::{
    Output, ReconnectPolicy, Shim, ShimEvent, ShimEvents, RECLAIM_ATTEMPTS, STDIN_CHUNK,
};

/// Re-exported: the command opcodes named in [`Error::Proxy`], and payload
/// buffers.
pub use proxy_proto::{bytes, Command};
