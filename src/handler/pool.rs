//! Source sessions prepared before any VMM connects: connected, authenticated, `Welcome`
//! received, kept alive by heartbeats. A VMM's handover takes one ([`Pool::take`]) and its first
//! fault is served without a network round trip of set-up; a keeper thread opens a new one at
//! once, so the next VMM finds one ready too.
//!
//! A prepared session is only the urgent connection of worker 0 (the handshake's): the bulk
//! half joins once released (`EngineConfig::bulk_joins_after_go`), beside the faults already
//! being served. A session that breaks while it waits is dropped and replaced; the sessions
//! no VMM took are released (the source hears why) when the handler stops.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::dest::{self, Connected, EngineConfig};
use crate::link::liveness::Liveness;

/// The longest a failing source makes the keeper wait between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Prepared sessions and their keeper.
pub(super) struct Pool {
    inner: Arc<Inner>,
    keeper: Option<JoinHandle<()>>,
}

struct Inner {
    config: EngineConfig,
    /// Sessions to keep ready.
    want: usize,
    live: Liveness,
    verbose: bool,
    ready: Mutex<VecDeque<Connected>>,
    /// Notified when a session is taken or the pool stops.
    changed: Condvar,
    stop: AtomicBool,
}

impl Pool {
    /// Keeps `want` sessions of `config`'s source ready (0: none, no thread).
    pub(super) fn start(config: EngineConfig, want: usize, verbose: bool) -> Pool {
        let inner = Arc::new(Inner {
            live: Liveness::new(config.link_timeout),
            config,
            want,
            verbose,
            ready: Mutex::new(VecDeque::with_capacity(want)),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let keeper = (want > 0)
            .then(|| {
                let inner = inner.clone();
                std::thread::Builder::new()
                    .name("pool-keeper".into())
                    .spawn(move || keep(&inner))
                    .ok()
            })
            .flatten();
        Pool { inner, keeper }
    }

    /// A prepared session, if one is ready (the keeper replaces it at once).
    pub(super) fn take(&self) -> Option<Connected> {
        let mut ready = self.inner.lock();
        // The oldest first: sessions are used in the order the source began them.
        let mut taken = ready.pop_front()?;
        drop(ready);
        self.inner.changed.notify_all();
        // It may have broken since the keeper's last look.
        taken.keep_alive(&self.inner.live).ok().map(|()| taken)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        self.inner.changed.notify_all();
        if let Some(k) = self.keeper.take() {
            let _ = k.join();
        }
        for c in self.inner.lock().drain(..) {
            c.release("the handler stopped; this prepared session was never used");
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, VecDeque<Connected>> {
        self.ready.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn log(&self, what: std::fmt::Arguments) {
        if self.verbose {
            crate::info!("handler", "prepared sessions: {what}");
        }
    }

    /// Keeps the ready sessions alive (dropping broken ones); how many are ready.
    fn keep_ready_alive(&self) -> usize {
        let mut ready = self.lock();
        ready.retain_mut(|c| match c.keep_alive(&self.live) {
            Ok(()) => true,
            Err(e) => {
                self.log(format_args!(
                    "one broke while it waited ({e}); replacing it"
                ));
                false
            }
        });
        ready.len()
    }

    /// Waits until a session is taken, the pool stops, or `d` passed.
    fn wait(&self, d: Duration) {
        let ready = self.lock();
        if !self.stopped() {
            let _ = self.changed.wait_timeout(ready, d);
        }
    }
}

/// The keeper: tops the pool up and keeps its sessions alive until it stops.
fn keep(inner: &Inner) {
    let mut backoff = Duration::from_millis(100);
    let mut failing = false;
    while !inner.stopped() {
        if inner.keep_ready_alive() >= inner.want {
            // Woken by a take, or in time for the next heartbeat.
            inner.wait(inner.live.heartbeat / 2);
            continue;
        }
        match dest::connect(&inner.config) {
            Ok(c) => {
                if failing {
                    inner.log(format_args!("the source answers again"));
                }
                (failing, backoff) = (false, Duration::from_millis(100));
                inner.lock().push_back(c);
            }
            Err(e) => {
                if !failing {
                    inner.log(format_args!(
                        "cannot prepare one ({e}); VMMs connect on demand until the source answers"
                    ));
                }
                failing = true;
                inner.wait(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}
