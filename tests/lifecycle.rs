//! The whole lifecycle against a live source: precopy rounds while the source's workload
//! writes, switchover with discards, postcopy of the rest, and verification of every page
//! against the checksums the source takes of its final memory. Real kernel, real sockets.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{join_on_drop, join_within, layout, wait_engine, IO_TIMEOUT, MIB, PAGE, TIMEOUT};
use postcopy::dest::{self, DestRam, Engine, EngineConfig, Memory};
use postcopy::dirty::{DirtyTracker, UffdWpTracker};
use postcopy::image::{page_checksum, Image, Synthetic};
use postcopy::live::{DirtyWriter, LiveImage, SourceWorkload};
use postcopy::source::{LiveParts, PrecopyLimits, SessionReport, SourceConfig, SourceServer};
use postcopy::workload::{Pattern, WorkloadConfig};

/// Skips (with the reason) when the host cannot track dirty pages.
fn tracking_available() -> bool {
    match UffdWpTracker::available() {
        Ok(()) => true,
        Err(why) => {
            eprintln!("skipped: no dirty-page tracking on this host: {why}");
            false
        }
    }
}

/// A live source in this process: the synthetic image in memory, a real tracker per block.
struct LiveSource {
    addr: String,
    image: Arc<LiveImage>,
    stop: postcopy::source::StopHandle,
    thread: Option<std::thread::JoinHandle<Vec<SessionReport>>>,
}

impl Drop for LiveSource {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            join_on_drop(t, Duration::from_secs(10), "live source");
        }
    }
}

impl LiveSource {
    fn start(
        size_bytes: u64,
        workload: impl FnOnce(Arc<LiveImage>) -> Box<dyn SourceWorkload>,
        limits: PrecopyLimits,
    ) -> LiveSource {
        Self::start_wrapped(size_bytes, workload, limits, |_, t| t)
    }

