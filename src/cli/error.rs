//! The binary's one error type: what stopped a subcommand, in words an operator can act on.

use std::path::PathBuf;

use postcopy::demo::DemoError;
use postcopy::handler::HandlerError;
use postcopy::image::ImageError;
use postcopy::layout::LayoutError;
use postcopy::link::auth::AuthError;
use postcopy::link::tls::TlsError;
use postcopy::source::SourceError;

/// Why a subcommand failed; `main` prints it once, as `postcopy: <error>`.
#[derive(Debug, thiserror::Error)]
pub enum MainError {
    /// A server that authenticates was given neither a key nor `--insecure`.
    #[error(
        "{command} authenticates its peers: pass --key-file FILE (the same file on both hosts; \
         create one with `head -c 32 /dev/urandom > FILE`), or --insecure on a trusted network"
    )]
    KeyRequired {
        /// The subcommand.
        command: &'static str,
    },
    /// The key file could not be used.
    #[error(transparent)]
    Key(#[from] AuthError),
    /// A TLS certificate, key or CA file could not be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The local demo was given one side of TLS only.
    #[error(
        "the local demo needs both the source's --tls-cert/--tls-key and the destination's --tls-ca"
    )]
    TlsHalf,
    /// `demo --source` was given neither the source's key nor `--insecure`.
    #[error(
        "demo --source authenticates the source: pass --key-file FILE (the file the source was \
         started with), or --insecure if the source runs with --insecure"
    )]
    DemoSourceKey,
    /// `serve` was given no image.
    #[error("serve needs an image: pass --image FILE or --synthetic SIZE")]
    NoImage,
    /// The image file could not be served.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The synthetic image's size and page size do not make a layout.
    #[error("the synthetic image: {0}")]
    Synthetic(#[from] LayoutError),
    /// The source server failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The demo, the benchmark or the live source's set-up failed.
    #[error(transparent)]
    Demo(#[from] DemoError),
    /// The handler server failed.
    #[error(transparent)]
    Handler(#[from] HandlerError),
    /// The path of this executable, which the local source runs as a second process, is unknown.
    #[error(
        "cannot find this program's own path (the local source runs it as a second process): {0}"
    )]
    CurrentExe(std::io::Error),
    /// `--report` could not be written.
    #[error("cannot write report {}: {source}", path.display())]
    WriteReport {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A report given to `plot` could not be read.
    #[error("cannot read report {}: {why}", path.display())]
    ReadReport {
        /// The path.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The SVG could not be drawn.
    #[error(transparent)]
    Plot(#[from] postcopy::plot::PlotError),
    /// `--metrics` could not be served.
    #[error(transparent)]
    Metrics(#[from] postcopy::metrics::MetricsError),
    /// `serve --once` (or `--live`): the one session served did not complete.
    #[error("serve: the session did not complete")]
    SessionIncomplete,
    /// `bench`: a run did not verify.
    #[error("bench: a run did not verify")]
    BenchUnverified,
    /// `bench --check`: ours is worse than the baseline on a gated metric.
    #[error("bench --check: ours is worse than the baseline: {0}")]
    BenchWorse(String),
}
