//! `postcopy handler`: serves VMMs that hand over their userfaultfd (Firecracker's `Uffd`
//! snapshot memory backend) with pages from a remote source; one JSON line per VMM on stdout.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use postcopy::handler::{HandlerConfig, Outcome, Stop, VmmReport};

use super::args::{AuthArgs, TlsDestArgs};
use super::parse::{parse_host_port, MAX_TIMEOUT_S};
use super::MainError;

/// The arguments of `handler`.
#[derive(clap::Args, Debug)]
pub struct HandlerArgs {
    /// The Unix socket VMMs connect to (Firecracker's `mem_backend.backend_path`).
    #[arg(long)]
    socket: PathBuf,
    /// The source serving the snapshot's memory file, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_host_port)]
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
    #[command(flatten)]
    auth: AuthArgs,
    /// Seconds a broken source connection may take to come back before a VMM's restore is
    /// given up.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(0..=MAX_TIMEOUT_S))]
    recovery_timeout: u64,
    #[command(flatten)]
    tls: TlsDestArgs,
    /// Serve live metrics at http://HOST:PORT/metrics (Prometheus text format).
    #[arg(long, value_name = "HOST:PORT", value_parser = super::parse::parse_host_port)]
    metrics: Option<String>,
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
            verbose: postcopy::log::enabled(postcopy::log::Level::Info),
            prepared_sessions: self.prepared_sessions as usize,
            ..HandlerConfig::default()
        })
    }
}

/// Serves VMMs until stopped (with `--once`: one; failure if its restore failed, or if a
/// second signal cut restores short).
pub fn cmd_handler(args: HandlerArgs) -> Result<ExitCode, MainError> {
    let mut config = args.config()?;
    if let Some(addr) = &args.metrics {
        let live = Arc::new(postcopy::metrics::Live::default());
        config.live = Some(live.clone());
        super::serve_metrics(
            "handler",
            addr,
            Arc::new(move || postcopy::metrics::migration_families("vmm", &live.now())),
        )?;
    }
    let failed = Arc::new(AtomicBool::new(false));
    let stop = Stop::default();
    super::signals::remove_on_exit(config.socket.clone());
    let s = stop.clone();
    super::signals::on_stop(move |n, signal| {
        if n == 1 {
            postcopy::warn!(
                "handler",
                "{}: taking no new VMM; exiting once the restores in flight \
                 end (signal again to stop them: their VMs lose their memory; a third time to \
                 exit at once)",
                signal.as_str()
            );
            s.drain.store(true, Ordering::Release);
        } else {
            postcopy::warn!(
                "handler",
                "{}: stopping the restores in flight",
                signal.as_str()
            );
            s.now.store(true, Ordering::Release);
        }
    });
    let f = failed.clone();
    let cut = stop.now.clone();
    postcopy::handler::serve(&config, stop, move |report| print_vmm_report(report, &f))?;
    // A failed restore fails `--once`, and a stop that cut restores short fails any run.
    let cut = cut.load(Ordering::Acquire);
    Ok(if (args.once || cut) && failed.load(Ordering::Acquire) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// One JSON line on stdout per VMM served; a failed one (or one stopped short) sets `failed`.
fn print_vmm_report(report: &VmmReport, failed: &AtomicBool) {
    if report.error.is_some() || report.outcome == Outcome::Stopped {
        failed.store(true, Ordering::Release);
    }
    match serde_json::to_string(report) {
        Ok(line) => {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
        Err(e) => postcopy::error!("handler", "cannot print a VMM's report: {e}"),
    }
}
