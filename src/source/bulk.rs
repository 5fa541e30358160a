//! A bulk connection: the background stream of a worker's shard, and its resumption after a
//! break (`Have` frames).

use super::conn::{next_frame, write_err};
use super::credit::CreditGate;
use super::error::SourceError;
use super::joined::Joined;
use super::pages::encode_run;
use super::registry::Shared;
use super::session::{Session, WsMode};
use crate::codec;
use crate::codec::{max_batch_pages, CodecError, Header, Kind};
use crate::link::FramedStream;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// A bulk connection rejoining after a break: the destination's `Have` frames say which pages
/// of this worker's shard it has; the others are marked unsent so the stream sends them again
/// (they may have been lost in flight with the old connection).
pub(super) fn resume_bulk(c: &mut Joined<'_>) -> Result<(), SourceError> {
    let (shared, session, peer, worker) = (c.shared, c.session, c.peer, c.worker);
    let link = &mut *c.link;
    // The broken connection's streamer stops claiming pages now.
    session.bulk_gen[usize::from(worker)].fetch_add(1, Ordering::AcqRel);
    let layout = shared.image.layout();
    let protocol = |source| SourceError::Protocol { peer, source };
    loop {
        let h = next_frame(link, peer, session.id, || {
            format!("worker {worker}'s resumed bulk connection closed")
        })?;
        match h.kind {
            Kind::Run => return Ok(()),
            Kind::Have => {
                h.check_zero_map(layout).map_err(protocol)?;
                let (start, end) = crate::layout::shard(
                    layout.blocks[h.block as usize].pages(),
                    usize::from(worker),
                    usize::from(session.workers),
                );
                if h.page < start || h.page + h.mask > end {
                    return Err(protocol(CodecError::Range(
                        crate::layout::LayoutError::OutOfRange {
                            block: h.block,
                            page: h.page,
                            count: h.mask,
                            detail: format!("worker {worker}'s shard is pages [{start}, {end})"),
                        },
                    )));
                }
                let sent = &session.sent[h.block as usize];
                let mut resent = 0;
                for i in 0..h.mask {
                    if codec::page_bit(link.body(), i) {
                        sent.set(h.page + i);
                    } else if sent.clear(h.page + i) {
                        resent += 1;
                    }
                }
                session.pages_resent.fetch_add(resent, Ordering::Relaxed);
            }
            other => {
                return Err(protocol(CodecError::Unexpected {
                    got: other,
                    expected: "Have or Run (a resumed stream)",
                }))
            }
        }
    }
}

pub(super) fn serve_bulk(c: &mut Joined<'_>) -> Result<(), SourceError> {
    let (shared, session, peer, worker) = (c.shared, c.session, c.peer, c.worker);
    let link = &mut *c.link;
    // A destination connects its streams during precopy; they start at the switchover (a page
    // streamed earlier could be dirtied after it was sent and arrive stale).
    // Meanwhile the connection carries heartbeats (its destination half reads it from `Go`).
    let live = shared.config.liveness();
    while !session.life.wait_switchover(live.heartbeat / 4) {
        if session.life.is_finished() {
            return Ok(());
        }
        if link.peer_hung_up() {
            return Err(SourceError::Incomplete {
                session: session.id,
                reason: format!("worker {worker}'s bulk connection closed before the switchover"),
            });
        }
        link.heartbeat_if_due(&live)
            .map_err(write_err("send a heartbeat", peer))?;
    }
    let recording = matches!(
        session.working_set(shared.working_set.as_ref()),
        WsMode::Record
    );
    if recording && !hold_while_recording(session, link, &live, (peer, worker))? {
        return Ok(());
    }
    let gen = &session.bulk_gen[usize::from(worker)];
    let max_page = shared.image.layout().max_page_size() as usize;
    let mut stream = Stream {
        shared,
        session,
        link,
        peer,
        my_gen: gen.fetch_add(1, Ordering::AcqRel) + 1,
        worker,
        scratch: vec![0u8; max_page],
        out: Vec::with_capacity(FLUSH_BYTES + 64 * 4096 + 4096),
        streamed: 0,
        credit: c.credit.then(CreditGate::default),
        live,
    };
    // The working-set push is what the restore waits for: at the default priority. The rest
    // of the stream yields the CPU to urgent replies (best effort).
    if !stream.push_working_set()? {
        return Ok(());
    }
    let _ = crate::sys::set_thread_nice(19);
    for b in 0..shared.image.layout().blocks.len() {
        if !stream.block(b)? {
            return Ok(());
        }
    }
    Header::control(Kind::End, stream.streamed).encode_into(&mut stream.out);
    session.flush(stream.link, &mut stream.out, "stream pages", peer)?;
    // Hold the connection until the destination closes it (it may still be placing pages),
    // at most the link timeout (the read timeout).
    let mut sink = [0u8; 64];
    let _ = stream.link.socket().read(&mut sink);
    Ok(())
}

