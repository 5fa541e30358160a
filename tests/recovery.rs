//! Recovery: a migration through `tools/chaos-proxy` that cuts connections at random byte
//! offsets (some inside a page batch, some inside a request) completes and verifies every page;
//! both sides count the recoveries. Seeds and size from `CHAOS_SEEDS` (default 20) and
//! `CHAOS_MIB` (default 64).

mod common;

use std::time::Duration;

use chaos_proxy::{Dir, Fault, Plan, Proxy, RandomCuts};
use common::*;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn migration_survives_random_cuts() {
    chaos(
        env_u64("CHAOS_SEEDS", 20),
        env_u64("CHAOS_MIB", 64) * MIB,
        None,
    );
}

#[test]
fn authenticated_migration_survives_random_cuts() {
    // Every reconnection authenticates again and gets fresh frame keys.
    let key = postcopy::link::auth::Key::from_secret(b"recovery test key, 32 bytes long");
    chaos(3, 64 * MIB, Some(key));
}

fn chaos(seeds: u64, size: u64, key: Option<postcopy::link::auth::Key>) {
    for seed in 1..=seeds {
        let src = Source::start(&SourceOptions {
            size_bytes: size,
            once: false,
            seed: 0x000c_4a05 ^ seed,
            key: key.clone(),
            ..Default::default()
        });
        // Cuts per new connection until 20 were made: offsets up to 1 MiB in either direction,
        // so some fall inside a stream batch or reply (to the client), some inside a request
        // (to the server).
        // 20 cuts: worker 0's urgent connection (the first) toward the source after a few
        // requests, at a seeded offset (inside a request); then 19 seeded random cuts toward
        // the destination, one per new connection, at up to 4 MiB (inside stream batches and
        // replies).
        let to_server_at = 40 + seed.wrapping_mul(0x9e37_79b9) % 1500;
        let proxy = Proxy::start(
            src.addr,
            Plan {
                per_connection: vec![vec![Fault::CutAt {
                    direction: Dir::ToServer,
                    offset_bytes: to_server_at,
                }]],
                ..Plan::random_cuts(RandomCuts {
                    seed,
                    cuts: 19,
                    min_offset: 4096,
                    max_offset: 4 << 20,
                    direction: Some(Dir::ToClient),
                })
            },
        )
        .expect("proxy");
        let out = run_dest(
            proxy.local_addr(),
            &DestOptions {
                threads: 2,
                key: key.clone(),
                // Half the seeds with the handler's late-joining bulk halves; every third with
                // a credit-driven stream (each new bulk connection starts its grants again).
                bulk_joins_after_go: seed % 2 == 0,
                fault_latency_target: (seed % 3 == 0).then(|| Duration::from_micros(200)),
                ..Default::default()
            },
        );
        out.assert_verified();
        let r = out.report();
        let cuts = proxy.stats().cuts.len() as u64;
        let to_server = proxy
            .stats()
            .cuts
            .iter()
            .filter(|c| c.direction == Some(Dir::ToServer))
            .count();
        drop(proxy);
        let reports = src.stop_and_join();
        assert_eq!(complete_sessions(&reports), 1, "seed {seed}: {reports:#?}");
        let src_recoveries: u64 = reports.iter().map(|r| r.recoveries).sum();
        println!(
            "seed {seed}: {cuts} cuts ({to_server} toward the source), {} recoveries, {} pages swept, {} resent by the source",
            r.totals.recoveries,
            r.totals.pages_swept,
            reports.iter().map(|r| r.pages_resent).sum::<u64>()
        );
        assert!(cuts >= 10, "seed {seed}: the proxy cut only {cuts} times");
        assert!(
            r.totals.recoveries >= cuts.min(1),
            "seed {seed}: {cuts} cuts, {} recoveries",
            r.totals.recoveries
        );
        assert_eq!(
            src_recoveries, r.totals.recoveries,
            "seed {seed}: both sides count them"
        );
    }
}

