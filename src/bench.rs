//! `postcopy bench`: the engine against the simple baseline handler, same image, same workload,
//! same source process, runs alternating, medians and ratios.
//!
//! Three measurements per handler and run:
//! - **full**: stream on, the workload running: time to all pages present, fault latency;
//! - **stream-only**: no workload, the stream alone fills the memory: throughput;
//! - **demand-only**: no stream, every page by a fault: fault latency of a lone fault.

use std::time::Instant;

use serde::Serialize;

use crate::demo::{
    run_destination, DemoConfig, DemoError, Handler, RunOutcome, RunSpec, SourceProcess,
};
use crate::stats::LatencyUs;
use crate::workload::WorkloadConfig;

/// Bench parameters.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Image, source executable, zero share, seed, workers, pinning (from the demo's config).
    pub demo: DemoConfig,
    /// Size of the demand-only runs (every page by a fault is slow for large images).
    pub demand_size_bytes: u64,
    /// Runs per handler.
    pub runs: usize,
}

/// One measurement.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Measurement {
    /// Which handler.
    pub handler: String,
    /// Which mode (`full`, `stream_only`, `demand_only`).
    pub mode: String,
    /// Every page verified.
    pub verified: bool,
    /// Time to all pages present.
    pub seconds: f64,
    /// Image bytes / seconds.
    pub throughput_mib_s: f64,
    /// Fault latency measured by the workload (empty for stream-only).
    pub fault_latency_us: LatencyUs,
    /// Error, if the run failed.
    pub error: Option<String>,
}

/// A metric's medians.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// Metric name.
    pub metric: String,
    /// Median for the engine.
    pub ours: f64,
    /// Median for the baseline.
    pub baseline: f64,
    /// ours / baseline.
    pub ratio: f64,
    /// Whether smaller is better.
    pub lower_is_better: bool,
}

/// The bench's result.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// Image size (full and stream-only runs).
    pub size_bytes: u64,
    /// Image size of demand-only runs.
    pub demand_size_bytes: u64,
    /// Runs per handler and mode.
    pub runs: usize,
    /// Engine workers.
    pub workers: usize,
    /// Workload threads.
    pub threads: usize,
    /// Pattern.
    pub pattern: String,
    /// Zero-page share, percent.
    pub zero_percent: u8,
    /// Medians and ratios.
    pub table: Vec<Row>,
    /// Every measurement, in the order run.
    pub measurements: Vec<Measurement>,
    /// Every run verified.
    pub all_verified: bool,
}

fn measure(addr: &str, handler: Handler, mode: &str, cfg: &BenchConfig) -> Measurement {
    let d = &cfg.demo;
    let workload = (mode != "stream_only").then_some(WorkloadConfig {
        threads: d.threads,
        pattern: d.pattern,
        seed: d.seed ^ 0xa5a5,
    });
    let spec = RunSpec {
        handler,
        workers: d.workers,
        pin: d.pin,
        stream: mode != "demand_only",
        workload,
        progress: false,
        zero_map: d.zero_map,
        zero_fill: d.zero_fill,
        max_streams: d.max_streams,
        precopy: false,
        key: None,
        recovery_timeout: d.recovery_timeout,
        link_timeout: d.link_timeout,
        tls: None,
    };
    let mut m = Measurement {
        handler: format!("{handler:?}").to_lowercase(),
        mode: mode.into(),
        ..Default::default()
    };
    // A watchdog, so a stuck run fails the bench instead of hanging it (the stuck thread is
    // left behind; the caller stops the bench).
    let (tx, rx) = crossbeam_channel::bounded(1);
    let addr = addr.to_string();
    std::thread::spawn(move || {
        let _ = tx.send(run_destination(&addr, &spec).map(|out| {
            let mut m = Measurement::default();
            fill(&mut m, &out);
            m
        }));
    });
    match rx.recv_timeout(RUN_TIMEOUT) {
        Ok(Ok(done)) => {
            m.verified = done.verified;
            m.seconds = done.seconds;
            m.throughput_mib_s = done.throughput_mib_s;
            m.fault_latency_us = done.fault_latency_us;
            m.error = done.error;
        }
        Ok(Err(e)) => m.error = Some(e.to_string()),
        Err(_) => m.error = Some(format!("did not finish within {} s", RUN_TIMEOUT.as_secs())),
    }
    m
}

