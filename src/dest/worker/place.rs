//! Placement: a batch's runs into the shard with one `UFFDIO_COPY` / `UFFDIO_ZEROPAGE` each,
//! the zero map in the background, and the bookkeeping of every placed page.

// Parts of one type's implementation (`Worker`, defined in `mod.rs`): they share its imports.
use super::*;

impl Worker {
    /// Places every page of the shard that the source's zero-page map marks zero, in runs
    /// (before serving faults: faults meanwhile wait in the userfaultfd and are then served).
    pub(super) fn place_zero_map(&mut self) -> Result<(), DestError> {
        let Some(map) = self.st().zero_map.clone() else {
            return Ok(());
        };
        let max_run = self.zeros.as_ref().map_or(1 << 16, |z| {
            z.len_bytes() / self.ram.layout.max_page_size() as usize
        }) as u64;
        for (b, zeros) in map.iter().enumerate() {
            let (start, end) = self.st().shard[b];
            let mut p = start;
            while p < end {
                if !zeros.get(p) {
                    p += 1;
                    continue;
                }
                let n = zeros.run_of_set(p, end, max_run);
                let fill = self.zero_fill_for(b);
                self.place_run(b, p, n as usize, fill, true, Origin::ZeroMap)?;
                p += n;
            }
        }
        Ok(())
    }

    pub(super) fn in_zero_map(&self, b: usize, page: u64) -> bool {
        self.st().zero_map.as_ref().is_some_and(|m| m[b].get(page))
    }

    /// How to zero a page of block `b`: `UFFDIO_ZEROPAGE` does not exist for hugetlbfs, so
    /// huge pages are always copied from zeros.
    pub(super) fn zero_fill_for(&self, b: usize) -> Fill {
        if self.ram.shared_block(b).is_some() {
            return Fill::Zero; // zeros are written through the alias
        }
        let huge = self.ram.layout.blocks[b].page_size != crate::sys::mem::base_page_size() as u64;
        match (&self.zeros, huge) {
            (Some(z), _) => Fill::Copy(z.as_ptr()),
            (None, false) => Fill::Zero,
            (None, true) => unreachable!("huge-page blocks get a zero buffer at set-up"),
        }
    }

    /// Places a received batch: runs of zero pages with `UFFDIO_ZEROPAGE`, runs of data pages
    /// with one `UFFDIO_COPY` from the temp pages.
    pub(super) fn place_batch(&mut self, h: &Header) -> Result<(), DestError> {
        if self.half == Half::Urgent {
            return self.place_batch_runs(h);
        }
        let st = self.state.clone();
        let batch = super::pack_batch(h.block, h.page, u64::from(h.count));
        st.placing.store(batch, Ordering::Release);
        let placed = self.place_batch_runs(h);
        st.placing.store(super::NOT_PLACING, Ordering::Release);
        placed
    }

    /// [`place_batch`](Self::place_batch)'s runs.
    fn place_batch_runs(&mut self, h: &Header) -> Result<(), DestError> {
        let ps = self.ram.layout.blocks[h.block as usize].page_size as usize;
        let count = usize::from(h.count);
        let mut i = 0;
        let mut data_pages = 0;
        let origin = match self.half {
            Half::Urgent => Origin::Reply,
            Half::Bulk if self.in_push => Origin::WorkingSet,
            Half::Bulk => Origin::Stream,
        };
        if let Some(d) = self.direct.take() {
            return self.place_direct(d, h, origin);
        }
        while i < count {
            let zero = h.mask >> i & 1 == 1;
            let mut n = 1;
            while i + n < count && (h.mask >> (i + n) & 1 == 1) == zero {
                n += 1;
            }
            let fill = if zero {
                self.zero_fill_for(h.block as usize)
            } else {
                let src = self.ring.slot_addr(self.body, data_pages * ps);
                data_pages += n;
                Fill::Copy(src)
            };
            self.place_run(h.block as usize, h.page + i as u64, n, fill, zero, origin)?;
            i += n;
        }
        Ok(())
    }

