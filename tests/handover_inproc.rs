//! `postcopy handler` against a VMM played by this test process (no external tool): the VMM
//! maps two regions out of address order, registers them with its own userfaultfd, hands it
//! over with the region list as Firecracker does, touches every page from two threads and
//! checks each against the memory file, then removes a range (balloon) which must read zero.

mod common;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{join_within, layout, MIB, PAGE, TIMEOUT};
use postcopy::handler::{HandlerConfig, Outcome, VmmReport};
use postcopy::image::{page_checksum, FileImage, Synthetic};
use postcopy::source::{SourceConfig, SourceServer};
use postcopy::sys::mem::Mapping;
use postcopy::sys::uffd::{feature, mode, Uffd};

const SIZE: u64 = 16 * MIB;

/// A memory file with pseudo-random pages and some zero pages.
fn image_file(dir: &std::path::Path) -> (std::path::PathBuf, Vec<u64>) {
    let img = Synthetic::new(layout(SIZE), 0xf1e, 15);
    let path = dir.join("vm.mem");
    let mut f = std::fs::File::create(&path).unwrap();
    let mut page = vec![0u8; PAGE as usize];
    let mut sums = Vec::new();
    for p in 0..SIZE / PAGE {
        img.fill(0, p, &mut page);
        sums.push(page_checksum(&page));
        f.write_all(&page).unwrap();
    }
    (path, sums)
}

/// Where file page `p` (of `pages`) is mapped: `hi` holds the first half, `lo` the second.
fn region_of<'a>(hi: &'a Mapping, lo: &'a Mapping, pages: u64, p: u64) -> (&'a Mapping, usize) {
    if p < pages / 2 {
        (hi, (p * PAGE) as usize)
    } else {
        (lo, ((p - pages / 2) * PAGE) as usize)
    }
}

fn send_handover(sock: &UnixStream, json: &str, fd: i32) {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let iov = [std::io::IoSlice::new(json.as_bytes())];
    let fds = [fd];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let n = sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).unwrap();
    assert_eq!(n, json.len());
}

/// A source serving the memory file at `path`, and a `postcopy handler` (one VMM, `--once`)
/// on a socket in `dir` fetching from it: (source stop, source thread, socket, reports,
/// handler thread). Returns once the handler's socket exists.
#[allow(clippy::type_complexity)]
fn source_and_handler(
    dir: &std::path::Path,
    path: &std::path::Path,
) -> (
    postcopy::source::StopHandle,
    std::thread::JoinHandle<
        Result<Vec<postcopy::source::SessionReport>, postcopy::source::SourceError>,
    >,
    std::path::PathBuf,
    Arc<Mutex<Vec<VmmReport>>>,
    std::thread::JoinHandle<Result<(), postcopy::handler::HandlerError>>,
) {
    let src = SourceServer::bind(
        "127.0.0.1:0",
        Arc::new(FileImage::open(path, PAGE).unwrap()),
        SourceConfig {
            verbose: false,
            ..Default::default()
        },
    )
    .unwrap();
    let (src_addr, src_stop) = (src.local_addr().to_string(), src.stop_handle());
    let src_thread = std::thread::spawn(move || src.run());
    let socket = dir.join("h.sock");
    let reports: Arc<Mutex<Vec<VmmReport>>> = Arc::default();
    let (cfg, r2) = (
        HandlerConfig {
            socket: socket.clone(),
            source: src_addr,
            once: true,
            verbose: false,
            ..Default::default()
        },
        reports.clone(),
    );
    let handler = std::thread::spawn(move || {
        postcopy::handler::serve(&cfg, postcopy::handler::Stop::default(), move |r| {
            r2.lock().unwrap().push(r.clone())
        })
    });
    assert!(
        common::wait_until(Duration::from_secs(5), || socket.exists()),
        "the handler's socket {} did not appear within 5 s",
        socket.display()
    );
    (src_stop, src_thread, socket, reports, handler)
}

