//! The destination's memory: one mapping per block (or a VMM's regions, by segments) and
//! the received bitmaps; precopy writes and discards.

use super::error::DestError;
use super::memory::{Memory, SharedBlock};
use super::origin::{PageOrigins, PlacedBy};
use crate::layout::{Layout, PageBitmap};
use crate::sys::mem::Mapping;
use std::sync::atomic::{AtomicBool, Ordering};

/// The destination's memory: one mapping per block plus the received bitmaps.
///
/// The received bitmap of a block has a bit per page, set by the worker that placed the page
/// right after the placement ioctl returned; the workload may read it to tell a fault from a hit.
#[derive(Debug)]
pub struct DestRam {
    /// The layout.
    pub layout: Layout,
    /// One mapping per block (every page missing until placed).
    pub regions: Vec<Mapping>,
    /// One received bitmap per block.
    pub received: Vec<PageBitmap>,
    /// Which path placed each page (read when a migration is checked).
    pub placed_by: PageOrigins,
    /// THP was requested at init (and is restored at cleanup).
    thp: bool,
    /// `prepare_discard` has run (THP off).
    discard_ready: AtomicBool,
    /// Per block, where its pages live in the target address space, sorted by page: one
    /// segment (our own mapping) or, for a VMM's memory, one per guest region.
    segments: Vec<Vec<Segment>>,
    /// The memory belongs to another process (a VMM): no mapping here, only addresses.
    foreign: bool,
    /// The kind of memory of every block.
    memory: Memory,
    /// Per block, for shared memory: its file, alias and claims.
    shared: Vec<Option<SharedBlock>>,
}

/// Pages `[first_page, first_page + pages)` of a block live at `host_addr` in the target
/// address space (ours, or a VMM's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// First page (of the block).
    pub first_page: u64,
    /// Pages.
    pub pages: u64,
    /// Address of the first page in the target process.
    pub host_addr: usize,
}

impl DestRam {
    /// `postcopy_ram_incoming_init` + `prepare_discard`: maps every block as private
    /// anonymous memory (2 MiB hugetlbfs for 2 MiB-page blocks), all pages missing, THP off
    /// from the start (4 KiB precopy writes, faults and placements).
    pub fn new(layout: &Layout) -> Result<DestRam, DestError> {
        Self::with_memory(layout, Memory::Anon)
    }

    /// `postcopy_ram_incoming_init` for memory that wants transparent huge pages (as a VMM's
    /// guest RAM usually does): `MADV_HUGEPAGE` on the 4 KiB-page blocks, so precopy fills
    /// them a huge page at a time; [`prepare_discard`](Self::prepare_discard) turns THP off
    /// before discards and faults, and [`super::EngineHandle::wait`] turns it back on.
    pub fn with_thp(layout: &Layout) -> Result<DestRam, DestError> {
        Self::with_memory(layout, Memory::Thp)
    }

    /// `postcopy_ram_incoming_init` for `memory` (see [`super::memory`]): every block mapped
    /// as that kind, all pages missing. Every block's page size must be the memory's (2 MiB
    /// for hugetlbfs, else the base page): the source serves the image in those pages.
    /// Private memory (`anon`, `thp`) also takes 2 MiB-page blocks, as private hugetlbfs.
    pub fn with_memory(layout: &Layout, memory: Memory) -> Result<DestRam, DestError> {
        let mut regions = Vec::with_capacity(layout.blocks.len());
        let mut shared = Vec::with_capacity(layout.blocks.len());
        for b in &layout.blocks {
            let kind = match memory {
                Memory::Anon | Memory::Thp if b.page_size == super::memory::HUGE_2M => {
                    Memory::Hugetlb
                }
                m => m,
            };
            if b.page_size != kind.page_size() {
                return Err(DestError::PageSize {
                    block: b.name.clone(),
                    served: b.page_size,
                    memory: memory.name(),
                    wanted: kind.page_size(),
                });
            }
            let (m, sh) = kind.map(b.size_bytes as usize)?;
            if kind == Memory::Thp {
                m.huge_pages()?;
            }
            regions.push(m);
            shared.push(sh);
        }
        let segments = layout
            .blocks
            .iter()
            .zip(&regions)
            .map(|(b, m)| {
                vec![Segment {
                    first_page: 0,
                    pages: b.pages(),
                    host_addr: m.addr(),
                }]
            })
            .collect();
        let ram = DestRam {
            layout: layout.clone(),
            regions,
            received: layout
                .blocks
                .iter()
                .map(|b| PageBitmap::new(b.pages()))
                .collect(),
            placed_by: PageOrigins::new(layout),
            thp: memory == Memory::Thp,
            discard_ready: AtomicBool::new(false),
            segments,
            foreign: false,
            memory,
            shared,
        };
        if memory != Memory::Thp {
            ram.prepare_discard()?;
        }
        Ok(ram)
    }

