//! The userfaultfd handover protocol of Firecracker (v1.1 to v1.16), as the page server sees it.
//!
//! A VMM that restores a snapshot with a `Uffd` memory backend connects to the page server's
//! Unix stream socket and sends **one message**: a UTF-8 JSON array with one object per guest
//! memory region, plus exactly one descriptor (its userfaultfd) as `SCM_RIGHTS`. No length
//! prefix; the VMM keeps the socket open until it exits. Per region:
//!
//! | field | since | meaning |
//! | --- | --- | --- |
//! | `base_host_virt_addr` | v1.1 | where the region is mapped in the VMM |
//! | `size` | v1.1 | bytes |
//! | `offset` | v1.1 | byte offset of the region in the memory file (regions end to end) |
//! | `page_size_kib` | v1.7 | despite its name, the page size in **bytes** |
//! | `page_size` | v1.12 | page size in bytes (sent beside the deprecated `page_size_kib`) |
//!
//! Regions may come in any order of address. The VMM has already done `UFFDIO_API` and
//! registered every region (MISSING); it may fault before the page server reads the message.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::dest::Segment;
use crate::layout::Layout;

/// Largest handshake message accepted (a VMM has a handful of regions).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// What is wrong with a VMM's handshake, in words an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// The socket failed.
    #[error("handshake: {context}: {source}")]
    Io {
        /// What we were doing.
        context: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The VMM closed the socket before sending its regions.
    #[error("handshake: the VMM closed the socket before sending its memory regions")]
    Closed,
    /// Not the JSON we expect.
    #[error("handshake: malformed region list ({0}); expected a JSON array of {{\"base_host_virt_addr\", \"size\", \"offset\"[, \"page_size_kib\"][, \"page_size\"]}} objects")]
    Json(String),
    /// No userfaultfd came with the message.
    #[error("handshake: no file descriptor came with the region list; the VMM must send its userfaultfd as SCM_RIGHTS in the same message")]
    MissingFd,
    /// More than one descriptor came.
    #[error("handshake: {0} file descriptors came with the region list; expected exactly one (the userfaultfd)")]
    TooManyFds(usize),
    /// A region is unusable.
    #[error("handshake: region {index} ({detail})")]
    Region {
        /// Its position in the array.
        index: usize,
        /// What is wrong.
        detail: String,
    },
    /// Two regions overlap.
    #[error("handshake: regions {a} and {b} overlap ({what})")]
    Overlap {
        /// One region.
        a: usize,
        /// The other.
        b: usize,
        /// In the VMM's address space or in the memory file.
        what: &'static str,
    },
    /// A region reaches past the image the source serves.
    #[error("handshake: region {index} ends at byte {end} of the memory file, past the end of the image the source serves ({image_bytes} bytes): wrong snapshot or wrong source?")]
    PastImage {
        /// The region.
        index: usize,
        /// Its end offset.
        end: u64,
        /// The image's size.
        image_bytes: u64,
    },
}

/// Which generation of the JSON a VMM sent (detected from the fields).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum JsonVersion {
    /// `base_host_virt_addr`, `size`, `offset` (Firecracker v1.1 to v1.6).
    #[serde(rename = "1.1")]
    V1_1,
    /// + `page_size_kib` (v1.7 to v1.11).
    #[serde(rename = "1.7")]
    V1_7,
    /// + `page_size` (v1.12 and later).
    #[serde(rename = "1.12")]
    V1_12,
}

/// One guest memory region of a VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct GuestRegion {
    /// Where it is mapped in the VMM.
    pub base_host_virt_addr: u64,
    /// Bytes.
    pub size: u64,
    /// Byte offset in the memory file.
    pub offset: u64,
    /// Page size in bytes, when the VMM said (v1.7+).
    pub page_size: Option<u64>,
}

