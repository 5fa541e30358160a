//! Every kind of guest memory ([`Memory`]) end to end against a real source: every pattern,
//! with and without the stream, a key, zero pages, precopy; shared memory's direct receive;
//! and hostile input per kind (a batch that does not fit the block's pages, a corrupted sealed
//! body received straight into shared memory). Tests of 2 MiB kinds reserve the huge pages
//! they need and put `vm.nr_hugepages` back.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chaos_proxy::{Dir, Fault, Plan, Proxy};
use common::{
    drain_until_closed, encode, join_within, migrate, read_frame, send, wait_engine, DestOptions,
    FakeListener, HugePages, Source, SourceOptions, MIB, TIMEOUT,
};
use postcopy::codec::{Frame, Header, Welcome};
use postcopy::dest::{self, DestRam, Engine, EngineConfig, Memory};
use postcopy::image::{page_checksum, Image, Synthetic};
use postcopy::layout::Layout;
use postcopy::link::auth::Key;
use postcopy::workload::Pattern;

const ALL: [Memory; 5] = [
    Memory::Anon,
    Memory::Thp,
    Memory::Memfd,
    Memory::Hugetlb,
    Memory::HugetlbShared,
];

/// Image size of a run: 16 MiB of 4 KiB pages, 32 MiB (16 pages) of 2 MiB ones.
fn size_of(memory: Memory) -> u64 {
    if memory.needs_huge_pages() {
        32 * MIB
    } else {
        16 * MIB
    }
}

/// Huge pages for every 2 MiB kind's runs (the destination's memory, one run at a time, and
/// its zero buffers), or `None` where they cannot be reserved (those kinds are skipped).
fn huge_pages() -> Option<HugePages> {
    HugePages::reserve(2 * size_of(Memory::Hugetlb) / (2 * MIB) + 8)
}

fn key() -> Key {
    Key::from_secret(b"memory kinds test key, 32 bytes!")
}

/// A `Pages` header with its body length given (not the one the mask implies).
fn pages_header(page: u64, count: u16, body_len: u32) -> Header {
    Header {
        body_len,
        ..Header::pages(0, page, count, 0, 4096)
    }
}

#[test]
fn every_memory_kind_migrates_and_verifies() {
    let huge = huge_pages();
    let cases = [
        (Pattern::Random, true, false, 20),
        (Pattern::Sequential, true, true, 0),
        (Pattern::Zipf, true, false, 0),
        (Pattern::Random, false, true, 20),
    ];
    for memory in ALL {
        if memory.needs_huge_pages() && huge.is_none() {
            continue;
        }
        for (pattern, stream, keyed, zero_percent) in cases {
            let what = format!(
                "{} {pattern:?} stream {stream} key {keyed} zero {zero_percent}%",
                memory.name()
            );
            let k = keyed.then(key);
            let (out, report) = migrate(
                &SourceOptions {
                    size_bytes: size_of(memory),
                    page_size: memory.page_size(),
                    zero_percent,
                    key: k.clone(),
                    ..Default::default()
                },
                &DestOptions {
                    memory,
                    pattern,
                    stream,
                    key: k,
                    ..Default::default()
                },
            );
            out.assert_verified();
            assert!(report.complete, "{what}: {report:?}");
            let totals = &out.report().totals;
            if memory.is_shared() && stream && zero_percent == 0 {
                // All-data batches of the stream land straight in the page cache.
                assert!(
                    totals.pages_direct > 0,
                    "{what}: no direct receive: {totals:?}"
                );
            } else if !memory.is_shared() {
                assert_eq!(totals.pages_direct, 0, "{what}");
            }
            eprintln!("{what}: verified, {} direct", totals.pages_direct);
        }
    }
}

/// A precopy phase from `addr`, then postcopy, into `memory`, with a workload of 2 threads.
fn precopy_then_postcopy(
    addr: String,
    memory: Memory,
    zero_map: bool,
) -> postcopy::demo::RunOutcome {
    run_with(
        addr,
        memory,
        postcopy::demo::Handler::Engine,
        true,
        zero_map,
    )
}

