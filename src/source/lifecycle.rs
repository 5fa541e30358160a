//! A session's lifecycle: one [`Phase`] and the connection bookkeeping under one lock, each
//! transition one method here stating the invariant it keeps. Waits are condvar waits with
//! deadlines; the hot path reads two mirrors of the phase without the lock.
//!
//! ```text
//!            switch_over()      every worker's End (worker_ended), and the verification
//!                               when the destination announced one (verify_served)
//!  Precopy ───────────────► Postcopy ───────────────────────────────────► Complete
//!     │   (pure postcopy, a static   │
//!     │    image or a resumed session start here)
//!     └──────────── fail() ──────────┴──────────────────────────────────► Failed(why)
//! ```
//!
//! Beside the phase: the session's open connections, when the last one closed (`idle_since`)
//! and when one broke (`broken_at`): with none open, a session waits for its destination for
//! the handshake timeout, or the recovery timeout after a break, then fails
//! ([`Lifecycle::stale`]); one whose workers all ended but whose announced verification never
//! came completes then (every page was confirmed). `Complete` and `Failed` are terminal; the
//! first failure is kept.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Where a session is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    /// Precopy rounds run while the workload does: the memory still changes, so nothing is
    /// served outside precopy.
    Precopy,
    /// The workload is stopped: requests, the stream and verification run.
    Postcopy,
    /// Every worker that had to confirm its pages did (its `End` was answered).
    Complete,
    /// Given up: why.
    Failed(String),
}

struct State {
    phase: Phase,
    /// The workload was stopped (stays true in the terminal phases reached from Postcopy).
    switched_over: bool,
    /// Per worker: its `End` arrived (a worker may send it twice across a reconnection).
    ended: Vec<bool>,
    /// Per worker: its urgent connection rejoined (a session rebuilt after a restart).
    rejoined: Vec<bool>,
    /// Rebuilt from a destination's resume after this source restarted: only the workers that
    /// come back must end (the others had finished before).
    resumed: bool,
    /// A worker's `End` announced a verification, not served yet: the session completes once
    /// it was.
    verify_pending: bool,
    /// The announced verification was served.
    verified: bool,
    connections: usize,
    /// The last connection closed then (none open, not ended).
    idle_since: Option<Instant>,
    /// A connection broke then: the destination gets the recovery timeout to come back.
    broken_at: Option<Instant>,
}

impl State {
    fn all_ended(&self) -> bool {
        if self.ended.iter().all(|e| *e) {
            return true;
        }
        self.resumed
            && self.rejoined.iter().any(|r| *r)
            && self.rejoined.iter().zip(&self.ended).all(|(r, e)| !r || *e)
    }

    fn ends_seen(&self) -> usize {
        self.ended.iter().filter(|e| **e).count()
    }
}

/// The lifecycle of one session.
pub(super) struct Lifecycle {
    state: Mutex<State>,
    changed: Condvar,
    /// Mirrors of the phase, written under the lock, read without it on the hot path.
    switched_over: AtomicBool,
    finished: AtomicBool,
}

/// Why a connection may not join.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum JoinRefused {
    /// The session completed or failed.
    Finished,
    /// More connections than a destination of its worker count opens.
    TooMany,
}

impl Lifecycle {
    /// A session of `workers` workers, in Postcopy when `switched_over` (a static image, or a
    /// session rebuilt after a restart), else in Precopy.
    pub(super) fn new(workers: u16, switched_over: bool, resumed: bool) -> Lifecycle {
        let phase = if switched_over {
            Phase::Postcopy
        } else {
            Phase::Precopy
        };
        Lifecycle {
            state: Mutex::new(State {
                phase,
                switched_over,
                ended: vec![false; usize::from(workers)],
                rejoined: vec![false; usize::from(workers)],
                resumed,
                verify_pending: false,
                verified: false,
                connections: 0,
                idle_since: None,
                broken_at: None,
            }),
            changed: Condvar::new(),
            switched_over: AtomicBool::new(switched_over),
            finished: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("poisoned")
    }

    /// The phase now.
    pub(super) fn phase(&self) -> Phase {
        self.lock().phase.clone()
    }

    /// The workload is stopped (lock-free).
    pub(super) fn is_switched_over(&self) -> bool {
        self.switched_over.load(Ordering::Acquire)
    }

    /// Complete or failed (lock-free).
    pub(super) fn is_finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }

    /// Precopy → Postcopy: the workload is stopped and its memory is final. A no-op in
    /// Postcopy (pure postcopy switches at the handshake); never after the end.
    pub(super) fn switch_over(&self) {
        let mut s = self.lock();
        if s.phase == Phase::Precopy {
            s.phase = Phase::Postcopy;
        }
        s.switched_over = true;
        self.switched_over.store(true, Ordering::Release);
        self.changed.notify_all();
    }