    /// As [`start`](Self::start), with the real tracker wrapped by `wrap`.
    fn start_wrapped(
        size_bytes: u64,
        workload: impl FnOnce(Arc<LiveImage>) -> Box<dyn SourceWorkload>,
        limits: PrecopyLimits,
        wrap: impl FnOnce(Arc<LiveImage>, Box<dyn DirtyTracker>) -> Box<dyn DirtyTracker>,
    ) -> LiveSource {
        let synthetic = Synthetic::new(layout(size_bytes), 0x11fe, 20);
        let image = Arc::new(LiveImage::from_synthetic(&synthetic, 2).expect("live image"));
        let trackers: Vec<Box<dyn DirtyTracker>> = vec![wrap(
            image.clone(),
            Box::new(
                UffdWpTracker::new(image.region(0).addr(), size_bytes as usize).expect("tracker"),
            ),
        )];
        let server = SourceServer::bind_live(
            "127.0.0.1:0",
            image.clone(),
            LiveParts {
                trackers,
                workload: workload(image.clone()),
            },
            SourceConfig {
                once: true,
                verbose: std::env::var_os("PC_VERBOSE").is_some(),
                precopy: limits,
                ..Default::default()
            },
        )
        .expect("bind live source");
        let addr = server.local_addr().to_string();
        let stop = server.stop_handle();
        let thread = std::thread::spawn(move || server.run().expect("source run"));
        LiveSource {
            addr,
            image,
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<SessionReport> {
        join_within(self.thread.take().expect("thread"), TIMEOUT, "live source")
    }
}

/// The memory kinds of 4 KiB pages (the live source's page size): each lifecycle test runs on
/// every one.
const MEMORIES: [Memory; 3] = [Memory::Anon, Memory::Memfd, Memory::Thp];

fn run_spec(precopy: bool) -> postcopy::demo::RunSpec {
    run_spec_on(precopy, Memory::Anon)
}

fn run_spec_on(precopy: bool, memory: Memory) -> postcopy::demo::RunSpec {
    postcopy::demo::RunSpec {
        handler: postcopy::demo::Handler::Engine,
        memory,
        workers: 2,
        pin: false,
        stream: true,
        workload: Some(WorkloadConfig {
            threads: 2,
            pattern: Pattern::Random,
            seed: 9,
        }),
        progress: postcopy::timeline::Progress::Quiet,
        gauges: Default::default(),
        zero_map: false,
        zero_fill: postcopy::dest::ZeroFill::Zeropage,
        max_streams: 0,
        fault_latency_target: None,
        precopy,
        key: None,
        recovery_timeout: Duration::from_secs(20),
        link_timeout: postcopy::link::liveness::DEFAULT_LINK_TIMEOUT,
        tls: None,
    }
}

/// A workload that writes `pages` as its last act when it is stopped: at the switchover,
/// after precopy sent every page. Those pages must be discarded and fetched again.
struct WriteOnStop {
    image: Arc<LiveImage>,
    pages: Vec<u64>,
}

impl SourceWorkload for WriteOnStop {
    fn stop(&mut self) {
        for &p in &self.pages {
            self.image
                .region(0)
                .xor_u64((p * PAGE) as usize + 64, 0x0bad_5eed_0000_0001 ^ p);
        }
    }
}

fn source_page_checksum(image: &LiveImage, page: u64) -> u64 {
    let mut buf = vec![0u8; PAGE as usize];
    image.region(0).read_into((page * PAGE) as usize, &mut buf);
    page_checksum(&buf)
}

#[test]
fn page_written_after_precopy_is_discarded_and_refetched() {
    if !tracking_available() {
        return;
    }
    for memory in MEMORIES {
        eprintln!("memory {}", memory.name());
        page_written_after_precopy_on(memory);
    }
}

fn page_written_after_precopy_on(memory: Memory) {
    let written: Vec<u64> = vec![0, 1, 2, 700, 701, 2047, 4095];
    let src = {
        let pages = written.clone();
        LiveSource::start(
            16 * MIB,
            move |image| Box::new(WriteOnStop { image, pages }),
            PrecopyLimits {
                max_rounds: 3,
                ..Default::default()
            },
        )
    };
    let addr = src.addr.clone();
    let spec = run_spec_on(true, memory);
    let t = std::thread::spawn(move || postcopy::demo::run_destination(&addr, &spec));
    let out = join_within(t, TIMEOUT, "destination").expect("destination run");
    assert!(
        out.verified(),
        "not verified: final {:?}, engine {:?}",
        out.final_mismatches,
        out.engine.as_ref().map(|e| &e.totals)
    );
    let pre = out.precopy.as_ref().expect("precopy ran");
    // No other writer: the dirty set at switchover is exactly the pages written on stop.
    assert_eq!(pre.pages_dirty_at_switchover, written.len() as u64);
    assert_eq!(pre.pages_discarded, written.len() as u64);
    assert_eq!(pre.round_pages.first(), Some(&(16 * MIB / PAGE)));
    let e = out.engine.as_ref().expect("engine");
    assert_eq!(
        pre.pages_by_precopy
            + e.totals.pages_by_fault
            + e.totals.pages_by_stream
            + e.totals.pages_by_zero_map,
        16 * MIB / PAGE
    );
    assert!(e.totals.pages_by_fault + e.totals.pages_by_stream >= written.len() as u64);
    let reports = src.finish();
    assert_eq!(reports.len(), 1);
    assert!(reports[0].complete, "{:?}", reports[0]);
    assert_eq!(reports[0].pages_dirty_at_switchover, written.len() as u64);
}

#[test]
fn discarded_pages_hold_the_new_content_never_the_stale_one() {
    if !tracking_available() {
        return;
    }
    for memory in MEMORIES {
        eprintln!("memory {}", memory.name());
        discarded_pages_hold_the_new_content_on(memory);
    }
}

fn discarded_pages_hold_the_new_content_on(memory: Memory) {
    let written: Vec<u64> = (0..64).map(|i| i * 61 % 4096).collect();
    let pages = written.clone();
    let src = LiveSource::start(
        16 * MIB,
        move |image| Box::new(WriteOnStop { image, pages }),
        PrecopyLimits::default(),
    );
    let stale: Vec<u64> = written
        .iter()
        .map(|&p| source_page_checksum(&src.image, p))
        .collect();
    let image = src.image.clone();
    let config = EngineConfig {
        source: src.addr.clone(),
        workers: 2,
        pin: false,
        precopy: true,
        ..Default::default()
    };
    let t = std::thread::spawn(move || {
        let mut connected = dest::connect(&config).expect("connect");
        let ram = Arc::new(DestRam::with_memory(&connected.welcome.layout, memory).expect("ram"));
        let pre = dest::receive_precopy(&mut connected, &ram, &config).expect("precopy");
        // Discarded pages are missing now: their received bits are clear.
        for &p in &written {
            assert!(
                !ram.received[0].get(p),
                "page {p} still marked received after discard"
            );
        }
        let handle = Engine::start(connected, ram.clone(), &config).expect("start");
        let report = wait_engine(handle, TIMEOUT, "engine").expect("engine");
        (ram, pre, report, written)
    });
    let (ram, pre, report, written) = join_within(t, TIMEOUT, "destination");
    assert_eq!(pre.pages_discarded, 64);
    assert!(ram.complete());
    let mut buf = vec![0u8; PAGE as usize];
    for (i, &p) in written.iter().enumerate() {
        ram.regions[0].read_into((p * PAGE) as usize, &mut buf);
        let got = page_checksum(&buf);
        assert_eq!(
            got,
            source_page_checksum(&image, p),
            "page {p}: not the source's final content"
        );
        assert_ne!(got, stale[i], "page {p}: the stale content arrived");
    }
    assert!(report.totals.pages_by_stream + report.totals.pages_by_fault >= 64);
    src.finish();
}

/// A real tracker behind a writer that dirties `pages` pages (spread over the region) right
/// before every collection: however the scheduler treats the background writer, every round
/// finds more than the convergence limit dirty.
struct WritesBeforeCollect {
    inner: Box<dyn DirtyTracker>,
    image: Arc<LiveImage>,
    pages: u64,
    round: u64,
}

impl DirtyTracker for WritesBeforeCollect {
    fn start(&mut self) -> Result<(), postcopy::dirty::DirtyError> {
        self.inner.start()
    }

    fn collect(&mut self, out: &mut Vec<(u64, u64)>) -> Result<(), postcopy::dirty::DirtyError> {
        let region = self.image.region(0);
        let total = region.len_bytes() as u64 / PAGE;
        self.round += 1;
        for i in 0..self.pages {
            let page = (i * 97 + self.round * 13) % total;
            region.xor_u64((page * PAGE) as usize, self.round | 1);
        }
        self.inner.collect(out)
    }

    fn stop(&mut self) -> Result<(), postcopy::dirty::DirtyError> {
        self.inner.stop()
    }
}

#[test]
fn live_writer_under_load_migrates_and_verifies() {
    if !tracking_available() {
        return;
    }
    for memory in MEMORIES {
        eprintln!("memory {}", memory.name());
        live_writer_under_load_on(memory);
    }
}

fn live_writer_under_load_on(memory: Memory) {
    // A 200k pages/s writer on 32 MiB (8192 pages), plus 64 pages dirtied before every
    // collection: precopy cannot converge under 16 dirty pages; it must switch over at its
    // round limit and still verify.
    let src = LiveSource::start_wrapped(
        32 * MIB,
        |image| Box::new(DirtyWriter::start(image, 200_000, 3)),
        PrecopyLimits {
            max_rounds: 4,
            max_dirty_pages: 16,
            max_duration: Duration::from_secs(20),
        },
        |image, inner| {
            Box::new(WritesBeforeCollect {
                inner,
                image,
                pages: 64,
                round: 0,
            })
        },
    );
    let addr = src.addr.clone();
    let spec = run_spec_on(true, memory);
    let t = std::thread::spawn(move || postcopy::demo::run_destination(&addr, &spec));
    let out = join_within(t, TIMEOUT, "destination").expect("destination run");
    assert!(out.verified(), "not verified: {:?}", out.final_mismatches);
    let pre = out.precopy.as_ref().expect("precopy");
    assert_eq!(
        pre.round_pages.len(),
        4,
        "switched over at the round limit: {:?}",
        pre.round_pages
    );
    assert!(pre.round_pages[1..].iter().all(|&p| p >= 64));
    assert!(pre.pages_dirty_at_switchover >= 64);
    assert!(out.downtime_ms.is_some());
    src.finish();
}

#[test]
fn pure_postcopy_from_a_live_source_stops_it_at_the_handshake() {
    if !tracking_available() {
        return;
    }
    let writes = Arc::new(AtomicU64::new(0));
    struct Counting(DirtyWriter, Arc<AtomicU64>);
    impl SourceWorkload for Counting {
        fn stop(&mut self) {
            self.0.stop();
            self.1.store(self.0.writes(), Ordering::Release);
        }
    }
    let w = writes.clone();
    let src = LiveSource::start(
        16 * MIB,
        move |image| Box::new(Counting(DirtyWriter::start(image, 50_000, 4), w)),
        PrecopyLimits::default(),
    );
    std::thread::sleep(Duration::from_millis(50));
    let addr = src.addr.clone();
    let t = std::thread::spawn(move || postcopy::demo::run_destination(&addr, &run_spec(false)));
    let out = join_within(t, TIMEOUT, "destination").expect("destination run");
    assert!(out.verified(), "not verified: {:?}", out.final_mismatches);
    assert!(out.precopy.is_none());
    assert!(
        writes.load(Ordering::Acquire) > 0,
        "the writer ran before the handshake"
    );
    assert!(out.downtime_ms.is_some());
    src.finish();
}

/// `VmFlags` of the mapping that contains `addr`, from /proc/self/smaps.
fn vm_flags(addr: usize) -> String {
    let smaps = std::fs::read_to_string("/proc/self/smaps").expect("read smaps");
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((lo, hi)) = range.split_once('-') {
                if let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                {
                    inside = lo <= addr && addr < hi;
                    continue;
                }
            }
        }
        if inside {
            if let Some(flags) = line.strip_prefix("VmFlags:") {
                return flags.trim().to_string();
            }
        }
    }
    panic!("no mapping contains {addr:#x}");
}