/// Parses the region list: every JSON version above; unknown extra fields are ignored.
pub fn parse_regions(bytes: &[u8]) -> Result<(Vec<GuestRegion>, JsonVersion), HandoverError> {
    let text =
        std::str::from_utf8(bytes).map_err(|e| HandoverError::Json(format!("not UTF-8: {e}")))?;
    let value: serde_json::Value = serde_json::from_str(text.trim_end_matches('\0'))
        .map_err(|e| HandoverError::Json(e.to_string()))?;
    let items = value
        .as_array()
        .ok_or_else(|| HandoverError::Json("the top level is not an array".into()))?;
    if items.is_empty() {
        return Err(HandoverError::Json("the array has no regions".into()));
    }
    let mut regions = Vec::with_capacity(items.len());
    let mut version = JsonVersion::V1_12;
    for (index, item) in items.iter().enumerate() {
        let (region, v) = region_of(index, item)?;
        version = oldest(version, v);
        regions.push(region);
    }
    Ok((regions, version))
}

/// Region `index` of the list, and the JSON generation its page-size fields belong to.
fn region_of(
    index: usize,
    item: &serde_json::Value,
) -> Result<(GuestRegion, JsonVersion), HandoverError> {
    let obj = item.as_object().ok_or_else(|| HandoverError::Region {
        index,
        detail: "not a JSON object".into(),
    })?;
    let field = |name: &str| -> Result<Option<u64>, HandoverError> {
        match obj.get(name) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| HandoverError::Region {
                index,
                detail: format!("`{name}` is {v}, not an unsigned integer"),
            }),
        }
    };
    let need = |name: &str| -> Result<u64, HandoverError> {
        field(name)?.ok_or_else(|| HandoverError::Region {
            index,
            detail: format!("`{name}` is missing"),
        })
    };
    let base = need("base_host_virt_addr")?;
    let size = need("size")?;
    let offset = need("offset")?;
    let kib = field("page_size_kib")?;
    let bytes = field("page_size")?;
    let (page_size, version) = match (bytes, kib) {
        (Some(b), Some(k)) if b != k => {
            return Err(HandoverError::Region {
                index,
                detail: format!("`page_size` {b} and `page_size_kib` {k} disagree"),
            })
        }
        (Some(b), _) => (Some(b), JsonVersion::V1_12),
        // Despite its name, `page_size_kib` carries bytes (Firecracker v1.7 to v1.11).
        (None, Some(k)) => (Some(k), JsonVersion::V1_7),
        (None, None) => (None, JsonVersion::V1_1),
    };
    let region = GuestRegion {
        base_host_virt_addr: base,
        size,
        offset,
        page_size,
    };
    Ok((region, version))
}

/// The older of two JSON generations (a list is as old as its oldest region).
fn oldest(a: JsonVersion, b: JsonVersion) -> JsonVersion {
    match (a, b) {
        (JsonVersion::V1_1, _) | (_, JsonVersion::V1_1) => JsonVersion::V1_1,
        (JsonVersion::V1_7, _) | (_, JsonVersion::V1_7) => JsonVersion::V1_7,
        _ => JsonVersion::V1_12,
    }
}

/// Maps the regions onto the source's layout (one block: the memory file), checking each:
/// non-empty, page-aligned, the page size the source serves, inside the image, no overlap.
pub fn segments_for(
    regions: &[GuestRegion],
    layout: &Layout,
) -> Result<Vec<Vec<Segment>>, HandoverError> {
    let block = &layout.blocks[0];
    let mut segs = Vec::with_capacity(regions.len());
    for (index, r) in regions.iter().enumerate() {
        segs.push((index, segment_of(index, r, block)?));
    }
    check_no_overlap(&segs, block.page_size)?;
    let mut per_block = vec![Vec::new(); layout.blocks.len()];
    per_block[0] = segs.into_iter().map(|(_, s)| s).collect();
    Ok(per_block)
}

