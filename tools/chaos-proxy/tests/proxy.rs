//! The proxy against small upstream servers on 127.0.0.1. Every blocking read has a timeout, and
//! every other wait (a thread, a condition, a child process) a deadline, so a hang fails the test
//! instead of stalling the run.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use chaos_proxy::{CutCause, Dir, Fault, Plan, Proxy, RandomCuts};

const TIMEOUT: Duration = Duration::from_secs(10);

/// Polls `done` until it holds, failing the test naming `what` after [`TIMEOUT`].
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {TIMEOUT:?}");
        thread::sleep(Duration::from_millis(5));
    }
}

/// Joins a thread, failing the test if it does not end within [`TIMEOUT`] (it is then leaked).
fn join_within<T>(t: thread::JoinHandle<T>, what: &str) -> T {
    wait_for(&format!("{what} to end"), || t.is_finished());
    t.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// A child process, killed and reaped on drop.
struct Proc(Child);

impl Proc {
    /// Waits (bounded) for it to exit and collects its output, killing it past [`TIMEOUT`].
    fn output(mut self, what: &str) -> Output {
        let stdout = self.0.stdout.take();
        let stderr = self.0.stderr.take();
        let drain = |r: Option<Box<dyn Read + Send>>| {
            thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut r) = r {
                    let _ = r.read_to_end(&mut buf);
                }
                buf
            })
        };
        let out = drain(stdout.map(|r| Box::new(r) as Box<dyn Read + Send>));
        let err = drain(stderr.map(|r| Box::new(r) as Box<dyn Read + Send>));
        wait_for(&format!("{what} to exit"), || {
            !matches!(self.0.try_wait(), Ok(None))
        });
        let status = self.0.wait().unwrap();
        Output {
            status,
            stdout: join_within(out, &format!("{what}'s stdout")),
            stderr: join_within(err, &format!("{what}'s stderr")),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Reads one line from `r` on a helper thread, failing the test after [`TIMEOUT`].
fn read_line_within(r: impl Read + Send + 'static, what: &str) -> String {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut line = String::new();
        let _ = tx.send(BufReader::new(r).read_line(&mut line).map(|_| line));
    });
    match rx.recv_timeout(TIMEOUT) {
        Ok(r) => r.unwrap_or_else(|e| panic!("{what}: {e}")),
        Err(_) => panic!("{what}: no line within {TIMEOUT:?}"),
    }
}

/// A server on 127.0.0.1 running `handler` on a thread per connection.
fn upstream(handler: impl Fn(TcpStream) + Send + Sync + Clone + 'static) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            stream.set_read_timeout(Some(TIMEOUT)).unwrap();
            stream.set_write_timeout(Some(TIMEOUT)).unwrap();
            let h = handler.clone();
            thread::spawn(move || h(stream));
        }
    });
    addr
}

/// Echoes everything back.
fn echo(mut s: TcpStream) {
    let mut buf = [0u8; 16384];
    while let Ok(n @ 1..) = s.read(&mut buf) {
        if s.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_right(13) as u8)
        .collect()
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.set_write_timeout(Some(TIMEOUT)).unwrap();
    s
}

/// Reads until EOF or an error; panics on a timeout.
fn read_until_end(s: &mut impl Read) -> (Vec<u8>, io::Result<()>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (got, Ok(())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                panic!("read timed out after {} bytes", got.len())
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (got, Err(e)),
        }
    }
}

fn cut_at(direction: Dir, offset_bytes: u64) -> Fault {
    Fault::CutAt {
        direction,
        offset_bytes,
    }
}

