//! `postcopy plot`: a report's timeline, phases and fault-latency histogram as one SVG.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use postcopy::plot::PlotInput;

use super::MainError;

/// The arguments of `plot`.
#[derive(clap::Args, Debug)]
pub struct PlotArgs {
    /// A JSON report with a timeline (`postcopy demo --report FILE`).
    report: PathBuf,
    /// Where to write the SVG.
    #[arg(long, short, value_name = "FILE.svg")]
    output: PathBuf,
}

/// Draws the report's SVG.
pub fn cmd_plot(args: &PlotArgs) -> Result<ExitCode, MainError> {
    let text = std::fs::read_to_string(&args.report).map_err(|source| MainError::ReadReport {
        path: args.report.clone(),
        why: source.to_string(),
    })?;
    let input: PlotInput = serde_json::from_str(&text).map_err(|e| MainError::ReadReport {
        path: args.report.clone(),
        why: format!("not a postcopy report: {e}"),
    })?;
    write_svg(&input, &args.output)?;
    println!("wrote {}", args.output.display());
    Ok(ExitCode::SUCCESS)
}

/// Draws `input` into `path`.
pub fn write_svg(input: &PlotInput, path: &Path) -> Result<(), MainError> {
    let svg = postcopy::plot::svg(input)?;
    std::fs::write(path, svg).map_err(|source| MainError::WriteReport {
        path: path.to_path_buf(),
        source,
    })
}
