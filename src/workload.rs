//! The demo's destination workload: threads that touch pages in a pattern, time each fault from
//! the touch to the resumption, verify each page's checksum on first touch, then write to it.
//!
//! Every page is claimed by exactly one thread (an atomic bitmap), which verifies and writes it;
//! other threads touching a claimed page only read it. After the migration [`final_check`]
//! verifies every page once more, including the workload's own write.
//!
//! When the expected contents are not known up front (a live source: they are fixed only at
//! its switchover), the workload records each page's checksum at first touch
//! ([`WorkloadResult::first_touch`]) and [`check_checksums`] compares both the first-touch and
//! the final contents with the source's checksums afterwards.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use hdrhistogram::Histogram;

use crate::dest::DestRam;
use crate::image::{page_checksum, Synthetic};
use crate::layout::PageBitmap;
use crate::rng::Rng;

/// The value the workload XORs into the first word of every page it claims.
pub const WRITE_MARK: u64 = 0x5eed_cafe_f00d_beef;

/// How the workload threads touch pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// Every page once, in a random permutation split across the threads.
    Random,
    /// Every page in order (each thread a contiguous slice).
    Sequential,
    /// Skewed draws (hot pages first), then every page not yet touched.
    Zipf,
}

/// Workload parameters.
#[derive(Clone, Debug)]
pub struct WorkloadConfig {
    /// Threads.
    pub threads: usize,
    /// Pattern.
    pub pattern: Pattern,
    /// Seed of the pattern.
    pub seed: u64,
}

/// What the workload saw.
#[derive(Debug)]
pub struct WorkloadResult {
    /// First touches (claimed pages).
    pub touches: u64,
    /// Touches of pages that were not yet placed at the touch (faults).
    pub faults: u64,
    /// Fault latency in nanoseconds, from the touch to the resumption.
    pub latency_ns: Histogram<u64>,
    /// Pages whose checksum did not match on first touch.
    pub mismatches: u64,
    /// The first mismatch, described.
    pub first_mismatch: Option<String>,
    /// Checksum of every page at its first touch (before the workload's write), by global
    /// page index.
    pub first_touch: Vec<u64>,
}

/// A random permutation of `0..n`.
pub fn permutation(n: u64, rng: &mut Rng) -> Vec<u64> {
    let mut v: Vec<u64> = (0..n).collect();
    for i in (1..v.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
    v
}

/// Global page index → (block, page).
fn locate(ram: &DestRam, mut global: u64) -> (usize, u64) {
    for (b, block) in ram.layout.blocks.iter().enumerate() {
        if global < block.pages() {
            return (b, global);
        }
        global -= block.pages();
    }
    panic!("global page index beyond the layout");
}

struct Toucher<'a> {
    ram: &'a DestRam,
    image: Option<&'a Synthetic>,
    first_touch: &'a [AtomicU64],
    claimed: &'a PageBitmap,
    page: Vec<u8>,
    expect: Vec<u8>,
    touches: u64,
    faults: u64,
    hist: Histogram<u64>,
    mismatches: u64,
    first_mismatch: Option<String>,
    mismatch_count: &'a AtomicU64,
}

impl Toucher<'_> {
    fn touch(&mut self, global: u64) {
        let (b, page) = locate(self.ram, global);
        let ps = self.ram.layout.blocks[b].page_size as usize;
        let offset = page as usize * ps;
        let region = &self.ram.regions[b];
        let was_missing = !self.ram.received[b].get(page);
        let t0 = Instant::now();
        region.touch(offset);
        let dt = t0.elapsed().as_nanos() as u64;
        if was_missing {
            self.faults += 1;
            let _ = self.hist.record(dt.max(1));
        }
        if !self.claimed.set(global) {
            return; // another thread verifies and writes this page
        }
        self.touches += 1;
        region.read_into(offset, &mut self.page[..ps]);
        let got = page_checksum(&self.page[..ps]);
        self.first_touch[global as usize].store(got, Ordering::Relaxed);
        let want = match self.image {
            Some(image) => {
                image.fill(b as u32, page, &mut self.expect[..ps]);
                page_checksum(&self.expect[..ps])
            }
            None => got, // checked later against the source's checksums
        };
        if got != want {
            self.mismatches += 1;
            self.mismatch_count.fetch_add(1, Ordering::Relaxed);
            self.first_mismatch.get_or_insert_with(|| {
                format!(
                    "block {b} page {page}: checksum {got:#018x}, expected {want:#018x} (first touch)"
                )
            });
        }
        region.xor_u64(offset, WRITE_MARK);
    }
}

