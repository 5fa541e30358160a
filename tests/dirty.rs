//! Dirty-page tracking against the real kernel (userfaultfd async write-protect and
//! `PAGEMAP_SCAN`; no mocks), and the tracker an embedder feeds.
//!
//! Each kernel test skips, with the reason printed, only if `UffdWpTracker::available()` says
//! the host lacks the mechanism (Linux older than 6.7).

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{join_within, TIMEOUT};
use postcopy::dirty::{DirtyError, DirtyTracker, ManualTracker, UffdWpTracker};
use postcopy::sys::mem::{base_page_size, Mapping};

const MIB: usize = 1 << 20;

fn page() -> usize {
    base_page_size()
}

fn unavailable(test: &str) -> bool {
    match UffdWpTracker::available() {
        Ok(()) => false,
        Err(why) => {
            println!("skipping {test}: dirty tracking unavailable on this host: {why}");
            true
        }
    }
}

/// A seeded splitmix64: reproducible random pages without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// `n` distinct pages below `pages`.
    fn pages(&mut self, n: usize, pages: u64) -> BTreeSet<u64> {
        let mut set = BTreeSet::new();
        while set.len() < n {
            set.insert(self.next() % pages);
        }
        set
    }
}

/// Checks the runs are ascending and disjoint, and expands them to pages.
fn expand(runs: &[(u64, u64)]) -> BTreeSet<u64> {
    let mut set = BTreeSet::new();
    let mut end = 0;
    for (i, &(first, count)) in runs.iter().enumerate() {
        assert!(count > 0, "empty run {i}: {runs:?}");
        assert!(
            i == 0 || first >= end,
            "run {i} ({first}, {count}) not after the previous one ending at {end}"
        );
        end = first + count;
        set.extend(first..end);
    }
    set
}

fn collect(t: &mut dyn DirtyTracker) -> BTreeSet<u64> {
    let mut runs = Vec::new();
    t.collect(&mut runs).expect("collect");
    expand(&runs)
}

/// A region of `bytes`, every page written once (populated).
fn populated(bytes: usize) -> Mapping {
    let m = Mapping::anonymous(bytes, "dirty test region").expect("mmap");
    for p in 0..bytes / page() {
        m.write_from(p * page(), &[0x11]);
    }
    m
}

fn write_pages(m: &Mapping, pages: &BTreeSet<u64>, value: u8) {
    for &p in pages {
        // Somewhere inside the page, not only at its start.
        let at = p as usize * page() + (p as usize * 8) % page();
        m.write_from(at, &[value]);
    }
}

fn diff(got: &BTreeSet<u64>, want: &BTreeSet<u64>) -> String {
    let missing: Vec<_> = want.difference(got).take(10).collect();
    let extra: Vec<_> = got.difference(want).take(10).collect();
    format!(
        "got {} pages, want {}; missing (first 10) {missing:?}, extra (first 10) {extra:?}",
        got.len(),
        want.len()
    )
}

#[test]
fn reports_exactly_the_written_pages_then_nothing() {
    if unavailable("reports_exactly_the_written_pages_then_nothing") {
        return;
    }
    let m = populated(64 * MIB);
    let pages = (m.len_bytes() / page()) as u64;
    let mut t = UffdWpTracker::new(m.addr(), m.len_bytes()).expect("tracker");
    assert_eq!(t.pages(), pages);
    DirtyTracker::start(&mut t).expect("start");
    assert!(collect(&mut t).is_empty(), "nothing written since start");

    let mut rng = Rng(0x5eed_0001);
    for round in 0..3 {
        let want = rng.pages(500, pages);
        write_pages(&m, &want, round as u8 + 1);
        let got = collect(&mut t);
        assert!(got == want, "round {round}: {}", diff(&got, &want));
        let again = collect(&mut t);
        assert!(
            again.is_empty(),
            "round {round}: a second collect without writes reported {} pages",
            again.len()
        );
    }

    // A dense block and its neighbours: one run, exactly.
    let want: BTreeSet<u64> = (1000..1600).chain([1601, pages - 1]).collect();
    write_pages(&m, &want, 9);
    let mut runs = Vec::new();
    t.collect(&mut runs).expect("collect");
    assert_eq!(runs, vec![(1000, 600), (1601, 1), (pages - 1, 1)]);
    t.stop().expect("stop");
}

