//! Input from the network is hostile: nothing panics, nothing hangs, the error is clear, the
//! session ends, and nothing is written that the peer was not entitled to write.
//!
//! Destination side: a fake source (std `TcpListener` + `postcopy::codec`) answers the engine's
//! `Hello`s, serves a legitimate page when asked, then misbehaves. The engine must fail with the
//! right `DestError`, promptly (well before its link timeout), and its received bitmaps must
//! hold exactly the pages the fake legitimately sent, with the right contents.
//!
//! Source side: a fake destination client against a real in-process `SourceServer`: each bad
//! input gets an `Error` frame and a closed connection, and the server then still serves a full,
//! verified migration.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use postcopy::codec::{
    CodecError, Frame, Header, ImageInfo, Kind, Role, Welcome, HEADER_BYTES, MAX_REQUEST_PAGES,
};
use postcopy::dest::{self, DestError, DestRam, Engine, EngineConfig, EngineReport};
use postcopy::image::{page_checksum, Image, Synthetic};
use postcopy::layout::{Block, Layout, LayoutError};

/// Session id the fake source hands out.
const SESSION: u64 = 0x5e55_1011;
/// Image of the fake source (16 MiB: 4096 pages).
const SIZE: u64 = 16 * MIB;
const PAGES: u64 = SIZE / PAGE;
/// The page a helper thread faults on and the fake answers legitimately.
const LEGIT: u64 = 10;
/// An engine that fails because of a frame must fail well before this (its link timeout).
const STALL: Duration = Duration::from_secs(10);
/// ... and within this.
const PROMPT: Duration = Duration::from_secs(5);

fn fake_image() -> Synthetic {
    Synthetic::new(layout(SIZE), 77, 20)
}

fn welcome_for(image: &Synthetic, session: u64) -> Vec<u8> {
    encode(&Frame::Welcome(Welcome {
        stopped_unix_us: 0,
        session,
        layout: image.layout().clone(),
        image: image.info(),
    }))
}

// ---------------------------------------------------------------------------------------------
// Destination side: the engine against a scripted fake source.

/// The fake source's connections, by worker.
struct FakeConns {
    urgent: Vec<TcpStream>,
    bulk: Vec<TcpStream>,
    image: Synthetic,
}

impl FakeConns {
    /// Reads worker `w`'s next request (must be one) and answers it legitimately.
    fn answer_request(&mut self, w: usize) -> u64 {
        let f = read_frame(&mut self.urgent[w], Some(&layout(SIZE)))
            .expect("read request")
            .expect("a request before the connection closed");
        let Frame::Request { block, page, count } = f else {
            panic!("expected a Request, got {f:?}");
        };
        assert_eq!(block, 0);
        let reply = legit_pages(&self.image, page, u64::from(count));
        send(&mut self.urgent[w], &reply);
        page
    }

    /// Sends raw bytes on worker `w`'s urgent connection.
    fn urgent(&mut self, w: usize, bytes: &[u8]) {
        send(&mut self.urgent[w], bytes);
    }

    /// Keeps every connection open until the engine closes it: the engine must end because of
    /// what it received, not because the fake hung up.
    fn hold_until_engine_closes(&mut self) {
        for s in self.urgent.iter_mut().chain(self.bulk.iter_mut()) {
            assert!(
                drain_until_closed(s, Duration::from_secs(20)),
                "the engine did not close its connection"
            );
        }
    }
}

struct Hostile {
    result: Result<EngineReport, DestError>,
    elapsed: Duration,
    ram: Arc<DestRam>,
    image: Synthetic,
    /// (page, checksum the touching thread read).
    touched: Vec<(u64, u64)>,
}

impl Hostile {
    /// The engine's error (the test fails if the engine succeeded).
    fn error(&self) -> &DestError {
        match &self.result {
            Ok(r) => panic!("the engine accepted hostile input: {r:?}"),
            Err(e) => e,
        }
    }

    /// Asserts the engine ended promptly with an error whose message contains `needle`.
    fn assert_error_names(&self, needle: &str) {
        let msg = self.error().to_string();
        assert!(
            msg.contains(needle),
            "error {msg:?} does not name {needle:?}"
        );
        assert!(
            self.elapsed < PROMPT,
            "the engine took {:?} to reject the input ({msg})",
            self.elapsed
        );
    }

    /// Asserts the received bitmaps hold exactly `placed` (pages of block 0), that the touching
    /// threads read the image's contents for placed pages, and that every placed page holds the
    /// image's contents.
    fn assert_placed_exactly(&self, placed: &[u64]) {
        let got: Vec<u64> = (0..PAGES)
            .filter(|p| self.ram.received[0].get(*p))
            .collect();
        assert_eq!(got, placed, "pages placed");
        for &(p, sum) in &self.touched {
            if placed.contains(&p) {
                assert_eq!(sum, image_checksum(&self.image, p), "toucher of page {p}");
            }
        }
        for &p in placed {
            assert_eq!(
                self.read_checksum(p),
                image_checksum(&self.image, p),
                "page {p}"
            );
        }
    }

