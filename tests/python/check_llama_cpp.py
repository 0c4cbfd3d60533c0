"""llama.cpp as a consumer of an exported model directory: its own converter
(convert_hf_to_gguf.py) turns the directory into GGUF, llama-cpp-python loads that file, and
its logits for the reference token ids must equal ours; its tokenizer must encode like ours.

usage: check_llama_cpp.py HF_DIR REFERENCE.safetensors --convert convert_hf_to_gguf.py
       [--rtol 1e-4] [--tokenizer-check cases.json]
Prints a JSON report as the last line: {"max_rel_diff": ..., "failures": [...]}.
"""
import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
from safetensors.numpy import load_file


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("reference")
    p.add_argument("--convert", required=True)
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--tokenizer-check")
    a = p.parse_args()
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        gguf = pathlib.Path(tmp) / "model.gguf"
        conv = subprocess.run(
            [sys.executable, a.convert, a.model_dir, "--outfile", str(gguf), "--outtype", "f32"],
            capture_output=True, text=True)
        if conv.returncode != 0 or not gguf.exists():
            print(conv.stdout[-4000:], conv.stderr[-4000:], file=sys.stderr)
            print(json.dumps({"max_rel_diff": None,
                              "failures": [f"convert_hf_to_gguf.py failed ({conv.returncode})"]}))
            return

        from llama_cpp import Llama

        ref = load_file(a.reference)
        ids, want = ref["input_ids"], ref["logits"]
        # The key/value cache in f32 (llama.cpp's default is f16, which alone moves the logits
        # by about 1e-4 relative) and no flash attention: the comparison is of the model.
        llm = Llama(model_path=str(gguf), n_ctx=max(64, ids.shape[1]), logits_all=True,
                    n_threads=2, verbose=False, type_k=0, type_v=0, flash_attn=False)
        if llm.n_vocab() != want.shape[-1]:
            failures.append(f"llama.cpp vocabulary {llm.n_vocab()}, ours {want.shape[-1]}")
        worst = 0.0
        for row, expect in zip(ids, want):
            llm.reset()
            llm.eval([int(t) for t in row])
            got = np.array(llm.scores[: len(row)], dtype=np.float64)
            scale = max(float(np.abs(expect).max()), 1e-12)
            worst = max(worst, float(np.abs(got - expect).max()) / scale)
        if not worst <= a.rtol:
            failures.append(f"logits differ by {worst:.3g} relative (allowed {a.rtol})")

        if a.tokenizer_check:
            cases = json.loads(pathlib.Path(a.tokenizer_check).read_text())["cases"]
            for c in cases:
                got = llm.tokenize(c["text"].encode("utf-8"), add_bos=False, special=False)
                if list(got) != c["ids"]:
                    failures.append(f"tokenize({c['text']!r}): {list(got)[:12]}... != {c['ids'][:12]}...")
    print(json.dumps({"max_rel_diff": worst, "failures": failures}))


if __name__ == "__main__":
    main()
