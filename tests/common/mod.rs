//! Helpers shared by the integration tests: an in-process source server, a bounded destination
//! run (engine + verifying workload), an independent per-page checksum verifier, and the pieces
//! of a scripted fake peer speaking `postcopy::codec` over real sockets.
//!
//! Every wait is bounded: a bug fails a test instead of hanging it. A destination runs on its own
//! thread and reports through a channel read with `recv_timeout`; if the engine does not finish
//! in time it is stopped (its userfaultfds close, so blocked touches resume) and the test fails.
//! The bounded waits themselves: [`wait_until`] (a condition), [`join_within`] (a thread),
//! [`wait_engine`] (an engine), [`read_line_within`] (a pipe), [`Proc`] (a child process), and
//! [`IO_TIMEOUT`] on every socket a fake peer reads.
#![allow(dead_code)]

use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use postcopy::codec::{self, Frame, Header, ImageInfo, HEADER_BYTES};
use postcopy::dest::{
    self, DestError, DestRam, Engine, EngineConfig, EngineHandle, EngineReport, ZeroFill,
};
use postcopy::image::{page_checksum, Image, Synthetic};
use postcopy::layout::Layout;
use postcopy::source::{SessionReport, SourceConfig, SourceError, SourceServer, StopHandle};
use postcopy::workload::{self, Pattern, WorkloadConfig, WorkloadResult, WRITE_MARK};

/// Base page size of the test layouts.
pub const PAGE: u64 = 4096;
/// One MiB.
pub const MIB: u64 = 1 << 20;
/// Bound on one whole end-to-end migration.
pub const TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on one socket read of a fake peer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an engine (or a child process) may take to end once told to stop.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// A one-block layout of `size_bytes` in 4 KiB pages.
pub fn layout(size_bytes: u64) -> Layout {
    Layout::single("pc.ram", size_bytes, PAGE).expect("valid test layout")
}

/// Polls `done` every few milliseconds until it holds or `timeout` passes; returns whether it
/// held.
pub fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Joins a thread, failing the test if it does not end within `timeout` (the thread is then
/// leaked, but the test fails instead of hanging).
pub fn join_within<T>(t: JoinHandle<T>, timeout: Duration, what: &str) -> T {
    assert!(
        wait_until(timeout, || t.is_finished()),
        "{what} did not end within {timeout:?}"
    );
    match t.join() {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    }
}

/// As [`join_within`], for a `Drop`: while the test is already failing (unwinding), it only
/// waits (bounded) and discards the thread's outcome, since a second panic would abort the whole
/// test binary.
pub fn join_on_drop<T>(t: JoinHandle<T>, timeout: Duration, what: &str) {
    if std::thread::panicking() {
        if wait_until(timeout, || t.is_finished()) {
            let _ = t.join();
        }
    } else {
        join_within(t, timeout, what);
    }
}

/// Waits for an engine's workers to end within `timeout`, then returns
/// [`EngineHandle::wait`]'s result. Past `timeout` the engine is stopped (its userfaultfds
/// close, so blocked touches resume), given [`STOP_GRACE`] to end, and the test fails naming
/// `what`.
pub fn wait_engine(
    handle: EngineHandle,
    timeout: Duration,
    what: &str,
) -> Result<EngineReport, DestError> {
    if !wait_until(timeout, || handle.is_finished()) {
        handle.stop();
        let ended = wait_until(STOP_GRACE, || handle.is_finished());
        panic!(
            "{what}: the engine did not end within {timeout:?} ({})",
            if ended {
                "it ended once stopped".to_string()
            } else {
                format!("nor within {STOP_GRACE:?} of its stop: its threads are leaked")
            }
        );
    }
    handle.wait()
}

/// Reads one line (with its newline, if any) from `r` on a helper thread, failing the test if
/// none arrives within `timeout`. The reader is dropped once the line is read.
pub fn read_line_within(r: impl Read + Send + 'static, timeout: Duration, what: &str) -> String {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = tx.send(
            std::io::BufReader::new(r)
                .read_line(&mut line)
                .map(|_| line),
        );
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(line)) => line,
        Ok(Err(e)) => panic!("{what}: reading a line failed: {e}"),
        Err(_) => panic!("{what}: no line within {timeout:?}"),
    }
}

