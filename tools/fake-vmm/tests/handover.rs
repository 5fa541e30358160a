//! fake-vmm against uffd-file-handler: the Firecracker handover in every format, several
//! region layouts, concurrent faults on one page, balloon removes, a VMM dying mid-restore,
//! 2 MiB pages, and the checks themselves (a wrong image must be caught).
//!
//! Needs root (or userfaultfd access). Every child process is killed on a time limit, and the
//! socket and image live in a temp dir removed at the end.

mod common;

use std::io::IoSlice;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const PAGES_64M: u64 = 64 * MIB / 4096;

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// One VMM against a `--once` handler; returns both reports.
fn one_vmm(tag: &str, image_size: u64, vmm_args: &[&str]) -> (Value, Value) {
    let dir = TempDir::new(tag);
    let image = dir.path("image");
    let socket = dir.path("sock");
    gen_image(&image, image_size, 42);
    let handler = start_handler(&socket, &image, true);
    let (code, json, err) = run_vmm(&socket, &image, vmm_args);
    assert_verified(code, &json, &err);
    let (hcode, hout, herr) = handler.wait(Duration::from_secs(20));
    assert_eq!(hcode, 0, "handler exit; stderr: {herr}");
    let rs = reports(&hout);
    assert_eq!(rs.len(), 1, "one handler report expected: {hout}");
    assert!(!socket.exists(), "the --once handler removes its socket");
    (json, rs.into_iter().next().unwrap())
}

#[test]
fn every_handover_version_one_region() {
    for version in ["1.1", "1.7", "1.12"] {
        let (vmm, h) = one_vmm(&format!("v{version}"), 64 * MIB, &["--version", version]);
        assert_eq!(vmm["version"], version);
        assert_eq!(
            h["version"], version,
            "the handler saw the fields of {version}"
        );
        assert_eq!(n(&vmm["pages_total"]), PAGES_64M);
        assert_eq!(n(&vmm["pages_touched"]), PAGES_64M);
        assert_eq!(n(&vmm["fault_latency_us"]["count"]), PAGES_64M);
        assert_eq!(n(&h["pages_copied"]), PAGES_64M, "one copy per page: {h}");
        assert_eq!(h["end"], "eof");
    }
}

#[test]
fn four_shuffled_regions_then_complete() {
    let (vmm, h) = one_vmm(
        "shuffled",
        64 * MIB,
        &[
            "--regions",
            "4",
            "--shuffle",
            "--threads",
            "3",
            "--wait-complete",
            "20",
            "--version",
            "1.7",
        ],
    );
    assert_eq!(n(&vmm["regions"]), 4);
    assert_eq!(n(&h["regions"]), 4);
    assert_eq!(vmm["complete"], true);
    assert!(vmm["seconds_to_complete"].as_f64().unwrap() > 0.0);
    assert_eq!(n(&h["pages_copied"]), PAGES_64M);
}

#[test]
fn eight_threads_fault_on_the_same_page() {
    let (vmm, h) = one_vmm(
        "samepage",
        16 * MIB,
        &["--same-page-threads", "8", "--regions", "2"],
    );
    assert_eq!(n(&vmm["same_page_us"]["count"]), 8);
    assert_eq!(n(&vmm["pages_touched"]), 16 * MIB / 4096);
    // However many of the 8 faults were queued, the page is placed once.
    assert_eq!(n(&h["pages_copied"]), 16 * MIB / 4096);
}

#[test]
fn removed_ranges_read_as_zeros_and_stay_so() {
    // 2 regions of 8192 pages: the third range crosses the boundary between them.
    let (vmm, h) = one_vmm(
        "remove",
        64 * MIB,
        &[
            "--regions",
            "2",
            "--shuffle",
            "--remove",
            "10:5",
            "--remove",
            "1000:40",
            "--remove",
            "8189:6",
        ],
    );
    assert_eq!(n(&vmm["zero_violations"]), 0);
    assert_eq!(n(&vmm["pages_removed"]), 51);
    assert!(n(&h["removes"]) >= 4, "one REMOVE event per madvise: {h}");
    assert_eq!(
        n(&h["pages_zeroed"]),
        51,
        "removed pages are served as zero pages: {h}"
    );
    assert_eq!(n(&h["pages_copied"]), PAGES_64M);
}