#[test]
fn thp_is_off_during_postcopy_and_restored_after_cleanup() {
    let src = common::Source::start(&common::SourceOptions {
        size_bytes: 16 * MIB,
        ..Default::default()
    });
    let config = EngineConfig {
        source: src.addr.to_string(),
        workers: 1,
        pin: false,
        precopy: true,
        ..Default::default()
    };
    let mut connected = dest::connect(&config).expect("connect");
    let ram = Arc::new(DestRam::with_thp(&connected.welcome.layout).expect("ram"));
    let addr = ram.regions[0].addr();
    let has = |flag: &str| vm_flags(addr).split_whitespace().any(|f| f == flag);
    assert!(has("hg"), "THP wanted at init: {}", vm_flags(addr));
    dest::receive_precopy(&mut connected, &ram, &config).expect("precopy");
    let handle = Engine::start(connected, ram.clone(), &config).expect("start");
    assert!(
        has("nh") && !has("hg"),
        "THP off during postcopy: {}",
        vm_flags(addr)
    );
    let report = wait_engine(handle, TIMEOUT, "engine").expect("engine");
    assert!(
        has("hg") && !has("nh"),
        "THP back after cleanup: {}",
        vm_flags(addr)
    );
    assert!(ram.complete());
    // Static source: precopy sent every page; the zero pages were placed by the workers.
    assert_eq!(
        report.totals.pages_by_fault + report.totals.pages_by_stream,
        0
    );
    let bad = common::verify_pages(&ram, &src.image, false);
    assert!(bad.is_empty(), "{} pages differ", bad.len());
}

