//! A bulk half's side of a receiver-driven stream ([`crate::dest::pacer`]): after each batch it
//! placed, it adjusts its window and grants the source, in a `Credit` frame, the running total
//! of `Pages` frames it may have sent on this connection (those received plus the window). The
//! same total, sent again once a heartbeat interval passed without one, keeps the link alive
//! while the window holds the source back.

// Parts of one type's implementation (`Worker`, defined in `mod.rs`): they share its imports.
use super::*;

/// A bulk connection's grants: what was received and granted on the current connection.
pub(super) struct Credit {
    pub(super) window: Window,
    /// `Pages` frames received on this connection.
    pub(super) received: u64,
    /// The running total last granted on this connection (0: none yet).
    pub(super) granted: u64,
    pub(super) last_sent: Instant,
}

impl Credit {
    /// When a paced window may grant next (`None`: no pace, or nothing left to grant).
    pub(super) fn paced_until(&self) -> Option<Instant> {
        let gap = self.window.gap();
        let waiting = self.received + self.window.batches() > self.granted;
        (!gap.is_zero() && waiting).then(|| self.last_sent + gap)
    }

    pub(super) fn new(pacer: &FaultPacer) -> Credit {
        Credit {
            window: Window::new(pacer),
            received: 0,
            granted: 0,
            last_sent: Instant::now(),
        }
    }
}

impl Worker {
    /// A `Pages` frame of the stream was placed: the window follows the faults served meanwhile.
    pub(super) fn credit_on_placed(&mut self) {
        if let (Some(c), Some(pacer)) = (self.credit.as_mut(), self.shared.pacer.as_ref()) {
            c.received += 1;
            c.window.on_placed(pacer);
        }
    }

    /// A new connection (after a break) starts its totals again, with the window it had.
    pub(super) fn credit_on_reconnect(&mut self) {
        if let Some(c) = self.credit.as_mut() {
            (c.received, c.granted) = (0, 0);
        }
    }

    /// Grants what the window allows beyond what was received, if that is more than was granted
    /// and its pace allows, or a heartbeat is due (one blocking write of 48 bytes: the source
    /// reads its grants before every batch, so they never fill the socket).
    pub(super) fn grant_credit(&mut self) -> Result<(), DestError> {
        let heartbeat = self.config.liveness().heartbeat;
        let Some(c) = self.credit.as_ref() else {
            return Ok(());
        };
        let wanted = c.received + c.window.batches();
        let pace_allows = c.paced_until().map_or(true, |t| Instant::now() >= t);
        let grows = wanted > c.granted && pace_allows;
        let total = if grows { wanted } else { c.granted };
        if self.finished || (!grows && c.last_sent.elapsed() < heartbeat) {
            return Ok(());
        }
        let mut frame = [0u8; HEADER_BYTES];
        Header::control(Kind::Credit, total).encode(&mut frame);
        self.seal(&frame);
        let stream = self
            .stream
            .as_ref()
            .expect("a bulk half grants on its connection");
        match std::io::Write::write(&mut &*stream, &self.sealed) {
            Ok(n) if n == self.sealed.len() => {}
            r => {
                // A broken connection, or a frame not (wholly) written: the seal's sequence
                // number has moved on, so the source could not open the next frame; either way
                // the connection is replaced.
                let source = r
                    .err()
                    .unwrap_or_else(|| std::io::ErrorKind::WriteZero.into());
                return Err(DestError::Io {
                    context: "grant stream credit on the bulk connection".into(),
                    source,
                });
            }
        }
        self.stats.credits_granted += 1;
        let c = self.credit.as_mut().expect("checked above");
        (c.granted, c.last_sent) = (total, Instant::now());
        Ok(())
    }
}
