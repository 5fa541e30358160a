#!/usr/bin/env bash
# Runs `postcopy demo` over a matrix of options and prints one line per run plus the medians of
# the repeated 1 GiB run: the numbers an issue's closing note quotes.
#
#   tools/demo-matrix.sh [--quick]      (--quick: 256 MiB instead of 1 GiB, no 4 GiB run)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
bin=./target/release/postcopy
size=1G; big=4G
[ "${1:-}" = "--quick" ] && { size=256M; big=""; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
run() {
  local name=$1; shift
  if "$bin" demo --quiet --report "$out/$name.json" "$@" > /dev/null; then rc=0; else rc=$?; fi
  python3 - "$out/$name.json" "$name" "$rc" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); l = r["fault_latency_us"]
print(f"{sys.argv[2]:<22} rc={sys.argv[3]} verified={r['verified']!s:<5} postcopy={r['postcopy_seconds']:.3f}s "
      f"{r['throughput_mib_s']:.0f}MiB/s faults={r['faults']} p50={l['p50']:.1f}us p99={l['p99']:.1f}us "
      f"by_fault={r['pages_by_fault']} by_stream={r['pages_by_stream']} zero={r['pages_zero']} eexist={r['eexist']}")
PY
}
for p in random sequential zipf; do
  run "$p" --size "$size" --pattern "$p"
  run "$p-no-stream" --size 256M --pattern "$p" --no-stream
done
for i in 1 2 3; do run "median-$i" --size "$size"; done
[ -n "$big" ] && run "size-$big" --size "$big"
python3 - "$out" <<'PY'
import json, sys, statistics as st
rs = [json.load(open(f"{sys.argv[1]}/median-{i}.json")) for i in (1, 2, 3)]
print(f"median of 3 ({rs[0]['size_bytes'] >> 20} MiB, stream on): "
      f"throughput {st.median(r['throughput_mib_s'] for r in rs):.0f} MiB/s, "
      f"postcopy {st.median(r['postcopy_seconds'] for r in rs):.3f} s, "
      f"fault p50 {st.median(r['fault_latency_us']['p50'] for r in rs):.1f} us, "
      f"p99 {st.median(r['fault_latency_us']['p99'] for r in rs):.1f} us")
PY
