//! Placement into shared memory (a shmem or hugetlbfs memfd, see [`crate::dest::memory`]):
//! claim each page, write it through the alias, map claimed runs with one `UFFDIO_CONTINUE`
//! each; and the bulk half's receive of a stream batch straight into the alias.

// Parts of one type's implementation (`Worker`, defined in `mod.rs`): they share its imports.
use super::*;
use crate::dest::memory::SharedBlock;

/// A stream batch whose body the bulk half receives straight into the alias: it claimed every
/// page of the batch at its header, and its data pages are contiguous.
#[derive(Clone, Copy, Debug)]
pub(super) struct Direct {
    /// The alias slot of the block.
    slot: SlotId,
    /// Offset in the alias of the first data page.
    at_bytes: usize,
    /// The batch: block, first page, pages, and the claim (every page: `count` low bits).
    block: usize,
    page: u64,
    count: u64,
}

fn low_bits(n: u64) -> u64 {
    if n >= 64 {
        u64::MAX
    } else {
        (1u64 << n) - 1
    }
}

impl Worker {
    fn shared_of(&self, b: usize) -> &SharedBlock {
        self.ram.shared_block(b).expect("a shared-memory block")
    }

    /// Places pages `[first, first + n)` of shared block `b` from `fill` (data in the body
    /// slot, or zeros): every page this half claims is written through the alias and each
    /// claimed run is mapped with one `UFFDIO_CONTINUE`. A page claimed by somebody else is
    /// theirs to place (counted duplicate; their `CONTINUE` wakes its waiters).
    pub(super) fn place_shared(
        &mut self,
        b: usize,
        first: u64,
        n: usize,
        fill: Fill,
        zero: bool,
        origin: Origin,
    ) -> Result<(), DestError> {
        let ram = self.ram.clone();
        let sh = ram.shared_block(b).expect("a shared-memory block");
        let mut off = 0u64;
        while off < n as u64 {
            let k = (n as u64 - off).min(64);
            let won = sh.claims.claim(first + off, k);
            self.stats.pages_duplicate += k - u64::from(won.count_ones());
            let mut rest = won;
            while rest != 0 {
                let i = u64::from(rest.trailing_zeros());
                let run = u64::from((rest >> i).trailing_ones());
                rest &= !(low_bits(run) << i);
                self.write_alias(&ram, b, first, off + i, run, fill);
                self.continue_run(b, first + off + i, run, zero, origin)?;
            }
            off += k;
        }
        Ok(())
    }

    /// Writes `run` pages starting `at` pages after `first` (claimed by this half) through the
    /// alias: from `fill`'s data, which starts at page `first`, or zeros.
    fn write_alias(&self, ram: &DestRam, b: usize, first: u64, at: u64, run: u64, fill: Fill) {
        let sh = ram.shared_block(b).expect("a shared-memory block");
        let ps = ram.layout.blocks[b].page_size as usize;
        let dst = (first + at) as usize * ps;
        let len = run as usize * ps;
        match fill {
            Fill::Zero => sh.alias.fill_zero(dst, len),
            Fill::Copy(src) => {
                // Data comes from the body slot (the temp pages a batch was received into).
                let body = self.ring.slot(self.body);
                let from = (src as usize)
                    .checked_sub(body.as_ptr() as usize)
                    .expect("shared-memory data comes from the body slot")
                    + at as usize * ps;
                sh.alias.write_from(dst, &body[from..from + len]);
            }
        }
    }

    /// Maps pages `[first, first + n)` of shared block `b`, written through the alias by this
    /// half, into the guest's view, and counts them placed.
    fn continue_run(
        &mut self,
        b: usize,
        first: u64,
        n: u64,
        zero: bool,
        origin: Origin,
    ) -> Result<(), DestError> {
        let ps = self.ram.layout.blocks[b].page_size as usize;
        let (base, _) = self
            .ram
            .host_run(b, first, n)
            .expect("own memory covers its block");
        let mut off = 0u64;
        while off < n {
            self.stats.place_ioctls += 1;
            let dst = base + off as usize * ps;
            let len = (n - off) as usize * ps;
            let (done, err) = match self.st().uffd.continue_range(dst, len, false) {
                Ok(()) => (n - off, None),
                Err(e) => ((e.done_bytes / ps) as u64, Some(e)),
            };
            self.mark_placed(b, first + off, done, zero, origin);
            off += done;
            match err.map(|e| (e.kind, e)) {
                None | Some((PlaceErrorKind::Partial, _)) => {}
                Some((PlaceErrorKind::Exists, _)) => {
                    // Mapped already (precopy wrote it through the guest's view before a
                    // claim existed, e.g.): its contents are the ones claimed.
                    self.stats.eexist += 1;
                    self.st().uffd.wake(base + off as usize * ps, ps)?;
                    self.mark_present(b, first + off, origin);
                    off += 1;
                }
                Some((_, e)) => return Err(crate::sys::uffd::UffdError::Place(e).into()),
            }
        }
        Ok(())
    }

