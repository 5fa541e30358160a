//! The listener: accepts connections (a thread each), keeps the sessions, reaps idle ones, and
//! reports every session when it ends or when the server stops.

use super::config::{LiveParts, SourceConfig};
use super::error::{io_err, SourceError};
use super::handshake::serve_connection;
use super::registry::{reap_idle, record_end, Shared};
use super::session::{Session, SessionReport};
use crate::image::Image;
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use super::wake::Wake;
use std::time::{Duration, Instant};

/// The source page server.
pub struct SourceServer {
    pub(super) listener: TcpListener,
    pub(super) shared: Arc<Shared>,
    pub(super) stop: Arc<AtomicBool>,
}

/// The sessions of a running server, as an observer reads them.
#[derive(Clone)]
pub struct SessionsView(Arc<Shared>);

impl SessionsView {
    /// The report so far of every session being served, and how many have ended.
    pub fn now(&self) -> (Vec<SessionReport>, usize) {
        // The lock order is sessions → finished.
        let sessions = self.0.sessions.lock().expect("poisoned");
        let live = sessions.values().map(|s| s.report()).collect();
        let ended = self.0.finished.lock().expect("poisoned").len();
        (live, ended)
    }
}

/// How often sessions whose destination went away are looked for.
const REAP_EVERY: Duration = Duration::from_millis(500);

/// A handle to stop a running server from another thread.
#[derive(Clone, Debug)]
pub struct StopHandle {
    stop: Arc<AtomicBool>,
    draining: Arc<AtomicBool>,
    wake: Arc<Wake>,
}

impl StopHandle {
    /// Asks [`SourceServer::run`] to take no new session and to return once the sessions in
    /// flight have ended (a migration in postcopy cannot be restarted: it is let finish). A
    /// destination that asks for a new session is refused with a message saying why.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Release);
        self.wake.wake();
    }

    /// Asks [`SourceServer::run`] to return (it wakes at once).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.wake.wake();
    }
}

impl SourceServer {
    /// Binds `addr` (use port 0 for any free port) to serve `image`.
    pub fn bind(
        addr: &str,
        image: Arc<dyn Image>,
        config: SourceConfig,
    ) -> Result<SourceServer, SourceError> {
        Self::bind_with(addr, image, None, config)
    }

    /// Binds `addr` to serve the memory of a live workload: `image` reads that memory, `live`
    /// tracks its writes and stops it. One session migrates it (with precopy if the destination
    /// offers it); the workload is stopped at that session's switchover.
    pub fn bind_live(
        addr: &str,
        image: Arc<dyn Image>,
        live: LiveParts,
        config: SourceConfig,
    ) -> Result<SourceServer, SourceError> {
        assert_eq!(
            live.trackers.len(),
            image.layout().blocks.len(),
            "one dirty tracker per block"
        );
        Self::bind_with(addr, image, Some(live), config)
    }

