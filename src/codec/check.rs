//! The checks of a received header, in two steps so nothing is copied before it is checked:
//! [`Header::decode`] checks what the header alone can tell (magic, version, kind, lengths, one
//! short check per kind), then [`Header::check`] and [`Header::check_zero_map`] check it
//! against the session's layout.

use super::{
    le32, le64, CodecError, Header, Kind, DISCARD_RANGE_BYTES, HEADER_BYTES, HELLO_CREDIT,
    HELLO_PAGE_SHIFT, MAGIC, MAX_BATCH_BYTES, MAX_BATCH_PAGES, MAX_CHECKSUMS, MAX_CONTROL_BODY,
    MAX_DISCARD_RANGES, MAX_ERROR_BYTES, MAX_REQUEST_PAGES, MAX_ZERO_MAP_BYTES, VERSION,
};
use crate::layout::{Block, Layout};

/// Most workers a `Hello` may name.
const MAX_HELLO_WORKERS: u64 = 1024;
/// The `Hello` mask bits in use: the worker count (bits 0..32), the zero map, precopy, resume
/// and credit flags (32..36) and the page-size shift (40..47); any other bit is refused.
const HELLO_KNOWN_BITS: u32 = 36;
const _: () = assert!(HELLO_CREDIT == 1 << (HELLO_KNOWN_BITS - 1));
const HELLO_KNOWN_MASK: u64 = ((1 << HELLO_KNOWN_BITS) - 1) | (0x7f << HELLO_PAGE_SHIFT);

/// Largest batch for pages of `page_size` bytes.
pub fn max_batch_pages(page_size: u64) -> u16 {
    (MAX_BATCH_BYTES / page_size).clamp(1, u64::from(MAX_BATCH_PAGES)) as u16
}

impl Kind {
    /// The largest body a frame of this kind may declare in its header.
    fn body_max(self) -> u64 {
        match self {
            Kind::Hello
            | Kind::Request
            | Kind::Run
            | Kind::End
            | Kind::Ack
            | Kind::Round
            | Kind::Heartbeat
            | Kind::Credit => 0,
            Kind::Discard => (usize::from(MAX_DISCARD_RANGES) * DISCARD_RANGE_BYTES) as u64,
            Kind::Checksums => MAX_CHECKSUMS * 8,
            Kind::Challenge => 32,
            Kind::Auth => 64,
            Kind::Welcome => u64::from(MAX_CONTROL_BODY),
            Kind::Error => MAX_ERROR_BYTES as u64,
            Kind::ZeroMap | Kind::Have => u64::from(MAX_ZERO_MAP_BYTES),
            // Checked exactly against the page size in `check`.
            Kind::Pages => (1 << 30) + 1,
        }
    }
}

impl Header {
    /// Decodes and checks what the header alone can tell.
    pub fn decode(b: &[u8; HEADER_BYTES]) -> Result<Header, CodecError> {
        let h = Header::read(b)?;
        h.check_body_max()?;
        h.check_fields()?;
        debug_assert!({
            let mut again = [0u8; HEADER_BYTES];
            h.encode(&mut again);
            again == *b
        });
        Ok(h)
    }

    /// The fields of a header of our protocol (magic, version and kind checked).
    fn read(b: &[u8; HEADER_BYTES]) -> Result<Header, CodecError> {
        let magic = le32(b, 0);
        if magic != MAGIC {
            return Err(CodecError::BadMagic(magic));
        }
        if b[4] != VERSION {
            return Err(CodecError::BadVersion { got: b[4] });
        }
        let kind = Kind::from_u8(b[5]).ok_or(CodecError::UnknownKind(b[5]))?;
        Ok(Header {
            kind,
            count: u16::from_le_bytes([b[6], b[7]]),
            body_len: le32(b, 8),
            block: le32(b, 12),
            page: le64(b, 16),
            mask: le64(b, 24),
        })
    }

    /// The declared body is not longer than its kind allows.
    fn check_body_max(&self) -> Result<(), CodecError> {
        let max = self.kind.body_max();
        if u64::from(self.body_len) > max {
            return Err(CodecError::BodyLength {
                kind: self.kind,
                len: self.body_len,
                max,
            });
        }
        Ok(())
    }

    /// The kind's own rules for its count, mask and body length.
    fn check_fields(&self) -> Result<(), CodecError> {
        match self.kind {
            Kind::Request => self.check_request(),
            Kind::Pages => self.check_batch(),
            Kind::Hello => self.check_hello(),
            Kind::ZeroMap | Kind::Have => self.check_page_bits(),
            Kind::Discard => self.check_discard(),
            Kind::Challenge | Kind::Auth => self.check_auth(),
            Kind::Checksums => self.check_checksums(),
            Kind::Welcome
            | Kind::Run
            | Kind::End
            | Kind::Ack
            | Kind::Error
            | Kind::Round
            | Kind::Heartbeat
            | Kind::Credit => Ok(()),
        }
    }

    /// A `Request` asks for 1..=[`MAX_REQUEST_PAGES`] pages.
    fn check_request(&self) -> Result<(), CodecError> {
        if self.count == 0 || self.count > MAX_REQUEST_PAGES {
            return Err(self.bad_count(MAX_REQUEST_PAGES));
        }
        Ok(())
    }

