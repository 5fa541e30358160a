//! Recovery of a broken connection: reconnect with backoff within the recovery timeout,
//! rejoin the session, restore what was in flight.

// Parts of one type's implementation (`Worker`, defined in `mod.rs`): they share its imports.
use super::*;

impl Worker {
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
        if self.half == Half::Bulk {
            // A batch cut short is not placed: the resumed stream sends its pages again.
            self.st()
                .placing
                .store(super::NOT_PLACING, Ordering::Release);
        }
        if let Some(old) = self.stream.take() {
            // Its operations in flight complete now (as stale: new epoch) and free their slots.
            let _ = old.shutdown(std::net::Shutdown::Both);
        }
        self.epoch = (self.epoch + 1) & (u16::MAX >> 2);
        // A body cut short in shared memory: punched out, its claims given back.
        self.abandon_direct()?;
        self.recv = Recv::Header { got: 0 };
        self.send_progress = (0, 0);
        self.channel = None;
        let role = match self.half {
            Half::Urgent => Role::Urgent,
            Half::Bulk => Role::Bulk,
        };
        self.config.gauges.link_down(self.gauge_slot(), true);
        let reconnected = self.reconnect(role, &cause);
        self.config.gauges.link_down(self.gauge_slot(), false);
        let mut link = match reconnected {
            Ok(link) => link,
            Err(e) if self.half == Half::Urgent && self.end_sent && self.missing() == 0 => {
                // Every page of the shard is here and End went out; its Ack was lost with the
                // connection, and the source no longer serves the session (it counted every
                // End and ended it, or it gave up): nothing is left to receive here.
                self.finished = true;
                self.stats.ends_unconfirmed += 1;
                drop(e);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        match self.half {
            Half::Urgent => self.requeue_requests(),
            Half::Bulk => {
                // Which pages of the shard are here: the source streams the others again.
                let mut out = self.have_frames();
                link.write_frames(&mut out)
                    .map_err(link_err("send the received bitmap after a break"))?;
            }
        }
        let (stream, channel) = link
            .into_parts()
            .map_err(link_err("a resumed connection"))?;
        self.channel = channel;
        self.stream = Some(stream);
        self.credit_on_reconnect();
        self.stats.recoveries += 1;
        self.st().recoveries.fetch_add(1, Ordering::AcqRel);
        self.publish();
        self.last_progress = Instant::now();
        self.flush_requests()
    }

    /// Opens the half's connection again, rejoining the session, with backoff until the
    /// recovery timeout ([`open_with_retry`]); then the source is lost.
    fn reconnect(&mut self, role: Role, cause: &DestError) -> Result<FramedStream, DestError> {
        let id = self.st().id;
        let started = Instant::now();
        let deadline = started + self.config.recovery_timeout;
        let shared = self.shared.clone();
        let stopped = move || shared.stop.load(Ordering::Acquire);
        let attempt = open_with_retry(
            &self.config,
            (self.session, role, id as u16),
            Joining::Rejoin,
            deadline,
            &stopped,
        );
        let opened = match attempt {
            Ok(o) => o,
            Err(_) if stopped() => return Err(DestError::Stopped),
            // Refused (a wrong key, a session the source ended): trying longer cannot help.
            Err(e) if !retryable(&e) => return Err(e),
            Err(e) => {
                return Err(DestError::SourceLost {
                    seconds: started.elapsed().as_secs_f64().round() as u64,
                    missing: self.missing(),
                    last: format!(
                        "the {} connection of worker {id}: {cause}; then: {e}",
                        self.conn_name()
                    ),
                })
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
