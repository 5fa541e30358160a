//! A live source: the memory of a workload that keeps running (and writing) while precopy
//! sends it, then stops at switchover.
//!
//! [`LiveImage`] serves pages straight from the workload's memory (anonymous mappings, one per
//! block): a page read while the workload writes it may be torn, which is harmless because the
//! write also marks it dirty and the page is sent again (or discarded and fetched in postcopy)
//! after the workload has stopped. [`DirtyWriter`] is the demo's workload: one thread writing
//! random pages at a set rate. Anything with a stop switch can play the workload
//! ([`SourceWorkload`]); a VMM would pause its vCPUs.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::codec::ImageInfo;
use crate::image::{is_zero_page, Image, PageData, Synthetic};
use crate::layout::Layout;
use crate::sys::mem::{Mapping, MemError};

/// The workload of a live source: it runs during precopy and is stopped at switchover.
pub trait SourceWorkload: Send {
    /// Stops the workload; when this returns, it writes no more.
    fn stop(&mut self);
}

/// A source's live memory: one private anonymous mapping per block.
pub struct LiveImage {
    layout: Layout,
    regions: Vec<Mapping>,
}

impl LiveImage {
    /// Maps the blocks of `image`'s layout and fills them with its contents (on `threads`
    /// threads; first touches of memory are slow on a fresh VM).
    pub fn from_synthetic(image: &Synthetic, threads: usize) -> Result<LiveImage, MemError> {
        let layout = image.layout().clone();
        let mut regions = Vec::with_capacity(layout.blocks.len());
        for b in &layout.blocks {
            let m = Mapping::anonymous(b.size_bytes as usize, "live source memory")?;
            // 4 KiB pages: dirty tracking and discards work per page.
            m.no_huge_pages()?;
            regions.push(m);
        }
        let threads = threads.max(1);
        std::thread::scope(|s| {
            for t in 0..threads {
                let (layout, regions) = (&layout, &regions);
                s.spawn(move || {
                    let mut page = vec![0u8; layout.max_page_size() as usize];
                    for (b, block) in layout.blocks.iter().enumerate() {
                        let ps = block.page_size as usize;
                        let (start, end) = crate::layout::shard(block.pages(), t, threads);
                        for p in start..end {
                            if image.is_zero(b as u32, p) {
                                continue; // fresh anonymous memory reads as zero
                            }
                            image.fill(b as u32, p, &mut page[..ps]);
                            regions[b].write_from(p as usize * ps, &page[..ps]);
                        }
                    }
                });
            }
        });
        Ok(LiveImage { layout, regions })
    }

    /// The mapping of block `b`.
    pub fn region(&self, b: usize) -> &Mapping {
        &self.regions[b]
    }
}

impl Image for LiveImage {
    fn layout(&self) -> &Layout {
        &self.layout
    }
    fn info(&self) -> ImageInfo {
        // The contents change until switchover: verifiers ask the source for checksums.
        ImageInfo::Opaque
    }
    fn page<'a>(&'a self, block: u32, page: u64, scratch: &'a mut [u8]) -> PageData<'a> {
        let ps = self.layout.blocks[block as usize].page_size as usize;
        let out = &mut scratch[..ps];
        self.regions[block as usize].read_into(page as usize * ps, out);
        if is_zero_page(out) {
            PageData::Zero
        } else {
            PageData::Data(out)
        }
    }
}

/// The demo's source workload: one thread that writes random pages of a [`LiveImage`] at
/// `pages_per_s` (in 1 ms ticks) until stopped.
pub struct DirtyWriter {
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DirtyWriter {
    /// Starts the writer (no thread when `pages_per_s` is 0).
    pub fn start(image: Arc<LiveImage>, pages_per_s: u64, seed: u64) -> DirtyWriter {
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let thread = (pages_per_s > 0).then(|| {
            let (stop, writes) = (stop.clone(), writes.clone());
            std::thread::Builder::new()
                .name("src-dirty".into())
                .spawn(move || write_loop(&image, pages_per_s, seed, &stop, &writes))
                .expect("spawn the dirty writer")
        });
        DirtyWriter {
            stop,
            writes,
            thread,
        }
    }

    /// Page writes so far.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }
}

fn write_loop(
    image: &LiveImage,
    pages_per_s: u64,
    seed: u64,
    stop: &AtomicBool,
    writes: &AtomicU64,
) {
    let total = image.layout.total_pages();
    let mut rng = crate::rng::Rng::new(seed);
    let started = Instant::now();
    let mut done = 0u64;
    while !stop.load(Ordering::Acquire) {
        let due = (started.elapsed().as_secs_f64() * pages_per_s as f64) as u64;
        while done < due && !stop.load(Ordering::Relaxed) {
            let mut g = rng.below(total);
            let mut b = 0;
            while g >= image.layout.blocks[b].pages() {
                g -= image.layout.blocks[b].pages();
                b += 1;
            }
            let ps = image.layout.blocks[b].page_size;
            let word = rng.below(ps / 8) * 8;
            image.regions[b].xor_u64((g * ps + word) as usize, rng.next_u64() | 1);
            done += 1;
            if done % 256 == 0 {
                writes.store(done, Ordering::Relaxed);
            }
        }
        writes.store(done, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl SourceWorkload for DirtyWriter {
    fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for DirtyWriter {
    fn drop(&mut self) {
        self.stop();
    }
}
