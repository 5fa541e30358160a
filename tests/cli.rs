//! What a new user meets at the command line: each rough edge found (issue 15) has a test
//! here, run against the binary as an operator runs it.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{output_within, Proc};

const EXE: &str = env!("CARGO_BIN_EXE_postcopy");

fn postcopy(args: &[&str], within: Duration) -> Output {
    output_within(
        Command::new(EXE).args(args),
        within,
        &format!("postcopy {args:?}"),
    )
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A directory of this test's files, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("postcopy-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `postcopy serve` with `args`, and the address it listens on.
fn serve(args: &[&str], stdin: Stdio) -> (Proc, String) {
    let mut p = Proc::spawn(
        Command::new(EXE)
            .args(["serve", "--listen", "127.0.0.1:0", "--quiet"])
            .args(args)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
        "postcopy serve",
    )
    .expect("start postcopy serve");
    let line = p.stdout_line(Duration::from_secs(20));
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("{line:?}"));
    (p, addr.to_string())
}

#[test]
fn a_key_file_others_can_read_is_refused_with_the_fix() {
    let dir = Dir::new("key");
    let key = dir.0.join("key");
    std::fs::write(
        &key,
        [
            7u8, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18,
        ],
    )
    .unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let k = key.to_str().unwrap();
    let out = postcopy(
        &["serve", "--synthetic", "16M", "--key-file", k],
        Duration::from_secs(10),
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!("chmod 600 {k}")),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_key_can_come_from_standard_input_and_a_weak_one_is_warned_about() {
    let mut p = Proc::spawn(
        Command::new(EXE)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--synthetic",
                "16M",
                "--key-file",
                "-",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
        "postcopy serve --key-file -",
    )
    .expect("start serve");
    let mut stdin = p.child_stdin().expect("piped stdin");
    stdin.write_all(b"passwordpassword").unwrap();
    drop(stdin);
    let line = p.stdout_line(Duration::from_secs(20));
    assert!(line.starts_with("listening on "), "{line:?}");
    let mut err = p.child_stderr().expect("piped stderr");
    p.kill();
    let mut said = String::new();
    let _ = err.read_to_string(&mut said);
    assert!(said.contains("does not look random"), "{said}");
}

#[test]
fn demo_with_a_remote_source_refuses_what_it_would_ignore_and_needs_the_sources_key() {
    let out = postcopy(
        &["demo", "--source", "127.0.0.1:1"],
        Duration::from_secs(10),
    );
    assert!(
        stderr(&out).contains("pass --key-file FILE"),
        "{}",
        stderr(&out)
    );
    for opt in [
        ["--size", "2G"],
        ["--seed", "3"],
        ["--zero-percent", "5"],
        ["--dirty-rate", "5"],
    ] {
        let mut args = vec!["demo", "--insecure", "--source", "127.0.0.1:1"];
        args.extend(opt);
        let out = postcopy(&args, Duration::from_secs(10));
        assert!(
            !out.status.success() && stderr(&out).contains("cannot be used with"),
            "{opt:?}: {}",
            stderr(&out)
        );
    }
    let out = postcopy(
        &["demo", "--insecure", "--source", "127.0.0.1"],
        Duration::from_secs(10),
    );
    assert!(stderr(&out).contains("has no port"), "{}", stderr(&out));
}

/// A peer that is not a postcopy source: `greeting` is what it sends on accept (nothing: it
/// waits, as an HTTP server does for a request).
fn not_postcopy(greeting: &'static [u8]) -> (String, std::thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let t = std::thread::spawn(move || {
        l.set_nonblocking(false).unwrap();
        if let Ok((mut s, _)) = l.accept() {
            let _ = s.write_all(greeting);
            // Hold the connection open (silently) until the client goes.
            s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
            let mut sink = [0u8; 256];
            while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
        }
    });
    (addr, t)
}

#[test]
fn a_peer_that_is_not_postcopy_is_refused_within_a_second_or_two_saying_so() {
    let dir = Dir::new("peer");
    let key = dir.0.join("key");
    std::fs::write(&key, b"0123456789abcdef0123456789abcdef").unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let report = dir.0.join("r.json");
    for greeting in [
        &b""[..],
        b"HTTP/1.0 400 Bad Request\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n",
    ] {
        for auth in [
            vec!["--insecure"],
            vec!["--key-file", key.to_str().unwrap()],
        ] {
            let (addr, peer) = not_postcopy(greeting);
            let t0 = Instant::now();
            let mut args = vec![
                "demo",
                "--no-warmup",
                "--source",
                &addr,
                "--report",
                report.to_str().unwrap(),
            ];
            args.extend(auth.iter().copied());
            let out = postcopy(&args, Duration::from_secs(30));
            let took = t0.elapsed();
            let said = stderr(&out);
            let _ = peer.join();
            let what = format!("{:?} {auth:?}: {said}", String::from_utf8_lossy(greeting));
            assert!(!out.status.success(), "{what}");
            assert!(took < Duration::from_secs(3), "took {took:?}: {what}");
            assert!(
                said.contains("not a postcopy") || said.contains("said nothing within"),
                "{what}"
            );
            // The report says what happened, although the run never began.
            let r = std::fs::read_to_string(&report).expect("the report of a failed run");
            assert!(
                r.contains("\"verified\":false") && r.contains("error"),
                "{r}"
            );
        }
    }
}

