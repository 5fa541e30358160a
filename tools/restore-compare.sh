#!/usr/bin/env bash
# Snapshot restore, side by side in one run (issue 12's acceptance): tools/fake-vmm restoring a
# memory image through `postcopy handler` + `postcopy serve --image` (loopback, authenticated,
# prepared sessions, working set), against tools/fake-vmm's `uffd-file-handler` reading the
# local file one page per fault (the baseline: no network). Alternating runs; medians printed.
#
#   tools/restore-compare.sh [--mib M=256] [--runs N=5] [--vmms K=8]
#
# 1. first fault: handover -> first fault served (handler report), stream on, demand VMM;
# 2. working set: a VMM touching 25% of the image in a fixed order (one thread, --seed 7);
#    the first restore records, the next ones replay; faults and touch time vs the baseline;
# 3. K VMMs restoring the image at once from one source, against K restores one after another;
# 4. a single-threaded sequential VMM that writes during load: EEXIST and duplicates vs faults.
# Writes a throwaway image (25% zero pages) under $TMPDIR and removes it. Needs root (uffd).
set -euo pipefail
cd "$(dirname "$0")/.."
mib=256 runs=5 vmms=8
while [ $# -gt 0 ]; do
  case "$1" in
    --mib) mib=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --vmms) vmms=$2; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "restore-compare: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT
cargo build --release --quiet
cargo build --release --quiet --manifest-path tools/fake-vmm/Cargo.toml
bin=target/release/postcopy
t=tools/fake-vmm/target/release
img=$tmp/vm.mem
python3 tools/make-image.py "$img" "$mib"
(umask 077 && head -c 32 /dev/urandom >"$tmp/key")
port=$((20000 + RANDOM % 20000))
$bin serve --listen 127.0.0.1:$port --image "$img" --working-set "$tmp/ws" --quiet \
  --key-file "$tmp/key" >/dev/null 2>"$tmp/serve.err" &
pids+=($!)
$bin handler --socket "$tmp/h.sock" --source 127.0.0.1:$port --quiet --key-file "$tmp/key" \
  --prepared-sessions 2 >"$tmp/h.jsonl" 2>"$tmp/h.err" &
pids+=($!)
for _ in $(seq 100); do [ -S "$tmp/h.sock" ] && break; sleep 0.05; done
vmm() { # vmm SOCKET OUT ARGS...
  local sock=$1 out=$2; shift 2
  $t/fake-vmm --socket "$sock" --image "$img" --only-missing --warmup --connect-timeout 10 \
    --timeout 120 "$@" >"$out"
}
base() { # base OUT ARGS...: one restore from the local file
  local out=$1; shift
  rm -f "$tmp/b.sock"
  $t/uffd-file-handler --socket "$tmp/b.sock" --image "$img" --once >/dev/null 2>&1 &
  local h=$!
  vmm "$tmp/b.sock" "$out" "$@"
  wait $h
}
last_report() { tail -n 1 "$tmp/h.jsonl"; }
reports=0
ours() { # ours OUT ARGS...: one restore through the handler; its report to OUT.h
  local out=$1; shift
  vmm "$tmp/h.sock" "$out" "$@"
  reports=$((reports + 1))
  for _ in $(seq 200); do [ "$(wc -l <"$tmp/h.jsonl")" -ge $reports ] && break; sleep 0.05; done
  last_report >"$out.h"
}
ws=(--threads 1 --touch-percent 25 --seed 7)
seq_load=(--threads 1 --sequential --load-writes 64)
# The recording restore of the working set (the image's first), then alternating runs.
ours "$tmp/rec.json" "${ws[@]}"
for i in $(seq "$runs"); do
  ours "$tmp/ws.$i.json" "${ws[@]}"
  base "$tmp/bws.$i.json" "${ws[@]}"
  ours "$tmp/seq.$i.json" "${seq_load[@]}"
  base "$tmp/bseq.$i.json" "${seq_load[@]}"
