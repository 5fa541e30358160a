//! `postcopy bench`: the engine at several stream settings against the simple baseline
//! handler, same image, same workload, same source processes, runs alternating, medians and
//! ratios, and the CPU each side spent.
//!
//! Each row is one configuration ([`Variant`]): the baseline, the engine with the source
//! pushing its stream, the engine with a receiver-driven stream at each fault-latency target,
//! all with the default security (pre-shared key, every frame sealed), and the engine as
//! configured with `--insecure` beside them. Per run, every row is measured in three modes:
//! - **full**: stream on, the workload running (once per workload thread count): time to all
//!   pages present, fault latency, CPU seconds per GiB of each side;
//! - **stream-only**: no workload, the stream alone fills the memory: throughput;
//! - **demand-only**: no stream, every page by a fault: the latency of a lone fault.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::demo::{
    run_destination, DemoConfig, DemoError, DemoKey, Handler, OneRunKey, RunOutcome, RunSpec,
    SourceProcess,
};
use crate::dest::Memory;
use crate::link::auth::Key;
use crate::stats::LatencyUs;
use crate::workload::WorkloadConfig;

/// Bench parameters.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Image, source executable, zero share, seed, workers, pinning, and the engine's own stream
    /// setting (`fault_latency_target`: the row gated against the baseline) from the demo's
    /// config. Its key file and thread count are not used: the bench makes its own key, and
    /// runs every thread count of `thread_counts`.
    pub demo: DemoConfig,
    /// Size of the demand-only runs (every page by a fault is slow for large images).
    pub demand_size_bytes: u64,
    /// Runs per row and mode.
    pub runs: usize,
    /// Workload threads of the full runs, each measured.
    pub thread_counts: Vec<usize>,
    /// The engine's receiver-driven stream targets measured besides its own setting (`None`:
    /// the source pushes the stream).
    pub targets: Vec<Option<Duration>>,
    /// Memory kinds measured besides the demo's own (`demo.memory`): the engine as configured,
    /// keyed and `--insecure`, stream-only and demand-only.
    pub memories: Vec<Memory>,
}

/// One configuration measured: a row of the table.
#[derive(Clone, Debug, Serialize)]
pub struct Variant {
    /// Its name in the table.
    pub name: String,
    /// Which handler.
    pub handler: Handler,
    /// The engine's fault-latency target (`None`: the source pushes the stream).
    pub target_us: Option<u64>,
    /// Authenticated (key + sealed frames).
    pub secure: bool,
    /// The engine as configured, authenticated: the row the CI gate compares.
    pub ours: bool,
    /// The kind of memory placed into.
    pub memory: Memory,
    /// A row of another memory kind: measured stream-only and demand-only only.
    pub memory_row: bool,
}

/// One measurement.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Measurement {
    /// Which row.
    pub variant: String,
    /// Which mode (`full`, `stream_only`, `demand_only`).
    pub mode: String,
    /// Workload threads (0: none).
    pub threads: usize,
    /// Every page verified.
    pub verified: bool,
    /// Time to all pages present.
    pub seconds: f64,
    /// Image bytes / seconds.
    pub throughput_mib_s: f64,
    /// Fault latency measured by the workload (empty for stream-only).
    pub fault_latency_us: LatencyUs,
    /// CPU seconds of the destination's handler threads (engine or baseline).
    pub dest_cpu_s: f64,
    /// CPU seconds of the source process during the run (10 ms resolution).
    pub source_cpu_s: f64,
    /// Image size of the run.
    pub size_bytes: u64,
    /// Share of the stream's pages received straight into shared memory.
    pub direct_share: f64,
    /// Error, if the run failed.
    pub error: Option<String>,
}