    /// Places pages `[first, first + n)` of block `b` from `fill`, split where the target
    /// address space is not contiguous (a VMM's regions) and around pages the VMM removed.
    pub(super) fn place_run(
        &mut self,
        b: usize,
        first: u64,
        n: usize,
        fill: Fill,
        zero: bool,
        origin: Origin,
    ) -> Result<(), DestError> {
        let ps = self.ram.layout.blocks[b].page_size as usize;
        let at = |fill: Fill, off: usize| match fill {
            Fill::Copy(src) => Fill::Copy(src.wrapping_add(off * ps)),
            Fill::Zero => Fill::Zero,
        };
        if self.ram.shared_block(b).is_some() {
            return self.place_shared(b, first, n, fill, zero, origin);
        }
        if !self.ram.is_foreign() {
            let (addr, _) = self
                .ram
                .host_run(b, first, n as u64)
                .expect("own memory covers its block");
            return self
                .place_extent(b, first, n, addr, fill, zero, origin)
                .map(|_| ());
        }
        let state = self.state.clone();
        let mut off = 0;
        let mut waited = 0u32;
        let mut stalled_since: Option<Instant> = None;
        while off < n {
            // The bulk half places under the read side of the lock the urgent half reads
            // REMOVE events under (see `ShardState::place_lock`); the urgent half is the reader.
            let shared_guard = (self.half == Half::Bulk).then(|| {
                state
                    .place_lock
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
            });
            let mut stalled = false;
            while off < n {
                let p = first + off as u64;
                let skip = self.is_removed(b, p) || self.ram.host_run(b, p, 1).is_none();
                if skip {
                    off += 1; // dropped by the VMM, or outside its regions: never filled
                    continue;
                }
                let (addr, seg_pages) = self
                    .ram
                    .host_run(b, p, (n - off) as u64)
                    .expect("checked above");
                let mut k = seg_pages as usize;
                if let Some(removed) = &state.removed {
                    if let Some(r) = (1..k).find(|&i| removed[b].get(p + i as u64)) {
                        k = r;
                    }
                }
                let done = self.place_extent(b, p, k, addr, at(fill, off), zero, origin)?;
                off += done;
                if done < k {
                    stalled = true; // EAGAIN: a REMOVE is pending
                    break;
                }
            }
            drop(shared_guard);
            if stalled {
                let since = *stalled_since.get_or_insert_with(Instant::now);
                waited += 1;
                self.back_off_eagain(since, waited)?;
            }
        }
        Ok(())
    }

