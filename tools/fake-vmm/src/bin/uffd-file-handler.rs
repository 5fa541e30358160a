//! `uffd-file-handler`: the simplest userfaultfd page server for Firecracker's handover, serving
//! pages from a LOCAL memory file: one thread, one `uffd_msg` per read, one page per fault
//! (`UFFDIO_COPY` from a read-only mapping of the file), no background stream, no batching.
//! It is the baseline a real page server is compared against. See `--help`.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IoSliceMut, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::exit;
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use serde::Serialize;

use fake_vmm::proto::RegionMsg;
use fake_vmm::uffd::{self, UffdMsg};
use fake_vmm::util::{nanos, ns_histogram, secs, LatencyUs};

#[derive(Debug, Parser)]
#[command(
    name = "uffd-file-handler",
    about = "Baseline userfaultfd page server for Firecracker's handover: one page per fault, from a local memory file",
    long_about = "Baseline userfaultfd page server for Firecracker's handover (v1.1..v1.16), serving pages \
        from a LOCAL memory file.\n\n\
        Listens on a Unix stream socket; a VMM connects and sends one message: a JSON array of regions \
        ({base_host_virt_addr, size, offset[, page_size_kib][, page_size]}) and the userfaultfd as \
        SCM_RIGHTS. Then, on one thread: poll the userfaultfd and the socket, read one uffd_msg at a time, \
        and answer each page fault with one UFFDIO_COPY of that page from the file at \
        region.offset + (page address - region base). EEXIST is answered with UFFDIO_WAKE; EAGAIN by \
        reading the pending events, then retrying. After UFFD_EVENT_REMOVE (balloon), faults in the removed \
        range get zeros (UFFDIO_ZEROPAGE, or UFFDIO_COPY of zeros for huge pages).\n\n\
        When the VMM's socket reaches EOF (or the userfaultfd says ESRCH/ENOENT: the VMM is gone), prints \
        one JSON line on stdout and, with --once, exits; otherwise waits for the next VMM.",
    after_help = "JSON line per VMM: session, end (eof | esrch | enoent | error), faults, pages_copied, \
        pages_zeroed, removes, eexist, eagain, other_events, unknown_faults, seconds (handover received to \
        end), fault_service_us {p50,p90,p99,p999,max,count} (from the read of the event to the return of \
        the ioctl that answered it), regions, page_size, version.\n\
        Exit status: 0 (--once) the session ended normally, 1 the handover or a placement failed, 2 usage or \
        setup error."
)]
struct Args {
    /// The Unix socket to listen on (a stale socket there is replaced)
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,

    /// The memory file to serve; regions lie end to end in it
    #[arg(long, value_name = "PATH")]
    image: PathBuf,

    /// Serve one VMM, print its report, then exit
    #[arg(long)]
    once: bool,
}

/// The memory file, mapped read-only.
struct Image {
    ptr: *const u8,
    len: u64,
}

impl Image {
    fn open(path: &Path) -> Result<Image, String> {
        let file =
            File::open(path).map_err(|e| format!("cannot open --image {}: {e}", path.display()))?;
        let len = file
            .metadata()
            .map_err(|e| format!("stat {}: {e}", path.display()))?
            .len();
        if len == 0 {
            return Err(format!("--image {} is empty", path.display()));
        }
        // SAFETY: a read-only shared mapping of a file we opened; the kernel keeps the mapping
        // valid after `file` is closed. We never form references into it, only pass addresses
        // to UFFDIO_COPY (the kernel copies from it).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!(
                "mmap of {}: {}",
                path.display(),
                io::Error::last_os_error()
            ));
        }
        Ok(Image {
            ptr: p as *const u8,
            len,
        })
    }
}

/// A region of the current VMM.
struct Region {
    base: u64,
    size: u64,
    offset: u64,
    page_size: u64,
    /// One bit per page: removed (UFFD_EVENT_REMOVE) and so to be served as zeros.
    removed: Vec<u64>,
}

