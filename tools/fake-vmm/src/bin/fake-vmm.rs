//! `fake-vmm`: plays a Firecracker VMM restoring from a snapshot with a userfaultfd page server.
//!
//! It maps guest memory (one anonymous mapping per region), registers it with a userfaultfd,
//! hands the fd and the region JSON to the handler over a Unix socket in one `sendmsg`
//! (Firecracker's handover, v1.1 to v1.16), then touches the memory from several threads and
//! checks every page against the memory file the handler serves. See `--help`.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, IoSlice, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::exit;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Barrier, Mutex, OnceLock};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use serde::Serialize;
use xxhash_rust::xxh3::xxh3_64;

use fake_vmm::proto::{RegionMsg, Version};
use fake_vmm::uffd::{self, UffdSource};
use fake_vmm::util::{nanos, ns_histogram, parse_size, secs, LatencyUs, Rng};

const HUGE_2M: u64 = 2 << 20;
/// The kernel's base page: the unit of mincore(2).
const BASE_PAGE: usize = 4096;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum UffdArg {
    /// userfaultfd(2), falling back to /dev/userfaultfd
    Auto,
    /// only the userfaultfd(2) syscall
    Syscall,
    /// only /dev/userfaultfd + USERFAULTFD_IOC_NEW
    Dev,
}

#[derive(Debug, Parser)]
#[command(
    name = "fake-vmm",
    about = "Play a Firecracker VMM: hand a userfaultfd to a page server, touch guest memory, verify every page",
    long_about = "Play a Firecracker VMM restoring a snapshot with a userfaultfd page server.\n\n\
        Maps guest memory (one anonymous mapping per region), creates a userfaultfd (UFFDIO_API with \
        EVENT_REMOVE, +MISSING_HUGETLBFS for 2 MiB pages), registers every region in MISSING mode, connects \
        to the handler's Unix socket and sends the region JSON plus the userfaultfd (SCM_RIGHTS) in one \
        sendmsg, exactly like Firecracker v1.1..v1.16. Then it touches the memory from --threads threads \
        and compares every page it reads (xxh3-64) with the memory file (--image) at the region's offset.\n\n\
        Prints one JSON object on stdout at the end. Exit status: 0 every check passed, 1 a check failed \
        (mismatch, zero violation, incomplete, timeout), 2 usage or setup error (message on stderr).",
    after_help = "JSON output fields: verified, pages_total, pages_touched, mismatches, first_mismatch \
        ({page, region, phase, read_zero} or null), zero_violations, pages_removed, complete (null without \
        --wait-complete), fault_latency_us {p50,p90,p99,p999,max,count} (every first touch of the first-touch \
        and main phases, from just before the one-byte read to just after it; with --only-missing only pages \
        mincore said were not resident), pages_resident_before_touch (with --only-missing), same_page_us, \
        seconds_touch (first touch to last touch), seconds_to_complete (handover to all pages resident), \
        first_touch_us, version, regions, page_size, threads, seed, uffd_source, warmup_seconds, \
        exited_early, error."
)]
struct Args {
    /// The handler's Unix stream socket
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,

    /// The memory file the handler serves (used to verify); regions lie end to end in it
    #[arg(long, value_name = "PATH")]
    image: PathBuf,

    /// Guest memory size in bytes (suffixes K, M, G); default: the image's size
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    size: Option<u64>,

    /// Split the memory into N regions of (roughly) equal size, each its own mmap
    #[arg(long, value_name = "N", default_value_t = 1)]
    regions: usize,

    /// Map the regions so that address order differs from file order, and send the JSON array
    /// in an order that is not ascending by address
    #[arg(long)]
    shuffle: bool,

