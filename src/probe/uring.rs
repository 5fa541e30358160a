//! io_uring: a ring can be created, has the opcodes the engine submits, and the sysctl lets
//! this process (and others) create rings.

use std::path::Path;

use super::host::read_u64;
use super::{check, pass, Check, Status};

/// A ring of 8 entries and the opcodes the engine submits.
pub(super) fn check_io_uring() -> Check {
    const NAME: &str = "io_uring";
    use io_uring::opcode;
    let ring = match io_uring::IoUring::new(8) {
        Ok(r) => r,
        Err(e) => {
            return check(
                NAME,
                Status::Fail,
                format!("io_uring_setup failed: {e}"),
                Some("use Linux 6.1+ with CONFIG_IO_URING, allow io_uring in the seccomp profile (containers), and sysctl kernel.io_uring_disabled=0".into()),
            )
        }
    };
    let mut probe = io_uring::Probe::new();
    if let Err(e) = ring.submitter().register_probe(&mut probe) {
        return check(
            NAME,
            Status::Fail,
            format!("ring created but IORING_REGISTER_PROBE failed: {e}"),
            Some("use Linux 5.6 or newer (6.1+ recommended)".into()),
        );
    }
    let wanted = [
        (opcode::ReadFixed::CODE, "READ_FIXED"),
        (opcode::WriteFixed::CODE, "WRITE_FIXED"),
        (opcode::Read::CODE, "READ"),
        (opcode::Send::CODE, "SEND"),
        (opcode::Recv::CODE, "RECV"),
        (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
        (opcode::PollAdd::CODE, "POLL_ADD"),
    ];
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(code, _)| !probe.is_supported(*code))
        .map(|(_, n)| *n)
        .collect();
    let all: Vec<&str> = wanted.iter().map(|(_, n)| *n).collect();
    if missing.is_empty() {
        pass(
            NAME,
            format!("ring of 8 created; opcodes supported: {}", all.join(" ")),
        )
    } else {
        check(
            NAME,
            Status::Fail,
            format!("ring of 8 created; opcodes missing: {}", missing.join(" ")),
            Some("use Linux 6.1 or newer".into()),
        )
    }
}

/// `kernel.io_uring_disabled` (Linux 6.6+).
pub(super) fn check_io_uring_sysctl() -> Check {
    const NAME: &str = "io_uring sysctl";
    let path = "/proc/sys/kernel/io_uring_disabled";
    if !Path::new(path).exists() {
        return pass(
            NAME,
            format!("{path} absent (kernel older than 6.6): io_uring unrestricted"),
        );
    }
    let fix = Some("sysctl kernel.io_uring_disabled=0".to_string());
    match read_u64(path) {
        Ok(0) => pass(NAME, "kernel.io_uring_disabled = 0"),
        Ok(1) if io_uring::IoUring::new(2).is_ok() => check(
            NAME,
            Status::Warn,
            "kernel.io_uring_disabled = 1: only CAP_SYS_ADMIN or members of kernel.io_uring_group may create rings; this process can, others may not",
            fix,
        ),
        Ok(v) => check(
            NAME,
            Status::Fail,
            format!("kernel.io_uring_disabled = {v}: io_uring is restricted ({})", if v == 1 { "privileged users only" } else { "disabled for everyone" }),
            fix,
        ),
        Err(e) => check(NAME, Status::Warn, e.to_string(), fix),
    }
}
