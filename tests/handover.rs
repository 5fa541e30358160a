//! `postcopy handler` + a source serving a memory file, against `tools/fake-vmm` playing the
//! VMM (a real userfaultfd handed over through a real Unix socket): every JSON version, regions
//! out of address order, concurrent faults on one page, removals, 2 MiB pages, a VMM exiting
//! mid-restore, and bad handshakes of each kind. Every page is checked by the fake VMM against
//! the memory file (xxh3 per page).

mod common;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::{
    join_on_drop, join_within, output_within, wait_until, Proc, IO_TIMEOUT, MIB, TIMEOUT,
};
use postcopy::handler::{HandlerConfig, Outcome, VmmReport};
use postcopy::image::FileImage;
use postcopy::source::{SourceConfig, SourceServer, StopHandle};
use serde_json::Value;

const SIZE: u64 = 64 * MIB;

/// The fake VMM binary, built on first use (`tools/fake-vmm` is a crate of its own).
fn fake_vmm() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let manifest = root.join("tools/fake-vmm/Cargo.toml");
        let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cargo
            .args(["build", "--release", "--quiet", "--manifest-path"])
            .arg(&manifest);
        // A cold build on a small shared machine takes minutes; a hung one fails the test.
        let out = output_within(
            &mut cargo,
            Duration::from_secs(20 * 60),
            "cargo build of tools/fake-vmm",
        );
        assert!(
            out.status.success(),
            "building tools/fake-vmm failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        root.join("tools/fake-vmm/target/release/fake-vmm")
    })
}

