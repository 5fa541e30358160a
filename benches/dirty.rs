//! Criterion benches of dirty-page collection on the source.
//!
//! `cargo bench --bench dirty` measures; `cargo test --release --benches` runs each once as a
//! smoke test (CI). The kernel benches track a populated 1 GiB anonymous region with
//! `UffdWpTracker` (userfaultfd async write-protect + `PAGEMAP_SCAN`); only `collect` is timed,
//! the writes that dirty the pages (one async write-protect fault each) happen outside the timed
//! part. They are skipped, with the reason printed, on hosts without the mechanism.

use std::collections::BTreeSet;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use postcopy::dirty::{DirtyTracker, ManualTracker, UffdWpTracker};
use postcopy::sys::mem::{base_page_size, Mapping};

const REGION: usize = 1 << 30;

/// 1% of the pages of the region (2621 of 262144 with 4 KiB pages), a fixed random set.
fn one_percent(pages: u64) -> Vec<u64> {
    let mut state = 0x5eed_d1b7_u64;
    let mut set = BTreeSet::new();
    while (set.len() as u64) < pages / 100 {
        // splitmix64
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        set.insert((z ^ (z >> 31)) % pages);
    }
    set.into_iter().collect()
}

fn pages_in(runs: &[(u64, u64)]) -> u64 {
    runs.iter().map(|r| r.1).sum()
}

fn uffd_wp_benches(c: &mut Criterion) {
    if let Err(why) = UffdWpTracker::available() {
        println!("skipping dirty_scan: dirty tracking unavailable on this host: {why}");
        return;
    }
    let page = base_page_size();
    let region = Mapping::anonymous(REGION, "bench dirty region").expect("mmap");
    for p in 0..REGION / page {
        region.write_from(p * page, &[1]);
    }
    let mut tracker = UffdWpTracker::new(region.addr(), REGION).expect("tracker");
    tracker.start().expect("start");
    let dirty = one_percent(tracker.pages());
    let mut runs = Vec::with_capacity(dirty.len());

    let mut g = c.benchmark_group("dirty_scan");
    g.throughput(Throughput::Bytes(REGION as u64));
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    g.bench_function("1GiB_1pct", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                for &p in &dirty {
                    region.write_from(p as usize * page, &[2]);
                }
                runs.clear();
                let t0 = Instant::now();
                tracker.collect(black_box(&mut runs)).expect("collect");
                timed += t0.elapsed();
                assert_eq!(pages_in(&runs), dirty.len() as u64, "collect missed pages");
            }
            timed
        })
    });
    g.bench_function("1GiB_clean", |b| {
        b.iter(|| {
            runs.clear();
            tracker.collect(black_box(&mut runs)).expect("collect");
            assert!(runs.is_empty());
        })
    });
    g.finish();
    tracker.stop().expect("stop");
}

fn manual_benches(c: &mut Criterion) {
    let pages = (REGION / base_page_size()) as u64;
    let mut tracker = ManualTracker::new(pages);
    let dirty = one_percent(pages);
    let mut runs = Vec::with_capacity(dirty.len());
    let mut g = c.benchmark_group("dirty_manual");
    g.throughput(Throughput::Bytes(REGION as u64));
    g.bench_function("1GiB_1pct", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                for &p in &dirty {
                    tracker.mark(p, 1);
                }
                runs.clear();
                let t0 = Instant::now();
                tracker.collect(black_box(&mut runs)).expect("collect");
                timed += t0.elapsed();
                assert_eq!(pages_in(&runs), dirty.len() as u64);
            }
            timed
        })
    });
    g.finish();
}

criterion_group!(benches, uffd_wp_benches, manual_benches);
criterion_main!(benches);
