"""Device memory against context length, per preset and policy, from the compiled programs.

For each preset and policy this compiles the real prefill and decode-step programs with abstract inputs
(`momjax.memory_report`, source "xla") at context lengths on a log scale, from 8k tokens up to the policy's
limit on an 80 GiB device, and records XLA's figure beside the closed-form `momjax.estimate`. Nothing is
allocated, so it runs on a laptop CPU. Figures are float32: the CPU compiler upcasts bfloat16 matmuls and
inflates bf16 figures. A second figure shows bfloat16 from the estimate, which is what
`momjax plan --dtype bfloat16` uses.

The device figure of a length is max(prefill, decode) device bytes: a context fits only if both phases do.

    python benchmarks/memory_vs_context.py            # ~10 minutes on 2 CPU cores
    python benchmarks/memory_vs_context.py --quick    # two presets' first lengths, for a smoke test

Writes benchmarks/results/memory_vs_context.json, memory_vs_context.png and memory_vs_context_bf16.png.

With --target a100-80gb (or h100, ...; needs `pip install 'momjax[gpu-plan]'`) the programs are compiled
by XLA's GPU compiler for that GPU, without a GPU, in bfloat16; each policy's limit on the GPU's memory is
the planner's answer confirmed by compiled programs (`momjax.plan(..., target=...)`). Those figures are the
compiled programs' buffer assignments, not allocator peaks on a live GPU, and no autotuning runs.
Writes memory_vs_context_<target>.json and .png.

    python benchmarks/memory_vs_context.py --target a100-80gb
    python benchmarks/memory_vs_context.py --target h100 --factor 4   # lengths x4 apart: half the compiles
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time

import jax

import momjax
from momjax import memory

PRESETS = ("llama-3.1-8b", "qwen2.5-7b", "mistral-nemo-12b")
POLICIES = tuple(momjax.POLICIES)
COLORS = {"baseline": "tab:red", "mom": "tab:blue", "mom-stream": "tab:green"}
GIB = 2**30
HBM, HOST = "80GiB", "1TiB"
START, CAP = 8192, 4 * 2**20  # 8k tokens up to 4M (compiles grow with the length)
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from provenance import git_state

RESULTS = os.path.join(HERE, "results")

# Arxiv 2504.12526, Llama-3-8B in bf16 on one A100 80 GB with transformers + FlashAttention-2.
PAPER = {
    "model": "Llama-3-8B", "device": "A100 80GB", "dtype": "bfloat16",
    "max_context_tokens": {"standard": 155_000, "mom": 455_000},
    "peak_at_155k_GB": {"standard": 72, "mom": 35},
    "ttft_at_144k_s": {"standard": 34.9, "mom": 37.3},
    "decode_tokens_per_s_at_144k": 11.6,
    "note": "peaks as the paper reports them (GB); its standard baseline computes logits at every position",
}




def lengths_up_to(limit: int, start: int = START, cap: int = CAP, factor: int = 2) -> list[int]:
    """start, factor start, factor^2 start, ... below min(limit, cap), then the limit itself (under the cap)."""
    top = min(limit, cap)
    out, n = [], start
    while n <= top:
        out.append(n)
        n *= factor
    if limit <= cap and (not out or out[-1] != limit) and limit >= start:
        out.append(limit)
    return out


def _phases(report_fn, name, n, policy, dtype) -> dict:
    """Both phases' figures at one length; report_fn is memory.memory_report (maybe with a target) or estimate."""
    keep = ("device_bytes", "host_bytes", "weight_bytes", "kv_bytes", "temp_bytes")
    return {ph: {k: report_fn(name, n, policy, dtype=dtype, phase=ph)[k] for k in keep} for ph in ("prefill", "decode")}


