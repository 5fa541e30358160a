//! The subcommands of `postcopy`, a file each (`<name>.rs`: its arguments and `cmd_<name>`),
//! the arguments they share ([`args`]), the value parsers ([`parse`]) and the one error type
//! ([`MainError`]).

pub mod args;
pub mod bench;
pub mod demo;
pub mod error;
pub mod handler;
pub mod parse;
pub mod probe;
pub mod serve;

use std::path::Path;

pub use error::MainError;

/// Writes a JSON report to `path` (`--report`).
pub fn write_report(path: &Path, json: &str) -> Result<(), MainError> {
    std::fs::write(path, json).map_err(|source| MainError::WriteReport {
        path: path.to_path_buf(),
        source,
    })
}
