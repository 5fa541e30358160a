//! `chaos-proxy`: a TCP proxy that injects faults into the connections it forwards.
//!
//! A client (the migration destination) connects to the proxy instead of the server (the source);
//! for every accepted connection the proxy connects to the current upstream address and forwards
//! bytes both ways, one thread per direction (blocking I/O, 64 KiB buffers, `TCP_NODELAY` on both
//! sockets). A [`Plan`] says what to do to each connection:
//!
//! - [`Fault::CutAt`]: after forwarding exactly `offset_bytes` bytes in one direction, cut the
//!   connection (see [cuts](#cuts));
//! - [`Fault::Delay`]: sleep before forwarding each chunk read in one direction;
//! - [`Fault::StallAt`]: at a byte offset, stop forwarding in one direction for a while, then go on;
//! - [`Fault::FlipAt`]: flip the byte at an offset in one direction (a corrupted frame);
//! - [`RandomCuts`]: a number of cuts at seeded pseudo-random offsets across the run;
//! - [`RandomVictims`]: seeded blows (reset, FIN, silence) to connections picked at random among
//!   all live ones, at seeded points of the total traffic ([`victims`]);
//! - [`Proxy::silence_all`]: the whole link goes silent for a while (no byte forwarded on any
//!   connection, new ones included), as when every packet is dropped.
//!
//! Connections are numbered from 0 in the order in which their upstream connect succeeded (an
//! accepted connection whose upstream connect fails gets no number and is just closed).
//!
//! # Cuts
//!
//! A cut stops forwarding in both directions at once; the bytes forwarded before it are delivered
//! (in the cut direction exactly `offset_bytes`; a cut at offset 0 falls before any byte in
//! either direction, as the connection is accepted). Then, by default, both sockets are shut down for
//! writing, so both peers read the remaining data and then EOF; whatever they still send is read and
//! discarded until they close, or for at most [`Plan::linger`], after which both sockets are shut down
//! completely and closed (a peer still writing then gets `EPIPE`/`ECONNRESET`). With
//! [`Plan::reset`] the proxy instead waits (at most [`Plan::linger`]) until the peers have
//! acknowledged all forwarded bytes and then closes both sockets with `SO_LINGER` 0, so both peers
//! read the remaining data and then get `ECONNRESET` (Linux x86_64/aarch64; elsewhere `reset` acts
//! like the default). If a peer has not acknowledged everything by the linger deadline (it is not
//! reading), the proxy shuts both sockets down and then resets them: that peer may see EOF first,
//! and the bytes it has not acknowledged are lost.
//!
//! [`Proxy::stop`] (also on drop) closes everything at once, without linger, and joins every
//! thread.
//!
//! Every cut is recorded in [`Stats::cuts`] (connection, cause, direction, offset).
//!
//! ```no_run
//! use chaos_proxy::{Dir, Fault, Plan, Proxy};
//! # fn main() -> std::io::Result<()> {
//! # let source: std::net::SocketAddr = "127.0.0.1:4000".parse().unwrap();
//! // The first connection is cut after 1 MiB towards the client; later ones are left alone.
//! let plan = Plan::per_connection(vec![vec![Fault::CutAt { direction: Dir::ToClient, offset_bytes: 1 << 20 }]]);
//! let proxy = Proxy::start(source, plan)?;
//! let addr = proxy.local_addr(); // give this to the destination instead of `source`
//! # let _ = addr;
//! assert!(proxy.wait_for_cuts(1, std::time::Duration::from_secs(10)));
//! # Ok(()) }
//! ```

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

pub mod victims;
pub use victims::{Blow, BlowEvent, RandomVictims};

/// Size of each forwarding thread's buffer.
pub const BUF_SIZE: usize = 64 * 1024;

/// How long the proxy tries to connect to the upstream for each accepted connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Default [`Plan::linger`].
pub const DEFAULT_LINGER: Duration = Duration::from_secs(1);

/// A direction of forwarding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dir {
    /// Bytes the client sends to the upstream server.
    ToServer,
    /// Bytes the upstream server sends to the client.
    ToClient,
}

impl Dir {
    /// `to-server` or `to-client` (the CLI spelling).
    pub fn name(self) -> &'static str {
        match self {
            Dir::ToServer => "to-server",
            Dir::ToClient => "to-client",
        }
    }

    fn idx(self) -> usize {
        match self {
            Dir::ToServer => 0,
            Dir::ToClient => 1,
        }
    }
}

impl fmt::Display for Dir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Dir {
    type Err = String;

    /// Parses `to-server` or `to-client`.
    fn from_str(s: &str) -> Result<Dir, String> {
        match s {
            "to-server" => Ok(Dir::ToServer),
            "to-client" => Ok(Dir::ToClient),
            _ => Err(format!(
                "direction must be to-server or to-client, not {s:?}"
            )),
        }
    }
}

