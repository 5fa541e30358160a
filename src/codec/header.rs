//! [`Header`]: the fixed 32-byte header of every frame, its constructors (one per kind) and
//! its encoding. What a received header must satisfy is in `check.rs`; the `Hello` fields are
//! in `hello.rs`.

use super::{Kind, DISCARD_RANGE_BYTES, HEADER_BYTES, MAGIC, VERSION};

/// A decoded header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Frame kind.
    pub kind: Kind,
    /// Page count (or worker index in `Hello`).
    pub count: u16,
    /// Bytes following the header.
    pub body_len: u32,
    /// Block index (or role in `Hello`).
    pub block: u32,
    /// First page (or session id).
    pub page: u64,
    /// Zero-page mask (or worker count in `Hello`).
    pub mask: u64,
}

impl Header {
    /// A header of `kind` with every field zero; the constructors fill in theirs.
    pub(super) fn bare(kind: Kind) -> Header {
        Header {
            kind,
            count: 0,
            body_len: 0,
            block: 0,
            page: 0,
            mask: 0,
        }
    }

    /// `Have` header for `pages` pages of `block` from `page` (the body is their bits).
    pub fn have(block: u32, page: u64, pages: u64) -> Header {
        Header {
            kind: Kind::Have,
            ..Header::zero_map(block, page, pages)
        }
    }

    /// `Discard` header for `ranges` ranges of `block` (the body is the ranges).
    pub fn discard(block: u32, ranges: u16) -> Header {
        Header {
            count: ranges,
            body_len: (usize::from(ranges) * DISCARD_RANGE_BYTES) as u32,
            block,
            ..Header::bare(Kind::Discard)
        }
    }

    /// `Challenge` or `Auth` header for a body of `body_len` bytes.
    pub fn auth(kind: Kind, body_len: u32) -> Header {
        debug_assert!(matches!(kind, Kind::Challenge | Kind::Auth));
        Header {
            body_len,
            ..Header::bare(kind)
        }
    }

    /// `Round` header: precopy round `round` sent `pages` pages.
    pub fn round(round: u64, pages: u64) -> Header {
        Header {
            page: round,
            mask: pages,
            ..Header::bare(Kind::Round)
        }
    }

    /// `Checksums` header for `pages` pages of `block` from `page`.
    pub fn checksums(block: u32, page: u64, pages: u64) -> Header {
        Header {
            body_len: (pages * 8) as u32,
            block,
            page,
            mask: pages,
            ..Header::bare(Kind::Checksums)
        }
    }

    /// `ZeroMap` header for `pages` pages of `block` from `page` (the body is their bits).
    pub fn zero_map(block: u32, page: u64, pages: u64) -> Header {
        Header {
            body_len: pages.div_ceil(8) as u32,
            block,
            page,
            mask: pages,
            ..Header::bare(Kind::ZeroMap)
        }
    }

    /// `Request` for pages `[page, page + count)` of `block`.
    pub fn request(block: u32, page: u64, count: u16) -> Header {
        Header {
            count,
            block,
            page,
            ..Header::bare(Kind::Request)
        }
    }

    /// `Pages` header for a batch; `body_len` follows from the mask and the page size.
    pub fn pages(block: u32, page: u64, count: u16, zero_mask: u64, page_size: u64) -> Header {
        let nonzero = u64::from(count) - u64::from(zero_mask.count_ones());
        Header::pages_with_body(block, page, count, zero_mask, (nonzero * page_size) as u32)
    }

    /// `Pages` header with the body length given (an owned [`super::Frame`] carries its
    /// payload, not its page size).
    pub(super) fn pages_with_body(
        block: u32,
        page: u64,
        count: u16,
        zero_mask: u64,
        body_len: u32,
    ) -> Header {
        Header {
            count,
            body_len,
            block,
            page,
            mask: zero_mask,
            ..Header::bare(Kind::Pages)
        }
    }

    /// The `Run` that ends a precopy phase: `dirty_pages` were dirty at switchover, the
    /// source's workload stopped at `stopped_unix_us` (wall clock, µs).
    pub fn run(dirty_pages: u64, stopped_unix_us: u64) -> Header {
        Header {
            page: dirty_pages,
            mask: stopped_unix_us,
            ..Header::bare(Kind::Run)
        }
    }

    /// A control frame without a body (`Run`, `End`, `Ack`); `value` rides in `page`.
    pub fn control(kind: Kind, value: u64) -> Header {
        debug_assert!(matches!(
            kind,
            Kind::Run | Kind::End | Kind::Ack | Kind::Credit
        ));
        Header {
            page: value,
            ..Header::bare(kind)
        }
    }

    /// A `Heartbeat`: the sender is still there.
    pub fn heartbeat() -> Header {
        Header::bare(Kind::Heartbeat)
    }

    /// `Welcome` header for `session` and a body of `body_len` bytes; `stopped_unix_us` rides
    /// in `mask`.
    pub(super) fn welcome(session: u64, stopped_unix_us: u64, body_len: u32) -> Header {
        Header {
            body_len,
            page: session,
            mask: stopped_unix_us,
            ..Header::bare(Kind::Welcome)
        }
    }

    /// `Error` header for a message of `body_len` bytes.
    pub(super) fn error(body_len: u32) -> Header {
        Header {
            body_len,
            ..Header::bare(Kind::Error)
        }
    }

    /// Writes the header.
    pub fn encode(&self, out: &mut [u8; HEADER_BYTES]) {
        out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[4] = VERSION;
        out[5] = self.kind as u8;
        out[6..8].copy_from_slice(&self.count.to_le_bytes());
        out[8..12].copy_from_slice(&self.body_len.to_le_bytes());
        out[12..16].copy_from_slice(&self.block.to_le_bytes());
        out[16..24].copy_from_slice(&self.page.to_le_bytes());
        out[24..32].copy_from_slice(&self.mask.to_le_bytes());
    }

    /// Appends the encoded header to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let mut h = [0u8; HEADER_BYTES];
        self.encode(&mut h);
        out.extend_from_slice(&h);
    }
}
