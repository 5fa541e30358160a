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
