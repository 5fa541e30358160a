//! Registration and placement: private anonymous, shmem and hugetlbfs memory register
//! MISSING with the ioctls postcopy needs, and `UFFDIO_COPY`/`UFFDIO_ZEROPAGE` place what they
//! claim.

use nix::errno::Errno;

use super::host::read_u64;
use super::uffd::fresh_uffd;
use super::{check, pass, Check, Status};
use crate::sys::mem::{base_page_size, Mapping, MemError};
use crate::sys::uffd::{ioctl_bit, mode, UffdError};

/// A 2 MiB huge page.
const HUGE_2M: usize = 2 << 20;

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

/// Private anonymous memory: COPY and WAKE are needed, ZEROPAGE expected.
pub(super) fn check_register_anonymous() -> Check {
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

/// Shared anonymous memory (shmem, memfd guest RAM): optional.
pub(super) fn check_register_shmem() -> Check {
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

/// 2 MiB hugetlbfs memory: optional, and useless without reserved huge pages.
pub(super) fn check_register_hugetlb() -> Check {
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
pub(super) fn check_placement() -> Check {
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
