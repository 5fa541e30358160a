//! Per-frame protection of an authenticated connection: AES-128-GCM, one key per direction and
//! connection ([`super::auth::Key::frame_keys`]), the frame's sequence number on its direction
//! as the nonce, the header as associated data, the body encrypted in place:
//!
//! ```text
//! header (plain, authenticated) ‖ body (encrypted) ‖ tag (16 B)
//! ```
//!
//! So no frame can be forged, replayed, reordered or moved to another connection, and no page
//! can be read off the wire. A receiver may look at a header before its tag arrives (to refuse
//! a frame early, never to act on it); a body is plaintext only once its tag has held.
//!
//! Why AES-GCM (ring's, with the CPU's AES and carry-less multiply instructions; on x86_64 the
//! VAES/VPCLMULQDQ code path where the CPU has it): on this project's test machine it seals and
//! opens a 64-page batch at ~8 GB/s and a single page at ~7 GB/s, where the keyed BLAKE3 MAC it
//! replaced ran at ~4 and ~1 GB/s (criterion `auth/*`, perf/README.md).

use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_128_GCM, NONCE_LEN};

/// Bytes of a frame's tag.
pub const TAG_BYTES: usize = 16;

/// Bytes of key material per direction (an AES-128 key).
pub const KEY_BYTES: usize = 16;

/// A frame whose tag did not hold: tampered, replayed, reordered, or sealed with another key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadTag {
    /// The frame's sequence number on its connection.
    pub seq: u64,
}

/// The state of one direction of one connection: its key and the next frame's number. The
/// sender calls [`seal`](Self::seal) per frame, the receiver [`open`](Self::open), in the same
/// order.
pub struct FrameSeal {
    key: LessSafeKey,
    seq: u64,
}

impl Clone for FrameSeal {
    fn clone(&self) -> FrameSeal {
        FrameSeal {
            key: self.key.clone(),
            seq: self.seq,
        }
    }
}

impl std::fmt::Debug for FrameSeal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FrameSeal(seq {})", self.seq)
    }
}

impl FrameSeal {
    /// A direction's state, from its key; the first frame is number 0.
    pub(super) fn new(key: &[u8; KEY_BYTES]) -> FrameSeal {
        let key = UnboundKey::new(&AES_128_GCM, key).expect("AES-128 takes a 16-byte key");
        FrameSeal {
            key: LessSafeKey::new(key),
            seq: 0,
        }
    }

    /// The nonce of frame `seq`: unique per key, as each key serves one direction of one
    /// connection and `seq` never wraps (2^64 frames).
    fn nonce(seq: u64) -> Nonce {
        let mut n = [0u8; NONCE_LEN];
        n[NONCE_LEN - 8..].copy_from_slice(&seq.to_le_bytes());
        Nonce::assume_unique_for_key(n)
    }

    /// Seals the next frame sent: encrypts `body` in place and returns its tag.
    pub fn seal(&mut self, header: &[u8], body: &mut [u8]) -> [u8; TAG_BYTES] {
        let tag = self
            .key
            .seal_in_place_separate_tag(Self::nonce(self.seq), Aad::from(header), body)
            .expect("a frame body is far below AES-GCM's length limit");
        self.seq += 1;
        tag.as_ref().try_into().expect("AES-GCM tags are 16 bytes")
    }

    /// Opens the next frame received: checks `tag` over `header` and `body` and decrypts `body`
    /// in place. On a bad tag `body` is left in an unspecified state and must not be used.
    pub fn open(&mut self, header: &[u8], body: &mut [u8], tag: &[u8]) -> Result<(), BadTag> {
        let bad = BadTag { seq: self.seq };
        let tag = Tag::try_from(tag).map_err(|_| bad)?;
        self.key
            .open_in_place_separate_tag(Self::nonce(self.seq), Aad::from(header), tag, body, 0..)
            .map_err(|_| bad)?;
        self.seq += 1;
        Ok(())
    }
}

/// Both directions of an authenticated connection, from one side's point of view.
#[derive(Clone, Debug)]
pub struct Channel {
    /// Frames we send.
    pub tx: FrameSeal,
    /// Frames we receive.
    pub rx: FrameSeal,
}
