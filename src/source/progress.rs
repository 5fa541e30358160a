//! What a session's precopy has done so far. The session holds it, so that when the precopy
//! connection breaks, the one that rejoins resumes precopy where it was: the live workload
//! keeps running and its tracker keeps tracking meanwhile.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::config::LiveParts;

/// The switchover, once made: what the destination must discard, and when the workload stopped.
pub(super) struct Switched {
    /// Per block, the ranges dirtied after they were sent.
    pub(super) dirty: Vec<Vec<(u64, u64)>>,
    /// Their pages.
    pub(super) dirty_pages: u64,
    /// When the workload stopped (wall clock, µs).
    pub(super) stopped_unix_us: u64,
}

/// Precopy's state between connections.
pub(super) struct PrecopyProgress {
    /// A live source's tracker and workload (`None`: a static image, one full round).
    pub(super) live: Option<LiveParts>,
    /// Pages per round whose `Round` frame was written (index 0 is round 1, the full pass).
    pub(super) round_pages: Vec<u64>,
    /// Per round, per block, the ranges it sends (empty for round 1, whose pages a resuming
    /// destination reports itself), recorded before the round's first byte: rounds the
    /// destination did not confirm are sent again. One longer than `round_pages` while a
    /// round is being sent.
    pub(super) rounds: Vec<Vec<Vec<(u64, u64)>>>,
    /// Per block, the ranges the tracker reported dirty and no round has taken yet.
    pub(super) dirty: Vec<Vec<(u64, u64)>>,
    /// When precopy began (its time limit counts from here).
    pub(super) started: Instant,
    /// Set at the switchover.
    pub(super) switched: Option<Switched>,
}

impl PrecopyProgress {
    pub(super) fn new(live: Option<LiveParts>, blocks: usize) -> PrecopyProgress {
        PrecopyProgress {
            live,
            round_pages: Vec::new(),
            rounds: Vec::new(),
            dirty: vec![Vec::new(); blocks],
            started: Instant::now(),
            switched: None,
        }
    }
}

enum Held {
    /// No precopy (yet).
    None,
    /// Between connections.
    Here(PrecopyProgress),
    /// A connection runs precopy with it.
    Lent,
    /// The session ended.
    Released,
}

/// The progress, lent to one connection at a time.
pub(super) struct PrecopySlot {
    held: Mutex<Held>,
    returned: Condvar,
}

impl PrecopySlot {
    pub(super) fn new() -> PrecopySlot {
        PrecopySlot {
            held: Mutex::new(Held::None),
            returned: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Held> {
        self.held.lock().expect("poisoned")
    }

    /// Precopy begins on this connection: the slot is lent from now on.
    pub(super) fn begin(&self) {
        let mut held = self.lock();
        assert!(matches!(*held, Held::None), "precopy begins once");
        *held = Held::Lent;
    }

    /// Takes the progress for a rejoining connection, waiting up to `timeout` for the broken
    /// connection's thread to give it back. `None`: no precopy to resume (none began, the
    /// session ended, or the old thread did not let go in time).
    pub(super) fn take(&self, timeout: Duration) -> Option<PrecopyProgress> {
        let held = self.lock();
        let (mut held, _) = self
            .returned
            .wait_timeout_while(held, timeout, |h| matches!(h, Held::Lent))
            .expect("poisoned");
        match std::mem::replace(&mut *held, Held::Lent) {
            Held::Here(p) => Some(p),
            other => {
                *held = other;
                None
            }
        }
    }

    /// A connection is done with the progress (it broke, or precopy ended). Returns it when
    /// the session has ended meanwhile: the caller disposes of it ([`abandon`]).
    pub(super) fn give_back(&self, p: PrecopyProgress) -> Option<PrecopyProgress> {
        let mut held = self.lock();
        if matches!(*held, Held::Released) {
            return Some(p);
        }
        *held = Held::Here(p);
        self.returned.notify_all();
        None
    }

    /// The session ended: the progress if it is here (the caller disposes of it); one still
    /// lent comes back through [`give_back`](Self::give_back).
    pub(super) fn release(&self) -> Option<PrecopyProgress> {
        let mut held = self.lock();
        match std::mem::replace(&mut *held, Held::Released) {
            Held::Here(p) => Some(p),
            _ => None,
        }
    }
}

/// A session ended with this precopy progress. Before the switchover the source still owns
/// its workload: it keeps running, tracking stops, and the parts go back to `live`, so another
/// migration can start. After it, nothing is left to do.
pub(super) fn abandon(p: PrecopyProgress, live: &Mutex<Option<LiveParts>>) -> bool {
    let Some(mut parts) = p.live else {
        return false;
    };
    if p.switched.is_some() {
        return false;
    }
    for t in parts.trackers.iter_mut() {
        let _ = t.stop();
    }
    *live.lock().expect("poisoned") = Some(parts);
    true
}