    /// Which Firecracker handover fields to send
    #[arg(
        long = "version",
        value_name = "VERSION",
        value_enum,
        default_value = "1.12"
    )]
    proto_version: Version,

    /// Page size: 4096, or 2097152 (2M) for hugetlbfs (MAP_HUGETLB|MAP_HUGE_2MB)
    #[arg(long, value_name = "BYTES", default_value = "4096", value_parser = parse_page_size)]
    page_size: u64,

    /// Touch memory from T threads
    #[arg(long, value_name = "T", default_value_t = 2)]
    threads: usize,

    /// Touch a random P% of the pages, each once, in random order
    #[arg(long, value_name = "P", default_value_t = 100.0)]
    touch_percent: f64,

    /// Touch in file order instead (the first P% of the pages)
    #[arg(long)]
    sequential: bool,

    /// Like Firecracker during `PUT /snapshot/load`: right after the handover, before the touch
    /// phase, write to N pages spread evenly over the memory (each write flips byte 0 of its
    /// page; the verification expects the flipped byte)
    #[arg(long, value_name = "N", default_value_t = 0)]
    load_writes: u64,

    /// Before the main touch phase, K threads touch the same page at once (barrier)
    #[arg(long, value_name = "K", default_value_t = 0)]
    same_page_threads: usize,

    /// After touching, wait up to SECS until every page is resident (mincore), then verify every
    /// page; fail if not complete in time (0 = don't wait)
    #[arg(long, value_name = "SECS", default_value_t = 0.0)]
    wait_complete: f64,

    /// MADV_DONTNEED pages FIRST..FIRST+COUNT (file order, in pages) at the end, then check that
    /// they read as zeros, and still do 200 ms later (repeatable)
    #[arg(long, value_name = "FIRST_PAGE:COUNT", value_parser = parse_remove)]
    remove: Vec<(u64, u64)>,

    /// Exit (status 0 if nothing mismatched so far) as soon as N pages have been touched, like a
    /// VMM dying mid-restore
    #[arg(long, value_name = "N")]
    exit_after_pages: Option<u64>,

    /// Keep the socket open this many seconds after finishing
    #[arg(long, value_name = "SECS", default_value_t = 0.0)]
    hold: f64,

    /// Seed of the touch order and of --shuffle
    #[arg(long, value_name = "N", default_value_t = 0x5eed)]
    seed: u64,

    /// How to create the userfaultfd
    #[arg(long, value_enum, default_value = "auto")]
    uffd: UffdArg,

    /// Ask mincore before each touch and put only touches of non-resident pages in
    /// fault_latency_us (one extra, untimed syscall per touch)
    #[arg(long)]
    only_missing: bool,

    /// Before mapping the regions, touch and free anonymous memory of their size (on a VM, the
    /// hypervisor's first backing of guest RAM is otherwise measured as fault latency)
    #[arg(long)]
    warmup: bool,

    /// Keep retrying to connect to the socket for this long (the handler may still be starting)
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    connect_timeout: f64,

    /// Give up (status 1, JSON with "error") after this many seconds in all (0 = never)
    #[arg(long, value_name = "SECS", default_value_t = 0.0)]
    timeout: f64,
}

fn parse_page_size(s: &str) -> Result<u64, String> {
    match parse_size(s)? {
        4096 => Ok(4096),
        HUGE_2M => Ok(HUGE_2M),
        n => Err(format!(
            "{n} is not a supported page size (4096 or 2097152)"
        )),
    }
}

fn parse_remove(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s
        .split_once(':')
        .ok_or_else(|| format!("`{s}`: expected FIRST_PAGE:COUNT, e.g. 100:16"))?;
    let first = a
        .trim()
        .parse::<u64>()
        .map_err(|e| format!("`{s}`: first page: {e}"))?;
    let count = b
        .trim()
        .parse::<u64>()
        .map_err(|e| format!("`{s}`: count: {e}"))?;
    if count == 0 {
        return Err(format!("`{s}`: COUNT must be at least 1"));
    }
    Ok((first, count))
}

/// Why the run stopped before a verdict.
enum Fatal {
    /// Bad arguments or environment: exit 2.
    Setup(String),
    /// Something failed while running: exit 1.
    Runtime(String),
}

fn setup<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> Fatal + '_ {
    move |e| Fatal::Setup(format!("{what}: {e}"))
}

/// A guest memory region: its mapping and its place in the memory file.
#[derive(Debug, Clone)]
struct Region {
    base: usize,
    size: u64,
    offset: u64,
    first_page: u64,
}

/// The guest memory and what every page of it should contain.
struct Mem {
    /// In file order.
    regions: Vec<Region>,
    page_size: usize,
    pages_total: u64,
    /// xxh3-64 of every page of the image, in file order.
    expected: Vec<u64>,
}

impl Mem {
    fn region_of(&self, page: u64) -> usize {
        self.regions.partition_point(|r| r.first_page <= page) - 1
    }

    /// Address of file page `page` in the VMM.
    fn addr_of(&self, page: u64) -> usize {
        let r = &self.regions[self.region_of(page)];
        r.base + ((page - r.first_page) as usize) * self.page_size
    }

    /// Reads page `page` into `buf` with a plain copy: a missing page faults and waits for
    /// the handler, as a guest access would.
    fn read_page(&self, page: u64, buf: &mut [u8]) {
        debug_assert_eq!(buf.len(), self.page_size);
        let addr = self.addr_of(page);
        // SAFETY: `addr..addr + page_size` lies inside one of our region mappings, which stay
        // mapped (PROT_READ|PROT_WRITE) until the process exits; `buf` is a distinct local
        // buffer of exactly page_size bytes. No reference into the region is formed.
        unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, buf.as_mut_ptr(), buf.len()) };
    }

    /// Whether the base page at `addr` is resident (mincore).
    fn resident(&self, addr: usize) -> bool {
        let mut v = [0u8; 1];
        let aligned = addr & !(BASE_PAGE - 1);
        // SAFETY: `aligned` is page aligned and inside a mapping of ours; `v` has room for
        // the one entry a one-page range produces.
        let r = unsafe { libc::mincore(aligned as *mut libc::c_void, BASE_PAGE, v.as_mut_ptr()) };
        r == 0 && v[0] & 1 == 1
    }
}

