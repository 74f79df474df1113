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
//! The crate also builds two programs: `cc-proxy-shim`, a drop-in
//! replacement of Clear Containers' `cc-shim` (`-c <container> -t <token>
//! -u unix://<socket>`), and `cc-proxy-ctl`, a command line for people.
//!
//! # A runtime starting a process
//!
//! ```no_run
//! use proxy_client::{Client, VmSpec};
//!
//! # async fn run() -> Result<(), proxy_client::Error> {
//! let client = Client::connect("unix:///run/cc-proxy/proxy.sock").await?;
//! // The proxy connects to the agent's channels and answers once it is READY.
//! let io = client
//!     .register_vm(VmSpec::new("pod-1", "/run/vm/pod-1/ctl.sock", "/run/vm/pod-1/io.sock").tokens(1))
//!     .await?;
//! client.hyper("startpod", &[], Some(r#"{"hostname":"pod-1"}"#)).await?;
//! // Hand io.tokens[0] and io.url to the shim (cc-proxy-shim -t … -u …), then
//! // start the process with the token: its stdio goes to that shim.
//! let data = r#"{"id":"c1","process":{"args":["sh","-c","echo hi"],"terminal":false}}"#;
//! client.hyper("newcontainer", &io.tokens[..1], Some(data)).await?;
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
mod shim;

pub use addr::{ProxyAddr, MAX_SOCKET_PATH_LEN};
pub use client::{Client, LogLevel, Token, VmIo, VmSpec};
pub use error::{Error, Result};
pub use shim::{Output, ReconnectPolicy, Shim, ShimEvent, ShimEvents, STDIN_CHUNK};

/// Re-exported: the command opcodes named in [`Error::Proxy`], and payload
/// buffers.
pub use proxy_proto::{bytes, Command};
