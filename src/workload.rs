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

/// Longest fault latency the histograms record: 60 s, in ns.
const LATENCY_MAX_NS: u64 = 60_000_000_000;

/// A fault-latency histogram (1 ns .. 60 s, 3 significant digits).
fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_NS, 3).expect("valid histogram bounds")
}

/// What every workload thread shares: the memory, the pattern, and who claimed which page.
struct Shared<'a> {
    ram: &'a DestRam,
    image: Option<&'a Synthetic>,
    /// Checksum of every page at its first touch, by global page index.
    first_touch: Vec<AtomicU64>,
    /// The pages a thread has claimed (each is verified and written by that thread only).
    claimed: PageBitmap,
    /// Mismatches so far, every thread.
    mismatch_count: AtomicU64,
    /// `Random`: the permutation the threads split; empty otherwise.
    order: Vec<u64>,
    /// `Zipf`: a random ranking of the pages, hottest first; empty otherwise.
    ranking: Vec<u64>,
    total: u64,
    threads: usize,
    pattern: Pattern,
    seed: u64,
}

impl<'a> Shared<'a> {
    fn new(ram: &'a DestRam, image: Option<&'a Synthetic>, config: &WorkloadConfig) -> Self {
        let total = ram.layout.total_pages();
        let mut rng = Rng::new(config.seed);
        let order: Vec<u64> = match config.pattern {
            Pattern::Random => permutation(total, &mut rng),
            Pattern::Sequential | Pattern::Zipf => Vec::new(),
        };
        // Zipf: hot pages are the front of a random ranking.
        let ranking: Vec<u64> = match config.pattern {
            Pattern::Zipf => permutation(total, &mut rng),
            Pattern::Random | Pattern::Sequential => Vec::new(),
        };
        Shared {
            ram,
            image,
            first_touch: (0..total).map(|_| AtomicU64::new(0)).collect(),
            claimed: PageBitmap::new(total),
            mismatch_count: AtomicU64::new(0),
            order,
            ranking,
            total,
            threads: config.threads.max(1),
            pattern: config.pattern,
            seed: config.seed,
        }
    }

    /// Completes what the threads saw (`out`, see [`merge`]) with the first-touch checksums.
    /// Any page no thread claimed (cannot happen: every pattern sweeps every page) would
    /// escape verification: it counts as a mismatch rather than being trusted.
    fn finish(self, mut out: WorkloadResult) -> WorkloadResult {
        debug_assert!(out.first_touch.is_empty());
        let unclaimed = self.total - self.claimed.count_ones();
        debug_assert_eq!(
            out.touches,
            self.claimed.count_ones(),
            "one claim, one touch"
        );
        out.first_touch = self
            .first_touch
            .into_iter()
            .map(AtomicU64::into_inner)
            .collect();
        if unclaimed > 0 {
            out.mismatches += unclaimed;
            out.first_mismatch
                .get_or_insert_with(|| format!("{unclaimed} pages were never touched"));
        }
        out
    }
}

/// The sum of what the threads' `touchers` saw (the first mismatch is the first thread's).
fn merge(touchers: Vec<Toucher<'_>>) -> WorkloadResult {
    let mut out = WorkloadResult {
        touches: 0,
        faults: 0,
        latency_ns: latency_histogram(),
        mismatches: 0,
        first_mismatch: None,
        first_touch: Vec::new(),
    };
    for w in touchers {
        out.touches += w.touches;
        out.faults += w.faults;
        out.latency_ns.add(&w.hist).expect("same bounds");
        out.mismatches += w.mismatches;
        if out.first_mismatch.is_none() {
            out.first_mismatch = w.first_mismatch;
        }
    }
    out
}

/// One workload thread: its scratch pages and what it saw.
struct Toucher<'a> {
    shared: &'a Shared<'a>,
    page: Vec<u8>,
    expect: Vec<u8>,
    touches: u64,
    faults: u64,
    hist: Histogram<u64>,
    mismatches: u64,
    first_mismatch: Option<String>,
}

impl<'a> Toucher<'a> {
    fn new(shared: &'a Shared<'a>) -> Self {
        let max_page = shared.ram.layout.max_page_size() as usize;
        Toucher {
            shared,
            page: vec![0u8; max_page],
            expect: vec![0u8; max_page],
            touches: 0,
            faults: 0,
            hist: latency_histogram(),
            mismatches: 0,
            first_mismatch: None,
        }
    }