/// A row's medians for one workload thread count, with its ratios to the baseline's row.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// The row's configuration.
    pub variant: Variant,
    /// Workload threads of the full runs.
    pub threads: usize,
    /// Time to all pages, workload running (s).
    pub seconds: f64,
    /// Fault latency with the stream (µs).
    pub p50_us: f64,
    /// See `p50_us`.
    pub p99_us: f64,
    /// See `p50_us`.
    pub p999_us: f64,
    /// Destination handler CPU seconds per GiB migrated (full runs).
    pub dest_cpu_s_per_gib: f64,
    /// Source CPU seconds per GiB migrated (full runs).
    pub source_cpu_s_per_gib: f64,
    /// Stream-only throughput (MiB/s).
    pub stream_mib_s: f64,
    /// Demand-only fault latency (µs).
    pub demand_p50_us: f64,
    /// See `demand_p50_us`.
    pub demand_p99_us: f64,
    /// `seconds` / the baseline's.
    pub time_ratio: f64,
    /// `p50_us` / the baseline's.
    pub p50_ratio: f64,
    /// `p99_us` / the baseline's.
    pub p99_ratio: f64,
}

/// One memory kind's medians (stream-only and demand-only runs of the engine as configured).
#[derive(Clone, Debug, Serialize)]
pub struct MemoryRow {
    /// The memory kind.
    pub memory: Memory,
    /// Authenticated (key + sealed frames).
    pub secure: bool,
    /// Stream-only throughput (MiB/s).
    pub stream_mib_s: f64,
    /// Destination handler CPU seconds per GiB, stream-only.
    pub dest_cpu_s_per_gib: f64,
    /// Pages of the stream received straight into shared memory, share of all (stream-only).
    pub direct_share: f64,
    /// Demand-only fault latency (µs).
    pub demand_p50_us: f64,
    /// See `demand_p50_us`.
    pub demand_p99_us: f64,
    /// `stream_mib_s` / the reference kind's (same security).
    pub stream_ratio: f64,
    /// `demand_p50_us` / the reference kind's (same security).
    pub demand_p50_ratio: f64,
}

/// The bench's result.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// Image size (full and stream-only runs).
    pub size_bytes: u64,
    /// Image size of demand-only runs.
    pub demand_size_bytes: u64,
    /// Runs per row and mode.
    pub runs: usize,
    /// Engine workers.
    pub workers: usize,
    /// Pattern.
    pub pattern: String,
    /// Zero-page share, percent.
    pub zero_percent: u8,
    /// Medians and ratios, per thread count and row.
    pub table: Vec<Row>,
    /// Stream-only throughput and demand-only fault latency per memory kind, keyed and not,
    /// with ratios to the demo's own memory kind.
    pub memory_table: Vec<MemoryRow>,
    /// Every measurement, in the order run.
    pub measurements: Vec<Measurement>,
    /// Every run verified.
    pub all_verified: bool,
}

/// Longest a single measurement may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// The rows: the baseline, the engine at each target, the engine as configured, and that
/// again with `--insecure`.
fn variants(cfg: &BenchConfig) -> Vec<Variant> {
    let engine = |target: Option<Duration>, secure: bool, ours: bool| {
        let target_us = target.map(|t| t.as_micros() as u64);
        let mut name = match target_us {
            None => "engine, stream pushed".to_string(),
            Some(us) => format!("engine, target {us} us"),
        };
        if !secure {
            name.push_str(", --insecure");
        }
        Variant {
            name,
            handler: Handler::Engine,
            target_us,
            secure,
            ours,
            memory: cfg.demo.memory,
            memory_row: false,
        }
    };
    let own = cfg.demo.fault_latency_target;
    let mut rows = vec![Variant {
        name: "baseline".into(),
        handler: Handler::Baseline,
        target_us: None,
        secure: true,
        ours: false,
        memory: if cfg.demo.memory.is_shared() {
            Memory::Anon // the baseline places private memory only
        } else {
            cfg.demo.memory
        },
        memory_row: false,
    }];
    let mut targets = cfg.targets.clone();
    if !targets.contains(&own) {
        targets.push(own);
    }
    rows.extend(targets.iter().map(|&t| engine(t, true, t == own)));
    rows.push(engine(own, false, false));
    for &memory in cfg.memories.iter().filter(|&&m| m != cfg.demo.memory) {
        for secure in [true, false] {
            let mut v = engine(own, secure, false);
            v.name = format!(
                "engine, {}{}",
                memory.name(),
                if secure { "" } else { ", --insecure" }
            );
            v.memory = memory;
            v.memory_row = true;
            rows.push(v);
        }
    }
    rows
}

