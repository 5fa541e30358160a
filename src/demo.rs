//! The embedded default: a source and a destination as two processes over loopback, a
//! verifying workload on the destination, and a report.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::codec::ImageInfo;
use crate::dest::{self, DestError, DestRam, Engine, EngineConfig};
use crate::image::Synthetic;
use crate::report::{DemoReport, LatencyUs};
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
    /// The source's image cannot be verified.
    #[error("the source serves an opaque image (a file); the demo verifies a synthetic image: start it with `postcopy serve --synthetic SIZE`")]
    OpaqueImage,
}

/// Demo parameters.
#[derive(Clone, Debug)]
pub struct DemoConfig {
    /// Image size in bytes.
    pub size_bytes: u64,
    /// Page size.
    pub page_size: u64,
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
}

struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

fn start_source(cfg: &DemoConfig) -> Result<(ChildGuard, String), DemoError> {
    let exe = cfg.exe.display().to_string();
    let fail = |detail: String| DemoError::SourceStart {
        exe: exe.clone(),
        detail,
    };
    let mut child = Command::new(&cfg.exe)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--synthetic",
            &cfg.size_bytes.to_string(),
            "--page-size",
            &cfg.page_size.to_string(),
            "--seed",
            &cfg.seed.to_string(),
            "--zero-percent",
            &cfg.zero_percent.to_string(),
            "--once",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(if cfg.quiet {
            Stdio::null()
        } else {
            Stdio::inherit()
        })
        .spawn()
        .map_err(|e| fail(e.to_string()))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let guard = ChildGuard(child);
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| fail(e.to_string()))?;
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .ok_or_else(|| fail(format!("unexpected first line {line:?}")))?
        .to_string();
    Ok((guard, addr))
}

/// Runs the demo: returns the report (check `verified`) or an error before any report exists.
pub fn run(cfg: &DemoConfig) -> Result<DemoReport, DemoError> {
    let t0 = Instant::now();
    if cfg.warmup {
        crate::sys::mem::prewarm(cfg.size_bytes as usize).map_err(DestError::from)?;
    }
    let (child, addr) = match &cfg.source {
        Some(a) => (None, a.clone()),
        None => {
            let (c, a) = start_source(cfg)?;
            (Some(c), a)
        }
    };
    let engine_cfg = EngineConfig {
        source: addr,
        workers: cfg.workers,
        pin: cfg.pin,
        stream: cfg.stream,
        ..EngineConfig::default()
    };
    let connected = dest::connect(&engine_cfg)?;
    let ImageInfo::Synthetic { seed, zero_percent } = connected.welcome.image else {
        return Err(DemoError::OpaqueImage);
    };
    let layout = connected.welcome.layout.clone();
    let image = Synthetic::new(layout.clone(), seed, zero_percent);
    let ram = Arc::new(DestRam::new(&layout)?);
    let handle = Engine::start(connected, ram.clone(), &engine_cfg)?;

    let (done, done_rx) = crossbeam_channel::bounded::<()>(1);
    let progress = (!cfg.quiet && std::io::stderr().is_terminal()).then(|| {
        let ram = ram.clone();
        std::thread::spawn(move || {
            let total = ram.layout.total_pages();
            let start = Instant::now();
            while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
                done_rx.recv_timeout(Duration::from_millis(250))
            {
                let have = ram.pages_received();
                eprint!(
                    "\r  {:>5.1}%  {have}/{total} pages  {:.1} s ",
                    have as f64 * 100.0 / total as f64,
                    start.elapsed().as_secs_f64()
                );
                let _ = std::io::stderr().flush();
            }
            eprint!("\r{:60}\r", "");
        })
    });

    let wl = workload::run(
        &ram,
        &image,
        &WorkloadConfig {
            threads: cfg.threads,
            pattern: cfg.pattern,
            seed: cfg.seed ^ 0xa5a5,
        },
    );
    let engine = handle.wait();
    let _ = done.send(());
    if let Some(p) = progress {
        let _ = p.join();
    }
    let (_, final_bad, final_first) = workload::final_check(&ram, &image, cfg.threads.max(2));
    if let Some(mut c) = child {
        // The source exits by itself after its session (--once); give it a moment.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.0.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(c);
    }

    let mismatches = wl.mismatches + final_bad;
    let mut report = DemoReport {
        page_size: layout.blocks[0].page_size,
        pages_total: layout.total_pages(),
        faults: wl.faults,
        fault_latency_us: LatencyUs::from_ns(&wl.latency_ns),
        mismatches,
        first_mismatch: wl.first_mismatch.or(final_first),
        pattern: format!("{:?}", cfg.pattern).to_lowercase(),
        threads: cfg.threads,
        workers: cfg.workers,
        stream: cfg.stream,
        zero_percent,
        size_bytes: layout.total_bytes(),
        ..Default::default()
    };
    match engine {
        Ok(e) => {
            report.pages_zero = e.totals.pages_zero;
            report.pages_by_fault = e.totals.pages_by_fault;
            report.pages_by_stream = e.totals.pages_by_stream;
            report.eexist = e.totals.eexist;
            report.postcopy_seconds = e.postcopy_seconds;
            report.throughput_mib_s =
                layout.total_bytes() as f64 / (1 << 20) as f64 / e.postcopy_seconds.max(1e-9);
            report.engine = e;
        }
        Err(e) => report.error = Some(e.to_string()),
    }
    report.verified = report.error.is_none()
        && mismatches == 0
        && report.pages_by_fault + report.pages_by_stream == report.pages_total
        && ram.complete();
    report.total_seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}
