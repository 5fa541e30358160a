//! The source page server: answers urgent page requests first, streams the rest.
//!
//! Threads and connections (per session, per destination worker `w` of `W`):
//! - an **urgent** connection (TCP_NODELAY): the destination's requests for faulted pages; each
//!   is answered at once with a `Pages` frame. Worker 0's urgent connection also carries the
//!   handshake (`Hello` → `Welcome` with the layout) and the final `End`/`Ack`.
//! - a **bulk** connection: streams worker `w`'s shard of every block in page order, skipping
//!   pages already sent, and ends with `End`.
//!
//! Urgent replies never wait behind bulk bytes: they have their own connection and thread, and
//! the bulk streamer runs at a lower scheduling priority. Every page is marked in the session's
//! `sent` bitmap when it is queued, so the stream skips what a request already carried; a
//! request is answered even if the stream already sent the page (the destination places each
//! page once and counts the duplicate).
//!
//! Precopy (when the destination's `Hello` offers it): before `Run`, worker 0's urgent
//! connection carries a full pass over every page (round 1), then rounds of the pages the live
//! workload dirtied meanwhile ([`crate::dirty::DirtyTracker`]), until the dirty set is small
//! enough or a limit is hit ([`PrecopyLimits`]); then the switchover: the workload stops, the
//! final dirty set goes out as `Discard` ranges (those pages become unsent again, so requests and
//! the stream carry their new content), and `Run`. Without precopy, a live source stops its
//! workload at the handshake. A verify connection (`Role::Verify`) gets the checksums of every
//! page as it was at switchover.
//!
//! Everything the destination sends is checked (magic, version, kind, ranges against the
//! layout) before it is used; a bad frame gets an `Error` frame back and ends its session.

mod prefetch;

pub use prefetch::Prefetch;

use std::collections::HashMap;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::codec::{
    self, max_batch_pages, CodecError, DiscardSender, Header, Kind, Role, Welcome, HEADER_BYTES,
};
use crate::dirty::{DirtyError, DirtyTracker};
use crate::image::{page_checksum, Image, PageData};
use crate::layout::PageBitmap;
use crate::link::auth::Key;
use crate::link::{FramedStream, LinkError};
use crate::live::SourceWorkload;
use crate::stats::unix_us;

/// Errors of the source server.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Binding the listen address failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The error.
        source: std::io::Error,
    },
    /// A socket error on a session.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The error.
        source: std::io::Error,
    },
    /// The destination sent something malformed.
    #[error("bad frame from destination {peer}: {source}")]
    Protocol {
        /// The peer.
        peer: SocketAddr,
        /// What was wrong.
        source: CodecError,
    },
    /// The destination reported an error.
    #[error("destination {peer} reported: {message}")]
    Remote {
        /// The peer.
        peer: SocketAddr,
        /// Its message.
        message: String,
    },
    /// A peer failed authentication, or a frame its integrity check.
    #[error("{0}")]
    Auth(#[from] crate::link::auth::AuthError),
    /// Dirty tracking failed during precopy.
    #[error("precopy: {0}")]
    Dirty(#[from] DirtyError),
    /// A live source serves one migration of its memory.
    #[error("this live source already migrated its memory (its workload is stopped); start a new source for another migration")]
    LiveUsed,
    /// The session ended without the destination confirming every page.
    #[error(
        "session {session:#x} ended before the destination confirmed it had every page ({reason})"
    )]
    Incomplete {
        /// Session id.
        session: u64,
        /// Why.
        reason: String,
    },
}

/// Source configuration.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    /// Serve one session, then return from [`SourceServer::run`].
    pub once: bool,
    /// Time a new connection has to send its `Hello`.
    pub handshake_timeout: Duration,
    /// Most sessions served at once.
    pub max_sessions: usize,
    /// A write that blocks this long (the destination stopped reading) ends its session.
    pub write_timeout: Duration,
    /// Most pages sent ahead of a sequential reader's fault with the reply (0: no prefetch).
    pub prefetch_max: u64,
    /// Test hook: delay before answering each urgent request (forces stream/request races).
    pub urgent_delay: Duration,
    /// Print a line per session to stderr.
    pub verbose: bool,
    /// When precopy (offered by the destination) switches over.
    pub precopy: PrecopyLimits,
    /// The pre-shared key: every connection must prove it holds it, every frame is MACed
    /// ([`crate::link::auth`]). `None`: no authentication (a trusted network only).
    pub key: Option<Key>,
    /// A session whose connection broke waits this long for the destination to reconnect
    /// (recovery) before it is given up. Zero: a broken connection fails the session.
    pub recovery_timeout: Duration,
    /// TLS 1.3 on every connection ([`crate::link::tls`]); `None`: plain TCP.
    pub tls: Option<crate::link::tls::TlsServer>,
}

/// When precopy stops sending rounds and switches over to postcopy. The first round (every
/// page) always runs; after each round the dirty set is read, and the source switches over as
/// soon as any limit holds. Pages still dirty are discarded on the destination and fetched in
/// postcopy.
#[derive(Clone, Debug)]
pub struct PrecopyLimits {
    /// Most rounds, the full pass included.
    pub max_rounds: u32,
    /// Switch over once at most this many pages are dirty.
    pub max_dirty_pages: u64,
    /// Switch over after this long in precopy.
    pub max_duration: Duration,
}

impl Default for PrecopyLimits {
    fn default() -> Self {
        PrecopyLimits {
            max_rounds: 8,
            max_dirty_pages: 1024,
            max_duration: Duration::from_secs(30),
        }
    }
}