/// A child process, killed and reaped on drop (a failing test leaves none running), whose waits
/// are bounded.
pub struct Proc {
    child: Child,
    what: String,
}

impl Proc {
    /// Starts `cmd` (its stdio as `cmd` sets it); `what` names it in failures.
    pub fn spawn(cmd: &mut Command, what: &str) -> std::io::Result<Proc> {
        Ok(Proc {
            child: cmd.spawn()?,
            what: what.to_string(),
        })
    }

    /// The first line of its (piped) stdout, within `timeout`; the rest of stdout is not read.
    pub fn stdout_line(&mut self, timeout: Duration) -> String {
        let out = self.child.stdout.take().expect("stdout is piped");
        read_line_within(out, timeout, &format!("{}'s first line", self.what))
    }

    /// Its piped stdin, taken.
    pub fn child_stdin(&mut self) -> Option<std::process::ChildStdin> {
        self.child.stdin.take()
    }

    /// Its piped stderr, taken.
    pub fn child_stderr(&mut self) -> Option<std::process::ChildStderr> {
        self.child.stderr.take()
    }

    /// Its process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Sends it `signal`.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).expect("signal a child process");
    }

    /// Whether it is still running (not exited; a zombie is reaped here).
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills it (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for it to exit within `timeout` and returns its status and what it wrote to its
    /// piped stdout and stderr (read meanwhile, so a full pipe cannot stall it). Past `timeout`
    /// it is killed and the test fails naming it, with what it wrote.
    pub fn wait_output(mut self, timeout: Duration) -> Output {
        fn drain(r: Option<impl Read + Send + 'static>) -> JoinHandle<Vec<u8>> {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut r) = r {
                    let _ = r.read_to_end(&mut buf);
                }
                buf
            })
        }
        let (out, err) = (
            drain(self.child.stdout.take()),
            drain(self.child.stderr.take()),
        );
        let exited = wait_until(timeout, || {
            matches!(self.child.try_wait(), Ok(Some(_)) | Err(_))
        });
        if !exited {
            self.kill();
        }
        let status = self.child.wait().expect("wait for a child process");
        let what = format!("output of {}", self.what);
        let stdout = join_within(out, STOP_GRACE, &what);
        let stderr = join_within(err, STOP_GRACE, &what);
        assert!(
            exited,
            "{} did not exit within {timeout:?}; stdout: {}\nstderr: {}",
            self.what,
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        );
        Output {
            status,
            stdout,
            stderr,
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}

/// The process ids of `pid`'s children (`/proc/PID/task/*/children`).
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("children")).ok())
        .flat_map(|s| {
            s.split_ascii_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// Whether process `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let state = s.rfind(')').and_then(|i| s[i + 2..].chars().next());
            !matches!(state, Some('Z') | Some('X') | None)
        })
        .unwrap_or(false)
}

/// As [`Command::output`] (stdin closed, stdout and stderr captured), bounded by `timeout`.
pub fn output_within(cmd: &mut Command, timeout: Duration, what: &str) -> Output {
    let cmd = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    Proc::spawn(cmd, what)
        .unwrap_or_else(|e| panic!("starting {what}: {e}"))
        .wait_output(timeout)
}

// ---------------------------------------------------------------------------------------------
// In-process source server.

