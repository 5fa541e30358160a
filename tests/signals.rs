//! SIGINT, SIGTERM and SIGKILL to the binaries mid-run: nothing is left behind (no key file,
//! no socket file, no child process), and a server with a migration in flight lets it finish
//! on the first signal and stops on the second.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{alive, children_of, wait_until, Proc};
use nix::sys::signal::Signal;

const EXE: &str = env!("CARGO_BIN_EXE_postcopy");
/// How long a process has to end after the signal that ends it.
const EXIT_WITHIN: Duration = Duration::from_secs(10);

/// A demo with its local source, slowed down (no stream, pages served 2 ms late) so that it is
/// surely mid-migration when signalled.
fn slow_demo() -> (Proc, u32) {
    let mut demo = Proc::spawn(
        Command::new(EXE)
            .args([
                "demo",
                "--quiet",
                "--size",
                "256M",
                "--precopy",
                "off",
                "--no-stream",
                "--threads",
                "1",
                "--no-warmup",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
        "postcopy demo",
    )
    .expect("start postcopy demo");
    let pid = demo.id();
    assert!(
        wait_until(Duration::from_secs(20), || !children_of(pid).is_empty()),
        "the demo started no source process within 20 s"
    );
    let source = children_of(pid)[0];
    // Mid-migration: the source is serving pages.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(demo.running(), "the demo ended before it was signalled");
    (demo, source)
}

fn no_demo_key_file(pid: u32) {
    let key = std::env::temp_dir().join(format!("postcopy-demo-{pid}.key"));
    assert!(
        !key.exists(),
        "the demo left its key file {}",
        key.display()
    );
}

#[test]
fn sigint_and_sigterm_end_the_demo_and_its_source_leaving_nothing() {
    for (signal, status) in [(Signal::SIGINT, 130), (Signal::SIGTERM, 143)] {
        let (demo, source) = slow_demo();
        let pid = demo.id();
        demo.signal(signal);
        let out = demo.wait_output(EXIT_WITHIN);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(status), "{signal}: {stderr}");
        assert!(stderr.contains("stopped by"), "{signal}: {stderr}");
        assert!(
            wait_until(EXIT_WITHIN, || !alive(source)),
            "{signal}: the demo's source process {source} outlived it"
        );
        no_demo_key_file(pid);
    }
}

#[test]
fn the_demos_source_dies_with_a_killed_demo() {
    let (mut demo, source) = slow_demo();
    let pid = demo.id();
    demo.kill();
    assert!(
        wait_until(EXIT_WITHIN, || !alive(source)),
        "the source process {source} outlived its SIGKILLed demo"
    );
    no_demo_key_file(pid);
}

/// `serve --synthetic 16M` on a free port, urgent replies delayed by `delay_ms`; its address.
fn serve(delay_ms: u32) -> (Proc, String) {
    let mut serve = Proc::spawn(
        Command::new(EXE)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--synthetic",
                "16M",
                "--insecure",
                "--debug-urgent-delay-ms",
            ])
            .arg(delay_ms.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
        "postcopy serve",
    )
    .expect("start postcopy serve");
    let line = serve.stdout_line(Duration::from_secs(20));
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("serve's first line: {line:?}"))
        .to_string();
    (serve, addr)
}

/// A destination of `addr`: the demo with a remote source, pure postcopy, no stream.
fn dest(addr: &str) -> Proc {
    Proc::spawn(
        Command::new(EXE)
            .args([
                "demo",
                "--quiet",
                "--insecure",
                "--no-stream",
                "--threads",
                "1",
                "--no-warmup",
                "--recovery-timeout",
                "1",
                "--source",
                addr,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
        "postcopy demo --source",
    )
    .expect("start postcopy demo --source")
}

#[test]
fn an_idle_serve_exits_on_sigterm() {
    let (serve, _) = serve(0);
    serve.signal(Signal::SIGTERM);
    let out = serve.wait_output(EXIT_WITHIN);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn serve_lets_a_migration_in_flight_finish_on_sigterm_and_refuses_a_new_one() {
    let (mut serve, addr) = serve(1);
    let first = dest(&addr);
    std::thread::sleep(Duration::from_millis(1000));
    serve.signal(Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    assert!(serve.running(), "serve exited with a migration in flight");
    let second = dest(&addr).wait_output(Duration::from_secs(30));
    let why = String::from_utf8_lossy(&second.stderr);
    assert!(
        !second.status.success() && why.contains("shutting down"),
        "a new migration during the drain: {why}"
    );
    let first = first.wait_output(Duration::from_secs(120));
    let report = String::from_utf8_lossy(&first.stdout);
    assert!(
        first.status.success() && report.contains("verified        yes"),
        "the migration in flight: {report}\n{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let out = serve.wait_output(EXIT_WITHIN);
    assert!(
        out.status.success(),
        "serve after the drain: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_second_sigterm_stops_serve_with_a_migration_in_flight() {
    // 20 ms per fault: the migration cannot finish before the second signal.
    let (mut serve, addr) = serve(20);
    let first = dest(&addr);
    std::thread::sleep(Duration::from_millis(1000));
    serve.signal(Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    assert!(serve.running(), "serve exited on the first signal");
    serve.signal(Signal::SIGTERM);
    let out = serve.wait_output(EXIT_WITHIN);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("stopping the migrations in flight"), "{said}");
    // The destination is told, or finds its source gone, and fails within its bounds.
    let first = first.wait_output(Duration::from_secs(30));
    assert!(
        !first.status.success(),
        "the cut migration reported success"
    );
    let report = String::from_utf8_lossy(&first.stdout);
    assert!(
        !report.contains("verified        yes"),
        "the cut migration: {report}"
    );
}

#[test]
fn an_idle_handler_removes_its_socket_on_sigterm() {
    // (A handler signalled mid-restore: tests/handover.rs, which has the fake VMM.)
    let dir = std::env::temp_dir().join(format!("postcopy-signals-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("h.sock");
    let (_serve, addr) = serve(0);
    let handler = Proc::spawn(
        Command::new(EXE)
            .args([
                "handler",
                "--quiet",
                "--insecure",
                "--source",
                &addr,
                "--socket",
            ])
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
        "postcopy handler",
    )
    .expect("start postcopy handler");
    assert!(
        wait_until(Duration::from_secs(20), || socket.exists()),
        "the handler's socket did not appear"
    );
    handler.signal(Signal::SIGTERM);
    let out = handler.wait_output(EXIT_WITHIN);
    let gone = !Path::new(&socket).exists();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(gone, "the handler left its socket file");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
