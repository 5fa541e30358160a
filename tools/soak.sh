#!/usr/bin/env bash
# Soak: seeded migrations through tools/chaos-proxy, whose blows fall on random live connections
# (any of them: control, precopy, urgent, bulk, zero map, verify, and the reconnections),
# by reset and by FIN, 3-20 per migration. Each must complete verified, within 3 s of the same
# migration without blows plus 1 s per blow.
#
#   tools/soak.sh [--seeds N] [--first S] [--mib M] [--precopy on|off|both] [--kinds K]
#                 [--dirty-rate R] [--keep DIR]
#
# Each run: `postcopy serve --live --once` (a live source: its workload writes during precopy)
# behind chaos-proxy, `postcopy demo --source PROXY` with a shared key, `--report` checked for
# `"verified": true`. A failed run's logs stay in --keep DIR (default target/soak). Needs the
# release build (`cargo build --release`) and builds chaos-proxy itself. Exit 0: every run passed.
set -uo pipefail
cd "$(dirname "$0")/.."

seeds=20 first=1 mib=256 precopy=both kinds=reset,fin dirty_rate=20000 keep=target/soak
while [ $# -gt 0 ]; do
  case "$1" in
    --seeds) seeds=$2; shift 2 ;;
    --first) first=$2; shift 2 ;;
    --mib) mib=$2; shift 2 ;;
    --precopy) precopy=$2; shift 2 ;;
    --kinds) kinds=$2; shift 2 ;;
    --dirty-rate) dirty_rate=$2; shift 2 ;;
    --keep) keep=$2; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "soak: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

postcopy=target/release/postcopy
[ -x "$postcopy" ] || { echo "soak: build first: cargo build --release" >&2; exit 2; }
cargo build --release --quiet --locked --manifest-path tools/chaos-proxy/Cargo.toml || exit 2
proxy_bin=tools/chaos-proxy/target/release/chaos-proxy
mkdir -p "$keep"
work=$(mktemp -d /tmp/postcopy-soak.XXXXXX)
key="$work/key"
(umask 077 && head -c 32 /dev/urandom > "$key")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done
  wait 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

# Starts a process whose first stdout line is `listening on ADDR`; prints ADDR.
start_listener() {
  local log=$1; shift
  "$@" > "$log.out" 2> "$log.err" &
  pids+=($!)
  local i
  for i in $(seq 1 200); do
    if grep -q '^listening on ' "$log.out" 2>/dev/null; then
      sed -n 's/^listening on //p' "$log.out" | head -1
      return 0
    fi
    sleep 0.05
  done
  echo "soak: $* did not start (see $log.err)" >&2
  return 1
}

# One migration: $1 = precopy on|off, $2 = seed, $3 = blows (0: none), $4 = time limit (s).
# Prints "seconds blows verified".
run_one() {
  local pc=$1 seed=$2 blows=$3 limit=$4 tag="$work/run-$1-$2"
  local src proxy gap_max=$(( mib * 1048576 / (blows > 0 ? blows : 1) ))
  src=$(start_listener "$tag.serve" "$postcopy" serve --listen 127.0.0.1:0 --once \
    --synthetic "${mib}M" --seed "$seed" --live --dirty-rate "$dirty_rate" \
    --precopy-max-seconds 3 --key-file "$key") || return 1
  local args=(--upstream "$src" --seed "$seed" --linger-ms 300)
  [ "$blows" -gt 0 ] && args+=(--victims "$blows" --victim-gap "1:$gap_max" --victim-kinds "$kinds")
  proxy=$(start_listener "$tag.proxy" "$proxy_bin" "${args[@]}") || return 1
  local t0 t1 rc
  t0=$(date +%s.%N)
  timeout --kill-after=2 "$(( limit + 30 ))" "$postcopy" demo --quiet --source "$proxy" \
    --precopy "$pc" --key-file "$key" --report "$tag.json" \
    > "$tag.demo.out" 2> "$tag.demo.err"
  rc=$?
  t1=$(date +%s.%N)
  local made verified=no
  made=$(grep -c 'victim conn' "$tag.proxy.err")
  grep -q '"verified": true' "$tag.json" 2>/dev/null && [ $rc -eq 0 ] && verified=yes
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done
  wait 2>/dev/null
  pids=()
  echo "$(echo "$t1 - $t0" | bc) $made $verified"
  if [ $verified != yes ]; then
    mkdir -p "$keep/$pc-$seed"
    cp "$tag".* "$keep/$pc-$seed/" 2>/dev/null
  fi
}

failed=0 total=0
case "$precopy" in both) modes="on off" ;; *) modes=$precopy ;; esac
for pc in $modes; do
  read -r base _ ok < <(run_one "$pc" 0 0 600)
  if [ "$ok" != yes ]; then
    echo "soak: precopy $pc: the migration without blows failed (logs in $keep/$pc-0)" >&2
    exit 1
  fi
  echo "precopy $pc: without blows ${base} s"
  for seed in $(seq "$first" $(( first + seeds - 1 ))); do
    blows=$(( 3 + seed % 18 ))
    limit=$(echo "$base + 3 + $blows" | bc)
    read -r secs made ok < <(run_one "$pc" "$seed" "$blows" "${limit%.*}")
    total=$(( total + 1 ))
    verdict=ok
    if [ "$ok" != yes ]; then
      verdict="FAILED (not verified; logs in $keep/$pc-$seed)"
    elif [ "$(echo "$secs > $base + 3 + $made" | bc)" = 1 ]; then
      verdict="FAILED (too slow: over ${base} + 3 + ${made} s; logs in $keep/$pc-$seed)"
      mkdir -p "$keep/$pc-$seed" && cp "$work/run-$pc-$seed".* "$keep/$pc-$seed/"
    fi
    [ "$verdict" = ok ] || failed=$(( failed + 1 ))
    printf 'precopy %-3s seed %3d: %2d blows dealt of %2d, %6.2f s  %s\n' \
      "$pc" "$seed" "$made" "$blows" "$secs" "$verdict"
  done
done
echo "soak: $(( total - failed )) of $total verified within their bound"
[ $failed -eq 0 ]
