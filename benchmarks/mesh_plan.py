"""Long contexts on several GPUs: the longest context each policy fits for a 70B model split tensor-parallel over
2, 4 and 8 H100s (and Llama-3.1-8B on 1 and 2), and the predicted decode speed at 128k tokens.

For each configuration: `momjax.plan(..., devices=N, target="h100")` with 80 GiB per GPU and 1 TiB of host
memory (all GPUs' together) gives each policy's longest context from the closed-form estimate, and the decode
step's roofline at 131,072 tokens for the policies that fit there. Then each policy's answer is checked against
the programs XLA's GPU compiler builds for N H100s in one host (topology 1x1xN, deviceless): prefill and decode
compiled at that length, each device's bytes within 80 GiB ("confirmed"), or the length the compiled programs
do fit when the estimate was too hopeful (bisected down).

Decode speed is a roofline, predicted, not measured: each GPU reads its share of the weights and of the K/V at
3.35 TB/s (H100 SXM datasheet), streams its share of host-resident K/V over its own PCIe 5.0 x16 link (63 GB/s
per direction), and sends its part of the two all-reduces per layer over NVLink 4 at 450 GB/s per direction
(NVIDIA H100 datasheet: 900 GB/s total). The all-reduces' latency (a few microseconds each, 160 per token for
an 80-layer model) is not counted.

    pip install 'momjax[gpu-plan]'
    python benchmarks/mesh_plan.py            # about 10 minutes on 2 CPU cores

Writes benchmarks/results/mesh_plan.json and mesh_plan.png.
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from provenance import git_state  # noqa: E402

GiB = 2**30
CONFIGS = [("llama-3.1-8b", 1), ("llama-3.1-8b", 2), ("llama-3.1-70b", 2), ("llama-3.1-70b", 4),
           ("llama-3.1-70b", 8), ("qwen2.5-72b", 8)]
CONTEXT = 131072
POLICIES = ("baseline", "mom", "mom-stream")


def compiled_fit(model, n, policy, length, hbm, host) -> tuple[int, dict]:
    """The longest length (<= length, to 1024 tokens) whose prefill and decode compiled for n H100s fit hbm per
    device and host in all, and those programs' figures."""
    def measure(at):
        out = {}
        for phase in ("prefill", "decode"):
            r = memory.memory_report(model, at, policy, dtype="bfloat16", phase=phase, target="h100", devices=n)
            out[phase] = dict(device_gib=r["device_bytes"] / GiB, host_gib=r["host_bytes"] / GiB)
            if r["device_bytes"] > hbm or r["host_bytes"] > host:
                return False, out
        return True, out

    ok, figures = measure(length)
    if ok:
        return length, figures
    lo, hi = 0, length
    while hi - lo > max(1024, length // 100):
        mid = (lo + hi) // 2 // 1024 * 1024
        ok, f = measure(mid)
        lo, hi, figures = (mid, hi, f) if ok else (lo, mid, figures)
    return lo, figures


def row(model, n, log) -> dict:
    hbm, host = 80 * GiB, 2**40
    t0 = time.perf_counter()
    result = momjax.plan(model, hbm, host, dtype="bfloat16", target="h100", source="estimate", devices=n,
                         context=CONTEXT) if _fits_weights(model, n) else None
    out = dict(model=model, devices=n, weight_gib_per_device=momjax.params.param_bytes(
        momjax.preset(model), "bfloat16", n) / GiB)
    if result is None:
        out["fits"] = False
        return out
    out.update(fits=True, estimate=result["max_context"], limits=result["limits"], compiled={}, decode={})
    for policy in POLICIES:
        n_est = result["max_context"][policy]
        if n_est:
            n_ok, figures = compiled_fit(model, n, policy, n_est, hbm, host)
            out["compiled"][policy] = dict(max_context=n_ok, confirmed=n_ok == n_est, at_that_length=figures)
    for name, c in result["decode"].items():
        if c["fits"]:
            out["decode"][name] = dict(tokens_per_s=c["decode_tokens_per_s"], kv_device_layers=c["kv_device_layers"],
                                       interconnect_ms=1e3 * c["interconnect_s"], device_ms=1e3 * c["device_s"],
                                       link_ms=1e3 * c["link_s"])
    out["recommended"] = result["recommended"]["policy"]
    log(f"{model} on {n} H100: estimate {result['max_context']}, compiled "
        f"{ {p: c['max_context'] for p, c in out['compiled'].items()} } ({time.perf_counter() - t0:.0f} s)")
    return out


def _fits_weights(model, n) -> bool:
    return momjax.params.param_bytes(momjax.preset(model), "bfloat16", n) < 80 * GiB


def plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']}\n{r['devices']}x H100" for r in rows]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.27
    for i, policy in enumerate(POLICIES):
        values = [r["compiled"].get(policy, {}).get("max_context", 0) / 1e6 if r["fits"] else 0 for r in rows]
        ax.bar([x + (i - 1) * width for x in range(len(rows))], values, width, label=policy)
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("longest context (million tokens)")
    ax.set_title("Longest context per policy, 80 GiB per GPU and 1 TiB host memory, bf16\n(programs compiled "
                 "for N H100s by XLA's GPU compiler, deviceless: predicted, not measured)", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    rows = [row(model, n, log) for model, n in CONFIGS]
    results = dict(benchmark="mesh_plan", context=CONTEXT, hbm_gib=80, host_tib=1, dtype="bfloat16", rows=rows,
                   target="h100", interconnect="NVLink 4, 450 GB/s per direction (NVIDIA H100 SXM datasheet: "
                                                "900 GB/s)", seconds=time.perf_counter() - t0,
                   machine=dict(platform=platform.platform(), cpus=os.cpu_count()), git=git_state())
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "mesh_plan.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(rows, os.path.join(HERE, "results", "mesh_plan.png"))
    log(f"wrote benchmarks/results/mesh_plan.json and .png ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