impl Region {
    fn is_removed(&self, idx: u64) -> bool {
        self.removed[(idx / 64) as usize] & (1 << (idx % 64)) != 0
    }
}

/// How a session ended.
enum End {
    /// Normal: the VMM closed the socket or its memory is gone (`eof`, `esrch`, `enoent`).
    Gone(&'static str),
    /// A failure.
    Error(String),
}

#[derive(Debug, Serialize)]
struct Report {
    session: u64,
    end: &'static str,
    error: Option<String>,
    faults: u64,
    pages_copied: u64,
    pages_zeroed: u64,
    removes: u64,
    eexist: u64,
    eagain: u64,
    other_events: u64,
    unknown_faults: u64,
    seconds: f64,
    fault_service_us: LatencyUs,
    regions: usize,
    page_size: u64,
    version: &'static str,
}

/// One VMM's userfaultfd and regions.
struct Session<'a> {
    uffd: OwnedFd,
    sock: UnixStream,
    image: &'a Image,
    /// Sorted by base.
    regions: Vec<Region>,
    /// Page faults read while draining events for an EAGAIN, with their read time.
    pending: VecDeque<(u64, Instant)>,
    /// Zeros for UFFDIO_COPY into huge pages (no UFFDIO_ZEROPAGE there), mapped on first use.
    zeros: Option<(*const u8, usize)>,
    service: Histogram<u64>,
    faults: u64,
    pages_copied: u64,
    pages_zeroed: u64,
    removes: u64,
    eexist: u64,
    eagain: u64,
    other_events: u64,
    unknown_faults: u64,
}

fn main() {
    let args = Args::parse();
    let image = match Image::open(&args.image) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("uffd-file-handler: {e}");
            exit(2)
        }
    };
    let listener = match listen(&args.socket) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("uffd-file-handler: {e}");
            exit(2)
        }
    };
    eprintln!(
        "uffd-file-handler: serving {} ({} bytes) on {}",
        args.image.display(),
        image.len,
        args.socket.display()
    );
    let mut session_no = 0u64;
    loop {
        let (stream, _) = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("uffd-file-handler: accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        session_no += 1;
        let ok = match serve_vmm(&image, stream, session_no) {
            Ok(report) => {
                let ok = report.error.is_none();
                let mut out = io::stdout().lock();
                let _ = serde_json::to_writer(&mut out, &report);
                let _ = writeln!(out);
                let _ = out.flush();
                ok
            }
            Err(e) => {
                eprintln!("uffd-file-handler: VMM {session_no}: {e}");
                false
            }
        };
        if args.once {
            let _ = std::fs::remove_file(&args.socket);
            exit(if ok { 0 } else { 1 });
        }
    }
}

/// Binds the socket, replacing a stale socket file (but nothing else).
fn listen(path: &Path) -> Result<UnixListener, String> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)
                .map_err(|e| format!("removing the stale socket {}: {e}", path.display()))?;
        } else {
            return Err(format!(
                "{} exists and is not a socket; choose another --socket",
                path.display()
            ));
        }
    }
    UnixListener::bind(path).map_err(|e| format!("cannot listen on {}: {e}", path.display()))
}