#[test]
fn more_runs_than_one_scan_returns_are_all_collected() {
    if unavailable("more_runs_than_one_scan_returns_are_all_collected") {
        return;
    }
    // Every other page of 64 MiB: 8192 separate runs, 16 PAGEMAP_SCANs of 512.
    let m = populated(64 * MIB);
    let pages = (m.len_bytes() / page()) as u64;
    let mut t = UffdWpTracker::new(m.addr(), m.len_bytes()).expect("tracker");
    t.start().expect("start");
    let want: BTreeSet<u64> = (0..pages).step_by(2).collect();
    write_pages(&m, &want, 3);
    let mut runs = Vec::new();
    t.collect(&mut runs).expect("collect");
    assert_eq!(runs.len(), want.len());
    let got = expand(&runs);
    assert!(got == want, "{}", diff(&got, &want));
    assert!(collect(&mut t).is_empty());
}

#[test]
fn unpopulated_pages_written_later_are_reported() {
    if unavailable("unpopulated_pages_written_later_are_reported") {
        return;
    }
    // Never touched before start; half of the region populated, half not.
    let m = Mapping::anonymous(16 * MIB, "dirty test region").expect("mmap");
    let pages = (m.len_bytes() / page()) as u64;
    for p in 0..pages / 2 {
        m.write_from(p as usize * page(), &[1]);
    }
    let mut t = UffdWpTracker::new(m.addr(), m.len_bytes()).expect("tracker");
    t.start().expect("start");
    let mut rng = Rng(0x5eed_0002);
    let want = rng.pages(300, pages);
    let unpopulated = want.iter().filter(|&&p| p >= pages / 2).count();
    assert!(unpopulated > 100, "the set must cover unpopulated pages");
    write_pages(&m, &want, 5);
    // Reads are not writes, of populated pages or of unpopulated ones (which map the zero
    // page, protected through the PTE marker WP_UNPOPULATED leaves there).
    let read: BTreeSet<u64> = rng.pages(300, pages).difference(&want).copied().collect();
    assert!(read.iter().filter(|&&p| p >= pages / 2).count() > 100);
    for &p in &read {
        let _ = m.touch(p as usize * page() + 1);
    }
    let got = collect(&mut t);
    assert!(got == want, "{}", diff(&got, &want));
    // Written again after the collect: reported again.
    let second: BTreeSet<u64> = want.iter().copied().take(50).collect();
    write_pages(&m, &second, 6);
    let got = collect(&mut t);
    assert!(got == second, "{}", diff(&got, &second));
}

/// The migration property: a shadow copy refreshed from each collect's pages ends equal to the
/// memory, while another thread writes throughout (a write racing a collect is never lost).
#[test]
fn concurrent_writes_are_never_lost() {
    if unavailable("concurrent_writes_are_never_lost") {
        return;
    }
    let m = Arc::new(populated(32 * MIB));
    let pages = (m.len_bytes() / page()) as u64;
    let read_word = |p: u64| {
        let mut b = [0u8; 8];
        m.read_into(p as usize * page(), &mut b);
        u64::from_ne_bytes(b)
    };
    let mut t = UffdWpTracker::new(m.addr(), m.len_bytes()).expect("tracker");
    t.start().expect("start");
    // The first full pass, after start: every later write is the tracker's to report.
    let mut shadow: Vec<u64> = (0..pages).map(read_word).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let m = Arc::clone(&m);
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut rng = Rng(0x5eed_0003);
            let mut written = BTreeSet::new();
            let mut n = 1u64;
            while !stop.load(Ordering::Relaxed) {
                // Bursts in a hot set (rewritten pages) and anywhere.
                let p = if n % 4 == 0 {
                    rng.next() % pages
                } else {
                    rng.next() % 512
                };
                m.write_from(p as usize * page(), &n.to_ne_bytes());
                written.insert(p);
                n += 1;
            }
            (written, n - 1)
        })
    };
    let deadline = Instant::now() + Duration::from_millis(700);
    let mut collects = 0;
    let mut reported = BTreeSet::new();
    let mut runs = Vec::new();
    while Instant::now() < deadline {
        runs.clear();
        t.collect(&mut runs).expect("collect");
        for p in expand(&runs) {
            shadow[p as usize] = read_word(p);
            reported.insert(p);
        }
        collects += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let (written, writes) = join_within(writer, TIMEOUT, "writer thread after its stop");
    runs.clear();
    t.collect(&mut runs).expect("final collect");
    for p in expand(&runs) {
        shadow[p as usize] = read_word(p);
        reported.insert(p);
    }
    let stale: Vec<u64> = (0..pages)
        .filter(|&p| shadow[p as usize] != read_word(p))
        .take(10)
        .collect();
    assert!(
        stale.is_empty(),
        "{writes} writes, {collects} collects: pages whose last write was never reported (first 10): {stale:?}"
    );
    assert!(
        reported == written,
        "{writes} writes, {collects} collects: {}",
        diff(&reported, &written)
    );
    assert!(collects > 10, "only {collects} collects ran");
    println!(
        "{writes} writes to {} pages, {collects} collects: none lost",
        written.len()
    );
}

