//! `postcopy probe`: can this host do postcopy (the seed's `postcopy_ram_supported_by_host`).
//!
//! [`run`] performs every check for real (it opens userfaultfds, registers and fills pages,
//! creates an io_uring, tracks dirty pages) and returns a [`ProbeReport`]; nothing is inferred
//! from the kernel version alone. A check is
//! [`Status::Fail`] only when postcopy cannot work at all; missing optional pieces
//! (hugetlbfs, `UFFDIO_MOVE`, shmem) are [`Status::Warn`] with the fix.

use std::fmt::Write as _;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use nix::errno::Errno;

use crate::sys::dirty::{DirtyError, UffdWpTracker};
use crate::sys::mem::{base_page_size, memlock_limit, Mapping, MemError};
use crate::sys::uffd::{feature, ioctl_bit, mode, ApiInfo, Uffd, UffdError};

/// The outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Works as postcopy needs.
    Pass,
    /// Works, but something optional is missing or a setting costs performance.
    Warn,
    /// Postcopy cannot work on this host until this is fixed.
    Fail,
}

/// One check: what was looked at, what was found, and how to fix it when not `Pass`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Check {
    /// Short stable name (e.g. `register anonymous`).
    pub name: String,
    /// The outcome.
    pub status: Status,
    /// What was found (and, when not `Pass`, why it matters).
    pub detail: String,
    /// What an operator should do, when not `Pass`.
    pub fix: Option<String>,
}

/// Every check of one probe run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ProbeReport {
    /// No check failed: postcopy is supported on this host.
    pub ok: bool,
    /// The checks in the order they ran.
    pub checks: Vec<Check>,
}

/// Errors of the probe's own plumbing (reading `/proc` and `/sys`). They end up in a check's
/// detail, never abort the probe.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// A `/proc` or `/sys` file could not be read.
    #[error("cannot read {path}: {source} (is /proc or /sys mounted in this container?)")]
    ReadFile {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A `/proc` or `/sys` file held something we could not parse.
    #[error("unexpected contents of {path}: {contents:?} (report this together with `uname -a`)")]
    Parse {
        /// The file.
        path: String,
        /// What it held.
        contents: String,
    },
}

const MIB: u64 = 1 << 20;
const HUGE_2M: usize = 2 << 20;
/// `CAP_SYS_PTRACE` (capability bit 19).
const CAP_SYS_PTRACE: u32 = 19;
/// `CAP_IPC_LOCK` (capability bit 14).
const CAP_IPC_LOCK: u32 = 14;
/// `RLIMIT_MEMLOCK` below which a non-root engine may fail to register its io_uring buffers.
const MEMLOCK_WANTED: u64 = 64 * MIB;

fn check(name: &str, status: Status, detail: impl Into<String>, fix: Option<String>) -> Check {
    Check {
        name: name.to_string(),
        status,
        detail: detail.into(),
        fix,
    }
}

fn pass(name: &str, detail: impl Into<String>) -> Check {
    check(name, Status::Pass, detail, None)
}

fn read_trim(path: &str) -> Result<String, ProbeError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|source| ProbeError::ReadFile {
            path: path.to_string(),
            source,
        })
}

fn read_u64(path: &str) -> Result<u64, ProbeError> {
    let s = read_trim(path)?;
    s.parse().map_err(|_| ProbeError::Parse {
        path: path.to_string(),
        contents: s,
    })
}

/// A field of `/proc/self/status` (e.g. `VmLck`, `CapEff`), without the name.
fn proc_status_field(field: &str) -> Result<String, ProbeError> {
    let path = "/proc/self/status";
    let all = read_trim(path)?;
    all.lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .strip_prefix(':')
                .map(|v| v.trim().to_string())
        })
        .ok_or_else(|| ProbeError::Parse {
            path: path.to_string(),
            contents: format!("no {field} line"),
        })
}

/// Whether the effective capability set holds `cap` (false when unknown).
fn has_capability(cap: u32) -> bool {
    proc_status_field("CapEff")
        .ok()
        .and_then(|hex| u64::from_str_radix(&hex, 16).ok())
        .is_some_and(|mask| mask & (1u64 << cap) != 0)
}

