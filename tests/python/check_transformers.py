"""Loads a relora export with transformers and compares it with relora's own forward pass.

usage: check_transformers.py MODEL_DIR REFERENCE.safetensors [--rtol R] [--dtype float32|bfloat16|float16]
                             [--tokenizer-check CHECK.json]

REFERENCE.safetensors holds `input_ids` (int64 [batch, seq]) and `logits` (float32
[batch, seq, vocab]) from relora. The model must load with no missing, unexpected or mismatched
keys (transformers silently initialises missing tensors at random, so this is checked
explicitly). The logits must agree within R, measured as max |ours - theirs| / max |ours|.
CHECK.json, when given, is {"cases": [{"text": str, "ids": [int]}], "vocab_size": int}: the
tokenizer must encode each text to exactly those ids (no special tokens added) and decode them
back to the text.

Prints one JSON line with the measurements; exits 1 on any failure.
"""

import argparse
import json
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("reference")
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tokenizer-check")
    a = p.parse_args()

    failures = []
    dtype = getattr(torch, a.dtype)
    model, info = AutoModelForCausalLM.from_pretrained(
        a.model_dir, dtype=dtype, output_loading_info=True
    )
    model.eval()
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        found = list(info.get(key, []))
        if found:
            failures.append(f"{key}: {found[:5]}")
    if model.dtype != dtype:
        failures.append(f"loaded as {model.dtype}, expected {dtype}")

    ref = load_file(a.reference)
    ids = ref["input_ids"].to(torch.long)
    ours = ref["logits"].to(torch.float64)
    with torch.no_grad():
        theirs = model(input_ids=ids).logits.to(torch.float64)
    if theirs.shape != ours.shape:
        failures.append(f"logits shape {tuple(theirs.shape)} vs {tuple(ours.shape)}")
        rel = float("inf")
        max_abs = float("inf")
    else:
        diff = (theirs - ours).abs()
        max_abs = diff.max().item()
        rel = max_abs / max(ours.abs().max().item(), 1e-30)
        if not rel <= a.rtol:
            failures.append(f"logits differ: max relative difference {rel:.3e} > {a.rtol:.1e}")
    same_argmax = (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item() if theirs.shape == ours.shape else 0.0

    tok_cases = 0
    if a.tokenizer_check:
        with open(a.tokenizer_check) as f:
            check = json.load(f)
        tok = AutoTokenizer.from_pretrained(a.model_dir)
        if "vocab_size" in check and len(tok) != check["vocab_size"]:
            failures.append(f"tokenizer has {len(tok)} tokens, expected {check['vocab_size']}")
        for case in check["cases"]:
            got = tok(case["text"], add_special_tokens=False)["input_ids"]
            if got != case["ids"]:
                failures.append(f"encode({case['text']!r}) = {got[:12]}..., expected {case['ids'][:12]}...")
            back = tok.decode(case["ids"], skip_special_tokens=True)
            if back != case["text"]:
                failures.append(f"decode gave {back!r}, expected {case['text']!r}")
            tok_cases += 1

    print(json.dumps({
        "model_dir": a.model_dir,
        "dtype": a.dtype,
        "max_abs_diff": max_abs,
        "max_rel_diff": rel,
        "argmax_agreement": same_argmax,
        "tokenizer_cases": tok_cases,
        "failures": failures,
    }))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
