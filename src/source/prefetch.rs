//! The prefetch window of one urgent connection.
//!
//! A fault right where the last reply ended means a sequential reader: the reply then carries
//! the next unsent pages of the worker's shard too. The window starts at [`MIN_PAGES`] (or the
//! maximum, if smaller), doubles while the pattern holds, is capped at the operator's maximum
//! (`--prefetch-max`), and drops to zero when the pattern breaks.

/// The first window of a sequential reader (unless the maximum is smaller).
pub const MIN_PAGES: u64 = 4;

/// One urgent connection's prefetch state.
#[derive(Clone, Debug)]
pub struct Prefetch {
    max_pages: u64,
    window_pages: u64,
    /// Where the last reply (with its prefetch) ended: `(block, page)`.
    next: Option<(u32, u64)>,
}

impl Prefetch {
    /// A window of at most `max_pages` (0: no prefetch).
    pub fn new(max_pages: u64) -> Prefetch {
        Prefetch {
            max_pages,
            window_pages: 0,
            next: None,
        }
    }

    /// The pages to send ahead of a request for `(block, page)`.
    pub fn window(&mut self, block: u32, page: u64) -> u64 {
        self.window_pages = if self.max_pages > 0 && self.next == Some((block, page)) {
            (self.window_pages * 2).max(MIN_PAGES).min(self.max_pages)
        } else {
            0
        };
        debug_assert!(self.window_pages <= self.max_pages);
        self.window_pages
    }

    /// The reply to the last request, with its prefetch, ended before `end` of `block`.
    pub fn replied_up_to(&mut self, block: u32, end: u64) {
        if self.max_pages > 0 {
            self.next = Some((block, end));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every maximum from 0 to 64: a sequential reader's window grows to the maximum and never
    /// past it; a jump drops it to zero; 0 means no prefetch at all.
    #[test]
    fn the_window_stays_within_every_maximum() {
        for max in 0..=64u64 {
            let mut p = Prefetch::new(max);
            let mut page = 0;
            let mut seen_max = 0;
            for _ in 0..32 {
                let w = p.window(0, page);
                assert!(w <= max, "max {max}: window {w}");
                seen_max = seen_max.max(w);
                page += 1 + w;
                p.replied_up_to(0, page);
            }
            assert_eq!(
                seen_max, max,
                "max {max}: a sequential reader reaches the maximum"
            );
            assert_eq!(
                p.window(0, page + 7),
                0,
                "max {max}: a jump resets the window"
            );
            assert_eq!(p.window(1, page), 0, "max {max}: another block resets it");
        }
    }

    #[test]
    fn the_window_doubles_from_its_minimum() {
        let mut p = Prefetch::new(64);
        assert_eq!(
            p.window(0, 10),
            0,
            "the first request only opens the pattern"
        );
        let mut page = 11;
        let mut windows = Vec::new();
        for _ in 0..6 {
            p.replied_up_to(0, page);
            let w = p.window(0, page);
            windows.push(w);
            page += 1 + w;
        }
        assert_eq!(windows, [4, 8, 16, 32, 64, 64]);
    }
}
