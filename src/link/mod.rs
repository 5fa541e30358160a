//! The link layer: what every connection does before and around the protocol's frames.
//!
//! - [`auth`]: the pre-shared key and its proofs; [`handshake`]: the challenge-response
//!   ([`handshake::accept`] on the source, [`handshake::connect`] on the destination).
//! - [`seal`]: the per-frame AES-GCM seal of an authenticated connection.
//! - [`framed`]: [`FramedStream`], the one blocking reader and writer of frames (tag checked
//!   before a frame is returned, `Error` frames included).
//! - [`liveness`]: heartbeats and the link timeout (when a silent connection is dead).
//! - [`tls`]: optional TLS 1.3 under everything (a relay keeps the engine's io_uring path on a
//!   plain socket).
//!
//! Nothing here knows the source or the destination: both sides build on it.

pub mod auth;
pub mod framed;
pub mod handshake;
pub mod liveness;
pub mod seal;
pub mod tls;

pub use framed::{FramedStream, LinkError, Polled};
pub use liveness::Liveness;
