//! One connection from its first byte: TLS, authentication, `Hello`, joining (or creating, or
//! rebuilding) its session, `Welcome`; then the role's loop, and what a failure means for the
//! session.

use crate::layout::page_size_name as size_name;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::bulk::{resume_bulk, serve_bulk};
use super::config::LiveParts;
use super::conn::{link_err, read_frame, write_err};
use super::error::SourceError;
use super::joined::Joined;
use super::lifecycle::JoinRefused;
use super::pages::encode_zero_map;
use super::precopy::{resume_precopy, run_precopy};
use super::registry::{finish_connection, log, Shared};
use super::session::Session;
use super::urgent::serve_urgent;
use super::verify::serve_verify;
use crate::codec::{CodecError, Hello, Role, Welcome, BUSY};
use crate::link::FramedStream;
use crate::stats::unix_us;

/// Serves one accepted connection to its end (its own thread).
pub(super) fn serve_connection(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    let Some(mut link) = open_link(&shared, stream, peer) else {
        return;
    };
    let hello = match read_hello(&mut link, peer) {
        Ok(Some(hello)) => hello,
        Ok(None) => return,
        Err(e) => {
            log(&shared, format_args!("{peer}: handshake failed: {e}"));
            link.send_error(&format!("handshake: {e}"));
            return;
        }
    };
    let session = match join_session(&shared, &hello, peer) {
        Ok(session) => session,
        Err(refusal) => {
            link.send_error(&refusal);
            return;
        }
    };
    // A connection that rejoins replaces the broken one of its (role, worker) at once.
    session.supersede(&hello, peer, link.socket());
    // A panic (a bug) ends this session with an error; the connection is still counted closed,
    // so the session is reaped and reported like any other.
    let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        serve_joined(&shared, &session, &mut link, &hello, peer)
    }));
    match served {
        Ok(Ok(())) => {}
        Ok(Err(e)) => connection_failed(&shared, &session, &mut link, e, peer),
        Err(panic) => connection_panicked(&shared, &session, &mut link, &*panic, peer),
    }
    session.forget(&hello, peer);
    finish_connection(&shared, &session);
}

/// A connection's thread panicked: the session fails with the panic's message (the destination
/// is told), nothing else is affected.
fn connection_panicked(
    shared: &Shared,
    session: &Session,
    link: &mut FramedStream,
    panic: &(dyn std::any::Any + Send),
    peer: SocketAddr,
) {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into());
    let why =
        format!("a connection thread of the source panicked (a bug; please report it): {what}");
    log(
        shared,
        format_args!("session {:#x} {peer}: {why}", session.id),
    );
    link.send_error(&why);
    session.life.fail(why);
}

/// TLS (if configured), timeouts, and the challenge-response (if keyed): nobody without the
/// key gets past this, so no session is created and no page is read for them.
fn open_link(shared: &Shared, stream: TcpStream, peer: SocketAddr) -> Option<FramedStream> {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_nodelay(true);
    shared.config.liveness().apply(&stream);
    let _ = stream.set_read_timeout(Some(shared.config.handshake_timeout));
    let stream = match &shared.config.tls {
        None => stream,
        Some(tls) => match tls.accept(stream) {
            Ok(plain) => plain,
            Err(e) => {
                log(shared, format_args!("{peer}: {e}"));
                return None;
            }
        },
    };
    let _ = stream.set_read_timeout(Some(shared.config.handshake_timeout));
    let _ = stream.set_write_timeout(Some(shared.config.write_timeout));
    let mut link = FramedStream::new(stream);
    if let Some(key) = &shared.config.key {
        if let Err(e) = crate::link::handshake::accept(&mut link, key).map_err(link_err(peer)) {
            log(shared, format_args!("{peer}: authentication: {e}"));
            link.send_error(&format!("authentication: {e}"));
            return None;
        }
    }
    Some(link)
}

/// The connection's `Hello` (`None`: it hung up first).
fn read_hello(link: &mut FramedStream, peer: SocketAddr) -> Result<Option<Hello>, SourceError> {
    let Some(h) = read_frame(link, peer)? else {
        return Ok(None);
    };
    Hello::of(&h).map(Some).ok_or(SourceError::Protocol {
        peer,
        source: CodecError::Unexpected {
            got: h.kind,
            expected: "Hello",
        },
    })
}