#[test]
fn cut_to_client_delivers_exactly_offset_bytes_then_eof() {
    const TOTAL: usize = 1 << 20;
    const N: usize = 100_003;
    let (tx, rx) = mpsc::channel();
    let server = upstream(move |mut s| {
        let _ = s.write_all(&pattern(TOTAL));
        // The proxy's FIN (or a reset) must reach the server side too.
        let _ = tx.send(read_until_end(&mut s).1.map_err(|e| e.kind()));
    });
    let proxy = Proxy::start(
        server,
        Plan::per_connection(vec![vec![cut_at(Dir::ToClient, N as u64)]]),
    )
    .unwrap();

    let (got, end) = read_until_end(&mut connect(proxy.local_addr()));
    assert_eq!(got.len(), N);
    assert!(got == pattern(N), "wrong bytes");
    assert!(end.is_ok(), "expected EOF, got {end:?}");
    assert!(rx.recv_timeout(TIMEOUT).is_ok(), "server side saw no break");

    let stats = proxy.stats();
    assert_eq!(stats.cuts.len(), 1);
    let cut = &stats.cuts[0];
    assert_eq!(
        (cut.conn, cut.cause, cut.direction, cut.offset),
        (0, CutCause::Planned, Some(Dir::ToClient), N as u64)
    );
    assert_eq!(cut.to_client, N as u64);

    // The next connection has no faults.
    let mut client = connect(proxy.local_addr());
    client.shutdown(Shutdown::Write).unwrap();
    let (got, end) = read_until_end(&mut client);
    assert!(end.is_ok());
    assert!(got == pattern(TOTAL));
    assert_eq!(proxy.stats().cuts.len(), 1);
    assert_eq!(proxy.stats().connected, 2);
}

#[test]
fn cut_to_server_delivers_exactly_offset_bytes_then_eof() {
    const TOTAL: usize = 1 << 20;
    const N: usize = 65_536 + 17;
    let (tx, rx) = mpsc::channel();
    let server = upstream(move |mut s| {
        let (got, end) = read_until_end(&mut s);
        let _ = tx.send((got, end.map_err(|e| e.kind())));
    });
    let proxy = Proxy::start(
        server,
        Plan::per_connection(vec![vec![cut_at(Dir::ToServer, N as u64)]]),
    )
    .unwrap();

    let mut client = connect(proxy.local_addr());
    let mut writer = client.try_clone().unwrap();
    let w = thread::spawn(move || {
        let _ = writer.write_all(&pattern(TOTAL));
    });
    let (got, end) = read_until_end(&mut client);
    assert!(got.is_empty());
    assert!(
        end.is_ok() || end.as_ref().unwrap_err().kind() == io::ErrorKind::ConnectionReset,
        "{end:?}"
    );
    let (got, end) = rx.recv_timeout(TIMEOUT).unwrap();
    assert_eq!(got.len(), N);
    assert!(got == pattern(N), "wrong bytes");
    assert_eq!(end, Ok(()));
    join_within(w, "client writer");
    let cuts = proxy.stats().cuts;
    assert_eq!(cuts.len(), 1);
    assert_eq!(
        (cuts[0].direction, cuts[0].offset),
        (Some(Dir::ToServer), N as u64)
    );
}