/// Region `index` as a segment of `block`: its page size is the block's, it is non-empty and
/// page-aligned, nothing overflows, and it ends inside the image.
fn segment_of(
    index: usize,
    r: &GuestRegion,
    block: &crate::layout::Block,
) -> Result<Segment, HandoverError> {
    let ps = block.page_size;
    let bad = |detail: String| HandoverError::Region { index, detail };
    if let Some(p) = r.page_size {
        if p != ps {
            return Err(bad(format!(
                "page size {p} bytes, but the source serves the image in pages of {ps}: serve it with --page-size {p}"
            )));
        }
    }
    if r.size == 0 {
        return Err(bad("size 0".into()));
    }
    if r.size % ps != 0 || r.offset % ps != 0 || r.base_host_virt_addr % ps != 0 {
        return Err(bad(format!(
            "base {:#x}, offset {} or size {} is not a multiple of the page size {ps}",
            r.base_host_virt_addr, r.offset, r.size
        )));
    }
    let end = r
        .offset
        .checked_add(r.size)
        .ok_or_else(|| bad("offset + size overflows".into()))?;
    if r.base_host_virt_addr.checked_add(r.size).is_none() {
        return Err(bad("base + size overflows".into()));
    }
    if end > block.size_bytes {
        return Err(HandoverError::PastImage {
            index,
            end,
            image_bytes: block.size_bytes,
        });
    }
    Ok(Segment {
        first_page: r.offset / ps,
        pages: r.size / ps,
        host_addr: r.base_host_virt_addr as usize,
    })
}

/// No two segments (by region index) overlap, neither in the memory file nor in the VMM's
/// address space (pages of `ps` bytes).
fn check_no_overlap(segs: &[(usize, Segment)], ps: u64) -> Result<(), HandoverError> {
    for (what, key) in [
        ("in the memory file", 0usize),
        ("in the VMM's address space", 1usize),
    ] {
        let span = |s: &Segment| match key {
            0 => (s.first_page * ps, (s.first_page + s.pages) * ps),
            _ => (s.host_addr as u64, s.host_addr as u64 + s.pages * ps),
        };
        let mut sorted: Vec<&(usize, Segment)> = segs.iter().collect();
        sorted.sort_by_key(|(_, s)| span(s).0);
        for w in sorted.windows(2) {
            if span(&w[1].1).0 < span(&w[0].1).1 {
                return Err(HandoverError::Overlap {
                    a: w[0].0.min(w[1].0),
                    b: w[0].0.max(w[1].0),
                    what,
                });
            }
        }
    }
    Ok(())
}

/// A VMM's handshake, received.
#[derive(Debug)]
pub struct Handover {
    /// Its regions, as sent.
    pub regions: Vec<GuestRegion>,
    /// Which JSON generation.
    pub version: JsonVersion,
    /// The userfaultfd.
    pub uffd: OwnedFd,
    /// The VMM's pid (`SO_PEERCRED`), if the kernel told.
    pub pid: Option<i32>,
}

