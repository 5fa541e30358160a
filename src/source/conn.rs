//! The source's use of the link layer: frames from a destination, and link errors in the
//! source's words.

use std::net::SocketAddr;

use super::error::SourceError;
use crate::codec::{CodecError, Header, Kind};
use crate::link::{FramedStream, LinkError, Liveness, Polled};
use std::time::Duration;

/// What the source admits from a destination: anything but `Pages`, which no destination
/// sends (refused at its header).
fn admit(h: &Header) -> Result<(), CodecError> {
    match h.kind {
        Kind::Pages => Err(CodecError::Unexpected {
            got: h.kind,
            expected: "a request or control frame",
        }),
        _ => Ok(()),
    }
}

/// Reads the next frame from the destination (its tag checked on an authenticated link); a
/// `Pages` frame, which no destination sends, is refused at its header.
pub(super) fn read_frame(
    link: &mut FramedStream,
    peer: SocketAddr,
) -> Result<Option<Header>, SourceError> {
    link.read_frame_if(admit).map_err(link_err(peer))
}

/// A write's link error, in the source's words (what was sent, to whom).
pub(super) fn write_err(
    what: &str,
    peer: SocketAddr,
) -> impl FnOnce(LinkError) -> SourceError + '_ {
    move |e| match e {
        LinkError::Io { source, .. } => SourceError::Io {
            context: format!("{what} to {peer}"),
            source,
        },
        e => link_err(peer)(e),
    }
}

/// A link error, in the source's words (naming the peer).
pub(super) fn link_err(peer: SocketAddr) -> impl FnOnce(LinkError) -> SourceError {
    move |e| match e {
        LinkError::Io { what, source } => SourceError::Io {
            context: format!("{what} from {peer}"),
            source,
        },
        LinkError::Protocol(source) => SourceError::Protocol { peer, source },
        LinkError::Auth(e) => SourceError::Auth(e),
        LinkError::Remote(message) => SourceError::Remote { peer, message },
    }
}

/// Waits at most one heartbeat interval for the next frame of a connection that must not end
/// here, keeping the link alive ([`FramedStream::poll_frame`]): `None` if none came yet. A
/// destination silent for `silence` is gone; one that hangs up is an incomplete session.
pub(super) fn poll_next(
    link: &mut FramedStream,
    peer: SocketAddr,
    live: &Liveness,
    silence: Option<Duration>,
    session: u64,
    closed: impl FnOnce() -> String,
) -> Result<Option<Header>, SourceError> {
    match link
        .poll_frame(live, silence, &mut admit)
        .map_err(link_err(peer))?
    {
        Polled::Idle => Ok(None),
        Polled::Frame(Some(h)) => Ok(Some(h)),
        Polled::Frame(None) => Err(SourceError::Incomplete {
            session,
            reason: closed(),
        }),
    }
}

/// The next frame of a connection that must not end here: a destination that hangs up is an
/// incomplete session (`closed` says which connection), which recovery may resume.
pub(super) fn next_frame(
    link: &mut FramedStream,
    peer: SocketAddr,
    session: u64,
    closed: impl FnOnce() -> String,
) -> Result<Header, SourceError> {
    read_frame(link, peer)?.ok_or_else(|| SourceError::Incomplete {
        session,
        reason: closed(),
    })
}
