//! Wire protocol v2: a pure codec (no I/O), fuzzable.
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
//! checks it against the session's [`Layout`](crate::layout::Layout) (block, page range, exact
//! payload length).
//!
//! One file per job: [`Header`] and its constructors (`header.rs`), the checks of a received
//! header (`check.rs`), the typed `Hello` (`hello.rs`), the `Welcome` body (`welcome.rs`), the
//! `Discard` ranges (`discard.rs`), the page-bit bodies of `ZeroMap` and `Have` (`bits.rs`),
//! `Pages` and `Error` frames (`pages.rs`, `message.rs`), the owned [`Frame`] of control paths,
//! tests and fuzzing (`frame.rs`), and [`CodecError`] (`error.rs`).

mod bits;
mod check;
mod discard;
mod error;
mod frame;
mod header;
mod hello;
mod message;
mod pages;
mod welcome;

pub use bits::{encode_page_bits, page_bit};
pub use check::max_batch_pages;
pub use discard::{decode_discard, DiscardSender};
pub use error::CodecError;
pub use frame::Frame;
pub use header::Header;
pub use hello::Hello;
pub use message::{decode_error, encode_error};
pub use pages::encode_pages;
pub use welcome::{ImageInfo, Welcome};

/// Frame magic: the bytes `PCPY` read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"PCPY");
/// Protocol version (2: frames of an authenticated connection are sealed with AES-128-GCM,
/// [`crate::link::seal`]; 1 carried a BLAKE3 MAC).
pub const VERSION: u8 = 2;
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
/// `Hello` flag on a bulk connection: the stream is receiver-driven; the source sends a `Pages`
/// frame only within the `Credit` the destination granted on that connection.
pub const HELLO_CREDIT: u64 = 1 << 35;
/// `Hello` field, in `mask` bits 40..46: log2 of the page size the destination's memory maps
/// (12: 4 KiB, 21: 2 MiB); 0: any. The source refuses a destination whose page size is not its
/// image's.
pub const HELLO_PAGE_SHIFT: u32 = 40;
/// How an `Error` frame's message begins when the refusal is transient (the destination tries
/// again within its recovery timeout): the source is busy, or a session has too many
/// connections while broken ones are still closing.
pub const BUSY: &str = "busy: ";
/// `End` flag (in `mask`): the destination will verify the migration on a verify connection
/// once its workers ended, so the session completes only when that has been served.
pub const END_VERIFY: u64 = 1;
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
    /// either way on a connection that has had nothing else to send for a while: the peer is
    /// still there (no body). Every reader skips it; a connection on which nothing at all
    /// arrives for the link timeout is dead (see `link::liveness`).
    Heartbeat = 16,
    /// destination → source on a credit-driven bulk connection (`HELLO_CREDIT`): the source may
    /// have sent `page` `Pages` frames on this connection in all (a running total, so a lost
    /// or late grant is made good by the next; no body).
    Credit = 17,
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
            16 => Kind::Heartbeat,
            17 => Kind::Credit,
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

/// The little-endian u32 at `at` of `b` (the caller checked the length).
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// The little-endian u64 at `at` of `b` (the caller checked the length).
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod testutil {
    use crate::layout::{Block, Layout};

    /// The layout the codec's unit tests check against: 256 small pages and 4 huge ones.
    pub(super) fn layout() -> Layout {
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
}
