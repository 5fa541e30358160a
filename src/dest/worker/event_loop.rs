//! A worker half's loop: reap completions in bulk, act on them, re-arm every idle read; the
//! stall check and the stream slots.

// Parts of one type's implementation (`Worker`, defined in `mod.rs`): they share its imports.
use super::*;

impl Worker {
    pub(super) fn run(&mut self) -> Result<(), DestError> {
        // The zero map is background work, like the stream: the bulk half places it (at its
        // low priority), so the urgent half serves faults from the first moment and the
        // switchover thread is not starved; a fault on a zero-map page is resolved locally
        // (`on_fault`). Without a stream the urgent half places it before serving.
        let places_zero_map = match self.half {
            Half::Bulk => true,
            Half::Urgent => !self.config.stream,
        };
        if places_zero_map {
            self.place_zero_map()?;
        }
        // A VMM's memory is served until the VMM goes away (the embedder stops the engine then):
        // after the last page, faults on pages it removes still need zero pages.
        let serve_after_end = self.half == Half::Urgent && self.ram.is_foreign();
        loop {
            if self.should_return(serve_after_end)? {
                self.release_stream_slot();
                self.ring.cancel_all();
                return Ok(());
            }
            if self.half == Half::Bulk && !self.take_stream_slot() {
                // Not this stream's turn: the CPU is left to the streams running and to faults.
                self.last_progress = Instant::now();
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            self.arm()?;
            self.stats.loops += 1;
            let done = self.ring.submit_and_reap(1, Some(WAIT))?;
            self.completions.clear();
            self.completions.extend_from_slice(done);
            if self.completions.is_empty() {
                match self.check_stall() {
                    // A connection that went silent is replaced like a broken one.
                    Err(e) if self.recoverable(&e) => self.recover(e)?,
                    r => r?,
                }
                continue;
            }
            self.handle_completions()?;
        }
    }

    /// The checks before each wait: stopped (or the VMM gone), `End` due, a tail sweep due,
    /// finished. `true`: the loop ends.
    fn should_return(&mut self, serve_after_end: bool) -> Result<bool, DestError> {
        if self.shared.stop.load(Ordering::Acquire) || self.mm_gone {
            // Stopped, or the VMM exited. With every page of the shard placed (a VMM that
            // exits once restored, before the stream's tail) this is a complete migration,
            // counters and all. Pages missing as this half sees them may be its sibling's
            // last placement, placed but not yet marked: `EngineHandle::wait` decides.
            self.stats.ended_early = !(serve_after_end && self.finished) && self.missing() > 0;
            return Ok(true);
        }
        let bulk_done = self.st().bulk_done.load(Ordering::Acquire);
        if self.half == Half::Urgent && !self.end_sent && self.missing() == 0 && bulk_done {
            self.send_end()?;
        }
        if self.half == Half::Urgent
            && self.missing() > 0
            && bulk_done
            && self.st().outstanding.load(Ordering::Acquire) == 0
            && self.pending.is_empty()
            && self.stats.recoveries + self.sibling_recoveries() > 0
        {
            // The stream ended, yet pages are missing: some were lost in flight when a
            // connection broke. Ask for them (a tail sweep); nothing waits on luck.
            self.request_missing()?;
        }
        Ok(self.finished && !serve_after_end)
    }

    /// Acts on one reaped batch: finished sends first (they free the request buffer), then
    /// fault events, then received bytes. A broken connection is recovered after the whole
    /// batch, so no fault event of it is lost.
    fn handle_completions(&mut self) -> Result<(), DestError> {
        self.stats.completions += self.completions.len() as u64;
        self.completions
            .sort_unstable_by_key(|c| match c.token.tag & TAG_KIND_BITS {
                TAG_SEND => 0,
                TAG_UFFD => 1,
                _ => 2,
            });
        let mut broken = None;
        for i in 0..self.completions.len() {
            let c = self.completions[i];
            let kind = c.token.tag & TAG_KIND_BITS;
            if kind != TAG_UFFD && (c.token.tag >> 2 != self.epoch || broken.is_some()) {
                continue; // the old connection's last words: its slot is free again
            }
            let r = match kind {
                TAG_UFFD => self.on_events(c.result),
                TAG_SEND => self.on_sent(c.result),
                _ => self.on_recv(c.result),
            };
            match r {
                Err(e) if self.recoverable(&e) => broken = Some(e),
                r => r?,
            }
        }
        match broken {
            Some(e) => self.recover(e),
            None => Ok(()),
        }
    }

    pub(super) fn check_stall(&self) -> Result<(), DestError> {
        let waiting = match self.half {
            Half::Urgent => self.st().outstanding.load(Ordering::Acquire) > 0,
            Half::Bulk => true,
        };
        let idle = self.last_progress.elapsed();
        if waiting && self.missing() > 0 && idle > self.config.stall_timeout {
            return Err(DestError::Stalled {
                seconds: idle.as_secs(),
                missing: self.missing(),
            });
        }
        Ok(())
    }

    /// Re-arms every idle read.
    pub(super) fn arm(&mut self) -> Result<(), DestError> {
        if let Some(events) = self.events {
            // A VMM's userfaultfd also carries events (REMOVE) that must be read while the
            // page map is known to be consistent: wait for readiness, then read ourselves.
            let foreign = self.ram.is_foreign();
            if (self.missing() > 0 || foreign) && !self.ring.is_busy(events) {
                let fd = self.st().uffd.as_raw_fd();
                if foreign {
                    self.ring.poll_in(fd, events, TAG_UFFD)?;
                } else {
                    self.ring.fixed(
                        OpKind::Read,
                        fd,
                        events,
                        0,
                        EVENT_BATCH * MSG_BYTES,
                        TAG_UFFD,
                    )?;
                }
            }
        }
        let fd = self.stream_fd();
        match self.recv {
            Recv::Header { got } if !self.ring.is_busy(self.header) => self.ring.fixed(
                OpKind::Read,
                fd,
                self.header,
                got,
                HEADER_BYTES - got,
                self.tag(TAG_CONN),
            )?,
            Recv::Body { h, got } if !self.ring.is_busy(self.body) => {
                // On an authenticated connection the MAC is read with the body, in one go.
                let want = h.body_len as usize + self.tag_len();
                self.ring.fixed(
                    OpKind::Read,
                    fd,
                    self.body,
                    got,
                    want - got,
                    self.tag(TAG_CONN),
                )?
            }
            Recv::Tag { got, .. } if !self.ring.is_busy(self.tag) => self.ring.fixed(
                OpKind::Read,
                fd,
                self.tag,
                got,
                TAG_BYTES - got,
                self.tag(TAG_CONN),
            )?,
            _ => {}
        }
        Ok(())
    }

    pub(super) fn take_stream_slot(&mut self) -> bool {
        if !self.has_stream_slot {
            self.has_stream_slot = self
                .shared
                .stream_slots
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok();
        }
        self.has_stream_slot
    }

    pub(super) fn release_stream_slot(&mut self) {
        if std::mem::take(&mut self.has_stream_slot) {
            self.shared.stream_slots.fetch_add(1, Ordering::AcqRel);
        }
    }
}
