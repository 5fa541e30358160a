//! The embedded default: a source and a destination as two processes over loopback, a
//! verifying workload on the destination, and a report.
//!
//! By default the source is live: a workload keeps writing its memory during precopy, stops at
//! switchover, and the destination verifies every page against the checksums the source
//! computes of its final memory (a verify connection).

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::codec::ImageInfo;
use crate::dest::gauges::Phase;
use crate::dest::{self, DestError, DestRam, Engine, EngineConfig, PrecopyReport, ZeroFill};
use crate::dirty::{DirtyError, DirtyTracker, UffdWpTracker};
use crate::image::{Image, Synthetic};
use crate::layout::Layout;
use crate::link::auth::{AuthError, Key};
use crate::live::{DirtyWriter, LiveImage};
use crate::report::DemoReport;
use crate::source::{LiveParts, PrecopyLimits};
use crate::stats::LatencyUs;
use crate::sys::mem::MemError;
use crate::timeline::{Progress, Sampler, Timeline};
use crate::workload::{self, Pattern, WorkloadConfig};

/// Errors of the demo.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The source process could not be started or did not report its address.
    #[error("cannot start the source process ({exe}): {detail}")]
    SourceStart {
        /// The executable.
        exe: String,
        /// What went wrong.
        detail: String,
    },
    /// The destination failed.
    #[error(transparent)]
    Dest(#[from] DestError),
    /// A run did not finish in time.
    #[error("{0}")]
    Stuck(String),
    /// A combination the demo cannot run.
    #[error("{0}")]
    Unsupported(String),
    /// A live source was asked for on a host without dirty-page tracking.
    #[error("--live needs dirty-page tracking, which this host lacks: {0}")]
    NoDirtyTracking(String),
    /// A live source's memory could not be mapped or filled.
    #[error(transparent)]
    LiveMemory(MemError),
    /// A live source's dirty tracker could not be set up.
    #[error(transparent)]
    LiveTracker(DirtyError),
    /// The one-run key file could not be created.
    #[error("cannot create the demo's one-run key (pass --key-file FILE, or --insecure): {0}")]
    OneRunKey(AuthError),
}

/// Demo parameters.
#[derive(Clone, Debug)]
pub struct DemoConfig {
    /// Image size in bytes.
    pub size_bytes: u64,
    /// Page size (the memory's: 2 MiB for hugetlbfs, else the base page).
    pub page_size: u64,
    /// The kind of guest memory the destination places into.
    pub memory: crate::dest::Memory,
    /// Access pattern.
    pub pattern: Pattern,
    /// Workload threads.
    pub threads: usize,
    /// Engine workers.
    pub workers: usize,
    /// Pin workers to CPUs.
    pub pin: bool,
    /// Run the background stream.
    pub stream: bool,
    /// Share of zero pages, percent.
    pub zero_percent: u8,
    /// Image and pattern seed.
    pub seed: u64,
    /// A remote source instead of a local child process.
    pub source: Option<String>,
    /// The `postcopy` executable used to start the local source.
    pub exe: PathBuf,
    /// No progress output.
    pub quiet: bool,
    /// Touch and free memory of the image's size before timing (see [`crate::sys::mem::prewarm`]).
    pub warmup: bool,
    /// Ask the source for its zero-page map (engine only).
    pub zero_map: bool,
    /// How the engine places zero pages.
    pub zero_fill: ZeroFill,
    /// Most bulk streams at once (0: one per worker).
    pub max_streams: usize,
    /// Engine: a receiver-driven stream steered to this fault service time (p99); `None`: the
    /// source pushes the stream.
    pub fault_latency_target: Option<Duration>,
    /// The local source is live: its memory is written at `dirty_rate` until switchover.
    pub live: bool,
    /// Precopy before postcopy.
    pub precopy: bool,
    /// Pages per second the live source's workload writes.
    pub dirty_rate: u64,
    /// When precopy switches over (passed to the local source).
    pub precopy_limits: PrecopyLimits,
    /// The key both sides authenticate with.
    pub key: DemoKey,
    /// How long a broken connection may take to come back.
    pub recovery_timeout: Duration,
    /// A connection silent this long is dead (both sides; passed to the local source).
    pub link_timeout: Duration,
    /// TLS for the local source: its certificate and key files.
    pub tls_files: Option<(PathBuf, PathBuf)>,
    /// TLS for the destination: the trust.
    pub tls_client: Option<crate::link::tls::TlsClient>,
    /// Where the migration publishes its live counters (`--metrics` reads them).
    pub gauges: Arc<crate::dest::gauges::Gauges>,
}

