//! Firecracker's userfaultfd handover message: one JSON array, one object per guest memory
//! region, sent in one `sendmsg` together with the userfaultfd (SCM_RIGHTS). No length prefix.
//!
//! | Firecracker | fields |
//! | --- | --- |
//! | v1.1 .. v1.6 | `base_host_virt_addr`, `size`, `offset` |
//! | v1.7 .. v1.11 | + `page_size_kib` (a value in **bytes**, despite the name) |
//! | v1.12 .. v1.16 | + `page_size` (bytes), sent beside the deprecated `page_size_kib` |

use serde::{Deserialize, Serialize};

/// One guest memory region as it appears in the handover JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionMsg {
    /// Where the region is mapped in the VMM.
    pub base_host_virt_addr: u64,
    /// Its length in bytes.
    pub size: u64,
    /// Its byte offset in the memory file (regions lie end to end in the file).
    pub offset: u64,
    /// v1.12+: the page size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u64>,
    /// v1.7+: the page size, in bytes despite the name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size_kib: Option<u64>,
}

/// Which Firecracker handover format to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Version {
    /// v1.1: base_host_virt_addr, size, offset
    #[value(name = "1.1")]
    V1_1,
    /// v1.7: + page_size_kib (in bytes)
    #[value(name = "1.7")]
    V1_7,
    /// v1.12: + page_size and page_size_kib (both in bytes)
    #[value(name = "1.12")]
    V1_12,
}

impl Version {
    pub fn as_str(self) -> &'static str {
        match self {
            Version::V1_1 => "1.1",
            Version::V1_7 => "1.7",
            Version::V1_12 => "1.12",
        }
    }
}

impl RegionMsg {
    /// The message for a region in the given format.
    pub fn new(version: Version, base: u64, size: u64, offset: u64, page_size: u64) -> Self {
        let (page_size, page_size_kib) = match version {
            Version::V1_1 => (None, None),
            Version::V1_7 => (None, Some(page_size)),
            Version::V1_12 => (Some(page_size), Some(page_size)),
        };
        RegionMsg {
            base_host_virt_addr: base,
            size,
            offset,
            page_size,
            page_size_kib,
        }
    }

    /// The format this message looks like it was written in.
    pub fn version(&self) -> Version {
        match (self.page_size, self.page_size_kib) {
            (Some(_), _) => Version::V1_12,
            (None, Some(_)) => Version::V1_7,
            (None, None) => Version::V1_1,
        }
    }

    /// The region's page size in bytes: `page_size`, else `page_size_kib` (bytes in every
    /// Firecracker release; a small value such as 4 or 2048 is taken as KiB, in case a VMM
    /// ever fixes the name's meaning), else 4096 (v1.1 had no huge pages).
    pub fn effective_page_size(&self) -> Result<u64, String> {
        let ps = match (self.page_size, self.page_size_kib) {
            (Some(p), Some(k)) if p != k && k.saturating_mul(1024) != p => {
                return Err(format!("page_size {p} and page_size_kib {k} disagree"));
            }
            (Some(p), _) => p,
            (None, Some(k)) if k < 4096 => k.saturating_mul(1024),
            (None, Some(k)) => k,
            (None, None) => 4096,
        };
        if ps < 4096 || !ps.is_power_of_two() {
            return Err(format!("page size {ps} is not a power of two >= 4096"));
        }
        Ok(ps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_per_version() {
        let v = |v| serde_json::to_string(&RegionMsg::new(v, 4096, 8192, 0, 4096)).unwrap();
        assert_eq!(
            v(Version::V1_1),
            r#"{"base_host_virt_addr":4096,"size":8192,"offset":0}"#
        );
        assert_eq!(
            v(Version::V1_7),
            r#"{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size_kib":4096}"#
        );
        assert_eq!(
            v(Version::V1_12),
            r#"{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":4096,"page_size_kib":4096}"#
        );
    }

    #[test]
    fn page_size_parsing() {
        let p = |s: &str| {
            serde_json::from_str::<RegionMsg>(s)
                .unwrap()
                .effective_page_size()
        };
        assert_eq!(
            p(r#"{"base_host_virt_addr":0,"size":0,"offset":0}"#),
            Ok(4096)
        );
        assert_eq!(
            p(r#"{"base_host_virt_addr":0,"size":0,"offset":0,"page_size_kib":2097152}"#),
            Ok(2 << 20)
        );
        assert_eq!(
            p(r#"{"base_host_virt_addr":0,"size":0,"offset":0,"page_size_kib":4}"#),
            Ok(4096)
        );
        assert_eq!(
            p(
                r#"{"base_host_virt_addr":0,"size":0,"offset":0,"page_size":4096,"page_size_kib":4096,"x":1}"#
            ),
            Ok(4096)
        );
        assert!(p(
            r#"{"base_host_virt_addr":0,"size":0,"offset":0,"page_size":4096,"page_size_kib":8192}"#
        )
        .is_err());
        assert!(p(r#"{"base_host_virt_addr":0,"size":0,"offset":0,"page_size":3000}"#).is_err());
    }
}
