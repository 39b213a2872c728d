"""Tables and a plot from gpu_check runs: measured on the GPU beside what was predicted without one.

    python benchmarks/gpu_check_report.py benchmarks/results/gpu_check_h200/run*.json

Later runs' stages win over earlier runs' for the same stage (a second run that re-measured what the first
could not). Prints Markdown tables (README's GPU section is made from them) and writes gpu_check_h200.png
beside the runs' folder.
"""

from __future__ import annotations

import argparse
import json
import os

GIB = 2**30


def merge(paths: list[str]) -> dict:
    """{"env": ..., "exact": {"families": {...}}, "long": {(policy, length): run}, "transformers": ..., ...}"""
    out = {"exact": {}, "long": {}, "runs": []}
    for path in sorted(paths):
        with open(path) as f:
            r = json.load(f)
        out["runs"].append({"file": os.path.basename(path), "command": r["command"], "git": r["git"],
                            "started": r["started"]})
        for stage, s in r["stages"].items():
            if stage == "exact":
                for fam, f in s.get("families", {}).items():
                    if "ok" in f:
                        out["exact"][fam] = f
            elif stage == "long":
                for policy, p in s.items():
                    for run in p.get("runs", []):
                        if "ttft_s" in run:
                            out["long"][policy, run["seq_len"]] = {**run, "bytes_limit": p.get("bytes_limit"),
                                                                   "weights_in_use_bytes": p.get("weights_in_use_bytes")}
            elif s.get("ok") or stage not in out:
                out[stage] = s
    return out