#[test]
fn an_unwritable_report_path_fails_before_the_run() {
    let t0 = Instant::now();
    let out = postcopy(
        &[
            "demo",
            "--size",
            "1G",
            "--report",
            "/nonexistent-dir/r.json",
        ],
        Duration::from_secs(10),
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("cannot write report"),
        "{}",
        stderr(&out)
    );
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "it ran first: {:?}",
        t0.elapsed()
    );
}

#[test]
fn the_handler_replaces_neither_a_file_nor_a_live_handlers_socket() {
    let dir = Dir::new("sock");
    let file = dir.0.join("not-a-socket");
    std::fs::write(&file, b"precious").unwrap();
    let f = file.to_str().unwrap();
    let out = postcopy(
        &[
            "handler",
            "--insecure",
            "--source",
            "127.0.0.1:1",
            "--socket",
            f,
        ],
        Duration::from_secs(10),
    );
    assert!(stderr(&out).contains("is not a socket"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");
    let sock = dir.0.join("h.sock");
    let _live = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let s = sock.to_str().unwrap();
    let out = postcopy(
        &[
            "handler",
            "--insecure",
            "--source",
            "127.0.0.1:1",
            "--socket",
            s,
        ],
        Duration::from_secs(10),
    );
    assert!(
        stderr(&out).contains("another handler is listening"),
        "{}",
        stderr(&out)
    );
    assert!(
        std::os::unix::net::UnixStream::connect(&sock).is_ok(),
        "the live socket was replaced"
    );
}

#[test]
fn the_readmes_two_host_steps_show_postcopy_with_faults_and_stream_pages() {
    let dir = Dir::new("twohost");
    let key = dir.0.join("key");
    let k = key.to_str().unwrap();
    let mk = Command::new("sh")
        .args(["-c", &format!("(umask 077; head -c 32 /dev/urandom > {k})")])
        .status()
        .unwrap();
    assert!(mk.success());
    let (_serve, addr) = serve(&["--synthetic", "256M", "--key-file", k], Stdio::null());
    let report = dir.0.join("r.json");
    let out = postcopy(
        &[
            "demo",
            "--quiet",
            "--source",
            &addr,
            "--key-file",
            k,
            "--report",
            report.to_str().unwrap(),
        ],
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["verified"], true, "{r}");
    assert_eq!(r["precopy"], false, "{r}");
    assert!(r["pages_by_fault"].as_u64().unwrap() > 0, "{r}");
    assert!(r["pages_by_stream"].as_u64().unwrap() > 0, "{r}");
}

/// `GET /metrics` from `addr`: the body, checked as the text format, and its samples.
fn scrape(addr: &str) -> Vec<(String, f64)> {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to /metrics");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).expect("read /metrics");
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
    assert!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "{head}"
    );
    postcopy::metrics::check_text(body).unwrap_or_else(|e| panic!("{e}\n{body}"))
}

fn value(samples: &[(String, f64)], series: &str) -> Option<f64> {
    samples.iter().find(|(s, _)| s == series).map(|s| s.1)
}

/// A free port on 127.0.0.1, as HOST:PORT.
fn free_addr() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

#[test]
fn metrics_of_serve_and_demo_follow_a_migration_as_it_runs() {
    let (src_metrics, dst_metrics) = (free_addr(), free_addr());
    // Faults served 1 ms late, no stream: a migration of several seconds.
    let (_serve, addr) = serve(
        &[
            "--synthetic",
            "32M",
            "--insecure",
            "--debug-urgent-delay-ms",
            "1",
            "--metrics",
            &src_metrics,
        ],
        Stdio::null(),
    );
    let demo = Proc::spawn(
        Command::new(EXE)
            .args([
                "demo",
                "--quiet",
                "--insecure",
                "--no-stream",
                "--threads",
                "1",
                "--no-warmup",
            ])
            .args(["--source", &addr, "--metrics", &dst_metrics])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
        "postcopy demo --source --metrics",
    )
    .expect("start the demo");
    let placed = r#"postcopy_pages_placed_total{migration="demo",path="fault"}"#;
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        let Ok(_) = std::net::TcpStream::connect(&dst_metrics) else {
            continue;
        };
        let d = scrape(&dst_metrics);
        let s = scrape(&src_metrics);
        let (Some(faults), Some(sent)) = (
            value(&d, placed),
            s.iter()
                .find(|(k, _)| {
                    k.starts_with("postcopy_source_pages_sent_total") && k.contains("urgent")
                })
                .map(|x| x.1),
        ) else {
            continue;
        };
        if value(&d, r#"postcopy_phase{migration="demo",phase="postcopy"}"#) == Some(1.0) {
            seen.push((faults, sent));
        }
    }
    let out = demo.wait_output(Duration::from_secs(120));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(seen.len() >= 3, "too few scrapes in postcopy: {seen:?}");
    assert!(
        seen.windows(2).all(|w| w[1].0 > w[0].0 && w[1].1 > w[0].1),
        "the counters did not grow from scrape to scrape: {seen:?}"
    );
}

