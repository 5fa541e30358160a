//! Value parsers of the command line: sizes with units, and the ranges numeric options accept
//! (clap refuses a value outside them, naming the option and the range).

use clap::builder::RangedU64ValueParser;

/// Most workload threads.
pub const MAX_THREADS: u64 = 1024;
/// Most engine workers (the cap the engine enforces).
pub const MAX_WORKERS: u64 = 256;
/// Most seconds of a timeout (a day).
pub const MAX_TIMEOUT_S: u64 = 86_400;
/// Most pages per second a live source's workload writes.
pub const MAX_DIRTY_PAGES_PER_S: u64 = 1_000_000_000;
/// Most precopy rounds.
pub const MAX_PRECOPY_ROUNDS: u32 = 10_000;
/// Most benchmark runs per handler and mode.
pub const MAX_RUNS: u64 = 1000;
/// Most milliseconds the test hook delays an urgent reply.
pub const MAX_URGENT_DELAY_MS: u64 = 60_000;
/// Prefetch: the largest cap.
pub const MAX_PREFETCH_PAGES: u64 = 1024;
/// The page size of the demo's and the benchmark's images.
pub const DEMO_PAGE_BYTES: u64 = 4096;

/// A count of at least `min` and at most `max`, as a `usize`.
pub fn usize_in(min: u64, max: u64) -> RangedU64ValueParser<usize> {
    RangedU64ValueParser::<usize>::new().range(min..=max)
}

/// A size in bytes: a number with an optional unit K, M, G or T (powers of 1024; `KiB`, `KB`
/// and `K` alike), greater than zero.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = s[i..].to_ascii_uppercase();
            let mult: u64 = match unit.trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => return Err(format!("unknown size unit in {s:?} (use K, M, G, T)")),
            };
            (&s[..i], mult)
        }
        None => (s, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 1G, 512M, 4096)"))?;
    n.checked_mul(mult)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("size {s:?} is zero or too large"))
}

/// The size of a demo or benchmark image: a [`parse_size`] of whole 4 KiB pages.
pub fn parse_image_size(s: &str) -> Result<u64, String> {
    let size_bytes = parse_size(s)?;
    if size_bytes % DEMO_PAGE_BYTES != 0 {
        return Err(format!(
            "size {s:?} is not a whole number of {DEMO_PAGE_BYTES}-byte pages (e.g. 1G, 256M)"
        ));
    }
    Ok(size_bytes)
}

/// A page size: a [`parse_size`] that is a power of two from 4 KiB to 1 GiB.
pub fn parse_page_size(s: &str) -> Result<u64, String> {
    let page_bytes = parse_size(s)?;
    if !page_bytes.is_power_of_two() || !(4096..=1 << 30).contains(&page_bytes) {
        return Err(format!(
            "page size {s:?} is not a power of two from 4K to 1G (e.g. 4096, 4K, 2M, 1G)"
        ));
    }
    Ok(page_bytes)
}

/// A `HOST:PORT` address (a name, an IPv4 address, or an IPv6 one in brackets), as given.
pub fn parse_host_port(s: &str) -> Result<String, String> {
    let example = "e.g. 10.0.0.1:7070, src.example:7070, [::1]:7070";
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} has no port: give HOST:PORT ({example})"))?;
    if host.is_empty() || (host.contains(':') && !host.starts_with('[')) {
        return Err(format!("{s:?} is not HOST:PORT ({example})"));
    }
    port.parse::<u16>()
        .map_err(|_| format!("{port:?} in {s:?} is not a port number ({example})"))?;
    Ok(s.to_string())
}

/// Seconds, fractions allowed, from 0 to [`MAX_TIMEOUT_S`].
pub fn parse_seconds(s: &str) -> Result<f64, String> {
    let seconds: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds (e.g. 30, 0.5)"))?;
    if !(0.0..=MAX_TIMEOUT_S as f64).contains(&seconds) {
        return Err(format!("{s} seconds: use 0..={MAX_TIMEOUT_S}"));
    }
    Ok(seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("2MiB"), Ok(2 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("0").is_err());
        assert!(parse_size("1X").is_err());
        assert!(parse_size("99999999T").is_err());
    }

    #[test]
    fn image_sizes_are_whole_pages() {
        assert_eq!(parse_image_size("64M"), Ok(64 << 20));
        assert!(parse_image_size("1000").is_err());
    }

    #[test]
    fn page_sizes_are_powers_of_two_from_4k_to_1g() {
        assert_eq!(parse_page_size("4096"), Ok(4096));
        assert_eq!(parse_page_size("2M"), Ok(2 << 20));
        assert_eq!(parse_page_size("2097152"), Ok(2 << 20));
        assert_eq!(parse_page_size("1G"), Ok(1 << 30));
        assert!(parse_page_size("2K").is_err());
        assert!(parse_page_size("12K").is_err());
        assert!(parse_page_size("2G").is_err());
    }

    #[test]
    fn addresses_need_a_host_and_a_port() {
        assert!(parse_host_port("127.0.0.1:7070").is_ok());
        assert!(parse_host_port("src.example:0").is_ok());
        assert!(parse_host_port("[::1]:7070").is_ok());
        assert!(parse_host_port("127.0.0.1")
            .unwrap_err()
            .contains("no port"));
        assert!(parse_host_port(":7070").is_err());
        assert!(parse_host_port("::1:7070").is_err());
        assert!(parse_host_port("h:99999").is_err());
    }

    #[test]
    fn seconds_are_finite_and_bounded() {
        assert_eq!(parse_seconds("0.5"), Ok(0.5));
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("inf").is_err());
        assert!(parse_seconds("NaN").is_err());
        assert!(parse_seconds("1e9").is_err());
    }
}
