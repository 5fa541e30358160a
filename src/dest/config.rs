//! What an embedder sets: the source, the workers, timeouts, zero pages, precopy, security.

use crate::link::auth::Key;
use std::time::Duration;

/// Engine configuration.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Where the migration's live counters and phase are published (the progress line, the
    /// report's timeline, `/metrics` read them). One per migration.
    pub gauges: std::sync::Arc<super::gauges::Gauges>,
    /// Source address, `HOST:PORT`.
    pub source: String,
    /// Number of workers (each with its own uffd shard, ring and connections).
    pub workers: usize,
    /// Pin worker `w` to CPU `w % cpus`.
    pub pin: bool,
    /// Open bulk connections (the background stream).
    pub stream: bool,
    /// The bulk halves connect only once released (`Go`), beside the urgent halves already
    /// serving faults: nothing but the urgent connection is on the first fault's path (the
    /// handler's prepared sessions). Off: they connect in [`super::Engine::prepare`].
    pub bulk_joins_after_go: bool,
    /// A connection on which nothing (not even a heartbeat) arrives for this long is dead and
    /// is replaced (recovery); also the bound of each reconnection's handshake. See
    /// [`crate::link::liveness`].
    pub link_timeout: Duration,
    /// Connect/handshake timeout.
    pub connect_timeout: Duration,
    /// Ask the source for its zero-page map and place those pages locally at start-up (no
    /// fault, request or stream for them).
    pub zero_map: bool,
    /// How zero pages are placed.
    pub zero_fill: ZeroFill,
    /// Most bulk streams placing at once (0: one per worker). Fewer streams leave CPU to the
    /// workload and the fault path on a small machine, at the cost of stream throughput.
    pub max_streams: usize,
    /// Offer the source a precopy phase (then call [`super::receive_precopy`] before
    /// [`super::Engine::start`]). Off: pure postcopy.
    pub precopy: bool,
    /// The pre-shared key ([`crate::link::auth`]): prove it on every connection, seal every frame.
    /// `None`: no authentication (a trusted network only).
    pub key: Option<Key>,
    /// A connection that breaks in postcopy is reopened (with backoff) for this long before the
    /// migration is given up; faulting threads stay blocked meanwhile. Zero: fail at once.
    pub recovery_timeout: Duration,
    /// TLS 1.3 to the source ([`crate::link::tls`]); `None`: plain TCP.
    pub tls: Option<crate::link::tls::TlsClient>,
    /// The embedder verifies the migration with [`super::fetch_checksums`] once the workers ended:
    /// each worker's `End` says so, and the source keeps the session until it was served.
    pub verify: bool,
    /// A receiver-driven stream ([`super::pacer`]): each bulk connection's batches in flight
    /// are granted by its bulk half, fewer while faults are served later than this (a p99 of
    /// our side's service time, fault event read → page placed), more while they are not.
    /// `None`: the source pushes the stream as fast as the link takes it.
    pub fault_latency_target: Option<Duration>,
    /// The page size the destination's memory maps ([`super::Memory::page_size`]): the source
    /// refuses at the handshake a destination whose page size is not its image's, saying how
    /// to fix it. `None`: whatever the source serves.
    pub page_size: Option<u64>,
}

/// How the engine places a zero page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ZeroFill {
    /// `UFFDIO_ZEROPAGE`: maps the shared zero page (cheap now, and no memory until written;
    /// the first write then takes a copy-on-write fault and, with threads on several CPUs, a
    /// TLB shootdown).
    Zeropage,
    /// `UFFDIO_COPY` from a zeroed buffer: a private page at once, no later copy-on-write.
    Copy,
}

impl EngineConfig {
    /// The liveness rules of every connection ([`crate::link::liveness`]).
    pub fn liveness(&self) -> crate::link::Liveness {
        crate::link::Liveness::new(self.link_timeout)
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            gauges: Default::default(),
            source: "127.0.0.1:7070".into(),
            workers: crate::sys::online_cpus(),
            pin: true,
            stream: true,
            bulk_joins_after_go: false,
            link_timeout: crate::link::liveness::DEFAULT_LINK_TIMEOUT,
            connect_timeout: Duration::from_secs(10),
            zero_map: false,
            zero_fill: ZeroFill::Zeropage,
            max_streams: 0,
            precopy: false,
            key: None,
            recovery_timeout: Duration::from_secs(60),
            tls: None,
            verify: false,
            fault_latency_target: None,
            page_size: None,
        }
    }
}