struct Dir(PathBuf);
impl Dir {
    fn new(tag: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("pc-handover-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
}
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A memory file: pseudo-random pages, one in five zero.
fn image_file(path: &Path, size: u64) {
    let img = postcopy::image::Synthetic::new(
        postcopy::layout::Layout::single("f", size, 4096).unwrap(),
        0xabc,
        20,
    );
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut page = vec![0u8; 4096];
    for p in 0..size / 4096 {
        img.fill(0, p, &mut page);
        f.write_all(&page).unwrap();
    }
    f.flush().unwrap();
}

/// A source serving `image` and a handler in this process, stopped on drop.
struct Rig {
    dir: Dir,
    image: PathBuf,
    socket: PathBuf,
    reports: Arc<Mutex<Vec<VmmReport>>>,
    handler_stop: Arc<AtomicBool>,
    handler: Option<std::thread::JoinHandle<()>>,
    source_stop: StopHandle,
    source: Option<std::thread::JoinHandle<()>>,
    /// Between the handler and the source, when the rig was started with a plan.
    proxy: Option<chaos_proxy::Proxy>,
}

impl Rig {
    fn start(tag: &str, page_size: u64) -> Rig {
        Rig::start_with(tag, page_size, false, true, None)
    }

    /// With `once`, the source's `run` returns when its first session ends; `stream` off: a
    /// demand-only handler; with `plan`, the handler reaches the source through a chaos proxy.
    fn start_with(
        tag: &str,
        page_size: u64,
        once: bool,
        stream: bool,
        plan: Option<chaos_proxy::Plan>,
    ) -> Rig {
        Rig::start_tuned(tag, page_size, once, stream, plan, |_| {})
    }

    /// [`Rig::start_with`] whose source learns the image's working set into `ws_file` and
    /// pushes it (`replay`).
    fn start_learning(tag: &str, ws_file: &str, replay: bool) -> Rig {
        let ws = |dir: &Path| postcopy::source::WorkingSetConfig {
            path: Some(dir.join(ws_file)),
            replay,
            reset: false,
        };
        Rig::start_full(tag, 4096, (false, true), None, |_| {}, Some(&ws))
    }

    /// [`Rig::start_with`], with the handler's settings adjusted by `tune`.
    fn start_tuned(
        tag: &str,
        page_size: u64,
        once: bool,
        stream: bool,
        plan: Option<chaos_proxy::Plan>,
        tune: impl FnOnce(&mut HandlerConfig),
    ) -> Rig {
        Rig::start_full(tag, page_size, (once, stream), plan, tune, None)
    }

    /// Every knob: the source's working set from `ws` (given the rig's directory).
    fn start_full(
        tag: &str,
        page_size: u64,
        (once, stream): (bool, bool),
        plan: Option<chaos_proxy::Plan>,
        tune: impl FnOnce(&mut HandlerConfig),
        ws: Option<&dyn Fn(&Path) -> postcopy::source::WorkingSetConfig>,
    ) -> Rig {
        let dir = Dir::new(tag);
        let image = dir.0.join("vm.mem");
        image_file(&image, SIZE);
        let server = SourceServer::bind(
            "127.0.0.1:0",
            Arc::new(FileImage::open(&image, page_size).expect("image")),
            SourceConfig {
                verbose: false,
                once,
                working_set: ws.map(|ws| ws(&dir.0)),
                ..Default::default()
            },
        )
        .expect("source");
        let proxy = plan.map(|p| chaos_proxy::Proxy::start(server.local_addr(), p).expect("proxy"));
        let addr = match &proxy {
            Some(p) => p.local_addr().to_string(),
            None => server.local_addr().to_string(),
        };
        let source_stop = server.stop_handle();
        let source = std::thread::spawn(move || {
            server.run().expect("source run");
        });
        let socket = dir.0.join("handler.sock");
        let reports: Arc<Mutex<Vec<VmmReport>>> = Arc::default();
        let handler_stop = Arc::new(AtomicBool::new(false));
        let mut cfg = HandlerConfig {
            socket: socket.clone(),
            source: addr,
            verbose: false,
            stream,
            link_timeout: Duration::from_secs(10),
            ..Default::default()
        };
        tune(&mut cfg);
        let (r, stop) = (reports.clone(), handler_stop.clone());
        let handler = std::thread::spawn(move || {
            postcopy::handler::serve(
                &cfg,
                postcopy::handler::Stop {
                    now: stop,
                    ..Default::default()
                },
                move |rep| r.lock().unwrap().push(rep.clone()),
            )
            .expect("handler")
        });
        assert!(
            wait_until(Duration::from_secs(5), || socket.exists()),
            "the handler's socket {} did not appear within 5 s",
            socket.display()
        );
        Rig {
            dir,
            image,
            socket,
            reports,
            handler_stop,
            handler: Some(handler),
            source_stop,
            source: Some(source),
            proxy,
        }
    }

    /// Runs the fake VMM with `args`; returns its JSON and exit status.
    fn vmm(&self, args: &[&str]) -> (Value, i32) {
        let mut cmd = Command::new(fake_vmm());
        cmd.arg("--socket")
            .arg(&self.socket)
            .arg("--image")
            .arg(&self.image)
            .args(["--timeout", "60"])
            .args(args);
        // Bounded by its own --timeout 60, and here.
        let out = output_within(&mut cmd, Duration::from_secs(90), "fake-vmm");
        let text = String::from_utf8_lossy(&out.stdout);
        let json: Value = serde_json::from_str(text.lines().last().unwrap_or("null"))
            .unwrap_or_else(|e| {
                panic!(
                    "fake-vmm output is not JSON ({e}): {text}\nstderr: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        (json, out.status.code().unwrap_or(-1))
    }

    /// Waits for the handler's report number `n` (0-based).
    fn report(&self, n: usize) -> VmmReport {
        assert!(
            wait_until(Duration::from_secs(20), || self
                .reports
                .lock()
                .unwrap()
                .len()
                > n),
            "no report {n} from the handler"
        );
        let r = self.reports.lock().unwrap()[n].clone();
        assert_eq!(
            r.pages_accounted(),
            r.pages,
            "report {n}: every page ends one way, whatever the outcome: {r:?}"
        );
        r
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.handler_stop
            .store(true, std::sync::atomic::Ordering::Release);
        if let Some(h) = self.handler.take() {
            join_on_drop(h, TIMEOUT, "handler");
        }
        self.source_stop.stop();
        if let Some(s) = self.source.take() {
            join_on_drop(s, TIMEOUT, "source");
        }
        let _ = &self.dir;
    }
}

fn assert_verified(json: &Value, code: i32) {
    assert_eq!(json["verified"], true, "fake VMM did not verify: {json}");
    assert_eq!(json["mismatches"], 0, "{json}");
    assert_eq!(code, 0, "{json}");
}

#[test]
fn every_json_version_restores_and_verifies() {
    let rig = Rig::start("versions", 4096);
    for (i, v) in ["1.1", "1.7", "1.12"].iter().enumerate() {
        let (json, code) = rig.vmm(&["--version", v, "--threads", "2"]);
        assert_verified(&json, code);
        assert_eq!(json["pages_total"], SIZE / 4096);
        let r = rig.report(i);
        assert_eq!(r.outcome, Outcome::Complete, "{r:?}");
        assert!(r.pages_by_fault + r.pages_by_stream <= SIZE / 4096, "{r:?}");
        assert!(
            r.restore_seconds.is_some() && r.first_fault_served_ms.is_some(),
            "{r:?}"
        );
        assert_eq!(
            format!("{:?}", r.version),
            format!(
                "Some({})",
                match *v {
                    "1.1" => "V1_1",
                    "1.7" => "V1_7",
                    _ => "V1_12",
                }
            )
        );
    }
}

#[test]
fn one_and_four_regions_out_of_address_order_and_the_stream_fills_the_rest() {
    let rig = Rig::start("regions", 4096);
    let (json, code) = rig.vmm(&[
        "--regions",
        "1",
        "--touch-percent",
        "30",
        "--wait-complete",
        "30",
    ]);
    assert_verified(&json, code);
    assert_eq!(json["complete"], true, "{json}");
    let (json, code) = rig.vmm(&[
        "--regions",
        "4",
        "--shuffle",
        "--threads",
        "3",
        "--touch-percent",
        "25",
        "--wait-complete",
        "30",
    ]);
    assert_verified(&json, code);
    assert_eq!(json["complete"], true, "{json}");
    let r = rig.report(1);
    assert_eq!(r.regions, 4);
    assert!(r.pages_by_stream > 0, "{r:?}");
    assert_eq!(r.outcome, Outcome::Complete);
}

#[test]
fn concurrent_faults_on_one_page() {
    let rig = Rig::start("samepage", 4096);
    let (json, code) = rig.vmm(&["--same-page-threads", "8", "--threads", "2"]);
    assert_verified(&json, code);
    assert_eq!(rig.report(0).outcome, Outcome::Complete);
}

#[test]
fn a_vmm_writing_during_load_and_reading_in_order_verifies_with_few_races() {
    // Firecracker writes guest memory during `PUT /snapshot/load`: 64 write faults first, then
    // one thread reads every page in file order, riding the stream. Each written page must
    // hold the write (the page was placed before it), every other page the image; the races
    // of a fault's reply with the stream end as duplicates dropped, rarely as EEXIST.
    let rig = Rig::start("load-writes", 4096);
    let (json, code) = rig.vmm(&["--load-writes", "64", "--sequential", "--threads", "1"]);
    assert_verified(&json, code);
    let r = rig.report(0);
    assert_eq!(r.outcome, Outcome::Complete, "{r:?}");
    assert!(r.faults >= 1, "{r:?}");
    assert!(
        r.eexist <= r.faults / 4 + 2,
        "EEXIST only for placements at the same instant: {r:?}"
    );
}

#[test]
fn removed_ranges_read_zero_and_stay_zero() {
    let rig = Rig::start("remove", 4096);
    // 4 regions of 4096 pages: the second range crosses a region boundary.
    let (json, code) = rig.vmm(&[
        "--regions",
        "4",
        "--shuffle",
        "--remove",
        "100:64",
        "--remove",
        "4090:20",
    ]);
    assert_verified(&json, code);
    assert_eq!(json["zero_violations"], 0, "{json}");
    let r = rig.report(0);
    assert!(r.pages_removed >= 84, "{r:?}");
    assert!(r.pages_zero_after_remove >= 84, "{r:?}");
}

#[test]
fn vmm_exiting_mid_restore_ends_its_session_only() {
    let rig = Rig::start("exit", 4096);
    let (json, _) = rig.vmm(&["--exit-after-pages", "300", "--threads", "1"]);
    assert_eq!(json["exited_early"], true, "{json}");
    let r = rig.report(0);
    assert!(
        matches!(r.outcome, Outcome::VmmExited | Outcome::Complete),
        "the session ends cleanly: {r:?}"
    );
    assert!(r.error.is_none(), "{r:?}");
    // The handler is still up for the next VMM.
    let (json, code) = rig.vmm(&["--threads", "2"]);
    assert_verified(&json, code);
    assert_eq!(rig.report(1).outcome, Outcome::Complete);
}

#[test]
fn every_exit_path_reports_counters_that_add_up() {
    // Demand-only, one toucher, so each way out lands mid-restore. `Rig::report` checks that
    // the page fields add up to the VMM's pages in every report.
    let pages = SIZE / 4096;
    let rig = Rig::start_with(
        "exit-paths",
        4096,
        false,
        false,
        Some(chaos_proxy::Plan::none()),
    );
    let (json, _) = rig.vmm(&["--exit-after-pages", "300", "--threads", "1"]);
    assert_eq!(json["exited_early"], true, "{json}");
    let r = rig.report(0);
    assert_eq!(r.outcome, Outcome::VmmExited, "{r:?}");
    assert!(r.error.is_none(), "{r:?}");
    assert!(
        r.faults >= 300 && r.pages_by_fault >= 300,
        "the faults are counted: {r:?}"
    );
    assert!(r.pages_missing > 0 && r.restore_seconds.is_none(), "{r:?}");
    assert!(
        r.fault_service_us.is_some() && r.first_fault_served_ms.is_some(),
        "{r:?}"
    );

    // The handler is stopped while a VMM restores.
    let proxy = rig.proxy.as_ref().expect("a proxy");
    let mark = proxy.stats().bytes_to_client + proxy.stats().bytes_to_server + 4 * MIB;
    let json = std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            let went_on = proxy.wait_for_bytes(mark, Duration::from_secs(20));
            rig.handler_stop
                .store(true, std::sync::atomic::Ordering::Release);
            went_on
        });
        let json = rig.vmm(&["--threads", "1"]).0;
        assert!(waiter.join().unwrap(), "the restore went on: {json}");
        json
    });
    let r = rig.report(1);
    assert_eq!(r.outcome, Outcome::Stopped, "{r:?} {json}");
    assert!(r.pages_by_fault >= 1000 && r.pages_missing > 0, "{r:?}");
    assert!(r.pages_by_fault < pages, "{r:?}");
    drop(rig);

    // The source is lost: the proxy goes away mid-restore, the handler gives up after its
    // recovery timeout (1 s).
    let rig = Rig::start_tuned(
        "source-lost",
        4096,
        false,
        false,
        Some(chaos_proxy::Plan::none()),
        |c| c.recovery_timeout = Duration::from_secs(1),
    );
    let proxy = rig.proxy.as_ref().expect("a proxy");
    let t0 = Instant::now();
    let json = std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            let began = proxy.wait_for_bytes(4 * MIB, Duration::from_secs(20));
            proxy.stop();
            began
        });
        let json = rig.vmm(&["--threads", "1"]).0;
        assert!(waiter.join().unwrap(), "the restore began: {json}");
        json
    });
    let r = rig.report(0);
    assert_eq!(r.outcome, Outcome::SourceLost, "{r:?} {json}");
    assert!(
        r.error
            .as_deref()
            .is_some_and(|e| e.contains("unreachable")),
        "{r:?}"
    );
    assert!(r.pages_by_fault >= 1000 && r.pages_missing > 0, "{r:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "bounded: {:?}",
        t0.elapsed()
    );
}

