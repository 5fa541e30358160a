//! A source session: the pages sent so far, the workers' ends, its counters and its report.

use super::conn::write_err;
use super::error::SourceError;
use super::lifecycle::{Lifecycle, Phase};
use super::progress::PrecopySlot;
use super::working_set::{Snapshot, WorkingSet};
use crate::codec::{Hello, Role};
use crate::layout::Layout;
use crate::layout::PageBitmap;
use crate::link::FramedStream;
use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What one session did, from the source's side.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SessionReport {
    /// Session id.
    pub session: u64,
    /// Whether the destination confirmed it had every page.
    pub complete: bool,
    /// Whether the session switched over (a live source's workload stopped for it).
    pub switched_over: bool,
    /// Pages sent in answer to requests.
    pub pages_urgent: u64,
    /// Pages sent by the background stream.
    pub pages_stream: u64,
    /// Of those, zero pages (sent as flags).
    pub pages_zero: u64,
    /// Of the urgent pages, those sent ahead of a sequential reader (prefetch).
    pub pages_prefetched: u64,
    /// Of the streamed pages, those pushed first as the image's working set.
    pub pages_working_set: u64,
    /// Requests received.
    pub requests: u64,
    /// Bytes written.
    pub bytes_sent: u64,
    /// Wall time of the session.
    pub seconds: f64,
    /// Pages sent per precopy round (empty without precopy).
    pub precopy_round_pages: Vec<u64>,
    /// Pages dirty at switchover (discarded on the destination if precopy had sent them).
    pub pages_dirty_at_switchover: u64,
    /// Pages in `Discard` frames.
    pub pages_discarded: u64,
    /// Connections that rejoined after a break.
    pub recoveries: u64,
    /// Pages streamed again after a break (the destination did not have them).
    pub pages_resent: u64,
    /// Error that ended it, if any.
    pub error: Option<String>,
}

pub(super) struct Session {
    pub(super) id: u64,
    pub(super) workers: u16,
    pub(super) sent: Vec<PageBitmap>,
    /// Pages sent on an urgent connection (in a reply): a reply that follows the working set
    /// skips these, not pages only the push sent (they may still be in flight).
    pub(super) replied: Vec<PageBitmap>,
    pub(super) started: Instant,
    /// Its phase and connections: every transition is a method of [`Lifecycle`].
    pub(super) life: Lifecycle,
    /// Connections that rejoined after a break.
    pub(super) recoveries: AtomicU64,
    /// Pages streamed again because a resumed destination did not have them.
    pub(super) pages_resent: AtomicU64,
    /// Per worker, the generation of its stream: a resumed stream supersedes the one of the
    /// broken connection, which stops claiming pages at once.
    pub(super) bulk_gen: Vec<AtomicU64>,
    pub(super) pages_urgent: AtomicU64,
    pub(super) pages_stream: AtomicU64,
    pub(super) pages_zero: AtomicU64,
    pub(super) pages_prefetched: AtomicU64,
    pub(super) pages_working_set: AtomicU64,
    /// How it uses the image's working set, decided when first asked ([`Session::working_set`]).
    ws_mode: std::sync::OnceLock<WsMode>,
    /// While replaying: how far into the set's order the faults' replies reached (the push
    /// jumps there).
    pub(super) ws_front: AtomicU64,
    /// Nanoseconds after `started` of the last request (kept with a working set).
    pub(super) last_request_ns: AtomicU64,
    pub(super) requests: AtomicU64,
    pub(super) bytes_sent: AtomicU64,
    pub(super) precopy: Mutex<PrecopyStats>,
    /// Precopy's progress between connections (a rejoining precopy connection resumes it).
    pub(super) precopy_slot: PrecopySlot,
    /// The open connection of each (role, worker), by its peer address: one that rejoins
    /// shuts the one it replaces down, so that connection's thread, maybe blocked writing into
    /// a dead link, lets go at once.
    links: Mutex<HashMap<(u8, u16), (SocketAddr, TcpStream)>>,
}

/// How a session uses the image's working set.
pub(super) enum WsMode {
    /// There is none.
    Off,
    /// It records it: the stream holds back while faults come, so each is asked for.
    Record,
    /// It replays this snapshot: the stream pushes it first, replies to faults on it carry
    /// the pages that follow in its order.
    Replay(Arc<Snapshot>),
}

#[derive(Default)]
pub(super) struct PrecopyStats {
    pub(super) round_pages: Vec<u64>,
    pub(super) dirty_at_switchover: u64,
    pub(super) discarded: u64,
}