#[test]
fn discard_outside_a_block_is_rejected() {
    let ram = DestRam::new(&layout(MIB)).expect("ram");
    assert!(ram.discard_range(0, 255, 2).is_err());
    assert!(ram.discard_range(0, 256, 1).is_err());
    assert!(ram.discard_range(1, 0, 1).is_err());
    assert!(ram.discard_range(0, u64::MAX, 2).is_err());
    assert!(ram.discard_range(0, 0, 256).is_ok());
    assert!(ram.write_page(0, 256, &[0u8; 4096]).is_err());
}

// ---------------------------------------------------------------------------------------------
// Hostile peers around precopy: a bad frame ends the session with a clear error, and nothing
// is written outside a block.

use common::{encode, header_bytes, legit_pages, read_frame, send, FakeListener};
use postcopy::codec::{Frame, Header, Kind, Welcome, HEADER_BYTES};
use postcopy::dest::DestError;

/// A fake source: answers the precopy `Hello` with `Welcome`, then sends `script`'s bytes.
/// Returns the destination's `receive_precopy` result and its memory.
fn precopy_against(script: Vec<u8>) -> (Result<dest::PrecopyReport, DestError>, Arc<DestRam>) {
    let fake = FakeListener::bind();
    let addr = fake.addr;
    let image = Synthetic::new(layout(MIB), 3, 0);
    let fake_thread = std::thread::spawn(move || {
        let mut s = fake.accept(Duration::from_secs(10)).expect("connect");
        let hello = common::read_raw_frame(&mut s)
            .expect("read")
            .expect("Hello");
        assert!(hello.0.wants_precopy(), "the Hello offers precopy");
        send(
            &mut s,
            &encode(&Frame::Welcome(Welcome {
                session: 5,
                layout: image.layout().clone(),
                image: postcopy::codec::ImageInfo::Opaque,
                stopped_unix_us: 0,
            })),
        );
        let _ = std::io::Write::write_all(&mut s, &script);
        // Hold the connection until the destination closes it.
        common::drain_until_closed(&mut s, Duration::from_secs(10));
    });
    let config = EngineConfig {
        source: addr.to_string(),
        workers: 1,
        pin: false,
        precopy: true,
        link_timeout: Duration::from_secs(2),
        // The fake is hostile, not flaky: no reconnection (tests/recovery.rs covers those).
        recovery_timeout: Duration::ZERO,
        ..Default::default()
    };
    let mut connected = dest::connect(&config).expect("connect");
    let ram = Arc::new(DestRam::new(&connected.welcome.layout).expect("ram"));
    let r = dest::receive_precopy(&mut connected, &ram, &config);
    drop(connected);
    join_within(fake_thread, TIMEOUT, "fake source");
    (r, ram)
}