    /// The kind of memory.
    pub fn memory(&self) -> Memory {
        self.memory
    }

    /// Block `b`'s file, alias and claims, if it is shared memory.
    pub fn shared_block(&self, b: usize) -> Option<&SharedBlock> {
        self.shared.get(b).and_then(Option::as_ref)
    }

    /// Memory of another process (a VMM that handed over its userfaultfd): per block, the
    /// segments where its pages live in that process. Pages no segment covers are not wanted
    /// (they count as received and are never placed). Segments must lie inside their block
    /// and not overlap, in pages or in addresses.
    pub fn foreign(layout: &Layout, mut segments: Vec<Vec<Segment>>) -> Result<DestRam, DestError> {
        if segments.len() != layout.blocks.len() {
            return Err(DestError::Unsupported(format!(
                "{} segment lists for {} blocks",
                segments.len(),
                layout.blocks.len()
            )));
        }
        let mut spans: Vec<(usize, usize)> = Vec::new();
        for (b, segs) in segments.iter_mut().enumerate() {
            segs.sort_by_key(|s| s.first_page);
            let block = &layout.blocks[b];
            let ps = block.page_size as usize;
            let mut next = 0;
            for s in segs.iter() {
                layout
                    .check_range(b as u32, s.first_page, s.pages)
                    .map_err(|e| DestError::Unsupported(format!("guest region: {e}")))?;
                if s.first_page < next || s.host_addr % ps != 0 {
                    return Err(DestError::Unsupported(format!(
                        "guest regions overlap in the image or are not page-aligned (page {}, address {:#x})",
                        s.first_page, s.host_addr
                    )));
                }
                next = s.first_page + s.pages;
                spans.push((s.host_addr, s.host_addr + s.pages as usize * ps));
            }
        }
        spans.sort_unstable();
        if spans.windows(2).any(|w| w[1].0 < w[0].1) {
            return Err(DestError::Unsupported(
                "guest regions overlap in the VMM's address space".into(),
            ));
        }
        let received: Vec<PageBitmap> = layout
            .blocks
            .iter()
            .map(|b| PageBitmap::new(b.pages()))
            .collect();
        for (b, segs) in segments.iter().enumerate() {
            // Everything outside the segments is not wanted: mark it done.
            received[b].set_range(0, layout.blocks[b].pages());
            for s in segs {
                received[b].clear_range(s.first_page, s.pages);
            }
        }
        Ok(DestRam {
            layout: layout.clone(),
            regions: Vec::new(),
            received,
            placed_by: PageOrigins::new(layout),
            thp: false,
            discard_ready: AtomicBool::new(true),
            segments,
            foreign: true,
            memory: Memory::Anon,
            shared: layout.blocks.iter().map(|_| None).collect(),
        })
    }

    /// Whether the memory belongs to another process.
    pub fn is_foreign(&self) -> bool {
        self.foreign
    }

    /// The segments of block `b`.
    pub fn segments(&self, b: usize) -> &[Segment] {
        &self.segments[b]
    }

    /// Where page `page` of block `b` lives, and how many pages from it (at most `max`) are
    /// contiguous there; `None` if no segment covers it.
    pub fn host_run(&self, b: usize, page: u64, max: u64) -> Option<(usize, u64)> {
        let segs = &self.segments[b];
        let i = segs.partition_point(|s| s.first_page + s.pages <= page);
        let s = segs.get(i).filter(|s| s.first_page <= page)?;
        let ps = self.layout.blocks[b].page_size as usize;
        let off = page - s.first_page;
        Some((s.host_addr + off as usize * ps, (s.pages - off).min(max)))
    }

    /// The (block, page) at `address` of the target address space, if any.
    pub fn locate(&self, address: usize) -> Option<(usize, u64)> {
        for (b, segs) in self.segments.iter().enumerate() {
            let ps = self.layout.blocks[b].page_size as usize;
            for s in segs {
                if let Some(off) = address.checked_sub(s.host_addr) {
                    if off < s.pages as usize * ps {
                        return Some((b, s.first_page + (off / ps) as u64));
                    }
                }
            }
        }
        None
    }

