//! The userfaultfd ABI: `uffd_msg`'s size, the ioctl numbers (computed here, checked at compile
//! time against the kernel headers of `linux-raw-sys`), the API version, feature bits, ioctl
//! bits and register modes.

use linux_raw_sys::general as k;

/// Size of one `struct uffd_msg`.
pub const MSG_BYTES: usize = 32;

const _: () = assert!(std::mem::size_of::<k::uffd_msg>() == MSG_BYTES);
const _: () = assert!(std::mem::size_of::<k::uffdio_api>() == 24);
const _: () = assert!(std::mem::size_of::<k::uffdio_range>() == 16);
const _: () = assert!(std::mem::size_of::<k::uffdio_register>() == 32);
const _: () = assert!(std::mem::size_of::<k::uffdio_copy>() == 40);
const _: () = assert!(std::mem::size_of::<k::uffdio_zeropage>() == 32);
const _: () = assert!(std::mem::size_of::<k::uffdio_move>() == 40);
const _: () = assert!(std::mem::size_of::<k::uffdio_continue>() == 32);

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
/// `UFFDIO_CONTINUE` (Linux 5.13+ for hugetlbfs, 5.14+ for shmem).
pub const UFFDIO_CONTINUE: u32 = iowr::<k::uffdio_continue>(k::_UFFDIO_CONTINUE);
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
const _: () = assert!(UFFDIO_CONTINUE == linux_raw_sys::ioctl::UFFDIO_CONTINUE);
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
    /// `UFFD_FEATURE_MINOR_HUGETLBFS` (5.13+): MINOR registration of hugetlbfs memory.
    pub const MINOR_HUGETLBFS: u64 = k::UFFD_FEATURE_MINOR_HUGETLBFS as u64;
    /// `UFFD_FEATURE_MINOR_SHMEM` (5.14+): MINOR registration of shmem (memfd) memory.
    pub const MINOR_SHMEM: u64 = k::UFFD_FEATURE_MINOR_SHMEM as u64;
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

/// `UFFD_PAGEFAULT_FLAG_MINOR`: the faulting page is in the page cache, not mapped here (a
/// MINOR-registered range).
pub const PAGEFAULT_FLAG_MINOR: u64 = k::UFFD_PAGEFAULT_FLAG_MINOR as u64;

/// Registration modes (`UFFDIO_REGISTER_MODE_*`).
pub mod mode {
    use linux_raw_sys::general as k;
    /// Fault on pages that are not present.
    pub const MISSING: u64 = k::UFFDIO_REGISTER_MODE_MISSING as u64;
    /// Fault on writes to write-protected pages.
    pub const WP: u64 = k::UFFDIO_REGISTER_MODE_WP as u64;
    /// Fault on pages present in the page cache but not mapped (shmem/hugetlbfs; resolved
    /// with `UFFDIO_CONTINUE`).
    pub const MINOR: u64 = k::UFFDIO_REGISTER_MODE_MINOR as u64;
}
