//! The working set of an image: the pages restores of it asked for on the urgent path, in the
//! order they first did (REAP, ASPLOS'21; FaaSnap, EuroSys'22). A later session's stream pushes
//! those pages first, in large batches, ahead of the rest, so a restore that touches the same
//! pages finds most of them placed instead of faulting on each.
//!
//! Learning is a union: each urgent connection, when it ends, appends the pages it was asked
//! for that the set did not have, so a replayed restore's remaining faults extend the set and
//! nothing is forgotten until it is reset. The set is kept in memory, shared by every session of
//! the server, and persisted to a file (written whole to a temporary name, then renamed).
//!
//! File format: the line `postcopy working set v1 pages=<total pages of the layout>`, then one
//! record per page in order, `block` (u32 LE) and `page` (u64 LE). A file that does not match
//! the image's layout is ignored with a warning, never trusted.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::layout::Layout;

const MAGIC: &str = "postcopy working set v1";
const RECORD_BYTES: usize = 12;

/// What to do with the working set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkingSetConfig {
    /// Where it is persisted (`None`: in memory only, for this server's life).
    pub path: Option<PathBuf>,
    /// Push it first in every session's stream.
    pub replay: bool,
    /// Start empty (the file, if any, is replaced at the first save).
    pub reset: bool,
}

/// Errors reading or writing the working-set file.
#[derive(Debug, thiserror::Error)]
pub enum WorkingSetError {
    /// The file could not be read or written.
    #[error("working set {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not a working set of this image.
    #[error("working set {path}: {detail}; ignored (remove it or pass --working-set-reset)")]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// What did not match.
        detail: String,
    },
}

/// An image's learned working set.
pub struct WorkingSet {
    config: WorkingSetConfig,
    layout: Layout,
    /// The set as it is now; a session works from the one it found (copy on learn).
    current: Mutex<Arc<Snapshot>>,
}

/// The working set as one session uses it, unchanged while it runs.
pub struct Snapshot {
    /// Pages in the order first asked for.
    order: Vec<(u32, u64)>,
    /// Per block and page, its index in `order` (`NOT_IN_SET`: none).
    position: Vec<Vec<u32>>,
}

const NOT_IN_SET: u32 = u32::MAX;

impl Snapshot {
    fn empty(layout: &Layout) -> Snapshot {
        Snapshot {
            order: Vec::new(),
            position: layout
                .blocks
                .iter()
                .map(|b| vec![NOT_IN_SET; b.pages() as usize])
                .collect(),
        }
    }

    /// The pages, in the order they were first asked for.
    pub fn order(&self) -> &[(u32, u64)] {
        &self.order
    }

    /// Where page `page` of block `b` is in [`order`](Self::order), if in the set.
    pub fn position(&self, b: u32, page: u64) -> Option<usize> {
        let i = *self.position.get(b as usize)?.get(page as usize)?;
        (i != NOT_IN_SET).then_some(i as usize)
    }

    /// Appends `page` of block `b` unless it is in the set or outside the layout; whether it
    /// was appended.
    fn push(&mut self, b: u32, page: u64) -> bool {
        let Some(slot) = self
            .position
            .get_mut(b as usize)
            .and_then(|p| p.get_mut(page as usize))
        else {
            return false;
        };
        if *slot != NOT_IN_SET || self.order.len() >= NOT_IN_SET as usize {
            return false;
        }
        *slot = self.order.len() as u32;
        self.order.push((b, page));
        true
    }
}

impl WorkingSet {
    /// The working set of an image with `layout`, loaded from `config.path` unless reset; a
    /// file that cannot be used is reported (the set starts empty) but does not fail the server.
    pub fn open(
        layout: &Layout,
        config: WorkingSetConfig,
    ) -> (WorkingSet, Option<WorkingSetError>) {
        let ws = WorkingSet {
            current: Mutex::new(Arc::new(Snapshot::empty(layout))),
            layout: layout.clone(),
            config,
        };
        let problem = match (&ws.config.path, ws.config.reset) {
            (Some(path), false) if path.exists() => ws.load(path).err(),
            _ => None,
        };
        (ws, problem)
    }

