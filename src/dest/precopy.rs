//! The destination's side of precopy ([`receive_precopy`]) and of end-to-end verification
//! ([`VerifyConnection`]).
//!
//! Precopy frames arrive on worker 0's urgent connection between `Welcome` and `Run`, before
//! any userfaultfd is registered: pages are written straight into the blocks (they are plain
//! memory then), zero pages for pages not yet present are only remembered (placed with
//! `UFFDIO_ZEROPAGE` when the workers start, so untouched memory stays unallocated), and
//! `Discard` ranges drop pages the source's workload wrote after they were sent.

use std::io::{BufReader, Read};
use std::net::TcpStream;
use std::time::Instant;

use super::{
    io_err, open_connection, read_and_check_tag, write_frames, Connected, DestError, DestRam,
    EngineConfig,
};
use crate::auth::Channel;
use crate::codec::{
    self, decode_discard, CodecError, Header, Kind, Role, DISCARD_RANGE_BYTES, HEADER_BYTES,
    MAX_BATCH_BYTES, MAX_DISCARD_RANGES,
};
use crate::layout::{Layout, PageBitmap};

/// What the precopy phase did, from the destination's side.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PrecopyReport {
    /// Pages the source sent per round (round 1: every page).
    pub round_pages: Vec<u64>,
    /// Pages written into the blocks (re-sent pages count each time).
    pub pages_written: u64,
    /// Pages present at switchover (after discards): these need no fault and no stream.
    pub pages_by_precopy: u64,
    /// Zero pages not present at switchover, placed by the workers at start.
    pub pages_zero_pending: u64,
    /// Pages dropped by `Discard` ranges.
    pub pages_discarded: u64,
    /// `Discard` frames received.
    pub discard_frames: u64,
    /// Pages dirty at switchover, as the source counted them.
    pub pages_dirty_at_switchover: u64,
    /// When the source's workload stopped (wall clock, µs since the epoch).
    pub source_stopped_unix_us: u64,
    /// Bytes received in the phase.
    pub bytes_received: u64,
    /// From the call to `Run`.
    pub seconds: f64,
}

fn protocol(context: &str) -> impl Fn(CodecError) -> DestError + '_ {
    move |source| DestError::Protocol {
        context: context.to_string(),
        source,
    }
}

