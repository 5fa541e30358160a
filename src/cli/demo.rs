//! `postcopy demo`: the embedded default, a migration from a local (or remote) source into this
//! process with a verifying workload, and its report.

use std::path::PathBuf;
use std::process::ExitCode;

use postcopy::demo::{self, DemoConfig, OneRunKey};

use super::args::{OnOff, PrecopyArgs, RunArgs, TlsArgs};
use super::parse::{usize_in, MAX_DIRTY_PAGES_PER_S, MAX_THREADS};
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
    /// Use a running `postcopy serve --synthetic` at HOST:PORT instead of a local source.
    #[arg(long)]
    source: Option<String>,
    /// Write the JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Skip the warm-up (touching and freeing memory of the image's size before timing,
    /// so the hypervisor's first-touch cost is not measured as migration time).
    #[arg(long)]
    no_warmup: bool,
    /// Precopy before postcopy (`off`: pure postcopy, the source's workload stops at the
    /// handshake).
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    precopy: OnOff,
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
    tls: TlsArgs,
}

impl DemoArgs {
    /// The demo's configuration, but for the key file.
    fn config(&self) -> Result<DemoConfig, MainError> {
        let mut cfg = self.run.demo_config(self.zero_percent, self.threads)?;
        cfg.stream = !self.no_stream;
        cfg.source = self.source.clone();
        cfg.warmup = !self.no_warmup;
        cfg.live = true;
        cfg.precopy = self.precopy == OnOff::On;
        cfg.dirty_rate = self.dirty_rate;
        cfg.precopy_limits = self.precopy_limits.limits();
        cfg.tls_files = self.tls.files();
        cfg.tls_client = self.tls.client()?;
        if cfg.tls_files.is_some() != cfg.tls_client.is_some() && cfg.source.is_none() {
            return Err(MainError::TlsHalf);
        }
        Ok(cfg)
    }

    /// Authenticated by default, with a throwaway key unless one is given.
    fn one_run_key(&self) -> Result<Option<OneRunKey>, MainError> {
        match (&self.key_file, self.insecure) {
            (None, false) => Ok(Some(OneRunKey::create()?)),
            _ => Ok(None),
        }
    }
}

/// Runs the demo and prints its report (and writes it with `--report`); failure unless every
/// page verified.
pub fn cmd_demo(args: DemoArgs) -> Result<ExitCode, MainError> {
    let mut cfg = args.config()?;
    let one_run_key = args.one_run_key()?;
    cfg.key_file = match &one_run_key {
        Some(k) => Some(k.path().to_path_buf()),
        None => args.key_file.clone(),
    };
    let result = demo::run(&cfg);
    drop(one_run_key);
    let report = result?;
    print!("{}", report.render());
    if let Some(path) = &args.report {
        write_report(path, &report.to_json())?;
    }
    Ok(if report.verified {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
