//! The destination's side of precopy ([`receive_precopy`]).
//!
//! Precopy frames arrive on worker 0's urgent connection between `Welcome` and `Run`, before
//! any userfaultfd is registered: pages are written straight into the blocks (they are plain
//! memory then), zero pages for pages not yet present are only remembered (placed with
//! `UFFDIO_ZEROPAGE` when the workers start, so untouched memory stays unallocated), and
//! `Discard` ranges drop pages the source's workload wrote after they were sent.
//!
//! A break of the connection (the kernel reports it, or nothing, not even a heartbeat, arrives
//! for the link timeout) resumes precopy: worker 0's urgent connection is opened again
//! (`Hello` with resume and precopy), tells the source which pages are here (`Have`) and the
//! last round taken in (`Run`), and the rounds go on. The source's workload keeps running
//! meanwhile; if the source stays away past the recovery timeout, nothing was lost: the
//! workload never left it.

use std::time::Instant;

use super::{
    io_err, link_err, open_with_retry, retryable, Connected, DestError, DestRam, EngineConfig,
    Joining,
};
use crate::codec::{self, decode_discard, CodecError, Header, Kind, Role, HEADER_BYTES};
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
    /// Times the precopy connection broke and precopy resumed on a new one.
    pub recoveries: u64,
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
    /// The number of the last `Round` taken in (every page of it is here).
    last_round: u64,
    /// Pages received in every round so far (a page sent again counts again).
    pages_received: u64,
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
/// pages still missing fault into the engine, zero pages announced here are placed first. A
/// broken connection is replaced within `config.recovery_timeout` and precopy resumes.
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
    prepare(&mut connected.control, config)?;
    let mut writer = PrecopyWriter {
        ram,
        zero_pending: ram
            .layout
            .blocks
            .iter()
            .map(|b| PageBitmap::new(b.pages()))
            .collect(),
        zeros: vec![0u8; ram.layout.max_page_size() as usize],
        last_round: 0,
        pages_received: 0,
        report: PrecopyReport::default(),
    };
    loop {
        match receive_rounds(&mut connected.control, &mut writer, config) {
            Ok(()) => break,
            Err(e) if retryable(&e) && !config.recovery_timeout.is_zero() => {
                connected.control = rejoin(config, connected.welcome.session, &writer, e)?;
                writer.report.recoveries += 1;
            }
            Err(e) => return Err(e),
        }
    }
    finish(connected, writer, started)
}

/// Read timeout (the link timeout: the source sends while precopy runs) and read-ahead.
fn prepare(link: &mut FramedStream, config: &EngineConfig) -> Result<(), DestError> {
    link.socket()
        .set_read_timeout(Some(config.link_timeout))
        .map_err(io_err("set precopy timeout"))?;
    // A long stream of large frames: read ahead (the buffer is empty again at Run).
    link.buffer_reads(1 << 20);
    Ok(())
}

