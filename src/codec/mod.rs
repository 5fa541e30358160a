//! Wire protocol v1: a pure codec (no I/O), fuzzable.
//!
//! Every frame starts with a fixed 32-byte header (little-endian):
//!
//! | offset | size | field      | meaning                                                    |
//! |-------:|-----:|------------|------------------------------------------------------------|
//! | 0      | 4    | `magic`    | [`MAGIC`]                                                  |
//! | 4      | 1    | `version`  | [`VERSION`]                                                |
//! | 5      | 1    | `kind`     | [`Kind`]                                                   |
//! | 6      | 2    | `count`    | pages in a request or batch; worker index in `Hello`       |
//! | 8      | 4    | `body_len` | bytes that follow the header                               |
//! | 12     | 4    | `block`    | block index; the role in `Hello`                           |
//! | 16     | 8    | `page`     | first page; the session id in `Hello`/`Welcome`            |
//! | 24     | 8    | `mask`     | zero-page mask in `Pages` (bit i: page i is zero, no payload); worker count and flags in `Hello`; pages covered in `ZeroMap` |
//!
//! A `Pages` frame's body is the payloads of its non-zero pages, in page order, each exactly one
//! page: a receiver reads the header, then the body straight into page-aligned temp pages, and
//! places contiguous runs with one `UFFDIO_COPY`. Zero pages travel as mask bits only.
//!
//! Decoding is two-step so nothing is copied before it is checked: [`Header::decode`] checks
//! what the header alone can tell (magic, version, kind, lengths), then [`Header::check`]
//! checks it against the session's [`Layout`] (block, page range, exact payload length).

use crate::layout::{Block, Layout, LayoutError, MAX_BLOCKS, MAX_NAME_BYTES};

/// Frame magic: the bytes `PCPY` read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"PCPY");
/// Protocol version.
pub const VERSION: u8 = 1;
/// Header size.
pub const HEADER_BYTES: usize = 32;
/// Most pages in one `Pages` frame (the zero mask is 64 bits).
pub const MAX_BATCH_PAGES: u16 = 64;
/// Most payload bytes in one `Pages` frame for small pages (64 x 4 KiB); a huge page is always
/// allowed alone.
pub const MAX_BATCH_BYTES: u64 = 64 * 4096;
/// Most pages one `Request` may ask for.
pub const MAX_REQUEST_PAGES: u16 = 1024;
/// Largest control body (`Welcome`, `Error`).
pub const MAX_CONTROL_BODY: u32 = 256 * 1024;
/// Longest error message carried in an `Error` frame.
pub const MAX_ERROR_BYTES: usize = 4096;
/// `Hello` flag, in `mask` above the worker count: after `Welcome`, send the zero-page map.
pub const HELLO_ZERO_MAP: u64 = 1 << 32;
/// Largest `ZeroMap` body: the bits of 512 Ki pages (2 GiB of 4 KiB pages).
pub const MAX_ZERO_MAP_BYTES: u32 = 64 * 1024;
/// `Hello` flag: the destination's memory is not registered yet and takes a precopy phase
/// (`Round`, `Pages`, `Discard` frames, ended by `Run`) after `Welcome`.
pub const HELLO_PRECOPY: u64 = 1 << 33;
/// `Hello` flag: this connection rejoins its session after a break (recovery); a bulk
/// connection then sends `Have` frames and `Run` before the stream restarts.
pub const HELLO_RESUME: u64 = 1 << 34;
/// Most ranges in one `Discard` frame. QEMU sends 12 per command; ours is a 4 KiB body (256
/// ranges of 16 bytes): few frames for a scattered dirty set, and a bounded read per frame.
pub const MAX_DISCARD_RANGES: u16 = 256;
/// Bytes per discard range on the wire: first page and page count, u64 each.
pub const DISCARD_RANGE_BYTES: usize = 16;
/// Most page checksums in one `Checksums` frame (64 KiB of body).
pub const MAX_CHECKSUMS: u64 = 8192;

/// Frame kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// destination → source, first frame of every connection.
    Hello = 1,
    /// source → destination: session id, layout, image description.
    Welcome = 2,
    /// destination → source: send these pages now (urgent).
    Request = 3,
    /// source → destination: a batch of pages.
    Pages = 4,
    /// either way: start (streaming / running).
    Run = 5,
    /// source → destination on a bulk connection: the stream is complete. destination → source
    /// on the urgent connection: every page is placed, the session is over.
    End = 6,
    /// acknowledgement of `End`.
    Ack = 7,
    /// either way: a fatal error with a message; the session ends.
    Error = 8,
    /// source → destination, after `Welcome` when asked: which pages of a block are zero
    /// (`mask` = pages covered, body = one bit per page, LSB first), ended by `Run`.
    ZeroMap = 9,
    /// source → destination in the precopy phase: the pages of a block dirtied after precopy
    /// sent them (`count` ranges of (first page, pages), 16 bytes each); the destination drops
    /// them and fetches them again in postcopy.
    Discard = 10,
    /// source → destination in the precopy phase: round `page` sent `mask` pages.
    Round = 11,
    /// source → destination on a verify connection: xxh3 checksums of `mask` pages of `block`
    /// from `page`, 8 bytes each (the content at switchover).
    Checksums = 12,
    /// source → destination, first frame of an authenticated connection: a 32-byte nonce.
    Challenge = 13,
    /// The answers to a `Challenge`: destination → source `nonce_d ‖ proof` (64 bytes), source
    /// → destination `proof` (32 bytes). See [`crate::link::auth`].
    Auth = 14,
    /// destination → source on a resumed bulk connection: which pages of the worker's shard it
    /// has (`mask` = pages covered, body = one bit per page), ended by `Run`; the source
    /// streams the others again.
    Have = 15,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Welcome,
            3 => Kind::Request,
            4 => Kind::Pages,
            5 => Kind::Run,
            6 => Kind::End,
            7 => Kind::Ack,
            8 => Kind::Error,
            9 => Kind::ZeroMap,
            10 => Kind::Discard,
            11 => Kind::Round,
            12 => Kind::Checksums,
            13 => Kind::Challenge,
            14 => Kind::Auth,
            15 => Kind::Have,
            _ => return None,
        })
    }
}

