//! Shared pieces of `fake-vmm` (a VMM speaking Firecracker's userfaultfd handover) and
//! `uffd-file-handler` (a one-page-per-fault handler serving a local memory file).

pub mod proto;
pub mod uffd;
pub mod util;
