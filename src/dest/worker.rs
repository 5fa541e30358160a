//! One engine worker per core, in two halves pinned to that core, each with its own io_uring:
//!
//! - the **urgent half** owns the shard's fault events and the urgent connection. It runs at a
//!   raised priority, so when a fault or a reply wakes it, it preempts the bulk half on the same
//!   core at once (a same-core wake costs ~3 µs here, a cross-core one ~45 µs);
//! - the **bulk half** owns the bulk connection and places the background stream.
//!
//! Both place into the same shard through the same userfaultfd; the kernel arbitrates
//! (`EEXIST` for the loser, who wakes the page's waiters and moves on), and the received bitmap
//! is set by whoever placed the page. Everything is allocated at start-up; each loop reaps
//! completions in bulk and acts on them:
//!
//! 1. fault events: decode, drop faults on placed pages (wake) or already requested pages,
//!    queue the rest, coalesce the queue into `Request` frames (one per run of pages) and submit
//!    one send at once;
//! 2. replies / stream batches: a batch's header is read first and checked against the layout
//!    *and this worker's shard*, then its body is read straight into registered temp pages,
//!    and each contiguous run is placed with one `UFFDIO_COPY` / `UFFDIO_ZEROPAGE` (which
//!    wakes the waiters);
//! 3. re-arm every idle read.

use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{
    link_err, open_connection, DestError, DestRam, EngineConfig, Shared, WorkerStats, ZeroFill,
};
use crate::codec::{self, max_batch_pages, CodecError, Header, Kind, Role, HEADER_BYTES};
use crate::layout::PageBitmap;
use crate::link::auth::{Channel, TAG_BYTES};
use crate::link::framed::seal_frames;
use crate::sys::mem::Mapping;
use crate::sys::ring::{Completion, Ring, RingConfig, SlotId};
use crate::sys::uffd::{Event, PlaceErrorKind, Uffd, MSG_BYTES};

/// Fault messages read per completion.
const EVENT_BATCH: usize = 64;
/// Bytes of the request send buffer (1024 request frames).
const SEND_BYTES: usize = 1024 * HEADER_BYTES;
/// How long one wait for completions may last before the loop checks stop, stall and end.
const WAIT: Duration = Duration::from_millis(20);
/// Retries of a placement that keeps seeing `EAGAIN` with nothing placed.
const MAPPING_CHANGING_RETRIES: u32 = 1000;
/// Nice value of the urgent half (best effort: needs root or CAP_SYS_NICE).
const URGENT_NICE: i32 = -5;

const TAG_UFFD: u16 = 0;
const TAG_CONN: u16 = 1;
const TAG_SEND: u16 = 2;
/// A tag's low bits say what completed; the others which connection (an epoch that changes
/// when a broken connection is replaced, so late completions of the old one are recognised).
const TAG_KIND_BITS: u16 = 0b11;

/// Which half of a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Half {
    /// Fault events + the urgent connection.
    Urgent,
    /// The bulk connection.
    Bulk,
}

/// What the two halves of worker `id` share: the shard, its userfaultfd and its counters.
pub(crate) struct ShardState {
    pub(crate) id: usize,
    pub(crate) uffd: Uffd,
    /// `[start, end)` of the shard, per block.
    pub(crate) shard: Vec<(u64, u64)>,
    /// Pages of the shard not yet placed.
    missing: AtomicU64,
    /// Pages requested and not placed yet (only shard bits are used).
    requested: Vec<PageBitmap>,
    /// Number of bits set in `requested`: the urgent half waits on the source while non-zero.
    outstanding: AtomicU64,
    /// The bulk half is done (its stream ended, or there is none).
    bulk_done: AtomicBool,
    /// The source's zero-page map, if it sent one: the urgent half places those pages itself.
    zero_map: Option<Arc<Vec<PageBitmap>>>,
    /// A VMM's memory (handed-over userfaultfd): pages the VMM dropped (`UFFD_EVENT_REMOVE`);
    /// they read as zero from then on and are never filled from the source.
    removed: Option<Vec<PageBitmap>>,
    /// With `removed`: the bulk half places under the read side, the urgent half reads
    /// userfaultfd events (with `read(2)`) under the write side and marks removed pages before
    /// releasing it. A REMOVE's range is zapped only after its event is read, so a placement
    /// that could land after the zap sees the mark and skips those pages.
    place_lock: std::sync::RwLock<()>,
    /// A VMM's memory: per block and page, when its fault event was read (ns after the
    /// engine's start, 0 = none), to measure fault service time on our side.
    fault_at_ns: Option<Vec<Box<[AtomicU64]>>>,
    /// Connections of this worker replaced after a break (either half).
    recoveries: AtomicU64,
}

impl ShardState {
    pub(crate) fn new(
        id: usize,
        uffd: Uffd,
        ram: &DestRam,
        workers: usize,
        stream: bool,
        zero_map: Option<Arc<Vec<PageBitmap>>>,
    ) -> ShardState {
        let foreign = ram.is_foreign();
        let shard: Vec<(u64, u64)> = ram
            .layout
            .blocks
            .iter()
            .map(|b| crate::layout::shard(b.pages(), id, workers))
            .collect();
        ShardState {
            id,
            uffd,
            // Pages precopy left in place are not missing.
            missing: AtomicU64::new(
                shard
                    .iter()
                    .enumerate()
                    .map(|(b, &(s, e))| e - s - ram.received[b].count_range(s, e))
                    .sum(),
            ),
            shard,
            requested: ram
                .layout
                .blocks
                .iter()
                .map(|b| PageBitmap::new(b.pages()))
                .collect(),
            outstanding: AtomicU64::new(0),
            bulk_done: AtomicBool::new(!stream),
            zero_map,
            removed: foreign.then(|| {
                ram.layout
                    .blocks
                    .iter()
                    .map(|b| PageBitmap::new(b.pages()))
                    .collect()
            }),
            place_lock: std::sync::RwLock::new(()),
            recoveries: AtomicU64::new(0),
            fault_at_ns: foreign.then(|| {
                ram.layout
                    .blocks
                    .iter()
                    .map(|b| (0..b.pages()).map(|_| AtomicU64::new(0)).collect())
                    .collect()
            }),
        }
    }
}

/// What a worker thread needs to set itself up (before the switchover).
pub(crate) struct Setup {
    pub(crate) half: Half,
    pub(crate) id: usize,
    pub(crate) config: EngineConfig,
    pub(crate) session: u64,
    pub(crate) ram: Arc<DestRam>,
    /// Worker 0's urgent half gets the handshake connection with `Go` instead of connecting.
    pub(crate) takes_control: bool,
    /// `enable_notify` sends `Go` once the shard is registered.
    pub(crate) go: crossbeam_channel::Receiver<Go>,
}

