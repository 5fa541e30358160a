//! `postcopy serve`: a source page server of an image file, a synthetic image, or a live
//! source (the synthetic image in memory, written by a workload until switchover).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use postcopy::image::{FileImage, Image, Synthetic};
use postcopy::layout::Layout;
use postcopy::link::auth::Key;
use postcopy::link::tls::TlsServer;
use postcopy::source::{SourceConfig, SourceServer, WorkingSetConfig};

use super::args::{AuthArgs, PrecopyArgs, TlsSourceArgs};
use super::parse::{
    parse_host_port, parse_page_size, parse_size, MAX_DIRTY_PAGES_PER_S, MAX_PREFETCH_PAGES,
    MAX_TIMEOUT_S, MAX_URGENT_DELAY_MS,
};
use super::MainError;

/// The arguments of `serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port; the address is printed).
    #[arg(long, default_value = "0.0.0.0:7070", value_name = "HOST:PORT", value_parser = parse_host_port)]
    listen: String,
    /// Serve this raw memory file (e.g. a VM snapshot's memory file).
    #[arg(
        long,
        conflicts_with = "synthetic",
        required_unless_present = "synthetic"
    )]
    image: Option<PathBuf>,
    /// Serve a synthetic image of this size (e.g. 1G, 512M): the demo's image.
    #[arg(long, value_parser = parse_size)]
    synthetic: Option<u64>,
    /// Page size in bytes, or with a unit as --synthetic (e.g. 4096, 4K, 2M for hugetlbfs).
    #[arg(long, default_value = "4096", value_parser = parse_page_size)]
    page_size: u64,
    /// Seed of the synthetic image.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Share of zero pages in the synthetic image, percent.
    #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u8).range(0..=100))]
    zero_percent: u8,
    /// Exit after the first session ends (non-zero if it did not complete).
    #[arg(long)]
    once: bool,
    /// Most pages sent ahead of a sequential reader's fault, with the reply (0: none).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(0..=MAX_PREFETCH_PAGES))]
    prefetch_max: u64,
    /// Test hook: delay each urgent reply by this many milliseconds.
    #[arg(
        long,
        default_value_t = 0,
        hide = true,
        value_parser = clap::value_parser!(u64).range(0..=MAX_URGENT_DELAY_MS)
    )]
    debug_urgent_delay_ms: u64,
    /// Live source (with --synthetic): hold the image in memory and run a workload that
    /// writes it at --dirty-rate until the switchover of the one migration served (serve then
    /// exits once that session ends; a migration given up in precopy leaves the workload
    /// running and another may start); dirty pages are tracked with userfaultfd
    /// write-protect + PAGEMAP_SCAN (Linux 6.7+).
    #[arg(long, requires = "synthetic")]
    live: bool,
    /// Live source: pages per second its workload writes (random pages).
    #[arg(
        long,
        default_value_t = 0,
        requires = "live",
        value_parser = clap::value_parser!(u64).range(0..=MAX_DIRTY_PAGES_PER_S)
    )]
    dirty_rate: u64,
    #[command(flatten)]
    precopy: PrecopyArgs,
    #[command(flatten)]
    auth: AuthArgs,
    /// Seconds a session whose connection broke waits for its destination to reconnect.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(0..=MAX_TIMEOUT_S))]
    recovery_timeout: u64,
    /// Seconds without a byte, not even a heartbeat, after which a connection is taken as dead
    /// and replaced (the detection bound of a silent link; heartbeats go out at a quarter of it).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_S))]
    link_timeout: u64,
    #[command(flatten)]
    tls: TlsSourceArgs,
    /// Where the image's working set is kept: the pages restores ask for first, learned from
    /// their faults and pushed first in every later session's stream. Default: beside the
    /// image file, IMAGE.working-set (a synthetic image has none unless this is given).
    #[arg(long, value_name = "PATH")]
    working_set: Option<PathBuf>,
    /// Neither learn a working set nor push one.
    #[arg(long, conflicts_with_all = ["working_set", "working_set_reset", "working_set_record_only"])]
    no_working_set: bool,
    /// Forget the learned working set: start empty (the file is replaced at the next save).
    #[arg(long)]
    working_set_reset: bool,
    /// Serve live metrics at http://HOST:PORT/metrics (Prometheus text format).
    #[arg(long, value_name = "HOST:PORT", value_parser = super::parse::parse_host_port)]
    metrics: Option<String>,
    /// Learn the working set but do not push it (to record a reference restore first).
    #[arg(long)]
    working_set_record_only: bool,
}

