//! A connection that joined its session: what every role's loop works with.

use std::net::SocketAddr;

use super::registry::Shared;
use super::session::Session;
use crate::link::FramedStream;

/// One joined connection: the server, its session, the link, the peer, the worker it serves,
/// and (a bulk connection) whether its stream is credit-driven.
pub(super) struct Joined<'a> {
    pub(super) shared: &'a Shared,
    pub(super) session: &'a Session,
    pub(super) link: &'a mut FramedStream,
    pub(super) peer: SocketAddr,
    pub(super) worker: u16,
    /// A bulk connection whose stream waits for the destination's `Credit` ([`super::credit`]).
    pub(super) credit: bool,
}
