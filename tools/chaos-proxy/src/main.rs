//! `chaos-proxy`: forwards TCP connections to an upstream and cuts, delays or stalls them by plan.
//! See `--help` and the library documentation (`src/lib.rs`) for the exact semantics.

use std::net::{SocketAddr, ToSocketAddrs};
use std::process::exit;
use std::time::Duration;

use chaos_proxy::{Dir, Fault, Plan, Proxy, RandomCuts, RandomVictims};
use clap::{Parser, ValueEnum};

const AFTER_HELP: &str = "\
Connections are numbered from 0 in the order their upstream connect succeeds. A cut forwards
exactly OFFSET bytes in its direction, then shuts both sockets down: both peers read what was
forwarded, then EOF (with --reset: ECONNRESET). Offsets and sizes take K, M, G suffixes (KiB...).

Random cuts: connection i is given one cut at a direction and offset drawn from (--seed, i), as
long as fewer than N random cuts were made; never more than N are made.

Random victims: after a gap drawn from --victim-gap (bytes of all traffic, both directions,
every connection), a connection drawn among all live ones gets a blow drawn from
--victim-kinds: a reset, a FIN, or a silence (nothing forwarded either way) of a length drawn
from --silence-ms; then the next gap, until N blows were dealt. Draws are seeded (--seed).

--silence-all AT:MILLIS: once AT bytes were forwarded in total, the whole link goes silent
(every connection, and every one opened meanwhile) for MILLIS.

Prints `listening on ADDR` as the first line on stdout, then runs until killed; connections,
stalls and cuts are logged to stderr.

Examples:
  chaos-proxy --upstream 127.0.0.1:4000 --cut to-client:1M          # cut conn 0 after 1 MiB
  chaos-proxy --upstream 127.0.0.1:4000 --cut to-server:100@2       # cut conn 2 after 100 B
  chaos-proxy --upstream 127.0.0.1:4000 --random-cuts 5 --seed 7 --max-offset 64M --reset
  chaos-proxy --upstream 127.0.0.1:4000 --delay-us 200 --stall to-client:4M:2000
  chaos-proxy --upstream 127.0.0.1:4000 --victims 10 --seed 3 --victim-gap 1:32M \
      --victim-kinds reset,fin,silence --silence-ms 100:3000
  chaos-proxy --upstream 127.0.0.1:4000 --silence-all 64M:5000";

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DirArg {
    ToServer,
    ToClient,
    Both,
}

impl DirArg {
    fn dirs(self) -> &'static [Dir] {
        match self {
            DirArg::ToServer => &[Dir::ToServer],
            DirArg::ToClient => &[Dir::ToClient],
            DirArg::Both => &[Dir::ToServer, Dir::ToClient],
        }
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "chaos-proxy",
    version,
    about = "A TCP proxy that cuts, delays and stalls the connections it forwards (fault injection)",
    after_help = AFTER_HELP
)]
struct Args {
    /// Address to listen on (port 0: any free port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    listen: SocketAddr,

    /// The real server, HOST:PORT (resolved once, at start).
    #[arg(long, value_name = "HOST:PORT")]
    upstream: String,

    /// Cut connection CONN (default 0) after OFFSET bytes in DIR (to-server or to-client). Repeatable.
    #[arg(long = "cut", value_name = "DIR:OFFSET[@CONN]", value_parser = parse_cut)]
    cuts: Vec<(usize, Fault)>,

    /// Stall DIR of connection CONN (default 0) for MILLIS at OFFSET bytes. Repeatable.
    #[arg(long = "stall", value_name = "DIR:OFFSET:MILLIS[@CONN]", value_parser = parse_stall)]
    stalls: Vec<(usize, Fault)>,

    /// Delay each forwarded chunk (up to 64 KiB) of every connection by this many microseconds.
    #[arg(long, value_name = "MICROS")]
    delay_us: Option<u64>,

    /// Direction --delay-us applies to: to-server, to-client or both.
    #[arg(long, value_name = "DIR", value_enum, default_value_t = DirArg::Both)]
    delay_dir: DirArg,

