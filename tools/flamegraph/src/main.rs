//! `pc-flamegraph`: turn `perf script` output into a flame graph (SVG) and, optionally, text
//! tables of the hottest frames, with the `inferno` crate as a library (no Perl scripts).
//!
//! ```text
//! perf script -i perf.data | pc-flamegraph -o out.svg --title "demo 256M" --top 15
//! ```
//!
//! Steps: `inferno::collapse::perf` folds the samples into one line per distinct stack
//! (`comm;outer;...;leaf weight`, kernel frames suffixed `_[k]`), `inferno::flamegraph` draws
//! the SVG from those lines, and `--top N` ranks frames from the same lines:
//!
//! - *leaf* (self) weight: the weight of the stacks a frame ends, i.e. where the CPU was;
//! - *inclusive* weight: the weight of the stacks a frame appears in (once per stack, so
//!   recursion is not counted twice), i.e. the time spent in it and its callees.
//!
//! The tables are printed for all threads and then per thread group: the first frame of a
//! folded stack is the thread's name (`comm`), and names that differ only
//! from their first digit on (`pc-worker-0`, `pc-worker-1`) form one group (`pc-worker-*`).
//! Start-up and wrapper frames (`_start`, `clone3`, `std::rt::*`, `std::panicking::*`,
//! `core::ops::function::*`, ...) are in nearly every stack and are left out of the inclusive
//! tables unless `--keep-plumbing` is given: they say nothing about where the time went.
//!
//! Weights are what `perf script` gives: the sample period where it prints one (nanoseconds
//! for `cpu-clock`), else a count of 1 per sample; the tables show shares in percent.
//!
//! Errors (bad options, unreadable input, no samples) print a message and exit with status 1
//! (2 for a usage error).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::panic::AssertUnwindSafe;
use std::process::ExitCode;

use inferno::collapse::perf::{Folder, Options as CollapseOptions};
use inferno::collapse::Collapse;
use inferno::flamegraph::{self, Options as FlameOptions};

const USAGE: &str = "\
pc-flamegraph: flame graph (SVG) and hottest frames from `perf script` output

