//! The userfaultfd and io_uring wrappers against the real kernel (no mocks).
//!
//! Every blocking step has a timeout: the descriptor is polled before each read, and threads
//! that fault report through a channel read with `recv_timeout`, so a bug fails a test instead
//! of hanging it. Memory that a faulting thread touches is shared through an `Arc`, so if a test
//! fails while the thread is blocked, closing the userfaultfd wakes it onto live memory (it then
//! reads a zero page) rather than onto an unmapped range.

mod common;

use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use postcopy::sys::mem::*;
use postcopy::sys::ring::*;
use postcopy::sys::uffd::*;

const TIMEOUT: Duration = Duration::from_secs(5);

fn page() -> usize {
    base_page_size()
}

/// A fresh userfaultfd with `features` and an anonymous mapping of `pages` registered MISSING.
fn setup(pages: usize, features: u64) -> (Uffd, Arc<Mapping>) {
    let uffd = Uffd::open(false).expect("open userfaultfd (run as root)");
    let info = uffd.api(features).expect("UFFDIO_API");
    assert_eq!(info.features & features, features);
    let m = Mapping::anonymous(pages * page(), "test region").expect("mmap");
    let ioctls = uffd
        .register(m.addr(), m.len_bytes(), mode::MISSING)
        .expect("UFFDIO_REGISTER");
    assert_eq!(
        ioctls & (ioctl_bit::COPY | ioctl_bit::WAKE | ioctl_bit::ZEROPAGE),
        ioctl_bit::COPY | ioctl_bit::WAKE | ioctl_bit::ZEROPAGE,
        "range ioctls {:?}",
        ioctl_bit::names(ioctls)
    );
    (uffd, Arc::new(m))
}

/// A page-sized buffer whose bytes depend on `seed` and their offset (never all zero).
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ ((i >> 8) as u8))
        .collect()
}

/// Reads registered memory on a helper thread, failing (not hanging) if a page is still
/// missing: a read of a missing page blocks until someone places it, and nobody would.
fn read_back(m: &Arc<Mapping>, offset: usize, len: usize) -> Vec<u8> {
    let m = Arc::clone(m);
    let (rx, h) = spawn(move || read_plain(&m, offset, len));
    join(
        rx,
        h,
        "read of registered memory (a page is still missing?)",
    )
}

/// Reads memory that is not registered (it cannot block).
fn read_plain(m: &Mapping, offset: usize, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    m.read_into(offset, &mut out);
    out
}

/// Asserts two byte runs are equal, naming the first differing byte instead of dumping pages.
fn assert_bytes_eq(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(at) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: byte {at} (page {}) is {:#x}, want {:#x}",
            at / page(),
            got[at],
            want[at]
        );
    }
}

/// Waits (bounded) until the descriptor is readable.
fn wait_readable(fd: &impl AsFd, timeout: Duration) -> bool {
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    let ms = PollTimeout::try_from(timeout).expect("timeout fits");
    match poll(&mut fds, ms) {
        Ok(n) => n > 0,
        Err(Errno::EINTR) => false,
        Err(e) => panic!("poll: {e}"),
    }
}

/// Reads every pending event, after waiting (bounded) for at least one.
fn read_events(uffd: &Uffd) -> Vec<Event> {
    assert!(
        wait_readable(uffd, TIMEOUT),
        "no userfaultfd event within {TIMEOUT:?}"
    );
    let mut buf = [0u8; MSG_BYTES * 16];
    let n = uffd.read_events(&mut buf).expect("read events");
    assert!(n > 0 && n % MSG_BYTES == 0, "read {n} bytes");
    Event::decode_all(&buf[..n]).collect()
}

/// Runs `f` on a thread; its result comes back through the receiver (use `recv_timeout`).
fn spawn<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> (mpsc::Receiver<T>, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    (rx, h)
}

/// Waits for a spawned thread's result, failing (not hanging) after `TIMEOUT`.
fn join<T>(rx: mpsc::Receiver<T>, h: std::thread::JoinHandle<()>, what: &str) -> T {
    let v = rx
        .recv_timeout(TIMEOUT)
        .unwrap_or_else(|e| panic!("{what}: thread did not finish within {TIMEOUT:?}: {e}"));
    common::join_within(h, TIMEOUT, what);
    v
}

