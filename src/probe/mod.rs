//! `postcopy probe`: can this host do postcopy (the seed's `postcopy_ram_supported_by_host`).
//!
//! [`run`] performs every check for real (it opens userfaultfds, registers and fills pages,
//! creates an io_uring, tracks dirty pages) and returns a [`ProbeReport`]; nothing is inferred
//! from the kernel version alone. A check is
//! [`Status::Fail`] only when postcopy cannot work at all; missing optional pieces
//! (hugetlbfs, `UFFDIO_MOVE`, shmem) are [`Status::Warn`] with the fix.
//!
//! One file per family of checks: the kernel release (`kernel.rs`), the userfaultfd itself
//! (`uffd.rs`: open, API, MOVE), registration and placement (`register.rs`), io_uring
//! (`uring.rs`), memory settings (`memory.rs`: page sizes, THP, mlock), dirty tracking
//! (`dirty.rs`); what the probe reads of the host (`host.rs`) and the table and JSON of a
//! report (`table.rs`).

use crate::sys::uffd::Uffd;

mod dirty;
mod host;
mod kernel;
mod memory;
mod minor;
mod register;
mod table;
mod uffd;
mod uring;

pub use host::ProbeError;

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

const MIB: u64 = 1 << 20;

/// Runs every check. Never panics on a missing file or a refused syscall: those are findings.
pub fn run() -> ProbeReport {
    let mut checks = Vec::new();
    let release = kernel::kernel_release();
    checks.push(kernel::check_kernel(&release));
    checks.extend(uffd::check_uffd_open());
    let api = Uffd::probe_features().map(|(info, _)| info);
    checks.push(uffd::check_api(&api));
    checks.push(register::check_register_anonymous());
    checks.push(register::check_register_shmem());
    checks.push(register::check_register_hugetlb());
    checks.push(minor::check_memfd());
    checks.push(minor::check_hugetlb_shared());
    checks.push(minor::check_shmem_thp());
    checks.push(register::check_placement());
    checks.push(uring::check_io_uring());
    checks.push(uring::check_io_uring_sysctl());
    checks.push(uffd::check_move(&api));
    checks.push(memory::check_page_sizes());
    checks.push(memory::check_thp());
    checks.push(memory::check_mlock());
    checks.push(dirty::check_pagemap_scan(&api, &release));
    let ok = checks.iter().all(|c| c.status != Status::Fail);
    ProbeReport { ok, checks }
}

/// A check with its outcome, what was found and (when not `Pass`) the fix.
fn check(name: &str, status: Status, detail: impl Into<String>, fix: Option<String>) -> Check {
    debug_assert_eq!(
        status == Status::Pass,
        fix.is_none(),
        "a fix iff not Pass: {name}"
    );
    Check {
        name: name.to_string(),
        status,
        detail: detail.into(),
        fix,
    }
}

/// A check that passed.
fn pass(name: &str, detail: impl Into<String>) -> Check {
    check(name, Status::Pass, detail, None)
}

/// `b` bytes in the largest unit that divides it (`unlimited` for `u64::MAX`).
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

#[cfg(test)]
mod tests {
    use super::kernel::parse_release;
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
    fn parses_releases_and_sizes() {
        assert_eq!(parse_release("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(parse_release("5.4"), Some((5, 4)));
        assert_eq!(parse_release("garbage"), None);
        assert_eq!(fmt_bytes(8192 * 1024), "8 MiB");
        assert_eq!(fmt_bytes(u64::MAX), "unlimited");
        assert_eq!(fmt_bytes(1 << 30), "1 GiB");
    }
}
