//! The `Welcome` body: the session's layout and what the image is.
//!
//! Body (little-endian): block count (u32), per block its name length (u8), name (UTF-8),
//! size in bytes (u64) and page size (u64); then the image kind (u8: 0 opaque, 1 synthetic),
//! for a synthetic image its seed (u64) and zero percent (u8). Nothing may follow.

use super::{CodecError, Header, Kind};
use crate::layout::{Block, Layout, MAX_BLOCKS, MAX_NAME_BYTES};

/// What the source's image is, so a verifier can recompute expected contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageInfo {
    /// Contents known only to the source (a file).
    Opaque,
    /// The synthetic image of [`crate::image::Synthetic`].
    Synthetic {
        /// Seed.
        seed: u64,
        /// Share of zero pages, percent.
        zero_percent: u8,
    },
}

/// The `Welcome` body: the session's layout and what the image is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Welcome {
    /// Session id the destination uses on its other connections.
    pub session: u64,
    /// The memory layout.
    pub layout: Layout,
    /// What the image is.
    pub image: ImageInfo,
    /// When a live source's workload stopped (wall clock, µs since the epoch), if it stopped
    /// before this `Welcome` (pure postcopy); 0 otherwise. Carried in the header's `mask`.
    pub stopped_unix_us: u64,
}

impl Welcome {
    /// Encodes header and body into `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let mut body = Vec::new();
        body.extend_from_slice(&(self.layout.blocks.len() as u32).to_le_bytes());
        for b in &self.layout.blocks {
            body.push(b.name.len() as u8);
            body.extend_from_slice(b.name.as_bytes());
            body.extend_from_slice(&b.size_bytes.to_le_bytes());
            body.extend_from_slice(&b.page_size.to_le_bytes());
        }
        match self.image {
            ImageInfo::Opaque => body.push(0),
            ImageInfo::Synthetic { seed, zero_percent } => {
                body.push(1);
                body.extend_from_slice(&seed.to_le_bytes());
                body.push(zero_percent);
            }
        }
        Header::welcome(self.session, self.stopped_unix_us, body.len() as u32).encode_into(out);
        out.extend_from_slice(&body);
    }

    /// Decodes a `Welcome` body (header already decoded) and validates the layout.
    pub fn decode_body(h: &Header, body: &[u8]) -> Result<Welcome, CodecError> {
        let mut r = Reader { b: body, at: 0 };
        let blocks = decode_blocks(&mut r)?;
        let image = decode_image(&mut r)?;
        if r.at != body.len() {
            return Err(bad(format!("{} trailing bytes", body.len() - r.at)));
        }
        let layout = Layout { blocks };
        layout.validate()?;
        Ok(Welcome {
            session: h.page,
            layout,
            image,
            stopped_unix_us: h.mask,
        })
    }
}

/// A malformed `Welcome` body.
fn bad(detail: String) -> CodecError {
    CodecError::BadBody {
        kind: Kind::Welcome,
        detail,
    }
}

/// The block count and the blocks.
fn decode_blocks(r: &mut Reader<'_>) -> Result<Vec<Block>, CodecError> {
    let n = r.u32().ok_or_else(|| bad("no block count".into()))? as usize;
    if n == 0 || n > MAX_BLOCKS {
        return Err(bad(format!("{n} blocks")));
    }
    let mut blocks = Vec::with_capacity(n);
    for i in 0..n {
        blocks.push(decode_block(r, i)?);
    }
    Ok(blocks)
}

/// Block `i`: name, size, page size.
fn decode_block(r: &mut Reader<'_>, i: usize) -> Result<Block, CodecError> {
    let len = r.u8().ok_or_else(|| bad(format!("block {i}: no name")))? as usize;
    debug_assert!(len <= MAX_NAME_BYTES);
    let name = r
        .bytes(len)
        .and_then(|b| std::str::from_utf8(b).ok())
        .ok_or_else(|| bad(format!("block {i}: name is not UTF-8 or truncated")))?
        .to_string();
    let size_bytes = r.u64().ok_or_else(|| bad(format!("block {i}: no size")))?;
    let page_size = r
        .u64()
        .ok_or_else(|| bad(format!("block {i}: no page size")))?;
    Ok(Block {
        name,
        size_bytes,
        page_size,
    })
}

/// The image kind and, for a synthetic image, its parameters.
fn decode_image(r: &mut Reader<'_>) -> Result<ImageInfo, CodecError> {
    match r.u8() {
        Some(0) => Ok(ImageInfo::Opaque),
        Some(1) => {
            let seed = r
                .u64()
                .ok_or_else(|| bad("synthetic image without seed".into()))?;
            let zero_percent = r
                .u8()
                .filter(|z| *z <= 100)
                .ok_or_else(|| bad("synthetic image with bad zero percent".into()))?;
            Ok(ImageInfo::Synthetic { seed, zero_percent })
        }
        other => Err(bad(format!("image kind {other:?}"))),
    }
}

/// A cursor over a body: each read takes the next bytes, or `None` past the end.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        self.bytes(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.bytes(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4")))
    }
    fn u64(&mut self) -> Option<u64> {
        self.bytes(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8")))
    }
}