fn is_root() -> bool {
    // `Uid:` is real, effective, saved, filesystem.
    proc_status_field("Uid")
        .ok()
        .and_then(|v| v.split_whitespace().nth(1)?.parse::<u32>().ok())
        == Some(0)
}

fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|e| format!("unknown (uname failed: {e})"))
}

/// `(major, minor)` of a release string such as `6.18.44-fc`.
fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

fn fmt_bytes(b: u64) -> String {
    if b == u64::MAX {
        "unlimited".to_string()
    } else if b >= 1024 * MIB && b % (1024 * MIB) == 0 {
        format!("{} GiB", b / (1024 * MIB))
    } else if b >= MIB && b % MIB == 0 {
        format!("{} MiB", b / MIB)
    } else if b >= 1024 && b % 1024 == 0 {
        format!("{} KiB", b / 1024)
    } else {
        format!("{b} B")
    }
}

/// The feature bits this crate cares about, by name.
const FEATURES_OF_INTEREST: [(u64, &str); 7] = [
    (feature::EVENT_REMOVE, "EVENT_REMOVE"),
    (feature::MISSING_SHMEM, "MISSING_SHMEM"),
    (feature::MISSING_HUGETLBFS, "MISSING_HUGETLBFS"),
    (feature::THREAD_ID, "THREAD_ID"),
    (feature::MOVE, "MOVE"),
    (feature::WP_ASYNC, "WP_ASYNC"),
    (feature::POISON, "POISON"),
];

fn feature_names(mask: u64, present: bool) -> Vec<&'static str> {
    FEATURES_OF_INTEREST
        .iter()
        .filter(|(bit, _)| (mask & bit != 0) == present)
        .map(|(_, n)| *n)
        .collect()
}

fn join_or(names: &[&str], empty: &str) -> String {
    if names.is_empty() {
        empty.to_string()
    } else {
        names.join(" ")
    }
}

/// A fresh userfaultfd with its one `UFFDIO_API` handshake done (no features asked).
fn fresh_uffd() -> Result<(Uffd, ApiInfo), UffdError> {
    let uffd = Uffd::open(false)?;
    let info = uffd.api(0)?;
    Ok((uffd, info))
}

/// Runs every check. Never panics on a missing file or a refused syscall: those are findings.
pub fn run() -> ProbeReport {
    let mut checks = Vec::new();
    let release = kernel_release();
    checks.push(check_kernel(&release));
    checks.extend(check_uffd_open());
    let api = Uffd::probe_features().map(|(info, _)| info);
    checks.push(check_api(&api));
    checks.push(check_register_anonymous());
    checks.push(check_register_shmem());
    checks.push(check_register_hugetlb());
    checks.push(check_placement());
    checks.push(check_io_uring());
    checks.push(check_io_uring_sysctl());
    checks.push(check_move(&api));
    checks.push(check_page_sizes());
    checks.push(check_thp());
    checks.push(check_mlock());
    checks.push(check_pagemap_scan(&api, &release));
    let ok = checks.iter().all(|c| c.status != Status::Fail);
    ProbeReport { ok, checks }
}

fn check_kernel(release: &str) -> Check {
    const NAME: &str = "kernel";
    match parse_release(release) {
        Some(v) if v >= (6, 8) => pass(NAME, format!("Linux {release} (>= 6.8: UFFDIO_MOVE, /dev/userfaultfd, io_uring DEFER_TASKRUN)")),
        Some(_) => check(
            NAME,
            Status::Warn,
            format!("Linux {release}: older than 6.8, so no UFFDIO_MOVE and some io_uring set-up flags may be missing; the checks below say what works"),
            Some("run on Linux 6.8 or newer for zero-copy placement (UFFDIO_MOVE)".into()),
        ),
        None => check(
            NAME,
            Status::Warn,
            format!("cannot parse kernel release {release:?}"),
            Some("check `uname -r`; the checks below test the features directly".into()),
        ),
    }
}

