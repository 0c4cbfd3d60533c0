#!/usr/bin/env python3
"""Side-by-side driver: `relora bench` and bench/torch_reference.py on one configuration,
alternating engine by engine for several rounds (so drift on a shared machine hits both alike),
then a table of medians and ratios. Writes the raw runs and the table as JSON with --json.

Usage: compare.py --relora target/release/relora --python VENV/bin/python --preset small
       [--seq-len 128] [--batch-size 8] [--rank 32] [--threads 2] [--rounds 3] [--steps 8]
       [--warmup 2] [--modes full,relora] [--attn eager,sdpa] [--device cpu] [--json out.json]
       [--matmuls]

--attn names PyTorch's attention implementations to run, each as its own engine beside relora
(eager, the default, is transformers' plain matmul-softmax path; sdpa its fused kernel).
--matmuls compares the matmul libraries instead of training steps: every product of a step on
its exact shape and layout, timed alone (`relora bench --matmuls` against `torch.mm`).
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


def run_torch(a, mode, attn):
    script = pathlib.Path(__file__).with_name("torch_reference.py")
    cmd = [a.python, str(script), "--preset", a.preset, "--mode", mode, "--seq-len", str(a.seq_len),
           "--batch-size", str(a.batch_size), "--rank", str(a.rank), "--steps", str(a.steps),
           "--warmup", str(a.warmup), "--device", a.device.split(":")[0], "--attn", attn]
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
    p.add_argument("--attn", default="eager")
    p.add_argument("--matmuls", action="store_true")
    a = p.parse_args()
    if a.matmuls:
        return compare_matmuls(a)
    modes = [m for m in a.modes.split(",") if m]
    attns = [x for x in a.attn.split(",") if x]
    engines = [("relora", run_relora)] + [
        (f"torch-{x}", lambda a, m, x=x: run_torch(a, m, x)) for x in attns]
    runs = {(e, m): [] for e, _ in engines for m in modes}
    for rnd in range(a.rounds):
        for m in modes:
            for engine, fn in engines:
                r = fn(a, m)
                runs[(engine, m)].append(r)
                print(f"round {rnd + 1}/{a.rounds} {engine:<12} {m:<6} {r['tokens_per_s']:9.0f} tok/s",
                      file=sys.stderr)
    med = lambda xs: statistics.median(xs)
    rows = []
    for m in modes:
        rel = runs[("relora", m)]
        row = {
            "mode": m,
            "relora_tokens_per_s": med([r["tokens_per_s"] for r in rel]),
            "relora_peak_rss_mib": med([r["peak_rss_mib"] for r in rel]),
            "relora_model_gflops": med([r.get("model_gflops", float("nan")) for r in rel]),
            "gemm_peak_gflops": med([r.get("gemm_peak_gflops") or float("nan") for r in rel]),
        }
        for x in attns:
            tor = runs[(f"torch-{x}", m)]
            row[f"torch_{x}_tokens_per_s"] = med([r["tokens_per_s"] for r in tor])
            row[f"torch_{x}_peak_rss_mib"] = med([r["peak_rss_mib"] for r in tor])
            row[f"ratio_{x}"] = row["relora_tokens_per_s"] / row[f"torch_{x}_tokens_per_s"]
        # Kept under the names earlier reports used, for the first attention implementation.
        row["torch_tokens_per_s"] = row[f"torch_{attns[0]}_tokens_per_s"]
        row["torch_peak_rss_mib"] = row[f"torch_{attns[0]}_peak_rss_mib"]
        row["ratio"] = row[f"ratio_{attns[0]}"]
        rows.append(row)
    print(f"preset {a.preset} | seq {a.seq_len} x batch {a.batch_size} | rank {a.rank} | "
          f"threads {a.threads or 'all'} | {a.device} | {a.rounds} alternating rounds, medians")
    head = f"{'mode':<8} {'relora tok/s':>13}"
    for x in attns:
        head += f" {'torch ' + x:>12} {'ratio':>7}"
    head += f" {'relora MiB':>11}" + "".join(f" {'torch ' + x + ' MiB':>16}" for x in attns)
    head += f" {'GFLOP/s':>8} {'of peak':>8}"
    print(head)
    for r in rows:
        line = f"{r['mode']:<8} {r['relora_tokens_per_s']:>13.0f}"
        for x in attns:
            line += f" {r[f'torch_{x}_tokens_per_s']:>12.0f} {r[f'ratio_{x}']:>6.2f}x"
        line += f" {r['relora_peak_rss_mib']:>11.0f}"
        line += "".join(f" {r[f'torch_{x}_peak_rss_mib']:>16.0f}" for x in attns)
        line += (f" {r['relora_model_gflops']:>8.1f}"
                 f" {100 * r['relora_model_gflops'] / r['gemm_peak_gflops']:>7.1f}%")
        print(line)
    by_mode = {r["mode"]: r for r in rows}
    if "full" in by_mode and "relora" in by_mode:
        print(f"ReLoRA phase / full rank: relora "
              f"{by_mode['relora']['relora_tokens_per_s'] / by_mode['full']['relora_tokens_per_s']:.2f}x"
              + "".join(f", torch {x} "
                        f"{by_mode['relora'][f'torch_{x}_tokens_per_s'] / by_mode['full'][f'torch_{x}_tokens_per_s']:.2f}x"
                        for x in attns))
    if a.json:
        raw = {f"{e}/{m}": v for (e, m), v in runs.items()}
        pathlib.Path(a.json).write_text(json.dumps({"args": vars(a), "table": rows, "runs": raw}, indent=1))


def compare_matmuls(a):
    """Every product of a step timed alone by relora's matmul library and by torch.mm,
    alternating for --rounds rounds, then the medians per product and per mode's step."""
    script = pathlib.Path(__file__).with_name("torch_reference.py")
    runs = {"relora": [], "torch": []}
    with tempfile.TemporaryDirectory() as d:
        shapes = pathlib.Path(d) / "products.json"
        for rnd in range(a.rounds):
            cmd = [a.relora, "bench", "--matmuls", "--preset", a.preset, "--seq-len", str(a.seq_len),
                   "--batch-size", str(a.batch_size), "--rank", str(a.rank), "--steps", str(a.steps),
                   "--device", a.device, "--json", str(shapes)]
            if a.threads:
                cmd += ["--threads", str(a.threads)]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            runs["relora"].append(json.loads(shapes.read_text())["products"])
            cmd = [a.python, str(script), "--matmuls", str(shapes), "--steps", str(a.steps),
                   "--device", a.device.split(":")[0]]
            if a.threads:
                cmd += ["--threads", str(a.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs["torch"].append(json.loads(out.strip().splitlines()[-1])["products"])
            print(f"round {rnd + 1}/{a.rounds} done", file=sys.stderr)
    products = runs["relora"][0]
    rows = []
    for i, prod in enumerate(products):
        rel = statistics.median(r[i]["ms"] for r in runs["relora"])
        tor = statistics.median(r[i]["ms"] for r in runs["torch"])
        gflop = 2 * prod["m"] * prod["n"] * prod["k"] / 1e9
        rows.append(dict(prod, relora_ms=rel, torch_ms=tor, relora_gflops=gflop / (rel / 1e3),
                         torch_gflops=gflop / (tor / 1e3)))
    print(f"preset {a.preset} | {a.seq_len * a.batch_size} rows | rank {a.rank} | threads "
          f"{a.threads or 'all'} | {a.rounds} alternating rounds, medians of {a.steps} products each")
    print(f"{'product':<22} {'m':>6} {'n':>6} {'k':>6} {'layout':>6} {'relora GFLOP/s':>15} "
          f"{'torch GFLOP/s':>14} {'relora/torch':>13}")
    for r in rows:
        layout = ("T" if r["a_transposed"] else "N") + ("T" if r["b_transposed"] else "N")
        print(f"{r['name']:<22} {r['m']:>6} {r['n']:>6} {r['k']:>6} {layout:>6} "
              f"{r['relora_gflops']:>15.1f} {r['torch_gflops']:>14.1f} "
              f"{r['torch_ms'] / r['relora_ms']:>12.2f}x")
    for mode, key in (("full", "per_full_step"), ("adapter phase", "per_relora_step")):
        rel = sum(r[key] * r["relora_ms"] for r in rows)
        tor = sum(r[key] * r["torch_ms"] for r in rows)
        print(f"{mode}: matmul ms per step relora {rel:.1f}, torch {tor:.1f}, "
              f"relora speed / torch {tor / rel:.2f}x")
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps({"args": vars(a), "products": rows}, indent=1))


if __name__ == "__main__":
    main()
