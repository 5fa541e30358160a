//! A fuzz test of everything that parses bytes from a peer: the wire codec (`Frame::decode`,
//! `Header::decode`/`check`, `Welcome`, `Discard` ranges) and the VMM handover JSON. Stable Rust
//! only (no cargo-fuzz here): a seeded mutator over the seed corpus in `fuzz/corpus/`, run for
//! `FUZZ_SECONDS` (default 3; CI runs longer). Properties: nothing panics, and whatever decodes
//! stays inside the layout. Prints the number of executions.
//!
//! `cargo test --release --test fuzz_codec -- --ignored write_seed_corpus` regenerates the
//! corpus from the encoder.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use postcopy::codec::{Frame, Header, ImageInfo, Kind, Welcome, HEADER_BYTES};
use postcopy::handover;
use postcopy::layout::{Block, Layout};

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

fn corpus_dir(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(kind)
}

fn load(kind: &str) -> Vec<Vec<u8>> {
    let mut v: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(corpus_dir(kind))
        .unwrap_or_else(|e| panic!("seed corpus fuzz/corpus/{kind}: {e}"))
        .map(|e| {
            let p = e.unwrap().path();
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    v.sort();
    assert!(!v.is_empty(), "fuzz/corpus/{kind} is empty");
    v.into_iter().map(|(_, b)| b).collect()
}

/// xorshift64*: reproducible from the seed printed on failure.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: [u64; 12] = [
    0,
    1,
    63,
    64,
    65,
    255,
    256,
    4096,
    0xffff,
    0xffff_ffff,
    u64::MAX,
    1 << 30,
];

fn mutate(rng: &mut Rng, corpus: &[Vec<u8>], input: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(4) {
        match rng.below(7) {
            0 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] ^= 1 << rng.below(8);
            }
            1 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] = rng.next() as u8;
            }
            2 => input.truncate(rng.below(input.len() + 1)),
            3 => {
                let n = rng.below(64);
                input.extend((0..n).map(|_| rng.next() as u8));
            }
            4 => {
                let other = &corpus[rng.below(corpus.len())];
                let at = rng.below(input.len() + 1);
                input.splice(at..at, other.iter().copied());
            }
            5 if input.len() >= 8 => {
                // An interesting value into a header field (count, body_len, block, page, mask).
                let v = INTERESTING[rng.below(INTERESTING.len())];
                let (at, width) = [(6, 2), (8, 4), (12, 4), (16, 8), (24, 8)][rng.below(5)];
                let base = (rng.below(input.len() / HEADER_BYTES + 1)) * HEADER_BYTES;
                for k in 0..width {
                    if let Some(b) = input.get_mut(base + at + k) {
                        *b = (v >> (8 * k)) as u8;
                    }
                }
            }
            _ => {
                if input.len() >= HEADER_BYTES && rng.below(2) == 0 {
                    let frame = input[..HEADER_BYTES].to_vec();
                    input.extend(frame); // a duplicated header
                }
            }
        }
    }
}

/// One execution on wire bytes: decode frame after frame; what decodes must be in the layout.
fn exec_codec(bytes: &[u8], l: &Layout) {
    let mut at = 0;
    while at < bytes.len() {
        let Ok((frame, used)) = Frame::decode(&bytes[at..], Some(l)) else {
            break;
        };
        assert!(used >= HEADER_BYTES && at + used <= bytes.len());
        match frame {
            Frame::Pages {
                block,
                page,
                count,
                zero_mask,
                payload,
            } => {
                let b = l
                    .check_range(block, page, u64::from(count))
                    .expect("in layout");
                let nonzero = u64::from(count) - u64::from(zero_mask.count_ones());
                assert_eq!(payload.len() as u64, nonzero * b.page_size);
            }
            Frame::Request { block, page, count } => {
                l.check_range(block, page, u64::from(count))
                    .expect("in layout");
            }
            Frame::ZeroMap {
                block, page, pages, ..
            } => {
                l.check_range(block, page, pages).expect("in layout");
            }
            Frame::Checksums { block, page, sums } => {
                l.check_range(block, page, sums.len() as u64)
                    .expect("in layout");
            }
            Frame::Discard { block, ranges } => {
                for (first, n) in ranges {
                    assert!(n > 0);
                    l.check_range(block, first, n).expect("in layout");
                }
            }
            Frame::Welcome(w) => w.layout.validate().expect("a decoded layout is valid"),
            _ => {}
        }
        at += used;
    }
    // The header path alone, as the engine uses it.
    if let Some(h) = bytes.get(..HEADER_BYTES) {
        if let Ok(h) = Header::decode(h.try_into().unwrap()) {
            if matches!(h.kind, Kind::Pages | Kind::Request) {
                let _ = h.check(l);
            }
        }
    }
}

