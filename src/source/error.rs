//! The source's errors, in words an operator can act on.

use std::net::SocketAddr;

use crate::codec::CodecError;
use crate::dirty::DirtyError;

/// Errors of the source server.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A socket error on a session (the most common: a broken connection, which recovery
    /// may repair).
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The error.
        source: std::io::Error,
    },
    /// Binding the listen address failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The error.
        source: std::io::Error,
    },
    /// The destination sent something malformed.
    #[error("bad frame from destination {peer}: {source}")]
    Protocol {
        /// The peer.
        peer: SocketAddr,
        /// What was wrong.
        source: CodecError,
    },
    /// The destination reported an error.
    #[error("destination {peer} reported: {message}")]
    Remote {
        /// The peer.
        peer: SocketAddr,
        /// Its message.
        message: String,
    },
    /// A peer failed authentication, or a frame its integrity check.
    #[error("{0}")]
    Auth(#[from] crate::link::auth::AuthError),
    /// Dirty tracking failed during precopy.
    #[error("precopy: {0}")]
    Dirty(#[from] DirtyError),
    /// A live source serves one migration of its memory.
    #[error("this live source's memory belongs to another migration: one that switched over (its workload is stopped; start a new source for another migration), or one still in precopy or waiting up to --recovery-timeout for its destination to come back (retry after it)")]
    LiveUsed,
    /// The session ended without the destination confirming every page.
    #[error(
        "session {session:#x} ended before the destination confirmed it had every page ({reason})"
    )]
    Incomplete {
        /// Session id.
        session: u64,
        /// Why.
        reason: String,
    },
}

pub(super) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> SourceError {
    let context = context.into();
    move |source| SourceError::Io { context, source }
}
