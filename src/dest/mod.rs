//! The destination page server: a thread-per-core engine that serves userfaultfd faults from a
//! remote source and places the background stream.
//!
//! Lifecycle (the seed's names in brackets):
//! 1. [`connect`]: handshake with the source on worker 0's urgent connection; learn the session
//!    id and the layout.
//! 2. [`DestRam::new`] / [`DestRam::with_thp`] (seed: `postcopy_ram_incoming_init`): map every block
//!    (every page missing) and the received bitmaps.
//! 3. Optional precopy ([`receive_precopy`], when [`EngineConfig::precopy`] offered it): pages
//!    written straight into the still-unregistered blocks ([`DestRam::write_page`]);
//!    [`DestRam::prepare_discard`] (seed: `prepare_discard`) (`MADV_NOHUGEPAGE` on every block) before
//!    the first [`DestRam::discard_range`] (seed: `discard_range`) (drop the pages, clear their bits);
//!    ends at the source's `Run`.
//! 4. [`Engine::start`] (seed: `enable_notify`): each worker gets its own userfaultfd registered
//!    (MISSING) on its shard of every block, its own io_uring, temp pages and connections.
//! 5. [`EngineHandle::wait`] (seed: `incoming_cleanup`): workers end when their shard is complete
//!    (their userfaultfds close, which unregisters; their temp pages are freed); THP goes back
//!    as it was; the report merges their counters.
//!
//! Shards: worker `w` of `W` owns pages `[n*w/W, n*(w+1)/W)` of each block of `n` pages, the
//! same split the source uses for its streams, so every page has exactly one placer and the
//! workers share nothing but the (atomic) received bitmaps.

mod connect;
mod precopy;
mod worker;

pub use connect::{connect, Connected};
pub(crate) use connect::{link_err, open_connection, open_connection_as};

pub use precopy::{receive_precopy, PrecopyReport, VerifyConnection};

pub use worker::coalesce_requests;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::codec::CodecError;
use crate::layout::{shard, Layout, PageBitmap};
use crate::link::auth::Key;
use crate::sys::mem::{Mapping, MemError};
use crate::sys::ring::RingError;
use crate::sys::uffd::{self, Uffd, UffdError};

/// Errors of the destination engine.
#[derive(Debug, thiserror::Error)]
pub enum DestError {
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
    #[error("the source has been unreachable for {seconds} s after a connection broke ({last}); {missing} pages of this worker are still missing, so the workload's memory is incomplete: restart the source with the same image within --recovery-timeout, or give up the migration")]
    SourceLost {
        /// Seconds tried.
        seconds: u64,
        /// Pages of the worker still missing.
        missing: u64,
        /// The last connection error.
        last: String,
    },
    /// The source stopped answering.
    #[error("source sent nothing for {seconds} s while {missing} pages were missing and requests were outstanding")]
    Stalled {
        /// Seconds waited.
        seconds: u64,
        /// Pages still missing in the worker's shard.
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

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> DestError {
    let context = context.into();
    move |source| DestError::Io { context, source }
}

/// Engine configuration.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Source address, `HOST:PORT`.
    pub source: String,
    /// Number of workers (each with its own uffd shard, ring and connections).
    pub workers: usize,
    /// Pin worker `w` to CPU `w % cpus`.
    pub pin: bool,
    /// Open bulk connections (the background stream).
    pub stream: bool,
    /// Give up when requests are outstanding and nothing arrives for this long.
    pub stall_timeout: Duration,
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
    /// Offer the source a precopy phase (then call [`receive_precopy`] before
    /// [`Engine::start`]). Off: pure postcopy.
    pub precopy: bool,
    /// The pre-shared key ([`crate::link::auth`]): prove it on every connection, MAC every frame.
    /// `None`: no authentication (a trusted network only).
    pub key: Option<Key>,
    /// A connection that breaks in postcopy is reopened (with backoff) for this long before the
    /// migration is given up; faulting threads stay blocked meanwhile. Zero: fail at once.
    pub recovery_timeout: Duration,
    /// TLS 1.3 to the source ([`crate::link::tls`]); `None`: plain TCP.
    pub tls: Option<crate::link::tls::TlsClient>,
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

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            source: "127.0.0.1:7070".into(),
            workers: crate::sys::online_cpus(),
            pin: true,
            stream: true,
            stall_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            zero_map: false,
            zero_fill: ZeroFill::Zeropage,
            max_streams: 0,
            precopy: false,
            key: None,
            recovery_timeout: Duration::from_secs(60),
            tls: None,
        }
    }
}

