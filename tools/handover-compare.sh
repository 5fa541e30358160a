#!/usr/bin/env bash
# Restore a memory image into tools/fake-vmm twice per run, alternating: served by
# `postcopy handler` with pages from `postcopy serve --image` over loopback (ours), and by
# tools/fake-vmm's `uffd-file-handler` reading the local file one page per fault (baseline).
#
#   tools/handover-compare.sh [SIZE_MIB=1024] [RUNS=3]
#
# Prints, per run, the fake VMM's time to touch every page and its fault latency (only touches
# that found the page missing), and the handler's own report. Writes a throwaway image under
# $TMPDIR (25% zero pages) and removes it at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${1:-1024}
runs=${2:-3}
tmp=$(mktemp -d)
trap 'kill $src 2>/dev/null || true; rm -rf "$tmp"' EXIT
cargo build --release --quiet
cargo build --release --quiet --manifest-path tools/fake-vmm/Cargo.toml
bin=target/release/postcopy
t=tools/fake-vmm/target/release
img=$tmp/vm.mem
python3 tools/make-image.py "$img" "$size_mib"
port=$((20000 + RANDOM % 20000))
(umask 077 && head -c 32 /dev/urandom >"$tmp/key")   # authenticated, as in production
$bin serve --listen 127.0.0.1:$port --image "$img" --quiet --key-file "$tmp/key" >/dev/null 2>&1 &
src=$!
sleep 0.5
vmm() { $t/fake-vmm --socket "$1" --image "$img" --threads 2 --warmup --only-missing --connect-timeout 10; }
summary='import json,sys
v = json.loads(open(sys.argv[1]).read())
l = v["fault_latency_us"] or {}
print("%-9s verified %s  restore %.3f s  faults %d  p50 %.1f us  p99 %.1f us" % (
    sys.argv[2], v["verified"], v["seconds_touch"], l.get("count", 0), l.get("p50", 0), l.get("p99", 0)))'
for i in $(seq "$runs"); do
  $bin handler --socket "$tmp/h.sock" --source 127.0.0.1:$port --once --quiet --key-file "$tmp/key" >"$tmp/h.json" &
  h=$!
  vmm "$tmp/h.sock" >"$tmp/ours.json"; wait $h
  python3 -c "$summary" "$tmp/ours.json" "ours"
  echo "          handler: $(cat "$tmp/h.json")"
  $t/uffd-file-handler --socket "$tmp/b.sock" --image "$img" --once >"$tmp/b.json" &
  h=$!
  vmm "$tmp/b.sock" >"$tmp/base.json"; wait $h
  python3 -c "$summary" "$tmp/base.json" "baseline"
done