/// A fault applied to one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// After forwarding exactly `offset_bytes` bytes in `direction`, cut the connection
    /// (`offset_bytes` 0: as soon as it is established). The first cut reached wins.
    CutAt {
        /// The direction whose byte count triggers the cut.
        direction: Dir,
        /// Bytes forwarded in `direction` before the cut.
        offset_bytes: u64,
    },
    /// Sleep `micros` before forwarding each chunk read in `direction` (several add up).
    Delay {
        /// The delayed direction.
        direction: Dir,
        /// Delay per chunk (one `read` of at most [`BUF_SIZE`] bytes).
        micros: u64,
    },
    /// Flips (XORs with 0xff) the byte at `offset_bytes` in `direction` (bytes before it are
    /// forwarded as they are): a corrupted frame, for peers that must detect it.
    FlipAt {
        /// The corrupted direction.
        direction: Dir,
        /// Offset of the flipped byte.
        offset_bytes: u64,
    },
    /// After forwarding exactly `offset_bytes` bytes in `direction`, forward nothing more in that
    /// direction for `millis`, then continue (a cut or [`Proxy::stop`] ends the stall early).
    StallAt {
        /// The stalled direction.
        direction: Dir,
        /// Bytes forwarded in `direction` before the stall.
        offset_bytes: u64,
        /// Length of the stall.
        millis: u64,
    },
}

/// Seeded pseudo-random cuts across a run.
///
/// Connection `i` is given one cut, at [`RandomCuts::draw`]`(i)` (a direction and an offset
/// between `min_offset` and `max_offset` inclusive, a pure function of `seed` and `i`), if fewer
/// than `cuts` random cuts have been made when it is established. The cut happens when that
/// connection has forwarded that many bytes in that direction, unless `cuts` random cuts were made
/// in the meantime (so there are never more than `cuts`); a connection that ends before reaching
/// its offset makes no cut. With one connection at a time, each carrying more than `max_offset`
/// bytes in both directions, connections `0..cuts` are cut, at their drawn offsets, and later ones
/// are left alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RandomCuts {
    /// Seed of the draws.
    pub seed: u64,
    /// Number of cuts to make in total.
    pub cuts: usize,
    /// Smallest offset drawn.
    pub min_offset: u64,
    /// Largest offset drawn.
    pub max_offset: u64,
    /// Direction of every cut; `None`: drawn per connection.
    pub direction: Option<Dir>,
}

impl RandomCuts {
    /// The direction and offset drawn for connection `conn`.
    pub fn draw(&self, conn: usize) -> (Dir, u64) {
        let mut state = self.seed ^ (conn as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
        let a = splitmix64(&mut state);
        let b = splitmix64(&mut state);
        let dir = self.direction.unwrap_or(if b & 1 == 0 {
            Dir::ToServer
        } else {
            Dir::ToClient
        });
        let (lo, hi) = (
            self.min_offset.min(self.max_offset),
            self.max_offset.max(self.min_offset),
        );
        let offset = match (hi - lo).checked_add(1) {
            Some(span) => lo + a % span,
            None => a,
        };
        (dir, offset)
    }
}

/// The SplitMix64 generator step.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What to do to the connections. Combine the parts with struct update syntax:
/// `Plan { reset: true, ..Plan::per_connection(faults) }`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The `i`-th list applies to connection `i`; later connections get none.
    pub per_connection: Vec<Vec<Fault>>,
    /// Applies to every connection (in addition to `per_connection`).
    pub every_connection: Vec<Fault>,
    /// Seeded random cuts.
    pub random_cuts: Option<RandomCuts>,
    /// Seeded blows to random live connections.
    pub victims: Option<RandomVictims>,
    /// Cut with `ECONNRESET` (`SO_LINGER` 0) instead of EOF; see [cuts](crate#cuts).
    pub reset: bool,
    /// The longest a cut connection is kept open so the peers can read what was forwarded before
    /// the cut (and, with `reset`, acknowledge it); [`DEFAULT_LINGER`].
    pub linger: Duration,
    /// Log connections and cuts to stderr.
    pub log: bool,
}

impl Default for Plan {
    fn default() -> Plan {
        Plan::none()
    }
}

impl Plan {
    /// Forward everything untouched.
    pub fn none() -> Plan {
        Plan {
            per_connection: Vec::new(),
            every_connection: Vec::new(),
            random_cuts: None,
            victims: None,
            reset: false,
            linger: DEFAULT_LINGER,
            log: false,
        }
    }