    /// Make N cuts at seeded pseudo-random offsets (see below).
    #[arg(long, value_name = "N")]
    random_cuts: Option<usize>,

    /// Seed of the random cuts.
    #[arg(long, value_name = "S", default_value_t = 0)]
    seed: u64,

    /// Smallest random cut offset.
    #[arg(long, value_name = "BYTES", default_value = "0", value_parser = parse_size)]
    min_offset: u64,

    /// Largest random cut offset.
    #[arg(long, value_name = "BYTES", default_value = "1M", value_parser = parse_size)]
    max_offset: u64,

    /// Direction of the random cuts: to-server, to-client or both (drawn per connection).
    #[arg(long, value_name = "DIR", value_enum, default_value_t = DirArg::Both)]
    random_dir: DirArg,

    /// Cut with a reset (SO_LINGER 0: the peers get ECONNRESET) instead of EOF.
    #[arg(long)]
    reset: bool,

    /// Deal N blows to random live connections (see below).
    #[arg(long, value_name = "N")]
    victims: Option<usize>,

    /// Gap before each victim's blow, in bytes of total traffic: MIN:MAX.
    #[arg(long, value_name = "MIN:MAX", default_value = "1:16M", value_parser = parse_size_range)]
    victim_gap: (u64, u64),

    /// Blows drawn from (comma-separated): reset, fin, silence.
    #[arg(
        long,
        value_name = "KINDS",
        default_value = "reset,fin",
        value_delimiter = ','
    )]
    victim_kinds: Vec<KindArg>,

    /// Length of a victim's silence in milliseconds: MIN:MAX.
    #[arg(long, value_name = "MIN:MAX", default_value = "100:2000", value_parser = parse_millis_range)]
    silence_ms: (u64, u64),

    /// Once AT bytes were forwarded in total, silence the whole link for MILLIS. Repeatable.
    #[arg(long = "silence-all", value_name = "AT:MILLIS", value_parser = parse_silence_all)]
    silence_all: Vec<(u64, u64)>,

    /// Longest time a cut connection stays open for the peers to read what was forwarded.
    #[arg(long, value_name = "MILLIS", default_value_t = 1000)]
    linger_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum KindArg {
    Reset,
    Fin,
    Silence,
}

fn parse_pair<T>(s: &str, one: impl Fn(&str) -> Result<T, String>) -> Result<(T, T), String> {
    let (a, b) = s.split_once(':').ok_or("expected MIN:MAX")?;
    Ok((one(a)?, one(b)?))
}

fn parse_size_range(s: &str) -> Result<(u64, u64), String> {
    let (lo, hi) = parse_pair(s, parse_size)?;
    if lo > hi {
        return Err(format!("{s:?}: MIN is larger than MAX"));
    }
    Ok((lo, hi))
}

fn parse_millis(s: &str) -> Result<u64, String> {
    s.parse().map_err(|_| format!("not milliseconds: {s:?}"))
}

fn parse_millis_range(s: &str) -> Result<(u64, u64), String> {
    let (lo, hi) = parse_pair(s, parse_millis)?;
    if lo > hi {
        return Err(format!("{s:?}: MIN is larger than MAX"));
    }
    Ok((lo, hi))
}

