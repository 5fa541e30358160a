//! One engine worker per core, in two halves pinned to that core, each with its own io_uring:
//!
//! - the **urgent half** owns the shard's fault events and the urgent connection. It asks for a
//!   raised priority (nice -5, granted to root or `CAP_SYS_NICE`): then a fault or a reply that
//!   wakes it runs ahead of the bulk half on the same core (a same-core wake costs ~3 µs here, a
//!   cross-core one ~45 µs); without the privilege both halves share the core by the
//!   scheduler's fairness;
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

mod conn;
mod credit;
mod event_loop;
mod faults;
mod place;
mod recover;
mod shared;

pub use faults::coalesce_requests;

use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::pacer::{FaultPacer, Window};
use super::stats::JobEnd;
use super::{
    link_err, open_with_retry, retryable, DestError, DestRam, EngineConfig, Joining, Shared,
    WorkerStats, ZeroFill,
};
use crate::codec::{self, max_batch_pages, CodecError, Header, Kind, Role, HEADER_BYTES};
use crate::layout::PageBitmap;
use crate::link::auth::AuthError;
use crate::link::framed::seal_frames;
use crate::link::seal::{Channel, TAG_BYTES};
use crate::link::FramedStream;
use crate::sys::mem::Mapping;
use crate::sys::ring::{Completion, OpKind, Ring, RingConfig, SlotId};
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
    /// A VMM's memory, or a receiver-driven stream's: per block and page, when its fault
    /// event was read (ns after the engine's start, 0 = none), to measure fault service time on
    /// our side (8 bytes per page).
    fault_at_ns: Option<Vec<Box<[AtomicU64]>>>,
    /// Connections of this worker replaced after a break (either half).
    recoveries: AtomicU64,
    /// The batch the bulk half is placing now ([`pack_batch`]; `NOT_PLACING`: none): a fault
    /// on one of its pages waits for that placement, whose wake frees the thread, instead of
    /// asking the source for a copy already in hand.
    placing: AtomicU64,
}

/// No batch being placed (or one [`pack_batch`] cannot represent).
const NOT_PLACING: u64 = u64::MAX;

/// A batch packed in one word (block 8 bits, first page 48, pages 8), so a reader never sees
/// half of one batch and half of another.
fn pack_batch(b: u32, first: u64, n: u64) -> u64 {
    if b < 0xff && first < 1 << 48 && n < 0x100 {
        u64::from(b) << 56 | first << 8 | n
    } else {
        NOT_PLACING
    }
}

impl ShardState {
    /// Whether the bulk half is placing page `page` of block `b` right now.
    fn bulk_is_placing(&self, b: usize, page: u64) -> bool {
        let v = self.placing.load(Ordering::Acquire);
        if v == NOT_PLACING {
            return false;
        }
        let (block, first, n) = ((v >> 56) as usize, (v >> 8) & ((1 << 48) - 1), v & 0xff);
        block == b && (first..first + n).contains(&page)
    }

