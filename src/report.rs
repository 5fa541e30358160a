//! The migration report: JSON for tools, text for people.

use serde::Serialize;

use crate::dest::EngineReport;
use crate::stats::LatencyUs;

/// The demo's report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DemoReport {
    /// Every page verified, on first touch and after the migration.
    pub verified: bool,
    /// Page size in bytes.
    pub page_size: u64,
    /// The kind of guest memory placed into.
    pub memory: crate::dest::Memory,
    /// Stream pages received straight into shared memory (no temp page, no copy).
    pub pages_direct: u64,
    /// Pages in the image.
    pub pages_total: u64,
    /// Zero pages placed (`UFFDIO_ZEROPAGE`).
    pub pages_zero: u64,
    /// Pages placed from urgent replies to faults.
    pub pages_by_fault: u64,
    /// Pages placed from the background stream.
    pub pages_by_stream: u64,
    /// Pages placed from the source's zero-page map (`--zero-map`), without fault or stream.
    pub pages_by_zero_map: u64,
    /// Pages that arrived when already placed (stream raced a request).
    pub eexist: u64,
    /// Touches that found their page missing (measured in the workload).
    pub faults: u64,
    /// Engine start to last page placed.
    pub postcopy_seconds: f64,
    /// Whole run, including setup, source start and the final check.
    pub total_seconds: f64,
    /// Image size / postcopy_seconds.
    pub throughput_mib_s: f64,
    /// Fault latency (touch → resumption, measured in the workload).
    pub fault_latency_us: LatencyUs,
    /// Pages whose content the workload found wrong at their first touch (a page never
    /// touched counts too: it escaped the check).
    pub mismatches_first_touch: u64,
    /// Pages whose content was wrong after the migration (the final check of every page; not
    /// made when the migration failed).
    pub mismatches_final: u64,
    /// Pages placed when the run ended (all of them unless it failed).
    pub pages_placed: u64,
    /// The first mismatch, if any.
    pub first_mismatch: Option<String>,
    /// Why `verified` is false although no page mismatched: pages not placed, or placed and
    /// counted by no path (the counts must sum to the layout), named with how each arrived.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unverified_because: Option<String>,
    /// Access pattern.
    pub pattern: String,
    /// Workload threads.
    pub threads: usize,
    /// Engine workers.
    pub workers: usize,
    /// Whether the background stream ran.
    pub stream: bool,
    /// Share of zero pages in the image, percent.
    pub zero_percent: u8,
    /// Image bytes.
    pub size_bytes: u64,
    /// Whether a precopy phase ran before postcopy.
    pub precopy: bool,
    /// Precopy rounds (round 1 sends every page).
    pub precopy_rounds: u64,
    /// Pages sent in each precopy round.
    pub precopy_round_pages: Vec<u64>,
    /// Pages present at switchover thanks to precopy (no fault, no stream needed).
    pub pages_by_precopy: u64,
    /// Pages the source's workload had dirtied at switchover.
    pub pages_dirty_at_switchover: u64,
    /// Pages dropped on the destination by discard ranges (refetched in postcopy).
    pub pages_discarded: u64,
    /// Pages fetched after switchover (by fault or by the stream).
    pub pages_after_switchover: u64,
    /// Precopy phase, from the handshake to `Run`.
    pub precopy_seconds: f64,
    /// Source workload stopped → destination workload running (wall clocks of both sides;
    /// exact on one host). `None` for a source that never ran a workload.
    pub downtime_ms: Option<f64>,
    /// Source writes per second during precopy (the demo's live source).
    pub dirty_rate: u64,
    /// Connections reopened after a break (recovery).
    pub recoveries: u64,
    /// Of those, breaks of the precopy connection after which precopy resumed.
    pub precopy_recoveries: u64,
    /// The engine's own counters.
    pub engine: EngineReport,
    /// Error that ended the run, if any.
    pub error: Option<String>,
    /// The title line (what `postcopy plot` puts on top).
    pub title: String,
    /// The migration over time: the phases, and the pages by each path, per interval.
    pub timeline: crate::timeline::Timeline,
    /// The fault latency (touch to resumption) in log₂ buckets of microseconds.
    pub fault_latency_histogram: Vec<crate::stats::Bucket>,
}