    pub(super) fn bind_with(
        addr: &str,
        image: Arc<dyn Image>,
        live: Option<LiveParts>,
        config: SourceConfig,
    ) -> Result<SourceServer, SourceError> {
        let listener = TcpListener::bind(addr).map_err(|source| SourceError::Bind {
            addr: addr.to_string(),
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(io_err("set listener non-blocking"))?;
        let seed = (std::process::id() as u64) << 32
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1);
        let working_set = match (&config.working_set, &live) {
            (Some(ws), None) => {
                let (ws, problem) = super::WorkingSet::open(image.layout(), ws.clone());
                if let Some(p) = problem {
                    crate::warn!("serve", "{p}");
                }
                Some(ws)
            }
            _ => None,
        };
        Ok(SourceServer {
            listener,
            shared: Arc::new(Shared {
                working_set,
                image,
                is_live: live.is_some(),
                live: Mutex::new(live),
                config,
                sessions: Mutex::new(HashMap::new()),
                finished: Mutex::new(Vec::new()),
                next_id: AtomicU64::new(xxhash_rust::xxh3::xxh3_64(&seed.to_le_bytes()) | 1),
                wake: Arc::new(Wake::new().map_err(io_err("create the server's wake-up pair"))?),
                closed: Condvar::new(),
                draining: Arc::new(AtomicBool::new(false)),
            }),
            stop: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// A view of the sessions, for an observer (`/metrics`) on another thread.
    pub fn sessions_view(&self) -> SessionsView {
        SessionsView(self.shared.clone())
    }

    /// A handle that stops [`run`](Self::run).
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle {
            stop: self.stop.clone(),
            draining: self.shared.draining.clone(),
            wake: self.shared.wake.clone(),
        }
    }

    /// Accepts and serves connections until stopped, or (with `once`) until the first session
    /// ends. Returns the reports of the sessions that ended.
    pub fn run(&self) -> Result<Vec<SessionReport>, SourceError> {
        let mut next_reap = Instant::now() + REAP_EVERY;
        while !self.stop.load(Ordering::Acquire) {
            if Instant::now() >= next_reap {
                reap_idle(&self.shared);
                next_reap = Instant::now() + REAP_EVERY;
            }
            if self.done() {
                break;
            }
            // A connection, a stop, a session's end or the next reap: whichever comes first.
            let wait = next_reap.saturating_duration_since(Instant::now());
            if self
                .shared
                .wake
                .wait(&self.listener, wait)
                .map_err(io_err("wait for connections"))?
            {
                self.accept_all()?;
            }
        }
        self.drain_sessions();
        Ok(std::mem::take(
            &mut *self.shared.finished.lock().expect("poisoned"),
        ))
    }

    /// Draining, no session is left; with `once`, a session ended; for a live source, a session that switched over ended
    /// and took the live parts with it, and no other runs (its memory migrated once; one given
    /// up in precopy, or before its first `Welcome` arrived, gave them back for another).
    fn done(&self) -> bool {
        // The lock order is sessions → finished.
        let sessions = self.shared.sessions.lock().expect("poisoned");
        let finished = self.shared.finished.lock().expect("poisoned");
        (self.shared.config.once && !finished.is_empty())
            || (self.shared.draining.load(Ordering::Acquire) && sessions.is_empty())
            || (self.shared.is_live
                && sessions.is_empty()
                && finished.iter().any(|r| r.switched_over)
                && self.shared.live.lock().expect("poisoned").is_none())
    }

    /// Accepts every pending connection, a thread each.
    fn accept_all(&self) -> Result<(), SourceError> {
        loop {
            match self.listener.accept() {
                Ok((stream, peer)) => {
                    let shared = self.shared.clone();
                    std::thread::Builder::new()
                        .name(format!("src-conn-{peer}"))
                        .spawn(move || serve_connection(shared, stream, peer))
                        .map_err(io_err("spawn connection thread"))?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err("accept")(e)),
            }
        }
    }

    /// On stop, nothing goes unreported: sessions with open connections get
    /// [`STOP_GRACE`] to end on their own (a destination that has all its pages closes at
    /// once); every session left is then reported as ended by the stop, with its state.
    pub(super) fn drain_sessions(&self) {
        let left: Vec<Arc<Session>> = {
            let sessions = self.shared.sessions.lock().expect("poisoned");
            let (mut sessions, _) = self
                .shared
                .closed
                .wait_timeout_while(sessions, STOP_GRACE, |s| {
                    s.values().any(|s| s.life.connections() > 0)
                })
                .expect("poisoned");
            sessions.drain().map(|(_, s)| s).collect()
        };
        for s in left {
            if !s.life.all_ended() {
                let open = s.life.connections();
                s.life.fail(format!(
                    "the source was stopped with the migration incomplete ({} of {} workers \
                     ended, {open} connection(s) open): the destination cannot finish",
                    s.life.ends_seen(),
                    s.workers
                ));
            }
            record_end(&self.shared, &s);
        }
    }
}

/// How long a stopped source waits for sessions with open connections to end by themselves.
pub(super) const STOP_GRACE: Duration = Duration::from_secs(2);
