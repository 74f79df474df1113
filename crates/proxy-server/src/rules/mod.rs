//! The proxy's rules as plain state machines, sans IO: nothing in here
//! touches a socket, a task or a clock. Inputs are events (a decoded
//! frame, an agent message, a write completing, `now`); outputs are
//! actions for the drivers to perform (bytes to send where, a response, a
//! teardown, the next deadline). The drivers in [`crate::conn`],
//! [`crate::vm`] and [`crate::server`] own the sockets and timers and do
//! nothing but feed these machines and carry out what they say; the
//! deterministic simulation (`cargo xtask sim`) drives the same machines
//! with simulated peers and a simulated clock.

pub mod client;
pub mod ctl;
pub mod demux;
pub mod output;
pub mod registry;
pub mod rng;