/// A `postcopy serve --synthetic` child process on 127.0.0.1, killed on drop.
pub struct SourceProcess {
    child: Child,
    /// Its address.
    pub addr: String,
}

impl Drop for SourceProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl SourceProcess {
    /// CPU time the source process has used so far (all its threads); `None` once it is gone.
    pub fn cpu_time(&self) -> Option<Duration> {
        crate::sys::process_cpu_time(self.child.id())
    }

    /// Starts `exe serve --synthetic` with the demo's image parameters (`--once` if `once`).
    pub fn start(cfg: &DemoConfig, once: bool) -> Result<SourceProcess, DemoError> {
        let exe = cfg.exe.display().to_string();
        let fail = |detail: String| DemoError::SourceStart {
            exe: exe.clone(),
            detail,
        };
        let mut cmd = serve_command(cfg, once);
        // The source dies with this process, however this process ends (SIGKILL included).
        crate::sys::die_with_parent(&mut cmd);
        let one_run = match &cfg.key {
            DemoKey::OneRun(k) => Some(k.secret),
            _ => None,
        };
        let mut child = cmd
            .stdin(if one_run.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(if cfg.quiet {
                Stdio::null()
            } else {
                Stdio::inherit()
            })
            .spawn()
            .map_err(|e| fail(e.to_string()))?;
        if let (Some(secret), Some(mut stdin)) = (one_run, child.stdin.take()) {
            // The child reads the key to the pipe's end: written, then closed.
            stdin
                .write_all(&secret)
                .map_err(|e| fail(format!("cannot hand it the one-run key: {e}")))?;
        }
        let stdout = child.stdout.take().expect("piped stdout");
        let mut proc = SourceProcess {
            child,
            addr: String::new(),
        };
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .map_err(|e| fail(e.to_string()))?;
        if line.is_empty() {
            return Err(fail(format!(
                "it exited before listening{}",
                if cfg.quiet {
                    " (run without --quiet to see its error)"
                } else {
                    ""
                }
            )));
        }
        proc.addr = line
            .trim()
            .strip_prefix("listening on ")
            .ok_or_else(|| fail(format!("unexpected first line {line:?}")))?
            .to_string();
        Ok(proc)
    }

    /// Waits up to `timeout` for a `--once` source to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// `exe serve --synthetic ...` of the demo's image on 127.0.0.1, a free port.
fn serve_command(cfg: &DemoConfig, once: bool) -> Command {
    let mut cmd = Command::new(&cfg.exe);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--synthetic"])
        .arg(cfg.size_bytes.to_string())
        .arg("--page-size")
        .arg(cfg.page_size.to_string())
        .arg("--seed")
        .arg(cfg.seed.to_string())
        .arg("--zero-percent")
        .arg(cfg.zero_percent.to_string());
    if once {
        cmd.arg("--once");
    }
    if crate::log::json() {
        cmd.args(["--log-format", "json"]);
    }
    match &cfg.key {
        DemoKey::File(k) => cmd.arg("--key-file").arg(k),
        DemoKey::OneRun(_) => cmd.arg("--key-file").arg("-"),
        DemoKey::None => cmd.arg("--insecure"),
    };
    cmd.arg("--link-timeout")
        .arg(cfg.link_timeout.as_secs().max(1).to_string());
    if let Some((c, k)) = &cfg.tls_files {
        cmd.arg("--tls-cert").arg(c).arg("--tls-key").arg(k);
    }
    if cfg.live {
        cmd.arg("--live")
            .arg("--dirty-rate")
            .arg(cfg.dirty_rate.to_string())
            .arg("--precopy-max-rounds")
            .arg(cfg.precopy_limits.max_rounds.to_string())
            .arg("--precopy-max-dirty")
            .arg(cfg.precopy_limits.max_dirty_pages.to_string())
            .arg("--precopy-max-seconds")
            .arg(cfg.precopy_limits.max_duration.as_secs_f64().to_string());
    }
    cmd
}

/// The demo's live source (`postcopy serve --synthetic SIZE --live`): the synthetic image of
/// `layout`, `seed` and `zero_percent` loaded into memory, a dirty tracker per block, and the
/// writer that dirties `dirty_pages_per_s` random pages a second until switchover.
pub fn live_source(
    layout: &Layout,
    seed: u64,
    zero_percent: u8,
    dirty_pages_per_s: u64,
) -> Result<(Arc<dyn Image>, LiveParts), DemoError> {
    UffdWpTracker::available().map_err(DemoError::NoDirtyTracking)?;
    let synthetic = Synthetic::new(layout.clone(), seed, zero_percent);
    let live = Arc::new(
        LiveImage::from_synthetic(&synthetic, crate::sys::online_cpus())
            .map_err(DemoError::LiveMemory)?,
    );
    let mut trackers: Vec<Box<dyn DirtyTracker>> = Vec::with_capacity(layout.blocks.len());
    for (b, block) in layout.blocks.iter().enumerate() {
        let tracker = UffdWpTracker::new(live.region(b).addr(), block.size_bytes as usize)
            .map_err(DemoError::LiveTracker)?;
        trackers.push(Box::new(tracker));
    }
    let writer = DirtyWriter::start(live.clone(), dirty_pages_per_s, seed ^ 0xd1e7);
    let parts = LiveParts {
        trackers,
        workload: Box::new(writer),
    };
    Ok((live, parts))
}

/// A fresh random key for one demo run, held in memory only: the local source process reads
/// it from its standard input (`--key-file -`), so no key file exists to leak or be left behind.
#[derive(Clone)]
pub struct OneRunKey {
    secret: [u8; 32],
}

impl std::fmt::Debug for OneRunKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OneRunKey(..)")
    }
}

