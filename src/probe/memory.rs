//! Memory settings: the page sizes, transparent huge pages, and the mlock limit that io_uring
//! fixed buffers are charged to.

use super::host::{has_capability, is_root, proc_status_field, read_trim, read_u64, CAP_IPC_LOCK};
use super::{check, fmt_bytes, pass, Check, Status, MIB};
use crate::sys::mem::{base_page_size, memlock_limit};

/// `RLIMIT_MEMLOCK` below which a non-root engine may fail to register its io_uring buffers.
const MEMLOCK_WANTED: u64 = 64 * MIB;

/// The base page size and the huge page sizes, with the 2 MiB pages free (informational).
pub(super) fn check_page_sizes() -> Check {
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

/// `transparent_hugepage`: `always` costs postcopy; `madvise` and `never` are fine.
pub(super) fn check_thp() -> Check {
    const NAME: &str = "thp";
    let path = "/sys/kernel/mm/transparent_hugepage/enabled";
    let raw = match read_trim(path) {
        Ok(s) => s,
        Err(e) => return pass(NAME, format!("{e}: transparent huge pages not configured")),
    };
    let mode = super::host::selected(&raw).to_string();
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

/// `RLIMIT_MEMLOCK`, unless root or `CAP_IPC_LOCK` makes it moot.
pub(super) fn check_mlock() -> Check {
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
