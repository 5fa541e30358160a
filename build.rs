//! Puts the commit this binary was built from into `postcopy --version` (`POSTCOPY_COMMIT`):
//! `git describe` of the checkout's HEAD, "unknown" outside one (a crate tarball).

use std::process::Command;

fn main() {
    let commit = Command::new("git")
        .args(["describe", "--always", "--abbrev=12"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=POSTCOPY_COMMIT={commit}");
    // A new commit (or another branch checked out) changes the version string. (Uncommitted
    // edits do not: they would rebuild everything on every `git add`.)
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
}