def measure_preset(name: str, dtype: str = "float32", quick: bool = False, log=print, target=None,
                   hbm=HBM, factor: int = 2) -> dict:
    """XLA and estimate figures for one preset, every policy, prefill and decode, from 8k to the limit.

    target: None = this machine's compiler, limits from the estimate; a GPU name = its compiler, limits
    from the planner confirmed by compiled programs (from the estimate with quick, to keep it short).
    """
    report = functools.partial(memory.memory_report, target=target)
    confirmed = target is not None and not quick
    plan = memory.plan(name, hbm, HOST, dtype=dtype, source="xla" if confirmed else "estimate", target=target)
    out = {"max_context_estimate": plan["max_context"], "limited_by": plan["limits"],
           "weight_bytes": plan["weight_bytes"], "points": {}}
    if target is not None:
        out["max_context_source"] = plan["source"]
    for policy in POLICIES:
        # On a GPU target every curve runs to its limit (mom-stream's passes the CPU run's 4M cap).
        limit = plan["max_context"][policy]
        lengths = lengths_up_to(limit, cap=max(CAP, limit) if target is not None else CAP, factor=factor)
        if quick:
            lengths = lengths[:2]
        points = []
        for n in lengths:
            t0 = time.perf_counter()
            xla = _phases(report, name, n, policy, dtype)
            seconds = time.perf_counter() - t0
            est = _phases(memory.estimate, name, n, policy, dtype)
            device = max(xla["prefill"]["device_bytes"], xla["decode"]["device_bytes"])
            est_device = max(est["prefill"]["device_bytes"], est["decode"]["device_bytes"])
            points.append({"seq_len": n, "device_bytes": device, "estimate_device_bytes": est_device,
                           "fits_device_budget": device <= memory.parse_bytes(hbm),
                           "host_bytes": max(xla["prefill"]["host_bytes"], xla["decode"]["host_bytes"]),
                           "xla": xla, "estimate": est, "compile_s": round(seconds, 2)})
            log(f"  {name:<17}{policy:<11}{n:>10,} tokens  device {device / GIB:7.2f} GiB (estimate "
                f"{est_device / GIB:7.2f})  host {points[-1]['host_bytes'] / GIB:7.2f} GiB  [{seconds:.1f} s]")
        out["points"][policy] = points
        # Drop the compiled programs: one process keeping a whole run's CPU executables alive ran out of mapped
        # memory inside XLA's CPU compiler (LLVM "Unable to allocate section memory") in the third preset.
        jax.clear_caches()
    return out


def estimate_preset(name: str, dtype: str = "bfloat16") -> dict:
    """The same curves from the closed-form estimate only (instant), for dtypes the CPU cannot measure."""
    plan = memory.plan(name, HBM, HOST, dtype=dtype, source="estimate")
    out = {"max_context_estimate": plan["max_context"], "limited_by": plan["limits"],
           "weight_bytes": plan["weight_bytes"], "points": {}}
    for policy in POLICIES:
        points = []
        for n in lengths_up_to(plan["max_context"][policy]):
            est = _phases(memory.estimate, name, n, policy, dtype)
            points.append({"seq_len": n, "device_bytes": max(e["device_bytes"] for e in est.values()),
                           "host_bytes": max(e["host_bytes"] for e in est.values()), "estimate": est})
        out["points"][policy] = points
    return out


# ---------------------------------------------------------------------- figures


def _k(n: int) -> str:
    return f"{n / 2**20:.2f}M" if n >= 2**20 else f"{n / 1024:.0f}k"


