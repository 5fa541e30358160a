//! RAM layout: named blocks of memory, and the atomic page bitmaps that track them.
//!
//! A block is what QEMU calls a RAMBlock: a named, contiguous range with one page size. Pages
//! are addressed on the wire as (block index, page index); every such pair from the network is
//! checked against the layout ([`Layout::check_range`]) before it is used.

use std::sync::atomic::{AtomicU64, Ordering};

/// Largest number of blocks a layout may have.
pub const MAX_BLOCKS: usize = 1024;
/// Longest block name, in bytes.
pub const MAX_NAME_BYTES: usize = 255;
/// Largest block, in bytes (256 TiB: page indices then fit comfortably in 48 bits).
pub const MAX_BLOCK_BYTES: u64 = 1 << 48;

/// Errors of layout validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// No blocks at all.
    #[error("the layout has no blocks")]
    Empty,
    /// Too many blocks.
    #[error("the layout has {0} blocks; at most {MAX_BLOCKS} are supported")]
    TooManyBlocks(usize),
    /// A page size that is not a power of two of at least 4 KiB.
    #[error("block {name:?}: page size {page_size} is not a power of two >= 4096")]
    BadPageSize {
        /// Block name.
        name: String,
        /// The page size.
        page_size: u64,
    },
    /// A size that is zero, too large or not a multiple of the page size.
    #[error("block {name:?}: size {size_bytes} is zero, above 256 TiB, or not a multiple of its page size {page_size}")]
    BadSize {
        /// Block name.
        name: String,
        /// The size.
        size_bytes: u64,
        /// The page size.
        page_size: u64,
    },
    /// A name too long or not printable.
    #[error(
        "block name {0:?} is empty, longer than {MAX_NAME_BYTES} bytes, or has control characters"
    )]
    BadName(String),
    /// Two blocks with one name.
    #[error("block name {0:?} appears twice")]
    DuplicateName(String),
    /// A (block, page, count) outside the layout.
    #[error("pages [{page}, {page}+{count}) of block {block} are outside the layout ({detail})")]
    OutOfRange {
        /// Block index.
        block: u32,
        /// First page.
        page: u64,
        /// Page count.
        count: u64,
        /// Why.
        detail: String,
    },
}

/// One named block of memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    /// Name (e.g. `pc.ram`).
    pub name: String,
    /// Size in bytes, a multiple of `page_size`.
    pub size_bytes: u64,
    /// Page size in bytes (4096, or 2 MiB for hugetlbfs).
    pub page_size: u64,
}

impl Block {
    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.size_bytes / self.page_size
    }
}

/// The memory layout both sides agree on in the handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The blocks, in wire order (index = block id).
    pub blocks: Vec<Block>,
}

impl Layout {
    /// A layout of one block.
    pub fn single(name: &str, size_bytes: u64, page_size: u64) -> Result<Layout, LayoutError> {
        let layout = Layout {
            blocks: vec![Block {
                name: name.to_string(),
                size_bytes,
                page_size,
            }],
        };
        layout.validate()?;
        Ok(layout)
    }

    /// Checks every invariant the rest of the system relies on.
    pub fn validate(&self) -> Result<(), LayoutError> {
        if self.blocks.is_empty() {
            return Err(LayoutError::Empty);
        }
        if self.blocks.len() > MAX_BLOCKS {
            return Err(LayoutError::TooManyBlocks(self.blocks.len()));
        }
        for (i, b) in self.blocks.iter().enumerate() {
            if b.name.is_empty()
                || b.name.len() > MAX_NAME_BYTES
                || b.name.chars().any(char::is_control)
            {
                return Err(LayoutError::BadName(b.name.clone()));
            }
            if self.blocks[..i].iter().any(|o| o.name == b.name) {
                return Err(LayoutError::DuplicateName(b.name.clone()));
            }
            if !b.page_size.is_power_of_two() || b.page_size < 4096 || b.page_size > (1 << 30) {
                return Err(LayoutError::BadPageSize {
                    name: b.name.clone(),
                    page_size: b.page_size,
                });
            }
            if b.size_bytes == 0
                || b.size_bytes > MAX_BLOCK_BYTES
                || b.size_bytes % b.page_size != 0
            {
                return Err(LayoutError::BadSize {
                    name: b.name.clone(),
                    size_bytes: b.size_bytes,
                    page_size: b.page_size,
                });
            }
        }
        Ok(())
    }

    /// Total pages over all blocks.
    pub fn total_pages(&self) -> u64 {
        self.blocks.iter().map(Block::pages).sum()
    }