/// A live source's moving parts: a dirty tracker per block and the workload to stop at
/// switchover.
pub struct LiveParts {
    /// One tracker per block of the image's layout, in block order.
    pub trackers: Vec<Box<dyn DirtyTracker>>,
    /// The workload writing the memory.
    pub workload: Box<dyn SourceWorkload>,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            once: false,
            handshake_timeout: Duration::from_secs(10),
            max_sessions: 64,
            write_timeout: Duration::from_secs(60),
            prefetch_max: 64,
            urgent_delay: Duration::ZERO,
            verbose: true,
            precopy: PrecopyLimits::default(),
            key: None,
            recovery_timeout: Duration::from_secs(60),
            tls: None,
        }
    }
}

/// What one session did, from the source's side.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SessionReport {
    /// Session id.
    pub session: u64,
    /// Whether the destination confirmed it had every page.
    pub complete: bool,
    /// Pages sent in answer to requests.
    pub pages_urgent: u64,
    /// Pages sent by the background stream.
    pub pages_stream: u64,
    /// Of those, zero pages (sent as flags).
    pub pages_zero: u64,
    /// Of the urgent pages, those sent ahead of a sequential reader (prefetch).
    pub pages_prefetched: u64,
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

struct Session {
    id: u64,
    workers: u16,
    sent: Vec<PageBitmap>,
    started: Instant,
    ends_seen: AtomicUsize,
    /// Workers whose `End` arrived (a worker may send it twice across a reconnection).
    ended: Mutex<Vec<bool>>,
    /// Workers whose urgent connection rejoined (a session rebuilt after a restart).
    rejoined: Mutex<Vec<bool>>,
    /// Rebuilt from a destination's resume after this source restarted.
    resumed: bool,
    /// Milliseconds after `started` when a connection last broke (0: never): the session then
    /// waits up to the recovery timeout for the destination to come back.
    broken_at_ms: AtomicU64,
    /// Connections that rejoined after a break.
    recoveries: AtomicU64,
    /// Pages streamed again because a resumed destination did not have them.
    pages_resent: AtomicU64,
    /// Per worker, the generation of its stream: a resumed stream supersedes the one of the
    /// broken connection, which stops claiming pages at once.
    bulk_gen: Vec<AtomicU64>,
    failed: Mutex<Option<String>>,
    finished: AtomicBool,
    /// Connections open now; changed only under the sessions lock.
    connections: AtomicUsize,
    /// Milliseconds after `started` when the last connection closed (0 while any is open).
    idle_since_ms: AtomicU64,
    pages_urgent: AtomicU64,
    pages_stream: AtomicU64,
    pages_zero: AtomicU64,
    pages_prefetched: AtomicU64,
    requests: AtomicU64,
    bytes_sent: AtomicU64,
    /// The workload is stopped: the memory is what the destination must end up with.
    switched_over: AtomicBool,
    precopy: Mutex<PrecopyStats>,
}

#[derive(Default)]
struct PrecopyStats {
    round_pages: Vec<u64>,
    dirty_at_switchover: u64,
    discarded: u64,
}

impl Session {
    fn new(shared: &Shared, id: u64, workers: u16, resumed: bool) -> Session {
        Session {
            id,
            workers,
            sent: shared
                .image
                .layout()
                .blocks
                .iter()
                .map(|b| PageBitmap::new(b.pages()))
                .collect(),
            started: Instant::now(),
            ends_seen: AtomicUsize::new(0),
            ended: Mutex::new(vec![false; usize::from(workers)]),
            rejoined: Mutex::new(vec![false; usize::from(workers)]),
            resumed,
            broken_at_ms: AtomicU64::new(0),
            recoveries: AtomicU64::new(0),
            pages_resent: AtomicU64::new(0),
            bulk_gen: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            failed: Mutex::new(None),
            finished: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            pages_urgent: AtomicU64::new(0),
            pages_stream: AtomicU64::new(0),
            pages_zero: AtomicU64::new(0),
            pages_prefetched: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            switched_over: AtomicBool::new(!shared.is_live || resumed),
            precopy: Mutex::new(PrecopyStats::default()),
        }
    }

    /// Whether every worker that must end has ended: all of them, or, for a session rebuilt
    /// after a restart, every worker that came back (the others had finished before).
    fn all_ended(&self) -> bool {
        if self.ends_seen.load(Ordering::Acquire) >= usize::from(self.workers) {
            return true;
        }
        if !self.resumed {
            return false;
        }
        let ended = self.ended.lock().expect("poisoned");
        let rejoined = self.rejoined.lock().expect("poisoned");
        rejoined.iter().any(|r| *r) && rejoined.iter().zip(ended.iter()).all(|(r, e)| !r || *e)
    }

