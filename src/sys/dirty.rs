//! Dirty-page tracking of this process's memory with userfaultfd write-protect in async mode and
//! the `PAGEMAP_SCAN` ioctl (Linux 6.7+).
//!
//! The mechanism, as `Documentation/admin-guide/mm/pagemap.rst` describes it:
//!
//! 1. a userfaultfd with `UFFD_FEATURE_WP_ASYNC` (which implies `UFFD_FEATURE_WP_UNPOPULATED`:
//!    pages never touched are protected too, with PTE markers), the range registered with
//!    `UFFDIO_REGISTER_MODE_WP` and write-protected with `UFFDIO_WRITEPROTECT`;
//! 2. a write to a protected page raises no event: the kernel clears the page's uffd-wp bit and
//!    lets the write proceed, so the page now reads as `PAGE_IS_WRITTEN`;
//! 3. one `PAGEMAP_SCAN` with `PM_SCAN_WP_MATCHING` returns the written ranges and protects them
//!    again under the page-table lock: read-and-reset, so a write racing the scan is reported
//!    either by this scan or by the next one.
//!
//! [`UffdWpTracker`] owns the descriptors and is the only user of these ioctls; the safe face
//! (the `DirtyTracker` trait, a tracker an embedder feeds itself) is `crate::dirty`. The
//! tracked memory is only ever touched by the kernel here, never through a Rust reference.
//!
//! Kernel versions: `UFFDIO_WRITEPROTECT` on anonymous memory 5.7; `UFFD_FEATURE_WP_UNPOPULATED`
//! 6.4; `UFFD_FEATURE_WP_ASYNC` and `PAGEMAP_SCAN` 6.7.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;

use linux_raw_sys::general as k;
use nix::errno::Errno;
use nix::sys::mman::{self, MmapAdvise};

use crate::sys::mem::{base_page_size, Mapping, MemError};
use crate::sys::uffd::{feature, ioctl_bit, mode, Uffd, UffdError};

const _: () = assert!(std::mem::size_of::<k::uffdio_writeprotect>() == 24);
const _: () = assert!(std::mem::size_of::<k::page_region>() == 24);
const _: () = assert!(std::mem::size_of::<k::pm_scan_arg>() == 96);

// ioctl number encoding for x86_64/aarch64 (asm-generic/ioctl.h): `_IOWR(magic, nr, T)`.
const fn iowr<T>(magic: u32, nr: u32) -> u32 {
    const IOC_WRITE: u32 = 1;
    const IOC_READ: u32 = 2;
    ((IOC_READ | IOC_WRITE) << 30) | ((std::mem::size_of::<T>() as u32) << 16) | (magic << 8) | nr
}

/// `UFFDIO_WRITEPROTECT`: `_IOWR(UFFDIO, _UFFDIO_WRITEPROTECT, struct uffdio_writeprotect)`.
pub const UFFDIO_WRITEPROTECT: u32 =
    iowr::<k::uffdio_writeprotect>(k::UFFDIO, k::_UFFDIO_WRITEPROTECT);
const _: () = assert!(UFFDIO_WRITEPROTECT == linux_raw_sys::ioctl::UFFDIO_WRITEPROTECT);

/// `UFFDIO_WRITEPROTECT_MODE_WP` (`linux/userfaultfd.h`: `(__u64)1 << 0`; linux-raw-sys 0.12
/// lacks it): protect the range (without it, unprotect).
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

/// `PAGEMAP_IOCTL_MAGIC` (`include/uapi/linux/fs.h`: `'f'`).
const PAGEMAP_IOCTL_MAGIC: u32 = b'f' as u32;
/// `PAGEMAP_SCAN`: `_IOWR(PAGEMAP_IOCTL_MAGIC, 16, struct pm_scan_arg)` (`include/uapi/linux/fs.h`,
/// Linux 6.7; linux-raw-sys 0.12 has the structs and flags but not the request number).
pub const PAGEMAP_SCAN: u32 = iowr::<k::pm_scan_arg>(PAGEMAP_IOCTL_MAGIC, 16);
const _: () = assert!(PAGEMAP_SCAN == 0xc060_6610);