#[test]
fn copy_places_eight_pages_in_one_call() {
    let p = page();
    let (uffd, m) = setup(8, feature::EVENT_REMOVE | feature::THREAD_ID);
    let src = pattern(1, 8 * p);
    uffd.copy(m.addr(), src.as_ptr(), 8 * p, false)
        .expect("8-page UFFDIO_COPY");
    // Present now: reading cannot fault.
    assert_bytes_eq(&read_back(&m, 0, 8 * p), &src, "8 copied pages");
}

#[test]
fn dontwake_copy_then_one_wake_resumes_the_faulting_thread() {
    let p = page();
    let (uffd, m) = setup(2, feature::EVENT_REMOVE | feature::THREAD_ID);
    let resumed = Arc::new(AtomicBool::new(false));
    let (tid_tx, tid_rx) = mpsc::channel();
    let (rx, h) = {
        let (m, resumed) = (Arc::clone(&m), Arc::clone(&resumed));
        spawn(move || {
            let _ = tid_tx.send(nix::unistd::gettid().as_raw());
            let v = m.touch(5); // blocks in the fault until woken
            resumed.store(true, Ordering::SeqCst);
            v
        })
    };
    let tid = tid_rx.recv_timeout(TIMEOUT).expect("thread started");
    let events = read_events(&uffd);
    assert_eq!(events.len(), 1, "{events:?}");
    match events[0] {
        Event::PageFault {
            address, thread_id, ..
        } => {
            // Page-aligned: EXACT_ADDRESS was not asked for.
            assert_eq!(address, m.addr() as u64);
            assert_eq!(thread_id as i32, tid, "THREAD_ID names the faulting thread");
        }
        other => panic!("expected a page fault, got {other:?}"),
    }
    let src = pattern(2, p);
    uffd.copy(m.addr(), src.as_ptr(), p, true)
        .expect("DONTWAKE copy");
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        !resumed.load(Ordering::SeqCst),
        "thread resumed before UFFDIO_WAKE although the copy was DONTWAKE"
    );
    assert!(matches!(rx.try_recv(), Err(mpsc::TryRecvError::Empty)));
    uffd.wake(m.addr(), p).expect("UFFDIO_WAKE");
    let v = join(rx, h, "faulting thread");
    assert!(resumed.load(Ordering::SeqCst));
    assert_eq!(v, src[5], "the thread read the placed page");
    assert_bytes_eq(&read_back(&m, 0, p), &src, "placed page");
}

/// Places `[dst, dst + len)` from `src` like the engine does: a partial copy resumes after the
/// placed bytes; an existing page is woken and skipped. Returns what each call did.
fn place_all(uffd: &Uffd, dst: usize, src: &[u8]) -> Vec<Result<(), PlaceError>> {
    let p = page();
    let mut log = Vec::new();
    let mut done = 0;
    while done < src.len() {
        let r = uffd.copy(dst + done, src[done..].as_ptr(), src.len() - done, false);
        log.push(r);
        match r {
            Ok(()) => done = src.len(),
            Err(e) => match e.kind {
                PlaceErrorKind::Partial => done += e.done_bytes,
                PlaceErrorKind::Exists => {
                    // The page at the stop is present: wake anyone waiting on it, skip it.
                    let at = dst + done + e.done_bytes;
                    uffd.wake(at, p).expect("wake existing page");
                    done += e.done_bytes + p;
                }
                _ => panic!("unexpected placement error: {e}"),
            },
        }
        assert!(log.len() <= 16, "placement loop does not converge: {log:?}");
    }
    log
}

