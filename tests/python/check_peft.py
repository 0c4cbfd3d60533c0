"""Loads a relora PEFT export with peft, merges it, and compares with relora's own merge.

usage: check_peft.py PEFT_DIR MERGED.safetensors [--rtol R]

PEFT_DIR is the output of `relora-convert peft` (adapter files + base/); MERGED.safetensors the
output of `relora-convert merge` of the same checkpoint. The base must load with no missing or
unexpected keys, every adapter tensor must arrive in the PEFT model unchanged, and after
`merge_and_unload()` every weight must equal relora's within R (max |diff| / max |relora|, per
tensor). Prints one JSON line; exits 1 on any failure.
"""

import argparse
import json
import os
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("peft_dir")
    p.add_argument("merged")
    p.add_argument("--rtol", type=float, default=1e-6)
    a = p.parse_args()

    failures = []
    base, info = AutoModelForCausalLM.from_pretrained(
        os.path.join(a.peft_dir, "base"), dtype=torch.float32, output_loading_info=True
    )
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        if list(info.get(key, [])):
            failures.append(f"base {key}: {list(info[key])[:5]}")
    model = PeftModel.from_pretrained(base, a.peft_dir)
    params = dict(model.named_parameters())
    adapter = load_file(os.path.join(a.peft_dir, "adapter_model.safetensors"))
    for name, t in adapter.items():
        live = name.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight"
        )
        if live not in params:
            failures.append(f"adapter tensor {name} was not loaded")
        elif not torch.equal(params[live].detach().to(t.dtype), t):
            failures.append(f"adapter tensor {name} changed on load")

    merged = model.merge_and_unload().state_dict()
    ours = load_file(a.merged)
    worst = 0.0
    worst_name = None
    for name, t in ours.items():
        if name not in merged:
            failures.append(f"{name} missing after merge_and_unload")
            continue
        d = (merged[name].to(torch.float64) - t.to(torch.float64)).abs().max().item()
        r = d / max(t.abs().max().item(), 1e-30)
        if r > worst:
            worst, worst_name = r, name
    extra = [n for n in merged if n not in ours and not n.endswith("inv_freq")]
    if extra:
        failures.append(f"unexpected tensors after merge: {extra[:5]}")
    if not worst <= a.rtol:
        failures.append(f"{worst_name}: max relative difference {worst:.3e} > {a.rtol:.1e}")
    print(json.dumps({
        "adapter_tensors": len(adapter),
        "compared_tensors": len(ours),
        "max_rel_diff": worst,
        "worst_tensor": worst_name,
        "failures": failures,
    }))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
