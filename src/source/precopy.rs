//! Precopy on worker 0's urgent connection: rounds of pages while the workload runs, then the
//! switchover (stop the workload, discard what it dirtied, `Run`).
//!
//! Precopy survives a break of its connection: the progress ([`PrecopyProgress`]) is held by
//! the session, the workload keeps running and its tracker keeps tracking, and the connection
//! that rejoins ([`resume_precopy`]) says which pages the destination holds (`Have` frames)
//! and the last round it took in (`Run`). The source then sends one round of everything the
//! destination lacks plus every round it did not confirm, and goes on with the dirty rounds.
//! After the switchover a rejoining connection gets the discards and `Run` again.

use super::config::LiveParts;
use super::conn::{next_frame, read_frame};
use super::error::{io_err, SourceError};
use super::pages::encode_run;
use super::progress::{abandon, PrecopyProgress, Switched};
use super::registry::Shared;
use super::session::Session;
use crate::codec::{self, CodecError, DiscardSender, Header, Kind};
use crate::layout::PageBitmap;
use crate::link::FramedStream;
use crate::stats::unix_us;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Sorts ranges and merges overlapping or adjacent ones.
pub(super) fn merge_ranges(ranges: &mut Vec<(u64, u64)>) {
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for &(first, n) in ranges.iter() {
        match merged.last_mut() {
            Some(last) if first <= last.0 + last.1 => {
                last.1 = last.1.max(first + n - last.0);
            }
            _ => merged.push((first, n)),
        }
    }
    *ranges = merged;
}

/// The progress, lent to this connection: given back to the session when the connection is
/// done with it, however it ends (a session that ended meanwhile disposes of it).
struct Lease<'a> {
    shared: &'a Shared,
    session: &'a Session,
    p: Option<PrecopyProgress>,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let Some(p) = self.p.take() else { return };
        if let Some(p) = self.session.precopy_slot.give_back(p) {
            abandon(p, &self.shared.live);
        }
    }
}

/// One connection's precopy: the link, the buffers, the progress.
struct Rounds<'a> {
    shared: &'a Shared,
    session: &'a Session,
    link: &'a mut FramedStream,
    peer: SocketAddr,
    scratch: Vec<u8>,
    out: Vec<u8>,
    p: &'a mut PrecopyProgress,
}

/// The precopy phase of a new session on worker 0's urgent connection, right after `Welcome`:
/// rounds, then the switchover (stop the workload, discards, `Run`). A static image has no
/// tracker: one full round, then `Run`.
pub(super) fn run_precopy(
    shared: &Shared,
    session: &Session,
    link: &mut FramedStream,
    peer: SocketAddr,
    live: Option<LiveParts>,
) -> Result<(), SourceError> {
    session.precopy_slot.begin();
    let mut lease = Lease {
        shared,
        session,
        p: Some(PrecopyProgress::new(
            live,
            shared.image.layout().blocks.len(),
        )),
    };
    let p = lease.p.as_mut().expect("just lent");
    // Tracking starts before the full pass reads anything: a write during the pass is caught.
    if let Some(l) = p.live.as_mut() {
        for t in l.trackers.iter_mut() {
            t.start()?;
        }
    }
    let mut rounds = Rounds::new(shared, session, link, peer, p);
    rounds.full_pass()?;
    rounds.rounds_then_switchover()
}

/// Precopy on a connection that rejoins the session after a break (`Hello` with resume and
/// precopy): the destination's `Have` frames and `Run`, then the rest of precopy, or, when the
/// switchover was already made, its discards and `Run` again.
pub(super) fn resume_precopy(
    shared: &Shared,
    session: &Session,
    link: &mut FramedStream,
    peer: SocketAddr,
) -> Result<(), SourceError> {
    // The broken connection's thread gives the progress back once its socket fails (a
    // rejoining connection shuts the old one down).
    let Some(p) = session.precopy_slot.take(shared.config.link_timeout) else {
        return Err(SourceError::Protocol {
            peer,
            source: CodecError::BadBody {
                kind: Kind::Hello,
                detail: "no precopy of this session to resume".into(),
            },
        });
    };
    let mut lease = Lease {
        shared,
        session,
        p: Some(p),
    };
    let (have, confirmed) = read_have(shared, session, link, peer)?;
    let p = lease.p.as_mut().expect("just lent");
    let mut rounds = Rounds::new(shared, session, link, peer, p);
    if rounds.p.switched.is_some() {
        // Pages the destination lacks (in flight, or discarded already) are fetched in
        // postcopy; the discards are idempotent.
        for (b, sent) in session.sent.iter().enumerate() {
            let pages = shared.image.layout().blocks[b].pages();
            let mut at = 0;
            while let Some(first) = have[b].next_clear(at, pages) {
                sent.clear(first);
                at = first + 1;
            }
        }
        return rounds.send_switchover();
    }
    rounds.resend(&have, confirmed)?;
    rounds.rounds_then_switchover()
}