/// The destination's memory: one mapping per block plus the received bitmaps.
///
/// The received bitmap of a block has a bit per page, set by the worker that placed the page
/// right after the placement ioctl returned; the workload may read it to tell a fault from a hit.
#[derive(Debug)]
pub struct DestRam {
    /// The layout.
    pub layout: Layout,
    /// One mapping per block (every page missing until placed).
    pub regions: Vec<Mapping>,
    /// One received bitmap per block.
    pub received: Vec<PageBitmap>,
    /// THP was requested at init (and is restored at cleanup).
    thp: bool,
    /// `prepare_discard` has run (THP off).
    discard_ready: AtomicBool,
    /// Per block, where its pages live in the target address space, sorted by page: one
    /// segment (our own mapping) or, for a VMM's memory, one per guest region.
    segments: Vec<Vec<Segment>>,
    /// The memory belongs to another process (a VMM): no mapping here, only addresses.
    foreign: bool,
}

/// Pages `[first_page, first_page + pages)` of a block live at `host_addr` in the target
/// address space (ours, or a VMM's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// First page (of the block).
    pub first_page: u64,
    /// Pages.
    pub pages: u64,
    /// Address of the first page in the target process.
    pub host_addr: usize,
}

impl DestRam {
    /// `postcopy_ram_incoming_init` + `prepare_discard`: maps every block, all pages missing,
    /// THP off from the start (4 KiB precopy writes, faults and placements).
    pub fn new(layout: &Layout) -> Result<DestRam, DestError> {
        let ram = Self::map(layout, false)?;
        ram.prepare_discard()?;
        Ok(ram)
    }

    /// `postcopy_ram_incoming_init` for memory that wants transparent huge pages (as a VMM's
    /// guest RAM usually does): `MADV_HUGEPAGE` on the 4 KiB-page blocks, so precopy fills
    /// them a huge page at a time; [`prepare_discard`](Self::prepare_discard) turns THP off
    /// before discards and faults, and [`EngineHandle::wait`] turns it back on.
    pub fn with_thp(layout: &Layout) -> Result<DestRam, DestError> {
        Self::map(layout, true)
    }

    fn map(layout: &Layout, thp: bool) -> Result<DestRam, DestError> {
        let base = crate::sys::mem::base_page_size() as u64;
        let mut regions = Vec::with_capacity(layout.blocks.len());
        for b in &layout.blocks {
            let m = match b.page_size {
                p if p == base => Mapping::anonymous(b.size_bytes as usize, "guest RAM block")?,
                p if p == 2 << 20 => Mapping::anonymous_huge_2m(
                    b.size_bytes as usize,
                    "guest RAM block (2 MiB pages)",
                )?,
                p => {
                    return Err(DestError::Unsupported(format!(
                        "block {:?} has page size {p}; this host supports {base} and 2 MiB",
                        b.name
                    )))
                }
            };
            if b.page_size == base && thp {
                m.huge_pages()?;
            }
            regions.push(m);
        }
        let segments = layout
            .blocks
            .iter()
            .zip(&regions)
            .map(|(b, m)| {
                vec![Segment {
                    first_page: 0,
                    pages: b.pages(),
                    host_addr: m.addr(),
                }]
            })
            .collect();
        Ok(DestRam {
            layout: layout.clone(),
            regions,
            received: layout
                .blocks
                .iter()
                .map(|b| PageBitmap::new(b.pages()))
                .collect(),
            thp,
            discard_ready: AtomicBool::new(false),
            segments,
            foreign: false,
        })
    }

