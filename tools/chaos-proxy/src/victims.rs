//! Random victims: blows (a reset, a FIN, or a silence) dealt to a connection picked at random
//! among all live ones, at seeded points of the run's total traffic.
//!
//! The points are byte counts of everything the proxy forwarded (both directions, every
//! connection): the first blow falls after a gap drawn from `[min_gap, max_gap]`, each later one
//! a new gap after the previous. When the count crosses a point, the forwarder that crossed it
//! draws the victim among the connections live at that moment (busy or idle, in their
//! handshake or not) and the blow, both from the seed. Which connection carries the byte that
//! crosses the point depends on the scheduling, so a run is reproducible in its draws, not in
//! which peer it hits.
//!
//! A silence forwards nothing on the victim, in either direction, for the drawn duration (a
//! cut or [`crate::Proxy::stop`] ends it early); the TCP connections stay up, as on a link
//! whose packets are dropped. [`crate::Proxy::silence_all`] silences every connection, and
//! every one opened meanwhile, at once.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::{lock, splitmix64, Conn, CutCause, Shared};

/// What a victim gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blow {
    /// Both sockets closed with `SO_LINGER` 0: the peers read what was forwarded, then
    /// `ECONNRESET`.
    Reset,
    /// Both sockets shut down for writing: the peers read what was forwarded, then EOF.
    Fin,
    /// Nothing forwarded either way for this long, then forwarding goes on.
    Silence(Duration),
}

impl fmt::Display for Blow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Blow::Reset => f.write_str("reset"),
            Blow::Fin => f.write_str("fin"),
            Blow::Silence(d) => write!(f, "silence {} ms", d.as_millis()),
        }
    }
}

/// Seeded blows to random live connections (see the [module](self) docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RandomVictims {
    /// Seed of every draw.
    pub seed: u64,
    /// Blows dealt in total (fewer if the run ends first).
    pub blows: usize,
    /// Smallest gap, in bytes of total traffic, before a blow.
    pub min_gap: u64,
    /// Largest gap.
    pub max_gap: u64,
    /// Kinds drawn from, equally likely: resets and FINs, and silences of a length drawn from
    /// `silence` (inclusive), when given.
    pub reset: bool,
    /// See `reset`.
    pub fin: bool,
    /// See `reset`.
    pub silence: Option<(Duration, Duration)>,
}

/// One blow dealt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlowEvent {
    /// The victim's connection number.
    pub conn: usize,
    /// Connections live when it was drawn.
    pub live: usize,
    /// What it got.
    pub blow: Blow,
    /// Total bytes forwarded when it was dealt.
    pub total_bytes: u64,
    /// Time since the proxy started.
    pub elapsed: Duration,
}

impl fmt::Display for BlowEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "victim conn {} (of {} live): {} at {} B total",
            self.conn, self.live, self.blow, self.total_bytes
        )
    }
}

/// The draws and the next point, behind one lock (taken only when a point is crossed).
pub(crate) struct VictimState {
    rng: u64,
    made: usize,
}

impl RandomVictims {
    pub(crate) fn start(&self) -> (VictimState, u64) {
        let mut state = VictimState {
            rng: self.seed ^ 0x5EED_F00D_CAFE_D00D,
            made: 0,
        };
        let first = self.gap(&mut state.rng);
        (state, first)
    }

    fn gap(&self, rng: &mut u64) -> u64 {
        let (lo, hi) = (
            self.min_gap.min(self.max_gap),
            self.max_gap.max(self.min_gap),
        );
        lo + splitmix64(rng) % (hi - lo + 1).max(1)
    }

    fn draw_blow(&self, rng: &mut u64) -> Blow {
        let mut kinds = Vec::with_capacity(3);
        if self.reset {
            kinds.push(0);
        }
        if self.fin {
            kinds.push(1);
        }
        if self.silence.is_some() {
            kinds.push(2);
        }
        let pick = if kinds.is_empty() {
            0
        } else {
            kinds[(splitmix64(rng) % kinds.len() as u64) as usize]
        };
        match (pick, self.silence) {
            (1, _) => Blow::Fin,
            (2, Some((lo, hi))) => {
                let (lo, hi) = (
                    lo.as_millis() as u64,
                    hi.as_millis().max(lo.as_millis()) as u64,
                );
                Blow::Silence(Duration::from_millis(lo + splitmix64(rng) % (hi - lo + 1)))
            }
            _ => Blow::Reset,
        }
    }
}

/// Called by a forwarder after it forwarded bytes: deals the blow due at `total`, if any.
pub(crate) fn after_bytes(shared: &Arc<Shared>, total: u64) {
    let Some(victims) = &shared.plan.victims else {
        return;
    };
    if total < shared.next_blow_at.load(Ordering::Acquire) {
        return;
    }
    let mut state = lock(&shared.victims);
    let Some(st) = state.as_mut() else { return };
    let due = shared.next_blow_at.load(Ordering::Acquire);
    if total < due || st.made >= victims.blows {
        return;
    }
    st.made += 1;
    let next = if st.made >= victims.blows {
        u64::MAX
    } else {
        due.saturating_add(victims.gap(&mut st.rng))
    };
    shared.next_blow_at.store(next, Ordering::Release);
    let live: Vec<Arc<Conn>> = shared
        .live_conns()
        .into_iter()
        .filter(|c| c.is_open())
        .collect();
    // Drawn even when nobody is live, so the sequence of draws does not depend on timing.
    let pick = splitmix64(&mut st.rng);
    let blow = victims.draw_blow(&mut st.rng);
    drop(state);
    let Some(victim) = live.get((pick % live.len().max(1) as u64) as usize) else {
        shared.log(format_args!(
            "victim: none live at {total} B total; blow skipped"
        ));
        return;
    };
    let event = BlowEvent {
        conn: victim.index,
        live: live.len(),
        blow,
        total_bytes: total,
        elapsed: shared.started.elapsed(),
    };
    shared.log(format_args!("{event}"));
    lock(&shared.stats).blows.push(event);
    match blow {
        Blow::Reset => {
            victim.cut_with(shared, CutCause::Victim, None, true);
        }
        Blow::Fin => {
            victim.cut_with(shared, CutCause::Victim, None, false);
        }
        Blow::Silence(d) => victim.silence(shared, d),
    }
    shared.stats_cond.notify_all();
}
