#!/usr/bin/env bash
# Tables and charts of an experiment that experiments/run.sh trained: results.md (the table),
# results.json, eval-loss curves of the main arms and of the ablations, and the singular-value
# spectra of the updates (full-rank measured from its own warm-start checkpoint).
#
#   experiments/report.sh [EXPERIMENT_DIR]     (same environment variables as run.sh)
#
# RELORA_REPORT_DIR: also copy the charts, tables and spectrum summary there.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
exp_dir="$(cd "${1:-$root/experiments/austen}" && pwd)"
name="$(basename "$exp_dir")"
out="${RELORA_EXP_OUT:-$root/runs/experiments/$name}"
if [[ -z "${RELORA_BIN_DIR:-}" ]]; then
  (cd "$root" && cargo build --release -q -p relora-cli -p relora-convert)
  bin="$root/target/release"
else
  bin="$RELORA_BIN_DIR"
fi
warm=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1])).get('warmup_full_steps', 0))" "$exp_dir/base.json")

python3 "$root/experiments/report.py" "$out" "$exp_dir/arms.tsv" "$warm" | tee "$out/results.md"

arms() { for a in "$@"; do [[ -f "$out/$a/heldout.json" ]] && printf '%s ' "$out/$a"; done; }
# shellcheck disable=SC2046
"$bin/relora" plot $(arms full relora lora_warm lora) --png "$out/eval-loss.png" \
  --title "HELD-OUT LOSS (NATS/BYTE): FULL, RELORA, LORA" --ymax 2.4
# shellcheck disable=SC2046
"$bin/relora" plot $(arms full relora relora_no_reset relora_no_rewarmup relora_zero relora_random relora_no_warm) \
  --png "$out/eval-loss-ablations.png" --title "HELD-OUT LOSS (NATS/BYTE): RELORA ABLATIONS" --ymax 2.4
# shellcheck disable=SC2046
"$bin/relora" plot $(arms full relora) --key loss --smooth 10 --png "$out/train-loss.png" \
  --title "TRAINING LOSS (10-STEP MEAN): FULL VS RELORA" --ymax 2.2
# The investigation: peak learning rates, and a rank that binds harder.
# shellcheck disable=SC2046
"$bin/relora" plot $(arms full_lr_half full full_lr2x relora relora_lr2x lora_warm lora_warm_lr2x) \
  --png "$out/eval-loss-lr.png" --title "HELD-OUT LOSS: PEAK LEARNING RATES" --ymax 2.0
# shellcheck disable=SC2046
"$bin/relora" plot $(arms relora lora_warm relora_r8 lora_warm_r8) \
  --png "$out/eval-loss-rank.png" --title "HELD-OUT LOSS: RANK 32 VS RANK 8" --ymax 2.0

# Spectra: every run's update since the warm start ended (LoRA from scratch: since its init).
ref="$out/full/checkpoints/$(printf 'step-%08d' "$warm")"
against=()
for a in relora lora_warm lora; do
  [[ -f "$out/$a/heldout.json" ]] && against+=(--against "$out/$a")
done
"$bin/relora-convert" spectrum "$out/full" --from "$ref" "${against[@]}" --log --png "$out/spectrum.png" \
  | tee "$out/spectrum.txt"
"$bin/relora-convert" spectrum "$out/full" --from "$ref" "${against[@]}" --json > "$out/spectrum.json"
# The small outputs, for committing next to EXPERIMENTS.md.
if [[ -n "${RELORA_REPORT_DIR:-}" ]]; then
  mkdir -p "$RELORA_REPORT_DIR"
  cp "$out"/*.png "$out/results.md" "$out/results.json" "$out/spectrum.txt" "$RELORA_REPORT_DIR/"
fi
echo "wrote $out/results.md, results.json, eval-loss.png, eval-loss-ablations.png, train-loss.png, spectrum.png, spectrum.txt, spectrum.json"
