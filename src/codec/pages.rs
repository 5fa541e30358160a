//! `Pages` frames built from page slices: the header, then the payloads of the non-zero pages.

use super::{Header, MAX_BATCH_PAGES};

/// Appends a `Pages` frame: header, then the non-zero pages of `pages` (one slice per page,
/// `None` = zero page).
pub fn encode_pages<'p>(
    block: u32,
    first_page: u64,
    page_size: u64,
    pages: impl ExactSizeIterator<Item = Option<&'p [u8]>> + Clone,
    out: &mut Vec<u8>,
) {
    let count = pages.len();
    assert!(count >= 1 && count <= usize::from(MAX_BATCH_PAGES));
    let mut mask = 0u64;
    for (i, p) in pages.clone().enumerate() {
        if p.is_none() {
            mask |= 1 << i;
        }
    }
    Header::pages(block, first_page, count as u16, mask, page_size).encode_into(out);
    for p in pages.flatten() {
        assert_eq!(p.len() as u64, page_size, "a payload is exactly one page");
        out.extend_from_slice(p);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::layout;
    use super::super::{Frame, HEADER_BYTES};
    use super::*;

    #[test]
    fn encode_pages_skips_zero_payloads() {
        let a = vec![1u8; 4096];
        let c = vec![3u8; 4096];
        let pages = [Some(&a[..]), None, Some(&c[..])];
        let mut out = Vec::new();
        encode_pages(0, 10, 4096, pages.iter().copied(), &mut out);
        assert_eq!(out.len(), HEADER_BYTES + 2 * 4096);
        let (f, _) = Frame::decode(&out, Some(&layout())).unwrap();
        match f {
            Frame::Pages {
                zero_mask,
                count,
                page,
                ..
            } => {
                assert_eq!((zero_mask, count, page), (0b010, 3, 10));
            }
            other => panic!("decoded {other:?}"),
        }
    }
}