/// How many `page_region`s one `PAGEMAP_SCAN` may return (12 KiB of buffer). A scan that finds
/// more stops early (`walk_end` < `end`) and the next call resumes where it stopped.
///
/// Not more than 512, the kernel's internal batch (`PMD_SIZE >> PAGE_SHIFT`, at least 512 on
/// every page size): given a larger vector, `do_pagemap_scan` loops over internal batches and
/// sets `walk_end` only when a batch fills, so a scan that completes in its second or later
/// batch reports the stale `walk_end` of the previous batch (seen on 6.18: 4096 regions asked,
/// the walk finished, `walk_end` pointed 512 regions back). With at most one batch per call,
/// `walk_end` is either the kernel's early stop or, untouched (we pass 0), set to `end`.
const MAX_REGIONS: usize = 512;

/// Errors of dirty-page tracking, each naming what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// The userfaultfd could not be opened, handshaken or registered.
    #[error("dirty tracking: {0}")]
    Uffd(#[from] UffdError),
    /// The kernel does not offer `UFFD_FEATURE_WP_ASYNC`.
    #[error(
        "userfaultfd lacks UFFD_FEATURE_WP_ASYNC (kernel offers features {offered:#x}): \
         dirty tracking without KVM needs Linux 6.7 or newer; run on a newer kernel, or feed \
         a ManualTracker from your own dirty log"
    )]
    WpAsyncMissing {
        /// Features the kernel offers.
        offered: u64,
    },
    /// The range registered, but `UFFDIO_WRITEPROTECT` is not available on it.
    #[error(
        "UFFDIO_WRITEPROTECT not available on {len_bytes} bytes at {start:#x} (range ioctls: \
         {ioctls}): track private anonymous memory, on a kernel built with userfaultfd \
         write-protect support (CONFIG_HAVE_ARCH_USERFAULTFD_WP)"
    )]
    NoWriteProtect {
        /// Range start.
        start: usize,
        /// Range length.
        len_bytes: usize,
        /// The ioctls the registration offered.
        ioctls: String,
    },
    /// `UFFDIO_WRITEPROTECT` failed.
    #[error("UFFDIO_WRITEPROTECT of {len_bytes} bytes at {start:#x} failed: {errno} ({hint})")]
    WriteProtect {
        /// Range start.
        start: usize,
        /// Range length.
        len_bytes: usize,
        /// The errno.
        errno: Errno,
        /// What it usually means.
        hint: &'static str,
    },
    /// `/proc/self/pagemap` could not be opened.
    #[error("cannot open /proc/self/pagemap: {0} (is /proc mounted in this container?)")]
    Pagemap(std::io::Error),
    /// `PAGEMAP_SCAN` failed.
    #[error("PAGEMAP_SCAN of [{start:#x}, {end:#x}) failed: {errno} ({hint})")]
    Scan {
        /// Scan start.
        start: usize,
        /// Scan end.
        end: usize,
        /// The errno.
        errno: Errno,
        /// What it usually means.
        hint: &'static str,
    },
    /// `MADV_NOHUGEPAGE` on the region failed.
    #[error("dirty tracking: {0}")]
    Advise(#[from] MemError),
    /// A misaligned or empty range.
    #[error("invalid dirty-tracking range: {0}")]
    Invalid(String),
    /// `collect` before `start` (or after `stop`).
    #[error("dirty tracker not started: call start() before collect()")]
    NotStarted,
    /// The live self-test found the mechanism present but wrong.
    #[error("dirty tracking self-test: {0} (report this together with `uname -a`)")]
    SelfTest(String),
}

