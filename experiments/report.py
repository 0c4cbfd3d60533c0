#!/usr/bin/env python3
"""Summarises an experiment written by experiments/run.sh: a Markdown table of the held-out
scores of every arm (ratios to the full-rank arm), throughput, and a check that the arms sharing
the warm start trained on identical steps. Standard library only.

    experiments/report.py OUT_DIR ARMS_TSV [WARM_START_STEPS]
"""
import json
import math
import statistics
import sys
from pathlib import Path


def metrics(run: Path):
    with open(run / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def main() -> int:
    out, arms_tsv = Path(sys.argv[1]), Path(sys.argv[2])
    warm = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    arms = []
    for line in arms_tsv.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, mode, options = line.split("\t")
            arms.append((name, mode, "" if options == "-" else options))

    rows, missing = [], []
    for name, mode, options in arms:
        score_file = out / name / "heldout.json"
        if not score_file.exists():
            missing.append(name)
            continue
        score = json.loads(score_file.read_text())
        recs = metrics(out / name)
        steps = [r for r in recs if "tokens_per_s" in r]
        # The ReLoRA-phase throughput is what the method makes cheaper: measure it after the
        # warm start where the arm has one.
        adapted = [r["tokens_per_s"] for r in steps if r.get("adapters")]
        full_rank = [r["tokens_per_s"] for r in steps if not r.get("adapters")]
        curve = [(r["step"], r["eval_loss"]) for r in recs if "eval_loss" in r]
        rows.append(
            dict(
                arm=name,
                mode=mode,
                options=options,
                loss=score["loss"],
                perplexity=score["perplexity"],
                tokens=score.get("tokens"),
                train_seconds=score.get("train_seconds"),
                commit=score.get("commit"),
                threads=score.get("threads"),
                tokens_per_s_adapted=statistics.median(adapted) if adapted else None,
                tokens_per_s_full_rank=statistics.median(full_rank) if full_rank else None,
                skipped=max((r.get("skipped_total", 0) for r in recs), default=0),
                best_eval=min((l for _, l in curve), default=math.nan),
                losses=[r["loss"] for r in steps],
            )
        )
    by = {r["arm"]: r for r in rows}
    full = by.get("full")

    print("| arm | mode | options | held-out loss (nats/byte) | perplexity | ppl / full | tokens/s (adapter phase) | train time |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['perplexity'] / full['perplexity']:.3f}" if full else "-"
        tps = r["tokens_per_s_adapted"] or r["tokens_per_s_full_rank"]
        print(
            f"| {r['arm']} | {r['mode']} | {r['options'] or '-'} | {r['loss']:.4f} | "
            f"{r['perplexity']:.3f} | {ratio} | {tps:.0f} | {r['train_seconds']} s |"
        )
    if missing:
        print(f"\nNot finished: {', '.join(missing)}")

    if warm and full:
        same = []
        for r in rows:
            if r["arm"] != "full" and len(r["losses"]) >= warm:
                same.append((r["arm"], r["losses"][:warm] == full["losses"][:warm]))
        text = ", ".join(f"{a}: {'identical' if s else 'DIFFERENT'}" for a, s in same)
        print(f"\nTraining losses of the first {warm} steps compared with the full-rank arm: {text}")

    commits = sorted({r["commit"] for r in rows})
    threads = sorted({r["threads"] for r in rows})
    print(f"\nCommit(s): {', '.join(map(str, commits))}; threads per arm: {threads}")
    summary = [{k: v for k, v in r.items() if k != "losses"} for r in rows]
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
