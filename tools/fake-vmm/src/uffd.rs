//! The userfaultfd UAPI pieces both programs need (`linux/userfaultfd.h`), written out here
//! because `libc` does not carry them, plus thin wrappers around the ioctls.
//!
//! Every wrapper returns `io::Error` built from `errno`, so callers can match on
//! `raw_os_error()` (`EEXIST`, `EAGAIN`, `ESRCH`, `ENOENT`).

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `UFFD_API`: the only API version there is.
pub const UFFD_API: u64 = 0xAA;

/// The ioctl "type" byte of userfaultfd ioctls (`UFFDIO`) and of `/dev/userfaultfd` (`USERFAULTFD_IOC`).
const UFFDIO: u32 = 0xAA;

const IOC_NONE: u32 = 0;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// `_IOC(dir, type, nr, size)` with the generic (x86_64, aarch64) encoding.
const fn ioc(dir: u32, nr: u32, size: usize) -> u64 {
    ((dir << 30) | ((size as u32) << 16) | (UFFDIO << 8) | nr) as u64
}

/// `_UFFDIO_*` command numbers; `UffdioRegister::ioctls` is a bit mask of `1 << nr`.
pub const NR_REGISTER: u32 = 0x00;
pub const NR_WAKE: u32 = 0x02;
pub const NR_COPY: u32 = 0x03;
pub const NR_ZEROPAGE: u32 = 0x04;
pub const NR_API: u32 = 0x3F;

pub const UFFDIO_API: u64 = ioc(IOC_READ | IOC_WRITE, NR_API, size_of::<UffdioApi>());
pub const UFFDIO_REGISTER: u64 = ioc(
    IOC_READ | IOC_WRITE,
    NR_REGISTER,
    size_of::<UffdioRegister>(),
);
pub const UFFDIO_WAKE: u64 = ioc(IOC_READ, NR_WAKE, size_of::<UffdioRange>());
pub const UFFDIO_COPY: u64 = ioc(IOC_READ | IOC_WRITE, NR_COPY, size_of::<UffdioCopy>());
pub const UFFDIO_ZEROPAGE: u64 = ioc(
    IOC_READ | IOC_WRITE,
    NR_ZEROPAGE,
    size_of::<UffdioZeropage>(),
);
/// `USERFAULTFD_IOC_NEW`: `_IO(USERFAULTFD_IOC, 0x00)` on `/dev/userfaultfd` (Linux 6.1+).
pub const USERFAULTFD_IOC_NEW: u64 = ioc(IOC_NONE, 0x00, 0);

pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
pub const UFFD_EVENT_FORK: u8 = 0x13;
pub const UFFD_EVENT_REMAP: u8 = 0x14;
pub const UFFD_EVENT_REMOVE: u8 = 0x15;
pub const UFFD_EVENT_UNMAP: u8 = 0x16;

pub const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;

pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub const UFFD_FEATURE_MISSING_HUGETLBFS: u64 = 1 << 4;

pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioRange {
    pub start: u64,
    pub len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioRegister {
    pub range: UffdioRange,
    pub mode: u64,
    pub ioctls: u64,
}

/// `struct uffdio_copy`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioCopy {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    pub copy: i64,
}

/// `struct uffdio_zeropage`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioZeropage {
    pub range: UffdioRange,
    pub mode: u64,
    pub zeropage: i64,
}

/// `struct uffd_msg` (packed in C, but every field is naturally aligned: 32 bytes either way).
/// `arg` is the union: for `UFFD_EVENT_PAGEFAULT` `[flags, address, ptid]`, for
/// `UFFD_EVENT_REMOVE` `[start, end, _]`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdMsg {
    pub event: u8,
    pub reserved1: u8,
    pub reserved2: u16,
    pub reserved3: u32,
    pub arg: [u64; 3],
}

const _: () = assert!(size_of::<UffdMsg>() == 32);
const _: () = assert!(size_of::<UffdioCopy>() == 40);
const _: () = assert!(size_of::<UffdioRegister>() == 32);

/// How to obtain a userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UffdSource {
    /// The userfaultfd(2) syscall, falling back to `/dev/userfaultfd` if it is refused.
    Auto,
    /// Only the syscall.
    Syscall,
    /// Only `/dev/userfaultfd` + `USERFAULTFD_IOC_NEW`.
    Dev,
}

