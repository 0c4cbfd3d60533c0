#!/usr/bin/env python3
"""The PyTorch side of `relora bench`: the same LLaMA configuration through transformers'
LlamaForCausalLM (plus peft LoRA on the seven projections, with embeddings, norms and lm_head
trainable) and AdamW, timed the same way, printing the same JSON fields as `relora bench --single`.

Usage: torch_reference.py --preset small --mode full|lora|relora --seq-len 128 --batch-size 8
       [--rank 32] [--steps 10] [--warmup 2] [--threads N] [--device cpu|cuda] [--dtype f32|bf16]
       [--attn eager|sdpa]
       torch_reference.py --matmuls PRODUCTS.json [--steps 10] [--threads N]
         (times torch.mm on the products `relora bench --matmuls --json` wrote, same layouts)
"""
import argparse
import json
import resource
import statistics
import time

import torch

# hidden, intermediate, heads, kv heads, layers (vocab follows the byte tokenizer: 258)
PRESETS = {
    "tiny": (64, 172, 4, 2, 2),
    "small": (256, 688, 8, 8, 4),
    "60m": (512, 1376, 8, 8, 8),
    "130m": (768, 2048, 12, 12, 12),
    "250m": (768, 2560, 16, 16, 24),
    "350m": (1024, 2736, 16, 16, 24),
    "1b": (2048, 5461, 32, 32, 24),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def time_products(a):
    """Each product of the file timed alone: the median of --steps products after two untimed
    ones, the output allocated each time, operands stored as relora's trainer stores them."""
    doc = json.load(open(a.matmuls))
    g = torch.Generator().manual_seed(0)

    def operand(rows, cols, transposed):
        shape = (cols, rows) if transposed else (rows, cols)
        t = torch.randn(shape, generator=g, dtype=torch.float32).to(a.device)
        return t.t() if transposed else t

    out = []
    with torch.no_grad():
        for prod in doc["products"]:
            x = operand(prod["m"], prod["k"], prod["a_transposed"])
            y = operand(prod["k"], prod["n"], prod["b_transposed"])
            times = []
            for rep in range(max(a.steps, 1) + 2):
                t0 = time.perf_counter()
                c = torch.mm(x, y)
                if a.device.startswith("cuda"):
                    torch.cuda.synchronize()
                if rep >= 2:
                    times.append((time.perf_counter() - t0) * 1e3)
                del c
            out.append(dict(prod, ms=statistics.median(times)))
    print(json.dumps({"engine": "torch " + torch.__version__, "products": out}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small")
    p.add_argument("--mode", default="full", choices=["full", "lora", "relora"])
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    p.add_argument("--vocab", type=int, default=258)
    p.add_argument("--attn", default="eager", choices=["eager", "sdpa"],
                   help="transformers attention implementation (eager: the plain matmul-softmax path)")
    p.add_argument("--matmuls", default=None,
                   help="time torch.mm on the products of this `relora bench --matmuls --json` file")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.matmuls:
        time_products(a)
        return
    from transformers import LlamaConfig, LlamaForCausalLM

    h, i, nh, kv, layers = PRESETS[a.preset]
    cfg = LlamaConfig(
        vocab_size=a.vocab, hidden_size=h, intermediate_size=i, num_attention_heads=nh,
        num_key_value_heads=kv, num_hidden_layers=layers, max_position_embeddings=max(1024, a.seq_len),
        rms_norm_eps=1e-6, tie_word_embeddings=False, attn_implementation=a.attn,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(a.device)
    if a.mode != "full":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=a.rank, lora_alpha=a.rank, target_modules=TARGETS, lora_dropout=0.0,
                          modules_to_save=None)
        model = get_peft_model(model, lcfg)
        # ReLoRA keeps embeddings, norms and lm_head full-rank and trainable.
        for n, prm in model.named_parameters():
            if "lora_" in n or "embed_tokens" in n or "norm" in n or "lm_head" in n:
                prm.requires_grad_(True)
    params = [q for q in model.parameters() if q.requires_grad]
    decay = [q for q in params if q.dim() >= 2]
    no_decay = [q for q in params if q.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.0}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    g = torch.Generator().manual_seed(1)
    autocast = a.dtype == "bf16"

    def sync():
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()

    times, fwd, bwd, optm = [], [], [], []
    for step in range(a.warmup + a.steps):
        ids = torch.randint(0, a.vocab, (a.batch_size, a.seq_len + 1), generator=g).to(a.device)
        sync()
        t0 = time.perf_counter()
        with torch.autocast(device_type="cuda" if a.device.startswith("cuda") else "cpu",
                            dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=ids[:, :-1], labels=None)
            loss = torch.nn.functional.cross_entropy(out.logits.float().reshape(-1, a.vocab), ids[:, 1:].reshape(-1))
        sync()
        t1 = time.perf_counter()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        sync()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        if step >= a.warmup:
            times.append((t3 - t0) * 1e3)
            fwd.append((t1 - t0) * 1e3)
            bwd.append((t2 - t1) * 1e3)
            optm.append((t3 - t2) * 1e3)
    med = statistics.median(times)
    tokens = a.batch_size * a.seq_len
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    result = {
        "mode": a.mode,
        "engine": "torch " + torch.__version__ + " " + a.attn,
        "tokens_per_step": tokens,
        "median_step_ms": med,
        "min_step_ms": min(times),
        "tokens_per_s": tokens / (med / 1e3),
        "tokens_per_s_amortised": tokens / (med / 1e3),
        "forward_ms": statistics.median(fwd),
        "backward_ms": statistics.median(bwd),
        "optimizer_ms": statistics.median(optm),
        "trainable_params": sum(q.numel() for q in params),
        "peak_rss_mib": peak,
    }
    if a.device.startswith("cuda"):
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(result))


if __name__ == "__main__":
    main()