/// Reads the handshake from a freshly accepted VMM connection, waiting at most `timeout` for a
/// complete message (a JSON split over several reads is put back together; the descriptor
/// must come with the first).
pub fn receive(sock: &UnixStream, timeout: Duration) -> Result<Handover, HandoverError> {
    let io = |context| move |source| HandoverError::Io { context, source };
    sock.set_read_timeout(Some(timeout))
        .map_err(io("set timeout"))?;
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; MAX_MESSAGE_BYTES];
    let mut len = 0;
    let mut fds = Vec::new();
    loop {
        let got = crate::sys::scm::recv_with_fds(sock, &mut buf[len..]).map_err(|e| {
            HandoverError::Io {
                context: "receive the region list",
                source: e.into(),
            }
        })?;
        if got.truncated_fds {
            return Err(HandoverError::TooManyFds(fds.len() + got.fds.len() + 1));
        }
        fds.extend(got.fds);
        if got.len == 0 {
            if len == 0 {
                return Err(HandoverError::Closed);
            }
            break;
        }
        len += got.len;
        match parse_regions(&buf[..len]) {
            Ok(_) => break,
            Err(HandoverError::Json(e))
                if e.contains("EOF") && len < buf.len() && Instant::now() < deadline =>
            {
                continue
            }
            Err(e) => return Err(e),
        }
    }
    let (regions, version) = parse_regions(&buf[..len])?;
    let uffd = match fds.len() {
        0 => return Err(HandoverError::MissingFd),
        1 => fds.pop().expect("one descriptor"),
        n => return Err(HandoverError::TooManyFds(n)),
    };
    sock.set_read_timeout(None).map_err(io("clear timeout"))?;
    Ok(Handover {
        regions,
        version,
        uffd,
        pid: crate::sys::scm::peer_pid(sock),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(bytes: u64, ps: u64) -> Layout {
        Layout::single("image", bytes, ps).unwrap()
    }

    #[test]
    fn every_json_version_parses() {
        let v11 = br#"[{"base_host_virt_addr":140000000000000,"size":8192,"offset":0}]"#;
        let v17 =
            br#"[{"base_host_virt_addr":4096,"size":8192,"offset":8192,"page_size_kib":4096}]"#;
        let v112 = br#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size_kib":4096,"page_size":4096},
                       {"base_host_virt_addr":65536,"size":4096,"offset":8192,"page_size_kib":4096,"page_size":4096}]"#;
        assert_eq!(parse_regions(v11).unwrap().1, JsonVersion::V1_1);
        let (r, v) = parse_regions(v17).unwrap();
        assert_eq!((v, r[0].page_size), (JsonVersion::V1_7, Some(4096)));
        let (r, v) = parse_regions(v112).unwrap();
        assert_eq!((v, r.len()), (JsonVersion::V1_12, 2));
    }

    #[test]
    fn bad_json_is_named() {
        for (bytes, what) in [
            (&b"{"[..], "malformed"),
            (b"{}", "not an array"),
            (b"[]", "no regions"),
            (b"[1]", "not a JSON object"),
            (br#"[{"size":1,"offset":0}]"#, "`base_host_virt_addr` is missing"),
            (br#"[{"base_host_virt_addr":-1,"size":1,"offset":0}]"#, "not an unsigned"),
            (
                br#"[{"base_host_virt_addr":0,"size":4096,"offset":0,"page_size":4096,"page_size_kib":2097152}]"#,
                "disagree",
            ),
            (b"\xff", "UTF-8"),
        ] {
            let e = parse_regions(bytes).unwrap_err().to_string();
            assert!(e.contains(what), "{e} should mention {what}");
        }
    }

    #[test]
    fn regions_are_checked_against_the_image() {
        let l = layout(1 << 20, 4096);
        let r = |base: u64, size: u64, offset: u64| GuestRegion {
            base_host_virt_addr: base,
            size,
            offset,
            page_size: Some(4096),
        };
        // Out of address order, non-zero offsets: fine.
        let segs =
            segments_for(&[r(0x20_0000, 0x8000, 0x8000), r(0x10_0000, 0x8000, 0)], &l).unwrap();
        assert_eq!(segs[0][1].first_page, 0);
        assert!(matches!(
            segments_for(&[r(0x10_0000, 0x10_0000, 0x1000)], &l),
            Err(HandoverError::PastImage { .. })
        ));
        assert!(matches!(
            segments_for(&[r(0x10_0000, 0x8000, 0), r(0x10_4000, 0x8000, 0x8000)], &l),
            Err(HandoverError::Overlap { .. })
        ));
        assert!(matches!(
            segments_for(&[r(0x10_0000, 0x8000, 0), r(0x20_0000, 0x8000, 0x4000)], &l),
            Err(HandoverError::Overlap { .. })
        ));
        assert!(segments_for(&[r(0x10_0001, 0x8000, 0)], &l).is_err());
        let mut huge = r(0x20_0000, 0x20_0000, 0);
        huge.page_size = Some(2 << 20);
        let e = segments_for(&[huge], &l).unwrap_err().to_string();
        assert!(e.contains("--page-size 2097152"), "{e}");
    }
}