    /// The set as it is now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.lock().clone()
    }

    /// Pages in the set.
    pub fn len(&self) -> usize {
        self.lock().order.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a session starting now records the set (its stream holds back while faults
    /// come) rather than replays it: always when recording only, else while the set is empty
    /// (the image's first restore).
    pub fn records_now(&self) -> bool {
        !self.config.replay || self.is_empty()
    }

    /// Appends the pages of `requests` (block, first page, pages) not in the set yet, in order,
    /// and persists the set if it grew.
    pub fn learn(&self, requests: &[(u32, u64, u64)]) -> Result<(), WorkingSetError> {
        let grew = {
            let mut current = self.lock();
            let mut next: Option<Snapshot> = None;
            for &(b, first, n) in requests {
                for p in first..first + n {
                    if current.position(b, p).is_some() {
                        continue;
                    }
                    let s = next.get_or_insert_with(|| Snapshot {
                        order: current.order.clone(),
                        position: current.position.clone(),
                    });
                    s.push(b, p);
                }
            }
            match next {
                Some(s) => {
                    *current = Arc::new(s);
                    true
                }
                None => false,
            }
        };
        match (&self.config.path, grew) {
            (Some(path), true) => self.save(path),
            _ => Ok(()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Arc<Snapshot>> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn load(&self, path: &Path) -> Result<(), WorkingSetError> {
        let io = |source| WorkingSetError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mismatch = |detail: String| WorkingSetError::Mismatch {
            path: path.to_path_buf(),
            detail,
        };
        let bytes = std::fs::read(path).map_err(io)?;
        let newline = bytes
            .iter()
            .position(|&c| c == b'\n')
            .ok_or_else(|| mismatch("no header line".into()))?;
        let header = String::from_utf8_lossy(&bytes[..newline]);
        let want = format!("{MAGIC} pages={}", self.layout.total_pages());
        if header != want {
            return Err(mismatch(format!("header {header:?}, expected {want:?}")));
        }
        let body = &bytes[newline + 1..];
        if body.len() % RECORD_BYTES != 0 {
            return Err(mismatch(format!(
                "{} bytes of records: truncated",
                body.len()
            )));
        }
        let mut loaded = Snapshot::empty(&self.layout);
        for r in body.chunks_exact(RECORD_BYTES) {
            let b = u32::from_le_bytes(r[..4].try_into().expect("4 bytes"));
            let p = u64::from_le_bytes(r[4..].try_into().expect("8 bytes"));
            if self.layout.check_range(b, p, 1).is_err() {
                return Err(mismatch(format!(
                    "page {p} of block {b} is outside the image"
                )));
            }
            loaded.push(b, p);
        }
        *self.lock() = Arc::new(loaded);
        Ok(())
    }

    fn save(&self, path: &Path) -> Result<(), WorkingSetError> {
        let io = |source| WorkingSetError::Io {
            path: path.to_path_buf(),
            source,
        };
        let snapshot = self.snapshot();
        let mut out = format!("{MAGIC} pages={}\n", self.layout.total_pages()).into_bytes();
        out.reserve(snapshot.order.len() * RECORD_BYTES);
        for &(b, p) in &snapshot.order {
            out.extend_from_slice(&b.to_le_bytes());
            out.extend_from_slice(&p.to_le_bytes());
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{}.tmp", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let written = std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(&out).and_then(|()| f.sync_data()))
            .and_then(|()| std::fs::rename(&tmp, path));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written.map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout::single("ram", 64 * 4096, 4096).unwrap()
    }

    #[test]
    fn learns_a_union_in_first_order_and_persists_it() {
        let path = std::env::temp_dir().join(format!("pc-ws-unit-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let config = WorkingSetConfig {
            path: Some(path.clone()),
            replay: true,
            reset: false,
        };
        let (ws, problem) = WorkingSet::open(&layout(), config.clone());
        assert!(problem.is_none());
        ws.learn(&[(0, 10, 3), (0, 2, 1), (0, 12, 2)]).unwrap();
        let snap = ws.snapshot();
        assert_eq!(snap.order(), &[(0, 10), (0, 11), (0, 12), (0, 2), (0, 13)]);
        assert_eq!((snap.position(0, 2), snap.position(0, 3)), (Some(3), None));
        let (again, problem) = WorkingSet::open(&layout(), config.clone());
        assert!(problem.is_none());
        assert_eq!(again.len(), 5);
        let (fresh, _) = WorkingSet::open(
            &layout(),
            WorkingSetConfig {
                reset: true,
                ..config
            },
        );
        assert!(fresh.is_empty());
        let other = Layout::single("ram", 32 * 4096, 4096).unwrap();
        let (bad, problem) = WorkingSet::open(
            &other,
            WorkingSetConfig {
                path: Some(path.clone()),
                replay: true,
                reset: false,
            },
        );
        assert!(
            matches!(problem, Some(WorkingSetError::Mismatch { .. })),
            "{problem:?}"
        );
        assert!(bad.is_empty());
        let _ = std::fs::remove_file(&path);
    }
}
