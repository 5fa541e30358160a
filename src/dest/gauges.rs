//! What a running migration shows while it runs: its phase and counters, published by the
//! threads that own them and read by observers (the progress line, the report's timeline,
//! `/metrics`).
//!
//! Each engine thread keeps its own [`WorkerStats`] and copies the counters observers want
//! into its own cache line after every batch it reaps (relaxed stores: no lock, no shared
//! line written by two threads, nothing per page). Readers sum the lines; a sum may mix two
//! batches' worth of one thread, never a torn counter.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use crossbeam_utils::CachePadded;

use super::stats::WorkerStats;

/// Threads that can publish: two halves of the most workers the engine runs, and the precopy
/// receiver ([`PRECOPY_SLOT`]).
pub const MAX_THREADS: usize = 2 * 256 + 1;
/// The precopy receiver's slot (its connection's breaks).
pub const PRECOPY_SLOT: usize = MAX_THREADS - 1;

/// Where a migration is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Connecting and handshaking.
    Connecting,
    /// Receiving precopy rounds (the source still runs).
    Precopy,
    /// The source stopped; registering the memory and starting the workload.
    Switchover,
    /// The workload runs; pages arrive by fault and by stream.
    Postcopy,
    /// Every page is here; checking them.
    Verifying,
    /// Ended: every page placed (and verified, where a check was made).
    Done,
    /// Ended without every page.
    Failed,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 7] = [
        Phase::Connecting,
        Phase::Precopy,
        Phase::Switchover,
        Phase::Postcopy,
        Phase::Verifying,
        Phase::Done,
        Phase::Failed,
    ];

    /// Its name, as in JSON and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Connecting => "connecting",
            Phase::Precopy => "precopy",
            Phase::Switchover => "switchover",
            Phase::Postcopy => "postcopy",
            Phase::Verifying => "verifying",
            Phase::Done => "done",
            Phase::Failed => "failed",
        }
    }
}

/// One thread's published counters.
#[derive(Debug, Default)]
struct Slot {
    pages_by_fault: AtomicU64,
    pages_by_stream: AtomicU64,
    pages_by_zero_map: AtomicU64,
    pages_by_working_set: AtomicU64,
    pages_zero: AtomicU64,
    fault_events: AtomicU64,
    bytes_received: AtomicU64,
    recoveries: AtomicU64,
    /// 1 while this thread's connection is down and being reopened.
    link_down: AtomicU64,
}

/// The sum of every thread's counters, and the migration's phase: what an observer reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Totals {
    /// Pages placed from urgent replies.
    pub pages_by_fault: u64,
    /// Pages placed from the stream.
    pub pages_by_stream: u64,
    /// Pages placed from the zero-page map.
    pub pages_by_zero_map: u64,
    /// Pages placed from the working-set push.
    pub pages_by_working_set: u64,
    /// Pages placed by precopy (present before switchover).
    pub pages_by_precopy: u64,
    /// Of the placed pages, zero pages.
    pub pages_zero: u64,
    /// Fault events read.
    pub faults: u64,
    /// Bytes received.
    pub bytes_received: u64,
    /// Connections reopened after a break.
    pub recoveries: u64,
    /// Connections down and being reopened now.
    pub links_down: u64,
    /// The precopy round being received (0 before precopy).
    pub precopy_round: u64,
}

/// A migration's live counters (share one per migration, `Arc`).
#[derive(Debug)]
pub struct Gauges {
    slots: Box<[CachePadded<Slot>]>,
    phase: AtomicU8,
    precopy_round: AtomicU64,
    pages_by_precopy: AtomicU64,
    precopy_bytes: AtomicU64,
    pages_present: AtomicU64,
    pages_total: AtomicU64,
}

impl Default for Gauges {
    fn default() -> Gauges {
        Gauges {
            slots: (0..MAX_THREADS)
                .map(|_| CachePadded::new(Slot::default()))
                .collect(),
            phase: AtomicU8::new(Phase::Connecting as u8),
            precopy_round: AtomicU64::new(0),
            pages_by_precopy: AtomicU64::new(0),
            precopy_bytes: AtomicU64::new(0),
            pages_present: AtomicU64::new(0),
            pages_total: AtomicU64::new(0),
        }
    }
}