#[test]
fn partial_touch_and_an_incomplete_wait_is_reported() {
    let dir = TempDir::new("partial");
    let image = dir.path("image");
    let socket = dir.path("sock");
    gen_image(&image, 32 * MIB, 7);
    let handler = start_handler(&socket, &image, false);
    let pages = 32 * MIB / 4096;

    let (code, json, err) = run_vmm(
        &socket,
        &image,
        &["--touch-percent", "25", "--only-missing"],
    );
    assert_verified(code, &json, &err);
    assert_eq!(n(&json["pages_touched"]), pages / 4);
    assert_eq!(n(&json["pages_resident_before_touch"]), 0);

    // This handler streams nothing, so the untouched pages never arrive.
    let (code, json, _) = run_vmm(
        &socket,
        &image,
        &["--touch-percent", "25", "--wait-complete", "0.3"],
    );
    assert_eq!(code, 1, "an incomplete restore must fail: {json}");
    assert_eq!(json["complete"], false);
    assert_eq!(json["verified"], false);

    let (out, _) = handler.kill_after_lines(2, Duration::from_secs(10));
    let rs = reports(&out);
    assert_eq!(rs.len(), 2);
    for r in &rs {
        assert_eq!(n(&r["pages_copied"]), pages / 4);
    }
}

#[test]
fn vmm_dying_mid_restore_leaves_the_handler_serving_the_next() {
    let dir = TempDir::new("early");
    let image = dir.path("image");
    let socket = dir.path("sock");
    gen_image(&image, 64 * MIB, 3);
    let mut handler = start_handler(&socket, &image, false);

    let (code, json, err) = run_vmm(
        &socket,
        &image,
        &["--exit-after-pages", "1000", "--threads", "4"],
    );
    assert_eq!(code, 0, "early exit: {json} {err}");
    assert_eq!(json["exited_early"], true);
    assert_eq!(n(&json["pages_touched"]), 1000);

    std::thread::sleep(Duration::from_millis(100));
    assert!(
        handler.running(),
        "the handler must survive a VMM that dies"
    );
    let (code, json, err) = run_vmm(&socket, &image, &["--regions", "3", "--shuffle"]);
    assert_verified(code, &json, &err);
    assert_eq!(json["exited_early"], false);

    let (out, herr) = handler.kill_after_lines(2, Duration::from_secs(10));
    let rs = reports(&out);
    assert_eq!(rs.len(), 2, "one report per VMM: {out} {herr}");
    assert!(n(&rs[0]["pages_copied"]) >= 1000);
    assert!(
        ["eof", "esrch", "enoent"].contains(&rs[0]["end"].as_str().unwrap()),
        "{}",
        rs[0]
    );
    assert_eq!(n(&rs[1]["pages_copied"]), PAGES_64M);
}

#[test]
fn dev_userfaultfd_fallback() {
    if !std::path::Path::new("/dev/userfaultfd").exists() {
        eprintln!("skipped: no /dev/userfaultfd on this host");
        return;
    }
    let (vmm, _) = one_vmm("dev", 8 * MIB, &["--uffd", "dev"]);
    assert_eq!(vmm["uffd_source"], "/dev/userfaultfd");
}

#[test]
fn a_wrong_image_is_caught() {
    let dir = TempDir::new("wrong");
    let served = dir.path("served");
    let expected = dir.path("expected");
    let socket = dir.path("sock");
    gen_image(&served, 8 * MIB, 1);
    gen_image(&expected, 8 * MIB, 2);
    let handler = start_handler(&socket, &served, true);
    let (code, json, _) = run_vmm(&socket, &expected, &["--wait-complete", "5"]);
    assert_eq!(code, 1, "{json}");
    assert_eq!(json["verified"], false);
    assert!(n(&json["mismatches"]) > 0);
    assert!(json["first_mismatch"]["page"].is_u64(), "{json}");
    let (hcode, _, _) = handler.wait(Duration::from_secs(20));
    assert_eq!(hcode, 0);
}

