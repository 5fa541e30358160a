//! `postcopy bench`: the engine against the baseline handler, alternating runs, medians and
//! ratios, and the CI gate (`--check`).

use std::path::PathBuf;
use std::process::ExitCode;

use postcopy::bench::BenchConfig;

use super::args::RunArgs;
use super::parse::{parse_image_size, usize_in, MAX_RUNS};
use super::{write_report, MainError};

/// The arguments of `bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Image size of the demand-only runs (every page by a fault).
    #[arg(long, default_value = "256M", value_parser = parse_image_size)]
    demand_size: u64,
    /// Runs per handler and mode (alternating).
    #[arg(long, default_value_t = 5, value_parser = usize_in(1, MAX_RUNS))]
    runs: usize,
    /// Share of zero pages in the image, percent.
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
    let cfg = BenchConfig {
        demo: args.run.demo_config(args.zero_percent)?,
        demand_size_bytes: args.demand_size,
        runs: args.runs,
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
