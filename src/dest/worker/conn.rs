//! A worker's connection as a receive state machine: header (checked against the layout and
//! the shard before any byte of the body is read), body and tag (checked, and the body
//! decrypted, before anything is acted on), then the frame.

// Parts of one type's implementation (`Worker`, defined in `mod.rs`): they share its imports.
use super::*;

impl Worker {
    pub(super) fn conn_name(&self) -> &'static str {
        match self.half {
            Half::Urgent => "urgent",
            Half::Bulk => "bulk",
        }
    }

    pub(super) fn on_recv(&mut self, result: i32) -> Result<(), DestError> {
        let name = self.conn_name();
        if result < 0 {
            return Err(DestError::Io {
                context: format!("receive on the {name} connection"),
                source: std::io::Error::from_raw_os_error(-result),
            });
        }
        if result == 0 {
            return Err(DestError::Closed(name, self.missing()));
        }
        let n = result as usize;
        self.stats.bytes_received += n as u64;
        self.last_progress = Instant::now();
        match self.recv {
            Recv::Header { got } if got + n < HEADER_BYTES => {
                self.recv = Recv::Header { got: got + n };
            }
            Recv::Header { .. } => self.header_received()?,
            Recv::Body { h, got } if got + n < self.body_recv_len(&h) => {
                self.recv = Recv::Body { h, got: got + n };
            }
            // A body received straight into shared memory; its tag follows on its own.
            Recv::Body { h, .. } if self.direct.is_some() => self.frame_received(h)?,
            Recv::Body { h, .. } => {
                let body_len = h.body_len as usize;
                if let Some(c) = self.channel.as_mut() {
                    // The body is decrypted in place, in the slot it was received into.
                    let head: [u8; HEADER_BYTES] = self.ring.slot(self.header)[..HEADER_BYTES]
                        .try_into()
                        .expect("header slot is HEADER_BYTES long");
                    let slot = &mut self.ring.slot_mut(self.body)[..body_len + TAG_BYTES];
                    let (body, tag) = slot.split_at_mut(body_len);
                    c.rx.open(&head, body, tag).map_err(AuthError::from)?;
                }
                self.frame_verified(h)?;
            }
            Recv::Tag { h, got } if got + n < TAG_BYTES => {
                self.recv = Recv::Tag { h, got: got + n };
            }
            Recv::Tag { h, .. } if self.direct.is_some() => {
                let d = self.direct.expect("checked");
                self.open_direct(&d, &h)?;
                self.frame_verified(h)?;
            }
            Recv::Tag { h, .. } => {
                debug_assert_eq!(h.body_len, 0, "bodies carry their tag");
                let head = &self.ring.slot(self.header)[..HEADER_BYTES];
                let tag = &self.ring.slot(self.tag)[..TAG_BYTES];
                self.channel
                    .as_mut()
                    .expect("tags only on an authenticated connection")
                    .rx
                    .open(head, &mut [], tag)
                    .map_err(AuthError::from)?;
                self.frame_verified(h)?;
            }
            Recv::Idle => {
                return Err(self.protocol(CodecError::BadBody {
                    kind: Kind::End,
                    detail: "bytes after the final frame".into(),
                }))
            }
        }
        Ok(())
    }

    fn protocol(&self, source: CodecError) -> DestError {
        DestError::Protocol {
            context: format!("{} connection", self.conn_name()),
            source,
        }
    }

    /// A whole header: decoded, and what the header alone can tell checked before any byte
    /// of the body is read.
    fn header_received(&mut self) -> Result<(), DestError> {
        let raw: [u8; HEADER_BYTES] = self.ring.slot(self.header)[..HEADER_BYTES]
            .try_into()
            .expect("header slot is HEADER_BYTES long");
        let h = Header::decode(&raw).map_err(|e| self.protocol(e))?;
        match (h.kind, self.half) {
            (Kind::Pages, half) => {
                self.check_pages(&h).map_err(|e| self.protocol(e))?;
                if half == Half::Bulk {
                    // From its checked header on, the batch is the bulk half's to place: the
                    // urgent half defers to it (cleared once placed, or if the link breaks).
                    let batch = super::pack_batch(h.block, h.page, u64::from(h.count));
                    self.st().placing.store(batch, Ordering::Release);
                    self.direct = self.claim_direct(&h);
                }
            }
            (Kind::Error | Kind::Heartbeat, _) => {}
            (Kind::End | Kind::Run, Half::Bulk) => {}
            (Kind::Ack, Half::Urgent) if self.end_sent => {}
            (got, half) => {
                return Err(self.protocol(CodecError::Unexpected {
                    got,
                    expected: match half {
                        Half::Bulk => "Pages, Run (a working-set push) or End",
                        Half::Urgent => "Pages or Ack",
                    },
                }))
            }
        }
        if h.body_len > 0 {
            self.recv = Recv::Body { h, got: 0 };
            Ok(())
        } else {
            self.frame_received(h)
        }
    }

    /// Bytes read with a body: its tag too, except for a body received straight into shared
    /// memory (its tag goes to the tag slot).
    pub(super) fn body_recv_len(&self, h: &Header) -> usize {
        match self.direct {
            Some(_) => h.body_len as usize,
            None => h.body_len as usize + self.tag_len(),
        }
    }

    /// Bytes of tag after each frame on this connection.
    pub(super) fn tag_len(&self) -> usize {
        if self.channel.is_some() {
            TAG_BYTES
        } else {
            0
        }
    }

    /// A body-less frame's header is in: read its tag first on an authenticated connection.
    pub(super) fn frame_received(&mut self, h: Header) -> Result<(), DestError> {
        if self.channel.is_some() {
            self.recv = Recv::Tag { h, got: 0 };
            return Ok(());
        }
        self.frame_verified(h)
    }

    /// Acts on a whole, checked frame.
    pub(super) fn frame_verified(&mut self, h: Header) -> Result<(), DestError> {
        self.recv = Recv::Header { got: 0 };
        match h.kind {
            Kind::Pages => {
                self.place_batch(&h)?;
                if self.half == Half::Bulk {
                    self.credit_on_placed();
                    self.grant_credit()?;
                }
            }
            Kind::Error => {
                let msg = codec::decode_error(&self.ring.slot(self.body)[..h.body_len as usize]);
                return Err(DestError::Remote(msg));
            }
            Kind::End => {
                self.finished = true;
                self.st().bulk_done.store(true, Ordering::Release);
                self.recv = Recv::Idle;
            }
            Kind::Ack => {
                self.finished = true;
                self.recv = Recv::Idle;
            }
            // The stream's push of the image's working set begins (1) or ends (0).
            Kind::Run => self.in_push = h.page != 0,
            // The source is there (`on_recv` noted the progress).
            Kind::Heartbeat => {}
            other => unreachable!("{other:?} was refused at its header"),
        }
        Ok(())
    }

    /// A batch must lie inside the layout (codec check) and inside this worker's shard: a page
    /// of another shard is registered with another userfaultfd.
    pub(super) fn check_pages(&self, h: &Header) -> Result<(), CodecError> {
        h.check(&self.ram.layout)?;
        let (start, end) = self.st().shard[h.block as usize];
        if h.page < start || h.page + u64::from(h.count) > end {
            return Err(CodecError::Range(crate::layout::LayoutError::OutOfRange {
                block: h.block,
                page: h.page,
                count: u64::from(h.count),
                detail: format!("worker {} serves pages [{start}, {end})", self.st().id),
            }));
        }
        Ok(())
    }
}
