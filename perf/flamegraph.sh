#!/usr/bin/env bash
# Record a `postcopy demo` (default) or `postcopy bench` run with perf, with call graphs, and draw
# a flame graph with tools/flamegraph (`pc-flamegraph`, the inferno crate: no Perl needed).
#
#   perf/flamegraph.sh [--demo|--bench] [--name NAME] [postcopy options...]
#
#   perf/flamegraph.sh                          demo --quiet --size 256M
#   perf/flamegraph.sh --pattern sequential     the same, sequential workload
#   perf/flamegraph.sh --bench                  bench --quiet --runs 1 --size 256M --demand-size 32M
#   perf/flamegraph.sh --name demo-1g --size 1G
#
# Options given are passed to postcopy; the defaults above are added only where not given.
# Writes perf/out/NAME.perf.data, NAME.svg (open it in a browser: click to zoom, Ctrl-F to
# search) and NAME.top.txt (hottest leaf and inclusive frames, overall and per thread group),
# and prints the latter. NAME is `demo` or `bench` unless --name is given.
#
# Sampling: software event cpu-clock (no hardware counters on these virtual machines). Stacks:
# dwarf unwinding, since the release build has no frame pointers (its `debug = 1` line tables
# are enough for perf's unwinder). Environment knobs:
#   PERF_FREQ  (2999)   samples per second per CPU
#   PERF_STACK (65528)  bytes of user stack copied per sample (max 65528); 32768 cuts ~10% of
#                       the stacks short (the source's threads have large frames)
#   PERF_MMAP  (16M)    perf's ring buffer per CPU; smaller ones lose chunks of dwarf samples
#   TOP        (15)     rows per table in NAME.top.txt
# Needs perf (Debian: linux-perf) and root or kernel.perf_event_paranoid <= 1 for kernel frames.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v perf >/dev/null || { echo "perf not found: apt-get install linux-perf" >&2; exit 1; }

mode=demo
name=
case "${1:-}" in
  --demo) shift ;;
  --bench) mode=bench; shift ;;
esac
if [[ "${1:-}" == --name ]]; then
  [[ $# -ge 2 ]] || { echo "--name needs a value" >&2; exit 2; }
  name=$2; shift 2
elif [[ "${1:-}" == --name=* ]]; then
  name=${1#--name=}; shift
fi
name=${name:-$mode}

# Add a default option only if the caller did not give it (clap rejects repeated options).
given() {
  local o
  for o in "${user_args[@]}"; do [[ $o == "$1" || $o == "$1="* ]] && return 0; done
  return 1
}
user_args=("$@")
args=("$mode")
given --quiet || args+=(--quiet)
given --size || args+=(--size 256M)
if [[ $mode == bench ]]; then
  given --runs || args+=(--runs 1)
  given --demand-size || args+=(--demand-size 32M)
fi
args+=("$@")

freq=${PERF_FREQ:-2999}
stack=${PERF_STACK:-65528}
mmap=${PERF_MMAP:-16M}
top=${TOP:-15}
out=perf/out
tool=tools/flamegraph/target/release/pc-flamegraph
mkdir -p "$out"

echo "== building postcopy and pc-flamegraph (release)" >&2
cargo build --release --quiet
cargo build --release --quiet --manifest-path tools/flamegraph/Cargo.toml

rm -f "$out/$name.perf.data"  # perf would keep the previous one as .old
echo "== perf record -F $freq --call-graph dwarf,$stack: postcopy ${args[*]}" >&2
perf record -e cpu-clock -F "$freq" -g --call-graph "dwarf,$stack" -m "$mmap" \
  -o "$out/$name.perf.data" -- ./target/release/postcopy "${args[@]}"

echo "== perf script | pc-flamegraph" >&2
perf script -i "$out/$name.perf.data" 2>/dev/null \
  | "$tool" -o "$out/$name.svg" --title "postcopy ${args[*]} (cpu-clock, $freq Hz)" \
      --top "$top" > "$out/$name.top.txt"
cat "$out/$name.top.txt"
size=$(du -h "$out/$name.perf.data" | cut -f1)
echo "== wrote $out/$name.svg and $out/$name.top.txt ($size of perf data)" >&2