Usage: pc-flamegraph [OPTIONS] [INPUT]

  INPUT               `perf script` output (default or `-`: standard input)
  -o, --output FILE   SVG to write (default: flamegraph.svg; `-`: standard output)
      --no-svg        do not write an SVG (e.g. with --top only)
  -t, --title TEXT    title of the flame graph (default: \"Flame Graph\")
      --folded FILE   also write the collapsed stacks (`frame;frame;... weight` lines)
      --top N         print the N hottest leaf and inclusive frames, overall and per
                      thread group, to standard output
      --keep-plumbing with --top: keep start-up and closure/panic wrapper frames
                      (`_start`, `clone3`, `std::rt::*`, `std::panicking::*`, ...)
                      in the inclusive tables
  -h, --help          this text

Record with e.g. `perf record -e cpu-clock -F 2999 --call-graph dwarf,32768 -g -- CMD`,
then `perf script | pc-flamegraph -o out.svg --top 15`.";

/// Command-line options.
struct Args {
    input: Option<String>,
    output: Option<String>,
    title: Option<String>,
    folded: Option<String>,
    top: Option<usize>,
    keep_plumbing: bool,
}

/// A failure: a message for the user and the exit status.
struct Failure {
    message: String,
    status: u8,
}

impl Failure {
    fn usage(message: impl Into<String>) -> Self {
        Failure {
            message: message.into(),
            status: 2,
        }
    }
    fn run(message: impl Into<String>) -> Self {
        Failure {
            message: message.into(),
            status: 1,
        }
    }
}

fn parse_args(mut argv: impl Iterator<Item = String>) -> Result<Option<Args>, Failure> {
    let mut args = Args {
        input: None,
        output: Some("flamegraph.svg".into()),
        title: None,
        folded: None,
        top: None,
        keep_plumbing: false,
    };
    while let Some(arg) = argv.next() {
        // Accept `--flag=value` as well as `--flag value`.
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let take = |argv: &mut dyn Iterator<Item = String>| {
            inline
                .clone()
                .or_else(|| argv.next())
                .ok_or_else(|| Failure::usage(format!("{flag} needs a value")))
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "-o" | "--output" => args.output = Some(take(&mut argv)?),
            "--no-svg" => args.output = None,
            "-t" | "--title" => args.title = Some(take(&mut argv)?),
            "--folded" => args.folded = Some(take(&mut argv)?),
            "--top" => {
                let v = take(&mut argv)?;
                let n = v.parse::<usize>().ok().filter(|&n| n > 0).ok_or_else(|| {
                    Failure::usage(format!("--top needs a positive number, not `{v}`"))
                })?;
                args.top = Some(n);
            }
            "--keep-plumbing" => args.keep_plumbing = true,
            "-" => args.input = None,
            f if f.starts_with('-') => return Err(Failure::usage(format!("unknown option `{f}`"))),
            _ if args.input.is_some() => {
                return Err(Failure::usage(format!(
                    "more than one input given (`{arg}`)"
                )))
            }
            _ => args.input = Some(arg),
        }
    }
    if args.output.as_deref() == Some("-") && args.top.is_some() {
        return Err(Failure::usage(
            "--top prints to standard output: write the SVG to a file",
        ));
    }
    if args.output.is_none() && args.top.is_none() && args.folded.is_none() {
        return Err(Failure::usage(
            "nothing to do: --no-svg without --top or --folded",
        ));
    }
    Ok(Some(args))
}

/// Folds `perf script` output into collapsed-stack lines.
fn collapse(input: Option<&str>) -> Result<String, Failure> {
    let reader: Box<dyn Read> = match input {
        Some(path) => Box::new(
            File::open(path).map_err(|e| Failure::run(format!("cannot open {path}: {e}")))?,
        ),
        None => Box::new(io::stdin().lock()),
    };
    let mut reader = BufReader::with_capacity(1 << 20, reader);
    let from = input.unwrap_or("standard input");
    let read_error = |e: io::Error| Failure::run(format!("cannot read {from}: {e}"));
    // inferno's perf folder asserts (panics) when the first stack it reads has no event line,
    // which blank lines before the first sample trigger: skip those here.
    loop {
        let buf = reader.fill_buf().map_err(read_error)?;
        match buf.iter().position(|&b| b == b'\n') {
            Some(i) if buf[..i].iter().all(u8::is_ascii_whitespace) => reader.consume(i + 1),
            None if !buf.is_empty() && buf.iter().all(u8::is_ascii_whitespace) => {
                let n = buf.len();
                reader.consume(n)
            }
            _ => break,
        }
    }
    let mut options = CollapseOptions::default();
    options.annotate_kernel = true; // `_[k]`: kernel frames are told apart (and coloured so)
    let mut folded = Vec::new();
    // Other input that is not `perf script` output can still trip that assertion: turn the
    // panic into an error (with the default panic message silenced).
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        Folder::from(options).collapse(reader, &mut folded)
    }));
    std::panic::set_hook(default_hook);
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            return Err(Failure::run(format!(
                "cannot collapse the perf script output from {from}: {e}"
            )))
        }
        Err(_) => {
            return Err(Failure::run(format!(
                "{from} does not look like `perf script` output (no sample header line)"
            )))
        }
    }
    let folded = String::from_utf8(folded)
        .map_err(|_| Failure::run("collapsed stacks are not valid UTF-8"))?;
    if folded.trim().is_empty() {
        return Err(Failure::run(
            "no samples with stacks in the input: is it `perf script` output of a recording \
             made with --call-graph (-g)?",
        ));
    }
    Ok(folded)
}

fn write_svg(folded: &str, output: &str, title: Option<&str>) -> Result<(), Failure> {
    let mut options = FlameOptions::default();
    if let Some(title) = title {
        options.title = title.to_string();
    }
    options.hash = true; // a frame keeps its colour from one graph to the next
    options.count_name = "weight".to_string();
    let result = if output == "-" {
        flamegraph::from_lines(&mut options, folded.lines(), io::stdout().lock())
    } else {
        let file = File::create(output)
            .map_err(|e| Failure::run(format!("cannot create {output}: {e}")))?;
        let mut writer = BufWriter::new(file);
        flamegraph::from_lines(&mut options, folded.lines(), &mut writer)
            .and_then(|()| writer.flush())
    };
    result.map_err(|e| Failure::run(format!("cannot write the flame graph to {output}: {e}")))
}