#[test]
fn copy_over_a_present_page_stops_there_and_the_loop_skips_it() {
    let p = page();
    let (uffd, m) = setup(8, feature::EVENT_REMOVE | feature::THREAD_ID);
    let first = pattern(3, p);
    uffd.copy(m.addr() + 3 * p, first.as_ptr(), p, false)
        .expect("place page 3");
    let src = pattern(4, 8 * p);

    // The kernel places pages 0, 1, 2, meets the present page 3 (EEXIST inside mfill_atomic),
    // stores the 3 pages done in `copy` and returns EAGAIN because the count is short of `len`.
    let e = uffd
        .copy(m.addr(), src.as_ptr(), 8 * p, false)
        .expect_err("copy over a present page");
    assert_eq!(e.kind, PlaceErrorKind::Partial, "{e}");
    assert_eq!(e.done_bytes, 3 * p, "{e}");
    assert_eq!((e.start, e.len_bytes), (m.addr(), 8 * p));
    // Retrying from page 3 stops at once: EEXIST with `copy` = -EEXIST, so done_bytes 0.
    let e = uffd
        .copy(m.addr() + 3 * p, src[3 * p..].as_ptr(), 5 * p, false)
        .expect_err("copy starting on a present page");
    assert_eq!(e.kind, PlaceErrorKind::Exists, "{e}");
    assert_eq!(e.done_bytes, 0, "{e}");

    // The engine's loop over the remainder: page 3 is skipped and woken, 4..8 placed.
    let log = place_all(&uffd, m.addr() + 3 * p, &src[3 * p..]);
    assert_eq!(log.len(), 2, "{log:?}");
    assert!(
        matches!(
            log[0],
            Err(PlaceError {
                kind: PlaceErrorKind::Exists,
                done_bytes: 0,
                ..
            })
        ),
        "{log:?}"
    );
    assert_eq!(log[1], Ok(()));

    let got = read_back(&m, 0, 8 * p);
    assert_bytes_eq(&got[..3 * p], &src[..3 * p], "pages 0..3");
    assert_bytes_eq(&got[3 * p..4 * p], &first, "page 3 keeps its first content");
    assert_bytes_eq(&got[4 * p..], &src[4 * p..], "pages 4..8");
}

#[test]
fn placement_loop_from_scratch_over_a_present_page() {
    let p = page();
    let (uffd, m) = setup(8, feature::EVENT_REMOVE | feature::THREAD_ID);
    let first = pattern(5, p);
    uffd.copy(m.addr() + 3 * p, first.as_ptr(), p, false)
        .unwrap();
    let src = pattern(6, 8 * p);
    let log = place_all(&uffd, m.addr(), &src);
    // Partial (3 pages), Exists (page 3), then the rest in one call.
    assert_eq!(log.len(), 3, "{log:?}");
    assert!(
        matches!(log[0], Err(PlaceError { kind: PlaceErrorKind::Partial, done_bytes, .. }) if done_bytes == 3 * p),
        "{log:?}"
    );
    assert!(
        matches!(
            log[1],
            Err(PlaceError {
                kind: PlaceErrorKind::Exists,
                done_bytes: 0,
                ..
            })
        ),
        "{log:?}"
    );
    assert_eq!(log[2], Ok(()));
    let got = read_back(&m, 0, 8 * p);
    assert_bytes_eq(&got[..3 * p], &src[..3 * p], "pages 0..3");
    assert_bytes_eq(&got[3 * p..4 * p], &first, "page 3");
    assert_bytes_eq(&got[4 * p..], &src[4 * p..], "pages 4..8");
}

#[test]
fn zeropage_reads_zero_and_a_copy_onto_it_is_exists() {
    let p = page();
    let (uffd, m) = setup(4, feature::EVENT_REMOVE | feature::THREAD_ID);
    // Dirty the mapping's neighbourhood nowhere: all 4 pages are missing, then zero-mapped.
    uffd.zeropage(m.addr(), 4 * p, false)
        .expect("UFFDIO_ZEROPAGE");
    assert_bytes_eq(&read_back(&m, 0, 4 * p), &vec![0u8; 4 * p], "zero pages");
    let src = pattern(7, p);
    let e = uffd
        .copy(m.addr() + p, src.as_ptr(), p, false)
        .expect_err("copy onto a zero page");
    assert_eq!(e.kind, PlaceErrorKind::Exists, "{e}");
    assert_eq!(e.done_bytes, 0);
    let e = uffd
        .zeropage(m.addr() + 2 * p, p, false)
        .expect_err("zeropage onto a zero page");
    assert_eq!(e.kind, PlaceErrorKind::Exists, "{e}");
    assert_bytes_eq(&read_back(&m, 0, 4 * p), &vec![0u8; 4 * p], "still zero");
}

