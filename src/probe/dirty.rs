//! Dirty tracking without KVM: userfaultfd async write-protect and `PAGEMAP_SCAN`
//! (informational; postcopy itself does not need it).

use super::{check, pass, Check, Status};
use crate::sys::dirty::{DirtyError, UffdWpTracker};
use crate::sys::uffd::{feature, ApiInfo, UffdError};

/// Tries dirty tracking without KVM for real: a scratch region tracked with userfaultfd async
/// write-protect and `PAGEMAP_SCAN` must report exactly the pages written to it
/// ([`UffdWpTracker::self_test`]).
pub(super) fn check_pagemap_scan(api: &Result<ApiInfo, UffdError>, release: &str) -> Check {
    const NAME: &str = "pagemap scan";
    let wp_async = match api {
        Ok(info) if info.features & feature::WP_ASYNC != 0 => "offered",
        Ok(_) => "absent",
        Err(_) => "unknown",
    };
    match UffdWpTracker::self_test() {
        Ok(detail) => pass(
            NAME,
            format!("{detail}: a dirty log without KVM is possible"),
        ),
        Err(e) => {
            let fix = match &e {
                DirtyError::Pagemap(_) => "mount /proc (procfs) in this container",
                DirtyError::Uffd(_) => "fix the userfaultfd checks above",
                DirtyError::NoWriteProtect { .. } => {
                    "use a kernel built with userfaultfd write-protect (CONFIG_HAVE_ARCH_USERFAULTFD_WP)"
                }
                DirtyError::SelfTest(_) => "report this together with `uname -a`",
                _ => "run on Linux 6.7 or newer",
            };
            check(
                NAME,
                Status::Warn,
                format!(
                    "UFFD_FEATURE_WP_ASYNC {wp_async} (kernel {release}); {e}: no dirty log without KVM \
                     (informational; postcopy itself does not need it)"
                ),
                Some(fix.into()),
            )
        }
    }
}