/// The source processes a bench measures against: one per (secure, page size, demand-only
/// size) a row needs.
struct Sources {
    key: OneRunKey,
    procs: Vec<((bool, u64, bool), SourceProcess)>,
}

impl Sources {
    fn start(cfg: &BenchConfig, rows: &[Variant]) -> Result<Sources, DemoError> {
        let key = OneRunKey::create()?;
        let mut procs = Vec::new();
        for v in rows {
            for small in [false, true] {
                let id = (v.secure, v.memory.page_size(), small);
                if procs.iter().any(|(k, _)| *k == id) {
                    continue;
                }
                let d = DemoConfig {
                    size_bytes: if small {
                        cfg.demand_size_bytes
                    } else {
                        cfg.demo.size_bytes
                    },
                    page_size: v.memory.page_size(),
                    key: if v.secure {
                        DemoKey::OneRun(key.clone())
                    } else {
                        DemoKey::None
                    },
                    ..cfg.demo.clone()
                };
                procs.push((id, SourceProcess::start(&d, false)?));
            }
        }
        Ok(Sources { procs, key })
    }

    fn get(&self, v: &Variant, mode: &str) -> &SourceProcess {
        let id = (v.secure, v.memory.page_size(), mode == "demand_only");
        &self
            .procs
            .iter()
            .find(|(k, _)| *k == id)
            .expect("started for every row")
            .1
    }
}

/// Runs the bench. Progress lines go to stderr unless `quiet`.
pub fn run(cfg: &BenchConfig) -> Result<BenchReport, DemoError> {
    let d = &cfg.demo;
    crate::sys::mem::prewarm(d.size_bytes.max(cfg.demand_size_bytes) as usize)
        .map_err(crate::dest::DestError::from)?;
    let rows = variants(cfg);
    for v in &rows {
        v.memory
            .check_available(d.size_bytes.max(cfg.demand_size_bytes))
            .map_err(DemoError::Unsupported)?;
    }
    let sources = Sources::start(cfg, &rows)?;
    let key = sources.key.key();
    let measurements = measure_all(cfg, &rows, &sources, &key)?;
    drop(sources);
    Ok(BenchReport {
        size_bytes: d.size_bytes,
        demand_size_bytes: cfg.demand_size_bytes,
        runs: cfg.runs,
        workers: d.workers,
        pattern: format!("{:?}", d.pattern).to_lowercase(),
        zero_percent: d.zero_percent,
        all_verified: measurements.iter().all(|m| m.verified),
        table: table(&rows, &cfg.thread_counts, &measurements),
        memory_table: memory_table(&rows, &measurements),
        measurements,
    })
}

/// The (mode, workload threads) of one run of a row.
fn modes(thread_counts: &[usize]) -> Vec<(&'static str, usize)> {
    let mut m: Vec<_> = thread_counts.iter().map(|&t| ("full", t)).collect();
    m.push(("stream_only", 0));
    m.push(("demand_only", thread_counts.first().copied().unwrap_or(1)));
    m
}

/// Every run of every mode of every row, the rows' order rotating from run to run. A run
/// that did not finish stops the bench.
fn measure_all(
    cfg: &BenchConfig,
    rows: &[Variant],
    sources: &Sources,
    key: &Key,
) -> Result<Vec<Measurement>, DemoError> {
    let mut measurements = Vec::new();
    let started = Instant::now();
    for run in 0..cfg.runs {
        for (mode, threads) in modes(&cfg.thread_counts) {
            for i in 0..rows.len() {
                let v = &rows[(i + run) % rows.len()];
                if v.memory_row && mode == "full" {
                    continue;
                }
                let source = sources.get(v, mode);
                let m = measure(source, v, (mode, threads), cfg, key);
                if !cfg.demo.quiet {
                    crate::info!("bench", "{}", progress_line(&m, run, cfg.runs, started));
                }
                let stuck = m
                    .error
                    .as_deref()
                    .is_some_and(|e| e.starts_with("did not finish"));
                measurements.push(m);
                if stuck {
                    return Err(DemoError::Stuck(format!(
                        "{} {mode} run {}: did not finish within {} s",
                        v.name,
                        run + 1,
                        RUN_TIMEOUT.as_secs()
                    )));
                }
            }
        }
    }
    Ok(measurements)
}