/// Receives the handover: the JSON array and the userfaultfd.
fn receive_handover(sock: &UnixStream) -> Result<(Vec<RegionMsg>, OwnedFd), String> {
    let mut buf = vec![0u8; 64 << 10];
    let mut cmsg = nix::cmsg_space!([RawFd; 8]);
    let (n, fds, truncated) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| format!("recvmsg of the handover: {e}"))?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(|e| format!("control messages: {e}"))? {
            if let ControlMessageOwned::ScmRights(f) = c {
                fds.extend(f);
            }
        }
        (msg.bytes, fds, msg.flags.contains(MsgFlags::MSG_CTRUNC))
    };
    // SAFETY: each fd arrived with SCM_RIGHTS just now and belongs to us alone.
    let mut owned: Vec<OwnedFd> = fds
        .into_iter()
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if truncated {
        return Err("the handover's control data was truncated (too many fds?)".into());
    }
    if owned.is_empty() {
        return Err(if n == 0 {
            "the VMM closed the connection before sending the handover".into()
        } else {
            "the handover carried no file descriptor (SCM_RIGHTS)".into()
        });
    }
    if owned.len() > 1 {
        eprintln!(
            "uffd-file-handler: the handover carried {} fds; using the first",
            owned.len()
        );
    }
    let uffd = owned.swap_remove(0);
    // No length prefix: read until the bytes form one complete JSON value.
    let mut data = buf[..n].to_vec();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match serde_json::from_slice::<Vec<RegionMsg>>(&data) {
            Ok(v) => return Ok((v, uffd)),
            Err(e) if e.is_eof() && Instant::now() < deadline => {
                let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
                poll(&mut fds, PollTimeout::from(100u16)).map_err(|e| format!("poll: {e}"))?;
                let m = io::Read::read(&mut &*sock, &mut buf)
                    .map_err(|e| format!("reading the handover: {e}"))?;
                if m == 0 {
                    return Err(format!("the VMM closed the connection mid-handover: {e}"));
                }
                data.extend_from_slice(&buf[..m]);
            }
            Err(e) => {
                return Err(format!(
                    "the handover is not a JSON array of regions: {e}: {}",
                    String::from_utf8_lossy(&data[..data.len().min(200)])
                ))
            }
        }
    }
}

/// Checks the regions against each other and the image.
fn build_regions(msgs: &[RegionMsg], image_len: u64) -> Result<Vec<Region>, String> {
    if msgs.is_empty() {
        return Err("the handover lists no regions".into());
    }
    let mut regions = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        let ps = m
            .effective_page_size()
            .map_err(|e| format!("region {i}: {e}"))?;
        if m.size == 0 || m.size % ps != 0 || m.base_host_virt_addr % ps != 0 || m.offset % ps != 0
        {
            return Err(format!(
                "region {i}: base, size and offset must be multiples of the page size {ps}: {m:?}"
            ));
        }
        if m.offset
            .checked_add(m.size)
            .map_or(true, |end| end > image_len)
        {
            return Err(format!(
                "region {i}: offset {} + size {} is past the end of the image ({image_len} bytes)",
                m.offset, m.size
            ));
        }
        let pages = m.size / ps;
        regions.push(Region {
            base: m.base_host_virt_addr,
            size: m.size,
            offset: m.offset,
            page_size: ps,
            removed: vec![0; pages.div_ceil(64) as usize],
        });
    }
    regions.sort_by_key(|r| r.base);
    for w in regions.windows(2) {
        if w[0].base + w[0].size > w[1].base {
            return Err(format!(
                "regions at {:#x} and {:#x} overlap",
                w[0].base, w[1].base
            ));
        }
    }
    Ok(regions)
}

