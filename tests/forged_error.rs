//! An `Error` frame whose tag does not hold is never acted on, on any authenticated connection
//! of either side: the connection ends with an integrity failure, and the forged message is
//! never shown as the peer's. (A peer that could inject an unauthenticated `Error` could end any
//! migration, or make an operator act on a message it wrote.)

mod common;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use postcopy::codec::{self, Frame, Header, Kind, Role, Welcome, HEADER_BYTES};
use postcopy::dest::{self, DestError, DestRam, Engine, EngineConfig};
use postcopy::link::auth::{AuthError, Key};
use postcopy::link::handshake as auth;
use postcopy::link::seal::TAG_BYTES;
use postcopy::link::{FramedStream, LinkError};

const FORGED: &str = "FORGED: stop the migration";
const SESSION: u64 = 0x51;

fn key() -> Key {
    Key::from_secret(b"forged error test key, 32 bytes")
}

/// Writes an `Error` frame with a tag of zeros: what a peer without the key could
/// inject into an authenticated connection.
fn forge_error(link: &FramedStream) {
    let mut out = Vec::new();
    codec::encode_error(FORGED, &mut out);
    out.extend_from_slice(&[0u8; TAG_BYTES]);
    let _ = link.socket().write_all(&out);
}

/// The destination refused the frame for its tag, not for its message.
fn assert_refused(what: &str, e: &DestError) {
    assert!(
        matches!(e, DestError::Auth(AuthError::BadTag { .. })),
        "{what}: expected an integrity failure, got {e:?}"
    );
    assert!(!e.to_string().contains("FORGED"), "{what}: {e}");
}

/// A fake source's side of one connection: accept, authenticate, read the `Hello`.
fn accept(fake: &FakeListener) -> (FramedStream, Header) {
    let s = fake.accept(Duration::from_secs(10)).expect("connect");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut link = FramedStream::new(s);
    auth::accept(&mut link, &key()).expect("the destination holds the key");
    let hello = link.read_frame().expect("Hello").expect("a frame");
    assert_eq!(hello.kind, Kind::Hello);
    (link, hello)
}

fn welcome(link: &mut FramedStream, size_bytes: u64) {
    let frame = Frame::Welcome(Welcome {
        session: SESSION,
        layout: layout(size_bytes),
        image: codec::ImageInfo::Opaque,
        stopped_unix_us: 0,
    });
    link.write_frames(&mut encode(&frame))
        .expect("send Welcome");
}

fn config(fake: &FakeListener) -> EngineConfig {
    EngineConfig {
        source: fake.addr.to_string(),
        workers: 1,
        pin: false,
        stream: false,
        key: Some(key()),
        connect_timeout: Duration::from_secs(5),
        link_timeout: Duration::from_secs(10),
        recovery_timeout: Duration::ZERO,
        ..Default::default()
    }
}

/// Runs `script` as the fake source on its own thread, `dest` as the destination.
fn with_fake_source(
    script: impl FnOnce(&FakeListener) + Send + 'static,
    dest: impl FnOnce(EngineConfig) -> Result<(), DestError>,
) -> DestError {
    let fake = FakeListener::bind();
    let cfg = config(&fake);
    let t = std::thread::spawn(move || script(&fake));
    let e = dest(cfg).expect_err("the forged frame ends the connection");
    join_within(t, Duration::from_secs(30), "fake source");
    e
}

#[test]
fn destination_handshake_refuses_a_forged_error() {
    let e = with_fake_source(
        |fake| {
            let (link, _) = accept(fake);
            forge_error(&link);
            let _ = drain_until_closed(&mut link.socket().try_clone().unwrap(), IO_TIMEOUT);
        },
        |cfg| dest::connect(&cfg).map(|_| ()),
    );
    assert_refused("handshake", &e);
}

#[test]
fn destination_zero_map_refuses_a_forged_error() {
    let e = with_fake_source(
        |fake| {
            let (mut link, hello) = accept(fake);
            assert!(hello.wants_zero_map());
            welcome(&mut link, MIB);
            forge_error(&link);
            let _ = drain_until_closed(&mut link.socket().try_clone().unwrap(), IO_TIMEOUT);
        },
        |mut cfg| {
            cfg.zero_map = true;
            dest::connect(&cfg).map(|_| ())
        },
    );
    assert_refused("zero map", &e);
}

#[test]
fn destination_precopy_refuses_a_forged_error() {
    let e = with_fake_source(
        |fake| {
            let (mut link, hello) = accept(fake);
            assert!(hello.wants_precopy());
            welcome(&mut link, MIB);
            forge_error(&link);
            let _ = drain_until_closed(&mut link.socket().try_clone().unwrap(), IO_TIMEOUT);
        },
        |mut cfg| {
            cfg.precopy = true;
            let mut connected = dest::connect(&cfg)?;
            let ram = DestRam::new(&connected.welcome.layout)?;
            dest::receive_precopy(&mut connected, &ram, &cfg).map(|_| ())
        },
    );
    assert_refused("precopy", &e);
}

