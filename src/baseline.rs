//! The deliberately simple handler that `postcopy bench` measures the engine against.
//!
//! What a first implementation would do: one thread waits for a fault (poll + read of one
//! message), sends one request for that page, waits for the reply on the same connection and
//! places it with `UFFDIO_COPY`; a second thread receives the background stream in order and
//! places it page by page. One userfaultfd for the whole region, blocking sockets, no batching,
//! no io_uring. It speaks the same protocol (as one "worker") to the same source, with a key
//! authenticated and sealed like the engine (the same `FramedStream`), and its stream is pushed.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout};

use crate::codec::{CodecError, Header, Kind, Role, HEADER_BYTES};
use crate::dest::{
    job, link_err, open_connection, register_shard, Connected, DestError, DestRam, EngineConfig,
    EngineHandle, Job, Shared, WorkerStats,
};
use crate::link::FramedStream;
use crate::sys::uffd::{Event, PlaceErrorKind, Uffd, MSG_BYTES};

fn io(context: &'static str) -> impl FnOnce(std::io::Error) -> DestError {
    move |source| DestError::Io {
        context: context.into(),
        source,
    }
}

/// Starts the baseline on `ram`: a fault thread on the control connection, and (with
/// `config.stream`) a receiver thread on a bulk connection. `config.workers` is ignored (1).
pub fn start(
    connected: Connected,
    ram: Arc<DestRam>,
    config: &EngineConfig,
) -> Result<EngineHandle, DestError> {
    let placer = Arc::new(Placer {
        uffd: Arc::new(register_shard(&ram, |pages| (0, pages))?),
        ram: ram.clone(),
        placed: Arc::new(AtomicU64::new(0)),
        link_timeout: config.link_timeout,
        huge_zeros: (ram.layout.max_page_size() > crate::sys::mem::base_page_size() as u64)
            .then(|| vec![0u8; ram.layout.max_page_size() as usize]),
    });
    let session = connected.welcome.session;
    let mut jobs: Vec<(String, usize, Job)> = Vec::new();
    let (p, control) = (placer.clone(), connected.control);
    jobs.push((
        "baseline-fault".into(),
        0,
        job(move |shared| fault_thread(&p, control, &shared)),
    ));
    if config.stream {
        let cfg = EngineConfig {
            workers: 1,
            // The source pushes the baseline's stream (no credit).
            fault_latency_target: None,
            ..config.clone()
        };
        let stream = open_connection(&cfg, session, Role::Bulk, 0)?.link;
        jobs.push((
            "baseline-stream".into(),
            0,
            job(move |shared| stream_thread(&placer, stream, &shared)),
        ));
    }
    EngineHandle::spawn(ram, 1, 1, None, jobs)
}

/// What both threads place with: the one userfaultfd, the memory, and the count of pages
/// placed (the fault thread's end condition, as it has no shard).
struct Placer {
    uffd: Arc<Uffd>,
    ram: Arc<DestRam>,
    placed: Arc<AtomicU64>,
    /// A connection silent this long is dead.
    link_timeout: Duration,
    /// Zeros to copy a huge zero page from (hugetlbfs has no `UFFDIO_ZEROPAGE`).
    huge_zeros: Option<Vec<u8>>,
}

/// Reads one frame (header, body), checked against the layout before its body is read.
fn read_frame(s: &mut FramedStream, ram: &DestRam) -> Result<Header, DestError> {
    let h = s
        .read_frame_if(|h| match h.kind {
            Kind::Pages => h.check(&ram.layout).map(|_| ()),
            Kind::End | Kind::Ack | Kind::Run => Ok(()),
            got => Err(CodecError::Unexpected {
                got,
                expected: "Pages, Run, End or Ack",
            }),
        })
        .map_err(link_err("baseline"))?;
    h.ok_or_else(|| DestError::Io {
        context: "baseline: read frame".into(),
        source: std::io::ErrorKind::UnexpectedEof.into(),
    })
}

/// Places a batch page by page, counting them in `p.placed`; returns pages newly placed.
fn place(
    p: &Placer,
    h: &Header,
    body: &[u8],
    stats: &mut WorkerStats,
    shared: &Shared,
) -> Result<u64, DestError> {
    let (uffd, ram) = (&p.uffd, &p.ram);
    let b = h.block as usize;
    let ps = ram.layout.blocks[b].page_size as usize;
    let mut data = 0;
    let mut placed = 0;
    for i in 0..u64::from(h.count) {
        let page = h.page + i;
        let dst = ram.regions[b].addr() + page as usize * ps;
        let huge = ps > crate::sys::mem::base_page_size();
        let result = if h.mask >> i & 1 == 1 {
            match (&p.huge_zeros, huge) {
                (Some(z), true) => uffd.copy(dst, z.as_ptr(), ps, false),
                _ => uffd.zeropage(dst, ps, false),
            }
        } else {
            data += 1;
            uffd.copy(dst, body[(data - 1) * ps..].as_ptr(), ps, false)
        };
        stats.place_ioctls += 1;
        match result {
            Ok(()) => {
                if ram.received[b].set(page) {
                    placed += 1;
                    if h.mask >> i & 1 == 1 {
                        stats.pages_zero += 1;
                    }
                    let total = p.placed.fetch_add(1, Ordering::AcqRel) + 1;
                    if total == ram.layout.total_pages() {
                        let ns = shared.started.elapsed().as_nanos() as u64;
                        shared.last_placed_ns.fetch_max(ns, Ordering::AcqRel);
                    }
                }
            }
            Err(e) if e.kind == PlaceErrorKind::Exists => {
                stats.eexist += 1;
                uffd.wake(dst, ps)?;
            }
            Err(e) => return Err(crate::sys::uffd::UffdError::Place(e).into()),
        }
    }
    Ok(placed)
}

