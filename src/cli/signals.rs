//! SIGINT, SIGTERM and SIGHUP: how each command stops when asked to.
//!
//! [`install`] runs first in `main`, before any thread exists: it blocks the three signals, so
//! every thread inherits the mask and none is interrupted, and one thread waits for them
//! (`sigwait`). (A child process gets an empty mask back: `std::process::Command` resets it.)
//!
//! - By default a signal ends the process at once, after removing the files registered with
//!   [`remove_on_exit`]; the exit status is 128 + the signal's number. The demo's source
//!   process dies with it (`PR_SET_PDEATHSIG`), and the demo writes no key file.
//! - A command that serves migrations registers [`on_stop`]: a migration in postcopy cannot be
//!   restarted, so the first signal asks it to take no new work and to end once the migrations
//!   in flight have ended; the second stops those too; the third ends the process at once.

use std::path::PathBuf;
use std::sync::Mutex;

use nix::sys::signal::{SigSet, Signal};

/// What the waiting thread knows: the files to remove, and the command's stop.
struct State {
    remove: Vec<PathBuf>,
    on_stop: Option<Box<dyn Fn(u32, Signal) + Send>>,
}

static STATE: Mutex<State> = Mutex::new(State {
    remove: Vec::new(),
    on_stop: None,
});

fn signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGHUP);
    set
}

/// Blocks the signals in this thread (and the threads it will start) and starts the thread
/// that waits for them. Call first in `main`.
pub fn install() {
    let set = signals();
    if let Err(e) = set.thread_block() {
        postcopy::warn!(
            "",
            "cannot block SIGINT/SIGTERM ({e}); a signal ends the process without cleanup"
        );
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || wait_forever(set));
    if let Err(e) = spawned {
        postcopy::warn!("", "cannot start the signal thread ({e})");
        let _ = set.thread_unblock();
    }
}

fn wait_forever(set: SigSet) {
    let mut received = 0u32;
    loop {
        let Ok(signal) = set.wait() else { continue };
        received += 1;
        let state = STATE.lock().unwrap_or_else(|p| p.into_inner());
        match (&state.on_stop, received) {
            (Some(stop), 1 | 2) => stop(received, signal),
            _ => exit_now(&state, signal),
        }
    }
}

fn exit_now(state: &State, signal: Signal) -> ! {
    for path in &state.remove {
        let _ = std::fs::remove_file(path);
    }
    postcopy::warn!("", "stopped by {}", signal.as_str());
    std::process::exit(128 + signal as i32);
}

/// Removes `path` if a signal ends the process (the command removes it itself otherwise).
pub fn remove_on_exit(path: PathBuf) {
    STATE
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove
        .push(path);
}

/// Calls `stop(n, signal)` on the first (`n` = 1) and the second (`n` = 2) signal instead of
/// ending the process; the third ends it.
pub fn on_stop(stop: impl Fn(u32, Signal) + Send + 'static) {
    STATE.lock().unwrap_or_else(|p| p.into_inner()).on_stop = Some(Box::new(stop));
}