/// The destination side of one measurement.
fn spec(v: &Variant, (mode, threads): (&str, usize), cfg: &BenchConfig, key: &Key) -> RunSpec {
    let d = &cfg.demo;
    RunSpec {
        handler: v.handler,
        memory: v.memory,
        workers: d.workers,
        pin: d.pin,
        stream: mode != "demand_only",
        workload: (mode != "stream_only").then_some(WorkloadConfig {
            threads,
            pattern: d.pattern,
            seed: d.seed ^ 0xa5a5,
        }),
        progress: crate::timeline::Progress::Quiet,
        gauges: Default::default(),
        zero_map: d.zero_map,
        zero_fill: d.zero_fill,
        max_streams: d.max_streams,
        fault_latency_target: v.target_us.map(Duration::from_micros),
        precopy: false,
        key: v.secure.then(|| key.clone()),
        recovery_timeout: d.recovery_timeout,
        link_timeout: d.link_timeout,
        tls: None,
    }
}

/// One migration from `source`, under a watchdog so that a stuck run fails the bench instead
/// of hanging it (the stuck thread is left behind; the caller stops the bench).
fn measure(
    source: &SourceProcess,
    v: &Variant,
    mode: (&str, usize),
    cfg: &BenchConfig,
    key: &Key,
) -> Measurement {
    let spec = spec(v, mode, cfg, key);
    let mut m = Measurement {
        variant: v.name.clone(),
        mode: mode.0.into(),
        threads: spec.workload.as_ref().map_or(0, |w| w.threads),
        ..Default::default()
    };
    let (tx, rx) = crossbeam_channel::bounded(1);
    let addr = source.addr.clone();
    let source_cpu_before = source.cpu_time();
    std::thread::spawn(move || {
        let _ = tx.send(run_destination(&addr, &spec));
    });
    match rx.recv_timeout(RUN_TIMEOUT) {
        Ok(Ok(out)) => fill(&mut m, &out),
        Ok(Err(e)) => m.error = Some(e.to_string()),
        Err(_) => m.error = Some(format!("did not finish within {} s", RUN_TIMEOUT.as_secs())),
    }
    if let (Some(a), Some(b)) = (source_cpu_before, source.cpu_time()) {
        m.source_cpu_s = b.saturating_sub(a).as_secs_f64();
    }
    m
}

fn fill(m: &mut Measurement, out: &RunOutcome) {
    m.verified = out.verified();
    m.size_bytes = out.layout.total_bytes();
    if let Some(w) = &out.workload {
        m.fault_latency_us = LatencyUs::from_ns(&w.latency_ns);
    }
    match &out.engine {
        Ok(e) => {
            m.seconds = e.postcopy_seconds;
            m.throughput_mib_s =
                m.size_bytes as f64 / (1 << 20) as f64 / e.postcopy_seconds.max(1e-9);
            m.dest_cpu_s = e.totals.cpu_ns as f64 / 1e9;
            m.direct_share = e.totals.pages_direct as f64 / e.totals.pages_by_stream.max(1) as f64;
        }
        Err(e) => m.error = Some(e.to_string()),
    }
}

