//! The hyperstart agent protocol (docs/PROTOCOL.md §6–§7): the ctl channel
//! (commands and replies) and the io channel (multiplexed stdio).
//!
//! Both live here, beside the proxy frame, so that a guest agent can depend
//! on this crate alone.

pub mod ctl;
#[cfg(feature = "alloc")]
pub mod io;
#[cfg(feature = "serde")]
pub mod relocate;
#[cfg(feature = "serde")]
pub mod types;

/// The agent's buffer: no single ctl or io message may exceed this many
/// bytes, header included.
pub const MAX_MESSAGE_LEN: usize = 10240;