    fn report(&self) -> SessionReport {
        let error = self.failed.lock().expect("poisoned").clone();
        let precopy = self.precopy.lock().expect("poisoned");
        SessionReport {
            session: self.id,
            complete: error.is_none() && self.all_ended(),
            pages_urgent: self.pages_urgent.load(Ordering::Relaxed),
            pages_stream: self.pages_stream.load(Ordering::Relaxed),
            pages_zero: self.pages_zero.load(Ordering::Relaxed),
            pages_prefetched: self.pages_prefetched.load(Ordering::Relaxed),
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

    /// Writes the frames in `out` to the destination (each with its MAC on an authenticated
    /// link), counts them, and empties `out`.
    fn flush(
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

    fn fail(&self, why: String) {
        let mut f = self.failed.lock().expect("poisoned");
        if f.is_none() {
            *f = Some(why);
        }
        self.finished.store(true, Ordering::Release);
    }
}

struct Shared {
    image: Arc<dyn Image>,
    /// A live source's tracker and workload, taken by its one session.
    live: Mutex<Option<LiveParts>>,
    is_live: bool,
    config: SourceConfig,
    sessions: Mutex<HashMap<u64, Arc<Session>>>,
    finished: Mutex<Vec<SessionReport>>,
    next_id: AtomicU64,
}

/// The source page server.
pub struct SourceServer {
    listener: TcpListener,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
}

/// A handle to stop a running server from another thread.
#[derive(Clone, Debug)]
pub struct StopHandle(Arc<AtomicBool>);

impl StopHandle {
    /// Asks [`SourceServer::run`] to return.
    pub fn stop(&self) {
        self.0.store(true, Ordering::Release);
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> SourceError {
    let context = context.into();
    move |source| SourceError::Io { context, source }
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

    fn bind_with(
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
        Ok(SourceServer {
            listener,
            shared: Arc::new(Shared {
                image,
                is_live: live.is_some(),
                live: Mutex::new(live),
                config,
                sessions: Mutex::new(HashMap::new()),
                finished: Mutex::new(Vec::new()),
                next_id: AtomicU64::new(xxhash_rust::xxh3::xxh3_64(&seed.to_le_bytes()) | 1),
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

    /// A handle that stops [`run`](Self::run).
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.stop.clone())
    }

    /// Accepts and serves connections until stopped, or (with `once`) until the first session
    /// ends. Returns the reports of the sessions that ended.
    pub fn run(&self) -> Result<Vec<SessionReport>, SourceError> {
        let mut last_reap = Instant::now();
        loop {
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            if last_reap.elapsed() > Duration::from_millis(500) {
                reap_idle(&self.shared);
                last_reap = Instant::now();
            }
            if self.shared.config.once && !self.shared.finished.lock().expect("poisoned").is_empty()
            {
                break;
            }
            match self.listener.accept() {
                Ok((stream, peer)) => {
                    let shared = self.shared.clone();
                    std::thread::Builder::new()
                        .name(format!("src-conn-{peer}"))
                        .spawn(move || serve_connection(shared, stream, peer))
                        .map_err(io_err("spawn connection thread"))?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err("accept")(e)),
            }
        }
        self.drain_sessions();
        Ok(std::mem::take(
            &mut *self.shared.finished.lock().expect("poisoned"),
        ))
    }

    /// On stop, nothing goes unreported: sessions with open connections get
    /// [`STOP_GRACE`] to end on their own (a destination that has all its pages closes at
    /// once); every session left is then reported as ended by the stop, with its state.
    fn drain_sessions(&self) {
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            let open = {
                let sessions = self.shared.sessions.lock().expect("poisoned");
                sessions
                    .values()
                    .any(|s| s.connections.load(Ordering::Acquire) > 0)
            };
            if !open {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let left: Vec<Arc<Session>> = {
            let mut sessions = self.shared.sessions.lock().expect("poisoned");
            sessions.drain().map(|(_, s)| s).collect()
        };
        for s in left {
            if !s.all_ended() {
                let open = s.connections.load(Ordering::Acquire);
                s.fail(format!(
                    "the source was stopped with the migration incomplete ({} of {} workers \
                     ended, {open} connection(s) open): the destination cannot finish",
                    s.ends_seen.load(Ordering::Acquire),
                    s.workers
                ));
            }
            record_end(&self.shared, &s);
        }
    }
}

/// How long a stopped source waits for sessions with open connections to end by themselves.
const STOP_GRACE: Duration = Duration::from_secs(2);

fn log(shared: &Shared, msg: std::fmt::Arguments<'_>) {
    if shared.config.verbose {
        eprintln!("postcopy serve: {msg}");
    }
}

/// Reads the next frame from the destination (its MAC checked on an authenticated link); a
/// `Pages` frame, which no destination sends, is refused at its header.
fn read_frame(link: &mut FramedStream, peer: SocketAddr) -> Result<Option<Header>, SourceError> {
    link.read_frame_if(|h| match h.kind {
        Kind::Pages => Err(CodecError::Unexpected {
            got: h.kind,
            expected: "a request or control frame",
        }),
        _ => Ok(()),
    })
    .map_err(link_err(peer))
}

/// A write's link error, in the source's words (what was sent, to whom).
fn write_err(what: &str, peer: SocketAddr) -> impl FnOnce(LinkError) -> SourceError + '_ {
    move |e| match e {
        LinkError::Io { source, .. } => SourceError::Io {
            context: format!("{what} to {peer}"),
            source,
        },
        e => link_err(peer)(e),
    }
}

/// A link error, in the source's words (naming the peer).
fn link_err(peer: SocketAddr) -> impl FnOnce(LinkError) -> SourceError {
    move |e| match e {
        LinkError::Io { what, source } => SourceError::Io {
            context: format!("{what} from {peer}"),
            source,
        },
        LinkError::Protocol(source) => SourceError::Protocol { peer, source },
        LinkError::Auth(e) => SourceError::Auth(e),
        LinkError::Remote(message) => SourceError::Remote { peer, message },
    }
}

fn serve_connection(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(shared.config.handshake_timeout));
    let stream = match &shared.config.tls {
        None => stream,
        Some(tls) => match tls.accept(stream) {
            Ok(plain) => plain,
            Err(e) => {
                log(&shared, format_args!("{peer}: {e}"));
                return;
            }
        },
    };
    let _ = stream.set_read_timeout(Some(shared.config.handshake_timeout));
    let _ = stream.set_write_timeout(Some(shared.config.write_timeout));
    let mut link = FramedStream::new(stream);
    if let Some(key) = &shared.config.key {
        // Nobody without the key gets past this: no session, no page.
        if let Err(e) = crate::link::auth::accept(&mut link, key).map_err(link_err(peer)) {
            log(&shared, format_args!("{peer}: authentication: {e}"));
            link.send_error(&format!("authentication: {e}"));
            return;
        }
    }
    let hello = match read_frame(&mut link, peer) {
        Ok(Some(h)) if h.kind == Kind::Hello => h,
        Ok(Some(h)) => {
            let e = CodecError::Unexpected {
                got: h.kind,
                expected: "Hello",
            };
            log(&shared, format_args!("{peer}: {e}"));
            link.send_error(&format!("handshake: {e}"));
            return;
        }
        Ok(None) => return,
        Err(e) => {
            log(&shared, format_args!("{peer}: handshake failed: {e}"));
            link.send_error(&format!("handshake: {e}"));
            return;
        }
    };
    let role = hello.role().expect("decode checked the role");
    let workers = hello.mask as u16;
    let worker = hello.count;
    let session = {
        let mut sessions = shared.sessions.lock().expect("poisoned");
        let session = if hello.page == 0 {
            if role != Role::Urgent || worker != 0 {
                drop(sessions);
                link.send_error("handshake: a new session starts on worker 0's urgent connection");
                return;
            }
            if sessions.len() >= shared.config.max_sessions {
                drop(sessions);
                link.send_error("source busy: too many sessions; retry later");
                return;
            }
            let id = shared.next_id.fetch_add(2, Ordering::Relaxed);
            let s = Arc::new(Session::new(&shared, id, workers, false));
            sessions.insert(id, s.clone());
            s
        } else {
            match sessions.get(&hello.page) {
                Some(s) if s.workers == workers && !s.finished.load(Ordering::Acquire) => s.clone(),
                Some(_) => {
                    drop(sessions);
                    link.send_error("handshake: session is finished or the worker count differs");
                    return;
                }
                // A destination resuming a session this process never saw: the source was
                // restarted. A static image is the same as before, so the session is rebuilt
                // from what the destination says it has (its `Have` frames).
                None if hello.wants_resume() && !shared.is_live => {
                    let s = Arc::new(Session::new(&shared, hello.page, workers, true));
                    log(
                        &shared,
                        format_args!(
                            "{peer}: resuming session {:#x} of an earlier run of this source",
                            hello.page
                        ),
                    );
                    sessions.insert(hello.page, s.clone());
                    s
                }
                None => {
                    drop(sessions);
                    link.send_error(&format!(
                        "handshake: unknown session {:#x}{}",
                        hello.page,
                        if hello.wants_resume() {
                            " (a live source's memory cannot resume a migration after a restart)"
                        } else {
                            ""
                        }
                    ));
                    return;
                }
            }
        };
        // Two per worker, plus one verify connection, plus the broken ones still closing.
        if session.connections.load(Ordering::Acquire) > 4 * usize::from(workers) + 1 {
            drop(sessions);
            link.send_error("handshake: too many connections for this session");
            return;
        }
        session.connections.fetch_add(1, Ordering::AcqRel);
        session.idle_since_ms.store(0, Ordering::Release);
        session
    };
    // A new session of a live source takes its tracker and workload; without precopy the
    // workload stops now (pure postcopy).
    let precopy = hello.page == 0 && hello.wants_precopy();
    let mut live = None;
    if hello.page == 0 && shared.is_live {
        live = shared.live.lock().expect("poisoned").take();
        if live.is_none() {
            let e = SourceError::LiveUsed;
            log(&shared, format_args!("{peer}: {e}"));
            link.send_error(&e.to_string());
            session.fail(e.to_string());
            finish_connection(&shared, &session);
            return;
        }
    }
    let mut stopped_unix_us = 0;
    if !precopy {
        if let Some(l) = live.as_mut() {
            l.workload.stop();
            stopped_unix_us = unix_us();
            session.switched_over.store(true, Ordering::Release);
        }
    }
    let mut out = Vec::with_capacity(64 * 1024);
    Welcome {
        session: session.id,
        layout: shared.image.layout().clone(),
        image: shared.image.info(),
        stopped_unix_us,
    }
    .encode_into(&mut out);
    if hello.wants_zero_map() && hello.page == 0 && !precopy {
        // The zero-page map: the destination places these pages itself, so neither a request
        // nor the stream needs to carry them.
        encode_zero_map(shared.image.as_ref(), &session, &mut out);
    }
    let result = link
        .write_frames(&out)
        .map_err(write_err("send Welcome", peer))
        .and_then(|_| {
            let _ = link.socket().set_read_timeout(None);
            if precopy {
                out.clear();
                run_precopy(&shared, &session, &mut link, peer, live.as_mut())?;
            }
            drop(live.take());
            if hello.wants_resume() {
                session.recoveries.fetch_add(1, Ordering::Relaxed);
                if role == Role::Urgent {
                    session.rejoined.lock().expect("poisoned")[usize::from(worker)] = true;
                }
            }
            match role {
                Role::Urgent => serve_urgent(&shared, &session, &mut link, peer, worker),
                Role::Bulk if hello.wants_resume() => {
                    resume_bulk(&shared, &session, &mut link, peer, worker)?;
                    serve_bulk(&shared, &session, &mut link, peer, worker)
                }
                Role::Bulk => serve_bulk(&shared, &session, &mut link, peer, worker),
                Role::Verify => serve_verify(&shared, &session, &mut link, peer),
            }
        });
    if let Err(e) = result {
        // A broken connection (not a bad frame) is a network fault: the destination reconnects
        // and resumes, so the session waits for it (up to the recovery timeout).
        let broken = matches!(e, SourceError::Io { .. } | SourceError::Incomplete { .. })
            && !shared.config.recovery_timeout.is_zero()
            && !session.finished.load(Ordering::Acquire);
        log(
            &shared,
            format_args!(
                "session {:#x} {peer}: {e}{}",
                session.id,
                if broken {
                    "; waiting for the destination to reconnect"
                } else {
                    ""
                }
            ),
        );
        if let SourceError::Protocol { .. } = e {
            link.send_error(&e.to_string());
        }
        if broken {
            let ms = (session.started.elapsed().as_millis() as u64).max(1);
            session.broken_at_ms.store(ms, Ordering::Release);
        } else if !session.finished.load(Ordering::Acquire) {
            session.fail(e.to_string());
        }
    }
    finish_connection(&shared, &session);
}

/// Counts a connection of `session` closed; ends the session when it was the last one.
fn finish_connection(shared: &Shared, session: &Arc<Session>) {
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

/// Sorts ranges and merges overlapping or adjacent ones.
fn merge_ranges(ranges: &mut Vec<(u64, u64)>) {
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for &(first, n) in ranges.iter() {
        match merged.last_mut() {
            Some(last) if first <= last.0 + last.1 => {
                last.1 = last.1.max(first + n - last.0);
            }
            _ => merged.push((first, n)),
        }
    }
    *ranges = merged;
}

/// Appends `Pages` frames for the ranges of `block` to `out`, writing whenever 1 MiB is queued.
/// Returns the pages sent.
#[allow(clippy::too_many_arguments)]
fn send_ranges(
    shared: &Shared,
    session: &Session,
    link: &mut FramedStream,
    peer: SocketAddr,
    block: u32,
    ranges: &[(u64, u64)],
    scratch: &mut [u8],
    out: &mut Vec<u8>,
) -> Result<u64, SourceError> {
    const CHUNK_PAGES: u64 = 256;
    let page_size = shared.image.layout().blocks[block as usize].page_size;
    let mut sent = 0;
    for &(first, n) in ranges {
        let mut p = first;
        while p < first + n {
            let k = (first + n - p).min(CHUNK_PAGES);
            let (pages, zeros) =
                encode_run(shared.image.as_ref(), block, p, k, page_size, scratch, out);
            session.pages_zero.fetch_add(zeros, Ordering::Relaxed);
            sent += pages;
            p += k;
            if out.len() >= 1 << 20 {
                session.flush(link, out, "send precopy pages", peer)?;
            }
        }
    }
    Ok(sent)
}

/// The precopy phase on worker 0's urgent connection, right after `Welcome`: rounds, then the
/// switchover (stop the workload, discards, `Run`). A static image has no tracker: one full
/// round, then `Run`.
fn run_precopy(
    shared: &Shared,
    session: &Session,
    link: &mut FramedStream,
    peer: SocketAddr,
    mut live: Option<&mut LiveParts>,
) -> Result<(), SourceError> {
    let layout = shared.image.layout();
    let limits = &shared.config.precopy;
    let started = Instant::now();
    let mut scratch = vec![0u8; layout.max_page_size() as usize];
    let mut out: Vec<u8> = Vec::with_capacity((1 << 20) + (256 << 12) + 4096);
    // Tracking starts before the full pass reads anything: a write during the pass is caught.
    if let Some(l) = live.as_mut() {
        for t in l.trackers.iter_mut() {
            t.start()?;
        }
    }
    let mut round_pages = Vec::new();
    let mut total = 0;
    for (b, block) in layout.blocks.iter().enumerate() {
        total += send_ranges(
            shared,
            session,
            link,
            peer,
            b as u32,
            &[(0, block.pages())],
            &mut scratch,
            &mut out,
        )?;
        session.sent[b].set_range(0, block.pages());
    }
    Header::round(1, total).encode_into(&mut out);
    session.flush(link, &mut out, "send precopy round", peer)?;
    round_pages.push(total);
    let mut dirty: Vec<Vec<(u64, u64)>> = vec![Vec::new(); layout.blocks.len()];
    if let Some(l) = live.as_mut() {
        loop {
            for (b, t) in l.trackers.iter_mut().enumerate() {
                t.collect(&mut dirty[b])?;
                merge_ranges(&mut dirty[b]);
            }
            let pages: u64 = dirty.iter().flatten().map(|r| r.1).sum();
            if pages <= limits.max_dirty_pages
                || round_pages.len() >= limits.max_rounds as usize
                || started.elapsed() >= limits.max_duration
            {
                break; // these pages are discarded and fetched in postcopy
            }
            for (b, ranges) in dirty.iter_mut().enumerate() {
                send_ranges(
                    shared,
                    session,
                    link,
                    peer,
                    b as u32,
                    ranges,
                    &mut scratch,
                    &mut out,
                )?;
                ranges.clear();
            }
            round_pages.push(pages);
            Header::round(round_pages.len() as u64, pages).encode_into(&mut out);
            session.flush(link, &mut out, "send precopy round", peer)?;
        }
    }
    // Before stopping the workload, wait until the destination has taken in everything sent
    // (it acknowledges each round): bytes still in socket buffers (tens of MiB on loopback)
    // would otherwise be drained during the downtime. Writes meanwhile land in the final set.
    wait_round_ack(
        link,
        peer,
        round_pages.len() as u64,
        shared.config.write_timeout,
    )?;
    // Switchover: from here the memory no longer changes.
    let mut stopped_unix_us = unix_us();
    if let Some(l) = live.as_mut() {
        l.workload.stop();
        stopped_unix_us = unix_us();
        for (b, t) in l.trackers.iter_mut().enumerate() {
            t.collect(&mut dirty[b])?;
            merge_ranges(&mut dirty[b]);
        }
    }
    session.switched_over.store(true, Ordering::Release);
    let mut dirty_pages = 0;
    let mut discarded = 0;
    for (b, ranges) in dirty.iter().enumerate() {
        let mut tx = DiscardSender::init(b as u32);
        for &(first, n) in ranges {
            // Every page was sent by the full pass: all of these are stale on the destination.
            session.sent[b].clear_range(first, n);
            tx.range(first, n, &mut out);
            dirty_pages += n;
        }
        discarded += tx.finish(&mut out).1;
    }
    {
        let mut stats = session.precopy.lock().expect("poisoned");
        stats.round_pages = round_pages;
        stats.dirty_at_switchover = dirty_pages;
        stats.discarded = discarded;
    }
    Header::run(dirty_pages, stopped_unix_us).encode_into(&mut out);
    session.flush(link, &mut out, "send discards and Run", peer)?;
    // Unregistering write-protection walks the whole range (~25 ms per GiB here): after Run,
    // on a thread of its own at the lowest priority, so neither this connection's first
    // requests (served right after we return) nor, on a shared host, the destination's
    // switchover wait for it. The workload is stopped: nothing writes the memory any more.
    if let Some(l) = live.as_mut() {
        let mut trackers = std::mem::take(&mut l.trackers);
        let id = session.id;
        let verbose = shared.config.verbose;
        // The memory stays mapped until its registration is gone.
        let memory = shared.image.clone();
        let spawned = std::thread::Builder::new()
            .name("src-wp-stop".into())
            .spawn(move || {
                let _memory = memory;
                let _ = crate::sys::set_thread_nice(19);
                for t in trackers.iter_mut() {
                    if let Err(e) = t.stop() {
                        if verbose {
                            eprintln!("postcopy serve: session {id:#x}: stop dirty tracking: {e}");
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            return Err(io_err("spawn the dirty-tracking stop thread")(e));
        }
    }
    Ok(())
}

/// Reads the destination's `Ack`s of precopy rounds until the one for `round`.
fn wait_round_ack(
    link: &mut FramedStream,
    peer: SocketAddr,
    round: u64,
    timeout: Duration,
) -> Result<(), SourceError> {
    let _ = link.socket().set_read_timeout(Some(timeout));
    loop {
        match read_frame(link, peer)? {
            Some(h) if h.kind == Kind::Ack && h.page == round => break,
            Some(h) if h.kind == Kind::Ack && h.page < round => {}
            Some(h) => {
                return Err(SourceError::Protocol {
                    peer,
                    source: CodecError::Unexpected {
                        got: h.kind,
                        expected: "Ack of a precopy round",
                    },
                })
            }
            None => {
                return Err(SourceError::Io {
                    context: format!("wait for the precopy Ack from {peer}"),
                    source: std::io::ErrorKind::UnexpectedEof.into(),
                })
            }
        }
    }
    let _ = link.socket().set_read_timeout(None);
    Ok(())
}

/// A verify connection: after `Run` from the destination (sent once its migration is done),
/// the checksum of every page as it was at switchover, then `End`.
fn serve_verify(
    shared: &Shared,
    session: &Session,
    link: &mut FramedStream,
    peer: SocketAddr,
) -> Result<(), SourceError> {
    match read_frame(link, peer)? {
        Some(h) if h.kind == Kind::Run => {}
        None => return Ok(()),
        Some(h) => {
            return Err(SourceError::Protocol {
                peer,
                source: CodecError::Unexpected {
                    got: h.kind,
                    expected: "Run (start of verification)",
                },
            })
        }
    }
    if !session.switched_over.load(Ordering::Acquire) {
        return Err(SourceError::Protocol {
            peer,
            source: CodecError::BadBody {
                kind: Kind::Run,
                detail: "verification asked before the switchover: the memory still changes".into(),
            },
        });
    }
    let layout = shared.image.layout();
    let mut scratch = vec![0u8; layout.max_page_size() as usize];
    let mut out = Vec::with_capacity((codec::MAX_CHECKSUMS as usize) * 8 + 64);
    for (b, block) in layout.blocks.iter().enumerate() {
        let zero = page_checksum(&vec![0u8; block.page_size as usize]);
        let mut first = 0;
        while first < block.pages() {
            let n = (block.pages() - first).min(codec::MAX_CHECKSUMS);
            Header::checksums(b as u32, first, n).encode_into(&mut out);
            for p in first..first + n {
                let sum = match shared.image.page(b as u32, p, &mut scratch) {
                    PageData::Zero => zero,
                    PageData::Data(d) => page_checksum(d),
                };
                out.extend_from_slice(&sum.to_le_bytes());
            }
            session.flush(link, &mut out, "send checksums", peer)?;
            first += n;
        }
    }
    Header::control(Kind::End, layout.total_pages()).encode_into(&mut out);
    session.flush(link, &mut out, "send checksums", peer)?;
    let mut sink = [0u8; 64];
    let _ = link.socket().read(&mut sink);
    Ok(())
}

fn record_end(shared: &Shared, session: &Session) {
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
fn reap_idle(shared: &Shared) {
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

/// Appends `ZeroMap` frames for every block, then `Run`, and marks the zero pages sent.
fn encode_zero_map(image: &dyn Image, session: &Session, out: &mut Vec<u8>) {
    let per_frame = u64::from(codec::MAX_ZERO_MAP_BYTES) * 8;
    let mut scratch = vec![0u8; image.layout().max_page_size() as usize];
    for (b, block) in image.layout().blocks.iter().enumerate() {
        let mut first = 0;
        while first < block.pages() {
            let pages = (block.pages() - first).min(per_frame);
            Header::zero_map(b as u32, first, pages).encode_into(out);
            codec::encode_page_bits(
                pages,
                |i| {
                    let zero = image.is_zero(b as u32, first + i, &mut scratch);
                    if zero {
                        session.sent[b].set(first + i);
                    }
                    zero
                },
                out,
            );
            first += pages;
        }
    }
    Header::control(Kind::Run, 0).encode_into(out);
}

/// Appends `Pages` frames for `[page, page + count)` of `block` to `out`, marking them sent.
/// Returns (pages, zero pages).
fn encode_run(
    image: &dyn Image,
    block: u32,
    page: u64,
    count: u64,
    page_size: u64,
    scratch: &mut [u8],
    out: &mut Vec<u8>,
) -> (u64, u64) {
    let max = u64::from(max_batch_pages(page_size));
    let mut zeros = 0;
    let mut p = page;
    let end = page + count;
    while p < end {
        let n = (end - p).min(max);
        let header_at = out.len();
        out.extend_from_slice(&[0u8; HEADER_BYTES]);
        let mut mask = 0u64;
        for i in 0..n {
            match image.page(block, p + i, scratch) {
                PageData::Zero => mask |= 1 << i,
                PageData::Data(bytes) => out.extend_from_slice(bytes),
            }
        }
        zeros += u64::from(mask.count_ones());
        let mut h = [0u8; HEADER_BYTES];
        Header::pages(block, p, n as u16, mask, page_size).encode(&mut h);
        out[header_at..header_at + HEADER_BYTES].copy_from_slice(&h);
        p += n;
    }
    (count, zeros)
}

fn serve_urgent(
    shared: &Shared,
    session: &Session,
    link: &mut FramedStream,
    peer: SocketAddr,
    worker: u16,
) -> Result<(), SourceError> {
    // Replies to faults run ahead of the stream: raise this thread's priority where permitted
    // (root or CAP_SYS_NICE); best effort otherwise.
    let _ = crate::sys::set_thread_nice(-10);
    let layout = shared.image.layout();
    let max_page = layout.max_page_size() as usize;
    let mut scratch = vec![0u8; max_page];
    let mut out: Vec<u8> = Vec::with_capacity(1 << 20);
    // Requests are small frames, often several per fault: read ahead of them.
    link.buffer_reads(64 * 1024);
    let mut prefetch = Prefetch::new(shared.config.prefetch_max);
    loop {
        let Some(h) = read_frame(link, peer)? else {
            return Err(SourceError::Incomplete {
                session: session.id,
                reason: format!("worker {worker}'s urgent connection closed without End"),
            });
        };
        match h.kind {
            Kind::Request => {
                let block = h
                    .check(layout)
                    .map_err(|source| SourceError::Protocol { peer, source })?;
                if !session.switched_over.load(Ordering::Acquire) {
                    // The memory still changes: nothing may be served outside precopy yet.
                    return Err(SourceError::Protocol {
                        peer,
                        source: CodecError::Unexpected {
                            got: h.kind,
                            expected: "nothing before the switchover (precopy runs)",
                        },
                    });
                }
                session.requests.fetch_add(1, Ordering::Relaxed);
                if !shared.config.urgent_delay.is_zero() {
                    std::thread::sleep(shared.config.urgent_delay);
                }
                let count = u64::from(h.count);
                let sent = &session.sent[h.block as usize];
                sent.set_range(h.page, count);
                // Prefetch: a fault right where the last reply ended means a sequential
                // reader; send the next unsent pages of its shard with the reply, doubling
                // the window while the pattern holds and dropping it when it breaks.
                let (_, shard_end) = crate::layout::shard(
                    block.pages(),
                    usize::from(worker),
                    usize::from(session.workers),
                );
                let window = prefetch.window(h.block, h.page);
                let end = (h.page + count).min(shard_end);
                let mut extra = 0;
                while extra < window && end + extra < shard_end && sent.set(end + extra) {
                    extra += 1;
                }
                prefetch.replied_up_to(h.block, end + extra);
                // The requested pages go first, in frames of their own, so the faulting
                // thread is woken before the prefetched pages are placed.
                let (mut pages, mut zeros) = encode_run(
                    shared.image.as_ref(),
                    h.block,
                    h.page,
                    count,
                    block.page_size,
                    &mut scratch,
                    &mut out,
                );
                if extra > 0 {
                    let (p, z) = encode_run(
                        shared.image.as_ref(),
                        h.block,
                        (h.page + count).min(shard_end),
                        extra,
                        block.page_size,
                        &mut scratch,
                        &mut out,
                    );
                    pages += p;
                    zeros += z;
                }
                session.pages_urgent.fetch_add(pages, Ordering::Relaxed);
                session.pages_prefetched.fetch_add(extra, Ordering::Relaxed);
                session.pages_zero.fetch_add(zeros, Ordering::Relaxed);
            }
            Kind::End => {
                let first_end = {
                    let mut ended = session.ended.lock().expect("poisoned");
                    let slot = &mut ended[usize::from(worker)];
                    !std::mem::replace(slot, true)
                };
                if first_end {
                    session.ends_seen.fetch_add(1, Ordering::AcqRel);
                }
                Header::control(Kind::Ack, h.page).encode_into(&mut out);
                session.flush(link, &mut out, "send Ack", peer)?;
                if session.all_ended() {
                    session.finished.store(true, Ordering::Release);
                }
                return Ok(());
            }
            other => {
                return Err(SourceError::Protocol {
                    peer,
                    source: CodecError::Unexpected {
                        got: other,
                        expected: "Request or End",
                    },
                })
            }
        }
        // Answer everything that arrived together in one write; never sit on a reply.
        if link.buffered_bytes() == 0 || out.len() >= (1 << 20) {
            session.flush(link, &mut out, "send pages", peer)?;
        }
    }
}

/// A bulk connection rejoining after a break: the destination's `Have` frames say which pages
/// of this worker's shard it has; the others are marked unsent so the stream sends them again
/// (they may have been lost in flight with the old connection).
fn resume_bulk(
    shared: &Shared,
    session: &Session,
    link: &mut FramedStream,
    peer: SocketAddr,
    worker: u16,
) -> Result<(), SourceError> {
    // The broken connection's streamer stops claiming pages now.
    session.bulk_gen[usize::from(worker)].fetch_add(1, Ordering::AcqRel);
    let layout = shared.image.layout();
    let protocol = |source| SourceError::Protocol { peer, source };
    loop {
        let Some(h) = read_frame(link, peer)? else {
            return Err(SourceError::Incomplete {
                session: session.id,
                reason: format!("worker {worker}'s resumed bulk connection closed"),
            });
        };
        match h.kind {
            Kind::Run => return Ok(()),
            Kind::Have => {
                h.check_zero_map(layout).map_err(protocol)?;
                let (start, end) = crate::layout::shard(
                    layout.blocks[h.block as usize].pages(),
                    usize::from(worker),
                    usize::from(session.workers),
                );
                if h.page < start || h.page + h.mask > end {
                    return Err(protocol(CodecError::Range(
                        crate::layout::LayoutError::OutOfRange {
                            block: h.block,
                            page: h.page,
                            count: h.mask,
                            detail: format!("worker {worker}'s shard is pages [{start}, {end})"),
                        },
                    )));
                }
                let sent = &session.sent[h.block as usize];
                let mut resent = 0;
                for i in 0..h.mask {
                    if codec::page_bit(link.body(), i) {
                        sent.set(h.page + i);
                    } else if sent.clear(h.page + i) {
                        resent += 1;
                    }
                }
                session.pages_resent.fetch_add(resent, Ordering::Relaxed);
            }
            other => {
                return Err(protocol(CodecError::Unexpected {
                    got: other,
                    expected: "Have or Run (a resumed stream)",
                }))
            }
        }
    }
}

fn serve_bulk(
    shared: &Shared,
    session: &Session,
    link: &mut FramedStream,
    peer: SocketAddr,
    worker: u16,
) -> Result<(), SourceError> {
    // The stream yields the CPU to urgent replies (best effort).
    let _ = crate::sys::set_thread_nice(19);
    // A destination connects its streams during precopy; they start at the switchover (a page
    // streamed earlier could be dirtied after it was sent and arrive stale).
    while !session.switched_over.load(Ordering::Acquire) {
        if session.finished.load(Ordering::Acquire) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let gen = &session.bulk_gen[usize::from(worker)];
    let my_gen = gen.fetch_add(1, Ordering::AcqRel) + 1;
    let layout = shared.image.layout();
    let max_page = layout.max_page_size() as usize;
    let mut scratch = vec![0u8; max_page];
    const FLUSH_BYTES: usize = 1 << 20;
    let mut out: Vec<u8> = Vec::with_capacity(FLUSH_BYTES + 64 * 4096 + 4096);
    let mut streamed = 0u64;
    for (b, block) in layout.blocks.iter().enumerate() {
        let (start, end) = crate::layout::shard(
            block.pages(),
            usize::from(worker),
            usize::from(session.workers),
        );
        let sent = &session.sent[b];
        let max = u64::from(max_batch_pages(block.page_size));
        let mut p = start;
        while p < end {
            if session.finished.load(Ordering::Acquire) {
                // Every worker confirmed all its pages (by faults and this stream): end the
                // stream cleanly rather than cut it; the destination may already have closed.
                // (A failed session's stream is just closed: its error went on another link.)
                if session.failed.lock().expect("poisoned").is_none() {
                    Header::control(Kind::End, streamed).encode_into(&mut out);
                    let _ = session.flush(link, &mut out, "stream pages", peer);
                }
                return Ok(());
            }
            if gen.load(Ordering::Acquire) != my_gen {
                // Superseded by a resumed stream: what this one claimed and did not deliver is
                // what the destination will not have (and asks for).
                return Ok(());
            }
            let Some(first) = sent.next_clear(p, end) else {
                break;
            };
            // Claim a run of unsent pages, one bit at a time (a request may claim some first).
            let mut n = 0;
            while first + n < end && n < max && sent.set(first + n) {
                n += 1;
            }
            if n == 0 {
                p = first + 1;
                continue;
            }
            let (pages_done, zeros) = encode_run(
                shared.image.as_ref(),
                b as u32,
                first,
                n,
                block.page_size,
                &mut scratch,
                &mut out,
            );
            streamed += pages_done;
            session
                .pages_stream
                .fetch_add(pages_done, Ordering::Relaxed);
            session.pages_zero.fetch_add(zeros, Ordering::Relaxed);
            p = first + n;
            if out.len() >= FLUSH_BYTES {
                session.flush(link, &mut out, "stream pages", peer)?;
            }
        }
    }
    Header::control(Kind::End, streamed).encode_into(&mut out);
    session.flush(link, &mut out, "stream pages", peer)?;
    // Hold the connection until the destination closes it (it may still be placing pages).
    let mut sink = [0u8; 64];
    let _ = link.socket().read(&mut sink);
    Ok(())
}