/// The progress line of measurement `m` of run `run` (from 0) of `runs`.
fn progress_line(m: &Measurement, run: usize, runs: usize, started: Instant) -> String {
    format!(
        "  run {}/{} {:<34} {:<11} t{} {:>7.3} s  p50 {:>7.1} us  p99 {:>8.1} us  p99.9 {:>8.1} us  cpu {:.2}+{:.2} s{}  [{:.0} s]",
        run + 1,
        runs,
        m.variant,
        m.mode,
        m.threads,
        m.seconds,
        m.fault_latency_us.p50,
        m.fault_latency_us.p99,
        m.fault_latency_us.p999,
        m.dest_cpu_s,
        m.source_cpu_s,
        if m.verified { "" } else { "  NOT VERIFIED" },
        started.elapsed().as_secs_f64()
    )
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

/// The median of `f` over the successful measurements of `variant` in `mode` (with `threads`
/// workload threads, for full runs).
fn pick(
    ms: &[Measurement],
    variant: &str,
    (mode, threads): (&str, Option<usize>),
    f: impl Fn(&Measurement) -> f64,
) -> f64 {
    median(
        ms.iter()
            .filter(|m| m.variant == variant && m.mode == mode && m.error.is_none())
            .filter(|m| threads.map_or(true, |t| m.threads == t))
            .map(f)
            .collect(),
    )
}

/// The rows' medians per thread count, with their ratios to the baseline's.
fn table(rows: &[Variant], thread_counts: &[usize], ms: &[Measurement]) -> Vec<Row> {
    let gib = |m: &Measurement| m.size_bytes as f64 / (1u64 << 30) as f64;
    let mut table = Vec::new();
    for &threads in thread_counts {
        let full = ("full", Some(threads));
        let start = table.len();
        for v in rows.iter().filter(|v| !v.memory_row) {
            let n = v.name.as_str();
            table.push(Row {
                variant: v.clone(),
                threads,
                seconds: pick(ms, n, full, |m| m.seconds),
                p50_us: pick(ms, n, full, |m| m.fault_latency_us.p50),
                p99_us: pick(ms, n, full, |m| m.fault_latency_us.p99),
                p999_us: pick(ms, n, full, |m| m.fault_latency_us.p999),
                dest_cpu_s_per_gib: pick(ms, n, full, |m| m.dest_cpu_s / gib(m)),
                source_cpu_s_per_gib: pick(ms, n, full, |m| m.source_cpu_s / gib(m)),
                stream_mib_s: pick(ms, n, ("stream_only", None), |m| m.throughput_mib_s),
                demand_p50_us: pick(ms, n, ("demand_only", None), |m| m.fault_latency_us.p50),
                demand_p99_us: pick(ms, n, ("demand_only", None), |m| m.fault_latency_us.p99),
                time_ratio: f64::NAN,
                p50_ratio: f64::NAN,
                p99_ratio: f64::NAN,
            });
        }
        let base = table[start].clone();
        debug_assert_eq!(base.variant.handler, Handler::Baseline);
        for r in &mut table[start..] {
            r.time_ratio = r.seconds / base.seconds;
            r.p50_ratio = r.p50_us / base.p50_us;
            r.p99_ratio = r.p99_us / base.p99_us;
        }
    }
    table
}

/// Per memory kind and security: stream-only and demand-only medians, with ratios to the
/// engine-as-configured rows (the demo's memory kind).
fn memory_table(rows: &[Variant], ms: &[Measurement]) -> Vec<MemoryRow> {
    let gib = |m: &Measurement| m.size_bytes as f64 / (1u64 << 30) as f64;
    let stream = ("stream_only", None);
    let demand = ("demand_only", None);
    let of = |v: &Variant| {
        let n = v.name.as_str();
        MemoryRow {
            memory: v.memory,
            secure: v.secure,
            stream_mib_s: pick(ms, n, stream, |m| m.throughput_mib_s),
            dest_cpu_s_per_gib: pick(ms, n, stream, |m| m.dest_cpu_s / gib(m)),
            direct_share: pick(ms, n, stream, |m| m.direct_share),
            demand_p50_us: pick(ms, n, demand, |m| m.fault_latency_us.p50),
            demand_p99_us: pick(ms, n, demand, |m| m.fault_latency_us.p99),
            stream_ratio: f64::NAN,
            demand_p50_ratio: f64::NAN,
        }
    };
    // The reference rows: the engine as configured, keyed (`ours`) and --insecure.
    let reference: Vec<&Variant> = rows
        .iter()
        .filter(|v| !v.memory_row && v.handler == Handler::Engine)
        .filter(|v| v.ours || (!v.secure && !v.memory_row))
        .collect();
    if !rows.iter().any(|v| v.memory_row) {
        return Vec::new();
    }
    let mut out: Vec<MemoryRow> = reference.iter().map(|v| of(v)).collect();
    out.extend(rows.iter().filter(|v| v.memory_row).map(of));
    for i in 0..out.len() {
        let Some(base) = out.iter().find(|r| r.secure == out[i].secure).cloned() else {
            continue;
        };
        out[i].stream_ratio = out[i].stream_mib_s / base.stream_mib_s;
        out[i].demand_p50_ratio = out[i].demand_p50_us / base.demand_p50_us;
    }
    out
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
            "postcopy bench: {} MiB ({} MiB demand-only), {}% zero, pattern {}, {} workers, median of {} runs; key + sealed frames unless --insecure; ratios to the baseline",
            self.size_bytes >> 20,
            self.demand_size_bytes >> 20,
            self.zero_percent,
            self.pattern,
            self.workers,
            self.runs
        );
        let mut threads = None;
        for r in &self.table {
            if threads != Some(r.threads) {
                threads = Some(r.threads);
                let _ = writeln!(
                    s,
                    "\n  {} workload thread(s)      time s  (x)     fault p50 (x)      p99 (x)        p99.9   CPU s/GiB dest src   stream MiB/s  demand p50/p99 us",
                    r.threads
                );
            }
            let _ = writeln!(
                s,
                "  {:<29}{} {:>6.3} {:>5.2}x  {:>7.1} {:>5.2}x {:>8.1} {:>5.2}x {:>8.1}   {:>6.2} {:>6.2}   {:>9.0}     {:>6.1} / {:.1}",
                r.variant.name,
                if r.variant.ours { "*" } else { " " },
                r.seconds,
                r.time_ratio,
                r.p50_us,
                r.p50_ratio,
                r.p99_us,
                r.p99_ratio,
                r.p999_us,
                r.dest_cpu_s_per_gib,
                r.source_cpu_s_per_gib,
                r.stream_mib_s,
                r.demand_p50_us,
                r.demand_p99_us,
            );
        }
        if !self.memory_table.is_empty() {
            let _ = writeln!(
                s,
                "\n  memory kinds (engine as configured)  stream MiB/s (x)   dest CPU s/GiB  direct  demand p50 (x)    p99 us"
            );
            for r in &self.memory_table {
                let _ = writeln!(
                    s,
                    "  {:<16}{:<20} {:>8.0} {:>5.2}x   {:>10.2}    {:>4.0}%  {:>8.1} {:>5.2}x {:>9.1}",
                    r.memory.name(),
                    if r.secure { "key + sealed" } else { "--insecure" },
                    r.stream_mib_s,
                    r.stream_ratio,
                    r.dest_cpu_s_per_gib,
                    r.direct_share * 100.0,
                    r.demand_p50_us,
                    r.demand_p50_ratio,
                    r.demand_p99_us,
                );
            }
        }
        let _ = writeln!(
            s,
            "\n  * the engine as configured (what --check compares). every run verified: {}",
            if self.all_verified { "yes" } else { "NO" }
        );
        s
    }

    /// The CI gate: every run must verify, and the engine as configured must not be worse than
    /// the baseline, at every thread count, on the `checks` asked for: `time` (to all pages
    /// present), `p99` (fault latency, stream on).
    pub fn gate(&self, checks: &[String]) -> Result<(), String> {
        if !self.all_verified {
            return Err("a run did not verify".into());
        }
        let asked = |c: &str| checks.iter().any(|x| x == c);
        for r in self.table.iter().filter(|r| r.variant.ours) {
            for (check, what, ratio, ours, base) in [
                (
                    "time",
                    "time to all pages (s)",
                    r.time_ratio,
                    r.seconds,
                    r.seconds / r.time_ratio,
                ),
                (
                    "p99",
                    "fault p99 with the stream (us)",
                    r.p99_ratio,
                    r.p99_us,
                    r.p99_us / r.p99_ratio,
                ),
            ] {
                // A NaN ratio (no measurement) fails the gate too.
                if asked(check) && (ratio > 1.0 || ratio.is_nan()) {
                    return Err(format!(
                        "{what}, {} workload thread(s): ours {ours:.2} vs baseline {base:.2} (ratio {ratio:.2})",
                        r.threads
                    ));
                }
            }
        }
        Ok(())
    }
}