fn image_1m() -> Synthetic {
    Synthetic::new(layout(MIB), 3, 0)
}

#[test]
fn precopy_accepts_pages_discards_and_run() {
    let img = image_1m();
    let mut script = legit_pages(&img, 0, 64);
    script.extend(legit_pages(&img, 64, 64));
    script.extend(header_bytes(&Header::round(1, 128)));
    script.extend(encode(&Frame::Discard {
        block: 0,
        ranges: vec![(10, 5), (100, 1)],
    }));
    script.extend(header_bytes(&Header::run(6, 1234)));
    let (r, ram) = precopy_against(script);
    let r = r.expect("precopy");
    assert_eq!(r.round_pages, vec![128]);
    assert_eq!(r.pages_discarded, 6);
    assert_eq!(r.pages_by_precopy, 122);
    assert_eq!(r.pages_dirty_at_switchover, 6);
    assert_eq!(r.source_stopped_unix_us, 1234);
    assert!(!ram.received[0].get(12) && !ram.received[0].get(100) && ram.received[0].get(99));
}

#[test]
fn precopy_discard_outside_the_block_ends_the_session() {
    let img = image_1m();
    let mut script = legit_pages(&img, 0, 4);
    script.extend(encode(&Frame::Discard {
        block: 0,
        ranges: vec![(250, 10)],
    }));
    let (r, ram) = precopy_against(script);
    let e = r.expect_err("a discard past the block is refused");
    assert!(matches!(e, DestError::Protocol { .. }), "{e:?}");
    assert!(e.to_string().contains("precopy"), "{e}");
    // Nothing past the block was touched; what arrived before stays.
    assert!(ram.received[0].get(3));
}

#[test]
fn precopy_pages_outside_the_block_end_the_session() {
    let mut script = Vec::new();
    Header::pages(0, 250, 10, u64::MAX >> 54, 4096).encode_into(&mut script);
    let (r, _) = precopy_against(script);
    assert!(matches!(r, Err(DestError::Protocol { .. })), "{r:?}");
}

#[test]
fn precopy_unexpected_frame_ends_the_session() {
    let mut script = Vec::new();
    Header::request(0, 0, 1).encode_into(&mut script);
    let (r, _) = precopy_against(script);
    let e = r.expect_err("a Request from the source is refused");
    assert!(e.to_string().contains("Request"), "{e}");
}

#[test]
fn precopy_truncated_stream_is_reported() {
    let img = image_1m();
    let mut script = legit_pages(&img, 0, 8);
    script.truncate(script.len() - 100);
    let (r, _) = precopy_against(script);
    // The fake holds the connection: the destination reports a stall after its timeout.
    assert!(
        matches!(r, Err(DestError::Stalled { .. } | DestError::Io { .. })),
        "{r:?}"
    );
}

