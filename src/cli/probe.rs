//! `postcopy probe`: can this host do postcopy.

use std::process::ExitCode;

use super::MainError;

/// The arguments of `probe`.
#[derive(clap::Args, Debug)]
pub struct ProbeArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Prints the checks (a table, or JSON); failure unless postcopy works here.
pub fn cmd_probe(args: &ProbeArgs) -> Result<ExitCode, MainError> {
    let report = postcopy::probe::run();
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.render_table());
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