#[test]
fn a_vmm_exiting_early_ends_its_source_session_at_once() {
    // Demand-only, the VMM leaves after 300 pages: the handler's engine stops and tells the
    // source, whose session ends at once (no wait for a reconnection): a `--once` source
    // returns within a second of the VMM's exit.
    // No prepared sessions: the VMM's must be the source's first.
    let mut rig = Rig::start_tuned("exit-once", 4096, true, false, None, |c| {
        c.prepared_sessions = 0
    });
    let (json, _) = rig.vmm(&["--exit-after-pages", "300", "--threads", "1"]);
    let exited = std::time::Instant::now();
    assert_eq!(json["exited_early"], true, "{json}");
    let source = rig.source.take().expect("the source thread");
    join_within(source, Duration::from_secs(5), "a --once source");
    assert!(
        exited.elapsed() < Duration::from_secs(1),
        "the source's session ended {:?} after the VMM exited",
        exited.elapsed()
    );
}

#[test]
fn the_handlers_source_connections_survive_random_blows() {
    // The handler's own connections to the source (handshake, urgent, bulk) get resets and
    // FINs at random while a VMM restores: every restore completes verified.
    for seed in 1..=4 {
        let plan = chaos_proxy::Plan {
            victims: Some(chaos_proxy::RandomVictims {
                seed,
                blows: 6,
                min_gap: 1,
                max_gap: SIZE / 6,
                reset: true,
                fin: true,
                silence: None,
            }),
            ..chaos_proxy::Plan::none()
        };
        let rig = Rig::start_with("blows", 4096, false, true, Some(plan));
        let (json, code) = rig.vmm(&["--threads", "2"]);
        assert_verified(&json, code);
        let r = rig.report(0);
        assert_eq!(r.outcome, Outcome::Complete, "seed {seed}: {r:?}");
        let blows = rig.proxy.as_ref().map_or(0, |p| p.stats().blows.len());
        println!("seed {seed}: {blows} blows, {} recoveries", r.recoveries);
    }
}