/// A migration from `addr` into `memory` by `handler` (precopy first if `precopy`), with a
/// workload of 2 threads.
fn run_with(
    addr: String,
    memory: Memory,
    handler: postcopy::demo::Handler,
    precopy: bool,
    zero_map: bool,
) -> postcopy::demo::RunOutcome {
    let spec = postcopy::demo::RunSpec {
        handler,
        memory,
        workers: 2,
        pin: false,
        stream: true,
        workload: Some(postcopy::workload::WorkloadConfig {
            threads: 2,
            pattern: Pattern::Random,
            seed: 3,
        }),
        progress: postcopy::timeline::Progress::Quiet,
        gauges: Default::default(),
        zero_map,
        zero_fill: postcopy::dest::ZeroFill::Zeropage,
        max_streams: 0,
        fault_latency_target: None,
        precopy,
        key: None,
        recovery_timeout: Duration::from_secs(20),
        link_timeout: Duration::from_secs(20),
        tls: None,
    };
    let t = std::thread::spawn(move || postcopy::demo::run_destination(&addr, &spec));
    join_within(t, TIMEOUT, "destination").expect("destination run")
}

#[test]
fn the_baseline_places_private_huge_pages_zero_pages_included() {
    let Some(_huge) = huge_pages() else {
        return;
    };
    let src = Source::start(&SourceOptions {
        size_bytes: size_of(Memory::Hugetlb),
        page_size: Memory::Hugetlb.page_size(),
        zero_percent: 30,
        ..Default::default()
    });
    let addr = src.addr.to_string();
    let out = run_with(
        addr,
        Memory::Hugetlb,
        postcopy::demo::Handler::Baseline,
        false,
        false,
    );
    assert!(
        out.verified(),
        "final {:?}, engine {:?}",
        out.final_mismatches,
        out.engine.as_ref().map(|e| &e.totals)
    );
    assert!(out.engine.as_ref().expect("baseline").totals.pages_zero > 0);
    src.finish(Duration::from_secs(20));
}

#[test]
fn every_memory_kind_migrates_after_precopy() {
    let huge = huge_pages();
    for memory in ALL {
        if memory.needs_huge_pages() && huge.is_none() {
            continue;
        }
        let src = Source::start(&SourceOptions {
            size_bytes: size_of(memory),
            page_size: memory.page_size(),
            ..Default::default()
        });
        let addr = src.addr.to_string();
        let out = precopy_then_postcopy(addr, memory, true);
        assert!(
            out.verified(),
            "{}: final {:?}, engine {:?}",
            memory.name(),
            out.final_mismatches,
            out.engine.as_ref().map(|e| &e.totals)
        );
        assert!(out.precopy.is_some(), "{}: precopy ran", memory.name());
        src.finish(Duration::from_secs(20));
    }
}

#[test]
fn a_source_of_other_page_sizes_is_refused_with_the_fix() {
    let src = Source::start(&SourceOptions::default()); // 4 KiB pages
    let config = EngineConfig {
        source: src.addr.to_string(),
        workers: 1,
        ..Default::default()
    };
    let connected = dest::connect(&config).expect("connect");
    let e = DestRam::with_memory(&connected.welcome.layout, Memory::Hugetlb)
        .expect_err("4 KiB pages into hugetlbfs");
    let msg = e.to_string();
    assert!(msg.contains("--page-size 2M"), "{msg}");
    drop(connected);
    src.stop_and_join();
}