impl ServeArgs {
    /// What to do with the image's working set (none for a live source: its memory changes).
    fn working_set(&self) -> Option<WorkingSetConfig> {
        if self.no_working_set || self.live {
            return None;
        }
        let path = self.working_set.clone().or_else(|| {
            self.image.as_ref().map(|i| {
                let mut p = i.as_os_str().to_owned();
                p.push(".working-set");
                PathBuf::from(p)
            })
        })?;
        Some(WorkingSetConfig {
            path: Some(path),
            replay: !self.working_set_record_only,
            reset: self.working_set_reset,
        })
    }

    /// The image file, or the synthetic image.
    fn image(&self) -> Result<Arc<dyn Image>, MainError> {
        match (&self.image, self.synthetic) {
            (Some(path), _) => Ok(Arc::new(FileImage::open(path, self.page_size)?)),
            (None, Some(size_bytes)) => {
                let layout = Layout::single("ram", size_bytes, self.page_size)?;
                Ok(Arc::new(Synthetic::new(
                    layout,
                    self.seed,
                    self.zero_percent,
                )))
            }
            (None, None) => Err(MainError::NoImage),
        }
    }

    fn config(&self, key: Option<Key>, tls: Option<TlsServer>) -> SourceConfig {
        SourceConfig {
            once: self.once,
            prefetch_max: self.prefetch_max,
            urgent_delay: Duration::from_millis(self.debug_urgent_delay_ms),
            verbose: postcopy::log::enabled(postcopy::log::Level::Info),
            precopy: self.precopy.limits(),
            key,
            recovery_timeout: Duration::from_secs(self.recovery_timeout),
            link_timeout: Duration::from_secs(self.link_timeout),
            tls,
            working_set: self.working_set(),
            ..SourceConfig::default()
        }
    }

    /// The server, bound: of the image, or of the live source made from it.
    fn bind(&self, config: SourceConfig) -> Result<SourceServer, MainError> {
        let image = self.image()?;
        if !self.live {
            return Ok(SourceServer::bind(&self.listen, image, config)?);
        }
        let (live, parts) = postcopy::demo::live_source(
            image.layout(),
            self.seed,
            self.zero_percent,
            self.dirty_rate,
        )?;
        Ok(SourceServer::bind_live(&self.listen, live, parts, config)?)
    }
}

/// Serves until stopped (with `--once`: until the first session ends; `--live`: until a session
/// that switched over ends; failure if none completed). The first line on stdout is
/// `listening on ADDR`.
pub fn cmd_serve(args: ServeArgs) -> Result<ExitCode, MainError> {
    let key = args.auth.key("serve")?;
    let tls = args.tls.server()?;
    let server = args.bind(args.config(key, tls))?;
    if let Some(addr) = &args.metrics {
        let view = server.sessions_view();
        super::serve_metrics(
            "serve",
            addr,
            Arc::new(move || postcopy::metrics::source_families(&view)),
        )?;
    }
    let handle = server.stop_handle();
    super::signals::on_stop(move |n, signal| {
        if n == 1 {
            postcopy::warn!(
                "serve",
                "{}: taking no new migration; exiting once those in flight end \
                 (signal again to stop them, a third time to exit at once)",
                signal.as_str()
            );
            handle.drain();
        } else {
            postcopy::warn!(
                "serve",
                "{}: stopping the migrations in flight",
                signal.as_str()
            );
            handle.stop();
        }
    });
    println!("listening on {}", server.local_addr());
    let _ = std::io::stdout().flush();
    let sessions = server.run()?;
    if (args.once || args.live) && !sessions.iter().any(|s| s.complete) {
        return Err(MainError::SessionIncomplete);
    }
    Ok(ExitCode::SUCCESS)
}