    /// Connection `i` gets `faults[i]`; later connections get none.
    pub fn per_connection(faults: Vec<Vec<Fault>>) -> Plan {
        Plan {
            per_connection: faults,
            ..Plan::none()
        }
    }

    /// Every connection gets `faults`.
    pub fn every_connection(faults: Vec<Fault>) -> Plan {
        Plan {
            every_connection: faults,
            ..Plan::none()
        }
    }

    /// Seeded random cuts (see [`RandomCuts`]).
    pub fn random_cuts(random: RandomCuts) -> Plan {
        Plan {
            random_cuts: Some(random),
            ..Plan::none()
        }
    }
}

/// Why a connection was cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CutCause {
    /// A [`Fault::CutAt`].
    Planned,
    /// One of the [`RandomCuts`].
    Random,
    /// [`Proxy::cut_all`].
    CutAll,
    /// One of the [`RandomVictims`].
    Victim,
}

impl fmt::Display for CutCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CutCause::Planned => "planned",
            CutCause::Random => "random",
            CutCause::CutAll => "cut-all",
            CutCause::Victim => "victim",
        })
    }
}

/// One cut.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CutEvent {
    /// The connection's number (0 for the first established).
    pub conn: usize,
    /// Why.
    pub cause: CutCause,
    /// The direction whose offset triggered the cut (`None` for [`CutCause::CutAll`]).
    pub direction: Option<Dir>,
    /// Bytes forwarded in `direction` before the cut (0 without a direction).
    pub offset: u64,
    /// Bytes forwarded to the server on this connection before the cut.
    pub to_server: u64,
    /// Bytes forwarded to the client on this connection before the cut.
    pub to_client: u64,
    /// Time since the proxy started.
    pub elapsed: Duration,
}

impl fmt::Display for CutEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "conn {} cut ({})", self.conn, self.cause)?;
        if let Some(dir) = self.direction {
            write!(f, " {dir} at offset {}", self.offset)?;
        }
        write!(
            f,
            "; forwarded {} B to-server, {} B to-client",
            self.to_server, self.to_client
        )
    }
}

/// A snapshot of the proxy's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Client connections accepted.
    pub accepted: u64,
    /// Connections established (upstream connect succeeded); the next connection's number.
    pub connected: u64,
    /// Accepted connections closed because the upstream connect failed.
    pub upstream_failures: u64,
    /// Established connections not yet finished in both directions.
    pub open: u64,
    /// Bytes forwarded to the server, all connections.
    pub bytes_to_server: u64,
    /// Bytes forwarded to the client, all connections.
    pub bytes_to_client: u64,
    /// Every cut, in order.
    pub cuts: Vec<CutEvent>,
    /// Every blow of the [`RandomVictims`], in order (their cuts are in `cuts` too).
    pub blows: Vec<BlowEvent>,
    /// Silences of the whole link ([`Proxy::silence_all`]), in order: when, and how long.
    pub link_silences: Vec<(Duration, Duration)>,
    /// Every finished connection, in the order they finished.
    pub finished: Vec<FinishedConn>,
}

/// What one connection forwarded, once it finished in both directions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FinishedConn {
    /// The connection's number (0 for the first established).
    pub conn: usize,
    /// Bytes forwarded to the server.
    pub to_server: u64,
    /// Bytes forwarded to the client.
    pub to_client: u64,
}

/// The proxy: listens, and forwards every accepted connection on background threads until
/// [`Proxy::stop`] or drop.
pub struct Proxy {
    shared: Arc<Shared>,
    local: SocketAddr,
    acceptor: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proxy")
            .field("local", &self.local)
            .field("upstream", &self.upstream())
            .finish()
    }
}

