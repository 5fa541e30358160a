//! Precopy on worker 0's urgent connection: rounds of pages while the workload runs, then the
//! switchover (stop the workload, discard what it dirtied, `Run`).

use super::config::LiveParts;
use super::conn::read_frame;
use super::error::{io_err, SourceError};
use super::pages::encode_run;
use super::registry::Shared;
use super::session::Session;
use crate::codec::{CodecError, DiscardSender, Header, Kind};
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

/// Appends `Pages` frames for the ranges of `block` to `out`, writing whenever 1 MiB is queued.
/// Returns the pages sent.
#[allow(clippy::too_many_arguments)]
pub(super) fn send_ranges(
    shared: &Shared,
    session: &Session,
    link: &mut FramedStream,
    peer: SocketAddr,
    block: u32,
    ranges: &[(u64, u64)],
    scratch: &mut [u8],
    out: &mut Vec<u8>,
) -> Result<u64, SourceError> {
    const CHUNK_PAGES: u64 = 256;
    let page_size = shared.image.layout().blocks[block as usize].page_size;
    let mut sent = 0;
    for &(first, n) in ranges {
        let mut p = first;
        while p < first + n {
            let k = (first + n - p).min(CHUNK_PAGES);
            let (pages, zeros) =
                encode_run(shared.image.as_ref(), block, p, k, page_size, scratch, out);
            session.pages_zero.fetch_add(zeros, Ordering::Relaxed);
            sent += pages;
            p += k;
            if out.len() >= 1 << 20 {
                session.flush(link, out, "send precopy pages", peer)?;
            }
        }
    }
    Ok(sent)
}

/// One session's precopy: the connection, the buffers, and the rounds sent so far.
struct Rounds<'a> {
    shared: &'a Shared,
    session: &'a Session,
    link: &'a mut FramedStream,
    peer: SocketAddr,
    scratch: Vec<u8>,
    out: Vec<u8>,
    /// Pages sent per round (round 1: every page).
    round_pages: Vec<u64>,
    /// Per block, the ranges dirtied since they were last sent.
    dirty: Vec<Vec<(u64, u64)>>,
}

/// The precopy phase on worker 0's urgent connection, right after `Welcome`: rounds, then the
/// switchover (stop the workload, discards, `Run`). A static image has no tracker: one full
/// round, then `Run`.
pub(super) fn run_precopy(
    shared: &Shared,
    session: &Session,
    link: &mut FramedStream,
    peer: SocketAddr,
    mut live: Option<&mut LiveParts>,
) -> Result<(), SourceError> {
    let layout = shared.image.layout();
    let mut rounds = Rounds {
        shared,
        session,
        link,
        peer,
        scratch: vec![0u8; layout.max_page_size() as usize],
        out: Vec::with_capacity((1 << 20) + (256 << 12) + 4096),
        round_pages: Vec::new(),
        dirty: vec![Vec::new(); layout.blocks.len()],
    };
    // Tracking starts before the full pass reads anything: a write during the pass is caught.
    if let Some(l) = live.as_mut() {
        for t in l.trackers.iter_mut() {
            t.start()?;
        }
    }
    rounds.full_pass()?;
    if let Some(l) = live.as_mut() {
        rounds.dirty_rounds(l)?;
    }
    // Before stopping the workload, wait until the destination has taken in everything sent
    // (it acknowledges each round): bytes still in socket buffers (tens of MiB on loopback)
    // would otherwise be drained during the downtime. Writes meanwhile land in the final set.
    let last_round = rounds.round_pages.len() as u64;
    wait_round_ack(rounds.link, peer, last_round, shared.config.write_timeout)?;
    rounds.switch_over(live.as_deref_mut())?;
    if let Some(l) = live {
        stop_tracking_in_background(shared, session, l)?;
    }
    Ok(())
}

