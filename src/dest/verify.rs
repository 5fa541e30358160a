//! End-to-end verification: the checksum of every page as it was at the source's switchover,
//! fetched on a verify connection once the workers ended ([`fetch_checksums`]).
//!
//! The source keeps a session whose workers' `End` announced a verification
//! ([`super::EngineConfig::verify`]) until it has served one, so the connection is opened only
//! now, and opened again if it breaks, within the recovery timeout.

use std::time::Instant;

use super::{io_err, link_err, open_with_retry, retryable, DestError, EngineConfig, Joining};
use crate::codec::{CodecError, Header, Kind, Role, HEADER_BYTES};
use crate::layout::{Layout, PageBitmap};
use crate::link::FramedStream;

const CONTEXT: &str = "verify connection";

/// The checksums of every page of `session` (one xxh3 per page, blocks in layout order),
/// asked for on a verify connection; a broken one is replaced until the recovery timeout.
pub fn fetch_checksums(config: &EngineConfig, session: u64) -> Result<Vec<u64>, DestError> {
    let started = Instant::now();
    let deadline = started + config.recovery_timeout;
    loop {
        let attempt = open_with_retry(
            config,
            (session, Role::Verify, 0),
            Joining::Fresh,
            deadline,
            &|| false,
        )
        .and_then(|opened| fetch(opened.link, &opened.welcome.layout, config));
        match attempt {
            Ok(sums) => return Ok(sums),
            Err(e) if retryable(&e) && Instant::now() < deadline => {}
            Err(e) => return Err(e),
        }
    }
}

/// Asks for the checksums on `link` and reads them.
fn fetch(
    mut link: FramedStream,
    layout: &Layout,
    config: &EngineConfig,
) -> Result<Vec<u64>, DestError> {
    let mut run = [0u8; HEADER_BYTES];
    Header::control(Kind::Run, 0).encode(&mut run);
    link.write_frames(&mut run)
        .map_err(link_err("ask for checksums"))?;
    // The source computes them as it sends: nothing for the link timeout is a dead link.
    link.socket()
        .set_read_timeout(Some(config.link_timeout))
        .map_err(io_err("set verify timeout"))?;
    link.buffer_reads(64 * 1024);
    let mut base = Vec::with_capacity(layout.blocks.len());
    let mut total = 0;
    for b in &layout.blocks {
        base.push(total);
        total += b.pages();
    }
    let mut sums = vec![0u64; total as usize];
    let have = PageBitmap::new(total);
    loop {
        let h = link
            .read_frame_if(|h| match h.kind {
                Kind::Checksums => h.check_zero_map(layout),
                Kind::End => Ok(()),
                got => Err(CodecError::Unexpected {
                    got,
                    expected: "Checksums or End",
                }),
            })
            .map_err(link_err(CONTEXT))?
            .ok_or_else(|| DestError::Io {
                context: format!(
                    "{CONTEXT}: the source closed it with {} of {total} checksums sent",
                    have.count_ones()
                ),
                source: std::io::ErrorKind::UnexpectedEof.into(),
            })?;
        if h.kind == Kind::End {
            break;
        }
        let first = base[h.block as usize] + h.page;
        for (i, c) in link.body().chunks_exact(8).enumerate() {
            let g = first + i as u64;
            sums[g as usize] = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            have.set(g);
        }
    }
    if have.count_ones() != total {
        return Err(DestError::Protocol {
            context: CONTEXT.into(),
            source: CodecError::BadBody {
                kind: Kind::End,
                detail: format!("checksums for {} of {total} pages", have.count_ones()),
            },
        });
    }
    // Tell the source they arrived: until then it keeps the verification open for a retry.
    // A lost `Ack` costs nothing here; the source gives the session up as verified later.
    let mut ack = [0u8; HEADER_BYTES];
    Header::control(Kind::Ack, total).encode(&mut ack);
    let _ = link.write_frames(&mut ack);
    Ok(sums)
}