fn fault_thread(
    p: &Placer,
    mut s: FramedStream,
    shared: &Shared,
) -> Result<WorkerStats, DestError> {
    let (uffd, ram, placed) = (&*p.uffd, &*p.ram, &*p.placed);
    let mut stats = WorkerStats::default();
    let mut msg = [0u8; MSG_BYTES];
    s.socket()
        .set_read_timeout(Some(p.link_timeout))
        .map_err(io("set timeout"))?;
    let live = crate::link::Liveness::new(p.link_timeout);
    let total = ram.layout.total_pages();
    while placed.load(Ordering::Acquire) < total {
        if shared.stop.load(Ordering::Acquire) {
            return Err(DestError::Stopped);
        }
        // Between faults the source hears a heartbeat now and then (it takes a silent urgent
        // connection for a dead one).
        s.heartbeat_if_due(&live)
            .map_err(link_err("baseline: send a heartbeat"))?;
        let mut fds = [PollFd::new(uffd.as_fd(), PollFlags::POLLIN)];
        if nix::poll::poll(&mut fds, PollTimeout::from(100u16)).unwrap_or(0) == 0 {
            continue;
        }
        if uffd.read_events(&mut msg)? < MSG_BYTES {
            continue;
        }
        stats.fault_events += 1;
        let Event::PageFault { address, .. } = Event::decode(&msg) else {
            continue;
        };
        let Some((b, page)) = ram.regions.iter().enumerate().find_map(|(b, m)| {
            let off = (address as usize).checked_sub(m.addr())?;
            (off < m.len_bytes())
                .then(|| (b, (off / ram.layout.blocks[b].page_size as usize) as u64))
        }) else {
            continue;
        };
        let ps = ram.layout.blocks[b].page_size as usize;
        if ram.received[b].get(page) {
            stats.fault_already_placed += 1;
            uffd.wake(ram.regions[b].addr() + page as usize * ps, ps)?;
            continue;
        }
        let mut req = [0u8; HEADER_BYTES];
        Header::request(b as u32, page, 1).encode(&mut req);
        s.write_frames(&mut req)
            .map_err(link_err("baseline: send request"))?;
        stats.requests += 1;
        stats.pages_requested += 1;
        place_reply(p, &mut s, (b, page), &mut stats, shared)?;
    }
    let mut end = [0u8; HEADER_BYTES];
    Header::control(Kind::End, 0).encode(&mut end);
    s.write_frames(&mut end)
        .map_err(link_err("baseline: send End"))?;
    while read_frame(&mut s, ram)?.kind != Kind::Ack {}
    Ok(stats)
}

/// Reads replies until the one carrying page `page` of block `b` and places them: the source
/// may have sent more than asked for (a prefetch after an earlier reply), and those frames
/// come first. (A placement may find its page already there, placed by the stream thread.)
fn place_reply(
    p: &Placer,
    s: &mut FramedStream,
    (b, page): (usize, u64),
    stats: &mut WorkerStats,
    shared: &Shared,
) -> Result<(), DestError> {
    loop {
        let h = read_frame(s, &p.ram)?;
        if h.kind != Kind::Pages {
            return Err(DestError::Protocol {
                context: "baseline".into(),
                source: CodecError::Unexpected {
                    got: h.kind,
                    expected: "Pages",
                },
            });
        }
        stats.pages_by_fault += place(p, &h, s.body(), stats, shared)?;
        if h.block as usize == b && (h.page..h.page + u64::from(h.count)).contains(&page) {
            return Ok(());
        }
    }
}

fn stream_thread(
    p: &Placer,
    mut s: FramedStream,
    shared: &Shared,
) -> Result<WorkerStats, DestError> {
    let ram = &*p.ram;
    let mut stats = WorkerStats::default();
    s.socket()
        .set_read_timeout(Some(p.link_timeout))
        .map_err(io("set timeout"))?;
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return Err(DestError::Stopped);
        }
        let h = read_frame(&mut s, ram)?;
        match h.kind {
            Kind::Pages => stats.pages_by_stream += place(p, &h, s.body(), &mut stats, shared)?,
            // A working-set push follows: the baseline places it like any stream page.
            Kind::Run => {}
            Kind::End => return Ok(stats),
            other => {
                return Err(DestError::Protocol {
                    context: "baseline stream".into(),
                    source: CodecError::Unexpected {
                        got: other,
                        expected: "Pages or End",
                    },
                })
            }
        }
    }
}