/// Receives the precopy phase into `ram` (built for the session's layout, not yet registered)
/// until the source's `Run`. Then call [`super::Engine::start`] with the same `connected`: the
/// pages still missing fault into the engine, zero pages announced here are placed first.
/// A silent source is reported after `config.stall_timeout`.
pub fn receive_precopy(
    connected: &mut Connected,
    ram: &DestRam,
    config: &EngineConfig,
) -> Result<PrecopyReport, DestError> {
    const CONTEXT: &str = "precopy";
    if !connected.precopy {
        return Err(DestError::Unsupported(
            "this session did not offer precopy: set EngineConfig::precopy before connect".into(),
        ));
    }
    if ram.layout != connected.welcome.layout {
        return Err(DestError::Unsupported(
            "the destination RAM was built for another layout".into(),
        ));
    }
    let started = Instant::now();
    let layout: &Layout = &ram.layout;
    let max_page = layout.max_page_size() as usize;
    // Everything allocated up front: one batch of pages, one discard body, one zero page.
    let mut body = vec![0u8; (MAX_BATCH_BYTES as usize).max(max_page)];
    let zeros = vec![0u8; max_page];
    let mut discard_body = vec![0u8; usize::from(MAX_DISCARD_RANGES) * DISCARD_RANGE_BYTES];
    let zero_pending: Vec<PageBitmap> = layout
        .blocks
        .iter()
        .map(|b| PageBitmap::new(b.pages()))
        .collect();
    let mut report = PrecopyReport::default();
    connected
        .control
        .set_read_timeout(Some(config.stall_timeout))
        .map_err(io_err("set precopy timeout"))?;
    let mut reader = BufReader::with_capacity(1 << 20, &connected.control);
    let mut channel = connected.channel.take();
    let read_err = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => DestError::Stalled {
            seconds: config.stall_timeout.as_secs(),
            missing: 0,
        },
        std::io::ErrorKind::UnexpectedEof => DestError::Closed("precopy", 0),
        _ => io_err("read precopy")(e),
    };
    loop {
        let mut head = [0u8; HEADER_BYTES];
        reader.read_exact(&mut head).map_err(read_err)?;
        report.bytes_received += HEADER_BYTES as u64;
        let h = Header::decode(&head).map_err(protocol(CONTEXT))?;
        match h.kind {
            Kind::Pages => {
                let block = h.check(layout).map_err(protocol(CONTEXT))?;
                let ps = block.page_size as usize;
                // check() made the body exactly one page per non-zero page of a bounded batch.
                let data = &mut body[..h.body_len as usize];
                reader.read_exact(data).map_err(read_err)?;
                report.bytes_received += u64::from(h.body_len);
                if let Some(c) = channel.as_mut() {
                    read_and_check_tag(&mut reader, &mut c.rx, &head, data, CONTEXT)?;
                }
                let (b, received) = (h.block as usize, &ram.received[h.block as usize]);
                let mut at = 0;
                for i in 0..u64::from(h.count) {
                    let p = h.page + i;
                    if h.mask >> i & 1 == 1 {
                        if received.get(p) {
                            // Present with older content: make it zero, keep it present.
                            ram.write_page(h.block, p, &zeros[..ps])?;
                        } else {
                            zero_pending[b].set(p);
                        }
                    } else {
                        ram.write_page(h.block, p, &data[at..at + ps])?;
                        zero_pending[b].clear(p);
                        at += ps;
                    }
                }
                report.pages_written += u64::from(h.count);
            }
            Kind::Discard => {
                // decode() bounded the body to MAX_DISCARD_RANGES ranges.
                let data = &mut discard_body[..h.body_len as usize];
                reader.read_exact(data).map_err(read_err)?;
                report.bytes_received += u64::from(h.body_len);
                if let Some(c) = channel.as_mut() {
                    read_and_check_tag(&mut reader, &mut c.rx, &head, data, CONTEXT)?;
                }
                let mut result = Ok(());
                decode_discard(&h, data, Some(layout), |first, pages| {
                    if result.is_ok() {
                        result = ram.discard_range(h.block, first, pages);
                        zero_pending[h.block as usize].clear_range(first, pages);
                        report.pages_discarded += pages;
                    }
                })
                .map_err(protocol(CONTEXT))?;
                result?;
                report.discard_frames += 1;
            }
            Kind::Round => {
                if let Some(c) = channel.as_mut() {
                    read_and_check_tag(&mut reader, &mut c.rx, &head, &[], CONTEXT)?;
                }
                report.round_pages.push(h.mask);
                // Everything before it is in place: the source may stop its workload without
                // leaving bytes in flight for the downtime.
                let mut ack = [0u8; HEADER_BYTES];
                Header::control(Kind::Ack, h.page).encode(&mut ack);
                write_frames(
                    &mut (&connected.control),
                    channel.as_mut().map(|c| &mut c.tx),
                    &ack,
                    "acknowledge a precopy round",
                )?;
            }
            Kind::Run => {
                if let Some(c) = channel.as_mut() {
                    read_and_check_tag(&mut reader, &mut c.rx, &head, &[], CONTEXT)?;
                }
                report.pages_dirty_at_switchover = h.page;
                report.source_stopped_unix_us = h.mask;
                break;
            }
            Kind::Error => {
                let mut msg = vec![0u8; h.body_len as usize];
                reader.read_exact(&mut msg).map_err(read_err)?;
                if let Some(c) = channel.as_mut() {
                    read_and_check_tag(&mut reader, &mut c.rx, &head, &msg, CONTEXT)?;
                }
                return Err(DestError::Remote(codec::decode_error(&msg)));
            }
            other => {
                return Err(protocol(CONTEXT)(CodecError::Unexpected {
                    got: other,
                    expected: "Pages, Discard, Round or Run (precopy)",
                }))
            }
        }
    }
    if !reader.buffer().is_empty() {
        // Nothing may follow Run before the destination's first request.
        return Err(protocol(CONTEXT)(CodecError::BadBody {
            kind: Kind::Run,
            detail: format!("{} bytes after Run", reader.buffer().len()),
        }));
    }
    drop(reader);
    connected.channel = channel;
    connected
        .control
        .set_read_timeout(None)
        .map_err(io_err("clear precopy timeout"))?;
    report.pages_zero_pending = zero_pending.iter().map(PageBitmap::count_ones).sum();
    report.pages_by_precopy = ram.pages_received();
    if report.pages_zero_pending > 0 {
        connected.zero_map = Some(zero_pending);
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// A verify connection of a session: opened while the migration runs (it keeps the session
/// alive on the source), asked once the migration is done for the checksum of every page as
/// it was at the source's switchover.
pub struct VerifyConnection {
    stream: TcpStream,
    channel: Option<Channel>,
    layout: Layout,
    timeout: std::time::Duration,
}

impl VerifyConnection {
    /// Joins `session` on the source of `config` with a verify connection.
    pub fn open(config: &EngineConfig, session: u64) -> Result<VerifyConnection, DestError> {
        let opened = open_connection(config, session, Role::Verify, 0)?;
        Ok(VerifyConnection {
            stream: opened.stream,
            channel: opened.channel,
            layout: opened.welcome.layout,
            timeout: config.stall_timeout,
        })
    }

    /// Asks for the checksums and reads them: one xxh3 per page, blocks in layout order.
    pub fn fetch(mut self) -> Result<Vec<u64>, DestError> {
        const CONTEXT: &str = "verify connection";
        let mut run = [0u8; HEADER_BYTES];
        Header::control(Kind::Run, 0).encode(&mut run);
        write_frames(
            &mut self.stream,
            self.channel.as_mut().map(|c| &mut c.tx),
            &run,
            "ask for checksums",
        )?;
        self.stream
            .set_read_timeout(Some(self.timeout))
            .map_err(io_err("set verify timeout"))?;
        let mut base = Vec::with_capacity(self.layout.blocks.len());
        let mut total = 0;
        for b in &self.layout.blocks {
            base.push(total);
            total += b.pages();
        }
        let mut sums = vec![0u64; total as usize];
        let have = PageBitmap::new(total);
        let mut reader = BufReader::new(&self.stream);
        let mut body = vec![0u8; (codec::MAX_CHECKSUMS * 8) as usize];
        loop {
            let mut head = [0u8; HEADER_BYTES];
            reader
                .read_exact(&mut head)
                .map_err(io_err("read checksums"))?;
            let h = Header::decode(&head).map_err(protocol(CONTEXT))?;
            match h.kind {
                Kind::Checksums => {
                    h.check_zero_map(&self.layout).map_err(protocol(CONTEXT))?;
                    let data = &mut body[..h.body_len as usize];
                    reader.read_exact(data).map_err(io_err("read checksums"))?;
                    if let Some(c) = self.channel.as_mut() {
                        read_and_check_tag(&mut reader, &mut c.rx, &head, data, CONTEXT)?;
                    }
                    let first = base[h.block as usize] + h.page;
                    for (i, c) in data.chunks_exact(8).enumerate() {
                        let g = first + i as u64;
                        sums[g as usize] = u64::from_le_bytes(c.try_into().expect("8 bytes"));
                        have.set(g);
                    }
                }
                Kind::End => {
                    if let Some(c) = self.channel.as_mut() {
                        read_and_check_tag(&mut reader, &mut c.rx, &head, &[], CONTEXT)?;
                    }
                    break;
                }
                Kind::Error => {
                    let mut msg = vec![0u8; h.body_len as usize];
                    reader.read_exact(&mut msg).map_err(io_err("read error"))?;
                    return Err(DestError::Remote(codec::decode_error(&msg)));
                }
                other => {
                    return Err(protocol(CONTEXT)(CodecError::Unexpected {
                        got: other,
                        expected: "Checksums or End",
                    }))
                }
            }
        }
        if have.count_ones() != total {
            return Err(protocol(CONTEXT)(CodecError::BadBody {
                kind: Kind::End,
                detail: format!("checksums for {} of {total} pages", have.count_ones()),
            }));
        }
        Ok(sums)
    }
}
