//! io_uring: one ring per engine worker, with every buffer the kernel may write owned by the ring.
//!
//! The ring owns its buffer arenas (page-aligned anonymous mappings registered as fixed
//! buffers) and carves them into *slots* at start-up. An operation names a slot; while it is
//! in flight the slot is marked busy and cannot be read or handed out, and the ring cancels and
//! drains every operation before it frees the arenas, so the kernel never writes into freed
//! memory. Completions are reaped in bulk into a preallocated array.
//!
//! Kernel versions: `IORING_SETUP_SINGLE_ISSUER` 6.0, `COOP_TASKRUN` 5.19, `ASYNC_CANCEL` with
//! `ANY` 5.19, `READ_FIXED`/`WRITE_FIXED` 5.1, `SEND` 5.6. Reading a userfaultfd through
//! io_uring needs the descriptor opened `O_NONBLOCK` (the read then waits on poll).
#![allow(unsafe_code)]

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::mem::{Mapping, MemError};

/// Errors of the io_uring layer.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// `io_uring_setup` failed.
    #[error("io_uring_setup({entries} entries) failed: {source}; io_uring may be disabled (sysctl kernel.io_uring_disabled) or the kernel is older than 6.1")]
    Setup {
        /// Ring size asked for.
        entries: u32,
        /// The error.
        source: std::io::Error,
    },
    /// Registering the buffer arenas failed.
    #[error("io_uring buffer registration of {bytes} bytes failed: {source}; raise RLIMIT_MEMLOCK (ulimit -l) or use fewer/smaller temp pages")]
    RegisterBuffers {
        /// Bytes asked for.
        bytes: usize,
        /// The error.
        source: std::io::Error,
    },
    /// Mapping an arena failed.
    #[error(transparent)]
    Mem(#[from] MemError),
    /// `io_uring_enter` failed.
    #[error("io_uring_enter failed: {0}")]
    Enter(std::io::Error),
    /// The submission queue is full even after submitting: more operations than the ring holds.
    #[error("io_uring submission queue full ({0} entries): too many operations in flight")]
    QueueFull(u32),
}

/// A slot: a fixed sub-range of one arena that one operation at a time may target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SlotId(pub u16);

#[derive(Debug)]
struct Slot {
    arena: u16,
    offset_bytes: usize,
    len_bytes: usize,
    busy: bool,
}

/// What an operation did: which kind and which slot, packed into `user_data`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// `IORING_OP_READ_FIXED` into a slot.
    Read,
    /// `IORING_OP_WRITE_FIXED` from a slot.
    Write,
    /// `IORING_OP_ASYNC_CANCEL` (no slot).
    Cancel,
    /// `IORING_OP_POLL_ADD` (one-shot, `POLLIN`): readiness only; the slot is held busy so
    /// that its owner reads into it itself once ready.
    Poll,
}

/// A typed `user_data`: the op kind, the slot, and a caller tag (e.g. which connection).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token {
    /// What the operation was.
    pub kind: OpKind,
    /// The slot it used.
    pub slot: SlotId,
    /// A caller-chosen tag (16 bits).
    pub tag: u16,
}

const NO_SLOT: u16 = u16::MAX;

impl Token {
    fn encode(self) -> u64 {
        let kind = match self.kind {
            OpKind::Read => 1u64,
            OpKind::Write => 2,
            OpKind::Cancel => 3,
            OpKind::Poll => 4,
        };
        (kind << 32) | (u64::from(self.tag) << 16) | u64::from(self.slot.0)
    }

    fn decode(user_data: u64) -> Option<Token> {
        let kind = match user_data >> 32 {
            1 => OpKind::Read,
            2 => OpKind::Write,
            3 => OpKind::Cancel,
            4 => OpKind::Poll,
            _ => return None,
        };
        Some(Token {
            kind,
            slot: SlotId(user_data as u16),
            tag: (user_data >> 16) as u16,
        })
    }
}

/// One reaped completion.
#[derive(Clone, Copy, Debug)]
pub struct Completion {
    /// Which operation.
    pub token: Token,
    /// Bytes transferred, or a negative errno.
    pub result: i32,
}

/// Ring set-up parameters.
#[derive(Clone, Debug)]
pub struct RingConfig {
    /// Submission queue entries.
    pub entries: u32,
    /// Sizes of the arenas to map and register (each rounded up to a page).
    pub arena_bytes: Vec<usize>,
}