#[test]
fn a_live_source_serves_one_migration() {
    if !tracking_available() {
        return;
    }
    let src = LiveSource::start(
        16 * MIB,
        |image| Box::new(DirtyWriter::start(image, 1000, 1)),
        PrecopyLimits {
            max_rounds: 8,
            max_dirty_pages: 0,
            max_duration: Duration::from_secs(5),
        },
    );
    let mut s = std::net::TcpStream::connect(&src.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // Worker 0's urgent connection without precopy: the workload stops at once (switchover).
    // A second destination cannot join the live source's one migration.
    send(
        &mut s,
        &header_bytes(&Header::hello(0, postcopy::codec::Role::Urgent, 0, 1)),
    );
    let f = read_frame(&mut s, None).expect("read").expect("Welcome");
    assert!(matches!(f, Frame::Welcome(_)));
    let mut s2 = std::net::TcpStream::connect(&src.addr).expect("connect");
    s2.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    send(
        &mut s2,
        &header_bytes(&Header::hello(0, postcopy::codec::Role::Urgent, 0, 1)),
    );
    let f = read_frame(&mut s2, None).expect("read");
    let msg = common::expect_error_frame(f, "second session of a live source");
    assert!(msg.contains("belongs to another migration"), "{msg}");
    drop(s);
    drop(s2);
    drop(src);
}

/// A live source whose precopy never converges (a fast writer, no dirty-page threshold): its
/// memory keeps changing for the length of a test.
fn never_converging_source() -> LiveSource {
    LiveSource::start(
        64 * MIB,
        |image| Box::new(DirtyWriter::start(image, 200_000, 1)),
        PrecopyLimits {
            max_rounds: 1000,
            max_dirty_pages: 0,
            max_duration: Duration::from_secs(30),
        },
    )
}

/// Opens a precopy session as worker 0 of `workers`: its connection (nothing read after the
/// `Welcome` header) and the session id.
fn open_precopy_session(addr: &str, workers: u16) -> (std::net::TcpStream, u64) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    send(
        &mut s,
        &header_bytes(&Header::hello(0, postcopy::codec::Role::Urgent, 0, workers).with_precopy()),
    );
    let mut head = [0u8; HEADER_BYTES];
    std::io::Read::read_exact(&mut s, &mut head).expect("the precopy session's Welcome header");
    let h = Header::decode(&head).expect("decode");
    assert_eq!(h.kind, Kind::Welcome);
    (s, h.page)
}

#[test]
fn verify_before_switchover_is_refused() {
    if !tracking_available() {
        return;
    }
    let src = never_converging_source();
    // Start a precopy session and leave it running (read nothing more).
    let (s, session) = open_precopy_session(&src.addr, 1);
    // A verify connection joins and asks at once: the memory still changes.
    let mut v = std::net::TcpStream::connect(&src.addr).expect("connect");
    v.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    send(
        &mut v,
        &header_bytes(&Header::hello(session, postcopy::codec::Role::Verify, 0, 1)),
    );
    let f = read_frame(&mut v, None).expect("read").expect("Welcome");
    assert!(matches!(f, Frame::Welcome(_)), "{f:?}");
    send(&mut v, &header_bytes(&Header::control(Kind::Run, 0)));
    let f = read_frame(&mut v, None).expect("read");
    let msg = common::expect_error_frame(f, "verify before switchover");
    assert!(msg.contains("before the switchover"), "{msg}");
    drop(v);
    drop(s);
    drop(src);
}

#[test]
fn source_refuses_requests_before_the_switchover() {
    if !tracking_available() {
        return;
    }
    // A destination that asks for pages while precopy still runs gets an error, not pages
    // that may still change.
    let src = never_converging_source();
    let (_s, session) = open_precopy_session(&src.addr, 2);
    let mut u = std::net::TcpStream::connect(&src.addr).expect("connect");
    u.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    send(
        &mut u,
        &header_bytes(&Header::hello(session, postcopy::codec::Role::Urgent, 1, 2)),
    );
    let f = read_frame(&mut u, None).expect("read").expect("Welcome");
    assert!(matches!(f, Frame::Welcome(_)), "{f:?}");
    send(&mut u, &header_bytes(&Header::request(0, 9000, 1)));
    let f = read_frame(&mut u, None).expect("read");
    let msg = common::expect_error_frame(f, "request before switchover");
    assert!(msg.contains("before the switchover"), "{msg}");
}
