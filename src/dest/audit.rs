//! The audit of a migration whose page counts do not add up: what each path placed, by the
//! per-page record ([`super::PageOrigins`]), against the counters, and the first pages missing
//! or placed by no path.

use super::{DestRam, EngineReport, PlacedBy, PrecopyReport};

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
        "the counts sum to {counted} of {total} pages; per page: {} by fault, {} by stream, {} by          zero map, {} by precopy, {} never placed; {} received{}",
        by[1],
        by[2],
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