/// A per-thread io_uring with owned, registered buffer arenas.
pub struct Ring {
    ring: IoUring,
    arenas: Vec<Mapping>,
    /// Arenas owned elsewhere (after the registered ones in arena numbering), read into with
    /// plain `IORING_OP_READ`; held until the ring is drained.
    shared: Vec<Arc<Mapping>>,
    slots: Vec<Slot>,
    inflight: usize,
    reaped: Vec<Completion>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("arenas", &self.arenas.len())
            .field("slots", &self.slots.len())
            .field("inflight", &self.inflight)
            .finish()
    }
}

impl Ring {
    /// Creates the ring on the calling thread (it becomes the single issuer) and maps and
    /// registers the arenas as fixed buffers `0..n`.
    pub fn new(config: &RingConfig) -> Result<Ring, RingError> {
        let entries = config.entries;
        // COOP_TASKRUN: the kernel posts completions when this thread next enters it (no
        // interrupt to a busy thread); each loop enters it anyway in `submit_and_reap`.
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .setup_cqsize(entries * 4)
            .build(entries)
            .or_else(|_| IoUring::builder().setup_cqsize(entries * 4).build(entries))
            .map_err(|source| RingError::Setup { entries, source })?;
        let page = super::mem::base_page_size();
        let mut arenas = Vec::with_capacity(config.arena_bytes.len());
        for &bytes in &config.arena_bytes {
            let rounded = bytes.div_ceil(page).max(1) * page;
            arenas.push(Mapping::anonymous(rounded, "io_uring buffer arena")?);
        }
        let iovecs: Vec<libc::iovec> = arenas
            .iter()
            .map(|m| libc::iovec {
                iov_base: m.as_ptr().cast(),
                iov_len: m.len_bytes(),
            })
            .collect();
        if !iovecs.is_empty() {
            // SAFETY: every iovec describes a live mapping owned by this Ring; the registration
            // is dropped with the ring fd, and the arenas are dropped after the ring (field
            // order plus the explicit drain in Drop).
            unsafe { ring.submitter().register_buffers(&iovecs) }.map_err(|source| {
                RingError::RegisterBuffers {
                    bytes: iovecs.iter().map(|v| v.iov_len).sum(),
                    source,
                }
            })?;
        }
        Ok(Ring {
            ring,
            arenas,
            shared: Vec::new(),
            slots: Vec::new(),
            inflight: 0,
            reaped: Vec::with_capacity(entries as usize * 4),
        })
    }

    /// Adds an arena the ring neither maps nor registers: memory another owner keeps (a
    /// memfd's alias of guest memory, which stream bodies are received straight into). Its
    /// slots are read with plain `IORING_OP_READ`. The ring keeps a reference until every
    /// operation on it has completed. Returns its arena number (start-up only).
    pub fn add_shared_arena(&mut self, mapping: Arc<Mapping>) -> usize {
        self.shared.push(mapping);
        self.arenas.len() + self.shared.len() - 1
    }

    fn arena(&self, arena: usize) -> &Mapping {
        match arena.checked_sub(self.arenas.len()) {
            Some(i) => &self.shared[i],
            None => &self.arenas[arena],
        }
    }

    fn is_registered(&self, arena: u16) -> bool {
        usize::from(arena) < self.arenas.len()
    }

    /// Carves a slot out of an arena (start-up only).
    pub fn add_slot(&mut self, arena: usize, offset_bytes: usize, len_bytes: usize) -> SlotId {
        let m = self.arena(arena);
        assert!(
            offset_bytes + len_bytes <= m.len_bytes(),
            "slot [{offset_bytes}, +{len_bytes}) outside arena {arena} of {} bytes",
            m.len_bytes()
        );
        assert!(self.slots.len() < NO_SLOT as usize, "too many slots");
        self.slots.push(Slot {
            arena: arena as u16,
            offset_bytes,
            len_bytes,
            busy: false,
        });
        SlotId((self.slots.len() - 1) as u16)
    }

    /// Length of a slot.
    pub fn slot_len(&self, slot: SlotId) -> usize {
        self.slots[slot.0 as usize].len_bytes
    }

    /// Whether an operation targets the slot now.
    pub fn is_busy(&self, slot: SlotId) -> bool {
        self.slots[slot.0 as usize].busy
    }

    fn slot_ptr_unchecked(&self, slot: SlotId) -> *mut u8 {
        let s = &self.slots[slot.0 as usize];
        // SAFETY: add_slot checked that the slot lies inside its arena.
        unsafe { self.arena(s.arena as usize).as_ptr().add(s.offset_bytes) }
    }