/// Longest a single measurement may take.
const RUN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

fn fill(m: &mut Measurement, out: &RunOutcome) {
    m.verified = out.verified();
    if let Some(w) = &out.workload {
        m.fault_latency_us = LatencyUs::from_ns(&w.latency_ns);
    }
    match &out.engine {
        Ok(e) => {
            m.seconds = e.postcopy_seconds;
            m.throughput_mib_s =
                out.layout.total_bytes() as f64 / (1 << 20) as f64 / e.postcopy_seconds.max(1e-9);
        }
        Err(e) => m.error = Some(e.to_string()),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The modes each run measures, in order.
const MODES: [&str; 3] = ["full", "stream_only", "demand_only"];

/// The rows of the table: metric, mode, whether lower is better, and the measured value.
type Metric = (&'static str, &'static str, bool, fn(&Measurement) -> f64);

/// The table's metrics, in order.
const METRICS: [Metric; 8] = [
    (
        "time to all pages, workload running (s)",
        "full",
        true,
        |m| m.seconds,
    ),
    (
        "stream-only throughput (MiB/s)",
        "stream_only",
        false,
        |m| m.throughput_mib_s,
    ),
    ("fault p50 with stream (us)", "full", true, |m| {
        m.fault_latency_us.p50
    }),
    ("fault p99 with stream (us)", "full", true, |m| {
        m.fault_latency_us.p99
    }),
    ("fault p99.9 with stream (us)", "full", true, |m| {
        m.fault_latency_us.p999
    }),
    ("fault p50 demand-only (us)", "demand_only", true, |m| {
        m.fault_latency_us.p50
    }),
    ("fault p99 demand-only (us)", "demand_only", true, |m| {
        m.fault_latency_us.p99
    }),
    ("fault p99.9 demand-only (us)", "demand_only", true, |m| {
        m.fault_latency_us.p999
    }),
];

/// Runs the bench. Progress lines go to stderr unless `quiet`.
pub fn run(cfg: &BenchConfig) -> Result<BenchReport, DemoError> {
    let d = &cfg.demo;
    crate::sys::mem::prewarm(d.size_bytes.max(cfg.demand_size_bytes) as usize)
        .map_err(crate::dest::DestError::from)?;
    let big = SourceProcess::start(d, false)?;
    let small = SourceProcess::start(
        &DemoConfig {
            size_bytes: cfg.demand_size_bytes,
            ..d.clone()
        },
        false,
    )?;
    let measurements = measure_all(cfg, &big, &small)?;
    drop((big, small));
    Ok(BenchReport {
        size_bytes: d.size_bytes,
        demand_size_bytes: cfg.demand_size_bytes,
        runs: cfg.runs,
        workers: d.workers,
        threads: d.threads,
        pattern: format!("{:?}", d.pattern).to_lowercase(),
        zero_percent: d.zero_percent,
        all_verified: measurements.iter().all(|m| m.verified),
        table: table(&measurements),
        measurements,
    })
}

/// Every run of every mode for both handlers (alternating which goes first), against `big`
/// except demand-only runs (`small`). A run that did not finish stops the bench.
fn measure_all(
    cfg: &BenchConfig,
    big: &SourceProcess,
    small: &SourceProcess,
) -> Result<Vec<Measurement>, DemoError> {
    let mut measurements = Vec::with_capacity(cfg.runs * MODES.len() * 2);
    let started = Instant::now();
    for run in 0..cfg.runs {
        let order = if run % 2 == 0 {
            [Handler::Engine, Handler::Baseline]
        } else {
            [Handler::Baseline, Handler::Engine]
        };
        for mode in MODES {
            for handler in order {
                let addr = if mode == "demand_only" {
                    &small.addr
                } else {
                    &big.addr
                };
                let m = measure(addr, handler, mode, cfg);
                if !cfg.demo.quiet {
                    eprintln!("{}", progress_line(&m, run, cfg.runs, started));
                }
                let stuck = m
                    .error
                    .as_deref()
                    .is_some_and(|e| e.starts_with("did not finish"));
                measurements.push(m);
                if stuck {
                    return Err(DemoError::Stuck(format!(
                        "{handler:?} {mode} run {}: did not finish within {} s",
                        run + 1,
                        RUN_TIMEOUT.as_secs()
                    )));
                }
            }
        }
    }
    Ok(measurements)
}

/// The progress line of measurement `m` of run `run` (from 0) of `runs`.
fn progress_line(m: &Measurement, run: usize, runs: usize, started: Instant) -> String {
    format!(
        "  run {}/{} {:<8} {:<11} {:>7.3} s {:>6.0} MiB/s  p50 {:>7.1} us  p99 {:>8.1} us  p99.9 {:>8.1} us{}  [{:.0} s]",
        run + 1,
        runs,
        m.handler,
        m.mode,
        m.seconds,
        m.throughput_mib_s,
        m.fault_latency_us.p50,
        m.fault_latency_us.p99,
        m.fault_latency_us.p999,
        if m.verified { "" } else { "  NOT VERIFIED" },
        started.elapsed().as_secs_f64()
    )
}

/// The medians and ratios of every metric.
fn table(measurements: &[Measurement]) -> Vec<Row> {
    METRICS
        .iter()
        .map(|&(metric, mode, lower, f)| {
            let ours = pick(measurements, "engine", mode, f);
            let baseline = pick(measurements, "baseline", mode, f);
            Row {
                metric: metric.into(),
                ours,
                baseline,
                ratio: ours / baseline,
                lower_is_better: lower,
            }
        })
        .collect()
}

/// The median of `f` over the successful measurements of `handler` in `mode`.
fn pick(
    measurements: &[Measurement],
    handler: &str,
    mode: &str,
    f: fn(&Measurement) -> f64,
) -> f64 {
    median(
        measurements
            .iter()
            .filter(|m| m.handler == handler && m.mode == mode && m.error.is_none())
            .map(f)
            .collect(),
    )
}

impl BenchReport {
    /// Pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report of numbers and strings serializes")
    }

    /// The table as text.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "postcopy bench: {} MiB ({} MiB demand-only), {}% zero, pattern {}, {} workload threads, {} workers, median of {} runs each",
            self.size_bytes >> 20,
            self.demand_size_bytes >> 20,
            self.zero_percent,
            self.pattern,
            self.threads,
            self.workers,
            self.runs
        );
        let _ = writeln!(
            s,
            "  {:<42} {:>10} {:>10} {:>15}",
            "metric", "ours", "baseline", "ours/baseline"
        );
        for r in &self.table {
            let _ = writeln!(
                s,
                "  {:<42} {:>10.2} {:>10.2} {:>14.2}x{}",
                r.metric,
                r.ours,
                r.baseline,
                r.ratio,
                if (r.lower_is_better && r.ratio <= 1.0) || (!r.lower_is_better && r.ratio >= 1.0) {
                    ""
                } else {
                    "  (worse)"
                }
            );
        }
        let _ = writeln!(
            s,
            "  every run verified: {}",
            if self.all_verified { "yes" } else { "NO" }
        );
        s
    }

    /// The CI gate: every run must verify, and ours must not be worse than the baseline on the
    /// `checks` asked for: `time` (to all pages present), `p99` (fault latency, stream on).
    pub fn gate(&self, checks: &[String]) -> Result<(), String> {
        if !self.all_verified {
            return Err("a run did not verify".into());
        }
        for r in &self.table {
            let asked = |c: &str| checks.iter().any(|x| x == c);
            let gated = (asked("time") && r.metric.starts_with("time to all pages"))
                || (asked("p99") && r.metric.starts_with("fault p99 with"));
            // A NaN ratio (no measurement) fails the gate too.
            if gated && (r.ratio > 1.0 || r.ratio.is_nan()) {
                return Err(format!(
                    "{}: ours {:.2} vs baseline {:.2} (ratio {:.2})",
                    r.metric, r.ours, r.baseline, r.ratio
                ));
            }
        }
        Ok(())
    }
}
