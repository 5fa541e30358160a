//! Criterion benches that guard each stage of the destination's hot path.
//!
//! `cargo bench --bench hot_path` measures; `cargo test --release --benches` runs each once as
//! a smoke test (CI). Placement benches drive the real kernel: a registered region whose pages
//! are dropped (`MADV_DONTNEED`) outside the timed part, so every timed call places missing
//! pages.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use postcopy::codec::{Header, HEADER_BYTES};
use postcopy::image::Synthetic;
use postcopy::layout::{Layout, PageBitmap};
use postcopy::source;
use postcopy::sys::mem::Mapping;
use postcopy::sys::uffd::{mode, Event, Uffd, MSG_BYTES};

const PAGE: usize = 4096;
const BATCH: usize = 64;

fn codec_benches(c: &mut Criterion) {
    let layout = Layout::single("ram", 1 << 30, PAGE as u64).expect("layout");
    // What every reply and stream batch costs the source: the encoder production uses, over an
    // image with a quarter of zero pages (they travel as mask bits).
    let image = Synthetic::new(layout.clone(), 7, 25);
    let mut scratch = vec![0u8; PAGE];
    let mut out = Vec::with_capacity(HEADER_BYTES + BATCH * PAGE);
    let mut encode = |out: &mut Vec<u8>| {
        out.clear();
        source::encode_run(
            &image,
            0,
            4096,
            BATCH as u64,
            PAGE as u64,
            &mut scratch,
            out,
        )
    };
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("encode_64_page_batch", |b| {
        b.iter(|| black_box((encode(&mut out), out.len())))
    });
    encode(&mut out);
    let head: [u8; HEADER_BYTES] = out[..HEADER_BYTES].try_into().expect("header");
    g.bench_function("decode_and_check_64_page_header", |b| {
        b.iter(|| {
            let h = Header::decode(black_box(&head)).expect("valid");
            black_box(h.check(&layout).expect("in range").page_size)
        })
    });
    g.finish();
}

fn bitmap_benches(c: &mut Criterion) {
    let bitmap = PageBitmap::new(1 << 18);
    let mut g = c.benchmark_group("bitmap");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("set_range_64", |b| {
        b.iter(|| {
            bitmap.clear_range(1000, BATCH as u64);
            black_box(bitmap.set_range(black_box(1000), BATCH as u64))
        })
    });
    g.bench_function("set_64_one_by_one", |b| {
        b.iter(|| {
            bitmap.clear_range(1000, BATCH as u64);
            for p in 1000..1000 + BATCH as u64 {
                black_box(bitmap.set(p));
            }
        })
    });
    let half = PageBitmap::new(1 << 18);
    half.set_range(0, 1 << 17);
    g.throughput(Throughput::Elements(1 << 17));
    g.bench_function("next_clear_over_128k_set", |b| {
        b.iter(|| black_box(half.next_clear(0, 1 << 18)))
    });
    g.finish();
}

fn fault_read_benches(c: &mut Criterion) {
    let mut msgs = Vec::with_capacity(BATCH * MSG_BYTES);
    for i in 0..BATCH as u64 {
        msgs.extend_from_slice(
            &Event::PageFault {
                address: 0x7f00_0000_0000 + i * 4096 * 7,
                flags: 0,
                thread_id: 1,
            }
            .encode(),
        );
    }
    let mut g = c.benchmark_group("fault_read");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("decode_64_events", |b| {
        b.iter(|| {
            Event::decode_all(black_box(&msgs))
                .map(|e| match e {
                    Event::PageFault { address, .. } => address,
                    _ => 0,
                })
                .sum::<u64>()
        })
    });
    g.finish();
}

fn request_benches(c: &mut Criterion) {
    // 64 faults: 16 runs of 4 adjacent pages, in a scrambled order.
    let faults: Vec<(u32, u64)> = (0..BATCH as u64)
        .map(|i| (0, (i * 37 % 16) * 100 + i % 4))
        .collect();
    let mut pending = faults.clone();
    let mut buf = vec![0u8; 1024 * HEADER_BYTES];
    let mut g = c.benchmark_group("requests");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("coalesce_64_faults", |b| {
        b.iter(|| {
            pending.copy_from_slice(&faults);
            black_box(postcopy::dest::coalesce_requests(&mut pending, &mut buf))
        })
    });
    g.finish();
}

fn receive_benches(c: &mut Criterion) {
    use postcopy::sys::ring::{OpKind, Ring, RingConfig};
    use std::io::Write;
    use std::os::fd::AsRawFd;
    // A 64-page batch received from a socket into registered temp pages with READ_FIXED.
    let mut ring = Ring::new(&RingConfig {
        entries: 8,
        arena_bytes: vec![BATCH * PAGE],
    })
    .expect("io_uring");
    let slot = ring.add_slot(0, 0, BATCH * PAGE);
    let (mut tx, rx) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let payload = vec![0x3cu8; BATCH * PAGE];
    let sender = std::thread::spawn(move || {
        // Feeds the receiver forever; ends when the receiver's end closes.
        while tx.write_all(&payload).is_ok() {}
    });
    let mut g = c.benchmark_group("receive");
    g.throughput(Throughput::Bytes((BATCH * PAGE) as u64));
    g.bench_function("read_fixed_64_pages_into_temp_pages", |b| {
        b.iter(|| {
            let mut got = 0;
            while got < BATCH * PAGE {
                ring.fixed(
                    OpKind::Read,
                    rx.as_raw_fd(),
                    slot,
                    got,
                    BATCH * PAGE - got,
                    0,
                )
                .expect("queue read");
                // `submit_and_reap` may return with nothing (a signal interrupted the wait).
                let n = loop {
                    if let Some(c) = ring.submit_and_reap(1, None).expect("reap").first() {
                        break c.result;
                    }
                };
                assert!(n > 0, "receive failed: {n}");
                got += n as usize;
            }
            black_box(got)
        })
    });
    g.finish();
    drop(ring);
    drop(rx);
    let _ = sender.join();
}