#[derive(Debug, Clone, Serialize)]
struct Mismatch {
    /// Page index in file order.
    page: u64,
    /// Region index in file order.
    region: usize,
    /// Where it was seen: first_touch, same_page, touch, complete.
    phase: &'static str,
    /// Whether the page read as all zeros (e.g. not served, or served as a zero page).
    read_zero: bool,
}

/// The JSON printed at the end.
#[derive(Debug, Clone, Serialize)]
struct Report {
    verified: bool,
    pages_total: u64,
    pages_touched: u64,
    mismatches: u64,
    first_mismatch: Option<Mismatch>,
    zero_violations: u64,
    pages_removed: u64,
    complete: Option<bool>,
    fault_latency_us: Option<LatencyUs>,
    pages_resident_before_touch: Option<u64>,
    same_page_us: Option<LatencyUs>,
    seconds_touch: f64,
    seconds_to_complete: Option<f64>,
    first_touch_us: Option<f64>,
    version: &'static str,
    regions: usize,
    page_size: u64,
    threads: usize,
    seed: u64,
    uffd_source: &'static str,
    warmup_seconds: Option<f64>,
    exited_early: bool,
    error: Option<String>,
}

/// State shared by the touch threads, the watchdog and an early exit.
struct Run {
    mem: Mem,
    touched: AtomicU64,
    mismatches: AtomicU64,
    first_mismatch: Mutex<Option<Mismatch>>,
    exit_after: Option<u64>,
    phase: Mutex<&'static str>,
    touch_start: OnceLock<Instant>,
    /// Taken by whoever prints the report; held until the process exits.
    emit: Mutex<()>,
    /// The report skeleton (static fields) for an early exit or a timeout.
    skeleton: Report,
}

impl Run {
    fn set_phase(&self, p: &'static str) {
        *self.phase.lock().unwrap() = p;
    }

    /// Compares a page read into `buf` with the image; counts and remembers a mismatch.
    fn check(&self, page: u64, buf: &[u8], phase: &'static str) -> bool {
        if xxh3_64(buf) == self.mem.expected[page as usize] {
            return true;
        }
        self.mismatches.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_mismatch.lock().unwrap();
        if first.is_none() {
            *first = Some(Mismatch {
                page,
                region: self.mem.region_of(page),
                phase,
                read_zero: buf.iter().all(|&b| b == 0),
            });
        }
        false
    }

    /// Counts one touched page; exits the process when --exit-after-pages is reached.
    fn count_touch(&self) {
        let n = self.touched.fetch_add(1, Ordering::SeqCst) + 1;
        if self.exit_after == Some(n) {
            self.exit_early();
        }
    }

    fn partial_report(&self) -> Report {
        let mut r = self.skeleton.clone();
        r.pages_touched = self.touched.load(Ordering::SeqCst);
        r.mismatches = self.mismatches.load(Ordering::SeqCst);
        r.first_mismatch = self.first_mismatch.lock().unwrap().clone();
        r.seconds_touch = self
            .touch_start
            .get()
            .map(|t| secs(t.elapsed()))
            .unwrap_or(0.0);
        r.verified = r.mismatches == 0;
        r
    }

    fn exit_early(&self) -> ! {
        let mut r = self.partial_report();
        r.exited_early = true;
        let code = if r.verified { 0 } else { 1 };
        self.emit_and_exit(&r, code)
    }

    fn timeout(&self, after: f64) -> ! {
        let mut r = self.partial_report();
        r.verified = false;
        r.error = Some(format!(
            "timeout: gave up after {after} s in phase `{}` (is the handler serving faults?)",
            self.phase.lock().unwrap()
        ));
        self.emit_and_exit(&r, 1)
    }

    /// Prints the report and exits; a second caller blocks here until the process is gone.
    fn emit_and_exit(&self, r: &Report, code: i32) -> ! {
        let _once = self.emit.lock().unwrap_or_else(|p| p.into_inner());
        print_report(r);
        exit(code)
    }
}

fn print_report(r: &Report) {
    let mut out = io::stdout().lock();
    let _ = serde_json::to_writer(&mut out, r);
    let _ = writeln!(out);
    let _ = out.flush();
}