    /// `EAGAIN` lasts until the VMM's own madvise/munmap returns, which needs its event read
    /// (by the urgent half) and then its thread on a CPU: bounded by time (the stall timeout),
    /// not by a count of retries (on a loaded host that thread may wait a while).
    fn back_off_eagain(&mut self, since: Instant, waited: u32) -> Result<(), DestError> {
        if since.elapsed() > self.config.link_timeout {
            return Err(DestError::Unsupported(format!(
                "the VMM's memory map kept changing (EAGAIN on every placement) for {} s",
                since.elapsed().as_secs()
            )));
        }
        if self.half == Half::Urgent {
            // We read the events: do it now, then retry.
            self.read_events_now()?;
        }
        if waited <= 8 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(50 * u64::from(waited.min(20))));
        }
        Ok(())
    }

    /// Places `n` pages at `base` (contiguous in the target) from `fill`. Returns the pages
    /// done (placed or found present); fewer than `n` only for a VMM's memory whose map is
    /// changing (`EAGAIN`), which the caller resolves by reading events first.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn place_extent(
        &mut self,
        b: usize,
        first: u64,
        n: usize,
        base: usize,
        fill: Fill,
        zero: bool,
        origin: Origin,
    ) -> Result<usize, DestError> {
        let ps = self.ram.layout.blocks[b].page_size as usize;
        let ram = self.ram.clone();
        let received = &ram.received[b];
        let mut off = 0;
        let mut retries = 0;
        // A page the other half placed already, or (a reply's page) one in the stream batch
        // being placed now: a fault's reply and the stream both carried it, and this copy is
        // dropped without an ioctl (the other placement wakes the faulting thread).
        let state = self.state.clone();
        let urgent = self.half == Half::Urgent;
        let taken = |p: u64| received.get(p) || (urgent && state.bulk_is_placing(b, p));
        while off < n {
            if taken(first + off as u64) {
                self.stats.pages_duplicate += 1;
                off += 1;
                continue;
            }
            let run = (off + 1..n).find(|&i| taken(first + i as u64)).unwrap_or(n);
            let dst = base + off * ps;
            let len = (run - off) * ps;
            self.stats.place_ioctls += 1;
            let result = match fill {
                // `src` points into a ring-owned temp page arena that no operation targets now.
                Fill::Copy(src) => self
                    .st()
                    .uffd
                    .copy(dst, src.wrapping_add(off * ps), len, false),
                Fill::Zero => self.st().uffd.zeropage(dst, len, false),
            };
            let (placed, err) = match result {
                Ok(()) => (run - off, None),
                Err(e) => (e.done_bytes / ps, Some(e)),
            };
            self.mark_placed(b, first + off as u64, placed as u64, zero, origin);
            off += placed;
            let Some(e) = err else {
                continue; // the run ended at a page placed already: go on after it
            };
            match e.kind {
                PlaceErrorKind::Partial => {}
                PlaceErrorKind::Exists => {
                    // Placed by the other half between our look and the ioctl (a real race):
                    // make sure its waiters run.
                    self.stats.eexist += 1;
                    self.st().uffd.wake(base + off * ps, ps)?;
                    if self.ram.is_foreign() || origin == Origin::ZeroMap {
                        // Present in the VMM but maybe not by our hand (it may have written
                        // the page before handing over), or a precopy zero page that a huge
                        // page backed with zeros during precopy: count it done.
                        self.mark_present(b, first + off as u64, origin);
                    }
                    off += 1;
                }
                PlaceErrorKind::MappingChanging if self.ram.is_foreign() => return Ok(off),
                // The VMM exited (its address space is gone): nothing more can be placed; the
                // worker ends and the engine decides whether it had everything.
                PlaceErrorKind::MmGone if self.ram.is_foreign() => {
                    self.mm_gone = true;
                    return Ok(n);
                }
                PlaceErrorKind::MappingChanging if retries < MAPPING_CHANGING_RETRIES => {
                    retries += 1;
                    std::thread::yield_now();
                }
                _ => return Err(crate::sys::uffd::UffdError::Place(e).into()),
            }
        }
        Ok(n)
    }

    /// Fault service time (event read → placed) of the faulted pages among `[first, first+n)`
    /// (a VMM's memory, or a receiver-driven stream's: the pacer counts it).
    pub(super) fn record_fault_service(&mut self, b: usize, first: u64, n: u64) {
        let state = self.state.clone();
        let Some(at) = &state.fault_at_ns else {
            return;
        };
        let now = self.shared.started.elapsed().as_nanos() as u64;
        let hist = self.stats.fault_service_ns.get_or_insert_with(|| {
            hdrhistogram::Histogram::new_with_bounds(1, 60_000_000_000, 3)
                .expect("valid histogram bounds")
        });
        for p in first..first + n {
            let t = at[b][p as usize].swap(0, Ordering::Relaxed);
            if t > 0 {
                let service_ns = now.saturating_sub(t).max(1);
                let _ = hist.record(service_ns);
                if let Some(pacer) = &self.shared.pacer {
                    pacer.record(service_ns);
                }
                let _ = self.shared.first_served_ns.compare_exchange(
                    0,
                    now,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                );
            }
        }
    }

    /// A page found present (`EEXIST`) that no placement of ours marked: count it done, so
    /// the shard completes, and count it where it came from, so the report's page counts sum
    /// to the layout (a precopy zero page that a huge page backed with zeros is a zero-map page
    /// found present).
    pub(super) fn mark_present(&mut self, b: usize, page: u64, origin: Origin) {
        if self.ram.received[b].set(page) {
            self.ram.placed_by.record(b, page, 1, origin.placed_by());
            match origin {
                // A zero-map page is a zero page, whichever half's ioctl placed it: the other
                // half's run counts only the pages it marked (the test
                // `zero_map_places_zero_pages_locally` saw 2528 zero of 2529, 1 run in 13).
                Origin::ZeroMap => {
                    self.stats.pages_by_zero_map += 1;
                    self.stats.pages_zero += 1;
                }
                Origin::Reply => self.stats.pages_by_fault += 1,
                Origin::Stream => self.stats.pages_by_stream += 1,
                Origin::WorkingSet => self.stats.pages_by_working_set += 1,
            }
            let st = self.st();
            let left = st.missing.fetch_sub(1, Ordering::AcqRel) - 1;
            if st.requested[b].clear(page) {
                st.outstanding.fetch_sub(1, Ordering::AcqRel);
            }
            if left == 0 {
                let ns = self.shared.started.elapsed().as_nanos() as u64;
                self.shared.last_placed_ns.fetch_max(ns, Ordering::AcqRel);
            }
        }
    }

    pub(super) fn mark_placed(&mut self, b: usize, first: u64, n: u64, zero: bool, origin: Origin) {
        if n == 0 {
            return;
        }
        let (start, end) = self.st().shard[b];
        assert!(
            start <= first && first + n <= end,
            "pages [{first}, {}) of block {b} placed outside the shard [{start}, {end})",
            first + n
        );
        self.ram.placed_by.record(b, first, n, origin.placed_by());
        let new = self.ram.received[b].set_range(first, n);
        // Fewer new bits than pages placed only where another half may have marked one of them
        // present first (its zero-map placement found our page: `mark_present`), or in a VMM's
        // memory.
        debug_assert!(
            new == n || self.ram.is_foreign() || origin == Origin::ZeroMap,
            "a page was placed twice"
        );
        let before = self.st().missing.fetch_sub(new, Ordering::AcqRel);
        assert!(
            before >= new,
            "the missing count would wrap: {before} - {new}"
        );
        let left = before - new;
        // Requests these pages answered (whichever half delivered them) are no longer awaited.
        let answered = self.st().requested[b].clear_range(first, n);
        if answered > 0 {
            self.st().outstanding.fetch_sub(answered, Ordering::AcqRel);
            self.record_fault_service(b, first, n);
        }
        match origin {
            Origin::Reply => self.stats.pages_by_fault += new,
            Origin::Stream => self.stats.pages_by_stream += new,
            Origin::WorkingSet => self.stats.pages_by_working_set += new,
            Origin::ZeroMap => self.stats.pages_by_zero_map += new,
        }
        if zero {
            self.stats.pages_zero += new;
        }
        if left == 0 {
            let ns = self.shared.started.elapsed().as_nanos() as u64;
            self.shared.last_placed_ns.fetch_max(ns, Ordering::AcqRel);
        }
    }
}