#[test]
fn destination_verify_refuses_a_forged_error() {
    let e = with_fake_source(
        |fake| {
            let (mut link, hello) = accept(fake);
            assert_eq!(hello.role(), Some(Role::Verify));
            welcome(&mut link, MIB);
            let run = link.read_frame().expect("Run").expect("a frame");
            assert_eq!(run.kind, Kind::Run);
            forge_error(&link);
            let _ = drain_until_closed(&mut link.socket().try_clone().unwrap(), IO_TIMEOUT);
        },
        |cfg| dest::fetch_checksums(&cfg, SESSION).map(|_| ()),
    );
    assert_refused("verify", &e);
}

/// The engine's io_uring connections: worker 0's urgent one (after a request) and its bulk
/// one (instead of the stream).
#[test]
fn engine_connections_refuse_a_forged_error() {
    for role in [Role::Urgent, Role::Bulk] {
        let e = with_fake_source(
            move |fake| {
                let (mut urgent, _) = accept(fake);
                welcome(&mut urgent, MIB);
                if role == Role::Urgent {
                    let req = urgent.read_frame().expect("Request").expect("a frame");
                    assert_eq!(req.kind, Kind::Request);
                    forge_error(&urgent);
                } else {
                    let (mut bulk, hello) = accept(fake);
                    assert_eq!(hello.role(), Some(Role::Bulk));
                    welcome(&mut bulk, MIB);
                    forge_error(&bulk);
                    let _ = drain_until_closed(&mut bulk.socket().try_clone().unwrap(), IO_TIMEOUT);
                }
                let _ = drain_until_closed(&mut urgent.socket().try_clone().unwrap(), IO_TIMEOUT);
            },
            move |mut cfg| {
                cfg.stream = role == Role::Bulk;
                let connected = dest::connect(&cfg)?;
                let ram = Arc::new(DestRam::new(&connected.welcome.layout)?);
                let handle = Engine::start(connected, ram.clone(), &cfg)?;
                let toucher = (role == Role::Urgent).then(|| {
                    let ram = ram.clone();
                    std::thread::spawn(move || {
                        std::hint::black_box(ram.regions[0].touch(0));
                    })
                });
                if !wait_until(Duration::from_secs(20), || handle.is_finished()) {
                    handle.stop();
                }
                let r = wait_engine(handle, STOP_GRACE, "engine (stopped after 20 s)").map(|_| ());
                if let Some(t) = toucher {
                    join_within(t, Duration::from_secs(10), "touching thread");
                }
                r
            },
        );
        assert_refused(&format!("{role:?} connection"), &e);
    }
}

/// The source's side: a destination's forged `Error` ends that connection with an integrity
/// failure (reported, and said back sealed), never as "the destination reported ...".
#[test]
fn source_refuses_a_forged_error_on_every_connection_kind() {
    let src = Source::start(&SourceOptions {
        size_bytes: MIB,
        once: false,
        key: Some(key()),
        ..Default::default()
    });
    let open = |hello: Header| {
        let s = std::net::TcpStream::connect(src.addr).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut link = FramedStream::new(s);
        auth::connect(&mut link, &key()).expect("authenticate");
        let mut h = [0u8; HEADER_BYTES];
        hello.encode(&mut h);
        link.write_frames(&mut h).expect("Hello");
        let w = link.read_frame().expect("Welcome").expect("a frame");
        assert_eq!(w.kind, Kind::Welcome);
        let welcome = Welcome::decode_body(&w, link.body()).unwrap();
        (link, welcome.session)
    };
    // 1. Instead of a Hello.
    let s = std::net::TcpStream::connect(src.addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut link = FramedStream::new(s);
    auth::connect(&mut link, &key()).expect("authenticate");
    forge_error(&link);
    match link.read_frame() {
        Err(LinkError::Remote(msg)) => {
            assert!(msg.contains("integrity check"), "{msg}");
            assert!(!msg.contains("FORGED"), "{msg}");
        }
        other => panic!("expected the source's sealed Error frame, got {other:?}"),
    }
    // 2. On the urgent connection of a session, 3. on its verify connection.
    let (urgent, session) = open(Header::hello(0, Role::Urgent, 0, 1));
    let (verify, _) = open(Header::hello(session, Role::Verify, 0, 1));
    forge_error(&verify);
    forge_error(&urgent);
    for link in [verify, urgent] {
        let _ = drain_until_closed(&mut link.socket().try_clone().unwrap(), IO_TIMEOUT);
    }
    let reports = src.stop_and_join();
    assert_eq!(reports.len(), 1, "{reports:?}");
    let error = reports[0].error.as_deref().unwrap_or("");
    assert!(error.contains("integrity check"), "{reports:?}");
    assert!(!error.contains("FORGED"), "{reports:?}");
}
