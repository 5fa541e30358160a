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
//! `/dev/userfaultfd` 6.1; `UFFDIO_MOVE` 6.8.
#![allow(unsafe_code)]

use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use linux_raw_sys::general as k;
use nix::errno::Errno;

/// Size of one `struct uffd_msg`.
pub const MSG_BYTES: usize = 32;

const _: () = assert!(std::mem::size_of::<k::uffd_msg>() == MSG_BYTES);
const _: () = assert!(std::mem::size_of::<k::uffdio_api>() == 24);
const _: () = assert!(std::mem::size_of::<k::uffdio_range>() == 16);
const _: () = assert!(std::mem::size_of::<k::uffdio_register>() == 32);
const _: () = assert!(std::mem::size_of::<k::uffdio_copy>() == 40);
const _: () = assert!(std::mem::size_of::<k::uffdio_zeropage>() == 32);
const _: () = assert!(std::mem::size_of::<k::uffdio_move>() == 40);

// ioctl number encoding for x86_64/aarch64 (asm-generic/ioctl.h).
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;
const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | (k::UFFDIO << 8) | nr
}
const fn iowr<T>(nr: u32) -> u32 {
    ioc(IOC_READ | IOC_WRITE, nr, std::mem::size_of::<T>())
}
const fn ior<T>(nr: u32) -> u32 {
    ioc(IOC_READ, nr, std::mem::size_of::<T>())
}

