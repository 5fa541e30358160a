//! `postcopy`: the command-line tool.
//!
//! `main` parses the command line and runs one subcommand, `cli::<name>::cmd_<name>`, each in a
//! file of its own under `src/cli/`; an error is printed once, as `postcopy: <error>`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cli;

use cli::bench::BenchArgs;
use cli::demo::DemoArgs;
use cli::handler::HandlerArgs;
use cli::probe::ProbeArgs;
use cli::serve::ServeArgs;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A page server for postcopy live migration of memory (userfaultfd + io_uring).
#[derive(Parser, Debug)]
#[command(name = "postcopy", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
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
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Cmd::Probe(args) => cli::probe::cmd_probe(&args),
        Cmd::Serve(args) => cli::serve::cmd_serve(args),
        Cmd::Demo(args) => cli::demo::cmd_demo(args),
        Cmd::Handler(args) => cli::handler::cmd_handler(args),
        Cmd::Bench(args) => cli::bench::cmd_bench(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("postcopy: {e}");
            ExitCode::FAILURE
        }
    }
}
