#!/usr/bin/env python3
"""Side-by-side driver: `relora bench` and bench/torch_reference.py on one configuration,
alternating engine by engine for several rounds (so drift on a shared machine hits both alike),
then a table of medians and ratios. Writes the raw runs and the table as JSON with --json.

Usage: compare.py --relora target/release/relora --python VENV/bin/python --preset small
       [--seq-len 128] [--batch-size 8] [--rank 32] [--threads 2] [--rounds 3] [--steps 8]
       [--warmup 2] [--modes full,relora] [--device cpu] [--json out.json]
"""
import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile


def run_relora(a, mode):
    with tempfile.TemporaryDirectory() as d:
        out = pathlib.Path(d) / "r.json"
        cmd = [a.relora, "bench", "--preset", a.preset, "--seq-len", str(a.seq_len),
               "--batch-size", str(a.batch_size), "--rank", str(a.rank), "--steps", str(a.steps),
               "--warmup", str(a.warmup), "--modes", mode, "--device", a.device,
               "--json", str(out)]
        if a.threads:
            cmd += ["--threads", str(a.threads)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        doc = json.loads(out.read_text())
        r = doc["results"][0]
        r["gemm_peak_gflops"] = doc.get("gemm_peak_gflops")
        return r


def run_torch(a, mode):
    script = pathlib.Path(__file__).with_name("torch_reference.py")
    cmd = [a.python, str(script), "--preset", a.preset, "--mode", mode, "--seq-len", str(a.seq_len),
           "--batch-size", str(a.batch_size), "--rank", str(a.rank), "--steps", str(a.steps),
           "--warmup", str(a.warmup), "--device", a.device.split(":")[0]]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--relora", required=True)
    p.add_argument("--python", required=True)
    p.add_argument("--preset", default="small")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--modes", default="full,relora")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    modes = [m for m in a.modes.split(",") if m]
    runs = {(e, m): [] for e in ("relora", "torch") for m in modes}
    for rnd in range(a.rounds):
        for m in modes:
            for engine, fn in (("relora", run_relora), ("torch", run_torch)):
                r = fn(a, m)
                runs[(engine, m)].append(r)
                print(f"round {rnd + 1}/{a.rounds} {engine:<6} {m:<6} {r['tokens_per_s']:9.0f} tok/s",
                      file=sys.stderr)
    med = lambda xs: statistics.median(xs)
    rows = []
    for m in modes:
        rel, tor = runs[("relora", m)], runs[("torch", m)]
        row = {
            "mode": m,
            "relora_tokens_per_s": med([r["tokens_per_s"] for r in rel]),
            "torch_tokens_per_s": med([r["tokens_per_s"] for r in tor]),
            "relora_peak_rss_mib": med([r["peak_rss_mib"] for r in rel]),
            "torch_peak_rss_mib": med([r["peak_rss_mib"] for r in tor]),
            "relora_model_gflops": med([r.get("model_gflops", float("nan")) for r in rel]),
            "gemm_peak_gflops": med([r.get("gemm_peak_gflops") or float("nan") for r in rel]),
        }
        row["ratio"] = row["relora_tokens_per_s"] / row["torch_tokens_per_s"]
        rows.append(row)
    print(f"preset {a.preset} | seq {a.seq_len} x batch {a.batch_size} | rank {a.rank} | "
          f"threads {a.threads or 'all'} | {a.device} | {a.rounds} alternating rounds, medians")
    print(f"{'mode':<8} {'relora tok/s':>13} {'torch tok/s':>12} {'ratio':>7} {'relora MiB':>11} "
          f"{'torch MiB':>10} {'GFLOP/s':>8} {'of peak':>8}")
    for r in rows:
        print(f"{r['mode']:<8} {r['relora_tokens_per_s']:>13.0f} {r['torch_tokens_per_s']:>12.0f} "
              f"{r['ratio']:>6.2f}x {r['relora_peak_rss_mib']:>11.0f} {r['torch_peak_rss_mib']:>10.0f} "
              f"{r['relora_model_gflops']:>8.1f} {100 * r['relora_model_gflops'] / r['gemm_peak_gflops']:>7.1f}%")
    if a.json:
        raw = {f"{e}/{m}": v for (e, m), v in runs.items()}
        pathlib.Path(a.json).write_text(json.dumps({"args": vars(a), "table": rows, "runs": raw}, indent=1))


if __name__ == "__main__":
    main()