    /// Private anonymous 4 KiB-page blocks (where THP applies).
    fn small_page_blocks(&self) -> impl Iterator<Item = usize> + '_ {
        let base = crate::sys::mem::base_page_size() as u64;
        let private = matches!(self.memory, Memory::Anon | Memory::Thp) && !self.foreign;
        (0..self.layout.blocks.len())
            .filter(move |&b| private && self.layout.blocks[b].page_size == base)
    }

    /// `postcopy_ram_prepare_discard`: `MADV_NOHUGEPAGE` on every 4 KiB-page block, so that
    /// discards and faults work page by page. Idempotent; [`super::Engine::start`] calls it too.
    pub fn prepare_discard(&self) -> Result<(), DestError> {
        // A foreign process's memory is its own business (`discard_ready` is set for it).
        if self.discard_ready.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        for b in self.small_page_blocks() {
            self.regions[b].no_huge_pages()?;
        }
        Ok(())
    }

    /// Writes one page received in precopy (the block is not registered yet) and marks it
    /// received. `data` is exactly one page. Checks the range: never writes outside a block.
    pub fn write_page(&self, block: u32, page: u64, data: &[u8]) -> Result<(), DestError> {
        self.own("precopy")?;
        let b = self
            .layout
            .check_range(block, page, 1)
            .map_err(|e| DestError::Protocol {
                context: "precopy page".into(),
                source: e.into(),
            })?;
        assert_eq!(data.len() as u64, b.page_size, "one page of data");
        if let Some(sh) = self.shared_block(block as usize) {
            // Precopy is the only writer before postcopy starts; its claim stands until a
            // discard drops the page.
            sh.claims.set(page);
        }
        self.regions[block as usize].write_from((page * b.page_size) as usize, data);
        self.received[block as usize].set(page);
        self.placed_by
            .record(block as usize, page, 1, PlacedBy::Precopy);
        Ok(())
    }

    /// `postcopy_ram_discard_range`: drops pages `[first, first + pages)` of `block`
    /// (`MADV_DONTNEED`, or for shared memory `fallocate(PUNCH_HOLE)`, which also empties the
    /// page cache: they are missing again and will fault) and clears their received bits. A range outside the block is rejected. Calls [`prepare_discard`](Self::prepare_discard)
    /// first if nobody did.
    pub fn discard_range(&self, block: u32, first: u64, pages: u64) -> Result<(), DestError> {
        self.own("discard")?;
        let b = self
            .layout
            .check_range(block, first, pages)
            .map_err(|e| DestError::Protocol {
                context: "discard".into(),
                source: e.into(),
            })?;
        self.prepare_discard()?;
        let ps = b.page_size as usize;
        match self.shared_block(block as usize) {
            Some(sh) => {
                sh.memfd
                    .punch_hole(first as usize * ps, pages as usize * ps)?;
                sh.claims.clear_range(first, pages);
            }
            None => {
                self.regions[block as usize].dontneed(first as usize * ps, pages as usize * ps)?
            }
        }
        self.received[block as usize].clear_range(first, pages);
        self.placed_by
            .record(block as usize, first, pages, PlacedBy::Nothing);
        Ok(())
    }

    fn own(&self, what: &str) -> Result<(), DestError> {
        if self.foreign {
            return Err(DestError::Unsupported(format!(
                "{what} into another process's memory (a handed-over userfaultfd)"
            )));
        }
        Ok(())
    }

    /// Makes sure every page not received is really missing before userfaultfd is armed:
    /// with THP on during precopy, a huge page may have backed (with zeros) pages precopy never
    /// wrote. Only needed after [`with_thp`](Self::with_thp). Pages in `zeros` (precopy's zero
    /// pages, never written here) are left alone: present they hold zeros already, which is
    /// their content, and the workers' zero-map placement finds them present (`EEXIST`) and
    /// counts them done. Skipping them keeps tens of thousands of scattered `MADV_DONTNEED`s
    /// (each splitting a huge page) out of the downtime.
    pub(crate) fn drop_unreceived(&self, zeros: Option<&[PageBitmap]>) -> Result<(), DestError> {
        if !self.thp {
            return Ok(());
        }
        for b in self.small_page_blocks() {
            let (received, ps) = (&self.received[b], self.layout.blocks[b].page_size as usize);
            let zero = |p: u64| zeros.is_some_and(|z| z[b].get(p));
            let gone = |p: u64| !received.get(p) && !zero(p);
            let end = self.layout.blocks[b].pages();
            let mut p = 0;
            while let Some(first) = received.next_clear(p, end) {
                if !gone(first) {
                    p = first + 1;
                    continue;
                }
                let mut n = 1;
                while first + n < end && gone(first + n) {
                    n += 1;
                }
                self.regions[b].dontneed(first as usize * ps, n as usize * ps)?;
                p = first + n;
            }
        }
        Ok(())
    }

    /// `incoming_cleanup`'s THP part: huge pages back on where [`with_thp`](Self::with_thp)
    /// asked for them.
    pub fn restore_thp(&self) -> Result<(), DestError> {
        if self.thp {
            for b in self.small_page_blocks() {
                self.regions[b].huge_pages()?;
            }
        }
        Ok(())
    }

    /// Pages placed so far, over all blocks.
    pub fn pages_received(&self) -> u64 {
        self.received.iter().map(PageBitmap::count_ones).sum()
    }

    /// Whether every page of every block is placed.
    pub fn complete(&self) -> bool {
        self.pages_received() == self.layout.total_pages()
    }
}
