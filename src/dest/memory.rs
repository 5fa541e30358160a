//! The kinds of guest memory the engine places pages into, and how each is mapped, filled and
//! discarded.
//!
//! | kind | backing | registered | placed with | a discard |
//! |---|---|---|---|---|
//! | `anon` | private anonymous, 4 KiB, THP off | MISSING | `UFFDIO_COPY` / `ZEROPAGE` | `MADV_DONTNEED` |
//! | `thp` | as `anon`, THP on during precopy and after | MISSING | as `anon` (4 KiB) | `MADV_DONTNEED` |
//! | `memfd` | a shmem memfd, 4 KiB, mapped twice | MISSING + MINOR | write through the alias, `UFFDIO_CONTINUE` | `fallocate(PUNCH_HOLE)` |
//! | `hugetlb` | private hugetlbfs, 2 MiB | MISSING | `UFFDIO_COPY` of whole huge pages | `MADV_DONTNEED` |
//! | `hugetlb-shared` | a hugetlbfs memfd, 2 MiB, mapped twice | MISSING + MINOR | as `memfd` | `fallocate(PUNCH_HOLE)` |
//!
//! Shared memory is mapped twice: the guest's view (registered) and an alias (never
//! registered, populated at start-up). A page's contents are written into the page cache
//! through the alias — stream bodies are received straight into it — and then mapped into the
//! guest's view with `UFFDIO_CONTINUE`, with no further copy. Writes through the alias are not
//! atomic the way `UFFDIO_COPY` is, so every page is *claimed* first (a bit per page, set once
//! by whoever writes it: precopy, the urgent half or the bulk half); nobody writes a page it
//! did not claim, and a claimed page is only mapped into the guest once wholly written.

use std::sync::Arc;

use crate::layout::PageBitmap;
use crate::sys::mem::{base_page_size, Mapping, MemError};
use crate::sys::memfd::Memfd;

/// Bytes of a 2 MiB huge page.
pub const HUGE_2M: u64 = 2 << 20;

/// A kind of guest memory.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Memory {
    /// Private anonymous memory in 4 KiB pages, THP off (as a process's heap).
    #[default]
    Anon,
    /// Private anonymous memory that wants transparent huge pages: THP on during precopy,
    /// off while postcopy places 4 KiB pages, back on afterwards (khugepaged collapses).
    Thp,
    /// A shmem memfd (QEMU's `memory-backend-memfd`, vhost-user): MINOR faults, pages written
    /// through a second mapping and mapped with `UFFDIO_CONTINUE` (one copy fewer).
    Memfd,
    /// Private hugetlbfs memory in 2 MiB pages (`MAP_HUGETLB`): whole huge pages copied.
    Hugetlb,
    /// A hugetlbfs memfd in 2 MiB pages, shared: as `memfd`, a huge page at a time.
    HugetlbShared,
}

impl Memory {
    /// The page size this memory is placed in: 2 MiB for hugetlbfs, else the base page.
    pub fn page_size(self) -> u64 {
        match self {
            Memory::Hugetlb | Memory::HugetlbShared => HUGE_2M,
            Memory::Anon | Memory::Thp | Memory::Memfd => base_page_size() as u64,
        }
    }

    /// Whether it is a file mapped twice (MINOR faults, `UFFDIO_CONTINUE`).
    pub fn is_shared(self) -> bool {
        matches!(self, Memory::Memfd | Memory::HugetlbShared)
    }

    /// Whether it needs reserved huge pages (`vm.nr_hugepages`).
    pub fn needs_huge_pages(self) -> bool {
        self.page_size() == HUGE_2M
    }

    /// Whether `size_bytes` of this memory can be mapped here now: for hugetlbfs, enough free
    /// reserved huge pages; otherwise the error says how to reserve them.
    pub fn check_available(self, size_bytes: u64) -> Result<(), String> {
        if !self.needs_huge_pages() {
            return Ok(());
        }
        let need = size_bytes.div_ceil(HUGE_2M);
        let free = free_huge_pages_2m();
        if free >= need {
            return Ok(());
        }
        Err(format!(
            "--memory {} needs {need} free 2 MiB huge pages, and {free} are: reserve them first (echo {} > /proc/sys/vm/nr_hugepages, as root)",
            self.name(),
            need.saturating_sub(free) + total_huge_pages_2m()
        ))
    }

    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Memory::Anon => "anon",
            Memory::Thp => "thp",
            Memory::Memfd => "memfd",
            Memory::Hugetlb => "hugetlb",
            Memory::HugetlbShared => "hugetlb-shared",
        }
    }

    /// The guest's view of a block of `len_bytes`, and for shared memory its file and alias.
    pub(crate) fn map(self, len_bytes: usize) -> Result<(Mapping, Option<SharedBlock>), MemError> {
        match self {
            Memory::Anon | Memory::Thp => {
                Ok((Mapping::anonymous(len_bytes, "guest RAM block")?, None))
            }
            Memory::Hugetlb => Ok((
                Mapping::anonymous_huge_2m(len_bytes, "guest RAM block (2 MiB pages)")?,
                None,
            )),
            Memory::Memfd | Memory::HugetlbShared => {
                let huge = self == Memory::HugetlbShared;
                let memfd = Memfd::create(c"postcopy-guest-ram", len_bytes, huge, "guest RAM")?;
                use std::os::fd::AsFd;
                let guest = Mapping::shared_file(memfd.as_fd(), len_bytes, false, "guest RAM")?;
                // Populated: receives into it never fault, and every page is in the page
                // cache (a first touch of the guest's view is a MINOR fault).
                let alias =
                    Mapping::shared_file(memfd.as_fd(), len_bytes, true, "guest RAM alias")?;
                let pages = (len_bytes / memfd.page_bytes()) as u64;
                Ok((
                    guest,
                    Some(SharedBlock {
                        memfd,
                        alias: Arc::new(alias),
                        claims: PageBitmap::new(pages),
                    }),
                ))
            }
        }
    }
}

/// A block of shared memory: its file, the alias the engine writes through, and the claim of
/// each page (see the module docs).
#[derive(Debug)]
pub struct SharedBlock {
    /// The memfd.
    pub memfd: Memfd,
    /// The second mapping of the file (never registered).
    pub alias: Arc<Mapping>,
    /// A bit per page: somebody writes (or wrote) this page's contents through the alias.
    pub claims: PageBitmap,
}

fn read_count(path: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Free reserved 2 MiB huge pages.
pub fn free_huge_pages_2m() -> u64 {
    read_count("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
}

/// Reserved 2 MiB huge pages (`vm.nr_hugepages` for the default size).
pub fn total_huge_pages_2m() -> u64 {
    read_count("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages")
}
