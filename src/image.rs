//! What a source serves: a memory image, page by page.
//!
//! Two images: [`FileImage`], any raw memory file (a VM snapshot's memory file), mapped
//! read-only; and [`Synthetic`], the demo's image, computed from (seed, block, page) so that
//! source and verifier agree on every byte without storing it: about `zero_percent` of pages are
//! zero, the rest pseudo-random.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::codec::ImageInfo;
use crate::layout::{Layout, LayoutError};
use crate::sys::mem::{Mapping, MemError};

/// Errors opening an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file could not be opened or stat'ed.
    #[error("cannot open image {path}: {source}")]
    Open {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file size is not a whole number of pages.
    #[error("image {path} is {size_bytes} bytes, not a multiple of the page size {page_size}; pass the right --page-size or pad the file")]
    Size {
        /// The path.
        path: PathBuf,
        /// File size.
        size_bytes: u64,
        /// Page size.
        page_size: u64,
    },
    /// Layout validation failed.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// Mapping the file failed.
    #[error(transparent)]
    Mem(#[from] MemError),
}

/// One page of an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageData<'a> {
    /// All zero: sent as a flag.
    Zero,
    /// Contents (exactly one page).
    Data(&'a [u8]),
}

/// A source of pages.
pub trait Image: Send + Sync {
    /// The layout served.
    fn layout(&self) -> &Layout;
    /// What the image is (for verifiers).
    fn info(&self) -> ImageInfo;
    /// Page `page` of `block`: borrowed from the image, or generated into `scratch` (one page).
    /// The caller has checked the range against the layout.
    fn page<'a>(&'a self, block: u32, page: u64, scratch: &'a mut [u8]) -> PageData<'a>;
    /// Whether the page is all zero (for the zero-page map). `scratch` is one page.
    fn is_zero(&self, block: u32, page: u64, scratch: &mut [u8]) -> bool {
        matches!(self.page(block, page, scratch), PageData::Zero)
    }
}

/// Whether a page is all zero (word at a time).
pub fn is_zero_page(bytes: &[u8]) -> bool {
    let mut words = bytes.chunks_exact(8);
    words
        .by_ref()
        .all(|w| u64::from_ne_bytes(w.try_into().expect("8 bytes")) == 0)
        && words.remainder().iter().all(|b| *b == 0)
}

/// A raw memory file, served as one block named `image`.
pub struct FileImage {
    map: Mapping,
    layout: Layout,
}

impl FileImage {
    /// Maps `path` read-only.
    pub fn open(path: &Path, page_size: u64) -> Result<FileImage, ImageError> {
        let open_err = |source| ImageError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(open_err)?;
        let size_bytes = file.metadata().map_err(open_err)?.len();
        if size_bytes == 0 || size_bytes % page_size != 0 {
            return Err(ImageError::Size {
                path: path.to_path_buf(),
                size_bytes,
                page_size,
            });
        }
        let layout = Layout::single("image", size_bytes, page_size)?;
        let map = Mapping::file_readonly(&file, size_bytes as usize)?;
        Ok(FileImage { map, layout })
    }
}

impl Image for FileImage {
    fn layout(&self) -> &Layout {
        &self.layout
    }
    fn info(&self) -> ImageInfo {
        ImageInfo::Opaque
    }
    fn page<'a>(&'a self, _block: u32, page: u64, _scratch: &'a mut [u8]) -> PageData<'a> {
        let ps = self.layout.blocks[0].page_size as usize;
        let at = page as usize * ps;
        let bytes = &self.map.as_slice()[at..at + ps];
        if is_zero_page(bytes) {
            PageData::Zero
        } else {
            PageData::Data(bytes)
        }
    }
}

/// The demo's synthetic image.
#[derive(Clone, Debug)]
pub struct Synthetic {
    layout: Layout,
    seed: u64,
    zero_percent: u8,
}

/// Checksum of a page's contents (xxh3-64).
pub fn page_checksum(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

impl Synthetic {
    /// An image of `layout` from `seed` with `zero_percent` (0..=100) zero pages.
    pub fn new(layout: Layout, seed: u64, zero_percent: u8) -> Synthetic {
        assert!(zero_percent <= 100, "zero_percent above 100");
        Synthetic {
            layout,
            seed,
            zero_percent,
        }
    }

    /// The page's own seed.
    fn page_seed(&self, block: u32, page: u64) -> u64 {
        let mut key = [0u8; 12];
        key[..4].copy_from_slice(&block.to_le_bytes());
        key[4..].copy_from_slice(&page.to_le_bytes());
        xxhash_rust::xxh3::xxh3_64_with_seed(&key, self.seed)
    }

    /// Whether the page is a zero page.
    pub fn is_zero(&self, block: u32, page: u64) -> bool {
        (self.page_seed(block, page) >> 40) % 100 < u64::from(self.zero_percent)
    }

    /// Writes the page's contents into `out` (one page).
    pub fn fill(&self, block: u32, page: u64, out: &mut [u8]) {
        if self.is_zero(block, page) {
            out.fill(0);
            return;
        }
        // wyrand: fast, and every 8-byte word differs, so a misplaced page never matches.
        let mut state = self.page_seed(block, page);
        for w in out.chunks_exact_mut(8) {
            state = state.wrapping_add(0xa076_1d64_78bd_642f);
            let t = u128::from(state) * u128::from(state ^ 0xe703_7ed1_a0b4_28db);
            w.copy_from_slice(&((t >> 64) as u64 ^ t as u64).to_le_bytes());
        }
    }

    /// Number of zero pages in a block (computed).
    pub fn zero_pages(&self, block: u32) -> u64 {
        (0..self.layout.blocks[block as usize].pages())
            .filter(|p| self.is_zero(block, *p))
            .count() as u64
    }
}

impl Image for Synthetic {
    fn is_zero(&self, block: u32, page: u64, _scratch: &mut [u8]) -> bool {
        Synthetic::is_zero(self, block, page)
    }
    fn layout(&self) -> &Layout {
        &self.layout
    }
    fn info(&self) -> ImageInfo {
        ImageInfo::Synthetic {
            seed: self.seed,
            zero_percent: self.zero_percent,
        }
    }
    fn page<'a>(&'a self, block: u32, page: u64, scratch: &'a mut [u8]) -> PageData<'a> {
        if Synthetic::is_zero(self, block, page) {
            return PageData::Zero;
        }
        self.fill(block, page, scratch);
        PageData::Data(scratch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_is_deterministic_with_the_asked_zero_share() {
        let layout = Layout::single("ram", 4096 * 4000, 4096).unwrap();
        let img = Synthetic::new(layout.clone(), 7, 25);
        let zeros = img.zero_pages(0);
        assert!((800..1200).contains(&zeros), "{zeros} zero pages of 4000");
        let mut a = vec![0u8; 4096];
        let mut b = vec![0u8; 4096];
        let p = (0..4000).find(|p| !img.is_zero(0, *p)).unwrap();
        img.fill(0, p, &mut a);
        Synthetic::new(layout.clone(), 7, 25).fill(0, p, &mut b);
        assert_eq!(a, b);
        assert!(!is_zero_page(&a));
        Synthetic::new(layout, 8, 25).fill(0, p, &mut b);
        assert_ne!(a, b);
    }

    #[test]
    fn file_image_serves_pages_and_detects_zeros() {
        let dir = std::env::temp_dir().join(format!("postcopy-img-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mem");
        let mut data = vec![0u8; 3 * 4096];
        data[4096..8192].fill(9);
        std::fs::write(&path, &data).unwrap();
        let img = FileImage::open(&path, 4096).unwrap();
        let mut s = vec![0u8; 4096];
        assert_eq!(img.page(0, 0, &mut s), PageData::Zero);
        assert_eq!(img.page(0, 1, &mut s), PageData::Data(&data[4096..8192]));
        std::fs::write(&path, &data[..5000]).unwrap();
        assert!(matches!(
            FileImage::open(&path, 4096),
            Err(ImageError::Size { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
