//! One engine worker: a pinned thread with its own userfaultfd shard, io_uring, temp pages and
//! connections. Allocates everything at start-up; the loop then only reaps completions in bulk
//! and acts on them.
//!
//! Per loop iteration:
//! 1. reap every completion;
//! 2. fault events first: decode, drop faults on placed pages (wake) or already requested
//!    pages, queue the rest; then coalesce the queue into `Request` frames and submit the send
//!    at once, before any placement work;
//! 3. urgent replies, then bulk batches: a batch's header is read first and checked against the
//!    layout *and this worker's shard*, then its body is read straight into temp pages, and
//!    contiguous runs are placed with one `UFFDIO_COPY` / `UFFDIO_ZEROPAGE` each (which wakes
//!    the waiters). `EEXIST` means the page is already there: wake it, skip it, carry on;
//! 4. re-arm every idle read.

use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{open_connection, shard, DestError, DestRam, EngineConfig, Shared, WorkerStats};
use crate::codec::{self, max_batch_pages, CodecError, Header, Kind, Role, HEADER_BYTES};
use crate::layout::PageBitmap;
use crate::sys::ring::{Completion, Ring, RingConfig, SlotId};
use crate::sys::uffd::{Event, PlaceErrorKind, Uffd, MSG_BYTES};

/// Fault messages read per completion.
const EVENT_BATCH: usize = 64;
/// Bytes of the request send buffer (1024 request frames).
const SEND_BYTES: usize = 1024 * HEADER_BYTES;
/// How long one wait for completions may last before the loop checks stop and stall.
const WAIT: Duration = Duration::from_millis(50);
/// Pages of a bulk batch placed between two looks at urgent work (fault events, replies).
const BULK_CHUNK: usize = 16;
/// Retries of a placement that keeps seeing `EAGAIN` with nothing placed.
const MAPPING_CHANGING_RETRIES: u32 = 1000;

const TAG_UFFD: u16 = 0;
const TAG_URGENT: u16 = 1;
const TAG_BULK: u16 = 2;
const TAG_SEND: u16 = 3;

pub(crate) struct Setup {
    pub(crate) id: usize,
    pub(crate) config: EngineConfig,
    pub(crate) session: u64,
    pub(crate) uffd: Uffd,
    pub(crate) ram: Arc<DestRam>,
    pub(crate) control: Option<TcpStream>,
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
    /// Nothing more is expected on this connection.
    Idle,
}

struct Conn {
    stream: TcpStream,
    name: &'static str,
    tag: u16,
    header: SlotId,
    body: SlotId,
    state: Recv,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    Fault,
    Stream,
}

#[derive(Clone, Copy)]
enum Fill {
    Copy(*const u8),
    Zero,
}

struct Worker {
    id: usize,
    uffd: Uffd,
    ring: Ring,
    ram: Arc<DestRam>,
    shared: Arc<Shared>,
    config: EngineConfig,
    /// `[start, end)` of this worker's shard, per block.
    shard: Vec<(u64, u64)>,
    /// Pages of the shard not yet placed.
    missing: u64,
    /// Pages requested (only this worker's shard bits are used).
    requested: Vec<PageBitmap>,
    /// Faulted pages to request: (block, page).
    pending: Vec<(u32, u64)>,
    events: SlotId,
    send: SlotId,
    /// Bytes of the current send: (written so far, total).
    send_progress: (usize, usize),
    urgent: Conn,
    bulk: Option<Conn>,
    bulk_ended: bool,
    end_sent: bool,
    acked: bool,
    completions: Vec<Completion>,
    /// Completions reaped while placing a bulk batch, handled there (all but bulk ones).
    side: Vec<Completion>,
    /// Bulk completions reaped in the middle of a bulk batch, handled next loop.
    deferred: Vec<Completion>,
    last_progress: Instant,
    /// Pages requested (or queued to be) and not placed yet: the engine is waiting on the
    /// source while this is non-zero.
    outstanding: u64,
    stats: WorkerStats,
}

pub(crate) fn run(setup: Setup, shared: Arc<Shared>) -> Result<WorkerStats, DestError> {
    let mut w = Worker::new(setup, shared)?;
    w.run()?;
    Ok(w.stats)
}

