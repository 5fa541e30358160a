//! One connection from its first byte: TLS, authentication, `Hello`, joining (or creating, or
//! rebuilding) its session, `Welcome`; then the role's loop, and what a failure means for the
//! session.

use super::bulk::{resume_bulk, serve_bulk};
use super::conn::{link_err, read_frame, write_err};
use super::error::SourceError;
use super::pages::encode_zero_map;
use super::precopy::run_precopy;
use super::registry::{finish_connection, log, Shared};
use super::session::Session;
use super::unix_us;
use super::urgent::serve_urgent;
use super::verify::serve_verify;
use crate::codec::{CodecError, Kind, Role, Welcome};
use crate::link::FramedStream;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub(super) fn serve_connection(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
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
        if let Err(e) = crate::link::handshake::accept(&mut link, key).map_err(link_err(peer)) {
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
            let s = Arc::new(Session::new(
                shared.image.layout(),
                shared.is_live,
                id,
                workers,
                false,
            ));
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
                    let s = Arc::new(Session::new(
                        shared.image.layout(),
                        shared.is_live,
                        hello.page,
                        workers,
                        true,
                    ));
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
