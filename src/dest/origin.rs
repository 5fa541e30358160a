//! Which path placed each page: one byte per page, written next to the received bit, read only
//! when a migration is checked. A verification that fails names each bad page with how it was
//! (or was not) placed, and an audit finds pages placed but counted nowhere (the report's page
//! counts must sum to the layout).

use std::sync::atomic::{AtomicU8, Ordering};

use crate::layout::Layout;

/// How a page arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PlacedBy {
    /// Not placed.
    Nothing = 0,
    /// A reply to a fault's request (a sequential reader's prefetch included).
    Fault = 1,
    /// The background stream.
    Stream = 2,
    /// The source's zero-page map (or a zero page precopy announced), placed locally.
    ZeroMap = 3,
    /// Written by precopy and not discarded.
    Precopy = 4,
    /// The stream's push of the image's working set, ahead of the rest.
    WorkingSet = 5,
}

impl PlacedBy {
    fn of(v: u8) -> PlacedBy {
        match v {
            1 => PlacedBy::Fault,
            2 => PlacedBy::Stream,
            3 => PlacedBy::ZeroMap,
            4 => PlacedBy::Precopy,
            5 => PlacedBy::WorkingSet,
            _ => PlacedBy::Nothing,
        }
    }

    /// In words, for a report.
    pub fn describe(self) -> &'static str {
        match self {
            PlacedBy::Nothing => "never placed",
            PlacedBy::Fault => "placed by a fault's reply",
            PlacedBy::Stream => "placed by the stream",
            PlacedBy::ZeroMap => "placed as a zero page from the zero map",
            PlacedBy::Precopy => "written by precopy",
            PlacedBy::WorkingSet => "placed by the working-set push",
        }
    }
}

/// One byte per page of every block.
#[derive(Debug)]
pub struct PageOrigins {
    blocks: Vec<Box<[AtomicU8]>>,
}

impl PageOrigins {
    /// Every page of `layout`: not placed.
    pub fn new(layout: &Layout) -> PageOrigins {
        PageOrigins {
            blocks: layout
                .blocks
                .iter()
                .map(|b| (0..b.pages()).map(|_| AtomicU8::new(0)).collect())
                .collect(),
        }
    }

    /// Pages `[first, first + n)` of block `b` came by `by` (out-of-range pages are ignored:
    /// the callers checked the range).
    pub fn record(&self, b: usize, first: u64, n: u64, by: PlacedBy) {
        let Some(block) = self.blocks.get(b) else {
            return;
        };
        let (start, end) = (first as usize, (first + n).min(block.len() as u64) as usize);
        for o in block.get(start..end).into_iter().flatten() {
            o.store(by as u8, Ordering::Relaxed);
        }
    }

    /// How page `page` of block `b` arrived.
    pub fn get(&self, b: usize, page: u64) -> PlacedBy {
        self.blocks
            .get(b)
            .and_then(|block| block.get(page as usize))
            .map_or(PlacedBy::Nothing, |o| {
                PlacedBy::of(o.load(Ordering::Relaxed))
            })
    }

    /// Pages per path (indexed by `PlacedBy as usize`).
    pub fn counts(&self) -> [u64; 6] {
        let mut counts = [0u64; 6];
        for block in &self.blocks {
            for o in block.iter() {
                counts[usize::from(o.load(Ordering::Relaxed).min(5))] += 1;
            }
        }
        counts
    }
}