impl Gauges {
    /// Thread `thread` (below [`MAX_THREADS`]) publishes its counters.
    pub fn publish(&self, thread: usize, s: &WorkerStats) {
        let slot = &self.slots[thread];
        slot.pages_by_fault
            .store(s.pages_by_fault, Ordering::Relaxed);
        slot.pages_by_stream
            .store(s.pages_by_stream, Ordering::Relaxed);
        slot.pages_by_zero_map
            .store(s.pages_by_zero_map, Ordering::Relaxed);
        slot.pages_by_working_set
            .store(s.pages_by_working_set, Ordering::Relaxed);
        slot.pages_zero.store(s.pages_zero, Ordering::Relaxed);
        slot.fault_events.store(s.fault_events, Ordering::Relaxed);
        slot.bytes_received
            .store(s.bytes_received, Ordering::Relaxed);
        slot.recoveries.store(s.recoveries, Ordering::Relaxed);
    }

    /// Thread `thread`'s connection went down (`true`) or came back (`false`).
    pub fn link_down(&self, thread: usize, down: bool) {
        self.slots[thread]
            .link_down
            .store(u64::from(down), Ordering::Relaxed);
    }

    /// The precopy receiver's progress: the round, and the pages and bytes so far.
    pub fn precopy(&self, round: u64, pages: u64, bytes: u64) {
        self.precopy_round.store(round, Ordering::Relaxed);
        self.pages_by_precopy.store(pages, Ordering::Relaxed);
        self.precopy_bytes.store(bytes, Ordering::Relaxed);
    }

    /// The pages present of the memory's `total` (its timeline's sampler sets them).
    pub fn set_present(&self, present: u64, total: u64) {
        self.pages_present.store(present, Ordering::Relaxed);
        self.pages_total.store(total, Ordering::Relaxed);
    }

    /// The pages present, and the memory's pages (both 0 until sampled).
    pub fn present(&self) -> (u64, u64) {
        (
            self.pages_present.load(Ordering::Relaxed),
            self.pages_total.load(Ordering::Relaxed),
        )
    }

    /// The migration entered `phase`.
    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Release);
    }

    /// Where the migration is.
    pub fn phase(&self) -> Phase {
        let p = self.phase.load(Ordering::Acquire);
        Phase::ALL
            .into_iter()
            .find(|&x| x as u8 == p)
            .unwrap_or(Phase::Failed)
    }

    /// Every thread's counters summed.
    pub fn totals(&self) -> Totals {
        let mut t = Totals {
            precopy_round: self.precopy_round.load(Ordering::Relaxed),
            pages_by_precopy: self.pages_by_precopy.load(Ordering::Relaxed),
            bytes_received: self.precopy_bytes.load(Ordering::Relaxed),
            ..Totals::default()
        };
        for s in self.slots.iter() {
            t.pages_by_fault += s.pages_by_fault.load(Ordering::Relaxed);
            t.pages_by_stream += s.pages_by_stream.load(Ordering::Relaxed);
            t.pages_by_zero_map += s.pages_by_zero_map.load(Ordering::Relaxed);
            t.pages_by_working_set += s.pages_by_working_set.load(Ordering::Relaxed);
            t.pages_zero += s.pages_zero.load(Ordering::Relaxed);
            t.faults += s.fault_events.load(Ordering::Relaxed);
            t.bytes_received += s.bytes_received.load(Ordering::Relaxed);
            t.recoveries += s.recoveries.load(Ordering::Relaxed);
            t.links_down += s.link_down.load(Ordering::Relaxed);
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_sum_the_threads_and_the_phase_round_trips() {
        let g = Gauges::default();
        let s = WorkerStats {
            pages_by_fault: 3,
            pages_by_stream: 5,
            bytes_received: 100,
            ..WorkerStats::default()
        };
        g.publish(0, &s);
        g.publish(MAX_THREADS - 1, &s);
        g.link_down(7, true);
        g.precopy(2, 10, 50);
        let t = g.totals();
        assert_eq!((t.pages_by_fault, t.pages_by_stream), (6, 10));
        assert_eq!(t.bytes_received, 250);
        assert_eq!(
            (t.links_down, t.precopy_round, t.pages_by_precopy),
            (1, 2, 10)
        );
        for p in Phase::ALL {
            g.set_phase(p);
            assert_eq!(g.phase(), p);
        }
    }
}