    /// Thread `t`'s share of the pattern.
    fn walk(&mut self, t: usize) {
        let s = self.shared;
        let (start, end) = crate::layout::shard(s.total, t, s.threads);
        match s.pattern {
            Pattern::Random => {
                for &g in &s.order[start as usize..end as usize] {
                    self.touch(g);
                }
            }
            Pattern::Sequential => {
                for g in start..end {
                    self.touch(g);
                }
            }
            Pattern::Zipf => self.walk_zipf(t, start, end),
        }
    }

    /// Zipf(1) draws (half as many as the shard's pages), then every page of the shard not
    /// yet claimed.
    fn walk_zipf(&mut self, t: usize, start: u64, end: u64) {
        let s = self.shared;
        // Zipf(1) by inversion of its continuous approximation: P(rank <= k) ~ ln k / ln n.
        let mut rng = Rng::new(s.seed ^ ((t as u64 + 1) * 0x1234_5678_9abc));
        let ln_n = (s.total as f64).ln();
        for _ in 0..(end - start) / 2 {
            let rank = ((rng.unit() * ln_n).exp() as u64)
                .saturating_sub(1)
                .min(s.total - 1);
            self.touch(s.ranking[rank as usize]);
        }
        for g in start..end {
            if !s.claimed.get(g) {
                self.touch(g);
            }
        }
    }

    /// Touches page `global`, timing the fault if it was missing; the first toucher claims
    /// it, checks it and writes to it.
    fn touch(&mut self, global: u64) {
        let ram = self.shared.ram;
        let (b, page) = locate(ram, global);
        let ps = ram.layout.blocks[b].page_size as usize;
        let offset = page as usize * ps;
        let region = &ram.regions[b];
        let was_missing = !ram.received[b].get(page);
        let t0 = Instant::now();
        region.touch(offset);
        let dt = t0.elapsed().as_nanos() as u64;
        if was_missing {
            self.faults += 1;
            let _ = self.hist.record(dt.max(1));
        }
        if !self.shared.claimed.set(global) {
            return; // another thread verifies and writes this page
        }
        self.touches += 1;
        region.read_into(offset, &mut self.page[..ps]);
        let got = page_checksum(&self.page[..ps]);
        self.shared.first_touch[global as usize].store(got, Ordering::Relaxed);
        let want = match self.shared.image {
            Some(image) => {
                image.fill(b as u32, page, &mut self.expect[..ps]);
                page_checksum(&self.expect[..ps])
            }
            None => got, // checked later against the source's checksums
        };
        if got != want {
            self.mismatches += 1;
            self.shared.mismatch_count.fetch_add(1, Ordering::Relaxed);
            self.first_mismatch.get_or_insert_with(|| {
                format!(
                    "block {b} page {page} ({}): checksum {got:#018x}, expected {want:#018x} (first touch)",
                    self.shared.ram.placed_by.get(b, page).describe()
                )
            });
        }
        region.xor_u64(offset, WRITE_MARK);
    }
}

/// Runs the workload to completion: every page is touched (claimed) once, and checked at once
/// against `image` when given.
pub fn run(ram: &DestRam, image: Option<&Synthetic>, config: &WorkloadConfig) -> WorkloadResult {
    let shared = Shared::new(ram, image, config);
    let touchers: Vec<Toucher<'_>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..shared.threads)
            .map(|t| {
                let shared = &shared;
                std::thread::Builder::new()
                    .name(format!("workload-{t}"))
                    .spawn_scoped(s, move || {
                        let mut w = Toucher::new(shared);
                        w.walk(t);
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
    let out = merge(touchers);
    shared.finish(out)
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
            format!(
                "block {b} page {p} ({}): checksum {got:#018x}, expected {want:#018x} (final check)",
                ram.placed_by.get(b, p).describe()
            )
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
                    "block {b} page {p} ({}): checksum {:#018x} at first touch, source had {want:#018x}",
                    ram.placed_by.get(b, p).describe(),
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
                "block {b} page {p} ({}): checksum {got:#018x}, source had {want:#018x} (final check)",
                ram.placed_by.get(b, p).describe()
            )
        })
    })
}