    /// Memory of another process (a VMM that handed over its userfaultfd): per block, the
    /// segments where its pages live in that process. Pages no segment covers are not wanted
    /// (they count as received and are never placed). Segments must lie inside their block
    /// and not overlap, in pages or in addresses.
    pub fn foreign(layout: &Layout, mut segments: Vec<Vec<Segment>>) -> Result<DestRam, DestError> {
        if segments.len() != layout.blocks.len() {
            return Err(DestError::Unsupported(format!(
                "{} segment lists for {} blocks",
                segments.len(),
                layout.blocks.len()
            )));
        }
        let mut spans: Vec<(usize, usize)> = Vec::new();
        for (b, segs) in segments.iter_mut().enumerate() {
            segs.sort_by_key(|s| s.first_page);
            let block = &layout.blocks[b];
            let ps = block.page_size as usize;
            let mut next = 0;
            for s in segs.iter() {
                layout
                    .check_range(b as u32, s.first_page, s.pages)
                    .map_err(|e| DestError::Unsupported(format!("guest region: {e}")))?;
                if s.first_page < next || s.host_addr % ps != 0 {
                    return Err(DestError::Unsupported(format!(
                        "guest regions overlap in the image or are not page-aligned (page {}, address {:#x})",
                        s.first_page, s.host_addr
                    )));
                }
                next = s.first_page + s.pages;
                spans.push((s.host_addr, s.host_addr + s.pages as usize * ps));
            }
        }
        spans.sort_unstable();
        if spans.windows(2).any(|w| w[1].0 < w[0].1) {
            return Err(DestError::Unsupported(
                "guest regions overlap in the VMM's address space".into(),
            ));
        }
        let received: Vec<PageBitmap> = layout
            .blocks
            .iter()
            .map(|b| PageBitmap::new(b.pages()))
            .collect();
        for (b, segs) in segments.iter().enumerate() {
            // Everything outside the segments is not wanted: mark it done.
            received[b].set_range(0, layout.blocks[b].pages());
            for s in segs {
                received[b].clear_range(s.first_page, s.pages);
            }
        }
        Ok(DestRam {
            layout: layout.clone(),
            regions: Vec::new(),
            received,
            thp: false,
            discard_ready: AtomicBool::new(true),
            segments,
            foreign: true,
        })
    }

    /// Whether the memory belongs to another process.
    pub fn is_foreign(&self) -> bool {
        self.foreign
    }

    /// The segments of block `b`.
    pub fn segments(&self, b: usize) -> &[Segment] {
        &self.segments[b]
    }

    /// Where page `page` of block `b` lives, and how many pages from it (at most `max`) are
    /// contiguous there; `None` if no segment covers it.
    pub fn host_run(&self, b: usize, page: u64, max: u64) -> Option<(usize, u64)> {
        let segs = &self.segments[b];
        let i = segs.partition_point(|s| s.first_page + s.pages <= page);
        let s = segs.get(i).filter(|s| s.first_page <= page)?;
        let ps = self.layout.blocks[b].page_size as usize;
        let off = page - s.first_page;
        Some((s.host_addr + off as usize * ps, (s.pages - off).min(max)))
    }

    /// The (block, page) at `address` of the target address space, if any.
    pub fn locate(&self, address: usize) -> Option<(usize, u64)> {
        for (b, segs) in self.segments.iter().enumerate() {
            let ps = self.layout.blocks[b].page_size as usize;
            for s in segs {
                if let Some(off) = address.checked_sub(s.host_addr) {
                    if off < s.pages as usize * ps {
                        return Some((b, s.first_page + (off / ps) as u64));
                    }
                }
            }
        }
        None
    }

