//! The page-bit body of `ZeroMap` and `Have` frames: one bit per page, LSB first (bit `i` is
//! byte `i / 8`, bit `i % 8`). The one page-bit codec of the protocol.

/// Appends the page-bit body of `ZeroMap` and `Have` frames for `pages` pages: bit `i` (byte
/// `i / 8`, bit `i % 8`) is page `first + i` of the header, set when `is_set(i)`.
pub fn encode_page_bits(pages: u64, mut is_set: impl FnMut(u64) -> bool, out: &mut Vec<u8>) {
    let at = out.len();
    out.resize(at + pages.div_ceil(8) as usize, 0);
    for i in 0..pages {
        if is_set(i) {
            out[at + (i / 8) as usize] |= 1 << (i % 8);
        }
    }
}

/// Bit `i` of a page-bit body ([`encode_page_bits`]); the body's length was checked against
/// the header's page count.
pub fn page_bit(body: &[u8], i: u64) -> bool {
    body[(i / 8) as usize] >> (i % 8) & 1 == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_bits_round_trip() {
        for pages in [1u64, 7, 8, 9, 64, 100] {
            let set = |i: u64| i % 3 == 0 || i == pages - 1;
            let mut out = vec![0xAA];
            encode_page_bits(pages, set, &mut out);
            assert_eq!(out.len(), 1 + pages.div_ceil(8) as usize);
            assert_eq!(out[0], 0xAA, "what was in the buffer stays");
            for i in 0..pages {
                assert_eq!(page_bit(&out[1..], i), set(i), "page {i} of {pages}");
            }
            // Padding bits past the last page are clear.
            for i in pages..pages.div_ceil(8) * 8 {
                assert!(!page_bit(&out[1..], i));
            }
        }
    }
}