impl OneRunKey {
    /// A new random key.
    pub fn create() -> Result<OneRunKey, DemoError> {
        let secret = crate::link::auth::random::<32>().map_err(DemoError::OneRunKey)?;
        Ok(OneRunKey { secret })
    }

    /// The key, for this process's side.
    pub fn key(&self) -> Key {
        Key::from_secret(&self.secret)
    }
}

/// The key both sides of a demo (or bench) run authenticate with.
#[derive(Clone, Debug, Default)]
pub enum DemoKey {
    /// No authentication (`--insecure`).
    #[default]
    None,
    /// A key file both processes read.
    File(PathBuf),
    /// A one-run key, handed to the source process through a pipe.
    OneRun(OneRunKey),
}

impl DemoKey {
    /// This side's key.
    pub fn load(&self) -> Result<Option<Key>, AuthError> {
        match self {
            DemoKey::None => Ok(None),
            DemoKey::File(path) => Key::from_file(path).map(Some),
            DemoKey::OneRun(k) => Ok(Some(k.key())),
        }
    }
}

/// Which destination handler serves the faults.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Handler {
    /// The thread-per-core io_uring engine ([`crate::dest`]).
    Engine,
    /// The simple one-request-per-fault handler ([`crate::baseline`]).
    Baseline,
}

