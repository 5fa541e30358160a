//! An urgent connection: requests for faulted pages, answered at once (with a prefetch for a
//! sequential reader), then `End`/`Ack`.

use super::conn::poll_next;
use super::error::SourceError;
use super::joined::Joined;
use super::pages::encode_run;
use super::prefetch::Prefetch;
use super::registry::Shared;
use super::session::{Session, WsMode};
use super::working_set::Snapshot;
use crate::codec::{CodecError, Header, Kind, END_VERIFY};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;

pub(super) fn serve_urgent(c: &mut Joined<'_>) -> Result<(), SourceError> {
    let (shared, session, peer, worker) = (c.shared, c.session, c.peer, c.worker);
    let link = &mut *c.link;
    // Replies to faults run ahead of the stream: raise this thread's priority where permitted
    // (root or CAP_SYS_NICE); best effort otherwise.
    let _ = crate::sys::set_thread_nice(-10);
    let max_page = shared.image.layout().max_page_size() as usize;
    let mut replies = Replies {
        shared,
        session,
        worker,
        prefetch: Prefetch::new(shared.config.prefetch_max),
        scratch: vec![0u8; max_page],
        out: Vec::with_capacity(1 << 20),
        asked: Vec::with_capacity(if shared.working_set.is_some() {
            4096
        } else {
            0
        }),
    };
    // Requests are small frames, often several per fault: read ahead of them.
    link.buffer_reads(64 * 1024);
    let live = shared.config.liveness();
    // Before the switchover a destination has no reason to speak here (its workers wait for
    // `Go`); from then on it sends heartbeats while it has no request.
    let mut listening = false;
    loop {
        if !listening && session.life.is_switched_over() {
            link.heard_now();
            listening = true;
        }
        let silence = listening.then_some(live.timeout);
        let Some(h) = poll_next(link, peer, &live, silence, session.id, || {
            format!("worker {worker}'s urgent connection closed without End")
        })?
        else {
            continue;
        };
        match h.kind {
            Kind::Request => replies.answer(&h, peer)?,
            Kind::End => {
                session
                    .life
                    .worker_ended(worker, h.mask & END_VERIFY != 0)
                    .map_err(|detail| SourceError::Protocol {
                        peer,
                        source: CodecError::BadBody {
                            kind: Kind::End,
                            detail: detail.into(),
                        },
                    })?;
                Header::control(Kind::Ack, h.page).encode_into(&mut replies.out);
                session.flush(link, &mut replies.out, "send Ack", peer)?;
                return Ok(());
            }
            other => {
                return Err(SourceError::Protocol {
                    peer,
                    source: CodecError::Unexpected {
                        got: other,
                        expected: "Request or End",
                    },
                })
            }
        }
        // Answer everything that arrived together in one write; never sit on a reply.
        if link.buffered_bytes() == 0 || replies.out.len() >= (1 << 20) {
            session.flush(link, &mut replies.out, "send pages", peer)?;
        }
    }
}

/// What an urgent connection keeps between requests.
struct Replies<'a> {
    shared: &'a Shared,
    session: &'a Session,
    worker: u16,
    prefetch: Prefetch,
    scratch: Vec<u8>,
    out: Vec<u8>,
    /// The requests (block, first page, pages) in arrival order, for the working set.
    asked: Vec<(u32, u64, u64)>,
}

impl Drop for Replies<'_> {
    /// However the connection ended, what it was asked for extends the image's working set.
    fn drop(&mut self) {
        if let Some(ws) = &self.shared.working_set {
            if let Err(e) = ws.learn(&self.asked) {
                super::registry::log(self.shared, format_args!("{e}"));
            }
        }
    }
}