/// Reserves `n` more 2 MiB pages for the test's life, restoring the previous count on drop.
struct HugePages {
    before: u64,
}
impl HugePages {
    fn reserve(n: u64) -> Result<HugePages, String> {
        const PATH: &str = "/proc/sys/vm/nr_hugepages";
        let before: u64 = std::fs::read_to_string(PATH)
            .map_err(|e| format!("{PATH}: {e}"))?
            .trim()
            .parse()
            .map_err(|e| format!("{PATH}: {e}"))?;
        std::fs::write(PATH, (before + n).to_string()).map_err(|e| format!("{PATH}: {e}"))?;
        let now: u64 = std::fs::read_to_string(PATH)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let guard = HugePages { before };
        if now < before + n {
            return Err(format!(
                "only {} of {n} huge pages could be reserved",
                now - before
            ));
        }
        Ok(guard)
    }
}
impl Drop for HugePages {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/vm/nr_hugepages", self.before.to_string());
    }
}

#[test]
fn two_mib_pages() {
    // The fake VMM's 64 MiB in 2 MiB pages: 32 pages, plus slack.
    let _huge = match HugePages::reserve(40) {
        Ok(h) => h,
        Err(why) => {
            eprintln!("skipped: cannot reserve 2 MiB pages: {why}");
            return;
        }
    };
    let rig = Rig::start("huge", 2 << 20);
    for (i, v) in ["1.7", "1.12"].iter().enumerate() {
        let (json, code) = rig.vmm(&[
            "--page-size",
            "2097152",
            "--version",
            v,
            "--regions",
            "2",
            "--shuffle",
        ]);
        assert_verified(&json, code);
        let r = rig.report(i);
        assert_eq!(r.outcome, Outcome::Complete, "{r:?}");
        assert_eq!(r.pages, 32);
    }
}

