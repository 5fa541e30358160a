//! The destination's side of precopy ([`receive_precopy`]) and of end-to-end verification
//! ([`VerifyConnection`]).
//!
//! Precopy frames arrive on worker 0's urgent connection between `Welcome` and `Run`, before
//! any userfaultfd is registered: pages are written straight into the blocks (they are plain
//! memory then), zero pages for pages not yet present are only remembered (placed with
//! `UFFDIO_ZEROPAGE` when the workers start, so untouched memory stays unallocated), and
//! `Discard` ranges drop pages the source's workload wrote after they were sent.

use std::time::Instant;

use super::{io_err, link_err, open_connection, Connected, DestError, DestRam, EngineConfig};
use crate::codec::{decode_discard, CodecError, Header, Kind, Role, HEADER_BYTES};
use crate::layout::{Layout, PageBitmap};
use crate::link::{FramedStream, LinkError};

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

/// Where precopy's pages go: the still-unregistered blocks, and the zero pages not yet present.
struct PrecopyWriter<'r> {
    ram: &'r DestRam,
    /// Per block: zero pages announced for pages not present (placed by the workers at start).
    zero_pending: Vec<PageBitmap>,
    /// One zero page (a present page announced as zero is overwritten with it).
    zeros: Vec<u8>,
    report: PrecopyReport,
}

impl PrecopyWriter<'_> {
    /// A `Pages` frame (its header checked against the layout at admission).
    fn pages(&mut self, h: &Header, data: &[u8]) -> Result<(), DestError> {
        let ps = self.ram.layout.blocks[h.block as usize].page_size as usize;
        let (b, received) = (h.block as usize, &self.ram.received[h.block as usize]);
        let mut at = 0;
        for i in 0..u64::from(h.count) {
            let p = h.page + i;
            if h.mask >> i & 1 == 1 {
                if received.get(p) {
                    // Present with older content: make it zero, keep it present.
                    self.ram.write_page(h.block, p, &self.zeros[..ps])?;
                } else {
                    self.zero_pending[b].set(p);
                }
            } else {
                self.ram.write_page(h.block, p, &data[at..at + ps])?;
                self.zero_pending[b].clear(p);
                at += ps;
            }
        }
        self.report.pages_written += u64::from(h.count);
        Ok(())
    }

    /// A `Discard` frame: drop the ranges (decode() bounded the body to MAX_DISCARD_RANGES).
    fn discard(&mut self, h: &Header, data: &[u8]) -> Result<(), DestError> {
        let mut result = Ok(());
        let Self {
            ram,
            zero_pending,
            report,
            ..
        } = self;
        decode_discard(h, data, Some(&ram.layout), |first, pages| {
            if result.is_ok() {
                result = ram.discard_range(h.block, first, pages);
                zero_pending[h.block as usize].clear_range(first, pages);
                report.pages_discarded += pages;
            }
        })
        .map_err(protocol(CONTEXT))?;
        result?;
        self.report.discard_frames += 1;
        Ok(())
    }
}

const CONTEXT: &str = "precopy";