    /// Checksum of page `p` read now. The engine has ended, so an unplaced page no longer
    /// faults into it (reads as zero); the read is bounded anyway.
    fn read_checksum(&self, p: u64) -> u64 {
        let ram = self.ram.clone();
        let t = std::thread::spawn(move || {
            let mut buf = vec![0u8; PAGE as usize];
            ram.regions[0].read_into((p * PAGE) as usize, &mut buf);
            page_checksum(&buf)
        });
        join_within(t, Duration::from_secs(10), "read after the engine ended")
    }

    /// Asserts pages `[first, first + count)` (those inside the block) were not placed and read
    /// as zero now (the hostile payload never landed).
    fn assert_untouched(&self, first: u64, count: u64) {
        let zero = page_checksum(&[0u8; PAGE as usize]);
        for p in first..(first + count).min(PAGES) {
            assert!(!self.ram.received[0].get(p), "page {p} was placed");
            assert_eq!(self.read_checksum(p), zero, "page {p} holds hostile bytes");
        }
    }
}

/// Runs an engine of `workers` (stream on/off) against a fake source. Helper threads touch
/// `touches` (each blocks until placed or until the engine ends). `script` then drives the fake's
/// connections. Everything is bounded.
fn engine_vs_fake(
    workers: usize,
    stream: bool,
    touches: &[u64],
    script: impl FnOnce(&mut FakeConns) + Send + 'static,
) -> Hostile {
    engine_vs_fake_spec(Spec::new(workers, stream, touches), script)
}

/// What the fake source and the engine are configured with.
struct Spec {
    workers: usize,
    stream: bool,
    touches: Vec<u64>,
    /// The engine's link timeout.
    stall: Duration,
    /// The session id the fake puts in the Welcome of each (role, worker) connection.
    welcome_session: fn(Role, u16) -> u64,
}

impl Spec {
    fn new(workers: usize, stream: bool, touches: &[u64]) -> Spec {
        Spec {
            workers,
            stream,
            touches: touches.to_vec(),
            stall: STALL,
            welcome_session: |_, _| SESSION,
        }
    }
}

fn engine_vs_fake_spec(
    spec: Spec,
    script: impl FnOnce(&mut FakeConns) + Send + 'static,
) -> Hostile {
    let Spec {
        workers,
        stream,
        touches,
        stall,
        welcome_session,
    } = spec;
    let touches = &touches[..];
    let fake = FakeListener::bind();
    let addr = fake.addr;
    let image = fake_image();
    let fake_image = image.clone();
    let fake_thread = std::thread::spawn(move || {
        let mut urgent: Vec<Option<TcpStream>> = (0..workers).map(|_| None).collect();
        let mut bulk: Vec<Option<TcpStream>> = (0..workers).map(|_| None).collect();
        for i in 0..workers * (1 + usize::from(stream)) {
            let mut s = fake
                .accept(Duration::from_secs(10))
                .expect("engine connects");
            let hello = read_frame(&mut s, None)
                .expect("read Hello")
                .expect("a Hello");
            let Frame::Hello {
                session,
                role,
                worker,
                workers: n,
            } = hello
            else {
                panic!("expected Hello, got {hello:?}");
            };
            assert_eq!(usize::from(n), workers);
            assert_eq!(session, if i == 0 { 0 } else { SESSION });
            send(
                &mut s,
                &welcome_for(&fake_image, welcome_session(role, worker)),
            );
            let slot = match role {
                Role::Urgent => &mut urgent[usize::from(worker)],
                Role::Bulk => &mut bulk[usize::from(worker)],
                Role::Verify => panic!("the engine opened a verify connection"),
            };
            assert!(
                slot.replace(s).is_none(),
                "two {role:?} connections for worker {worker}"
            );
        }
        let mut conns = FakeConns {
            urgent: urgent
                .into_iter()
                .map(|s| s.expect("urgent connection"))
                .collect(),
            bulk: bulk.into_iter().flatten().collect(),
            image: fake_image,
        };
        script(&mut conns);
    });

    let config = EngineConfig {
        source: addr.to_string(),
        workers,
        pin: false,
        stream,
        link_timeout: stall,
        connect_timeout: Duration::from_secs(5),
        // These peers are hostile, not flaky: no reconnection (tests/recovery.rs covers it).
        recovery_timeout: Duration::ZERO,
        ..EngineConfig::default()
    };
    let t0 = Instant::now();
    let connected = dest::connect(&config).expect("handshake with the fake source");
    let ram = Arc::new(DestRam::new(&connected.welcome.layout).expect("DestRam"));
    // A bad handshake of a later connection fails `Engine::start` itself (the threads connect
    // before it returns); anything later ends the engine and comes out of `wait`.
    let handle = match Engine::start(connected, ram.clone(), &config) {
        Ok(h) => h,
        Err(e) => {
            let elapsed = t0.elapsed();
            join_within(fake_thread, Duration::from_secs(30), "fake source");
            return Hostile {
                result: Err(e),
                elapsed,
                ram,
                image,
                touched: Vec::new(),
            };
        }
    };
    let touchers: Vec<_> = touches
        .iter()
        .map(|&p| {
            let ram = ram.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; PAGE as usize];
                ram.regions[0].read_into((p * PAGE) as usize, &mut buf);
                (p, page_checksum(&buf))
            })
        })
        .collect();
    if !wait_until(stall + Duration::from_secs(10), || handle.is_finished()) {
        handle.stop();
    }
    let result = wait_engine(handle, STOP_GRACE, "engine (stopped past its link timeout)");
    let elapsed = t0.elapsed();
    // The engine has ended: its userfaultfds are closed, so blocked touches have resumed.
    let touched = touchers
        .into_iter()
        .map(|t| join_within(t, Duration::from_secs(10), "touching thread"))
        .collect();
    join_within(fake_thread, Duration::from_secs(30), "fake source");
    Hostile {
        result,
        elapsed,
        ram,
        image,
        touched,
    }
}