#[test]
fn a_source_refuses_a_destination_of_another_page_size_at_its_hello() {
    let src = Source::start(&SourceOptions::default()); // 4 KiB pages
    let config = EngineConfig {
        source: src.addr.to_string(),
        workers: 1,
        page_size: Some(Memory::Hugetlb.page_size()),
        ..Default::default()
    };
    let e = dest::connect(&config).expect_err("refused");
    let msg = e.to_string();
    assert!(
        msg.contains("--page-size 2M") && msg.contains("4K pages"),
        "{msg}"
    );
    let reports = src.stop_and_join();
    assert!(reports.is_empty(), "no session was opened: {reports:?}");
}

// ---------------------------------------------------------------------------------------------
// Hostile input per kind.

/// A fake source for one worker (urgent + bulk connections) serving `layout`: answers both
/// Hellos with a Welcome, then sends `bad` on the bulk connection and holds both open until
/// the engine closes them.
fn fake_source(layout: Layout, bad: Vec<u8>) -> (String, std::thread::JoinHandle<()>) {
    let fake = FakeListener::bind();
    let addr = fake.addr.to_string();
    let t = std::thread::spawn(move || {
        let image = Synthetic::new(layout.clone(), 5, 0);
        let mut conns = Vec::new();
        for _ in 0..2 {
            let mut s = fake
                .accept(Duration::from_secs(10))
                .expect("engine connects");
            let hello = read_frame(&mut s, None).expect("Hello").expect("a Hello");
            let Frame::Hello { role, .. } = hello else {
                panic!("expected Hello, got {hello:?}");
            };
            let welcome = Welcome {
                stopped_unix_us: 0,
                session: 7,
                layout: layout.clone(),
                image: image.info(),
            };
            send(&mut s, &encode(&Frame::Welcome(welcome)));
            conns.push((role, s));
        }
        for (role, s) in conns.iter_mut() {
            if *role == postcopy::codec::Role::Bulk {
                // The engine may refuse at the header and close before the body is written.
                let _ = std::io::Write::write_all(s, &bad);
            }
        }
        for (_, s) in conns.iter_mut() {
            drain_until_closed(s, Duration::from_secs(20));
        }
    });
    (addr, t)
}

/// Runs an engine of `memory` against the fake; returns its error and memory.
fn engine_against(memory: Memory, layout: Layout, bad: Vec<u8>) -> (String, Arc<DestRam>) {
    let (addr, fake) = fake_source(layout, bad);
    let config = EngineConfig {
        source: addr,
        workers: 1,
        pin: false,
        link_timeout: Duration::from_secs(10),
        recovery_timeout: Duration::ZERO,
        ..Default::default()
    };
    let t0 = Instant::now();
    let connected = dest::connect(&config).expect("handshake with the fake");
    let ram = Arc::new(DestRam::with_memory(&connected.welcome.layout, memory).expect("ram"));
    let handle = Engine::start(connected, ram.clone(), &config).expect("start");
    let e = wait_engine(handle, Duration::from_secs(20), "engine").expect_err("refused");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t0.elapsed()
    );
    join_within(fake, Duration::from_secs(30), "fake source");
    (e.to_string(), ram)
}

/// No page placed, and every page of the block reads zero (the engine has ended).
fn assert_nothing_landed(ram: &DestRam, what: &str) {
    assert_eq!(ram.pages_received(), 0, "{what}: pages placed");
    let block = &ram.layout.blocks[0];
    let ps = block.page_size as usize;
    let zero = page_checksum(&vec![0u8; ps]);
    let mut buf = vec![0u8; ps];
    for p in 0..block.pages() {
        ram.regions[0].read_into(p as usize * ps, &mut buf);
        assert_eq!(
            page_checksum(&buf),
            zero,
            "{what}: page {p} holds hostile bytes"
        );
    }
}