    /// The largest page size of any block (the size of a scratch page that fits every block).
    pub fn max_page_size(&self) -> u64 {
        self.blocks
            .iter()
            .map(|b| b.page_size)
            .max()
            .unwrap_or(4096)
    }

    /// Total bytes over all blocks.
    pub fn total_bytes(&self) -> u64 {
        self.blocks.iter().map(|b| b.size_bytes).sum()
    }

    /// Checks that pages `[page, page + count)` of `block` exist, with `count >= 1`. Returns the
    /// block. Overflow-safe: every value may come from the network.
    pub fn check_range(&self, block: u32, page: u64, count: u64) -> Result<&Block, LayoutError> {
        let out = |detail: String| LayoutError::OutOfRange {
            block,
            page,
            count,
            detail,
        };
        let b = self
            .blocks
            .get(block as usize)
            .ok_or_else(|| out(format!("the layout has {} blocks", self.blocks.len())))?;
        if count == 0 {
            return Err(out("empty range".into()));
        }
        match page.checked_add(count) {
            Some(end) if end <= b.pages() => Ok(b),
            _ => Err(out(format!("block {:?} has {} pages", b.name, b.pages()))),
        }
    }
}

/// A fixed-size bitmap of pages with atomic bit operations, shared between threads.
///
/// Bits are set with `fetch_or` (so "was I first?" is answered exactly once per page) and read
/// with `Acquire`, pairing with the `Release` of the setter: a reader that sees a page's bit
/// also sees everything the setter did before setting it.
#[derive(Debug)]
pub struct PageBitmap {
    words: Box<[AtomicU64]>,
    len: u64,
}

