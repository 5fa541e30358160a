//! The receiver-driven stream's controller: how many `Pages` frames each bulk connection may
//! have in flight, steered by the fault latency the destination measures.
//!
//! With a fault-latency target, every bulk connection is credit-driven (`HELLO_CREDIT`): the
//! source sends a batch only within the running total the bulk half granted, so at most
//! `window` batches of the stream are ever queued in the sockets and buffers between the two
//! sides, and while the window is small the source's streamer and the bulk half sleep instead of
//! taking the CPU a fault's reply needs.
//!
//! The window follows AIMD, as TCP's congestion window does, with fault service time as the
//! congestion signal: the urgent halves count every fault they serve and those served later
//! than the target (event read → page placed, our side of a fault's stall); a bulk half, after
//! each batch it placed, halves its window when more than 1% of the faults served since its last
//! decrease missed the target (the target is a p99), and otherwise grows it by one batch per
//! window's worth of batches placed, up to [`MAX_WINDOW`]. Below one batch in flight the window
//! becomes a pace: a gap between grants, doubled on each further miss (from [`MIN_GAP`] up to
//! [`MAX_GAP`]) and halved on each window's worth of quiet, so that under a burst of late
//! faults the stream's two ends sleep rather than take the CPU the faults need. Without faults
//! the window grows to its maximum in a few dozen batches.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Most batches in flight per bulk connection (64 pages of 4 KiB: 4 MiB).
pub const MAX_WINDOW: u64 = 16;

/// The shortest gap between grants (a 64-page batch per 100 µs: ~2.6 GB/s per stream).
pub const MIN_GAP: Duration = Duration::from_micros(100);

/// The longest gap between grants (~5 MB/s per stream: the stream never stops).
pub const MAX_GAP: Duration = Duration::from_millis(50);

/// Share of faults allowed over the target, in parts per ten thousand (the target is a p99).
const OVER_ALLOWED_PER_10K: u64 = 100;

/// The engine-wide fault counters the bulk halves steer by.
#[derive(Debug)]
pub struct FaultPacer {
    target_ns: u64,
    served: AtomicU64,
    over: AtomicU64,
}

impl FaultPacer {
    /// A pacer for a fault service-time target.
    pub fn new(target: Duration) -> FaultPacer {
        FaultPacer {
            target_ns: target.as_nanos().max(1) as u64,
            served: AtomicU64::new(0),
            over: AtomicU64::new(0),
        }
    }

    /// Counts one served fault and whether it missed the target.
    pub fn record(&self, service_ns: u64) {
        self.served.fetch_add(1, Ordering::Relaxed);
        if service_ns > self.target_ns {
            self.over.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn counts(&self) -> (u64, u64) {
        (
            self.served.load(Ordering::Relaxed),
            self.over.load(Ordering::Relaxed),
        )
    }
}

/// One bulk connection's window.
#[derive(Debug, Clone)]
pub struct Window {
    batches: u64,
    /// With one batch in flight: the time between grants (zero: none).
    gap: Duration,
    /// Batches placed since the window last grew.
    placed: u64,
    /// The pacer's (served, over) at the last decrease.
    since: (u64, u64),
}

impl Window {
    /// A new connection's window: the maximum (a stream starts at full speed; the first
    /// late faults bring it down).
    pub fn new(pacer: &FaultPacer) -> Window {
        Window {
            batches: MAX_WINDOW,
            gap: Duration::ZERO,
            placed: 0,
            since: pacer.counts(),
        }
    }

    /// Batches that may be in flight now.
    pub fn batches(&self) -> u64 {
        self.batches
    }

    /// The time to leave between grants (zero: grant as the window allows).
    pub fn gap(&self) -> Duration {
        self.gap
    }

    /// After a batch was placed: adjusts the window to the faults served meanwhile.
    pub fn on_placed(&mut self, pacer: &FaultPacer) {
        let (served, over) = pacer.counts();
        let (served_then, over_then) = self.since;
        let (served_d, over_d) = (served - served_then, over - over_then);
        if over_d > 0 && over_d * 10_000 > served_d * OVER_ALLOWED_PER_10K {
            if self.batches > 1 {
                self.batches /= 2;
            } else {
                self.gap = (self.gap * 2).clamp(MIN_GAP, MAX_GAP);
            }
            self.placed = 0;
            self.since = (served, over);
        } else {
            self.placed += 1;
            if self.placed >= self.batches {
                self.placed = 0;
                if self.gap.is_zero() {
                    self.batches = (self.batches + 1).min(MAX_WINDOW);
                } else {
                    self.gap /= 2;
                    if self.gap < MIN_GAP {
                        self.gap = Duration::ZERO;
                    }
                }
            }
        }
        debug_assert!((1..=MAX_WINDOW).contains(&self.batches));
        debug_assert!(
            self.gap.is_zero() || self.batches == 1,
            "a pace only at one batch"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn late_faults_halve_the_window_and_quiet_grows_it_back() {
        let pacer = FaultPacer::new(Duration::from_micros(100));
        let mut w = Window::new(&pacer);
        assert_eq!(w.batches(), MAX_WINDOW);
        pacer.record(500_000); // late
        w.on_placed(&pacer);
        assert_eq!(w.batches(), MAX_WINDOW / 2);
        // The same late fault is not counted twice.
        w.on_placed(&pacer);
        assert_eq!(w.batches(), MAX_WINDOW / 2);
        for _ in 0..5 {
            pacer.record(1_000);
            pacer.record(900_000);
            w.on_placed(&pacer);
        }
        assert_eq!(w.batches(), 1, "a burst of late faults: stop and wait");
        // More late faults: a pace, doubling up to its longest.
        for _ in 0..20 {
            pacer.record(900_000);
            w.on_placed(&pacer);
        }
        assert_eq!((w.batches(), w.gap()), (1, MAX_GAP));
        // Quiet: the gap halves per batch placed until it is gone, then one more batch per
        // window's worth placed.
        while !w.gap().is_zero() {
            w.on_placed(&pacer);
        }
        let mut placed = 0;
        while w.batches() < MAX_WINDOW {
            w.on_placed(&pacer);
            placed += 1;
        }
        assert_eq!(placed, (1..MAX_WINDOW).sum::<u64>());
    }

    #[test]
    fn faults_within_the_target_or_under_one_percent_late_keep_it_growing() {
        let pacer = FaultPacer::new(Duration::from_micros(100));
        let mut w = Window::new(&pacer);
        for _ in 0..8 {
            pacer.record(50_000);
            w.on_placed(&pacer);
        }
        (w.batches, w.placed) = (4, 0);
        for _ in 0..199 {
            pacer.record(10_000);
        }
        pacer.record(200_000); // 1 late in 208 since the start: under 1%
        w.on_placed(&pacer);
        assert_eq!(w.batches(), 4);
    }
}
