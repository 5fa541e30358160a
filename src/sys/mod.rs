//! Kernel interfaces. The only modules of the crate allowed to use `unsafe`; each wraps one
//! kernel concept and names things as the kernel does.

pub mod dirty;
pub mod mem;
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
