//! Measurements shared by the engine, the handler and the reports: a latency summary, and the
//! wall clock that stamps the switchover on one host and measures downtime on another.

use hdrhistogram::Histogram;
use serde::Serialize;

/// Fault latency percentiles in microseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LatencyUs {
    /// Faults measured.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Maximum.
    pub max: f64,
}

/// A log₂ bucket of a latency histogram: the latencies above the previous bucket's bound and
/// at most `le_us` microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Bucket {
    /// The bucket's upper bound, µs (a power of two).
    pub le_us: u64,
    /// Latencies in it.
    pub count: u64,
}

/// A histogram of nanoseconds in log₂ buckets of microseconds, from the first bucket that
/// holds a value to the last (empty for an empty histogram).
pub fn log2_buckets_us(h: &Histogram<u64>) -> Vec<Bucket> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut buckets: Vec<Bucket> = (0..40)
        .map(|i| Bucket {
            le_us: 1u64 << i,
            count: 0,
        })
        .collect();
    for v in h.iter_recorded() {
        let us = h
            .lowest_equivalent(v.value_iterated_to())
            .div_ceil(1000)
            .max(1);
        let i = (64 - (us - 1).leading_zeros()) as usize;
        buckets[i.min(39)].count += v.count_at_value();
    }
    let first = buckets.iter().position(|b| b.count > 0).unwrap_or(0);
    let last = buckets.iter().rposition(|b| b.count > 0).unwrap_or(0);
    buckets[first..=last].to_vec()
}

impl LatencyUs {
    /// From a histogram of nanoseconds.
    pub fn from_ns(h: &Histogram<u64>) -> LatencyUs {
        if h.is_empty() {
            return LatencyUs::default();
        }
        let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        LatencyUs {
            count: h.len(),
            p50: us(0.5),
            p90: us(0.9),
            p99: us(0.99),
            p999: us(0.999),
            max: h.max() as f64 / 1000.0,
        }
    }
}

/// Microseconds since the Unix epoch (wall clock: comparable across processes on one host, and
/// across hosts as far as their clocks agree).
pub fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log2_buckets_hold_each_latency_at_most_their_bound() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
        for ns in [900, 1_000, 3_000, 4_000, 4_100, 1_000_000] {
            h.record(ns).unwrap();
        }
        let b = log2_buckets_us(&h);
        assert_eq!(b[0], Bucket { le_us: 1, count: 2 });
        assert_eq!(b[2], Bucket { le_us: 4, count: 2 });
        assert_eq!(b[3], Bucket { le_us: 8, count: 1 });
        assert_eq!(b.last().unwrap().le_us, 1024);
        assert_eq!(b.iter().map(|b| b.count).sum::<u64>(), 6);
        assert!(log2_buckets_us(&Histogram::<u64>::new(3).unwrap()).is_empty());
    }

    #[test]
    fn latency_summary_serializes_as_before() {
        assert_eq!(
            serde_json::to_string(&LatencyUs::default()).unwrap(),
            r#"{"count":0,"p50":0.0,"p90":0.0,"p99":0.0,"p999":0.0,"max":0.0}"#
        );
        let mut h = Histogram::<u64>::new(3).unwrap();
        for ns in [1_000u64, 2_000, 3_000, 4_000] {
            h.record(ns).unwrap();
        }
        let l = LatencyUs::from_ns(&h);
        assert_eq!((l.count, l.p50), (4, 2.0));
        // The histogram's max is the highest value equivalent to 4000 ns at 3 digits.
        assert!((4.0..4.01).contains(&l.max), "{l:?}");
    }
}
