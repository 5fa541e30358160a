//! `postcopy`: the command-line tool.
//!
//! `main` parses the command line and runs one subcommand, `cli::<name>::cmd_<name>`, each in a
//! file of its own under `src/cli/`; an error is printed once, as `postcopy: <error>`.

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

mod cli;

use cli::bench::BenchArgs;
use cli::demo::DemoArgs;
use cli::handler::HandlerArgs;
use cli::plot::PlotArgs;
use cli::probe::ProbeArgs;
use cli::serve::ServeArgs;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A page server for postcopy live migration of memory (userfaultfd + io_uring).
#[derive(Parser, Debug)]
#[command(
    name = "postcopy",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("POSTCOPY_COMMIT"), ")"),
    about,
    long_about = None
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    #[command(flatten)]
    log: LogArgs,
}

/// What every command writes to stderr.
#[derive(clap::Args, Debug)]
struct LogArgs {
    /// More on stderr: debug events too (or RUST_LOG=debug).
    #[arg(long, short, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Less on stderr: warnings and errors only, no progress (or RUST_LOG=warn).
    #[arg(long, short, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// How events are written to stderr: text lines, or JSON lines for a machine (no
    /// progress line then).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// `--log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// `postcopy <command>: <message>`.
    Text,
    /// `{"ts_unix_ms":..,"level":..,"component":..,"msg":..}`.
    Json,
}

impl LogArgs {
    /// The level: the flags, else `RUST_LOG`, else info.
    fn init(&self) {
        use postcopy::log::Level;
        let env = std::env::var("RUST_LOG").ok();
        let level = match (self.quiet, self.verbose) {
            (true, _) => Level::Warn,
            (false, v) if v > 0 => Level::Debug,
            _ => env
                .as_deref()
                .and_then(Level::from_env)
                .unwrap_or(Level::Info),
        };
        postcopy::log::init(level, self.log_format == LogFormat::Json);
    }
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Check whether this host can do postcopy (userfaultfd, io_uring, page sizes, THP, mlock).
    Probe(ProbeArgs),
    /// Run a source page server: answer page requests first, stream the rest.
    Serve(ServeArgs),
    /// The embedded default: migrate a synthetic image in postcopy from a source process to
    /// this one, with a workload that verifies every page, and print a report.
    Demo(DemoArgs),
    /// Serve VMMs that hand over their userfaultfd over a Unix socket (Firecracker's `Uffd`
    /// snapshot memory backend, JSON of v1.1 to v1.16), with pages from a remote `postcopy
    /// serve --image MEMORY_FILE`. One JSON line per VMM on stdout.
    Handler(HandlerArgs),
    /// Measure the engine against a simple baseline handler in one run: time to all pages,
    /// stream-only throughput, fault latency with and without the stream; medians and ratios.
    Bench(BenchArgs),
    /// Draw a report's timeline (pages by path, phases, pages present) and fault-latency
    /// histogram as one SVG.
    Plot(PlotArgs),
    /// Print shell completions for SHELL on stdout (e.g. `postcopy completions bash >
    /// /etc/bash_completion.d/postcopy`).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) on stdout (e.g. `postcopy man > postcopy.1`).
    Man,
}

fn main() -> ExitCode {
    // Before any thread starts: every thread inherits the blocked signals.
    cli::signals::install();
    let cli = Cli::parse();
    cli.log.init();
    let result = match cli.command {
        Cmd::Probe(args) => cli::probe::cmd_probe(&args),
        Cmd::Serve(args) => cli::serve::cmd_serve(args),
        Cmd::Demo(args) => cli::demo::cmd_demo(args),
        Cmd::Handler(args) => cli::handler::cmd_handler(args),
        Cmd::Bench(args) => cli::bench::cmd_bench(args),
        Cmd::Plot(args) => cli::plot::cmd_plot(&args),
        Cmd::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "postcopy",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Man => man(),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            postcopy::error!("", "{e}");
            ExitCode::FAILURE
        }
    }
}

/// The man page of every command, generated from their definitions.
fn man() -> Result<ExitCode, cli::MainError> {
    match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
        // A reader that stopped early (`| head`) is not an error.
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(cli::MainError::WriteReport {
            path: "<stdout>".into(),
            source: e,
        }),
        _ => Ok(ExitCode::SUCCESS),
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::Cli;

    fn parses(line: &str) -> bool {
        Cli::try_parse_from(line.split_whitespace()).is_ok()
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_are_in_range() {
        assert!(parses("postcopy probe"));
        assert!(parses("postcopy serve --synthetic 1G --insecure"));
        assert!(parses(
            "postcopy serve --synthetic 1G --live --dirty-rate 10 --insecure"
        ));
        assert!(parses("postcopy demo"));
        assert!(parses(
            "postcopy handler --socket s --source h:1 --insecure"
        ));
        assert!(parses("postcopy bench"));
    }

    #[test]
    fn page_sizes_take_units() {
        assert!(parses("postcopy serve --image f --page-size 2M --insecure"));
        assert!(parses(
            "postcopy serve --synthetic 1G --prefetch-max 2 --insecure"
        ));
        assert!(parses(
            "postcopy serve --image f --page-size 2097152 --insecure"
        ));
        assert!(!parses(
            "postcopy serve --image f --page-size 3000 --insecure"
        ));
    }

    #[test]
    fn out_of_range_values_are_refused() {
        for line in [
            "postcopy demo --threads 0",
            "postcopy demo --workers 0",
            "postcopy demo --workers 257",
            "postcopy demo --streams 257",
            "postcopy demo --size 1000",
            "postcopy demo --size 0",
            "postcopy demo --zero-percent 101",
            "postcopy demo --precopy-max-rounds 0",
            "postcopy demo --precopy-max-seconds -1",
            "postcopy demo --precopy-max-seconds inf",
            "postcopy demo --recovery-timeout 100000",
            "postcopy serve --synthetic 1G --prefetch-max 1025",
            "postcopy handler --socket s --source h:1 --stall-timeout 0",
            "postcopy bench --runs 0",
            "postcopy bench --demand-size 0",
            "postcopy bench --threads 0",
            "postcopy demo --source 127.0.0.1",
            "postcopy demo --source h:1 --size 2G",
            "postcopy serve --synthetic 1G --listen 0.0.0.0",
            "postcopy handler --socket s --source h:1 --tls-cert c --tls-key k",
            "postcopy serve --synthetic 1G --tls-ca c",
        ] {
            assert!(!parses(line), "{line} was accepted");
        }
    }

    #[test]
    fn each_command_takes_only_its_sides_tls_options() {
        assert!(parses(
            "postcopy serve --synthetic 1G --insecure --tls-cert c --tls-key k"
        ));
        assert!(parses(
            "postcopy handler --socket s --source h:1 --insecure --tls-ca c"
        ));
        assert!(parses("postcopy demo --tls-cert c --tls-key k --tls-ca c"));
    }

    #[test]
    fn the_version_names_the_commit() {
        let v = Cli::command().render_version();
        assert!(v.contains("(commit "), "{v}");
    }
}
