//! Authentication: a peer without the key, or with another key, can neither place nor read a
//! page; a tampered or replayed frame ends the session; with the key, migrations verify.

mod common;

use std::net::TcpStream;
use std::time::Duration;

use common::*;
use postcopy::codec::{Frame, Header, Kind, Role};
use postcopy::dest::{self, DestError, EngineConfig};
use postcopy::link::auth::{Key, NONCE_BYTES};
use postcopy::link::framed::seal_frames;
use postcopy::link::seal::TAG_BYTES;

fn key(s: &str) -> Key {
    Key::from_secret(format!("{s:-<32}").as_bytes())
}

fn keyed_source(k: &str) -> Source {
    Source::start(&SourceOptions {
        size_bytes: 8 * MIB,
        once: false,
        key: Some(key(k)),
        ..Default::default()
    })
}

fn dest_config(src: &Source, k: Option<&str>) -> EngineConfig {
    EngineConfig {
        source: src.addr.to_string(),
        workers: 2,
        pin: false,
        key: k.map(key),
        connect_timeout: Duration::from_secs(5),
        ..Default::default()
    }
}

#[test]
fn migration_with_the_key_verifies() {
    let src = keyed_source("right");
    let out = run_dest(
        src.addr,
        &DestOptions {
            key: Some(key("right")),
            ..Default::default()
        },
    );
    out.assert_verified();
    let reports = src.stop_and_join();
    assert_eq!(complete_sessions(&reports), 1, "{reports:?}");
}

#[test]
fn wrong_key_is_refused_before_any_page() {
    let src = keyed_source("right");
    let e = dest::connect(&dest_config(&src, Some("wrong"))).expect_err("refused");
    assert!(
        e.to_string().contains("authentication"),
        "the error names authentication: {e}"
    );
    // No key at all: told to pass one.
    let e = dest::connect(&dest_config(&src, None)).expect_err("refused");
    assert!(e.to_string().contains("--key-file"), "{e}");
    let reports = src.stop_and_join();
    assert!(
        reports.is_empty(),
        "no session was ever created: {reports:?}"
    );
}

#[test]
fn keyed_destination_refuses_an_unauthenticated_source() {
    let src = Source::start(&SourceOptions {
        size_bytes: 8 * MIB,
        once: false,
        ..Default::default()
    });
    let mut cfg = dest_config(&src, Some("right"));
    cfg.connect_timeout = Duration::from_secs(1);
    let e = dest::connect(&cfg).expect_err("refused");
    assert!(e.to_string().contains("no authentication challenge"), "{e}");
}

/// Reads a raw frame's header and body (no tag).
fn raw(s: &mut TcpStream) -> (Header, Vec<u8>) {
    let (h, frame) = read_raw_frame(s).expect("read").expect("a frame");
    (h, frame[postcopy::codec::HEADER_BYTES..].to_vec())
}

#[test]
fn a_client_without_the_key_reads_nothing() {
    let src = keyed_source("right");
    let image = src.image.clone();
    // 1. Ignores the challenge and asks for a session and pages.
    let mut s = TcpStream::connect(src.addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let (h, nonce) = raw(&mut s);
    assert_eq!(h.kind, Kind::Challenge);
    assert_eq!(nonce.len(), NONCE_BYTES);
    send(&mut s, &header_bytes(&Header::hello(0, Role::Urgent, 0, 1)));
    send(&mut s, &header_bytes(&Header::request(0, 0, 64)));
    let mut got = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut got);
    // 2. Answers with a forged proof.
    let mut s = TcpStream::connect(src.addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let _ = raw(&mut s);
    send(&mut s, &encode(&Frame::Auth(vec![7u8; 64])));
    let mut got2 = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut got2);
    // Whatever came back holds no page of the image: only an error frame.
    for bytes in [&got, &got2] {
        let text = String::from_utf8_lossy(bytes);
        assert!(
            text.contains("authentication"),
            "an error frame names it: {text:?}"
        );
        assert!(bytes.len() < 4096, "no page data: {} bytes", bytes.len());
        let mut page = vec![0u8; 4096];
        image.fill(0, 0, &mut page);
        assert!(
            !bytes.windows(64).any(|w| w == &page[..64]),
            "page content leaked"
        );
    }
    let reports = src.stop_and_join();
    assert!(reports.is_empty(), "{reports:?}");
}