/// The device, the syscall and the sysctl; the device and syscall are Fail only if neither works.
fn check_uffd_open() -> Vec<Check> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    let root = is_root();
    let ptrace = has_capability(CAP_SYS_PTRACE);

    // /dev/userfaultfd: exists, permissions, works.
    let dev_path = Path::new("/dev/userfaultfd");
    let dev_meta = match std::fs::metadata(dev_path) {
        Ok(m) => format!(
            "exists, mode {:o}, owner uid {} gid {}",
            m.permissions().mode() & 0o7777,
            m.uid(),
            m.gid()
        ),
        Err(e) => format!("absent ({e})"),
    };
    let device: Result<(), String> = match Uffd::open_device(flags) {
        Ok(fd) => Uffd::from_fd(fd)
            .api(0)
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(e) => Err(format!("open/USERFAULTFD_IOC_NEW failed: {e}")),
    };
    let syscall: Result<(), String> = match Uffd::open_syscall(flags) {
        Ok(fd) => Uffd::from_fd(fd)
            .api(0)
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(e) => Err(format!("userfaultfd(2) failed: {e}")),
    };
    let either = device.is_ok() || syscall.is_ok();
    let not_ok = if either { Status::Warn } else { Status::Fail };

    let dev_check = match &device {
        Ok(()) => pass("uffd device", format!("/dev/userfaultfd {dev_meta}; works")),
        Err(e) => check(
            "uffd device",
            not_ok,
            format!("/dev/userfaultfd {dev_meta}; {e}{}", if either { " (the syscall works, so this is not needed)" } else { "" }),
            Some("use Linux 6.1+ and grant access: chmod 0660 /dev/userfaultfd and add the user to its group (or a udev rule)".into()),
        ),
    };

    let sysctl_path = "/proc/sys/vm/unprivileged_userfaultfd";
    let sysctl = read_u64(sysctl_path);
    let sys_check = match &syscall {
        Ok(()) => pass("uffd syscall", "userfaultfd(2) works"),
        Err(e) => check(
            "uffd syscall",
            not_ok,
            format!(
                "{e}{}",
                if either {
                    " (the device works, so this is not needed)"
                } else {
                    ""
                }
            ),
            Some(
                "run as root or with CAP_SYS_PTRACE, or set sysctl vm.unprivileged_userfaultfd=1"
                    .into(),
            ),
        ),
    };

    let who = match (root, ptrace) {
        (true, _) => "running as root",
        (false, true) => "not root, has CAP_SYS_PTRACE",
        (false, false) => "not root, no CAP_SYS_PTRACE",
    };
    let sysctl_check = match sysctl {
        Ok(v) if v == 1 || root || ptrace => pass(
            "uffd sysctl",
            format!("vm.unprivileged_userfaultfd = {v}; {who}: userfaultfd(2) may serve faults taken in kernel mode too"),
        ),
        Ok(v) => check(
            "uffd sysctl",
            if either { Status::Warn } else { Status::Fail },
            format!("vm.unprivileged_userfaultfd = {v}; {who}: userfaultfd(2) needs privilege (or UFFD_USER_MODE_ONLY, which cannot serve faults taken inside system calls)"),
            Some("run as root or with CAP_SYS_PTRACE, use /dev/userfaultfd, or: sysctl vm.unprivileged_userfaultfd=1".into()),
        ),
        Err(e) => check(
            "uffd sysctl",
            Status::Warn,
            format!("{e}; {who}"),
            Some("the kernel may lack CONFIG_USERFAULTFD; check zgrep USERFAULTFD /proc/config.gz".into()),
        ),
    };
    vec![dev_check, sys_check, sysctl_check]
}

fn check_api(api: &Result<ApiInfo, UffdError>) -> Check {
    const NAME: &str = "uffd api";
    match api {
        Ok(info) => {
            let have = feature_names(info.features, true);
            let missing = feature_names(info.features, false);
            let detail = format!(
                "features {:#x}: {}; missing: {}; ioctls {:#x}: {}",
                info.features,
                join_or(&have, "none of interest"),
                join_or(&missing, "none"),
                info.ioctls,
                ioctl_bit::names(info.ioctls).join(" ")
            );
            let needed = feature::EVENT_REMOVE | feature::THREAD_ID;
            if info.features & needed == needed {
                pass(NAME, detail)
            } else {
                check(
                    NAME,
                    Status::Warn,
                    format!("{detail}; EVENT_REMOVE (4.11) and THREAD_ID (4.14) are needed to track discards and attribute faults"),
                    Some("upgrade the kernel (Linux 6.8+ recommended)".into()),
                )
            }
        }
        Err(e) => check(
            NAME,
            Status::Fail,
            format!("UFFDIO_API handshake failed: {e}"),
            Some("fix the userfaultfd checks above (root, /dev/userfaultfd access or vm.unprivileged_userfaultfd=1); the kernel needs CONFIG_USERFAULTFD".into()),
        ),
    }
}

