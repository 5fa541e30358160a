//! The destination's errors, in words an operator can act on.

use crate::codec::CodecError;
use crate::sys::mem::MemError;
use crate::sys::ring::RingError;
use crate::sys::uffd::UffdError;

/// Errors of the destination engine.
#[derive(Debug, thiserror::Error)]
pub enum DestError {
    /// The first connection of a migration was accepted, but the peer said nothing.
    #[error(
        "{addr} accepted the connection but said nothing within {waited_ms} ms: a postcopy \
         source answers at once; is `postcopy serve` listening on that port?"
    )]
    NoAnswer {
        /// The address.
        addr: String,
        /// How long we waited.
        waited_ms: u64,
    },
    /// Could not reach the source.
    #[error("cannot connect to source {addr}: {source}; is `postcopy serve` running there?")]
    Connect {
        /// Address tried.
        addr: String,
        /// The error.
        source: std::io::Error,
    },
    /// A socket error.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The error.
        source: std::io::Error,
    },
    /// The source sent a malformed or out-of-range frame.
    #[error("bad frame from source ({context}): {source}")]
    Protocol {
        /// Where.
        context: String,
        /// What was wrong.
        source: CodecError,
    },
    /// The source reported an error.
    #[error("source reported an error: {0}")]
    Remote(String),
    /// The source closed a connection early.
    #[error("source closed the {0} connection before the migration completed ({1} pages of this worker still missing)")]
    Closed(&'static str, u64),
    /// The source could not be reached again after a connection broke.
    #[error("in postcopy, the source has been unreachable for {seconds} s after a connection broke ({last}); {missing} pages of this worker are still missing, so the workload's memory is incomplete: restart the source with the same image within --recovery-timeout, or give up the migration")]
    SourceLost {
        /// Seconds tried.
        seconds: u64,
        /// Pages of the worker still missing.
        missing: u64,
        /// The last connection error.
        last: String,
    },
    /// Precopy's connection broke and the source could not be reached again in time.
    #[error("in precopy, the source has been unreachable for {seconds} s after the precopy connection broke ({last}); {received} of {total} pages had arrived. The migration had not switched over: the workload still runs on the source and nothing is lost; start the migration again")]
    PrecopyLost {
        /// Seconds tried.
        seconds: u64,
        /// Pages received so far.
        received: u64,
        /// Pages of the image.
        total: u64,
        /// The break and the last connection error.
        last: String,
    },
    /// Nothing arrived on a connection for the link timeout, not even a heartbeat.
    #[error("nothing from the source on {connection} for {seconds} s, not even a heartbeat: the link is down or the source is stuck ({missing} pages still missing there)")]
    Stalled {
        /// Which connection, and in which phase.
        connection: String,
        /// Seconds waited.
        seconds: u64,
        /// Pages still missing (of the worker's shard; of the whole image in precopy).
        missing: u64,
    },
    /// A peer failed authentication, or a frame its integrity check.
    #[error("{0}")]
    Auth(#[from] crate::link::auth::AuthError),
    /// TLS failed.
    #[error("{0}")]
    Tls(#[from] crate::link::tls::TlsError),
    /// A userfaultfd operation failed.
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// An io_uring operation failed.
    #[error(transparent)]
    Ring(#[from] RingError),
    /// A mapping failed.
    #[error(transparent)]
    Mem(#[from] MemError),
    /// The source serves a block in pages of another size than this memory maps.
    #[error("the source serves block {block:?} in {} pages, but --memory {memory} maps {} pages: serve the image with --page-size {} (or choose a memory kind of {} pages)", crate::layout::page_size_name(*served), crate::layout::page_size_name(*wanted), crate::layout::page_size_name(*wanted), crate::layout::page_size_name(*served))]
    PageSize {
        /// The block.
        block: String,
        /// Its page size at the source.
        served: u64,
        /// The memory kind asked for.
        memory: &'static str,
        /// The page size that memory maps.
        wanted: u64,
    },
    /// The layout cannot be served here.
    #[error("layout not supported here: {0}")]
    Unsupported(String),
    /// Stopped by the embedder.
    #[error("stopped before the migration completed")]
    Stopped,
    /// A worker thread panicked (a bug).
    #[error("worker {0} panicked")]
    Panicked(usize),
}

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> DestError {
    let context = context.into();
    move |source| DestError::Io { context, source }
}
