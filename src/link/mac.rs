//! Per-frame MACs of an authenticated connection: `tag = MAC(K_dir, seq ‖ header ‖ body)`,
//! BLAKE3 in keyed mode truncated to 128 bits, one key per direction and connection
//! ([`super::auth::Key::frame_keys`]), a sequence number per direction so that no frame can be
//! replayed, reordered or moved to another connection.

/// Bytes of a frame's MAC trailer.
pub const TAG_BYTES: usize = 16;

/// A frame whose MAC did not match: tampered, replayed, reordered, or sealed with another key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadTag {
    /// The frame's sequence number on its connection.
    pub seq: u64,
}

/// The MAC state of one direction of one connection: its key and the next frame's number.
/// The sender calls [`seal`](Self::seal) per frame, the receiver [`open`](Self::open), in the
/// same order.
#[derive(Clone)]
pub struct FrameMac {
    key: [u8; 32],
    seq: u64,
}

impl std::fmt::Debug for FrameMac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FrameMac(seq {})", self.seq)
    }
}

impl FrameMac {
    /// A direction's MAC state, from its key; the first frame is number 0.
    pub(super) fn new(key: [u8; 32]) -> FrameMac {
        FrameMac { key, seq: 0 }
    }

    fn tag(&self, header: &[u8], body: &[u8]) -> [u8; TAG_BYTES] {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(&self.seq.to_le_bytes());
        h.update(header);
        h.update(body);
        let mut t = [0u8; TAG_BYTES];
        h.finalize_xof().fill(&mut t);
        t
    }

    /// The tag of the next frame sent.
    pub fn seal(&mut self, header: &[u8], body: &[u8]) -> [u8; TAG_BYTES] {
        let t = self.tag(header, body);
        self.seq += 1;
        t
    }

    /// Checks the tag of the next frame received (constant time).
    pub fn open(&mut self, header: &[u8], body: &[u8], tag: &[u8]) -> Result<(), BadTag> {
        let want = self.tag(header, body);
        let mut diff = u8::from(tag.len() != TAG_BYTES);
        for (a, b) in want.iter().zip(tag) {
            diff |= a ^ b;
        }
        if diff != 0 {
            return Err(BadTag { seq: self.seq });
        }
        self.seq += 1;
        Ok(())
    }
}

/// Both directions of an authenticated connection, from one side's point of view.
#[derive(Clone, Debug)]
pub struct Channel {
    /// Frames we send.
    pub tx: FrameMac,
    /// Frames we receive.
    pub rx: FrameMac,
}
