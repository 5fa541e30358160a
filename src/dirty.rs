//! Dirty-page tracking on the source: which pages of a live region were written since the last
//! look, for the precopy passes that run before postcopy takes over.
//!
//! A [`DirtyTracker`] reports the pages of one memory region written since `start` or its
//! previous `collect`, as runs of page indices relative to the region, and resets them in the
//! same step. Two implementations:
//!
//! - [`UffdWpTracker`]: the kernel does it, no hypervisor needed. It write-protects the region
//!   with userfaultfd in async mode (a write clears the protection instead of raising an event)
//!   and collects with one `PAGEMAP_SCAN` ioctl on `/proc/self/pagemap`, which returns the
//!   written ranges and protects them again atomically. Needs **Linux 6.7+**
//!   (`UFFD_FEATURE_WP_ASYNC`, `PAGEMAP_SCAN`) and private anonymous memory of the calling
//!   process; `postcopy probe` tries it (`pagemap scan`). The mechanism is in `sys::dirty`.
//! - [`ManualTracker`]: an atomic bitmap the embedder fills itself.
//!
//! ## An embedder with KVM's dirty log
//!
//! A VMM already has KVM's dirty log for guest memory, and should use it: vCPUs write guest
//! pages through KVM's second-level page tables, and each `UffdWpTracker` collect re-protects
//! through an MMU-notifier invalidation of the whole scanned range, which would drop those
//! mappings for every guest page each time (not measured here). Either:
//!
//! - implement [`DirtyTracker`] directly: `start` sets `KVM_MEM_LOG_DIRTY_PAGES` on the
//!   memslot, `collect` calls `KVM_GET_DIRTY_LOG` (with `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`,
//!   followed by `KVM_CLEAR_DIRTY_LOG` of what it returned) and turns the bitmap into runs,
//!   `stop` clears the flag; or
//! - keep a [`ManualTracker`] clone in the VMM and push each harvested bitmap with
//!   [`ManualTracker::mark_words`] (or dirty-ring entries with [`ManualTracker::mark`]); hand
//!   the other clone to the migration as its tracker.
//!
//! Whatever the source of the bits, the contract is the one of [`DirtyTracker::collect`]: a
//! write is reported by the collect that follows it or by the next one, never lost; reporting a
//! page that was not written costs one page sent, nothing more.

use crate::layout::PageBitmap;
use std::sync::Arc;

pub use crate::sys::dirty::{DirtyError, UffdWpTracker};

/// A source of dirty-page information for one memory region of the source.
pub trait DirtyTracker: Send {
    /// Starts tracking: from now on every write to the region is recorded. Called once before
    /// the first precopy pass.
    fn start(&mut self) -> Result<(), DirtyError>;

    /// Appends the pages written since `start` or the previous `collect` as `(first_page,
    /// pages)` runs (page indices relative to the region, ascending, not overlapping) and
    /// resets them, atomically with respect to concurrent writers: a write racing the call
    /// shows up either now or in the next call, never lost. Read the contents of a reported
    /// page after this returns.
    fn collect(&mut self, out: &mut Vec<(u64, u64)>) -> Result<(), DirtyError>;

    /// Stops tracking (unregisters); also done on drop.
    fn stop(&mut self) -> Result<(), DirtyError>;

    /// Bytes of the pages `collect` reports (the base page size unless the tracker says
    /// otherwise); precopy turns them into the block's pages (a written 4 KiB page dirties its
    /// 2 MiB page).
    fn page_bytes(&self) -> u64 {
        crate::sys::mem::base_page_size() as u64
    }
}