/// The session this connection belongs to, its connection counted; or the refusal to send.
fn join_session(shared: &Shared, hello: &Hello, peer: SocketAddr) -> Result<Arc<Session>, String> {
    check_page_size(shared.image.layout(), hello)?;
    let mut sessions = shared.sessions.lock().expect("poisoned");
    let session = if hello.session == 0 {
        if hello.role != Role::Urgent || hello.worker != 0 {
            return Err("handshake: a new session starts on worker 0's urgent connection".into());
        }
        if shared.draining.load(Ordering::Acquire) {
            return Err(
                "this source is shutting down (it was sent SIGTERM or SIGINT): it takes no new \
                 migration; start one on another source"
                    .into(),
            );
        }
        if sessions.len() >= shared.config.max_sessions {
            return Err(format!(
                "{BUSY}too many sessions on this source; retry later"
            ));
        }
        let id = shared.next_id.fetch_add(2, Ordering::Relaxed);
        let s = Arc::new(new_session(shared, id, hello.workers, false));
        sessions.insert(id, s.clone());
        s
    } else {
        match sessions.get(&hello.session) {
            Some(s) if s.workers == hello.workers => s.clone(),
            Some(_) => return Err(JoinRefused::Finished.to_string()),
            // A destination resuming a session this process never saw: the source was
            // restarted. A static image is the same as before, so the session is rebuilt
            // from what the destination says it has (its `Have` frames).
            None if hello.resume && !shared.is_live => {
                let s = Arc::new(new_session(shared, hello.session, hello.workers, true));
                let id = hello.session;
                log(
                    shared,
                    format_args!(
                        "{peer}: resuming session {id:#x} of an earlier run of this source"
                    ),
                );
                sessions.insert(id, s.clone());
                s
            }
            None => return Err(unknown_session(hello)),
        }
    };
    // Two per worker and one verify connection, and as many again of broken ones still
    // closing (a rejoining connection shuts the one it replaces down).
    let max = 4 * usize::from(hello.workers) + 2;
    session
        .life
        .connection_opened(max)
        .map_err(|r| r.to_string())?;
    Ok(session)
}

/// A destination whose memory maps pages of another size than this image's is refused at its
/// Hello, with the fix.
fn check_page_size(layout: &crate::layout::Layout, hello: &Hello) -> Result<(), String> {
    let Some(want) = hello.page_size else {
        return Ok(());
    };
    match layout.blocks.iter().find(|b| b.page_size != want) {
        None => Ok(()),
        Some(b) => Err(format!(
            "handshake: the destination's memory maps {} pages, but this source serves block {:?} in {} pages: serve the image with --page-size {} (or give the destination a --memory of {} pages)",
            size_name(want),
            b.name,
            size_name(b.page_size),
            size_name(want),
            size_name(b.page_size)
        )),
    }
}

fn new_session(shared: &Shared, id: u64, workers: u16, resumed: bool) -> Session {
    Session::new(shared.image.layout(), shared.is_live, id, workers, resumed)
}

fn unknown_session(hello: &Hello) -> String {
    format!(
        "handshake: unknown session {:#x}{}",
        hello.session,
        if hello.resume {
            " (a live source's memory cannot resume a migration after a restart)"
        } else {
            ""
        }
    )
}

impl std::fmt::Display for JoinRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            JoinRefused::Finished => "handshake: session is finished or the worker count differs",
            JoinRefused::TooMany => {
                "busy: too many connections for this session (broken ones are still closing); retry"
            }
        })
    }
}