def plot(results: dict, key: str, path: str, title: str, with_estimate: bool, paper: bool = False,
         budget_gib: float = 80) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    per_preset = results[key]
    fig, axes = plt.subplots(1, len(per_preset), figsize=(5.6 * len(per_preset), 4.8), sharey=True, squeeze=False)
    axes = axes[0]  # one row (also with one preset)
    ticks = [2**k for k in range(13, 23)]
    for ax, (name, data) in zip(axes, per_preset.items()):
        for policy, points in data["points"].items():
            if not points:
                continue
            x = [p["seq_len"] for p in points]
            y = [p["device_bytes"] / GIB for p in points]
            limit = data["max_context_estimate"][policy]
            ax.plot(x, y, "o-", color=COLORS[policy], lw=2, ms=4, label=f"{policy} (max {limit:,} tokens)")
            if with_estimate:
                ye = [p["estimate_device_bytes"] / GIB for p in points]
                ax.plot(x, ye, ":", color=COLORS[policy], lw=1.2)
            if limit > x[-1]:  # the curve stops at the cap, short of the limit
                ax.annotate(f"cut at {_k(CAP)}\n(limit {_k(limit)})", (x[-1], y[-1]), textcoords="offset points",
                            xytext=(-8, -10), ha="right", va="top", color=COLORS[policy], fontsize=8)
        ax.axhline(budget_gib, color="black", ls="--", lw=1)
        ax.text(ticks[-1] * 1.2, budget_gib + 1, f"{budget_gib:g} GiB device", fontsize=8, va="bottom", ha="right")
        if paper and name == "llama-3.1-8b":
            p = PAPER
            ax.scatter([155_000, 155_000], [p["peak_at_155k_GB"]["standard"], p["peak_at_155k_GB"]["mom"]],
                       marker="*", s=120, color=["tab:red", "tab:blue"], edgecolor="black", zorder=5,
                       label="paper: Llama-3-8B, A100, peak at 155k (GB)")
            ax.axvline(455_000, color="tab:blue", ls="-.", lw=0.8)
            ax.text(455_000 * 1.05, 3, "paper: MOM max 455k", rotation=90, fontsize=7, color="tab:blue", va="bottom")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([_k(t) for t in ticks], fontsize=8)
        right = max((p["seq_len"] for pts in data["points"].values() for p in pts), default=0)
        ax.set_xlim(6000, max(5.5 * 2**20, 1.15 * right))
        ax.set_ylim(0, max(100, budget_gib * 1.25))
        weights = data["weight_bytes"] / GIB
        ax.set_title(f"{name} (weights {weights:.1f} GiB)")
        ax.set_xlabel("context length (tokens, log scale)")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    axes[0].set_ylabel("device memory, max(prefill, decode) (GiB)")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_table(results: dict) -> str:
    """Markdown: per preset and policy, the float32 limit and XLA's figure there, GiB at 64k, the bf16 limit."""
    header = ("| preset | policy | max context, f32 (estimate) | XLA device GiB at that length | "
              "device GiB at 64k, f32: XLA / estimate | max context, bf16 (estimate) |")
    rows = [header, "|---|---|---:|---:|---:|---:|"]
    for name, data in results["float32_xla"].items():
        for policy, points in data["points"].items():
            limit = data["max_context_estimate"][policy]
            at_limit = next((p for p in points if p["seq_len"] == limit), None)
            there = f"{at_limit['device_bytes'] / GIB:.2f}" if at_limit else "-"
            at = next((p for p in points if p["seq_len"] == 65536), None)
            at64 = f"{at['device_bytes'] / GIB:.1f} / {at['estimate_device_bytes'] / GIB:.1f}" if at else "-"
            bf16 = results["bfloat16_estimate"][name]["max_context_estimate"][policy]
            rows.append(f"| {name} | {policy} | {limit:,} | {there} | {at64} | {bf16:,} |")
    return "\n".join(rows)


def target_summary_table(results: dict, key: str) -> str:
    """Markdown: per preset and policy, the limit on the GPU, what limits it, and GiB at the limit and at 128k."""
    rows = [("| preset | policy | max context (compiled) | limited by | device GiB at the limit | "
            "device GiB at 128k: compiled / estimate | host GiB at 128k |"), "|---|---|---:|---|---:|---:|---:|"]
    for name, data in results[key].items():
        for policy, points in data["points"].items():
            limit = data["max_context_estimate"][policy]
            at_limit = next((p for p in points if p["seq_len"] == limit), None)
            there = f"{at_limit['device_bytes'] / GIB:.2f}" if at_limit else "-"
            at = next((p for p in points if p["seq_len"] == 131072), None)
            at128 = f"{at['device_bytes'] / GIB:.2f} / {at['estimate_device_bytes'] / GIB:.2f}" if at else "-"
            host = f"{at['host_bytes'] / GIB:.2f}" if at else "-"
            rows.append(f"| {name} | {policy} | {limit:,} | {data['limited_by'][policy]} | {there} | {at128} | {host} |")
    return "\n".join(rows)


