//! Wire formats of the cc-proxy protocol, version 2, and of the hyperstart
//! agent protocol behind it — bytes in, values out, no I/O.
//!
//! This crate is what the daemon, the client library, the guest agent and
//! downstream shims and runtimes share. It is sans-IO (like quinn-proto and
//! rustls): it never touches a socket, never spawns, never sleeps.
//!
//! - [`frame`]: the 12-byte proxy frame header. [`RawHeader::parse`] never
//!   fails; [`RawHeader::validate`] applies the rules of docs/PROTOCOL.md §2.
//! - [`FrameDecoder`] (feature `alloc`): incremental decoding over a byte
//!   buffer — *need more*, *one frame* or *malformed* — that checks the
//!   declared length against [`Limits`] before buffering anything, and
//!   hands out payloads as zero-copy [`bytes::Bytes`].
//! - [`Decode`] (feature `alloc`): the one shape of the frame, ctl and io
//!   decoders, for drivers that read any of them with one loop.
//! - [`payload`] (feature `serde`): the JSON payloads with the wire's exact
//!   key names.
//! - [`hyper`]: the agent's ctl and io framing, the command code table, and
//!   the relocation of a process's stdio onto a session's sequence numbers.
//!
//! Features: `alloc` (owned frames and decoders), `std` (std error impls;
//! default), `serde` (typed payloads; default). Without any, the crate is
//! `#![no_std]` and offers the header types and code tables.
//!
//! # Example
//!
//! A runtime's RegisterVM command, as bytes, and the proxy decoding it:
//!
//! ```
//! use bytes::BytesMut;
//! use proxy_proto::payload::RegisterVm;
//! use proxy_proto::{Command, Frame, FrameDecoder, FrameKind, Limits};
//!
//! let register = RegisterVm {
//!     container_id: "pod-1".into(),
//!     ctl_serial: "/run/vm/ctl.sock".into(),
//!     io_serial: "/run/vm/io.sock".into(),
//!     num_io_streams: 1,
//!     ..Default::default()
//! };
//! let frame = Frame::command(Command::RegisterVm, serde_json::to_vec(&register).unwrap());
//! let mut wire = BytesMut::new();
//! frame.encode(&mut wire);
//! assert_eq!(&wire[..8], &[0, 2, 3, 0, 0, 0, 0, 0]);
//!
//! let mut decoder = FrameDecoder::new(Limits::default());
//! let got = decoder.decode(&mut wire).unwrap().expect("a whole frame");
//! assert_eq!(got.kind, FrameKind::Command(Command::RegisterVm));
//! let back: RegisterVm = serde_json::from_slice(&got.payload).unwrap();
//! assert_eq!(back, register);
//! ```

#![cfg_attr(not(feature = "std"), no_std)]
#![warn(missing_docs)]

#[cfg(feature = "alloc")]
extern crate alloc;

pub mod error;
pub mod frame;
pub mod hyper;

#[cfg(feature = "alloc")]
mod codec;
#[cfg(feature = "alloc")]
mod decode;
#[cfg(feature = "alloc")]
mod json;
#[cfg(feature = "serde")]
pub mod payload;

#[cfg(feature = "alloc")]
pub use codec::{
    decode_slice, peek_frame, Frame, FrameDecoder, FrameRef, Limits, DEFAULT_MAX_PAYLOAD,
};
#[cfg(feature = "alloc")]
pub use decode::Decode;
pub use error::{FrameError, HyperError};
pub use frame::{
    Command, FrameKind, FrameType, Header, Notification, RawHeader, Stream, HEADER_LEN,
    PROTOCOL_VERSION,
};

#[cfg(feature = "alloc")]
pub use bytes;