/// One migration into this process.
#[derive(Clone, Debug)]
pub struct RunSpec {
    /// Which handler.
    pub handler: Handler,
    /// The kind of guest memory placed into (the baseline: private memory only).
    pub memory: crate::dest::Memory,
    /// Engine workers (the baseline has one fault thread).
    pub workers: usize,
    /// Pin workers.
    pub pin: bool,
    /// Background stream on.
    pub stream: bool,
    /// The workload, or none (the stream alone fills the memory).
    pub workload: Option<WorkloadConfig>,
    /// Progress on stderr.
    pub progress: crate::timeline::Progress,
    /// Zero-page map (engine only).
    pub zero_map: bool,
    /// How the engine places zero pages.
    pub zero_fill: ZeroFill,
    /// Most bulk streams at once (0: one per worker).
    pub max_streams: usize,
    /// A receiver-driven stream's fault-latency target (engine only).
    pub fault_latency_target: Option<Duration>,
    /// Offer the source a precopy phase (engine only).
    pub precopy: bool,
    /// Authenticate with this key (engine only).
    pub key: Option<crate::link::auth::Key>,
    /// How long a broken connection may take to come back (engine only).
    pub recovery_timeout: Duration,
    /// A connection silent this long is dead.
    pub link_timeout: Duration,
    /// TLS to the source.
    pub tls: Option<crate::link::tls::TlsClient>,
    /// Where the migration publishes its live counters (a fresh set per run, unless shared
    /// with an observer).
    pub gauges: Arc<crate::dest::gauges::Gauges>,
}

/// What one migration did.
pub struct RunOutcome {
    /// The layout migrated.
    pub layout: crate::layout::Layout,
    /// The image's zero-page share.
    pub zero_percent: u8,
    /// The workload's view (latency, faults, first-touch mismatches).
    pub workload: Option<workload::WorkloadResult>,
    /// The handler's report or its error.
    pub engine: Result<crate::dest::EngineReport, DestError>,
    /// Mismatches of the final check, and the first.
    pub final_mismatches: (u64, Option<String>),
    /// The final check could not be made: the source's checksums could not be fetched.
    pub verify_error: Option<DemoError>,
    /// When the page counts do not add up: which pages, and how each arrived.
    pub audit: Option<String>,
    /// Every page placed.
    pub complete: bool,
    /// The migration's gauges over time.
    pub timeline: Timeline,
    /// Pages placed when the run ended.
    pub pages_placed: u64,
    /// The precopy phase, when one ran.
    pub precopy: Option<PrecopyReport>,
    /// Source workload stopped → destination workload running, when the source reported a stop.
    pub downtime_ms: Option<f64>,
}

impl RunOutcome {
    /// Every page placed once and verified, no error.
    pub fn verified(&self) -> bool {
        let wl_bad = self.workload.as_ref().map_or(0, |w| w.mismatches);
        match &self.engine {
            Ok(_) if self.verify_error.is_some() => false,
            Ok(e) => {
                self.complete
                    && wl_bad == 0
                    && self.final_mismatches.0 == 0
                    && e.totals.pages_by_fault
                        + e.totals.pages_by_stream
                        + e.totals.pages_by_zero_map
                        + self.precopy.as_ref().map_or(0, |p| p.pages_by_precopy)
                        == self.layout.total_pages()
            }
            Err(_) => false,
        }
    }
}