    /// The bytes of an idle slot.
    pub fn slot(&self, slot: SlotId) -> &[u8] {
        let s = &self.slots[slot.0 as usize];
        assert!(!s.busy, "slot {slot:?} read while an operation targets it");
        // SAFETY: the slot is inside a live arena, and no operation targets it (checked), so
        // the kernel does not write it while the shared borrow of `self` lives (new operations
        // need `&mut self`).
        unsafe { std::slice::from_raw_parts(self.slot_ptr_unchecked(slot), s.len_bytes) }
    }

    /// The bytes of an idle slot, writable.
    pub fn slot_mut(&mut self, slot: SlotId) -> &mut [u8] {
        let s = &self.slots[slot.0 as usize];
        assert!(
            !s.busy,
            "slot {slot:?} written while an operation targets it"
        );
        let len = s.len_bytes;
        // SAFETY: as `slot`, and `&mut self` makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.slot_ptr_unchecked(slot), len) }
    }

    /// Bytes `[offset_bytes, offset_bytes + len_bytes)` of an idle slot of a shared arena,
    /// writable (a sealed body received into a memfd's alias, opened in place there).
    ///
    /// Other threads may write other bytes of a shared arena through their own raw-pointer
    /// copies; the caller must own these bytes against them (the claim of each page, see
    /// [`crate::layout::PageBitmap::claim`]) for as long as the slice lives.
    pub fn shared_range_mut(
        &mut self,
        slot: SlotId,
        offset_bytes: usize,
        len_bytes: usize,
    ) -> &mut [u8] {
        let s = &self.slots[slot.0 as usize];
        assert!(
            !s.busy,
            "slot {slot:?} written while an operation targets it"
        );
        assert!(!self.is_registered(s.arena), "not a shared arena");
        assert!(
            offset_bytes + len_bytes <= s.len_bytes,
            "range [{offset_bytes}, +{len_bytes}) outside slot {slot:?}"
        );
        // SAFETY: in bounds of a live arena (the ring holds it); no operation targets the slot
        // (checked) and `&mut self` makes this the ring's only access; other threads keep off
        // these bytes by the caller's claim (documented contract above).
        unsafe {
            std::slice::from_raw_parts_mut(
                self.slot_ptr_unchecked(slot).add(offset_bytes),
                len_bytes,
            )
        }
    }

    /// Address of byte `offset_bytes` of an idle slot, for kernel interfaces that read it
    /// (the source of `UFFDIO_COPY`).
    pub fn slot_addr(&self, slot: SlotId, offset_bytes: usize) -> *const u8 {
        let s = &self.slots[slot.0 as usize];
        assert!(!s.busy, "slot {slot:?} used while an operation targets it");
        assert!(offset_bytes <= s.len_bytes);
        // SAFETY: in bounds of the slot (checked).
        unsafe { self.slot_ptr_unchecked(slot).add(offset_bytes) }
    }