impl Session {
    pub(super) fn new(
        layout: &Layout,
        live: bool,
        id: u64,
        workers: u16,
        resumed: bool,
    ) -> Session {
        Session {
            id,
            workers,
            sent: layout
                .blocks
                .iter()
                .map(|b| PageBitmap::new(b.pages()))
                .collect(),
            replied: layout
                .blocks
                .iter()
                .map(|b| PageBitmap::new(b.pages()))
                .collect(),
            started: Instant::now(),
            life: Lifecycle::new(workers, !live || resumed, resumed),
            recoveries: AtomicU64::new(0),
            pages_resent: AtomicU64::new(0),
            bulk_gen: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            pages_urgent: AtomicU64::new(0),
            pages_stream: AtomicU64::new(0),
            pages_zero: AtomicU64::new(0),
            pages_prefetched: AtomicU64::new(0),
            pages_working_set: AtomicU64::new(0),
            ws_mode: std::sync::OnceLock::new(),
            ws_front: AtomicU64::new(0),
            last_request_ns: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            precopy: Mutex::new(PrecopyStats::default()),
            precopy_slot: PrecopySlot::new(),
            links: Mutex::new(HashMap::new()),
        }
    }

    /// How this session uses the image's working set `ws`, decided the first time it is asked
    /// (its first request, or its stream's start: for a session prepared ahead, when a VMM
    /// uses it): record it while it is empty, else replay the set as it is then.
    pub(super) fn working_set(&self, ws: Option<&WorkingSet>) -> &WsMode {
        self.ws_mode.get_or_init(|| match ws {
            None => WsMode::Off,
            Some(ws) if ws.records_now() => WsMode::Record,
            Some(ws) => WsMode::Replay(ws.snapshot()),
        })
    }

    fn link_key(hello: &Hello) -> (u8, u16) {
        let role = match hello.role {
            Role::Urgent => 0,
            Role::Bulk => 1,
            Role::Verify => 2,
        };
        (role, hello.worker)
    }

    /// This connection is now `hello`'s (role, worker): the one it replaces, if still open, is
    /// shut down.
    pub(super) fn supersede(&self, hello: &Hello, peer: SocketAddr, socket: &TcpStream) {
        let Ok(clone) = socket.try_clone() else {
            return;
        };
        let old = self
            .links
            .lock()
            .expect("poisoned")
            .insert(Session::link_key(hello), (peer, clone));
        if let Some((_, old)) = old {
            let _ = old.shutdown(std::net::Shutdown::Both);
        }
    }

    /// This connection ended: forget it (unless a rejoining one replaced it already).
    pub(super) fn forget(&self, hello: &Hello, peer: SocketAddr) {
        let mut links = self.links.lock().expect("poisoned");
        let key = Session::link_key(hello);
        if links.get(&key).is_some_and(|(p, _)| *p == peer) {
            links.remove(&key);
        }
    }

    pub(super) fn report(&self) -> SessionReport {
        let error = self.life.failure();
        let precopy = self.precopy.lock().expect("poisoned");
        SessionReport {
            session: self.id,
            complete: self.life.phase() == Phase::Complete,
            switched_over: self.life.is_switched_over(),
            pages_urgent: self.pages_urgent.load(Ordering::Relaxed),
            pages_stream: self.pages_stream.load(Ordering::Relaxed),
            pages_zero: self.pages_zero.load(Ordering::Relaxed),
            pages_prefetched: self.pages_prefetched.load(Ordering::Relaxed),
            pages_working_set: self.pages_working_set.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            bytes_sent: self.bytes_sent.load(Ordering::Relaxed),
            seconds: self.started.elapsed().as_secs_f64(),
            error,
            precopy_round_pages: precopy.round_pages.clone(),
            pages_dirty_at_switchover: precopy.dirty_at_switchover,
            pages_discarded: precopy.discarded,
            recoveries: self.recoveries.load(Ordering::Relaxed),
            pages_resent: self.pages_resent.load(Ordering::Relaxed),
        }
    }

    /// Writes the frames in `out` to the destination (each sealed on an authenticated
    /// link), counts them, and empties `out`.
    pub(super) fn flush(
        &self,
        link: &mut FramedStream,
        out: &mut Vec<u8>,
        what: &str,
        peer: SocketAddr,
    ) -> Result<(), SourceError> {
        let n = link.write_frames(out).map_err(write_err(what, peer))?;
        self.bytes_sent.fetch_add(n as u64, Ordering::Relaxed);
        out.clear();
        Ok(())
    }
}