/// Appends to `out` the runs of `to_bytes` pages (a multiple of `from_bytes`) that hold the
/// `(first, pages)` runs of `from_bytes` pages; runs that meet are left for the caller to merge.
pub fn coarsen_runs(
    runs: &[(u64, u64)],
    from_bytes: u64,
    to_bytes: u64,
    out: &mut Vec<(u64, u64)>,
) {
    assert!(
        to_bytes % from_bytes == 0,
        "pages of {to_bytes} bytes are not whole pages of {from_bytes}"
    );
    let r = to_bytes / from_bytes;
    for &(first, n) in runs.iter().filter(|r| r.1 > 0) {
        let (lo, hi) = (first / r, (first + n - 1) / r + 1);
        out.push((lo, hi - lo));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn written_base_pages_dirty_the_huge_pages_holding_them() {
        let mut out = vec![(0, 1)];
        // 4 KiB pages 511..513 span huge pages 0 and 1; 1024 is huge page 2.
        super::coarsen_runs(&[(511, 2), (1024, 1)], 4096, 2 << 20, &mut out);
        assert_eq!(out, vec![(0, 1), (0, 2), (2, 1)]);
    }
}

impl DirtyTracker for UffdWpTracker {
    fn start(&mut self) -> Result<(), DirtyError> {
        UffdWpTracker::start(self)
    }

    fn collect(&mut self, out: &mut Vec<(u64, u64)>) -> Result<(), DirtyError> {
        UffdWpTracker::collect(self, out)
    }

    fn page_bytes(&self) -> u64 {
        UffdWpTracker::page_bytes(self)
    }

    fn stop(&mut self) -> Result<(), DirtyError> {
        UffdWpTracker::stop(self)
    }
}

/// A tracker the embedder feeds: one bit per page, set by [`mark`](Self::mark) (or
/// [`mark_words`](Self::mark_words) for a whole bitmap such as KVM's dirty log) from any thread,
/// taken and cleared word by word by `collect` (an atomic swap, so a mark racing a collect is
/// reported by this collect or the next).
///
/// Clones share the bits: keep one where the dirty information arrives, hand another to the
/// migration. `start` and `stop` do nothing: the embedder enables and disables its own log, and
/// marks made before `start` are kept (an extra page sent is harmless, a lost one is not).
#[derive(Clone, Debug)]
pub struct ManualTracker {
    bits: Arc<PageBitmap>,
}

/// Calls `run(first, len)` for each run of set bits of `word`, lowest first.
fn for_each_run(word: u64, mut run: impl FnMut(u64, u64)) {
    let mut rest = word;
    while rest != 0 {
        let lo = u64::from(rest.trailing_zeros());
        let ones = u64::from((rest >> lo).trailing_ones());
        run(lo, ones);
        rest = if lo + ones >= 64 {
            0
        } else {
            rest & (u64::MAX << (lo + ones))
        };
    }
}

impl ManualTracker {
    /// A tracker of a region of `pages` pages, none marked.
    pub fn new(pages: u64) -> ManualTracker {
        ManualTracker {
            bits: Arc::new(PageBitmap::new(pages)),
        }
    }

    /// Pages in the region.
    pub fn pages(&self) -> u64 {
        self.bits.len()
    }

    /// Marks pages `[first, first + count)` written. Panics if the run leaves the region.
    pub fn mark(&self, first: u64, count: u64) {
        let end = first.checked_add(count).expect("page run overflows");
        assert!(
            end <= self.pages(),
            "pages [{first}, {end}) outside a region of {} pages",
            self.pages()
        );
        self.bits.set_range(first, count);
    }

    /// Marks every page written (e.g. when the embedder's own log was lost).
    pub fn mark_all(&self) {
        self.mark(0, self.pages());
    }

    /// ORs in a dirty bitmap whose bit `i` (bit `i % 64` of `words[i / 64]`, the layout of
    /// `KVM_GET_DIRTY_LOG`) stands for page `first + i`. Bits beyond the region are ignored.
    pub fn mark_words(&self, first: u64, words: &[u64]) {
        let pages = self.pages();
        for (w, &word) in words.iter().enumerate() {
            for_each_run(word, |lo, ones| {
                let start = first + w as u64 * 64 + lo;
                if start < pages {
                    self.mark(start, ones.min(pages - start));
                }
            });
        }
    }
}

impl DirtyTracker for ManualTracker {
    fn start(&mut self) -> Result<(), DirtyError> {
        Ok(())
    }

    fn collect(&mut self, out: &mut Vec<(u64, u64)>) -> Result<(), DirtyError> {
        let first_new = out.len();
        for w in 0..self.bits.word_count() {
            // The swap's Acquire pairs with the marks' Release: whatever the marker did before
            // marking is visible to the caller of collect.
            for_each_run(self.bits.take_word(w), |lo, ones| {
                crate::sys::dirty::push_run(out, first_new, w as u64 * 64 + lo, ones);
            });
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<(), DirtyError> {
        Ok(())
    }
}
