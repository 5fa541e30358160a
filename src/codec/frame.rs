//! [`Frame`]: a whole frame, owned, for control paths, tests and fuzzing. Its encoding and
//! decoding build on [`Header`]'s constructors and checks and on the body codecs of the other
//! files, so the wire format is written down once.

use super::discard::encode_discard;
use super::{
    decode_discard, decode_error, encode_error, CodecError, Header, Hello, Kind, Role, Welcome,
    HEADER_BYTES,
};
use crate::layout::Layout;

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
    /// See [`Kind::Credit`]: `Pages` frames granted in all.
    Credit(u64),
    /// See [`Kind::Heartbeat`].
    Heartbeat,
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
    /// Encodes the frame (a `Pages` payload as given: one page per non-zero page is the
    /// sender's to ensure).
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
                let len = payload.len() as u32;
                let h = Header::pages_with_body(*block, *page, *count, *zero_mask, len);
                with_body(h, payload, out);
            }
            Frame::Run(v) => Header::control(Kind::Run, *v).encode_into(out),
            Frame::End(v) => Header::control(Kind::End, *v).encode_into(out),
            Frame::Ack(v) => Header::control(Kind::Ack, *v).encode_into(out),
            Frame::Credit(v) => Header::control(Kind::Credit, *v).encode_into(out),
            Frame::Heartbeat => Header::heartbeat().encode_into(out),
            Frame::Error(m) => encode_error(m, out),
            Frame::ZeroMap {
                block,
                page,
                pages,
                bits,
            } => with_body(Header::zero_map(*block, *page, *pages), bits, out),
            Frame::Discard { block, ranges } => encode_discard(*block, ranges, out),
            Frame::Round { round, pages } => Header::round(*round, *pages).encode_into(out),
            Frame::Have {
                block,
                page,
                pages,
                bits,
            } => with_body(Header::have(*block, *page, *pages), bits, out),
            Frame::Challenge(b) => with_body(Header::auth(Kind::Challenge, b.len() as u32), b, out),
            Frame::Auth(b) => with_body(Header::auth(Kind::Auth, b.len() as u32), b, out),
            Frame::Checksums { block, page, sums } => encode_checksums(*block, *page, sums, out),
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
        if let Some(l) = layout {
            check_in(&h, l)?;
        }
        let total = HEADER_BYTES + h.body_len as usize;
        let body = bytes
            .get(HEADER_BYTES..total)
            .ok_or(CodecError::Truncated {
                need: total,
                have: bytes.len(),
            })?;
        Ok((Frame::of(&h, body, layout)?, total))
    }

    /// The frame of a decoded header and its whole body.
    fn of(h: &Header, body: &[u8], layout: Option<&Layout>) -> Result<Frame, CodecError> {
        Ok(match h.kind {
            Kind::Hello => Frame::hello(h),
            Kind::Welcome => Frame::Welcome(Welcome::decode_body(h, body)?),
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
            Kind::Credit => Frame::Credit(h.page),
            Kind::Heartbeat => Frame::Heartbeat,
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
            Kind::Discard => Frame::discard(h, body, layout)?,
            Kind::Challenge => Frame::Challenge(body.to_vec()),
            Kind::Auth => Frame::Auth(body.to_vec()),
            Kind::Round => Frame::Round {
                round: h.page,
                pages: h.mask,
            },
            Kind::Checksums => Frame::checksums(h, body),
        })
    }

    /// A `Hello` (its flags are not part of the owned frame).
    fn hello(h: &Header) -> Frame {
        let hello = Hello::of(h).expect("a decoded Hello has a role");
        Frame::Hello {
            session: hello.session,
            role: hello.role,
            worker: hello.worker,
            workers: hello.workers,
        }
    }

    /// A `Discard` with its ranges (checked against `layout` when known).
    fn discard(h: &Header, body: &[u8], layout: Option<&Layout>) -> Result<Frame, CodecError> {
        let mut ranges = Vec::with_capacity(usize::from(h.count));
        decode_discard(h, body, layout, |first, pages| ranges.push((first, pages)))?;
        Ok(Frame::Discard {
            block: h.block,
            ranges,
        })
    }

    /// A `Checksums` frame: one little-endian u64 per page.
    fn checksums(h: &Header, body: &[u8]) -> Frame {
        Frame::Checksums {
            block: h.block,
            page: h.page,
            sums: body
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
        }
    }
}

/// What a known layout says about a decoded header: requests and batches lie inside a block
/// (and batches fit its page size), page bits and checksums cover pages that exist.
fn check_in(h: &Header, layout: &Layout) -> Result<(), CodecError> {
    match h.kind {
        Kind::Request | Kind::Pages => h.check(layout).map(|_| ()),
        Kind::ZeroMap | Kind::Have | Kind::Checksums => h.check_zero_map(layout),
        Kind::Hello
        | Kind::Welcome
        | Kind::Run
        | Kind::End
        | Kind::Ack
        | Kind::Error
        | Kind::Discard
        | Kind::Round
        | Kind::Challenge
        | Kind::Auth
        | Kind::Heartbeat
        | Kind::Credit => Ok(()),
    }
}

/// Appends header `h` and then `body` (as given: a test may send a body that does not match).
fn with_body(h: Header, body: &[u8], out: &mut Vec<u8>) {
    h.encode_into(out);
    out.extend_from_slice(body);
}

/// Appends a `Checksums` frame: the header, then one little-endian u64 per page.
fn encode_checksums(block: u32, page: u64, sums: &[u64], out: &mut Vec<u8>) {
    Header::checksums(block, page, sums.len() as u64).encode_into(out);
    for s in sums {
        out.extend_from_slice(&s.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::layout;
    use super::super::ImageInfo;
    use super::*;
    use proptest::prelude::*;

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
            any::<u64>().prop_map(Frame::Credit),
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
}
