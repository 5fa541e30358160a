//! The destination page server: a thread-per-core engine that serves userfaultfd faults from a
//! remote source and places the background stream.
//!
//! Lifecycle (the seed's names in brackets):
//! 1. [`connect`]: handshake with the source on worker 0's urgent connection; learn the session
//!    id and the layout.
//! 2. [`DestRam::with_memory`] ([`DestRam::new`] for private 4 KiB memory, [`DestRam::with_thp`])
//!    (seed: `postcopy_ram_incoming_init`): map every block as its [`Memory`] kind (every page
//!    missing; shared memory twice, see [`memory`]) and the received bitmaps.
//! 3. Optional precopy ([`receive_precopy`], when [`EngineConfig::precopy`] offered it): pages
//!    written straight into the still-unregistered blocks ([`DestRam::write_page`]);
//!    [`DestRam::prepare_discard`] (seed: `prepare_discard`) (`MADV_NOHUGEPAGE` on every private
//!    block) before the first [`DestRam::discard_range`] (seed: `discard_range`) (drop the pages:
//!    `MADV_DONTNEED`, or `fallocate(PUNCH_HOLE)` for shared memory; clear their bits);
//!    ends at the source's `Run`.
//! 4. [`Engine::start`] (seed: `enable_notify`): each worker gets its own userfaultfd registered
//!    (MISSING; MISSING + MINOR for shared memory) on its shard of every block, its own io_uring,
//!    temp pages and connections.
//! 5. [`EngineHandle::wait`] (seed: `incoming_cleanup`): workers end when their shard is complete
//!    (their userfaultfds close, which unregisters; their temp pages are freed); THP goes back
//!    as it was; the report merges their counters.
//!
//! Shards: worker `w` of `W` owns pages `[n*w/W, n*(w+1)/W)` of each block of `n` pages, the
//! same split the source uses for its streams, so every page has exactly one placer and the
//! workers share nothing but the (atomic) received bitmaps.

mod audit;
mod config;
mod connect;
mod engine;
mod error;
pub mod gauges;
pub mod memory;
mod origin;
pub mod pacer;
mod precopy;
mod ram;
mod stats;
mod verify;
mod worker;

pub use audit::{page_tally, placement_audit, PageTally};
pub use config::{EngineConfig, ZeroFill};
pub use connect::{connect, Connected};
pub use engine::{Engine, EngineEnd, EngineHandle, PreparedEngine};
pub use error::DestError;
pub use memory::Memory;
pub use origin::{PageOrigins, PlacedBy};
pub use precopy::{receive_precopy, PrecopyReport};
pub use ram::{DestRam, Segment};
pub use stats::{EngineReport, WorkerStats};
pub use verify::fetch_checksums;
pub use worker::coalesce_requests;

pub(crate) use connect::{link_err, open_connection, open_with_retry, retryable, Joining};
pub(crate) use engine::{job, register_shard, Job, Shared};
pub(crate) use error::io_err;
