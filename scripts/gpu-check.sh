#!/usr/bin/env bash
# gpu-check.sh — the CUDA check, run on the GPU machine in one call (about 8 minutes on an H100):
#   1. the CUDA tests (each fused kernel against the CPU, GPU-vs-CPU losses on the tiny preset,
#      checkpoints moving between devices);
#   2. the card's bf16 matmul rate, measured here, for model-FLOP utilisation;
#   3. `relora bench` of the 130m and 350m presets, full and relora, bf16 mixed precision and
#      f32 (TF32), and at 350m bf16 again with the decoder layers on candle's graph
#      (`--graph-layers`), with an AdamW launch per tensor instead of the grouped update
#      (`--per-tensor-optimizer`), with bf16 products rounded before they are kept in f32
#      (`--rounded-products`), relora with the adapters' separate products instead of the
#      effective weight (`--separate-adapter-products`), and with candle's composed ops instead
#      of the kernels;
#   4. the same configurations through PyTorch + transformers (eager attention) + peft;
#   5. a profiled 350m bf16 run (`relora bench --profile`): where a step goes, region by region;
# then one table last, the ratios (relora/full, against PyTorch, and each newer path on/off,
# from the runs above), with the raw JSON and summary.json under $OUT. A benchmark that fails is
# rerun with the newest paths off; its row says "(fallback)". Optional stages that would
# start after BUDGET_S (420) seconds are skipped, so a call with timeout_s 560 ends with its summary.
#
# Inputs: gpu-bundle.tar.xz (or an unpacked gpu-bundle/) with the `relora` binary and the `cuda`
# test binary, built by scripts/build-gpu-bundle.sh on a CPU machine.
# Knobs: OUT, BUNDLE, TORCH_PYTHON, SEQ (512), BATCH (8), RANK (128), STEPS (6), STAGES
# (default "tests nccl peak bench torch profile"), BUDGET_S (seconds after which optional stages are skipped).
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
BUNDLE=${BUNDLE:-gpu-bundle}
OUT=${OUT:-/tmp/relora-gpu-out}
PY=${TORCH_PYTHON:-/opt/torch/.venv/bin/python}
STAGES=${STAGES:-tests nccl peak bench torch profile}
BUDGET_S=${BUDGET_S:-420}
SEQ=${SEQ:-512}; BATCH=${BATCH:-8}; RANK=${RANK:-128}; STEPS=${STEPS:-6}
mkdir -p "$OUT"
if [ ! -x "$BUNDLE/relora" ] && [ -f gpu-bundle.tar.xz ]; then
  xz -dc gpu-bundle.tar.xz | tar -xf -
fi
RUN="bash scripts/run-on-device.sh"
export SKIP_CHECKS=1
log() { printf '\n== [%3ds] %s\n' "$SECONDS" "$*" | tee -a "$OUT/log.txt"; }
stage() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
in_budget() { [ "$SECONDS" -lt "$BUDGET_S" ] || { log "skipped (over ${BUDGET_S}s): $*"; return 1; }; }

# Peak memory of whatever runs on the GPU, sampled by nvidia-smi every 50 ms into $1.
sample_start() {
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > "$1" 2>/dev/null &
  sampler=$!
}
sample_stop() { kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null; }

log "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
SKIP_CHECKS=0 $RUN "$BUNDLE/relora" --version 2>&1 | tail -n 20 | tee -a "$OUT/log.txt"

tests_rc=0
if stage tests; then
  log "CUDA tests"
  timeout 240 $RUN "$BUNDLE/cuda-tests" --test-threads=1 --nocapture > "$OUT/cuda-tests.txt" 2>&1
  tests_rc=$?
  grep -E '^test |test result|worst|panicked|differ' "$OUT/cuda-tests.txt" | tail -n 30
fi

