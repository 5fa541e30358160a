//! Helpers for the integration tests: temp dirs, image files, child processes with time limits.

#![allow(dead_code)]

use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fake_vmm::util::Rng;
use serde_json::Value;

pub const VMM: &str = env!("CARGO_BIN_EXE_fake-vmm");
pub const HANDLER: &str = env!("CARGO_BIN_EXE_uffd-file-handler");

/// A directory under the system temp dir, removed (with everything in it) on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let p = std::env::temp_dir().join(format!(
            "fake-vmm-test-{tag}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes an image of `size` bytes: pseudo-random pages from `seed`, about one in five (4 KiB) all zeros.
pub fn gen_image(path: &Path, size: u64, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    let mut page = vec![0u8; 4096];
    for _ in 0..size / 4096 {
        if rng.below(5) == 0 {
            page.fill(0);
        } else {
            for chunk in page.chunks_mut(8) {
                chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
            }
        }
        w.write_all(&page).unwrap();
    }
    w.flush().unwrap();
}

/// A child process that is killed (and reaped) when dropped.
pub struct Proc {
    pub child: Child,
    name: &'static str,
}

impl Proc {
    /// Waits for the exit, killing the process after `limit`. Returns (status code, stdout, stderr).
    pub fn wait(mut self, limit: Duration) -> (i32, String, String) {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let (out, err) = self.output();
                panic!(
                    "{} did not exit within {limit:?}; stdout: {out}\nstderr: {err}",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let (out, err) = self.output();
        (status.code().unwrap_or(-1), out, err)
    }

    /// Kills the process (it serves forever) and returns what it printed.
    pub fn kill(mut self) -> (String, String) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.output()
    }

    /// Waits (at most `limit`) until the process has printed `lines` non-empty lines on stdout
    /// (a handler's reports: it writes each once its VMM's session ended, which may be after
    /// the VMM exited), then kills it. Returns what it printed.
    pub fn kill_after_lines(mut self, lines: usize, limit: Duration) -> (String, String) {
        let mut stdout = self.child.stdout.take().expect("stdout is piped");
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut all = String::new();
            let mut buf = [0u8; 4096];
            loop {
                match stdout.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        all.push_str(&String::from_utf8_lossy(&buf[..n]));
                        let _ = tx.send(all.lines().filter(|l| !l.trim().is_empty()).count());
                    }
                }
            }
            all
        });
        let deadline = Instant::now() + limit;
        let mut seen = 0;
        while seen < lines {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(n) => seen = n,
                Err(_) => break, // the caller's assertion on the lines says what is missing
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let out = reader.join().unwrap_or_default();
        let (_, err) = self.output();
        (out, err)
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn output(&mut self) -> (String, String) {
        let mut out = String::new();
        let mut err = String::new();
        if let Some(mut o) = self.child.stdout.take() {
            let _ = o.read_to_string(&mut out);
        }
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        (out, err)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(bin: &str, name: &'static str, args: &[&str]) -> Proc {
    let child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {bin}: {e}"));
    Proc { child, name }
}

/// Starts `uffd-file-handler` on `socket` serving `image`.
pub fn start_handler(socket: &Path, image: &Path, once: bool) -> Proc {
    let mut args = vec![
        "--socket",
        socket.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
    ];
    if once {
        args.push("--once");
    }
    spawn(HANDLER, "uffd-file-handler", &args)
}

/// Runs `fake-vmm` (bounded by its own --timeout 60 and a 90 s kill). Returns the exit code,
/// the parsed JSON report (Null if stdout was not JSON) and stderr.
pub fn run_vmm(socket: &Path, image: &Path, extra: &[&str]) -> (i32, Value, String) {
    let mut args = vec![
        "--socket",
        socket.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--timeout",
        "60",
    ];
    args.extend_from_slice(extra);
    let (code, out, err) = spawn(VMM, "fake-vmm", &args).wait(Duration::from_secs(90));
    let json = serde_json::from_str(out.trim()).unwrap_or(Value::Null);
    (code, json, err)
}

/// Parses a handler's stdout: one JSON report per line.
pub fn reports(out: &str) -> Vec<Value> {
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("handler line is not JSON ({e}): {l}"))
        })
        .collect()
}

/// Asserts a fake-vmm run passed, showing everything if not.
pub fn assert_verified(code: i32, json: &Value, err: &str) {
    assert!(
        code == 0 && json["verified"] == Value::Bool(true),
        "fake-vmm failed: exit {code}\nreport: {json}\nstderr: {err}"
    );
}

/// Restores `/proc/sys/vm/nr_hugepages` on drop.
pub struct HugePages {
    prev: u64,
}

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

impl HugePages {
    /// Raises the pool by `extra` 2 MiB pages, or says why it cannot.
    pub fn reserve(extra: u64) -> Result<HugePages, String> {
        let prev: u64 = std::fs::read_to_string(NR_HUGEPAGES)
            .map_err(|e| format!("cannot read {NR_HUGEPAGES}: {e}"))?
            .trim()
            .parse()
            .map_err(|e| format!("{NR_HUGEPAGES}: {e}"))?;
        let guard = HugePages { prev };
        std::fs::write(NR_HUGEPAGES, format!("{}", prev + extra))
            .map_err(|e| format!("cannot write {NR_HUGEPAGES} (not root?): {e}"))?;
        let now: u64 = std::fs::read_to_string(NR_HUGEPAGES)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        if now < prev + extra {
            return Err(format!(
                "asked for {} huge pages, the kernel gave {now} (memory fragmented?)",
                prev + extra
            ));
        }
        Ok(guard)
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(NR_HUGEPAGES, format!("{}", self.prev)) {
            eprintln!("could not restore {NR_HUGEPAGES} to {}: {e}", self.prev);
        }
    }
}
