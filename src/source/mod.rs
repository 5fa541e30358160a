//! The source page server: answers urgent page requests first, streams the rest.
//!
//! Threads and connections (per session, per destination worker `w` of `W`):
//! - an **urgent** connection (TCP_NODELAY): the destination's requests for faulted pages; each
//!   is answered at once with a `Pages` frame. Worker 0's urgent connection also carries the
//!   handshake (`Hello` → `Welcome` with the layout) and the final `End`/`Ack`.
//! - a **bulk** connection: streams worker `w`'s shard of every block in page order, skipping
//!   pages already sent, and ends with `End`.
//!
//! Urgent replies never wait behind bulk bytes: they have their own connection and thread, and
//! the bulk streamer runs at a lower scheduling priority. Every page is marked in the session's
//! `sent` bitmap when it is queued, so the stream skips what a request already carried; a
//! request is answered even if the stream already sent the page (the destination places each
//! page once and counts the duplicate).
//!
//! Precopy (when the destination's `Hello` offers it): before `Run`, worker 0's urgent
//! connection carries a full pass over every page (round 1), then rounds of the pages the live
//! workload dirtied meanwhile ([`crate::dirty::DirtyTracker`]), until the dirty set is small
//! enough or a limit is hit ([`PrecopyLimits`]); then the switchover: the workload stops, the
//! final dirty set goes out as `Discard` ranges (those pages become unsent again, so requests and
//! the stream carry their new content), and `Run`. Without precopy, a live source stops its
//! workload at the handshake. A verify connection (`Role::Verify`) gets the checksums of every
//! page as it was at switchover.
//!
//! Everything the destination sends is checked (magic, version, kind, ranges against the
//! layout) before it is used; a bad frame gets an `Error` frame back and ends its session.

mod bulk;
mod config;
mod conn;
mod credit;
mod error;
mod handshake;
mod joined;
mod lifecycle;
mod pages;
mod precopy;
mod prefetch;
mod progress;
mod registry;
mod server;
mod session;
mod urgent;
mod verify;
mod wake;
mod working_set;

pub use config::{LiveParts, PrecopyLimits, SourceConfig};
pub use error::SourceError;
pub use pages::encode_run;
pub use prefetch::Prefetch;
pub use server::{SessionsView, SourceServer, StopHandle};
pub use session::SessionReport;
pub use working_set::{Snapshot, WorkingSet, WorkingSetConfig, WorkingSetError};
