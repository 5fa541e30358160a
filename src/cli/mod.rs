//! The subcommands of `postcopy`, a file each (`<name>.rs`: its arguments and `cmd_<name>`),
//! the arguments they share ([`args`]), the value parsers ([`parse`]) and the one error type
//! ([`MainError`]).

pub mod args;
pub mod bench;
pub mod demo;
pub mod error;
pub mod handler;
pub mod parse;
pub mod plot;
pub mod probe;
pub mod serve;
pub mod signals;

use std::path::Path;

pub use error::MainError;

/// Fails now, before a long run, if `--report PATH` could not be written at its end.
pub fn check_report_path(path: &Path) -> Result<(), MainError> {
    let err = |source| MainError::WriteReport {
        path: path.to_path_buf(),
        source,
    };
    if path.exists() {
        std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(err)?;
        return Ok(());
    }
    std::fs::File::create(path).map_err(err)?;
    let _ = std::fs::remove_file(path);
    Ok(())
}

/// The report of a run that ended before it had one: what failed, as JSON.
pub fn failure_json(error: &MainError) -> String {
    serde_json::json!({ "verified": false, "error": error.to_string() }).to_string()
}

/// Serves `/metrics` on `addr` (`--metrics`) from `read`, and says where.
pub fn serve_metrics(
    command: &str,
    addr: &str,
    read: std::sync::Arc<postcopy::metrics::Read>,
) -> Result<(), MainError> {
    let bound = postcopy::metrics::serve(addr, read)?;
    postcopy::info!(command, "metrics at http://{bound}/metrics");
    Ok(())
}

/// Writes a JSON report to `path` (`--report`).
pub fn write_report(path: &Path, json: &str) -> Result<(), MainError> {
    std::fs::write(path, json).map_err(|source| MainError::WriteReport {
        path: path.to_path_buf(),
        source,
    })
}