/// The role of a connection, sent in `Hello`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Urgent: requests and their replies; the first urgent connection also carries control.
    Urgent,
    /// Bulk: the background stream of one worker's shard.
    Bulk,
    /// Verify: after `Run` from the destination, the source sends the checksums of every page
    /// as they were at switchover (end-to-end verification of a migration).
    Verify,
}

/// What the source's image is, so a verifier can recompute expected contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageInfo {
    /// Contents known only to the source (a file).
    Opaque,
    /// The synthetic image of [`crate::image::Synthetic`].
    Synthetic {
        /// Seed.
        seed: u64,
        /// Share of zero pages, percent.
        zero_percent: u8,
    },
}

/// Codec errors: what was wrong with a frame, in words an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// Not our protocol at all.
    #[error("bad frame magic {0:#010x}: the peer is not a postcopy page server (wrong port?)")]
    BadMagic(u32),
    /// A version we do not speak.
    #[error("protocol version {got} not supported (this build speaks {VERSION}); upgrade the older side")]
    BadVersion {
        /// Version the peer sent.
        got: u8,
    },
    /// An unknown kind.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A kind that was not expected here.
    #[error("unexpected {got:?} frame while expecting {expected}")]
    Unexpected {
        /// What arrived.
        got: Kind,
        /// What the state machine wanted.
        expected: &'static str,
    },
    /// A body on a frame that has none, or one too large.
    #[error("{kind:?} frame has a body of {len} bytes (allowed: {max})")]
    BodyLength {
        /// Frame kind.
        kind: Kind,
        /// Declared length.
        len: u32,
        /// The maximum for this kind.
        max: u64,
    },
    /// A page count of zero or above the limit.
    #[error("{kind:?} frame has page count {count} (allowed 1..={max})")]
    BadCount {
        /// Frame kind.
        kind: Kind,
        /// Declared count.
        count: u16,
        /// The maximum.
        max: u16,
    },
    /// Mask bits beyond the batch's pages.
    #[error("zero-page mask {mask:#x} marks pages beyond the batch of {count}")]
    MaskPastCount {
        /// The mask.
        mask: u64,
        /// Pages in the batch.
        count: u16,
    },
    /// A range outside the layout.
    #[error(transparent)]
    Range(#[from] LayoutError),
    /// A body that is not what it claims.
    #[error("malformed {kind:?} body: {detail}")]
    BadBody {
        /// Frame kind.
        kind: Kind,
        /// What was wrong.
        detail: String,
    },
    /// Fewer bytes than the frame needs.
    #[error("truncated frame: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        have: usize,
    },
}

/// A `Hello`, field by field (its header carries the session id in `page`, the role in
/// `block`, the worker index in `count`, the worker count and the flags in `mask`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The session to join; 0 starts a new one.
    pub session: u64,
    /// What the connection carries.
    pub role: Role,
    /// The destination worker it belongs to.
    pub worker: u16,
    /// The destination's worker count.
    pub workers: u16,
    /// Send the zero-page map after `Welcome`.
    pub zero_map: bool,
    /// Precopy first.
    pub precopy: bool,
    /// Rejoining the session after a break.
    pub resume: bool,
}

impl Hello {
    /// The fields of a decoded `Hello` header (`decode` checked its role and worker count).
    pub fn of(h: &Header) -> Option<Hello> {
        if h.kind != Kind::Hello {
            return None;
        }
        Some(Hello {
            session: h.page,
            role: h.role()?,
            worker: h.count,
            workers: h.workers() as u16,
            zero_map: h.wants_zero_map(),
            precopy: h.wants_precopy(),
            resume: h.wants_resume(),
        })
    }
}

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

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Largest batch for pages of `page_size` bytes.
pub fn max_batch_pages(page_size: u64) -> u16 {
    (MAX_BATCH_BYTES / page_size).clamp(1, u64::from(MAX_BATCH_PAGES)) as u16
}

impl Header {
    fn bare(kind: Kind) -> Header {
        Header {
            kind,
            count: 0,
            body_len: 0,
            block: 0,
            page: 0,
            mask: 0,
        }
    }

    /// `Hello` for a connection of `role`, from worker `worker` of `workers`, joining
    /// `session` (0 asks the source for a new session).
    pub fn hello(session: u64, role: Role, worker: u16, workers: u16) -> Header {
        Header {
            count: worker,
            block: match role {
                Role::Urgent => 0,
                Role::Bulk => 1,
                Role::Verify => 2,
            },
            page: session,
            mask: u64::from(workers),
            ..Header::bare(Kind::Hello)
        }
    }

    /// Asks (in a `Hello`) for the zero-page map after `Welcome`.
    pub fn with_zero_map(mut self) -> Header {
        debug_assert_eq!(self.kind, Kind::Hello);
        self.mask |= HELLO_ZERO_MAP;
        self
    }

    /// Offers (in a `Hello`) a precopy phase after `Welcome`.
    pub fn with_precopy(mut self) -> Header {
        debug_assert_eq!(self.kind, Kind::Hello);
        self.mask |= HELLO_PRECOPY;
        self
    }

    /// Marks (in a `Hello`) a connection that rejoins its session after a break.
    pub fn with_resume(mut self) -> Header {
        debug_assert_eq!(self.kind, Kind::Hello);
        self.mask |= HELLO_RESUME;
        self
    }

    /// Whether a `Hello` rejoins after a break.
    pub fn wants_resume(&self) -> bool {
        self.mask & HELLO_RESUME != 0
    }