/// A touch of one page: a timed one-byte read (which faults the page in if it is missing),
/// then a copy of the whole page into `buf`. Returns the read's latency in ns.
fn touch(mem: &Mem, page: u64, buf: &mut [u8]) -> u64 {
    let addr = mem.addr_of(page);
    // A byte somewhere in the page, not always the first, so a handler must align the fault address.
    let off = (page.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as usize % mem.page_size;
    let t0 = Instant::now();
    // SAFETY: `addr + off` is inside a region mapping of ours (readable, mapped until exit);
    // a volatile read of one byte, which may block in the fault until the handler places the page.
    unsafe { std::ptr::read_volatile((addr + off) as *const u8) };
    let ns = nanos(t0.elapsed()).max(1);
    mem.read_page(page, buf);
    ns
}

/// The pages `--load-writes N` writes: N spread evenly over `pages_total`, in file order.
fn load_write_pages(n: u64, pages_total: u64) -> Vec<u64> {
    let n = n.min(pages_total);
    (0..n).map(|i| i * pages_total / n.max(1)).collect()
}

/// Writes `byte` at byte 0 of `page`: a write fault if it is missing (the handler places the
/// page first, then the write lands).
fn load_write(mem: &Mem, page: u64, byte: u8) {
    let addr = mem.addr_of(page);
    // SAFETY: `addr` is the first byte of a page of a region mapping of ours (read-write,
    // mapped until exit); a volatile one-byte write, which may block in the fault until the
    // handler places the page.
    unsafe { std::ptr::write_volatile(addr as *mut u8, byte) };
}

fn main() {
    let args = Args::parse();
    let code = match run(args) {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(Fatal::Setup(msg)) => {
            eprintln!("fake-vmm: {msg}");
            2
        }
        Err(Fatal::Runtime(msg)) => {
            eprintln!("fake-vmm: error: {msg}");
            1
        }
    };
    exit(code)
}

/// Checks the arguments against each other and the image; returns the memory size.
fn validate(args: &Args, image_len: u64) -> Result<u64, Fatal> {
    let ps = args.page_size;
    if ps == HUGE_2M && args.proto_version == Version::V1_1 {
        return Err(Fatal::Setup(
            "--page-size 2097152 needs --version 1.7 or 1.12: the v1.1 handover has no page size field".into(),
        ));
    }
    if args.threads == 0 {
        return Err(Fatal::Setup("--threads must be at least 1".into()));
    }
    if !(0.0..=100.0).contains(&args.touch_percent) {
        return Err(Fatal::Setup(
            "--touch-percent must be between 0 and 100".into(),
        ));
    }
    for (name, v) in [
        ("--wait-complete", args.wait_complete),
        ("--hold", args.hold),
        ("--timeout", args.timeout),
        ("--connect-timeout", args.connect_timeout),
    ] {
        if !(v >= 0.0 && v.is_finite()) {
            return Err(Fatal::Setup(format!(
                "{name} must be a number of seconds >= 0"
            )));
        }
    }
    let size = args.size.unwrap_or(image_len);
    if size == 0 {
        return Err(Fatal::Setup(format!(
            "{}: the image is empty",
            args.image.display()
        )));
    }
    if size > image_len {
        return Err(Fatal::Setup(format!(
            "--size {size} is larger than the image {} ({image_len} bytes)",
            args.image.display()
        )));
    }
    if size % ps != 0 {
        return Err(Fatal::Setup(format!(
            "memory size {size} is not a multiple of the page size {ps}; pass --size (e.g. --size {})",
            size / ps * ps
        )));
    }
    let pages = size / ps;
    if args.regions == 0 || args.regions as u64 > pages {
        return Err(Fatal::Setup(format!(
            "--regions must be between 1 and the page count {pages}"
        )));
    }
    for &(first, count) in &args.remove {
        if first.checked_add(count).map_or(true, |end| end > pages) {
            return Err(Fatal::Setup(format!(
                "--remove {first}:{count} goes past the last page ({pages} pages of {ps} bytes)"
            )));
        }
    }
    Ok(size)
}

/// xxh3-64 of every page of the image's first `size` bytes, on `threads` threads (pread, no mmap).
fn hash_image(file: &File, size: u64, page_size: usize, threads: usize) -> io::Result<Vec<u64>> {
    let pages = (size / page_size as u64) as usize;
    let mut out = vec![0u64; pages];
    let per = pages.div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = out
            .chunks_mut(per)
            .enumerate()
            .map(|(i, chunk)| {
                s.spawn(move || -> io::Result<()> {
                    let pages_per_read = (1usize << 20).div_ceil(page_size).max(1);
                    let mut buf = vec![0u8; pages_per_read * page_size];
                    let first = i * per;
                    for (j, group) in chunk.chunks_mut(pages_per_read).enumerate() {
                        let page = first + j * pages_per_read;
                        let bytes = &mut buf[..group.len() * page_size];
                        file.read_exact_at(bytes, (page * page_size) as u64)?;
                        for (k, h) in group.iter_mut().enumerate() {
                            *h = xxh3_64(&bytes[k * page_size..(k + 1) * page_size]);
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().expect("hash thread panicked"))
    })?;
    Ok(out)
}

/// mmap(2) wrapper returning the address or the errno.
fn mmap(addr: usize, len: usize, prot: i32, flags: i32) -> io::Result<usize> {
    // SAFETY: anonymous mapping (fd -1); with MAP_FIXED the callers only target ranges inside
    // their own PROT_NONE reservation, so no other mapping is replaced.
    let p = unsafe { libc::mmap(addr as *mut libc::c_void, len, prot, flags, -1, 0) };
    if p == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok(p as usize)
    }
}

fn hugepages_free() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("HugePages_Free:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Maps the regions (sizes in file order). Each region lands in a slot of one PROT_NONE
/// reservation, with a one-page guard gap between slots, so no two regions are contiguous;
/// `slot_of_region[r]` is the slot (address rank) of region `r`. Returns the bases.
fn map_regions(
    sizes: &[u64],
    slot_of_region: &[usize],
    page_size: usize,
) -> Result<Vec<usize>, Fatal> {
    let n = sizes.len();
    let gap = page_size;
    let total: usize = sizes.iter().map(|&s| s as usize).sum::<usize>() + gap * (n + 1) + page_size;
    let reserve = mmap(
        0,
        total,
        libc::PROT_NONE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
    )
    .map_err(setup("reserving address space"))?;
    let start = reserve.next_multiple_of(page_size) + gap;
    let mut region_in_slot = vec![0usize; n];
    for (r, &slot) in slot_of_region.iter().enumerate() {
        region_in_slot[slot] = r;
    }
    let mut bases = vec![0usize; n];
    let mut addr = start;
    for &r in &region_in_slot {
        bases[r] = addr;
        addr += sizes[r] as usize + gap;
    }
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED;
    if page_size as u64 == HUGE_2M {
        flags |= libc::MAP_HUGETLB | libc::MAP_HUGE_2MB;
    }
    for r in 0..n {
        if let Err(e) = mmap(
            bases[r],
            sizes[r] as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
        ) {
            if page_size as u64 == HUGE_2M {
                let need: u64 = sizes.iter().sum::<u64>() / HUGE_2M;
                let nr = std::fs::read_to_string("/proc/sys/vm/nr_hugepages")
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .unwrap_or(0);
                return Err(Fatal::Setup(format!(
                    "mapping region {r} with 2 MiB huge pages failed ({e}): {need} huge pages are needed, {} are free; \
                     reserve them as root with `echo {} > /proc/sys/vm/nr_hugepages`",
                    hugepages_free().map_or("?".to_string(), |f| f.to_string()),
                    nr + need
                )));
            }
            return Err(Fatal::Setup(format!(
                "mapping region {r} ({} bytes): {e}",
                sizes[r]
            )));
        }
    }
    Ok(bases)
}

/// Touches and frees `len` bytes of fresh anonymous memory (of huge pages for 2 MiB: they go
/// back to the pool, which the regions then draw from).
fn warmup(len: usize, page_size: usize) -> io::Result<f64> {
    let t0 = Instant::now();
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    if page_size as u64 == HUGE_2M {
        flags |= libc::MAP_HUGETLB | libc::MAP_HUGE_2MB;
    }
    let p = mmap(0, len, libc::PROT_READ | libc::PROT_WRITE, flags)?;
    // One write per page: the kernel clears a whole page (huge or not) on its first touch.
    for off in (0..len).step_by(page_size) {
        // SAFETY: `p..p + len` is the fresh private mapping made just above, read-write.
        unsafe { std::ptr::write_volatile((p + off) as *mut u8, 1) };
    }
    // SAFETY: unmaps exactly the mapping made above; nothing refers to it any more.
    unsafe { libc::munmap(p as *mut libc::c_void, len) };
    Ok(secs(t0.elapsed()))
}

fn connect(args: &Args) -> Result<UnixStream, Fatal> {
    let deadline = Instant::now() + Duration::from_secs_f64(args.connect_timeout);
    loop {
        match UnixStream::connect(&args.socket) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused)
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                return Err(Fatal::Setup(format!(
                    "cannot connect to {}: {e} (is the handler listening there? --connect-timeout waits for it)",
                    args.socket.display()
                )))
            }
        }
    }
}

fn run(args: Args) -> Result<bool, Fatal> {
    let file = File::open(&args.image).map_err(setup(&format!(
        "cannot open --image {}",
        args.image.display()
    )))?;
    let image_len = file.metadata().map_err(setup("stat of the image"))?.len();
    let size = validate(&args, image_len)?;
    let ps = args.page_size as usize;
    let pages_total = size / ps as u64;
    let n = args.regions;
    let mut rng = Rng::new(args.seed);

    let mut expected = hash_image(&file, size, ps, args.threads)
        .map_err(|e| Fatal::Setup(format!("reading the image {}: {e}", args.image.display())))?;
    let mut load_writes = Vec::new();
    for page in load_write_pages(args.load_writes, pages_total) {
        let mut buf = vec![0u8; ps];
        file.read_exact_at(&mut buf, page * ps as u64)
            .map_err(setup("reading the image for --load-writes"))?;
        buf[0] ^= 0xff;
        expected[page as usize] = xxh3_64(&buf);
        load_writes.push((page, buf[0]));
    }
    drop(file);

    // Regions: pages split as evenly as possible, in file order.
    let mut sizes = Vec::with_capacity(n);
    let mut first_pages = Vec::with_capacity(n);
    let mut next = 0u64;
    for r in 0..n as u64 {
        let pages = pages_total / n as u64 + u64::from(r < pages_total % n as u64);
        first_pages.push(next);
        sizes.push(pages * ps as u64);
        next += pages;
    }
    // Address order: file order, or (--shuffle) a permutation that is not file order.
    let mut slot_of_region: Vec<usize> = (0..n).collect();
    if args.shuffle && n > 1 {
        while slot_of_region.iter().enumerate().all(|(i, &s)| i == s) {
            rng.shuffle(&mut slot_of_region);
        }
    }

    let warmup_seconds = if args.warmup {
        Some(warmup(size as usize, ps).map_err(setup(
            "warm-up (for 2 MiB pages: are enough huge pages reserved?)",
        ))?)
    } else {
        None
    };
    let bases = map_regions(&sizes, &slot_of_region, ps)?;
    let regions: Vec<Region> = (0..n)
        .map(|r| Region {
            base: bases[r],
            size: sizes[r],
            offset: first_pages[r] * ps as u64,
            first_page: first_pages[r],
        })
        .collect();

    // The userfaultfd, as Firecracker sets it up before the handover.
    let source = match args.uffd {
        UffdArg::Auto => UffdSource::Auto,
        UffdArg::Syscall => UffdSource::Syscall,
        UffdArg::Dev => UffdSource::Dev,
    };
    let (uffd_fd, uffd_source) = uffd::create(source).map_err(|e| {
        Fatal::Setup(format!(
            "cannot create a userfaultfd: {e} (run as root, or `sysctl vm.unprivileged_userfaultfd=1`, or give access to /dev/userfaultfd)"
        ))
    })?;
    let mut features = uffd::UFFD_FEATURE_EVENT_REMOVE;
    if ps as u64 == HUGE_2M {
        features |= uffd::UFFD_FEATURE_MISSING_HUGETLBFS;
    }
    uffd::api(uffd_fd.as_raw_fd(), features)
        .map_err(setup("UFFDIO_API with EVENT_REMOVE (+MISSING_HUGETLBFS)"))?;
    for r in &regions {
        let ioctls = uffd::register_missing(uffd_fd.as_raw_fd(), r.base as u64, r.size).map_err(
            setup(&format!("UFFDIO_REGISTER of {:#x}+{:#x}", r.base, r.size)),
        )?;
        if ioctls & (1 << uffd::NR_COPY) == 0 || ioctls & (1 << uffd::NR_WAKE) == 0 {
            return Err(Fatal::Setup(format!(
                "the kernel offers no UFFDIO_COPY/WAKE on the regions (ioctls {ioctls:#x})"
            )));
        }
    }

    // The JSON, in address order or (--shuffle) an order that is not ascending by address.
    let mut send_order: Vec<usize> = (0..n).collect();
    send_order.sort_by_key(|&r| regions[r].base);
    if args.shuffle && n > 1 {
        let ascending = send_order.clone();
        while send_order == ascending {
            rng.shuffle(&mut send_order);
        }
    }
    let msgs: Vec<RegionMsg> = send_order
        .iter()
        .map(|&r| {
            let g = &regions[r];
            RegionMsg::new(
                args.proto_version,
                g.base as u64,
                g.size,
                g.offset,
                ps as u64,
            )
        })
        .collect();
    let json = serde_json::to_vec(&msgs).map_err(|e| Fatal::Runtime(format!("JSON: {e}")))?;

    let skeleton = Report {
        verified: false,
        pages_total,
        pages_touched: 0,
        mismatches: 0,
        first_mismatch: None,
        zero_violations: 0,
        pages_removed: 0,
        complete: None,
        fault_latency_us: None,
        pages_resident_before_touch: None,
        same_page_us: None,
        seconds_touch: 0.0,
        seconds_to_complete: None,
        first_touch_us: None,
        version: args.proto_version.as_str(),
        regions: n,
        page_size: ps as u64,
        threads: args.threads,
        seed: args.seed,
        uffd_source,
        warmup_seconds,
        exited_early: false,
        error: None,
    };
    // Leaked: the watchdog and an early exit may use it until the process exits.
    let run: &'static Run = Box::leak(Box::new(Run {
        mem: Mem {
            regions,
            page_size: ps,
            pages_total,
            expected,
        },
        touched: AtomicU64::new(0),
        mismatches: AtomicU64::new(0),
        first_mismatch: Mutex::new(None),
        exit_after: args.exit_after_pages,
        phase: Mutex::new("handover"),
        touch_start: OnceLock::new(),
        emit: Mutex::new(()),
        skeleton,
    }));
    // The touch order: a random permutation of every page (or file order); the first P% are
    // touched.
    let mut order: Vec<u64> = (0..pages_total).collect();
    if !args.sequential {
        rng.shuffle(&mut order);
    }
    let k = if args.touch_percent >= 100.0 {
        pages_total
    } else {
        ((pages_total as f64 * args.touch_percent / 100.0).round() as u64).min(pages_total)
    };

    let stream = connect(&args)?;
    let t_start = Instant::now();
    if args.timeout > 0.0 {
        let after = args.timeout;
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs_f64(after));
            run.timeout(after)
        });
    }

    // The handover: JSON + the userfaultfd in one sendmsg, then our copy of the fd goes.
    let fds = [uffd_fd.as_raw_fd()];
    let sent = sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(&json)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(|e| {
        Fatal::Runtime(format!(
            "sendmsg of the handover to {}: {e}",
            args.socket.display()
        ))
    })?;
    if sent < json.len() {
        (&stream)
            .write_all(&json[sent..])
            .map_err(|e| Fatal::Runtime(format!("sending the rest of the handover: {e}")))?;
    }
    drop(uffd_fd);
    if args.exit_after_pages == Some(0) {
        run.exit_early();
    }
    for &(page, byte) in &load_writes {
        load_write(&run.mem, page, byte);
    }

    let result = touch_and_verify(&args, run, &order[..k as usize], &order, t_start);
    let (report, ok) = match result {
        Ok(r) => {
            let ok = r.verified;
            (r, ok)
        }
        Err(msg) => {
            let mut r = run.partial_report();
            r.verified = false;
            r.error = Some(msg);
            (r, false)
        }
    };
    {
        let _once = run.emit.lock().unwrap_or_else(|p| p.into_inner());
        print_report(&report);
        if args.hold > 0.0 {
            std::thread::sleep(Duration::from_secs_f64(args.hold));
        }
        drop(stream);
        // Exit while holding the emit lock, so a watchdog firing now cannot print a second report.
        exit(if ok { 0 } else { 1 });
    }
}

