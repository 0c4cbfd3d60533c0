#!/usr/bin/env bash
# Trains every arm of an experiment on the same tokens and seed, then scores each final model
# on the whole held-out text. Resumable: an arm whose results exist is skipped, so a second
# invocation finishes an interrupted suite.
#
#   experiments/run.sh [EXPERIMENT_DIR] [ARM ...]
#
# Two invocations at once (e.g. one per core) share the arms between them.
#
# EXPERIMENT_DIR holds base.json (training options shared by every arm) and arms.tsv (one arm a
# line: name, mode, extra KEY=VALUE options). Default: experiments/austen.
# Environment: RELORA_TRAIN_DATA, RELORA_HELDOUT_DATA (default ../shared/data/austen-*.txt),
# RELORA_EXP_OUT (default runs/experiments/<name>), RELORA_THREADS (default 1), RELORA_BIN_DIR
# (prebuilt binaries, with RELORA_BIN_COMMIT naming their commit; default: build them here).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
exp_dir="$(cd "${1:-$root/experiments/austen}" && pwd)"
shift || true
name="$(basename "$exp_dir")"
train_data="${RELORA_TRAIN_DATA:-$root/../shared/data/austen-train.txt}"
heldout_data="${RELORA_HELDOUT_DATA:-$root/../shared/data/austen-heldout.txt}"
out="${RELORA_EXP_OUT:-$root/runs/experiments/$name}"
threads="${RELORA_THREADS:-1}"
for f in "$train_data" "$heldout_data" "$exp_dir/base.json" "$exp_dir/arms.tsv"; do
  [[ -f "$f" ]] || { echo "missing $f" >&2; exit 2; }
done

if [[ -z "${RELORA_BIN_DIR:-}" ]]; then
  (cd "$root" && cargo build --release -q -p relora-cli -p relora-convert)
  bin="$root/target/release"
else
  bin="$RELORA_BIN_DIR"
fi
mkdir -p "$out"
# The commit the binaries were built from: this checkout's, or RELORA_BIN_COMMIT for prebuilt ones.
if [[ -n "${RELORA_BIN_DIR:-}" ]]; then
  commit="${RELORA_BIN_COMMIT:-prebuilt}"
else
  commit="$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  dirty="$(git -C "$root" status --porcelain -- src tools 2>/dev/null | head -1)"
  [[ -n "$dirty" ]] && commit="$commit+dirty"
fi

wanted=("$@")
while IFS=$'\t' read -r arm mode options; do
  [[ -z "$arm" || "$arm" == \#* ]] && continue
  if ((${#wanted[@]})) && [[ ! " ${wanted[*]} " == *" $arm "* ]]; then continue; fi
  dir="$out/$arm"
  if [[ -f "$dir/heldout.json" ]]; then
    echo "== $arm: done already ($dir/heldout.json)"
    continue
  fi
  # Several invocations may share the suite (one a core): each arm is claimed by one of them.
  if ! mkdir "$dir.claim" 2>/dev/null; then
    echo "== $arm: claimed by another invocation ($dir.claim)"
    continue
  fi
  trap 'rm -rf "$dir.claim"' EXIT
  sets=()
  if [[ "$options" != "-" ]]; then
    for kv in $options; do sets+=(--set "$kv"); done
  fi
  echo "== $arm: mode $mode ${options/#-/} ($(date -u +%H:%M:%S))"
  start=$(date +%s)
  # Checkpoints every 400 steps are kept: the one at the warm-start boundary is the reference
  # that the spectrum of the full-rank arm is measured from.
  "$bin/relora" train --force --quiet --train-config "$exp_dir/base.json" --mode "$mode" \
    "${sets[@]}" --data "$train_data" --eval-data "$heldout_data" --threads "$threads" \
    --out "$dir" --save-every 400 --keep-last 100 --eval-every 100 --eval-batches 16 \
    > "$dir.log" 2>&1 || { echo "arm $arm failed; see $dir.log" >&2; tail -5 "$dir.log" >&2; exit 1; }
  train_s=$(($(date +%s) - start))
  "$bin/relora" eval --checkpoint "$dir" --data "$heldout_data" --threads "$threads" --json \
    > "$dir/heldout.partial.json"
  # One JSON record an arm: what ran, on which commit, how long, and the held-out score.
  python3 - "$dir/heldout.partial.json" "$arm" "$mode" "$options" "$train_s" "$commit" \
    "$threads" > "$dir/heldout.tmp" <<'PY'
import json, sys
score = json.load(open(sys.argv[1]))
score.update(arm=sys.argv[2], mode=sys.argv[3], options=sys.argv[4], train_seconds=int(sys.argv[5]),
             commit=sys.argv[6], threads=int(sys.argv[7]))
print(json.dumps(score))
PY
  mv "$dir/heldout.tmp" "$dir/heldout.json"
  rm -f "$dir/heldout.partial.json"
  rm -rf "$dir.claim"
  trap - EXIT
  echo "   $(cat "$dir/heldout.json")"
done < "$exp_dir/arms.tsv"
