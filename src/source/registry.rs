//! The sessions a source serves: shared by its connection threads, ended (and reported) when
//! their last connection closes, reaped when their destination stays away.

use super::config::{LiveParts, SourceConfig};
use super::session::{Session, SessionReport};
use crate::image::Image;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub(super) struct Shared {
    pub(super) image: Arc<dyn Image>,
    /// A live source's tracker and workload, taken by its one session.
    pub(super) live: Mutex<Option<LiveParts>>,
    pub(super) is_live: bool,
    pub(super) config: SourceConfig,
    pub(super) sessions: Mutex<HashMap<u64, Arc<Session>>>,
    pub(super) finished: Mutex<Vec<SessionReport>>,
    pub(super) next_id: AtomicU64,
}

pub(super) fn log(shared: &Shared, msg: std::fmt::Arguments<'_>) {
    if shared.config.verbose {
        eprintln!("postcopy serve: {msg}");
    }
}

/// Counts a connection of `session` closed; ends the session when it was the last one.
pub(super) fn finish_connection(shared: &Shared, session: &Arc<Session>) {
    // The session ends when its last connection closes after it completed or failed. A
    // session whose connections all closed early (a fast worker finished before a slow one
    // connected) waits for the others; `reap_idle` ends it if they never come.
    let ended = {
        let mut sessions = shared.sessions.lock().expect("poisoned");
        if session.connections.fetch_sub(1, Ordering::AcqRel) == 1 {
            if session.finished.load(Ordering::Acquire) {
                sessions.remove(&session.id).is_some()
            } else {
                let ms = (session.started.elapsed().as_millis() as u64).max(1);
                session.idle_since_ms.store(ms, Ordering::Release);
                false
            }
        } else {
            false
        }
    };
    if ended {
        record_end(shared, session);
    }
}

pub(super) fn record_end(shared: &Shared, session: &Session) {
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
}

/// Ends sessions that have had no connection for longer than the handshake timeout without
/// completing (a destination that connected some workers and went away).
pub(super) fn reap_idle(shared: &Shared) {
    let handshake_ms = shared.config.handshake_timeout.as_millis() as u64;
    let recovery_ms = shared.config.recovery_timeout.as_millis() as u64;
    let mut reaped = Vec::new();
    {
        let mut sessions = shared.sessions.lock().expect("poisoned");
        sessions.retain(|_, s| {
            let idle = s.idle_since_ms.load(Ordering::Acquire);
            let now = s.started.elapsed().as_millis() as u64;
            // After a break the destination gets the recovery timeout to come back.
            let broken = s.broken_at_ms.load(Ordering::Acquire) > 0;
            let limit_ms = if broken { recovery_ms } else { handshake_ms };
            let stale = s.connections.load(Ordering::Acquire) == 0
                && idle > 0
                && now.saturating_sub(idle) > limit_ms;
            if stale {
                s.fail(format!(
                    "no connection for {} s{} and {} of {} workers ended: the destination went away",
                    limit_ms / 1000,
                    if broken { " after a connection broke" } else { "" },
                    s.ends_seen.load(Ordering::Acquire),
                    s.workers
                ));
                reaped.push(s.clone());
            }
            !stale
        });
    }
    for s in reaped {
        record_end(shared, &s);
    }
}