impl Worker {
    fn new(setup: Setup, shared: Arc<Shared>) -> Result<Worker, DestError> {
        let Setup {
            id,
            config,
            session,
            uffd,
            ram,
            control,
        } = setup;
        if config.pin {
            // Best effort: a cpuset may forbid the CPU; the engine still works unpinned.
            let _ = crate::sys::pin_to_cpu(id % crate::sys::online_cpus());
        }
        let connect = |role| -> Result<TcpStream, DestError> {
            let (stream, welcome) = open_connection(&config, session, role, id as u16)?;
            if welcome.session != session || welcome.layout != ram.layout {
                return Err(DestError::Protocol {
                    context: format!("{role:?} connection of worker {id}"),
                    source: CodecError::BadBody {
                        kind: Kind::Welcome,
                        detail: "a different session or layout than the first connection".into(),
                    },
                });
            }
            Ok(stream)
        };
        let urgent_stream = match control {
            Some(s) => s,
            None => connect(Role::Urgent)?,
        };
        let bulk_stream = if config.stream {
            Some(connect(Role::Bulk)?)
        } else {
            None
        };

        let layout = &ram.layout;
        let batch_bytes = layout
            .blocks
            .iter()
            .map(|b| u64::from(max_batch_pages(b.page_size)) * b.page_size)
            .max()
            .expect("a validated layout has blocks") as usize;
        // Arena 0: fault messages, two headers, the request buffer. Arenas 1 and 2: the temp
        // pages of the urgent and bulk connections (one whole batch each).
        let small = EVENT_BATCH * MSG_BYTES + 2 * 4096 + SEND_BYTES;
        let mut ring = Ring::new(&RingConfig {
            entries: 64,
            arena_bytes: vec![small, batch_bytes, batch_bytes],
        })?;
        let events = ring.add_slot(0, 0, EVENT_BATCH * MSG_BYTES);
        let urgent_header = ring.add_slot(0, EVENT_BATCH * MSG_BYTES, HEADER_BYTES);
        let bulk_header = ring.add_slot(0, EVENT_BATCH * MSG_BYTES + 4096, HEADER_BYTES);
        let send = ring.add_slot(0, EVENT_BATCH * MSG_BYTES + 2 * 4096, SEND_BYTES);
        let urgent_body = ring.add_slot(1, 0, batch_bytes);
        let bulk_body = ring.add_slot(2, 0, batch_bytes);

        let shard: Vec<(u64, u64)> = layout
            .blocks
            .iter()
            .map(|b| shard(b.pages(), id, config.workers))
            .collect();
        let missing = shard.iter().map(|(s, e)| e - s).sum();
        Ok(Worker {
            id,
            uffd,
            ring,
            shard,
            missing,
            requested: layout
                .blocks
                .iter()
                .map(|b| PageBitmap::new(b.pages()))
                .collect(),
            pending: Vec::with_capacity(16 * 1024),
            events,
            send,
            send_progress: (0, 0),
            urgent: Conn {
                stream: urgent_stream,
                name: "urgent",
                tag: TAG_URGENT,
                header: urgent_header,
                body: urgent_body,
                state: Recv::Header { got: 0 },
            },
            bulk: bulk_stream.map(|stream| Conn {
                stream,
                name: "bulk",
                tag: TAG_BULK,
                header: bulk_header,
                body: bulk_body,
                state: Recv::Header { got: 0 },
            }),
            bulk_ended: false,
            end_sent: false,
            acked: false,
            completions: Vec::with_capacity(256),
            side: Vec::with_capacity(256),
            deferred: Vec::with_capacity(4),
            last_progress: Instant::now(),
            outstanding: 0,
            stats: WorkerStats::default(),
            ram,
            shared,
            config,
        })
    }