/// The phases after the handover. Returns the final report.
fn touch_and_verify(
    args: &Args,
    run: &Run,
    chosen: &[u64],
    order: &[u64],
    t_handover: Instant,
) -> Result<Report, String> {
    let mem = &run.mem;
    let ps = mem.page_size;
    let mut hist = ns_histogram();
    let mut buf = vec![0u8; ps];
    let mut first_touch_us = None;
    let mut resident_before: u64 = 0;

    // Phase 1: the very first touch, alone.
    let touch_start = *run.touch_start.get_or_init(Instant::now);
    let mut next = 0usize;
    if let Some(&page) = chosen.first() {
        run.set_phase("first_touch");
        let resident = args.only_missing && mem.resident(mem.addr_of(page));
        let ns = touch(mem, page, &mut buf);
        first_touch_us = Some(ns as f64 / 1000.0);
        if resident {
            resident_before += 1;
        } else {
            let _ = hist.record(ns);
        }
        run.check(page, &buf, "first_touch");
        run.count_touch();
        next = 1;
    }

    // Phase 2: K threads on one page at the same moment.
    let mut same_page_us = None;
    if args.same_page_threads > 0 && mem.pages_total >= 2 {
        run.set_phase("same_page");
        let page = order[1];
        // All K threads first meet at the barrier, then spin on `go`, which this thread sets a
        // moment later: the touches start together (a barrier's futex wake-ups alone trickle in
        // over tens of microseconds, after the first toucher's fault may already be served).
        let barrier = Barrier::new(args.same_page_threads + 1);
        let go = AtomicBool::new(false);
        let lats: Vec<u64> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..args.same_page_threads)
                .map(|_| {
                    let (barrier, go) = (&barrier, &go);
                    s.spawn(move || {
                        let mut b = vec![0u8; ps];
                        barrier.wait();
                        while !go.load(Ordering::Acquire) {
                            std::hint::spin_loop();
                        }
                        let ns = touch(mem, page, &mut b);
                        run.check(page, &b, "same_page");
                        ns
                    })
                })
                .collect();
            barrier.wait();
            std::thread::sleep(Duration::from_millis(2));
            go.store(true, Ordering::Release);
            hs.into_iter()
                .map(|h| h.join().expect("same-page thread panicked"))
                .collect()
        });
        let mut h = ns_histogram();
        for ns in lats {
            let _ = h.record(ns);
        }
        same_page_us = Some(LatencyUs::from_ns(&h));
        run.count_touch();
        next = next.max(2);
    }

    // Phase 3: the rest of the chosen pages, split across the threads.
    run.set_phase("touch");
    let rest = if next < chosen.len() {
        &chosen[next..]
    } else {
        &[][..]
    };
    let per = rest.len().div_ceil(args.threads).max(1);
    let results: Vec<(Histogram<u64>, u64)> = std::thread::scope(|s| {
        let hs: Vec<_> = rest
            .chunks(per)
            .map(|pages| {
                s.spawn(move || {
                    let mut h = ns_histogram();
                    let mut b = vec![0u8; ps];
                    let mut resident_n = 0u64;
                    for &page in pages {
                        let resident = args.only_missing && mem.resident(mem.addr_of(page));
                        let ns = touch(mem, page, &mut b);
                        if resident {
                            resident_n += 1;
                        } else {
                            let _ = h.record(ns);
                        }
                        run.check(page, &b, "touch");
                        run.count_touch();
                    }
                    (h, resident_n)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("touch thread panicked"))
            .collect()
    });
    for (h, r) in results {
        hist.add(&h)
            .map_err(|e| format!("merging histograms: {e}"))?;
        resident_before += r;
    }
    let seconds_touch = secs(touch_start.elapsed());

    // Phase 4: wait until every page is resident, then verify all of them.
    let mut complete = None;
    let mut seconds_to_complete = None;
    if args.wait_complete > 0.0 {
        run.set_phase("wait_complete");
        let deadline = Instant::now() + Duration::from_secs_f64(args.wait_complete);
        let done = wait_resident(mem, deadline)?;
        complete = Some(done);
        if done {
            seconds_to_complete = Some(secs(t_handover.elapsed()));
            run.set_phase("verify_all");
            verify_all(run, args.threads);
        }
    }

    // Phase 5: remove ranges (balloon), which must then read as zeros and stay so.
    let mut zero_violations = 0u64;
    let mut removed: BTreeSet<u64> = BTreeSet::new();
    if !args.remove.is_empty() {
        run.set_phase("remove");
        for &(first, count) in &args.remove {
            for (addr, len) in page_runs(mem, first, count) {
                // SAFETY: `addr..addr + len` is page aligned and inside one of our regions;
                // MADV_DONTNEED only drops its contents (the handler sees UFFD_EVENT_REMOVE),
                // and nothing holds a reference into it.
                let r =
                    unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) };
                if r != 0 {
                    return Err(format!(
                        "madvise(MADV_DONTNEED) of {addr:#x}+{len:#x}: {}",
                        io::Error::last_os_error()
                    ));
                }
            }
            removed.extend(first..first + count);
        }
        let mut bad: BTreeSet<u64> = BTreeSet::new();
        for pass in 0..2 {
            if pass == 1 {
                std::thread::sleep(Duration::from_millis(200));
            }
            for &page in &removed {
                mem.read_page(page, &mut buf);
                if buf.iter().any(|&b| b != 0) {
                    bad.insert(page);
                }
            }
        }
        zero_violations = bad.len() as u64;
    }

    let mismatches = run.mismatches.load(Ordering::SeqCst);
    Ok(Report {
        verified: mismatches == 0 && zero_violations == 0 && complete != Some(false),
        pages_touched: run.touched.load(Ordering::SeqCst),
        mismatches,
        first_mismatch: run.first_mismatch.lock().unwrap().clone(),
        zero_violations,
        pages_removed: removed.len() as u64,
        complete,
        fault_latency_us: Some(LatencyUs::from_ns(&hist)),
        pages_resident_before_touch: args.only_missing.then_some(resident_before),
        same_page_us,
        seconds_touch,
        seconds_to_complete,
        first_touch_us,
        ..run.skeleton.clone()
    })
}

