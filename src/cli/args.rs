//! Arguments more than one subcommand takes: the destination side of a run, TLS,
//! authentication, the precopy limits.

use std::path::PathBuf;
use std::time::Duration;

use postcopy::demo::DemoConfig;
use postcopy::dest::{Memory, ZeroFill};
use postcopy::link::auth::Key;
use postcopy::link::tls::{TlsClient, TlsServer};
use postcopy::source::PrecopyLimits;
use postcopy::workload::Pattern;

use super::parse::{
    parse_image_size, parse_seconds, usize_in, MAX_PRECOPY_ROUNDS, MAX_TIMEOUT_S, MAX_WORKERS,
};
use super::MainError;

/// The destination side of a run: workload and engine options shared by `demo` and `bench`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Image size (e.g. 1G, 4G, 256M).
    #[arg(long, default_value = "1G", value_parser = parse_image_size)]
    pub size: u64,
    /// The kind of guest memory the destination places into: private 4 KiB pages (anon), the
    /// same wanting THP (thp), a shmem memfd with MINOR faults and one copy fewer (memfd),
    /// 2 MiB hugetlbfs pages (hugetlb; needs vm.nr_hugepages), or a hugetlbfs memfd
    /// (hugetlb-shared). The local source serves pages of its size.
    #[arg(long, value_enum, default_value_t = Memory::Anon)]
    pub memory: Memory,
    /// How the workload touches pages.
    #[arg(long, value_enum, default_value_t = Pattern::Random)]
    pub pattern: Pattern,
    /// Engine workers (default: one per CPU).
    #[arg(long, value_parser = usize_in(1, MAX_WORKERS))]
    pub workers: Option<usize>,
    /// Do not pin workers to CPUs.
    #[arg(long)]
    pub no_pin: bool,
    /// Seed of the image and the pattern.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Engine: ask the source for its zero-page map and place zero pages at start-up.
    #[arg(long)]
    pub zero_map: bool,
    /// Engine: how zero pages are placed.
    #[arg(long, value_enum, default_value_t = ZeroFill::Zeropage)]
    pub zero_fill: ZeroFill,
    /// Engine: most bulk streams placing at once (0: one per worker).
    #[arg(long, default_value_t = 0, value_parser = usize_in(0, MAX_WORKERS))]
    pub streams: usize,
    /// Engine: a receiver-driven stream, steered so that 99% of faults are served (event read
    /// to page placed) within this many microseconds; 0: the source pushes the stream.
    #[arg(long, default_value_t = 0, value_name = "MICROS", value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    pub fault_latency_target: u64,
    /// Seconds a broken connection may take to come back (reconnect with backoff, resume)
    /// before the migration is given up; 0: fail at once.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(0..=MAX_TIMEOUT_S))]
    pub recovery_timeout: u64,
    /// Seconds without a byte, not even a heartbeat, after which a connection is taken as dead
    /// and replaced (the detection bound of a silent link; heartbeats go out at a quarter of it).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_S))]
    pub link_timeout: u64,
}

impl RunArgs {
    /// The demo's configuration of these arguments: pure postcopy of a static image, no key, no
    /// TLS (`demo` sets those).
    pub fn demo_config(&self, zero_percent: u8, threads: usize) -> Result<DemoConfig, MainError> {
        Ok(DemoConfig {
            size_bytes: self.size,
            page_size: self.memory.page_size(),
            memory: self.memory,
            pattern: self.pattern,
            threads,
            workers: self.workers.unwrap_or_else(postcopy::sys::online_cpus),
            pin: !self.no_pin,
            stream: true,
            zero_percent,
            seed: self.seed,
            source: None,
            exe: std::env::current_exe().map_err(MainError::CurrentExe)?,
            quiet: !postcopy::log::enabled(postcopy::log::Level::Info),
            warmup: true,
            zero_map: self.zero_map,
            zero_fill: self.zero_fill,
            max_streams: self.streams,
            fault_latency_target: (self.fault_latency_target > 0)
                .then(|| Duration::from_micros(self.fault_latency_target)),
            live: false,
            precopy: false,
            dirty_rate: 0,
            precopy_limits: PrecopyLimits::default(),
            key: postcopy::demo::DemoKey::None,
            recovery_timeout: Duration::from_secs(self.recovery_timeout),
            link_timeout: Duration::from_secs(self.link_timeout),
            tls_files: None,
            tls_client: None,
            gauges: Default::default(),
        })
    }
}