    fn run(&mut self) -> Result<(), DestError> {
        loop {
            if self.shared.stop.load(Ordering::Acquire) {
                return Err(DestError::Stopped);
            }
            if self.missing == 0 && (self.bulk.is_none() || self.bulk_ended) && !self.end_sent {
                self.send_end()?;
            }
            if self.acked {
                self.ring.cancel_all();
                return Ok(());
            }
            self.arm()?;
            self.stats.loops += 1;
            let want = usize::from(self.deferred.is_empty());
            let done = self.ring.submit_and_reap(want, Some(WAIT))?;
            self.completions.clear();
            self.completions.extend_from_slice(&self.deferred);
            self.deferred.clear();
            self.completions.extend_from_slice(done);
            if self.completions.is_empty() {
                self.check_stall()?;
                continue;
            }
            self.stats.completions += self.completions.len() as u64;
            // Priority: finished sends (cheap, and they free the request buffer), fault
            // events, urgent replies, bulk.
            self.completions
                .sort_unstable_by_key(|c| match c.token.tag {
                    TAG_SEND => 0,
                    TAG_UFFD => 1,
                    TAG_URGENT => 2,
                    _ => 3,
                });
            for i in 0..self.completions.len() {
                let c = self.completions[i];
                match c.token.tag {
                    TAG_UFFD => self.on_events(c.result)?,
                    TAG_SEND => self.on_sent(c.result)?,
                    TAG_URGENT => {
                        // Requests go out before any placement work.
                        self.flush_requests()?;
                        self.on_recv(false, c.result)?
                    }
                    _ => {
                        self.flush_requests()?;
                        self.on_recv(true, c.result)?
                    }
                }
            }
        }
    }

    fn check_stall(&self) -> Result<(), DestError> {
        let waiting = self.outstanding > 0 || (self.bulk.is_some() && !self.bulk_ended);
        let idle = self.last_progress.elapsed();
        if waiting && self.missing > 0 && idle > self.config.stall_timeout {
            return Err(DestError::Stalled {
                seconds: idle.as_secs(),
                missing: self.missing,
            });
        }
        Ok(())
    }

    /// Re-arms every idle read.
    fn arm(&mut self) -> Result<(), DestError> {
        if self.missing > 0 && !self.ring.is_busy(self.events) {
            let fd = self.uffd.as_raw_fd();
            self.ring
                .read(fd, self.events, 0, EVENT_BATCH * MSG_BYTES, TAG_UFFD)?;
        }
        Self::arm_conn(&mut self.ring, &self.urgent)?;
        if let Some(b) = &self.bulk {
            Self::arm_conn(&mut self.ring, b)?;
        }
        Ok(())
    }

    fn arm_conn(ring: &mut Ring, c: &Conn) -> Result<(), DestError> {
        let fd = c.stream.as_raw_fd();
        match c.state {
            Recv::Header { got } if !ring.is_busy(c.header) => {
                ring.read(fd, c.header, got, HEADER_BYTES - got, c.tag)?
            }
            Recv::Body { h, got } if !ring.is_busy(c.body) => {
                ring.read(fd, c.body, got, h.body_len as usize - got, c.tag)?
            }
            _ => {}
        }
        Ok(())
    }

    fn on_events(&mut self, result: i32) -> Result<(), DestError> {
        if result < 0 {
            let errno = nix::errno::Errno::from_raw(-result);
            return match errno {
                nix::errno::Errno::EAGAIN
                | nix::errno::Errno::EINTR
                | nix::errno::Errno::ECANCELED => Ok(()),
                e => Err(crate::sys::uffd::UffdError::Read(e).into()),
            };
        }
        let n = result as usize;
        for i in 0..n / MSG_BYTES {
            let mut msg = [0u8; MSG_BYTES];
            msg.copy_from_slice(&self.ring.slot(self.events)[i * MSG_BYTES..(i + 1) * MSG_BYTES]);
            self.stats.fault_events += 1;
            if let Event::PageFault { address, .. } = Event::decode(&msg) {
                self.on_fault(address as usize)?;
            }
            // Other events (REMOVE, UNMAP, ...) are not requested by this engine.
        }
        self.flush_requests()
    }