/// How to start a source.
#[derive(Clone, Debug)]
pub struct SourceOptions {
    /// Image size.
    pub size_bytes: u64,
    /// Image seed.
    pub seed: u64,
    /// Share of zero pages.
    pub zero_percent: u8,
    /// Serve one session then return.
    pub once: bool,
    /// Delay before each urgent reply.
    pub urgent_delay: Duration,
    /// Prefetch window limit (0: none).
    pub prefetch_max: u64,
    /// Require this key.
    pub key: Option<postcopy::link::auth::Key>,
    /// How long a session with a broken connection waits for the destination.
    pub recovery_timeout: Duration,
    /// The source's connection thread panics at this request (0: never).
    pub panic_at_request: u64,
    /// Page size of the image.
    pub page_size: u64,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            size_bytes: 16 * MIB,
            seed: 0x00c0_ffee,
            zero_percent: 20,
            once: true,
            urgent_delay: Duration::ZERO,
            prefetch_max: SourceConfig::default().prefetch_max,
            key: None,
            recovery_timeout: Duration::from_secs(20),
            panic_at_request: 0,
            page_size: PAGE,
        }
    }
}

/// A running in-process [`SourceServer`] on 127.0.0.1.
pub struct Source {
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it serves.
    pub image: Synthetic,
    stop: StopHandle,
    thread: Option<JoinHandle<Result<Vec<SessionReport>, SourceError>>>,
}

impl Source {
    /// Binds a server on an ephemeral port and runs it on a thread.
    pub fn start(opts: &SourceOptions) -> Source {
        let layout =
            Layout::single("pc.ram", opts.size_bytes, opts.page_size).expect("valid test layout");
        let image = Synthetic::new(layout, opts.seed, opts.zero_percent);
        let server = SourceServer::bind(
            "127.0.0.1:0",
            Arc::new(image.clone()),
            SourceConfig {
                once: opts.once,
                verbose: false,
                urgent_delay: opts.urgent_delay,
                prefetch_max: opts.prefetch_max,
                key: opts.key.clone(),
                recovery_timeout: opts.recovery_timeout,
                debug_panic_at_request: opts.panic_at_request,
                ..Default::default()
            },
        )
        .expect("bind source");
        let addr = server.local_addr();
        let stop = server.stop_handle();
        let thread = std::thread::Builder::new()
            .name("test-source".into())
            .spawn(move || server.run())
            .expect("spawn source");
        Source {
            addr,
            image,
            stop,
            thread: Some(thread),
        }
    }

    /// The server's stop handle.
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// Waits (bounded) for `run` to return by itself (with `once`, after the first session),
    /// and returns the session reports.
    pub fn finish(mut self, timeout: Duration) -> Vec<SessionReport> {
        let t = self.thread.take().expect("source thread");
        let ended = wait_until(timeout, || t.is_finished());
        self.stop.stop();
        let reports = join_within(t, STOP_GRACE, "source server after its stop");
        assert!(
            ended,
            "source server did not end by itself within {timeout:?}"
        );
        reports.expect("source server failed")
    }

    /// Stops the server with its [`StopHandle`] and returns the reports of the ended sessions.
    pub fn stop_and_join(self) -> Vec<SessionReport> {
        self.stop.stop();
        self.finish(Duration::from_secs(10))
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            // `run` polls its stop flag every few milliseconds.
            if wait_until(Duration::from_secs(5), || t.is_finished()) {
                let _ = t.join();
            }
        }
    }
}

/// How many of `reports` say the destination confirmed every page.
pub fn complete_sessions(reports: &[SessionReport]) -> usize {
    reports.iter().filter(|r| r.complete).count()
}

// ---------------------------------------------------------------------------------------------
// Destination: engine + workload, bounded.

/// How to run a destination.
#[derive(Clone, Debug)]
pub struct DestOptions {
    /// Engine workers.
    pub workers: usize,
    /// Background stream.
    pub stream: bool,
    /// Pin workers.
    pub pin: bool,
    /// Workload threads.
    pub threads: usize,
    /// Workload pattern.
    pub pattern: Pattern,
    /// Workload seed.
    pub seed: u64,
    /// Ask for the source's zero-page map.
    pub zero_map: bool,
    /// How zero pages are placed.
    pub zero_fill: ZeroFill,
    /// Most bulk streams at once (0: one per worker).
    pub max_streams: usize,
    /// A receiver-driven stream steered to this fault-latency target.
    pub fault_latency_target: Option<Duration>,
    /// Authenticate with this key.
    pub key: Option<postcopy::link::auth::Key>,
    /// The bulk halves connect once released (as the handler's do).
    pub bulk_joins_after_go: bool,
    /// The kind of memory placed into.
    pub memory: postcopy::dest::Memory,
}