/// Registers `mapping` MISSING with a fresh userfaultfd; returns the range's ioctls.
fn register_with_fresh(mapping: &Mapping) -> Result<u64, UffdError> {
    let (uffd, _) = fresh_uffd()?;
    let ioctls = uffd.register(mapping.addr(), mapping.len_bytes(), mode::MISSING)?;
    // Dropping `uffd` unregisters the range.
    Ok(ioctls)
}

/// Judges the ioctls of a registered range: COPY + WAKE needed, ZEROPAGE expected unless huge.
fn judge_ioctls(ioctls: u64, expect_zeropage: bool) -> (bool, bool, String) {
    let copy_wake =
        ioctls & (ioctl_bit::COPY | ioctl_bit::WAKE) == ioctl_bit::COPY | ioctl_bit::WAKE;
    let zero = !expect_zeropage || ioctls & ioctl_bit::ZEROPAGE != 0;
    let names = ioctl_bit::names(ioctls).join(" ");
    (
        copy_wake,
        zero,
        format!("range ioctls {ioctls:#x}: {names}"),
    )
}

fn check_register_anonymous() -> Check {
    const NAME: &str = "register anonymous";
    let page = base_page_size();
    let mapping = match Mapping::anonymous(4 * page, "probe anonymous") {
        Ok(m) => m,
        Err(e) => {
            return check(
                NAME,
                Status::Fail,
                e.to_string(),
                Some("check ulimit -v and memory overcommit".into()),
            )
        }
    };
    match register_with_fresh(&mapping) {
        Ok(ioctls) => {
            let (copy_wake, zero, detail) = judge_ioctls(ioctls, true);
            if !copy_wake {
                check(
                    NAME,
                    Status::Fail,
                    format!(
                        "{detail}; UFFDIO_COPY/UFFDIO_WAKE missing on private anonymous memory"
                    ),
                    Some("upgrade the kernel; postcopy needs UFFDIO_COPY".into()),
                )
            } else if !zero {
                check(
                    NAME,
                    Status::Warn,
                    format!("{detail}; no UFFDIO_ZEROPAGE: zero pages are placed by copying zeros"),
                    Some("upgrade the kernel".into()),
                )
            } else {
                pass(NAME, detail)
            }
        }
        Err(e) => check(
            NAME,
            Status::Fail,
            format!("cannot register private anonymous memory MISSING: {e}"),
            Some("fix the userfaultfd checks above; the kernel needs CONFIG_USERFAULTFD".into()),
        ),
    }
}

fn check_register_shmem() -> Check {
    const NAME: &str = "register shmem";
    let page = base_page_size();
    let mapping = match Mapping::shared_anonymous(4 * page, "probe shmem") {
        Ok(m) => m,
        Err(e) => {
            return check(
                NAME,
                Status::Warn,
                e.to_string(),
                Some(
                    "check /dev/shm and memory limits; only needed for memfd/shmem guest RAM"
                        .into(),
                ),
            )
        }
    };
    match register_with_fresh(&mapping) {
        Ok(ioctls) => {
            let (copy_wake, zero, detail) = judge_ioctls(ioctls, true);
            if copy_wake && zero {
                pass(NAME, detail)
            } else {
                check(NAME, Status::Warn, format!("{detail}; shmem guest RAM cannot be served fully"), Some("upgrade the kernel (MISSING_SHMEM is 4.11+), or use private anonymous guest RAM".into()))
            }
        }
        Err(e) => check(
            NAME,
            Status::Warn,
            format!("cannot register shmem MISSING: {e}; shmem (memfd) guest RAM is not supported"),
            Some("upgrade the kernel (4.11+), or use private anonymous guest RAM".into()),
        ),
    }
}