fn exec_handover(bytes: &[u8], l: &Layout) {
    if let Ok((regions, _)) = handover::parse_regions(bytes) {
        if let Ok(segs) = handover::segments_for(&regions, l) {
            for s in &segs[0] {
                l.check_range(0, s.first_page, s.pages)
                    .expect("in the image");
            }
        }
    }
}

fn fuzz(kind: &str, exec: fn(&[u8], &Layout)) -> u64 {
    let seconds: u64 = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_f022);
    let corpus = load(kind);
    let l = layout();
    for c in &corpus {
        exec(c, &l);
    }
    let mut rng = Rng(seed | 1);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut execs = 0u64;
    let mut input = Vec::new();
    while Instant::now() < deadline {
        for _ in 0..256 {
            input.clear();
            input.extend_from_slice(&corpus[rng.below(corpus.len())]);
            mutate(&mut rng, &corpus, &mut input);
            let r = std::panic::catch_unwind(|| exec(&input, &l));
            if r.is_err() {
                panic!(
                    "{kind}: input {:02x?} (FUZZ_SEED={seed}, execution {execs}) panicked",
                    input
                );
            }
            execs += 1;
        }
    }
    println!(
        "fuzz {kind}: {execs} executions in {seconds} s (seed {seed}, {} seeds)",
        corpus.len()
    );
    execs
}

#[test]
fn fuzz_wire_codec() {
    assert!(fuzz("codec", exec_codec) > 0);
}

#[test]
fn fuzz_handover_json() {
    assert!(fuzz("handover", exec_handover) > 0);
}

#[test]
#[ignore = "regenerates the seed corpus"]
fn write_seed_corpus() {
    let l = layout();
    let mut frames: Vec<(&str, Frame)> = vec![
        (
            "hello",
            Frame::Hello {
                session: 0,
                role: postcopy::codec::Role::Urgent,
                worker: 0,
                workers: 2,
            },
        ),
        (
            "welcome",
            Frame::Welcome(Welcome {
                session: 7,
                layout: l.clone(),
                image: ImageInfo::Synthetic {
                    seed: 1,
                    zero_percent: 25,
                },
                stopped_unix_us: 0,
            }),
        ),
        (
            "request",
            Frame::Request {
                block: 0,
                page: 10,
                count: 3,
            },
        ),
        (
            "pages",
            Frame::Pages {
                block: 0,
                page: 4,
                count: 4,
                zero_mask: 0b0101,
                payload: vec![0xab; 2 * 4096],
            },
        ),
        ("run", Frame::Run(5)),
        ("end", Frame::End(2)),
        ("ack", Frame::Ack(2)),
        ("error", Frame::Error("bad thing".into())),
        (
            "zeromap",
            Frame::ZeroMap {
                block: 0,
                page: 0,
                pages: 16,
                bits: vec![0x0f, 0xf0],
            },
        ),
        (
            "discard",
            Frame::Discard {
                block: 0,
                ranges: vec![(1, 2), (10, 5)],
            },
        ),
        (
            "round",
            Frame::Round {
                round: 1,
                pages: 256,
            },
        ),
        (
            "checksums",
            Frame::Checksums {
                block: 0,
                page: 0,
                sums: vec![1, 2, 3],
            },
        ),
    ];
    let dir = corpus_dir("codec");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, f) in frames.drain(..) {
        let mut b = Vec::new();
        f.encode_into(&mut b);
        std::fs::write(dir.join(format!("{name}.bin")), b).unwrap();
    }
    let dir = corpus_dir("handover");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, json) in [
        (
            "v1_1",
            r#"[{"base_host_virt_addr":1048576,"size":65536,"offset":0}]"#,
        ),
        (
            "v1_7",
            r#"[{"base_host_virt_addr":1048576,"size":65536,"offset":65536,"page_size_kib":4096}]"#,
        ),
        (
            "v1_12",
            r#"[{"base_host_virt_addr":2097152,"size":65536,"offset":0,"page_size_kib":4096,"page_size":4096},{"base_host_virt_addr":1048576,"size":65536,"offset":65536,"page_size_kib":4096,"page_size":4096}]"#,
        ),
    ] {
        std::fs::write(dir.join(format!("{name}.json")), json).unwrap();
    }
}