/// After `Run`: nothing may follow it, the zero pages announced for absent pages are handed to
/// the workers, and the report is made.
fn finish(
    connected: &mut Connected,
    writer: PrecopyWriter<'_>,
    started: Instant,
) -> Result<PrecopyReport, DestError> {
    let link = &mut connected.control;
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
    let ram = writer.ram;
    let mut report = writer.report;
    report.pages_zero_pending = writer.zero_pending.iter().map(PageBitmap::count_ones).sum();
    report.pages_by_precopy = ram.pages_received();
    if report.pages_zero_pending > 0 {
        connected.zero_map = Some(writer.zero_pending);
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Opens worker 0's urgent connection again after `cause` broke it in precopy, with backoff
/// until the recovery timeout, and tells the source what is here: `Have` frames (pages
/// written, and zero pages announced) and `Run` with the last round taken in.
fn rejoin(
    config: &EngineConfig,
    session: u64,
    writer: &PrecopyWriter<'_>,
    cause: DestError,
) -> Result<FramedStream, DestError> {
    let started = Instant::now();
    let deadline = started + config.recovery_timeout;
    let ram = writer.ram;
    let slot = super::gauges::PRECOPY_SLOT;
    config.gauges.link_down(slot, true);
    let opened = open_with_retry(
        config,
        (session, Role::Urgent, 0),
        Joining::RejoinPrecopy,
        deadline,
        &|| false,
    );
    config.gauges.link_down(slot, false);
    let opened = opened.map_err(|e| DestError::PrecopyLost {
        seconds: started.elapsed().as_secs_f64().round() as u64,
        received: ram.pages_received(),
        total: ram.layout.total_pages(),
        last: format!("{cause}; then: {e}"),
    })?;
    if opened.welcome.session != session || opened.welcome.layout != ram.layout {
        return Err(protocol("precopy (resumed)")(CodecError::BadBody {
            kind: Kind::Welcome,
            detail: "a different session or layout than before the break".into(),
        }));
    }
    let mut link = opened.link;
    let mut out = Vec::new();
    let per_frame = u64::from(codec::MAX_ZERO_MAP_BYTES) * 8;
    for (b, block) in ram.layout.blocks.iter().enumerate() {
        let held = |p: u64| ram.received[b].get(p) || writer.zero_pending[b].get(p);
        let mut first = 0;
        while first < block.pages() {
            let n = (block.pages() - first).min(per_frame);
            Header::have(b as u32, first, n).encode_into(&mut out);
            codec::encode_page_bits(n, |i| held(first + i), &mut out);
            first += n;
        }
    }
    Header::control(Kind::Run, writer.last_round).encode_into(&mut out);
    link.write_frames(&mut out)
        .map_err(link_err("tell the source which precopy pages are here"))?;
    prepare(&mut link, config)?;
    Ok(link)
}

/// Frames until `Run`: pages, discards, and an `Ack` for each round's end; heartbeats while
/// the backlog drains (the source waits for the last round's `Ack` with the link timeout).
fn receive_rounds(
    link: &mut FramedStream,
    writer: &mut PrecopyWriter<'_>,
    config: &EngineConfig,
) -> Result<(), DestError> {
    let read_err = |e: LinkError, ram: &DestRam| match e {
        e if e.is_timeout() => DestError::Stalled {
            connection: "the precopy connection".into(),
            seconds: config.link_timeout.as_secs(),
            missing: ram.layout.total_pages() - ram.pages_received(),
        },
        e => link_err(CONTEXT)(e),
    };
    let closed = || DestError::Io {
        context: "precopy: the source closed the connection".into(),
        source: std::io::ErrorKind::UnexpectedEof.into(),
    };
    let layout = &writer.ram.layout;
    let live = config.liveness();
    loop {
        let h = link
            .read_frame_if(|h| admit(h, layout))
            .map_err(|e| read_err(e, writer.ram))?
            .ok_or_else(closed)?;
        writer.report.bytes_received += (HEADER_BYTES as u64) + u64::from(h.body_len);
        match h.kind {
            Kind::Pages => {
                writer.pages(&h, link.body())?;
                writer.pages_received += u64::from(h.count);
                config.gauges.precopy(
                    writer.report.round_pages.len() as u64 + 1,
                    writer.pages_received,
                    writer.report.bytes_received,
                );
            }
            Kind::Discard => writer.discard(&h, link.body())?,
            Kind::Round => {
                writer.report.round_pages.push(h.mask);
                writer.last_round = h.page;
                // Everything before it is in place: the source may stop its workload without
                // leaving bytes in flight for the downtime.
                let mut ack = [0u8; HEADER_BYTES];
                Header::control(Kind::Ack, h.page).encode(&mut ack);
                link.write_frames(&mut ack)
                    .map_err(link_err("acknowledge a precopy round"))?;
            }
            Kind::Run => {
                writer.report.pages_dirty_at_switchover = h.page;
                writer.report.source_stopped_unix_us = h.mask;
                return Ok(());
            }
            _ => unreachable!("admit() let only precopy frames through"),
        }
        link.heartbeat_if_due(&live)
            .map_err(link_err("send a heartbeat in precopy"))?;
    }
}
