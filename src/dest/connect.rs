//! Opening a connection to the source: TCP (and TLS), the challenge-response, `Hello` /
//! `Welcome`, and the zero-page map when asked for. Every connection of the destination (the
//! handshake, each worker's urgent and bulk connection, verify, the ones reopened after a
//! break) is opened here.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::{io_err, DestError, EngineConfig};
use crate::codec::{page_bit, CodecError, Header, Kind, Role, Welcome, HEADER_BYTES};
use crate::layout::{Layout, PageBitmap};
use crate::link::{FramedStream, LinkError};

/// A handshaken session: worker 0's urgent connection and what the source said.
#[derive(Debug)]
pub struct Connected {
    /// The source's `Welcome`.
    pub welcome: Welcome,
    /// Worker 0's urgent connection (authenticated when a key is configured).
    pub(crate) control: FramedStream,
    /// The zero-page map (per block, bit set = zero page), when asked for; after precopy, the
    /// zero pages precopy announced for pages not yet present.
    pub zero_map: Option<Vec<PageBitmap>>,
    /// Whether a precopy phase follows (the `Hello` offered it): call
    /// [`super::receive_precopy`].
    pub precopy: bool,
}

/// A connection after `Hello`/`Welcome`.
pub(crate) struct Opened {
    pub(crate) link: FramedStream,
    pub(crate) welcome: Welcome,
    pub(crate) zero_map: Option<Vec<PageBitmap>>,
}

/// A link error, in the destination's words (`context`: which connection).
pub(crate) fn link_err(context: &str) -> impl FnOnce(LinkError) -> DestError + '_ {
    move |e| match e {
        LinkError::Io { what, source } => DestError::Io {
            context: format!("{context}: {what}"),
            source,
        },
        LinkError::Protocol(source) => DestError::Protocol {
            context: context.into(),
            source,
        },
        LinkError::Auth(e) => DestError::Auth(e),
        LinkError::Remote(message) => DestError::Remote(message),
    }
}

/// How a connection joins its session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Joining {
    /// The first connection (a new session) or a worker's own connection.
    Fresh,
    /// A connection that replaces a broken one.
    Rejoin,
    /// Worker 0's urgent connection replacing one that broke in precopy.
    RejoinPrecopy,
}

/// Opens a connection of `role` for `worker` and exchanges `Hello`/`Welcome`.
pub(crate) fn open_connection(
    config: &EngineConfig,
    session: u64,
    role: Role,
    worker: u16,
) -> Result<Opened, DestError> {
    open_connection_as(
        config,
        session,
        role,
        worker,
        Joining::Fresh,
        config.connect_timeout,
    )
}

/// Whether an attempt to open a connection may succeed if tried again: the network failed,
/// not the peer's checks (a refusal, a bad frame, a wrong key).
pub(crate) fn retryable(e: &DestError) -> bool {
    matches!(
        e,
        DestError::Connect { .. }
            | DestError::Io { .. }
            | DestError::Closed(..)
            | DestError::Stalled { .. }
    ) || matches!(e, DestError::Remote(m) if m.starts_with(crate::codec::BUSY))
}

/// The first connection broke during its handshake (it was accepted, then cut): a new session
/// may be tried. A source that is not there, refuses or answers nonsense is reported at once.
fn broke_in_handshake(e: &DestError) -> bool {
    retryable(e) && !matches!(e, DestError::Connect { .. } | DestError::Remote(_))
}

/// Opens a connection like [`open_connection_as`], again and again with backoff (5 ms doubling
/// to 0.5 s) while it fails in a [`retryable`] way, until `deadline`; each attempt's
/// handshake is bounded by the time left. `stopped` is asked between attempts. The error is
/// the last attempt's.
pub(crate) fn open_with_retry(
    config: &EngineConfig,
    target: (u64, Role, u16),
    joining: Joining,
    deadline: Instant,
    stopped: &dyn Fn() -> bool,
) -> Result<Opened, DestError> {
    open_while(config, target, joining, (deadline, stopped), retryable)
}

/// [`open_with_retry`], trying again while `again` holds for the error.
fn open_while(
    config: &EngineConfig,
    (session, role, worker): (u64, Role, u16),
    joining: Joining,
    (deadline, stopped): (Instant, &dyn Fn() -> bool),
    again: fn(&DestError) -> bool,
) -> Result<Opened, DestError> {
    let mut backoff = Duration::from_millis(5);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let within = left
            .min(config.connect_timeout)
            .max(Duration::from_millis(50));
        match open_connection_as(config, session, role, worker, joining, within) {
            Ok(o) => return Ok(o),
            Err(e) if again(&e) && Instant::now() + backoff < deadline && !stopped() => {
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
            Err(e) => return Err(e),
        }
    }
}