impl DemoReport {
    /// Pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("report serialises")
    }

    /// A readable summary.
    pub fn render(&self) -> String {
        let mut s = String::new();
        self.write_title(&mut s);
        self.write_outcome(&mut s);
        self.write_precopy(&mut s);
        self.write_pages(&mut s);
        self.write_faults(&mut s);
        self.write_trouble(&mut s);
        s
    }

    /// The title line: image, pattern, threads, workers, stream.
    fn write_title(&self, s: &mut impl std::fmt::Write) {
        let _ = writeln!(s, "{}", self.title_line());
    }

    /// Image, memory, pattern, threads, workers, stream, in one line.
    pub fn title_line(&self) -> String {
        let mib = self.size_bytes as f64 / (1 << 20) as f64;
        format!(
            "postcopy demo: {mib:.0} MiB of {} memory, {} pages of {} B ({}% zero), pattern {}, {} workload threads, {} workers, stream {}",
            self.memory.name(),
            self.pages_total,
            self.page_size,
            self.zero_percent,
            self.pattern,
            self.threads,
            self.workers,
            if self.stream { "on" } else { "off" }
        )
    }

    /// Whether every page verified, and how long postcopy took.
    fn write_outcome(&self, s: &mut impl std::fmt::Write) {
        let _ = writeln!(
            s,
            "  verified        {}{}",
            if self.verified {
                "yes: every page matched its checksum"
            } else {
                "NO"
            },
            self.why_unverified()
        );
        if self.error.is_some() {
            let _ = writeln!(
                s,
                "  postcopy        did not finish: {} of {} pages placed (error below)   total {:.3} s",
                self.pages_placed, self.pages_total, self.total_seconds
            );
            return;
        }
        let _ = writeln!(
            s,
            "  postcopy        {:.3} s  ({:.0} MiB/s)   total {:.3} s",
            self.postcopy_seconds, self.throughput_mib_s, self.total_seconds
        );
    }

    /// Why `verified` is false, in parentheses (empty when verified).
    fn why_unverified(&self) -> String {
        if self.verified {
            return String::new();
        }
        if self.error.is_some() {
            return " (the migration failed: pages read after the failure are not the source's)"
                .into();
        }
        match (&self.first_mismatch, &self.unverified_because) {
            (Some(first), _) => format!(
                " ({} pages wrong at first touch, {} wrong at the end; first: {first})",
                self.mismatches_first_touch, self.mismatches_final
            ),
            (None, Some(why)) => format!(" ({why})"),
            (None, None) => String::new(),
        }
    }

    /// The precopy phase (when it ran) and the downtime (when known).
    fn write_precopy(&self, s: &mut impl std::fmt::Write) {
        if self.precopy {
            let _ = writeln!(
                s,
                "  precopy         {} rounds {:?} pages in {:.3} s; {} dirty at switchover, {} discarded; {} pages present at switchover",
                self.precopy_rounds,
                self.precopy_round_pages,
                self.precopy_seconds,
                self.pages_dirty_at_switchover,
                self.pages_discarded,
                self.pages_by_precopy
            );
        }
        if let Some(d) = self.downtime_ms {
            let from = if self.dirty_rate > 0 {
                "source workload stopped"
            } else {
                "source switched over"
            };
            let _ = writeln!(
                s,
                "  downtime        {d:.1} ms ({from} -> destination workload running)"
            );
        }
    }

    /// How the pages arrived.
    fn write_pages(&self, s: &mut impl std::fmt::Write) {
        let _ = writeln!(
            s,
            "  pages           {} by fault, {} by stream, {} by zero map, {} zero, {} eexist races",
            self.pages_by_fault,
            self.pages_by_stream,
            self.pages_by_zero_map,
            self.pages_zero,
            self.eexist
        );
        if self.pages_direct > 0 {
            let _ = writeln!(
                s,
                "                  {} stream pages received straight into shared memory",
                self.pages_direct
            );
        }
    }

    /// The faults and their latency.
    fn write_faults(&self, s: &mut impl std::fmt::Write) {
        let l = &self.fault_latency_us;
        let e = &self.engine.totals;
        let _ = writeln!(
            s,
            "  faults          {} (requests {}, deduplicated {}, already placed {})",
            self.faults, e.requests, e.fault_deduplicated, e.fault_already_placed
        );
        if self.faults == 0 {
            let _ = writeln!(
                s,
                "  fault latency   none: no page was missing when first touched"
            );
            return;
        }
        let _ = writeln!(
            s,
            "  fault latency   p50 {:.1} us  p90 {:.1} us  p99 {:.1} us  p99.9 {:.1} us  max {:.1} us",
            l.p50, l.p90, l.p99, l.p999, l.max
        );
    }

    /// Recoveries (when any) and the error that ended the run (when any).
    fn write_trouble(&self, s: &mut impl std::fmt::Write) {
        if self.recoveries > 0 {
            let _ = writeln!(
                s,
                "  recoveries      {} (connections reopened after a break)",
                self.recoveries
            );
        }
        if let Some(err) = &self.error {
            let _ = writeln!(s, "  error           {err}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_run_says_what_was_placed_not_a_rate_or_a_mismatch_count() {
        let r = DemoReport {
            pages_total: 100,
            pages_placed: 40,
            mismatches_first_touch: 90,
            first_mismatch: Some("page 3".into()),
            error: Some("the source is gone".into()),
            ..Default::default()
        };
        let text = r.render();
        assert!(
            text.contains("did not finish: 40 of 100 pages placed"),
            "{text}"
        );
        assert!(text.contains("the migration failed"), "{text}");
        assert!(
            !text.contains("MiB/s") && !text.contains("90 pages wrong"),
            "{text}"
        );
    }

    #[test]
    fn no_faults_is_said_rather_than_zero_latencies() {
        let text = DemoReport {
            verified: true,
            ..Default::default()
        }
        .render();
        assert!(text.contains("fault latency   none"), "{text}");
        assert!(!text.contains("p50 0.0"), "{text}");
    }
}