fn check_register_hugetlb() -> Check {
    const NAME: &str = "register hugetlb 2M";
    let reserve_fix = || {
        Some(format!(
            "reserve huge pages: echo N > /proc/sys/vm/nr_hugepages (N = guest RAM / 2 MiB, e.g. {} for 1 GiB)",
            (1u64 << 30) / HUGE_2M as u64
        ))
    };
    let nr = read_u64("/proc/sys/vm/nr_hugepages");
    let reserved = match &nr {
        Ok(n) => format!("vm.nr_hugepages = {n}"),
        Err(e) => e.to_string(),
    };
    let mapping = match Mapping::anonymous_huge_2m(HUGE_2M, "probe hugetlb") {
        Ok(m) => m,
        Err(MemError::Map { errno: Errno::ENOMEM, .. }) => {
            return check(NAME, Status::Warn, format!("{reserved}; mmap(MAP_HUGETLB|MAP_HUGE_2MB) failed with ENOMEM: no 2 MiB huge pages available"), reserve_fix())
        }
        Err(e) => return check(NAME, Status::Warn, format!("{reserved}; {e}"), reserve_fix()),
    };
    match register_with_fresh(&mapping) {
        Ok(ioctls) => {
            let (copy_wake, _, detail) = judge_ioctls(ioctls, false);
            if !copy_wake {
                check(
                    NAME,
                    Status::Warn,
                    format!("{reserved}; {detail}; UFFDIO_COPY missing on hugetlbfs"),
                    Some("upgrade the kernel (MISSING_HUGETLBFS is 4.11+)".into()),
                )
            } else if matches!(nr, Ok(0)) {
                check(NAME, Status::Warn, format!("{reserved}; {detail}; registration works but no huge pages are reserved, so a fault would fail"), reserve_fix())
            } else {
                pass(NAME, format!("{reserved}; {detail}"))
            }
        }
        Err(e) => check(
            NAME,
            Status::Warn,
            format!("{reserved}; cannot register hugetlbfs MISSING: {e}"),
            Some("upgrade the kernel (4.11+), or use 4 KiB guest RAM".into()),
        ),
    }
}

/// Places a page of a known pattern with `UFFDIO_COPY` and a zero page with `UFFDIO_ZEROPAGE`,
/// then reads both back (they are present, so the reads cannot fault).
fn check_placement() -> Check {
    const NAME: &str = "placement";
    let fix = || {
        Some(
            "fix the userfaultfd checks above; if they pass, report this with `uname -a`"
                .to_string(),
        )
    };
    let page = base_page_size();
    let result = (|| -> Result<String, String> {
        let (uffd, _) = fresh_uffd().map_err(|e| e.to_string())?;
        let mapping = Mapping::anonymous(2 * page, "probe placement").map_err(|e| e.to_string())?;
        uffd.register(mapping.addr(), 2 * page, mode::MISSING)
            .map_err(|e| e.to_string())?;
        let pattern: Vec<u8> = (0..page).map(|i| (i * 7 + 13) as u8).collect();
        uffd.copy(mapping.addr(), pattern.as_ptr(), page, false)
            .map_err(|e| e.to_string())?;
        let mut back = vec![0u8; page];
        mapping.read_into(0, &mut back);
        if back != pattern {
            let at = back
                .iter()
                .zip(&pattern)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            return Err(format!(
                "UFFDIO_COPY reported success but the page differs at byte {at}"
            ));
        }
        uffd.zeropage(mapping.addr() + page, page, false)
            .map_err(|e| e.to_string())?;
        mapping.read_into(page, &mut back);
        if let Some(at) = back.iter().position(|&b| b != 0) {
            return Err(format!(
                "UFFDIO_ZEROPAGE reported success but byte {at} is not zero"
            ));
        }
        Ok(format!(
            "UFFDIO_COPY of a {page}-byte pattern read back intact; UFFDIO_ZEROPAGE reads as zeros"
        ))
    })();
    match result {
        Ok(detail) => pass(NAME, detail),
        Err(e) => check(NAME, Status::Fail, e, fix()),
    }
}

