//! The urgent half's fault path: fault events (and removals) read from the userfaultfd, the
//! pending requests coalesced into `Request` frames and sent, `End` once the shard is complete.

// Parts of one type's implementation (`Worker`, defined in `mod.rs`): they share its imports.
use super::*;

/// Sorts `pending` (block, page) faults and encodes them as `Request` frames into `buf`, one
/// frame per run of consecutive pages (at most `MAX_REQUEST_PAGES` each), as many as fit.
/// Returns (pending entries encoded, bytes written, frames).
pub fn coalesce_requests(pending: &mut [(u32, u64)], buf: &mut [u8]) -> (usize, usize, u64) {
    pending.sort_unstable();
    let (mut i, mut len, mut frames) = (0, 0, 0);
    while i < pending.len() && len + HEADER_BYTES <= buf.len() {
        let (block, first) = pending[i];
        let mut n = 1usize;
        while i + n < pending.len()
            && n < usize::from(codec::MAX_REQUEST_PAGES)
            && pending[i + n] == (block, first + n as u64)
        {
            n += 1;
        }
        let mut h = [0u8; HEADER_BYTES];
        Header::request(block, first, n as u16).encode(&mut h);
        buf[len..len + HEADER_BYTES].copy_from_slice(&h);
        len += HEADER_BYTES;
        frames += 1;
        i += n;
    }
    (i, len, frames)
}
impl Worker {
    pub(super) fn on_events(&mut self, result: i32) -> Result<(), DestError> {
        if self.ram.is_foreign() {
            if result < 0 && -result != libc::ECANCELED && -result != libc::EINTR {
                let e = nix::errno::Errno::from_raw(-result);
                return Err(crate::sys::uffd::UffdError::Read(e).into());
            }
            self.read_events_now()?;
            return self.flush_requests();
        }
        if result < 0 {
            let errno = nix::errno::Errno::from_raw(-result);
            return match errno {
                nix::errno::Errno::EAGAIN
                | nix::errno::Errno::EINTR
                | nix::errno::Errno::ECANCELED => Ok(()),
                e => Err(crate::sys::uffd::UffdError::Read(e).into()),
            };
        }
        let events = self.events.expect("fault events only on the urgent half");
        for i in 0..result as usize / MSG_BYTES {
            let mut msg = [0u8; MSG_BYTES];
            msg.copy_from_slice(&self.ring.slot(events)[i * MSG_BYTES..(i + 1) * MSG_BYTES]);
            self.stats.fault_events += 1;
            if let Event::PageFault { address, flags, .. } = Event::decode(&msg) {
                self.check_fault_kind(flags)?;
                self.on_fault(address as usize)?;
            }
            // Other events (REMOVE, UNMAP, ...) are not requested by this engine.
        }
        self.flush_requests()
    }

