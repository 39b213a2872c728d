"""Long contexts on the GPUs people have, compiled for them without one: mom-host and weights in host memory.

Every figure is a prediction: XLA's GPU compiler run deviceless for the target (momjax.targets) gives the device
bytes of the very programs mom-host runs, the planner bisects the longest context with them, and speeds are
rooflines (decode: the step's bytes over the host link and device memory; prefill: FLOPs at the dense bf16 peak
against the bytes over the host link). HeadInfer's figures (arXiv 2502.12574, Llama-3-8B on an RTX 4090 with 1 TB
of host memory) were measured on the card; ours were not.

    python benchmarks/small_gpus.py          # about 10 minutes on a 2-core CPU; needs pip install 'momjax[gpu-plan]'

Writes benchmarks/results/small_gpus.json and small_gpus.png.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import momjax  # noqa: E402
from momjax.memory import estimate, memory_report, plan  # noqa: E402
from momjax.memory.plan import max_context, prefill_time  # noqa: E402

GIB, TIB = 2**30, 2**40
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
HEADINFER = {"context": [100_000, 1_000_000, 4_000_000], "s_per_token": [0.66, 6.41, 27.2]}  # measured, RTX 4090
HOST = momjax.POLICIES["mom-host"]


def longest(model, policy, hbm, host, target, weights="device"):
    """The longest context mom-host fits, bisected with programs compiled for the target (64k-token steps)."""
    t0 = time.perf_counter()
    n = max_context(momjax.preset(model), policy, hbm, host, "bfloat16", source="xla", target=target,
                    resolution=65536, weights=weights)
    return dict(max_context=n, seconds=round(time.perf_counter() - t0, 1))


def device_at(model, policy, n, target, weights="device"):
    r = {ph: memory_report(model, n, policy, dtype="bfloat16", phase=ph, target=target, weights=weights)
         for ph in ("prefill", "decode")}
    return dict(device_gib=max(x["device_bytes"] for x in r.values()) / GIB,
                host_gib=max(x["host_bytes"] for x in r.values()) / GIB)


def main() -> int:
    out = {"note": "predicted: programs compiled deviceless by XLA's GPU compiler; speeds are rooflines"}
    t0 = time.perf_counter()
    # 1. Llama-3.1-8B bf16 on an RTX 4090 (24 GB) with 2 TiB of host memory.
    r = out["rtx4090_8b"] = {}
    r["mom-host"] = longest("llama-3.1-8b", HOST, 24 * GIB, 2 * TIB, "rtx4090")
    r["mom-host int8"] = longest("llama-3.1-8b", HOST.replace(kv_dtype="int8"), 24 * GIB, 2 * TIB, "rtx4090")
    r["mom-stream (estimate)"] = dict(max_context=max_context(momjax.preset("llama-3.1-8b"), "mom-stream", 24 * GIB,
                                                              2 * TIB, "bfloat16"))
    r["device"] = {str(n): device_at("llama-3.1-8b", HOST, n, "rtx4090") for n in (131072, 4194304)}
    r["device_difference_gib"] = r["device"]["4194304"]["device_gib"] - r["device"]["131072"]["device_gib"]
    print("rtx4090 8B:", json.dumps(r), flush=True)
    # Decode at 1M tokens, int8 K/V, and prefill times.
    p = plan("llama-3.1-8b", 24 * GIB, 2 * TIB, kv_dtype="int8", context=1_000_000, target="rtx4090",
             source="estimate")
    d = p["decode"]["mom-host int8"]
    r["decode_1m_int8"] = dict(s_per_token=1 / d["decode_tokens_per_s"], kv_device_layers=d["kv_device_layers"],
                               minisequence=d["minisequence"], host_to_device_gib=d["host_to_device_bytes"] / GIB,
                               prefill_s=d["prefill_s"], prefill_bound=d["prefill_bound"],
                               headinfer_s_per_token=6.41)
    r["decode_vs_context"] = []
    for n in (131072, 262144, 524288, 1_000_000, 2_097_152, 4_194_304):
        q = plan("llama-3.1-8b", 24 * GIB, 2 * TIB, kv_dtype="int8", context=n, target="rtx4090", source="estimate")
        for kv in ("mom-host", "mom-host int8"):
            e = q["decode"][kv]
            r["decode_vs_context"].append(dict(context=n, policy=kv, s_per_token=1 / e["decode_tokens_per_s"],
                                               prefill_s=e["prefill_s"], minisequence=e["minisequence"],
                                               kv_device_layers=e["kv_device_layers"]))
    for n in (1_000_000, 4_194_304):
        for c in (2048, 8192, 32768):
            t = prefill_time(momjax.preset("llama-3.1-8b"), n, HOST.replace(minisequence=c), "bfloat16", "rtx4090")
            r.setdefault("prefill", []).append(dict(context=n, minisequence=c, **{k: t[k] for k in (
                "prefill_s", "prefill_compute_s", "prefill_link_s", "prefill_bound")}))
    print("rtx4090 decode/prefill:", json.dumps(r["decode_1m_int8"]), flush=True)
    # 2. Llama-3.1-8B bf16, weights in host memory, on a T4 (16 GB) with 1 TiB of host memory.
    t4 = out["t4_8b_host_weights"] = longest("llama-3.1-8b", HOST, 16 * GIB, TIB, "t4", weights="host")
    t4["device_at_1m"] = device_at("llama-3.1-8b", HOST, 1 << 20, "t4", weights="host")
    print("t4 8B host weights:", json.dumps(t4), flush=True)
    # 3. Llama-3.1-70B bf16, weights in host memory, on one A100 80GB with 1 TiB of host memory.
    a100 = out["a100_70b_host_weights"] = longest("llama-3.1-70b", HOST, 80 * GIB, TIB, "a100-80gb", weights="host")
    a100["device_at_1m"] = device_at("llama-3.1-70b", HOST, 1 << 20, "a100-80gb", weights="host")
    print("a100 70B host weights:", json.dumps(a100), flush=True)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "small_gpus.json"), "w") as f:
        json.dump(out, f, indent=2)
    plot(out)
    print(f"wrote {OUT}/small_gpus.json and small_gpus.png ({out['seconds']} s)")
    return 0


def plot(out) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    lengths = [2**k for k in range(15, 23)]
    cfg = "llama-3.1-8b"
    stream = [estimate(cfg, n, "mom-stream", dtype="bfloat16", phase="prefill")["device_bytes"] / GIB for n in lengths]
    host = [memory_report(cfg, n, HOST, dtype="bfloat16", phase="prefill", target="rtx4090")["device_bytes"] / GIB
            for n in lengths]
    ax1.plot(lengths, stream, "o-", label="mom-stream prefill (estimate)")
    ax1.plot(lengths, host, "s-", label="mom-host prefill (compiled for the RTX 4090)")
    ax1.axhline(24, color="k", ls="--", lw=1, label="RTX 4090: 24 GB")
    ax1.set(xscale="log", xlabel="context (tokens)", ylabel="device memory (GiB)",
            title="Llama-3.1-8B bf16: device memory vs context (predicted)")
    ax1.legend(fontsize=8)
    for kv, marker in (("mom-host", "s-"), ("mom-host int8", "^-")):
        rows = [x for x in out["rtx4090_8b"]["decode_vs_context"] if x["policy"] == kv]
        ax2.plot([x["context"] for x in rows], [x["s_per_token"] for x in rows], marker, label=f"{kv} (predicted)")
    ax2.plot(HEADINFER["context"], HEADINFER["s_per_token"], "kx--", label="HeadInfer (measured)")
    ax2.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="seconds per token",
            title="decode on an RTX 4090, 2 TiB host memory")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "small_gpus.png"), dpi=110)


if __name__ == "__main__":
    sys.exit(main())
