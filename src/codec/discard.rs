//! `Discard` frames: ranges (first page, pages; u64 each) of one block that the destination
//! drops in the precopy phase. [`DiscardSender`] builds them on the source, [`decode_discard`]
//! reads them on the destination.

use super::{le64, CodecError, Header, Kind, DISCARD_RANGE_BYTES, MAX_DISCARD_RANGES};
use crate::layout::Layout;

/// Decodes a `Discard` body (its header already decoded, so the body is `count` ranges) and
/// calls `each(first, pages)` per range. With a layout, every range must be non-empty and
/// inside the block: a discard never reaches outside a block.
pub fn decode_discard(
    h: &Header,
    body: &[u8],
    layout: Option<&Layout>,
    mut each: impl FnMut(u64, u64),
) -> Result<(), CodecError> {
    debug_assert_eq!(h.kind, Kind::Discard);
    if body.len() != usize::from(h.count) * DISCARD_RANGE_BYTES {
        return Err(CodecError::BodyLength {
            kind: Kind::Discard,
            len: body.len() as u32,
            max: (usize::from(h.count) * DISCARD_RANGE_BYTES) as u64,
        });
    }
    for r in body.chunks_exact(DISCARD_RANGE_BYTES) {
        let (first, pages) = (le64(r, 0), le64(r, 8));
        if let Some(l) = layout {
            if pages == 0 {
                return Err(CodecError::BadBody {
                    kind: Kind::Discard,
                    detail: format!("empty range at page {first}"),
                });
            }
            l.check_range(h.block, first, pages)?;
        }
        each(first, pages);
    }
    Ok(())
}

/// Appends a `Discard` frame of `block` with `ranges` (a receiver takes at most
/// [`MAX_DISCARD_RANGES`]).
pub(super) fn encode_discard(block: u32, ranges: &[(u64, u64)], out: &mut Vec<u8>) {
    Header::discard(block, ranges.len() as u16).encode_into(out);
    for &(first, pages) in ranges {
        out.extend_from_slice(&first.to_le_bytes());
        out.extend_from_slice(&pages.to_le_bytes());
    }
}

/// The source side of discards for one block (the seed's `discard_send_init/range/finish`):
/// collects ranges, merges a range that starts where the previous one ended, and appends a
/// `Discard` frame to the output whenever [`MAX_DISCARD_RANGES`] ranges are pending and at
/// [`DiscardSender::finish`]. Allocates nothing after `init`.
#[derive(Debug)]
pub struct DiscardSender {
    block: u32,
    ranges: Vec<(u64, u64)>,
    frames: u64,
    pages: u64,
}

impl DiscardSender {
    /// Starts the discards of `block`.
    pub fn init(block: u32) -> DiscardSender {
        DiscardSender {
            block,
            ranges: Vec::with_capacity(usize::from(MAX_DISCARD_RANGES)),
            frames: 0,
            pages: 0,
        }
    }

    /// Adds pages `[first, first + pages)`; may append a full frame to `out`.
    pub fn range(&mut self, first: u64, pages: u64, out: &mut Vec<u8>) {
        if pages == 0 {
            return;
        }
        self.pages += pages;
        if let Some(last) = self.ranges.last_mut() {
            if last.0 + last.1 == first {
                last.1 += pages;
                return;
            }
        }
        if self.ranges.len() == usize::from(MAX_DISCARD_RANGES) {
            self.flush(out);
        }
        self.ranges.push((first, pages));
    }

    fn flush(&mut self, out: &mut Vec<u8>) {
        if self.ranges.is_empty() {
            return;
        }
        debug_assert!(self.ranges.len() <= usize::from(MAX_DISCARD_RANGES));
        encode_discard(self.block, &self.ranges, out);
        self.ranges.clear();
        self.frames += 1;
    }

    /// Appends what is pending; returns (frames written, pages discarded) for this block.
    pub fn finish(mut self, out: &mut Vec<u8>) -> (u64, u64) {
        self.flush(out);
        (self.frames, self.pages)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::layout;
    use super::super::{Frame, HEADER_BYTES};
    use super::*;
    use crate::layout::Block;
    use proptest::prelude::*;

    /// A random set of pages of a 4096-page block as a sorted list of (first, pages) runs.
    fn runs_of(pages: &std::collections::BTreeSet<u64>) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &p in pages {
            match runs.last_mut() {
                Some(last) if last.0 + last.1 == p => last.1 += 1,
                _ => runs.push((p, 1)),
            }
        }
        runs
    }

    proptest! {
        #[test]
        fn discard_batches_round_trip_bounded(
            pages in proptest::collection::btree_set(0u64..4096, 0..3000),
            split in any::<bool>(),
        ) {
            let l = Layout {
                blocks: vec![Block { name: "ram".into(), size_bytes: 4096 * 4096, page_size: 4096 }],
            };
            let runs = runs_of(&pages);
            let mut out = Vec::new();
            let mut tx = DiscardSender::init(0);
            for &(first, n) in &runs {
                if split && n > 1 {
                    // Adjacent ranges given separately are merged again.
                    tx.range(first, 1, &mut out);
                    tx.range(first + 1, n - 1, &mut out);
                } else {
                    tx.range(first, n, &mut out);
                }
            }
            let (frames, total) = tx.finish(&mut out);
            prop_assert_eq!(total, pages.len() as u64);
            let mut got = std::collections::BTreeSet::new();
            let mut at = 0;
            let mut seen_frames = 0;
            while at < out.len() {
                let (f, used) = Frame::decode(&out[at..], Some(&l)).unwrap();
                prop_assert!(used <= HEADER_BYTES + usize::from(MAX_DISCARD_RANGES) * DISCARD_RANGE_BYTES);
                let Frame::Discard { block, ranges } = f else { panic!("not a Discard") };
                prop_assert_eq!(block, 0);
                prop_assert!(ranges.len() <= usize::from(MAX_DISCARD_RANGES));
                for (first, n) in ranges {
                    for p in first..first + n { prop_assert!(got.insert(p), "page {} twice", p); }
                }
                at += used;
                seen_frames += 1;
            }
            prop_assert_eq!(seen_frames, frames);
            prop_assert_eq!(frames, (runs.len() as u64).div_ceil(u64::from(MAX_DISCARD_RANGES)));
            prop_assert_eq!(got, pages);
        }
    }

    #[test]
    fn discard_outside_a_block_is_rejected() {
        let l = layout();
        for ranges in [
            vec![(250u64, 7u64)],
            vec![(0, 0)],
            vec![(256, 1)],
            vec![(u64::MAX, 2)],
        ] {
            let mut buf = Vec::new();
            Frame::Discard { block: 0, ranges }.encode_into(&mut buf);
            assert!(Frame::decode(&buf, Some(&l)).is_err());
        }
        let mut buf = Vec::new();
        Frame::Discard {
            block: 9,
            ranges: vec![(0, 1)],
        }
        .encode_into(&mut buf);
        assert!(matches!(
            Frame::decode(&buf, Some(&l)),
            Err(CodecError::Range(_))
        ));
        // A count past the limit is refused from the header alone.
        let mut h = [0u8; HEADER_BYTES];
        Header::discard(0, MAX_DISCARD_RANGES + 1).encode(&mut h);
        assert!(matches!(
            Header::decode(&h),
            Err(CodecError::BodyLength { .. } | CodecError::BadCount { .. })
        ));
    }
}