/// The address ranges (one per region crossed) of file pages `first..first + count`.
fn page_runs(mem: &Mem, first: u64, count: u64) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut page = first;
    let end = first + count;
    while page < end {
        let r = &mem.regions[mem.region_of(page)];
        let region_end = r.first_page + r.size / mem.page_size as u64;
        let stop = end.min(region_end);
        runs.push((mem.addr_of(page), ((stop - page) as usize) * mem.page_size));
        page = stop;
    }
    runs
}

/// Polls mincore every 5 ms until every page of every region is resident or `deadline` passes.
fn wait_resident(mem: &Mem, deadline: Instant) -> Result<bool, String> {
    // Per region, the first base page not yet seen resident (pages before it stay resident:
    // nothing removes pages in this phase).
    let mut cursor = vec![0usize; mem.regions.len()];
    let mut vec = Vec::new();
    loop {
        let mut all = true;
        for (r, reg) in mem.regions.iter().enumerate() {
            let n = reg.size as usize / BASE_PAGE;
            if cursor[r] == n {
                continue;
            }
            let len = n - cursor[r];
            vec.resize(len, 0u8);
            let addr = reg.base + cursor[r] * BASE_PAGE;
            // SAFETY: `addr..addr + len * 4096` is page aligned and inside region `r`; `vec`
            // has one byte per base page of that range.
            let rc = unsafe {
                libc::mincore(addr as *mut libc::c_void, len * BASE_PAGE, vec.as_mut_ptr())
            };
            if rc != 0 {
                return Err(format!("mincore: {}", io::Error::last_os_error()));
            }
            match vec.iter().position(|&v| v & 1 == 0) {
                Some(i) => {
                    cursor[r] += i;
                    all = false;
                }
                None => cursor[r] = n,
            }
        }
        if all {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Verifies every page (all resident, so no faults), on `threads` threads.
fn verify_all(run: &Run, threads: usize) {
    let pages = run.mem.pages_total;
    let per = pages.div_ceil(threads as u64).max(1);
    std::thread::scope(|s| {
        for t in 0..threads as u64 {
            let lo = t * per;
            let hi = ((t + 1) * per).min(pages);
            if lo >= hi {
                continue;
            }
            s.spawn(move || {
                let mut b = vec![0u8; run.mem.page_size];
                for page in lo..hi {
                    run.mem.read_page(page, &mut b);
                    run.check(page, &b, "complete");
                }
            });
        }
    });
}