fn send_raw(socket: &Path, json: &str, fd: Option<i32>) {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let sock = UnixStream::connect(socket).expect("connect");
    let iov = [std::io::IoSlice::new(json.as_bytes())];
    let fds: Vec<i32> = fd.into_iter().collect();
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None).expect("sendmsg");
    // Keep the socket open until the handler has answered (its report).
    std::thread::sleep(Duration::from_millis(50));
}

#[test]
fn bad_handshakes_get_clear_errors_and_the_handler_keeps_serving() {
    let rig = Rig::start("bad", 4096);
    let uffd = postcopy::sys::uffd::Uffd::open(false).expect("uffd");
    let fd = Some(uffd.as_raw_fd());
    let region = |base: u64, size: u64, offset: u64| {
        format!(
            r#"{{"base_host_virt_addr":{base},"size":{size},"offset":{offset},"page_size":4096}}"#
        )
    };
    let cases: Vec<(String, Option<i32>, &str)> = vec![
        (
            "[{\"base_host_virt_addr\": 4096,".into(),
            fd,
            "malformed region list",
        ),
        (
            format!("[{}]", region(0x1000_0000, 4096, 0)),
            None,
            "no file descriptor",
        ),
        (
            format!(
                "[{},{}]",
                region(0x1000_0000, 0x10000, 0),
                region(0x1000_8000, 0x10000, 0x10000)
            ),
            fd,
            "overlap",
        ),
        (
            format!(
                "[{},{}]",
                region(0x1000_0000, 0x10000, 0),
                region(0x2000_0000, 0x10000, 0x8000)
            ),
            fd,
            "overlap",
        ),
        (
            format!("[{}]", region(0x1000_0000, SIZE, 4096)),
            fd,
            "past the end of the image",
        ),
        (
            r#"[{"base_host_virt_addr":268435456,"size":2097152,"offset":0,"page_size":2097152}]"#
                .into(),
            fd,
            "--page-size 2097152",
        ),
    ];
    let start = Instant::now();
    for (i, (json, fd, want)) in cases.iter().enumerate() {
        send_raw(&rig.socket, json, *fd);
        let r = rig.report(i);
        assert_eq!(r.outcome, Outcome::Error, "case {i}: {r:?}");
        let e = r.error.clone().unwrap_or_default();
        assert!(
            e.contains(want),
            "case {i}: error {e:?} should mention {want:?}"
        );
    }
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "bad handshakes are answered promptly"
    );
    drop(uffd);
    // Still serving.
    let (json, code) = rig.vmm(&["--threads", "2"]);
    assert_verified(&json, code);
    assert_eq!(rig.report(cases.len()).outcome, Outcome::Complete);
}