/// One folded line: its frames (thread name first) and its weight.
fn parse_folded(line: &str) -> Option<(Vec<&str>, u64)> {
    let (stack, weight) = line.rsplit_once(' ')?;
    let weight = weight.parse().ok()?;
    Some((stack.split(';').collect(), weight))
}

/// `pc-worker-12` -> `pc-worker-*`, `src-conn-127.0.` -> `src-conn-*`: thread names that differ
/// only from their first digit on (numbers, addresses; `comm` is cut at 15 bytes) form one group.
fn thread_group(comm: &str) -> String {
    match comm.find(|c: char| c.is_ascii_digit()) {
        Some(0) | None => comm.to_string(),
        Some(i) => format!("{}*", &comm[..i]),
    }
}

/// Frames of the process and thread start-up and of Rust's closure, panic-catching and
/// thread-spawning wrappers: in nearly every stack, so they would fill the inclusive tables
/// without saying where the time went (they stay in the SVG; `--keep-plumbing` keeps them).
fn is_plumbing(frame: &str) -> bool {
    const EXACT: &[&str] = &[
        "_start",
        "main",
        "__libc_start_main",
        "__libc_start_main_impl",
        "__libc_start_call_main",
        "start_thread",
        "clone",
        "clone3",
        "__clone",
        "__clone3",
    ];
    const PREFIXES: &[&str] = &[
        "std::rt::",
        "std::panic::",
        "std::panicking::",
        "std::thread::",
        "<std::thread::",
        "std::sys::backtrace::",
        "<std::sys::thread::",
        "std::sys::pal::unix::thread::",
        "<std::sys::pal::unix::thread::",
        "core::ops::function::",
        "<&dyn core::ops::function::",
        "<alloc::boxed::Box<dyn core::ops::function::",
        "<alloc::boxed::Box<F,A> as core::ops::function::",
        "<core::panic::unwind_safe::AssertUnwindSafe",
    ];
    EXACT.contains(&frame) || PREFIXES.iter().any(|p| frame.starts_with(p))
}

/// Leaf and inclusive weights of the frames of a set of stacks.
#[derive(Default)]
struct Tally {
    total: u64,
    leaf: HashMap<String, u64>,
    inclusive: HashMap<String, u64>,
    threads: HashSet<String>,
}

impl Tally {
    fn add(&mut self, frames: &[&str], weight: u64) {
        let Some((comm, frames)) = frames.split_first() else {
            return;
        };
        self.total += weight;
        self.threads.insert((*comm).to_string());
        // A stack with only the thread name has no frame of its own: show it as such.
        let leaf = frames.last().copied().unwrap_or("[unknown]");
        *self.leaf.entry(leaf.to_string()).or_default() += weight;
        let mut seen = HashSet::new();
        for frame in frames {
            if seen.insert(*frame) {
                *self.inclusive.entry((*frame).to_string()).or_default() += weight;
            }
        }
    }

    fn render(&self, out: &mut String, heading: &str, n: usize, grand_total: u64, plumbing: bool) {
        let pct = |w: u64, of: u64| 100.0 * w as f64 / of.max(1) as f64;
        let mut threads: Vec<&String> = self.threads.iter().collect();
        threads.sort();
        let names = if threads.len() > 6 {
            let head: Vec<&str> = threads[..6].iter().map(|s| s.as_str()).collect();
            format!("{}, ... ({} threads)", head.join(", "), threads.len())
        } else {
            threads
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            out,
            "== {heading}: {:.1}% of all samples ({names})",
            pct(self.total, grand_total)
        );
        let _ = writeln!(out, "  hottest leaf frames (self, % of this group):");
        for (frame, w) in ranked(&self.leaf, n, true) {
            let _ = writeln!(out, "    {:5.1}%  {frame}", pct(w, self.total));
        }
        let _ = writeln!(
            out,
            "  hottest inclusive frames (self + callees, % of this group{}):",
            if plumbing {
                ""
            } else {
                "; start-up and wrapper frames left out"
            }
        );
        for (frame, w) in ranked(&self.inclusive, n, plumbing) {
            let _ = writeln!(out, "    {:5.1}%  {frame}", pct(w, self.total));
        }
        out.push('\n');
    }
}

/// The `n` heaviest entries of `map`, heaviest first; without `plumbing`, leaving out the
/// frames [`is_plumbing`] names.
fn ranked(map: &HashMap<String, u64>, n: usize, plumbing: bool) -> Vec<(&String, u64)> {
    let mut v: Vec<(&String, u64)> = map
        .iter()
        .map(|(k, &w)| (k, w))
        .filter(|&(k, _)| plumbing || !is_plumbing(k))
        .collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    v.truncate(n);
    v
}