#[test]
fn a_batch_that_does_not_fit_the_blocks_pages_is_refused_before_anything_is_written() {
    let huge = huge_pages();
    for memory in ALL {
        if memory.needs_huge_pages() && huge.is_none() {
            continue;
        }
        let ps = memory.page_size();
        let layout = Layout::single("pc.ram", size_of(memory), ps).expect("layout");
        let pages = layout.blocks[0].pages();
        let other = if ps == 4096 { 2 << 20 } else { 4096 };
        let cases: [(&str, Header, usize); 3] = [
            // A page's body in the other page size.
            (
                "body of another page size",
                pages_header(1, 1, other as u32),
                other as usize,
            ),
            // Past the block's end.
            (
                "past the block",
                Header::pages(0, pages - 1, 2, 0, ps),
                2 * ps as usize,
            ),
            // Body length that is no whole number of the block's pages.
            (
                "ragged body",
                pages_header(0, 1, (ps + 512) as u32),
                ps as usize + 512,
            ),
        ];
        for (what, h, body) in cases {
            let what = format!("{}: {what}", memory.name());
            let mut bad = common::header_bytes(&h);
            bad.extend(std::iter::repeat_n(0xa5u8, body));
            let (msg, ram) = engine_against(memory, layout.clone(), bad);
            assert!(
                msg.contains("bulk connection") || msg.contains("page"),
                "{what}: {msg}"
            );
            assert_nothing_landed(&ram, &what);
        }
    }
}

#[test]
fn a_corrupted_body_received_into_shared_memory_is_never_mapped() {
    // A keyed source streams all-data batches, received straight into the memfd's page cache;
    // one byte of the bulk connection is flipped past its first batches.
    let huge = huge_pages();
    for memory in [Memory::Memfd, Memory::HugetlbShared] {
        if memory.needs_huge_pages() && huge.is_none() {
            continue;
        }
        let src = Source::start(&SourceOptions {
            size_bytes: size_of(memory),
            page_size: memory.page_size(),
            zero_percent: 0,
            key: Some(key()),
            ..Default::default()
        });
        // Connection 0 is the handshake's (worker 0's urgent half), connection 1 the bulk one.
        let plan = Plan::per_connection(vec![
            vec![],
            vec![Fault::FlipAt {
                direction: Dir::ToClient,
                offset_bytes: 3 * MIB + 1000,
            }],
        ]);
        let proxy = Proxy::start(src.addr, plan).expect("proxy");
        let config = EngineConfig {
            source: proxy.local_addr().to_string(),
            workers: 1,
            pin: false,
            key: Some(key()),
            recovery_timeout: Duration::ZERO,
            ..Default::default()
        };
        let connected = dest::connect(&config).expect("connect");
        let layout = connected.welcome.layout.clone();
        let image = Synthetic::new(layout.clone(), SourceOptions::default().seed, 0);
        let ram = Arc::new(DestRam::with_memory(&layout, memory).expect("ram"));
        let handle = Engine::start(connected, ram.clone(), &config).expect("start");
        let e = wait_engine(handle, TIMEOUT, "engine").expect_err("a corrupted frame ends it");
        let what = memory.name();
        assert!(e.to_string().contains("integrity"), "{what}: {e}");
        // Every page placed is the image's; every other page reads zero.
        let ps = layout.blocks[0].page_size as usize;
        let (mut got, mut want) = (vec![0u8; ps], vec![0u8; ps]);
        let zero = page_checksum(&vec![0u8; ps]);
        let mut placed = 0;
        for p in 0..layout.blocks[0].pages() {
            ram.regions[0].read_into(p as usize * ps, &mut got);
            if ram.received[0].get(p) {
                placed += 1;
                image.fill(0, p, &mut want);
                assert_eq!(
                    page_checksum(&got),
                    page_checksum(&want),
                    "{what}: page {p}"
                );
            } else {
                assert_eq!(
                    page_checksum(&got),
                    zero,
                    "{what}: unplaced page {p} is visible"
                );
            }
        }
        assert!(
            placed > 0 && placed < layout.blocks[0].pages(),
            "{what}: {placed} placed"
        );
        drop(proxy);
        src.stop_and_join();
    }
}