    fn on_fault(&mut self, address: usize) -> Result<(), DestError> {
        let Some((b, page)) = self.locate(address) else {
            return Ok(()); // not ours: cannot happen with per-shard registration
        };
        let ps = self.ram.layout.blocks[b].page_size as usize;
        if self.ram.received[b].get(page) {
            // Placed after the thread faulted: the placement's wake may have missed it.
            self.stats.fault_already_placed += 1;
            let addr = self.ram.regions[b].addr() + page as usize * ps;
            self.uffd.wake(addr, ps)?;
        } else if self.requested[b].set(page) {
            self.outstanding += 1;
            self.pending.push((b as u32, page));
        } else {
            self.stats.fault_deduplicated += 1;
        }
        Ok(())
    }

    fn locate(&self, address: usize) -> Option<(usize, u64)> {
        self.ram.regions.iter().enumerate().find_map(|(b, m)| {
            let off = address.checked_sub(m.addr())?;
            if off >= m.len_bytes() {
                return None;
            }
            let page = (off / self.ram.layout.blocks[b].page_size as usize) as u64;
            let (start, end) = self.shard[b];
            (start..end).contains(&page).then_some((b, page))
        })
    }

    /// Coalesces pending faults into `Request` frames and submits one send.
    fn flush_requests(&mut self) -> Result<(), DestError> {
        if self.pending.is_empty() || self.sending() || self.end_sent {
            return Ok(());
        }
        self.pending.sort_unstable();
        let mut len = 0;
        let used;
        {
            let buf = self.ring.slot_mut(self.send);
            let mut i = 0;
            while i < self.pending.len() && len + HEADER_BYTES <= SEND_BYTES {
                let (block, first) = self.pending[i];
                let mut n = 1usize;
                while i + n < self.pending.len()
                    && n < usize::from(codec::MAX_REQUEST_PAGES)
                    && self.pending[i + n] == (block, first + n as u64)
                {
                    n += 1;
                }
                let mut h = [0u8; HEADER_BYTES];
                Header::request(block, first, n as u16).encode(&mut h);
                buf[len..len + HEADER_BYTES].copy_from_slice(&h);
                len += HEADER_BYTES;
                self.stats.requests += 1;
                self.stats.pages_requested += n as u64;
                i += n;
            }
            used = i;
        }
        self.pending.drain(..used);
        self.start_send(len)
    }

    /// A send is in progress until its last byte's completion has been processed (the ring
    /// frees the slot at reap time, before we act on the completion).
    fn sending(&self) -> bool {
        self.send_progress.1 != 0
    }

