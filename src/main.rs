//! `postcopy`: the command-line tool.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use postcopy::demo::{self, DemoConfig};
use postcopy::dest::ZeroFill;
use postcopy::image::{FileImage, Image, Synthetic};
use postcopy::layout::Layout;
use postcopy::source::{PrecopyLimits, SourceConfig, SourceServer};
use postcopy::workload::Pattern;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A page server for postcopy live migration of memory (userfaultfd + io_uring).
#[derive(Parser, Debug)]
#[command(name = "postcopy", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

/// The destination side of a run: workload and engine options shared by `demo` and `bench`.
#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Image size (e.g. 1G, 4G, 256M).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    size: u64,
    /// How the workload touches pages.
    #[arg(long, value_enum, default_value_t = Pattern::Random)]
    pattern: Pattern,
    /// Workload threads on the destination.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Engine workers (default: one per CPU).
    #[arg(long)]
    workers: Option<usize>,
    /// Do not pin workers to CPUs.
    #[arg(long)]
    no_pin: bool,
    /// Seed of the image and the pattern.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Engine: ask the source for its zero-page map and place zero pages at start-up.
    #[arg(long)]
    zero_map: bool,
    /// Engine: how zero pages are placed.
    #[arg(long, value_enum, default_value_t = ZeroFill::Zeropage)]
    zero_fill: ZeroFill,
    /// Engine: most bulk streams placing at once (0: one per worker).
    #[arg(long, default_value_t = 0)]
    streams: usize,
    /// No progress output.
    #[arg(long, short)]
    quiet: bool,
    /// Seconds a broken connection may take to come back (reconnect with backoff, resume)
    /// before the migration is given up; 0: fail at once.
    #[arg(long, default_value_t = 60)]
    recovery_timeout: u64,
}

impl RunArgs {
    fn demo_config(&self, zero_percent: u8) -> Result<DemoConfig, std::io::Error> {
        Ok(DemoConfig {
            size_bytes: self.size,
            page_size: 4096,
            pattern: self.pattern,
            threads: self.threads,
            workers: self.workers.unwrap_or_else(postcopy::sys::online_cpus),
            pin: !self.no_pin,
            stream: true,
            zero_percent,
            seed: self.seed,
            source: None,
            exe: std::env::current_exe()?,
            quiet: self.quiet,
            warmup: true,
            zero_map: self.zero_map,
            zero_fill: self.zero_fill,
            max_streams: self.streams,
            live: false,
            precopy: false,
            dirty_rate: 0,
            precopy_limits: PrecopyLimits::default(),
            key_file: None,
            recovery_timeout: Duration::from_secs(self.recovery_timeout),
            tls_files: None,
            tls_client: None,
        })
    }
}

/// TLS 1.3 (optional): a source's identity, a destination's trust.
#[derive(clap::Args, Debug, Default)]
struct TlsArgs {
    /// TLS: this side's certificate chain (PEM); a source serves TLS with it.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS: the private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// TLS: trust source certificates signed by this CA (PEM); a destination connects with TLS.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// TLS: the name the source's certificate must carry.
    #[arg(long, default_value = "postcopy")]
    tls_name: String,
}

impl TlsArgs {
    fn server(&self) -> Result<Option<postcopy::tls::TlsServer>, String> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => postcopy::tls::TlsServer::from_files(c, k)
                .map(Some)
                .map_err(|e| e.to_string()),
            _ => Ok(None),
        }
    }
    fn client(&self) -> Result<Option<postcopy::tls::TlsClient>, String> {
        match &self.tls_ca {
            Some(ca) => postcopy::tls::TlsClient::from_ca(ca, &self.tls_name)
                .map(Some)
                .map_err(|e| e.to_string()),
            None => Ok(None),
        }
    }
}

/// Authentication: on unless `--insecure` is given.
#[derive(clap::Args, Debug)]
struct AuthArgs {
    /// Pre-shared key file (the same on both hosts; at least 16 random bytes, e.g. `head -c 32
    /// /dev/urandom > key`): every connection proves it holds the key, every frame is MACed.
    #[arg(long, conflicts_with = "insecure")]
    key_file: Option<PathBuf>,
    /// Run without authentication (a trusted network only: anyone who can connect can read
    /// and place memory).
    #[arg(long)]
    insecure: bool,
}