    fn push(&mut self, entry: squeue::Entry) -> Result<(), RingError> {
        // SAFETY: every entry built by this module points only into ring-owned or ring-held
        // (shared) arenas, or nowhere, which outlive the operation: Drop cancels and drains
        // before unmapping (or leaks them).
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.ring.submit().map_err(RingError::Enter)?;
            let sq_entries = self.ring.params().sq_entries();
            // SAFETY: as above.
            unsafe { self.ring.submission().push(&entry) }
                .map_err(|_| RingError::QueueFull(sq_entries))?;
        }
        self.inflight += 1;
        Ok(())
    }

    fn io_range(&mut self, slot: SlotId, offset_bytes: usize, len_bytes: usize) -> (*mut u8, u16) {
        let s = &self.slots[slot.0 as usize];
        assert!(!s.busy, "two operations on slot {slot:?}");
        assert!(
            offset_bytes + len_bytes <= s.len_bytes
                && len_bytes > 0
                && len_bytes <= u32::MAX as usize,
            "I/O [{offset_bytes}, +{len_bytes}) outside slot {slot:?} of {} bytes",
            s.len_bytes
        );
        let arena = s.arena;
        // SAFETY: in bounds of the slot (checked above).
        let ptr = unsafe { self.slot_ptr_unchecked(slot).add(offset_bytes) };
        self.slots[slot.0 as usize].busy = true;
        (ptr, arena)
    }

    /// Queues a fixed-buffer operation on the slot's bytes `[offset_bytes, offset_bytes +
    /// len_bytes)`: [`OpKind::Read`] from `fd` into them (a socket receive, or whole userfaultfd
    /// messages; up to `len_bytes`), or [`OpKind::Write`] of them to `fd` (a socket send). The
    /// slot is busy until its completion is reaped. A slot of a shared arena
    /// ([`add_shared_arena`](Self::add_shared_arena)) gets the plain `READ`/`WRITE` opcode.
    pub fn fixed(
        &mut self,
        kind: OpKind,
        fd: RawFd,
        slot: SlotId,
        offset_bytes: usize,
        len_bytes: usize,
        tag: u16,
    ) -> Result<(), RingError> {
        let (ptr, arena) = self.io_range(slot, offset_bytes, len_bytes);
        let user_data = Token { kind, slot, tag }.encode();
        let (fd, len) = (types::Fd(fd), len_bytes as u32);
        // Offset -1: the current position, as read(2)/write(2); sockets ignore it.
        let entry = match kind {
            OpKind::Read if !self.is_registered(arena) => {
                opcode::Read::new(fd, ptr, len).offset(u64::MAX).build()
            }
            OpKind::Write if !self.is_registered(arena) => {
                opcode::Write::new(fd, ptr, len).offset(u64::MAX).build()
            }
            OpKind::Read => opcode::ReadFixed::new(fd, ptr, len, arena)
                .offset(u64::MAX)
                .build(),
            OpKind::Write => opcode::WriteFixed::new(fd, ptr, len, arena)
                .offset(u64::MAX)
                .build(),
            OpKind::Cancel | OpKind::Poll => panic!("{kind:?} is not a fixed-buffer operation"),
        };
        self.push(entry.user_data(user_data))
            .inspect_err(|_| self.slots[slot.0 as usize].busy = false)
    }

    /// Queues a one-shot `POLL_ADD` for `POLLIN` on `fd` (Linux 5.1+). The slot stays busy
    /// until the completion (the revents mask, or a negative errno) is reaped; the caller then
    /// reads from `fd` itself, e.g. under a lock that must cover the read.
    pub fn poll_in(&mut self, fd: RawFd, slot: SlotId, tag: u16) -> Result<(), RingError> {
        let s = &mut self.slots[slot.0 as usize];
        assert!(!s.busy, "two operations on slot {slot:?}");
        s.busy = true;
        let user_data = Token {
            kind: OpKind::Poll,
            slot,
            tag,
        }
        .encode();
        let entry = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .build()
            .user_data(user_data);
        self.push(entry)
            .inspect_err(|_| self.slots[slot.0 as usize].busy = false)
    }

    /// Submits what is queued without waiting.
    pub fn submit(&mut self) -> Result<(), RingError> {
        self.ring.submit().map_err(RingError::Enter)?;
        Ok(())
    }

    /// Operations in flight.
    pub fn inflight(&self) -> usize {
        self.inflight
    }

    /// Submits what is queued and waits for at least `want` completions or `timeout`, then reaps
    /// every available completion in bulk. Returns them (slots are idle again).
    ///
    /// The wait may end early with fewer than `want` completions, possibly none: when
    /// `io_uring_enter` is interrupted by a signal (`EINTR`), reaches the timeout (`ETIME`), or
    /// finds the completion queue backed up (`EBUSY`). None of these is an error; a caller that
    /// needs a particular completion reaps again (until its own deadline).
    pub fn submit_and_reap(
        &mut self,
        want: usize,
        timeout: Option<Duration>,
    ) -> Result<&[Completion], RingError> {
        let result = match timeout {
            Some(t) => {
                let ts = types::Timespec::new()
                    .sec(t.as_secs())
                    .nsec(t.subsec_nanos());
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(want, &args)
            }
            None => self.ring.submit_and_wait(want),
        };
        match result {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                ) => {}
            Err(e) => return Err(RingError::Enter(e)),
        }
        self.reap();
        Ok(&self.reaped)
    }

    fn reap(&mut self) {
        self.reaped.clear();
        let mut cq = self.ring.completion();
        cq.sync();
        for cqe in &mut cq {
            let cqe: cqueue::Entry = cqe;
            let Some(token) = Token::decode(cqe.user_data()) else {
                continue;
            };
            self.inflight = self.inflight.saturating_sub(1);
            if token.slot.0 != NO_SLOT {
                if let Some(s) = self.slots.get_mut(token.slot.0 as usize) {
                    s.busy = false;
                }
            }
            self.reaped.push(Completion {
                token,
                result: cqe.result(),
            });
        }
    }

    /// Cancels every operation in flight and waits (bounded) until all have completed.
    pub fn cancel_all(&mut self) {
        if self.inflight == 0 {
            return;
        }
        let token = Token {
            kind: OpKind::Cancel,
            slot: SlotId(NO_SLOT),
            tag: 0,
        };
        let entry = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(token.encode());
        if self.push(entry).is_err() {
            return;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while self.inflight > 0 && std::time::Instant::now() < deadline {
            if self
                .submit_and_reap(1, Some(Duration::from_millis(100)))
                .is_err()
            {
                break;
            }
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        self.cancel_all();
        if self.inflight > 0 {
            // The kernel still owns buffers: leak the arenas rather than let it write into
            // freed memory. Registered buffers are pinned by the kernel anyway.
            for m in self.arenas.drain(..) {
                std::mem::forget(m);
            }
            for m in self.shared.drain(..) {
                std::mem::forget(m);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    #[test]
    fn token_round_trips() {
        for kind in [OpKind::Read, OpKind::Write, OpKind::Cancel, OpKind::Poll] {
            let t = Token {
                kind,
                slot: SlotId(513),
                tag: 7,
            };
            assert_eq!(Token::decode(t.encode()), Some(t));
        }
        assert_eq!(Token::decode(0), None);
    }

    /// Reaps until the completion of `awaited` arrives and returns every completion reaped until
    /// then (it last); fails naming `awaited` after `timeout`. One call of `submit_and_reap` is
    /// not enough: it returns early, possibly with nothing, on `EINTR` (e.g. a signal to this
    /// process for a sibling test's child), `ETIME` or `EBUSY`.
    fn reap_until(ring: &mut Ring, awaited: Token, timeout: Duration) -> Vec<Completion> {
        let deadline = std::time::Instant::now() + timeout;
        let mut reaped = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            assert!(
                !left.is_zero(),
                "no completion of {awaited:?} within {timeout:?}; reaped meanwhile: {reaped:?}"
            );
            let done = ring.submit_and_reap(1, Some(left)).unwrap();
            reaped.extend_from_slice(done);
            if reaped.iter().any(|c| c.token == awaited) {
                return reaped;
            }
        }
    }

    #[test]
    fn reads_a_socket_into_a_slot_and_writes_back() {
        const WAIT: Duration = Duration::from_secs(5);
        let mut ring = Ring::new(&RingConfig {
            entries: 8,
            arena_bytes: vec![8192],
        })
        .unwrap();
        let a = ring.add_slot(0, 0, 4096);
        let b = ring.add_slot(0, 4096, 4096);
        let (mut left, right) = std::os::unix::net::UnixStream::pair().unwrap();
        // A reply that never comes fails the read below instead of hanging it.
        left.set_read_timeout(Some(WAIT)).unwrap();
        ring.fixed(OpKind::Read, right.as_raw_fd(), a, 10, 100, 3)
            .unwrap();
        assert!(ring.is_busy(a));
        left.write_all(b"hello ring").unwrap();
        let read = Token {
            kind: OpKind::Read,
            slot: a,
            tag: 3,
        };
        let done = reap_until(&mut ring, read, WAIT);
        assert_eq!(done.len(), 1, "only the read was in flight: {done:?}");
        assert_eq!(done[0].result, 10);
        assert_eq!(done[0].token.tag, 3);
        assert_eq!(&ring.slot(a)[10..20], b"hello ring");
        ring.slot_mut(b)[..4].copy_from_slice(b"pong");
        ring.fixed(OpKind::Write, right.as_raw_fd(), b, 0, 4, 9)
            .unwrap();
        let write = Token {
            kind: OpKind::Write,
            slot: b,
            tag: 9,
        };
        let done = reap_until(&mut ring, write, WAIT);
        assert_eq!(done.len(), 1, "only the write was in flight: {done:?}");
        assert_eq!(done[0].result, 4);
        let mut got = [0u8; 4];
        std::io::Read::read_exact(&mut left, &mut got)
            .unwrap_or_else(|e| panic!("reading the ring's reply (\"pong\") from the socket: {e}"));
        assert_eq!(&got, b"pong");
        // A pending read is cancelled and drained on drop without touching freed memory.
        ring.fixed(OpKind::Read, right.as_raw_fd(), a, 0, 16, 0)
            .unwrap();
        ring.submit_and_reap(0, Some(Duration::from_millis(1)))
            .unwrap();
    }

    #[test]
    #[should_panic(expected = "two operations")]
    fn a_busy_slot_cannot_be_reused() {
        let mut ring = Ring::new(&RingConfig {
            entries: 4,
            arena_bytes: vec![4096],
        })
        .unwrap();
        let a = ring.add_slot(0, 0, 4096);
        let (_l, r) = std::os::unix::net::UnixStream::pair().unwrap();
        ring.fixed(OpKind::Read, r.as_raw_fd(), a, 0, 16, 0)
            .unwrap();
        ring.fixed(OpKind::Read, r.as_raw_fd(), a, 0, 16, 0)
            .unwrap();
    }
}
