"""Predicted decode speed against context length, per policy, on a GPU momjax has never run on.

For Llama-3.1-8B and Qwen2.5-7B in bfloat16 on an A100-80GB and an H100 (80 GiB device, 1 TiB host), at
128k, 512k, 1M and 2M tokens: the longest context each policy fits, the policy `momjax.plan` recommends at
that length (the fastest that fits, choosing how many layers' K/V stay on the device), and its predicted
decode tokens/s, with the exact K/V cache (bf16) and with int8 K/V.

What the speed is: a roofline (`momjax.memory.decode_speed`) of the bytes one decode step moves: device
memory reads at the GPU's bandwidth, host-to-device copies at its host link's (PCIe) bandwidth, the copies
overlapped with the reads as the compiled step issues them. The bytes come from the decode step compiled for
that GPU by XLA's GPU compiler, without a GPU (`memory_report(..., phase="decode", target=...)`); the bytes it
brings from the host come from the same step compiled on this machine (the deviceless compiler cannot be told
which arguments live in host memory). Predicted, not measured: no GPU was used. Beside them, figures other
people measured on GPUs: HeadInfer (Llama-3-8B on an RTX 4090: 0.66 and 6.41 s per token, the latter at
1M tokens) and the MOM paper (11.6 tokens/s at 144k tokens on an A100 80GB).

The plot draws each policy's predicted speed against context from the closed-form estimate (instant, many
points), with the compiled-program figures at the table's lengths as markers.

    pip install 'momjax[gpu-plan]'
    python benchmarks/decode_speed_vs_context.py            # about 15 minutes on 2 CPU cores
    python benchmarks/decode_speed_vs_context.py --quick    # estimate only, one model and target

Writes benchmarks/results/decode_speed_vs_context.json and decode_speed_vs_context.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import momjax
from momjax import memory
from momjax.memory.plan import fits, most_resident

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from provenance import git_state

RESULTS = os.path.join(HERE, "results")
MODELS = ("llama-3.1-8b", "qwen2.5-7b")
TARGETS = ("a100-80gb", "h100")
CONTEXTS = (131072, 524288, 1048576, 2097152)
HOST = "1TiB"
DTYPE = "bfloat16"
STREAM = momjax.POLICIES["mom-stream"]

# Measured by others on GPUs, as their papers report them.
OTHERS = {
    "HeadInfer (arXiv 2502.12574), Llama-3-8B, RTX 4090 24GB, measured": {
        "seconds_per_token": [0.66, 6.41], "note": "6.41 s per token at 1M tokens"},
    "MOM (arXiv 2504.12526), Llama-3-8B, A100 80GB, measured": {"decode_tokens_per_s": {"144k": 11.6}},
}


def curve_policies(cfg) -> dict:
    """The policies drawn in the plot: each placement, exact and int8."""
    L = cfg.num_layers
    out = {}
    for kv in (None, "int8"):
        tag = "" if kv is None else " int8"
        out["mom" + tag] = momjax.POLICIES["mom"].replace(kv_dtype=kv)
        out["mom-stream (all streamed)" + tag] = STREAM.replace(kv_dtype=kv)
        out["mom-stream (most resident)" + tag] = STREAM.replace(kv_dtype=kv, kv_device_layers=L)
    return out


def estimated_curve(name, policy, target, lengths, hbm) -> list:
    """Predicted tokens/s from the estimate at each length where the policy fits (resident layers chosen)."""
    points = []
    for n in lengths:
        p = policy
        if policy.kv_device_layers:
            p = most_resident(memory.resolve(name), n, STREAM.replace(kv_dtype=policy.kv_dtype), DTYPE,
                                      hbm, memory.parse_bytes(HOST), memory.DEFAULT_NEW_TOKENS, "estimate", None)
        if not fits(memory.resolve(name), n, p, DTYPE, hbm, memory.parse_bytes(HOST),
                            memory.DEFAULT_NEW_TOKENS, memory.estimate):
            continue
        step = memory.estimate(name, n, p, DTYPE, "decode")
        points.append({"seq_len": n, "kv_device_layers": p.kv_device_layers,
                       **memory.decode_speed(step, target)})
    return points


def table_row(name, target, context, kv_dtype, log) -> dict:
    """The recommendation at one context, and its speed from the decode step compiled for the GPU."""
    plan = memory.plan(name, None, HOST, dtype=DTYPE, source="estimate", target=target, kv_dtype=kv_dtype,
                       context=context)
    rec = plan["recommended"]
    policy = momjax.get_policy(rec["policy"]).replace(kv_dtype=rec["kv_dtype"],
                                                      kv_device_layers=rec["kv_device_layers"])
    t0 = time.perf_counter()
    step = memory.memory_report(name, context, policy, DTYPE, "decode", target=target)
    seconds = time.perf_counter() - t0
    speed = memory.decode_speed(step, target)
    fits = step["device_bytes"] <= plan["hbm_bytes"]
    row = {"model": name, "target": target, "context": context, "kv_dtype_allowed": kv_dtype,
           "max_context": plan["max_context"], "recommended": {k: rec[k] for k in ("policy", "kv_dtype",
                                                                                     "kv_device_layers")},
           "estimate_decode_tokens_per_s": rec["decode_tokens_per_s"],
           "compiled": {k: step[k] for k in ("device_bytes", "host_bytes", "temp_bytes", "host_to_device_bytes",
                                             "device_read_bytes", "source")},
           "compiled_fits_device": fits, "compile_s": round(seconds, 1), **speed}
    log(f"  {name:<13}{target:<10}{context:>9,}  {'int8 allowed' if kv_dtype else 'exact       '}  "
        f"{rec['policy']:<11}{rec['kv_dtype'] or 'bf16':<5}N={rec['kv_device_layers']}  "
        f"{speed['decode_tokens_per_s']:7.2f} tok/s (estimate {rec['decode_tokens_per_s']:.2f})  "
        f"device {step['device_bytes'] / 2**30:.2f} GiB{'' if fits else ' OVER'}  [{seconds:.0f} s]")
    return row


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = results["curves"]
    keys = [(m, t) for m in curves for t in curves[m]]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4.2), squeeze=False)
    styles = {"mom": ("tab:blue", "-"), "mom-stream (all streamed)": ("tab:green", "-"),
              "mom-stream (most resident)": ("tab:purple", "-")}
    for ax, (model, target) in zip(axes[0], keys):
        for label, points in curves[model][target].items():
            base = label.replace(" int8", "")
            color, _ = styles[base]
            ls = "--" if label.endswith("int8") else "-"
            width = 3.5 if base == "mom" else 1.5  # mom lies under "most resident" where both fit: draw it wider
            if points:
                ax.plot([p["seq_len"] for p in points], [p["decode_tokens_per_s"] for p in points], ls, color=color,
                        label=label, linewidth=width, alpha=0.6 if base == "mom" else 1.0)
        for row in results["table"]:
            if row["model"] == model and row["target"] == target:
                ax.plot(row["context"], row["decode_tokens_per_s"], "o" if row["kv_dtype_allowed"] else "s",
                        color="black", markersize=4)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("predicted decode tokens/s")
        ax.set_title(f"{model} bf16 on {target}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Predicted decode speed, a roofline of the decode step's bytes (no GPU used)\nlines: estimate; "
                 "markers: the recommended policy compiled for the GPU, deviceless (circle: int8 allowed)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="estimate only, llama-3.1-8b on an A100-80GB")
    ap.add_argument("--out", default=os.path.join(RESULTS, "decode_speed_vs_context.json"))
    args = ap.parse_args(argv)
    models, targets = (MODELS[:1], TARGETS[:1]) if args.quick else (MODELS, TARGETS)
    lengths = [int(2 ** (14 + i / 4)) // 1024 * 1024 for i in range(33)]  # 16k .. 4M, four points per doubling
    results = {"what": "predicted decode tokens/s (roofline of compiled decode-step bytes), not measured",
               "dtype": DTYPE, "host_budget": HOST, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
               "jax": __import__("jax").__version__, **git_state(), "others_measured": OTHERS,
               "curves": {}, "table": []}
    t0 = time.perf_counter()
    for model in models:
        results["curves"][model] = {}
        for target in targets:
            hbm = momjax.targets.get(target).memory_bytes
            cfg = memory.resolve(model)
            results["curves"][model][target] = {
                label: estimated_curve(model, p, target, lengths, hbm) for label, p in curve_policies(cfg).items()}
            if args.quick:
                continue
            for context in CONTEXTS:
                for kv in (None, "int8"):
                    try:
                        results["table"].append(table_row(model, target, context, kv, print))
                    except ValueError as e:  # nothing fits this context
                        results["table"].append({"model": model, "target": target, "context": context,
                                                 "kv_dtype_allowed": kv, "error": str(e)})
                        print(f"  {model} {target} {context:,} {kv}: {e}")
    results["seconds"] = round(time.perf_counter() - t0, 1)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    png = os.path.splitext(args.out)[0] + ".png"
    plot(results, png)
    print(f"wrote {args.out} and {png} in {results['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
