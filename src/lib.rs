//! # postcopy
//!
//! A page server for postcopy live migration of memory.
//!
//! The workload resumes on the destination before its memory has arrived. A touch of a missing
//! page traps through Linux userfaultfd; the destination engine asks the source for the page,
//! receives it through io_uring into a preallocated temp page, and places it atomically with
//! `UFFDIO_COPY` (or `UFFDIO_ZEROPAGE`), while the source streams every other page in the
//! background. See `docs/ARCHITECTURE.md` for the data flow.
//!
//! Modules:
//! - [`sys`]: the kernel interfaces (userfaultfd, io_uring, mmap, descriptor passing, dirty
//!   log); the only `unsafe` code.
//! - [`layout`]: RAM blocks, the atomic received bitmap, and the split of a block among the
//!   destination's workers ([`layout::shard`]).
//! - [`codec`]: wire protocol v1, a pure codec.
//! - [`link`]: what every connection does: the challenge-response, per-frame seals, the one
//!   framed reader and writer ([`link::FramedStream`]), TLS.
//! - [`image`]: what a source serves (a file or a synthetic image).
//! - [`source`]: the source page server (precopy, switchover, recovery); [`live`]: a live
//!   source's memory and workload; [`dirty`]: dirty-page tracking for precopy.
//! - [`dest`]: the destination engine (thread-per-core workers; precopy, recovery, a VMM's
//!   handed-over memory).
//! - [`handover`], [`handler`]: serving a VMM that hands over its userfaultfd (Firecracker).
//! - [`workload`], [`report`], [`demo`]: the embedded default and its report.
//! - [`baseline`], [`mod@bench`]: the simple handler and the benchmark against it.
//! - [`probe`]: can this host do postcopy.
//! - [`timeline`]: a migration's gauges sampled over time, and the progress line;
//!   [`mod@plot`]: a report's timeline as an SVG; [`metrics`]: live counters at `/metrics`.
//! - [`mod@log`]: the one way the crate writes to stderr (levels, text or JSON lines).
//! - [`stats`]: measurements shared by the engine, the handler and the reports (a latency
//!   summary, the wall clock of the downtime); [`rng`]: a seeded generator for patterns.
#![deny(missing_docs)]

pub mod baseline;
pub mod bench;
pub mod codec;
pub mod demo;
pub mod dest;
pub mod dirty;
pub mod handler;
pub mod handover;
pub mod image;
pub mod layout;
pub mod link;
pub mod live;
pub mod log;
pub mod metrics;
pub mod plot;
pub mod probe;
pub mod report;
pub mod rng;
pub mod source;
pub mod stats;
pub mod sys;
pub mod timeline;
pub mod workload;