struct Registered {
    uffd: Uffd,
    region: Mapping,
    src: Vec<u8>,
}

fn registered() -> Registered {
    let uffd =
        Uffd::open(false).expect("userfaultfd (run as root or set vm.unprivileged_userfaultfd=1)");
    uffd.api(0).expect("UFFDIO_API");
    let region = Mapping::anonymous(BATCH * PAGE, "bench region").expect("mmap");
    region.no_huge_pages().expect("madvise");
    uffd.register(region.addr(), BATCH * PAGE, mode::MISSING)
        .expect("register");
    Registered {
        uffd,
        region,
        src: vec![0xa5u8; BATCH * PAGE],
    }
}

fn placement_benches(c: &mut Criterion) {
    let r = registered();
    let drop_pages = || r.region.dontneed(0, BATCH * PAGE).expect("MADV_DONTNEED");
    let mut g = c.benchmark_group("placement_64_pages");
    g.throughput(Throughput::Bytes((BATCH * PAGE) as u64));
    let copy_each = |dontwake: bool| {
        for i in 0..BATCH {
            r.uffd
                .copy(
                    r.region.addr() + i * PAGE,
                    r.src[i * PAGE..].as_ptr(),
                    PAGE,
                    dontwake,
                )
                .expect("copy");
        }
    };
    g.bench_function("copy_per_page", |b| {
        b.iter_batched(drop_pages, |()| copy_each(false), BatchSize::PerIteration)
    });
    g.bench_function("copy_one_run", |b| {
        b.iter_batched(
            drop_pages,
            |()| {
                r.uffd
                    .copy(r.region.addr(), r.src.as_ptr(), BATCH * PAGE, false)
                    .expect("copy")
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("copy_per_page_dontwake_then_wake", |b| {
        b.iter_batched(
            drop_pages,
            |()| {
                copy_each(true);
                r.uffd.wake(r.region.addr(), BATCH * PAGE).expect("wake")
            },
            BatchSize::PerIteration,
        )
    });
    // UFFDIO_MOVE (6.8+) from a recycled temp-page pool: the pages move instead of being
    // copied, but the pool must be refilled (a fresh page fault + memcpy per page) before the
    // next move; the timed part includes that refill, as a receive into it would pay it.
    let pool = Mapping::anonymous(BATCH * PAGE, "bench move pool").expect("mmap");
    pool.no_huge_pages().expect("madvise");
    let move_uffd = Uffd::open(false).expect("userfaultfd");
    move_uffd
        .api(postcopy::sys::uffd::feature::MOVE)
        .expect("UFFDIO_API with MOVE (Linux 6.8+)");
    let move_region = Mapping::anonymous(BATCH * PAGE, "bench move region").expect("mmap");
    move_region.no_huge_pages().expect("madvise");
    move_uffd
        .register(move_region.addr(), BATCH * PAGE, mode::MISSING)
        .expect("register");
    g.bench_function("move_one_run_with_pool_refill", |b| {
        b.iter_batched(
            || {
                move_region
                    .dontneed(0, BATCH * PAGE)
                    .expect("MADV_DONTNEED")
            },
            |()| {
                pool.write_from(0, &r.src);
                move_uffd
                    .move_pages(move_region.addr(), pool.addr(), BATCH * PAGE, 0)
                    .expect("move")
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("zeropage_one_run", |b| {
        b.iter_batched(
            drop_pages,
            |()| {
                r.uffd
                    .zeropage(r.region.addr(), BATCH * PAGE, false)
                    .expect("zeropage")
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

/// The seal of an authenticated connection (AES-128-GCM, body encrypted in place) over one
/// 64-page stream batch and over one page (an urgent reply), each sealed then opened: what the
/// two sides pay together per frame. Beside them the keyed BLAKE3 MAC that protocol v1 used, the
/// measurement behind the choice.
fn auth_benches(c: &mut Criterion) {
    let key = postcopy::link::auth::Key::from_secret(b"a benchmark key of 32 bytes.....");
    let (mut tx, _) = key.frame_keys(&[1u8; 32], &[2u8; 32]);
    let mut rx = tx.clone();
    let header = [7u8; 32];
    let mut g = c.benchmark_group("auth");
    for (name, pages) in [("64_pages", 64), ("1_page", 1)] {
        let mut body = vec![0x5au8; pages * 4096];
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(format!("seal_open_{name}"), |b| {
            b.iter(|| {
                let t = tx.seal(&header, &mut body);
                rx.open(&header, &mut body, &t).expect("tag matches");
            })
        });
        let mac_key = [9u8; 32];
        g.bench_function(format!("blake3_mac_twice_{name}"), |b| {
            b.iter(|| {
                for _ in 0..2 {
                    let mut h = blake3::Hasher::new_keyed(&mac_key);
                    h.update(&header);
                    h.update(&body);
                    std::hint::black_box(h.finalize());
                }
            })
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    auth_benches,
    codec_benches,
    bitmap_benches,
    fault_read_benches,
    request_benches,
    receive_benches,
    placement_benches
);
criterion_main!(benches);