impl Default for DestOptions {
    fn default() -> Self {
        DestOptions {
            workers: 2,
            stream: true,
            pin: false,
            threads: 4,
            pattern: Pattern::Random,
            seed: 42,
            zero_map: false,
            zero_fill: ZeroFill::Zeropage,
            max_streams: 0,
            fault_latency_target: None,
            key: None,
            bulk_joins_after_go: false,
            memory: postcopy::dest::Memory::Anon,
        }
    }
}

/// Everything a test may assert about one destination run.
pub struct DestOutcome {
    /// The memory (engine ended: no page can still fault into it).
    pub ram: Arc<DestRam>,
    /// The image the source said it serves (recomputed here).
    pub image: Synthetic,
    /// What the workload saw.
    pub workload: WorkloadResult,
    /// The engine's result.
    pub engine: Result<EngineReport, DestError>,
    /// `workload::final_check`: (pages checked, mismatches, first mismatch).
    pub final_check: (u64, u64, Option<String>),
    /// The engine had to be stopped because the run exceeded [`TIMEOUT`].
    pub timed_out: bool,
    /// Wall time from connect to the engine's end.
    pub seconds: f64,
}

impl DestOutcome {
    /// The engine report, or a test failure naming the engine's error.
    pub fn report(&self) -> &EngineReport {
        match &self.engine {
            Ok(r) => r,
            Err(e) => panic!("engine failed: {e}"),
        }
    }

    /// Asserts the migration completed and every page verified, by the workload (first touch),
    /// by `workload::final_check`, and by this file's own per-page checksum pass.
    pub fn assert_verified(&self) {
        assert!(
            !self.timed_out,
            "destination did not finish within {TIMEOUT:?}"
        );
        let r = self.report();
        let total = self.ram.layout.total_pages();
        assert_eq!(
            self.workload.mismatches, 0,
            "workload: {:?}",
            self.workload.first_mismatch
        );
        assert_eq!(
            self.workload.touches, total,
            "every page claimed once by the workload"
        );
        assert_eq!(self.final_check.0, total);
        assert_eq!(
            self.final_check.1, 0,
            "final_check: {:?}",
            self.final_check.2
        );
        assert!(self.ram.complete(), "received bitmaps not full");
        assert_eq!(
            r.totals.pages_by_fault + r.totals.pages_by_stream + r.totals.pages_by_zero_map,
            total,
            "each page placed exactly once: {:?}",
            r.totals
        );
        // The counters agree with the per-page record of who placed what (a page placed and
        // counted by no path, or by two, shows here).
        let by = self.ram.placed_by.counts();
        assert_eq!(
            (by[0], by[1], by[2], by[3]),
            (
                0,
                r.totals.pages_by_fault,
                r.totals.pages_by_stream,
                r.totals.pages_by_zero_map
            ),
            "per-page origins (none, fault, stream, zero map) against the counters"
        );
        let bad = verify_pages(&self.ram, &self.image, true);
        assert!(
            bad.is_empty(),
            "{} pages differ, first {:?}",
            bad.len(),
            bad.first()
        );
    }
}

/// Expected contents of a page: the image's, with the workload's write applied if `written`.
pub fn expected_page(image: &Synthetic, block: u32, page: u64, written: bool, out: &mut [u8]) {
    image.fill(block, page, out);
    if written {
        let w = u64::from_ne_bytes(out[..8].try_into().expect("8 bytes"));
        out[..8].copy_from_slice(&(w ^ WRITE_MARK).to_ne_bytes());
    }
}