/// Bytes queued before a write.
const FLUSH_BYTES: usize = 1 << 20;

/// A recording session's stream starts once no request came for this long.
const RECORD_QUIET: Duration = Duration::from_millis(200);

/// A session recording the image's working set: the stream holds back while the destination's
/// faults come, so that every page the restore touches is asked for (and learned) rather than
/// streamed unseen; it starts once no request came for [`RECORD_QUIET`] (the restore's burst
/// is over). `false`: the session finished meanwhile.
fn hold_while_recording(
    session: &Session,
    link: &mut FramedStream,
    live: &crate::link::Liveness,
    (peer, worker): (SocketAddr, u16),
) -> Result<bool, SourceError> {
    let held = session.started.elapsed();
    loop {
        if session.life.is_finished() {
            return Ok(false);
        }
        let last = Duration::from_nanos(session.last_request_ns.load(Ordering::Relaxed));
        let quiet = session.started.elapsed().saturating_sub(last.max(held));
        if quiet >= RECORD_QUIET {
            return Ok(true);
        }
        if link.peer_hung_up() {
            return Err(SourceError::Incomplete {
                session: session.id,
                reason: format!("worker {worker}'s bulk connection closed while recording"),
            });
        }
        link.heartbeat_if_due(live)
            .map_err(write_err("send a heartbeat", peer))?;
        // A deadline, not a poll: the stream may start no earlier than this.
        std::thread::sleep(RECORD_QUIET - quiet);
    }
}

/// One bulk connection's stream of its worker's shard.
struct Stream<'a> {
    shared: &'a Shared,
    session: &'a Session,
    link: &'a mut FramedStream,
    peer: SocketAddr,
    /// This stream's generation: a resumed stream of the worker supersedes it.
    my_gen: u64,
    worker: u16,
    scratch: Vec<u8>,
    out: Vec<u8>,
    streamed: u64,
    /// A receiver-driven stream's gate (`None`: the stream pushes as fast as the link takes).
    credit: Option<CreditGate>,
    live: crate::link::Liveness,
}

