//! What the probe reads of the host: `/proc` and `/sys` files, the process's capabilities and
//! user. [`ProbeError`] is the plumbing's error; it ends up in a check's detail.

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

/// `CAP_SYS_PTRACE` (capability bit 19).
pub(super) const CAP_SYS_PTRACE: u32 = 19;
/// `CAP_IPC_LOCK` (capability bit 14).
pub(super) const CAP_IPC_LOCK: u32 = 14;

/// The trimmed contents of `path`.
pub(super) fn read_trim(path: &str) -> Result<String, ProbeError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|source| ProbeError::ReadFile {
            path: path.to_string(),
            source,
        })
}

/// The number in `path`.
pub(super) fn read_u64(path: &str) -> Result<u64, ProbeError> {
    let s = read_trim(path)?;
    s.parse().map_err(|_| ProbeError::Parse {
        path: path.to_string(),
        contents: s,
    })
}

/// A field of `/proc/self/status` (e.g. `VmLck`, `CapEff`), without the name.
pub(super) fn proc_status_field(field: &str) -> Result<String, ProbeError> {
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
pub(super) fn has_capability(cap: u32) -> bool {
    proc_status_field("CapEff")
        .ok()
        .and_then(|hex| u64::from_str_radix(&hex, 16).ok())
        .is_some_and(|mask| mask & (1u64 << cap) != 0)
}

/// Whether the process runs as root (effective uid 0).
pub(super) fn is_root() -> bool {
    // `Uid:` is real, effective, saved, filesystem.
    proc_status_field("Uid")
        .ok()
        .and_then(|v| v.split_whitespace().nth(1)?.parse::<u32>().ok())
        == Some(0)
}

/// The selected value of a sysfs choice list (`always [madvise] never` gives `madvise`).
pub(super) fn selected(raw: &str) -> &str {
    raw.split_whitespace()
        .find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))
        .unwrap_or("unknown")
}