fn check_io_uring() -> Check {
    const NAME: &str = "io_uring";
    use io_uring::opcode;
    let ring = match io_uring::IoUring::new(8) {
        Ok(r) => r,
        Err(e) => {
            return check(
                NAME,
                Status::Fail,
                format!("io_uring_setup failed: {e}"),
                Some("use Linux 6.1+ with CONFIG_IO_URING, allow io_uring in the seccomp profile (containers), and sysctl kernel.io_uring_disabled=0".into()),
            )
        }
    };
    let mut probe = io_uring::Probe::new();
    if let Err(e) = ring.submitter().register_probe(&mut probe) {
        return check(
            NAME,
            Status::Fail,
            format!("ring created but IORING_REGISTER_PROBE failed: {e}"),
            Some("use Linux 5.6 or newer (6.1+ recommended)".into()),
        );
    }
    let wanted = [
        (opcode::ReadFixed::CODE, "READ_FIXED"),
        (opcode::WriteFixed::CODE, "WRITE_FIXED"),
        (opcode::Read::CODE, "READ"),
        (opcode::Send::CODE, "SEND"),
        (opcode::Recv::CODE, "RECV"),
        (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
        (opcode::PollAdd::CODE, "POLL_ADD"),
    ];
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(code, _)| !probe.is_supported(*code))
        .map(|(_, n)| *n)
        .collect();
    let all: Vec<&str> = wanted.iter().map(|(_, n)| *n).collect();
    if missing.is_empty() {
        pass(
            NAME,
            format!("ring of 8 created; opcodes supported: {}", all.join(" ")),
        )
    } else {
        check(
            NAME,
            Status::Fail,
            format!("ring of 8 created; opcodes missing: {}", missing.join(" ")),
            Some("use Linux 6.1 or newer".into()),
        )
    }
}

fn check_io_uring_sysctl() -> Check {
    const NAME: &str = "io_uring sysctl";
    let path = "/proc/sys/kernel/io_uring_disabled";
    if !Path::new(path).exists() {
        return pass(
            NAME,
            format!("{path} absent (kernel older than 6.6): io_uring unrestricted"),
        );
    }
    let fix = Some("sysctl kernel.io_uring_disabled=0".to_string());
    match read_u64(path) {
        Ok(0) => pass(NAME, "kernel.io_uring_disabled = 0"),
        Ok(1) if io_uring::IoUring::new(2).is_ok() => check(
            NAME,
            Status::Warn,
            "kernel.io_uring_disabled = 1: only CAP_SYS_ADMIN or members of kernel.io_uring_group may create rings; this process can, others may not",
            fix,
        ),
        Ok(v) => check(
            NAME,
            Status::Fail,
            format!("kernel.io_uring_disabled = {v}: io_uring is restricted ({})", if v == 1 { "privileged users only" } else { "disabled for everyone" }),
            fix,
        ),
        Err(e) => check(NAME, Status::Warn, e.to_string(), fix),
    }
}

fn check_move(api: &Result<ApiInfo, UffdError>) -> Check {
    const NAME: &str = "uffd move";
    match api {
        Ok(info) if info.features & feature::MOVE != 0 => pass(NAME, "UFFD_FEATURE_MOVE offered: pages received into temp buffers can be moved, not copied"),
        Ok(_) => check(
            NAME,
            Status::Warn,
            "UFFD_FEATURE_MOVE not offered (needs Linux 6.8): placement copies each page (UFFDIO_COPY)",
            Some("run on Linux 6.8 or newer for zero-copy placement".into()),
        ),
        Err(e) => check(NAME, Status::Warn, format!("unknown: {e}"), Some("fix the userfaultfd checks above".into())),
    }
}

fn check_page_sizes() -> Check {
    const NAME: &str = "page sizes";
    let mut sizes: Vec<u64> = std::fs::read_dir("/sys/kernel/mm/hugepages")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    n.strip_prefix("hugepages-")?
                        .strip_suffix("kB")?
                        .parse::<u64>()
                        .ok()
                })
                .collect()
        })
        .unwrap_or_default();
    sizes.sort_unstable();
    let huge = if sizes.is_empty() {
        "none".to_string()
    } else {
        sizes
            .iter()
            .map(|kb| fmt_bytes(kb * 1024))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let dir = "/sys/kernel/mm/hugepages/hugepages-2048kB";
    let two_m = match (
        read_u64(&format!("{dir}/free_hugepages")),
        read_u64(&format!("{dir}/nr_hugepages")),
    ) {
        (Ok(free), Ok(total)) => format!("2 MiB pages free/total: {free}/{total}"),
        (Err(e), _) | (_, Err(e)) => format!("2 MiB pages: {e}"),
    };
    pass(
        NAME,
        format!(
            "base page {}; huge page sizes: {huge}; {two_m}",
            fmt_bytes(base_page_size() as u64)
        ),
    )
}