#[test]
fn an_unprivileged_user_is_told_the_truth_by_probe_and_can_run_the_demo() {
    use std::os::unix::process::CommandExt;
    if std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap()) != 0 {
        eprintln!("skipped: becoming another user needs root");
        return;
    }
    let mut reach = Command::new(EXE);
    reach
        .arg("--version")
        .uid(65534)
        .gid(65534)
        .stdout(Stdio::null());
    if let Err(e) = reach.status() {
        eprintln!("skipped: user nobody cannot run {EXE} ({e}): its directory is private");
        return;
    }
    let as_nobody = |args: &[&str]| {
        let mut cmd = Command::new(EXE);
        cmd.args(args).uid(65534).gid(65534).current_dir("/");
        output_within(
            &mut cmd,
            Duration::from_secs(120),
            &format!("postcopy {args:?} as nobody"),
        )
    };
    let probe = as_nobody(&["probe"]);
    let table = String::from_utf8_lossy(&probe.stdout);
    let user_mode = table
        .lines()
        .find(|l| l.contains("uffd user mode"))
        .unwrap_or("");
    let demo = as_nobody(&["demo", "--size", "64M", "--quiet", "--no-warmup"]);
    let report = String::from_utf8_lossy(&demo.stdout);
    if demo.status.success() {
        // The demo works as this user: probe must not say otherwise.
        assert!(report.contains("verified        yes"), "{report}");
        assert!(
            probe.status.success(),
            "probe says no, the demo says yes:\n{table}"
        );
        assert!(
            user_mode.starts_with("PASS") || user_mode.starts_with("WARN"),
            "{table}"
        );
    } else {
        // Nothing works as this user: probe says so.
        assert!(
            !probe.status.success(),
            "probe says yes, the demo failed: {}",
            stderr(&demo)
        );
    }
}

#[test]
fn every_stderr_line_is_json_with_log_format_json_and_quiet_keeps_only_warnings() {
    // An error (nothing listens on port 1), as JSON.
    let out = postcopy(
        &[
            "--log-format",
            "json",
            "demo",
            "--insecure",
            "--no-warmup",
            "--source",
            "127.0.0.1:1",
        ],
        Duration::from_secs(20),
    );
    let text = stderr(&out);
    assert!(!text.is_empty());
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        assert!(
            v["level"].is_string() && v["msg"].is_string() && v["ts_unix_ms"].is_u64(),
            "{v}"
        );
    }
    assert!(text.contains(r#""level":"error""#), "{text}");
    // A source's info lines (its session) are gone with -q; its warnings are not.
    let (s, addr) = {
        let mut p = Proc::spawn(
            Command::new(EXE)
                .args([
                    "serve",
                    "-q",
                    "--listen",
                    "127.0.0.1:0",
                    "--synthetic",
                    "16M",
                    "--insecure",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
            "postcopy serve -q",
        )
        .unwrap();
        let line = p.stdout_line(Duration::from_secs(20));
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap()
            .to_string();
        (p, addr)
    };
    let demo = postcopy(
        &["demo", "-q", "--insecure", "--no-warmup", "--source", &addr],
        Duration::from_secs(60),
    );
    assert!(demo.status.success(), "{}", stderr(&demo));
    assert!(stderr(&demo).is_empty(), "demo -q said: {}", stderr(&demo));
    s.signal(nix::sys::signal::Signal::SIGTERM);
    let out = s.wait_output(Duration::from_secs(10));
    let said = stderr(&out);
    assert!(
        !said.contains("session"),
        "serve -q logged its session: {said}"
    );
    assert!(said.contains("warning: SIGTERM"), "{said}");
}