/// The binaries as an operator runs them: `postcopy serve --image` and `postcopy handler`.
#[test]
fn cli_serve_and_handler_restore_a_vmm() {
    let dir = Dir::new("cli");
    let image = dir.0.join("vm.mem");
    image_file(&image, SIZE);
    let exe = env!("CARGO_BIN_EXE_postcopy");
    let key = dir.0.join("key");
    std::fs::write(&key, b"a test key of thirty-two bytes!!").unwrap();
    // A key file others can read is refused.
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let mut serve = Proc::spawn(
        Command::new(exe)
            .args(["serve", "--listen", "127.0.0.1:0", "--quiet", "--image"])
            .arg(&image)
            .arg("--key-file")
            .arg(&key)
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
        "postcopy serve",
    )
    .expect("postcopy serve");
    let line = serve.stdout_line(IO_TIMEOUT);
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .expect("address line")
        .to_string();
    let socket = dir.0.join("h.sock");
    let handler = Proc::spawn(
        Command::new(exe)
            .args([
                "handler", "--once", "--quiet", "--source", &addr, "--socket",
            ])
            .arg(&socket)
            .arg("--key-file")
            .arg(&key)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
        "postcopy handler --once (after its VMM)",
    )
    .expect("postcopy handler");
    let mut vmm = Command::new(fake_vmm());
    vmm.arg("--socket")
        .arg(&socket)
        .arg("--image")
        .arg(&image)
        .args([
            "--regions",
            "2",
            "--shuffle",
            "--threads",
            "2",
            "--connect-timeout",
            "10",
            "--timeout",
            "60",
        ]);
    let vmm = output_within(&mut vmm, Duration::from_secs(90), "fake-vmm");
    let json: Value = serde_json::from_slice(&vmm.stdout).expect("fake-vmm JSON");
    assert_verified(&json, vmm.status.code().unwrap_or(-1));
    let out = handler.wait_output(Duration::from_secs(30));
    serve.kill();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    assert_eq!(report["outcome"], "complete", "{report}");
    assert_eq!(report["regions"], 2);
    assert!(report["restore_seconds"].as_f64().is_some(), "{report}");
}

/// `postcopy serve --image` of a fresh `size`-byte image in `dir`, faults served `delay_ms`
/// late, and `postcopy handler` of it; their processes, the image and the handler's socket.
fn cli_rig(dir: &Dir, size: u64, delay_ms: u32) -> (Proc, Proc, PathBuf, PathBuf) {
    cli_rig_with(dir, size, delay_ms, &[])
}