    fn start_send(&mut self, len: usize) -> Result<(), DestError> {
        debug_assert!(!self.sending());
        self.send_progress = (0, len);
        let fd = self.urgent.stream.as_raw_fd();
        self.ring.write(fd, self.send, 0, len, TAG_SEND)?;
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
            let fd = self.urgent.stream.as_raw_fd();
            self.ring
                .write(fd, self.send, done, total - done, TAG_SEND)?;
            return Ok(());
        }
        self.send_progress = (0, 0);
        self.flush_requests()
    }

    fn send_end(&mut self) -> Result<(), DestError> {
        if self.sending() {
            return Ok(()); // after the requests in flight
        }
        let mut h = [0u8; HEADER_BYTES];
        Header::control(Kind::End, self.id as u64).encode(&mut h);
        self.ring.slot_mut(self.send)[..HEADER_BYTES].copy_from_slice(&h);
        self.end_sent = true;
        self.start_send(HEADER_BYTES)
    }

    fn on_recv(&mut self, bulk: bool, result: i32) -> Result<(), DestError> {
        let missing = self.missing;
        let conn = if bulk {
            self.bulk
                .as_mut()
                .expect("bulk completion without a bulk connection")
        } else {
            &mut self.urgent
        };
        if result < 0 {
            return Err(DestError::Io {
                context: format!("receive on the {} connection", conn.name),
                source: std::io::Error::from_raw_os_error(-result),
            });
        }
        if result == 0 {
            return Err(DestError::Closed(conn.name, missing));
        }
        let n = result as usize;
        self.stats.bytes_received += n as u64;
        self.last_progress = Instant::now();
        let (header_slot, body_slot, name) = (conn.header, conn.body, conn.name);
        match conn.state {
            Recv::Header { got } => {
                let got = got + n;
                if got < HEADER_BYTES {
                    conn.state = Recv::Header { got };
                    return Ok(());
                }
                let raw: [u8; HEADER_BYTES] = self.ring.slot(header_slot)[..HEADER_BYTES]
                    .try_into()
                    .expect("header slot is HEADER_BYTES long");
                let protocol = |source| DestError::Protocol {
                    context: format!("{name} connection"),
                    source,
                };
                let h = Header::decode(&raw).map_err(protocol)?;
                let next = match h.kind {
                    Kind::Pages => {
                        self.check_pages(&h).map_err(protocol)?;
                        if h.body_len == 0 {
                            self.place_batch(&h, body_slot, bulk)?;
                            Recv::Header { got: 0 }
                        } else {
                            Recv::Body { h, got: 0 }
                        }
                    }
                    Kind::Error if h.body_len > 0 => Recv::Body { h, got: 0 },
                    Kind::Error => return Err(DestError::Remote(String::new())),
                    Kind::End if bulk => {
                        self.bulk_ended = true;
                        Recv::Idle
                    }
                    Kind::Ack if !bulk && self.end_sent => {
                        self.acked = true;
                        Recv::Idle
                    }
                    other => {
                        return Err(protocol(CodecError::Unexpected {
                            got: other,
                            expected: if bulk { "Pages or End" } else { "Pages or Ack" },
                        }))
                    }
                };
                self.conn_mut(bulk).state = next;
            }
            Recv::Body { h, got } => {
                let got = got + n;
                if got < h.body_len as usize {
                    conn.state = Recv::Body { h, got };
                    return Ok(());
                }
                conn.state = Recv::Header { got: 0 };
                if h.kind == Kind::Error {
                    let msg = codec::decode_error(&self.ring.slot(body_slot)[..got]);
                    return Err(DestError::Remote(msg));
                }
                self.place_batch(&h, body_slot, bulk)?;
            }
            Recv::Idle => {
                return Err(DestError::Protocol {
                    context: format!("{name} connection"),
                    source: CodecError::BadBody {
                        kind: Kind::End,
                        detail: "bytes after the final frame".into(),
                    },
                })
            }
        }
        Ok(())
    }

    fn conn_mut(&mut self, bulk: bool) -> &mut Conn {
        if bulk {
            self.bulk.as_mut().expect("bulk connection")
        } else {
            &mut self.urgent
        }
    }

    /// A batch must lie inside the layout (codec check) and inside this worker's shard: a page
    /// of another shard is registered with another userfaultfd.
    fn check_pages(&self, h: &Header) -> Result<(), CodecError> {
        h.check(&self.ram.layout)?;
        let (start, end) = self.shard[h.block as usize];
        if h.page < start || h.page + u64::from(h.count) > end {
            return Err(CodecError::Range(crate::layout::LayoutError::OutOfRange {
                block: h.block,
                page: h.page,
                count: u64::from(h.count),
                detail: format!("worker {} serves pages [{start}, {end})", self.id),
            }));
        }
        Ok(())
    }

    /// Places a received batch: runs of zero pages with `UFFDIO_ZEROPAGE`, runs of data pages
    /// with one `UFFDIO_COPY` from the temp pages.
    fn place_batch(&mut self, h: &Header, body: SlotId, bulk: bool) -> Result<(), DestError> {
        let origin = if bulk { Origin::Stream } else { Origin::Fault };
        let ps = self.ram.layout.blocks[h.block as usize].page_size as usize;
        let count = usize::from(h.count);
        let mut i = 0;
        let mut data_pages = 0;
        while i < count {
            let zero = h.mask >> i & 1 == 1;
            let mut n = 1;
            let max_run = if bulk { BULK_CHUNK } else { count };
            while i + n < count && n < max_run && (h.mask >> (i + n) & 1 == 1) == zero {
                n += 1;
            }
            let fill = if zero {
                Fill::Zero
            } else {
                let src = self.ring.slot_addr(body, data_pages * ps);
                data_pages += n;
                Fill::Copy(src)
            };
            self.place_run(h.block as usize, h.page + i as u64, n, fill, origin)?;
            i += n;
            if bulk && i < count {
                self.service_urgent()?;
            }
        }
        Ok(())
    }

    /// In the middle of a bulk batch: handle fault events, finished sends and urgent replies
    /// that the kernel has already posted (placement ioctls run our task work, so no syscall
    /// is needed to see them), and re-arm the fault read and the urgent connection. The bulk
    /// connection is left alone: its temp pages are being placed from.
    fn service_urgent(&mut self) -> Result<(), DestError> {
        let ready = self.ring.reap_ready();
        if ready.is_empty() {
            return Ok(());
        }
        let mut side = std::mem::take(&mut self.side);
        side.clear();
        side.extend_from_slice(ready);
        self.stats.completions += side.len() as u64;
        let mut result = Ok(());
        for c in &side {
            result = match c.token.tag {
                TAG_SEND => self.on_sent(c.result),
                TAG_UFFD => self.on_events(c.result),
                TAG_URGENT => self.on_recv(false, c.result),
                _ => {
                    self.deferred.push(*c);
                    Ok(())
                }
            };
            if result.is_err() {
                break;
            }
        }
        self.side = side;
        result?;
        if self.missing > 0 && !self.ring.is_busy(self.events) {
            let fd = self.uffd.as_raw_fd();
            self.ring
                .read(fd, self.events, 0, EVENT_BATCH * MSG_BYTES, TAG_UFFD)?;
        }
        Self::arm_conn(&mut self.ring, &self.urgent)?;
        self.ring.submit()?;
        Ok(())
    }

    fn place_run(
        &mut self,
        b: usize,
        first: u64,
        n: usize,
        fill: Fill,
        origin: Origin,
    ) -> Result<(), DestError> {
        let ps = self.ram.layout.blocks[b].page_size as usize;
        let base = self.ram.regions[b].addr() + first as usize * ps;
        let mut off = 0;
        let mut retries = 0;
        while off < n {
            let dst = base + off * ps;
            let len = (n - off) * ps;
            self.stats.place_ioctls += 1;
            let result = match fill {
                // `src` points into a ring-owned temp page arena that no operation targets now.
                Fill::Copy(src) => self.uffd.copy(dst, src.wrapping_add(off * ps), len, false),
                Fill::Zero => self.uffd.zeropage(dst, len, false),
            };
            let (placed, err) = match result {
                Ok(()) => (n - off, None),
                Err(e) => (e.done_bytes / ps, Some(e)),
            };
            self.mark_placed(b, first + off as u64, placed as u64, fill, origin);
            off += placed;
            let Some(e) = err else { break };
            match e.kind {
                PlaceErrorKind::Partial => {}
                PlaceErrorKind::Exists => {
                    // Already placed (a stream page raced a request): make sure its waiters run.
                    self.stats.eexist += 1;
                    self.uffd.wake(base + off * ps, ps)?;
                    off += 1;
                }
                PlaceErrorKind::MappingChanging if retries < MAPPING_CHANGING_RETRIES => {
                    retries += 1;
                    std::thread::yield_now();
                }
                _ => return Err(crate::sys::uffd::UffdError::Place(e).into()),
            }
        }
        Ok(())
    }

    fn mark_placed(&mut self, b: usize, first: u64, n: u64, fill: Fill, origin: Origin) {
        if n == 0 {
            return;
        }
        let new = self.ram.received[b].set_range(first, n);
        debug_assert_eq!(new, n, "a page was placed twice");
        self.missing -= new;
        // Requests these pages answered (whichever path delivered them) are no longer awaited.
        self.outstanding -= self.requested[b].clear_range(first, n);
        match origin {
            Origin::Fault => self.stats.pages_by_fault += new,
            Origin::Stream => self.stats.pages_by_stream += new,
        }
        if matches!(fill, Fill::Zero) {
            self.stats.pages_zero += new;
        }
        if self.missing == 0 {
            let ns = self.shared.started.elapsed().as_nanos() as u64;
            self.shared.last_placed_ns.fetch_max(ns, Ordering::AcqRel);
        }
    }
}
