//! What an operator or an embedder sets: the server's limits, precopy's switchover rule, a live
//! source's parts.

use std::time::Duration;

use crate::dirty::DirtyTracker;
use crate::link::auth::Key;
use crate::live::SourceWorkload;

/// Source configuration.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    /// Serve one session, then return from [`super::SourceServer::run`].
    pub once: bool,
    /// Time a new connection has to send its `Hello`.
    pub handshake_timeout: Duration,
    /// Most sessions served at once.
    pub max_sessions: usize,
    /// A write that blocks this long (the destination stopped reading) ends its session.
    pub write_timeout: Duration,
    /// Most pages sent ahead of a sequential reader's fault with the reply (0: no prefetch).
    pub prefetch_max: u64,
    /// Test hook: delay before answering each urgent request (forces stream/request races).
    pub urgent_delay: Duration,
    /// Test hook: the urgent connection's thread panics at its `n`-th request (0: never), to
    /// show that a panic ends its session cleanly.
    #[doc(hidden)]
    pub debug_panic_at_request: u64,
    /// Print a line per session to stderr.
    pub verbose: bool,
    /// When precopy (offered by the destination) switches over.
    pub precopy: PrecopyLimits,
    /// The pre-shared key: every connection must prove it holds it, every frame is sealed
    /// ([`crate::link::auth`]). `None`: no authentication (a trusted network only).
    pub key: Option<Key>,
    /// A session whose connection broke waits this long for the destination to reconnect
    /// (recovery) before it is given up. Zero: a broken connection fails the session.
    pub recovery_timeout: Duration,
    /// TLS 1.3 on every connection ([`crate::link::tls`]); `None`: plain TCP.
    pub tls: Option<crate::link::tls::TlsServer>,
    /// A connection on which the destination should speak and nothing (not even a heartbeat)
    /// arrives for this long is dead; heartbeats go out on idle connections at a quarter of it
    /// ([`crate::link::liveness`]).
    pub link_timeout: Duration,
    /// The image's working set, learned from the requests and pushed first in every session's
    /// stream ([`super::WorkingSet`]); `None`: neither learned nor pushed. A live source never
    /// has one (its memory changes).
    pub working_set: Option<super::WorkingSetConfig>,
}

/// When precopy stops sending rounds and switches over to postcopy. The first round (every
/// page) always runs; after each round the dirty set is read, and the source switches over as
/// soon as any limit holds. Pages still dirty are discarded on the destination and fetched in
/// postcopy.
#[derive(Clone, Debug)]
pub struct PrecopyLimits {
    /// Most rounds, the full pass included.
    pub max_rounds: u32,
    /// Switch over once at most this many pages are dirty.
    pub max_dirty_pages: u64,
    /// Switch over after this long in precopy.
    pub max_duration: Duration,
}

impl Default for PrecopyLimits {
    fn default() -> Self {
        PrecopyLimits {
            max_rounds: 8,
            max_dirty_pages: 1024,
            max_duration: Duration::from_secs(30),
        }
    }
}

/// A live source's moving parts: a dirty tracker per block and the workload to stop at
/// switchover.
pub struct LiveParts {
    /// One tracker per block of the image's layout, in block order.
    pub trackers: Vec<Box<dyn DirtyTracker>>,
    /// The workload writing the memory.
    pub workload: Box<dyn SourceWorkload>,
}

impl SourceConfig {
    /// The liveness rules of every connection ([`crate::link::liveness`]).
    pub fn liveness(&self) -> crate::link::Liveness {
        crate::link::Liveness::new(self.link_timeout)
    }
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            once: false,
            handshake_timeout: Duration::from_secs(10),
            max_sessions: 64,
            write_timeout: Duration::from_secs(60),
            prefetch_max: 64,
            urgent_delay: Duration::ZERO,
            debug_panic_at_request: 0,
            verbose: true,
            precopy: PrecopyLimits::default(),
            key: None,
            recovery_timeout: Duration::from_secs(60),
            tls: None,
            link_timeout: crate::link::liveness::DEFAULT_LINK_TIMEOUT,
            working_set: None,
        }
    }
}
