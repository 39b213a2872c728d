"""How long should a mini-sequence be? Memory from XLA and prefill time on this CPU, per chunk length.

Memory: XLA's compiled `mom` prefill for the llama-3.1-8b preset at 131072 tokens (float32, abstract
inputs), non-weight device bytes per chunk length. The chunk only sizes the per-chunk temporaries
(C x (3F + HE)); the whole-sequence part (residual stream and one layer's K/V) does not depend on it.

Time: `mom` prefill of a mid-size random model (hidden 512, 4 layers, ffn 1536) on a 8192-token prompt,
chunk lengths interleaved in rounds, medians. Short chunks pay per-chunk overhead (loop steps, small
matmuls); long chunks pay memory. The rule that sets DEFAULT_MINISEQUENCE is `RULE` below.

Measured on the project's 2-core CPU (results/minisequence_size.json): prefill time is flat, 5.46-5.70 s
for chunks of 512 to 8192 tokens; memory at 128k grows from 5.96 GiB (512) to 6.14 (2048), 6.50 (4096) and
8.66 GiB (16384). The rule picks 2048. The paper's fixed 4096 costs 9% more memory here for no speed.

    python benchmarks/minisequence_size.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

import momjax
from momjax.generation import bucket_length, left_pad, prefill_fn
from momjax.memory import memory_report
from momjax.params import init_random

CHUNKS = (512, 1024, 2048, 4096, 8192, 16384)
HERE = os.path.dirname(os.path.abspath(__file__))


def memory_by_chunk(seq_len=131072):
    out = {}
    for c in CHUNKS:
        policy = momjax.POLICIES["mom"].replace(minisequence=c, name=f"mom-{c}")
        r = memory_report("llama-3.1-8b", seq_len, policy)
        out[c] = r["device_bytes"] - r["weight_bytes"]
    return out


def time_by_chunk(rounds=3, seq_len=8192):
    cfg = momjax.Config(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_layers=4, num_heads=8,
                        num_kv_heads=4, head_dim=64, max_position_embeddings=seq_len)
    params = init_random(cfg, dtype="float32")
    tokens, start = left_pad([list(range(1, seq_len + 1))], bucket_length(seq_len, momjax.POLICIES["mom"]))
    tokens, start = jnp.asarray(tokens % cfg.vocab_size), jnp.asarray(start)
    chunks = [c for c in CHUNKS if c <= seq_len]
    policies = {c: momjax.POLICIES["mom"].replace(minisequence=c, name=f"mom-{c}") for c in chunks}
    for p in policies.values():  # compile outside the timing
        jax.block_until_ready(prefill_fn(params, tokens, start, cfg, p))
    times = {c: [] for c in chunks}
    for _ in range(rounds):
        for c, p in policies.items():
            t = time.perf_counter()
            jax.block_until_ready(prefill_fn(params, tokens, start, cfg, p))
            times[c].append(time.perf_counter() - t)
    return {c: statistics.median(v) for c, v in times.items()}


RULE = ("among chunks whose prefill time is within 5% of the fastest, the largest whose non-weight device memory "
        "at 128k is within 5% of the smallest chunk's (larger chunks keep GPU matmuls large)")


def choose(mem: dict, secs: dict) -> int:
    fast = [c for c, t in secs.items() if t <= 1.05 * min(secs.values())]
    lean = [c for c in fast if mem[c] <= 1.05 * min(mem.values())]
    return max(lean or fast)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "minisequence_size.json"))
    args = ap.parse_args()
    mem = memory_by_chunk()
    secs = time_by_chunk(args.rounds)
    chosen = choose(mem, secs)
    print(f"{'chunk':>7} {'non-weight device (8B, 128k, f32)':>36} {'prefill s (8k, CPU)':>20}")
    for c in CHUNKS:
        t = f"{secs[c]:.3f}" if c in secs else "-"
        print(f"{c:>7} {mem[c] / 2**30:>32.2f} GiB {t:>20}")
    print(f"rule: {RULE}\nchosen: {chosen}; default in momjax: {momjax.policy.DEFAULT_MINISEQUENCE}")
    result = {
        "command": "python benchmarks/minisequence_size.py",
        "machine": f"{platform.machine()} {os.cpu_count()} cores, jax {jax.__version__} {jax.default_backend()}",
        "memory_nonweight_device_bytes_llama_3_1_8b_131072_f32": {str(c): v for c, v in mem.items()},
        "prefill_median_s_8192_tokens_hidden512_4layers": {str(c): v for c, v in secs.items()},
        "rule": RULE,
        "chosen": chosen,
        "default": momjax.policy.DEFAULT_MINISEQUENCE,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
