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
            self.publish();
        }
        // A VMM's memory is served until the VMM goes away (the embedder stops the engine then):
        // after the last page, faults on pages it removes still need zero pages.
        let serve_after_end = self.half == Half::Urgent && self.ram.is_foreign();
        loop {
            if self.should_return(serve_after_end)? {
                if self.half == Half::Urgent && !self.finished {
                    self.say_goodbye();
                }
                self.release_stream_slot();
                self.ring.cancel_all();
                self.publish();
                return Ok(());
            }
            if self.half == Half::Bulk && !self.take_stream_slot() {
                // Not this stream's turn: the CPU is left to the streams running and to faults.
                self.last_progress = Instant::now();
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            self.grant_credit()?;
            self.arm()?;
            self.stats.loops += 1;
            let done = self.ring.submit_and_reap(1, Some(self.wait_limit()))?;
            self.completions.clear();
            self.completions.extend_from_slice(done);
            if !self.completions.is_empty() {
                self.handle_completions()?;
                self.publish();
            }
            // Checked after every batch: a flood of fault events must not hide a dead link.
            match self.check_stall() {
                // A connection that went silent is replaced like a broken one.
                Err(e) if self.recoverable(&e) => self.recover(e)?,
                r => r?,
            }
            self.heartbeat_if_due()?;
        }
    }

    /// This thread's slot of the migration's gauges.
    pub(super) fn gauge_slot(&self) -> usize {
        2 * self.st().id
            + match self.half {
                Half::Urgent => 0,
                Half::Bulk => 1,
            }
    }

    /// Publishes this thread's counters to the migration's gauges (after each reaped batch).
    pub(super) fn publish(&self) {
        self.config.gauges.publish(self.gauge_slot(), &self.stats);
    }

    /// How long the next wait may last: [`WAIT`], or less when a paced stream's next grant is
    /// due sooner.
    fn wait_limit(&self) -> Duration {
        let paced = self.credit.as_ref().and_then(|c| c.paced_until());
        paced.map_or(WAIT, |t| {
            t.saturating_duration_since(Instant::now())
                .clamp(Duration::from_micros(10), WAIT)
        })
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
            && self.config.stream
            && self.missing() > 0
            && bulk_done
            && self.st().outstanding.load(Ordering::Acquire) == 0
            && self.pending.is_empty()
        {
            // The stream ended (without one, every page comes by a request, and a request
            // lost with a connection is asked again) and nothing is asked for, yet pages are
            // missing: lost in flight
            // when a connection broke, or made unsent after the stream passed them (a
            // precopy that resumed after its switchover). Ask for them (a tail sweep; a page
            // still in flight as a prefetch arrives twice, harmlessly): nothing waits on luck.
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

    /// A connection on which nothing arrived for the link timeout is dead: the source sends
    /// heartbeats while it has nothing else to say (see [`crate::link::liveness`]).
    pub(super) fn check_stall(&self) -> Result<(), DestError> {
        let idle = self.last_progress.elapsed();
        if !self.finished && idle > self.config.link_timeout {
            return Err(DestError::Stalled {
                connection: format!(
                    "worker {}'s {} connection (postcopy)",
                    self.st().id,
                    self.conn_name()
                ),
                seconds: idle.as_secs(),
                missing: self.missing(),
            });
        }
        Ok(())
    }

    /// The urgent half tells the source it is there when it has sent nothing for a while (not
    /// after `End`: the source closes once it answered it).
    fn heartbeat_if_due(&mut self) -> Result<(), DestError> {
        let Some(send) = self.send else {
            return Ok(());
        };
        if self.end_sent
            || self.finished
            || self.sending()
            || self.ring.is_busy(send)
            || self.last_sent.elapsed() < self.config.liveness().heartbeat
        {
            return Ok(());
        }
        let mut h = [0u8; HEADER_BYTES];
        Header::heartbeat().encode(&mut h);
        self.stats.heartbeats += 1;
        self.send_control(&h)
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
            Recv::Body { h, got } if self.direct.is_some() => {
                let (slot, at) = Self::direct_target(self.direct.as_ref().expect("checked"));
                if !self.ring.is_busy(slot) {
                    let want = h.body_len as usize;
                    self.ring.fixed(
                        OpKind::Read,
                        fd,
                        slot,
                        at + got,
                        want - got,
                        self.tag(TAG_CONN),
                    )?
                }
            }
            Recv::Body { h, got } if !self.ring.is_busy(self.body) => {
                // On an authenticated connection the tag is read with the body, in one go.
                let want = self.body_recv_len(&h);
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
