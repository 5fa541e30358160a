//! The one way the crate writes to stderr: a line per event, at a level, as text or as JSON.
//!
//! The level and the format are set once, by the command line (`-v`, `-q`, `RUST_LOG`,
//! `--log-format`); an embedder that sets nothing gets `info` as text. Text lines read
//! `postcopy <component>: <message>` (`warning:`/`error:` before the message above `info`);
//! JSON lines are `{"ts_unix_ms":..,"level":"info","component":"serve","msg":".."}`.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

/// How much is said.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Level {
    /// What failed.
    Error = 1,
    /// What may be wrong, or will be.
    Warn = 2,
    /// What a migration does (sessions, VMMs, breaks and recoveries).
    Info = 3,
    /// Details for a developer.
    Debug = 4,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
        }
    }

    /// The level `RUST_LOG` names (`error`, `warn`, `info`, `debug`, `trace`; the last
    /// `target=level` item's level counts), if it names one.
    pub fn from_env(value: &str) -> Option<Level> {
        let last = value.rsplit(',').next()?.rsplit('=').next()?.trim();
        match last.to_ascii_lowercase().as_str() {
            "error" => Some(Level::Error),
            "warn" | "warning" => Some(Level::Warn),
            "info" => Some(Level::Info),
            "debug" | "trace" => Some(Level::Debug),
            _ => None,
        }
    }
}

static LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);
static JSON: AtomicBool = AtomicBool::new(false);

/// Sets the level and the format (JSON lines if `json`).
pub fn init(level: Level, json: bool) {
    LEVEL.store(level as u8, Ordering::Relaxed);
    JSON.store(json, Ordering::Relaxed);
}

/// Whether events of `level` are written.
pub fn enabled(level: Level) -> bool {
    level as u8 <= LEVEL.load(Ordering::Relaxed)
}

/// Whether lines are JSON (a terminal progress line is not drawn then).
pub fn json() -> bool {
    JSON.load(Ordering::Relaxed)
}

/// Writes one event of `component` (`serve`, `handler`, `demo`, ...) at `level`, if enabled.
pub fn write(level: Level, component: &str, msg: std::fmt::Arguments<'_>) {
    if !enabled(level) {
        return;
    }
    let line = if json() {
        let ts_unix_ms = crate::stats::unix_us() / 1000;
        serde_json::json!({
            "ts_unix_ms": ts_unix_ms,
            "level": level.name(),
            "component": component,
            "msg": msg.to_string(),
        })
        .to_string()
    } else {
        let what = match level {
            Level::Error => "error: ",
            Level::Warn => "warning: ",
            Level::Info | Level::Debug => "",
        };
        let sep = if component.is_empty() { "" } else { " " };
        format!("postcopy{sep}{component}: {what}{msg}")
    };
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

/// Writes an `info` event: `info!("serve", "session {id} complete")`.
#[macro_export]
macro_rules! info {
    ($component:expr, $($arg:tt)*) => {
        $crate::log::write($crate::log::Level::Info, $component, format_args!($($arg)*))
    };
}

/// Writes a `warn` event.
#[macro_export]
macro_rules! warn {
    ($component:expr, $($arg:tt)*) => {
        $crate::log::write($crate::log::Level::Warn, $component, format_args!($($arg)*))
    };
}

/// Writes an `error` event.
#[macro_export]
macro_rules! error {
    ($component:expr, $($arg:tt)*) => {
        $crate::log::write($crate::log::Level::Error, $component, format_args!($($arg)*))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_log_names_a_level_or_nothing() {
        assert_eq!(Level::from_env("debug"), Some(Level::Debug));
        assert_eq!(Level::from_env("postcopy=warn"), Some(Level::Warn));
        assert_eq!(
            Level::from_env("hyper=info,postcopy=error"),
            Some(Level::Error)
        );
        assert_eq!(Level::from_env("TRACE"), Some(Level::Debug));
        assert_eq!(Level::from_env("loud"), None);
    }

    #[test]
    fn levels_order_from_error_to_debug() {
        assert!(
            Level::Error < Level::Warn && Level::Warn < Level::Info && Level::Info < Level::Debug
        );
    }
}
