#!/usr/bin/env bash
# Benchmark of `relora-convert merge` against copying the same bytes (BENCHMARKS.md):
# a synthetic checkpoint at a preset (default 1b: random weights, 3 phases + a current adapter of
# rank 128), merged to an f32 Hugging Face directory; wall time and peak RSS of the merge vs
# `cp` of the files merge reads (params, base, phases, adapters). Both runs read from a warm page
# cache (each is run twice; the second is reported).
#
# usage: tools/relora-convert/bench.sh [WORKDIR] [PRESET] [PHASES] [RANK]
# needs: a release build (cargo build --release -p relora-convert), GNU time, ~15 GB of disk
# for 1b.
set -euo pipefail
work=${1:-/tmp/relora-merge-bench}
preset=${2:-1b}
phases=${3:-3}
rank=${4:-128}
bin=${RELORA_CONVERT:-target/release/relora-convert}
mkdir -p "$work"
ckpt="$work/ckpt-$preset"
if [ ! -f "$ckpt/manifest.json" ]; then
  rm -rf "$ckpt"
  "$bin" synth "$ckpt" --preset "$preset" --phases "$phases" --rank "$rank"
fi
inputs=("$ckpt/params.safetensors" "$ckpt/base.safetensors" "$ckpt"/phases/*.safetensors "$ckpt/adapters.safetensors")
bytes=$(du -cb "${inputs[@]}" | tail -1 | cut -f1)
largest=$("$bin" inspect "$ckpt" --json | python3 -c '
import json, sys
r = json.load(sys.stdin)["report"]
print(max(t["bytes"] for f in r["files"] for t in f["tensors"]))')

measure() { # label, command...: prints "label seconds peak_rss_kb"
  local label=$1; shift
  local log; log=$(mktemp)
  /usr/bin/time -f "%e %M" -o "$log" "$@" >/dev/null 2>&1
  echo "$label $(cat "$log")"
  rm -f "$log"
}
for round in 1 2; do
  rm -rf "$work/copy" "$work/hf" "$work/hf0"
  mkdir -p "$work/copy"
  sync
  cp_line=$(measure cp cp "${inputs[@]}" "$work/copy/")
  rm -rf "$work/copy"; sync
  base_line=$(measure base "$bin" merge "$ckpt" "$work/hf0" --upto-phase 0)
  rm -rf "$work/hf0"; sync
  merge_line=$(measure merge "$bin" merge "$ckpt" "$work/hf")
  sync
done
read -r _ cp_s cp_kb <<<"$cp_line"
read -r _ base_s base_kb <<<"$base_line"
read -r _ merge_s merge_kb <<<"$merge_line"
out_bytes=$(du -cb "$work/hf"/*.safetensors | tail -1 | cut -f1)
python3 - "$preset" "$phases" "$rank" "$bytes" "$out_bytes" "$largest" \
  "$cp_s" "$cp_kb" "$base_s" "$base_kb" "$merge_s" "$merge_kb" <<'PY'
import sys
preset, phases, rank = sys.argv[1:4]
inp, out, largest = (int(x) for x in sys.argv[4:7])
cp_s, cp_kb, b_s, b_kb, m_s, m_kb = (float(x) for x in sys.argv[7:13])
print(f"preset {preset}, {phases} phases + current adapter, rank {rank}")
print(f"input {inp/1e9:.2f} GB, output {out/1e9:.2f} GB, largest tensor {largest/1e6:.0f} MB")
print(f"cp                          {cp_s:7.2f} s  peak RSS {cp_kb/1024:7.0f} MB")
print(f"merge --upto-phase 0 (I/O)  {b_s:7.2f} s  peak RSS {b_kb/1024:7.0f} MB  ({b_s/cp_s:.2f}x cp)")
print(f"merge (all phases)          {m_s:7.2f} s  peak RSS {m_kb/1024:7.0f} MB  ({m_s/cp_s:.2f}x cp)")
print(f"peak RSS / largest tensor: {m_kb*1024/largest:.2f} (target < 3); time target <= 1.5x cp")
PY
rm -rf "$work/copy" "$work/hf" "$work/hf0"