#[test]
fn huge_pages_2m() {
    // 32 MiB = 16 huge pages; removes free and refault 2 of them; some slack.
    let _pool = match HugePages::reserve(24) {
        Ok(g) => g,
        Err(why) => {
            eprintln!("skipped: cannot reserve 2 MiB huge pages: {why}");
            return;
        }
    };
    for version in ["1.7", "1.12"] {
        let (vmm, h) = one_vmm(
            &format!("huge{version}"),
            32 * MIB,
            &[
                "--page-size",
                "2M",
                "--version",
                version,
                "--regions",
                "3",
                "--shuffle",
                "--same-page-threads",
                "4",
                "--wait-complete",
                "20",
                "--remove",
                "4:2",
            ],
        );
        assert_eq!(n(&vmm["page_size"]), 2 * MIB);
        assert_eq!(n(&h["page_size"]), 2 * MIB);
        assert_eq!(vmm["complete"], true);
        assert_eq!(n(&h["pages_copied"]), 16);
        assert_eq!(n(&h["pages_zeroed"]), 2);
        assert_eq!(n(&vmm["zero_violations"]), 0);
    }
}

#[test]
fn usage_errors_exit_2_with_a_message() {
    let dir = TempDir::new("usage");
    let image = dir.path("image");
    let socket = dir.path("sock");
    gen_image(&image, 4 * MIB, 5);
    let cases: &[(&[&str], &str)] = &[
        (&["--connect-timeout", "0.1"], "cannot connect"),
        (&["--version", "1.1", "--page-size", "2M"], "--version 1.7"),
        (&["--size", "1G"], "larger than the image"),
        (&["--remove", "1020:10"], "past the last page"),
        (&["--page-size", "8192"], "not a supported page size"),
        (&["--regions", "0"], "--regions"),
        (&["--touch-percent", "101"], "--touch-percent"),
    ];
    for (args, needle) in cases {
        let (code, _, err) = run_vmm(&socket, &image, args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(
            err.contains(needle),
            "{args:?}: stderr should mention `{needle}`: {err}"
        );
    }
    let (code, _, err) =
        start_handler(&socket, &dir.path("missing"), true).wait(Duration::from_secs(10));
    assert_eq!(code, 2);
    assert!(err.contains("cannot open --image"), "{err}");
}

#[test]
fn handler_rejects_a_bad_handover_and_survives() {
    let dir = TempDir::new("bad");
    let image = dir.path("image");
    let socket = dir.path("sock");
    gen_image(&image, 4 * MIB, 6);
    let mut handler = start_handler(&socket, &image, false);
    let connect = || {
        for _ in 0..500 {
            if let Ok(s) = UnixStream::connect(&socket) {
                return s;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("handler never listened");
    };
    // Not JSON, with an fd (any fd: the handler must fail on the JSON first).
    let s = connect();
    let fds = [s.as_raw_fd()];
    sendmsg::<()>(
        s.as_raw_fd(),
        &[IoSlice::new(b"{not json")],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .unwrap();
    drop(s);
    // JSON but no fd.
    let mut s = connect();
    std::io::Write::write_all(
        &mut s,
        br#"[{"base_host_virt_addr":0,"size":4096,"offset":0}]"#,
    )
    .unwrap();
    drop(s);
    std::thread::sleep(Duration::from_millis(200));
    assert!(handler.running());
    // A real VMM still works.
    let (code, json, err) = run_vmm(&socket, &image, &[]);
    assert_verified(code, &json, &err);
    let (out, herr) = handler.kill_after_lines(1, Duration::from_secs(10));
    assert!(
        herr.contains("not a JSON array") && herr.contains("no file descriptor"),
        "{herr}"
    );
    assert_eq!(reports(&out).len(), 1, "{out}");
}