/// A protocol error's codec cause.
fn codec_cause(e: &DestError) -> &CodecError {
    match e {
        DestError::Protocol { source, .. } => source,
        other => panic!("expected DestError::Protocol, got {other:?} ({other})"),
    }
}

/// A legit exchange for page LEGIT on worker 0, then `bad` on worker 0's urgent connection.
fn legit_then(bad: Vec<u8>) -> impl FnOnce(&mut FakeConns) + Send + 'static {
    move |c| {
        assert_eq!(c.answer_request(0), LEGIT);
        c.urgent(0, &bad);
        c.hold_until_engine_closes();
    }
}

// a. Wrong handshake: `dest::connect` fails with a clear error, promptly.

/// The fake answers the Hello with `reply`, then holds the connection until the destination
/// closes it. Returns connect's result and how long it took.
fn handshake_vs(reply: Vec<u8>) -> (Result<dest::Connected, DestError>, Duration) {
    handshake_vs_with(reply, false)
}

fn handshake_vs_with(
    reply: Vec<u8>,
    zero_map: bool,
) -> (Result<dest::Connected, DestError>, Duration) {
    let fake = FakeListener::bind();
    let addr = fake.addr;
    let t = std::thread::spawn(move || {
        let mut s = fake.accept(Duration::from_secs(10)).expect("connect");
        let hello = read_frame(&mut s, None).expect("read Hello");
        assert!(
            matches!(
                hello,
                Some(Frame::Hello {
                    session: 0,
                    role: Role::Urgent,
                    worker: 0,
                    ..
                })
            ),
            "{hello:?}"
        );
        send(&mut s, &reply);
        drain_until_closed(&mut s, Duration::from_secs(20))
    });
    let config = EngineConfig {
        source: addr.to_string(),
        workers: 1,
        connect_timeout: Duration::from_secs(5),
        // These peers are hostile, not flaky: no reconnection (tests/recovery.rs covers it).
        recovery_timeout: Duration::ZERO,
        zero_map,
        ..EngineConfig::default()
    };
    let t0 = Instant::now();
    let r = dest::connect(&config);
    let elapsed = t0.elapsed();
    // The destination dropped its connection when connect failed.
    if r.is_err() {
        assert!(
            join_within(t, Duration::from_secs(30), "fake source"),
            "connection not closed"
        );
    }
    (r, elapsed)
}

fn handshake_error(reply: Vec<u8>, needle: &str) -> DestError {
    let (r, elapsed) = handshake_vs(reply);
    let e = match r {
        Ok(c) => panic!("connect accepted a bad handshake: {:?}", c.welcome),
        Err(e) => e,
    };
    let msg = e.to_string();
    assert!(
        msg.contains(needle),
        "error {msg:?} does not name {needle:?}"
    );
    assert!(elapsed < Duration::from_secs(2), "took {elapsed:?} ({msg})");
    e
}

#[test]
fn handshake_bad_magic() {
    let reply = b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n".to_vec();
    let e = handshake_error(reply, "it sent \"HTTP\" where a frame starts");
    assert!(matches!(codec_cause(&e), CodecError::BadMagic(_)), "{e:?}");
    assert!(e.to_string().contains("not a postcopy page server"), "{e}");
}

