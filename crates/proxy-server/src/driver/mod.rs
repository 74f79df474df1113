//! The IO: tasks that own the sockets and timers, feed the sans-IO
//! machines in [`crate::rules`] and carry out what they say
//! (docs/CORE.md).
//!
//! - [`server`]: the listening socket, RegisterVM bring-up, teardown,
//!   shutdown, signals.
//! - [`conn`]: per client connection a reader (frames → [`crate::rules::client`])
//!   and a writer (responses and session output, vectored writes).
//! - [`vm`]: per VM a ctl task ([`crate::rules::ctl`]), an io reader
//!   ([`crate::rules::demux`]) and an io writer.
//! - [`agent`]: dialling the agent's channels through proxy-vsock's
//!   `AgentConnector`.
//! - [`reader`]: the one read-and-decode loop; [`timer`]: the one lazily
//!   moved timer per task; `wire`: batches for `writev`; `queue`: the
//!   bounded queues a VM's tasks take requests from.

pub mod agent;
pub mod conn;
pub(crate) mod inbox;
pub(crate) mod queue;
pub mod reader;
pub mod server;
pub mod timer;
pub mod vm;
pub(crate) mod wire;
