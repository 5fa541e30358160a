//! userfaultfd: the kernel interface that turns a touch of a missing page into a message.
//!
//! Owns the file descriptor and every ioctl on it. Names follow `linux/userfaultfd.h`.
//! We wrap the ioctls ourselves instead of using the `userfaultfd` crate because that crate
//! lacks `UFFDIO_MOVE` (Linux 6.8+), cannot decode a message read by somebody else (we read
//! events through io_uring), casts an `EAGAIN` from `UFFDIO_COPY` into a huge partial count,
//! and needs bindgen plus uapi headers newer than this machine's. Struct layouts come from
//! `linux-raw-sys`; ioctl numbers are computed here and checked against the kernel's at compile
//! time.
//!
//! Kernel versions: `UFFDIO_API`/`REGISTER`/`COPY`/`ZEROPAGE`/`WAKE` 4.3; shmem 4.11;
//! `/dev/userfaultfd` 6.1; `UFFDIO_MOVE` 6.8; MINOR registration and `UFFDIO_CONTINUE` 5.13
//! (hugetlbfs) / 5.14 (shmem).
#![allow(unsafe_code)]

use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use linux_raw_sys::general as k;
use nix::errno::Errno;

mod abi;
mod error;
mod event;

pub use abi::*;
pub use error::{OpenedBy, PlaceError, PlaceErrorKind, UffdError};
pub use event::Event;

/// What `UFFDIO_API` reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiInfo {
    /// Feature bits the kernel offers (`UFFD_FEATURE_*`).
    pub features: u64,
    /// Ioctls available on this descriptor (`1 << _UFFDIO_*`).
    pub ioctls: u64,
}

/// An open userfaultfd.
///
/// All ioctls take `&self`: the kernel serialises what needs serialising, so one descriptor may
/// be shared by threads (each engine worker owns its own anyway).
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    opened_by: OpenedBy,
}

/// `UFFDIO_CONTINUE_MODE_DONTWAKE` (`linux/userfaultfd.h`; not in `linux-raw-sys`).
const UFFDIO_CONTINUE_MODE_DONTWAKE: u32 = 1 << 0;

fn errno_of(ret: libc::c_long) -> Option<Errno> {
    (ret < 0).then(Errno::last)
}

/// A placement ioctl's `mode`: its `DONTWAKE` bit when asked for.
fn dontwake_mode(dontwake: bool, bit: u32) -> u64 {
    if dontwake {
        u64::from(bit)
    } else {
        0
    }
}

impl Uffd {
    /// Opens a userfaultfd with `O_CLOEXEC | O_NONBLOCK` (so it can be read through io_uring
    /// and polled) and, when `user_mode_only`, `UFFD_USER_MODE_ONLY`. Tries `/dev/userfaultfd`
    /// first, then the system call, then (unprivileged, `vm.unprivileged_userfaultfd=0`) the
    /// system call with `UFFD_USER_MODE_ONLY`, which suffices for faults taken in user mode.
    pub fn open(user_mode_only: bool) -> Result<Uffd, UffdError> {
        let mut flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        if user_mode_only {
            flags |= k::UFFD_USER_MODE_ONLY as i32;
        }
        let device = match Self::open_device(flags) {
            Ok(fd) => {
                return Ok(Uffd {
                    fd,
                    opened_by: OpenedBy::Device,
                })
            }
            Err(e) => e,
        };
        let user_only = flags | k::UFFD_USER_MODE_ONLY as i32;
        match Self::open_syscall(flags).or_else(|e| {
            if e == Errno::EPERM && flags != user_only {
                Self::open_syscall(user_only)
            } else {
                Err(e)
            }
        }) {
            Ok(fd) => Ok(Uffd {
                fd,
                opened_by: OpenedBy::Syscall,
            }),
            Err(syscall) => Err(UffdError::Open { device, syscall }),
        }
    }

