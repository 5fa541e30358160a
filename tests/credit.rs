//! The receiver-driven stream: a credit-driven bulk connection carries no more `Pages` frames
//! than its destination granted, whatever the timing; migrations with a fault-latency target
//! verify, authenticated or not, and survive breaks of their connections.

mod common;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use postcopy::codec::{Frame, Header, Kind, Role};

const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a source with no credit is watched for a frame it must not send.
const QUIET: Duration = Duration::from_millis(300);

fn client(addr: std::net::SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect to source");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// The next frame other than a heartbeat, or `None` if none comes within `within`.
fn next_frame(s: &mut TcpStream, within: Duration) -> Option<(Header, Vec<u8>)> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match read_raw_frame(s) {
            Ok(Some((h, _))) if h.kind == Kind::Heartbeat => continue,
            Ok(Some(f)) => return Some(f),
            Ok(None) => panic!("the source closed the bulk connection"),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return None
            }
            Err(e) => panic!("read from the source: {e}"),
        }
    }
}

/// Checks a `Pages` frame's every page against the image; its page count.
fn check_batch(source: &Source, (h, frame): &(Header, Vec<u8>)) -> u64 {
    assert_eq!(h.kind, Kind::Pages, "only Pages before the stream's End");
    let mut page = vec![0u8; 4096];
    let mut at = postcopy::codec::HEADER_BYTES;
    for i in 0..u64::from(h.count) {
        if h.mask >> i & 1 == 1 {
            continue; // a zero page: a mask bit, no bytes
        }
        expected_page(&source.image, h.block, h.page + i, false, &mut page);
        assert!(
            frame[at..at + 4096] == page[..],
            "page {} differs",
            h.page + i
        );
        at += 4096;
    }
    assert_eq!(at, frame.len(), "the body holds exactly the non-zero pages");
    u64::from(h.count)
}

fn grant(s: &mut TcpStream, total: u64) {
    send(s, &encode(&Frame::Credit(total)));
}

#[test]
fn a_credit_driven_stream_sends_no_more_batches_than_granted() {
    let source = Source::start(&SourceOptions {
        size_bytes: 4 * MIB,
        once: true,
        ..Default::default()
    });
    let mut urgent = client(source.addr);
    send(
        &mut urgent,
        &encode(&Frame::Hello {
            session: 0,
            role: Role::Urgent,
            worker: 0,
            workers: 1,
        }),
    );
    let Some(Frame::Welcome(w)) = read_frame(&mut urgent, None).expect("Welcome") else {
        panic!("expected a Welcome");
    };
    let mut bulk = client(source.addr);
    let hello = Header::hello(w.session, Role::Bulk, 0, 1).with_credit();
    send(&mut bulk, &header_bytes(&hello));
    match read_frame(&mut bulk, None).expect("the bulk connection's Welcome") {
        Some(Frame::Welcome(b)) => assert_eq!(b.session, w.session),
        other => panic!("expected a Welcome, got {other:?}"),
    }

    // Nothing without credit; then exactly what each running total allows (the image has
    // more batches than the totals granted here).
    if let Some((h, f)) = next_frame(&mut bulk, QUIET) {
        panic!(
            "a frame without credit: {h:?} {:?}",
            String::from_utf8_lossy(&f[32..])
        );
    }
    let (mut frames, mut pages) = (0u64, 0u64);
    for (total, late) in [(3u64, 0u64), (5, 4), (6, 2)] {
        grant(&mut bulk, total);
        if late > 0 {
            grant(&mut bulk, late); // a smaller total, late: changes nothing
        }
        while let Some(f) = next_frame(&mut bulk, QUIET) {
            pages += check_batch(&source, &f);
            frames += 1;
        }
        assert_eq!(frames, total, "batches sent for a running total of {total}");
    }
    // The rest of the stream, then its End.
    let all = w.layout.total_pages();
    grant(&mut bulk, all.div_ceil(64) + 1);
    loop {
        let f = next_frame(&mut bulk, IO_TIMEOUT).expect("the rest of the stream");
        if f.0.kind == Kind::End {
            break;
        }
        pages += check_batch(&source, &f);
    }
    assert_eq!(pages, all, "every page of the image streamed once");
}

fn target_run(key: Option<postcopy::link::auth::Key>, target_us: u64) {
    let src = SourceOptions {
        size_bytes: 64 * MIB,
        key: key.clone(),
        ..Default::default()
    };
    let dst = DestOptions {
        fault_latency_target: Some(Duration::from_micros(target_us)),
        key,
        ..Default::default()
    };
    let (out, report) = migrate(&src, &dst);
    out.assert_verified();
    assert!(report.complete, "the source's session completed");
    let totals = &out.report().totals;
    assert!(totals.credits_granted > 0, "the stream was credit-driven");
    assert!(totals.pages_by_stream > 0, "the stream placed pages");
}

#[test]
fn migrations_with_a_fault_latency_target_verify() {
    target_run(None, 100);
    target_run(None, 5_000);
    target_run(
        Some(postcopy::link::auth::Key::from_secret(
            b"credit test key, 32 bytes long",
        )),
        300,
    );
}
