"""Saves a tiny random Llama with transformers, plus reference logits, for relora's import tests.

usage: make_tiny_llama.py OUT_DIR [--dtype float32|bfloat16|float16] [--max-shard-size SIZE]
                          [--tie] [--seed N]

OUT_DIR gets what `save_pretrained` writes (config.json, model.safetensors or shards + index) and
`reference.safetensors` with `input_ids` (int64) and `logits` (float32) of the saved model, reloaded
in float32. Norm weights are randomised too, so an import that drops them is caught.
"""

import argparse
import os

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-shard-size", default=None)
    p.add_argument("--tie", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    torch.manual_seed(a.seed)
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=50000.0,
        tie_word_embeddings=a.tie,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if name.endswith("norm.weight"):
                prm.copy_(1.0 + 0.1 * torch.randn_like(prm))
            else:
                prm.copy_(0.05 * torch.randn_like(prm))
    model = model.to(getattr(torch, a.dtype))
    kwargs = {}
    if a.max_shard_size:
        kwargs["max_shard_size"] = a.max_shard_size
    model.save_pretrained(a.out, **kwargs)

    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(a.seed + 1))
    # Reload from disk in float32: converting the in-memory model back would keep its rotary
    # table at the reduced precision it was cast to.
    saved = LlamaForCausalLM.from_pretrained(a.out, dtype=torch.float32)
    with torch.no_grad():
        logits = saved(input_ids=ids).logits
    save_file(
        {"input_ids": ids.contiguous(), "logits": logits.contiguous()},
        os.path.join(a.out, "reference.safetensors"),
    )


if __name__ == "__main__":
    main()