#[test]
fn handshake_wrong_version() {
    let mut reply = welcome_for(&fake_image(), SESSION);
    // An older source (protocol 1: frames with a BLAKE3 MAC), and a newer one.
    for got in [1, postcopy::codec::VERSION + 1] {
        reply[4] = got;
        let e = handshake_error(
            reply.clone(),
            &format!("protocol version {got} not supported"),
        );
        assert_eq!(codec_cause(&e), &CodecError::BadVersion { got });
    }
}

#[test]
fn handshake_error_frame_instead_of_welcome() {
    let reply = encode(&Frame::Error(
        "busy: too many sessions on this source; retry later".into(),
    ));
    let e = handshake_error(reply, "busy: too many sessions");
    assert!(matches!(e, DestError::Remote(_)), "{e:?}");
}

#[test]
fn handshake_welcome_with_invalid_layout() {
    let bad = Layout {
        blocks: vec![Block {
            name: "pc.ram".into(),
            size_bytes: 3000 * 16,
            page_size: 3000,
        }],
    };
    let reply = encode(&Frame::Welcome(Welcome {
        stopped_unix_us: 0,
        session: SESSION,
        layout: bad,
        image: ImageInfo::Opaque,
    }));
    let e = handshake_error(reply, "page size 3000");
    assert!(
        matches!(
            codec_cause(&e),
            CodecError::Range(LayoutError::BadPageSize {
                page_size: 3000,
                ..
            })
        ),
        "{e:?}"
    );
}

