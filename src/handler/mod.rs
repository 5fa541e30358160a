//! `postcopy handler`: a page server for VMMs that hand over their userfaultfd (the
//! Firecracker `Uffd` memory backend protocol, [`crate::handover`]), with the pages coming
//! from a remote `postcopy serve` instead of a local file.
//!
//! Per VMM connection (each on its own thread; several VMMs may restore from one source at
//! once, each in its own session): receive the regions and the userfaultfd, take a source
//! session prepared before the VMM came (`pool`; or connect now if none is ready), map the
//! regions onto the source's image by `offset` ([`DestRam::foreign`]), and serve through the
//! engine (one worker: an urgent half for faults and REMOVE events, a bulk half for the
//! background stream, which joins once released) until every page is placed and then until the
//! VMM exits (its socket closes): pages it removes later are served as zero pages. One line of
//! JSON per VMM on stdout ([`VmmReport`]), on every exit path (`report`).

use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::dest::gauges::{Gauges, Phase};
use crate::dest::{self, DestRam, Engine, EngineConfig, ZeroFill};
use crate::handover::{self, HandoverError};
use crate::sys::uffd::Uffd;
use crate::timeline::{Progress, Sampler};

mod pool;
mod report;

use pool::Pool;

pub use report::{Outcome, VmmReport};

/// Errors of the handler server itself (a VMM's failure is in its [`VmmReport`]).
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// The socket path could not be bound.
    #[error("cannot listen on {}: {source}{}", path.display(), bind_hint(source))]
    Bind {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Accepting failed.
    #[error("accept on {path}: {source}")]
    Accept {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// Handler settings.
#[derive(Clone, Debug)]
pub struct HandlerConfig {
    /// The Unix socket VMMs connect to.
    pub socket: PathBuf,
    /// The source, `HOST:PORT`.
    pub source: String,
    /// Serve one VMM, then return.
    pub once: bool,
    /// Run the background stream (off: every page by a fault).
    pub stream: bool,
    /// How long a VMM has to send its regions.
    pub handshake_timeout: Duration,
    /// The engine's connect timeout.
    pub connect_timeout: Duration,
    /// A source connection silent this long (not even a heartbeat) is dead and replaced.
    pub link_timeout: Duration,
    /// Per-VMM lines on stderr.
    pub verbose: bool,
    /// The pre-shared key for the source ([`crate::link::auth`]); `None`: no authentication.
    pub key: Option<crate::link::auth::Key>,
    /// How long a broken source connection may take to come back.
    pub recovery_timeout: Duration,
    /// TLS to the source.
    pub tls: Option<crate::link::tls::TlsClient>,
    /// Source sessions kept prepared (connected, authenticated) before any VMM connects, so
    /// that a handover's first fault waits for nothing else; 0: each VMM connects on arrival.
    pub prepared_sessions: usize,
    /// Where the VMMs being served are shown (`--metrics`), if anywhere.
    pub live: Option<Arc<crate::metrics::Live>>,
}

impl Default for HandlerConfig {
    fn default() -> Self {
        HandlerConfig {
            socket: PathBuf::from("/run/postcopy.sock"),
            source: "127.0.0.1:7070".into(),
            once: false,
            stream: true,
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            link_timeout: crate::link::liveness::DEFAULT_LINK_TIMEOUT,
            verbose: true,
            key: None,
            recovery_timeout: Duration::from_secs(60),
            tls: None,
            prepared_sessions: 2,
            live: None,
        }
    }
}

/// How a running [`serve`] is asked to end.
#[derive(Clone, Debug, Default)]
pub struct Stop {
    /// Take no new VMM, and return once the restores in flight have ended (a restore cut
    /// short loses its VM).
    pub drain: Arc<AtomicBool>,
    /// Stop the restores in flight too, now.
    pub now: Arc<AtomicBool>,
}

/// Serves VMMs on `config.socket` until `stop` (or, with `once`, after the first VMM).
/// Each VMM's report is passed to `on_report` as it ends.
pub fn serve(
    config: &HandlerConfig,
    control: Stop,
    on_report: impl Fn(&VmmReport) + Send + Sync + 'static,
) -> Result<(), HandlerError> {
    let listener = bind(&config.socket)?;
    listener
        .set_nonblocking(true)
        .map_err(|source| HandlerError::Bind {
            path: config.socket.clone(),
            source,
        })?;
    if config.verbose {
        crate::info!(
            "handler",
            "listening on {} (source {})",
            config.socket.display(),
            config.source
        );
    }
    let on_report = Arc::new(on_report);
    let pool = Arc::new(Pool::start(
        pool_config(config),
        config.prepared_sessions,
        config.verbose,
    ));
    let active = Arc::new(AtomicUsize::new(0));
    let mut served = 0usize;
    let stop = control.now;
    let result = loop {
        if stop.load(Ordering::Acquire)
            || control.drain.load(Ordering::Acquire)
            || (config.once && served > 0 && active.load(Ordering::Acquire) == 0)
        {
            break Ok(());
        }
        match listener.accept() {
            Ok((sock, _)) => {
                served += 1;
                active.fetch_add(1, Ordering::AcqRel);
                let (config, on_report, done, stop, pool) = (
                    config.clone(),
                    on_report.clone(),
                    active.clone(),
                    stop.clone(),
                    pool.clone(),
                );
                let spawned = std::thread::Builder::new()
                    .name(format!("vmm-{served}"))
                    .spawn(move || {
                        let r = serve_vmm_from(&config, sock, &stop, Some(&pool));
                        on_report(&r);
                        done.fetch_sub(1, Ordering::AcqRel);
                    });
                if spawned.is_err() {
                    active.fetch_sub(1, Ordering::AcqRel);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                wait_readable(&listener, Duration::from_millis(50));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                break Err(HandlerError::Accept {
                    path: config.socket.clone(),
                    source,
                })
            }
        }
    };
    // Let the VMMs being served finish (they end when their VMM exits or `stop` is set).
    while active.load(Ordering::Acquire) > 0 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = std::fs::remove_file(&config.socket);
    result
}

/// What to do about a socket path that cannot be bound.
fn bind_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::NotFound => {
            " (its directory does not exist: create it, or pick another path)"
        }
        std::io::ErrorKind::PermissionDenied => {
            " (no permission to create it there: pick a path this user may write)"
        }
        std::io::ErrorKind::AddrInUse => {
            " (another handler is listening there: stop it, or pick another path)"
        }
        std::io::ErrorKind::AlreadyExists => {
            " (remove it if it is not needed, or pick another path)"
        }
        _ => " (pick another path)",
    }
}

fn bind(path: &Path) -> Result<UnixListener, HandlerError> {
    let err = |source| HandlerError::Bind {
        path: path.to_path_buf(),
        source,
    };
    // A socket file left by an earlier run (nobody listening) is replaced; a live one is not,
    // and neither is anything that is not a socket.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            )));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(err(std::io::ErrorKind::AddrInUse.into()));
        }
        let _ = std::fs::remove_file(path);
    }
    // Bound and listening under a temporary name, then renamed into place: a VMM that finds
    // the path can connect (bind(2) creates the file before listen(2), and a connect in
    // between is refused).
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(e)
    })?;
    Ok(listener)
}