#[test]
fn move_takes_the_source_pages() {
    let p = page();
    let (uffd, dst) = setup(2, feature::MOVE);
    let src = Mapping::anonymous(2 * p, "move source").unwrap();
    let pat = pattern(8, 2 * p);
    src.write_from(0, &pat); // the pages are present (and exclusively ours)
    uffd.move_pages(dst.addr(), src.addr(), 2 * p, 0)
        .expect("UFFDIO_MOVE");
    assert_bytes_eq(&read_back(&dst, 0, 2 * p), &pat, "moved pages");
    // The source is unregistered and now missing: reading maps the zero page.
    assert_bytes_eq(
        &read_plain(&src, 0, 2 * p),
        &vec![0u8; 2 * p],
        "source after move",
    );
    // Moving onto the now present destination is EEXIST.
    src.write_from(0, &pat[..p]);
    let e = uffd
        .move_pages(dst.addr(), src.addr(), p, 0)
        .expect_err("move onto a present page");
    assert_eq!(e.kind, PlaceErrorKind::Exists, "{e}");
}

#[test]
fn errors_are_named() {
    let p = page();
    let (uffd, m) = setup(2, feature::EVENT_REMOVE | feature::THREAD_ID);
    let src = pattern(9, p);

    // An address mapped but not registered with this userfaultfd: the kernel finds the VMA,
    // sees no (or another) uffd context on it and returns ENOENT.
    let other = Mapping::anonymous(p, "unregistered").unwrap();
    let e = uffd
        .copy(other.addr(), src.as_ptr(), p, false)
        .expect_err("copy to an unregistered range");
    assert_eq!(e.kind, PlaceErrorKind::NotRegistered, "{e}");
    assert_eq!(e.done_bytes, 0);

    // A misaligned destination fails validation: EINVAL.
    let e = uffd
        .copy(m.addr() + 1, src.as_ptr(), p, false)
        .expect_err("copy to a misaligned address");
    assert_eq!(e.kind, PlaceErrorKind::Invalid, "{e}");
    // A zero length, too.
    let e = uffd
        .copy(m.addr(), src.as_ptr(), 0, false)
        .expect_err("zero-length copy");
    assert_eq!(e.kind, PlaceErrorKind::Invalid, "{e}");
    // An unreadable source: EFAULT, never undefined behaviour here.
    let e = uffd
        .copy(m.addr(), std::ptr::null(), p, false)
        .expect_err("copy from a null source");
    assert_eq!(e.kind, PlaceErrorKind::BadSource, "{e}");

    // One handshake per descriptor: the second UFFDIO_API is EINVAL.
    match uffd.api(0) {
        Err(UffdError::Api { errno, requested }) => {
            assert_eq!(errno, Errno::EINVAL);
            assert_eq!(requested, 0);
        }
        other => panic!("second UFFDIO_API: {other:?}"),
    }
    // Before the handshake, every other ioctl is EINVAL.
    let fresh = Uffd::open(false).unwrap();
    match fresh.register(other.addr(), p, mode::MISSING) {
        Err(UffdError::Register { errno, .. }) => assert_eq!(errno, Errno::EINVAL),
        r => panic!("register before UFFDIO_API: {r:?}"),
    }
    // A range registered with another userfaultfd: EBUSY.
    fresh.api(0).unwrap();
    match fresh.register(m.addr(), p, mode::MISSING) {
        Err(UffdError::Register { errno, .. }) => assert_eq!(errno, Errno::EBUSY),
        r => panic!("register of a range owned by another uffd: {r:?}"),
    }
    // Features the kernel does not have are refused by the handshake.
    let unknown = Uffd::open(false).unwrap();
    assert!(matches!(
        unknown.api(1 << 62),
        Err(UffdError::Api {
            errno: Errno::EINVAL,
            ..
        })
    ));
}