#[test]
fn a_source_without_the_key_places_nothing() {
    // A fake source that answers the destination's proof with a forged one, then sends pages.
    let fake = FakeListener::bind();
    let addr = fake.addr;
    let t = std::thread::spawn(move || {
        let mut s = fake.accept(Duration::from_secs(10)).expect("connect");
        send(&mut s, &encode(&Frame::Challenge(vec![1u8; NONCE_BYTES])));
        let (h, _) = raw(&mut s);
        assert_eq!(h.kind, Kind::Auth);
        send(&mut s, &encode(&Frame::Auth(vec![2u8; 32])));
        drain_until_closed(&mut s, Duration::from_secs(10))
    });
    let cfg = EngineConfig {
        source: addr.to_string(),
        workers: 1,
        key: Some(key("right")),
        ..Default::default()
    };
    let e = dest::connect(&cfg).expect_err("a forged proof is refused");
    assert!(matches!(e, DestError::Auth(_)), "{e:?}");
    assert!(
        join_within(t, Duration::from_secs(30), "fake source"),
        "the destination hung up"
    );
}

#[test]
fn tampered_and_replayed_frames_end_the_session() {
    // A source that knows the key authenticates, then sends a Welcome whose tag is wrong.
    let k = key("right");
    for case in ["tampered", "replayed"] {
        let fake = FakeListener::bind();
        let addr = fake.addr;
        let k2 = k.clone();
        let t = std::thread::spawn(move || {
            let mut s = fake.accept(Duration::from_secs(10)).expect("connect");
            let nonce_s = [9u8; NONCE_BYTES];
            send(&mut s, &encode(&Frame::Challenge(nonce_s.to_vec())));
            let (_, body) = raw(&mut s);
            let nonce_d: [u8; NONCE_BYTES] = body[..NONCE_BYTES].try_into().unwrap();
            send(
                &mut s,
                &encode(&Frame::Auth(k2.source_proof(&nonce_s, &nonce_d).to_vec())),
            );
            let (mut s2d, _) = k2.frame_keys(&nonce_s, &nonce_d);
            let welcome = encode(&Frame::Welcome(postcopy::codec::Welcome {
                session: 5,
                layout: layout(MIB),
                image: postcopy::codec::ImageInfo::Opaque,
                stopped_unix_us: 0,
            }));
            let mut sealed = Vec::new();
            if case == "tampered" {
                seal_frames(Some(&mut s2d), &welcome, &mut sealed);
                let n = sealed.len();
                sealed[n - TAG_BYTES - 1] ^= 1; // a body byte
            } else {
                // A zero-map frame sent twice: the second is a replay of sequence number 1.
                seal_frames(Some(&mut s2d), &welcome, &mut sealed);
                let zm = encode(&Frame::ZeroMap {
                    block: 0,
                    page: 0,
                    pages: 8,
                    bits: vec![0xff],
                });
                let mut once = Vec::new();
                seal_frames(Some(&mut s2d), &zm, &mut once);
                sealed.extend_from_slice(&once);
                sealed.extend_from_slice(&once);
            }
            send(&mut s, &sealed);
            drain_until_closed(&mut s, Duration::from_secs(10))
        });
        let cfg = EngineConfig {
            source: addr.to_string(),
            workers: 1,
            zero_map: case == "replayed", // reads a second frame after the Welcome
            key: Some(k.clone()),
            ..Default::default()
        };
        let r = dest::connect(&cfg);
        let e = r.expect_err("refused");
        assert!(e.to_string().contains("integrity check"), "{case}: {e}");
        assert!(
            join_within(t, Duration::from_secs(30), "fake source"),
            "{case}: the destination hung up"
        );
    }
}