/// Waits until `listener` has a connection or `timeout` passed (the stop flag is checked
/// between): a VMM is accepted the moment it connects, not at the next tick of a sleep.
fn wait_readable(listener: &UnixListener, timeout: Duration) {
    use nix::poll::{PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let ms = timeout.as_millis().min(u128::from(u16::MAX)) as u16;
    let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
    let _ = nix::poll::poll(&mut fds, PollTimeout::from(ms));
}

/// Serves one VMM connection to its end (its source session opened on arrival).
pub fn serve_vmm(config: &HandlerConfig, sock: UnixStream, stop: &AtomicBool) -> VmmReport {
    serve_vmm_from(config, sock, stop, None)
}

/// [`serve_vmm`], with a session from `pool` when one is ready.
fn serve_vmm_from(
    config: &HandlerConfig,
    sock: UnixStream,
    stop: &AtomicBool,
    pool: Option<&Pool>,
) -> VmmReport {
    let t0 = Instant::now();
    let mut report = VmmReport::default();
    if let Err(e) = serve_vmm_inner((config, pool), &sock, stop, t0, &mut report) {
        report.outcome = Outcome::Error;
        report.error = Some(e);
    }
    if config.verbose {
        crate::info!(
            "handler",
            "VMM pid {}: {}{}",
            report.pid.map_or("?".into(), |p| p.to_string()),
            serde_json::to_value(report.outcome)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            report
                .error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
    }
    report
}

/// Receives the VMM's handover, serves it through the engine until the VMM exits (or `stop`),
/// and fills in `report` (on every path once the engine ran).
fn serve_vmm_inner(
    (config, pool): (&HandlerConfig, Option<&Pool>),
    sock: &UnixStream,
    stop: &AtomicBool,
    t0: Instant,
    report: &mut VmmReport,
) -> Result<(), String> {
    let _ = sock.set_nonblocking(false);
    let h = handover::receive(sock, config.handshake_timeout)
        .map_err(|e: HandoverError| e.to_string())?;
    let handed_over = Instant::now();
    report.handover_ms = Some((handed_over - t0).as_secs_f64() * 1000.0);
    report.pid = h.pid;
    report.version = Some(h.version);
    report.regions = h.regions.len();
    let (engine, gauges) = start_engine(config, pool, h, report)?;
    let sampler = {
        let ram = engine.ram.clone();
        let sizes = (ram.layout.total_pages(), ram.layout.blocks[0].page_size);
        Sampler::start(
            gauges.clone(),
            Box::new(move || ram.pages_received()),
            sizes,
            Progress::Quiet,
        )
    };
    // The engine's times run from its release (`Go`); the VMM's from its handover.
    let released_s = handed_over.elapsed().as_secs_f64();
    let vmm_gone = serve_until_gone(sock, &engine, stop)?;
    engine.stop();
    let ram = engine.ram.clone();
    report.engine_ended(engine.wait_end(), &ram, vmm_gone);
    gauges.set_phase(if report.outcome == Outcome::Complete {
        Phase::Done
    } else {
        Phase::Failed
    });
    report.timeline = sampler.finish();
    report.first_fault_served_ms = report
        .first_fault_served_ms
        .map(|ms| ms + released_s * 1000.0);
    report.restore_seconds = report.restore_seconds.map(|s| s + released_s);
    Ok(())
}

/// The engine settings for a VMM with `regions`: one worker, and zero pages by copying on
/// hugetlbfs (it has no zero-page ioctl).
fn engine_config(config: &HandlerConfig, regions: &[handover::GuestRegion]) -> EngineConfig {
    let huge = regions.iter().any(|r| {
        r.page_size
            .is_some_and(|p| p > crate::sys::mem::base_page_size() as u64)
    });
    EngineConfig {
        source: config.source.clone(),
        workers: 1,
        pin: false,
        stream: config.stream,
        link_timeout: config.link_timeout,
        connect_timeout: config.connect_timeout,
        // hugetlbfs has no zero-page ioctl.
        zero_fill: if huge {
            ZeroFill::Copy
        } else {
            ZeroFill::Zeropage
        },
        key: config.key.clone(),
        recovery_timeout: config.recovery_timeout,
        tls: config.tls.clone(),
        // The VMM's first fault waits for the urgent connection only.
        bulk_joins_after_go: true,
        ..EngineConfig::default()
    }
}

/// The settings of the pool's sessions: a VMM's, but a first connection cut in its handshake
/// is retried for a few seconds only (the keeper tries again anyway, and must stop promptly).
fn pool_config(config: &HandlerConfig) -> EngineConfig {
    EngineConfig {
        recovery_timeout: config.recovery_timeout.min(Duration::from_secs(5)),
        ..engine_config(config, &[])
    }
}

/// Connects to the source, maps the VMM's regions onto its image and starts the engine on the
/// handed-over userfaultfd; `report.pages` is the pages of the regions.
fn start_engine(
    config: &HandlerConfig,
    pool: Option<&Pool>,
    h: handover::Handover,
    report: &mut VmmReport,
) -> Result<(dest::EngineHandle, Arc<Gauges>), String> {
    let engine_cfg = engine_config(config, &h.regions);
    let gauges = engine_cfg.gauges.clone();
    if let Some(live) = &config.live {
        live.add(h.pid.map_or("?".into(), |p| p.to_string()), &gauges);
    }
    let uffd = Uffd::from_fd(h.uffd);
    let connected = match pool.and_then(Pool::take) {
        Some(c) => {
            report.session_prepared = true;
            c
        }
        None => dest::connect(&engine_cfg).map_err(|e| e.to_string())?,
    };
    let segments =
        handover::segments_for(&h.regions, &connected.welcome.layout).map_err(|e| e.to_string())?;
    report.pages = segments.iter().flatten().map(|s| s.pages).sum();
    let ram =
        Arc::new(DestRam::foreign(&connected.welcome.layout, segments).map_err(|e| e.to_string())?);
    let prepared = Engine::prepare(&connected, ram, &engine_cfg).map_err(|e| e.to_string())?;
    let engine = prepared
        .enable_notify_external(connected, uffd)
        .map_err(|e| e.to_string())?;
    gauges.set_phase(Phase::Postcopy);
    Ok((engine, gauges))
}

/// Serves until the engine finishes, `stop` is set, or the VMM goes away (its socket closes):
/// returns whether it went away.
fn serve_until_gone(
    sock: &UnixStream,
    engine: &dest::EngineHandle,
    stop: &AtomicBool,
) -> Result<bool, String> {
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(|e| e.to_string())?;
    let mut sink = [0u8; 256];
    while !engine.is_finished() && !stop.load(Ordering::Acquire) {
        match (&*sock).read(&mut sink) {
            Ok(0) => return Ok(true),
            Ok(_) => {} // nothing is expected after the handshake; ignore
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return Ok(true),
        }
    }
    Ok(false)
}