/// TLS 1.3 (optional), a source's side: its identity.
#[derive(clap::Args, Debug, Default)]
pub struct TlsSourceArgs {
    /// TLS: the source's certificate chain (PEM; see the README's recipe); it serves TLS with it.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS: the private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl TlsSourceArgs {
    /// The certificate and key files, when both are given.
    pub fn files(&self) -> Option<(PathBuf, PathBuf)> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            _ => None,
        }
    }

    /// A source's TLS, from `--tls-cert` and `--tls-key`.
    pub fn server(&self) -> Result<Option<TlsServer>, MainError> {
        match self.files() {
            Some((c, k)) => Ok(Some(TlsServer::from_files(&c, &k)?)),
            None => Ok(None),
        }
    }
}

/// TLS 1.3 (optional), a destination's side: whom it trusts.
#[derive(clap::Args, Debug, Default)]
pub struct TlsDestArgs {
    /// TLS: connect with TLS, trusting source certificates signed by this CA (PEM; a
    /// self-signed source certificate is its own CA).
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// TLS: the name the source's certificate must carry (subjectAltName).
    #[arg(long, default_value = "postcopy", requires = "tls_ca")]
    pub tls_name: String,
}

impl TlsDestArgs {
    /// A destination's TLS, from `--tls-ca` and `--tls-name`.
    pub fn client(&self) -> Result<Option<TlsClient>, MainError> {
        match &self.tls_ca {
            Some(ca) => Ok(Some(TlsClient::from_ca(ca, &self.tls_name)?)),
            None => Ok(None),
        }
    }
}

/// Authentication: on unless `--insecure` is given.
#[derive(clap::Args, Debug)]
pub struct AuthArgs {
    /// Pre-shared key file (the same on both hosts; at least 16 random bytes, e.g. `head -c 32
    /// /dev/urandom > key`): every connection proves it holds the key, every frame is sealed (AES-GCM: authenticated, pages encrypted).
    #[arg(long, conflicts_with = "insecure")]
    pub key_file: Option<PathBuf>,
    /// Run without authentication (a trusted network only: anyone who can connect can read
    /// and place memory).
    #[arg(long)]
    pub insecure: bool,
}

impl AuthArgs {
    /// The key, `None` with `--insecure`, or an error saying what `command` needs.
    pub fn key(&self, command: &'static str) -> Result<Option<Key>, MainError> {
        match (&self.key_file, self.insecure) {
            (Some(path), _) => Ok(Some(Key::from_file(path)?)),
            (None, true) => Ok(None),
            (None, false) => Err(MainError::KeyRequired { command }),
        }
    }
}

/// When precopy switches over to postcopy (source side).
#[derive(clap::Args, Debug)]
pub struct PrecopyArgs {
    /// Precopy: most rounds, the full pass included.
    #[arg(
        long,
        default_value_t = PrecopyLimits::default().max_rounds,
        value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_PRECOPY_ROUNDS))
    )]
    pub precopy_max_rounds: u32,
    /// Precopy: switch over once at most this many pages are dirty.
    #[arg(
        long,
        default_value_t = PrecopyLimits::default().max_dirty_pages,
        value_parser = clap::value_parser!(u64)
    )]
    pub precopy_max_dirty: u64,
    /// Precopy: switch over after this many seconds.
    #[arg(
        long,
        default_value_t = PrecopyLimits::default().max_duration.as_secs_f64(),
        value_parser = parse_seconds
    )]
    pub precopy_max_seconds: f64,
}

impl PrecopyArgs {
    /// The limits (clap has checked the ranges).
    pub fn limits(&self) -> PrecopyLimits {
        PrecopyLimits {
            max_rounds: self.precopy_max_rounds,
            max_dirty_pages: self.precopy_max_dirty,
            max_duration: Duration::from_secs_f64(self.precopy_max_seconds),
        }
    }
}

/// Precopy on or off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    /// On.
    On,
    /// Off.
    Off,
}