impl PageBitmap {
    /// A bitmap of `len` clear bits.
    pub fn new(len: u64) -> PageBitmap {
        let words = (0..len.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        PageBitmap { words, len }
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the bitmap has no bits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn at(&self, i: u64) -> (&AtomicU64, u64) {
        assert!(i < self.len, "bit {i} outside a bitmap of {}", self.len);
        (&self.words[(i / 64) as usize], 1u64 << (i % 64))
    }

    /// Whether bit `i` is set.
    pub fn get(&self, i: u64) -> bool {
        let (w, m) = self.at(i);
        w.load(Ordering::Acquire) & m != 0
    }

    /// Sets bit `i`; returns true if it was clear (this caller set it first).
    pub fn set(&self, i: u64) -> bool {
        let (w, m) = self.at(i);
        w.fetch_or(m, Ordering::AcqRel) & m == 0
    }

    /// Clears bit `i`; returns true if it was set.
    pub fn clear(&self, i: u64) -> bool {
        let (w, m) = self.at(i);
        w.fetch_and(!m, Ordering::AcqRel) & m != 0
    }

    /// Sets bits `[start, start + count)` with one atomic per word; returns how many were clear.
    pub fn set_range(&self, start: u64, count: u64) -> u64 {
        self.apply_range(start, count, |w, mask| {
            (w.fetch_or(mask, Ordering::AcqRel) & mask ^ mask).count_ones() as u64
        })
    }

    /// Claims bits `[start, start + count)` (at most 64): sets them with one atomic per word
    /// and returns which this caller set first (bit `i` of the result is bit `start + i`).
    /// Pages written through a memfd's alias are claimed first, so that two writers never
    /// write one page and nobody writes a page once it is mapped into the guest.
    pub fn claim(&self, start: u64, count: u64) -> u64 {
        assert!(count <= 64, "claims of at most 64 bits, not {count}");
        let mut won = 0u64;
        let mut i = start;
        let end = start.checked_add(count).expect("range overflow");
        assert!(
            end <= self.len,
            "claim [{start}, {end}) outside {}",
            self.len
        );
        while i < end {
            let bit = i % 64;
            let n = (64 - bit).min(end - i);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            let old = self.words[(i / 64) as usize].fetch_or(mask, Ordering::AcqRel);
            won |= ((mask & !old) >> bit) << (i - start);
            i += n;
        }
        won
    }

    /// Clears the bits of a [`claim`](Self::claim)'s result: `won` as it returned for `start`.
    pub fn release(&self, start: u64, won: u64) {
        let mut rest = won;
        while rest != 0 {
            let i = u64::from(rest.trailing_zeros());
            let run = u64::from((rest >> i).trailing_ones());
            self.clear_range(start + i, run);
            rest &= !(if run == 64 {
                u64::MAX
            } else {
                ((1u64 << run) - 1) << i
            });
        }
    }

    /// Clears bits `[start, start + count)`; returns how many were set.
    pub fn clear_range(&self, start: u64, count: u64) -> u64 {
        self.apply_range(start, count, |w, mask| {
            (w.fetch_and(!mask, Ordering::AcqRel) & mask).count_ones() as u64
        })
    }

    fn apply_range(&self, start: u64, count: u64, f: impl Fn(&AtomicU64, u64) -> u64) -> u64 {
        let end = start.checked_add(count).expect("range overflow");
        assert!(
            end <= self.len,
            "range [{start}, {end}) outside a bitmap of {}",
            self.len
        );
        let mut done = 0;
        let mut i = start;
        while i < end {
            let bit = i % 64;
            let n = (64 - bit).min(end - i);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            done += f(&self.words[(i / 64) as usize], mask);
            i += n;
        }
        done
    }

    /// Words of 64 bits (bit `i` is bit `i % 64` of word `i / 64`).
    pub fn word_count(&self) -> usize {
        self.words.len()
    }

    /// Clears word `w` and returns what it held, in one atomic swap (read-and-reset of a dirty
    /// log). A clear word is only loaded, not written.
    pub fn take_word(&self, w: usize) -> u64 {
        let word = &self.words[w];
        if word.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        word.swap(0, Ordering::AcqRel)
    }

    /// Number of set bits in `[start, end)`.
    pub fn count_range(&self, start: u64, end: u64) -> u64 {
        if end <= start {
            return 0;
        }
        self.apply_range(start, end - start, |w, mask| {
            (w.load(Ordering::Acquire) & mask).count_ones() as u64
        })
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// The first clear bit at or after `from` and before `end`, if any.
    pub fn next_clear(&self, from: u64, end: u64) -> Option<u64> {
        let end = end.min(self.len);
        let mut i = from;
        while i < end {
            let word = self.words[(i / 64) as usize].load(Ordering::Acquire);
            let inverted = !word >> (i % 64);
            if inverted != 0 {
                let found = i + u64::from(inverted.trailing_zeros());
                return (found < end).then_some(found);
            }
            i = (i / 64 + 1) * 64;
        }
        None
    }

    /// The first set bit at or after `from` and before `end`, if any.
    pub fn next_set(&self, from: u64, end: u64) -> Option<u64> {
        let end = end.min(self.len);
        let mut i = from;
        while i < end {
            let word = self.words[(i / 64) as usize].load(Ordering::Acquire) >> (i % 64);
            if word != 0 {
                let found = i + u64::from(word.trailing_zeros());
                return (found < end).then_some(found);
            }
            i = (i / 64 + 1) * 64;
        }
        None
    }

    /// The runs of clear bits in `[0, end)`, as (first, length).
    pub fn clear_runs(&self, end: u64) -> Vec<(u64, u64)> {
        let mut runs = Vec::new();
        let mut at = 0;
        while let Some(first) = self.next_clear(at, end) {
            let stop = self.next_set(first, end).unwrap_or(end.min(self.len));
            runs.push((first, stop - first));
            at = stop;
        }
        runs
    }

    /// Length of the run of set bits starting at `from` (stopping at `end` or `max`).
    pub fn run_of_set(&self, from: u64, end: u64, max: u64) -> u64 {
        let end = end.min(self.len).min(from.saturating_add(max));
        let mut i = from;
        while i < end && self.get(i) {
            i += 1;
        }
        i - from
    }
}

/// Pages `[start, end)` of a block of `pages` pages owned by worker `w` of `workers`.
///
/// The split of a block among the destination's workers (each registers, requests and is
/// streamed exactly its shard); the source's bulk thread for worker `w` streams the same range.
pub fn shard(pages: u64, w: usize, workers: usize) -> (u64, u64) {
    (
        pages * w as u64 / workers as u64,
        pages * (w as u64 + 1) / workers as u64,
    )
}

/// `4096` as `4K`, `2097152` as `2M` (as `--page-size` takes them).
pub fn page_size_name(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}M", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{}K", b >> 10),
        b => b.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_claim_is_won_once_across_words_and_released() {
        let b = PageBitmap::new(200);
        b.set(61);
        let won = b.claim(60, 10); // spans words 0 and 1; page 61 was taken
        assert_eq!(won, 0b11_1111_1101);
        assert_eq!(b.claim(60, 10), 0, "a second claim wins nothing");
        b.release(60, won);
        assert!(b.get(61) && !b.get(60) && !b.get(69));
        assert_eq!(b.claim(0, 64), !(1 << 61));
        assert_eq!(b.claim(136, 64), u64::MAX);
    }

    #[test]
    fn shards_tile_a_block_in_order() {
        assert_eq!(shard(10, 0, 1), (0, 10));
        assert_eq!(
            (0..3).map(|w| shard(10, w, 3)).collect::<Vec<_>>(),
            vec![(0, 3), (3, 6), (6, 10)]
        );
        // More workers than pages: some shards are empty, none overlaps, all pages are owned.
        assert_eq!(
            (0..4).map(|w| shard(2, w, 4)).collect::<Vec<_>>(),
            vec![(0, 0), (0, 1), (1, 1), (1, 2)]
        );
        // Sizes differ by at most one page, and the last shard ends at the block's end.
        for (pages, workers) in [(1u64 << 36, 7usize), (4097, 64), (1, 1), (0, 2)] {
            let shards: Vec<_> = (0..workers).map(|w| shard(pages, w, workers)).collect();
            assert_eq!(shards[0].0, 0);
            assert_eq!(shards[workers - 1].1, pages);
            assert!(shards.windows(2).all(|s| s[0].1 == s[1].0));
            let sizes: Vec<u64> = shards.iter().map(|(a, b)| b - a).collect();
            assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
        }
    }

    proptest! {
        /// `clear_runs` and `next_set` agree with a plain scan, across word boundaries.
        #[test]
        fn clear_runs_cover_exactly_the_clear_bits(
            bits in proptest::collection::vec(any::<bool>(), 0..300),
        ) {
            let n = bits.len() as u64;
            let map = PageBitmap::new(n);
            for (i, b) in bits.iter().enumerate() {
                if *b {
                    map.set(i as u64);
                }
            }
            let mut clear = vec![false; bits.len()];
            for (first, len) in map.clear_runs(n) {
                prop_assert!(len > 0);
                for i in first..first + len {
                    clear[i as usize] = true;
                }
            }
            prop_assert_eq!(clear, bits.iter().map(|b| !b).collect::<Vec<_>>());
            for from in 0..n {
                let want = (from..n).find(|&i| bits[i as usize]);
                prop_assert_eq!(map.next_set(from, n), want);
            }
        }
    }

    #[test]
    fn layout_rejects_bad_blocks() {
        assert!(Layout::single("ram", 1 << 20, 4096).is_ok());
        assert!(matches!(
            Layout::single("ram", 4097, 4096),
            Err(LayoutError::BadSize { .. })
        ));
        assert!(matches!(
            Layout::single("ram", 8192, 3000),
            Err(LayoutError::BadPageSize { .. })
        ));
        assert!(matches!(
            Layout::single("", 8192, 4096),
            Err(LayoutError::BadName(_))
        ));
        let l = Layout::single("ram", 16 * 4096, 4096).unwrap();
        assert!(l.check_range(0, 15, 1).is_ok());
        assert!(l.check_range(0, 15, 2).is_err());
        assert!(l.check_range(0, u64::MAX, 2).is_err());
        assert!(l.check_range(1, 0, 1).is_err());
        assert!(l.check_range(0, 0, 0).is_err());
    }

    #[test]
    fn bitmap_set_once_and_ranges() {
        let b = PageBitmap::new(200);
        assert!(b.set(5));
        assert!(!b.set(5));
        assert_eq!(b.set_range(0, 130), 129);
        assert_eq!(b.count_ones(), 130);
        assert_eq!(b.next_clear(0, 200), Some(130));
        assert_eq!(b.run_of_set(120, 200, 64), 10);
        assert_eq!(b.clear_range(60, 10), 10);
        assert_eq!(b.next_clear(0, 200), Some(60));
        assert_eq!(b.next_clear(130, 135), Some(130));
        b.set_range(130, 70);
        assert_eq!(b.next_clear(70, 200), None);
    }

    proptest! {
        #[test]
        fn bitmap_matches_a_model(ops in proptest::collection::vec((0u64..300, 1u64..80, any::<bool>()), 1..60)) {
            let b = PageBitmap::new(300);
            let mut model = vec![false; 300];
            for (start, count, set) in ops {
                let count = count.min(300 - start);
                if count == 0 { continue; }
                let changed = if set { b.set_range(start, count) } else { b.clear_range(start, count) };
                let mut expect = 0;
                for m in &mut model[start as usize..(start + count) as usize] {
                    if *m != set { expect += 1; }
                    *m = set;
                }
                prop_assert_eq!(changed, expect);
            }
            for (i, m) in model.iter().enumerate() {
                prop_assert_eq!(b.get(i as u64), *m);
            }
            let first = model.iter().position(|m| !m).map(|p| p as u64);
            prop_assert_eq!(b.next_clear(0, 300), first);
            for (lo, hi) in [(0u64, 300u64), (7, 7), (13, 200), (64, 128), (299, 300)] {
                let want = model[lo as usize..hi as usize].iter().filter(|m| **m).count() as u64;
                prop_assert_eq!(b.count_range(lo, hi), want);
            }
        }
    }
}