/// A joined connection: `Welcome` (and the zero map), precopy on a new session that offered
/// it, then the role's loop.
fn serve_joined(
    shared: &Shared,
    session: &Session,
    link: &mut FramedStream,
    hello: &Hello,
    peer: SocketAddr,
) -> Result<(), SourceError> {
    let new = hello.session == 0;
    let precopy = new && hello.precopy;
    let rejoins_precopy =
        hello.resume && hello.precopy && hello.role == Role::Urgent && hello.worker == 0;
    let mut live = welcome(shared, session, link, hello, peer)?;
    // The rest of a frame that began to arrive comes within the link timeout, or the link
    // is dead (an idle destination sends heartbeats).
    let _ = link
        .socket()
        .set_read_timeout(Some(shared.config.link_timeout));
    if precopy {
        run_precopy(shared, session, link, peer, live.take())?;
    } else if rejoins_precopy {
        resume_precopy(shared, session, link, peer)?;
    }
    drop(live);
    if hello.resume {
        session.recoveries.fetch_add(1, Ordering::Relaxed);
        if hello.role == Role::Urgent {
            session.life.worker_rejoined(hello.worker);
        }
    }
    let mut c = Joined {
        shared,
        session,
        link,
        peer,
        worker: hello.worker,
        credit: hello.credit,
    };
    match hello.role {
        Role::Urgent => serve_urgent(&mut c),
        Role::Bulk if hello.resume => {
            resume_bulk(&mut c)?;
            serve_bulk(&mut c)
        }
        Role::Bulk => serve_bulk(&mut c),
        Role::Verify => serve_verify(c.shared, c.session, c.link, c.peer),
    }
}

/// `Welcome`, after a new session of a live source took its tracker and workload (without
/// precopy the workload stops now: pure postcopy). Returns the live parts for precopy.
fn welcome(
    shared: &Shared,
    session: &Session,
    link: &mut FramedStream,
    hello: &Hello,
    peer: SocketAddr,
) -> Result<Option<LiveParts>, SourceError> {
    let new = hello.session == 0;
    let mut live = if new && shared.is_live {
        Some(take_live(shared)?)
    } else {
        None
    };
    let mut stopped_unix_us = 0;
    if let (false, Some(l)) = (hello.precopy, live.as_mut()) {
        l.workload.stop();
        stopped_unix_us = unix_us();
        session.life.switch_over();
    }
    let Err(e) = send_welcome(shared, session, link, hello, stopped_unix_us, peer) else {
        return Ok(live);
    };
    if new {
        // The destination never heard of this session: it starts a new one, which needs the
        // live parts (precopy has not begun: they are untouched but for a stopped workload,
        // whose memory is final then).
        if let Some(l) = live.take() {
            *shared.live.lock().expect("poisoned") = Some(l);
        }
        session.life.fail(format!(
            "the first connection broke before its Welcome arrived ({e}); the destination \
             starts a new session"
        ));
    }
    Err(e)
}

/// A live source's parts, which its one migration takes.
fn take_live(shared: &Shared) -> Result<LiveParts, SourceError> {
    shared
        .live
        .lock()
        .expect("poisoned")
        .take()
        .ok_or(SourceError::LiveUsed)
}

/// `Welcome`, and the zero-page map when a new pure-postcopy session asked for it (the
/// destination places those pages itself: neither a request nor the stream carries them).
fn send_welcome(
    shared: &Shared,
    session: &Session,
    link: &mut FramedStream,
    hello: &Hello,
    stopped_unix_us: u64,
    peer: SocketAddr,
) -> Result<(), SourceError> {
    let mut out = Vec::with_capacity(64 * 1024);
    Welcome {
        session: session.id,
        layout: shared.image.layout().clone(),
        image: shared.image.info(),
        stopped_unix_us,
    }
    .encode_into(&mut out);
    if hello.zero_map && hello.session == 0 && !hello.precopy {
        encode_zero_map(shared.image.as_ref(), session, &mut out);
    }
    link.write_frames(&mut out)
        .map_err(write_err("send Welcome", peer))
        .map(|_| ())
}

/// What a connection's failure means for its session. A broken connection (not a bad frame) is
/// a network fault: the destination reconnects and resumes, so the session waits for it (up to
/// the recovery timeout). Anything else fails the session.
fn connection_failed(
    shared: &Shared,
    session: &Session,
    link: &mut FramedStream,
    e: SourceError,
    peer: SocketAddr,
) {
    let broken = matches!(e, SourceError::Io { .. } | SourceError::Incomplete { .. })
        && !shared.config.recovery_timeout.is_zero()
        && !session.life.is_finished();
    let waiting = if broken {
        "; waiting for the destination to reconnect"
    } else {
        ""
    };
    log(
        shared,
        format_args!("session {:#x} {peer}: {e}{waiting}", session.id),
    );
    if matches!(e, SourceError::Protocol { .. } | SourceError::LiveUsed) {
        link.send_error(&e.to_string());
    }
    if broken {
        session.life.connection_broke();
    } else {
        session.life.fail(e.to_string());
    }
}