impl Stream<'_> {
    /// Streams the unsent pages of the worker's shard of block `b`, in page order; `false`
    /// when the stream must stop (the session finished, or a resumed stream took over).
    fn block(&mut self, b: usize) -> Result<bool, SourceError> {
        let block = &self.shared.image.layout().blocks[b];
        let workers = usize::from(self.session.workers);
        let (start, end) = crate::layout::shard(block.pages(), usize::from(self.worker), workers);
        let sent = &self.session.sent[b];
        let max = u64::from(max_batch_pages(block.page_size));
        let mut p = start;
        while p < end {
            if !self.keep_going() {
                return Ok(false);
            }
            let Some(first) = sent.next_clear(p, end) else {
                break;
            };
            // Claim a run of unsent pages, one bit at a time (a request may claim some first).
            let mut n = 0;
            while first + n < end && n < max && sent.set(first + n) {
                n += 1;
            }
            p = first + n.max(1);
            if n > 0 && !self.send(b as u32, first, n, block.page_size)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Pushes the image's working set ahead of the rest, in the order it was learned, this
    /// worker's share of it, between `Run(1)` and `Run(0)` (the destination counts those pages
    /// as the push). Pages already sent are skipped; when replies to faults ran ahead in the
    /// order (`ws_front`), the push jumps there, and a second pass sends what it jumped over.
    /// `false` when the stream must stop.
    fn push_working_set(&mut self) -> Result<bool, SourceError> {
        let snap = match self.session.working_set(self.shared.working_set.as_ref()) {
            WsMode::Replay(snap) => snap.clone(),
            WsMode::Off | WsMode::Record => return Ok(true),
        };

        let layout = self.shared.image.layout();
        let workers = usize::from(self.session.workers);
        let shards: Vec<(u64, u64)> = layout
            .blocks
            .iter()
            .map(|b| crate::layout::shard(b.pages(), usize::from(self.worker), workers))
            .collect();
        let mine = |b: u32, p: u64| (shards[b as usize].0..shards[b as usize].1).contains(&p);
        let order = snap.order();
        Header::control(Kind::Run, 1).encode_into(&mut self.out);
        let mut pushed = 0;
        for pass in 0..2 {
            let mut i = 0;
            while i < order.len() {
                if !self.keep_going() {
                    return Ok(false);
                }
                if pass == 0 {
                    i = i.max(self.session.ws_front.load(Ordering::Relaxed) as usize);
                }
                let Some(&(b, first)) = order.get(i) else {
                    break;
                };
                let block = &layout.blocks[b as usize];
                let (sent, max) = (
                    &self.session.sent[b as usize],
                    max_batch_pages(block.page_size),
                );
                let mut n = 0u64;
                while n < u64::from(max)
                    && order.get(i + n as usize) == Some(&(b, first + n))
                    && mine(b, first + n)
                    && sent.set(first + n)
                {
                    n += 1;
                }
                i += (n as usize).max(1);
                if n > 0 {
                    if !self.send(b, first, n, block.page_size)? {
                        return Ok(false);
                    }
                    pushed += n;
                }
            }
        }
        Header::control(Kind::Run, 0).encode_into(&mut self.out);
        self.session
            .pages_working_set
            .fetch_add(pushed, Ordering::Relaxed);
        Ok(true)
    }

    /// Encodes one batch (at most a frame's pages) and writes out what is queued once it is
    /// large; `false` when the stream must stop while it waited for credit.
    fn send(
        &mut self,
        block: u32,
        first: u64,
        n: u64,
        page_size: u64,
    ) -> Result<bool, SourceError> {
        debug_assert!(
            n <= u64::from(max_batch_pages(page_size)),
            "one frame per batch"
        );
        if !self.await_credit()? {
            return Ok(false);
        }
        let image = self.shared.image.as_ref();
        let (pages, zeros) = encode_run(
            image,
            block,
            first,
            n,
            page_size,
            &mut self.scratch,
            &mut self.out,
        );
        self.streamed += pages;
        self.session
            .pages_stream
            .fetch_add(pages, Ordering::Relaxed);
        self.session.pages_zero.fetch_add(zeros, Ordering::Relaxed);
        if self.out.len() >= FLUSH_BYTES {
            self.session
                .flush(self.link, &mut self.out, "stream pages", self.peer)?;
        }
        Ok(true)
    }

    /// On a credit-driven stream, waits for the destination's credit for one more `Pages`
    /// frame, having written out what is queued (the destination grants on what it received);
    /// `false` when the stream must stop meanwhile.
    fn await_credit(&mut self) -> Result<bool, SourceError> {
        let Some(mut gate) = self.credit.take() else {
            return Ok(true);
        };
        let ready = self.wait_for(&mut gate);
        self.credit = Some(gate);
        ready
    }

    fn wait_for(&mut self, gate: &mut CreditGate) -> Result<bool, SourceError> {
        gate.take_arrived(self.link, self.peer)?;
        while !gate.has_credit() {
            self.session
                .flush(self.link, &mut self.out, "stream pages", self.peer)?;
            if !self.keep_going() {
                return Ok(false);
            }
            gate.wait(self.link, &self.live, self.peer)?;
        }
        gate.spend();
        Ok(true)
    }

    /// Whether to go on. A finished session's stream ends: cleanly with `End` when every
    /// worker confirmed all its pages (the destination may already have closed), just closed
    /// when the session failed (its error went on another link). A superseded stream stops at
    /// once: what it claimed and did not deliver, the destination asks for.
    fn keep_going(&mut self) -> bool {
        if self.session.life.is_finished() {
            if self.session.life.failure().is_none() {
                Header::control(Kind::End, self.streamed).encode_into(&mut self.out);
                let _ = self
                    .session
                    .flush(self.link, &mut self.out, "stream pages", self.peer);
            }
            return false;
        }
        self.session.bulk_gen[usize::from(self.worker)].load(Ordering::Acquire) == self.my_gen
    }
}