/// Connects to `addr`, migrates its image into this process with `spec.handler` (after a
/// precopy phase if `spec.precopy`), runs the workload, and checks every page: against the
/// synthetic image when the source serves one, else against the source's own checksums.
pub fn run_destination(addr: &str, spec: &RunSpec) -> Result<RunOutcome, DemoError> {
    if spec.precopy && spec.handler == Handler::Baseline {
        return Err(DemoError::Unsupported(
            "the baseline handler does pure postcopy only".into(),
        ));
    }
    let mut engine_cfg = engine_config(addr, spec);
    let mut connected = dest::connect(&engine_cfg)?;
    let layout = connected.welcome.layout.clone();
    let (image, zero_percent) = synthetic_image(&connected.welcome.image, &layout);
    if spec.handler == Handler::Baseline && spec.memory.is_shared() {
        return Err(DemoError::Unsupported(format!(
            "the baseline handler places private memory only, not --memory {}",
            spec.memory.name()
        )));
    }
    let ram = Arc::new(DestRam::with_memory(&layout, spec.memory)?);
    let gauges = engine_cfg.gauges.clone();
    let sampler = {
        let ram = ram.clone();
        let page_bytes = layout.blocks[0].page_size;
        Sampler::start(
            gauges.clone(),
            Box::new(move || ram.pages_received()),
            (layout.total_pages(), page_bytes),
            spec.progress,
        )
    };
    // Contents known only to the source: its checksums are fetched after the migration, and
    // the workers' `End` says so (the source keeps the session until then).
    engine_cfg.verify = image.is_none();
    let session = connected.welcome.session;
    // Engine threads connect and set up during precopy; only registration is left for the
    // downtime.
    let prepared = match spec.handler {
        Handler::Engine => Some(Engine::prepare(&connected, ram.clone(), &engine_cfg)?),
        Handler::Baseline => None,
    };
    let precopy = if connected.precopy {
        gauges.set_phase(Phase::Precopy);
        Some(dest::receive_precopy(&mut connected, &ram, &engine_cfg)?)
    } else {
        None
    };
    gauges.set_phase(Phase::Switchover);

    let stopped_unix_us = precopy
        .as_ref()
        .map_or(connected.welcome.stopped_unix_us, |p| {
            p.source_stopped_unix_us
        });
    let handle = match prepared {
        Some(p) => p.enable_notify(connected)?,
        None => crate::baseline::start(connected, ram.clone(), &engine_cfg)?,
    };
    let downtime_ms = (stopped_unix_us > 0)
        .then(|| crate::stats::unix_us().saturating_sub(stopped_unix_us) as f64 / 1000.0);

    gauges.set_phase(Phase::Postcopy);
    let wl = spec
        .workload
        .as_ref()
        .map(|w| workload::run(&ram, image.as_ref(), w));
    let engine = handle.wait();
    gauges.set_phase(Phase::Verifying);
    let threads = spec.workload.as_ref().map_or(2, |w| w.threads.max(2));
    let source = (&engine_cfg, session);
    let (final_mismatches, verify_error) = match &engine {
        // The migration failed: its error says why; there is nothing to verify.
        Err(_) => ((0, None), None),
        Ok(_) => match final_check(&ram, image.as_ref(), source, wl.as_ref(), threads) {
            Ok(m) => (m, None),
            Err(e) => ((0, None), Some(e)),
        },
    };
    let audit = dest::placement_audit(&ram, engine.as_ref().ok(), precopy.as_ref());
    let ok = engine.is_ok() && verify_error.is_none() && final_mismatches.0 == 0;
    gauges.set_phase(if ok { Phase::Done } else { Phase::Failed });
    Ok(RunOutcome {
        timeline: sampler.finish(),
        audit,
        verify_error,
        complete: ram.complete(),
        pages_placed: ram.pages_received(),
        layout,
        zero_percent,
        workload: wl,
        engine,
        final_mismatches,
        precopy,
        downtime_ms,
    })
}

/// The source's image when it is a synthetic one (its pages can be computed here), and its
/// share of zero pages.
fn synthetic_image(info: &ImageInfo, layout: &Layout) -> (Option<Synthetic>, u8) {
    match *info {
        ImageInfo::Synthetic { seed, zero_percent } => (
            Some(Synthetic::new(layout.clone(), seed, zero_percent)),
            zero_percent,
        ),
        ImageInfo::Opaque => (None, 0),
    }
}