/// What `enable_notify` hands each thread: its shard (registered) and, for worker 0's urgent
/// half, the handshake connection (and its frame MACs, when authenticated).
pub(crate) struct Go {
    pub(crate) state: Arc<ShardState>,
    pub(crate) control: Option<crate::link::FramedStream>,
}

#[derive(Clone, Copy, Debug)]
enum Recv {
    Header {
        got: usize,
    },
    Body {
        h: Header,
        got: usize,
    },
    /// The frame's MAC trailer (an authenticated connection); the header and body stay in
    /// their slots until it is checked.
    Tag {
        h: Header,
        got: usize,
    },
    /// Nothing more is expected on this connection.
    Idle,
}

/// Where a placed page came from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// A reply to a request (urgent half).
    Reply,
    /// The background stream (bulk half).
    Stream,
    /// The source's zero-page map (urgent half, at start-up).
    ZeroMap,
}

#[derive(Clone, Copy)]
enum Fill {
    Copy(*const u8),
    Zero,
}

struct Worker {
    half: Half,
    session: u64,
    /// Which connection the I/O tags belong to (see `TAG_KIND_BITS`).
    epoch: u16,
    /// Set by `Go`; the loop runs only after it.
    state: Option<Arc<ShardState>>,
    ring: Ring,
    ram: Arc<DestRam>,
    shared: Arc<Shared>,
    config: EngineConfig,
    /// Set at set-up, or by `Go` for worker 0's urgent half.
    stream: Option<TcpStream>,
    /// The connection's frame MACs, when authenticated.
    channel: Option<Channel>,
    /// Frames before sealing (authenticated sends), allocated at set-up.
    unsealed: Vec<u8>,
    /// The sealed frames of the next send, before they are copied into the send slot.
    sealed: Vec<u8>,
    header: SlotId,
    /// A frame's MAC trailer.
    tag: SlotId,
    body: SlotId,
    recv: Recv,
    /// Urgent half: the fault-message slot and the request buffer.
    events: Option<SlotId>,
    send: Option<SlotId>,
    /// Bytes of the current send: (written so far, total); total 0 = no send in progress.
    send_progress: (usize, usize),
    /// Faulted pages to request: (block, page).
    pending: Vec<(u32, u64)>,
    end_sent: bool,
    /// Urgent half: the source acknowledged our End. Bulk half: the stream's End arrived.
    finished: bool,
    /// A placement found the VMM's address space gone (`ESRCH`): the worker ends.
    mm_gone: bool,
    /// Bulk half: holds one of the engine's stream slots.
    has_stream_slot: bool,
    completions: Vec<Completion>,
    /// Zeros to copy from when zero pages are placed with `UFFDIO_COPY` (never written).
    zeros: Option<Mapping>,
    last_progress: Instant,
    stats: WorkerStats,
}

/// A worker thread: set up (connection, ring, temp pages), report ready, wait for `Go`
/// (sent by `enable_notify` after the switchover), then serve its shard.
pub(crate) fn run(setup: Setup, shared: Arc<Shared>) -> Result<WorkerStats, DestError> {
    let half = setup.half;
    let go = setup.go.clone();
    let mut w = Worker::new(setup, shared.clone())?;
    // Connected, ring and temp pages in place: faults can be served as soon as `Go` arrives.
    shared.ready.fetch_add(1, Ordering::AcqRel);
    let Ok(go) = go.recv() else {
        // The engine was dropped before `enable_notify`.
        return Err(DestError::Stopped);
    };
    let state = go.state.clone();
    w.state = Some(go.state);
    if let Some(control) = go.control {
        let (stream, channel) = control
            .into_parts()
            .map_err(link_err("the handshake connection"))?;
        w.stream = Some(stream);
        w.channel = channel;
    }
    let result = w.run().map(|()| w.stats);
    if half == Half::Bulk {
        // Whatever happened, the urgent half must not wait for this one any longer.
        state.bulk_done.store(true, Ordering::Release);
    }
    result
}

impl Worker {
    fn new(setup: Setup, shared: Arc<Shared>) -> Result<Worker, DestError> {
        let Setup {
            half,
            id,
            config,
            session,
            ram,
            takes_control,
            go: _,
        } = setup;
        if config.pin {
            // Best effort: a cpuset may forbid the CPU; the engine still works unpinned.
            let _ = crate::sys::pin_to_cpu(id % crate::sys::online_cpus());
        }
        if half == Half::Urgent {
            // Best effort: unprivileged, the urgent half keeps the default priority.
            let _ = crate::sys::set_thread_nice(URGENT_NICE);
        }
        let role = match half {
            Half::Urgent => Role::Urgent,
            Half::Bulk => Role::Bulk,
        };
        let (stream, channel) = match takes_control {
            true => (None, None),
            false => {
                let opened = open_connection(&config, session, role, id as u16)?;
                let welcome = opened.welcome;
                if welcome.session != session || welcome.layout != ram.layout {
                    return Err(DestError::Protocol {
                        context: format!("{role:?} connection of worker {id}"),
                        source: CodecError::BadBody {
                            kind: Kind::Welcome,
                            detail: "a different session or layout than the first connection"
                                .into(),
                        },
                    });
                }
                let (stream, channel) = opened
                    .link
                    .into_parts()
                    .map_err(link_err("a worker connection"))?;
                (Some(stream), channel)
            }
        };
        let zero_fill = config.zero_fill;
        let has_huge = ram.layout.max_page_size() > crate::sys::mem::base_page_size() as u64;
        let batch_bytes = ram
            .layout
            .blocks
            .iter()
            .map(|b| u64::from(max_batch_pages(b.page_size)) * b.page_size)
            .max()
            .expect("a validated layout has blocks") as usize;
        // Arena 0: the header (and, urgent half, fault messages and the request buffer).
        // Arena 1: the temp pages (one whole batch).
        let small = 4096 + EVENT_BATCH * MSG_BYTES + SEND_BYTES;
        let mut ring = Ring::new(&RingConfig {
            entries: 64,
            // The temp pages, plus room for a frame's MAC right after them (read with the body).
            arena_bytes: vec![small, batch_bytes + 4096],
        })?;
        let header = ring.add_slot(0, 0, HEADER_BYTES);
        let tag = ring.add_slot(0, HEADER_BYTES, TAG_BYTES);
        let unsealed_bytes = if config.key.is_some() { SEND_BYTES } else { 0 };
        let body = ring.add_slot(1, 0, batch_bytes + TAG_BYTES);
        let (events, send) = match half {
            Half::Urgent => (
                Some(ring.add_slot(0, 4096, EVENT_BATCH * MSG_BYTES)),
                Some(ring.add_slot(0, 4096 + EVENT_BATCH * MSG_BYTES, SEND_BYTES)),
            ),
            Half::Bulk => (None, None),
        };
        Ok(Worker {
            half,
            session,
            epoch: 0,
            state: None,
            ring,
            ram,
            shared,
            config,
            stream,
            channel,
            unsealed: Vec::with_capacity(unsealed_bytes),
            sealed: Vec::with_capacity(SEND_BYTES),
            header,
            tag,
            body,
            recv: Recv::Header { got: 0 },
            events,
            send,
            send_progress: (0, 0),
            pending: Vec::with_capacity(16 * 1024),
            end_sent: false,
            finished: false,
            mm_gone: false,
            has_stream_slot: false,
            completions: Vec::with_capacity(256),
            zeros: match (zero_fill, has_huge) {
                (ZeroFill::Copy, _) | (_, true) => {
                    Some(Mapping::anonymous(batch_bytes, "zero page source")?)
                }
                (ZeroFill::Zeropage, false) => None,
            },
            last_progress: Instant::now(),
            stats: WorkerStats::default(),
        })
    }

