//! A verify connection: the checksum of every page as it was at switchover.

use super::error::SourceError;
use super::registry::Shared;
use super::session::Session;
use crate::codec;
use crate::codec::{CodecError, Header, Kind};
use crate::image::{page_checksum, PageData};
use crate::link::FramedStream;
use std::net::SocketAddr;

/// A verify connection: after `Run` from the destination (sent once its migration is done),
/// the checksum of every page as it was at switchover, then `End`.
pub(super) fn serve_verify(
    shared: &Shared,
    session: &Session,
    link: &mut FramedStream,
    peer: SocketAddr,
) -> Result<(), SourceError> {
    // Opened once the destination's workers ended: its `Run` comes at once.
    let live = shared.config.liveness();
    let run = link
        .next_frame_live(&live, Some(live.timeout), |_| Ok(()))
        .map_err(super::conn::link_err(peer))?;
    match run {
        Some(h) if h.kind == Kind::Run => {}
        None => return Ok(()),
        Some(h) => {
            return Err(SourceError::Protocol {
                peer,
                source: CodecError::Unexpected {
                    got: h.kind,
                    expected: "Run (start of verification)",
                },
            })
        }
    }
    if !session.life.is_switched_over() {
        return Err(SourceError::Protocol {
            peer,
            source: CodecError::BadBody {
                kind: Kind::Run,
                detail: "verification asked before the switchover: the memory still changes".into(),
            },
        });
    }
    let layout = shared.image.layout();
    let mut scratch = vec![0u8; layout.max_page_size() as usize];
    let mut out = Vec::with_capacity((codec::MAX_CHECKSUMS as usize) * 8 + 64);
    for (b, block) in layout.blocks.iter().enumerate() {
        let zero = page_checksum(&vec![0u8; block.page_size as usize]);
        let mut first = 0;
        while first < block.pages() {
            let n = (block.pages() - first).min(codec::MAX_CHECKSUMS);
            Header::checksums(b as u32, first, n).encode_into(&mut out);
            for p in first..first + n {
                let sum = match shared.image.page(b as u32, p, &mut scratch) {
                    PageData::Zero => zero,
                    PageData::Data(d) => page_checksum(d),
                };
                out.extend_from_slice(&sum.to_le_bytes());
            }
            session.flush(link, &mut out, "send checksums", peer)?;
            first += n;
        }
    }
    Header::control(Kind::End, layout.total_pages()).encode_into(&mut out);
    session.flush(link, &mut out, "send checksums", peer)?;
    // Written is not received: only the destination's `Ack` says the checksums arrived. A
    // break before it leaves the verification pending, so the destination's retry finds it.
    let ack = link
        .next_frame_live(&live, Some(live.timeout), |h| match h.kind {
            Kind::Ack => Ok(()),
            got => Err(CodecError::Unexpected {
                got,
                expected: "Ack (checksums received)",
            }),
        })
        .map_err(super::conn::link_err(peer))?;
    if ack.is_none() {
        return Err(SourceError::Incomplete {
            session: session.id,
            reason: "the verify connection closed before the checksums were acknowledged".into(),
        });
    }
    session.life.verify_served();
    Ok(())
}
