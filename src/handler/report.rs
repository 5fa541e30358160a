//! What serving one VMM did ([`VmmReport`]), filled in on every exit path: the engine's counters
//! are kept when it fails or is stopped, and the page fields say how each of the VMM's pages
//! ended, so that they add up to `pages` whatever happened.

use crate::dest::{self, DestError, DestRam, EngineEnd};
use crate::handover::JsonVersion;
use crate::stats::LatencyUs;

/// How serving a VMM ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every page was placed, then the VMM exited (or the handler was stopped).
    Complete,
    /// The VMM exited (or its memory went away) before every page was placed: nothing is lost,
    /// its memory is gone with it.
    VmmExited,
    /// The handler was stopped before every page was placed.
    Stopped,
    /// The source could not be reached again within the recovery timeout.
    SourceLost,
    /// Anything else (see `error`).
    #[default]
    Error,
}

/// What serving one VMM did: one JSON line per VMM.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct VmmReport {
    /// The VMM's pid (`SO_PEERCRED`).
    pub pid: Option<i32>,
    /// How it ended.
    pub outcome: Outcome,
    /// JSON generation of its handshake.
    pub version: Option<JsonVersion>,
    /// Its regions.
    pub regions: usize,
    /// Pages in its regions: the sum of the `pages_by_*`, `pages_removed_unplaced` and
    /// `pages_missing`.
    pub pages: u64,
    /// Whether its source session was prepared before it connected (from the pool).
    pub session_prepared: bool,
    /// Connection accepted → its regions and userfaultfd received.
    pub handover_ms: Option<f64>,
    /// Handover received → last page placed.
    pub restore_seconds: Option<f64>,
    /// Handover received → first fault answered.
    pub first_fault_served_ms: Option<f64>,
    /// Fault service on our side: event read → page placed.
    pub fault_service_us: Option<LatencyUs>,
    /// Fault events read (page faults of the VMM's threads).
    pub faults: u64,
    /// Pages placed in answer to faults.
    pub pages_by_fault: u64,
    /// Pages placed from the background stream.
    pub pages_by_stream: u64,
    /// Pages placed from the stream's push of the image's learned working set.
    pub pages_by_working_set: u64,
    /// Zero pages placed from the source's zero map.
    pub pages_by_zero_map: u64,
    /// Pages the VMM removed before any was placed (they read as zero).
    pub pages_removed_unplaced: u64,
    /// Pages never placed (the VMM exited first, or the engine failed).
    pub pages_missing: u64,
    /// Pages the VMM removed (balloon), placed or not; served as zero pages afterwards.
    pub pages_removed: u64,
    /// Zero pages placed for faults on removed pages.
    pub pages_zero_after_remove: u64,
    /// Pages that arrived twice (a fault's reply and the stream both carried them, the
    /// stream's copy already in flight when the fault came): the second copy is dropped.
    pub pages_duplicate: u64,
    /// Placements that found the page present (`EEXIST`: both copies were placed at once).
    pub eexist: u64,
    /// Connections to the source reopened after a break.
    pub recoveries: u64,
    /// The error, when the outcome is one.
    pub error: Option<String>,
    /// The restore over time: pages by each path per interval, the phases.
    pub timeline: crate::timeline::Timeline,
}

impl VmmReport {
    /// The pages the page fields account for: `pages` on every exit path.
    pub fn pages_accounted(&self) -> u64 {
        self.pages_by_fault
            + self.pages_by_stream
            + self.pages_by_working_set
            + self.pages_by_zero_map
            + self.pages_removed_unplaced
            + self.pages_missing
    }

    /// Fills in how the engine ended (`end`) on the memory `ram`: every counter, whatever the
    /// outcome. `vmm_gone`: the VMM's socket closed.
    pub(super) fn engine_ended(&mut self, end: EngineEnd, ram: &DestRam, vmm_gone: bool) {
        let r = &end.report;
        let tally = dest::page_tally(ram);
        debug_assert_eq!(tally.pages(), self.pages, "every page ends one way");
        self.pages_by_fault = tally.by_fault;
        self.pages_by_stream = tally.by_stream;
        self.pages_by_working_set = tally.by_working_set;
        self.pages_by_zero_map = tally.by_zero_map;
        self.pages_removed_unplaced = tally.removed_unplaced;
        self.pages_missing = tally.missing;
        self.faults = r.totals.fault_events;
        self.fault_service_us = r.fault_service_us.clone();
        self.pages_removed = r.totals.pages_removed;
        self.pages_zero_after_remove = r.totals.pages_zero_after_remove;
        self.eexist = r.totals.eexist;
        self.pages_duplicate = r.totals.pages_duplicate;
        self.recoveries = r.totals.recoveries;
        self.first_fault_served_ms = r.first_fault_served_seconds.map(|s| s * 1000.0);
        if tally.missing == 0 {
            self.restore_seconds = Some(r.postcopy_seconds);
        }
        self.outcome = match end.error {
            None => Outcome::Complete,
            Some(e) => self.failed(e, tally.missing > 0, vmm_gone),
        };
    }

    /// The outcome of an engine that ended with `e`.
    fn failed(&mut self, e: DestError, incomplete: bool, vmm_gone: bool) -> Outcome {
        match e {
            // The VMM went away first: its memory is gone, nothing is lost here.
            DestError::Stopped if vmm_gone => Outcome::VmmExited,
            DestError::Stopped if incomplete => Outcome::Stopped,
            DestError::Uffd(ref u) if vmm_gone || is_mm_gone(u) => Outcome::VmmExited,
            e => {
                let lost = matches!(e, DestError::SourceLost { .. });
                self.error = Some(e.to_string());
                if lost {
                    Outcome::SourceLost
                } else {
                    Outcome::Error
                }
            }
        }
    }
}

fn is_mm_gone(e: &crate::sys::uffd::UffdError) -> bool {
    matches!(e, crate::sys::uffd::UffdError::Place(p) if p.kind == crate::sys::uffd::PlaceErrorKind::MmGone)
}