/// `ioctl(fd, request, arg)`; the non-negative return value, or the errno.
///
/// # Safety
///
/// `request` must encode the size of `T` (checked at compile time for every request used
/// here), and every pointer inside `*arg` must be valid for what the kernel does with it for
/// the duration of the call (for `PAGEMAP_SCAN`: `vec` writable for `vec_len` `page_region`s).
unsafe fn ioctl<T>(fd: RawFd, request: u32, arg: &mut T) -> Result<libc::c_int, Errno> {
    // SAFETY: the caller upholds the contract above; the kernel reads and writes only `*arg`
    // (which outlives the call) and the buffers it points at, which the caller vouches for.
    let ret = unsafe {
        libc::ioctl(
            fd,
            request as libc::c_ulong,
            arg as *mut T as *mut libc::c_void,
        )
    };
    if ret < 0 {
        Err(Errno::last())
    } else {
        Ok(ret)
    }
}

/// The state of a started tracker.
#[derive(Debug)]
struct Active {
    uffd: Uffd,
    pagemap: File,
    /// The output vector of `PAGEMAP_SCAN`, allocated once at start.
    regions: Vec<k::page_region>,
}

/// Tracks writes to one page-aligned range of this process's private anonymous memory with
/// userfaultfd write-protect (async mode) and `PAGEMAP_SCAN`.
///
/// The tracker does not own the memory: the caller keeps the mapping alive (and in place) while
/// the tracker is started. [`start`](Self::start) applies `MADV_NOHUGEPAGE` to the range (not
/// undone by `stop`), so that no transparent huge page is faulted in or collapsed while it is
/// tracked and written ranges come back at base-page granularity. Huge pages populated before
/// `start` stay huge while only read; the kernel splits one at its first protected write, so
/// they are reported at base-page granularity too (checked by the tests).
///
/// What it does not see: writes through pages pinned before `start` (DMA from devices, io_uring
/// fixed buffers, `vfio`) bypass the page tables. A pin taken for writing after `start` marks the
/// page written once, at pin time.
#[derive(Debug)]
pub struct UffdWpTracker {
    start: usize,
    len_bytes: usize,
    page_shift: u32,
    active: Option<Active>,
    /// Features of the current userfaultfd (0 before start).
    features: u64,
}

impl UffdWpTracker {
    /// Tracks `len_bytes` at `addr`: page aligned, a private anonymous mapping of this process.
    /// Nothing is done to the range until [`start`](Self::start).
    pub fn new(addr: usize, len_bytes: usize) -> Result<UffdWpTracker, DirtyError> {
        let page = base_page_size();
        if len_bytes == 0 {
            return Err(DirtyError::Invalid(format!("zero length at {addr:#x}")));
        }
        if addr % page != 0 || len_bytes % page != 0 {
            return Err(DirtyError::Invalid(format!(
                "{len_bytes} bytes at {addr:#x} is not aligned to the {page}-byte page"
            )));
        }
        if addr.checked_add(len_bytes).is_none() {
            return Err(DirtyError::Invalid(format!(
                "{len_bytes} bytes at {addr:#x} wraps the address space"
            )));
        }
        Ok(UffdWpTracker {
            start: addr,
            len_bytes,
            page_shift: page.trailing_zeros(),
            active: None,
            features: 0,
        })
    }

    /// Pages in the tracked range.
    pub fn pages(&self) -> u64 {
        (self.len_bytes >> self.page_shift) as u64
    }

