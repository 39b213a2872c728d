"""Where a CPU decode step's time goes, against this machine's memory-bandwidth roofline.

Model: the `momjax bench` Llama (hidden 512, 8 layers, 8 query / 4 KV heads, ffn 1536, vocab 8192, float32,
random weights), a 512-token prompt, 48 greedy new tokens with `mom`. In each round, one after the other in
this one process:

1. decode: `momjax.generate`'s decode time (47 steps);
2. the bandwidth probe of `momjax bench` (a sum over a 256 MiB array, best of 10);
3. products: a program doing only the step's matrix-vector products over the model's weights, as decode
   computes them (`momjax.bench.MatvecOnly`);
4. products + attention: the same with decode's attention over the prompt's real K/V cache in every layer.

The roofline is the round's bandwidth over the bytes a step must read (every weight once, one embedding row,
the K/V of the 536-token average context). From the medians of the per-round step times: the products' time,
attention's time (4 minus 3) against what reading its K/V at the measured bandwidth would take, and the rest
of the step (1 minus 4: norms, rope, the tail writes, sampling, and the runtime's gaps between operations).

    python benchmarks/decode_breakdown.py [--rounds 9]

Writes benchmarks/results/decode_breakdown.json and .png. Needs no torch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys

import jax
import numpy as np

import momjax
from momjax import bench
from momjax.cache import place_for_decode
from momjax.hf.config import from_hf
from momjax.params import init_random
from momjax.policy import get_policy

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPT_TOKENS, NEW_TOKENS = bench.PROMPT_TOKENS, bench.NEW_TOKENS
# The `momjax bench` model, read from the same Hugging Face config it builds.
CONFIG = from_hf({**bench.MODEL, "model_type": "llama", "architectures": ["LlamaForCausalLM"]})


def decode_cache(model, prompt):
    """The `mom` cache of the prompt, on the device, with a tail of NEW_TOKENS - 1 tokens, as decode reads it."""
    _, cache = momjax.prefill(model, prompt[None], policy="mom")
    return place_for_decode(cache, get_policy("mom")).with_tail(NEW_TOKENS - 1)


def measure(model, rounds: int, log, prompt_tokens: int = PROMPT_TOKENS) -> dict:
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, model.config.vocab_size, prompt_tokens)
    steps = NEW_TOKENS - 1

    def decode():
        gen = momjax.generate(model, prompt[None], NEW_TOKENS, policy="mom", stop_tokens=[])
        return gen.decode_s / steps

    log("compiling: decode, the bandwidth probe, products, products + attention")
    decode()
    bandwidth = bench.Bandwidth()
    products = bench.MatvecOnly(model, steps)
    with_attention = bench.MatvecOnly(model, steps, cache=decode_cache(model, prompt))
    step_bytes = bench.decode_bytes(model, prompt_tokens + NEW_TOKENS // 2)
    per_round = {k: [] for k in ("decode_s", "bandwidth", "products_s", "products_attention_s")}
    for r in range(rounds):
        per_round["decode_s"].append(decode())
        per_round["bandwidth"].append(bandwidth.measure()["bytes_per_s"])
        per_round["products_s"].append(1 / products.tokens_per_s())
        per_round["products_attention_s"].append(1 / with_attention.tokens_per_s())
        log(f"  round {r + 1}/{rounds}: decode {1 / per_round['decode_s'][-1]:.0f} tok/s, products "
            f"{1 / per_round['products_s'][-1]:.0f}, products + attention {1 / per_round['products_attention_s'][-1]:.0f}, "
            f"bandwidth {per_round['bandwidth'][-1] / 1e9:.1f} GB/s; load average {os.getloadavg()[0]:.1f}")
    med = {k: statistics.median(v) for k, v in per_round.items()}
    roofline_s = [step_bytes["bytes_per_token"] / b for b in per_round["bandwidth"]]
    fractions = {
        name: statistics.median(r / t for r, t in zip(roofline_s, per_round[key]))
        for name, key in (("decode", "decode_s"), ("products", "products_s"),
                          ("products_attention", "products_attention_s"))
    }
    ms = lambda s: round(s * 1e3, 3)
    breakdown = {
        "roofline": ms(statistics.median(roofline_s)),
        "products": ms(med["products_s"]),
        "attention": ms(med["products_attention_s"] - med["products_s"]),
        "attention_kv_at_bandwidth": ms(step_bytes["kv_bytes"] / med["bandwidth"]),
        "rest": ms(med["decode_s"] - med["products_attention_s"]),
        "decode": ms(med["decode_s"]),
    }
    return {"per_round": per_round, "median": med, "step": step_bytes, "fraction_of_roofline": fractions,
            "step_ms": breakdown}


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = result["step_ms"]
    fig, ax = plt.subplots(figsize=(8, 2.6))
    ax.barh(1, b["roofline"], color="#999999", label="roofline (bytes / bandwidth)")
    left = 0.0
    for key, label, color in (("products", "matrix-vector products", "#4c72b0"),
                              ("attention", "attention", "#dd8452"), ("rest", "everything else", "#55a868")):
        ax.barh(0, b[key], left=left, color=color, label=label)
        left += b[key]
    ax.axvline(b["roofline"] / 0.9, color="black", linestyle="--", linewidth=1, label="0.9 of the roofline")
    ax.set_yticks([0, 1], ["decode step", "roofline"])
    ax.set_xlabel("ms per decode step (medians)")
    ax.set_title("A CPU decode step against the bandwidth roofline (bench model, 536-token context)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "decode_breakdown.json"))
    args = parser.parse_args(argv)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)
    model = momjax.Model(config=CONFIG, params=init_random(CONFIG, seed=0, dtype="float32"))
    result = {"benchmark": "decode_breakdown", "config": CONFIG.to_json(), "rounds": args.rounds,
              "cpu_count": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__,
              **measure(model, args.rounds, log), "load_average_at_end": os.getloadavg()}
    b, f = result["step_ms"], result["fraction_of_roofline"]
    print(f"roofline {b['roofline']:.2f} ms per step ({result['step']['bytes_per_token'] / 1e6:.1f} MB at "
          f"{result['median']['bandwidth'] / 1e9:.1f} GB/s)")
    print(f"decode {b['decode']:.2f} ms = products {b['products']:.2f} + attention {b['attention']:.2f} "
          f"(its K/V at the bandwidth: {b['attention_kv_at_bandwidth']:.2f}) + rest {b['rest']:.2f}")
    print(f"fraction of the roofline: decode {f['decode']:.2f}, products alone {f['products']:.2f}, "
          f"products + attention {f['products_attention']:.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    plot(result, os.path.splitext(args.out)[0] + ".png")
    print(f"wrote {args.out} and its .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
