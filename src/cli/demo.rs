//! `postcopy demo`: the embedded default, a migration from a local (or remote) source into this
//! process with a verifying workload, and its report.

use std::path::PathBuf;
use std::process::ExitCode;

use postcopy::demo::{self, DemoConfig, DemoKey, OneRunKey};

use super::args::{OnOff, PrecopyArgs, RunArgs, TlsDestArgs, TlsSourceArgs};
use super::parse::{parse_host_port, usize_in, MAX_DIRTY_PAGES_PER_S, MAX_THREADS};
use super::{write_report, MainError};

/// The arguments of `demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Workload threads on the destination.
    #[arg(long, default_value_t = 2, value_parser = usize_in(1, MAX_THREADS))]
    threads: usize,
    /// No background stream: every page arrives by a fault.
    #[arg(long)]
    no_stream: bool,
    /// Share of zero pages in the image, percent.
    #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u8).range(0..=100))]
    zero_percent: u8,
    /// Use a running `postcopy serve --synthetic` at HOST:PORT instead of a local source (the
    /// image's size, seed and zero pages are then the source's; precopy is off unless asked
    /// for: a static source has nothing to precopy but everything).
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_host_port, conflicts_with_all = [
        "size", "seed", "zero_percent", "dirty_rate", "tls_cert", "tls_key",
        "precopy_max_rounds", "precopy_max_dirty", "precopy_max_seconds",
    ])]
    source: Option<String>,
    /// Write the JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Draw the migration's timeline and fault-latency histogram into this SVG.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Print the JSON report on stdout instead of the text.
    #[arg(long)]
    json: bool,
    /// Skip the warm-up (touching and freeing memory of the image's size before timing,
    /// so the hypervisor's first-touch cost is not measured as migration time).
    #[arg(long)]
    no_warmup: bool,
    /// Precopy before postcopy (`off`: pure postcopy, the source's workload stops at the
    /// handshake). Default: on with the local source, off with --source.
    #[arg(long, value_enum)]
    precopy: Option<OnOff>,
    /// Pages per second the local live source's workload writes during precopy.
    #[arg(
        long,
        default_value_t = 10_000,
        value_parser = clap::value_parser!(u64).range(0..=MAX_DIRTY_PAGES_PER_S)
    )]
    dirty_rate: u64,
    #[command(flatten)]
    precopy_limits: PrecopyArgs,
    /// Pre-shared key file for both sides (default: a fresh random key for this run).
    #[arg(long, conflicts_with = "insecure")]
    key_file: Option<PathBuf>,
    /// No authentication between the two processes.
    #[arg(long)]
    insecure: bool,
    #[command(flatten)]
    tls_source: TlsSourceArgs,
    #[command(flatten)]
    tls: TlsDestArgs,
    /// Serve live metrics at http://HOST:PORT/metrics (Prometheus text format).
    #[arg(long, value_name = "HOST:PORT", value_parser = super::parse::parse_host_port)]
    metrics: Option<String>,
}

impl DemoArgs {
    /// The demo's configuration, but for the key file.
    fn config(&self) -> Result<DemoConfig, MainError> {
        let mut cfg = self.run.demo_config(self.zero_percent, self.threads)?;
        cfg.stream = !self.no_stream;
        cfg.source = self.source.clone();
        cfg.warmup = !self.no_warmup;
        cfg.live = true;
        cfg.precopy = self.precopy.unwrap_or(if self.source.is_some() {
            OnOff::Off
        } else {
            OnOff::On
        }) == OnOff::On;
        cfg.dirty_rate = self.dirty_rate;
        cfg.precopy_limits = self.precopy_limits.limits();
        cfg.tls_files = self.tls_source.files();
        cfg.tls_client = self.tls.client()?;
        if cfg.tls_files.is_some() != cfg.tls_client.is_some() && cfg.source.is_none() {
            return Err(MainError::TlsHalf);
        }
        Ok(cfg)
    }

    /// Authenticated by default, with a one-run key unless a key file is given.
    fn key(&self) -> Result<DemoKey, MainError> {
        Ok(match (&self.key_file, self.insecure) {
            (Some(path), _) => DemoKey::File(path.clone()),
            (None, true) => DemoKey::None,
            (None, false) if self.source.is_some() => return Err(MainError::DemoSourceKey),
            (None, false) => DemoKey::OneRun(OneRunKey::create()?),
        })
    }
}

/// Runs the demo and prints its report (and writes it with `--report`); failure unless every
/// page verified.
pub fn cmd_demo(args: DemoArgs) -> Result<ExitCode, MainError> {
    for path in args.report.iter().chain(&args.plot) {
        super::check_report_path(path)?;
    }
    let mut cfg = args.config()?;
    cfg.key = args.key()?;
    if let Some(addr) = &args.metrics {
        let gauges = cfg.gauges.clone();
        super::serve_metrics(
            "demo",
            addr,
            std::sync::Arc::new(move || {
                postcopy::metrics::migration_families(
                    "migration",
                    &[("demo".into(), gauges.clone())],
                )
            }),
        )?;
    }
    let report = match demo::run(&cfg) {
        Ok(report) => report,
        Err(e) => {
            let e = MainError::from(e);
            if let Some(path) = &args.report {
                write_report(path, &super::failure_json(&e))?;
            }
            return Err(e);
        }
    };
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.render());
    }
    if let Some(path) = &args.report {
        write_report(path, &report.to_json())?;
    }
    if let Some(path) = &args.plot {
        let input = postcopy::plot::PlotInput {
            title: report.title.clone(),
            timeline: report.timeline.clone(),
            fault_latency_histogram: report.fault_latency_histogram.clone(),
        };
        super::plot::write_svg(&input, path)?;
    }
    Ok(if report.verified {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
