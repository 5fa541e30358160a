//! `postcopy handler`: serves VMMs that hand over their userfaultfd (Firecracker's `Uffd`
//! snapshot memory backend) with pages from a remote source; one JSON line per VMM on stdout.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use postcopy::handler::{HandlerConfig, VmmReport};

use super::args::{AuthArgs, TlsArgs};
use super::parse::MAX_TIMEOUT_S;
use super::MainError;

/// The arguments of `handler`.
#[derive(clap::Args, Debug)]
pub struct HandlerArgs {
    /// The Unix socket VMMs connect to (Firecracker's `mem_backend.backend_path`).
    #[arg(long)]
    socket: PathBuf,
    /// The source serving the snapshot's memory file, HOST:PORT.
    #[arg(long)]
    source: String,
    /// Serve one VMM, then exit (non-zero if it failed).
    #[arg(long)]
    once: bool,
    /// No background stream: every page comes by a fault.
    #[arg(long)]
    no_stream: bool,
    /// Seconds without a byte (not even a heartbeat) after which a source connection is taken
    /// as dead and replaced.
    #[arg(long, alias = "stall-timeout", default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_S))]
    link_timeout: u64,
    /// No per-VMM lines on stderr.
    #[arg(long, short)]
    quiet: bool,
    #[command(flatten)]
    auth: AuthArgs,
    /// Seconds a broken source connection may take to come back before a VMM's restore is
    /// given up.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(0..=MAX_TIMEOUT_S))]
    recovery_timeout: u64,
    #[command(flatten)]
    tls: TlsArgs,
    /// Source sessions kept ready (connected and authenticated) before any VMM connects, so a
    /// handover's first fault waits for nothing else; replenished as VMMs take them. 0: each
    /// VMM connects on arrival.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=64))]
    prepared_sessions: u64,
}

impl HandlerArgs {
    fn config(&self) -> Result<HandlerConfig, MainError> {
        Ok(HandlerConfig {
            key: self.auth.key("handler")?,
            tls: self.tls.client()?,
            recovery_timeout: Duration::from_secs(self.recovery_timeout),
            socket: self.socket.clone(),
            source: self.source.clone(),
            once: self.once,
            stream: !self.no_stream,
            link_timeout: Duration::from_secs(self.link_timeout),
            verbose: !self.quiet,
            prepared_sessions: self.prepared_sessions as usize,
            ..HandlerConfig::default()
        })
    }
}

/// Serves VMMs until stopped (with `--once`: one; failure if its restore failed).
pub fn cmd_handler(args: HandlerArgs) -> Result<ExitCode, MainError> {
    let config = args.config()?;
    eprintln!(
        "postcopy handler: listening on {} (source {})",
        config.socket.display(),
        config.source
    );
    let failed = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let f = failed.clone();
    postcopy::handler::serve(&config, stop, move |report| print_vmm_report(report, &f))?;
    Ok(if args.once && failed.load(Ordering::Acquire) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// One JSON line on stdout per VMM served; a failed one sets `failed`.
fn print_vmm_report(report: &VmmReport, failed: &AtomicBool) {
    if report.error.is_some() {
        failed.store(true, Ordering::Release);
    }
    match serde_json::to_string(report) {
        Ok(line) => {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
        Err(e) => eprintln!("postcopy handler: cannot print a VMM's report: {e}"),
    }
}