fn parse_silence_all(s: &str) -> Result<(u64, u64), String> {
    let (at, millis) = s.split_once(':').ok_or("expected AT:MILLIS")?;
    Ok((parse_size(at)?, parse_millis(millis)?))
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, shift) = match s.as_bytes().last() {
        Some(b'k' | b'K') => (&s[..s.len() - 1], 10),
        Some(b'm' | b'M') => (&s[..s.len() - 1], 20),
        Some(b'g' | b'G') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = digits.parse().map_err(|_| format!("not a size: {s:?}"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("too large: {s:?}"))
}

/// Splits `SPEC[@CONN]`.
fn split_conn(s: &str) -> Result<(&str, usize), String> {
    match s.split_once('@') {
        Some((spec, conn)) => Ok((
            spec,
            conn.parse()
                .map_err(|_| format!("not a connection number: {conn:?}"))?,
        )),
        None => Ok((s, 0)),
    }
}

fn parse_cut(s: &str) -> Result<(usize, Fault), String> {
    let (spec, conn) = split_conn(s)?;
    let (dir, offset) = spec.split_once(':').ok_or("expected DIR:OFFSET[@CONN]")?;
    Ok((
        conn,
        Fault::CutAt {
            direction: dir.parse()?,
            offset_bytes: parse_size(offset)?,
        },
    ))
}

fn parse_stall(s: &str) -> Result<(usize, Fault), String> {
    let (spec, conn) = split_conn(s)?;
    let mut parts = spec.split(':');
    let (Some(dir), Some(offset), Some(millis), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("expected DIR:OFFSET:MILLIS[@CONN]".into());
    };
    let millis = millis
        .parse()
        .map_err(|_| format!("not milliseconds: {millis:?}"))?;
    Ok((
        conn,
        Fault::StallAt {
            direction: dir.parse()?,
            offset_bytes: parse_size(offset)?,
            millis,
        },
    ))
}

fn plan(args: &Args) -> Plan {
    let mut plan = Plan {
        reset: args.reset,
        linger: Duration::from_millis(args.linger_ms),
        log: true,
        ..Plan::none()
    };
    for &(conn, fault) in args.cuts.iter().chain(&args.stalls) {
        if plan.per_connection.len() <= conn {
            plan.per_connection.resize(conn + 1, Vec::new());
        }
        plan.per_connection[conn].push(fault);
    }
    if let Some(micros) = args.delay_us {
        plan.every_connection.extend(
            args.delay_dir
                .dirs()
                .iter()
                .map(|&direction| Fault::Delay { direction, micros }),
        );
    }
    if let Some(cuts) = args.random_cuts {
        plan.random_cuts = Some(RandomCuts {
            seed: args.seed,
            cuts,
            min_offset: args.min_offset,
            max_offset: args.max_offset,
            direction: match args.random_dir {
                DirArg::ToServer => Some(Dir::ToServer),
                DirArg::ToClient => Some(Dir::ToClient),
                DirArg::Both => None,
            },
        });
    }
    if let Some(blows) = args.victims {
        let kind = |k| args.victim_kinds.contains(&k);
        let (lo, hi) = args.silence_ms;
        plan.victims = Some(RandomVictims {
            seed: args.seed,
            blows,
            min_gap: args.victim_gap.0,
            max_gap: args.victim_gap.1,
            reset: kind(KindArg::Reset),
            fin: kind(KindArg::Fin),
            silence: kind(KindArg::Silence)
                .then(|| (Duration::from_millis(lo), Duration::from_millis(hi))),
        });
    }
    plan
}

fn main() {
    let args = Args::parse();
    let upstream = match args.upstream.to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(addr)) => addr,
        Ok(None) => {
            eprintln!("chaos-proxy: {}: no address", args.upstream);
            exit(2);
        }
        Err(e) => {
            eprintln!("chaos-proxy: {}: {e}", args.upstream);
            exit(2);
        }
    };
    if args.min_offset > args.max_offset {
        eprintln!("chaos-proxy: --min-offset is larger than --max-offset");
        exit(2);
    }
    let proxy = match Proxy::start_on(args.listen, upstream, plan(&args)) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("chaos-proxy: listen on {}: {e}", args.listen);
            exit(1);
        }
    };
    println!("listening on {}", proxy.local_addr());
    let proxy = std::sync::Arc::new(proxy);
    let mut silences = args.silence_all.clone();
    silences.sort_unstable();
    for (at, millis) in silences {
        // Waits as long as it takes: the proxy runs until killed.
        while !proxy.wait_for_bytes(at, Duration::from_secs(3600)) {}
        proxy.silence_all(Duration::from_millis(millis));
    }
    loop {
        std::thread::park();
    }
}