def gib(n) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def tables(m: dict) -> str:
    env = m["env"]
    lines = [(f"GPU: {env['device_kind']}, jax {env['jax']} (jaxlib {env['jaxlib']}), {env['backend']}; "
              f"transformers {env['transformers']}, torch {env['torch']}; host link measured "
              f"{env['host_to_device_GBps']:.1f} GB/s to the device, {env['device_to_host_GBps']:.1f} GB/s back "
              f"(2 GiB, pinned host); device copy {env['device_copy_GBps']:.0f} GB/s"), ""]
    lines += [("| family | policies equal to transformers | int8 equal across policies | forward rel. err | "
               "memory kinds | session = one-shot |"), "|---|---|---|---:|---|---|"]
    for fam, f in m["exact"].items():
        eq = f["exact_equal_transformers"]
        sess = all(all(v for k, v in s.items() if k != "buffer_memory_kind") for s in f["session"].values())
        lines.append(f"| {fam} | {sum(eq.values())}/{len(eq)} | {f['int8_equal_across_policies']} | "
                     f"{f['forward_rel_err']:.1e} | {'as expected' if f['memory_kinds_as_expected'] else 'WRONG'} | "
                     f"{sess} |")
    lines += ["", ("| policy | context | time to first token (s) | peak device GiB: measured | predicted (deviceless "
                   "h200) | estimate | decode tok/s: measured | predicted (roofline) | host->device GB/s |"),
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (policy, n), run in sorted(m["long"].items(), key=lambda kv: (kv[0][1], kv[0][0])):
        pred = run.get("predicted_h200", {})
        for d in run["decode"]:
            if "decode_s" not in d:
                continue
            kdl = d["kv_device_layers"]
            label = policy if kdl is None else f"{policy} kv_device_layers={kdl}"
            pdec = pred.get("decode", {}).get(str(kdl), {})
            peak = d["peak_after_decode_bytes"]
            lines.append(f"| {label} | {n // 1024}k | {run['ttft_s']:.2f} | {gib(run['peak_after_prefill_bytes'])} "
                         f"prefill, {gib(peak)} decode | {gib(pred.get('prefill_device_bytes'))}, "
                         f"{gib(pdec.get('device_bytes'))} | {gib(run['estimate_prefill_device_bytes'])}, "
                         f"{gib(d['estimate_decode_device_bytes'])} | {d['decode_tokens_per_s']:.1f} | "
                         f"{d['predicted']['decode_tokens_per_s']:.1f} | "                         + (f"{d['host_to_device_GBps_achieved']:.1f} |" if d.get("host_to_device_GBps_achieved") else "- |"))
    t = m.get("transformers")
    if t and t.get("ok"):
        mom = m["long"].get(("mom", 32768))
        lines += ["", (f"transformers {t['transformers']} ({t['attn_implementation']}, offloaded DynamicCache, "
                       f"logits_to_keep=1), 32k: time to first token {t['ttft_s']:.2f} s, decode "
                       f"{t['decode_tokens_per_s']:.2f} tok/s, peak {gib(t['peak_bytes'])} GiB")]
        if mom:
            dec = mom["decode"][0]
            lines.append(f"momjax mom / transformers at 32k: time to first token {mom['ttft_s'] / t['ttft_s']:.2f}x, "
                         f"decode speed {dec['decode_tokens_per_s'] / t['decode_tokens_per_s']:.1f}x")
    c = m.get("cudnn")
    if c and c.get("ok"):
        lines += ["", (f"one 32k causal attention layer (GQA 32/8, E 128, bf16): momjax blockwise "
                       f"{c['momjax_s'] * 1e3:.0f} ms ({c['momjax_TFLOPs']:.0f} TFLOP/s)")]
        if c.get("cudnn", {}).get("runs"):
            lines[-1] += (f", cuDNN {c['cudnn']['seconds'] * 1e3:.1f} ms ({c['cudnn']['TFLOPs']:.0f} TFLOP/s, "
                          f"{c['cudnn']['momjax_over_it']:.1f}x faster; rel. difference {c['cudnn']['rel_err_vs_momjax']:.1e})")
        for blocks, b in c.get("momjax_blocks", {}).items():
            if "seconds" in b:
                lines.append(f"momjax with {blocks} blocks: {b['seconds'] * 1e3:.0f} ms ({b['TFLOPs']:.0f} TFLOP/s)")
    return "\n".join(lines)


def plot(m: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for (policy, n), run in sorted(m["long"].items(), key=lambda kv: (kv[0][1], kv[0][0])):
        pred = run.get("predicted_h200", {})
        for d in run["decode"]:
            if "decode_s" in d:
                kdl = d["kv_device_layers"]
                name = policy if kdl is None else f"{policy}\nN={kdl}"
                pdec = pred.get("decode", {}).get(str(kdl), {})
                rows.append((f"{name}\n{n // 1024}k", max(run["peak_after_prefill_bytes"], d["peak_after_decode_bytes"]),
                             max(pred.get("prefill_device_bytes", 0), pdec.get("device_bytes", 0)),
                             d["decode_tokens_per_s"], d["predicted"]["decode_tokens_per_s"]))
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.2))
    x = range(len(rows))
    w = 0.38
    axes[0].bar([i - w / 2 for i in x], [r[1] / GIB for r in rows], w, label="measured peak (memory_stats)")
    axes[0].bar([i + w / 2 for i in x], [r[2] / GIB for r in rows], w, label="predicted: XLA's GPU compiler, deviceless")
    axes[0].set_ylabel("device memory, GiB (larger of prefill and decode)")
    axes[1].bar([i - w / 2 for i in x], [r[3] for r in rows], w, label="measured")
    axes[1].bar([i + w / 2 for i in x], [r[4] for r in rows], w, label="predicted: roofline of the step's bytes")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("decode tokens/s (log)")
    for ax in axes:
        ax.set_xticks(list(x))
        ax.set_xticklabels([r[0] for r in rows], fontsize=7)
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    env = m["env"]
    fig.text(0.5, 0.005, "N: kv_device_layers (0: every layer's K/V streamed from host memory each token). "
             "mom-stream N=0 was measured before the fix that keeps one streamed layer on the device at a time.",
             ha="center", fontsize=8)
    fig.suptitle(f"Llama-3.1-8B shapes, bf16, random weights, batch 1, on one {env['device_kind']} (jax {env['jax']}): "
                 "measured beside predicted", fontsize=11)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--png", help="default: gpu_check_h200.png beside the runs' folder")
    args = parser.parse_args(argv)
    m = merge(args.runs)
    print(tables(m))
    png = args.png or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(args.runs[0]))), "gpu_check_h200.png")
    plot(m, png)
    print(f"\nwrote {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