    fn small_page_blocks(&self) -> impl Iterator<Item = usize> + '_ {
        let base = crate::sys::mem::base_page_size() as u64;
        (0..self.layout.blocks.len()).filter(move |&b| self.layout.blocks[b].page_size == base)
    }

    /// `postcopy_ram_prepare_discard`: `MADV_NOHUGEPAGE` on every 4 KiB-page block, so that
    /// discards and faults work page by page. Idempotent; [`Engine::start`] calls it too.
    pub fn prepare_discard(&self) -> Result<(), DestError> {
        // A foreign process's memory is its own business (`discard_ready` is set for it).
        if self.discard_ready.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        for b in self.small_page_blocks() {
            self.regions[b].no_huge_pages()?;
        }
        Ok(())
    }

    /// Writes one page received in precopy (the block is not registered yet) and marks it
    /// received. `data` is exactly one page. Checks the range: never writes outside a block.
    pub fn write_page(&self, block: u32, page: u64, data: &[u8]) -> Result<(), DestError> {
        self.own("precopy")?;
        let b = self
            .layout
            .check_range(block, page, 1)
            .map_err(|e| DestError::Protocol {
                context: "precopy page".into(),
                source: e.into(),
            })?;
        assert_eq!(data.len() as u64, b.page_size, "one page of data");
        self.regions[block as usize].write_from((page * b.page_size) as usize, data);
        self.received[block as usize].set(page);
        Ok(())
    }

    /// `postcopy_ram_discard_range`: drops pages `[first, first + pages)` of `block`
    /// (`MADV_DONTNEED`: they are missing again and will fault) and clears their received
    /// bits. A range outside the block is rejected. Calls [`prepare_discard`](Self::prepare_discard)
    /// first if nobody did.
    pub fn discard_range(&self, block: u32, first: u64, pages: u64) -> Result<(), DestError> {
        self.own("discard")?;
        let b = self
            .layout
            .check_range(block, first, pages)
            .map_err(|e| DestError::Protocol {
                context: "discard".into(),
                source: e.into(),
            })?;
        self.prepare_discard()?;
        let ps = b.page_size as usize;
        self.regions[block as usize].dontneed(first as usize * ps, pages as usize * ps)?;
        self.received[block as usize].clear_range(first, pages);
        Ok(())
    }

    fn own(&self, what: &str) -> Result<(), DestError> {
        if self.foreign {
            return Err(DestError::Unsupported(format!(
                "{what} into another process's memory (a handed-over userfaultfd)"
            )));
        }
        Ok(())
    }

    /// Makes sure every page not received is really missing before userfaultfd is armed:
    /// with THP on during precopy, a huge page may have backed (with zeros) pages precopy never
    /// wrote. Only needed after [`with_thp`](Self::with_thp). Pages in `zeros` (precopy's zero
    /// pages, never written here) are left alone: present they hold zeros already, which is
    /// their content, and the workers' zero-map placement finds them present (`EEXIST`) and
    /// counts them done. Skipping them keeps tens of thousands of scattered `MADV_DONTNEED`s
    /// (each splitting a huge page) out of the downtime.
    fn drop_unreceived(&self, zeros: Option<&[PageBitmap]>) -> Result<(), DestError> {
        if !self.thp {
            return Ok(());
        }
        for b in self.small_page_blocks() {
            let (received, ps) = (&self.received[b], self.layout.blocks[b].page_size as usize);
            let zero = |p: u64| zeros.is_some_and(|z| z[b].get(p));
            let gone = |p: u64| !received.get(p) && !zero(p);
            let end = self.layout.blocks[b].pages();
            let mut p = 0;
            while let Some(first) = received.next_clear(p, end) {
                if !gone(first) {
                    p = first + 1;
                    continue;
                }
                let mut n = 1;
                while first + n < end && gone(first + n) {
                    n += 1;
                }
                self.regions[b].dontneed(first as usize * ps, n as usize * ps)?;
                p = first + n;
            }
        }
        Ok(())
    }

    /// `incoming_cleanup`'s THP part: huge pages back on where [`with_thp`](Self::with_thp)
    /// asked for them.
    pub fn restore_thp(&self) -> Result<(), DestError> {
        if self.thp {
            for b in self.small_page_blocks() {
                self.regions[b].huge_pages()?;
            }
        }
        Ok(())
    }

    /// Pages placed so far, over all blocks.
    pub fn pages_received(&self) -> u64 {
        self.received.iter().map(PageBitmap::count_ones).sum()
    }

    /// Whether every page of every block is placed.
    pub fn complete(&self) -> bool {
        self.pages_received() == self.layout.total_pages()
    }
}