if stage nccl; then
  log "NCCL: one-rank tests and a one-rank training run (relora-nccl, nccl-tests)"
  ls /opt/torch/.venv/lib/python3*/site-packages/nvidia/nccl/lib 2>&1 | head -n 3
  if [ -x "$BUNDLE/nccl-tests" ]; then
    timeout 180 $RUN "$BUNDLE/nccl-tests" --test-threads=1 --nocapture > "$OUT/nccl-tests.txt" 2>&1
    echo "nccl-tests exit $?" | tee -a "$OUT/nccl-tests.txt"
    grep -E '^test |test result|panicked|error' "$OUT/nccl-tests.txt" | tail -n 15
    rm -rf "$OUT/nccl-run"
    RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 SKIP_CHECKS=1 timeout 120 $RUN "$BUNDLE/relora-nccl" train \
      --distributed nccl --preset tiny --steps 40 --set warmup_full_steps=10 --set reset_every=10 \
      --eval-every 0 --quiet --out "$OUT/nccl-run" > "$OUT/nccl-train.txt" 2>&1
    echo "nccl train exit $?" | tee -a "$OUT/nccl-train.txt"
    tail -n 4 "$OUT/nccl-train.txt"
    grep -o '"reduced_bytes":[0-9]*' "$OUT/nccl-run/metrics.jsonl" 2>/dev/null | sort | uniq -c | head -n 4
  else
    echo "no nccl-tests in the bundle"
  fi
fi

if stage peak; then
  log "bf16 matmul peak (torch, 8192^3)"
  "$PY" - <<'PY' 2>&1 | tail -n 1 | tee "$OUT/peak.json"
import json, time, torch
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
for _ in range(5): a @ b
torch.cuda.synchronize(); t = time.perf_counter(); n = 30
for _ in range(n): a @ b
torch.cuda.synchronize(); dt = (time.perf_counter() - t) / n
print(json.dumps({"bf16_tflops": 2 * 8192**3 / dt / 1e12}))
PY
fi

# relora bench: $1 preset, $2 label, $3 mode, rest: extra flags. A run that fails is run again
# with the newest GPU paths off (the products rounded as before, the AdamW update per tensor),
# so that a fault in them costs this session a comparison, not its numbers; the log says so.
bench() {
  local preset=$1 label=$2 mode=$3; shift 3
  local base=$OUT/relora-$preset-$label-$mode
  sample_start "$OUT/mem-relora-$preset-$label-$mode.txt"
  timeout 120 $RUN "$BUNDLE/relora" bench --device cuda:0 --preset "$preset" --seq-len "$SEQ" \
    --batch-size "$BATCH" --rank "$RANK" --modes "$mode" --steps "$STEPS" --warmup 2 "$@" \
    --json "$base.json" > "$base.txt" 2>&1 || {
      tail -n 5 "$base.txt"
      log "FAILED: relora $preset $label $mode; again with the newest GPU paths off"
      mv "$base.txt" "$base.failed.txt"
      timeout 120 $RUN "$BUNDLE/relora" bench --device cuda:0 --preset "$preset" --seq-len "$SEQ" \
        --batch-size "$BATCH" --rank "$RANK" --modes "$mode" --steps "$STEPS" --warmup 2 "$@" \
        --rounded-products --per-tensor-optimizer --separate-adapter-products \
        --json "$base.json" > "$base.txt" 2>&1 || tail -n 5 "$base.txt"
    }
  sample_stop
  tail -n 1 "$base.txt"
}
# torch reference: $1 preset, $2 mode, $3 attention implementation, $4 label (default: $3).
torch_bench() {
  local preset=$1 mode=$2 attn=$3 label=${4:-$3}
  sample_start "$OUT/mem-torch-$preset-$label-$mode.txt"
  timeout 120 "$PY" bench/torch_reference.py --device cuda --preset "$preset" --mode "$mode" \
    --seq-len "$SEQ" --batch-size "$BATCH" --rank "$RANK" --steps "$STEPS" --warmup 2 \
    --dtype bf16 --attn "$attn" > "$OUT/torch-$preset-$label-$mode.json" \
    2> "$OUT/torch-$preset-$label-$mode.err" || tail -n 3 "$OUT/torch-$preset-$label-$mode.err"
  sample_stop
  tail -n 1 "$OUT/torch-$preset-$label-$mode.json"
}