/// Runs the workload to completion: every page is touched (claimed) once, and checked at once
/// against `image` when given.
pub fn run(ram: &DestRam, image: Option<&Synthetic>, config: &WorkloadConfig) -> WorkloadResult {
    let total = ram.layout.total_pages();
    let threads = config.threads.max(1);
    let claimed = PageBitmap::new(total);
    let first_touch: Vec<AtomicU64> = (0..total).map(|_| AtomicU64::new(0)).collect();
    let mismatch_count = AtomicU64::new(0);
    let mut rng = Rng::new(config.seed);
    let order: Vec<u64> = match config.pattern {
        Pattern::Random => permutation(total, &mut rng),
        Pattern::Sequential | Pattern::Zipf => Vec::new(),
    };
    // Zipf: hot pages are the front of a random ranking.
    let ranking: Vec<u64> = match config.pattern {
        Pattern::Zipf => permutation(total, &mut rng),
        _ => Vec::new(),
    };
    let max_page = ram.layout.max_page_size() as usize;
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (claimed, order, ranking, mismatch_count, first_touch) =
                    (&claimed, &order, &ranking, &mismatch_count, &first_touch);
                let pattern = config.pattern;
                let seed = config.seed;
                std::thread::Builder::new()
                    .name(format!("workload-{t}"))
                    .spawn_scoped(s, move || {
                        let mut w = Toucher {
                            ram,
                            image,
                            first_touch,
                            claimed,
                            page: vec![0u8; max_page],
                            expect: vec![0u8; max_page],
                            touches: 0,
                            faults: 0,
                            hist: Histogram::new_with_bounds(1, 60_000_000_000, 3)
                                .expect("valid histogram bounds"),
                            mismatches: 0,
                            first_mismatch: None,
                            mismatch_count,
                        };
                        let (start, end) = crate::layout::shard(total, t, threads);
                        match pattern {
                            Pattern::Random => {
                                for &g in &order[start as usize..end as usize] {
                                    w.touch(g);
                                }
                            }
                            Pattern::Sequential => {
                                for g in start..end {
                                    w.touch(g);
                                }
                            }
                            Pattern::Zipf => {
                                // Zipf(1) by inversion of its continuous approximation:
                                // P(rank <= k) ~ ln k / ln n.
                                let mut rng = Rng::new(seed ^ ((t as u64 + 1) * 0x1234_5678_9abc));
                                let ln_n = (total as f64).ln();
                                for _ in 0..(end - start) / 2 {
                                    let rank = ((rng.unit() * ln_n).exp() as u64)
                                        .saturating_sub(1)
                                        .min(total - 1);
                                    w.touch(ranking[rank as usize]);
                                }
                                for g in start..end {
                                    if !claimed.get(g) {
                                        w.touch(g);
                                    }
                                }
                            }
                        }
                        w
                    })
                    .expect("spawn workload thread")
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("workload thread panicked"))
            .collect()
    });
    let mut out = WorkloadResult {
        touches: 0,
        faults: 0,
        latency_ns: Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds"),
        mismatches: 0,
        first_mismatch: None,
        first_touch: Vec::new(),
    };
    for w in results {
        out.touches += w.touches;
        out.faults += w.faults;
        out.latency_ns.add(&w.hist).expect("same bounds");
        out.mismatches += w.mismatches;
        if out.first_mismatch.is_none() {
            out.first_mismatch = w.first_mismatch;
        }
    }
    // Any page no thread claimed (cannot happen: every pattern sweeps every page) would
    // escape verification: count it as a mismatch rather than trust it.
    out.first_touch = first_touch.into_iter().map(AtomicU64::into_inner).collect();
    let unclaimed = total - claimed.count_ones();
    if unclaimed > 0 {
        out.mismatches += unclaimed;
        out.first_mismatch
            .get_or_insert_with(|| format!("{unclaimed} pages were never touched"));
    }
    out
}