/// [`open_connection`], joining as `joining` says, its connect and handshake bounded by
/// `within`.
pub(crate) fn open_connection_as(
    config: &EngineConfig,
    session: u64,
    role: Role,
    worker: u16,
    joining: Joining,
    within: Duration,
) -> Result<Opened, DestError> {
    let mut link = FramedStream::new(dial(config, within)?);
    let context = format!("{role:?} connection of worker {worker}");
    // The first connection of a migration: a peer that is not a postcopy source is told apart
    // within FIRST_ANSWER (a source speaks first with a key, and answers the Hello at once).
    let first = session == 0 && joining == Joining::Fresh;
    let first_answer = within.min(FIRST_ANSWER);
    if first && config.key.is_some() {
        await_first_answer(config, &link, first_answer)?;
    }
    if let Some(key) = &config.key {
        match crate::link::handshake::connect(&mut link, key) {
            // The session's source proved a key before: it is the link that is slow or silent.
            Err(LinkError::Auth(crate::link::auth::AuthError::NoChallenge))
                if joining != Joining::Fresh || session != 0 =>
            {
                return Err(DestError::Io {
                    context: format!("{context}: no answer within {within:?} while rejoining"),
                    source: std::io::ErrorKind::TimedOut.into(),
                })
            }
            r => r.map_err(link_err(&context))?,
        }
    }
    let mut h = Header::hello(session, role, worker, config.workers as u16);
    // With precopy, zero pages travel as flags in the precopy rounds instead of a map.
    let want_zero_map = config.zero_map && session == 0 && !config.precopy;
    if want_zero_map {
        h = h.with_zero_map();
    }
    if (config.precopy && session == 0) || joining == Joining::RejoinPrecopy {
        h = h.with_precopy();
    }
    if joining != Joining::Fresh {
        h = h.with_resume();
    }
    if role == Role::Bulk && config.fault_latency_target.is_some() {
        h = h.with_credit();
    }
    if let Some(bytes) = config.page_size {
        h = h.with_page_size(bytes);
    }
    let mut hello = [0u8; HEADER_BYTES];
    h.encode(&mut hello);
    link.write_frames(&mut hello)
        .map_err(link_err("send Hello"))?;
    if first && config.key.is_none() {
        await_first_answer(config, &link, first_answer)?;
    }
    let welcome = read_welcome(&mut link, config).map_err(link_err(&context))?;
    let zero_map = if want_zero_map {
        Some(read_zero_map(&mut link, &welcome.layout).map_err(link_err(&context))?)
    } else {
        None
    };
    link.socket()
        .set_read_timeout(None)
        .map_err(io_err("clear timeout"))?;
    Ok(Opened {
        link,
        welcome,
        zero_map,
    })
}

/// How long the first connection of a migration waits for the source's first byte.
pub const FIRST_ANSWER: Duration = Duration::from_secs(1);

/// Waits up to `within` for the peer's first bytes (they are read, and checked, next).
fn await_first_answer(
    config: &EngineConfig,
    link: &FramedStream,
    within: Duration,
) -> Result<(), DestError> {
    use nix::poll::{PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let ms = within.as_millis().min(u128::from(u16::MAX)) as u16;
    let mut fds = [PollFd::new(link.socket().as_fd(), PollFlags::POLLIN)];
    if let Ok(0) = nix::poll::poll(&mut fds, PollTimeout::from(ms)) {
        if config.key.is_some() {
            // A keyed source speaks first (its challenge): this one runs without a key, or is
            // not a postcopy source (the error says both).
            return Err(DestError::Auth(crate::link::auth::AuthError::NoChallenge));
        }
        return Err(DestError::NoAnswer {
            addr: config.source.clone(),
            waited_ms: within.as_millis() as u64,
        });
    }
    // Every frame starts with the magic: a peer that sent other bytes is refused now, not
    // after a header's worth of them (it may never send that many). Under TLS the socket
    // carries records, not frames: the read that follows checks.
    let mut first = [0u8; 4];
    if config.tls.is_none() && link.socket().peek(&mut first).ok() == Some(first.len()) {
        let magic = u32::from_le_bytes(first);
        if magic != crate::codec::MAGIC {
            return Err(DestError::Protocol {
                context: format!("the first answer of {}", config.source),
                source: crate::codec::CodecError::BadMagic(magic),
            });
        }
    }
    // Readable, hung up or failed otherwise: the read that follows says which.
    Ok(())
}

/// TCP (and TLS) to the source, `within` as the connect and the handshake's read timeout, and
/// the link's `TCP_USER_TIMEOUT`.
fn dial(config: &EngineConfig, within: Duration) -> Result<TcpStream, DestError> {
    let connect_err = |source| DestError::Connect {
        addr: config.source.clone(),
        source,
    };
    let addr: SocketAddr = config
        .source
        .to_socket_addrs()
        .map_err(connect_err)?
        .next()
        .ok_or_else(|| {
            connect_err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no address",
            ))
        })?;
    let mut stream = TcpStream::connect_timeout(&addr, within).map_err(connect_err)?;
    stream
        .set_nodelay(true)
        .map_err(io_err("set TCP_NODELAY"))?;
    config.liveness().apply(&stream);
    if let Some(tls) = &config.tls {
        stream
            .set_read_timeout(Some(within))
            .map_err(io_err("set handshake timeout"))?;
        stream = tls.connect(stream)?;
    }
    stream
        .set_read_timeout(Some(within))
        .map_err(io_err("set handshake timeout"))?;
    Ok(stream)
}