/// Counters of one worker, merged into the engine report.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct WorkerStats {
    /// Fault events read from the userfaultfd.
    pub fault_events: u64,
    /// Faults on pages already placed (woken, no request).
    pub fault_already_placed: u64,
    /// Faults on pages already requested (de-duplicated).
    pub fault_deduplicated: u64,
    /// Request frames sent (after coalescing).
    pub requests: u64,
    /// Pages asked for by those requests.
    pub pages_requested: u64,
    /// Pages placed from urgent replies.
    pub pages_by_fault: u64,
    /// Pages placed from the stream.
    pub pages_by_stream: u64,
    /// Pages placed from the source's zero-page map, without a fault or the stream.
    pub pages_by_zero_map: u64,
    /// Of the placed pages, zero pages (`UFFDIO_ZEROPAGE`).
    pub pages_zero: u64,
    /// Pages that arrived already placed (`EEXIST`: a stream page raced a request).
    pub eexist: u64,
    /// Placement ioctls issued (`COPY` + `ZEROPAGE`).
    pub place_ioctls: u64,
    /// Pages the VMM dropped (`UFFD_EVENT_REMOVE`): zero from then on, never refilled.
    pub pages_removed: u64,
    /// Zero pages placed for faults on removed pages.
    pub pages_zero_after_remove: u64,
    /// Connections reopened after a break.
    pub recoveries: u64,
    /// Pages requested after the stream ended because a break lost them in flight.
    pub pages_swept: u64,
    /// Bytes received.
    pub bytes_received: u64,
    /// io_uring completions reaped.
    pub completions: u64,
    /// Loop iterations (submit-and-wait calls).
    pub loops: u64,
    /// A VMM's memory: fault service time on our side, event read → page placed (ns).
    #[serde(skip)]
    pub fault_service_ns: Option<hdrhistogram::Histogram<u64>>,
    /// The worker ended (stopped, or its VMM's address space gone) while pages of its shard
    /// were missing as far as it could see: [`EngineHandle::wait`] decides, once every worker
    /// has joined (no placement in flight), whether the memory is complete after all.
    #[serde(skip)]
    pub ended_early: bool,
}

impl WorkerStats {
    fn merge(&mut self, o: &WorkerStats) {
        self.ended_early |= o.ended_early;
        self.fault_events += o.fault_events;
        self.fault_already_placed += o.fault_already_placed;
        self.fault_deduplicated += o.fault_deduplicated;
        self.requests += o.requests;
        self.pages_requested += o.pages_requested;
        self.pages_by_fault += o.pages_by_fault;
        self.pages_by_stream += o.pages_by_stream;
        self.pages_by_zero_map += o.pages_by_zero_map;
        self.pages_zero += o.pages_zero;
        self.eexist += o.eexist;
        self.place_ioctls += o.place_ioctls;
        self.pages_removed += o.pages_removed;
        self.pages_zero_after_remove += o.pages_zero_after_remove;
        self.recoveries += o.recoveries;
        self.pages_swept += o.pages_swept;
        self.bytes_received += o.bytes_received;
        self.completions += o.completions;
        self.loops += o.loops;
        if let Some(h) = &o.fault_service_ns {
            match &mut self.fault_service_ns {
                Some(mine) => {
                    let _ = mine.add(h);
                }
                None => self.fault_service_ns = Some(h.clone()),
            }
        }
    }
}

/// What the engine did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct EngineReport {
    /// Workers.
    pub workers: usize,
    /// Merged counters.
    pub totals: WorkerStats,
    /// Per-worker counters.
    pub per_worker: Vec<WorkerStats>,
    /// From `enable_notify` (`Engine::start`) to the last page placed.
    pub postcopy_seconds: f64,
    /// A VMM's memory: from `enable_notify` to the first fault answered.
    pub first_fault_served_seconds: Option<f64>,
    /// A VMM's memory: fault service time on our side (event read → placed).
    pub fault_service_us: Option<crate::stats::LatencyUs>,
}

/// The engine: builds the workers.
pub struct Engine;

/// A worker's end, reported over the control plane.
type WorkerExit = (usize, Result<WorkerStats, DestError>);

/// A running engine.
pub struct EngineHandle {
    workers: usize,
    /// The worker each thread serves (a worker may have several threads).
    worker_of: Vec<usize>,
    threads: Vec<std::thread::JoinHandle<()>>,
    exits: crossbeam_channel::Receiver<WorkerExit>,
    stop: Arc<AtomicBool>,
    started: Instant,
    last_placed_ns: Arc<AtomicU64>,
    ready: Arc<std::sync::atomic::AtomicUsize>,
    first_served_ns: Arc<AtomicU64>,
    /// Nanoseconds after `started` at which `enable_notify` released the workers.
    notified_ns: u64,
    /// The memory being filled.
    pub ram: Arc<DestRam>,
}

