#!/usr/bin/env bash
# Profile a demo run with perf (software event cpu-clock: hardware counters are not available on
# these virtual machines) and print where the time goes, per thread and per symbol.
#
#   perf/record.sh [demo options...]        e.g. perf/record.sh --size 1G --pattern random
#
# Output: perf/out/perf.data and perf/out/report.txt. Needs `perf` (Debian: linux-perf).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v perf >/dev/null || { echo "perf not found: apt-get install linux-perf" >&2; exit 1; }
mkdir -p perf/out
cargo build --release --quiet
perf record -e cpu-clock -F 4999 -o perf/out/perf.data -- \
  ./target/release/postcopy demo --quiet "$@"
{
  echo "# by thread (comm)"
  perf report -i perf/out/perf.data --stdio --no-children --sort comm 2>/dev/null | grep -v '^#' | grep -v '^$' | head -30
  echo
  echo "# by symbol"
  perf report -i perf/out/perf.data --stdio --no-children --sort comm,sym 2>/dev/null | grep -v '^#' | grep -v '^$' | head -60
} > perf/out/report.txt
cat perf/out/report.txt
