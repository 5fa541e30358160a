//! A bulk connection: the background stream of a worker's shard, and its resumption after a
//! break (`Have` frames).

use super::conn::read_frame;
use super::error::SourceError;
use super::pages::encode_run;
use super::registry::Shared;
use super::session::Session;
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
pub(super) fn resume_bulk(
    shared: &Shared,
    session: &Session,
    link: &mut FramedStream,
    peer: SocketAddr,
    worker: u16,
) -> Result<(), SourceError> {
    // The broken connection's streamer stops claiming pages now.
    session.bulk_gen[usize::from(worker)].fetch_add(1, Ordering::AcqRel);
    let layout = shared.image.layout();
    let protocol = |source| SourceError::Protocol { peer, source };
    loop {
        let Some(h) = read_frame(link, peer)? else {
            return Err(SourceError::Incomplete {
                session: session.id,
                reason: format!("worker {worker}'s resumed bulk connection closed"),
            });
        };
        match h.kind {
            Kind::Run => return Ok(()),
            Kind::Have => {
                h.check_zero_map(layout).map_err(protocol)?;
                let (start, end) = crate::dest::shard(
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

pub(super) fn serve_bulk(
    shared: &Shared,
    session: &Session,
    link: &mut FramedStream,
    peer: SocketAddr,
    worker: u16,
) -> Result<(), SourceError> {
    // The stream yields the CPU to urgent replies (best effort).
    let _ = crate::sys::set_thread_nice(19);
    // A destination connects its streams during precopy; they start at the switchover (a page
    // streamed earlier could be dirtied after it was sent and arrive stale).
    while !session.life.wait_switchover(Duration::from_secs(60)) {
        if session.life.is_finished() {
            return Ok(());
        }
    }
    let gen = &session.bulk_gen[usize::from(worker)];
    let my_gen = gen.fetch_add(1, Ordering::AcqRel) + 1;
    let layout = shared.image.layout();
    let max_page = layout.max_page_size() as usize;
    let mut scratch = vec![0u8; max_page];
    const FLUSH_BYTES: usize = 1 << 20;
    let mut out: Vec<u8> = Vec::with_capacity(FLUSH_BYTES + 64 * 4096 + 4096);
    let mut streamed = 0u64;
    for (b, block) in layout.blocks.iter().enumerate() {
        let (start, end) = crate::dest::shard(
            block.pages(),
            usize::from(worker),
            usize::from(session.workers),
        );
        let sent = &session.sent[b];
        let max = u64::from(max_batch_pages(block.page_size));
        let mut p = start;
        while p < end {
            if session.life.is_finished() {
                // Every worker confirmed all its pages (by faults and this stream): end the
                // stream cleanly rather than cut it; the destination may already have closed.
                // (A failed session's stream is just closed: its error went on another link.)
                if session.life.failure().is_none() {
                    Header::control(Kind::End, streamed).encode_into(&mut out);
                    let _ = session.flush(link, &mut out, "stream pages", peer);
                }
                return Ok(());
            }
            if gen.load(Ordering::Acquire) != my_gen {
                // Superseded by a resumed stream: what this one claimed and did not deliver is
                // what the destination will not have (and asks for).
                return Ok(());
            }
            let Some(first) = sent.next_clear(p, end) else {
                break;
            };
            // Claim a run of unsent pages, one bit at a time (a request may claim some first).
            let mut n = 0;
            while first + n < end && n < max && sent.set(first + n) {
                n += 1;
            }
            if n == 0 {
                p = first + 1;
                continue;
            }
            let (pages_done, zeros) = encode_run(
                shared.image.as_ref(),
                b as u32,
                first,
                n,
                block.page_size,
                &mut scratch,
                &mut out,
            );
            streamed += pages_done;
            session
                .pages_stream
                .fetch_add(pages_done, Ordering::Relaxed);
            session.pages_zero.fetch_add(zeros, Ordering::Relaxed);
            p = first + n;
            if out.len() >= FLUSH_BYTES {
                session.flush(link, &mut out, "stream pages", peer)?;
            }
        }
    }
    Header::control(Kind::End, streamed).encode_into(&mut out);
    session.flush(link, &mut out, "stream pages", peer)?;
    // Hold the connection until the destination closes it (it may still be placing pages).
    let mut sink = [0u8; 64];
    let _ = link.socket().read(&mut sink);
    Ok(())
}