#[test]
fn io_uring_reads_fault_events() {
    let p = page();
    let (uffd, m) = setup(4, feature::EVENT_REMOVE | feature::THREAD_ID);
    let mut ring = Ring::new(&RingConfig {
        entries: 8,
        arena_bytes: vec![64 * MSG_BYTES],
    })
    .expect("io_uring");
    let slot = ring.add_slot(0, 0, 64 * MSG_BYTES);
    ring.fixed(OpKind::Read, uffd.as_raw_fd(), slot, 0, 64 * MSG_BYTES, 7)
        .expect("queue read");

    let touched = [0usize, 2];
    let threads: Vec<_> = touched
        .iter()
        .map(|&pg| {
            let m = Arc::clone(&m);
            spawn(move || m.touch(pg * p + 11))
        })
        .collect();

    let mut faults = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    while faults.len() < touched.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "fault events of the touches of pages {touched:?} not read through io_uring within {TIMEOUT:?}; seen: {faults:x?}"
        );
        let done = ring
            .submit_and_reap(1, Some(left))
            .expect("submit_and_reap");
        if done.is_empty() {
            continue; // interrupted (EINTR) or timed out early: wait again, to the deadline
        }
        assert_eq!(done.len(), 1, "one read in flight: {done:?}");
        let c = done[0];
        assert_eq!(
            (c.token.kind, c.token.slot, c.token.tag),
            (OpKind::Read, slot, 7)
        );
        assert!(
            c.result > 0 && c.result as usize % MSG_BYTES == 0,
            "read completed with {} (negative = errno)",
            c.result
        );
        let bytes = &ring.slot(slot)[..c.result as usize];
        for ev in Event::decode_all(bytes) {
            match ev {
                Event::PageFault { address, .. } => faults.push(address),
                other => panic!("unexpected event {other:?}"),
            }
        }
        if faults.len() < touched.len() {
            ring.fixed(OpKind::Read, uffd.as_raw_fd(), slot, 0, 64 * MSG_BYTES, 7)
                .expect("re-arm read");
        }
    }
    faults.sort_unstable();
    let want: Vec<u64> = touched
        .iter()
        .map(|&pg| (m.addr() + pg * p) as u64)
        .collect();
    assert_eq!(faults, want, "one fault per touched page, page-aligned");
    assert_eq!(ring.inflight(), 0);

    let pats: Vec<Vec<u8>> = touched
        .iter()
        .map(|&pg| pattern(20 + pg as u8, p))
        .collect();
    for (&pg, pat) in touched.iter().zip(&pats) {
        uffd.copy(m.addr() + pg * p, pat.as_ptr(), p, false)
            .expect("place faulted page");
    }
    for ((rx, h), pat) in threads.into_iter().zip(&pats) {
        assert_eq!(join(rx, h, "toucher"), pat[11]);
    }
    for (&pg, pat) in touched.iter().zip(&pats) {
        assert_bytes_eq(&read_back(&m, pg * p, p), pat, "placed page");
    }
}

#[test]
fn dontneed_on_a_registered_page_sends_remove_and_blocks_until_read() {
    let p = page();
    let (uffd, m) = setup(2, feature::EVENT_REMOVE | feature::THREAD_ID);
    let src = pattern(10, p);
    uffd.copy(m.addr(), src.as_ptr(), p, false).unwrap();
    assert_bytes_eq(&read_back(&m, 0, p), &src, "placed page");

    let finished = Arc::new(AtomicBool::new(false));
    let (rx, h) = {
        let (m, finished) = (Arc::clone(&m), Arc::clone(&finished));
        spawn(move || {
            let r = m.dontneed(0, p).map_err(|e| e.to_string());
            finished.store(true, Ordering::SeqCst);
            r
        })
    };
    assert!(
        wait_readable(&uffd, TIMEOUT),
        "no REMOVE event within {TIMEOUT:?}"
    );
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        !finished.load(Ordering::SeqCst),
        "MADV_DONTNEED returned before its REMOVE event was read"
    );
    // While the event is unread the mappings are changing: a placement is refused with
    // EAGAIN and nothing placed.
    let e = uffd
        .copy(m.addr() + p, src.as_ptr(), p, false)
        .expect_err("copy while a REMOVE event is unread");
    assert_eq!(e.kind, PlaceErrorKind::MappingChanging, "{e}");
    assert_eq!(e.done_bytes, 0);

    let events = read_events(&uffd);
    assert_eq!(
        events,
        vec![Event::Remove {
            start: m.addr() as u64,
            end: (m.addr() + p) as u64
        }]
    );
    join(rx, h, "dontneed").expect("MADV_DONTNEED");
    // The page is missing again: a zero page can be placed (no EEXIST), and page 1 is free too.
    uffd.zeropage(m.addr(), p, false)
        .expect("page 0 is missing after the remove");
    uffd.copy(m.addr() + p, src.as_ptr(), p, false)
        .expect("retry after the event was read");
    assert_bytes_eq(&read_back(&m, 0, p), &vec![0u8; p], "page 0 after remove");
    assert_bytes_eq(&read_back(&m, p, p), &src, "page 1");
}
