//! Kernel interfaces. The only modules of the crate allowed to use `unsafe`; each wraps one
//! kernel concept and names things as the kernel does.

pub mod dirty;
pub mod mem;
pub mod memfd;
pub mod ring;
pub mod scm;
pub mod uffd;

/// Pins the calling thread to one CPU (`sched_setaffinity`). Errors are returned, not fatal:
/// a container may forbid a CPU.
pub fn pin_to_cpu(cpu: usize) -> nix::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
}

/// Number of CPUs this process may run on.
pub fn online_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// CPU time the calling thread has used (user + system; `CLOCK_THREAD_CPUTIME_ID`).
pub fn thread_cpu_time() -> std::time::Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(std::time::Duration::from)
        .unwrap_or_default()
}

/// CPU time process `pid` has used so far, all its threads, user + system (from
/// `/proc/PID/stat`, in clock ticks: 10 ms here). `None` if it is gone.
pub fn process_cpu_time(pid: u32) -> Option<std::time::Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces, in parentheses): state is
    // field 3, utime field 14, stime field 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|&h| h > 0)
        .unwrap_or(100) as u64;
    Some(std::time::Duration::from_nanos(ticks * 1_000_000_000 / hz))
}

/// Sets the calling thread's nice value (Linux: `setpriority(PRIO_PROCESS, 0)` applies to the
/// calling thread only). Best effort: raising niceness never needs privileges.
#[allow(unsafe_code)]
pub fn set_thread_nice(nice: i32) -> nix::Result<()> {
    // SAFETY: setpriority takes plain integers and touches no memory of ours.
    let ret = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if ret < 0 {
        Err(nix::errno::Errno::last())
    } else {
        Ok(())
    }
}

/// Makes the child `cmd` spawns die (`SIGKILL`) when the thread that spawns it ends, which is
/// when this process ends, however it ends (`PR_SET_PDEATHSIG`, Linux 2.1.57+). A parent
/// gone before the child set it up fails the spawn. Spawn from a thread that lives as long as
/// the child should (the main thread, or the one that waits for it).
#[allow(unsafe_code)]
pub fn die_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe functions (prctl, getppid); it allocates nothing, since the error
    // is built from a raw errno.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}