done
# K at once (each its own session), then K one after another.
t0=$(date +%s.%N)
for k in $(seq "$vmms"); do vmm "$tmp/h.sock" "$tmp/par.$k.json" --threads 1 & done
wait $(jobs -p | grep -v -e "${pids[0]}" -e "${pids[1]}") 2>/dev/null || true
t1=$(date +%s.%N)
for k in $(seq "$vmms"); do vmm "$tmp/h.sock" "$tmp/ser.$k.json" --threads 1; done
t2=$(date +%s.%N)
python3 - "$tmp" "$runs" "$vmms" "$t0" "$t1" "$t2" <<'PY'
import json, statistics, sys, glob
d, runs, vmms = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t0, t1, t2 = map(float, sys.argv[4:7])
load = lambda p: json.load(open(p))
med = lambda xs: statistics.median(xs) if xs else float("nan")
def faults(v): return (v["fault_latency_us"] or {}).get("count", 0)
rec, rech = load(f"{d}/rec.json"), load(f"{d}/rec.json.h")
ws = [load(f"{d}/ws.{i}.json") for i in range(1, runs + 1)]
wsh = [load(f"{d}/ws.{i}.json.h") for i in range(1, runs + 1)]
bws = [load(f"{d}/bws.{i}.json") for i in range(1, runs + 1)]
seq = [load(f"{d}/seq.{i}.json.h") for i in range(1, runs + 1)]
seqv = [load(f"{d}/seq.{i}.json") for i in range(1, runs + 1)]
bseq = [load(f"{d}/bseq.{i}.json") for i in range(1, runs + 1)]
ok = all(v["verified"] for v in [rec] + ws + bws + seqv + bseq)
print(f"every restore verified: {ok}")
ff = [h["first_fault_served_ms"] for h in wsh + seq if h["first_fault_served_ms"] is not None]
print(f"1. first fault served after the handover: median {med(ff):.2f} ms (n={len(ff)}), "
      f"prepared sessions {sum(h['session_prepared'] for h in wsh + seq)}/{len(wsh + seq)}")
f1, f2 = rech["faults"], med([h["faults"] for h in wsh])
tw, tb = med([v["seconds_touch"] for v in ws]), med([v["seconds_touch"] for v in bws])
print(f"2. working set: recording restore {f1} faults, replays median {f2:.0f} faults "
      f"({100 * (1 - f2 / max(f1, 1)):.1f}% fewer), {med([h['pages_by_working_set'] for h in wsh]):.0f} pages pushed; "
      f"touch {tw:.3f} s vs baseline {tb:.3f} s = {tw / tb:.2f}x")
par = [load(p) for p in glob.glob(f"{d}/par.*.json")]
ser = [load(p) for p in glob.glob(f"{d}/ser.*.json")]
print(f"3. {vmms} VMMs at once: all verified {all(v['verified'] for v in par) and len(par) == vmms}, "
      f"total {t1 - t0:.2f} s, slowest touch {max(v['seconds_touch'] for v in par):.3f} s; "
      f"one after another: total {t2 - t1:.2f} s, slowest {max(v['seconds_touch'] for v in ser):.3f} s")
fs, ee, du = med([h["faults"] for h in seq]), med([h["eexist"] for h in seq]), med([h["pages_duplicate"] for h in seq])
print(f"4. sequential VMM writing during load: median {fs:.0f} faults, {ee:.0f} EEXIST "
      f"({100 * ee / max(fs, 1):.1f}% of faults), {du:.0f} duplicates dropped; touch "
      f"{med([v['seconds_touch'] for v in seqv]):.3f} s vs baseline {med([v['seconds_touch'] for v in bseq]):.3f} s")
adds = all(sum(h[k] for k in ("pages_by_fault", "pages_by_stream", "pages_by_working_set",
           "pages_by_zero_map", "pages_removed_unplaced", "pages_missing")) == h["pages"]
           for h in [rech] + wsh + seq)
print(f"every report's page fields add up to its pages: {adds}")
PY