#[test]
fn handler_serves_a_vmm_and_its_removals() {
    let dir = std::env::temp_dir().join(format!("pc-handover-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (path, sums) = image_file(&dir);
    let (src_stop, src_thread, socket, reports, handler) = source_and_handler(&dir, &path);

    // The VMM: two regions, the second half of the file mapped at a lower address (so the
    // JSON goes out of address order), registered before the handover.
    let half = (SIZE / 2) as usize;
    // Shared with the touching threads: if one is left blocked on a fault, its region stays
    // mapped.
    let a = Arc::new(Mapping::anonymous(half, "region a").unwrap());
    let b = Arc::new(Mapping::anonymous(half, "region b").unwrap());
    let (lo, hi) = if a.addr() < b.addr() {
        (a.clone(), b.clone())
    } else {
        (b.clone(), a.clone())
    };
    // File order: `hi` holds [0, half), `lo` holds [half, SIZE).
    let uffd = Uffd::open(false).unwrap();
    uffd.api(feature::EVENT_REMOVE).unwrap();
    for m in [&a, &b] {
        m.no_huge_pages().unwrap();
        uffd.register(m.addr(), half, mode::MISSING).unwrap();
    }
    let json = format!(
        r#"[{{"base_host_virt_addr":{},"size":{half},"offset":0,"page_size_kib":4096,"page_size":4096}},
           {{"base_host_virt_addr":{},"size":{half},"offset":{half},"page_size_kib":4096,"page_size":4096}}]"#,
        hi.addr(),
        lo.addr()
    );
    let vmm = UnixStream::connect(&socket).unwrap();
    send_handover(&vmm, &json, uffd.as_raw_fd());
    drop(uffd);

    let pages = SIZE / PAGE;
    let sums = Arc::new(sums);
    let touchers: Vec<_> = (0..2u64)
        .map(|t| {
            let (hi, lo, sums) = (hi.clone(), lo.clone(), sums.clone());
            std::thread::spawn(move || {
                let mut bad = 0u64;
                let mut buf = vec![0u8; PAGE as usize];
                let mut p = t;
                while p < pages {
                    let (m, off) = region_of(&hi, &lo, pages, (p * 7919) % pages);
                    m.read_into(off, &mut buf);
                    if page_checksum(&buf) != sums[((p * 7919) % pages) as usize] {
                        bad += 1;
                    }
                    p += 2;
                }
                bad
            })
        })
        .collect();
    let bad: u64 = touchers
        .into_iter()
        .map(|t| join_within(t, TIMEOUT, "touching thread (every page of both regions)"))
        .sum();
    assert_eq!(bad, 0, "pages differ from the memory file");

    // Balloon: drop 64 pages of the second region; they read zero and stay zero.
    let (m, off) = region_of(&hi, &lo, pages, pages / 2 + 100);
    m.dontneed(off, 64 * PAGE as usize).unwrap();
    let mut buf = vec![0u8; PAGE as usize];
    for round in 0..2 {
        for i in 0..64 {
            m.read_into(off + i * PAGE as usize, &mut buf);
            assert!(
                buf.iter().all(|&x| x == 0),
                "removed page {i} not zero (round {round})"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(vmm); // the VMM exits
    let r = join_within(handler, TIMEOUT, "handler");
    r.expect("handler");
    let reports = reports.lock().unwrap();
    assert_eq!(reports.len(), 1);
    let rep = &reports[0];
    assert_eq!(rep.outcome, Outcome::Complete, "{rep:?}");
    assert_eq!(rep.regions, 2);
    assert_eq!(rep.pages, pages);
    assert!(rep.pages_removed >= 64, "{rep:?}");
    assert!(rep.pages_zero_after_remove >= 64, "{rep:?}");
    assert!(rep.restore_seconds.is_some());
    src_stop.stop();
    let _ = join_within(src_thread, TIMEOUT, "source");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_vmm_whose_memory_faults_minor_is_refused_not_guessed_at() {
    // A VMM with shared guest RAM (a memfd) registered MINOR: the page is in the page cache,
    // and without the memfd the handler cannot place it. The VMM's session must fail, saying
    // why, and its thread must not stay blocked.
    use postcopy::sys::memfd::Memfd;
    use std::os::fd::AsFd;
    let dir = std::env::temp_dir().join(format!("pc-handover-minor-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (path, _) = image_file(&dir);
    let (src_stop, src_thread, socket, reports, handler) = source_and_handler(&dir, &path);
    let memfd = Memfd::create(c"vmm-guest", SIZE as usize, false, "test").unwrap();
    let guest =
        Arc::new(Mapping::shared_file(memfd.as_fd(), SIZE as usize, false, "guest").unwrap());
    // Every page in the page cache: a touch of the guest's view is a MINOR fault.
    let _alias = Mapping::shared_file(memfd.as_fd(), SIZE as usize, true, "alias").unwrap();
    let uffd = Uffd::open(false).unwrap();
    uffd.api(0).unwrap();
    uffd.register(guest.addr(), SIZE as usize, mode::MISSING | mode::MINOR)
        .unwrap();
    let json = format!(
        r#"[{{"base_host_virt_addr":{},"size":{SIZE},"offset":0,"page_size":4096}}]"#,
        guest.addr()
    );
    let vmm = UnixStream::connect(&socket).unwrap();
    send_handover(&vmm, &json, uffd.as_raw_fd());
    drop(uffd);
    let g = guest.clone();
    let toucher = std::thread::spawn(move || g.touch(5 * PAGE as usize));
    // The handler refuses at the fault and closes its descriptor: the touch then completes
    // (the kernel maps the cached page itself).
    join_within(toucher, TIMEOUT, "touch of a MINOR-registered page");
    drop(vmm);
    let r = join_within(handler, TIMEOUT, "handler");
    r.expect("handler");
    let reports = reports.lock().unwrap();
    assert_eq!(reports.len(), 1);
    let rep = &reports[0];
    assert_ne!(rep.outcome, Outcome::Complete, "{rep:?}");
    let why = format!("{rep:?}");
    assert!(why.contains("MINOR"), "{why}");
    src_stop.stop();
    let _ = join_within(src_thread, TIMEOUT, "source");
    let _ = std::fs::remove_dir_all(&dir);
}
