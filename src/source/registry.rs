//! The sessions a source serves: shared by its connection threads, ended (and reported) when
//! their last connection closes, reaped when their destination stays away.

use super::config::{LiveParts, SourceConfig};
use super::session::{Session, SessionReport};
use crate::image::Image;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Condvar, Mutex};

use super::wake::Wake;

pub(super) struct Shared {
    pub(super) image: Arc<dyn Image>,
    /// A live source's tracker and workload, taken by its one session.
    pub(super) live: Mutex<Option<LiveParts>>,
    pub(super) is_live: bool,
    pub(super) config: SourceConfig,
    pub(super) sessions: Mutex<HashMap<u64, Arc<Session>>>,
    pub(super) finished: Mutex<Vec<SessionReport>>,
    pub(super) next_id: AtomicU64,
    /// Wakes the accept loop (a session ended, or the server was stopped).
    pub(super) wake: Arc<Wake>,
    /// Notified under `sessions` whenever a connection closes.
    pub(super) closed: Condvar,
    /// The image's learned working set (a static image with `SourceConfig::working_set`).
    pub(super) working_set: Option<super::WorkingSet>,
    /// Asked to stop once the sessions in flight end ([`super::StopHandle::drain`]): no new
    /// session is taken.
    pub(super) draining: Arc<AtomicBool>,
}

pub(super) fn log(shared: &Shared, msg: std::fmt::Arguments<'_>) {
    if shared.config.verbose {
        crate::info!("serve", "{msg}");
    }
}

/// Counts a connection of `session` closed; ends the session when it was the last one.
pub(super) fn finish_connection(shared: &Shared, session: &Arc<Session>) {
    // The session ends when its last connection closes after it completed or failed. A
    // session whose connections all closed early (a fast worker finished before a slow one
    // connected) waits for the others; `reap_idle` ends it if they never come.
    // Invariant: a session is always either in `sessions` or reported in `finished`; the
    // report is recorded before the session leaves the map, under the same lock, so a stop
    // that finds the map empty finds every report (the lock order is sessions → finished).
    let mut sessions = shared.sessions.lock().expect("poisoned");
    if session.life.connection_closed() && sessions.remove(&session.id).is_some() {
        record_end(shared, session);
    }
    shared.closed.notify_all();
}

pub(super) fn record_end(shared: &Shared, session: &Session) {
    if let Some(p) = session.precopy_slot.release() {
        if super::progress::abandon(p, &shared.live) {
            log(
                shared,
                format_args!(
                    "session {:#x}: ended in precopy; the workload keeps running here",
                    session.id
                ),
            );
        }
    }
    let r = session.report();
    log(
        shared,
        format_args!(
            "session {:#x} {}: {} pages urgent, {} streamed ({} zero), {} requests, {:.1} MiB in {:.2} s{}",
            r.session,
            if r.complete { "complete" } else { "ended" },
            r.pages_urgent,
            r.pages_stream,
            r.pages_zero,
            r.requests,
            r.bytes_sent as f64 / (1 << 20) as f64,
            r.seconds,
            r.error.as_deref().map(|e| format!(": {e}")).unwrap_or_default()
        ),
    );
    shared.finished.lock().expect("poisoned").push(r);
    shared.wake.wake();
}

/// Ends sessions that have had no connection for longer than the handshake timeout without
/// completing (a destination that connected some workers and went away).
pub(super) fn reap_idle(shared: &Shared) {
    let (handshake, recovery) = (
        shared.config.handshake_timeout,
        shared.config.recovery_timeout,
    );
    let mut sessions = shared.sessions.lock().expect("poisoned");
    sessions.retain(|_, s| {
        // After a break the destination gets the recovery timeout to come back.
        let stale = s.life.stale(handshake, recovery).is_some();
        if stale {
            record_end(shared, s); // before it leaves the map (see finish_connection)
        }
        !stale
    });
}