/// The destination's `Have` frames (which pages it holds, per block) and the `Run` that ends
/// them (the last precopy round it took in, in `page`).
fn read_have(
    shared: &Shared,
    session: &Session,
    link: &mut FramedStream,
    peer: SocketAddr,
) -> Result<(Vec<PageBitmap>, u64), SourceError> {
    let layout = shared.image.layout();
    let have: Vec<PageBitmap> = layout
        .blocks
        .iter()
        .map(|b| PageBitmap::new(b.pages()))
        .collect();
    let protocol = |source| SourceError::Protocol { peer, source };
    loop {
        let h = next_frame(link, peer, session.id, || {
            "the rejoining precopy connection closed".into()
        })?;
        match h.kind {
            Kind::Run => return Ok((have, h.page)),
            Kind::Have => {
                h.check_zero_map(layout).map_err(protocol)?;
                for i in 0..h.mask {
                    if codec::page_bit(link.body(), i) {
                        have[h.block as usize].set(h.page + i);
                    }
                }
            }
            other => {
                return Err(protocol(CodecError::Unexpected {
                    got: other,
                    expected: "Have or Run (a resumed precopy)",
                }))
            }
        }
    }
}

impl<'a> Rounds<'a> {
    fn new(
        shared: &'a Shared,
        session: &'a Session,
        link: &'a mut FramedStream,
        peer: SocketAddr,
        p: &'a mut PrecopyProgress,
    ) -> Rounds<'a> {
        let layout = shared.image.layout();
        Rounds {
            shared,
            session,
            link,
            peer,
            scratch: vec![0u8; layout.max_page_size() as usize],
            out: Vec::with_capacity((1 << 20) + (256 << 12) + 4096),
            p,
        }
    }

    /// Round 1: every page of every block.
    fn full_pass(&mut self) -> Result<(), SourceError> {
        let layout = self.shared.image.layout();
        let all: Vec<Vec<(u64, u64)>> =
            layout.blocks.iter().map(|b| vec![(0, b.pages())]).collect();
        // What the destination lacks of it, it reports on a rejoin: no ranges to remember.
        self.p.rounds.push(Vec::new());
        self.send_round(&all)
    }

    /// Sends a round (its ranges already recorded) and ends it.
    fn send_round(&mut self, ranges: &[Vec<(u64, u64)>]) -> Result<(), SourceError> {
        debug_assert_eq!(self.p.rounds.len(), self.p.round_pages.len() + 1);
        let mut total = 0;
        for (b, r) in ranges.iter().enumerate() {
            total += self.send(b, r)?;
        }
        self.p.round_pages.push(total);
        Header::round(self.p.round_pages.len() as u64, total).encode_into(&mut self.out);
        self.flush("send precopy round")
    }

    /// One round after a rejoin: every page the destination lacks, and every page of the
    /// rounds after `confirmed` (the destination may hold an older copy of those).
    fn resend(&mut self, have: &[PageBitmap], confirmed: u64) -> Result<(), SourceError> {
        let layout = self.shared.image.layout();
        let mut ranges: Vec<Vec<(u64, u64)>> = layout
            .blocks
            .iter()
            .enumerate()
            .map(|(b, block)| have[b].clear_runs(block.pages()))
            .collect();
        // Rounds after the last one confirmed, the one cut short included.
        let unconfirmed = usize::try_from(confirmed).unwrap_or(usize::MAX);
        for round in self.p.rounds.iter().skip(unconfirmed) {
            for (b, r) in round.iter().enumerate() {
                ranges[b].extend_from_slice(r);
            }
        }
        ranges.iter_mut().for_each(merge_ranges);
        self.p.rounds.truncate(self.p.round_pages.len());
        self.p.rounds.push(ranges.clone());
        self.send_round(&ranges)
    }

    /// The dirty rounds, the wait for the last round's `Ack`, the switchover, and the
    /// tracker's stop.
    fn rounds_then_switchover(&mut self) -> Result<(), SourceError> {
        if self.p.live.is_some() {
            self.dirty_rounds()?;
        }
        // Before stopping the workload, wait until the destination has taken in everything
        // sent (it acknowledges each round): bytes still in socket buffers (tens of MiB on
        // loopback) would otherwise be drained during the downtime. Writes meanwhile land in
        // the final set.
        let last_round = self.p.round_pages.len() as u64;
        wait_round_ack(
            self.link,
            self.peer,
            last_round,
            self.shared.config.link_timeout,
        )?;
        self.switch_over()?;
        if let Some(l) = self.p.live.as_mut() {
            stop_tracking_in_background(self.shared, self.session, l)?;
        }
        Ok(())
    }

    /// Rounds of the pages dirtied meanwhile, until few are dirty or a limit holds (what is
    /// dirty then is discarded at the switchover and fetched in postcopy).
    fn dirty_rounds(&mut self) -> Result<(), SourceError> {
        let limits = &self.shared.config.precopy;
        loop {
            let pages = self.collect()?;
            if pages <= limits.max_dirty_pages
                || self.p.round_pages.len() >= limits.max_rounds as usize
                || self.p.started.elapsed() >= limits.max_duration
            {
                return Ok(());
            }
            let blocks = self.p.dirty.len();
            let ranges = std::mem::replace(&mut self.p.dirty, vec![Vec::new(); blocks]);
            debug_assert_eq!(ranges.iter().flatten().map(|r| r.1).sum::<u64>(), pages);
            self.p.rounds.push(ranges.clone());
            self.send_round(&ranges)?;
        }
    }

    /// Reads every tracker's dirty set into the progress's (merged ranges: it survives a
    /// break); returns its pages.
    fn collect(&mut self) -> Result<u64, SourceError> {
        let p = &mut *self.p;
        if let Some(live) = p.live.as_mut() {
            let layout = self.shared.image.layout();
            for (b, t) in live.trackers.iter_mut().enumerate() {
                let (tracked, page) = (t.page_bytes(), layout.blocks[b].page_size);
                if tracked == page {
                    t.collect(&mut p.dirty[b])?;
                } else {
                    // A written base page dirties the block's (huge) page holding it.
                    let mut runs = Vec::new();
                    t.collect(&mut runs)?;
                    crate::dirty::coarsen_runs(&runs, tracked, page, &mut p.dirty[b]);
                }
                merge_ranges(&mut p.dirty[b]);
            }
        }
        Ok(p.dirty.iter().flatten().map(|r| r.1).sum())
    }

    /// Appends `Pages` frames for the ranges of `block`, writing whenever 1 MiB is queued.
    /// Returns the pages sent.
    fn send(&mut self, block: usize, ranges: &[(u64, u64)]) -> Result<u64, SourceError> {
        const CHUNK_PAGES: u64 = 256;
        let page_size = self.shared.image.layout().blocks[block].page_size;
        let image = self.shared.image.as_ref();
        let mut sent = 0;
        for &(first, n) in ranges {
            let mut p = first;
            while p < first + n {
                let k = (first + n - p).min(CHUNK_PAGES);
                let (pages, zeros) = encode_run(
                    image,
                    block as u32,
                    p,
                    k,
                    page_size,
                    &mut self.scratch,
                    &mut self.out,
                );
                self.session.pages_zero.fetch_add(zeros, Ordering::Relaxed);
                sent += pages;
                p += k;
                if self.out.len() >= 1 << 20 {
                    self.flush("send precopy pages")?;
                }
            }
        }
        Ok(sent)
    }

    fn flush(&mut self, what: &str) -> Result<(), SourceError> {
        self.session
            .flush(self.link, &mut self.out, what, self.peer)
    }

    /// The switchover: the workload stops, so the memory no longer changes; what it dirtied
    /// since it was sent goes out as `Discard` ranges (those pages become unsent: requests and
    /// the stream carry their final content), then `Run`.
    fn switch_over(&mut self) -> Result<(), SourceError> {
        let mut stopped_unix_us = unix_us();
        if let Some(l) = self.p.live.as_mut() {
            l.workload.stop();
            stopped_unix_us = unix_us();
        }
        self.collect()?;
        self.session.life.switch_over();
        let dirty = std::mem::take(&mut self.p.dirty);
        let mut dirty_pages = 0;
        for (b, ranges) in dirty.iter().enumerate() {
            let sent = &self.session.sent[b];
            // Every page was sent at least once; the dirty ones are stale on the destination.
            sent.set_range(0, self.shared.image.layout().blocks[b].pages());
            for &(first, n) in ranges {
                sent.clear_range(first, n);
                dirty_pages += n;
            }
        }
        self.p.switched = Some(Switched {
            dirty,
            dirty_pages,
            stopped_unix_us,
        });
        self.send_switchover()
    }

    /// The discards and `Run` of the switchover made (again, for a rejoining connection).
    fn send_switchover(&mut self) -> Result<(), SourceError> {
        let sw = self.p.switched.as_ref().expect("the switchover was made");
        let mut discarded = 0;
        for (b, ranges) in sw.dirty.iter().enumerate() {
            let mut tx = DiscardSender::init(b as u32);
            for &(first, n) in ranges {
                tx.range(first, n, &mut self.out);
            }
            discarded += tx.finish(&mut self.out).1;
        }
        {
            let mut stats = self.session.precopy.lock().expect("poisoned");
            stats.round_pages = self.p.round_pages.clone();
            stats.dirty_at_switchover = sw.dirty_pages;
            stats.discarded = discarded;
        }
        Header::run(sw.dirty_pages, sw.stopped_unix_us).encode_into(&mut self.out);
        self.flush("send discards and Run")
    }
}

