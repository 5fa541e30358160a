//! `uffd_msg` decoding from raw bytes (a message read by anybody: `read(2)` or io_uring).

use linux_raw_sys::general as k;

use super::abi::MSG_BYTES;

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