/// The `--top N` report: all threads, then each thread group by decreasing weight.
fn top_report(folded: &str, n: usize, plumbing: bool) -> String {
    let mut all = Tally::default();
    let mut groups: BTreeMap<String, Tally> = BTreeMap::new();
    let mut stacks = 0usize;
    for (frames, weight) in folded.lines().filter_map(parse_folded) {
        stacks += 1;
        all.add(&frames, weight);
        groups
            .entry(thread_group(frames[0]))
            .or_default()
            .add(&frames, weight);
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# {stacks} distinct stacks, {} threads in {} groups; `_[k]` marks kernel frames\n",
        all.threads.len(),
        groups.len()
    );
    all.render(&mut out, "all threads", n, all.total, plumbing);
    let mut groups: Vec<(String, Tally)> = groups.into_iter().collect();
    groups.sort_by(|a, b| b.1.total.cmp(&a.1.total).then_with(|| a.0.cmp(&b.0)));
    for (name, tally) in &groups {
        tally.render(
            &mut out,
            &format!("thread group {name}"),
            n,
            all.total,
            plumbing,
        );
    }
    out
}

fn run(args: Args) -> Result<(), Failure> {
    let folded = collapse(args.input.as_deref())?;
    if let Some(path) = &args.folded {
        std::fs::write(path, &folded).map_err(|e| {
            Failure::run(format!("cannot write the collapsed stacks to {path}: {e}"))
        })?;
    }
    if let Some(output) = &args.output {
        write_svg(&folded, output, args.title.as_deref())?;
    }
    if let Some(n) = args.top {
        let report = top_report(&folded, n, args.keep_plumbing);
        io::stdout()
            .lock()
            .write_all(report.as_bytes())
            .map_err(|e| Failure::run(format!("cannot write the report: {e}")))?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let result = parse_args(std::env::args().skip(1)).and_then(|args| match args {
        None => {
            println!("{USAGE}");
            Ok(())
        }
        Some(args) => run(args),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("pc-flamegraph: {}", failure.message);
            if failure.status == 2 {
                eprintln!("(pc-flamegraph --help for the options)");
            }
            ExitCode::from(failure.status)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_threads_by_name_without_digits() {
        assert_eq!(thread_group("pc-worker-12"), "pc-worker-*");
        assert_eq!(thread_group("src-conn-127.0."), "src-conn-*");
        assert_eq!(thread_group("postcopy"), "postcopy");
    }

    #[test]
    fn leaf_and_inclusive_weights() {
        let folded = "w-0;main;a;b 3\nw-1;main;a 1\nw-0;main;c;c 4\n";
        let report = top_report(folded, 5, false);
        // b is a leaf of 3/8, c of 4/8 (counted once inclusively despite recursion), a of 1/8.
        assert!(report.contains(" 50.0%  c\n"), "{report}");
        assert!(report.contains(" 37.5%  b\n"), "{report}");
        // main is plumbing: left out of the inclusive table; a is in 4/8.
        assert!(report.contains(" 50.0%  a\n"), "{report}");
        assert!(!report.contains("%  main\n"), "{report}");
        assert!(report.contains("thread group w-*"), "{report}");
        assert!(top_report(folded, 5, true).contains("100.0%  main\n"));
    }

    #[test]
    fn parses_perf_script_output() {
        let script = "\
postcopy 1234/1235 100.000001:     333000 cpu-clock:
\tffffffff81001000 copy_page+0x10 ([kernel.kallsyms])
\t55555555a000 postcopy::dest::worker::run+0x20 (/bin/postcopy)
\t55555555b000 main+0x5 (/bin/postcopy)

";
        let dir = std::env::temp_dir().join(format!("pc-flamegraph-test-{}", std::process::id()));
        std::fs::write(&dir, script).unwrap();
        let folded = collapse(Some(dir.to_str().unwrap()));
        std::fs::remove_file(&dir).unwrap();
        let folded = folded.ok().unwrap();
        assert_eq!(
            folded.trim(),
            "postcopy;main;postcopy::dest::worker::run;copy_page_[k] 333000"
        );
    }
}