    /// At a stream batch's checked header: if it is for shared memory, its data pages are
    /// contiguous and this half claims every page of it, its body goes straight into the
    /// alias (one copy fewer). Otherwise (a page claimed elsewhere, zeros between data pages)
    /// the claim is given back and the batch takes the temp pages.
    pub(super) fn claim_direct(&mut self, h: &Header) -> Option<Direct> {
        let b = h.block as usize;
        let slot = (*self.aliases.get(b)?)?;
        let count = u64::from(h.count);
        let data = !h.mask & low_bits(count);
        if data == 0 {
            return None;
        }
        let i0 = u64::from(data.trailing_zeros());
        if data >> i0 != low_bits(u64::from((data >> i0).trailing_ones())) {
            return None; // zero pages between data pages
        }
        let claims = &self.shared_of(b).claims;
        let won = claims.claim(h.page, count);
        if won != low_bits(count) {
            claims.release(h.page, won);
            return None;
        }
        let ps = self.ram.layout.blocks[b].page_size as usize;
        Some(Direct {
            slot,
            at_bytes: (h.page + i0) as usize * ps,
            block: b,
            page: h.page,
            count,
        })
    }

    /// Where the body of a direct batch is received: its alias slot and offset.
    pub(super) fn direct_target(d: &Direct) -> (SlotId, usize) {
        (d.slot, d.at_bytes)
    }

    /// Opens a direct batch's sealed body in place, in the alias.
    pub(super) fn open_direct(&mut self, d: &Direct, h: &Header) -> Result<(), DestError> {
        let head: [u8; HEADER_BYTES] = self.ring.slot(self.header)[..HEADER_BYTES]
            .try_into()
            .expect("header slot is HEADER_BYTES long");
        let tag: [u8; TAG_BYTES] = self.ring.slot(self.tag)[..TAG_BYTES]
            .try_into()
            .expect("tag slot is TAG_BYTES long");
        let Some(c) = self.channel.as_mut() else {
            return Ok(());
        };
        // The pages are claimed by this half (no other writer) and not mapped into the guest
        // until placed: nobody reads them while they are opened.
        let body = self
            .ring
            .shared_range_mut(d.slot, d.at_bytes, h.body_len as usize);
        c.rx.open(&head, body, &tag).map_err(AuthError::from)?;
        Ok(())
    }

    /// Places a direct batch once its body (and tag) checked: zero pages written through the
    /// alias, then the whole batch mapped with one `UFFDIO_CONTINUE`.
    pub(super) fn place_direct(
        &mut self,
        d: Direct,
        h: &Header,
        origin: Origin,
    ) -> Result<(), DestError> {
        let ram = self.ram.clone();
        let sh = ram.shared_block(d.block).expect("a shared-memory block");
        let ps = ram.layout.blocks[d.block].page_size as usize;
        let mut zeros = h.mask & low_bits(d.count);
        while zeros != 0 {
            let i = u64::from(zeros.trailing_zeros());
            let run = u64::from((zeros >> i).trailing_ones());
            zeros &= !(low_bits(run) << i);
            sh.alias
                .fill_zero((d.page + i) as usize * ps, run as usize * ps);
        }
        let zero_pages = u64::from((h.mask & low_bits(d.count)).count_ones());
        self.stats.pages_zero += zero_pages;
        self.stats.pages_direct += d.count;
        self.continue_run(d.block, d.page, d.count, false, origin)
    }

    /// A direct batch cut short (its connection broke, its tag was wrong, or the worker ended
    /// for another reason): once no receive
    /// targets the alias any more, its pages are punched out (whatever arrived of them is
    /// dropped) and their claims given back, so that a reply or the resumed stream places
    /// them.
    pub(super) fn abandon_direct(&mut self) -> Result<(), DestError> {
        let Some(d) = self.direct.take() else {
            return Ok(());
        };
        if self.ring.is_busy(d.slot) {
            // Its receive ends once its connection does.
            if let Some(s) = self.stream.as_ref() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.ring.is_busy(d.slot) && Instant::now() < deadline {
            // Only the old connection's operations are in flight: their completions are stale.
            if self.ring.submit_and_reap(1, Some(WAIT)).is_err() {
                break;
            }
        }
        let sh = self.shared_of(d.block);
        let ps = self.ram.layout.blocks[d.block].page_size as usize;
        if self.ring.is_busy(d.slot) {
            // The kernel may still write there: nobody may map those pages; the migration
            // fails rather than hang on pages nobody can place.
            return Err(DestError::Unsupported(
                "a receive into guest memory did not end within 5 s of its connection's shutdown"
                    .into(),
            ));
        }
        sh.memfd
            .punch_hole(d.page as usize * ps, d.count as usize * ps)?;
        sh.claims.release(d.page, low_bits(d.count));
        Ok(())
    }
}