fn check_thp() -> Check {
    const NAME: &str = "thp";
    let path = "/sys/kernel/mm/transparent_hugepage/enabled";
    let raw = match read_trim(path) {
        Ok(s) => s,
        Err(e) => return pass(NAME, format!("{e}: transparent huge pages not configured")),
    };
    let mode = raw
        .split_whitespace()
        .find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))
        .unwrap_or("unknown")
        .to_string();
    match mode.as_str() {
        "always" => check(
            NAME,
            Status::Warn,
            format!("transparent_hugepage = always ({raw}): postcopy needs MADV_NOHUGEPAGE on regions before discarding pages; the engine sets it, but other anonymous memory faults 2 MiB at a time"),
            Some(format!("echo madvise > {path}")),
        ),
        "madvise" | "never" => pass(NAME, format!("transparent_hugepage = {mode}")),
        _ => check(NAME, Status::Warn, format!("cannot parse {path}: {raw:?}"), Some(format!("echo madvise > {path}"))),
    }
}

fn check_mlock() -> Check {
    const NAME: &str = "mlock";
    let (soft, hard) = memlock_limit();
    let vmlck = proc_status_field("VmLck").unwrap_or_else(|e| e.to_string());
    let root = is_root();
    let ipc_lock = has_capability(CAP_IPC_LOCK);
    let detail = format!(
        "RLIMIT_MEMLOCK soft {} hard {}; VmLck {vmlck}; {}",
        fmt_bytes(soft),
        fmt_bytes(hard),
        if root {
            "root: io_uring fixed buffers are not charged"
        } else if ipc_lock {
            "CAP_IPC_LOCK: io_uring fixed buffers are not charged"
        } else {
            "io_uring fixed buffers count against RLIMIT_MEMLOCK"
        }
    );
    if soft < MEMLOCK_WANTED && !root && !ipc_lock {
        check(
            NAME,
            Status::Warn,
            format!("{detail}; below {}: registering temp-page arenas may fail with ENOMEM", fmt_bytes(MEMLOCK_WANTED)),
            Some("raise it: ulimit -l unlimited (or LimitMEMLOCK=infinity in the systemd unit, memlock in /etc/security/limits.conf)".into()),
        )
    } else {
        pass(NAME, detail)
    }
}

/// Tries dirty tracking without KVM for real: a scratch region tracked with userfaultfd async
/// write-protect and `PAGEMAP_SCAN` must report exactly the pages written to it
/// ([`UffdWpTracker::self_test`]).
fn check_pagemap_scan(api: &Result<ApiInfo, UffdError>, release: &str) -> Check {
    const NAME: &str = "pagemap scan";
    let wp_async = match api {
        Ok(info) if info.features & feature::WP_ASYNC != 0 => "offered",
        Ok(_) => "absent",
        Err(_) => "unknown",
    };
    match UffdWpTracker::self_test() {
        Ok(detail) => pass(
            NAME,
            format!("{detail}: a dirty log without KVM is possible"),
        ),
        Err(e) => {
            let fix = match &e {
                DirtyError::Pagemap(_) => "mount /proc (procfs) in this container",
                DirtyError::Uffd(_) => "fix the userfaultfd checks above",
                DirtyError::NoWriteProtect { .. } => {
                    "use a kernel built with userfaultfd write-protect (CONFIG_HAVE_ARCH_USERFAULTFD_WP)"
                }
                DirtyError::SelfTest(_) => "report this together with `uname -a`",
                _ => "run on Linux 6.7 or newer",
            };
            check(
                NAME,
                Status::Warn,
                format!(
                    "UFFD_FEATURE_WP_ASYNC {wp_async} (kernel {release}); {e}: no dirty log without KVM \
                     (informational; postcopy itself does not need it)"
                ),
                Some(fix.into()),
            )
        }
    }
}

