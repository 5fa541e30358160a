//! userfaultfd errors, every errno a placement can return named.

use nix::errno::Errno;

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