    /// `Have` header for `pages` pages of `block` from `page` (the body is their bits).
    pub fn have(block: u32, page: u64, pages: u64) -> Header {
        Header {
            kind: Kind::Have,
            ..Header::zero_map(block, page, pages)
        }
    }

    /// Whether a `Hello` offers a precopy phase.
    pub fn wants_precopy(&self) -> bool {
        self.mask & HELLO_PRECOPY != 0
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

    /// The worker count of a `Hello`.
    pub fn workers(&self) -> u64 {
        self.mask & 0xffff_ffff
    }

    /// Whether a `Hello` asks for the zero-page map.
    pub fn wants_zero_map(&self) -> bool {
        self.mask & HELLO_ZERO_MAP != 0
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

    /// Checks a `ZeroMap` or `Checksums` header against the layout: the pages it covers exist.
    pub fn check_zero_map(&self, layout: &Layout) -> Result<(), CodecError> {
        layout.check_range(self.block, self.page, self.mask)?;
        Ok(())
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
        Header {
            count,
            body_len: (nonzero * page_size) as u32,
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
        debug_assert!(matches!(kind, Kind::Run | Kind::End | Kind::Ack));
        Header {
            page: value,
            ..Header::bare(kind)
        }
    }

    /// The role of a `Hello`.
    pub fn role(&self) -> Option<Role> {
        match self.block {
            0 => Some(Role::Urgent),
            1 => Some(Role::Bulk),
            2 => Some(Role::Verify),
            _ => None,
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

    /// Decodes and checks what the header alone can tell.
    pub fn decode(b: &[u8; HEADER_BYTES]) -> Result<Header, CodecError> {
        let magic = le32(b, 0);
        if magic != MAGIC {
            return Err(CodecError::BadMagic(magic));
        }
        if b[4] != VERSION {
            return Err(CodecError::BadVersion { got: b[4] });
        }
        let kind = Kind::from_u8(b[5]).ok_or(CodecError::UnknownKind(b[5]))?;
        let h = Header {
            kind,
            count: u16::from_le_bytes([b[6], b[7]]),
            body_len: le32(b, 8),
            block: le32(b, 12),
            page: le64(b, 16),
            mask: le64(b, 24),
        };
        let body_max: u64 = match kind {
            Kind::Hello | Kind::Request | Kind::Run | Kind::End | Kind::Ack | Kind::Round => 0,
            Kind::Discard => (usize::from(MAX_DISCARD_RANGES) * DISCARD_RANGE_BYTES) as u64,
            Kind::Checksums => MAX_CHECKSUMS * 8,
            Kind::Challenge => 32,
            Kind::Auth => 64,
            Kind::Welcome => u64::from(MAX_CONTROL_BODY),
            Kind::Error => MAX_ERROR_BYTES as u64,
            Kind::ZeroMap | Kind::Have => u64::from(MAX_ZERO_MAP_BYTES),
            // Checked exactly against the page size in `check`.
            Kind::Pages => (1 << 30) + 1,
        };
        if u64::from(h.body_len) > body_max {
            return Err(CodecError::BodyLength {
                kind,
                len: h.body_len,
                max: body_max,
            });
        }
        match kind {
            Kind::Request if h.count == 0 || h.count > MAX_REQUEST_PAGES => {
                return Err(CodecError::BadCount {
                    kind,
                    count: h.count,
                    max: MAX_REQUEST_PAGES,
                })
            }
            Kind::Pages => {
                if h.count == 0 || h.count > MAX_BATCH_PAGES {
                    return Err(CodecError::BadCount {
                        kind,
                        count: h.count,
                        max: MAX_BATCH_PAGES,
                    });
                }
                if h.count < 64 && h.mask >> h.count != 0 {
                    return Err(CodecError::MaskPastCount {
                        mask: h.mask,
                        count: h.count,
                    });
                }
            }
            Kind::Hello
                if h.role().is_none()
                    || h.workers() == 0
                    || h.workers() > 1024
                    || u64::from(h.count) >= h.workers()
                    || h.mask >> 35 != 0 =>
            {
                return Err(CodecError::BadBody {
                    kind,
                    detail: format!(
                        "role {} worker {} of {} workers, flags {:#x}",
                        h.block,
                        h.count,
                        h.workers(),
                        h.mask >> 32
                    ),
                })
            }
            Kind::ZeroMap | Kind::Have
                if h.mask == 0 || u64::from(h.body_len) != h.mask.div_ceil(8) =>
            {
                return Err(CodecError::BodyLength {
                    kind,
                    len: h.body_len,
                    max: h.mask.div_ceil(8),
                })
            }
            Kind::Discard
                if h.count == 0
                    || h.count > MAX_DISCARD_RANGES
                    || h.body_len as usize != usize::from(h.count) * DISCARD_RANGE_BYTES =>
            {
                return Err(CodecError::BadCount {
                    kind,
                    count: h.count,
                    max: MAX_DISCARD_RANGES,
                })
            }
            Kind::Challenge | Kind::Auth if h.body_len != 32 && h.body_len != 64 => {
                return Err(CodecError::BodyLength {
                    kind,
                    len: h.body_len,
                    max: 64,
                })
            }
            Kind::Checksums
                if h.mask == 0 || h.mask > MAX_CHECKSUMS || u64::from(h.body_len) != h.mask * 8 =>
            {
                return Err(CodecError::BodyLength {
                    kind,
                    len: h.body_len,
                    max: h.mask.min(MAX_CHECKSUMS) * 8,
                })
            }
            _ => {}
        }
        Ok(h)
    }

    /// Checks a `Request` or `Pages` header against the layout: the block exists, the page
    /// range lies inside it, the batch is not larger than allowed for its page size, and the
    /// body is exactly one page per non-zero page. Returns the block.
    pub fn check<'l>(&self, layout: &'l Layout) -> Result<&'l Block, CodecError> {
        let block = layout.check_range(self.block, self.page, u64::from(self.count))?;
        if self.kind == Kind::Pages {
            let max = max_batch_pages(block.page_size);
            if self.count > max {
                return Err(CodecError::BadCount {
                    kind: self.kind,
                    count: self.count,
                    max,
                });
            }
            let nonzero = u64::from(self.count) - u64::from(self.mask.count_ones());
            let expect = nonzero * block.page_size;
            if u64::from(self.body_len) != expect {
                return Err(CodecError::BodyLength {
                    kind: self.kind,
                    len: self.body_len,
                    max: expect,
                });
            }
        }
        Ok(block)
    }
}

/// The `Welcome` body: the session's layout and what the image is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Welcome {
    /// Session id the destination uses on its other connections.
    pub session: u64,
    /// The memory layout.
    pub layout: Layout,
    /// What the image is.
    pub image: ImageInfo,
    /// When a live source's workload stopped (wall clock, µs since the epoch), if it stopped
    /// before this `Welcome` (pure postcopy); 0 otherwise. Carried in the header's `mask`.
    pub stopped_unix_us: u64,
}

impl Welcome {
    /// Encodes header and body into `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let mut body = Vec::new();
        body.extend_from_slice(&(self.layout.blocks.len() as u32).to_le_bytes());
        for b in &self.layout.blocks {
            body.push(b.name.len() as u8);
            body.extend_from_slice(b.name.as_bytes());
            body.extend_from_slice(&b.size_bytes.to_le_bytes());
            body.extend_from_slice(&b.page_size.to_le_bytes());
        }
        match self.image {
            ImageInfo::Opaque => body.push(0),
            ImageInfo::Synthetic { seed, zero_percent } => {
                body.push(1);
                body.extend_from_slice(&seed.to_le_bytes());
                body.push(zero_percent);
            }
        }
        Header {
            body_len: body.len() as u32,
            page: self.session,
            mask: self.stopped_unix_us,
            ..Header::bare(Kind::Welcome)
        }
        .encode_into(out);
        out.extend_from_slice(&body);
    }

    /// Decodes a `Welcome` body (header already decoded) and validates the layout.
    pub fn decode_body(h: &Header, body: &[u8]) -> Result<Welcome, CodecError> {
        let bad = |detail: String| CodecError::BadBody {
            kind: Kind::Welcome,
            detail,
        };
        let mut r = Reader { b: body, at: 0 };
        let n = r.u32().ok_or_else(|| bad("no block count".into()))? as usize;
        if n == 0 || n > MAX_BLOCKS {
            return Err(bad(format!("{n} blocks")));
        }
        let mut blocks = Vec::with_capacity(n);
        for i in 0..n {
            let len = r.u8().ok_or_else(|| bad(format!("block {i}: no name")))? as usize;
            debug_assert!(len <= MAX_NAME_BYTES);
            let name = r
                .bytes(len)
                .and_then(|b| std::str::from_utf8(b).ok())
                .ok_or_else(|| bad(format!("block {i}: name is not UTF-8 or truncated")))?
                .to_string();
            let size_bytes = r.u64().ok_or_else(|| bad(format!("block {i}: no size")))?;
            let page_size = r
                .u64()
                .ok_or_else(|| bad(format!("block {i}: no page size")))?;
            blocks.push(Block {
                name,
                size_bytes,
                page_size,
            });
        }
        let image = match r.u8() {
            Some(0) => ImageInfo::Opaque,
            Some(1) => {
                let seed = r
                    .u64()
                    .ok_or_else(|| bad("synthetic image without seed".into()))?;
                let zero_percent = r
                    .u8()
                    .filter(|z| *z <= 100)
                    .ok_or_else(|| bad("synthetic image with bad zero percent".into()))?;
                ImageInfo::Synthetic { seed, zero_percent }
            }
            other => return Err(bad(format!("image kind {other:?}"))),
        };
        if r.at != body.len() {
            return Err(bad(format!("{} trailing bytes", body.len() - r.at)));
        }
        let layout = Layout { blocks };
        layout.validate()?;
        Ok(Welcome {
            session: h.page,
            layout,
            image,
            stopped_unix_us: h.mask,
        })
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        self.bytes(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.bytes(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4")))
    }
    fn u64(&mut self) -> Option<u64> {
        self.bytes(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8")))
    }
}

/// Appends the page-bit body of `ZeroMap` and `Have` frames for `pages` pages: bit `i` (byte
/// `i / 8`, bit `i % 8`) is page `first + i` of the header, set when `is_set(i)`.
pub fn encode_page_bits(pages: u64, mut is_set: impl FnMut(u64) -> bool, out: &mut Vec<u8>) {
    let at = out.len();
    out.resize(at + pages.div_ceil(8) as usize, 0);
    for i in 0..pages {
        if is_set(i) {
            out[at + (i / 8) as usize] |= 1 << (i % 8);
        }
    }
}

/// Bit `i` of a page-bit body ([`encode_page_bits`]); the body's length was checked against
/// the header's page count.
pub fn page_bit(body: &[u8], i: u64) -> bool {
    body[(i / 8) as usize] >> (i % 8) & 1 == 1
}

/// Appends an `Error` frame with `message` (truncated to [`MAX_ERROR_BYTES`] on a char
/// boundary).
pub fn encode_error(message: &str, out: &mut Vec<u8>) {
    let mut end = message.len().min(MAX_ERROR_BYTES);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    Header {
        body_len: end as u32,
        ..Header::bare(Kind::Error)
    }
    .encode_into(out);
    out.extend_from_slice(&message.as_bytes()[..end]);
}

/// Decodes an `Error` body (lossy: a hostile peer's bytes are shown, never trusted).
pub fn decode_error(body: &[u8]) -> String {
    String::from_utf8_lossy(body).into_owned()
}

/// Appends a `Pages` frame: header, then the non-zero pages of `pages` (one slice per page,
/// `None` = zero page).
pub fn encode_pages<'p>(
    block: u32,
    first_page: u64,
    page_size: u64,
    pages: impl ExactSizeIterator<Item = Option<&'p [u8]>> + Clone,
    out: &mut Vec<u8>,
) {
    let count = pages.len();
    assert!(count >= 1 && count <= usize::from(MAX_BATCH_PAGES));
    let mut mask = 0u64;
    for (i, p) in pages.clone().enumerate() {
        if p.is_none() {
            mask |= 1 << i;
        }
    }
    Header::pages(block, first_page, count as u16, mask, page_size).encode_into(out);
    for p in pages.flatten() {
        assert_eq!(p.len() as u64, page_size, "a payload is exactly one page");
        out.extend_from_slice(p);
    }
}

/// Decodes a `Discard` body (its header already decoded, so the body is `count` ranges) and
/// calls `each(first, pages)` per range. With a layout, every range must be non-empty and
/// inside the block: a discard never reaches outside a block.
pub fn decode_discard(
    h: &Header,
    body: &[u8],
    layout: Option<&Layout>,
    mut each: impl FnMut(u64, u64),
) -> Result<(), CodecError> {
    debug_assert_eq!(h.kind, Kind::Discard);
    if body.len() != usize::from(h.count) * DISCARD_RANGE_BYTES {
        return Err(CodecError::BodyLength {
            kind: Kind::Discard,
            len: body.len() as u32,
            max: (usize::from(h.count) * DISCARD_RANGE_BYTES) as u64,
        });
    }
    for r in body.chunks_exact(DISCARD_RANGE_BYTES) {
        let (first, pages) = (le64(r, 0), le64(r, 8));
        if let Some(l) = layout {
            if pages == 0 {
                return Err(CodecError::BadBody {
                    kind: Kind::Discard,
                    detail: format!("empty range at page {first}"),
                });
            }
            l.check_range(h.block, first, pages)?;
        }
        each(first, pages);
    }
    Ok(())
}

/// The source side of discards for one block (the seed's `discard_send_init/range/finish`):
/// collects ranges, merges a range that starts where the previous one ended, and appends a
/// `Discard` frame to the output whenever [`MAX_DISCARD_RANGES`] ranges are pending and at
/// [`DiscardSender::finish`]. Allocates nothing after `init`.
#[derive(Debug)]
pub struct DiscardSender {
    block: u32,
    ranges: Vec<(u64, u64)>,
    frames: u64,
    pages: u64,
}

impl DiscardSender {
    /// Starts the discards of `block`.
    pub fn init(block: u32) -> DiscardSender {
        DiscardSender {
            block,
            ranges: Vec::with_capacity(usize::from(MAX_DISCARD_RANGES)),
            frames: 0,
            pages: 0,
        }
    }

    /// Adds pages `[first, first + pages)`; may append a full frame to `out`.
    pub fn range(&mut self, first: u64, pages: u64, out: &mut Vec<u8>) {
        if pages == 0 {
            return;
        }
        self.pages += pages;
        if let Some(last) = self.ranges.last_mut() {
            if last.0 + last.1 == first {
                last.1 += pages;
                return;
            }
        }
        if self.ranges.len() == usize::from(MAX_DISCARD_RANGES) {
            self.flush(out);
        }
        self.ranges.push((first, pages));
    }

    fn flush(&mut self, out: &mut Vec<u8>) {
        if self.ranges.is_empty() {
            return;
        }
        Header::discard(self.block, self.ranges.len() as u16).encode_into(out);
        for &(first, pages) in &self.ranges {
            out.extend_from_slice(&first.to_le_bytes());
            out.extend_from_slice(&pages.to_le_bytes());
        }
        self.ranges.clear();
        self.frames += 1;
    }

    /// Appends what is pending; returns (frames written, pages discarded) for this block.
    pub fn finish(mut self, out: &mut Vec<u8>) -> (u64, u64) {
        self.flush(out);
        (self.frames, self.pages)
    }
}

/// A whole frame, owned: for control paths, tests and fuzzing (the data path uses [`Header`]
/// and receives bodies in place).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// See [`Header::hello`].
    Hello {
        /// Session to join (0: new).
        session: u64,
        /// Connection role.
        role: Role,
        /// Worker index.
        worker: u16,
        /// Worker count.
        workers: u16,
    },
    /// See [`Welcome`].
    Welcome(Welcome),
    /// Pages wanted now.
    Request {
        /// Block.
        block: u32,
        /// First page.
        page: u64,
        /// Count.
        count: u16,
    },
    /// A batch of pages.
    Pages {
        /// Block.
        block: u32,
        /// First page.
        page: u64,
        /// Count.
        count: u16,
        /// Zero mask.
        zero_mask: u64,
        /// Payloads of the non-zero pages.
        payload: Vec<u8>,
    },
    /// Run / start.
    Run(u64),
    /// End.
    End(u64),
    /// Ack.
    Ack(u64),
    /// Error with a message.
    Error(String),
    /// Zero-page bits of `pages` pages of `block` from `page`.
    ZeroMap {
        /// Block.
        block: u32,
        /// First page.
        page: u64,
        /// Pages covered.
        pages: u64,
        /// One bit per page, LSB first.
        bits: Vec<u8>,
    },
    /// Ranges (first page, pages) of `block` to drop.
    Discard {
        /// Block.
        block: u32,
        /// The ranges.
        ranges: Vec<(u64, u64)>,
    },
    /// Precopy round `round` sent `pages` pages.
    Round {
        /// Round number (1: the full pass).
        round: u64,
        /// Pages sent in it.
        pages: u64,
    },
    /// Pages of `block` from `page` the destination has (resume).
    Have {
        /// Block.
        block: u32,
        /// First page.
        page: u64,
        /// Pages covered.
        pages: u64,
        /// One bit per page, LSB first.
        bits: Vec<u8>,
    },
    /// An authentication challenge (a nonce).
    Challenge(Vec<u8>),
    /// An authentication answer.
    Auth(Vec<u8>),
    /// Checksums of `sums.len()` pages of `block` from `page`.
    Checksums {
        /// Block.
        block: u32,
        /// First page.
        page: u64,
        /// One xxh3 per page.
        sums: Vec<u64>,
    },
}

impl Frame {
    /// Encodes the frame. `page_size` is used for `Pages` (the payload must match it).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            Frame::Hello {
                session,
                role,
                worker,
                workers,
            } => Header::hello(*session, *role, *worker, *workers).encode_into(out),
            Frame::Welcome(w) => w.encode_into(out),
            Frame::Request { block, page, count } => {
                Header::request(*block, *page, *count).encode_into(out)
            }
            Frame::Pages {
                block,
                page,
                count,
                zero_mask,
                payload,
            } => {
                Header {
                    count: *count,
                    body_len: payload.len() as u32,
                    block: *block,
                    page: *page,
                    mask: *zero_mask,
                    ..Header::bare(Kind::Pages)
                }
                .encode_into(out);
                out.extend_from_slice(payload);
            }
            Frame::Run(v) => Header::control(Kind::Run, *v).encode_into(out),
            Frame::End(v) => Header::control(Kind::End, *v).encode_into(out),
            Frame::Ack(v) => Header::control(Kind::Ack, *v).encode_into(out),
            Frame::Error(m) => encode_error(m, out),
            Frame::ZeroMap {
                block,
                page,
                pages,
                bits,
            } => {
                Header::zero_map(*block, *page, *pages).encode_into(out);
                out.extend_from_slice(bits);
            }
            Frame::Discard { block, ranges } => {
                Header::discard(*block, ranges.len() as u16).encode_into(out);
                for &(first, pages) in ranges {
                    out.extend_from_slice(&first.to_le_bytes());
                    out.extend_from_slice(&pages.to_le_bytes());
                }
            }
            Frame::Round { round, pages } => Header::round(*round, *pages).encode_into(out),
            Frame::Have {
                block,
                page,
                pages,
                bits,
            } => {
                Header::have(*block, *page, *pages).encode_into(out);
                out.extend_from_slice(bits);
            }
            Frame::Challenge(b) | Frame::Auth(b) => {
                let kind = if matches!(self, Frame::Challenge(_)) {
                    Kind::Challenge
                } else {
                    Kind::Auth
                };
                Header::auth(kind, b.len() as u32).encode_into(out);
                out.extend_from_slice(b);
            }
            Frame::Checksums { block, page, sums } => {
                Header::checksums(*block, *page, sums.len() as u64).encode_into(out);
                for s in sums {
                    out.extend_from_slice(&s.to_le_bytes());
                }
            }
        }
    }

    /// Decodes one frame from the front of `bytes`; `layout` (when known) checks requests and
    /// page batches. Returns the frame and the bytes it used.
    pub fn decode(bytes: &[u8], layout: Option<&Layout>) -> Result<(Frame, usize), CodecError> {
        let head: &[u8; HEADER_BYTES] = bytes
            .get(..HEADER_BYTES)
            .and_then(|h| h.try_into().ok())
            .ok_or(CodecError::Truncated {
            need: HEADER_BYTES,
            have: bytes.len(),
        })?;
        let h = Header::decode(head)?;
        match (layout, h.kind) {
            (Some(l), Kind::Request | Kind::Pages) => {
                h.check(l)?;
            }
            (Some(l), Kind::ZeroMap | Kind::Have) => h.check_zero_map(l)?,
            (Some(l), Kind::Checksums) => h.check_zero_map(l)?,
            _ => {}
        }
        let total = HEADER_BYTES + h.body_len as usize;
        let body = bytes
            .get(HEADER_BYTES..total)
            .ok_or(CodecError::Truncated {
                need: total,
                have: bytes.len(),
            })?;
        let frame = match h.kind {
            Kind::Hello => Frame::Hello {
                session: h.page,
                role: h.role().expect("checked in decode"),
                worker: h.count,
                workers: h.workers() as u16,
            },
            Kind::Welcome => Frame::Welcome(Welcome::decode_body(&h, body)?),
            Kind::Request => Frame::Request {
                block: h.block,
                page: h.page,
                count: h.count,
            },
            Kind::Pages => Frame::Pages {
                block: h.block,
                page: h.page,
                count: h.count,
                zero_mask: h.mask,
                payload: body.to_vec(),
            },
            Kind::Run => Frame::Run(h.page),
            Kind::End => Frame::End(h.page),
            Kind::Ack => Frame::Ack(h.page),
            Kind::Error => Frame::Error(decode_error(body)),
            Kind::Have => Frame::Have {
                block: h.block,
                page: h.page,
                pages: h.mask,
                bits: body.to_vec(),
            },
            Kind::ZeroMap => Frame::ZeroMap {
                block: h.block,
                page: h.page,
                pages: h.mask,
                bits: body.to_vec(),
            },
            Kind::Discard => {
                let mut ranges = Vec::with_capacity(usize::from(h.count));
                decode_discard(&h, body, layout, |first, pages| ranges.push((first, pages)))?;
                Frame::Discard {
                    block: h.block,
                    ranges,
                }
            }
            Kind::Challenge => Frame::Challenge(body.to_vec()),
            Kind::Auth => Frame::Auth(body.to_vec()),
            Kind::Round => Frame::Round {
                round: h.page,
                pages: h.mask,
            },
            Kind::Checksums => Frame::Checksums {
                block: h.block,
                page: h.page,
                sums: body
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect(),
            },
        };
        Ok((frame, total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn layout() -> Layout {
        Layout {
            blocks: vec![
                Block {
                    name: "pc.ram".into(),
                    size_bytes: 1 << 20,
                    page_size: 4096,
                },
                Block {
                    name: "huge".into(),
                    size_bytes: 8 << 20,
                    page_size: 2 << 20,
                },
            ],
        }
    }

    fn frame_strategy() -> impl Strategy<Value = Frame> {
        let pages = (0u64..256, 1u16..=64, any::<u64>(), any::<u8>()).prop_map(
            |(page, count, mask, fill)| {
                let count = count.min((256 - page) as u16).max(1);
                let mask = if count == 64 {
                    mask
                } else {
                    mask & ((1u64 << count) - 1)
                };
                let nonzero = u64::from(count) - u64::from(mask.count_ones());
                Frame::Pages {
                    block: 0,
                    page,
                    count,
                    zero_mask: mask,
                    payload: vec![fill; (nonzero * 4096) as usize],
                }
            },
        );
        prop_oneof![
            (any::<u64>(), any::<bool>(), 1u16..1024).prop_flat_map(|(s, bulk, workers)| {
                (0..workers).prop_map(move |w| Frame::Hello {
                    session: s,
                    role: if bulk { Role::Bulk } else { Role::Urgent },
                    worker: w,
                    workers,
                })
            }),
            (any::<u64>(), any::<u64>(), 0u8..=100, any::<bool>()).prop_map(
                |(s, seed, z, synth)| {
                    Frame::Welcome(Welcome {
                        session: s,
                        stopped_unix_us: seed >> 3,
                        layout: layout(),
                        image: if synth {
                            ImageInfo::Synthetic {
                                seed,
                                zero_percent: z,
                            }
                        } else {
                            ImageInfo::Opaque
                        },
                    })
                }
            ),
            (0u64..256, 1u16..=1024).prop_map(|(page, count)| Frame::Request {
                block: 0,
                page: page.min(256 - u64::from(count.min(256))),
                count: count.min(256),
            }),
            pages,
            any::<u64>().prop_map(Frame::Run),
            any::<u64>().prop_map(Frame::End),
            any::<u64>().prop_map(Frame::Ack),
            "[a-zA-Z0-9 é✓]{0,200}".prop_map(Frame::Error),
            (0u64..256, 1u64..=256).prop_flat_map(|(page, pages)| {
                let pages = pages.min(256 - page).max(1);
                let page = page.min(256 - pages);
                proptest::collection::vec(any::<u8>(), pages.div_ceil(8) as usize).prop_map(
                    move |bits| Frame::ZeroMap {
                        block: 0,
                        page,
                        pages,
                        bits,
                    },
                )
            }),
            proptest::collection::vec((0u64..255, 1u64..=16), 1..=256).prop_map(|rs| {
                Frame::Discard {
                    block: 0,
                    ranges: rs.into_iter().map(|(f, n)| (f, n.min(256 - f))).collect(),
                }
            }),
            (any::<u64>(), any::<u64>()).prop_map(|(round, pages)| Frame::Round { round, pages }),
            proptest::collection::vec(any::<u8>(), 32).prop_map(Frame::Challenge),
            proptest::collection::vec(any::<u8>(), 64).prop_map(Frame::Auth),
            (0u64..256, proptest::collection::vec(any::<u64>(), 1..=64)).prop_map(
                |(page, sums)| {
                    let page = page.min(256 - sums.len() as u64);
                    Frame::Checksums {
                        block: 0,
                        page,
                        sums,
                    }
                }
            ),
        ]
    }

    /// A random set of pages of a 4096-page block as a sorted list of (first, pages) runs.
    fn runs_of(pages: &std::collections::BTreeSet<u64>) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &p in pages {
            match runs.last_mut() {
                Some(last) if last.0 + last.1 == p => last.1 += 1,
                _ => runs.push((p, 1)),
            }
        }
        runs
    }

    proptest! {
        #[test]
        fn every_frame_round_trips(frames in proptest::collection::vec(frame_strategy(), 1..8)) {
            let l = layout();
            let mut buf = Vec::new();
            for f in &frames { f.encode_into(&mut buf); }
            let mut at = 0;
            for f in &frames {
                let (got, used) = Frame::decode(&buf[at..], Some(&l)).unwrap();
                prop_assert_eq!(&got, f);
                at += used;
            }
            prop_assert_eq!(at, buf.len());
        }

        #[test]
        fn discard_batches_round_trip_bounded(
            pages in proptest::collection::btree_set(0u64..4096, 0..3000),
            split in any::<bool>(),
        ) {
            let l = Layout {
                blocks: vec![Block { name: "ram".into(), size_bytes: 4096 * 4096, page_size: 4096 }],
            };
            let runs = runs_of(&pages);
            let mut out = Vec::new();
            let mut tx = DiscardSender::init(0);
            for &(first, n) in &runs {
                if split && n > 1 {
                    // Adjacent ranges given separately are merged again.
                    tx.range(first, 1, &mut out);
                    tx.range(first + 1, n - 1, &mut out);
                } else {
                    tx.range(first, n, &mut out);
                }
            }
            let (frames, total) = tx.finish(&mut out);
            prop_assert_eq!(total, pages.len() as u64);
            let mut got = std::collections::BTreeSet::new();
            let mut at = 0;
            let mut seen_frames = 0;
            while at < out.len() {
                let (f, used) = Frame::decode(&out[at..], Some(&l)).unwrap();
                prop_assert!(used <= HEADER_BYTES + usize::from(MAX_DISCARD_RANGES) * DISCARD_RANGE_BYTES);
                let Frame::Discard { block, ranges } = f else { panic!("not a Discard") };
                prop_assert_eq!(block, 0);
                prop_assert!(ranges.len() <= usize::from(MAX_DISCARD_RANGES));
                for (first, n) in ranges {
                    for p in first..first + n { prop_assert!(got.insert(p), "page {} twice", p); }
                }
                at += used;
                seen_frames += 1;
            }
            prop_assert_eq!(seen_frames, frames);
            prop_assert_eq!(frames, (runs.len() as u64).div_ceil(u64::from(MAX_DISCARD_RANGES)));
            prop_assert_eq!(got, pages);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Frame::decode(&bytes, Some(&layout()));
        }

        #[test]
        fn mutated_frames_are_rejected_or_stay_in_layout(
            f in frame_strategy(), at in 0usize..32, byte in any::<u8>()
        ) {
            let l = layout();
            let mut buf = Vec::new();
            f.encode_into(&mut buf);
            buf[at] = byte;
            if let Ok((Frame::Pages { block, page, count, .. } | Frame::Request { block, page, count }, _)) =
                Frame::decode(&buf, Some(&l))
            {
                prop_assert!(l.check_range(block, page, u64::from(count)).is_ok());
            }
        }
    }

    #[test]
    fn discard_outside_a_block_is_rejected() {
        let l = layout();
        for ranges in [
            vec![(250u64, 7u64)],
            vec![(0, 0)],
            vec![(256, 1)],
            vec![(u64::MAX, 2)],
        ] {
            let mut buf = Vec::new();
            Frame::Discard { block: 0, ranges }.encode_into(&mut buf);
            assert!(Frame::decode(&buf, Some(&l)).is_err());
        }
        let mut buf = Vec::new();
        Frame::Discard {
            block: 9,
            ranges: vec![(0, 1)],
        }
        .encode_into(&mut buf);
        assert!(matches!(
            Frame::decode(&buf, Some(&l)),
            Err(CodecError::Range(_))
        ));
        // A count past the limit is refused from the header alone.
        let mut h = [0u8; HEADER_BYTES];
        Header::discard(0, MAX_DISCARD_RANGES + 1).encode(&mut h);
        assert!(matches!(
            Header::decode(&h),
            Err(CodecError::BodyLength { .. } | CodecError::BadCount { .. })
        ));
    }

    #[test]
    fn header_checks_name_the_problem() {
        let l = layout();
        let mut h = [0u8; HEADER_BYTES];
        Header::request(0, 255, 2).encode(&mut h);
        let d = Header::decode(&h).unwrap();
        assert!(matches!(d.check(&l), Err(CodecError::Range(_))));
        Header::request(2, 0, 1).encode(&mut h);
        assert!(Header::decode(&h).unwrap().check(&l).is_err());
        // A huge-page block takes one page per batch.
        Header::pages(1, 0, 2, 0, 2 << 20).encode(&mut h);
        assert!(matches!(
            Header::decode(&h).unwrap().check(&l),
            Err(CodecError::BadCount { .. })
        ));
        // Wrong payload length for the page size.
        Header::pages(0, 0, 2, 0, 2048).encode(&mut h);
        assert!(matches!(
            Header::decode(&h).unwrap().check(&l),
            Err(CodecError::BodyLength { .. })
        ));
        h[0] = b'X';
        assert!(matches!(Header::decode(&h), Err(CodecError::BadMagic(_))));
        Header::request(0, 0, 1).encode(&mut h);
        h[4] = 9;
        assert_eq!(Header::decode(&h), Err(CodecError::BadVersion { got: 9 }));
        h[4] = VERSION;
        h[5] = 77;
        assert_eq!(Header::decode(&h), Err(CodecError::UnknownKind(77)));
        Header::pages(0, 0, 3, 0b1000, 4096).encode(&mut h);
        assert!(matches!(
            Header::decode(&h),
            Err(CodecError::MaskPastCount { .. })
        ));
        let mut buf = Vec::new();
        Frame::Pages {
            block: 0,
            page: 0,
            count: 2,
            zero_mask: 0,
            payload: vec![1; 8192],
        }
        .encode_into(&mut buf);
        buf.truncate(HEADER_BYTES + 5000);
        assert!(matches!(
            Frame::decode(&buf, Some(&l)),
            Err(CodecError::Truncated { .. })
        ));
        // A zero map past the block, or with a body that does not match its page count.
        Header::zero_map(0, 200, 100).encode(&mut h);
        assert!(matches!(
            Header::decode(&h).unwrap().check_zero_map(&l),
            Err(CodecError::Range(_))
        ));
        let mut z = Header::zero_map(0, 0, 100);
        z.body_len = 3;
        z.encode(&mut h);
        assert!(matches!(
            Header::decode(&h),
            Err(CodecError::BodyLength { .. })
        ));
        // Unknown Hello flags are refused.
        let mut hello = Header::hello(0, Role::Urgent, 0, 2).with_zero_map();
        assert!(hello.wants_zero_map() && hello.workers() == 2);
        hello.mask |= 1 << 40;
        hello.encode(&mut h);
        assert!(matches!(
            Header::decode(&h),
            Err(CodecError::BadBody { .. })
        ));
    }

    #[test]
    fn encode_pages_skips_zero_payloads() {
        let a = vec![1u8; 4096];
        let c = vec![3u8; 4096];
        let pages = [Some(&a[..]), None, Some(&c[..])];
        let mut out = Vec::new();
        encode_pages(0, 10, 4096, pages.iter().copied(), &mut out);
        assert_eq!(out.len(), HEADER_BYTES + 2 * 4096);
        let (f, _) = Frame::decode(&out, Some(&layout())).unwrap();
        match f {
            Frame::Pages {
                zero_mask,
                count,
                page,
                ..
            } => {
                assert_eq!((zero_mask, count, page), (0b010, 3, 10));
            }
            other => panic!("decoded {other:?}"),
        }
    }
}