/// The engine's (or the baseline's) configuration of a run.
fn engine_config(addr: &str, spec: &RunSpec) -> EngineConfig {
    EngineConfig {
        source: addr.to_string(),
        workers: match spec.handler {
            Handler::Engine => spec.workers,
            Handler::Baseline => 1,
        },
        pin: spec.pin,
        stream: spec.stream,
        // The baseline is deliberately simple: no zero-page map.
        zero_map: spec.zero_map && spec.handler == Handler::Engine,
        zero_fill: spec.zero_fill,
        max_streams: spec.max_streams,
        fault_latency_target: match spec.handler {
            Handler::Engine => spec.fault_latency_target,
            Handler::Baseline => None,
        },
        precopy: spec.precopy,
        key: spec.key.clone(),
        recovery_timeout: spec.recovery_timeout,
        link_timeout: spec.link_timeout,
        tls: spec.tls.clone(),
        gauges: spec.gauges.clone(),
        // The source refuses a destination whose memory maps other pages than it serves.
        page_size: Some(spec.memory.page_size()),
        ..EngineConfig::default()
    }
}

/// Checks every page after the migration: against the synthetic `image` when the source serves
/// one, else against the checksums of `session` fetched from the source of `config`. Returns
/// the mismatches and the first.
fn final_check(
    ram: &DestRam,
    image: Option<&Synthetic>,
    (config, session): (&EngineConfig, u64),
    wl: Option<&workload::WorkloadResult>,
    threads: usize,
) -> Result<(u64, Option<String>), DemoError> {
    let (_, bad, first) = match image {
        Some(image) => workload::final_check(ram, image, threads, wl.is_some()),
        None => {
            let sums = dest::fetch_checksums(config, session)?;
            workload::check_checksums(
                ram,
                &sums,
                wl.map(|w| &w.first_touch[..]),
                threads,
                wl.is_some(),
            )
        }
    };
    Ok((bad, first))
}

/// Runs the demo: returns the report (check `verified`) or an error before any report exists.
pub fn run(cfg: &DemoConfig) -> Result<DemoReport, DemoError> {
    let t0 = Instant::now();
    cfg.memory
        .check_available(cfg.size_bytes)
        .map_err(DemoError::Unsupported)?;
    if cfg.warmup {
        crate::sys::mem::prewarm(cfg.size_bytes as usize).map_err(DestError::from)?;
    }
    let mut cfg = cfg.clone();
    if cfg.live && cfg.source.is_none() {
        if let Err(why) = crate::dirty::UffdWpTracker::available() {
            // Still a full migration (precopy of a static image, then postcopy), just without
            // a workload writing the source.
            crate::warn!(
                "demo",
                "no dirty-page tracking here ({why}); the source is static"
            );
            cfg.live = false;
        }
    }
    let cfg = &cfg;
    // Read before the source starts, so a bad key file is reported as such.
    let key = cfg.key.load().map_err(DestError::from)?;
    let mut child = match &cfg.source {
        Some(_) => None,
        None => Some(SourceProcess::start(cfg, true)?),
    };
    let addr = match (&cfg.source, &child) {
        (Some(a), _) => a.clone(),
        (None, Some(c)) => c.addr.clone(),
        (None, None) => unreachable!("a source is started when none is given"),
    };
    let out = run_destination(&addr, &run_spec(cfg, key))?;
    if let Some(c) = child.as_mut() {
        // The source exits by itself after its session (--once); give it a moment.
        c.wait_exit(Duration::from_secs(5));
    }
    let mut report = demo_report(cfg, out);
    report.total_seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}

/// The demo's one migration: the engine, with the workload.
fn run_spec(cfg: &DemoConfig, key: Option<Key>) -> RunSpec {
    RunSpec {
        handler: Handler::Engine,
        memory: cfg.memory,
        workers: cfg.workers,
        pin: cfg.pin,
        stream: cfg.stream,
        workload: Some(WorkloadConfig {
            threads: cfg.threads,
            pattern: cfg.pattern,
            seed: cfg.seed ^ 0xa5a5,
        }),
        progress: match (
            cfg.quiet,
            std::io::stderr().is_terminal() && !crate::log::json(),
        ) {
            (true, _) => Progress::Quiet,
            (false, true) => Progress::Line,
            (false, false) => Progress::Links,
        },
        zero_map: cfg.zero_map,
        zero_fill: cfg.zero_fill,
        max_streams: cfg.max_streams,
        fault_latency_target: cfg.fault_latency_target,
        precopy: cfg.precopy,
        key,
        recovery_timeout: cfg.recovery_timeout,
        link_timeout: cfg.link_timeout,
        tls: cfg.tls_client.clone(),
        gauges: cfg.gauges.clone(),
    }
}

