//! The kernel release: 6.8 or newer has everything postcopy uses.

use super::{check, pass, Check, Status};

/// The running kernel's release (`uname -r`).
pub(super) fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|e| format!("unknown (uname failed: {e})"))
}

/// `(major, minor)` of a release string such as `6.18.44-fc`.
pub(super) fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Whether the release is new enough for every feature (the checks below test them directly).
pub(super) fn check_kernel(release: &str) -> Check {
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