/// What precopy accepts, checked at the header before a byte of the body is read.
fn admit(h: &Header, layout: &Layout) -> Result<(), CodecError> {
    match h.kind {
        Kind::Pages => h.check(layout).map(|_| ()),
        Kind::Discard | Kind::Round | Kind::Run => Ok(()),
        got => Err(CodecError::Unexpected {
            got,
            expected: "Pages, Discard, Round or Run (precopy)",
        }),
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
    let link = &mut connected.control;
    link.socket()
        .set_read_timeout(Some(config.stall_timeout))
        .map_err(io_err("set precopy timeout"))?;
    // A long stream of large frames: read ahead (the buffer is empty again at Run).
    link.buffer_reads(1 << 20);
    let mut writer = PrecopyWriter {
        ram,
        zero_pending: ram
            .layout
            .blocks
            .iter()
            .map(|b| PageBitmap::new(b.pages()))
            .collect(),
        zeros: vec![0u8; ram.layout.max_page_size() as usize],
        report: PrecopyReport::default(),
    };
    receive_rounds(link, &mut writer, config)?;
    if link.buffered_bytes() > 0 {
        // Nothing may follow Run before the destination's first request.
        return Err(protocol(CONTEXT)(CodecError::BadBody {
            kind: Kind::Run,
            detail: format!("{} bytes after Run", link.buffered_bytes()),
        }));
    }
    link.socket()
        .set_read_timeout(None)
        .map_err(io_err("clear precopy timeout"))?;
    let mut report = writer.report;
    report.pages_zero_pending = writer.zero_pending.iter().map(PageBitmap::count_ones).sum();
    report.pages_by_precopy = ram.pages_received();
    if report.pages_zero_pending > 0 {
        connected.zero_map = Some(writer.zero_pending);
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Frames until `Run`: pages, discards, and an `Ack` for each round's end.
fn receive_rounds(
    link: &mut FramedStream,
    writer: &mut PrecopyWriter<'_>,
    config: &EngineConfig,
) -> Result<(), DestError> {
    let read_err = |e: LinkError| match e {
        e if e.is_timeout() => DestError::Stalled {
            seconds: config.stall_timeout.as_secs(),
            missing: 0,
        },
        LinkError::Io { source, .. } if source.kind() == std::io::ErrorKind::UnexpectedEof => {
            DestError::Closed("precopy", 0)
        }
        e => link_err(CONTEXT)(e),
    };
    let layout = &writer.ram.layout;
    loop {
        let h = link
            .read_frame_if(|h| admit(h, layout))
            .map_err(read_err)?
            .ok_or(DestError::Closed("precopy", 0))?;
        writer.report.bytes_received += (HEADER_BYTES as u64) + u64::from(h.body_len);
        match h.kind {
            Kind::Pages => writer.pages(&h, link.body())?,
            Kind::Discard => writer.discard(&h, link.body())?,
            Kind::Round => {
                writer.report.round_pages.push(h.mask);
                // Everything before it is in place: the source may stop its workload without
                // leaving bytes in flight for the downtime.
                let mut ack = [0u8; HEADER_BYTES];
                Header::control(Kind::Ack, h.page).encode(&mut ack);
                link.write_frames(&ack)
                    .map_err(link_err("acknowledge a precopy round"))?;
            }
            Kind::Run => {
                writer.report.pages_dirty_at_switchover = h.page;
                writer.report.source_stopped_unix_us = h.mask;
                return Ok(());
            }
            _ => unreachable!("admit() let only precopy frames through"),
        }
    }
}

/// A verify connection of a session: opened while the migration runs (it keeps the session
/// alive on the source), asked once the migration is done for the checksum of every page as
/// it was at the source's switchover.
pub struct VerifyConnection {
    link: FramedStream,
    layout: Layout,
    timeout: std::time::Duration,
}

impl VerifyConnection {
    /// Joins `session` on the source of `config` with a verify connection.
    pub fn open(config: &EngineConfig, session: u64) -> Result<VerifyConnection, DestError> {
        let opened = open_connection(config, session, Role::Verify, 0)?;
        Ok(VerifyConnection {
            link: opened.link,
            layout: opened.welcome.layout,
            timeout: config.stall_timeout,
        })
    }

    /// Asks for the checksums and reads them: one xxh3 per page, blocks in layout order.
    pub fn fetch(mut self) -> Result<Vec<u64>, DestError> {
        const CONTEXT: &str = "verify connection";
        let mut run = [0u8; HEADER_BYTES];
        Header::control(Kind::Run, 0).encode(&mut run);
        self.link
            .write_frames(&run)
            .map_err(link_err("ask for checksums"))?;
        self.link
            .socket()
            .set_read_timeout(Some(self.timeout))
            .map_err(io_err("set verify timeout"))?;
        self.link.buffer_reads(64 * 1024);
        let mut base = Vec::with_capacity(self.layout.blocks.len());
        let mut total = 0;
        for b in &self.layout.blocks {
            base.push(total);
            total += b.pages();
        }
        let mut sums = vec![0u64; total as usize];
        let have = PageBitmap::new(total);
        let layout = &self.layout;
        loop {
            let h = self
                .link
                .read_frame_if(|h| match h.kind {
                    Kind::Checksums => h.check_zero_map(layout),
                    Kind::End => Ok(()),
                    got => Err(CodecError::Unexpected {
                        got,
                        expected: "Checksums or End",
                    }),
                })
                .map_err(link_err(CONTEXT))?
                .ok_or_else(|| DestError::Closed("verify", total - have.count_ones()))?;
            if h.kind == Kind::End {
                break;
            }
            let first = base[h.block as usize] + h.page;
            for (i, c) in self.link.body().chunks_exact(8).enumerate() {
                let g = first + i as u64;
                sums[g as usize] = u64::from_le_bytes(c.try_into().expect("8 bytes"));
                have.set(g);
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
