//! The userfaultfd itself: opening one (the device, the syscall and the sysctl that governs
//! it), the `UFFDIO_API` handshake and its features, and `UFFDIO_MOVE`.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use super::host::{has_capability, is_root, read_u64, CAP_SYS_PTRACE};
use super::{check, pass, Check, Status};
use crate::sys::uffd::{feature, ioctl_bit, ApiInfo, Uffd, UffdError};

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

/// The names of the features of interest that `mask` has (`present`) or lacks.
fn feature_names(mask: u64, present: bool) -> Vec<&'static str> {
    FEATURES_OF_INTEREST
        .iter()
        .filter(|(bit, _)| (mask & bit != 0) == present)
        .map(|(_, n)| *n)
        .collect()
}

/// `names` separated by spaces, or `empty` when there are none.
fn join_or(names: &[&str], empty: &str) -> String {
    if names.is_empty() {
        empty.to_string()
    } else {
        names.join(" ")
    }
}

/// A fresh userfaultfd with its one `UFFDIO_API` handshake done (no features asked).
pub(super) fn fresh_uffd() -> Result<(Uffd, ApiInfo), UffdError> {
    let uffd = Uffd::open(false)?;
    let info = uffd.api(0)?;
    Ok((uffd, info))
}

/// What opening a userfaultfd both ways found.
struct Opened {
    /// `/dev/userfaultfd`: its mode and owner, or why it is absent.
    dev_meta: String,
    /// The device opened and answered `UFFDIO_API`, or why not.
    device: Result<(), String>,
    /// `userfaultfd(2)` opened and answered `UFFDIO_API`, or why not.
    syscall: Result<(), String>,
    /// `userfaultfd(2)` with `UFFD_USER_MODE_ONLY` (Linux 5.11+; no privilege needed):
    /// enough for faults a workload takes in user mode, not for those taken in the kernel.
    user_mode: Result<(), String>,
}

impl Opened {
    /// Opens a userfaultfd through the device and through the syscall.
    fn try_both() -> Opened {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        let device = match Uffd::open_device(flags) {
            Ok(fd) => Uffd::from_fd(fd)
                .api(0)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err(e) => Err(format!("open/USERFAULTFD_IOC_NEW failed: {e}")),
        };
        let syscall = match Uffd::open_syscall(flags) {
            Ok(fd) => Uffd::from_fd(fd)
                .api(0)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err(e) => Err(format!("userfaultfd(2) failed: {e}")),
        };
        let user_mode = match Uffd::open(true) {
            Ok(u) => u.api(0).map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        Opened {
            dev_meta: device_metadata(),
            device,
            syscall,
            user_mode,
        }
    }

    /// One of the ways works, so postcopy can (in user mode at least).
    fn either(&self) -> bool {
        self.device.is_ok() || self.syscall.is_ok() || self.user_mode.is_ok()
    }

    /// Faults taken in the kernel can be served too.
    fn full(&self) -> bool {
        self.device.is_ok() || self.syscall.is_ok()
    }

    /// The status of a way that does not work: Fail only if neither does.
    fn not_ok(&self) -> Status {
        if self.either() {
            Status::Warn
        } else {
            Status::Fail
        }
    }
}

/// `/dev/userfaultfd`: exists with which mode and owner, or why it is absent.
fn device_metadata() -> String {
    match std::fs::metadata(Path::new("/dev/userfaultfd")) {
        Ok(m) => format!(
            "exists, mode {:o}, owner uid {} gid {}",
            m.permissions().mode() & 0o7777,
            m.uid(),
            m.gid()
        ),
        Err(e) => format!("absent ({e})"),
    }
}

/// The device, the syscall and the sysctl; the device and syscall are Fail only if neither works.
pub(super) fn check_uffd_open() -> Vec<Check> {
    let opened = Opened::try_both();
    vec![
        check_device(&opened),
        check_syscall(&opened),
        check_sysctl(opened.either()),
        check_user_mode(&opened),
    ]
}

/// `UFFD_USER_MODE_ONLY`: what an unprivileged user has when the other ways are closed.
fn check_user_mode(opened: &Opened) -> Check {
    const NAME: &str = "uffd user mode";
    match (&opened.user_mode, opened.full()) {
        (Ok(()), true) => pass(NAME, "UFFD_USER_MODE_ONLY works too (not needed here)"),
        (Ok(()), false) => check(
            NAME,
            Status::Warn,
            "UFFD_USER_MODE_ONLY works: `postcopy demo` and an embedded destination whose \
             workload touches its memory from user space run as this user; faults taken in \
             the kernel cannot be served (a VMM's guest memory under KVM, system calls on \
             missing pages): `postcopy handler` needs one of the ways above",
            Some("for a handler: run as root, or grant /dev/userfaultfd, or sysctl vm.unprivileged_userfaultfd=1".into()),
        ),
        (Err(e), _) => check(
            NAME,
            if opened.either() { Status::Warn } else { Status::Fail },
            format!("UFFD_USER_MODE_ONLY: {e}"),
            None,
        ),
    }
}

/// `/dev/userfaultfd`: exists, permissions, works.
fn check_device(opened: &Opened) -> Check {
    let dev_meta = &opened.dev_meta;
    match &opened.device {
        Ok(()) => pass("uffd device", format!("/dev/userfaultfd {dev_meta}; works")),
        Err(e) => check(
            "uffd device",
            opened.not_ok(),
            format!("/dev/userfaultfd {dev_meta}; {e}{}", if opened.syscall.is_ok() { " (the syscall works, so this is not needed)" } else { "" }),
            Some("use Linux 6.1+ and grant access: chmod 0660 /dev/userfaultfd and add the user to its group (or a udev rule)".into()),
        ),
    }
}

/// `userfaultfd(2)` works.
fn check_syscall(opened: &Opened) -> Check {
    match &opened.syscall {
        Ok(()) => pass("uffd syscall", "userfaultfd(2) works"),
        Err(e) => check(
            "uffd syscall",
            opened.not_ok(),
            format!(
                "{e}{}",
                if opened.device.is_ok() {
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
    }
}

/// `vm.unprivileged_userfaultfd`, judged by who this process is; Fail only if no way to open
/// a userfaultfd works (`either` is false).
fn check_sysctl(either: bool) -> Check {
    let root = is_root();
    let ptrace = has_capability(CAP_SYS_PTRACE);
    let sysctl = read_u64("/proc/sys/vm/unprivileged_userfaultfd");
    let who = match (root, ptrace) {
        (true, _) => "running as root",
        (false, true) => "not root, has CAP_SYS_PTRACE",
        (false, false) => "not root, no CAP_SYS_PTRACE",
    };
    match sysctl {
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
    }
}

/// The `UFFDIO_API` handshake with every feature: EVENT_REMOVE and THREAD_ID are needed.
pub(super) fn check_api(api: &Result<ApiInfo, UffdError>) -> Check {
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

/// Whether `UFFDIO_MOVE` is offered (zero-copy placement).
pub(super) fn check_move(api: &Result<ApiInfo, UffdError>) -> Check {
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