#[test]
fn transparent_huge_pages_come_back_at_base_page_granularity() {
    if unavailable("transparent_huge_pages_come_back_at_base_page_granularity") {
        return;
    }
    let thp =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if thp.is_empty() || thp.contains("[never]") {
        println!("skipping: transparent huge pages are off ({thp:?})");
        return;
    }
    // Populated as THPs before start (MADV_HUGEPAGE), then tracked: start applies
    // MADV_NOHUGEPAGE, and a protected huge page is split at its first write.
    let m = Mapping::anonymous(16 * MIB, "dirty thp region").expect("mmap");
    m.huge_pages().expect("MADV_HUGEPAGE");
    for p in 0..m.len_bytes() / page() {
        m.write_from(p * page(), &[1]);
    }
    let huge_before = anon_huge_kib();
    let mut t = UffdWpTracker::new(m.addr(), m.len_bytes()).expect("tracker");
    t.start().expect("start");
    let huge_started = anon_huge_kib();
    let pages = (m.len_bytes() / page()) as u64;
    // One page in every other 2 MiB.
    let want: BTreeSet<u64> = (0..pages).step_by(1024).map(|p| p + 7).collect();
    write_pages(&m, &want, 2);
    let got = collect(&mut t);
    println!(
        "AnonHugePages before start {huge_before} KiB, after start {huge_started} KiB, \
         after the writes {} KiB",
        anon_huge_kib()
    );
    assert!(got == want, "{}", diff(&got, &want));
    assert!(collect(&mut t).is_empty());
}

