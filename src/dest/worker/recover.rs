//! Recovery of a broken connection: reconnect with backoff within the recovery timeout,
//! rejoin the session, restore what was in flight.

// Parts of one type's implementation (`Worker`, defined in `mod.rs`): they share its imports.
use super::*;

impl Worker {
    /// Recoveries of the other half of this worker (shared through the shard).
    pub(super) fn sibling_recoveries(&self) -> u64 {
        self.st().recoveries.load(Ordering::Acquire)
    }

    /// Whether `e` is a broken connection that recovery may repair (not a protocol or
    /// authentication error: those end the session).
    pub(super) fn recoverable(&self, e: &DestError) -> bool {
        !self.config.recovery_timeout.is_zero()
            && !self.shared.stop.load(Ordering::Acquire)
            && matches!(
                e,
                DestError::Io { .. } | DestError::Closed(..) | DestError::Stalled { .. }
            )
    }

    /// Replaces a broken connection: reconnects with backoff (bounded by the recovery
    /// timeout), rejoins the session, and restores what was in flight: the urgent half asks
    /// again for every page still requested (and End if it was not acknowledged); the bulk
    /// half tells the source which pages of its shard it has, and the stream resumes with the
    /// others. Faulting threads stay blocked meanwhile; nothing placed is lost.
    pub(super) fn recover(&mut self, cause: DestError) -> Result<(), DestError> {
        if let Some(old) = self.stream.take() {
            // Its operations in flight complete now (as stale: new epoch) and free their slots.
            let _ = old.shutdown(std::net::Shutdown::Both);
        }
        self.epoch = (self.epoch + 1) & (u16::MAX >> 2);
        self.recv = Recv::Header { got: 0 };
        self.send_progress = (0, 0);
        self.channel = None;
        let role = match self.half {
            Half::Urgent => Role::Urgent,
            Half::Bulk => Role::Bulk,
        };
        let mut link = self.reconnect(role, &cause)?;
        match self.half {
            Half::Urgent => self.requeue_requests(),
            Half::Bulk => {
                // Which pages of the shard are here: the source streams the others again.
                let out = self.have_frames();
                link.write_frames(&out)
                    .map_err(link_err("send the received bitmap after a break"))?;
            }
        }
        let (stream, channel) = link
            .into_parts()
            .map_err(link_err("a resumed connection"))?;
        self.channel = channel;
        self.stream = Some(stream);
        self.stats.recoveries += 1;
        self.st().recoveries.fetch_add(1, Ordering::AcqRel);
        self.last_progress = Instant::now();
        self.flush_requests()
    }

    /// Opens the half's connection again, rejoining the session, with backoff (5 ms doubling
    /// to 0.5 s) until the recovery timeout; then the source is lost.
    fn reconnect(&mut self, role: Role, cause: &DestError) -> Result<FramedStream, DestError> {
        let id = self.st().id;
        let started = Instant::now();
        let deadline = started + self.config.recovery_timeout;
        let mut backoff = Duration::from_millis(5);
        let opened = loop {
            if self.shared.stop.load(Ordering::Acquire) {
                return Err(DestError::Stopped);
            }
            match crate::dest::open_connection_as(&self.config, self.session, role, id as u16, true)
            {
                Ok(o) => break o,
                Err(_) if Instant::now() + backoff < deadline => {
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                Err(e) => {
                    return Err(DestError::SourceLost {
                        seconds: started.elapsed().as_secs_f64().round() as u64,
                        missing: self.missing(),
                        last: format!("{cause}; then: {e}"),
                    })
                }
            }
        };
        if opened.welcome.session != self.session || opened.welcome.layout != self.ram.layout {
            return Err(DestError::Protocol {
                context: format!("{role:?} connection of worker {id} (resumed)"),
                source: CodecError::BadBody {
                    kind: Kind::Welcome,
                    detail: "a different session or layout than before the break".into(),
                },
            });
        }
        Ok(opened.link)
    }

    /// The urgent half asks again for everything still awaited, and sends `End` again if its
    /// `Ack` was lost.
    fn requeue_requests(&mut self) {
        self.pending.clear();
        let st = self.state.clone();
        for (b, &(start, end)) in st.shard.iter().enumerate() {
            for p in start..end {
                if st.requested[b].get(p) {
                    self.pending.push((b as u32, p));
                }
            }
        }
        if self.end_sent && !self.finished {
            self.end_sent = false;
        }
    }

    /// `Have` frames for the bulk half's shard (which pages are here), then `Run`.
    fn have_frames(&self) -> Vec<u8> {
        let st = self.st();
        let mut out = Vec::new();
        let per_frame = u64::from(codec::MAX_ZERO_MAP_BYTES) * 8;
        for (b, &(start, end)) in st.shard.iter().enumerate() {
            let mut first = start;
            while first < end {
                let n = (end - first).min(per_frame);
                Header::have(b as u32, first, n).encode_into(&mut out);
                let received = &self.ram.received[b];
                codec::encode_page_bits(n, |i| received.get(first + i), &mut out);
                first += n;
            }
        }
        Header::control(Kind::Run, 0).encode_into(&mut out);
        out
    }
}
