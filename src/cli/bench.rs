//! `postcopy bench`: the engine against the baseline handler, alternating runs, medians and
//! ratios, and the CI gate (`--check`).

use std::path::PathBuf;
use std::process::ExitCode;

use postcopy::bench::BenchConfig;

use super::args::RunArgs;
use super::parse::{parse_image_size, usize_in, MAX_RUNS, MAX_THREADS};
use super::{write_report, MainError};

/// A stream setting of `--targets`: `None`, the source pushes the stream.
#[derive(Clone, Copy, Debug)]
struct Target(Option<std::time::Duration>);

fn parse_target(s: &str) -> Result<Target, String> {
    if s == "none" {
        return Ok(Target(None));
    }
    match s.parse::<u64>() {
        Ok(us) if (1..=10_000_000).contains(&us) => {
            Ok(Target(Some(std::time::Duration::from_micros(us))))
        }
        _ => Err(format!(
            "{s:?} is neither `none` nor a target in microseconds (1 to 10000000)"
        )),
    }
}

/// The arguments of `bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Workload threads of the full runs: each count is measured (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,2", value_parser = usize_in(1, MAX_THREADS))]
    threads: Vec<usize>,
    /// The engine's stream settings measured beside its own (`--fault-latency-target`):
    /// `none` (the source pushes the stream) or a target in microseconds, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "none,1000,300,100", value_parser = parse_target)]
    targets: Vec<Target>,
    /// Memory kinds measured beside --memory (stream-only and demand-only, keyed and
    /// --insecure), comma-separated: anon, thp, memfd, hugetlb, hugetlb-shared.
    #[arg(long, value_delimiter = ',', value_enum)]
    memories: Vec<postcopy::dest::Memory>,
    /// Image size of the demand-only runs (every page by a fault).
    #[arg(long, default_value = "256M", value_parser = parse_image_size)]
    demand_size: u64,
    /// Runs per row and mode (the rows' order rotating from run to run).
    #[arg(long, default_value_t = 5, value_parser = usize_in(1, MAX_RUNS))]
    runs: usize,
    /// Share of zero pages in the image, percent (default 0, unlike the demo's 25: every page
    /// carries data, so the data path is what is measured).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    zero_percent: u8,
    /// Write the JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Print the JSON report instead of the table.
    #[arg(long)]
    json: bool,
    /// Exit non-zero if ours is worse than the baseline on these metrics (comma-separated:
    /// `time` = time to all pages present, `p99` = p99 fault latency with the stream on).
    #[arg(long, value_delimiter = ',', value_parser = ["time", "p99"])]
    check: Vec<String>,
}

/// Runs the benchmark and prints its table (or JSON); failure if a run did not verify or a
/// `--check` metric is worse than the baseline's.
pub fn cmd_bench(args: BenchArgs) -> Result<ExitCode, MainError> {
    if let Some(path) = &args.report {
        super::check_report_path(path)?;
    }
    let cfg = BenchConfig {
        demo: args.run.demo_config(args.zero_percent, args.threads[0])?,
        demand_size_bytes: args.demand_size,
        runs: args.runs,
        thread_counts: args.threads,
        targets: args.targets.iter().map(|t| t.0).collect(),
        memories: args.memories,
    };
    let report = postcopy::bench::run(&cfg)?;
    let json = report.to_json();
    if args.json {
        println!("{json}");
    } else {
        print!("{}", report.render());
    }
    if let Some(path) = &args.report {
        write_report(path, &json)?;
    }
    if !report.all_verified {
        return Err(MainError::BenchUnverified);
    }
    if !args.check.is_empty() {
        report.gate(&args.check).map_err(MainError::BenchWorse)?;
    }
    Ok(ExitCode::SUCCESS)
}