/// A one-worker, demand-only engine on `source` with a 2 s recovery timeout, started.
fn demand_only_engine(
    source: std::net::SocketAddr,
) -> (
    postcopy::dest::EngineHandle,
    std::sync::Arc<postcopy::dest::DestRam>,
) {
    let config = postcopy::dest::EngineConfig {
        source: source.to_string(),
        workers: 1,
        stream: false,
        pin: false,
        recovery_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let connected = postcopy::dest::connect(&config).expect("connect");
    let ram =
        std::sync::Arc::new(postcopy::dest::DestRam::new(&connected.welcome.layout).expect("ram"));
    let handle = postcopy::dest::Engine::start(connected, ram.clone(), &config).expect("engine");
    (handle, ram)
}

#[test]
fn a_dead_source_is_reported_within_the_recovery_timeout() {
    // The source goes away for good in the middle of postcopy: the destination gives up after
    // its recovery timeout with an error that says how much is missing, and its workload's
    // blocked touches end (the engine stops).
    let src = Source::start(&SourceOptions {
        size_bytes: 64 * MIB,
        once: false,
        urgent_delay: Duration::from_millis(2),
        ..Default::default()
    });
    let proxy = Proxy::start(src.addr, Plan::none()).expect("proxy");
    let (handle, ram) = demand_only_engine(proxy.local_addr());
    // Fault a few pages, then kill the source's reachability: stop the source and the proxy
    // upstream so every reconnect fails.
    let r2 = ram.clone();
    let toucher = std::thread::spawn(move || {
        for p in 0..2000u64 {
            std::hint::black_box(r2.regions[0].touch((p * 4096) as usize));
        }
    });
    std::thread::sleep(Duration::from_millis(50));
    proxy.set_upstream("127.0.0.1:9".parse().unwrap()); // nothing listens there
    proxy.cut_all();
    let t0 = std::time::Instant::now();
    let e = wait_engine(handle, TIMEOUT, "engine whose source is gone")
        .expect_err("the migration cannot finish");
    let took = t0.elapsed();
    assert!(
        matches!(e, postcopy::dest::DestError::SourceLost { .. }),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(msg.contains("still missing"), "{msg}");
    assert!(
        took < Duration::from_secs(6),
        "reported after {took:?}, timeout 2 s"
    );
    join_within(toucher, TIMEOUT, "touching thread");
    drop(src);
}

/// A free TCP port on 127.0.0.1 (bound and released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `postcopy serve` of the test image on `port`, each reply delayed by `delay_ms` (killed when
/// dropped).
fn start_serve(port: u16, delay_ms: u64) -> Proc {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_postcopy"));
    cmd.args([
        "serve",
        "--insecure",
        "--quiet",
        "--synthetic",
        "64M",
        "--seed",
        "7",
    ])
    .args(["--zero-percent", "20", "--listen"])
    .arg(format!("127.0.0.1:{port}"))
    .arg("--debug-urgent-delay-ms")
    .arg(delay_ms.to_string())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::null());
    let mut serve = Proc::spawn(&mut cmd, "postcopy serve").expect("postcopy serve");
    let line = serve.stdout_line(IO_TIMEOUT);
    assert!(line.starts_with("listening on"), "{line}");
    serve
}

#[test]
fn a_restarted_source_resumes_the_session() {
    // The source process is killed in the middle of postcopy and started again on the same
    // address with the same image: the destination reconnects, the new process rebuilds the
    // session from what the destination has, and every page verifies.
    let port = free_port();
    // The first process answers slowly (1 ms per request), so the kill surely lands in
    // postcopy on any machine; the restarted one answers at full speed.
    let mut first = start_serve(port, 1);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let restarted = std::sync::Arc::new(std::sync::Mutex::new(None));
    let r2 = restarted.clone();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(150));
        first.kill(); // SIGKILL: no goodbye
        std::thread::sleep(Duration::from_millis(300));
        *r2.lock().unwrap() = Some(start_serve(port, 0));
    });
    let out = run_dest(
        addr,
        &DestOptions {
            workers: 2,
            // Demand-only and slowed down a little: the kill lands in postcopy.
            stream: false,
            threads: 2,
            ..Default::default()
        },
    );
    join_within(killer, TIMEOUT, "killer");
    if let Some(mut c) = restarted.lock().unwrap().take() {
        c.kill();
    }
    out.assert_verified();
    let r = out.report();
    assert!(r.totals.recoveries >= 1, "{:?}", r.totals);
    println!(
        "restart: {} recoveries, {} pages by fault",
        r.totals.recoveries, r.totals.pages_by_fault
    );
}

#[test]
fn a_panicking_source_thread_ends_its_session_cleanly() {
    // A bug in a connection thread (here a test hook: a panic at the 5th request) must end that
    // session with an error the destination hears at once, be reaped and reported, and not
    // hang anything.
    let src = Source::start(&SourceOptions {
        size_bytes: 16 * MIB,
        once: true,
        panic_at_request: 5,
        ..Default::default()
    });
    let (handle, ram) = demand_only_engine(src.addr);
    let r2 = ram.clone();
    let toucher = std::thread::spawn(move || {
        for p in 0..64u64 {
            std::hint::black_box(r2.regions[0].touch((p * 4096 * 7) as usize));
        }
    });
    let e = wait_engine(handle, TIMEOUT, "engine whose source panicked")
        .expect_err("the migration cannot finish");
    assert!(e.to_string().contains("panicked"), "{e}");
    join_within(toucher, TIMEOUT, "touching thread");
    let reports = src.finish(TIMEOUT);
    assert_eq!(reports.len(), 1, "{reports:?}");
    let why = reports[0].error.as_deref().unwrap_or_default();
    assert!(
        !reports[0].complete && why.contains("panicked"),
        "{reports:?}"
    );
}