    /// A `Pages` batch has 1..=[`MAX_BATCH_PAGES`] pages and no mask bit past them.
    fn check_batch(&self) -> Result<(), CodecError> {
        if self.count == 0 || self.count > MAX_BATCH_PAGES {
            return Err(self.bad_count(MAX_BATCH_PAGES));
        }
        if self.count < 64 && self.mask >> self.count != 0 {
            return Err(CodecError::MaskPastCount {
                mask: self.mask,
                count: self.count,
            });
        }
        Ok(())
    }

    /// A `Hello` names a known role, a worker of 1..=1024 workers, known flags only and a page
    /// size (if any) of 4 KiB to 1 GiB (shifts 12..=30).
    fn check_hello(&self) -> Result<(), CodecError> {
        let workers = self.workers();
        if self.role().is_none()
            || workers == 0
            || workers > MAX_HELLO_WORKERS
            || u64::from(self.count) >= workers
            || self.mask & !HELLO_KNOWN_MASK != 0
            || !matches!((self.mask >> HELLO_PAGE_SHIFT) & 0x7f, 0 | 12..=30)
        {
            return Err(CodecError::BadBody {
                kind: self.kind,
                detail: format!(
                    "role {} worker {} of {} workers, flags {:#x}",
                    self.block,
                    self.count,
                    workers,
                    self.mask >> 32
                ),
            });
        }
        Ok(())
    }

    /// A `ZeroMap` or `Have` covers some pages and its body is one bit per page.
    fn check_page_bits(&self) -> Result<(), CodecError> {
        let bytes = self.mask.div_ceil(8);
        if self.mask == 0 || u64::from(self.body_len) != bytes {
            return Err(CodecError::BodyLength {
                kind: self.kind,
                len: self.body_len,
                max: bytes,
            });
        }
        Ok(())
    }

    /// A `Discard` has 1..=[`MAX_DISCARD_RANGES`] ranges and a body of exactly those.
    fn check_discard(&self) -> Result<(), CodecError> {
        if self.count == 0
            || self.count > MAX_DISCARD_RANGES
            || self.body_len as usize != usize::from(self.count) * DISCARD_RANGE_BYTES
        {
            return Err(self.bad_count(MAX_DISCARD_RANGES));
        }
        Ok(())
    }

    /// A `Challenge` or `Auth` body is 32 or 64 bytes.
    fn check_auth(&self) -> Result<(), CodecError> {
        if self.body_len != 32 && self.body_len != 64 {
            return Err(CodecError::BodyLength {
                kind: self.kind,
                len: self.body_len,
                max: 64,
            });
        }
        Ok(())
    }

    /// A `Checksums` frame covers 1..=[`MAX_CHECKSUMS`] pages, 8 bytes each.
    fn check_checksums(&self) -> Result<(), CodecError> {
        if self.mask == 0 || self.mask > MAX_CHECKSUMS || u64::from(self.body_len) != self.mask * 8
        {
            return Err(CodecError::BodyLength {
                kind: self.kind,
                len: self.body_len,
                max: self.mask.min(MAX_CHECKSUMS) * 8,
            });
        }
        Ok(())
    }

    /// The error for a count outside 1..=`max`.
    fn bad_count(&self, max: u16) -> CodecError {
        CodecError::BadCount {
            kind: self.kind,
            count: self.count,
            max,
        }
    }

    /// Checks a `Request` or `Pages` header against the layout: the block exists, the page
    /// range lies inside it, the batch is not larger than allowed for its page size, and the
    /// body is exactly one page per non-zero page. Returns the block.
    pub fn check<'l>(&self, layout: &'l Layout) -> Result<&'l Block, CodecError> {
        let block = layout.check_range(self.block, self.page, u64::from(self.count))?;
        if self.kind == Kind::Pages {
            self.check_batch_in(block)?;
        }
        Ok(block)
    }

    /// A `Pages` batch fits the page size of `block`: not too many pages, and one page of
    /// body per non-zero page.
    fn check_batch_in(&self, block: &Block) -> Result<(), CodecError> {
        let max = max_batch_pages(block.page_size);
        if self.count > max {
            return Err(self.bad_count(max));
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
        Ok(())
    }

    /// Checks a `ZeroMap` or `Checksums` header against the layout: the pages it covers exist.
    pub fn check_zero_map(&self, layout: &Layout) -> Result<(), CodecError> {
        layout.check_range(self.block, self.page, self.mask)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::layout;
    use super::super::{Frame, Role};
    use super::*;

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
        let hello = Header::hello(0, Role::Urgent, 0, 2).with_zero_map();
        assert!(hello.wants_zero_map() && hello.workers() == 2);
        for bad in [1 << 40, 1 << 37, 1 << 50, 31 << 40] {
            let mut hello = hello;
            hello.mask |= bad; // an unknown flag, or a page-size shift out of range
            hello.encode(&mut h);
            assert!(
                matches!(Header::decode(&h), Err(CodecError::BadBody { .. })),
                "{bad:#x}"
            );
        }
        hello.with_page_size(2 << 20).encode(&mut h);
        assert!(Header::decode(&h).is_ok());
    }
}