for preset in 350m 130m; do
  if stage bench; then
    for mode in full relora; do
      in_budget "relora $preset bf16 $mode" && { log "relora $preset bf16 $mode"; bench "$preset" bf16 "$mode" --compute-dtype bf16; }
    done
  fi
  if stage torch; then
    for mode in full relora; do
      in_budget "torch $preset $mode" && { log "torch $preset eager bf16 $mode"; torch_bench "$preset" "$mode" eager; }
    done
  fi
done
if stage profile; then
  # Where the 350m bf16 step goes, region by region (the waits around each region slow the step:
  # the tokens/s above come from unprofiled runs).
  in_budget "profile 350m bf16" && {
    log "relora 350m bf16 profiled (full, relora)"
    timeout 150 $RUN "$BUNDLE/relora" bench --device cuda:0 --preset 350m --seq-len "$SEQ" \
      --batch-size "$BATCH" --rank "$RANK" --modes full,relora --steps 3 --warmup 2 --profile \
      --compute-dtype bf16 --json "$OUT/profile-350m-bf16.json" > "$OUT/profile-350m-bf16.txt" 2>&1 \
      || tail -n 5 "$OUT/profile-350m-bf16.txt"
    sed -n '/where a profiled step goes/,$p' "$OUT/profile-350m-bf16.txt"
  }
fi
if stage bench; then
  # What the effective weight, the grouped AdamW update and the widening products buy: the same
  # runs with the adapters' separate products (relora only: full rank has no adapters), with a
  # launch per tensor, and with the products rounded to bf16 and cast.
  in_budget "relora 350m separate adapter products" && { log "relora 350m bf16 separate adapter products relora"; bench 350m bf16-separate relora --compute-dtype bf16 --separate-adapter-products; }
  for mode in full relora; do
    in_budget "relora 350m per-tensor optimizer $mode" && { log "relora 350m bf16 per-tensor optimizer $mode"; bench 350m bf16-per-tensor "$mode" --compute-dtype bf16 --per-tensor-optimizer; }
  done
  for mode in full relora; do
    in_budget "relora 350m rounded products $mode" && { log "relora 350m bf16 rounded products $mode"; bench 350m bf16-rounded "$mode" --compute-dtype bf16 --rounded-products; }
  done
  for mode in full relora; do
    in_budget "relora 350m bf16 batch 16 $mode" && { log "relora 350m bf16 batch 16 $mode"; BATCH=16 bench 350m bf16-b16 "$mode" --compute-dtype bf16; }
  done
fi
if stage torch; then
  for mode in full relora; do
    in_budget "torch 350m eager batch 16 $mode" && { log "torch 350m eager bf16 batch 16 $mode"; BATCH=16 torch_bench 350m "$mode" eager eager-b16; }
  done
fi

if stage bench; then
  for preset in 350m 130m; do
    for mode in full relora; do
      in_budget "relora $preset tf32 $mode" && { log "relora $preset tf32 $mode"; bench "$preset" tf32 "$mode" --tf32; }
    done
  done
  for mode in full relora; do
    in_budget "relora 350m graph layers $mode" && { log "relora 350m bf16 graph layers $mode"; bench 350m bf16-graph "$mode" --compute-dtype bf16 --graph-layers; }
  done
  for mode in full relora; do
    in_budget "relora 350m composed $mode" && { log "relora 350m bf16 composed ops $mode"; bench 350m bf16-composed "$mode" --compute-dtype bf16 --composed-ops; }
  done
fi
if stage torch; then
  for mode in full relora; do
    in_budget "torch 350m sdpa $mode" && { log "torch 350m sdpa bf16 $mode"; torch_bench 350m "$mode" sdpa; }
  done