    /// The userfaultfd features in use (`UFFD_FEATURE_*`), 0 before `start`.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Starts tracking: from now on every write to the range is recorded. On a started tracker
    /// it protects the whole range again, which forgets the writes not yet collected.
    pub fn start(&mut self) -> Result<(), DirtyError> {
        if self.active.is_some() {
            return self.write_protect_all();
        }
        self.no_huge_pages()?;
        let (offered, _) = Uffd::probe_features()?;
        if offered.features & feature::WP_ASYNC == 0 {
            return Err(DirtyError::WpAsyncMissing {
                offered: offered.features,
            });
        }
        // WP_UNPOPULATED (6.4) protects pages never touched with PTE markers, so a first write
        // is reported and a first read (the zero page) is not. The kernel turns it on with
        // WP_ASYNC whether asked or not ("WP_ASYNC relies on WP_UNPOPULATED"); we ask anyway.
        let features =
            feature::WP_ASYNC | (offered.features & u64::from(k::UFFD_FEATURE_WP_UNPOPULATED));
        let uffd = Uffd::open(false)?;
        uffd.api(features)?;
        let ioctls = uffd.register(self.start, self.len_bytes, mode::WP)?;
        if ioctls & ioctl_bit::WRITEPROTECT == 0 {
            return Err(DirtyError::NoWriteProtect {
                start: self.start,
                len_bytes: self.len_bytes,
                ioctls: ioctl_bit::names(ioctls).join(" "),
            });
        }
        let pagemap = File::open("/proc/self/pagemap").map_err(DirtyError::Pagemap)?;
        // A range of n pages holds at most ceil(n / 2) separate written runs.
        let max = (self.pages().div_ceil(2) as usize).clamp(1, MAX_REGIONS);
        let empty = k::page_region {
            start: 0,
            end: 0,
            categories: 0,
        };
        self.active = Some(Active {
            uffd,
            pagemap,
            regions: vec![empty; max],
        });
        self.features = features;
        if let Err(e) = self.write_protect_all() {
            let _ = self.stop();
            return Err(e);
        }
        Ok(())
    }

    /// `MADV_NOHUGEPAGE` on the range: only changes the paging policy, never the contents.
    fn no_huge_pages(&self) -> Result<(), DirtyError> {
        let ptr = NonNull::new(self.start as *mut libc::c_void)
            .ok_or_else(|| DirtyError::Invalid("address 0".into()))?;
        // SAFETY: MADV_NOHUGEPAGE only sets a flag on the VMAs of the range (the kernel rejects an
        // unmapped range with ENOMEM); it never changes, drops or moves the contents, so no
        // memory of ours is invalidated whatever the range holds.
        unsafe { mman::madvise(ptr, self.len_bytes, MmapAdvise::MADV_NOHUGEPAGE) }.map_err(
            |errno| {
                DirtyError::Advise(MemError::Advise {
                    advice: "MADV_NOHUGEPAGE",
                    start: self.start,
                    len_bytes: self.len_bytes,
                    errno,
                })
            },
        )
    }

    /// `UFFDIO_WRITEPROTECT` (mode WP) of the whole range.
    fn write_protect_all(&mut self) -> Result<(), DirtyError> {
        let active = self.active.as_ref().ok_or(DirtyError::NotStarted)?;
        let mut wp = k::uffdio_writeprotect {
            range: k::uffdio_range {
                start: self.start as u64,
                len: self.len_bytes as u64,
            },
            mode: UFFDIO_WRITEPROTECT_MODE_WP,
        };
        let mut tries = 0;
        loop {
            // SAFETY: `uffdio_writeprotect` is the struct UFFDIO_WRITEPROTECT encodes and holds no
            // pointer (the range is an address the kernel checks against the registration); the
            // uffd is owned by `active` for the call.
            let ret = unsafe { ioctl(active.uffd.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut wp) };
            match ret {
                Ok(_) => return Ok(()),
                // The mappings are changing (mmap_changing); retry a few times.
                Err(Errno::EAGAIN) if tries < 100 => {
                    tries += 1;
                    std::thread::yield_now();
                }
                Err(errno) => {
                    return Err(DirtyError::WriteProtect {
                        start: self.start,
                        len_bytes: self.len_bytes,
                        errno,
                        hint: match errno {
                            Errno::ENOENT => "the range is not registered (was it unmapped?)",
                            Errno::EINVAL => "misaligned range or not registered in WP mode",
                            Errno::EAGAIN => "the mappings kept changing",
                            _ => "unexpected errno",
                        },
                    })
                }
            }
        }
    }

