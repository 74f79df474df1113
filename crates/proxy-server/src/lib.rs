//! The `cc-proxy` daemon: it sits between container runtimes and shims
//! (clients on an AF_UNIX socket) and the hyperstart agent inside each VM,
//! registers VMs, arbitrates the agent's control channel and routes every
//! container process's stdin, stdout, stderr, signals and exit status.
//!
//! The crate is laid out as `docs/ARCHITECTURE.md` describes:
//!
//! - [`registry`]: the rules, sans IO — VMs, tokens, sessions, roles,
//!   relocation, what a signal becomes. Unit-tested without sockets.
//! - [`session`]: a token's bounded output queue and its waits.
//! - [`vm`]: per VM one ctl task (one transaction in flight, replies in
//!   order) and the io reader/writer tasks.
//! - [`conn`]: per client connection a reader (frames → rules) and a
//!   writer (responses and session output, vectored writes).
//! - [`server`]: the listening socket, shared state, shutdown.
//! - [`metrics`]: the opt-in Prometheus endpoint (docs/METRICS.md).
//! - [`config`], [`ksm`], [`logging`]: the command line, KSM throttling,
//!   tracing setup; [`notify`]: systemd readiness; [`redact`]: tokens in
//!   logs.
//!
//! # Example
//!
//! Running a daemon inside a program (the `cc-proxy` binary does the same
//! after parsing its command line):
//!
//! ```no_run
//! use proxy_server::config::Config;
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = Config::parse_args(["cc-proxy", "-socket-path", "/tmp/cc-proxy.sock", "-ksm", "initial"])?;
//! proxy_server::server::run(config).await?;
//! # Ok(()) }
//! ```
//!
//! The rules can be exercised without any I/O:
//!
//! ```
//! use proxy_server::registry::Registry;
//! use proxy_proto::payload::RegisterVm;
//!
//! let mut r = Registry::new();
//! let req = RegisterVm {
//!     container_id: "pod".into(),
//!     ctl_serial: "/run/vm/ctl.sock".into(),
//!     io_serial: "/run/vm/io.sock".into(),
//!     num_io_streams: 2,
//!     ..Default::default()
//! };
//! let mut n = 0;
//! let (_vm, tokens) = r.register_vm(&req, || { n += 1; format!("token-{n}") }).unwrap();
//! assert_eq!(tokens.iter().map(|t| t.io_base).collect::<Vec<_>>(), [3, 5]);
//! assert!(r.register_vm(&req, || "x".into()).is_err(), "duplicate containerId");
//! ```

pub mod config;
pub mod driver;
pub mod ksm;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod panics;
pub mod redact;
pub mod rules;
pub mod session;

// The drivers and the registry where they have always been found.
pub use driver::{agent, conn, reader, server, timer, vm};
pub use rules::registry;