def main_target(args, argv) -> int:
    """--target: bfloat16 figures from XLA's GPU compiler for one GPU, to memory_vs_context_<target>.json/.png."""
    from momjax import targets

    target = targets.get(args.target)
    if target is None:
        raise SystemExit("--target needs a GPU name; leave it out for this machine's compiler")
    budget = target.memory_bytes
    t0 = time.perf_counter()
    key = f"bfloat16_{target.name}"
    results = {
        "command": "python " + " ".join([os.path.relpath(__file__, os.getcwd())] + (argv or sys.argv[1:])),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__},
        "git": git_state(),
        "target": {"name": target.name, "description": target.description, "memory_bytes": budget,
                   "memory_bandwidth": target.memory_bandwidth, "host_link": target.host_link,
                   "host_link_bandwidth": target.host_link_bandwidth, "source": target.source},
        "figures_are": (f"buffer assignments of the compiled prefill and decode-step programs, from XLA's GPU "
                        f"compiler for {target.description} run without a GPU (deviceless); not allocator peaks "
                        "on a live GPU; no autotuning ran (GEMM workspaces may differ, cuDNN workspaces count 0)"),
        "device_budget": budget, "host_budget": HOST, "new_tokens": memory.DEFAULT_NEW_TOKENS,
        "device_bytes_is": "max over prefill and decode of memory_report(target=...)['device_bytes']",
        "lengths_are": f"{START} tokens times {args.factor} until the limit, then the limit",
        "max_context_is": ("momjax.plan(target=...): the estimate's answer refined by bisection with compiled "
                           "programs" if not args.quick else "momjax.estimate (--quick)"),
        "paper": PAPER,
        key: {},
    }
    for name in args.presets:
        print(f"{name}: bfloat16, compiled for {target.name}")
        results[key][name] = measure_preset(name, "bfloat16", args.quick, target=target.name, hbm=budget,
                                            factor=args.factor)
    results["total_s"] = round(time.perf_counter() - t0, 1)
    results["summary_markdown"] = target_summary_table(results, key)
    stem = os.path.join(args.out_dir, f"memory_vs_context_{target.name}")
    with open(stem + ".json", "w") as f:
        json.dump(results, f, indent=1)
    plot(results, key, stem + ".png",
         f"Device memory vs context, bfloat16, XLA's GPU compiler for {target.description} without a GPU\n"
         f"(compiled buffer assignments, not allocator peaks; no autotuning; dotted: estimate); "
         f"{memory.DEFAULT_NEW_TOKENS} new tokens",
         with_estimate=True, paper=target.name.startswith("a100-80"), budget_gib=budget / GIB)
    print(results["summary_markdown"])
    print(f"wrote {stem}.json and .png in {results['total_s']} s")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(momjax.PRESETS))
    parser.add_argument("--quick", action="store_true", help="first two lengths per policy only")
    parser.add_argument("--factor", type=int, default=2, choices=(2, 4),
                        help="ratio between successive lengths (4: half the compiles, for a busy machine)")
    parser.add_argument("--target", default=None, help="a GPU (a100-80gb, h100, ...): compile for it, in bfloat16")
    parser.add_argument("--out-dir", default=RESULTS)
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    if args.target not in (None, "cpu"):
        return main_target(args, argv)

    t0 = time.perf_counter()
    results = {
        "command": "python " + " ".join([os.path.relpath(__file__, os.getcwd())] + (argv or sys.argv[1:])),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__,
                    "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind},
        "git": git_state(),
        "device_budget": HBM, "host_budget": HOST, "new_tokens": memory.DEFAULT_NEW_TOKENS,
        "device_bytes_is": "max over prefill and decode of memory_report()['device_bytes']",
        "lengths_are": f"{START} tokens times {args.factor} until the limit (capped at {CAP}), then the limit",
        "float32_xla_is": "memory_report (source xla, float32, compiled on CPU), with estimate() beside it",
        "bfloat16_estimate_is": "estimate() only (closed form), bfloat16",
        "paper": PAPER,
        "float32_xla": {},
        "bfloat16_estimate": {},
    }
    for name in args.presets:
        print(f"{name}: float32, compiled programs")
        results["float32_xla"][name] = measure_preset(name, "float32", args.quick, factor=args.factor)
        results["bfloat16_estimate"][name] = estimate_preset(name, "bfloat16")
    results["total_s"] = round(time.perf_counter() - t0, 1)
    results["summary_markdown"] = summary_table(results)

    with open(os.path.join(args.out_dir, "memory_vs_context.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, "float32_xla", os.path.join(args.out_dir, "memory_vs_context.png"),
         f"Device memory vs context, float32, from XLA's compiled programs (dotted: closed-form estimate); "
         f"budget {HBM}, {memory.DEFAULT_NEW_TOKENS} new tokens", with_estimate=True)
    plot(results, "bfloat16_estimate", os.path.join(args.out_dir, "memory_vs_context_bf16.png"),
         "Device memory vs context, bfloat16, closed-form estimate (as `momjax plan --dtype bfloat16`); "
         f"budget {HBM}, {memory.DEFAULT_NEW_TOKENS} new tokens", with_estimate=False, paper=True)
    print(results["summary_markdown"])
    print(f"wrote {args.out_dir}/memory_vs_context.json, .png and _bf16.png in {results['total_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