    /// Bytes of the pages `collect` reports (the base page size).
    pub fn page_bytes(&self) -> u64 {
        1 << self.page_shift
    }

    /// Appends the pages written since `start` or the previous `collect` as `(first_page,
    /// pages)` runs relative to the range start, in ascending order, and protects them again
    /// (read-and-reset under the page-table lock: a write racing the call is reported now or by
    /// the next call, never lost). Read a reported page's contents only after this returns.
    ///
    /// One `PAGEMAP_SCAN` per 512 runs (the vector allocated at `start`); no allocation beyond
    /// `out`'s growth.
    pub fn collect(&mut self, out: &mut Vec<(u64, u64)>) -> Result<(), DirtyError> {
        let shift = self.page_shift;
        let base = self.start;
        let end = self.start + self.len_bytes;
        let active = self.active.as_mut().ok_or(DirtyError::NotStarted)?;
        let first_new = out.len();
        let mut from = base;
        while from < end {
            let mut arg = k::pm_scan_arg {
                size: std::mem::size_of::<k::pm_scan_arg>() as u64,
                flags: u64::from(k::PM_SCAN_WP_MATCHING | k::PM_SCAN_CHECK_WPASYNC),
                start: from as u64,
                end: end as u64,
                walk_end: 0,
                vec: active.regions.as_mut_ptr() as u64,
                vec_len: active.regions.len() as u64,
                max_pages: 0,
                category_inverted: 0,
                category_mask: u64::from(k::PAGE_IS_WRITTEN),
                category_anyof_mask: 0,
                return_mask: u64::from(k::PAGE_IS_WRITTEN),
            };
            // SAFETY: `pm_scan_arg` is the struct PAGEMAP_SCAN encodes; `vec`/`vec_len` describe
            // `active.regions`, borrowed mutably for the call, so the kernel writes at most
            // `vec_len` `page_region`s (plain integers, every bit pattern valid) into memory
            // nothing else refers to. The tracked range itself is only read through the page
            // tables, never through a pointer of ours. The pagemap file is owned by `active`.
            let ret = unsafe { ioctl(active.pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg) };
            let n = ret.map_err(|errno| DirtyError::Scan {
                start: from,
                end,
                errno,
                hint: scan_hint(errno),
            })? as usize;
            let filled = &active.regions[..n.min(active.regions.len())];
            for r in filled {
                let lo = (r.start as usize).clamp(base, end);
                let hi = (r.end as usize).clamp(base, end);
                if hi <= lo {
                    continue;
                }
                let first = ((lo - base) >> shift) as u64;
                let count = ((hi - lo) >> shift) as u64;
                push_run(out, first_new, first, count);
            }
            // Never resume before what was reported (see MAX_REGIONS): rescanning a reported
            // range would report its new writes out of order.
            let reported_end = filled.last().map_or(0, |r| r.end as usize);
            let walk_end = (arg.walk_end as usize).max(reported_end);
            if walk_end <= from {
                return Err(DirtyError::Scan {
                    start: from,
                    end,
                    errno: Errno::EIO,
                    hint: "the kernel made no progress (walk_end did not advance)",
                });
            }
            from = walk_end;
        }
        Ok(())
    }

    /// Stops tracking: unregisters the range (the kernel drops the protection, so writes cost
    /// nothing again) and closes the descriptors. Also done on drop; idempotent.
    pub fn stop(&mut self) -> Result<(), DirtyError> {
        let Some(active) = self.active.take() else {
            return Ok(());
        };
        self.features = 0;
        active.uffd.unregister(self.start, self.len_bytes)?;
        Ok(())
    }

