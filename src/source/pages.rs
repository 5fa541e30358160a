//! What the source sends, encoded from its image: `Pages` runs and the zero-page map.

use super::session::Session;
use crate::codec;
use crate::codec::{max_batch_pages, Header, Kind, HEADER_BYTES};
use crate::image::{Image, PageData};

/// Appends `ZeroMap` frames for every block, then `Run`, and marks the zero pages sent.
pub(super) fn encode_zero_map(image: &dyn Image, session: &Session, out: &mut Vec<u8>) {
    let per_frame = u64::from(codec::MAX_ZERO_MAP_BYTES) * 8;
    let mut scratch = vec![0u8; image.layout().max_page_size() as usize];
    for (b, block) in image.layout().blocks.iter().enumerate() {
        let mut first = 0;
        while first < block.pages() {
            let pages = (block.pages() - first).min(per_frame);
            Header::zero_map(b as u32, first, pages).encode_into(out);
            codec::encode_page_bits(
                pages,
                |i| {
                    let zero = image.is_zero(b as u32, first + i, &mut scratch);
                    if zero {
                        session.sent[b].set(first + i);
                    }
                    zero
                },
                out,
            );
            first += pages;
        }
    }
    Header::control(Kind::Run, 0).encode_into(out);
}

/// Appends `Pages` frames for `[page, page + count)` of `block` of `image` to `out`: the encoder
/// every reply and stream batch goes through (at most a batch of pages per frame, zero pages as
/// mask bits, no body for them). `scratch` holds one page. Returns (pages, zero pages).
pub fn encode_run(
    image: &dyn Image,
    block: u32,
    page: u64,
    count: u64,
    page_size: u64,
    scratch: &mut [u8],
    out: &mut Vec<u8>,
) -> (u64, u64) {
    let max = u64::from(max_batch_pages(page_size));
    let mut zeros = 0;
    let mut p = page;
    let end = page + count;
    while p < end {
        let n = (end - p).min(max);
        let header_at = out.len();
        out.extend_from_slice(&[0u8; HEADER_BYTES]);
        let mut mask = 0u64;
        for i in 0..n {
            match image.page(block, p + i, scratch) {
                PageData::Zero => mask |= 1 << i,
                PageData::Data(bytes) => out.extend_from_slice(bytes),
            }
        }
        zeros += u64::from(mask.count_ones());
        let mut h = [0u8; HEADER_BYTES];
        Header::pages(block, p, n as u16, mask, page_size).encode(&mut h);
        out[header_at..header_at + HEADER_BYTES].copy_from_slice(&h);
        p += n;
    }
    (count, zeros)
}
