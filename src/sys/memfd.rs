//! memfd: an anonymous file in RAM — shmem, or hugetlbfs with `MFD_HUGETLB` — that guest
//! memory lives in, so that it can be mapped twice: the guest's view (registered with
//! userfaultfd in MINOR mode) and an alias the page server writes pages through.
//!
//! A page written through the alias is in the page cache but not mapped in the guest's view:
//! the guest's touch of it is a MINOR fault, resolved by `UFFDIO_CONTINUE` with no copy.
//! Holes (never written, or punched) are MISSING faults.
//!
//! Kernel versions: `memfd_create` 3.17, `MFD_HUGETLB` 4.14, `FALLOC_FL_PUNCH_HOLE` on shmem
//! 3.5 and hugetlbfs 4.3.
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::FallocateFlags;

use super::mem::MemError;

/// An open memfd of a fixed size.
#[derive(Debug)]
pub struct Memfd {
    fd: OwnedFd,
    len_bytes: usize,
    page_bytes: usize,
}

impl Memfd {
    /// `memfd_create(name, MFD_CLOEXEC [| MFD_HUGETLB | MFD_HUGE_2MB])` sized to `len_bytes`
    /// (a multiple of the page size; every page a hole).
    pub fn create(
        name: &CStr,
        len_bytes: usize,
        huge_2m: bool,
        what: &'static str,
    ) -> Result<Memfd, MemError> {
        let page_bytes = if huge_2m {
            2 << 20
        } else {
            super::mem::base_page_size()
        };
        if len_bytes == 0 || len_bytes % page_bytes != 0 {
            return Err(MemError::Invalid(format!(
                "{what}: {len_bytes} bytes is not a whole number of {page_bytes}-byte pages"
            )));
        }
        let mut flags = libc::MFD_CLOEXEC;
        if huge_2m {
            flags |= libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
        }
        // SAFETY: `name` is a valid NUL-terminated string for the call; memfd_create returns a
        // new descriptor or -1.
        let ret = unsafe { libc::memfd_create(name.as_ptr(), flags) };
        if ret < 0 {
            return Err(MemError::Memfd {
                call: "memfd_create",
                what,
                errno: Errno::last(),
                hint: if huge_2m {
                    " (hugetlbfs memfds need a kernel with CONFIG_HUGETLBFS)"
                } else {
                    ""
                },
            });
        }
        // SAFETY: the call returned a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(ret) };
        nix::unistd::ftruncate(&fd, len_bytes as i64).map_err(|errno| MemError::Memfd {
            call: "ftruncate",
            what,
            errno,
            hint: "",
        })?;
        Ok(Memfd {
            fd,
            len_bytes,
            page_bytes,
        })
    }

    /// Size in bytes.
    pub fn len_bytes(&self) -> usize {
        self.len_bytes
    }

    /// Page size of the file (the base page, or 2 MiB for hugetlbfs).
    pub fn page_bytes(&self) -> usize {
        self.page_bytes
    }

    /// `fallocate(PUNCH_HOLE | KEEP_SIZE)`: drops `[offset, offset + len)` from the page cache
    /// and unmaps it from every mapping; it reads as zero again (or faults MISSING where
    /// registered). Whole pages only.
    pub fn punch_hole(&self, offset_bytes: usize, len_bytes: usize) -> Result<(), MemError> {
        let ps = self.page_bytes;
        if offset_bytes % ps != 0
            || len_bytes % ps != 0
            || offset_bytes + len_bytes > self.len_bytes
        {
            return Err(MemError::Invalid(format!(
                "hole [{offset_bytes}, +{len_bytes}) is not whole pages of a {}-byte memfd",
                self.len_bytes
            )));
        }
        nix::fcntl::fallocate(
            &self.fd,
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            offset_bytes as i64,
            len_bytes as i64,
        )
        .map_err(|errno| MemError::Memfd {
            call: "fallocate(PUNCH_HOLE)",
            what: "guest memory",
            errno,
            hint: "",
        })
    }
}

impl AsFd for Memfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::mem::Mapping;

    #[test]
    fn two_views_of_one_file_and_a_punched_hole_reads_zero() {
        let page = crate::sys::mem::base_page_size();
        let m = Memfd::create(c"test", 4 * page, false, "test").unwrap();
        let guest = Mapping::shared_file(m.as_fd(), 4 * page, false, "guest").unwrap();
        let alias = Mapping::shared_file(m.as_fd(), 4 * page, true, "alias").unwrap();
        alias.write_from(page, &[9u8; 16]);
        let mut buf = [0u8; 16];
        guest.read_into(page, &mut buf);
        assert_eq!(
            buf, [9u8; 16],
            "a write through the alias shows in the guest's view"
        );
        m.punch_hole(page, page).unwrap();
        guest.read_into(page, &mut buf);
        assert_eq!(buf, [0u8; 16], "a punched page reads zero");
        assert!(m.punch_hole(1, page).is_err(), "a hole must be whole pages");
    }
}
