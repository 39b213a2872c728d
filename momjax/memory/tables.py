"""Plans as people read them: the table `momjax plan` prints, and notes on what a plan does not say by itself."""

from __future__ import annotations

import textwrap

from momjax.units import format_bytes


def plan_table(result: dict) -> str:
    """A readable table of `plan`'s result."""
    n = result.get("devices", 1)
    lines = [
        (f"{n} devices, tensor-parallel: each " if n > 1 else "")
        + f"device budget {format_bytes(result['hbm_bytes'])}"
        + (f", host budget {format_bytes(result['host_bytes'])}" + (" (all devices')" if n > 1 else "")
           if result["host_bytes"] else "")
        + f", {result['dtype']}, weights {format_bytes(result['weight_bytes'])}" + (" per device" if n > 1 else "")
        + (" on the device at a time (all of them in host memory, streamed layer by layer)"
           if result.get("weights") == "host" else "")
        + f", room for {result['new_tokens']} new tokens",
        f"{'policy':<12}{'max context':>14}  {'limited by':<11}source",
    ]
    if result.get("target"):
        lines.insert(0, f"target {result['target']['description']}: compiled programs' buffer assignments from XLA's "
                        "GPU compiler (no GPU used, no autotuning), not allocator peaks on a live GPU")
    for name, n in result["max_context"].items():
        src = result["source"][name]
        if src == "xla":
            src = "xla (compiled program)"
        elif src.startswith("xla-gpu:"):
            src = f"{src} (compiled for the GPU, deviceless)"
        else:
            src = "estimate (validated against XLA within 15%)"
        lines.append(f"{name:<12}{n:>14,}  {result['limits'][name]:<11}{src}")
    if result.get("kv_dtype"):
        lines.append(f"(K/V cache in {result['kv_dtype']}: approximate, logits change slightly)")
    if "decode" in result:
        lines += ["", _decode_table(result)]
    return "\n".join(lines)


def _decode_table(result: dict) -> str:
    """The decode part of plan_table: per policy at result["context"], and the recommendation."""
    tgt, n = result["target"], result.get("devices", 1)
    lines = [f"decoding after a {result['context']:,}-token prompt"
             + (f" on {tgt['name']}: predicted tokens/s, a roofline of the step's bytes at "
                f"{tgt['memory_bandwidth'] / 1e9:,.0f} GB/s memory and {tgt['host_link_bandwidth'] / 1e9:.1f} "
                f"GB/s {tgt['host_link']}"
                + (f", all-reduces at {tgt['interconnect_bandwidth'] / 1e9:,.0f} GB/s {tgt['interconnect']}"
                   if n > 1 else "")
                + " (copies overlapped with compute as the step issues them; not measured on a GPU)"
                if tgt else " (give --target for predicted speed)"),
             f"{'policy':<18}{'K/V':<6}{'layers on device':>17}{'host->device/token':>20}{'tokens/s':>10}"
             f"{'prefill s':>11}{'host memory':>13}"]
    for c in result["decode"].values():
        kv = c["kv_dtype"] or result["dtype"].replace("bfloat16", "bf16").replace("float", "f")
        if not c["fits"]:
            lines.append(f"{c['policy']:<18}{kv:<6}{'does not fit':>17}")
            continue
        layers = "all" if c["kv_device_layers"] is None else str(c["kv_device_layers"])
        speed = f"{c['decode_tokens_per_s']:>10.2f}" if "decode_tokens_per_s" in c else f"{'-':>10}"
        prefill = f"{c['prefill_s']:>11,.1f}" if "prefill_s" in c else f"{'-':>11}"
        name = c["policy"] + (f" C={c['minisequence']}" if c["policy"] == "mom-host" else "")
        lines.append(f"{name:<18}{kv:<6}{layers:>17}{format_bytes(c['host_to_device_bytes']):>20}{speed}{prefill}"
                     f"{format_bytes(c['host_bytes']):>13}")
    rec = result["recommended"]
    text = rec["policy"] + (f" with kv_device_layers={rec['kv_device_layers']}" if rec["kv_device_layers"] else "")
    text += f", {rec['kv_dtype']} K/V" if rec["kv_dtype"] else ""
    lines.append(f"recommended: {text}"
                 + (f" ({rec['decode_tokens_per_s']:.2f} tokens/s predicted)" if "decode_tokens_per_s" in rec else ""))
    if rec.get("why"):
        lines.append(f"  why: {rec['why']}")
    if tgt:
        lines.append("prefill s: predicted time to first token, the larger of the FLOPs at the target's dense bf16 "
                     f"peak ({tgt.get('peak_flops', 0) / 1e12:,.0f} TFLOPS) and the bytes over its host link; C: "
                     "mom-host's mini-sequence, the shortest whose prefill the host link does not bound")
    return "\n".join(lines)



def plan_notes(cfg, result: dict) -> list[str]:
    """What a plan does not say by itself: contexts past the trained length, and an unlimited host budget."""
    notes = []
    trained = cfg.context_length
    past = [name for name, n in result["max_context"].items() if n > trained]
    if past:
        notes.append(
            f"note: the model was trained on {trained:,} tokens (max_position_embeddings); longer contexts "
            f"({', '.join(past)}) run only on purpose (`generate --allow-long-context`, or `model.max_context` in "
            "Python) and may give degraded output")
    if result["host_bytes"] is None:
        notes.append(
            "note: no host budget was given (`--host-memory`), so host memory counts as unlimited; mom and "
            "mom-stream keep the KV cache there (mom-stream for the whole generation), and mom-host, whose device "
            "memory does not grow with the context, is planned only against a host budget")
    return [textwrap.fill(n, 110, subsequent_indent="      ", break_on_hyphens=False) for n in notes]
