//! Test doubles for `cc-proxy`, in the language of the protocol (as h2's
//! mock peers are): a [`MockAgent`] that plays the VM's hyperstart agent on
//! two unix sockets, a [`MockClient`] that plays a runtime or a shim, a
//! [`ProxyProcess`] that runs the daemon under test, and short [`TempDir`]s
//! for unix sockets. A dev-dependency only.
//!
//! Every wait is bounded ([`DEFAULT_TIMEOUT`]) and panics with a message
//! that names what was expected and what came instead; a failing test
//! prints the daemon's log.
//!
//! - [`MockAgent`] listens on `ctl.sock` and `io.sock` as QEMU's
//!   virtio-serial chardevs do and accepts the proxy in the background
//!   ([`ReadyMode`]: READY on connect, by hand or never, or close at once).
//!   `expect_ctl`, `reply_ack`, `reply_error`, `send_io`, `expect_io`,
//!   `read_io_until`, `send_exit`, garbage and raw streams for faults,
//!   `close`/`vanish`. [`MockAgent::auto_respond`] hands ctl to an
//!   [`AutoResponder`] (concurrency tests); [`MockAgent::io_writer_task`]
//!   hands io's write side to an [`IoWriter`] whose sends never block the
//!   test (back-pressure tests).
//! - [`MockClient`] is a runtime or a shim: `register_vm`, `attach_vm`,
//!   `hyper`, `connect_shim`, `stdin`, `signal`, `expect_stdout`,
//!   `expect_exit`, `expect_closed`, and `send_raw` for split or malformed
//!   frames. Frames that come while a helper waits for another are kept.
//! - [`ProxyProcess`] runs `cc-proxy -socket-path <tmp>/proxy.sock --log
//!   debug --ksm initial …` (or pod mode), waits until it accepts, keeps its
//!   log, kills it on drop; `terminate` sends SIGTERM.
//! - [`scenario`] has the common steps ([`scenario::Vm`],
//!   `start_container`) and [`assert_serves_fresh_vm`], the end-to-end
//!   check to run after every fault.
//!
//! ```no_run
//! use proxy_test_support::{MockAgent, ProxyProcess};
//! use proxy_test_support::hyper::Code;
//!
//! # async fn example() {
//! // In proxy-server's tests: env!("CARGO_BIN_EXE_cc-proxy").
//! let proxy = ProxyProcess::builder("target/debug/cc-proxy")
//!     .args(["--ready-timeout", "2s"])
//!     .start()
//!     .await;
//! let mut agent = MockAgent::start().await; // sends READY when connected
//! let mut runtime = proxy.client().await;
//! let io = runtime.register_agent("pod-1", &agent, 1).await.unwrap();
//! let token = io.tokens[0].as_str();
//! let tokens = [token];
//!
//! let mut shim = proxy.client().await;
//! shim.connect_shim(token).await.unwrap();
//!
//! let data = r#"{"container":"c1","process":{"args":["cat"]}}"#;
//! let (reply, _) = tokio::join!(
//!     runtime.hyper("execcmd", &tokens, Some(data)),
//!     async {
//!         let cmd = agent.expect_ctl_json(Code::ExecCmd).await;
//!         assert_eq!(cmd["process"]["stdio"], 3);
//!         agent.reply_ack(b"").await;
//!     }
//! );
//! reply.unwrap();
//!
//! shim.stdin(&b"hello"[..]).await;
//! assert_eq!(&agent.expect_io(3).await[..], b"hello");
//! agent.send_io(3, b"world").await;
//! assert_eq!(&shim.expect_stdout(5).await[..], b"world");
//! agent.send_exit(3, 0).await;
//! assert_eq!(shim.expect_exit().await, 0);
//! # }
//! ```

use std::time::Duration;

mod agent;
mod client;
mod process;
pub mod scenario;
mod tempdir;

pub use agent::{
    AsCode, AutoReply, AutoResponder, Elapsed, IoWriter, MockAgent, MockAgentBuilder, ReadyMode,
};
pub use client::{describe, error_msg, MockClient, Recv};
pub use process::{ProxyProcess, ProxyProcessBuilder};
pub use scenario::assert_serves_fresh_vm;
pub use tempdir::TempDir;

/// The protocol crate's types, re-exported so that tests need one import.
pub use proxy_proto;

/// hyperstart ctl and io types.
pub mod hyper {
    pub use proxy_proto::hyper::ctl::{Code, CtlMessage};
    pub use proxy_proto::hyper::io::{IoMessage, MAX_IO_DATA};
    pub use proxy_proto::hyper::MAX_MESSAGE_LEN;
}

/// How long every `expect_*` waits by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// `bytes` as text for failure messages, cut at `max` bytes.
pub(crate) fn lossy(bytes: &[u8], max: usize) -> String {
    let cut = bytes.len().min(max);
    let mut s = String::from_utf8_lossy(&bytes[..cut]).into_owned();
    if bytes.len() > max {
        s.push_str(&format!("… ({} bytes)", bytes.len()));
    }
    s
}