/// Reads the source's `Welcome` (an `Error` frame is the source's refusal, its tag checked).
fn read_welcome(link: &mut FramedStream, config: &EngineConfig) -> Result<Welcome, LinkError> {
    let keyless = config.key.is_none();
    let h = link
        .read_frame_if(|h| match h.kind {
            Kind::Welcome => Ok(()),
            got => Err(CodecError::Unexpected {
                got,
                expected: "Welcome",
            }),
        })
        .map_err(|e| match e {
            // A source that asks for a key we do not hold.
            LinkError::Protocol(CodecError::Unexpected {
                got: Kind::Challenge,
                ..
            }) if keyless => crate::link::auth::AuthError::KeyRequired.into(),
            e => e,
        })?;
    let Some(h) = h else {
        return Err(LinkError::Io {
            what: "read handshake reply",
            source: std::io::ErrorKind::UnexpectedEof.into(),
        });
    };
    Ok(Welcome::decode_body(&h, link.body())?)
}

/// Reads `ZeroMap` frames until `Run`: one bitmap per block, bit set = zero page.
fn read_zero_map(link: &mut FramedStream, layout: &Layout) -> Result<Vec<PageBitmap>, LinkError> {
    let map: Vec<PageBitmap> = layout
        .blocks
        .iter()
        .map(|b| PageBitmap::new(b.pages()))
        .collect();
    loop {
        let h = link.read_frame_if(|h| match h.kind {
            // decode() bounded the body (MAX_ZERO_MAP_BYTES) and matched it to the pages.
            Kind::ZeroMap => h.check_zero_map(layout),
            Kind::Run => Ok(()),
            got => Err(CodecError::Unexpected {
                got,
                expected: "ZeroMap or Run",
            }),
        })?;
        let Some(h) = h else {
            return Err(LinkError::Io {
                what: "read zero-page map",
                source: std::io::ErrorKind::UnexpectedEof.into(),
            });
        };
        if h.kind == Kind::Run {
            return Ok(map);
        }
        for i in 0..h.mask {
            if page_bit(link.body(), i) {
                map[h.block as usize].set(h.page + i);
            }
        }
    }
}

/// Handshakes with the source: returns the session and its layout.
pub fn connect(config: &EngineConfig) -> Result<Connected, DestError> {
    if config.workers == 0 || config.workers > 256 {
        return Err(DestError::Unsupported(format!(
            "{} workers (use 1..=256)",
            config.workers
        )));
    }
    // A first connection cut in its handshake is tried again (a new session each time; the
    // source gives up the one it began), within the recovery timeout.
    let deadline = Instant::now() + config.recovery_timeout;
    let opened = open_while(
        config,
        (0, Role::Urgent, 0),
        Joining::Fresh,
        (deadline, &|| false),
        broke_in_handshake,
    )?;
    Ok(Connected {
        welcome: opened.welcome,
        control: opened.link,
        zero_map: opened.zero_map,
        precopy: config.precopy,
    })
}

impl Connected {
    /// Keeps a session prepared ahead of its use (a handler's pool) alive: reads the source's
    /// heartbeats and sends ours, without waiting. An error means the session is no longer
    /// usable: drop it and open another.
    pub fn keep_alive(&mut self, live: &crate::link::liveness::Liveness) -> Result<(), DestError> {
        self.control
            .keep_alive(live)
            .map_err(link_err("a prepared session's connection"))
    }

    /// Ends a session prepared ahead of its use that no VMM took: the source hears why and
    /// drops it at once instead of waiting for a reconnection.
    pub fn release(mut self, why: &str) {
        self.control.send_error(why);
    }
}
