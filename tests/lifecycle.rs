//! The whole lifecycle against a live source: precopy rounds while the source's workload
//! writes, switchover with discards, postcopy of the rest, and verification of every page
//! against the checksums the source takes of its final memory. Real kernel, real sockets.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{join_within, layout, MIB, PAGE, TIMEOUT};
use postcopy::dest::{self, DestRam, Engine, EngineConfig};
use postcopy::dirty::{DirtyTracker, UffdWpTracker};
use postcopy::image::{page_checksum, Synthetic};
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
    thread: Option<std::thread::JoinHandle<Vec<SessionReport>>>,
}

impl LiveSource {
    fn start(
        size_bytes: u64,
        workload: impl FnOnce(Arc<LiveImage>) -> Box<dyn SourceWorkload>,
        limits: PrecopyLimits,
    ) -> LiveSource {
        let synthetic = Synthetic::new(layout(size_bytes), 0x11fe, 20);
        let image = Arc::new(LiveImage::from_synthetic(&synthetic, 2).expect("live image"));
        let trackers: Vec<Box<dyn DirtyTracker>> = vec![Box::new(
            UffdWpTracker::new(image.region(0).addr(), size_bytes as usize).expect("tracker"),
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
        let thread = std::thread::spawn(move || server.run().expect("source run"));
        LiveSource {
            addr,
            image,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<SessionReport> {
        join_within(self.thread.take().expect("thread"), TIMEOUT, "live source")
    }
}

fn run_spec(precopy: bool) -> postcopy::demo::RunSpec {
    postcopy::demo::RunSpec {
        handler: postcopy::demo::Handler::Engine,
        workers: 2,
        pin: false,
        stream: true,
        workload: Some(WorkloadConfig {
            threads: 2,
            pattern: Pattern::Random,
            seed: 9,
        }),
        progress: false,
        zero_map: false,
        zero_fill: postcopy::dest::ZeroFill::Zeropage,
        max_streams: 0,
        precopy,
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
    let t = std::thread::spawn(move || postcopy::demo::run_destination(&addr, &run_spec(true)));
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
        let ram = Arc::new(DestRam::new(&connected.welcome.layout).expect("ram"));
        let pre = dest::receive_precopy(&mut connected, &ram, &config).expect("precopy");
        // Discarded pages are missing now: their received bits are clear.
        for &p in &written {
            assert!(
                !ram.received[0].get(p),
                "page {p} still marked received after discard"
            );
        }
        let handle = Engine::start(connected, ram.clone(), &config).expect("start");
        let report = handle.wait().expect("engine");
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

#[test]
fn live_writer_under_load_migrates_and_verifies() {
    if !tracking_available() {
        return;
    }
    // 200k pages/s on 32 MiB (8192 pages): precopy cannot converge under 1024 dirty pages; it
    // must switch over at its round limit and still verify.
    let src = LiveSource::start(
        32 * MIB,
        |image| Box::new(DirtyWriter::start(image, 200_000, 3)),
        PrecopyLimits {
            max_rounds: 4,
            max_dirty_pages: 16,
            max_duration: Duration::from_secs(20),
        },
    );
    let addr = src.addr.clone();
    let t = std::thread::spawn(move || postcopy::demo::run_destination(&addr, &run_spec(true)));
    let out = join_within(t, TIMEOUT, "destination").expect("destination run");
    assert!(out.verified(), "not verified: {:?}", out.final_mismatches);
    let pre = out.precopy.as_ref().expect("precopy");
    assert_eq!(
        pre.round_pages.len(),
        4,
        "switched over at the round limit: {:?}",
        pre.round_pages
    );
    assert!(pre.pages_dirty_at_switchover > 16);
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
    let report = handle.wait().expect("engine");
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