/// [`cli_rig`], the handler given `extra` arguments too.
fn cli_rig_with(
    dir: &Dir,
    size: u64,
    delay_ms: u32,
    extra: &[&str],
) -> (Proc, Proc, PathBuf, PathBuf) {
    let image = dir.0.join("vm.mem");
    image_file(&image, size);
    let exe = env!("CARGO_BIN_EXE_postcopy");
    let mut serve = Proc::spawn(
        Command::new(exe)
            .args(["serve", "--listen", "127.0.0.1:0", "--quiet", "--insecure"])
            .arg("--debug-urgent-delay-ms")
            .arg(delay_ms.to_string())
            .arg("--image")
            .arg(&image)
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
        "postcopy serve",
    )
    .expect("postcopy serve");
    let line = serve.stdout_line(IO_TIMEOUT);
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .expect("address line");
    let socket = dir.0.join("h.sock");
    let handler = Proc::spawn(
        Command::new(exe)
            .args([
                "handler",
                "--no-stream",
                "--insecure",
                "--source",
                addr,
                "--socket",
            ])
            .arg(&socket)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
        "postcopy handler",
    )
    .expect("postcopy handler");
    assert!(
        wait_until(IO_TIMEOUT, || socket.exists()),
        "the handler's socket did not appear"
    );
    (serve, handler, image, socket)
}

/// The fake VMM restoring `image` through `socket`, started.
fn fake_vmm_proc(image: &Path, socket: &Path) -> Proc {
    Proc::spawn(
        Command::new(fake_vmm())
            .arg("--socket")
            .arg(socket)
            .arg("--image")
            .arg(image)
            .args([
                "--threads",
                "1",
                "--connect-timeout",
                "10",
                "--timeout",
                "60",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
        "fake-vmm",
    )
    .expect("fake-vmm")
}

#[test]
fn a_handler_signalled_mid_restore_finishes_it_then_exits_and_removes_its_socket() {
    let dir = Dir::new("sigterm");
    // 2048 pages, each fault served 1 ms late: a restore of a few seconds.
    let (_serve, mut handler, image, socket) = cli_rig(&dir, 8 * MIB, 1);
    let vmm = fake_vmm_proc(&image, &socket);
    std::thread::sleep(Duration::from_millis(700));
    handler.signal(nix::sys::signal::Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        handler.running(),
        "the handler exited with a restore in flight"
    );
    let out = vmm.wait_output(Duration::from_secs(90));
    let json: Value = serde_json::from_slice(&out.stdout).expect("fake-vmm JSON");
    assert_verified(&json, out.status.code().unwrap_or(-1));
    let out = handler.wait_output(Duration::from_secs(20));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    assert_eq!(report["outcome"], "complete", "{report}");
    assert!(!socket.exists(), "the handler left its socket file");
}

#[test]
fn the_handlers_metrics_follow_a_restore_as_it_runs() {
    let dir = Dir::new("metrics");
    let metrics = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    // 2048 pages, each fault served 2 ms late: a restore of several seconds.
    let (_serve, _handler, image, socket) =
        cli_rig_with(&dir, 8 * MIB, 2, &["--metrics", &metrics]);
    let vmm = fake_vmm_proc(&image, &socket);
    let mut seen: Vec<f64> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(400));
        let mut s = std::net::TcpStream::connect(&metrics).expect("connect to /metrics");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut reply = String::new();
        std::io::Read::read_to_string(&mut s, &mut reply).unwrap();
        let body = reply.split_once("\r\n\r\n").map_or("", |r| r.1);
        let samples = postcopy::metrics::check_text(body).unwrap_or_else(|e| panic!("{e}\n{body}"));
        let faults = samples.iter().find(|(k, _)| {
            k.starts_with("postcopy_pages_placed_total{vmm=") && k.contains("fault")
        });
        if let Some((_, v)) = faults {
            if seen.last().is_none_or(|last| v > last) {
                seen.push(*v);
            }
        }
    }
    let out = vmm.wait_output(Duration::from_secs(90));
    let json: Value = serde_json::from_slice(&out.stdout).expect("fake-vmm JSON");
    assert_verified(&json, out.status.code().unwrap_or(-1));
    assert!(
        seen.len() >= 3,
        "the VMM's counters did not grow across scrapes: {seen:?}"
    );
}

#[test]
fn a_handler_signalled_twice_cuts_its_restore_short_says_so_and_removes_its_socket() {
    let dir = Dir::new("sigterm2");
    // 20 ms per fault: the restore is far from done when the signals come.
    let (_serve, handler, image, socket) = cli_rig(&dir, 8 * MIB, 20);
    let vmm = fake_vmm_proc(&image, &socket);
    std::thread::sleep(Duration::from_millis(700));
    for _ in 0..2 {
        handler.signal(nix::sys::signal::Signal::SIGTERM);
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = handler.wait_output(Duration::from_secs(10));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a handler that cut a restore short exited 0: {said}"
    );
    assert!(said.contains("stopping the restores in flight"), "{said}");
    let report: Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    assert_ne!(report["outcome"], "complete", "{report}");
    assert!(!socket.exists(), "the handler left its socket file");
    // The VMM lost its memory's source: it ends (it does not verify), within its bounds.
    let out = vmm.wait_output(Duration::from_secs(90));
    assert!(!out.status.success(), "the cut restore verified");
}