    /// Opens through `/dev/userfaultfd` only.
    pub fn open_device(flags: i32) -> Result<OwnedFd, Errno> {
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/userfaultfd")
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
        // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value and returns a new descriptor or -1;
        // `dev` is a valid open descriptor for the duration of the call.
        let ret = unsafe {
            libc::ioctl(
                dev.as_raw_fd(),
                USERFAULTFD_IOC_NEW as libc::c_ulong,
                flags as libc::c_ulong,
            )
        };
        if ret < 0 {
            return Err(Errno::last());
        }
        // SAFETY: the ioctl returned a fresh descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(ret) })
    }

    /// Opens through the `userfaultfd(2)` system call only.
    pub fn open_syscall(flags: i32) -> Result<OwnedFd, Errno> {
        // SAFETY: userfaultfd(2) takes flags by value and returns a new descriptor or -1.
        let ret = unsafe { libc::syscall(libc::SYS_userfaultfd, flags as libc::c_long) };
        if let Some(e) = errno_of(ret) {
            return Err(e);
        }
        // SAFETY: the system call returned a fresh descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) })
    }

    /// Wraps a descriptor handed to us (e.g. by a VMM over `SCM_RIGHTS`) on which `UFFDIO_API`
    /// has already been done. It should be non-blocking for io_uring reads.
    pub fn from_fd(fd: OwnedFd) -> Uffd {
        Uffd {
            fd,
            opened_by: OpenedBy::Device,
        }
    }

    /// How this descriptor was opened.
    pub fn opened_by(&self) -> OpenedBy {
        self.opened_by
    }