#[test]
fn discards_drop_pages_of_every_kind_and_cleanup_releases_the_memory() {
    let huge = huge_pages();
    for memory in ALL {
        if memory.needs_huge_pages() && huge.is_none() {
            continue;
        }
        let what = memory.name();
        let ps = memory.page_size();
        let layout = Layout::single("pc.ram", size_of(memory), ps).expect("layout");
        let free_before = postcopy::dest::memory::free_huge_pages_2m();
        let ram = DestRam::with_memory(&layout, memory).expect("ram");
        if memory.needs_huge_pages() {
            let used = free_before - postcopy::dest::memory::free_huge_pages_2m();
            assert!(
                used <= layout.blocks[0].pages(),
                "{what}: {used} huge pages for {} pages",
                layout.blocks[0].pages()
            );
        }
        // Precopy writes pages 1 and 2; a discard drops page 1 (and a range past the block is
        // refused).
        let data = vec![0x5au8; ps as usize];
        ram.write_page(0, 1, &data).expect("write");
        ram.write_page(0, 2, &data).expect("write");
        ram.discard_range(0, 1, 1).expect("discard");
        assert!(
            ram.discard_range(0, layout.blocks[0].pages(), 1).is_err(),
            "{what}"
        );
        assert!(!ram.received[0].get(1) && ram.received[0].get(2), "{what}");
        let mut buf = vec![0u8; ps as usize];
        ram.regions[0].read_into(ps as usize, &mut buf);
        assert!(
            buf.iter().all(|&b| b == 0),
            "{what}: a discarded page reads zero"
        );
        ram.regions[0].read_into(2 * ps as usize, &mut buf);
        assert_eq!(buf, data, "{what}: the page kept");
        if let Some(sh) = ram.shared_block(0) {
            assert!(
                !sh.claims.get(1) && sh.claims.get(2),
                "{what}: claims follow"
            );
        }
        drop(ram);
        if memory.needs_huge_pages() {
            assert_eq!(
                postcopy::dest::memory::free_huge_pages_2m(),
                free_before,
                "{what}: huge pages given back"
            );
        }
    }
}

#[test]
fn a_live_source_of_huge_pages_precopies_discards_and_verifies() {
    // The live writer dirties 4 KiB pages; the tracker reports 4 KiB pages; precopy must
    // resend (and the destination discard) the 2 MiB pages holding them.
    if postcopy::dirty::UffdWpTracker::available().is_err() {
        eprintln!("skipped: no dirty-page tracking here");
        return;
    }
    let huge = huge_pages();
    for memory in [Memory::Hugetlb, Memory::HugetlbShared] {
        if huge.is_none() {
            return;
        }
        let layout = Layout::single("pc.ram", size_of(memory), memory.page_size()).expect("layout");
        let (image, parts) =
            postcopy::demo::live_source(&layout, 9, 10, 20_000).expect("live source");
        let server = postcopy::source::SourceServer::bind_live(
            "127.0.0.1:0",
            image,
            parts,
            postcopy::source::SourceConfig {
                once: true,
                verbose: false,
                precopy: postcopy::source::PrecopyLimits {
                    max_rounds: 3,
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .expect("bind live");
        let addr = server.local_addr().to_string();
        let t_src = std::thread::spawn(move || server.run().expect("source run"));
        let out = precopy_then_postcopy(addr, memory, false);
        let what = memory.name();
        assert!(
            out.verified(),
            "{what}: not verified: {:?}",
            out.final_mismatches
        );
        let pre = out.precopy.as_ref().expect("precopy ran");
        assert!(
            pre.pages_discarded > 0,
            "{what}: the writer dirtied pages: {pre:?}"
        );
        assert!(
            pre.pages_discarded <= layout.blocks[0].pages(),
            "{what}: discards counted in huge pages: {pre:?}"
        );
        let reports = join_within(t_src, TIMEOUT, "live source");
        assert!(reports.iter().all(|r| r.complete), "{what}: {reports:?}");
    }
}
