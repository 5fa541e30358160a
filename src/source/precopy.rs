//! Precopy on worker 0's urgent connection: rounds of pages while the workload runs, then the
//! switchover (stop the workload, discard what it dirtied, `Run`).

use super::config::LiveParts;
use super::conn::read_frame;
use super::error::{io_err, SourceError};
use super::pages::encode_run;
use super::registry::Shared;
use super::session::Session;
use super::unix_us;
use crate::codec::{CodecError, DiscardSender, Header, Kind};
use crate::link::FramedStream;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

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
    let limits = &shared.config.precopy;
    let started = Instant::now();
    let mut scratch = vec![0u8; layout.max_page_size() as usize];
    let mut out: Vec<u8> = Vec::with_capacity((1 << 20) + (256 << 12) + 4096);
    // Tracking starts before the full pass reads anything: a write during the pass is caught.
    if let Some(l) = live.as_mut() {
        for t in l.trackers.iter_mut() {
            t.start()?;
        }
    }
    let mut round_pages = Vec::new();
    let mut total = 0;
    for (b, block) in layout.blocks.iter().enumerate() {
        total += send_ranges(
            shared,
            session,
            link,
            peer,
            b as u32,
            &[(0, block.pages())],
            &mut scratch,
            &mut out,
        )?;
        session.sent[b].set_range(0, block.pages());
    }
    Header::round(1, total).encode_into(&mut out);
    session.flush(link, &mut out, "send precopy round", peer)?;
    round_pages.push(total);
    let mut dirty: Vec<Vec<(u64, u64)>> = vec![Vec::new(); layout.blocks.len()];
    if let Some(l) = live.as_mut() {
        loop {
            for (b, t) in l.trackers.iter_mut().enumerate() {
                t.collect(&mut dirty[b])?;
                merge_ranges(&mut dirty[b]);
            }
            let pages: u64 = dirty.iter().flatten().map(|r| r.1).sum();
            if pages <= limits.max_dirty_pages
                || round_pages.len() >= limits.max_rounds as usize
                || started.elapsed() >= limits.max_duration
            {
                break; // these pages are discarded and fetched in postcopy
            }
            for (b, ranges) in dirty.iter_mut().enumerate() {
                send_ranges(
                    shared,
                    session,
                    link,
                    peer,
                    b as u32,
                    ranges,
                    &mut scratch,
                    &mut out,
                )?;
                ranges.clear();
            }
            round_pages.push(pages);
            Header::round(round_pages.len() as u64, pages).encode_into(&mut out);
            session.flush(link, &mut out, "send precopy round", peer)?;
        }
    }
    // Before stopping the workload, wait until the destination has taken in everything sent
    // (it acknowledges each round): bytes still in socket buffers (tens of MiB on loopback)
    // would otherwise be drained during the downtime. Writes meanwhile land in the final set.
    wait_round_ack(
        link,
        peer,
        round_pages.len() as u64,
        shared.config.write_timeout,
    )?;
    // Switchover: from here the memory no longer changes.
    let mut stopped_unix_us = unix_us();
    if let Some(l) = live.as_mut() {
        l.workload.stop();
        stopped_unix_us = unix_us();
        for (b, t) in l.trackers.iter_mut().enumerate() {
            t.collect(&mut dirty[b])?;
            merge_ranges(&mut dirty[b]);
        }
    }
    session.life.switch_over();
    let mut dirty_pages = 0;
    let mut discarded = 0;
    for (b, ranges) in dirty.iter().enumerate() {
        let mut tx = DiscardSender::init(b as u32);
        for &(first, n) in ranges {
            // Every page was sent by the full pass: all of these are stale on the destination.
            session.sent[b].clear_range(first, n);
            tx.range(first, n, &mut out);
            dirty_pages += n;
        }
        discarded += tx.finish(&mut out).1;
    }
    {
        let mut stats = session.precopy.lock().expect("poisoned");
        stats.round_pages = round_pages;
        stats.dirty_at_switchover = dirty_pages;
        stats.discarded = discarded;
    }
    Header::run(dirty_pages, stopped_unix_us).encode_into(&mut out);
    session.flush(link, &mut out, "send discards and Run", peer)?;
    // Unregistering write-protection walks the whole range (~25 ms per GiB here): after Run,
    // on a thread of its own at the lowest priority, so neither this connection's first
    // requests (served right after we return) nor, on a shared host, the destination's
    // switchover wait for it. The workload is stopped: nothing writes the memory any more.
    if let Some(l) = live.as_mut() {
        let mut trackers = std::mem::take(&mut l.trackers);
        let id = session.id;
        let verbose = shared.config.verbose;
        // The memory stays mapped until its registration is gone.
        let memory = shared.image.clone();
        let spawned = std::thread::Builder::new()
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
            });
        if let Err(e) = spawned {
            return Err(io_err("spawn the dirty-tracking stop thread")(e));
        }
    }
    Ok(())
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