/// Reads every page of every block (only after the engine ended, or for placed pages) and
/// compares its checksum with the expected one. Returns the (block, page) that differ.
pub fn verify_pages(ram: &DestRam, image: &Synthetic, written: bool) -> Vec<(u32, u64)> {
    let mut bad = Vec::new();
    for (b, block) in ram.layout.blocks.iter().enumerate() {
        let ps = block.page_size as usize;
        let mut got = vec![0u8; ps];
        let mut want = vec![0u8; ps];
        for p in 0..block.pages() {
            ram.regions[b].read_into(p as usize * ps, &mut got);
            expected_page(image, b as u32, p, written, &mut want);
            if page_checksum(&got) != page_checksum(&want) {
                bad.push((b as u32, p));
            }
        }
    }
    bad
}

/// Checksum of page `page` of block 0 as the image has it (no workload write).
pub fn image_checksum(image: &Synthetic, page: u64) -> u64 {
    let mut buf = vec![0u8; PAGE as usize];
    image.fill(0, page, &mut buf);
    page_checksum(&buf)
}

/// Runs a destination against `addr`: see [`run_dest_with`].
pub fn run_dest(addr: SocketAddr, opts: &DestOptions) -> DestOutcome {
    run_dest_with(addr, opts, |_, _| ()).0
}

/// Runs a destination against `addr` on its own thread: `dest::connect`, `DestRam::new`,
/// `Engine::start`, then `before` (a test's own phase of touches, which may block on faults),
/// then `workload::run`, `EngineHandle::wait` and `workload::final_check`. Bounded by
/// [`TIMEOUT`]: past it the engine is stopped and the outcome says `timed_out`.
pub fn run_dest_with<R, F>(addr: SocketAddr, opts: &DestOptions, before: F) -> (DestOutcome, R)
where
    R: Send + 'static,
    F: FnOnce(&Arc<DestRam>, &Synthetic) -> R + Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    let opts = opts.clone();
    let t = std::thread::Builder::new()
        .name("test-dest".into())
        .spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                dest_session(addr, &opts, before)
            }));
            let _ = tx.send(r.and_then(|r| r));
        })
        .expect("spawn destination");
    match rx.recv_timeout(TIMEOUT + Duration::from_secs(20)) {
        Ok(Ok(out)) => {
            join_within(t, STOP_GRACE, "destination thread after its report");
            out
        }
        Ok(Err(panic)) => {
            join_within(t, STOP_GRACE, "destination thread after its report");
            std::panic::resume_unwind(panic)
        }
        Err(e) => panic!("destination thread did not report within the bound: {e}"),
    }
}

type Panic = Box<dyn std::any::Any + Send + 'static>;