/// The report of the demo's migration (but for its total time).
fn demo_report(cfg: &DemoConfig, out: RunOutcome) -> DemoReport {
    let verified = out.verified();
    let layout = &out.layout;
    let wl = out.workload.expect("the demo runs a workload");
    let mut report = DemoReport {
        verified,
        page_size: layout.blocks[0].page_size,
        memory: cfg.memory,
        pages_total: layout.total_pages(),
        faults: wl.faults,
        fault_latency_us: LatencyUs::from_ns(&wl.latency_ns),
        mismatches_first_touch: wl.mismatches,
        mismatches_final: out.final_mismatches.0,
        pages_placed: out.pages_placed,
        first_mismatch: wl.first_mismatch.or(out.final_mismatches.1),
        unverified_because: if verified { None } else { out.audit.clone() },
        pattern: format!("{:?}", cfg.pattern).to_lowercase(),
        threads: cfg.threads,
        workers: cfg.workers,
        stream: cfg.stream,
        // A live source's image is opaque on the wire; the local one was made with ours.
        zero_percent: if cfg.source.is_none() {
            cfg.zero_percent
        } else {
            out.zero_percent
        },
        size_bytes: layout.total_bytes(),
        downtime_ms: out.downtime_ms,
        dirty_rate: if cfg.live && cfg.source.is_none() {
            cfg.dirty_rate
        } else {
            0
        },
        fault_latency_histogram: crate::stats::log2_buckets_us(&wl.latency_ns),
        timeline: out.timeline,
        ..Default::default()
    };
    report.title = report.title_line();
    if let Some(p) = &out.precopy {
        add_precopy(&mut report, p);
    }
    match out.engine {
        Ok(e) => add_engine(&mut report, layout, out.precopy.is_some(), e),
        Err(e) => report.error = Some(e.to_string()),
    }
    if let (None, Some(e)) = (&report.error, &out.verify_error) {
        report.error = Some(format!(
            "every page was placed, but the final check against the source failed: {e}"
        ));
    }
    report
}

/// The precopy phase's part of the report.
fn add_precopy(report: &mut DemoReport, p: &PrecopyReport) {
    report.precopy = true;
    report.precopy_rounds = p.round_pages.len() as u64;
    report.precopy_round_pages = p.round_pages.clone();
    report.pages_by_precopy = p.pages_by_precopy;
    report.pages_dirty_at_switchover = p.pages_dirty_at_switchover;
    report.pages_discarded = p.pages_discarded;
    report.precopy_seconds = p.seconds;
    report.precopy_recoveries = p.recoveries;
}

/// The engine's part of the report: its counters and postcopy's throughput.
fn add_engine(
    report: &mut DemoReport,
    layout: &Layout,
    precopy: bool,
    e: crate::dest::EngineReport,
) {
    report.pages_zero = e.totals.pages_zero;
    report.pages_by_fault = e.totals.pages_by_fault;
    report.pages_by_stream = e.totals.pages_by_stream;
    report.pages_by_zero_map = e.totals.pages_by_zero_map;
    report.pages_direct = e.totals.pages_direct;
    report.pages_after_switchover = e.totals.pages_by_fault + e.totals.pages_by_stream;
    report.eexist = e.totals.eexist;
    report.recoveries = e.totals.recoveries + report.precopy_recoveries;
    report.postcopy_seconds = e.postcopy_seconds;
    // What postcopy moved: everything without precopy, else what was left at switchover.
    let moved_bytes = if precopy {
        report.pages_after_switchover * layout.blocks[0].page_size
    } else {
        layout.total_bytes()
    };
    report.throughput_mib_s = moved_bytes as f64 / (1 << 20) as f64 / e.postcopy_seconds.max(1e-9);
    report.engine = e;
}