#[test]
fn cut_at_offset_zero_and_reset_mode() {
    let (tx, rx) = mpsc::channel();
    let server = upstream(move |mut s| {
        // The first error the server sees, writing or reading.
        let end = s
            .write_all(&pattern(300_000))
            .and_then(|()| read_until_end(&mut s).1);
        let _ = tx.send(end.map_err(|e| e.kind()));
    });
    let is_reset = |end: Result<(), io::ErrorKind>| {
        matches!(
            end,
            Err(io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe)
        )
    };
    let plan = Plan {
        reset: true,
        ..Plan::per_connection(vec![
            vec![cut_at(Dir::ToServer, 0)],
            vec![cut_at(Dir::ToClient, 200_000)],
        ])
    };
    let proxy = Proxy::start(server, plan).unwrap();

    // Connection 0: cut before any byte, with a reset.
    let (got, end) = read_until_end(&mut connect(proxy.local_addr()));
    assert!(got.is_empty());
    assert!(
        matches!(&end, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
        "{end:?}"
    );
    let end = rx.recv_timeout(TIMEOUT).unwrap();
    assert!(is_reset(end), "{end:?}");

    // Connection 1: exactly 200000 bytes, then a reset, on both sides.
    let (got, end) = read_until_end(&mut connect(proxy.local_addr()));
    assert_eq!(got.len(), 200_000);
    assert!(got == pattern(200_000));
    assert_eq!(
        end.map_err(|e| e.kind()),
        Err(io::ErrorKind::ConnectionReset)
    );
    assert_eq!(
        rx.recv_timeout(TIMEOUT).unwrap(),
        Err(io::ErrorKind::ConnectionReset)
    );

    let cuts = proxy.stats().cuts;
    assert_eq!(
        cuts.iter()
            .map(|c| (c.conn, c.direction, c.offset))
            .collect::<Vec<_>>(),
        [
            (0, Some(Dir::ToServer), 0),
            (1, Some(Dir::ToClient), 200_000)
        ]
    );
}

/// Sequential echo connections through a proxy with random cuts until `cuts` were made, then one
/// more, which must pass untouched; returns the cuts as (connection, direction, offset).
fn random_run(seed: u64, cuts: usize) -> Vec<(usize, Dir, u64)> {
    const PER_CONN: usize = 100_000;
    let random = RandomCuts {
        seed,
        cuts,
        min_offset: 1,
        max_offset: 50_000,
        direction: None,
    };
    let proxy = Proxy::start(upstream(echo), Plan::random_cuts(random)).unwrap();
    let data = pattern(PER_CONN);
    let mut intact = 0;
    for _ in 0..cuts + 5 {
        let mut client = connect(proxy.local_addr());
        let mut writer = client.try_clone().unwrap();
        let d = data.clone();
        let w = thread::spawn(move || {
            let _ = writer.write_all(&d);
            let _ = writer.shutdown(Shutdown::Write);
        });
        let (got, _) = read_until_end(&mut client);
        join_within(w, "client writer");
        assert!(got[..] == data[..got.len()], "echo corrupted");
        if got.len() == PER_CONN {
            intact += 1;
            if proxy.stats().cuts.len() == cuts {
                break;
            }
        }
    }
    assert_eq!(
        intact, 1,
        "only the connection after the last cut should be intact"
    );
    let stats = proxy.stats();
    assert_eq!(stats.cuts.len(), cuts);
    for c in &stats.cuts {
        assert_eq!(c.cause, CutCause::Random);
    }
    stats
        .cuts
        .iter()
        .map(|c| (c.conn, c.direction.unwrap(), c.offset))
        .collect()
}

#[test]
fn random_cuts_are_reproducible_and_exactly_counted() {
    let a = random_run(42, 3);
    assert_eq!(a, random_run(42, 3));
    // One connection at a time: connection i is cut where draw(i) says.
    let random = RandomCuts {
        seed: 42,
        cuts: 3,
        min_offset: 1,
        max_offset: 50_000,
        direction: None,
    };
    let expected: Vec<_> = (0..3)
        .map(|i| (i, random.draw(i).0, random.draw(i).1))
        .collect();
    assert_eq!(a, expected);
    assert_ne!(a, random_run(43, 3));
}

#[test]
fn delay_and_stall_slow_forwarding_down() {
    // Delay: 10 round trips, each answer delayed 30 ms.
    let plan = Plan::every_connection(vec![Fault::Delay {
        direction: Dir::ToClient,
        micros: 30_000,
    }]);
    let proxy = Proxy::start(upstream(echo), plan).unwrap();
    let mut client = connect(proxy.local_addr());
    let start = Instant::now();
    for i in 0..10u8 {
        client.write_all(&[i; 10]).unwrap();
        let mut answer = [0u8; 10];
        client.read_exact(&mut answer).unwrap();
        assert_eq!(answer, [i; 10]);
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_secs(5),
        "{took:?}"
    );

    // Stall: the first 1000 bytes at once, the rest after 300 ms.
    let server = upstream(|mut s| {
        let _ = s.write_all(&pattern(2000));
    });
    let plan = Plan::per_connection(vec![vec![Fault::StallAt {
        direction: Dir::ToClient,
        offset_bytes: 1000,
        millis: 300,
    }]]);
    let proxy = Proxy::start(server, plan).unwrap();
    let mut client = connect(proxy.local_addr());
    let mut first = vec![0u8; 1000];
    client.read_exact(&mut first).unwrap();
    let start = Instant::now();
    let (rest, end) = read_until_end(&mut client);
    let took = start.elapsed();
    end.unwrap();
    assert_eq!([first, rest].concat(), pattern(2000));
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

#[test]
fn flip_corrupts_exactly_one_byte() {
    let server = upstream(|mut s| {
        let _ = s.write_all(&pattern(200_000));
    });
    let offset = 70_001;
    let plan = Plan::per_connection(vec![vec![Fault::FlipAt {
        direction: Dir::ToClient,
        offset_bytes: offset,
    }]]);
    let proxy = Proxy::start(server, plan).unwrap();
    let mut client = connect(proxy.local_addr());
    let (got, end) = read_until_end(&mut client);
    end.unwrap();
    let mut want = pattern(200_000);
    want[offset as usize] ^= 0xff;
    assert_eq!(got, want);
}

#[test]
fn set_upstream_redirects_new_connections() {
    let a = upstream(|mut s| {
        let _ = s.write_all(b"A");
        echo(s);
    });
    let b = upstream(|mut s| {
        let _ = s.write_all(b"B");
    });
    let proxy = Proxy::start(a, Plan::none()).unwrap();
    let mut old = connect(proxy.local_addr());
    let mut byte = [0u8; 1];
    old.read_exact(&mut byte).unwrap();
    assert_eq!(&byte, b"A");

    proxy.set_upstream(b);
    assert_eq!(proxy.upstream(), b);
    assert_eq!(read_until_end(&mut connect(proxy.local_addr())).0, b"B");
    // The open connection still goes to A.
    old.write_all(b"ping").unwrap();
    let mut pong = [0u8; 4];
    old.read_exact(&mut pong).unwrap();
    assert_eq!(&pong, b"ping");

    // An upstream that is down: the client is closed, nothing is numbered.
    let down = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    proxy.set_upstream(down);
    let (got, _) = read_until_end(&mut connect(proxy.local_addr()));
    assert!(got.is_empty());
    let stats = proxy.stats();
    assert_eq!(
        (stats.accepted, stats.connected, stats.upstream_failures),
        (3, 2, 1)
    );
    assert!(stats.cuts.is_empty());
}

#[test]
fn cut_all_and_drop_do_not_hang() {
    // A server that floods, and a second connection stalled for a minute.
    let server = upstream(|mut s| {
        let chunk = vec![7u8; 65536];
        while s.write_all(&chunk).is_ok() {}
    });
    let stall = Fault::StallAt {
        direction: Dir::ToClient,
        offset_bytes: 0,
        millis: 60_000,
    };
    let plan = Plan::per_connection(vec![vec![], vec![stall], vec![], vec![stall]]);
    let proxy = Proxy::start(server, plan).unwrap();

    // cut_all: both clients see the end promptly, the stalled one included.
    let mut c0 = connect(proxy.local_addr());
    let mut c1 = connect(proxy.local_addr());
    let mut some = [0u8; 1000];
    c0.read_exact(&mut some).unwrap();
    wait_for("two connections open through the proxy", || {
        proxy.stats().open >= 2
    });
    let start = Instant::now();
    assert_eq!(proxy.cut_all(), 2);
    let (_, end0) = read_until_end(&mut c0);
    let (got1, end1) = read_until_end(&mut c1);
    assert!(end0.is_ok() && end1.is_ok() && got1.is_empty());
    assert!(start.elapsed() < Duration::from_secs(5));
    let cuts = proxy.stats().cuts;
    assert_eq!(cuts.len(), 2);
    assert!(cuts
        .iter()
        .all(|c| c.cause == CutCause::CutAll && c.direction.is_none()));

    // Drop with a client that does not read (the proxy blocks writing to it) and a stalled one.
    let _c2 = connect(proxy.local_addr());
    let mut c3 = connect(proxy.local_addr());
    wait_for("two connections open through the proxy", || {
        proxy.stats().open >= 2
    });
    thread::sleep(Duration::from_millis(100));
    let addr = proxy.local_addr();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        drop(proxy);
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(5)).expect("drop hung");
    let (got3, _) = read_until_end(&mut c3);
    assert!(got3.is_empty());
    assert!(
        TcpStream::connect(addr).is_err(),
        "still listening after drop"
    );
}

#[test]
fn cli_prints_address_and_cuts() {
    let server = upstream(|mut s| {
        let _ = s.write_all(&pattern(5000));
        let _ = read_until_end(&mut s);
    });
    let mut child = Proc(
        Command::new(env!("CARGO_BIN_EXE_chaos-proxy"))
            .args([
                "--upstream",
                &server.to_string(),
                "--cut",
                "to-client:1K@1",
                "--linger-ms",
                "200",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let line = read_line_within(child.0.stdout.take().unwrap(), "chaos-proxy's address line");
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("listening on ")
        .expect(&line)
        .parse()
        .unwrap();

    let mut c0 = connect(addr);
    c0.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_until_end(&mut c0).0, pattern(5000));
    let mut c1 = connect(addr);
    assert_eq!(read_until_end(&mut c1).0, pattern(1024));

    child.0.kill().unwrap();
    let log = child.output("chaos-proxy after its kill").stderr;
    let log = String::from_utf8_lossy(&log);
    assert!(
        log.contains("conn 1 cut (planned) to-client at offset 1024"),
        "{log}"
    );

    let help = Proc(
        Command::new(env!("CARGO_BIN_EXE_chaos-proxy"))
            .arg("--help")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )
    .output("chaos-proxy --help");
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("--random-cuts"));
}

/// Echo traffic on `n` connections through `proxy` until each ends (a victim's cut) or
/// `deadline`: returns how each ended (`true`: cut by EOF or reset).
fn echo_traffic(proxy: &Proxy, n: usize, deadline: Instant) -> Vec<bool> {
    let addr = proxy.local_addr();
    let threads: Vec<_> = (0..n)
        .map(|_| {
            thread::spawn(move || {
                let mut s = connect(addr);
                let chunk = pattern(4096);
                let mut back = vec![0u8; 4096];
                while Instant::now() < deadline {
                    if s.write_all(&chunk).is_err() {
                        return true;
                    }
                    match s.read_exact(&mut back) {
                        Ok(()) => assert_eq!(back, chunk, "echoed intact"),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            panic!("an echo stalled")
                        }
                        Err(_) => return true,
                    }
                }
                false
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| join_within(t, "an echo client"))
        .collect()
}

#[test]
fn victims_are_live_connections_and_every_blow_is_dealt() {
    let up = upstream(echo);
    let run = |seed| {
        let plan = Plan {
            victims: Some(chaos_proxy::RandomVictims {
                seed,
                blows: 3,
                min_gap: 64 << 10,
                max_gap: 256 << 10,
                reset: true,
                fin: true,
                silence: None,
            }),
            ..Plan::none()
        };
        let proxy = Proxy::start(up, plan).unwrap();
        // Three connections, so the three blows fall on distinct live ones.
        let ended = echo_traffic(&proxy, 3, Instant::now() + Duration::from_secs(5));
        let stats = proxy.stats();
        (ended, stats)
    };
    let (ended, stats) = run(7);
    assert_eq!(stats.blows.len(), 3, "{:?}", stats.blows);
    assert!(
        ended.iter().all(|cut| *cut),
        "every connection was a victim: {ended:?}"
    );
    let mut victims: Vec<usize> = stats.blows.iter().map(|b| b.conn).collect();
    victims.sort_unstable();
    assert_eq!(victims, [0, 1, 2], "a victim is always a live connection");
    assert!(stats.cuts.iter().all(|c| c.cause == CutCause::Victim));
    // The draws (kind, point) depend on the seed only.
    let kinds = |s: &chaos_proxy::Stats| s.blows.iter().map(|b| b.blow).collect::<Vec<_>>();
    let (_, again) = run(7);
    assert_eq!(kinds(&stats), kinds(&again), "same seed, same blows");
}

#[test]
fn a_silent_link_forwards_nothing_then_everything() {
    let up = upstream(echo);
    let proxy = Proxy::start(up, Plan::none()).unwrap();
    let mut before = connect(proxy.local_addr());
    before.write_all(b"ping").unwrap();
    let mut got = [0u8; 4];
    before.read_exact(&mut got).unwrap();
    let silence = Duration::from_millis(400);
    proxy.silence_all(silence);
    let t0 = Instant::now();
    // An open connection and one opened during the silence both wait it out, then get
    // everything.
    let mut during = connect(proxy.local_addr());
    for s in [&mut before, &mut during] {
        s.write_all(b"pong").unwrap();
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"pong");
    }
    let waited = t0.elapsed();
    assert!(
        waited >= silence - Duration::from_millis(20),
        "forwarded during the silence ({waited:?})"
    );
    assert_eq!(proxy.stats().link_silences.len(), 1);
}
