//! An urgent connection: requests for faulted pages, answered at once (with a prefetch for a
//! sequential reader), then `End`/`Ack`.

use super::conn::read_frame;
use super::error::SourceError;
use super::pages::encode_run;
use super::prefetch::Prefetch;
use super::registry::Shared;
use super::session::Session;
use crate::codec::{CodecError, Header, Kind};
use crate::link::FramedStream;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;

pub(super) fn serve_urgent(
    shared: &Shared,
    session: &Session,
    link: &mut FramedStream,
    peer: SocketAddr,
    worker: u16,
) -> Result<(), SourceError> {
    // Replies to faults run ahead of the stream: raise this thread's priority where permitted
    // (root or CAP_SYS_NICE); best effort otherwise.
    let _ = crate::sys::set_thread_nice(-10);
    let layout = shared.image.layout();
    let max_page = layout.max_page_size() as usize;
    let mut scratch = vec![0u8; max_page];
    let mut out: Vec<u8> = Vec::with_capacity(1 << 20);
    // Requests are small frames, often several per fault: read ahead of them.
    link.buffer_reads(64 * 1024);
    let mut prefetch = Prefetch::new(shared.config.prefetch_max);
    loop {
        let Some(h) = read_frame(link, peer)? else {
            return Err(SourceError::Incomplete {
                session: session.id,
                reason: format!("worker {worker}'s urgent connection closed without End"),
            });
        };
        match h.kind {
            Kind::Request => {
                let block = h
                    .check(layout)
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
                session.requests.fetch_add(1, Ordering::Relaxed);
                if !shared.config.urgent_delay.is_zero() {
                    std::thread::sleep(shared.config.urgent_delay);
                }
                let count = u64::from(h.count);
                let sent = &session.sent[h.block as usize];
                sent.set_range(h.page, count);
                // Prefetch: a fault right where the last reply ended means a sequential
                // reader; send the next unsent pages of its shard with the reply, doubling
                // the window while the pattern holds and dropping it when it breaks.
                let (_, shard_end) = crate::dest::shard(
                    block.pages(),
                    usize::from(worker),
                    usize::from(session.workers),
                );
                let window = prefetch.window(h.block, h.page);
                let end = (h.page + count).min(shard_end);
                let mut extra = 0;
                while extra < window && end + extra < shard_end && sent.set(end + extra) {
                    extra += 1;
                }
                prefetch.replied_up_to(h.block, end + extra);
                // The requested pages go first, in frames of their own, so the faulting
                // thread is woken before the prefetched pages are placed.
                let (mut pages, mut zeros) = encode_run(
                    shared.image.as_ref(),
                    h.block,
                    h.page,
                    count,
                    block.page_size,
                    &mut scratch,
                    &mut out,
                );
                if extra > 0 {
                    let (p, z) = encode_run(
                        shared.image.as_ref(),
                        h.block,
                        (h.page + count).min(shard_end),
                        extra,
                        block.page_size,
                        &mut scratch,
                        &mut out,
                    );
                    pages += p;
                    zeros += z;
                }
                session.pages_urgent.fetch_add(pages, Ordering::Relaxed);
                session.pages_prefetched.fetch_add(extra, Ordering::Relaxed);
                session.pages_zero.fetch_add(zeros, Ordering::Relaxed);
            }
            Kind::End => {
                session
                    .life
                    .worker_ended(worker)
                    .map_err(|detail| SourceError::Protocol {
                        peer,
                        source: CodecError::BadBody {
                            kind: Kind::End,
                            detail: detail.into(),
                        },
                    })?;
                Header::control(Kind::Ack, h.page).encode_into(&mut out);
                session.flush(link, &mut out, "send Ack", peer)?;
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
        if link.buffered_bytes() == 0 || out.len() >= (1 << 20) {
            session.flush(link, &mut out, "send pages", peer)?;
        }
    }
}