fn serve_vmm(image: &Image, sock: UnixStream, session_no: u64) -> Result<Report, String> {
    let (msgs, uffd) = receive_handover(&sock)?;
    let t0 = Instant::now();
    let regions = build_regions(&msgs, image.len)?;
    // SAFETY: F_GETFL/F_SETFL on an fd we own; only adds O_NONBLOCK (Firecracker sets it already).
    unsafe {
        let fl = libc::fcntl(uffd.as_raw_fd(), libc::F_GETFL);
        if fl >= 0 {
            libc::fcntl(uffd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
    }
    let mut s = Session {
        uffd,
        sock,
        image,
        regions,
        pending: VecDeque::new(),
        zeros: None,
        service: ns_histogram(),
        faults: 0,
        pages_copied: 0,
        pages_zeroed: 0,
        removes: 0,
        eexist: 0,
        eagain: 0,
        other_events: 0,
        unknown_faults: 0,
    };
    let end = s.run();
    let (end, error) = match end {
        End::Gone(how) => (how, None),
        End::Error(e) => {
            eprintln!("uffd-file-handler: VMM {session_no}: {e}");
            ("error", Some(e))
        }
    };
    let page_size = s.regions.iter().map(|r| r.page_size).max().unwrap_or(0);
    Ok(Report {
        session: session_no,
        end,
        error,
        faults: s.faults,
        pages_copied: s.pages_copied,
        pages_zeroed: s.pages_zeroed,
        removes: s.removes,
        eexist: s.eexist,
        eagain: s.eagain,
        other_events: s.other_events,
        unknown_faults: s.unknown_faults,
        seconds: secs(t0.elapsed()),
        fault_service_us: LatencyUs::from_ns(&s.service),
        regions: s.regions.len(),
        page_size,
        version: msgs[0].version().as_str(),
    })
}

fn errno_end(what: &str, e: io::Error) -> End {
    match e.raw_os_error() {
        Some(libc::ESRCH) => End::Gone("esrch"),
        Some(libc::ENOENT) => End::Gone("enoent"),
        _ => End::Error(format!("{what}: {e}")),
    }
}

impl Session<'_> {
    /// The event loop: until the VMM goes away.
    fn run(&mut self) -> End {
        let mut scratch = [0u8; 256];
        loop {
            while let Some((addr, t)) = self.pending.pop_front() {
                if let Err(end) = self.serve_fault(addr, t) {
                    return end;
                }
            }
            let (uffd_ev, sock_ev) = {
                let mut fds = [
                    PollFd::new(self.uffd.as_fd(), PollFlags::POLLIN),
                    PollFd::new(self.sock.as_fd(), PollFlags::POLLIN),
                ];
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return End::Error(format!("poll: {e}")),
                }
                (
                    fds[0].revents().unwrap_or(PollFlags::empty()),
                    fds[1].revents().unwrap_or(PollFlags::empty()),
                )
            };
            if uffd_ev.intersects(PollFlags::POLLERR | PollFlags::POLLNVAL) {
                return End::Error(format!("the userfaultfd reports {uffd_ev:?}"));
            }
            if uffd_ev.contains(PollFlags::POLLIN) {
                // One uffd_msg per read; serve each fault before reading the next.
                loop {
                    match uffd::read_msg(self.uffd.as_raw_fd()) {
                        Ok(Some(msg)) => {
                            let t = Instant::now();
                            if let Some(addr) = self.note_event(&msg) {
                                if let Err(end) = self.serve_fault(addr, t) {
                                    return end;
                                }
                            }
                        }
                        Ok(None) => break,
                        Err(e) => return errno_end("read of the userfaultfd", e),
                    }
                }
            }
            if !sock_ev.is_empty() {
                match io::Read::read(&mut &self.sock, &mut scratch) {
                    Ok(0) => return End::Gone("eof"),
                    Ok(_) => {} // the VMM sends nothing after the handover; ignore
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                        return End::Gone("eof")
                    }
                    Err(e) => return End::Error(format!("reading the VMM socket: {e}")),
                }
            }
        }
    }

    /// Counts an event and handles the non-fault ones; returns a page fault's address.
    fn note_event(&mut self, msg: &UffdMsg) -> Option<u64> {
        match msg.event {
            uffd::UFFD_EVENT_PAGEFAULT => {
                self.faults += 1;
                Some(msg.arg[1])
            }
            uffd::UFFD_EVENT_REMOVE => {
                self.removes += 1;
                self.mark_removed(msg.arg[0], msg.arg[1]);
                None
            }
            _ => {
                self.other_events += 1;
                None
            }
        }
    }

    /// Marks the pages of `[start, end)` removed: later faults there get zeros.
    fn mark_removed(&mut self, start: u64, end: u64) {
        for r in &mut self.regions {
            let lo = start.max(r.base);
            let hi = end.min(r.base + r.size);
            if lo >= hi {
                continue;
            }
            for idx in (lo - r.base) / r.page_size..(hi - r.base).div_ceil(r.page_size) {
                r.removed[(idx / 64) as usize] |= 1 << (idx % 64);
            }
        }
    }

    /// Reads every pending event: removes are applied, faults queued (after an EAGAIN).
    fn drain_events(&mut self) -> Result<(), End> {
        loop {
            match uffd::read_msg(self.uffd.as_raw_fd()) {
                Ok(Some(msg)) => {
                    let t = Instant::now();
                    if let Some(addr) = self.note_event(&msg) {
                        self.pending.push_back((addr, t));
                    }
                }
                Ok(None) => return Ok(()),
                Err(e) => return Err(errno_end("read of the userfaultfd", e)),
            }
        }
    }

    fn zero_buffer(&mut self, len: usize) -> Result<*const u8, End> {
        if let Some((p, l)) = self.zeros {
            if l >= len {
                return Ok(p);
            }
        }
        // SAFETY: a fresh private anonymous read-only mapping: it reads as zeros and is only
        // ever passed as the source of UFFDIO_COPY (an older, smaller one is simply leaked).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(End::Error(format!(
                "mmap of a zero buffer: {}",
                io::Error::last_os_error()
            )));
        }
        self.zeros = Some((p as *const u8, len));
        Ok(p as *const u8)
    }

    /// Places the page containing `addr`: one UFFDIO_COPY (or a zero page if removed).
    fn serve_fault(&mut self, addr: u64, t_read: Instant) -> Result<(), End> {
        let Some(ri) = self
            .regions
            .iter()
            .position(|r| addr >= r.base && addr < r.base + r.size)
        else {
            self.unknown_faults += 1;
            eprintln!("uffd-file-handler: fault at {addr:#x} is in no region; not served");
            return Ok(());
        };
        let (base, ps, offset) = {
            let r = &self.regions[ri];
            (r.base, r.page_size, r.offset)
        };
        let page = addr & !(ps - 1);
        let idx = (page - base) / ps;
        let fd = self.uffd.as_raw_fd();
        let started = Instant::now();
        loop {
            let zero = self.regions[ri].is_removed(idx);
            let res = if zero && ps == 4096 {
                uffd::zeropage(fd, page, ps)
            } else if zero {
                let z = self.zero_buffer(ps as usize)?;
                uffd::copy(fd, page, z, ps)
            } else {
                let src = self.image.ptr.wrapping_add((offset + idx * ps) as usize);
                uffd::copy(fd, page, src, ps)
            };
            match res {
                Ok(()) => {
                    if zero {
                        self.pages_zeroed += 1;
                    } else {
                        self.pages_copied += 1;
                    }
                    break;
                }
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    // Already placed (a second fault on the same page): just wake the waiters.
                    self.eexist += 1;
                    if let Err(e) = uffd::wake(fd, page, ps) {
                        return Err(errno_end("UFFDIO_WAKE", e));
                    }
                    break;
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    // The VMM's memory map is changing (e.g. a REMOVE in flight): read the
                    // pending events first, then retry.
                    self.eagain += 1;
                    self.drain_events()?;
                    if started.elapsed() > Duration::from_secs(10) {
                        return Err(End::Error(format!(
                            "UFFDIO_COPY at {page:#x} kept failing with EAGAIN for 10 s"
                        )));
                    }
                    std::thread::yield_now();
                }
                Err(e) => {
                    return Err(errno_end(
                        if zero {
                            "placing a zero page"
                        } else {
                            "UFFDIO_COPY"
                        },
                        e,
                    ))
                }
            }
        }
        let _ = self.service.record(nanos(t_read.elapsed()).max(1));
        Ok(())
    }
}