/// State shared by the workers (control plane only).
pub(crate) struct Shared {
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) started: Instant,
    /// Nanoseconds after `started` at which some worker placed its shard's last page.
    pub(crate) last_placed_ns: Arc<AtomicU64>,
    /// Streams that may run at once; a bulk half takes one before its first read and gives
    /// it back when its stream ends.
    pub(crate) stream_slots: std::sync::atomic::AtomicUsize,
    /// Threads that finished their set-up (connection, ring, temp pages).
    pub(crate) ready: Arc<std::sync::atomic::AtomicUsize>,
    /// Nanoseconds after `started` at which the first fault was answered (0: none yet).
    pub(crate) first_served_ns: Arc<AtomicU64>,
}

/// A userfaultfd (with `UFFDIO_API` done) registered MISSING on pages `[start, end)` of every
/// block where `shard(block)` gives that range.
pub(crate) fn register_shard(
    ram: &DestRam,
    shard_of: impl Fn(u64) -> (u64, u64),
) -> Result<Uffd, DestError> {
    let u = Uffd::open(false)?;
    u.api(uffd::feature::THREAD_ID)?;
    for (b, block) in ram.layout.blocks.iter().enumerate() {
        let (start, end) = shard_of(block.pages());
        if start == end {
            continue;
        }
        let ps = block.page_size as usize;
        let ioctls = u.register(
            ram.regions[b].addr() + start as usize * ps,
            (end - start) as usize * ps,
            uffd::mode::MISSING,
        )?;
        if ioctls & uffd::ioctl_bit::COPY == 0 {
            return Err(DestError::Unsupported(format!(
                "block {:?}: UFFDIO_COPY not offered on this memory",
                block.name
            )));
        }
    }
    Ok(u)
}

/// A thread body of an engine: returns its counters or the error that ended it.
pub(crate) type Job = Box<dyn FnOnce(Arc<Shared>) -> Result<WorkerStats, DestError> + Send>;

impl EngineHandle {
    /// Starts `jobs` (name, body) on their own threads with shared control-plane state.
    pub(crate) fn spawn(
        ram: Arc<DestRam>,
        workers: usize,
        stream_slots: usize,
        jobs: Vec<(String, usize, Job)>,
    ) -> Result<EngineHandle, DestError> {
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let shared = Arc::new(Shared {
            stop: stop.clone(),
            started,
            last_placed_ns: Arc::new(AtomicU64::new(0)),
            stream_slots: std::sync::atomic::AtomicUsize::new(stream_slots),
            ready: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            first_served_ns: Arc::new(AtomicU64::new(0)),
        });
        let (exit_tx, exits) = crossbeam_channel::bounded::<WorkerExit>(jobs.len());
        let mut threads = Vec::with_capacity(jobs.len());
        let worker_of: Vec<usize> = jobs.iter().map(|j| j.1).collect();
        for (w, (name, _, job)) in jobs.into_iter().enumerate() {
            let (exit_tx, shared) = (exit_tx.clone(), shared.clone());
            let t = std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    let stop = shared.stop.clone();
                    let result = job(shared);
                    if result.is_err() {
                        // One thread failing ends the migration: stop the others.
                        stop.store(true, Ordering::Release);
                    }
                    let _ = exit_tx.send((w, result));
                })
                .map_err(io_err("spawn engine thread"))?;
            threads.push(t);
        }
        Ok(EngineHandle {
            workers,
            worker_of,
            threads,
            exits,
            stop,
            started,
            last_placed_ns: shared.last_placed_ns.clone(),
            ready: shared.ready.clone(),
            first_served_ns: shared.first_served_ns.clone(),
            notified_ns: 0,
            ram,
        })
    }
}