/// Unregistering write-protection walks the whole range (~25 ms per GiB here): after Run, on a
/// thread of its own at the lowest priority, so neither this connection's first requests
/// (served right after we return) nor, on a shared host, the destination's switchover wait for
/// it. The workload is stopped: nothing writes the memory any more.
fn stop_tracking_in_background(
    shared: &Shared,
    session: &Session,
    live: &mut LiveParts,
) -> Result<(), SourceError> {
    let mut trackers = std::mem::take(&mut live.trackers);
    if trackers.is_empty() {
        return Ok(());
    }
    let id = session.id;
    let verbose = shared.config.verbose;
    // The memory stays mapped until its registration is gone.
    let memory = shared.image.clone();
    std::thread::Builder::new()
        .name("src-wp-stop".into())
        .spawn(move || {
            let _memory = memory;
            let _ = crate::sys::set_thread_nice(19);
            for t in trackers.iter_mut() {
                if let Err(e) = t.stop() {
                    if verbose {
                        crate::warn!("serve", "session {id:#x}: stop dirty tracking: {e}");
                    }
                }
            }
        })
        .map(|_| ())
        .map_err(io_err("spawn the dirty-tracking stop thread"))
}

/// Reads the destination's `Ack`s of precopy rounds until the one for `round`; a destination
/// silent for `timeout` (it sends heartbeats while it drains) is gone.
fn wait_round_ack(
    link: &mut FramedStream,
    peer: SocketAddr,
    round: u64,
    timeout: Duration,
) -> Result<(), SourceError> {
    let _ = link.socket().set_read_timeout(Some(timeout));
    loop {
        match read_frame(link, peer)? {
            Some(h) if h.kind == Kind::Ack && h.page == round => return Ok(()),
            Some(h) if h.kind == Kind::Ack && h.page < round => {}
            Some(h) => {
                return Err(SourceError::Protocol {
                    peer,
                    source: CodecError::Unexpected {
                        got: h.kind,
                        expected: "Ack of a precopy round",
                    },
                })
            }
            None => {
                return Err(SourceError::Io {
                    context: format!("wait for the precopy Ack from {peer}"),
                    source: std::io::ErrorKind::UnexpectedEof.into(),
                })
            }
        }
    }
}
