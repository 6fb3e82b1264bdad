#!/usr/bin/env bash
# Runs App. G rank shards (EXPERIMENTS.md) from a queue, several at a time, within a wall-clock
# budget, so that a full-protocol setting can be spread over sessions and machines (a lent GPU
# machine has 16 CPU cores). Each shard is one `app_g_elra SETTING --ranks R` run written to
# OUT/SETTING_rR/; join the shards with
#   cargo run --release -- expressivity merge OUT/*_r*/*/mse_vs_rank.csv [older shards...] --out DIR
# (rows depend only on seed, setting and rank, so the join equals one run over those ranks).
#
#   scripts/app-g-shards.sh [--bin PATH] [--jobs J] [--threads T] [--budget S] [--estimate S]
#                           [--out DIR] SETTING:RANK... [-- EXTRA app_g_elra ARGS]
#
#   --bin       the app_g_elra binary (default target/release/examples/app_g_elra; build it with
#               `cargo build --release --example app_g_elra`, copy it elsewhere if you rebuild
#               while shards run)
#   --jobs      shards at a time (default 1); --threads: threads per shard (default 2)
#   --budget    seconds from the start after which no shard is started (default: none)
#   --estimate  expected seconds per shard: a shard is started only if it should end within the
#               budget (default 0: start while the budget lasts)
#   --out       output directory (default runs/shards)
# Example (the device: 16 cores, 10-minute calls):
#   scripts/app-g-shards.sh --bin .gpu/app_g_elra --jobs 4 --threads 4 --budget 560 \
#     --estimate 500 --out "$OUT" tfn_L1_H2_random:9 tfn_L1_H2_random:10 tfn_L1_H2_pretrained:9
# Prints one line per shard (start, end, seconds, exit status) and a summary; exits non-zero if
# a shard failed. Shards not started for lack of budget are listed as "skipped". Give every
# shard of a setting the same EXTRA args: the merge checks what the CSV records (iterations,
# frozen model, pretraining), not the lr/wd grids or the batch. Needs bash >= 4.4.
set -uo pipefail
bin=target/release/examples/app_g_elra
jobs=1 threads=2 budget=0 estimate=0 out=runs/shards
queue=() extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --bin|--jobs|--threads|--budget|--estimate|--out)
      if [ $# -lt 2 ]; then echo "app-g-shards: $1 needs a value" >&2; exit 2; fi ;;
  esac
  case "$1" in
    --bin) bin=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --budget) budget=$2; shift 2 ;;
    --estimate) estimate=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    *:*) queue+=("$1"); shift ;;
    *) echo "app-g-shards: expected SETTING:RANK, got '$1'" >&2; exit 2 ;;
  esac
done
if [ ! -x "$bin" ]; then echo "app-g-shards: no executable at $bin" >&2; exit 2; fi
if [ ${#queue[@]} -eq 0 ]; then echo "app-g-shards: no SETTING:RANK given" >&2; exit 2; fi
for n in "$jobs" "$threads" "$budget" "$estimate"; do
  case "$n" in ''|*[!0-9]*) echo "app-g-shards: '$n' is not a count" >&2; exit 2 ;; esac
done
if [ "$jobs" -lt 1 ] || [ "$threads" -lt 1 ]; then
  echo "app-g-shards: --jobs and --threads must be at least 1" >&2; exit 2
fi
mkdir -p "$out"
t0=$(date +%s)
status=0
skipped=()
run_one() {
  local setting=${1%%:*} rank=${1##*:}
  local dir="$out/${setting}_r$rank" s e rc
  s=$(date +%s)
  "$bin" "$setting" --threads "$threads" --ranks "$rank" --out "$dir" "${extra[@]}" \
    > "$dir.log" 2>&1
  rc=$?
  e=$(date +%s)
  echo "shard $setting R=$rank: start +$((s - t0)) s, end +$((e - t0)) s, $((e - s)) s, exit $rc"
  return $rc
}
running=0
for item in "${queue[@]}"; do
  if [ "$running" -ge "$jobs" ]; then
    wait -n || status=1
    running=$((running - 1))
  fi
  now=$(date +%s)
  if [ "$budget" -gt 0 ] && [ $((now - t0 + estimate)) -gt "$budget" ]; then
    skipped+=("$item")
    continue
  fi
  run_one "$item" &
  running=$((running + 1))
done
while [ "$running" -gt 0 ]; do
  wait -n || status=1
  running=$((running - 1))
done
echo "app-g-shards: ${#queue[@]} queued, ${#skipped[@]} skipped, $(($(date +%s) - t0)) s wall"
if [ ${#skipped[@]} -gt 0 ]; then echo "skipped: ${skipped[*]}"; fi
exit $status
