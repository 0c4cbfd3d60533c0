#!/usr/bin/env bash
# gpu-check.sh — the CUDA check, run on the GPU machine in one call (about 8 minutes on an H100):
#   1. the CUDA tests (GPU vs CPU agreement on the tiny preset, device moves of checkpoints);
#   2. `relora bench` of the 130m and 350m presets, full and relora, f32 (TF32) and bf16 compute;
#   3. the same configurations through PyTorch + transformers + peft (bench/torch_reference.py);
#   4. the card's bf16 matmul rate, measured here, for model-FLOP utilisation;
# then one table last, with JSON under $OUT.
#
# Inputs: a bundle folder (default gpu-bundle/) with the `relora` binary and the `cuda` test
# binary built by scripts/build-gpu-bundle.sh on a CPU machine.
set -uo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${BUNDLE:-gpu-bundle}
OUT=${OUT:-/tmp/relora-gpu-out}
PY=${TORCH_PYTHON:-/opt/torch/.venv/bin/python}
mkdir -p "$OUT"
if [ ! -x "$BUNDLE/relora" ] && [ -f gpu-bundle.tar.xz ]; then
  xz -dc gpu-bundle.tar.xz | tar -xf -
fi
RUN="bash scripts/run-on-device.sh"
export SKIP_CHECKS=1
log() { printf '\n== %s\n' "$*" | tee -a "$OUT/log.txt"; }

log "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/log.txt"
SKIP_CHECKS=0 $RUN "$BUNDLE/relora" --version 2>&1 | tail -n 20 | tee -a "$OUT/log.txt"

log "CUDA tests"
timeout 120 $RUN "$BUNDLE/cuda-tests" --test-threads=1 2>&1 | tee "$OUT/cuda-tests.txt" | tail -n 8
tests_rc=${PIPESTATUS[0]}

log "bf16 matmul peak (torch, 8192^3)"
"$PY" - <<'PY' 2>&1 | tee "$OUT/peak.json"
import json, time, torch
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
for _ in range(3): a @ b
torch.cuda.synchronize(); t = time.perf_counter(); n = 20
for _ in range(n): a @ b
torch.cuda.synchronize(); dt = (time.perf_counter() - t) / n
print(json.dumps({"bf16_tflops": 2 * 8192**3 / dt / 1e12}))
PY

SEQ=${SEQ:-512}; BATCH=${BATCH:-8}
for preset in 130m 350m; do
  for prec in tf32 bf16; do
    log "relora bench $preset ($prec)"
    extra=(--tf32); [ "$prec" = bf16 ] && extra=(--compute-dtype bf16)
    for mode in full relora; do
      # Peak GPU memory of this process, sampled by nvidia-smi every 100 ms.
      nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$OUT/mem-$preset-$prec-$mode.txt" &
      sampler=$!
      timeout 100 $RUN "$BUNDLE/relora" bench --device cuda:0 --preset "$preset" --seq-len "$SEQ" \
        --batch-size "$BATCH" --rank 128 --modes "$mode" --steps 6 --warmup 2 "${extra[@]}" \
        --json "$OUT/relora-$preset-$prec-$mode.json" 2>&1 | tail -n 2
      kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
    done
  done
  for mode in full relora; do
    log "torch $preset $mode (bf16 autocast)"
    timeout 100 "$PY" bench/torch_reference.py --device cuda --preset "$preset" --mode "$mode" \
      --seq-len "$SEQ" --batch-size "$BATCH" --rank 128 --steps 6 --warmup 2 --dtype bf16 \
      > "$OUT/torch-$preset-$mode.json" 2> "$OUT/torch-$preset-$mode.err" || tail -n 3 "$OUT/torch-$preset-$mode.err"
    cat "$OUT/torch-$preset-$mode.json"
  done
done

log "summary"
"$PY" - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
try:
    peak = json.loads((out / "peak.json").read_text().strip().splitlines()[-1])["bf16_tflops"]
except Exception:
    peak = float("nan")
# hidden, intermediate, layers, kv heads ratio 1, vocab 258
sizes = {"130m": (768, 2048, 12), "350m": (1024, 2736, 24)}
def flops_per_token(p, mode, seq=512):
    h, i, l = sizes[p]
    params = l * (4 * h * h + 3 * h * i)
    attn = l * 2 * seq * h  # q k^T and p v per token, forward
    fwd = 2 * params + 2 * attn + 2 * 258 * h
    # full: backward = 2x forward; relora phase: no weight gradients for the projections
    return 3 * fwd if mode == "full" else 2 * fwd + 2 * 258 * h
print(f"bf16 matmul peak measured: {peak:.0f} TFLOP/s")
print(f"{'preset':<6} {'engine':<14} {'mode':<7} {'tok/s':>9} {'step ms':>9} {'fwd':>7} {'bwd':>7} {'opt':>7} {'GPU MiB':>8} {'MFU':>6}")
for p in sizes:
    rows = []
    for prec in ("tf32", "bf16"):
        for mode in ("full", "relora"):
            f = out / f"relora-{p}-{prec}-{mode}.json"
            if not f.exists():
                continue
            for r in json.loads(f.read_text())["results"]:
                mem = out / f"mem-{p}-{prec}-{mode}.txt"
                vals = [float(x) for x in mem.read_text().split()] if mem.exists() else []
                r["peak_gpu_mib"] = max(vals) if vals else float("nan")
                rows.append((f"relora {prec}", r))
    for mode in ("full", "relora"):
        f = out / f"torch-{p}-{mode}.json"
        if f.exists() and f.read_text().strip():
            rows.append(("torch bf16", json.loads(f.read_text().strip().splitlines()[-1])))
    for eng, r in rows:
        tps = r["tokens_per_s"]
        mfu = tps * flops_per_token(p, r["mode"]) / (peak * 1e12) if peak == peak else float("nan")
        gpu = r.get("peak_gpu_mib", float("nan"))
        print(f"{p:<6} {eng:<14} {r['mode']:<7} {tps:>9.0f} {r['median_step_ms']:>9.1f} {r['forward_ms']:>7.1f} {r['backward_ms']:>7.1f} {r['optimizer_ms']:>7.1f} {gpu:>8.0f} {mfu:>6.1%}")
PY
exit $tests_rc