    fn ioctl<T>(&self, request: u32, arg: &mut T) -> Result<(), Errno> {
        // SAFETY: every caller passes the struct type whose size is encoded in `request` (checked
        // at compile time above); the kernel reads and writes only that struct, which outlives
        // the call. The descriptor is valid while `self` lives.
        let ret = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                request as libc::c_ulong,
                arg as *mut T as *mut libc::c_void,
            )
        };
        if ret < 0 {
            Err(Errno::last())
        } else {
            Ok(())
        }
    }

    /// `UFFDIO_API`: the handshake. Asks for `features`; fails if any is missing. Must be the
    /// first ioctl on a descriptor, and only once.
    pub fn api(&self, features: u64) -> Result<ApiInfo, UffdError> {
        let mut api = k::uffdio_api {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        self.ioctl(UFFDIO_API, &mut api)
            .map_err(|errno| UffdError::Api {
                requested: features,
                errno,
            })?;
        if api.features & features != features {
            return Err(UffdError::MissingFeatures {
                missing: features & !api.features,
                offered: api.features,
            });
        }
        Ok(ApiInfo {
            features: api.features,
            ioctls: api.ioctls,
        })
    }

    /// Asks which features this kernel offers: opens a scratch descriptor and does `UFFDIO_API`
    /// with no features (a descriptor accepts only one handshake).
    pub fn probe_features() -> Result<(ApiInfo, OpenedBy), UffdError> {
        let scratch = Uffd::open(false)?;
        let info = scratch.api(0)?;
        Ok((info, scratch.opened_by))
    }

    /// `UFFDIO_REGISTER` of `[start, start + len_bytes)` with `mode` (`mode::MISSING`, ...).
    /// Returns the ioctls available on the range (`ioctl_bit::*`).
    pub fn register(&self, start: usize, len_bytes: usize, mode: u64) -> Result<u64, UffdError> {
        let mut reg = k::uffdio_register {
            range: k::uffdio_range {
                start: start as u64,
                len: len_bytes as u64,
            },
            mode,
            ioctls: 0,
        };
        self.ioctl(UFFDIO_REGISTER, &mut reg)
            .map_err(|errno| UffdError::Register {
                start,
                len_bytes,
                errno,
                hint: match errno {
                    Errno::EINVAL => "range not page-aligned, not mapped, or a memory type this mode does not support",
                    Errno::EBUSY => "range already registered with another userfaultfd",
                    Errno::EPERM => "mode not permitted for this mapping (e.g. write-protect on a read-only file)",
                    Errno::ENOMEM => "address space is exiting",
                    _ => "unexpected errno",
                },
            })?;
        Ok(reg.ioctls)
    }

    /// `UFFDIO_UNREGISTER`: faults in the range are served by the kernel again.
    pub fn unregister(&self, start: usize, len_bytes: usize) -> Result<(), UffdError> {
        let mut range = k::uffdio_range {
            start: start as u64,
            len: len_bytes as u64,
        };
        self.ioctl(UFFDIO_UNREGISTER, &mut range)
            .map_err(|errno| UffdError::Unregister {
                start,
                len_bytes,
                errno,
            })
    }

    /// `UFFDIO_WAKE`: wakes threads blocked on faults in the range.
    pub fn wake(&self, start: usize, len_bytes: usize) -> Result<(), UffdError> {
        let mut range = k::uffdio_range {
            start: start as u64,
            len: len_bytes as u64,
        };
        self.ioctl(UFFDIO_WAKE, &mut range)
            .map_err(|errno| UffdError::Wake { start, errno })
    }

    fn place_error(
        op: &'static str,
        start: usize,
        len_bytes: usize,
        result: i64,
        errno: Errno,
    ) -> PlaceError {
        // The kernel stores the bytes placed, or the negative errno when none were; never read a
        // negative count as a length.
        let done_bytes = if result > 0 { result as usize } else { 0 };
        let kind = match errno {
            Errno::EEXIST => PlaceErrorKind::Exists,
            Errno::EAGAIN if done_bytes > 0 => PlaceErrorKind::Partial,
            Errno::EAGAIN => PlaceErrorKind::MappingChanging,
            Errno::ENOENT => PlaceErrorKind::NotRegistered,
            Errno::ESRCH => PlaceErrorKind::MmGone,
            Errno::EINVAL => PlaceErrorKind::Invalid,
            Errno::EFAULT => PlaceErrorKind::BadSource,
            Errno::ENOMEM => PlaceErrorKind::NoMemory,
            Errno::EBUSY => PlaceErrorKind::Busy,
            other => PlaceErrorKind::Other(other),
        };
        PlaceError {
            op,
            start,
            len_bytes,
            done_bytes,
            kind,
        }
    }

    /// `UFFDIO_COPY`: atomically fills the missing pages `[dst, dst + len_bytes)` with a copy of
    /// `src` and, unless `dontwake`, wakes the threads waiting on them. One call may place a
    /// contiguous multi-page run; `src` need not be page-aligned.
    ///
    /// `src` must point at `len_bytes` readable bytes that are not registered with this
    /// userfaultfd; the kernel reads them with `copy_from_user`, so a bad pointer is an
    /// `EFAULT`, never undefined behaviour in this process.
    pub fn copy(
        &self,
        dst: usize,
        src: *const u8,
        len_bytes: usize,
        dontwake: bool,
    ) -> Result<(), PlaceError> {
        let mut c = k::uffdio_copy {
            dst: dst as u64,
            src: src as u64,
            len: len_bytes as u64,
            mode: dontwake_mode(dontwake, k::UFFDIO_COPY_MODE_DONTWAKE),
            copy: 0,
        };
        self.ioctl(UFFDIO_COPY, &mut c)
            .map_err(|e| Self::place_error("UFFDIO_COPY", dst, len_bytes, c.copy, e))
    }

    /// `UFFDIO_ZEROPAGE`: maps the zero page at the missing pages `[dst, dst + len_bytes)`
    /// (anonymous and shmem only; hugetlbfs needs a copy of zeros) and, unless `dontwake`,
    /// wakes the waiters.
    pub fn zeropage(&self, dst: usize, len_bytes: usize, dontwake: bool) -> Result<(), PlaceError> {
        let mut z = k::uffdio_zeropage {
            range: k::uffdio_range {
                start: dst as u64,
                len: len_bytes as u64,
            },
            mode: dontwake_mode(dontwake, k::UFFDIO_ZEROPAGE_MODE_DONTWAKE),
            zeropage: 0,
        };
        self.ioctl(UFFDIO_ZEROPAGE, &mut z)
            .map_err(|e| Self::place_error("UFFDIO_ZEROPAGE", dst, len_bytes, z.zeropage, e))
    }

    /// `UFFDIO_CONTINUE` (MINOR-registered shmem or hugetlbfs): maps the pages the page cache
    /// already holds at `[dst, dst + len_bytes)` (written there through another mapping of the
    /// same file) and, unless `dontwake`, wakes the threads waiting on them. No copy. Every
    /// page of the range must be in the page cache.
    pub fn continue_range(
        &self,
        dst: usize,
        len_bytes: usize,
        dontwake: bool,
    ) -> Result<(), PlaceError> {
        let mut c = k::uffdio_continue {
            range: k::uffdio_range {
                start: dst as u64,
                len: len_bytes as u64,
            },
            mode: dontwake_mode(dontwake, UFFDIO_CONTINUE_MODE_DONTWAKE),
            mapped: 0,
        };
        self.ioctl(UFFDIO_CONTINUE, &mut c)
            .map_err(|e| Self::place_error("UFFDIO_CONTINUE", dst, len_bytes, c.mapped, e))
    }

    /// `UFFDIO_MOVE` (Linux 6.8+, needs `feature::MOVE`): moves the pages at `src` (private
    /// anonymous memory of this process, page-aligned, not shared) to the missing pages at
    /// `dst` without copying, leaving `src` missing. `UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES` is
    /// `1 << 1`; `DONTWAKE` is `1 << 0`.
    pub fn move_pages(
        &self,
        dst: usize,
        src: usize,
        len_bytes: usize,
        mode: u64,
    ) -> Result<(), PlaceError> {
        let mut m = k::uffdio_move {
            dst: dst as u64,
            src: src as u64,
            len: len_bytes as u64,
            mode,
            move_: 0,
        };
        self.ioctl(UFFDIO_MOVE, &mut m)
            .map_err(|e| Self::place_error("UFFDIO_MOVE", dst, len_bytes, m.move_, e))
    }

    /// Reads as many whole events as fit in `buf` without blocking. Returns the bytes read
    /// (a multiple of [`MSG_BYTES`]); 0 when none is pending.
    pub fn read_events(&self, buf: &mut [u8]) -> Result<usize, UffdError> {
        assert!(
            buf.len() >= MSG_BYTES,
            "event buffer smaller than one uffd_msg"
        );
        match nix::unistd::read(&self.fd, buf) {
            Ok(n) => Ok(n),
            Err(Errno::EAGAIN) => Ok(0),
            Err(e) => Err(UffdError::Read(e)),
        }
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_through_kernel_layout() {
        let cases = [
            Event::PageFault {
                address: 0x7f00_1234_5000,
                flags: 1,
                thread_id: 4242,
            },
            Event::Remove {
                start: 0x1000,
                end: 0x9000,
            },
            Event::Unmap {
                start: 0x2000,
                end: 0x3000,
            },
            Event::Remap {
                from: 1 << 30,
                to: 2 << 30,
                len: 4096,
            },
            Event::Fork { ufd: 7 },
            Event::Unknown(99),
        ];
        let mut all = Vec::new();
        for c in cases {
            assert_eq!(Event::decode(&c.encode()), c);
            all.extend_from_slice(&c.encode());
        }
        all.extend_from_slice(&[0u8; 5]); // a torn tail is never a message
        assert_eq!(Event::decode_all(&all).count(), cases.len());
    }

    #[test]
    fn ioctl_bit_names() {
        assert_eq!(
            ioctl_bit::names(ioctl_bit::COPY | ioctl_bit::WAKE),
            vec!["WAKE", "COPY"]
        );
    }
}
