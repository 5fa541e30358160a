//! How each page ended, by the per-page record ([`super::PageOrigins`]): the tally a report
//! gives on every exit path ([`page_tally`]), and the audit of a migration whose page counts do
//! not add up ([`placement_audit`]): what each path placed against the counters, and the first
//! pages missing or placed by no path.

use super::{DestRam, EngineReport, PlacedBy, PrecopyReport};

/// How each wanted page (a VMM's pages for memory of another process; every page otherwise)
/// ended: exactly one field counts it, so the fields add up to [`PageTally::pages`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PageTally {
    /// Placed by a fault's reply (a sequential reader's prefetch included).
    pub by_fault: u64,
    /// Placed by the background stream.
    pub by_stream: u64,
    /// Placed by the stream's working-set push, ahead of the rest.
    pub by_working_set: u64,
    /// Placed as zero pages from the source's zero map.
    pub by_zero_map: u64,
    /// Written by precopy (and not discarded).
    pub by_precopy: u64,
    /// Dropped by the VMM (`UFFD_EVENT_REMOVE`) before any placement: they read as zero.
    pub removed_unplaced: u64,
    /// Never placed: the engine ended first (the VMM exited, the source was lost, an error).
    pub missing: u64,
}

impl PageTally {
    /// The pages counted.
    pub fn pages(&self) -> u64 {
        self.by_fault
            + self.by_stream
            + self.by_working_set
            + self.by_zero_map
            + self.by_precopy
            + self.removed_unplaced
            + self.missing
    }
}

/// How each wanted page of `ram` ended (read once the engine has ended: no page still moves).
pub fn page_tally(ram: &DestRam) -> PageTally {
    let mut t = PageTally::default();
    for b in 0..ram.layout.blocks.len() {
        for seg in ram.segments(b) {
            for p in seg.first_page..seg.first_page + seg.pages {
                let slot = match (ram.placed_by.get(b, p), ram.received[b].get(p)) {
                    (PlacedBy::Fault, _) => &mut t.by_fault,
                    (PlacedBy::Stream, _) => &mut t.by_stream,
                    (PlacedBy::WorkingSet, _) => &mut t.by_working_set,
                    (PlacedBy::ZeroMap, _) => &mut t.by_zero_map,
                    (PlacedBy::Precopy, _) => &mut t.by_precopy,
                    (PlacedBy::Nothing, true) => &mut t.removed_unplaced,
                    (PlacedBy::Nothing, false) => &mut t.missing,
                };
                *slot += 1;
            }
        }
    }
    t
}

/// When the report's page counts do not sum to the layout, or a page is missing: what each
/// path placed (by the per-page record) against what the counters say, and the first pages
/// not placed or placed without being counted.
pub fn placement_audit(
    ram: &DestRam,
    engine: Option<&EngineReport>,
    precopy: Option<&PrecopyReport>,
) -> Option<String> {
    let total = ram.layout.total_pages();
    let t = engine.map(|e| &e.totals);
    let counted = t.map_or(0, |t| {
        t.pages_by_fault + t.pages_by_stream + t.pages_by_zero_map
    }) + precopy.map_or(0, |p| p.pages_by_precopy);
    if counted == total && ram.complete() {
        return None;
    }
    let by = ram.placed_by.counts();
    let mut odd = Vec::new();
    'blocks: for (b, block) in ram.layout.blocks.iter().enumerate() {
        for p in 0..block.pages() {
            let placed_by = ram.placed_by.get(b, p);
            let received = ram.received[b].get(p);
            if !received || placed_by == PlacedBy::Nothing {
                let state = if received {
                    "marked received, by no path"
                } else {
                    "missing"
                };
                odd.push(format!(
                    "block {b} page {p}: {state} ({})",
                    placed_by.describe()
                ));
                if odd.len() == 8 {
                    break 'blocks;
                }
            }
        }
    }
    Some(format!(
        "the counts sum to {counted} of {total} pages; per page: {} by fault, {} by stream, {} by the working set, {} by zero map, {} by precopy, {} never placed; {} received{}",
        by[1],
        by[2],
        by[5],
        by[3],
        by[4],
        by[0],
        ram.pages_received(),
        if odd.is_empty() {
            String::new()
        } else {
            format!("; first: {}", odd.join("; "))
        }
    ))
}