/// `AnonHugePages` of this process, in KiB (0 if unknown).
fn anon_huge_kib() -> u64 {
    std::fs::read_to_string("/proc/self/smaps_rollup")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("AnonHugePages:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn stop_unregisters_and_collect_needs_start() {
    if unavailable("stop_unregisters_and_collect_needs_start") {
        return;
    }
    let m = populated(MIB);
    let mut t = UffdWpTracker::new(m.addr(), m.len_bytes()).expect("tracker");
    let mut runs = Vec::new();
    assert!(matches!(t.collect(&mut runs), Err(DirtyError::NotStarted)));
    t.start().expect("start");
    m.write_from(0, &[1]);
    // A second start forgets what was not collected.
    t.start().expect("restart");
    assert!(collect(&mut t).is_empty());
    t.stop().expect("stop");
    t.stop().expect("stop is idempotent");
    assert!(matches!(t.collect(&mut runs), Err(DirtyError::NotStarted)));
    // The range is free again: a second tracker registers it (EBUSY if still registered).
    let mut again = UffdWpTracker::new(m.addr(), m.len_bytes()).expect("tracker");
    again.start().expect("start after stop");
    m.write_from(5 * page(), &[1]);
    assert_eq!(collect(&mut again), BTreeSet::from([5]));
    drop(again);
    let mut third = UffdWpTracker::new(m.addr(), m.len_bytes()).expect("tracker");
    third.start().expect("start after drop");
}

#[test]
fn a_range_tracked_twice_is_refused_with_a_reason() {
    if unavailable("a_range_tracked_twice_is_refused_with_a_reason") {
        return;
    }
    let m = populated(4 * page());
    let mut first = UffdWpTracker::new(m.addr(), m.len_bytes()).expect("tracker");
    first.start().expect("start");
    let mut second = UffdWpTracker::new(m.addr(), m.len_bytes()).expect("tracker");
    let err = second
        .start()
        .expect_err("a range registered with another userfaultfd");
    println!("{err}");
    assert!(
        err.to_string()
            .contains("already registered with another userfaultfd"),
        "{err}"
    );
    // The first tracker is unaffected.
    m.write_from(page(), &[1]);
    assert_eq!(collect(&mut first), BTreeSet::from([1]));
}

#[test]
fn manual_tracker_round_trip() {
    let mut t = ManualTracker::new(1000);
    let feeder = t.clone();
    t.start().unwrap();
    let mut runs = Vec::new();
    t.collect(&mut runs).unwrap();
    assert!(runs.is_empty());

    feeder.mark(5, 1);
    feeder.mark(60, 10); // crosses a word boundary
    feeder.mark(6, 1); // extends the first run
    feeder.mark(999, 1);
    t.collect(&mut runs).unwrap();
    assert_eq!(runs, vec![(5, 2), (60, 10), (999, 1)]);
    runs.clear();
    t.collect(&mut runs).unwrap();
    assert!(runs.is_empty(), "collect resets: {runs:?}");

    // A KVM-style bitmap for pages 128.., with bits past the region ignored.
    feeder.mark_words(128, &[0b1011, 0, 1 << 63]);
    feeder.mark_words(960, &[u64::MAX]);
    t.collect(&mut runs).unwrap();
    assert_eq!(runs, vec![(128, 2), (131, 1), (128 + 191, 1), (960, 40)]);
    runs.clear();

    feeder.mark_all();
    t.collect(&mut runs).unwrap();
    assert_eq!(runs, vec![(0, 1000)]);
    t.stop().unwrap();
}

#[test]
fn manual_tracker_loses_no_concurrent_mark() {
    let mut t = ManualTracker::new(1 << 16);
    let feeder = t.clone();
    let marker = std::thread::spawn(move || {
        let mut rng = Rng(7);
        let mut marked = BTreeSet::new();
        for _ in 0..200_000 {
            let p = rng.next() % (1 << 16);
            feeder.mark(p, 1);
            marked.insert(p);
        }
        marked
    });
    let mut got = BTreeSet::new();
    let mut runs = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    while !marker.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the marking thread did not finish its 200000 marks within {TIMEOUT:?}"
        );
        runs.clear();
        t.collect(&mut runs).unwrap();
        got.extend(expand(&runs));
    }
    let marked = join_within(marker, TIMEOUT, "marking thread");
    runs.clear();
    t.collect(&mut runs).unwrap();
    got.extend(expand(&runs));
    assert!(got == marked, "{}", diff(&got, &marked));
}

#[test]
#[should_panic(expected = "outside a region")]
fn manual_tracker_rejects_pages_outside_the_region() {
    ManualTracker::new(10).mark(9, 2);
}

#[test]
fn trackers_are_object_safe_and_send() {
    fn boxed(t: impl DirtyTracker + 'static) -> Box<dyn DirtyTracker> {
        Box::new(t)
    }
    let mut trackers = vec![boxed(ManualTracker::new(8))];
    if UffdWpTracker::available().is_ok() {
        let m = Mapping::anonymous(8 * page(), "dirty test region").expect("mmap");
        trackers.push(boxed(
            UffdWpTracker::new(m.addr(), m.len_bytes()).expect("tracker"),
        ));
        for t in &mut trackers {
            t.start().unwrap();
        }
        // Dropped on another thread (stops tracking) before the memory is unmapped.
        join_within(
            std::thread::spawn(move || drop(trackers)),
            TIMEOUT,
            "dropping the trackers on another thread",
        );
        drop(m);
    }
}