    /// Reads and handles every pending userfaultfd event with `read(2)`, under the write side
    /// of the placement lock (a VMM's memory; see `ShardState::place_lock`).
    pub(super) fn read_events_now(&mut self) -> Result<(), DestError> {
        let state = self.state.clone();
        let _exclusive = state
            .place_lock
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut buf = [0u8; EVENT_BATCH * MSG_BYTES];
        loop {
            let n = state.uffd.read_events(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            for msg in buf[..n].chunks_exact(MSG_BYTES) {
                self.stats.fault_events += 1;
                match Event::decode(msg.try_into().expect("one message")) {
                    Event::PageFault { address, flags, .. } => {
                        self.check_fault_kind(flags)?;
                        self.on_fault(address as usize)?
                    }
                    Event::Remove { start, end } => self.on_remove(start as usize, end as usize),
                    _ => {} // FORK, REMAP, UNMAP: not requested by a VMM here
                }
            }
        }
    }

    /// A MINOR fault in memory this engine did not register MINOR (a VMM's, handed over): its
    /// page is in the page cache already, and `UFFDIO_COPY` cannot place it (the handover does
    /// not carry the VMM's memfd; see ARCHITECTURE.md). Refused, never guessed at.
    fn check_fault_kind(&self, flags: u64) -> Result<(), DestError> {
        if flags & crate::sys::uffd::PAGEFAULT_FLAG_MINOR != 0 && self.ram.is_foreign() {
            return Err(DestError::Unsupported(
                "the VMM registered its guest memory MINOR (shared memory): this handler serves MISSING faults of private memory only".into(),
            ));
        }
        Ok(())
    }

    /// `UFFD_EVENT_REMOVE`: the VMM dropped `[start, end)` (a balloon, memory unplug). Those
    /// pages read as zero from now on: they are done (not missing), never placed from the
    /// source, and a later fault on them gets a zero page.
    pub(super) fn on_remove(&mut self, start: usize, end: usize) {
        let st = self.state.clone();
        let removed = st.removed.as_ref().expect("REMOVE only for a VMM's memory");
        for (b, block) in self.ram.layout.blocks.iter().enumerate() {
            let ps = block.page_size as usize;
            for seg in self.ram.segments(b) {
                let seg_end = seg.host_addr + seg.pages as usize * ps;
                let (lo, hi) = (start.max(seg.host_addr), end.min(seg_end));
                if lo >= hi {
                    continue;
                }
                let first = seg.first_page + ((lo - seg.host_addr) / ps) as u64;
                let last = seg.first_page + ((hi - seg.host_addr).div_ceil(ps)) as u64;
                let n = last - first;
                self.stats.pages_removed += removed[b].set_range(first, n);
                let newly_done = self.ram.received[b].set_range(first, n);
                if newly_done > 0 {
                    let left = st.missing.fetch_sub(newly_done, Ordering::AcqRel) - newly_done;
                    if left == 0 {
                        let ns = self.shared.started.elapsed().as_nanos() as u64;
                        self.shared.last_placed_ns.fetch_max(ns, Ordering::AcqRel);
                    }
                }
                let answered = st.requested[b].clear_range(first, n);
                if answered > 0 {
                    st.outstanding.fetch_sub(answered, Ordering::AcqRel);
                }
            }
        }
    }

    pub(super) fn on_fault(&mut self, address: usize) -> Result<(), DestError> {
        let Some((b, page)) = self.locate(address) else {
            return Ok(()); // not ours: cannot happen with per-shard registration
        };
        let ps = self.ram.layout.blocks[b].page_size as usize;
        let addr = self
            .ram
            .host_run(b, page, 1)
            .expect("a located page has an address")
            .0;
        if self.is_removed(b, page) {
            // Dropped by the VMM: it reads as zero, never as the source's page.
            let fill = self.zero_fill_for(b);
            let result = match fill {
                Fill::Copy(src) => self.st().uffd.copy(addr, src, ps, false),
                Fill::Zero => self.st().uffd.zeropage(addr, ps, false),
            };
            self.stats.place_ioctls += 1;
            match result {
                Ok(()) => self.stats.pages_zero_after_remove += 1,
                Err(e) if e.kind == PlaceErrorKind::Exists => self.st().uffd.wake(addr, ps)?,
                // Another REMOVE is pending: its event is read next; the thread refaults.
                Err(e) if e.kind == PlaceErrorKind::MappingChanging => {}
                Err(e) => return Err(crate::sys::uffd::UffdError::Place(e).into()),
            }
        } else if self.ram.received[b].get(page) {
            // Placed after the thread faulted: the placement's wake may have missed it.
            self.stats.fault_already_placed += 1;
            self.st().uffd.wake(addr, ps)?;
        } else if self.in_zero_map(b, page) {
            // A zero page by the source's map, not placed yet: no round trip (the bulk half
            // may race us to it; `EEXIST` then counts it done).
            let fill = self.zero_fill_for(b);
            self.place_run(b, page, 1, fill, true, Origin::ZeroMap)?;
        } else if self.st().bulk_is_placing(b, page) {
            // In the stream's batch being placed now: its placement wakes the thread.
            self.stats.fault_deduplicated += 1;
        } else if self.st().requested[b].set(page) {
            self.st().outstanding.fetch_add(1, Ordering::AcqRel);
            if let Some(at) = &self.st().fault_at_ns {
                let ns = self.shared.started.elapsed().as_nanos() as u64;
                at[b][page as usize].store(ns.max(1), Ordering::Relaxed);
            }
            self.pending.push((b as u32, page));
        } else {
            self.stats.fault_deduplicated += 1;
        }
        Ok(())
    }

    pub(super) fn locate(&self, address: usize) -> Option<(usize, u64)> {
        let (b, page) = self.ram.locate(address)?;
        let (start, end) = self.st().shard[b];
        (start..end).contains(&page).then_some((b, page))
    }

    pub(super) fn is_removed(&self, b: usize, page: u64) -> bool {
        self.st().removed.as_ref().is_some_and(|r| r[b].get(page))
    }

    /// Coalesces pending faults into `Request` frames and submits one send.
    pub(super) fn flush_requests(&mut self) -> Result<(), DestError> {
        let Some(send) = self.send else {
            return Ok(());
        };
        if self.pending.is_empty() || self.sending() || self.end_sent || self.ring.is_busy(send) {
            return Ok(());
        }
        let (used, len, frames) = match self.channel.as_mut() {
            None => coalesce_requests(&mut self.pending, self.ring.slot_mut(send)),
            Some(c) => {
                // Room for each 32-byte Request's 16-byte tag in the send slot.
                let room = SEND_BYTES / (HEADER_BYTES + TAG_BYTES) * HEADER_BYTES;
                self.unsealed.resize(room, 0);
                let (used, len, frames) = coalesce_requests(&mut self.pending, &mut self.unsealed);
                self.sealed.clear();
                seal_frames(Some(&mut c.tx), &self.unsealed[..len], &mut self.sealed);
                let at = self.sealed.len();
                self.ring.slot_mut(send)[..at].copy_from_slice(&self.sealed);
                (used, at, frames)
            }
        };
        self.pending.drain(..used);
        self.stats.requests += frames;
        self.stats.pages_requested += used as u64;
        self.start_send(len)
    }

    /// A send is in progress until its last byte's completion has been processed (the ring
    /// frees the slot at reap time, before we act on the completion).
    pub(super) fn sending(&self) -> bool {
        self.send_progress.1 != 0
    }

    pub(super) fn start_send(&mut self, len: usize) -> Result<(), DestError> {
        debug_assert!(!self.sending());
        let send = self.send.expect("sends only on the urgent half");
        self.send_progress = (0, len);
        self.last_sent = Instant::now();
        let tag = self.tag(TAG_SEND);
        self.ring
            .fixed(OpKind::Write, self.stream_fd(), send, 0, len, tag)?;
        self.ring.submit()?;
        Ok(())
    }

    pub(super) fn on_sent(&mut self, result: i32) -> Result<(), DestError> {
        if result <= 0 {
            return Err(DestError::Io {
                context: "send requests on the urgent connection".into(),
                source: std::io::Error::from_raw_os_error(if result == 0 {
                    libc::EPIPE
                } else {
                    -result
                }),
            });
        }
        let (done, total) = self.send_progress;
        let done = done + result as usize;
        if done < total {
            self.send_progress = (done, total);
            let send = self.send.expect("sends only on the urgent half");
            let tag = self.tag(TAG_SEND);
            self.ring.fixed(
                OpKind::Write,
                self.stream_fd(),
                send,
                done,
                total - done,
                tag,
            )?;
            return Ok(());
        }
        self.send_progress = (0, 0);
        self.flush_requests()
    }

    pub(super) fn send_end(&mut self) -> Result<(), DestError> {
        let send = self.send.expect("End goes out on the urgent half");
        if self.sending() || self.ring.is_busy(send) {
            return Ok(()); // after the requests in flight
        }
        self.end_sent = true;
        self.send_control(&self.end_header())
    }

    /// Seals `frames` (on an authenticated connection) into `sealed`.
    pub(super) fn seal(&mut self, frames: &[u8]) {
        self.sealed.clear();
        seal_frames(
            self.channel.as_mut().map(|c| &mut c.tx),
            frames,
            &mut self.sealed,
        );
    }

    /// Sends a control frame (the send slot is free): sealed, copied into the slot, submitted.
    pub(super) fn send_control(&mut self, frame: &[u8]) -> Result<(), DestError> {
        let send = self.send.expect("control frames go out on the urgent half");
        self.seal(frame);
        let len = self.sealed.len();
        self.ring.slot_mut(send)[..len].copy_from_slice(&self.sealed);
        self.start_send(len)
    }

    /// This worker's `End` (announcing the embedder's verification when configured).
    fn end_header(&self) -> [u8; HEADER_BYTES] {
        let mut h = [0u8; HEADER_BYTES];
        let mut end = Header::control(Kind::End, self.st().id as u64);
        if self.config.verify {
            end.mask = codec::END_VERIFY;
        }
        end.encode(&mut h);
        h
    }

    /// Tells the source that this worker stops before it was confirmed (the embedder stopped
    /// the engine, or the VMM went away), so the source ends the session at once instead of
    /// waiting for a reconnection: its `End` when every page of the shard is here, else an
    /// `Error` frame. Best effort, one blocking write; not while a frame is half sent (nothing
    /// may follow it then).
    pub(super) fn say_goodbye(&mut self) {
        if self.sending() || (self.end_sent && self.missing() == 0) {
            return;
        }
        let mut frame = Vec::new();
        if self.missing() == 0 {
            // Every page of the shard is here (a VMM that leaves once restored, before the
            // stream's end): that is this worker's `End`, not a failure.
            frame.extend_from_slice(&self.end_header());
            self.end_sent = true;
        } else {
            let why = if self.mm_gone {
                "the destination stopped: its VMM went away before the migration completed"
            } else {
                "the destination stopped before the migration completed"
            };
            codec::encode_error(why, &mut frame);
        }
        self.seal(&frame);
        if let Some(stream) = self.stream.as_ref() {
            let _ = std::io::Write::write_all(&mut &*stream, &self.sealed);
        }
    }

    /// Requests every page of the shard not yet placed (after a break lost stream pages).
    pub(super) fn request_missing(&mut self) -> Result<(), DestError> {
        let st = self.state.clone();
        for (b, &(start, end)) in st.shard.iter().enumerate() {
            let mut p = start;
            while let Some(first) = self.ram.received[b].next_clear(p, end) {
                // Removed pages count as received: never asked for. Zero-map pages are placed
                // here (by the bulk half, or at their fault), never asked for either.
                if !self.in_zero_map(b, first) && st.requested[b].set(first) {
                    st.outstanding.fetch_add(1, Ordering::AcqRel);
                    self.pending.push((b as u32, first));
                }
                p = first + 1;
            }
        }
        self.stats.pages_swept += self.pending.len() as u64;
        self.flush_requests()
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn coalescing_merges_runs_and_respects_the_buffer() {
        let mut pending = vec![(0, 7), (0, 5), (0, 6), (1, 0), (0, 9), (1, 1)];
        let mut buf = [0u8; 4 * HEADER_BYTES];
        let (used, len, frames) = coalesce_requests(&mut pending, &mut buf);
        assert_eq!((used, len, frames), (6, 3 * HEADER_BYTES, 3));
        let decoded: Vec<_> = buf[..len]
            .chunks_exact(HEADER_BYTES)
            .map(|c| Header::decode(c.try_into().unwrap()).unwrap())
            .map(|h| (h.block, h.page, h.count))
            .collect();
        assert_eq!(decoded, vec![(0, 5, 3), (0, 9, 1), (1, 0, 2)]);
        let mut many: Vec<(u32, u64)> = (0..10).map(|p| (0, p * 2)).collect();
        let (used, len, frames) = coalesce_requests(&mut many, &mut buf);
        assert_eq!(
            (used, len, frames),
            (4, 4 * HEADER_BYTES, 4),
            "stops when the buffer is full"
        );
    }
}
