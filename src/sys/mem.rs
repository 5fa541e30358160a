//! Memory mappings: guest regions, temp pages, read-only image files; `madvise` and `mlock`.
//!
//! A [`Mapping`] owns an `mmap`ed range and unmaps it on drop. Registered (userfaultfd) memory
//! is only ever touched through raw-pointer copies in this module, never through a Rust
//! reference: a reference could be read by the compiler at any time, and a read of a missing
//! page from the thread that must serve it would deadlock.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::ptr::NonNull;

use nix::errno::Errno;
use nix::sys::mman::{self, MapFlags, MmapAdvise, ProtFlags};

/// Errors of the memory module.
#[derive(Debug, thiserror::Error)]
pub enum MemError {
    /// `mmap` failed.
    #[error("mmap of {len_bytes} bytes ({what}) failed: {errno}{hint}")]
    Map {
        /// What the mapping was for.
        what: &'static str,
        /// Length asked for.
        len_bytes: usize,
        /// The errno.
        errno: Errno,
        /// What to do about it.
        hint: &'static str,
    },
    /// `madvise` failed.
    #[error("madvise({advice}) on {len_bytes} bytes at {start:#x} failed: {errno}")]
    Advise {
        /// The advice.
        advice: &'static str,
        /// Range start.
        start: usize,
        /// Range length.
        len_bytes: usize,
        /// The errno.
        errno: Errno,
    },
    /// A zero-length or misaligned request.
    #[error("invalid mapping request: {0}")]
    Invalid(String),
    /// A memfd call (`memfd_create`, `ftruncate`, `fallocate`) failed.
    #[error("{call} ({what}) failed: {errno}{hint}")]
    Memfd {
        /// The call.
        call: &'static str,
        /// What the file is for.
        what: &'static str,
        /// The errno.
        errno: Errno,
        /// What to do about it.
        hint: &'static str,
    },
}

/// The system's base page size.
pub fn base_page_size() -> usize {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map(|v| v as usize)
        .unwrap_or(4096)
}

/// An owned `mmap`ed range.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len_bytes: usize,
}