    /// Worker `worker`'s `End` arrived; returns whether it was its first. Postcopy → Complete
    /// once every worker that must end has ended. Refused before the switchover (a destination
    /// ends only once the memory is final: an `End` in precopy is a protocol error) and for a
    /// worker the session does not have.
    pub(super) fn worker_ended(&self, worker: u16, verify: bool) -> Result<bool, &'static str> {
        let mut s = self.lock();
        if !s.switched_over {
            return Err("End before the switchover");
        }
        if verify && !s.verified {
            s.verify_pending = true;
        }
        let slot = s
            .ended
            .get_mut(usize::from(worker))
            .ok_or("End of an unknown worker")?;
        let first = !std::mem::replace(slot, true);
        self.complete_if_done(&mut s);
        Ok(first)
    }

    /// The announced verification was served (its checksums and `End` written).
    pub(super) fn verify_served(&self) {
        let mut s = self.lock();
        s.verify_pending = false;
        s.verified = true;
        self.complete_if_done(&mut s);
    }

    /// Postcopy → Complete once every worker that must end has ended and no verification is
    /// pending.
    fn complete_if_done(&self, s: &mut State) {
        if s.phase == Phase::Postcopy && s.all_ended() && !s.verify_pending {
            s.phase = Phase::Complete;
            self.finished.store(true, Ordering::Release);
            self.changed.notify_all();
        }
    }

    /// Worker `worker`'s urgent connection rejoined after a break.
    pub(super) fn worker_rejoined(&self, worker: u16) {
        if let Some(r) = self.lock().rejoined.get_mut(usize::from(worker)) {
            *r = true;
        }
    }

    /// Any phase but the terminal ones → Failed(why). A completed session stays complete, a
    /// failed one keeps its first cause.
    pub(super) fn fail(&self, why: String) {
        let mut s = self.lock();
        if matches!(s.phase, Phase::Precopy | Phase::Postcopy) {
            s.phase = Phase::Failed(why);
            self.finished.store(true, Ordering::Release);
            self.changed.notify_all();
        }
    }

    /// The failure, if the session failed.
    pub(super) fn failure(&self) -> Option<String> {
        match &self.lock().phase {
            Phase::Failed(why) => Some(why.clone()),
            _ => None,
        }
    }

    /// Every worker that must end has ended.
    pub(super) fn all_ended(&self) -> bool {
        self.lock().all_ended()
    }

    /// Workers whose `End` arrived.
    pub(super) fn ends_seen(&self) -> usize {
        self.lock().ends_seen()
    }

    /// A connection joins, if the session is not finished and has room (`max` open at most).
    pub(super) fn connection_opened(&self, max: usize) -> Result<(), JoinRefused> {
        let mut s = self.lock();
        if matches!(s.phase, Phase::Complete | Phase::Failed(_)) {
            return Err(JoinRefused::Finished);
        }
        if s.connections > max {
            return Err(JoinRefused::TooMany);
        }
        s.connections += 1;
        s.idle_since = None;
        Ok(())
    }

    /// A connection closed; returns whether the session has ended with it (it was the last
    /// one, and the session is complete or failed). Invariant: never more closes than opens.
    pub(super) fn connection_closed(&self) -> bool {
        let mut s = self.lock();
        assert!(s.connections > 0, "a connection closed twice");
        s.connections -= 1;
        if s.connections > 0 {
            return false;
        }
        if matches!(s.phase, Phase::Complete | Phase::Failed(_)) {
            return true;
        }
        s.idle_since = Some(Instant::now());
        false
    }

    /// A connection broke (not a bad frame): the destination may reconnect within the recovery
    /// timeout.
    pub(super) fn connection_broke(&self) {
        self.lock().broken_at = Some(Instant::now());
    }

    /// Connections open now.
    pub(super) fn connections(&self) -> usize {
        self.lock().connections
    }

    /// With no connection open for longer than `handshake` (or `recovery` after a break), the
    /// session ends: returns why, having failed it (or completed it, when every worker ended
    /// and only an announced verification is missing).
    pub(super) fn stale(&self, handshake: Duration, recovery: Duration) -> Option<String> {
        let mut s = self.lock();
        let idle = s.idle_since?;
        if s.connections > 0 || matches!(s.phase, Phase::Complete | Phase::Failed(_)) {
            return None;
        }
        let broken = s.broken_at.is_some();
        let limit = if broken { recovery } else { handshake };
        if idle.elapsed() <= limit {
            return None;
        }
        if s.phase == Phase::Postcopy && s.all_ended() {
            // Every page was confirmed; only the announced verification never came.
            s.verify_pending = false;
            self.complete_if_done(&mut s);
            return Some("every worker ended; the announced verification never came".into());
        }
        let why = format!(
            "no connection for {} s{} and {} of {} workers ended: the destination went away{}",
            limit.as_secs(),
            if broken {
                " after a connection broke"
            } else {
                ""
            },
            s.ends_seen(),
            s.ended.len(),
            if s.phase == Phase::Precopy {
                " during precopy (the workload was not stopped: it still runs here)"
            } else {
                ""
            }
        );
        s.phase = Phase::Failed(why.clone());
        self.finished.store(true, Ordering::Release);
        self.changed.notify_all();
        Some(why)
    }

    /// Waits until the workload is stopped (true) or the session finished or `timeout` passed
    /// (false).
    pub(super) fn wait_switchover(&self, timeout: Duration) -> bool {
        let s = self.lock();
        let (s, _) = self
            .changed
            .wait_timeout_while(s, timeout, |s| {
                !s.switched_over && !matches!(s.phase, Phase::Complete | Phase::Failed(_))
            })
            .expect("poisoned");
        s.switched_over
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precopy_switches_over_then_completes_when_every_worker_ended() {
        let l = Lifecycle::new(2, false, false);
        assert_eq!(l.phase(), Phase::Precopy);
        assert!(!l.is_switched_over());
        l.switch_over();
        assert_eq!(l.phase(), Phase::Postcopy);
        assert_eq!(l.worker_ended(0, false), Ok(true));
        assert_eq!(
            l.worker_ended(0, false),
            Ok(false),
            "a second End of a worker is not its first"
        );
        assert_eq!(l.phase(), Phase::Postcopy);
        assert_eq!(l.worker_ended(1, false), Ok(true));
        assert!(l.worker_ended(2, false).is_err(), "no worker 2");
        assert_eq!(l.phase(), Phase::Complete);
        assert!(l.is_finished() && l.is_switched_over());
        l.fail("late".into());
        assert_eq!(l.phase(), Phase::Complete, "complete is terminal");
    }

    #[test]
    fn the_first_failure_is_kept_and_finished_sessions_refuse_connections() {
        let l = Lifecycle::new(1, true, false);
        l.connection_opened(4).unwrap();
        l.fail("first".into());
        l.fail("second".into());
        assert_eq!(l.failure().as_deref(), Some("first"));
        assert_eq!(l.connection_opened(4), Err(JoinRefused::Finished));
        assert!(
            l.connection_closed(),
            "the last close of a failed session ends it"
        );
    }

    #[test]
    fn connections_are_bounded_and_idleness_fails_a_session() {
        let l = Lifecycle::new(1, true, false);
        for _ in 0..=2 {
            l.connection_opened(2).unwrap();
        }
        assert_eq!(l.connection_opened(2), Err(JoinRefused::TooMany));
        for _ in 0..3 {
            assert!(
                !l.connection_closed(),
                "not finished: waits for its destination"
            );
        }
        assert_eq!(
            l.stale(Duration::from_secs(60), Duration::from_secs(60)),
            None
        );
        let why = l
            .stale(Duration::ZERO, Duration::from_secs(60))
            .expect("stale");
        assert!(why.contains("destination went away"), "{why}");
        assert!(matches!(l.phase(), Phase::Failed(_)));
    }

    #[test]
    fn a_broken_connection_gets_the_recovery_timeout() {
        let l = Lifecycle::new(1, true, false);
        l.connection_opened(2).unwrap();
        l.connection_broke();
        assert!(!l.connection_closed());
        assert_eq!(l.stale(Duration::ZERO, Duration::from_secs(60)), None);
        assert!(l.stale(Duration::from_secs(60), Duration::ZERO).is_some());
    }

    #[test]
    fn a_resumed_session_completes_when_the_workers_that_came_back_ended() {
        let l = Lifecycle::new(3, true, true);
        l.worker_rejoined(1);
        assert!(!l.all_ended());
        l.worker_ended(1, false).unwrap();
        assert_eq!(l.phase(), Phase::Complete);
    }

    #[test]
    fn the_switchover_wakes_a_waiting_stream_and_the_wait_has_a_deadline() {
        let l = std::sync::Arc::new(Lifecycle::new(1, false, false));
        assert!(!l.wait_switchover(Duration::from_millis(10)), "times out");
        let l2 = l.clone();
        let t = std::thread::spawn(move || l2.wait_switchover(Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        l.switch_over();
        assert!(t.join().unwrap());
    }

    #[test]
    fn no_worker_ends_in_precopy() {
        let l = Lifecycle::new(1, false, false);
        assert!(l.worker_ended(0, false).is_err());
        assert_eq!(l.phase(), Phase::Precopy);
    }
}