#[test]
fn handshake_other_frame_instead_of_welcome() {
    // A Pages frame (with its one-page body) where the Welcome should be.
    let image = fake_image();
    let reply = legit_pages(
        &image,
        (0..PAGES).find(|p| !image.is_zero(0, *p)).unwrap(),
        1,
    );
    let e = handshake_error(reply, "unexpected Pages frame");
    assert!(
        matches!(
            codec_cause(&e),
            CodecError::Unexpected {
                got: Kind::Pages,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn handshake_huge_body_header_rejected_before_reading_body() {
    // A Pages header declaring a 1 GiB body, and nothing after it: the kind alone says this is
    // not a Welcome, so the destination must not wait for (or allocate) the body.
    let mut h = [0u8; HEADER_BYTES];
    Header {
        kind: Kind::Pages,
        count: 1,
        body_len: 1 << 30,
        block: 0,
        page: 0,
        mask: 0,
    }
    .encode(&mut h);
    let e = handshake_error(h.to_vec(), "unexpected Pages frame");
    assert!(matches!(e, DestError::Protocol { .. }), "{e:?}");
}

// b. Malformed frames mid-session.

#[test]
fn unknown_kind_mid_session() {
    let mut bad = header_bytes(&Header::request(0, 5, 1));
    bad[5] = 99;
    let h = engine_vs_fake(1, false, &[LEGIT], legit_then(bad));
    h.assert_error_names("unknown frame kind 99");
    assert_eq!(codec_cause(h.error()), &CodecError::UnknownKind(99));
    h.assert_placed_exactly(&[LEGIT]);
}

#[test]
fn request_frame_sent_to_destination() {
    let bad = header_bytes(&Header::request(0, 5, 1));
    let h = engine_vs_fake(1, false, &[LEGIT], legit_then(bad));
    h.assert_error_names("unexpected Request frame");
    assert!(
        matches!(
            codec_cause(h.error()),
            CodecError::Unexpected {
                got: Kind::Request,
                ..
            }
        ),
        "{:?}",
        h.error()
    );
    h.assert_placed_exactly(&[LEGIT]);
}

#[test]
fn malformed_pages_headers() {
    for (count, mask, needle) in [
        (0u16, 0u64, "page count 0"),
        (65, 0, "page count 65"),
        (3, 0b1000, "marks pages beyond the batch of 3"),
    ] {
        let bad = header_bytes(&Header {
            kind: Kind::Pages,
            count,
            body_len: 0,
            block: 0,
            page: 300,
            mask,
        });
        let h = engine_vs_fake(1, false, &[LEGIT], legit_then(bad));
        h.assert_error_names(needle);
        h.assert_placed_exactly(&[LEGIT]);
        h.assert_untouched(300, u64::from(count.max(1)));
    }
}

#[test]
fn malformed_frame_on_bulk_connection() {
    // The stream sends one legitimate batch, then garbage.
    let h = engine_vs_fake(1, true, &[], |c| {
        let batch = legit_pages(&c.image, 0, 64);
        send(&mut c.bulk[0], &batch);
        send(&mut c.bulk[0], &[0xEE; HEADER_BYTES]);
        c.hold_until_engine_closes();
    });
    h.assert_error_names("bulk connection");
    assert!(
        matches!(codec_cause(h.error()), CodecError::BadMagic(_)),
        "{:?}",
        h.error()
    );
    h.assert_placed_exactly(&(0..64).collect::<Vec<_>>());
}

#[test]
fn error_frame_mid_session() {
    let bad = encode(&Frame::Error("image file vanished".into()));
    let h = engine_vs_fake(1, false, &[LEGIT], legit_then(bad));
    h.assert_error_names("image file vanished");
    assert!(matches!(h.error(), DestError::Remote(_)), "{:?}", h.error());
    h.assert_placed_exactly(&[LEGIT]);
}

// c. Out-of-range pages: rejected by the range check before any placement.

/// A Pages header for `[page, page + count)` of `block` with a full body of 0xAB bytes.
fn junk_pages(block: u32, page: u64, count: u16) -> Vec<u8> {
    let mut out = header_bytes(&Header::pages(block, page, count, 0, PAGE));
    out.resize(HEADER_BYTES + usize::from(count) * PAGE as usize, 0xAB);
    out
}

#[test]
fn pages_past_the_block_end() {
    for (block, page, count) in [
        (0, PAGES - 2, 4), // starts inside, ends outside
        (0, PAGES, 1),     // just past the end
        (0, u64::MAX, 2),  // overflows
        (1, 0, 1),         // a block that does not exist
    ] {
        let h = engine_vs_fake(
            1,
            false,
            &[LEGIT],
            legit_then(junk_pages(block, page, count)),
        );
        h.assert_error_names("outside the layout");
        assert!(
            matches!(
                codec_cause(h.error()),
                CodecError::Range(LayoutError::OutOfRange { .. })
            ),
            "{:?}",
            h.error()
        );
        h.assert_placed_exactly(&[LEGIT]);
        if block == 0 && page < PAGES {
            h.assert_untouched(page, u64::from(count));
        }
    }
}

#[test]
fn pages_in_another_workers_shard() {
    // Two workers: worker 0 owns [0, PAGES/2). Its connection carries pages of worker 1.
    for (page, count) in [(PAGES / 2 - 1, 2), (PAGES / 2 + 10, 1), (PAGES - 64, 64)] {
        let bad = junk_pages(0, page, count);
        let h = engine_vs_fake(2, false, &[LEGIT], legit_then(bad));
        h.assert_error_names(&format!("worker 0 serves pages [0, {})", PAGES / 2));
        assert!(
            matches!(
                codec_cause(h.error()),
                CodecError::Range(LayoutError::OutOfRange { .. })
            ),
            "{:?}",
            h.error()
        );
        h.assert_placed_exactly(&[LEGIT]);
        h.assert_untouched(page, u64::from(count));
    }
}

// d. A truncated batch: no partial page is placed.

#[test]
fn truncated_batch() {
    const FIRST: u64 = 100;
    let h = engine_vs_fake(1, false, &[LEGIT], |c| {
        assert_eq!(c.answer_request(0), LEGIT);
        let mut bad = header_bytes(&Header::pages(0, FIRST, 4, 0, PAGE));
        bad.resize(HEADER_BYTES + PAGE as usize * 3 / 2, 0xAB);
        c.urgent(0, &bad);
        // Close our sending side; keep reading until the engine closes its side.
        let _ = c.urgent[0].shutdown(std::net::Shutdown::Write);
        c.hold_until_engine_closes();
    });
    let e = h.error();
    assert!(
        matches!(e, DestError::Closed("urgent", _) | DestError::Io { .. }),
        "{e:?}"
    );
    h.assert_error_names("closed");
    h.assert_placed_exactly(&[LEGIT]);
    h.assert_untouched(FIRST, 4);
}

// e. A body length inconsistent with the zero mask.

#[test]
fn body_length_inconsistent_with_zero_mask() {
    // (mask, pages of body sent): 4 pages, two of them zero, but 3 pages of payload; 4 zero
    // pages with one page of payload; no zero page with a body one byte short.
    for (mask, body) in [(0b0101u64, 3 * PAGE), (0b1111, PAGE), (0, 4 * PAGE - 1)] {
        let mut bad = header_bytes(&Header {
            kind: Kind::Pages,
            count: 4,
            body_len: body as u32,
            block: 0,
            page: 200,
            mask,
        });
        bad.resize(HEADER_BYTES + body as usize, 0xAB);
        let h = engine_vs_fake(1, false, &[LEGIT], legit_then(bad));
        h.assert_error_names(&format!("Pages frame has a body of {body} bytes"));
        assert!(
            matches!(
                codec_cause(h.error()),
                CodecError::BodyLength {
                    kind: Kind::Pages,
                    ..
                }
            ),
            "{:?}",
            h.error()
        );
        h.assert_placed_exactly(&[LEGIT]);
        h.assert_untouched(200, 4);
    }
}

// f. A second worker's failure, and a source that stops answering.

#[test]
fn error_on_second_worker_is_reported() {
    // The error that ended the migration is worker 1's, not worker 0's consequent `Stopped`.
    // Worker 1 (pages [PAGES/2, PAGES)) gets a malformed frame on its own urgent connection.
    let mut bad = header_bytes(&Header::request(0, 5, 1));
    bad[5] = 99;
    let legit = PAGES / 2 + 10;
    let h = engine_vs_fake(2, false, &[legit], move |c| {
        assert_eq!(c.answer_request(1), legit);
        c.urgent(1, &bad);
        c.hold_until_engine_closes();
    });
    h.assert_error_names("unknown frame kind 99");
    h.assert_placed_exactly(&[legit]);
}

#[test]
fn second_workers_welcome_names_another_session() {
    let mut spec = Spec::new(2, false, &[]);
    spec.welcome_session = |_, worker| if worker == 1 { SESSION + 2 } else { SESSION };
    let h = engine_vs_fake_spec(spec, |c| c.hold_until_engine_closes());
    h.assert_error_names("a different session or layout");
    h.assert_placed_exactly(&[]);
}

#[test]
fn silent_source_stalls() {
    // The fake reads the request and never answers: the engine gives up after its stall
    // timeout with a clear error, and the faulting thread resumes.
    let mut spec = Spec::new(1, false, &[LEGIT]);
    spec.stall = Duration::from_secs(1);
    let h = engine_vs_fake_spec(spec, |c| {
        let f = read_frame(&mut c.urgent[0], None).expect("read request");
        assert!(
            matches!(f, Some(Frame::Request { page: LEGIT, .. })),
            "{f:?}"
        );
        c.hold_until_engine_closes();
    });
    assert!(
        matches!(h.error(), DestError::Stalled { .. }),
        "{:?}",
        h.error()
    );
    h.assert_error_names("nothing from the source on");
    h.assert_placed_exactly(&[]);
}

#[test]
fn partially_answering_source_stalls() {
    // Two requests outstanding; the fake answers the first and goes silent on the second.
    const OTHER: u64 = 3000;
    let mut spec = Spec::new(1, false, &[LEGIT, OTHER]);
    spec.stall = Duration::from_secs(1);
    let h = engine_vs_fake_spec(spec, |c| {
        let mut asked = Vec::new();
        while asked.len() < 2 {
            match read_frame(&mut c.urgent[0], None).expect("read request") {
                Some(Frame::Request { page, count: 1, .. }) => asked.push(page),
                other => panic!("expected a one-page request, got {other:?}"),
            }
        }
        asked.sort_unstable();
        assert_eq!(asked, [LEGIT, OTHER]);
        send(&mut c.urgent[0], &legit_pages(&c.image, LEGIT, 1));
        c.hold_until_engine_closes();
    });
    assert!(
        matches!(h.error(), DestError::Stalled { .. }),
        "{:?}",
        h.error()
    );
    h.assert_error_names("nothing from the source on");
    h.assert_placed_exactly(&[LEGIT]);
}

// ---------------------------------------------------------------------------------------------
// Source side: a fake destination against a real SourceServer.

fn client(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect to source");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// A `Hello` as worker 0 of 1.
fn hello_frame(session: u64, role: Role) -> Vec<u8> {
    encode(&Frame::Hello {
        session,
        role,
        worker: 0,
        workers: 1,
    })
}

/// A new session's first connection: Hello, then the Welcome.
fn handshake(addr: SocketAddr) -> (TcpStream, Welcome) {
    let mut s = client(addr);
    send(&mut s, &hello_frame(0, Role::Urgent));
    match read_frame(&mut s, None).expect("read Welcome") {
        Some(Frame::Welcome(w)) => (s, w),
        other => panic!("expected Welcome, got {other:?}"),
    }
}

/// Reads the next frame: it must be an `Error`; then the source must close the connection.
fn expect_error_and_close(s: &mut TcpStream, needle: &str) -> String {
    let f = read_frame(s, None).expect("read the source's reply");
    let msg = expect_error_frame(f, needle);
    assert!(
        msg.contains(needle),
        "error {msg:?} does not name {needle:?}"
    );
    assert!(
        drain_until_closed(s, Duration::from_secs(10)),
        "the source did not close the connection after {msg:?}"
    );
    msg
}

/// Runs `case` against a fresh server (`once: false`), then a normal verified migration against
/// the same server, then stops it. `hostile_sessions` is how many sessions the case opened: each
/// must have ended with an error, and the good one must be complete.
fn hostile_source(hostile_sessions: usize, case: impl FnOnce(SocketAddr, &Synthetic)) {
    let source = Source::start(&SourceOptions {
        size_bytes: SIZE,
        seed: 99,
        zero_percent: 20,
        once: false,
        // A hostile client's dropped connection ends its session at once.
        recovery_timeout: Duration::ZERO,
        ..Default::default()
    });
    case(source.addr, &source.image);
    let out = run_dest(source.addr, &DestOptions::default());
    out.assert_verified();
    let reports = source.stop_and_join();
    assert_eq!(
        reports.len(),
        hostile_sessions + 1,
        "every session ended: {reports:#?}"
    );
    assert_eq!(complete_sessions(&reports), 1, "{reports:#?}");
    for r in reports.iter().filter(|r| !r.complete) {
        assert!(r.error.is_some(), "a failed session names its error: {r:?}");
    }
}

#[test]
fn source_rejects_bad_magic() {
    hostile_source(0, |addr, _| {
        let mut s = client(addr);
        send(&mut s, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
        expect_error_and_close(&mut s, "it sent \"GET \" where a frame starts");
    });
}

#[test]
fn source_rejects_unknown_kind() {
    hostile_source(1, |addr, _| {
        // As the first frame.
        let mut s = client(addr);
        let mut bad = header_bytes(&Header::request(0, 0, 1));
        bad[5] = 99;
        send(&mut s, &bad);
        expect_error_and_close(&mut s, "unknown frame kind 99");
        // Mid-session.
        let (mut s, _) = handshake(addr);
        send(&mut s, &bad);
        expect_error_and_close(&mut s, "unknown frame kind 99");
    });
}

/// A source stopped while a destination is mid-migration reports that session (nothing goes
/// unreported), as ended by the stop with the migration incomplete.
#[test]
fn stopped_source_reports_the_session_in_progress() {
    let source = Source::start(&SourceOptions {
        size_bytes: SIZE,
        seed: 7,
        once: false,
        ..Default::default()
    });
    let (conn, _) = handshake(source.addr);
    let t0 = Instant::now();
    let reports = source.stop_and_join();
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "stop took {:?}",
        t0.elapsed()
    );
    assert_eq!(reports.len(), 1, "{reports:#?}");
    assert!(!reports[0].complete);
    let err = reports[0].error.as_deref().unwrap_or_default();
    assert!(
        err.contains("stopped with the migration incomplete"),
        "{err:?}"
    );
    drop(conn);
}

#[test]
fn source_rejects_request_before_hello() {
    hostile_source(0, |addr, _| {
        let mut s = client(addr);
        send(&mut s, &header_bytes(&Header::request(0, 0, 1)));
        expect_error_and_close(&mut s, "unexpected Request frame while expecting Hello");
    });
}

#[test]
fn source_rejects_bad_hellos() {
    hostile_source(0, |addr, _| {
        // Joining a session that does not exist (ids are odd: 2 never exists).
        for role in [Role::Urgent, Role::Bulk] {
            let mut s = client(addr);
            send(&mut s, &hello_frame(2, role));
            expect_error_and_close(&mut s, "unknown session 0x2");
        }
        // A new session must start on worker 0's urgent connection.
        let mut s = client(addr);
        send(&mut s, &hello_frame(0, Role::Bulk));
        expect_error_and_close(&mut s, "worker 0's urgent connection");
        // A role that does not exist.
        let mut s = client(addr);
        let mut h = Header::hello(0, Role::Urgent, 0, 1);
        h.block = 7;
        send(&mut s, &header_bytes(&h));
        expect_error_and_close(&mut s, "role 7");
    });
}

#[test]
fn source_rejects_out_of_range_request() {
    hostile_source(4, |addr, _| {
        for (block, page, count) in [
            (0, PAGES, 1u16),
            (0, PAGES - 1, 2),
            (1, 0, 1),
            (0, u64::MAX, MAX_REQUEST_PAGES),
        ] {
            let (mut s, _) = handshake(addr);
            send(&mut s, &header_bytes(&Header::request(block, page, count)));
            expect_error_and_close(&mut s, "outside the layout");
        }
    });
}

#[test]
fn source_rejects_pages_frame() {
    hostile_source(1, |addr, image| {
        let (mut s, _) = handshake(addr);
        send(&mut s, &legit_pages(image, 0, 1));
        expect_error_and_close(&mut s, "unexpected Pages frame");
    });
}

#[test]
fn source_survives_request_flood() {
    const FLOOD: u64 = 100_000;
    hostile_source(2, |addr, image| {
        let total = PAGES;
        let requests: Vec<u8> = (0..FLOOD)
            .flat_map(|i| header_bytes(&Header::request(0, (i * 7919) % total, 1)))
            .collect();

        // 1. A reader drains the replies: the source answers every request, in order, with the
        // right contents, and memory stays bounded.
        let (mut s, _) = handshake(addr);
        let base = rss_bytes();
        let mut r = s.try_clone().unwrap();
        let image2 = image.clone();
        let reader = std::thread::spawn(move || {
            let mut pages = 0u64;
            let mut peak = 0u64;
            let mut buf = vec![0u8; PAGE as usize];
            while pages < FLOOD {
                let Some((h, bytes)) = read_raw_frame(&mut r).expect("read reply") else {
                    break;
                };
                assert_eq!(h.kind, Kind::Pages, "reply {pages}");
                let (f, _) = Frame::decode(&bytes, None).expect("decode reply");
                let Frame::Pages {
                    page,
                    count,
                    zero_mask,
                    payload,
                    ..
                } = f
                else {
                    unreachable!()
                };
                assert_eq!((page, count), ((pages * 7919) % total, 1), "reply order");
                let sum = if zero_mask & 1 == 1 {
                    page_checksum(&[0u8; PAGE as usize])
                } else {
                    page_checksum(&payload)
                };
                image2.fill(0, page, &mut buf);
                assert_eq!(sum, page_checksum(&buf), "contents of page {page}");
                pages += 1;
                if pages % 4096 == 0 {
                    peak = peak.max(rss_bytes());
                }
            }
            (pages, peak)
        });
        send(&mut s, &requests);
        let (pages, peak) = join_within(reader, Duration::from_secs(60), "flood reader");
        assert_eq!(pages, FLOOD, "every request answered");
        let growth = peak.saturating_sub(base);
        assert!(growth < 256 * MIB, "RSS grew by {} MiB", growth / MIB);
        // Hang up without End: the source ends the session.
        s.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(drain_until_closed(&mut s, Duration::from_secs(10)));

        // 2. A client that never reads: TCP pushes back, the source buffers a bounded amount,
        // and when the client goes away the session ends.
        let (mut s, _) = handshake(addr);
        s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
        let base = rss_bytes();
        let _ = s.write_all(&requests); // times out once both sides' buffers are full
        let growth = rss_bytes().saturating_sub(base);
        assert!(growth < 256 * MIB, "RSS grew by {} MiB", growth / MIB);
        drop(s);
    });
}

/// A zero-page map is input like any other: a map past the block end, or another frame where
/// the map should be, ends the handshake with an error naming it.
#[test]
fn hostile_zero_map() {
    let image = fake_image();
    let pages = image.layout().blocks[0].pages();
    for (tail, needle) in [
        (
            encode(&Frame::ZeroMap {
                block: 0,
                page: pages - 4,
                pages: 8,
                bits: vec![0xff],
            }),
            "outside the layout",
        ),
        (
            encode(&Frame::ZeroMap {
                block: 3,
                page: 0,
                pages: 8,
                bits: vec![0xff],
            }),
            "outside the layout",
        ),
        (junk_pages(0, 0, 1), "unexpected Pages"),
    ] {
        let mut reply = welcome_for(&image, SESSION);
        reply.extend_from_slice(&tail);
        let (r, elapsed) = handshake_vs_with(reply, true);
        let msg = match r {
            Ok(_) => panic!("a bad zero-page map was accepted ({needle})"),
            Err(e) => e.to_string(),
        };
        assert!(
            msg.contains(needle),
            "error {msg:?} does not name {needle:?}"
        );
        assert!(elapsed < Duration::from_secs(2), "took {elapsed:?} ({msg})");
    }
}

#[test]
fn source_rejects_wrong_version() {
    hostile_source(0, |addr, _| {
        let mut s = client(addr);
        let mut bad = hello_frame(0, Role::Urgent);
        bad[4] = 9;
        send(&mut s, &bad);
        expect_error_and_close(&mut s, "protocol version 9 not supported");
    });
}

#[test]
fn source_rejects_duplicated_handshake() {
    hostile_source(1, |addr, _| {
        let (mut s, _) = handshake(addr);
        send(&mut s, &hello_frame(0, Role::Urgent));
        expect_error_and_close(&mut s, "unexpected Hello frame");
    });
}

#[test]
fn source_rejects_lengths_past_the_frame() {
    hostile_source(2, |addr, _| {
        // A Request announcing a body (requests have none).
        let (mut s, _) = handshake(addr);
        let mut h = Header::request(0, 0, 1);
        h.body_len = 16;
        send(&mut s, &header_bytes(&h));
        expect_error_and_close(&mut s, "has a body of 16 bytes");
        // An Error frame announcing more than an error may carry: refused before reading it.
        let (mut s, _) = handshake(addr);
        let mut h = Header::control(Kind::End, 0);
        h.kind = Kind::Error;
        h.body_len = 1 << 30;
        send(&mut s, &header_bytes(&h));
        expect_error_and_close(&mut s, "allowed: 4096");
    });
}

#[test]
fn duplicated_welcome_mid_session_is_refused() {
    let image = fake_image();
    let welcome = welcome_for(&image, SESSION);
    let h = engine_vs_fake(1, false, &[LEGIT], move |c| {
        // A second Welcome where a reply is expected.
        let _ = read_frame(&mut c.urgent[0], None);
        c.urgent(0, &welcome);
        c.hold_until_engine_closes();
    });
    h.assert_error_names("unexpected Welcome frame");
    h.assert_placed_exactly(&[]);
}