fn dest_session<R, F>(
    addr: SocketAddr,
    opts: &DestOptions,
    before: F,
) -> Result<(DestOutcome, R), Panic>
where
    R: Send + 'static,
    F: FnOnce(&Arc<DestRam>, &Synthetic) -> R + Send + 'static,
{
    let t0 = Instant::now();
    let config = EngineConfig {
        source: addr.to_string(),
        workers: opts.workers,
        pin: opts.pin,
        stream: opts.stream,
        bulk_joins_after_go: opts.bulk_joins_after_go,
        link_timeout: Duration::from_secs(20),
        connect_timeout: Duration::from_secs(10),
        zero_map: opts.zero_map,
        zero_fill: opts.zero_fill,
        max_streams: opts.max_streams,
        precopy: false,
        key: opts.key.clone(),
        recovery_timeout: Duration::from_secs(20),
        tls: None,
        verify: false,
        fault_latency_target: opts.fault_latency_target,
        page_size: Some(opts.memory.page_size()),
        gauges: Default::default(),
    };
    let connected = dest::connect(&config).unwrap_or_else(|e| panic!("handshake: {e}"));
    let ImageInfo::Synthetic { seed, zero_percent } = connected.welcome.image else {
        panic!("the test source serves a synthetic image");
    };
    let layout = connected.welcome.layout.clone();
    let image = Synthetic::new(layout.clone(), seed, zero_percent);
    let ram = Arc::new(DestRam::with_memory(&layout, opts.memory).expect("DestRam::with_memory"));
    let handle = Engine::start(connected, ram.clone(), &config).expect("Engine::start");

    let wl_config = WorkloadConfig {
        threads: opts.threads,
        pattern: opts.pattern,
        seed: opts.seed,
    };
    let (wl_ram, wl_image) = (ram.clone(), image.clone());
    let wl = std::thread::Builder::new()
        .name("test-workload".into())
        .spawn(move || {
            let r = before(&wl_ram, &wl_image);
            (r, workload::run(&wl_ram, Some(&wl_image), &wl_config))
        })
        .expect("spawn workload");

    // Bounded: the workload and the engine must both end. Once the workload is done the engine
    // has little left to do (the stream's tail and End/Ack): give it a shorter grace.
    let deadline = t0 + TIMEOUT;
    let mut engine_deadline = deadline;
    let mut timed_out = false;
    loop {
        let wl_done = wl.is_finished();
        if wl_done && handle.is_finished() {
            break;
        }
        if wl_done && engine_deadline == deadline {
            engine_deadline = deadline.min(Instant::now() + Duration::from_secs(20));
        }
        if Instant::now() >= engine_deadline {
            timed_out = true;
            handle.stop();
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let engine = wait_engine(handle, STOP_GRACE, "engine after its workload or its stop");
    let seconds = t0.elapsed().as_secs_f64();
    // The engine has ended: its userfaultfds are closed, so blocked touches have resumed.
    assert!(
        wait_until(Duration::from_secs(20), || wl.is_finished()),
        "workload still blocked after the engine ended"
    );
    let (r, workload) = wl.join()?;
    let final_check = workload::final_check(&ram, &image, 2, true);
    Ok((
        DestOutcome {
            ram,
            image,
            workload,
            engine,
            final_check,
            timed_out,
            seconds,
        },
        r,
    ))
}

/// A full migration: source (`once`) + destination; returns the destination's outcome and the
/// source's report of the session.
pub fn migrate(src: &SourceOptions, dst: &DestOptions) -> (DestOutcome, SessionReport) {
    let source = Source::start(&SourceOptions {
        once: true,
        ..src.clone()
    });
    let out = run_dest(source.addr, dst);
    let reports = source.finish(Duration::from_secs(20));
    assert_eq!(reports.len(), 1, "one session: {reports:?}");
    (out, reports.into_iter().next().expect("one report"))
}

// ---------------------------------------------------------------------------------------------
// Fake peers: raw frames over real sockets.

/// Reads one whole frame (header + body) from `s`. `Ok(None)` on a clean end of stream before a
/// header. The header must decode (our own codec checks it); the body is read as declared.
pub fn read_raw_frame(s: &mut impl Read) -> std::io::Result<Option<(Header, Vec<u8>)>> {
    let mut head = [0u8; HEADER_BYTES];
    let mut got = 0;
    while got < HEADER_BYTES {
        match s.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "end of stream inside a header",
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let h = Header::decode(&head)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    let mut frame = head.to_vec();
    frame.resize(HEADER_BYTES + h.body_len as usize, 0);
    s.read_exact(&mut frame[HEADER_BYTES..])?;
    Ok(Some((h, frame)))
}

/// Reads one frame and decodes it with [`Frame::decode`] (checked against `layout` if given).
pub fn read_frame(s: &mut impl Read, layout: Option<&Layout>) -> std::io::Result<Option<Frame>> {
    let Some((_, bytes)) = read_raw_frame(s)? else {
        return Ok(None);
    };
    let (f, used) = Frame::decode(&bytes, layout)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    assert_eq!(used, bytes.len());
    Ok(Some(f))
}

/// Reads until the peer closes (or resets) the connection, discarding what arrives. Returns
/// whether it closed within `timeout`.
pub fn drain_until_closed(s: &mut TcpStream, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let _ = s.set_read_timeout(Some(left.max(Duration::from_millis(1))));
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true, // reset: closed too
        }
    }
}

/// A listening fake source.
pub struct FakeListener {
    listener: TcpListener,
    /// Its address.
    pub addr: SocketAddr,
}

impl FakeListener {
    /// Binds 127.0.0.1 on an ephemeral port.
    pub fn bind() -> FakeListener {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let addr = listener.local_addr().expect("address");
        FakeListener { listener, addr }
    }

    /// Accepts one connection within `timeout` (blocking, read timeout [`IO_TIMEOUT`]).
    pub fn accept(&self, timeout: Duration) -> std::io::Result<TcpStream> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false)?;
                    s.set_read_timeout(Some(IO_TIMEOUT))?;
                    s.set_write_timeout(Some(IO_TIMEOUT))?;
                    s.set_nodelay(true)?;
                    return Ok(s);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "no connection to the fake source",
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Encodes a frame.
pub fn encode(f: &Frame) -> Vec<u8> {
    let mut out = Vec::new();
    f.encode_into(&mut out);
    out
}

/// A header's 32 bytes.
pub fn header_bytes(h: &Header) -> Vec<u8> {
    let mut out = Vec::new();
    h.encode_into(&mut out);
    out
}

/// A legitimate `Pages` frame for `[first, first + count)` of block 0 of `image`.
pub fn legit_pages(image: &Synthetic, first: u64, count: u64) -> Vec<u8> {
    let ps = image.layout().blocks[0].page_size as usize;
    let contents: Vec<Vec<u8>> = (first..first + count)
        .map(|p| {
            let mut buf = vec![0u8; ps];
            image.fill(0, p, &mut buf);
            buf
        })
        .collect();
    let pages: Vec<Option<&[u8]>> = (first..first + count)
        .zip(&contents)
        .map(|(p, c)| (!image.is_zero(0, p)).then_some(&c[..]))
        .collect();
    let mut out = Vec::new();
    codec::encode_pages(0, first, ps as u64, pages.iter().copied(), &mut out);
    out
}

/// Asserts a decoded frame is an `Error` frame and returns its message.
pub fn expect_error_frame(f: Option<Frame>, what: &str) -> String {
    match f {
        Some(Frame::Error(m)) => m,
        other => panic!("{what}: expected an Error frame, got {other:?}"),
    }
}

/// Resident set size of this process, bytes (from /proc/self/statm).
pub fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: u64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("statm resident");
    pages * postcopy::sys::mem::base_page_size() as u64
}