/// Creates a userfaultfd with `O_CLOEXEC | O_NONBLOCK`. Returns the fd and which way it was made
/// (`"syscall"` or `"/dev/userfaultfd"`).
pub fn create(source: UffdSource) -> io::Result<(OwnedFd, &'static str)> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    let mut syscall_err = None;
    if source != UffdSource::Dev {
        // SAFETY: userfaultfd(2) takes one int flags argument and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if fd >= 0 {
            // SAFETY: the syscall just returned this fd; nothing else owns it.
            return Ok((unsafe { OwnedFd::from_raw_fd(fd as RawFd) }, "syscall"));
        }
        let err = io::Error::last_os_error();
        if source == UffdSource::Syscall {
            return Err(err);
        }
        syscall_err = Some(err);
    }
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
        .map_err(|e| match &syscall_err {
            Some(s) => io::Error::new(
                e.kind(),
                format!("userfaultfd(2) failed ({s}) and /dev/userfaultfd failed ({e})"),
            ),
            None => io::Error::new(e.kind(), format!("/dev/userfaultfd: {e}")),
        })?;
    // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its integer argument and returns a new fd or -1.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as libc::Ioctl, flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the ioctl just returned this fd; nothing else owns it.
    Ok((unsafe { OwnedFd::from_raw_fd(fd) }, "/dev/userfaultfd"))
}

/// `ioctl(fd, req, arg)` for the userfaultfd ioctls that take a struct pointer.
fn ioctl_ptr<T>(fd: RawFd, req: u64, arg: &mut T) -> io::Result<()> {
    // SAFETY: every caller passes the request whose argument type is `T` (encoded in `req`'s
    // size field), and `arg` is a valid, exclusively borrowed `T` for the call's duration.
    let r = unsafe { libc::ioctl(fd, req as libc::Ioctl, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `UFFDIO_API` asking for `features`; returns the features the kernel reports.
pub fn api(fd: RawFd, features: u64) -> io::Result<u64> {
    let mut a = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    ioctl_ptr(fd, UFFDIO_API, &mut a)?;
    Ok(a.features)
}

/// `UFFDIO_REGISTER` in MISSING mode; returns the ioctls the range supports (bit `1 << NR_*`).
pub fn register_missing(fd: RawFd, start: u64, len: u64) -> io::Result<u64> {
    let mut r = UffdioRegister {
        range: UffdioRange { start, len },
        mode: UFFDIO_REGISTER_MODE_MISSING,
        ioctls: 0,
    };
    ioctl_ptr(fd, UFFDIO_REGISTER, &mut r)?;
    Ok(r.ioctls)
}

/// `UFFDIO_COPY` of `len` bytes from `src` (this process) to `dst` (the registered process),
/// waking the faulting threads.
pub fn copy(fd: RawFd, dst: u64, src: *const u8, len: u64) -> io::Result<()> {
    let mut c = UffdioCopy {
        dst,
        src: src as u64,
        len,
        mode: 0,
        copy: 0,
    };
    ioctl_ptr(fd, UFFDIO_COPY, &mut c)
}

/// `UFFDIO_ZEROPAGE` of `len` bytes at `start`, waking the faulting threads.
pub fn zeropage(fd: RawFd, start: u64, len: u64) -> io::Result<()> {
    let mut z = UffdioZeropage {
        range: UffdioRange { start, len },
        mode: 0,
        zeropage: 0,
    };
    ioctl_ptr(fd, UFFDIO_ZEROPAGE, &mut z)
}

/// `UFFDIO_WAKE` of the threads waiting on `[start, start + len)`.
pub fn wake(fd: RawFd, start: u64, len: u64) -> io::Result<()> {
    let mut r = UffdioRange { start, len };
    ioctl_ptr(fd, UFFDIO_WAKE, &mut r)
}

/// Reads one `uffd_msg` from a non-blocking userfaultfd; `Ok(None)` when none is pending.
pub fn read_msg(fd: RawFd) -> io::Result<Option<UffdMsg>> {
    let mut msg = UffdMsg::default();
    // SAFETY: `msg` is a plain 32-byte repr(C) struct of integers; the kernel writes at most
    // `size_of::<UffdMsg>()` bytes into it, and any bit pattern is a valid value.
    let n = unsafe {
        libc::read(
            fd,
            (&mut msg as *mut UffdMsg).cast::<libc::c_void>(),
            size_of::<UffdMsg>(),
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EAGAIN) {
            return Ok(None);
        }
        return Err(e);
    }
    if n as usize != size_of::<UffdMsg>() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("short read of uffd_msg: {n} bytes"),
        ));
    }
    Ok(Some(msg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(UFFDIO_API, 0xC018_AA3F);
        assert_eq!(UFFDIO_REGISTER, 0xC020_AA00);
        assert_eq!(UFFDIO_WAKE, 0x8010_AA02);
        assert_eq!(UFFDIO_COPY, 0xC028_AA03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xC020_AA04);
        assert_eq!(USERFAULTFD_IOC_NEW, 0xAA00);
    }
}