impl Replies<'_> {
    /// Queues the reply to a `Request` (checked against the layout): the pages asked for, in
    /// frames of their own so the faulting thread is woken first, then a sequential reader's
    /// prefetch.
    fn answer(&mut self, h: &Header, peer: SocketAddr) -> Result<(), SourceError> {
        let (shared, session) = (self.shared, self.session);
        let block = h
            .check(shared.image.layout())
            .map_err(|source| SourceError::Protocol { peer, source })?;
        if !session.life.is_switched_over() {
            // The memory still changes: nothing may be served outside precopy yet.
            return Err(SourceError::Protocol {
                peer,
                source: CodecError::Unexpected {
                    got: h.kind,
                    expected: "nothing before the switchover (precopy runs)",
                },
            });
        }
        let n = session.requests.fetch_add(1, Ordering::Relaxed) + 1;
        assert_ne!(
            n, shared.config.debug_panic_at_request,
            "debug_panic_at_request: request {n}"
        );
        if !shared.config.urgent_delay.is_zero() {
            std::thread::sleep(shared.config.urgent_delay);
        }
        let count = u64::from(h.count);
        let last = h.page + count - 1;
        if shared.working_set.is_some() {
            self.asked.push((h.block, h.page, count));
            let ns = session.started.elapsed().as_nanos() as u64;
            session.last_request_ns.store(ns, Ordering::Relaxed);
        }
        session.sent[h.block as usize].set_range(h.page, count);
        session.replied[h.block as usize].set_range(h.page, count);
        let (mut pages, mut zeros) = self.encode(h.block, h.page, count, block.page_size);
        let followed = match session.working_set(shared.working_set.as_ref()) {
            WsMode::Replay(snap) => snap
                .position(h.block, last)
                .map(|at| self.follow_working_set(snap, at)),
            WsMode::Off | WsMode::Record => None,
        };
        let (p, z, extra) = match followed {
            Some(f) => f,
            None => self.prefetch_sequential(h.block, (h.page, last + 1), block),
        };
        pages += p;
        zeros += z;
        session.pages_urgent.fetch_add(pages, Ordering::Relaxed);
        session.pages_prefetched.fetch_add(extra, Ordering::Relaxed);
        session.pages_zero.fetch_add(zeros, Ordering::Relaxed);
        Ok(())
    }

    /// A sequential reader's prefetch after a request of `[first, next)`: the pages from `next`
    /// (its window), those not sent yet. Returns (pages, zero pages, pages prefetched).
    fn prefetch_sequential(
        &mut self,
        b: u32,
        (first, next): (u64, u64),
        block: &crate::layout::Block,
    ) -> (u64, u64, u64) {
        let session = self.session;
        let sent = &session.sent[b as usize];
        let (_, shard_end) = crate::layout::shard(
            block.pages(),
            usize::from(self.worker),
            usize::from(session.workers),
        );
        let window = self.prefetch.window(b, first);
        let end = next.min(shard_end);
        let mut extra = 0;
        while extra < window && end + extra < shard_end && sent.set(end + extra) {
            extra += 1;
        }
        self.prefetch.replied_up_to(b, end + extra);
        if extra == 0 {
            return (0, 0, 0);
        }
        let (p, z) = self.encode(b, end, extra, block.page_size);
        (p, z, extra)
    }

    /// A reply to a fault on a page of the working set (at `at` in its order) carries the
    /// pages that follow it there, up to the prefetch window: those of this worker's shard no
    /// reply sent yet. A restore touching them in that order finds them placed. Pages the push
    /// sent are included: a fault on the set means the restore overtook the push's placement,
    /// so those are likely still in flight behind it (the later copy finds the page present).
    /// The push jumps past them (`ws_front`). Returns (pages, zero pages, pages prefetched).
    fn follow_working_set(&mut self, snap: &Snapshot, at: usize) -> (u64, u64, u64) {
        let (session, layout) = (self.session, self.shared.image.layout());
        let window = self.shared.config.prefetch_max;
        let order = snap.order();
        let limit = order.len().min(at + 1 + 4 * window as usize);
        let (mut pages, mut zeros, mut claimed) = (0, 0, 0);
        let mut run: Option<(u32, u64, u64)> = None;
        let mut j = at + 1;
        while j < limit && claimed < window {
            let (b, p) = order[j];
            j += 1;
            let block = &layout.blocks[b as usize];
            let (start, end) = crate::layout::shard(
                block.pages(),
                usize::from(self.worker),
                usize::from(session.workers),
            );
            if !(start..end).contains(&p) || !session.replied[b as usize].set(p) {
                continue;
            }
            session.sent[b as usize].set(p);
            claimed += 1;
            run = match run {
                Some((rb, first, n)) if rb == b && first + n == p => Some((rb, first, n + 1)),
                done => {
                    if let Some((rb, first, n)) = done {
                        let (x, z) =
                            self.encode(rb, first, n, layout.blocks[rb as usize].page_size);
                        (pages, zeros) = (pages + x, zeros + z);
                    }
                    Some((b, p, 1))
                }
            };
        }
        if let Some((rb, first, n)) = run {
            let (x, z) = self.encode(rb, first, n, layout.blocks[rb as usize].page_size);
            (pages, zeros) = (pages + x, zeros + z);
        }
        session.ws_front.fetch_max(j as u64, Ordering::Relaxed);
        (pages, zeros, claimed)
    }

    fn encode(&mut self, block: u32, first: u64, count: u64, page_size: u64) -> (u64, u64) {
        let image = self.shared.image.as_ref();
        encode_run(
            image,
            block,
            first,
            count,
            page_size,
            &mut self.scratch,
            &mut self.out,
        )
    }
}