fi
log "summary"
"$PY" - "$OUT" "$SEQ" <<'PY' | tee "$OUT/summary.txt"
import json, sys, pathlib
out, seq = pathlib.Path(sys.argv[1]), int(sys.argv[2])
try:
    peak = json.loads((out / "peak.json").read_text().strip().splitlines()[-1])["bf16_tflops"]
except Exception:
    peak = float("nan")
gpu = (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else "?"
# hidden, intermediate, layers; vocab 258 (bytes)
sizes = {"130m": (768, 2048, 12), "350m": (1024, 2736, 24)}
V = 258
def flops_per_token(p, mode):
    # Matmul FLOPs only: projections, the two attention products, lm_head. Full rank: backward
    # = 2x forward. ReLoRA phase: the frozen projections need only the input gradient (1x), and
    # the rank-r adapters are not counted (the useful work is the model's).
    h, i, l = sizes[p]
    proj = l * (4 * h * h + 3 * h * i)
    attn = l * 2 * seq * h           # q k^T and p v, per token, causal not discounted
    head = h * V
    if mode == "full":
        return 3 * 2 * (proj + attn + head)
    return 2 * (2 * proj + 3 * attn + 3 * head)
def mem_peak(name):
    f = out / name
    vals = [float(x) for x in f.read_text().split()] if f.exists() else []
    return max(vals) if vals else float("nan")
rows = []
for p in sizes:
    for label, eng in (("bf16", "relora bf16"), ("tf32", "relora tf32"),
                       ("bf16-graph", "relora bf16 graph layers"),
                       ("bf16-composed", "relora bf16 composed"), ("bf16-b16", "relora bf16 batch16"),
                       ("bf16-per-tensor", "relora bf16 per-tensor opt"),
                       ("bf16-rounded", "relora bf16 rounded products"),
                       ("bf16-separate", "relora bf16 separate adapter products")):
        for mode in ("full", "relora"):
            f = out / f"relora-{p}-{label}-{mode}.json"
            # A run that failed and was rerun with the newest paths off is not the engine its
            # label names: say so, and keep it out of the on/off ratios below.
            shown = eng + (" (fallback)" if (out / f"relora-{p}-{label}-{mode}.failed.txt").exists() else "")
            if f.exists():
                for r in json.loads(f.read_text())["results"]:
                    r["peak_gpu_mib"] = mem_peak(f"mem-relora-{p}-{label}-{mode}.txt")
                    rows.append((p, shown, r))
    for attn in ("eager", "sdpa", "eager-b16"):
        for mode in ("full", "relora"):
            f = out / f"torch-{p}-{attn}-{mode}.json"
            if f.exists() and f.read_text().strip():
                try:
                    r = json.loads(f.read_text().strip().splitlines()[-1])
                except Exception:
                    continue
                r["torch_allocated_mib"] = r.get("peak_gpu_mib")
                r["peak_gpu_mib"] = mem_peak(f"mem-torch-{p}-{attn}-{mode}.txt")
                rows.append((p, f"torch bf16 {attn.replace('-b16', ' batch16')}", r))
table = []
print(f"GPU: {gpu} | bf16 matmul peak measured: {peak:.0f} TFLOP/s | seq {seq}")
print(f"{'preset':<6} {'engine':<24} {'mode':<7} {'tok/s':>8} {'step ms':>8} {'fwd':>7} {'bwd':>7} {'opt':>7} {'GPU MiB':>8} {'MFU':>6}")
for p, eng, r in rows:
    tps = r["tokens_per_s"]
    mfu = tps * flops_per_token(p, r["mode"]) / (peak * 1e12) if peak == peak else float("nan")
    row = {"preset": p, "engine": eng, "mode": r["mode"], "tokens_per_s": tps,
           "median_step_ms": r["median_step_ms"], "forward_ms": r["forward_ms"],
           "backward_ms": r["backward_ms"], "optimizer_ms": r["optimizer_ms"],
           "peak_gpu_mib": r["peak_gpu_mib"], "mfu": mfu,
           "merge_reset_ms": r.get("merge_reset_ms"), "torch_allocated_mib": r.get("torch_allocated_mib")}
    table.append(row)
    print(f"{p:<6} {eng:<24} {r['mode']:<7} {tps:>8.0f} {r['median_step_ms']:>8.1f} {r['forward_ms']:>7.1f} {r['backward_ms']:>7.1f} {r['optimizer_ms']:>7.1f} {r['peak_gpu_mib']:>8.0f} {mfu:>6.1%}")
def tps(p, eng, mode, fallback=True):
    # The headline ratios take a fallback run if that is all there is (it is marked above);
    # the on/off ratios of one path do not.
    names = (eng, eng + " (fallback)") if fallback else (eng,)
    return next((t["tokens_per_s"] for t in table if t["preset"] == p and t["engine"] in names and t["mode"] == mode), float("nan"))
print()
for p in sizes:
    rel, full = tps(p, "relora bf16", "relora"), tps(p, "relora bf16", "full")
    print(f"{p}: bf16 relora/full {rel / full:.2f}x | vs torch eager: full {full / tps(p, 'torch bf16 eager', 'full'):.2f}x, relora {rel / tps(p, 'torch bf16 eager', 'relora'):.2f}x")
    rel16, full16 = tps(p, "relora bf16 batch16", "relora"), tps(p, "relora bf16 batch16", "full")
    if rel16 == rel16:
        print(f"{p} batch 16: bf16 relora/full {rel16 / full16:.2f}x | vs torch eager: full {full16 / tps(p, 'torch bf16 eager batch16', 'full'):.2f}x, relora {rel16 / tps(p, 'torch bf16 eager batch16', 'relora'):.2f}x")
def opt_ms(p, eng, mode):
    return next((t["optimizer_ms"] for t in table if t["preset"] == p and t["engine"] == eng and t["mode"] == mode), float("nan"))
for p in sizes:
    per = [opt_ms(p, "relora bf16 per-tensor opt", m) for m in ("full", "relora")]
    if any(x == x for x in per):
        grouped = [opt_ms(p, "relora bf16", m) for m in ("full", "relora")]
        print(f"{p}: optimizer ms, grouped AdamW full {grouped[0]:.1f} relora {grouped[1]:.1f} | per tensor full {per[0]:.1f} relora {per[1]:.1f}")
# Each switch that turns one newer GPU path off, against the default build in the same run:
# tokens/s with the path on over tokens/s with it off, per mode that ran both ways.
switches = (("relora bf16 separate adapter products", "effective weight"),
            ("relora bf16 rounded products", "bf16 products kept in f32"),
            ("relora bf16 graph layers", "layer nodes"))
for p in sizes:
    for eng, path in switches:
        pairs = [(m, tps(p, "relora bf16", m, False), tps(p, eng, m, False)) for m in ("full", "relora")]
        pairs = [(m, on, off) for m, on, off in pairs if off == off and on == on]
        if pairs:
            print(f"{p}: {path} on/off, tok/s " + " | ".join(f"{m} {on:.0f} / {off:.0f} ({on / off:.2f}x)" for m, on, off in pairs))
(out / "summary.json").write_text(json.dumps({"gpu": gpu, "bf16_peak_tflops": peak, "seq_len": seq, "rows": table}, indent=1))
PY
log "done (CUDA tests exit status $tests_rc)"
# The device tool returns at most 8 files: keep the readable ones, pack the raw data.
keep="summary.txt summary.json log.txt cuda-tests.txt nccl-tests.txt nccl-train.txt"
( cd "$OUT" && tar -czf /tmp/relora-gpu-raw.tar.gz $(ls | grep -vxF -f <(tr ' ' '\n' <<<"$keep")) \
  && find . -maxdepth 1 -type f $(for k in $keep; do printf -- '! -name %s ' "$k"; done) -delete \
  && mv /tmp/relora-gpu-raw.tar.gz raw.tar.gz )
exit $tests_rc