impl Proxy {
    /// Listens on 127.0.0.1 (a free port) and forwards to `upstream`.
    pub fn start(upstream: SocketAddr, plan: Plan) -> io::Result<Proxy> {
        Proxy::start_on(
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0),
            upstream,
            plan,
        )
    }

    /// Listens on `listen` and forwards to `upstream`.
    pub fn start_on(listen: SocketAddr, upstream: SocketAddr, plan: Plan) -> io::Result<Proxy> {
        let listener = TcpListener::bind(listen)?;
        let local = listener.local_addr()?;
        let shared = Arc::new(Shared {
            plan,
            upstream: Mutex::new(upstream),
            started: Instant::now(),
            stopping: AtomicBool::new(false),
            stats: Mutex::new(Stats::default()),
            stats_cond: Condvar::new(),
            bytes: [AtomicU64::new(0), AtomicU64::new(0)],
            random_made: AtomicUsize::new(0),
            silent_until_ns: AtomicU64::new(0),
            next_blow_at: AtomicU64::new(u64::MAX),
            victims: Mutex::new(None),
            conns: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
        });
        if let Some(v) = &shared.plan.victims {
            let (state, first) = v.start();
            *lock(&shared.victims) = Some(state);
            shared.next_blow_at.store(first, Ordering::Release);
        }
        let s = shared.clone();
        let acceptor = thread::Builder::new()
            .name("chaos-accept".into())
            .spawn(move || accept_loop(&s, listener))?;
        shared.log(format_args!("listening on {local}, upstream {upstream}"));
        Ok(Proxy {
            shared,
            local,
            acceptor: Mutex::new(Some(acceptor)),
        })
    }

    /// The address the proxy listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The current upstream address.
    pub fn upstream(&self) -> SocketAddr {
        *lock(&self.shared.upstream)
    }

    /// Connects later connections to `addr` (say, a source restarted on another port); open
    /// connections are not touched.
    pub fn set_upstream(&self, addr: SocketAddr) {
        *lock(&self.shared.upstream) = addr;
        self.shared.log(format_args!("upstream now {addr}"));
    }

    /// A snapshot of the counters and the cuts so far.
    pub fn stats(&self) -> Stats {
        let mut stats = lock(&self.shared.stats).clone();
        stats.bytes_to_server = self.shared.bytes[Dir::ToServer.idx()].load(Ordering::Relaxed);
        stats.bytes_to_client = self.shared.bytes[Dir::ToClient.idx()].load(Ordering::Relaxed);
        stats
    }

    /// Waits until at least `n` cuts were made, at most `timeout`; whether they were.
    pub fn wait_for_cuts(&self, n: usize, timeout: Duration) -> bool {
        let stats = lock(&self.shared.stats);
        let (stats, _) = self
            .shared
            .stats_cond
            .wait_timeout_while(stats, timeout, |s| s.cuts.len() < n)
            .unwrap_or_else(|e| e.into_inner());
        stats.cuts.len() >= n
    }

    /// Cuts every open connection now (cause [`CutCause::CutAll`]); returns how many.
    pub fn cut_all(&self) -> usize {
        let conns = self.shared.live_conns();
        conns
            .iter()
            .filter(|c| c.cut(&self.shared, CutCause::CutAll, None))
            .count()
    }

    /// Forwards nothing on any connection, open or opened meanwhile, for `duration` (from now):
    /// the link goes silent both ways while every TCP connection stays up.
    pub fn silence_all(&self, duration: Duration) {
        let until = self.shared.started.elapsed() + duration;
        self.shared
            .silent_until_ns
            .fetch_max(until.as_nanos() as u64, Ordering::AcqRel);
        lock(&self.shared.stats)
            .link_silences
            .push((self.shared.started.elapsed(), duration));
        self.shared.log(format_args!(
            "the link is silent for {} ms",
            duration.as_millis()
        ));
    }

    /// Waits until at least `bytes` were forwarded in total (both directions), at most
    /// `timeout`; whether they were.
    pub fn wait_for_bytes(&self, bytes: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let total = self.shared.total_bytes();
            if total >= bytes {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Stops accepting, closes every connection at once (no linger) and joins all threads.
    /// Idempotent; also done on drop. Bounded by [`CONNECT_TIMEOUT`] (an upstream connect in
    /// progress).
    pub fn stop(&self) {
        if self.shared.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        // Wake the blocking accept with a connection of our own.
        let mut wake = self.local;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake.ip() {
                IpAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
                IpAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
            });
        }
        let waker = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        if let Some(acceptor) = lock(&self.acceptor).take() {
            let _ = acceptor.join();
        }
        drop(waker);
        for conn in self.shared.live_conns() {
            conn.close_now();
        }
        loop {
            let threads: Vec<_> = lock(&self.shared.threads).drain(..).collect();
            if threads.is_empty() {
                break;
            }
            for t in threads {
                let _ = t.join();
            }
        }
        self.shared.log(format_args!("stopped"));
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Shared {
    plan: Plan,
    upstream: Mutex<SocketAddr>,
    started: Instant,
    stopping: AtomicBool,
    /// Everything but the byte counters.
    stats: Mutex<Stats>,
    /// Notified on every cut.
    stats_cond: Condvar,
    bytes: [AtomicU64; 2],
    random_made: AtomicUsize,
    /// No connection forwards before this (ns since `started`): [`Proxy::silence_all`].
    silent_until_ns: AtomicU64,
    /// The total byte count at which the next victim's blow falls (`u64::MAX`: none).
    next_blow_at: AtomicU64,
    victims: Mutex<Option<victims::VictimState>>,
    conns: Mutex<Vec<Weak<Conn>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn log(&self, msg: fmt::Arguments<'_>) {
        if self.plan.log {
            eprintln!(
                "chaos-proxy [{:9.3}s] {msg}",
                self.started.elapsed().as_secs_f64()
            );
        }
    }

    fn spawn(&self, name: String, f: impl FnOnce() + Send + 'static) -> io::Result<()> {
        let handle = thread::Builder::new().name(name).spawn(f)?;
        let mut threads = lock(&self.threads);
        threads.retain(|t| !t.is_finished());
        threads.push(handle);
        Ok(())
    }

    fn total_bytes(&self) -> u64 {
        self.bytes[0].load(Ordering::Relaxed) + self.bytes[1].load(Ordering::Relaxed)
    }

    /// How long the whole link is still silent.
    fn link_silence_left(&self) -> Option<Duration> {
        let until = Duration::from_nanos(self.silent_until_ns.load(Ordering::Acquire));
        until
            .checked_sub(self.started.elapsed())
            .filter(|d| !d.is_zero())
    }

    fn live_conns(&self) -> Vec<Arc<Conn>> {
        lock(&self.conns).iter().filter_map(Weak::upgrade).collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What one direction of one connection does, by offset.
#[derive(Default)]
struct DirPlan {
    delay: Duration,
    /// Sorted by offset; at equal offsets stalls come before cuts.
    events: Vec<Event>,
}

#[derive(Clone, Copy)]
struct Event {
    offset: u64,
    kind: EventKind,
}

#[derive(Clone, Copy)]
enum EventKind {
    Stall(Duration),
    Cut(CutCause),
    Flip,
}

fn dir_plans(shared: &Shared, index: usize) -> [DirPlan; 2] {
    let plan = &shared.plan;
    let mut dirs = [DirPlan::default(), DirPlan::default()];
    let faults = plan
        .per_connection
        .get(index)
        .into_iter()
        .flatten()
        .chain(&plan.every_connection);
    for fault in faults {
        match *fault {
            Fault::CutAt {
                direction,
                offset_bytes,
            } => dirs[direction.idx()].events.push(Event {
                offset: offset_bytes,
                kind: EventKind::Cut(CutCause::Planned),
            }),
            Fault::Delay { direction, micros } => {
                dirs[direction.idx()].delay += Duration::from_micros(micros);
            }
            Fault::FlipAt {
                direction,
                offset_bytes,
            } => dirs[direction.idx()].events.push(Event {
                offset: offset_bytes,
                kind: EventKind::Flip,
            }),
            Fault::StallAt {
                direction,
                offset_bytes,
                millis,
            } => dirs[direction.idx()].events.push(Event {
                offset: offset_bytes,
                kind: EventKind::Stall(Duration::from_millis(millis)),
            }),
        }
    }
    if let Some(random) = &plan.random_cuts {
        if shared.random_made.load(Ordering::SeqCst) < random.cuts {
            let (dir, offset) = random.draw(index);
            dirs[dir.idx()].events.push(Event {
                offset,
                kind: EventKind::Cut(CutCause::Random),
            });
        }
    }
    for d in &mut dirs {
        d.events
            .sort_by_key(|e| (e.offset, matches!(e.kind, EventKind::Cut(_))));
    }
    dirs
}

fn accept_loop(shared: &Arc<Shared>, listener: TcpListener) {
    loop {
        let accepted = listener.accept();
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let (client, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                shared.log(format_args!("accept: {e}"));
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        lock(&shared.stats).accepted += 1;
        let upstream = *lock(&shared.upstream);
        let server = match TcpStream::connect_timeout(&upstream, CONNECT_TIMEOUT) {
            Ok(s) => s,
            Err(e) => {
                lock(&shared.stats).upstream_failures += 1;
                shared.log(format_args!(
                    "connection from {peer}: upstream {upstream}: {e}; closed"
                ));
                continue;
            }
        };
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let index = {
            let mut stats = lock(&shared.stats);
            stats.connected += 1;
            stats.open += 1;
            (stats.connected - 1) as usize
        };
        let [to_server, to_client] = dir_plans(shared, index);
        let conn = Arc::new(Conn {
            index,
            client,
            server,
            bytes: [AtomicU64::new(0), AtomicU64::new(0)],
            cut: AtomicBool::new(false),
            halted: AtomicBool::new(false),
            silent_until_ns: AtomicU64::new(0),
            state: Mutex::new(ConnState {
                cut: false,
                closing: false,
                forwarders: 2,
            }),
            cond: Condvar::new(),
        });
        {
            let mut conns = lock(&shared.conns);
            conns.retain(|c| c.strong_count() > 0);
            conns.push(Arc::downgrade(&conn));
        }
        shared.log(format_args!("conn {index}: {peer} -> {upstream}"));
        // A cut at offset 0 falls before any byte in either direction: made here, before a
        // forwarder could pass on what the other side sends first.
        for (dir, plan) in [(Dir::ToServer, &to_server), (Dir::ToClient, &to_client)] {
            if let Some(&Event {
                offset: 0,
                kind: EventKind::Cut(cause),
            }) = plan.events.first()
            {
                conn.cut(shared, cause, Some(dir));
            }
        }
        for (dir, plan) in [(Dir::ToServer, to_server), (Dir::ToClient, to_client)] {
            let (s, c) = (shared.clone(), conn.clone());
            let spawned = shared.spawn(format!("chaos-{index}-{dir}"), move || {
                forward(&s, &c, dir, &plan)
            });
            if let Err(e) = spawned {
                shared.log(format_args!("conn {index}: cannot spawn a thread: {e}"));
                conn.close_now();
                conn.forwarder_done(shared);
            }
        }
    }
}

struct Conn {
    index: usize,
    client: TcpStream,
    server: TcpStream,
    /// Bytes forwarded, by [`Dir::idx`].
    bytes: [AtomicU64; 2],
    /// Mirror of `state.cut`, for the forwarders' fast path.
    cut: AtomicBool,
    /// Set with `state.cut` or `state.closing`: forward nothing more.
    halted: AtomicBool,
    /// This connection forwards nothing before this (ns since the proxy started): a victim's
    /// silence.
    silent_until_ns: AtomicU64,
    state: Mutex<ConnState>,
    /// Notified when `state` changes.
    cond: Condvar,
}

struct ConnState {
    cut: bool,
    /// Closed without linger (stop, or a forwarding error).
    closing: bool,
    /// Forwarding threads still running.
    forwarders: u8,
}

impl Conn {
    fn sockets(&self, dir: Dir) -> (&TcpStream, &TcpStream) {
        match dir {
            Dir::ToServer => (&self.client, &self.server),
            Dir::ToClient => (&self.server, &self.client),
        }
    }

    fn shutdown_both(&self, how: Shutdown) {
        let _ = self.client.shutdown(how);
        let _ = self.server.shutdown(how);
    }

    fn is_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }

    fn is_halted(&self) -> bool {
        self.halted.load(Ordering::SeqCst)
    }

    /// Not cut, not closing, some direction still forwarding: a victim may be drawn from it.
    fn is_open(&self) -> bool {
        let st = lock(&self.state);
        !st.cut && !st.closing && st.forwarders > 0
    }

    /// Forwards nothing either way for `d` (a victim's silence).
    fn silence(&self, shared: &Shared, d: Duration) {
        let until = shared.started.elapsed() + d;
        self.silent_until_ns
            .fetch_max(until.as_nanos() as u64, Ordering::AcqRel);
    }

    /// Waits out this connection's silence and the link's; true if cut or closed meanwhile.
    fn wait_silence(&self, shared: &Shared) -> bool {
        loop {
            let own = Duration::from_nanos(self.silent_until_ns.load(Ordering::Acquire))
                .checked_sub(shared.started.elapsed())
                .filter(|d| !d.is_zero());
            match own.max(shared.link_silence_left()) {
                Some(left) => {
                    if self.sleep(left) {
                        return true;
                    }
                }
                None => return self.is_halted(),
            }
        }
    }

    /// Sleeps `dur`, or less if the connection is cut or closed meanwhile (then true).
    fn sleep(&self, dur: Duration) -> bool {
        let deadline = Instant::now() + dur;
        let mut st = lock(&self.state);
        loop {
            if st.cut || st.closing {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Closes both sockets at once, without linger.
    fn close_now(&self) {
        lock(&self.state).closing = true;
        self.halted.store(true, Ordering::SeqCst);
        self.cond.notify_all();
        self.shutdown_both(Shutdown::Both);
    }

    fn forwarder_done(&self, shared: &Shared) {
        let last = {
            let mut st = lock(&self.state);
            st.forwarders -= 1;
            st.forwarders == 0
        };
        self.cond.notify_all();
        if last {
            let done = FinishedConn {
                conn: self.index,
                to_server: self.bytes[Dir::ToServer.idx()].load(Ordering::SeqCst),
                to_client: self.bytes[Dir::ToClient.idx()].load(Ordering::SeqCst),
            };
            {
                let mut stats = lock(&shared.stats);
                stats.open -= 1;
                stats.finished.push(done);
            }
            shared.log(format_args!(
                "conn {}: closed; forwarded {} B to-server, {} B to-client",
                done.conn, done.to_server, done.to_client
            ));
        }
    }

    /// Cuts the connection, unless it was already cut, closed or finished (or, for a random cut,
    /// all random cuts were made); whether it did.
    fn cut(self: &Arc<Self>, shared: &Arc<Shared>, cause: CutCause, dir: Option<Dir>) -> bool {
        self.cut_with(shared, cause, dir, shared.plan.reset)
    }

    /// [`Conn::cut`], by reset (`reset`) or FIN.
    fn cut_with(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        cause: CutCause,
        dir: Option<Dir>,
        reset: bool,
    ) -> bool {
        {
            let mut st = lock(&self.state);
            if st.cut || st.closing || st.forwarders == 0 {
                return false;
            }
            if cause == CutCause::Random {
                if let Some(random) = &shared.plan.random_cuts {
                    let claimed = shared.random_made.fetch_update(
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                        |made| (made < random.cuts).then_some(made + 1),
                    );
                    if claimed.is_err() {
                        return false;
                    }
                }
            }
            st.cut = true;
            self.cut.store(true, Ordering::SeqCst);
            self.halted.store(true, Ordering::SeqCst);
        }
        self.cond.notify_all();
        let to_server = self.bytes[Dir::ToServer.idx()].load(Ordering::SeqCst);
        let to_client = self.bytes[Dir::ToClient.idx()].load(Ordering::SeqCst);
        let event = CutEvent {
            conn: self.index,
            cause,
            direction: dir,
            offset: match dir {
                Some(Dir::ToServer) => to_server,
                Some(Dir::ToClient) => to_client,
                None => 0,
            },
            to_server,
            to_client,
            elapsed: shared.started.elapsed(),
        };
        // Recorded before the sockets are touched: a peer that sees the cut finds it in the stats.
        shared.log(format_args!("{event}"));
        lock(&shared.stats).cuts.push(event);
        shared.stats_cond.notify_all();
        if !(reset && sys::SUPPORTED) {
            // FIN after the bytes already forwarded; the forwarders now only drain.
            self.shutdown_both(Shutdown::Write);
        }
        let (s, c) = (shared.clone(), self.clone());
        if shared
            .spawn(format!("chaos-{}-close", self.index), move || {
                c.close_after_cut(&s, reset)
            })
            .is_err()
        {
            self.close_now();
        }
        true
    }

    /// Lets the peers read what was forwarded (at most the linger), then closes.
    fn close_after_cut(&self, shared: &Shared, reset: bool) {
        let deadline = Instant::now() + shared.plan.linger;
        let mut st = lock(&self.state);
        if reset && sys::SUPPORTED {
            drop(st);
            // Until the peers have acknowledged every byte: a reset drops unacknowledged ones.
            let unacked = |s: &TcpStream| sys::unacked_bytes(s).unwrap_or(0);
            let drained = loop {
                if lock(&self.state).closing {
                    break false;
                }
                if unacked(&self.client) == 0 && unacked(&self.server) == 0 {
                    break true;
                }
                if Instant::now() >= deadline {
                    break false;
                }
                thread::sleep(Duration::from_millis(1));
            };
            let _ = sys::set_linger_zero(&self.client);
            let _ = sys::set_linger_zero(&self.server);
            if !drained {
                // A peer is not reading (a forwarder may be blocked writing to it): wake
                // everything; the peers may see EOF before the reset.
                self.shutdown_both(Shutdown::Both);
                return;
            }
            // Nobody is blocked writing. Shutting down the read sides wakes the forwarders
            // without sending anything; the last of them to exit closes the sockets, which sends
            // the resets.
            self.shutdown_both(Shutdown::Read);
            let grace = Instant::now() + Duration::from_secs(5);
            st = lock(&self.state);
            while st.forwarders > 0 && !st.closing && Instant::now() < grace {
                st = self
                    .cond
                    .wait_timeout(st, Duration::from_millis(50))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            if st.forwarders > 0 {
                self.shutdown_both(Shutdown::Both);
            }
        } else {
            while st.forwarders > 0 && !st.closing {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                st = self
                    .cond
                    .wait_timeout(st, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            drop(st);
            self.shutdown_both(Shutdown::Both);
        }
    }
}

/// How a forwarding thread ended.
enum End {
    Eof,
    /// Cut or closed.
    Halted,
    Error(io::Error),
}

/// One direction of one connection.
fn forward(shared: &Arc<Shared>, conn: &Arc<Conn>, dir: Dir, plan: &DirPlan) {
    let (mut src, mut dst) = conn.sockets(dir);
    let mut buf = vec![0u8; BUF_SIZE];
    let mut done: u64 = 0;
    let mut next = 0;
    // The byte at `done` is to be flipped before it is forwarded.
    let flip_next = std::cell::Cell::new(false);
    // Runs the events due at `done`; true if the connection is cut or closed.
    let run_due = |done: u64, next: &mut usize| -> bool {
        while let Some(ev) = plan.events.get(*next).filter(|e| e.offset == done) {
            *next += 1;
            match ev.kind {
                EventKind::Stall(d) => {
                    shared.log(format_args!(
                        "conn {}: {dir} stalled at offset {done} for {d:?}",
                        conn.index
                    ));
                    conn.sleep(d);
                }
                EventKind::Cut(cause) => {
                    conn.cut(shared, cause, Some(dir));
                }
                EventKind::Flip => {
                    shared.log(format_args!(
                        "conn {}: {dir} byte at offset {done} flipped",
                        conn.index
                    ));
                    flip_next.set(true);
                }
            }
        }
        conn.is_halted()
    };
    let end = 'fwd: loop {
        if run_due(done, &mut next) {
            break End::Halted;
        }
        let n = match src.read(&mut buf) {
            Ok(0) => break End::Eof,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => break End::Error(e),
        };
        if !plan.delay.is_zero() {
            conn.sleep(plan.delay);
        }
        if conn.wait_silence(shared) {
            break 'fwd End::Halted;
        }
        let mut pos = 0;
        while pos < n {
            if conn.is_halted() {
                break 'fwd End::Halted;
            }
            if flip_next.replace(false) {
                buf[pos] ^= 0xff;
            }
            let to_event = plan.events.get(next).map_or(u64::MAX, |e| e.offset - done);
            let end = pos + (n - pos).min(usize::try_from(to_event).unwrap_or(usize::MAX));
            while pos < end {
                match dst.write(&buf[pos..end]) {
                    Ok(0) => break 'fwd End::Error(io::ErrorKind::WriteZero.into()),
                    Ok(k) => {
                        pos += k;
                        done += k as u64;
                        conn.bytes[dir.idx()].fetch_add(k as u64, Ordering::SeqCst);
                        shared.bytes[dir.idx()].fetch_add(k as u64, Ordering::Relaxed);
                        victims::after_bytes(shared, shared.total_bytes());
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => break 'fwd End::Error(e),
                }
            }
            if run_due(done, &mut next) {
                break 'fwd End::Halted;
            }
        }
    };
    match end {
        End::Eof if !conn.is_cut() => {
            // Half-close: pass the EOF on.
            let _ = dst.shutdown(Shutdown::Write);
        }
        End::Error(e) if !conn.is_cut() => {
            shared.log(format_args!("conn {}: {dir}: {e}; closing", conn.index));
            conn.close_now();
        }
        _ => {
            // Cut (or closed): read and discard what the peer still sends until it closes, or until the
            // closer shuts the socket down; a closed socket with unread data would send a reset
            // and drop bytes the peer has not read yet.
            let mut sink = [0u8; 4096];
            loop {
                match src.read(&mut sink) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        }
    }
    conn.forwarder_done(shared);
}

#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
mod sys {
    //! `SO_LINGER` and `SIOCOUTQ`, which std does not offer (on stable).
    use std::io;
    use std::net::TcpStream;
    use std::os::fd::AsRawFd;
    use std::os::raw::{c_int, c_ulong, c_void};

    pub const SUPPORTED: bool = true;

    const SOL_SOCKET: c_int = 1;
    const SO_LINGER: c_int = 13;
    const SIOCOUTQ: c_ulong = 0x5411;

    #[repr(C)]
    struct Linger {
        l_onoff: c_int,
        l_linger: c_int,
    }

    extern "C" {
        fn setsockopt(
            fd: c_int,
            level: c_int,
            name: c_int,
            value: *const c_void,
            len: u32,
        ) -> c_int;
        fn ioctl(fd: c_int, request: c_ulong, ...) -> c_int;
    }

    /// Makes close(2) send a reset.
    pub fn set_linger_zero(s: &TcpStream) -> io::Result<()> {
        let linger = Linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: `s` is an open socket; the option value is a `struct linger` of the given size,
        // alive for the call.
        let rc = unsafe {
            setsockopt(
                s.as_raw_fd(),
                SOL_SOCKET,
                SO_LINGER,
                (&linger as *const Linger).cast(),
                std::mem::size_of::<Linger>() as u32,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Bytes sent but not yet acknowledged by the peer, plus bytes not yet sent.
    pub fn unacked_bytes(s: &TcpStream) -> io::Result<usize> {
        let mut n: c_int = 0;
        // SAFETY: `s` is an open socket; SIOCOUTQ writes one int through the pointer, which is
        // valid for the call.
        let rc = unsafe { ioctl(s.as_raw_fd(), SIOCOUTQ, &mut n as *mut c_int) };
        if rc == 0 {
            Ok(n.max(0) as usize)
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

#[cfg(not(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
)))]
mod sys {
    use std::io;
    use std::net::TcpStream;

    pub const SUPPORTED: bool = false;

    pub fn set_linger_zero(_: &TcpStream) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }

    pub fn unacked_bytes(_: &TcpStream) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }
}
