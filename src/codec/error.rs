//! [`CodecError`]: what was wrong with a frame.

use super::{Kind, VERSION};
use crate::layout::LayoutError;

/// Codec errors: what was wrong with a frame, in words an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// Not our protocol at all.
    #[error("the peer is not a postcopy page server (wrong port?): it sent {} where a frame starts", shown_magic(*.0))]
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

/// The 4 bytes of a bad magic as the peer sent them: as text when they are (`"HTTP"`, `"SSH-"`),
/// else in hex.
fn shown_magic(magic: u32) -> String {
    let bytes = magic.to_le_bytes();
    if bytes.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        format!("{:?}", String::from_utf8_lossy(&bytes))
    } else {
        format!("{magic:#010x}")
    }
}