/// Reads every page of `ram` on `threads` threads and asks
/// `check(global, block, page, bytes, scratch)` (scratch: one page, per thread) for a mismatch
/// description. Returns (pages checked, mismatches, first mismatch).
fn scan_pages(
    ram: &DestRam,
    threads: usize,
    check: impl Fn(u64, usize, u64, &mut [u8], &mut [u8]) -> Option<String> + Sync,
) -> (u64, u64, Option<String>) {
    let total = ram.layout.total_pages();
    let threads = threads.max(1);
    let max_page = ram.layout.max_page_size() as usize;
    let check = &check;
    let parts: Vec<(u64, Option<String>)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut page = vec![0u8; max_page];
                    let mut scratch = vec![0u8; max_page];
                    let (start, end) = crate::layout::shard(total, t, threads);
                    let (mut bad, mut first) = (0, None);
                    for g in start..end {
                        let (b, p) = locate(ram, g);
                        let ps = ram.layout.blocks[b].page_size as usize;
                        ram.regions[b].read_into(p as usize * ps, &mut page[..ps]);
                        if let Some(m) = check(g, b, p, &mut page[..ps], &mut scratch[..ps]) {
                            bad += 1;
                            first.get_or_insert(m);
                        }
                    }
                    (bad, first)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("check thread panicked"))
            .collect()
    });
    let bad = parts.iter().map(|p| p.0).sum();
    let first = parts.into_iter().find_map(|p| p.1);
    (total, bad, first)
}

/// Undoes the workload's write ([`WRITE_MARK`] in the first word) on a page copy.
fn unmark(page: &mut [u8]) {
    let w = u64::from_ne_bytes(page[..8].try_into().expect("8 bytes"));
    page[..8].copy_from_slice(&(w ^ WRITE_MARK).to_ne_bytes());
}

/// After the migration: every page holds the image's content, with the workload's write
/// applied when `written`. Returns (pages checked, mismatches, first mismatch). Runs on
/// `threads` threads.
pub fn final_check(
    ram: &DestRam,
    image: &Synthetic,
    threads: usize,
    written: bool,
) -> (u64, u64, Option<String>) {
    scan_pages(ram, threads, |_, b, p, page, expect| {
        if written {
            unmark(page);
        }
        let got = page_checksum(page);
        image.fill(b as u32, p, expect);
        let want = page_checksum(expect);
        (got != want).then(|| {
            format!("block {b} page {p}: checksum {got:#018x}, expected {want:#018x} (final check)")
        })
    })
}

/// After the migration, against checksums from the source (`expected`, by global page): the
/// first-touch checksums (when given) and every page's content now, with the workload's write
/// undone when `written`. Returns (pages checked, mismatches, first mismatch).
pub fn check_checksums(
    ram: &DestRam,
    expected: &[u64],
    first_touch: Option<&[u64]>,
    threads: usize,
    written: bool,
) -> (u64, u64, Option<String>) {
    assert_eq!(
        expected.len() as u64,
        ram.layout.total_pages(),
        "one checksum per page"
    );
    scan_pages(ram, threads, |g, b, p, page, _| {
        let want = expected[g as usize];
        if let Some(ft) = first_touch {
            if ft[g as usize] != want {
                return Some(format!(
                    "block {b} page {p}: checksum {:#018x} at first touch, source had {want:#018x}",
                    ft[g as usize]
                ));
            }
        }
        if written {
            unmark(page);
        }
        let got = page_checksum(page);
        (got != want).then(|| {
            format!(
                "block {b} page {p}: checksum {got:#018x}, source had {want:#018x} (final check)"
            )
        })
    })
}
