//! Shared guest memory (`--memory memfd`, `--memory hugetlb-shared`): a memfd mapped twice,
//! the guest's view registered MISSING + MINOR, a page written through the alias and mapped
//! with `UFFDIO_CONTINUE`, then read back through the guest's view; and the shmem THP mode.

use std::os::fd::AsFd;

use super::host::read_trim;
use super::uffd::fresh_uffd;
use super::{check, pass, Check, Status};
use crate::dest::memory::{free_huge_pages_2m, HUGE_2M};
use crate::sys::mem::{base_page_size, Mapping};
use crate::sys::memfd::Memfd;
use crate::sys::uffd::{ioctl_bit, mode};

/// One page of a memfd placed the way the engine places shared memory.
fn place_through_alias(huge: bool) -> Result<String, String> {
    let page = if huge {
        HUGE_2M as usize
    } else {
        base_page_size()
    };
    let memfd = Memfd::create(c"postcopy-probe", 2 * page, huge, "probe memfd")
        .map_err(|e| e.to_string())?;
    let guest = Mapping::shared_file(memfd.as_fd(), 2 * page, false, "probe guest view")
        .map_err(|e| e.to_string())?;
    let alias = Mapping::shared_file(memfd.as_fd(), 2 * page, true, "probe alias")
        .map_err(|e| e.to_string())?;
    let (uffd, _) = fresh_uffd().map_err(|e| e.to_string())?;
    let ioctls = uffd
        .register(guest.addr(), 2 * page, mode::MISSING | mode::MINOR)
        .map_err(|e| format!("cannot register MISSING + MINOR: {e}"))?;
    let names = ioctl_bit::names(ioctls).join(" ");
    if ioctls & ioctl_bit::CONTINUE == 0 {
        return Err(format!(
            "UFFDIO_CONTINUE not offered (range ioctls: {names})"
        ));
    }
    let pattern: Vec<u8> = (0..page).map(|i| (i * 11 + 5) as u8).collect();
    alias.write_from(0, &pattern);
    uffd.continue_range(guest.addr(), page, false)
        .map_err(|e| e.to_string())?;
    let mut back = vec![0u8; page];
    guest.read_into(0, &mut back);
    if back != pattern {
        return Err("UFFDIO_CONTINUE succeeded but the guest's view differs".into());
    }
    Ok(format!(
        "a {page}-byte page written through the alias and mapped with UFFDIO_CONTINUE read back intact (range ioctls: {names})"
    ))
}

/// `--memory memfd`: optional (Linux 5.14+).
pub(super) fn check_memfd() -> Check {
    const NAME: &str = "memory memfd";
    match place_through_alias(false) {
        Ok(detail) => pass(NAME, detail),
        Err(e) => check(
            NAME,
            Status::Warn,
            format!("{e}: --memory memfd (shmem, MINOR faults) is not available"),
            Some(
                "upgrade the kernel (MINOR faults on shmem are 5.14+), or use --memory anon".into(),
            ),
        ),
    }
}

/// `--memory hugetlb-shared`: optional, and needs a free reserved huge page to be checked.
pub(super) fn check_hugetlb_shared() -> Check {
    const NAME: &str = "memory hugetlb-shared";
    let free = free_huge_pages_2m();
    if free < 2 {
        return check(
            NAME,
            Status::Warn,
            format!("{free} free 2 MiB huge pages: --memory hugetlb and hugetlb-shared cannot map guest RAM (nor can this be checked)"),
            Some("reserve huge pages: echo N > /proc/sys/vm/nr_hugepages (N = guest RAM / 2 MiB, e.g. 512 for 1 GiB)".into()),
        );
    }
    match place_through_alias(true) {
        Ok(detail) => pass(NAME, format!("{free} free huge pages; {detail}")),
        Err(e) => check(
            NAME,
            Status::Warn,
            format!("{e}: --memory hugetlb-shared is not available"),
            Some(
                "upgrade the kernel (MINOR faults on hugetlbfs are 5.13+), or use --memory hugetlb"
                    .into(),
            ),
        ),
    }
}

/// Shmem's THP mode: `--memory memfd` places 4 KiB pages, which a THP-backed shmem file would
/// not take one by one.
pub(super) fn check_shmem_thp() -> Check {
    const NAME: &str = "shmem thp";
    let path = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";
    let raw = match read_trim(path) {
        Ok(s) => s,
        Err(e) => return pass(NAME, format!("{e}: shmem THP not configured")),
    };
    let mode = super::host::selected(&raw);
    match mode {
        "never" | "advise" | "deny" => pass(NAME, format!("shmem_enabled = {mode}: memfd guest RAM is placed in 4 KiB pages")),
        _ => check(
            NAME,
            Status::Warn,
            format!("shmem_enabled = {mode} ({raw}): memfd pages may be backed 2 MiB at a time, and a 4 KiB placement then fills a whole huge page"),
            Some(format!("echo advise > {path} (or use --memory hugetlb-shared for 2 MiB pages)")),
        ),
    }
}