    /// Whether this host offers the mechanism: tracks a scratch region of 16 pages for real (a
    /// populated and an unpopulated page written, one of each only read) and checks that exactly
    /// the written pages come back, then that a second collect is empty. `Ok` carries a
    /// one-line description of what was found.
    pub fn self_test() -> Result<String, DirtyError> {
        const PAGES: usize = 16;
        let page = base_page_size();
        let m = Mapping::anonymous(PAGES * page, "dirty-tracking self-test")?;
        // Pages 0..8 populated, 8..16 never touched.
        for p in 0..PAGES / 2 {
            m.write_from(p * page, &[1]);
        }
        let mut t = UffdWpTracker::new(m.addr(), m.len_bytes())?;
        t.start()?;
        m.write_from(3 * page + 100, &[7]);
        m.write_from(12 * page, &[7]);
        let _ = m.touch(5 * page);
        // Maps the zero page, protected (a PTE marker): not a write.
        let _ = m.touch(14 * page);
        let mut got = Vec::new();
        t.collect(&mut got)?;
        let expected: &[(u64, u64)] = &[(3, 1), (12, 1)];
        if got != expected {
            return Err(DirtyError::SelfTest(format!(
                "wrote pages 3 and 12 of {PAGES} (read 5 and 14), PAGEMAP_SCAN reported runs {got:?}"
            )));
        }
        got.clear();
        t.collect(&mut got)?;
        if !got.is_empty() {
            return Err(DirtyError::SelfTest(format!(
                "a second collect with no writes reported runs {got:?}"
            )));
        }
        t.stop()?;
        Ok(format!(
            "UFFD_FEATURE_WP_ASYNC + PAGEMAP_SCAN: wrote a populated and an unpopulated page of a \
             {PAGES}-page region and read two others, collected exactly the written ones, then \
             nothing"
        ))
    }

    /// Whether this host offers the mechanism ([`self_test`](Self::self_test)), with the
    /// reason if not.
    pub fn available() -> Result<(), String> {
        Self::self_test().map(|_| ()).map_err(|e| e.to_string())
    }
}

/// What a `PAGEMAP_SCAN` errno usually means here.
fn scan_hint(errno: Errno) -> &'static str {
    match errno {
        Errno::ENOTTY => "this kernel has no PAGEMAP_SCAN: it needs Linux 6.7 or newer",
        Errno::EPERM => {
            "a page of the range is not write-protected in async mode (was the range unmapped, \
             remapped or unregistered?)"
        }
        Errno::EINVAL => "bad range or flags",
        Errno::EFAULT => "the output vector is not writable",
        _ => "unexpected errno",
    }
}

/// Appends the run `(first, count)` to `out`, extending the last run if it was appended by this
/// call (`out[first_new..]`) and ends where this one starts.
pub(crate) fn push_run(out: &mut Vec<(u64, u64)>, first_new: usize, first: u64, count: u64) {
    if out.len() > first_new {
        if let Some(last) = out.last_mut() {
            if last.0 + last.1 == first {
                last.1 += count;
                return;
            }
        }
    }
    out.push((first, count));
}

impl Drop for UffdWpTracker {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_only_within_one_call() {
        let mut out = vec![(0, 2)];
        push_run(&mut out, 1, 2, 1); // adjacent to a run of an earlier call: kept apart
        push_run(&mut out, 1, 3, 2); // adjacent to this call's run: merged
        push_run(&mut out, 1, 9, 1);
        assert_eq!(out, vec![(0, 2), (2, 3), (9, 1)]);
    }

    #[test]
    fn rejects_misaligned_and_empty_ranges() {
        assert!(matches!(
            UffdWpTracker::new(4096, 0),
            Err(DirtyError::Invalid(_))
        ));
        assert!(matches!(
            UffdWpTracker::new(4097, 4096),
            Err(DirtyError::Invalid(_))
        ));
        assert!(matches!(
            UffdWpTracker::new(4096, 100),
            Err(DirtyError::Invalid(_))
        ));
    }
}