// SAFETY: a Mapping is an address range; all access goes through raw-pointer copies whose
// concurrency rules are those of plain memory (callers split pages between threads), and the
// kernel objects behind it are process-wide.
unsafe impl Send for Mapping {}
// SAFETY: as above; no method hands out a reference into the range except `as_slice` on
// read-only file mappings and temp pages that are never registered.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Private anonymous read-write memory, not yet backed (every page missing).
    pub fn anonymous(len_bytes: usize, what: &'static str) -> Result<Mapping, MemError> {
        Self::map_anon(
            len_bytes,
            MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE,
            what,
        )
    }

    /// Private anonymous memory backed by reserved 2 MiB huge pages (hugetlbfs).
    pub fn anonymous_huge_2m(len_bytes: usize, what: &'static str) -> Result<Mapping, MemError> {
        Self::map_anon(
            len_bytes,
            MapFlags::MAP_PRIVATE | MapFlags::MAP_HUGETLB | MapFlags::MAP_HUGE_2MB,
            what,
        )
    }

    /// Shared anonymous memory (shmem), as a VMM with a memfd would have.
    pub fn shared_anonymous(len_bytes: usize, what: &'static str) -> Result<Mapping, MemError> {
        Self::map_anon(len_bytes, MapFlags::MAP_SHARED, what)
    }

    fn map_anon(
        len_bytes: usize,
        flags: MapFlags,
        what: &'static str,
    ) -> Result<Mapping, MemError> {
        if len_bytes == 0 {
            return Err(MemError::Invalid(format!("{what}: zero length")));
        }
        // SAFETY: a fresh anonymous mapping at an address the kernel chooses aliases nothing we
        // own.
        let ptr = unsafe {
            mman::mmap_anonymous(
                None,
                std::num::NonZeroUsize::new(len_bytes).expect("checked non-zero"),
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                flags,
            )
        }
        .map_err(|errno| MemError::Map {
            what,
            len_bytes,
            errno,
            hint: if flags.contains(MapFlags::MAP_HUGETLB) {
                " (reserve huge pages: echo N > /proc/sys/vm/nr_hugepages)"
            } else {
                " (not enough address space or memory; check ulimit -v and overcommit settings)"
            },
        })?;
        Ok(Mapping {
            ptr: ptr.cast(),
            len_bytes,
        })
    }

    /// A shared read-write mapping of `len_bytes` of `file` from offset 0 (a memfd's guest
    /// view, or its alias). `populate`: `MAP_POPULATE`, so that no access faults later (the
    /// file's pages are allocated now if they were holes).
    pub fn shared_file(
        file: BorrowedFd<'_>,
        len_bytes: usize,
        populate: bool,
        what: &'static str,
    ) -> Result<Mapping, MemError> {
        let len = std::num::NonZeroUsize::new(len_bytes)
            .ok_or_else(|| MemError::Invalid(format!("{what}: zero length")))?;
        let mut flags = MapFlags::MAP_SHARED;
        if populate {
            flags |= MapFlags::MAP_POPULATE;
        }
        // SAFETY: a fresh shared mapping at an address the kernel chooses; the file is a memfd
        // this process created and keeps open, sized to at least `len_bytes`.
        let ptr = unsafe {
            mman::mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                flags,
                file,
                0,
            )
        }
        .map_err(|errno| MemError::Map {
            what,
            len_bytes,
            errno,
            hint: " (a hugetlbfs memfd needs reserved huge pages: echo N > /proc/sys/vm/nr_hugepages)",
        })?;
        Ok(Mapping {
            ptr: ptr.cast(),
            len_bytes,
        })
    }

    /// A read-only private mapping of a whole file (a memory image).
    pub fn file_readonly(file: &File, len_bytes: usize) -> Result<Mapping, MemError> {
        if len_bytes == 0 {
            return Err(MemError::Invalid("image file is empty".into()));
        }
        // SAFETY: a fresh read-only mapping; the file is opened read-only by the caller. If the
        // file is truncated while mapped, reads past its end raise SIGBUS (documented for
        // `postcopy serve --image`).
        let ptr = unsafe {
            mman::mmap(
                None,
                std::num::NonZeroUsize::new(len_bytes).expect("checked non-zero"),
                ProtFlags::PROT_READ,
                MapFlags::MAP_PRIVATE,
                file.as_fd(),
                0,
            )
        }
        .map_err(|errno| MemError::Map {
            what: "image file",
            len_bytes,
            errno,
            hint: "",
        })?;
        Ok(Mapping {
            ptr: ptr.cast(),
            len_bytes,
        })
    }

    /// Start address.
    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    /// Start pointer (for kernel interfaces: io_uring buffers, `UFFDIO_COPY` sources).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub fn len_bytes(&self) -> usize {
        self.len_bytes
    }

    /// The bytes of a mapping that is never registered with userfaultfd and never written by
    /// the kernel behind our back (read-only image files, temp pages between receives).
    ///
    /// Never call this on a registered region.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is live and readable for `len_bytes`; the caller guarantees it is
        // not registered memory (reading it cannot fault into the reader) and that no
        // in-flight I/O writes it while the slice lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len_bytes) }
    }

    /// Mutable bytes of an unregistered mapping (temp pages while no I/O targets them).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as `as_slice`, and `&mut self` makes this the only access from Rust.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len_bytes) }
    }

    fn check(&self, offset_bytes: usize, len_bytes: usize) {
        assert!(
            offset_bytes
                .checked_add(len_bytes)
                .is_some_and(|end| end <= self.len_bytes),
            "access [{offset_bytes}, +{len_bytes}) outside a mapping of {} bytes",
            self.len_bytes
        );
    }

    /// Copies bytes out of the mapping without forming a reference into it. If the pages are
    /// registered and missing, this faults and blocks until a handler places them: never call
    /// it from the thread that serves faults.
    pub fn read_into(&self, offset_bytes: usize, out: &mut [u8]) {
        self.check(offset_bytes, out.len());
        // SAFETY: bounds checked above; source and destination do not overlap (`out` is a Rust
        // buffer outside any mapping we hand out); a volatile-free copy through raw pointers
        // does not assert anything about the memory beyond readability.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset_bytes),
                out.as_mut_ptr(),
                out.len(),
            )
        }
    }

    /// Reads one byte with a volatile load: the cheapest touch of a page.
    pub fn touch(&self, offset_bytes: usize) -> u8 {
        self.check(offset_bytes, 1);
        // SAFETY: in bounds; a volatile read of a byte of live memory.
        unsafe { std::ptr::read_volatile(self.ptr.as_ptr().add(offset_bytes)) }
    }

    /// Copies bytes into the mapping (for precopy and tests; faults like any write).
    pub fn write_from(&self, offset_bytes: usize, data: &[u8]) {
        self.check(offset_bytes, data.len());
        // SAFETY: bounds checked; `data` cannot overlap registered memory we hand out.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.ptr.as_ptr().add(offset_bytes),
                data.len(),
            )
        }
    }

    /// Zeroes bytes of the mapping (faults like any write).
    pub fn fill_zero(&self, offset_bytes: usize, len_bytes: usize) {
        self.check(offset_bytes, len_bytes);
        // SAFETY: bounds checked; the caller owns these bytes against other writers.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(offset_bytes), 0, len_bytes) }
    }

    /// XORs a native-endian u64 at an 8-byte-aligned offset (a workload's write to a page).
    pub fn xor_u64(&self, offset_bytes: usize, value: u64) {
        self.check(offset_bytes, 8);
        assert!(offset_bytes % 8 == 0, "unaligned u64 access");
        // SAFETY: in bounds and aligned; pages are split between threads by the caller, so no
        // other thread writes this word concurrently.
        unsafe {
            let p = self.ptr.as_ptr().add(offset_bytes) as *mut u64;
            std::ptr::write_volatile(p, std::ptr::read_volatile(p) ^ value)
        }
    }

    fn advise(
        &self,
        offset_bytes: usize,
        len_bytes: usize,
        advice: MmapAdvise,
        name: &'static str,
    ) -> Result<(), MemError> {
        self.check(offset_bytes, len_bytes);
        // SAFETY: the range lies inside our mapping; the advice values used here either only
        // change paging policy or drop page contents the caller has decided to drop.
        unsafe {
            mman::madvise(
                NonNull::new_unchecked(self.ptr.as_ptr().add(offset_bytes)).cast(),
                len_bytes,
                advice,
            )
        }
        .map_err(|errno| MemError::Advise {
            advice: name,
            start: self.addr() + offset_bytes,
            len_bytes,
            errno,
        })
    }

    /// `MADV_DONTNEED`: drops the pages; anonymous memory reads as missing (or zero) again.
    pub fn dontneed(&self, offset_bytes: usize, len_bytes: usize) -> Result<(), MemError> {
        self.advise(
            offset_bytes,
            len_bytes,
            MmapAdvise::MADV_DONTNEED,
            "MADV_DONTNEED",
        )
    }

    /// `MADV_NOHUGEPAGE`: 4 KiB faults and discards only.
    pub fn no_huge_pages(&self) -> Result<(), MemError> {
        self.advise(
            0,
            self.len_bytes,
            MmapAdvise::MADV_NOHUGEPAGE,
            "MADV_NOHUGEPAGE",
        )
    }

    /// `MADV_HUGEPAGE`.
    pub fn huge_pages(&self) -> Result<(), MemError> {
        self.advise(
            0,
            self.len_bytes,
            MmapAdvise::MADV_HUGEPAGE,
            "MADV_HUGEPAGE",
        )
    }

    /// Touches every page once (writes a zero), so first-touch costs are paid up front.
    pub fn prefault(&mut self) {
        let page = base_page_size();
        for chunk in self.as_mut_slice().chunks_mut(page) {
            chunk[0] = 0;
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we own the mapping; nothing refers to it after drop (io_uring users keep their
        // Mapping alive until their last completion).
        let _ = unsafe { mman::munmap(self.ptr.cast(), self.len_bytes) };
    }
}

/// Touches and frees `len_bytes` of fresh memory, so that memory the hypervisor has not backed
/// yet (first touch of a guest page costs ~13 µs on a Firecracker guest) is backed before a
/// timed run. The kernel reuses the freed pages for the next allocations.
pub fn prewarm(len_bytes: usize) -> Result<(), MemError> {
    let mut m = Mapping::anonymous(len_bytes, "warm-up buffer")?;
    m.prefault();
    Ok(())
}

/// Current and maximum locked-memory limit (`RLIMIT_MEMLOCK`) in bytes; `u64::MAX` = unlimited.
pub fn memlock_limit() -> (u64, u64) {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_MEMLOCK).unwrap_or((0, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_reads_zero_and_writes_land() {
        let m = Mapping::anonymous(3 * 4096, "test").unwrap();
        let mut buf = [1u8; 16];
        m.read_into(4096, &mut buf);
        assert_eq!(buf, [0u8; 16]);
        m.write_from(4096, &[7u8; 16]);
        m.xor_u64(4096, u64::from_ne_bytes([7; 8]));
        m.read_into(4096, &mut buf);
        assert_eq!(&buf[..8], &[0u8; 8]);
        assert_eq!(&buf[8..], &[7u8; 8]);
        m.dontneed(4096, 4096).unwrap();
        assert_eq!(m.touch(4096 + 9), 0);
    }

    #[test]
    #[should_panic(expected = "outside a mapping")]
    fn out_of_bounds_access_panics_before_touching_memory() {
        let m = Mapping::anonymous(4096, "test").unwrap();
        let mut buf = [0u8; 8];
        m.read_into(4092, &mut buf);
    }
}