impl AuthArgs {
    /// The key, `None` with `--insecure`, or an error saying what to pass.
    fn key(&self, what: &str) -> Result<Option<postcopy::auth::Key>, String> {
        match (&self.key_file, self.insecure) {
            (Some(path), _) => postcopy::auth::Key::from_file(path)
                .map(Some)
                .map_err(|e| e.to_string()),
            (None, true) => Ok(None),
            (None, false) => Err(format!(
                "{what} authenticates its peers: pass --key-file FILE (the same file on both hosts; create one with `head -c 32 /dev/urandom > FILE`), or --insecure on a trusted network"
            )),
        }
    }
}

/// When precopy switches over to postcopy (source side).
#[derive(clap::Args, Debug)]
struct PrecopyArgs {
    /// Precopy: most rounds, the full pass included.
    #[arg(long, default_value_t = PrecopyLimits::default().max_rounds)]
    precopy_max_rounds: u32,
    /// Precopy: switch over once at most this many pages are dirty.
    #[arg(long, default_value_t = PrecopyLimits::default().max_dirty_pages)]
    precopy_max_dirty: u64,
    /// Precopy: switch over after this many seconds.
    #[arg(long, default_value_t = PrecopyLimits::default().max_duration.as_secs_f64())]
    precopy_max_seconds: f64,
}

impl PrecopyArgs {
    fn limits(&self) -> PrecopyLimits {
        PrecopyLimits {
            max_rounds: self.precopy_max_rounds.max(1),
            max_dirty_pages: self.precopy_max_dirty,
            max_duration: Duration::from_secs_f64(self.precopy_max_seconds.max(0.0)),
        }
    }
}