impl ProbeReport {
    /// Checks with status `Fail`.
    pub fn failed(&self) -> usize {
        self.checks
            .iter()
            .filter(|c| c.status == Status::Fail)
            .count()
    }

    /// An aligned `STATUS | CHECK | DETAIL` table, a `fix:` line under each non-Pass row, and a
    /// verdict line.
    pub fn render_table(&self) -> String {
        let status_w = "STATUS".len();
        let name_w = self
            .checks
            .iter()
            .map(|c| c.name.len())
            .chain(std::iter::once("CHECK".len()))
            .max()
            .unwrap_or(5);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<status_w$} | {:<name_w$} | DETAIL",
            "STATUS", "CHECK"
        );
        let _ = writeln!(
            out,
            "{}-+-{}-+-{}",
            "-".repeat(status_w),
            "-".repeat(name_w),
            "-".repeat(40)
        );
        for c in &self.checks {
            let status = match c.status {
                Status::Pass => "PASS",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
            };
            let _ = writeln!(
                out,
                "{status:<status_w$} | {:<name_w$} | {}",
                c.name, c.detail
            );
            if c.status != Status::Pass {
                let fix = c.fix.as_deref().unwrap_or("(none known)");
                let _ = writeln!(out, "{:<status_w$} | {:<name_w$} | fix: {fix}", "", "");
            }
        }
        let failed = self.failed();
        if failed == 0 {
            out.push_str("postcopy: supported on this host\n");
        } else {
            let _ = writeln!(
                out,
                "postcopy: NOT supported on this host ({failed} failed checks)"
            );
        }
        out
    }

    /// The report as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report of strings and enums always serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_passes_on_this_host_with_anonymous_registration() {
        let report = run();
        assert!(
            report.ok,
            "probe failed on this host:\n{}",
            report.render_table()
        );
        let anon = report
            .checks
            .iter()
            .find(|c| c.name == "register anonymous")
            .expect("an anonymous registration check");
        assert_eq!(anon.status, Status::Pass, "{anon:?}");
        assert!(
            anon.detail.contains("COPY") && anon.detail.contains("WAKE"),
            "{anon:?}"
        );
        let place = report
            .checks
            .iter()
            .find(|c| c.name == "placement")
            .unwrap();
        assert_eq!(place.status, Status::Pass, "{place:?}");
        for c in &report.checks {
            assert_eq!(
                c.status == Status::Pass,
                c.fix.is_none(),
                "fix iff not Pass: {c:?}"
            );
        }
        let table = report.render_table();
        assert!(table.starts_with("STATUS | CHECK"), "{table}");
        assert!(
            table.ends_with("postcopy: supported on this host\n"),
            "{table}"
        );
    }

    #[test]
    fn json_parses_back_with_ok_and_checks() {
        let report = run();
        let v: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(v["ok"], serde_json::Value::Bool(report.ok));
        let checks = v["checks"].as_array().expect("checks array");
        assert_eq!(checks.len(), report.checks.len());
        for c in checks {
            assert!(c["name"].is_string() && c["detail"].is_string());
            assert!(
                matches!(c["status"].as_str(), Some("pass" | "warn" | "fail")),
                "{c}"
            );
        }
    }

    #[test]
    fn table_counts_failures() {
        let report = ProbeReport {
            ok: false,
            checks: vec![
                check("a", Status::Fail, "broken", Some("fix it".into())),
                check("long name", Status::Pass, "fine", None),
            ],
        };
        let t = report.render_table();
        assert!(t.contains("FAIL   | a         | broken\n"), "{t}");
        assert!(t.contains("       |           | fix: fix it\n"), "{t}");
        assert!(
            t.ends_with("postcopy: NOT supported on this host (1 failed checks)\n"),
            "{t}"
        );
    }

    #[test]
    fn parses_releases_and_sizes() {
        assert_eq!(parse_release("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(parse_release("5.4"), Some((5, 4)));
        assert_eq!(parse_release("garbage"), None);
        assert_eq!(fmt_bytes(8192 * 1024), "8 MiB");
        assert_eq!(fmt_bytes(u64::MAX), "unlimited");
        assert_eq!(fmt_bytes(1 << 30), "1 GiB");
    }
}