/// Writes all of `bytes`, mapping errors to a message.
pub fn send(s: &mut TcpStream, bytes: &[u8]) {
    s.write_all(bytes).expect("fake peer write");
}

/// Reserved 2 MiB huge pages (`vm.nr_hugepages` raised by a test), put back as they were on
/// drop. Tests of one binary that reserve run one at a time (the guard holds a lock).
pub struct HugePages {
    before: u64,
    _serial: std::sync::MutexGuard<'static, ()>,
}

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

impl HugePages {
    /// Raises `vm.nr_hugepages` so that at least `pages` are free, or `None` (with the
    /// reason on stderr) where this process may not (not root).
    pub fn reserve(pages: u64) -> Option<HugePages> {
        static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let read = |path: &str| -> u64 {
            std::fs::read_to_string(path)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0)
        };
        let before = read(NR_HUGEPAGES);
        let free = read("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages");
        if free >= pages {
            return Some(HugePages {
                before,
                _serial: serial,
            });
        }
        let want = before + pages - free;
        if let Err(e) = std::fs::write(NR_HUGEPAGES, want.to_string()) {
            eprintln!("skipped: cannot reserve {pages} huge pages ({NR_HUGEPAGES}: {e})");
            return None;
        }
        let guard = HugePages {
            before,
            _serial: serial,
        };
        let free = read("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages");
        if free < pages {
            eprintln!("skipped: only {free} of {pages} huge pages could be reserved");
            return None;
        }
        Some(guard)
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        let _ = std::fs::write(NR_HUGEPAGES, self.before.to_string());
    }
}