    pub(crate) fn new(
        id: usize,
        uffd: Uffd,
        ram: &DestRam,
        workers: usize,
        stream: bool,
        zero_map: Option<Arc<Vec<PageBitmap>>>,
        timed: bool,
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
            placing: AtomicU64::new(NOT_PLACING),
            fault_at_ns: (foreign || timed).then(|| {
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
/// half, the handshake connection (and its frame seals, when authenticated).
pub(crate) struct Go {
    pub(crate) state: Arc<ShardState>,
    pub(crate) control: Option<FramedStream>,
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
    /// The frame's tag (an authenticated connection); the header and body stay in
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
    /// The stream's push of the image's working set (bulk half).
    WorkingSet,
    /// The source's zero-page map (urgent half, at start-up).
    ZeroMap,
}

impl Origin {
    fn placed_by(self) -> super::PlacedBy {
        match self {
            Origin::Reply => super::PlacedBy::Fault,
            Origin::Stream => super::PlacedBy::Stream,
            Origin::WorkingSet => super::PlacedBy::WorkingSet,
            Origin::ZeroMap => super::PlacedBy::ZeroMap,
        }
    }
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
    /// The shard, from `Go`: a worker exists only once it has one.
    state: Arc<ShardState>,
    ring: Ring,
    ram: Arc<DestRam>,
    shared: Arc<Shared>,
    config: EngineConfig,
    /// Set at set-up, or by `Go` for worker 0's urgent half.
    stream: Option<TcpStream>,
    /// The connection's frame seals, when authenticated.
    channel: Option<Channel>,
    /// Frames before sealing (authenticated sends), allocated at set-up.
    unsealed: Vec<u8>,
    /// The sealed frames of the next send, before they are copied into the send slot.
    sealed: Vec<u8>,
    header: SlotId,
    /// A frame's tag.
    tag: SlotId,
    body: SlotId,
    recv: Recv,
    /// Bulk half, per block of shared memory: the alias as a ring slot (bodies received
    /// straight into it).
    aliases: Vec<Option<SlotId>>,
    /// Bulk half: the batch being received straight into the alias, if any.
    direct: Option<shared::Direct>,
    /// Urgent half: the fault-message slot and the request buffer.
    events: Option<SlotId>,
    send: Option<SlotId>,
    /// Bytes of the current send: (written so far, total); total 0 = no send in progress.
    send_progress: (usize, usize),
    /// Faulted pages to request: (block, page).
    pending: Vec<(u32, u64)>,
    end_sent: bool,
    /// Bulk half: the stream is in its working-set push (between `Run(1)` and `Run(0)`).
    in_push: bool,
    /// Urgent half: the source acknowledged our End. Bulk half: the stream's End arrived.
    finished: bool,
    /// A placement found the VMM's address space gone (`ESRCH`): the worker ends.
    mm_gone: bool,
    /// Bulk half: holds one of the engine's stream slots.
    has_stream_slot: bool,
    /// Bulk half of a receiver-driven stream: its window and grants.
    credit: Option<credit::Credit>,
    completions: Vec<Completion>,
    /// Zeros to copy from when zero pages are placed with `UFFDIO_COPY` (never written).
    zeros: Option<Mapping>,
    last_progress: Instant,
    /// When the last send began (the urgent half sends a heartbeat when it is long ago).
    last_sent: Instant,
    stats: WorkerStats,
}

/// A worker thread: set up (connection, ring, temp pages), report ready, wait for `Go`
/// (sent by `enable_notify` after the switchover), then serve its shard.
pub(crate) fn run(setup: Setup, shared: Arc<Shared>) -> JobEnd {
    let half = setup.half;
    let go = setup.go.clone();
    let prepared = match Prepared::new(setup, shared.clone()) {
        Ok(p) => p,
        Err(e) => return (WorkerStats::default(), Err(e)),
    };
    // Connected, ring and temp pages in place: faults can be served as soon as `Go` arrives.
    shared.ready.fetch_add(1, Ordering::AcqRel);
    let Ok(go) = go.recv() else {
        // The engine was dropped before `enable_notify`.
        return (WorkerStats::default(), Err(DestError::Stopped));
    };
    let state = go.state.clone();
    let result = prepared.start(go).map(|mut w| {
        let mut r = w.run();
        // Whatever ended it, a batch half-received into shared memory is dropped.
        if let Err(e) = w.abandon_direct() {
            r = r.and(Err(e));
        }
        (w.stats, r)
    });
    if half == Half::Bulk {
        // Whatever happened, the urgent half must not wait for this one any longer.
        state.placing.store(NOT_PLACING, Ordering::Release);
        state.bulk_done.store(true, Ordering::Release);
    }
    match result {
        Ok(end) => end,
        Err(e) => (WorkerStats::default(), Err(e)),
    }
}

/// A worker half's own connection (the first connection, worker 0's urgent one, is the
/// handshake's): it must join the same session with the same layout. A network failure is
/// tried again until the recovery timeout.
fn join_as_worker(
    config: &EngineConfig,
    (session, role, id): (u64, Role, usize),
    ram: &DestRam,
    shared: &Shared,
) -> Result<(TcpStream, Option<Channel>), DestError> {
    let deadline = Instant::now() + config.recovery_timeout;
    let stopped = || shared.stop.load(Ordering::Acquire);
    let opened = open_with_retry(
        config,
        (session, role, id as u16),
        Joining::Fresh,
        deadline,
        &stopped,
    )?;
    let welcome = opened.welcome;
    if welcome.session != session || welcome.layout != ram.layout {
        return Err(DestError::Protocol {
            context: format!("{role:?} connection of worker {id}"),
            source: CodecError::BadBody {
                kind: Kind::Welcome,
                detail: "a different session or layout than the first connection".into(),
            },
        });
    }
    opened
        .link
        .into_parts()
        .map_err(link_err("a worker connection"))
}

/// The ring slots of a worker half.
struct Slots {
    header: SlotId,
    tag: SlotId,
    body: SlotId,
    /// The urgent half's fault messages.
    events: Option<SlotId>,
    /// The urgent half's request buffer.
    send: Option<SlotId>,
    /// The bulk half's alias slot of each shared-memory block.
    aliases: Vec<Option<SlotId>>,
}

/// A half's io_uring and its slots. Arena 0: the header (and, urgent half, fault messages and
/// the request buffer); arena 1: the temp pages (one whole batch) with room for a frame's tag
/// right after them (read with the body).
fn build_ring(half: Half, batch_bytes: usize, ram: &DestRam) -> Result<(Ring, Slots), DestError> {
    let small = 4096 + EVENT_BATCH * MSG_BYTES + SEND_BYTES;
    let mut ring = Ring::new(&RingConfig {
        entries: 64,
        arena_bytes: vec![small, batch_bytes + 4096],
    })?;
    let header = ring.add_slot(0, 0, HEADER_BYTES);
    let tag = ring.add_slot(0, HEADER_BYTES, TAG_BYTES);
    let body = ring.add_slot(1, 0, batch_bytes + TAG_BYTES);
    let (events, send) = match half {
        Half::Urgent => (
            Some(ring.add_slot(0, 4096, EVENT_BATCH * MSG_BYTES)),
            Some(ring.add_slot(0, 4096 + EVENT_BATCH * MSG_BYTES, SEND_BYTES)),
        ),
        Half::Bulk => (None, None),
    };
    // The bulk half receives stream bodies for shared memory straight into its alias.
    let aliases = (0..ram.layout.blocks.len())
        .map(|b| match (half, ram.shared_block(b)) {
            (Half::Bulk, Some(sh)) => {
                let arena = ring.add_shared_arena(sh.alias.clone());
                Some(ring.add_slot(arena, 0, sh.alias.len_bytes()))
            }
            _ => None,
        })
        .collect();
    let slots = Slots {
        header,
        tag,
        body,
        events,
        send,
        aliases,
    };
    Ok((ring, slots))
}

/// A worker half set up before the switchover: connected, its ring and temp pages in place.
struct Prepared {
    half: Half,
    id: usize,
    session: u64,
    ram: Arc<DestRam>,
    shared: Arc<Shared>,
    config: EngineConfig,
    /// Its own connection (`None`: it takes the handshake's, which `Go` carries, or a bulk
    /// half joins once released).
    stream: Option<TcpStream>,
    channel: Option<Channel>,
    ring: Ring,
    slots: Slots,
    zeros: Option<Mapping>,
}

impl Prepared {
    fn new(setup: Setup, shared: Arc<Shared>) -> Result<Prepared, DestError> {
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
        let joins_later = half == Half::Bulk && config.bulk_joins_after_go;
        let (stream, channel) = match takes_control || joins_later {
            true => (None, None),
            false => {
                let (stream, channel) =
                    join_as_worker(&config, (session, role, id), &ram, &shared)?;
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
        let (ring, slots) = build_ring(half, batch_bytes, &ram)?;
        let zeros = match (zero_fill, has_huge) {
            (ZeroFill::Copy, _) | (_, true) => {
                Some(Mapping::anonymous(batch_bytes, "zero page source")?)
            }
            (ZeroFill::Zeropage, false) => None,
        };
        Ok(Prepared {
            half,
            id,
            session,
            ram,
            shared,
            config,
            stream,
            channel,
            ring,
            slots,
            zeros,
        })
    }

    /// `Go` arrived: the worker gets its shard (and, worker 0's urgent half, the handshake's
    /// connection).
    fn start(self, go: Go) -> Result<Worker, DestError> {
        let Prepared {
            half,
            id,
            session,
            ram,
            shared,
            config,
            mut stream,
            mut channel,
            ring,
            slots,
            zeros,
        } = self;
        if let Some(control) = go.control {
            let (s, c) = control
                .into_parts()
                .map_err(link_err("the handshake connection"))?;
            (stream, channel) = (Some(s), c);
        } else if stream.is_none() {
            // A bulk half that joins only once released (`bulk_joins_after_go`).
            let (s, c) = join_as_worker(&config, (session, Role::Bulk, id), &ram, &shared)?;
            (stream, channel) = (Some(s), c);
        }
        let unsealed_bytes = if config.key.is_some() { SEND_BYTES } else { 0 };
        let credit = match half {
            Half::Bulk => shared.pacer.as_ref().map(credit::Credit::new),
            Half::Urgent => None,
        };
        Ok(Worker {
            half,
            session,
            epoch: 0,
            state: go.state,
            ring,
            ram,
            shared,
            config,
            stream,
            channel,
            unsealed: Vec::with_capacity(unsealed_bytes),
            sealed: Vec::with_capacity(SEND_BYTES),
            header: slots.header,
            tag: slots.tag,
            body: slots.body,
            recv: Recv::Header { got: 0 },
            aliases: slots.aliases,
            direct: None,
            events: slots.events,
            send: slots.send,
            send_progress: (0, 0),
            pending: Vec::with_capacity(16 * 1024),
            end_sent: false,
            in_push: false,
            finished: false,
            mm_gone: false,
            has_stream_slot: false,
            credit,
            completions: Vec::with_capacity(256),
            zeros,
            last_progress: Instant::now(),
            last_sent: Instant::now(),
            stats: WorkerStats::default(),
        })
    }
}

impl Worker {
    /// The shard.
    fn st(&self) -> &ShardState {
        &self.state
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

    /// A tag for an operation of `kind` on the current connection.
    fn tag(&self, kind: u16) -> u16 {
        kind | (self.epoch << 2)
    }
}