impl Engine {
    /// Starts the engine's threads before the switchover: each connects to the source (joining
    /// the session), builds its io_uring and temp pages, and waits. Returns once all are ready
    /// (or with the first set-up error). Nothing is registered yet: during precopy the
    /// destination's memory stays plain memory. Then [`PreparedEngine::enable_notify`].
    pub fn prepare(
        connected: &Connected,
        ram: Arc<DestRam>,
        config: &EngineConfig,
    ) -> Result<PreparedEngine, DestError> {
        if ram.layout != connected.welcome.layout {
            return Err(DestError::Unsupported(
                "the destination RAM was built for another layout".into(),
            ));
        }
        let workers = config.workers;
        let session = connected.welcome.session;
        let halves: &[worker::Half] = if config.stream {
            &[worker::Half::Urgent, worker::Half::Bulk]
        } else {
            &[worker::Half::Urgent]
        };
        let mut jobs: Vec<(String, usize, Job)> = Vec::with_capacity(2 * workers);
        let mut gos = Vec::with_capacity(2 * workers);
        for w in 0..workers {
            for &half in halves {
                let (go_tx, go_rx) = crossbeam_channel::bounded(1);
                let takes_control = w == 0 && half == worker::Half::Urgent;
                gos.push((w, takes_control, go_tx));
                let setup = worker::Setup {
                    half,
                    id: w,
                    config: config.clone(),
                    session,
                    ram: ram.clone(),
                    takes_control,
                    go: go_rx,
                };
                let name = match half {
                    worker::Half::Urgent => format!("pc-urgent-{w}"),
                    worker::Half::Bulk => format!("pc-bulk-{w}"),
                };
                let job: Job = Box::new(move |shared| worker::run(setup, shared));
                jobs.push((name, w, job));
            }
        }
        let streams = match config.max_streams {
            0 => workers,
            n => n,
        };
        let handle = EngineHandle::spawn(ram, workers, streams, jobs)?;
        let deadline = Instant::now() + config.connect_timeout;
        while handle.ready.load(Ordering::Acquire) < handle.threads.len() {
            if handle.threads.iter().any(|t| t.is_finished()) || Instant::now() >= deadline {
                // A thread failed its set-up (or is stuck connecting): report why.
                handle.stop();
                drop(gos);
                return Err(match handle.wait() {
                    Err(e) => e,
                    Ok(_) => DestError::Stopped,
                });
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(PreparedEngine {
            handle,
            gos,
            config: config.clone(),
        })
    }

    /// [`prepare`](Self::prepare) then [`PreparedEngine::enable_notify`]: for a destination
    /// without precopy.
    pub fn start(
        connected: Connected,
        ram: Arc<DestRam>,
        config: &EngineConfig,
    ) -> Result<EngineHandle, DestError> {
        Self::prepare(&connected, ram, config)?.enable_notify(connected)
    }
}

/// An engine whose threads are connected and set up, waiting for the switchover.
pub struct PreparedEngine {
    handle: EngineHandle,
    /// Per thread: (worker, takes the control connection, its `Go` sender).
    gos: Vec<(usize, bool, crossbeam_channel::Sender<worker::Go>)>,
    config: EngineConfig,
}

impl PreparedEngine {
    /// `enable_notify` for memory of another process whose userfaultfd was handed over (a
    /// VMM: `UFFDIO_API` done, its regions registered MISSING, maybe with `EVENT_REMOVE`): one
    /// worker serves it through that descriptor; nothing is registered here.
    pub fn enable_notify_external(
        self,
        connected: Connected,
        uffd: Uffd,
    ) -> Result<EngineHandle, DestError> {
        let PreparedEngine {
            mut handle,
            gos,
            config,
        } = self;
        if config.workers != 1 || !handle.ram.is_foreign() {
            handle.stop();
            drop(gos);
            let _ = handle.wait();
            return Err(DestError::Unsupported(
                "a handed-over userfaultfd is served by one worker, on DestRam::foreign memory"
                    .into(),
            ));
        }
        handle.notified_ns = handle.started.elapsed().as_nanos() as u64;
        let state = Arc::new(worker::ShardState::new(
            0,
            uffd,
            &handle.ram,
            1,
            config.stream,
            None,
        ));
        let mut control = Some(connected.control);
        for (_, takes_control, go) in gos {
            let _ = go.send(worker::Go {
                state: state.clone(),
                control: if takes_control { control.take() } else { None },
            });
        }
        Ok(handle)
    }

    /// `enable_notify`: registers every worker's shard with its own userfaultfd (pages already
    /// received by precopy are present and never fault) and releases the workers. When this
    /// returns, every missing page of the memory faults into the engine. Only this runs in the
    /// downtime: the threads connected and built their rings in [`Engine::prepare`].
    pub fn enable_notify(self, connected: Connected) -> Result<EngineHandle, DestError> {
        let PreparedEngine {
            mut handle,
            gos,
            config,
        } = self;
        handle.notified_ns = handle.started.elapsed().as_nanos() as u64;
        let ram = handle.ram.clone();
        let workers = config.workers;
        if ram.is_foreign() {
            handle.stop();
            drop(gos);
            let _ = handle.wait();
            return Err(DestError::Unsupported(
                "another process's memory: use enable_notify_external with its userfaultfd".into(),
            ));
        }
        let registered = (|| {
            ram.prepare_discard()?;
            ram.drop_unreceived(connected.zero_map.as_deref())?;
            let mut uffds = Vec::with_capacity(workers);
            for w in 0..workers {
                uffds.push(register_shard(&ram, |pages| shard(pages, w, workers))?);
            }
            Ok(uffds)
        })();
        let uffds = match registered {
            Ok(u) => u,
            Err(e) => {
                handle.stop();
                drop(gos);
                let _ = handle.wait();
                return Err(e);
            }
        };
        let zero_map = connected.zero_map.map(Arc::new);
        let mut control = Some(connected.control);
        let states: Vec<Arc<worker::ShardState>> = uffds
            .into_iter()
            .enumerate()
            .map(|(w, uffd)| {
                Arc::new(worker::ShardState::new(
                    w,
                    uffd,
                    &ram,
                    workers,
                    config.stream,
                    zero_map.clone(),
                ))
            })
            .collect();
        for (w, takes_control, go) in gos {
            // A thread that died since `prepare` has dropped its receiver; `wait` reports it.
            let _ = go.send(worker::Go {
                state: states[w].clone(),
                control: if takes_control { control.take() } else { None },
            });
        }
        Ok(handle)
    }
}

impl EngineHandle {
    /// Asks the workers to stop (their uffds close; blocked faults then see zero pages).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// Whether every worker has ended.
    pub fn is_finished(&self) -> bool {
        self.threads.iter().all(|t| t.is_finished())
    }

    /// Waits for every worker; the first error to arrive wins (and stops the others).
    pub fn wait(self) -> Result<EngineReport, DestError> {
        let workers = self.threads.len();
        let mut report = EngineReport {
            workers: self.workers,
            ..Default::default()
        };
        let mut stats: Vec<Option<WorkerStats>> = vec![None; workers];
        let mut reported = vec![false; workers];
        let mut first_err = None;
        while reported.iter().any(|r| !r) {
            match self.exits.recv_timeout(Duration::from_millis(100)) {
                Ok((w, Ok(s))) => {
                    reported[w] = true;
                    stats[w] = Some(s);
                }
                Ok((w, Err(e))) => {
                    reported[w] = true;
                    self.stop.store(true, Ordering::Release);
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    // A worker that ended without reporting panicked (a bug): stop the rest.
                    for (w, t) in self.threads.iter().enumerate() {
                        if !reported[w] && t.is_finished() && self.exits.is_empty() {
                            reported[w] = true;
                            self.stop.store(true, Ordering::Release);
                            first_err.get_or_insert(DestError::Panicked(w));
                        }
                    }
                }
            }
        }
        for t in self.threads {
            let _ = t.join();
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        // A worker that saw pages missing at its stop may have raced its sibling half's last
        // placement (placed, not yet marked): with every thread joined the bitmap is exact.
        if stats.iter().flatten().any(|s| s.ended_early) && !self.ram.complete() {
            return Err(DestError::Stopped);
        }
        // incoming_cleanup: the workers' userfaultfds are closed (unregistered) and their
        // temp pages freed; huge pages go back on where they were wanted.
        self.ram.restore_thp()?;
        report.per_worker = vec![WorkerStats::default(); self.workers];
        for (thread, s) in stats.into_iter().enumerate() {
            if let Some(s) = s {
                report.totals.merge(&s);
                report.per_worker[self.worker_of[thread]].merge(&s);
            }
        }
        let last = self.last_placed_ns.load(Ordering::Acquire);
        let end_ns = if last > 0 {
            last
        } else {
            self.started.elapsed().as_nanos() as u64
        };
        report.postcopy_seconds = end_ns.saturating_sub(self.notified_ns) as f64 / 1e9;
        let first = self.first_served_ns.load(Ordering::Acquire);
        report.first_fault_served_seconds =
            (first > 0).then(|| first.saturating_sub(self.notified_ns) as f64 / 1e9);
        report.fault_service_us = report
            .totals
            .fault_service_ns
            .as_ref()
            .map(crate::stats::LatencyUs::from_ns);
        Ok(report)
    }
}