#[test]
fn prepared_sessions_serve_handovers_and_survive_idling_and_breaks() {
    // A link timeout of 1 s: a prepared session idle for 3 s lives on its heartbeats. Each
    // VMM after the first finds one ready (the keeper replaced the one taken while the last
    // restore ran), and every restore verifies.
    let rig = Rig::start_tuned(
        "prepared",
        4096,
        false,
        true,
        Some(chaos_proxy::Plan::none()),
        |c| c.link_timeout = Duration::from_secs(1),
    );
    let (json, code) = rig.vmm(&["--threads", "2"]);
    assert_verified(&json, code);
    let r = rig.report(0);
    assert_eq!(r.outcome, Outcome::Complete, "{r:?}");
    std::thread::sleep(Duration::from_secs(3));
    let (json, code) = rig.vmm(&["--threads", "2"]);
    assert_verified(&json, code);
    let r = rig.report(1);
    assert!(
        r.session_prepared,
        "idle for 3 s, three link timeouts: {r:?}"
    );
    assert_eq!((r.outcome, r.recoveries), (Outcome::Complete, 0), "{r:?}");
    // Every connection is cut while the prepared ones wait: they are replaced (or the VMM
    // connects on arrival), and the restore verifies.
    let proxy = rig.proxy.as_ref().expect("a proxy");
    proxy.cut_all();
    let (json, code) = rig.vmm(&["--threads", "2"]);
    assert_verified(&json, code);
    let r = rig.report(2);
    assert_eq!(r.outcome, Outcome::Complete, "{r:?}");
    let (json, code) = rig.vmm(&["--threads", "1", "--touch-percent", "10"]);
    assert_verified(&json, code);
    let r = rig.report(3);
    assert!(r.session_prepared, "{r:?}");
    assert!(
        r.first_fault_served_ms.is_some_and(|ms| ms < 1000.0),
        "{r:?}"
    );
}

#[test]
fn a_learned_working_set_is_pushed_to_the_next_restore() {
    // The first restore of the image records (its stream holds back while faults come); the
    // second, touching the same pages in the same order, gets them pushed first and faults on
    // few. The set is persisted, and a file for another image is refused.
    let rig = Rig::start_learning("ws", "vm.ws", true);
    let touch = ["--threads", "1", "--touch-percent", "25", "--seed", "7"];
    let (json, code) = rig.vmm(&touch);
    assert_verified(&json, code);
    let first = rig.report(0);
    assert_eq!(first.pages_by_working_set, 0, "{first:?}");
    assert!(first.faults >= 2000, "recorded by faults: {first:?}");
    let file = rig.dir.0.join("vm.ws");
    assert!(
        wait_until(Duration::from_secs(10), || file.exists()),
        "the working set was saved"
    );
    let (json, code) = rig.vmm(&touch);
    assert_verified(&json, code);
    let second = rig.report(1);
    assert!(second.pages_by_working_set > 0, "{second:?}");
    assert!(
        second.faults * 2 < first.faults,
        "replayed: {} faults after {}",
        second.faults,
        first.faults
    );
    let layout = postcopy::layout::Layout::single("f", SIZE, 4096).unwrap();
    let config = postcopy::source::WorkingSetConfig {
        path: Some(file.clone()),
        replay: true,
        reset: false,
    };
    let (saved, problem) = postcopy::source::WorkingSet::open(&layout, config.clone());
    assert!(problem.is_none(), "{problem:?}");
    assert!(
        saved.len() as u64 >= first.faults.min(4096) / 2,
        "{}",
        saved.len()
    );
    let other = postcopy::layout::Layout::single("f", SIZE / 2, 4096).unwrap();
    let (refused, problem) = postcopy::source::WorkingSet::open(&other, config);
    assert!(refused.is_empty() && problem.is_some(), "{problem:?}");
}