/// `UFFDIO_API`.
pub const UFFDIO_API: u32 = iowr::<k::uffdio_api>(k::_UFFDIO_API);
/// `UFFDIO_REGISTER`.
pub const UFFDIO_REGISTER: u32 = iowr::<k::uffdio_register>(k::_UFFDIO_REGISTER);
/// `UFFDIO_UNREGISTER`.
pub const UFFDIO_UNREGISTER: u32 = ior::<k::uffdio_range>(k::_UFFDIO_UNREGISTER);
/// `UFFDIO_WAKE`.
pub const UFFDIO_WAKE: u32 = ior::<k::uffdio_range>(k::_UFFDIO_WAKE);
/// `UFFDIO_COPY`.
pub const UFFDIO_COPY: u32 = iowr::<k::uffdio_copy>(k::_UFFDIO_COPY);
/// `UFFDIO_ZEROPAGE`.
pub const UFFDIO_ZEROPAGE: u32 = iowr::<k::uffdio_zeropage>(k::_UFFDIO_ZEROPAGE);
/// `UFFDIO_MOVE` (Linux 6.8+).
pub const UFFDIO_MOVE: u32 = iowr::<k::uffdio_move>(k::_UFFDIO_MOVE);
/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd`: `_IO(0xAA, 0x00)`.
pub const USERFAULTFD_IOC_NEW: u32 = (k::USERFAULTFD_IOC) << 8;

// The numbers the kernel headers give, checked at compile time.
const _: () = assert!(UFFDIO_API == linux_raw_sys::ioctl::UFFDIO_API);
const _: () = assert!(UFFDIO_REGISTER == linux_raw_sys::ioctl::UFFDIO_REGISTER);
const _: () = assert!(UFFDIO_UNREGISTER == linux_raw_sys::ioctl::UFFDIO_UNREGISTER);
const _: () = assert!(UFFDIO_WAKE == linux_raw_sys::ioctl::UFFDIO_WAKE);
const _: () = assert!(UFFDIO_COPY == linux_raw_sys::ioctl::UFFDIO_COPY);
const _: () = assert!(UFFDIO_ZEROPAGE == linux_raw_sys::ioctl::UFFDIO_ZEROPAGE);
const _: () = assert!(UFFDIO_MOVE == 0xc028_aa05);
const _: () = assert!(USERFAULTFD_IOC_NEW == 0xaa00);

/// API version we speak.
pub const UFFD_API: u64 = k::UFFD_API as u64;

/// Feature bits of `UFFDIO_API` (a subset we name).
pub mod feature {
    use linux_raw_sys::general as k;
    /// `UFFD_FEATURE_EVENT_REMOVE`: `MADV_DONTNEED` on a registered range sends an event.
    pub const EVENT_REMOVE: u64 = k::UFFD_FEATURE_EVENT_REMOVE as u64;
    /// `UFFD_FEATURE_EVENT_UNMAP`.
    pub const EVENT_UNMAP: u64 = k::UFFD_FEATURE_EVENT_UNMAP as u64;
    /// `UFFD_FEATURE_EVENT_REMAP`.
    pub const EVENT_REMAP: u64 = k::UFFD_FEATURE_EVENT_REMAP as u64;
    /// `UFFD_FEATURE_MISSING_HUGETLBFS`.
    pub const MISSING_HUGETLBFS: u64 = k::UFFD_FEATURE_MISSING_HUGETLBFS as u64;
    /// `UFFD_FEATURE_MISSING_SHMEM`.
    pub const MISSING_SHMEM: u64 = k::UFFD_FEATURE_MISSING_SHMEM as u64;
    /// `UFFD_FEATURE_THREAD_ID`: the faulting thread's id in each message.
    pub const THREAD_ID: u64 = k::UFFD_FEATURE_THREAD_ID as u64;
    /// `UFFD_FEATURE_EXACT_ADDRESS`.
    pub const EXACT_ADDRESS: u64 = k::UFFD_FEATURE_EXACT_ADDRESS as u64;
    /// `UFFD_FEATURE_WP_ASYNC` (6.7+).
    pub const WP_ASYNC: u64 = k::UFFD_FEATURE_WP_ASYNC as u64;
    /// `UFFD_FEATURE_MOVE` (6.8+).
    pub const MOVE: u64 = k::UFFD_FEATURE_MOVE as u64;
    /// `UFFD_FEATURE_POISON` (6.6+).
    pub const POISON: u64 = k::UFFD_FEATURE_POISON as u64;
}

/// Bits of the `ioctls` masks returned by `UFFDIO_API` and `UFFDIO_REGISTER` (`1 << _UFFDIO_*`).
pub mod ioctl_bit {
    use linux_raw_sys::general as k;
    /// `UFFDIO_REGISTER`.
    pub const REGISTER: u64 = 1 << k::_UFFDIO_REGISTER;
    /// `UFFDIO_UNREGISTER`.
    pub const UNREGISTER: u64 = 1 << k::_UFFDIO_UNREGISTER;
    /// `UFFDIO_API`.
    pub const API: u64 = 1 << k::_UFFDIO_API;
    /// `UFFDIO_WAKE`.
    pub const WAKE: u64 = 1 << k::_UFFDIO_WAKE;
    /// `UFFDIO_COPY`.
    pub const COPY: u64 = 1 << k::_UFFDIO_COPY;
    /// `UFFDIO_ZEROPAGE`.
    pub const ZEROPAGE: u64 = 1 << k::_UFFDIO_ZEROPAGE;
    /// `UFFDIO_MOVE`.
    pub const MOVE: u64 = 1 << k::_UFFDIO_MOVE;
    /// `UFFDIO_WRITEPROTECT`.
    pub const WRITEPROTECT: u64 = 1 << k::_UFFDIO_WRITEPROTECT;
    /// `UFFDIO_CONTINUE`.
    pub const CONTINUE: u64 = 1 << k::_UFFDIO_CONTINUE;
    /// `UFFDIO_POISON`.
    pub const POISON: u64 = 1 << k::_UFFDIO_POISON;

    /// Names of the bits set in `mask`, for reports.
    pub fn names(mask: u64) -> Vec<&'static str> {
        [
            (API, "API"),
            (REGISTER, "REGISTER"),
            (UNREGISTER, "UNREGISTER"),
            (WAKE, "WAKE"),
            (COPY, "COPY"),
            (ZEROPAGE, "ZEROPAGE"),
            (MOVE, "MOVE"),
            (WRITEPROTECT, "WRITEPROTECT"),
            (CONTINUE, "CONTINUE"),
            (POISON, "POISON"),
        ]
        .iter()
        .filter(|(bit, _)| mask & bit != 0)
        .map(|(_, name)| *name)
        .collect()
    }
}

/// Registration modes (`UFFDIO_REGISTER_MODE_*`).
pub mod mode {
    use linux_raw_sys::general as k;
    /// Fault on pages that are not present.
    pub const MISSING: u64 = k::UFFDIO_REGISTER_MODE_MISSING as u64;
    /// Fault on writes to write-protected pages.
    pub const WP: u64 = k::UFFDIO_REGISTER_MODE_WP as u64;
    /// Fault on pages present in the page cache but not mapped (shmem/hugetlbfs).
    pub const MINOR: u64 = k::UFFDIO_REGISTER_MODE_MINOR as u64;
}

/// How the descriptor was obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenedBy {
    /// `ioctl(USERFAULTFD_IOC_NEW)` on `/dev/userfaultfd` (Linux 6.1+; file permissions govern it).
    Device,
    /// The `userfaultfd(2)` system call (governed by `vm.unprivileged_userfaultfd`).
    Syscall,
}

/// Errors of the userfaultfd interface, each errno named for what it means here.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// Neither the device nor the syscall gave us a descriptor.
    #[error(
        "cannot open userfaultfd: /dev/userfaultfd: {device}; userfaultfd(2): {syscall}. \
         Run as root, or grant access to /dev/userfaultfd, or set sysctl vm.unprivileged_userfaultfd=1"
    )]
    Open {
        /// Why the device failed.
        device: Errno,
        /// Why the system call failed.
        syscall: Errno,
    },
    /// `UFFDIO_API` failed: the API version or a requested feature is not offered.
    #[error("UFFDIO_API (features {requested:#x}) failed: {errno}; this kernel lacks a userfaultfd feature we need")]
    Api {
        /// Features we asked for.
        requested: u64,
        /// The errno.
        errno: Errno,
    },
    /// The kernel does not offer features we asked for.
    #[error("userfaultfd lacks features {missing:#x} (kernel offers {offered:#x})")]
    MissingFeatures {
        /// Features asked for but absent.
        missing: u64,
        /// Features offered.
        offered: u64,
    },
    /// `UFFDIO_REGISTER` failed.
    #[error("UFFDIO_REGISTER of {len_bytes} bytes at {start:#x} failed: {errno} ({hint})")]
    Register {
        /// Range start.
        start: usize,
        /// Range length in bytes.
        len_bytes: usize,
        /// The errno.
        errno: Errno,
        /// What it usually means.
        hint: &'static str,
    },
    /// `UFFDIO_UNREGISTER` failed.
    #[error("UFFDIO_UNREGISTER of {len_bytes} bytes at {start:#x} failed: {errno}")]
    Unregister {
        /// Range start.
        start: usize,
        /// Range length in bytes.
        len_bytes: usize,
        /// The errno.
        errno: Errno,
    },
    /// `UFFDIO_WAKE` failed.
    #[error("UFFDIO_WAKE at {start:#x} failed: {errno}")]
    Wake {
        /// Range start.
        start: usize,
        /// The errno.
        errno: Errno,
    },
    /// Reading events failed.
    #[error("reading userfaultfd events failed: {0}")]
    Read(Errno),
    /// A placement (`COPY`, `ZEROPAGE`, `MOVE`) failed; see [`PlaceError`].
    #[error(transparent)]
    Place(#[from] PlaceError),
}

/// Why a placement stopped, with the errno named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlaceErrorKind {
    /// `EEXIST`: the page at `start + done_bytes` is already present. Normal when a streamed page
    /// races a request: the caller wakes that page and carries on after it.
    Exists,
    /// `EAGAIN` after part of the range was placed: retry the remainder.
    Partial,
    /// `EAGAIN` with nothing placed: the mappings are changing (an unread `REMOVE`/`UNMAP`
    /// event); read events, then retry.
    MappingChanging,
    /// `ENOENT`: the destination is not in a range registered with this userfaultfd (or the
    /// address space is exiting).
    NotRegistered,
    /// `ESRCH`: the address space that owns the registration is gone.
    MmGone,
    /// `EINVAL`: misaligned or zero-length range, or a mode the kernel rejects.
    Invalid,
    /// `EFAULT`: the source buffer could not be read.
    BadSource,
    /// `ENOMEM`: the kernel could not allocate the page.
    NoMemory,
    /// `EBUSY` (`UFFDIO_MOVE`): the source page is shared or pinned.
    Busy,
    /// Any other errno.
    Other(Errno),
}

/// A placement that stopped before the whole range was placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{op} of {len_bytes} bytes at {start:#x} stopped after {done_bytes} bytes: {kind:?}")]
pub struct PlaceError {
    /// Which ioctl.
    pub op: &'static str,
    /// Destination start of the call.
    pub start: usize,
    /// Length asked for.
    pub len_bytes: usize,
    /// Bytes placed before the stop (always a multiple of the page size).
    pub done_bytes: usize,
    /// Why it stopped.
    pub kind: PlaceErrorKind,
}

/// A decoded `struct uffd_msg`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// `UFFD_EVENT_PAGEFAULT`: a thread touched a missing page.
    PageFault {
        /// Faulting address (page-aligned unless `EXACT_ADDRESS` was asked for).
        address: u64,
        /// `UFFD_PAGEFAULT_FLAG_*`.
        flags: u64,
        /// Faulting thread id (with `THREAD_ID`), else 0.
        thread_id: u32,
    },
    /// `UFFD_EVENT_REMOVE`: `MADV_DONTNEED`/`MADV_REMOVE` dropped `[start, end)`.
    Remove {
        /// Range start.
        start: u64,
        /// Range end (exclusive).
        end: u64,
    },
    /// `UFFD_EVENT_UNMAP`: `[start, end)` was unmapped.
    Unmap {
        /// Range start.
        start: u64,
        /// Range end (exclusive).
        end: u64,
    },
    /// `UFFD_EVENT_REMAP`: `mremap` moved a registered range.
    Remap {
        /// Old start.
        from: u64,
        /// New start.
        to: u64,
        /// Length in bytes.
        len: u64,
    },
    /// `UFFD_EVENT_FORK`: a child inherited the registration; `ufd` is its new descriptor.
    Fork {
        /// The child's userfaultfd.
        ufd: u32,
    },
    /// An event code we do not know.
    Unknown(u8),
}

fn u64_at(msg: &[u8; MSG_BYTES], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&msg[at..at + 8]);
    u64::from_ne_bytes(b)
}

impl Event {
    /// Decodes one message as the kernel lays it out (`struct uffd_msg`, 32 bytes): `event` at
    /// byte 0, the union at byte 8. Works on bytes read by anyone (e.g. an io_uring `Read`).
    pub fn decode(msg: &[u8; MSG_BYTES]) -> Event {
        match u32::from(msg[0]) {
            k::UFFD_EVENT_PAGEFAULT => Event::PageFault {
                flags: u64_at(msg, 8),
                address: u64_at(msg, 16),
                thread_id: u32::from_ne_bytes([msg[24], msg[25], msg[26], msg[27]]),
            },
            k::UFFD_EVENT_REMOVE => Event::Remove {
                start: u64_at(msg, 8),
                end: u64_at(msg, 16),
            },
            k::UFFD_EVENT_UNMAP => Event::Unmap {
                start: u64_at(msg, 8),
                end: u64_at(msg, 16),
            },
            k::UFFD_EVENT_REMAP => Event::Remap {
                from: u64_at(msg, 8),
                to: u64_at(msg, 16),
                len: u64_at(msg, 24),
            },
            k::UFFD_EVENT_FORK => Event::Fork {
                ufd: u32::from_ne_bytes([msg[8], msg[9], msg[10], msg[11]]),
            },
            other => Event::Unknown(other as u8),
        }
    }

    /// Decodes every whole message in `bytes` (a read returns whole messages only).
    pub fn decode_all(bytes: &[u8]) -> impl Iterator<Item = Event> + '_ {
        bytes
            .chunks_exact(MSG_BYTES)
            .map(|c| Event::decode(c.try_into().expect("chunks_exact gives MSG_BYTES")))
    }

    /// Encodes an event the way the kernel would (for tests and fuzzing of decoders).
    pub fn encode(&self) -> [u8; MSG_BYTES] {
        let mut m = [0u8; MSG_BYTES];
        let mut put = |at: usize, v: u64| m[at..at + 8].copy_from_slice(&v.to_ne_bytes());
        let code = match *self {
            Event::PageFault {
                address,
                flags,
                thread_id,
            } => {
                put(8, flags);
                put(16, address);
                put(24, u64::from(thread_id));
                k::UFFD_EVENT_PAGEFAULT as u8
            }
            Event::Remove { start, end } => {
                put(8, start);
                put(16, end);
                k::UFFD_EVENT_REMOVE as u8
            }
            Event::Unmap { start, end } => {
                put(8, start);
                put(16, end);
                k::UFFD_EVENT_UNMAP as u8
            }
            Event::Remap { from, to, len } => {
                put(8, from);
                put(16, to);
                put(24, len);
                k::UFFD_EVENT_REMAP as u8
            }
            Event::Fork { ufd } => {
                put(8, u64::from(ufd));
                k::UFFD_EVENT_FORK as u8
            }
            Event::Unknown(code) => code,
        };
        m[0] = code;
        m
    }
}

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

fn errno_of(ret: libc::c_long) -> Option<Errno> {
    (ret < 0).then(Errno::last)
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
            mode: if dontwake {
                u64::from(k::UFFDIO_COPY_MODE_DONTWAKE)
            } else {
                0
            },
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
            mode: if dontwake {
                u64::from(k::UFFDIO_ZEROPAGE_MODE_DONTWAKE)
            } else {
                0
            },
            zeropage: 0,
        };
        self.ioctl(UFFDIO_ZEROPAGE, &mut z)
            .map_err(|e| Self::place_error("UFFDIO_ZEROPAGE", dst, len_bytes, z.zeropage, e))
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