    /// The shard, set by `Go` before the loop runs.
    fn st(&self) -> &ShardState {
        self.state
            .as_deref()
            .expect("a worker runs its loop only after Go")
    }

    fn stream_fd(&self) -> std::os::fd::RawFd {
        self.stream
            .as_ref()
            .expect("a worker runs its loop only after it has its connection")
            .as_raw_fd()
    }

    fn missing(&self) -> u64 {
        self.st().missing.load(Ordering::Acquire)
    }

    fn run(&mut self) -> Result<(), DestError> {
        // The zero map is background work, like the stream: the bulk half places it (at its
        // low priority), so the urgent half serves faults from the first moment and the
        // switchover thread is not starved; a fault on a zero-map page is resolved locally
        // (`on_fault`). Without a stream the urgent half places it before serving.
        let places_zero_map = match self.half {
            Half::Bulk => true,
            Half::Urgent => !self.config.stream,
        };
        if places_zero_map {
            self.place_zero_map()?;
        }
        // A VMM's memory is served until the VMM goes away (the embedder stops the engine then):
        // after the last page, faults on pages it removes still need zero pages.
        let serve_after_end = self.half == Half::Urgent && self.ram.is_foreign();
        loop {
            if self.shared.stop.load(Ordering::Acquire) || self.mm_gone {
                // Stopped, or the VMM exited. With every page of the shard placed (a VMM that
                // exits once restored, before the stream's tail) this is a complete migration,
                // counters and all. Pages missing as this half sees them may be its sibling's
                // last placement, placed but not yet marked: `EngineHandle::wait` decides.
                self.stats.ended_early = !(serve_after_end && self.finished) && self.missing() > 0;
                self.release_stream_slot();
                self.ring.cancel_all();
                return Ok(());
            }
            if self.half == Half::Urgent
                && !self.end_sent
                && self.missing() == 0
                && self.st().bulk_done.load(Ordering::Acquire)
            {
                self.send_end()?;
            }
            if self.half == Half::Urgent
                && self.missing() > 0
                && self.st().bulk_done.load(Ordering::Acquire)
                && self.st().outstanding.load(Ordering::Acquire) == 0
                && self.pending.is_empty()
                && self.stats.recoveries + self.sibling_recoveries() > 0
            {
                // The stream ended, yet pages are missing: some were lost in flight when a
                // connection broke. Ask for them (a tail sweep); nothing waits on luck.
                self.request_missing()?;
            }
            if self.finished && !serve_after_end {
                self.release_stream_slot();
                self.ring.cancel_all();
                return Ok(());
            }
            if self.half == Half::Bulk && !self.take_stream_slot() {
                // Not this stream's turn: the CPU is left to the streams running and to faults.
                self.last_progress = Instant::now();
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            self.arm()?;
            self.stats.loops += 1;
            let done = self.ring.submit_and_reap(1, Some(WAIT))?;
            self.completions.clear();
            self.completions.extend_from_slice(done);
            if self.completions.is_empty() {
                match self.check_stall() {
                    // A connection that went silent is replaced like a broken one.
                    Err(e) if self.recoverable(&e) => self.recover(e)?,
                    r => r?,
                }
                continue;
            }
            self.stats.completions += self.completions.len() as u64;
            // Finished sends first (they free the request buffer), then fault events, then
            // received bytes.
            self.completions
                .sort_unstable_by_key(|c| match c.token.tag & TAG_KIND_BITS {
                    TAG_SEND => 0,
                    TAG_UFFD => 1,
                    _ => 2,
                });
            let mut broken = None;
            for i in 0..self.completions.len() {
                let c = self.completions[i];
                let kind = c.token.tag & TAG_KIND_BITS;
                if kind != TAG_UFFD && (c.token.tag >> 2 != self.epoch || broken.is_some()) {
                    continue; // the old connection's last words: its slot is free again
                }
                let r = match kind {
                    TAG_UFFD => self.on_events(c.result),
                    TAG_SEND => self.on_sent(c.result),
                    _ => self.on_recv(c.result),
                };
                match r {
                    Err(e) if self.recoverable(&e) => broken = Some(e),
                    r => r?,
                }
            }
            if let Some(e) = broken {
                // Fault events of this batch were handled first: none is lost.
                self.recover(e)?;
            }
        }
    }

    /// Places every page of the shard that the source's zero-page map marks zero, in runs
    /// (before serving faults: faults meanwhile wait in the userfaultfd and are then served).
    fn place_zero_map(&mut self) -> Result<(), DestError> {
        let Some(map) = self.st().zero_map.clone() else {
            return Ok(());
        };
        let max_run = self.zeros.as_ref().map_or(1 << 16, |z| {
            z.len_bytes() / self.ram.layout.max_page_size() as usize
        }) as u64;
        for (b, zeros) in map.iter().enumerate() {
            let (start, end) = self.st().shard[b];
            let mut p = start;
            while p < end {
                if !zeros.get(p) {
                    p += 1;
                    continue;
                }
                let n = zeros.run_of_set(p, end, max_run);
                let fill = self.zero_fill_for(b);
                self.place_run(b, p, n as usize, fill, true, Origin::ZeroMap)?;
                p += n;
            }
        }
        Ok(())
    }

    fn in_zero_map(&self, b: usize, page: u64) -> bool {
        self.st().zero_map.as_ref().is_some_and(|m| m[b].get(page))
    }

    /// How to zero a page of block `b`: `UFFDIO_ZEROPAGE` does not exist for hugetlbfs, so
    /// huge pages are always copied from zeros.
    fn zero_fill_for(&self, b: usize) -> Fill {
        let huge = self.ram.layout.blocks[b].page_size != crate::sys::mem::base_page_size() as u64;
        match (&self.zeros, huge) {
            (Some(z), _) => Fill::Copy(z.as_ptr()),
            (None, false) => Fill::Zero,
            (None, true) => unreachable!("huge-page blocks get a zero buffer at set-up"),
        }
    }

    fn take_stream_slot(&mut self) -> bool {
        if !self.has_stream_slot {
            self.has_stream_slot = self
                .shared
                .stream_slots
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok();
        }
        self.has_stream_slot
    }

    fn release_stream_slot(&mut self) {
        if std::mem::take(&mut self.has_stream_slot) {
            self.shared.stream_slots.fetch_add(1, Ordering::AcqRel);
        }
    }

    fn check_stall(&self) -> Result<(), DestError> {
        let waiting = match self.half {
            Half::Urgent => self.st().outstanding.load(Ordering::Acquire) > 0,
            Half::Bulk => true,
        };
        let idle = self.last_progress.elapsed();
        if waiting && self.missing() > 0 && idle > self.config.stall_timeout {
            return Err(DestError::Stalled {
                seconds: idle.as_secs(),
                missing: self.missing(),
            });
        }
        Ok(())
    }

    /// Re-arms every idle read.
    fn arm(&mut self) -> Result<(), DestError> {
        if let Some(events) = self.events {
            // A VMM's userfaultfd also carries events (REMOVE) that must be read while the
            // page map is known to be consistent: wait for readiness, then read ourselves.
            let foreign = self.ram.is_foreign();
            if (self.missing() > 0 || foreign) && !self.ring.is_busy(events) {
                let fd = self.st().uffd.as_raw_fd();
                if foreign {
                    self.ring.poll_in(fd, events, TAG_UFFD)?;
                } else {
                    self.ring
                        .read(fd, events, 0, EVENT_BATCH * MSG_BYTES, TAG_UFFD)?;
                }
            }
        }
        let fd = self.stream_fd();
        match self.recv {
            Recv::Header { got } if !self.ring.is_busy(self.header) => {
                self.ring
                    .read(fd, self.header, got, HEADER_BYTES - got, self.tag(TAG_CONN))?
            }
            Recv::Body { h, got } if !self.ring.is_busy(self.body) => {
                // On an authenticated connection the MAC is read with the body, in one go.
                let want = h.body_len as usize + self.tag_len();
                self.ring
                    .read(fd, self.body, got, want - got, self.tag(TAG_CONN))?
            }
            Recv::Tag { got, .. } if !self.ring.is_busy(self.tag) => {
                self.ring
                    .read(fd, self.tag, got, TAG_BYTES - got, self.tag(TAG_CONN))?
            }
            _ => {}
        }
        Ok(())
    }

    fn on_events(&mut self, result: i32) -> Result<(), DestError> {
        if self.ram.is_foreign() {
            if result < 0 && -result != libc::ECANCELED && -result != libc::EINTR {
                let e = nix::errno::Errno::from_raw(-result);
                return Err(crate::sys::uffd::UffdError::Read(e).into());
            }
            self.read_events_now()?;
            return self.flush_requests();
        }
        if result < 0 {
            let errno = nix::errno::Errno::from_raw(-result);
            return match errno {
                nix::errno::Errno::EAGAIN
                | nix::errno::Errno::EINTR
                | nix::errno::Errno::ECANCELED => Ok(()),
                e => Err(crate::sys::uffd::UffdError::Read(e).into()),
            };
        }
        let events = self.events.expect("fault events only on the urgent half");
        for i in 0..result as usize / MSG_BYTES {
            let mut msg = [0u8; MSG_BYTES];
            msg.copy_from_slice(&self.ring.slot(events)[i * MSG_BYTES..(i + 1) * MSG_BYTES]);
            self.stats.fault_events += 1;
            if let Event::PageFault { address, .. } = Event::decode(&msg) {
                self.on_fault(address as usize)?;
            }
            // Other events (REMOVE, UNMAP, ...) are not requested by this engine.
        }
        self.flush_requests()
    }

    /// Reads and handles every pending userfaultfd event with `read(2)`, under the write side
    /// of the placement lock (a VMM's memory; see `ShardState::place_lock`).
    fn read_events_now(&mut self) -> Result<(), DestError> {
        let state = self.state.clone().expect("events only after Go");
        let _exclusive = state
            .place_lock
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut buf = [0u8; EVENT_BATCH * MSG_BYTES];
        loop {
            let n = state.uffd.read_events(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            for msg in buf[..n].chunks_exact(MSG_BYTES) {
                self.stats.fault_events += 1;
                match Event::decode(msg.try_into().expect("one message")) {
                    Event::PageFault { address, .. } => self.on_fault(address as usize)?,
                    Event::Remove { start, end } => self.on_remove(start as usize, end as usize),
                    _ => {} // FORK, REMAP, UNMAP: not requested by a VMM here
                }
            }
        }
    }

    /// `UFFD_EVENT_REMOVE`: the VMM dropped `[start, end)` (a balloon, memory unplug). Those
    /// pages read as zero from now on: they are done (not missing), never placed from the
    /// source, and a later fault on them gets a zero page.
    fn on_remove(&mut self, start: usize, end: usize) {
        let st = self.state.clone().expect("events only after Go");
        let removed = st.removed.as_ref().expect("REMOVE only for a VMM's memory");
        for (b, block) in self.ram.layout.blocks.iter().enumerate() {
            let ps = block.page_size as usize;
            for seg in self.ram.segments(b) {
                let seg_end = seg.host_addr + seg.pages as usize * ps;
                let (lo, hi) = (start.max(seg.host_addr), end.min(seg_end));
                if lo >= hi {
                    continue;
                }
                let first = seg.first_page + ((lo - seg.host_addr) / ps) as u64;
                let last = seg.first_page + ((hi - seg.host_addr).div_ceil(ps)) as u64;
                let n = last - first;
                self.stats.pages_removed += removed[b].set_range(first, n);
                let newly_done = self.ram.received[b].set_range(first, n);
                if newly_done > 0 {
                    let left = st.missing.fetch_sub(newly_done, Ordering::AcqRel) - newly_done;
                    if left == 0 {
                        let ns = self.shared.started.elapsed().as_nanos() as u64;
                        self.shared.last_placed_ns.fetch_max(ns, Ordering::AcqRel);
                    }
                }
                let answered = st.requested[b].clear_range(first, n);
                if answered > 0 {
                    st.outstanding.fetch_sub(answered, Ordering::AcqRel);
                }
            }
        }
    }

    fn on_fault(&mut self, address: usize) -> Result<(), DestError> {
        let Some((b, page)) = self.locate(address) else {
            return Ok(()); // not ours: cannot happen with per-shard registration
        };
        let ps = self.ram.layout.blocks[b].page_size as usize;
        let addr = self
            .ram
            .host_run(b, page, 1)
            .expect("a located page has an address")
            .0;
        if self.is_removed(b, page) {
            // Dropped by the VMM: it reads as zero, never as the source's page.
            let fill = self.zero_fill_for(b);
            let result = match fill {
                Fill::Copy(src) => self.st().uffd.copy(addr, src, ps, false),
                Fill::Zero => self.st().uffd.zeropage(addr, ps, false),
            };
            self.stats.place_ioctls += 1;
            match result {
                Ok(()) => self.stats.pages_zero_after_remove += 1,
                Err(e) if e.kind == PlaceErrorKind::Exists => self.st().uffd.wake(addr, ps)?,
                // Another REMOVE is pending: its event is read next; the thread refaults.
                Err(e) if e.kind == PlaceErrorKind::MappingChanging => {}
                Err(e) => return Err(crate::sys::uffd::UffdError::Place(e).into()),
            }
        } else if self.ram.received[b].get(page) {
            // Placed after the thread faulted: the placement's wake may have missed it.
            self.stats.fault_already_placed += 1;
            self.st().uffd.wake(addr, ps)?;
        } else if self.in_zero_map(b, page) {
            // A zero page by the source's map, not placed yet: no round trip (the bulk half
            // may race us to it; `EEXIST` then counts it done).
            let fill = self.zero_fill_for(b);
            self.place_run(b, page, 1, fill, true, Origin::ZeroMap)?;
        } else if self.st().requested[b].set(page) {
            self.st().outstanding.fetch_add(1, Ordering::AcqRel);
            if let Some(at) = &self.st().fault_at_ns {
                let ns = self.shared.started.elapsed().as_nanos() as u64;
                at[b][page as usize].store(ns.max(1), Ordering::Relaxed);
            }
            self.pending.push((b as u32, page));
        } else {
            self.stats.fault_deduplicated += 1;
        }
        Ok(())
    }

    fn locate(&self, address: usize) -> Option<(usize, u64)> {
        let (b, page) = self.ram.locate(address)?;
        let (start, end) = self.st().shard[b];
        (start..end).contains(&page).then_some((b, page))
    }

    fn is_removed(&self, b: usize, page: u64) -> bool {
        self.st().removed.as_ref().is_some_and(|r| r[b].get(page))
    }

    /// Coalesces pending faults into `Request` frames and submits one send.
    fn flush_requests(&mut self) -> Result<(), DestError> {
        let Some(send) = self.send else {
            return Ok(());
        };
        if self.pending.is_empty() || self.sending() || self.end_sent || self.ring.is_busy(send) {
            return Ok(());
        }
        let (used, len, frames) = match self.channel.as_mut() {
            None => coalesce_requests(&mut self.pending, self.ring.slot_mut(send)),
            Some(c) => {
                // Room for each 32-byte Request's 16-byte MAC in the send slot.
                let room = SEND_BYTES / (HEADER_BYTES + TAG_BYTES) * HEADER_BYTES;
                self.unsealed.resize(room, 0);
                let (used, len, frames) = coalesce_requests(&mut self.pending, &mut self.unsealed);
                self.sealed.clear();
                seal_frames(Some(&mut c.tx), &self.unsealed[..len], &mut self.sealed);
                let at = self.sealed.len();
                self.ring.slot_mut(send)[..at].copy_from_slice(&self.sealed);
                (used, at, frames)
            }
        };
        self.pending.drain(..used);
        self.stats.requests += frames;
        self.stats.pages_requested += used as u64;
        self.start_send(len)
    }

    /// A send is in progress until its last byte's completion has been processed (the ring
    /// frees the slot at reap time, before we act on the completion).
    fn sending(&self) -> bool {
        self.send_progress.1 != 0
    }

    fn start_send(&mut self, len: usize) -> Result<(), DestError> {
        debug_assert!(!self.sending());
        let send = self.send.expect("sends only on the urgent half");
        self.send_progress = (0, len);
        let tag = self.tag(TAG_SEND);
        self.ring.write(self.stream_fd(), send, 0, len, tag)?;
        self.ring.submit()?;
        Ok(())
    }

    fn on_sent(&mut self, result: i32) -> Result<(), DestError> {
        if result <= 0 {
            return Err(DestError::Io {
                context: "send requests on the urgent connection".into(),
                source: std::io::Error::from_raw_os_error(if result == 0 {
                    libc::EPIPE
                } else {
                    -result
                }),
            });
        }
        let (done, total) = self.send_progress;
        let done = done + result as usize;
        if done < total {
            self.send_progress = (done, total);
            let send = self.send.expect("sends only on the urgent half");
            let tag = self.tag(TAG_SEND);
            self.ring
                .write(self.stream_fd(), send, done, total - done, tag)?;
            return Ok(());
        }
        self.send_progress = (0, 0);
        self.flush_requests()
    }

    fn send_end(&mut self) -> Result<(), DestError> {
        let send = self.send.expect("End goes out on the urgent half");
        if self.sending() || self.ring.is_busy(send) {
            return Ok(()); // after the requests in flight
        }
        let mut h = [0u8; HEADER_BYTES];
        Header::control(Kind::End, self.st().id as u64).encode(&mut h);
        self.sealed.clear();
        seal_frames(
            self.channel.as_mut().map(|c| &mut c.tx),
            &h,
            &mut self.sealed,
        );
        let len = self.sealed.len();
        self.ring.slot_mut(send)[..len].copy_from_slice(&self.sealed);
        self.end_sent = true;
        self.start_send(len)
    }

    /// Recoveries of the other half of this worker (shared through the shard).
    fn sibling_recoveries(&self) -> u64 {
        self.st().recoveries.load(Ordering::Acquire)
    }

    /// Requests every page of the shard not yet placed (after a break lost stream pages).
    fn request_missing(&mut self) -> Result<(), DestError> {
        let st = self.state.clone().expect("after Go");
        for (b, &(start, end)) in st.shard.iter().enumerate() {
            let mut p = start;
            while let Some(first) = self.ram.received[b].next_clear(p, end) {
                // Removed pages count as received: never asked for.
                if st.requested[b].set(first) {
                    st.outstanding.fetch_add(1, Ordering::AcqRel);
                    self.pending.push((b as u32, first));
                }
                p = first + 1;
            }
        }
        self.stats.pages_swept += self.pending.len() as u64;
        self.flush_requests()
    }

    /// A tag for an operation of `kind` on the current connection.
    fn tag(&self, kind: u16) -> u16 {
        kind | (self.epoch << 2)
    }

    /// Whether `e` is a broken connection that recovery may repair (not a protocol or
    /// authentication error: those end the session).
    fn recoverable(&self, e: &DestError) -> bool {
        !self.config.recovery_timeout.is_zero()
            && !self.shared.stop.load(Ordering::Acquire)
            && matches!(
                e,
                DestError::Io { .. } | DestError::Closed(..) | DestError::Stalled { .. }
            )
    }

    /// Replaces a broken connection: reconnects with backoff (bounded by the recovery
    /// timeout), rejoins the session, and restores what was in flight: the urgent half asks
    /// again for every page still requested (and End if it was not acknowledged); the bulk
    /// half tells the source which pages of its shard it has, and the stream resumes with the
    /// others. Faulting threads stay blocked meanwhile; nothing placed is lost.
    fn recover(&mut self, cause: DestError) -> Result<(), DestError> {
        if let Some(old) = self.stream.take() {
            // Its operations in flight complete now (as stale: new epoch) and free their slots.
            let _ = old.shutdown(std::net::Shutdown::Both);
        }
        self.epoch = (self.epoch + 1) & (u16::MAX >> 2);
        self.recv = Recv::Header { got: 0 };
        self.send_progress = (0, 0);
        self.channel = None;
        let role = match self.half {
            Half::Urgent => Role::Urgent,
            Half::Bulk => Role::Bulk,
        };
        let id = self.st().id;
        let started = Instant::now();
        let deadline = started + self.config.recovery_timeout;
        let mut backoff = Duration::from_millis(5);
        let opened = loop {
            if self.shared.stop.load(Ordering::Acquire) {
                return Err(DestError::Stopped);
            }
            match super::open_connection_as(&self.config, self.session, role, id as u16, true) {
                Ok(o) => break o,
                Err(_) if Instant::now() + backoff < deadline => {
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                Err(e) => {
                    return Err(DestError::SourceLost {
                        seconds: started.elapsed().as_secs_f64().round() as u64,
                        missing: self.missing(),
                        last: format!("{cause}; then: {e}"),
                    })
                }
            }
        };
        if opened.welcome.session != self.session || opened.welcome.layout != self.ram.layout {
            return Err(DestError::Protocol {
                context: format!("{role:?} connection of worker {id} (resumed)"),
                source: CodecError::BadBody {
                    kind: Kind::Welcome,
                    detail: "a different session or layout than before the break".into(),
                },
            });
        }
        let mut link = opened.link;
        match self.half {
            Half::Urgent => {
                // Ask again for everything still awaited; End again if its Ack was lost.
                self.pending.clear();
                let st = self.state.clone().expect("recovery only after Go");
                for (b, &(start, end)) in st.shard.iter().enumerate() {
                    for p in start..end {
                        if st.requested[b].get(p) {
                            self.pending.push((b as u32, p));
                        }
                    }
                }
                if self.end_sent && !self.finished {
                    self.end_sent = false;
                }
            }
            Half::Bulk => {
                // Which pages of the shard are here: the source streams the others again.
                let st = self.state.clone().expect("recovery only after Go");
                let mut out = Vec::new();
                let per_frame = u64::from(codec::MAX_ZERO_MAP_BYTES) * 8;
                for (b, &(start, end)) in st.shard.iter().enumerate() {
                    let mut first = start;
                    while first < end {
                        let n = (end - first).min(per_frame);
                        Header::have(b as u32, first, n).encode_into(&mut out);
                        let received = &self.ram.received[b];
                        codec::encode_page_bits(n, |i| received.get(first + i), &mut out);
                        first += n;
                    }
                }
                Header::control(Kind::Run, 0).encode_into(&mut out);
                link.write_frames(&out)
                    .map_err(link_err("send the received bitmap after a break"))?;
            }
        }
        let (stream, channel) = link
            .into_parts()
            .map_err(link_err("a resumed connection"))?;
        self.channel = channel;
        self.stream = Some(stream);
        self.stats.recoveries += 1;
        self.st().recoveries.fetch_add(1, Ordering::AcqRel);
        self.last_progress = Instant::now();
        self.flush_requests()
    }

    fn conn_name(&self) -> &'static str {
        match self.half {
            Half::Urgent => "urgent",
            Half::Bulk => "bulk",
        }
    }

    fn on_recv(&mut self, result: i32) -> Result<(), DestError> {
        let name = self.conn_name();
        if result < 0 {
            return Err(DestError::Io {
                context: format!("receive on the {name} connection"),
                source: std::io::Error::from_raw_os_error(-result),
            });
        }
        if result == 0 {
            return Err(DestError::Closed(name, self.missing()));
        }
        let n = result as usize;
        self.stats.bytes_received += n as u64;
        self.last_progress = Instant::now();
        let protocol = |source| DestError::Protocol {
            context: format!("{name} connection"),
            source,
        };
        match self.recv {
            Recv::Header { got } => {
                let got = got + n;
                if got < HEADER_BYTES {
                    self.recv = Recv::Header { got };
                    return Ok(());
                }
                let raw: [u8; HEADER_BYTES] = self.ring.slot(self.header)[..HEADER_BYTES]
                    .try_into()
                    .expect("header slot is HEADER_BYTES long");
                let h = Header::decode(&raw).map_err(protocol)?;
                // What the header alone can tell is checked before any byte of the body is read.
                match (h.kind, self.half) {
                    (Kind::Pages, _) => self.check_pages(&h).map_err(protocol)?,
                    (Kind::Error, _) => {}
                    (Kind::End, Half::Bulk) => {}
                    (Kind::Ack, Half::Urgent) if self.end_sent => {}
                    (other, half) => {
                        return Err(protocol(CodecError::Unexpected {
                            got: other,
                            expected: match half {
                                Half::Bulk => "Pages or End",
                                Half::Urgent => "Pages or Ack",
                            },
                        }))
                    }
                }
                if h.body_len > 0 {
                    self.recv = Recv::Body { h, got: 0 };
                } else {
                    self.frame_received(h)?;
                }
            }
            Recv::Body { h, got } => {
                let got = got + n;
                let body_len = h.body_len as usize;
                if got < body_len + self.tag_len() {
                    self.recv = Recv::Body { h, got };
                    return Ok(());
                }
                if let Some(c) = self.channel.as_mut() {
                    let head = &self.ring.slot(self.header)[..HEADER_BYTES];
                    let slot = self.ring.slot(self.body);
                    c.rx.open(
                        head,
                        &slot[..body_len],
                        &slot[body_len..body_len + TAG_BYTES],
                    )?;
                }
                self.frame_verified(h)?;
            }
            Recv::Tag { h, got } => {
                let got = got + n;
                if got < TAG_BYTES {
                    self.recv = Recv::Tag { h, got };
                    return Ok(());
                }
                debug_assert_eq!(h.body_len, 0, "bodies carry their MAC");
                let head = &self.ring.slot(self.header)[..HEADER_BYTES];
                let body: &[u8] = &[];
                let tag = &self.ring.slot(self.tag)[..TAG_BYTES];
                self.channel
                    .as_mut()
                    .expect("tags only on an authenticated connection")
                    .rx
                    .open(head, body, tag)?;
                self.frame_verified(h)?;
            }
            Recv::Idle => {
                return Err(protocol(CodecError::BadBody {
                    kind: Kind::End,
                    detail: "bytes after the final frame".into(),
                }))
            }
        }
        Ok(())
    }

    /// Bytes of MAC after each frame on this connection.
    fn tag_len(&self) -> usize {
        if self.channel.is_some() {
            TAG_BYTES
        } else {
            0
        }
    }

    /// A body-less frame's header is in: read its MAC first on an authenticated connection.
    fn frame_received(&mut self, h: Header) -> Result<(), DestError> {
        if self.channel.is_some() {
            self.recv = Recv::Tag { h, got: 0 };
            return Ok(());
        }
        self.frame_verified(h)
    }

    /// Acts on a whole, checked frame.
    fn frame_verified(&mut self, h: Header) -> Result<(), DestError> {
        self.recv = Recv::Header { got: 0 };
        match h.kind {
            Kind::Pages => self.place_batch(&h)?,
            Kind::Error => {
                let msg = codec::decode_error(&self.ring.slot(self.body)[..h.body_len as usize]);
                return Err(DestError::Remote(msg));
            }
            Kind::End => {
                self.finished = true;
                self.st().bulk_done.store(true, Ordering::Release);
                self.recv = Recv::Idle;
            }
            Kind::Ack => {
                self.finished = true;
                self.recv = Recv::Idle;
            }
            other => unreachable!("{other:?} was refused at its header"),
        }
        Ok(())
    }

    /// A batch must lie inside the layout (codec check) and inside this worker's shard: a page
    /// of another shard is registered with another userfaultfd.
    fn check_pages(&self, h: &Header) -> Result<(), CodecError> {
        h.check(&self.ram.layout)?;
        let (start, end) = self.st().shard[h.block as usize];
        if h.page < start || h.page + u64::from(h.count) > end {
            return Err(CodecError::Range(crate::layout::LayoutError::OutOfRange {
                block: h.block,
                page: h.page,
                count: u64::from(h.count),
                detail: format!("worker {} serves pages [{start}, {end})", self.st().id),
            }));
        }
        Ok(())
    }

    /// Places a received batch: runs of zero pages with `UFFDIO_ZEROPAGE`, runs of data pages
    /// with one `UFFDIO_COPY` from the temp pages.
    fn place_batch(&mut self, h: &Header) -> Result<(), DestError> {
        let ps = self.ram.layout.blocks[h.block as usize].page_size as usize;
        let count = usize::from(h.count);
        let mut i = 0;
        let mut data_pages = 0;
        while i < count {
            let zero = h.mask >> i & 1 == 1;
            let mut n = 1;
            while i + n < count && (h.mask >> (i + n) & 1 == 1) == zero {
                n += 1;
            }
            let fill = if zero {
                self.zero_fill_for(h.block as usize)
            } else {
                let src = self.ring.slot_addr(self.body, data_pages * ps);
                data_pages += n;
                Fill::Copy(src)
            };
            let origin = match self.half {
                Half::Urgent => Origin::Reply,
                Half::Bulk => Origin::Stream,
            };
            self.place_run(h.block as usize, h.page + i as u64, n, fill, zero, origin)?;
            i += n;
        }
        Ok(())
    }
    /// Places pages `[first, first + n)` of block `b` from `fill`, split where the target
    /// address space is not contiguous (a VMM's regions) and around pages the VMM removed.
    fn place_run(
        &mut self,
        b: usize,
        first: u64,
        n: usize,
        fill: Fill,
        zero: bool,
        origin: Origin,
    ) -> Result<(), DestError> {
        let ps = self.ram.layout.blocks[b].page_size as usize;
        let at = |fill: Fill, off: usize| match fill {
            Fill::Copy(src) => Fill::Copy(src.wrapping_add(off * ps)),
            Fill::Zero => Fill::Zero,
        };
        if !self.ram.is_foreign() {
            let (addr, _) = self
                .ram
                .host_run(b, first, n as u64)
                .expect("own memory covers its block");
            return self
                .place_extent(b, first, n, addr, fill, zero, origin)
                .map(|_| ());
        }
        let state = self.state.clone().expect("placement only after Go");
        let mut off = 0;
        let mut waited = 0u32;
        let mut stalled_since: Option<Instant> = None;
        while off < n {
            // The bulk half places under the read side of the lock the urgent half reads
            // REMOVE events under (see `ShardState::place_lock`); the urgent half is the reader.
            let shared_guard = (self.half == Half::Bulk).then(|| {
                state
                    .place_lock
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
            });
            let mut stalled = false;
            while off < n {
                let p = first + off as u64;
                let skip = self.is_removed(b, p) || self.ram.host_run(b, p, 1).is_none();
                if skip {
                    off += 1; // dropped by the VMM, or outside its regions: never filled
                    continue;
                }
                let (addr, seg_pages) = self
                    .ram
                    .host_run(b, p, (n - off) as u64)
                    .expect("checked above");
                let mut k = seg_pages as usize;
                if let Some(removed) = &state.removed {
                    if let Some(r) = (1..k).find(|&i| removed[b].get(p + i as u64)) {
                        k = r;
                    }
                }
                let done = self.place_extent(b, p, k, addr, at(fill, off), zero, origin)?;
                off += done;
                if done < k {
                    stalled = true; // EAGAIN: a REMOVE is pending
                    break;
                }
            }
            drop(shared_guard);
            if stalled {
                // EAGAIN lasts until the VMM's own madvise/munmap returns, which needs its event
                // read (by the urgent half) and then its thread on a CPU: bounded by time, not
                // by a count of retries (on a loaded host that thread may wait a while).
                let since = *stalled_since.get_or_insert_with(Instant::now);
                if since.elapsed() > self.config.stall_timeout {
                    return Err(DestError::Unsupported(format!(
                        "the VMM's memory map kept changing (EAGAIN on every placement) for {} s",
                        since.elapsed().as_secs()
                    )));
                }
                if self.half == Half::Urgent {
                    // We read the events: do it now, then retry.
                    self.read_events_now()?;
                }
                waited += 1;
                if waited <= 8 {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(Duration::from_micros(50 * u64::from(waited.min(20))));
                }
            }
        }
        Ok(())
    }

    /// Places `n` pages at `base` (contiguous in the target) from `fill`. Returns the pages
    /// done (placed or found present); fewer than `n` only for a VMM's memory whose map is
    /// changing (`EAGAIN`), which the caller resolves by reading events first.
    #[allow(clippy::too_many_arguments)]
    fn place_extent(
        &mut self,
        b: usize,
        first: u64,
        n: usize,
        base: usize,
        fill: Fill,
        zero: bool,
        origin: Origin,
    ) -> Result<usize, DestError> {
        let ps = self.ram.layout.blocks[b].page_size as usize;
        let mut off = 0;
        let mut retries = 0;
        while off < n {
            let dst = base + off * ps;
            let len = (n - off) * ps;
            self.stats.place_ioctls += 1;
            let result = match fill {
                // `src` points into a ring-owned temp page arena that no operation targets now.
                Fill::Copy(src) => self
                    .st()
                    .uffd
                    .copy(dst, src.wrapping_add(off * ps), len, false),
                Fill::Zero => self.st().uffd.zeropage(dst, len, false),
            };
            let (placed, err) = match result {
                Ok(()) => (n - off, None),
                Err(e) => (e.done_bytes / ps, Some(e)),
            };
            self.mark_placed(b, first + off as u64, placed as u64, zero, origin);
            off += placed;
            let Some(e) = err else { break };
            match e.kind {
                PlaceErrorKind::Partial => {}
                PlaceErrorKind::Exists => {
                    // Already placed (a stream page raced a request): make sure its waiters run.
                    self.stats.eexist += 1;
                    self.st().uffd.wake(base + off * ps, ps)?;
                    if self.ram.is_foreign() || origin == Origin::ZeroMap {
                        // Present in the VMM but maybe not by our hand (it may have written
                        // the page before handing over), or a precopy zero page that a huge
                        // page backed with zeros during precopy: count it done.
                        self.mark_present(b, first + off as u64);
                    }
                    off += 1;
                }
                PlaceErrorKind::MappingChanging if self.ram.is_foreign() => return Ok(off),
                // The VMM exited (its address space is gone): nothing more can be placed; the
                // worker ends and the engine decides whether it had everything.
                PlaceErrorKind::MmGone if self.ram.is_foreign() => {
                    self.mm_gone = true;
                    return Ok(n);
                }
                PlaceErrorKind::MappingChanging if retries < MAPPING_CHANGING_RETRIES => {
                    retries += 1;
                    std::thread::yield_now();
                }
                _ => return Err(crate::sys::uffd::UffdError::Place(e).into()),
            }
        }
        Ok(n)
    }

    /// Fault service time (event read → placed) of the faulted pages among `[first, first+n)`
    /// (a VMM's memory only).
    fn record_fault_service(&mut self, b: usize, first: u64, n: u64) {
        let Some(state) = self.state.clone() else {
            return;
        };
        let Some(at) = &state.fault_at_ns else {
            return;
        };
        let now = self.shared.started.elapsed().as_nanos() as u64;
        let hist = self.stats.fault_service_ns.get_or_insert_with(|| {
            hdrhistogram::Histogram::new_with_bounds(1, 60_000_000_000, 3)
                .expect("valid histogram bounds")
        });
        for p in first..first + n {
            let t = at[b][p as usize].swap(0, Ordering::Relaxed);
            if t > 0 {
                let _ = hist.record(now.saturating_sub(t).max(1));
                let _ = self.shared.first_served_ns.compare_exchange(
                    0,
                    now,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                );
            }
        }
    }

    /// A page found present (`EEXIST`) that no placement of ours marked: count it done, so
    /// the shard completes.
    fn mark_present(&mut self, b: usize, page: u64) {
        if self.ram.received[b].set(page) {
            let st = self.st();
            let left = st.missing.fetch_sub(1, Ordering::AcqRel) - 1;
            if st.requested[b].clear(page) {
                st.outstanding.fetch_sub(1, Ordering::AcqRel);
            }
            if left == 0 {
                let ns = self.shared.started.elapsed().as_nanos() as u64;
                self.shared.last_placed_ns.fetch_max(ns, Ordering::AcqRel);
            }
        }
    }

    fn mark_placed(&mut self, b: usize, first: u64, n: u64, zero: bool, origin: Origin) {
        if n == 0 {
            return;
        }
        let new = self.ram.received[b].set_range(first, n);
        debug_assert!(new == n || self.ram.is_foreign(), "a page was placed twice");
        let left = self.st().missing.fetch_sub(new, Ordering::AcqRel) - new;
        // Requests these pages answered (whichever half delivered them) are no longer awaited.
        let answered = self.st().requested[b].clear_range(first, n);
        if answered > 0 {
            self.st().outstanding.fetch_sub(answered, Ordering::AcqRel);
            self.record_fault_service(b, first, n);
        }
        match origin {
            Origin::Reply => self.stats.pages_by_fault += new,
            Origin::Stream => self.stats.pages_by_stream += new,
            Origin::ZeroMap => self.stats.pages_by_zero_map += new,
        }
        if zero {
            self.stats.pages_zero += new;
        }
        if left == 0 {
            let ns = self.shared.started.elapsed().as_nanos() as u64;
            self.shared.last_placed_ns.fetch_max(ns, Ordering::AcqRel);
        }
    }
}

/// Sorts `pending` (block, page) faults and encodes them as `Request` frames into `buf`, one
/// frame per run of consecutive pages (at most `MAX_REQUEST_PAGES` each), as many as fit.
/// Returns (pending entries encoded, bytes written, frames).
pub fn coalesce_requests(pending: &mut [(u32, u64)], buf: &mut [u8]) -> (usize, usize, u64) {
    pending.sort_unstable();
    let (mut i, mut len, mut frames) = (0, 0, 0);
    while i < pending.len() && len + HEADER_BYTES <= buf.len() {
        let (block, first) = pending[i];
        let mut n = 1usize;
        while i + n < pending.len()
            && n < usize::from(codec::MAX_REQUEST_PAGES)
            && pending[i + n] == (block, first + n as u64)
        {
            n += 1;
        }
        let mut h = [0u8; HEADER_BYTES];
        Header::request(block, first, n as u16).encode(&mut h);
        buf[len..len + HEADER_BYTES].copy_from_slice(&h);
        len += HEADER_BYTES;
        frames += 1;
        i += n;
    }
    (i, len, frames)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalescing_merges_runs_and_respects_the_buffer() {
        let mut pending = vec![(0, 7), (0, 5), (0, 6), (1, 0), (0, 9), (1, 1)];
        let mut buf = [0u8; 4 * HEADER_BYTES];
        let (used, len, frames) = coalesce_requests(&mut pending, &mut buf);
        assert_eq!((used, len, frames), (6, 3 * HEADER_BYTES, 3));
        let decoded: Vec<_> = buf[..len]
            .chunks_exact(HEADER_BYTES)
            .map(|c| Header::decode(c.try_into().unwrap()).unwrap())
            .map(|h| (h.block, h.page, h.count))
            .collect();
        assert_eq!(decoded, vec![(0, 5, 3), (0, 9, 1), (1, 0, 2)]);
        let mut many: Vec<(u32, u64)> = (0..10).map(|p| (0, p * 2)).collect();
        let (used, len, frames) = coalesce_requests(&mut many, &mut buf);
        assert_eq!(
            (used, len, frames),
            (4, 4 * HEADER_BYTES, 4),
            "stops when the buffer is full"
        );
    }
}