/// Precopy on or off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum OnOff {
    /// On.
    On,
    /// Off.
    Off,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Check whether this host can do postcopy (userfaultfd, io_uring, page sizes, THP, mlock).
    Probe {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run a source page server: answer page requests first, stream the rest.
    Serve {
        /// Address to listen on (port 0 picks a free port; the address is printed).
        #[arg(long, default_value = "0.0.0.0:7070")]
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
        /// Page size in bytes.
        #[arg(long, default_value_t = 4096)]
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
        #[arg(long, default_value_t = 64)]
        prefetch_max: u64,
        /// Test hook: delay each urgent reply by this many milliseconds.
        #[arg(long, default_value_t = 0, hide = true)]
        debug_urgent_delay_ms: u64,
        /// No per-session log lines.
        #[arg(long, short)]
        quiet: bool,
        /// Live source (with --synthetic): hold the image in memory and run a workload that
        /// writes it at --dirty-rate until the switchover of the one migration served; dirty
        /// pages are tracked with userfaultfd write-protect + PAGEMAP_SCAN (Linux 6.7+).
        #[arg(long, requires = "synthetic")]
        live: bool,
        /// Live source: pages per second its workload writes (random pages).
        #[arg(long, default_value_t = 0, requires = "live")]
        dirty_rate: u64,
        #[command(flatten)]
        precopy: PrecopyArgs,
        #[command(flatten)]
        auth: AuthArgs,
        /// Seconds a session whose connection broke waits for its destination to reconnect.
        #[arg(long, default_value_t = 60)]
        recovery_timeout: u64,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// The embedded default: migrate a synthetic image in postcopy from a source process to
    /// this one, with a workload that verifies every page, and print a report.
    Demo {
        #[command(flatten)]
        run: RunArgs,
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
        #[arg(long, default_value_t = 10_000)]
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
    },
    /// Serve VMMs that hand over their userfaultfd over a Unix socket (Firecracker's `Uffd`
    /// snapshot memory backend, JSON of v1.1 to v1.16), with pages from a remote `postcopy
    /// serve --image MEMORY_FILE`. One JSON line per VMM on stdout.
    Handler {
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
        /// Seconds the source may stay silent while pages are awaited.
        #[arg(long, default_value_t = 30)]
        stall_timeout: u64,
        /// No per-VMM lines on stderr.
        #[arg(long, short)]
        quiet: bool,
        #[command(flatten)]
        auth: AuthArgs,
        /// Seconds a broken source connection may take to come back before a VMM's restore is
        /// given up.
        #[arg(long, default_value_t = 60)]
        recovery_timeout: u64,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Measure the engine against a simple baseline handler in one run: time to all pages,
    /// stream-only throughput, fault latency with and without the stream; medians and ratios.
    Bench {
        #[command(flatten)]
        run: RunArgs,
        /// Image size of the demand-only runs (every page by a fault).
        #[arg(long, default_value = "256M", value_parser = parse_size)]
        demand_size: u64,
        /// Runs per handler and mode (alternating).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Share of zero pages in the image, percent.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
        zero_percent: u8,
        /// Write the JSON report here.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Print the JSON report instead of the table.
        #[arg(long)]
        json: bool,
        /// Exit non-zero if ours is worse than the baseline on these metrics (comma-separated:
        /// `time` = time to all pages present, `p99` = p99 fault latency with the stream on).
        #[arg(long, value_delimiter = ',', value_parser = ["time", "p99"])]
        check: Vec<String>,
    },
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = s[i..].to_ascii_uppercase();
            let mult: u64 = match unit.trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => return Err(format!("unknown size unit in {s:?} (use K, M, G, T)")),
            };
            (&s[..i], mult)
        }
        None => (s, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 1G, 512M, 4096)"))?;
    n.checked_mul(mult)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("size {s:?} is zero or too large"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Probe { json } => {
            let r = postcopy::probe::run();
            if json {
                println!("{}", r.to_json());
            } else {
                print!("{}", r.render_table());
            }
            if r.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Cmd::Serve {
            listen,
            image,
            synthetic,
            page_size,
            seed,
            zero_percent,
            once,
            prefetch_max,
            debug_urgent_delay_ms,
            quiet,
            live,
            dirty_rate,
            precopy,
            auth,
            recovery_timeout,
            tls,
        } => {
            let key = match auth.key("postcopy serve") {
                Ok(k) => k,
                Err(e) => return fail(&e),
            };
            let tls = match tls.server() {
                Ok(t) => t,
                Err(e) => return fail(&e),
            };
            let img: Arc<dyn Image> = match (image, synthetic) {
                (Some(path), _) => match FileImage::open(&path, page_size) {
                    Ok(i) => Arc::new(i),
                    Err(e) => return fail(&e),
                },
                (None, Some(size)) => match Layout::single("ram", size, page_size) {
                    Ok(l) => Arc::new(Synthetic::new(l, seed, zero_percent)),
                    Err(e) => return fail(&e),
                },
                (None, None) => unreachable!("clap requires --image or --synthetic"),
            };
            let config = SourceConfig {
                // A live source's memory migrates once.
                once: once || live,
                prefetch_max,
                urgent_delay: Duration::from_millis(debug_urgent_delay_ms),
                verbose: !quiet,
                precopy: precopy.limits(),
                key,
                recovery_timeout: Duration::from_secs(recovery_timeout),
                tls,
                ..SourceConfig::default()
            };
            let bound = if live {
                match demo::live_source(img.layout(), seed, zero_percent, dirty_rate) {
                    Ok((image, parts)) => SourceServer::bind_live(&listen, image, parts, config),
                    Err(e) => return fail(&e),
                }
            } else {
                SourceServer::bind(&listen, img, config)
            };
            let server = match bound {
                Ok(s) => s,
                Err(e) => return fail(&e),
            };
            println!("listening on {}", server.local_addr());
            let _ = std::io::stdout().flush();
            match server.run() {
                Ok(sessions) => {
                    if (once || live) && !sessions.iter().any(|s| s.complete) {
                        eprintln!("postcopy serve: the session did not complete");
                        return ExitCode::FAILURE;
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        Cmd::Demo {
            run,
            no_stream,
            zero_percent,
            source,
            report,
            no_warmup,
            precopy,
            dirty_rate,
            precopy_limits,
            key_file,
            insecure,
            tls,
        } => {
            let mut cfg = match run.demo_config(zero_percent) {
                Ok(c) => c,
                Err(e) => return fail(&e),
            };
            cfg.stream = !no_stream;
            cfg.source = source;
            cfg.warmup = !no_warmup;
            cfg.live = true;
            cfg.precopy = precopy == OnOff::On;
            cfg.dirty_rate = dirty_rate;
            cfg.precopy_limits = precopy_limits.limits();
            cfg.tls_files = match (tls.tls_cert.clone(), tls.tls_key.clone()) {
                (Some(c), Some(k)) => Some((c, k)),
                _ => None,
            };
            cfg.tls_client = match tls.client() {
                Ok(t) => t,
                Err(e) => return fail(&e),
            };
            if cfg.tls_files.is_some() != cfg.tls_client.is_some() && cfg.source.is_none() {
                return fail(&"the local demo needs both the source's --tls-cert/--tls-key and the destination's --tls-ca");
            }
            // Authenticated by default, with a throwaway key unless one is given.
            let one_run_key = match (&key_file, insecure) {
                (None, false) => match demo::OneRunKey::create() {
                    Ok(k) => Some(k),
                    Err(e) => return fail(&e),
                },
                _ => None,
            };
            cfg.key_file =
                key_file.or_else(|| one_run_key.as_ref().map(|k| k.path().to_path_buf()));
            let result = demo::run(&cfg);
            drop(one_run_key);
            let r = match result {
                Ok(r) => r,
                Err(e) => return fail(&e),
            };
            print!("{}", r.render());
            if let Some(path) = report {
                if let Err(e) = std::fs::write(&path, r.to_json()) {
                    eprintln!("postcopy: cannot write report {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            }
            if r.verified {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Cmd::Handler {
            socket,
            source,
            once,
            no_stream,
            stall_timeout,
            quiet,
            auth,
            recovery_timeout,
            tls,
        } => {
            let key = match auth.key("postcopy handler") {
                Ok(k) => k,
                Err(e) => return fail(&e),
            };
            let tls = match tls.client() {
                Ok(t) => t,
                Err(e) => return fail(&e),
            };
            let config = postcopy::handler::HandlerConfig {
                key,
                tls,
                recovery_timeout: Duration::from_secs(recovery_timeout),
                socket,
                source,
                once,
                stream: !no_stream,
                stall_timeout: Duration::from_secs(stall_timeout.max(1)),
                verbose: !quiet,
                ..Default::default()
            };
            let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let f = failed.clone();
            eprintln!(
                "postcopy handler: listening on {} (source {})",
                config.socket.display(),
                config.source
            );
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let r = postcopy::handler::serve(&config, stop, move |report| {
                if report.error.is_some() {
                    f.store(true, std::sync::atomic::Ordering::Release);
                }
                let line = serde_json::to_string(report).expect("report serialises");
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            });
            match r {
                Err(e) => fail(&e),
                Ok(()) if once && failed.load(std::sync::atomic::Ordering::Acquire) => {
                    ExitCode::FAILURE
                }
                Ok(()) => ExitCode::SUCCESS,
            }
        }
        Cmd::Bench {
            run,
            demand_size,
            runs,
            zero_percent,
            report,
            json,
            check,
        } => {
            let cfg = match run.demo_config(zero_percent) {
                Ok(demo) => postcopy::bench::BenchConfig {
                    demo,
                    demand_size_bytes: demand_size,
                    runs: runs.max(1),
                },
                Err(e) => return fail(&e),
            };
            let r = match postcopy::bench::run(&cfg) {
                Ok(r) => r,
                Err(e) => return fail(&e),
            };
            let json_text = r.to_json();
            if json {
                println!("{json_text}");
            } else {
                print!("{}", r.render());
            }
            if let Some(path) = report {
                if let Err(e) = std::fs::write(&path, &json_text) {
                    eprintln!("postcopy: cannot write report {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            }
            if !r.all_verified {
                eprintln!("postcopy bench: a run did not verify");
                return ExitCode::FAILURE;
            }
            if !check.is_empty() {
                if let Err(why) = r.gate(&check) {
                    eprintln!("postcopy bench --check: ours is worse than the baseline: {why}");
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
    }
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("postcopy: error: {e}");
    ExitCode::FAILURE
}