impl Rounds<'_> {
    /// Round 1: every page of every block.
    fn full_pass(&mut self) -> Result<(), SourceError> {
        let mut total = 0;
        for (b, block) in self.shared.image.layout().blocks.iter().enumerate() {
            total += self.send(b, &[(0, block.pages())])?;
            self.session.sent[b].set_range(0, block.pages());
        }
        self.end_round(total)
    }

    /// Rounds of the pages dirtied meanwhile, until few are dirty or a limit holds (what is
    /// dirty then is discarded at the switchover and fetched in postcopy).
    fn dirty_rounds(&mut self, live: &mut LiveParts) -> Result<(), SourceError> {
        let limits = &self.shared.config.precopy;
        let started = std::time::Instant::now();
        loop {
            let pages = self.collect(live)?;
            if pages <= limits.max_dirty_pages
                || self.round_pages.len() >= limits.max_rounds as usize
                || started.elapsed() >= limits.max_duration
            {
                return Ok(());
            }
            for b in 0..self.dirty.len() {
                let ranges = std::mem::take(&mut self.dirty[b]);
                self.send(b, &ranges)?;
            }
            self.end_round(pages)?;
        }
    }

    /// Reads every tracker's dirty set into `dirty` (merged ranges); returns its pages.
    fn collect(&mut self, live: &mut LiveParts) -> Result<u64, SourceError> {
        for (b, t) in live.trackers.iter_mut().enumerate() {
            t.collect(&mut self.dirty[b])?;
            merge_ranges(&mut self.dirty[b]);
        }
        Ok(self.dirty.iter().flatten().map(|r| r.1).sum())
    }

    fn send(&mut self, block: usize, ranges: &[(u64, u64)]) -> Result<u64, SourceError> {
        let Self {
            shared,
            session,
            link,
            peer,
            scratch,
            out,
            ..
        } = self;
        send_ranges(
            shared,
            session,
            link,
            *peer,
            block as u32,
            ranges,
            scratch,
            out,
        )
    }

    fn end_round(&mut self, pages: u64) -> Result<(), SourceError> {
        self.round_pages.push(pages);
        Header::round(self.round_pages.len() as u64, pages).encode_into(&mut self.out);
        self.session
            .flush(self.link, &mut self.out, "send precopy round", self.peer)
    }

    /// The switchover: the workload stops, so the memory no longer changes; what it dirtied
    /// since it was sent goes out as `Discard` ranges (those pages become unsent: requests and
    /// the stream carry their final content), then `Run`.
    fn switch_over(&mut self, live: Option<&mut LiveParts>) -> Result<(), SourceError> {
        let mut stopped_unix_us = unix_us();
        if let Some(l) = live {
            l.workload.stop();
            stopped_unix_us = unix_us();
            self.collect(l)?;
        }
        self.session.life.switch_over();
        let (mut dirty_pages, mut discarded) = (0, 0);
        for (b, ranges) in self.dirty.iter().enumerate() {
            let mut tx = DiscardSender::init(b as u32);
            for &(first, n) in ranges {
                // Every page was sent by the full pass: all of these are stale on the destination.
                self.session.sent[b].clear_range(first, n);
                tx.range(first, n, &mut self.out);
                dirty_pages += n;
            }
            discarded += tx.finish(&mut self.out).1;
        }
        {
            let mut stats = self.session.precopy.lock().expect("poisoned");
            stats.round_pages = std::mem::take(&mut self.round_pages);
            stats.dirty_at_switchover = dirty_pages;
            stats.discarded = discarded;
        }
        Header::run(dirty_pages, stopped_unix_us).encode_into(&mut self.out);
        self.session
            .flush(self.link, &mut self.out, "send discards and Run", self.peer)
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
                        eprintln!("postcopy serve: session {id:#x}: stop dirty tracking: {e}");
                    }
                }
            }
        })
        .map(|_| ())
        .map_err(io_err("spawn the dirty-tracking stop thread"))
}

/// Reads the destination's `Ack`s of precopy rounds until the one for `round`.
pub(super) fn wait_round_ack(
    link: &mut FramedStream,
    peer: SocketAddr,
    round: u64,
    timeout: Duration,
) -> Result<(), SourceError> {
    let _ = link.socket().set_read_timeout(Some(timeout));
    loop {
        match read_frame(link, peer)? {
            Some(h) if h.kind == Kind::Ack && h.page == round => break,
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
    let _ = link.socket().set_read_timeout(None);
    Ok(())
}
