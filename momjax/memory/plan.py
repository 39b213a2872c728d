"""Planning: the longest context each policy fits in a device (and host) budget, counting prefill and decode, and
at a given context the predicted decode speed of each policy and the one to use.

`max_context` bisects over the length with a measure (the closed-form estimate, or the compiled programs);
`plan` does it for every policy, refining the estimate's answer with compiled programs when asked to (on a GPU
or for a GPU target), and `decode_speed` turns a decode step's bytes into a roofline on a target.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from momjax import checks, offload_programs
from momjax import targets as T
from momjax.config import Config
from momjax.errors import InputError
from momjax.memory.estimate import estimate
from momjax.memory.measure import memory_report
from momjax.memory.shapes import DEFAULT_NEW_TOKENS, resolve
from momjax.mesh import check_degree, working_degrees
from momjax.params import param_bytes
from momjax.policy import get_policy
from momjax.units import format_bytes, parse_bytes


def fits(cfg, seq_len, policy, dtype, hbm, host, new_tokens, measure) -> bool:
    for phase in ("prefill", "decode"):
        r = measure(cfg, seq_len, policy, dtype=dtype, phase=phase, new_tokens=new_tokens)
        if r["device_bytes"] > hbm or (host is not None and r["host_bytes"] > host):
            return False
    return True


def _measure(source: str, target=None, devices: int = 1, weights: str = "device"):
    """memory_report or estimate as a function of (cfg, seq_len, policy, dtype, phase, new_tokens), for the model
    split over `devices` devices (per-device figures), its weights in device or host memory."""
    if source == "estimate":
        return functools.partial(estimate, devices=devices, weights=weights)
    return functools.partial(memory_report, target=target, devices=devices, weights=weights)


def max_context(cfg: Config, policy, hbm_bytes: int, host_bytes: int | None = None, dtype="bfloat16",
                new_tokens: int = DEFAULT_NEW_TOKENS, source: str = "estimate", resolution: int = 1024,
                target=None, devices: int = 1, weights: str = "device") -> int:
    """The longest prompt (to `resolution` tokens) whose prefill and decode both fit; 0 if none does.

    source="estimate" uses `estimate` (instant); source="xla" compiles the programs at each step (for
    `target`, see memory_report).
    """
    policy = get_policy(policy)
    measure = _measure(source, target, devices, weights)
    fits_at = lambda n: fits(cfg, n, policy, dtype, hbm_bytes, host_bytes, new_tokens, measure)
    if not fits_at(resolution):
        return 0
    lo, hi = resolution, 2 * resolution
    while fits_at(hi):
        lo, hi = hi, hi * 2
        if hi > 2**34:
            return lo
    while hi - lo > resolution:  # invariant: fits(lo) and not fits(hi)
        mid = (lo + hi) // 2 // resolution * resolution
        lo, hi = (mid, hi) if fits_at(mid) else (lo, mid)
    return lo


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def plan(model_or_config, hbm_bytes=None, host_bytes=None, dtype="bfloat16", new_tokens: int = DEFAULT_NEW_TOKENS,
         source: str = "auto", target=None, kv_dtype=None, context: int | None = None, devices: int = 1,
         weights: str = "device") -> dict:
    """Maximum context per policy for a device budget (and optional host budget), and at `context` tokens the
    predicted decode speed of each policy and the one to use.

    hbm_bytes: the device budget; None = the target's memory size (momjax.targets.TARGETS).
    target: None / "cpu" = this machine; a GPU name ("h100", "a100-80gb", ...) = the answer is confirmed by
    XLA's GPU compiler for that GPU, deviceless (needs `pip install 'momjax[gpu-plan]'`, see memory_report).
    source: "xla" compiles the real programs, bisecting around the estimate (float32 on a CPU, any dtype on
    a GPU or for a GPU target); "estimate" uses the closed-form `estimate`, validated against XLA in float32
    (tests/test_memory.py); "auto" compiles on a GPU backend or for a GPU target, and uses the estimate on a
    CPU: the CPU compiler inflates bfloat16 figures, and compiles at millions of tokens take minutes there.
    kv_dtype: None plans the exact K/V cache (the model's dtype); "int8" plans every policy with int8 K/V
    (approximate: logits change slightly), and the recommendation may then pick int8 or exact K/V.
    context: a prompt length to decode at. Adds result["decode"] (per policy: whether it fits, the
    kv_device_layers chosen for mom-stream, bytes per step and predicted tokens/s) and result["recommended"]
    (the fastest policy that fits; exact policies only unless kv_dtype is given). Predicted speed is a
    roofline of the decode step's bytes on the target (see `decode_speed`); without a target there is no
    speed, and policies are ranked by bytes across the host link, then bytes read.
    devices: plan the model split tensor-parallel over this many devices (momjax.mesh): hbm_bytes is each device's
    budget, host_bytes all devices' together (one host), and the decode roofline adds the two all-reduces per
    layer over the target's interconnect (decode_speed).
    weights: "device", or "host" (the weights in host memory, momjax.load(..., weights="host"); needs a host
    budget): every policy is planned with two layers' weights and the larger of the embedding and the LM head on
    each device (its share of them on a mesh), all of them in the host budget, and every decode step bringing them
    over the host link.
    Raises InputError when the budget cannot hold even the weights (TargetError for an unknown target),
    InputError when no policy fits `context`.
    """
    checks.memory_request(dtype=dtype, new_tokens=new_tokens, hbm_bytes=hbm_bytes, host_bytes=host_bytes, source=source,
                   kv_dtype=kv_dtype, context=context)
    cfg = resolve(model_or_config)
    n = checks.devices(devices)
    if n > 1:
        check_degree(cfg, n)
    t = T.get(target)
    if hbm_bytes is None:
        if t is None:
            raise InputError("give the device budget (hbm_bytes, e.g. '80GiB') or a GPU target such as 'h100'")
        hbm_bytes = t.memory_bytes
    if t is not None and source != "estimate":
        T.check_compiler()
    hbm, host = parse_bytes(hbm_bytes), (None if host_bytes is None else parse_bytes(host_bytes))
    placement, weights = weights, _device_weights(cfg, dtype, n, weights, host)
    if weights >= hbm:
        raise InputError(
            f"the weights alone need {format_bytes(weights)} in {jnp.dtype(dtype)}"
            + (f" on each of {n} devices" if n > 1 else "") + f", more than the {format_bytes(hbm)} device budget; "
            "use a smaller dtype, a larger device" + (" or more devices" if working_degrees(cfg)[-1] > n else "")
        )
    if source == "auto":
        source = "xla" if _on_gpu() or t is not None else "estimate"
    result = {"max_context": {}, "source": {}, "weight_bytes": weights, "hbm_bytes": hbm, "host_bytes": host,
              "dtype": str(jnp.dtype(dtype)), "kv_dtype": kv_dtype, "new_tokens": new_tokens, "limits": {},
              "devices": n,
              "target": None if t is None else dict(
                  name=t.name, description=t.description, memory_bytes=t.memory_bytes,
                  memory_bandwidth=t.memory_bandwidth, host_link=t.host_link,
                  host_link_bandwidth=t.host_link_bandwidth, interconnect=t.interconnect,
                  interconnect_bandwidth=t.interconnect_bandwidth, peak_flops=t.peak_flops)}
    for name in policy_names(host):
        policy = get_policy(name).replace(kv_dtype=kv_dtype)
        longest = max_context(cfg, policy, hbm, host, dtype, new_tokens, source="estimate", devices=n,
                              weights=placement)
        if source == "xla" and longest:
            # Refine around the estimate with the compiled programs (a few compiles, not a full search).
            longest = _refine_with_xla(cfg, policy, longest, hbm, host, dtype, new_tokens, target=t, devices=n,
                                       weights=placement)
        result["max_context"][name] = longest
        result["source"][name] = T.source_name(t) if source == "xla" else source
        result["limits"][name] = _limiting_phase(cfg, policy, longest, hbm, host, dtype, new_tokens, source,
                                                 target=t, devices=n, weights=placement)
    result["weights"] = placement
    if context is not None:
        _plan_decode(result, cfg, context, hbm, host, dtype, new_tokens, source, t, kv_dtype, n, placement)
    return result


def _device_weights(cfg: Config, dtype, devices: int, weights: str, host) -> int:
    """The weight bytes each device holds: all of its share, or with weights="host" (a host budget given) two
    layers' share and the larger of the embedding's and the LM head's."""
    if weights not in ("device", "host"):
        raise InputError(f"weights must be 'device' or 'host', got {weights!r}")
    if weights == "device":
        return param_bytes(cfg, dtype, devices)
    if host is None:
        raise InputError("weights='host' needs a host budget (host_bytes) to hold the weights")
    return offload_programs.weight_bytes(cfg, dtype, "host", devices=devices)["device"]


def policy_names(host_bytes) -> tuple[str, ...]:
    """The named policies a plan compares: `mom-host` too when a host budget bounds it (its device memory does not
    grow with the context, so host memory is its only limit), on one device or several."""
    return ("baseline", "mom", "mom-stream") + (("mom-host",) if host_bytes is not None else ())


# Mini-sequence lengths `plan` tries for mom-host: longer chunks stream each earlier block fewer times.
HOST_CHUNKS = (2048, 4096, 8192, 16384, 32768)


def prefill_time(cfg: Config, seq_len: int, policy, dtype, target, batch: int = 1, weights: str = "device",
                 devices: int = 1) -> dict:
    """Predicted time to first token of a prefill on target: a roofline, max(compute seconds, host link seconds).

    compute: the prefill's matmul FLOPs (2 x every layer's weights per token) and attention FLOPs (4 E per visible
    query-key pair per head, causal, within the sliding window) at the target's dense 16-bit peak (targets.PEAK_FLOPS).
    host link: the bytes the policy moves each way, at the link's bandwidth per direction: every policy that offloads
    writes each layer's K/V to the host; mom-host also brings each chunk's residual over and back and, for every
    chunk, every earlier block of K/V it attends to (so a longer chunk moves fewer bytes); with weights="host" every
    layer's weights, the embedding and the LM head come over once. On `devices` devices (momjax.mesh) each device
computes its share of the FLOPs and moves its KV heads' share of the K/V and its share of the weights over its own
host link, and its share of mom-host's residual stream. Both figures are predictions (not measured on a GPU); {} without
a target."""
    t = T.get(target)
    if t is None:
        return {}
    policy = get_policy(policy)
    b = jnp.dtype(dtype).itemsize
    L, D, H, K, E, F = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                        cfg.intermediate_size)
    S, B, w = seq_len, batch, cfg.sliding_window
    layer_weights = D * H * E * 2 + 2 * D * K * E + 3 * D * F
    pairs = S * (S + 1) // 2 if w is None or w >= S else w * (w + 1) // 2 + (S - w) * w
    flops = (2 * B * S * L * layer_weights + 4 * B * H * E * pairs * L) / devices
    e = E + 4 if policy.quantized_kv else E * b
    token_kv = 2 * B * K // devices * e  # one token's K and V in one layer, this device's heads
    to_host = L * S * token_kv if policy.kv_prefill == "pinned_host" else 0
    to_device = 0
    if policy.on_host:
        C = min(policy.minisequence, S)
        streamed = 0
        for c in range(-(-S // C)):  # each chunk reads the blocks up to its end, from its window's start
            end = (c + 1) * C
            streamed += end if w is None else min(end, C + -(-w // C) * C)
        residual = B * S * (D // devices if D % devices == 0 else D) * b  # each device's share (split_hidden)
        to_device = L * (streamed * token_kv + residual)
        to_host += L * residual
    if weights == "host":
        to_device += offload_programs.weight_bytes(cfg, dtype, "host", lookup_on_host=False, devices=devices)["streamed"]
    compute_s = flops / t.peak_flops
    link_s = max(to_device, to_host) / t.host_link_bandwidth
    return dict(prefill_s=max(compute_s, link_s), prefill_compute_s=compute_s, prefill_link_s=link_s,
                prefill_flops=int(flops), prefill_to_device_bytes=int(to_device), prefill_to_host_bytes=int(to_host),
                prefill_bound="host link" if link_s > compute_s else "compute")


def host_chunk(cfg: Config, context: int, policy, dtype, hbm, host, new_tokens, target, measure, devices: int = 1):
    """mom-host with the shortest mini-sequence (HOST_CHUNKS) whose prefill the host link does not bound on
    target (or the fastest that fits, when every one is link-bound); the policy unchanged without a target."""
    if T.get(target) is None:
        return policy
    fitting = [policy.replace(minisequence=c) for c in HOST_CHUNKS if c <= max(context, HOST_CHUNKS[0])]
    fitting = [p for p in fitting if fits(cfg, context, p, dtype, hbm, host, new_tokens, measure)]
    if not fitting:
        return policy
    times = [prefill_time(cfg, context, p, dtype, target, devices=devices) for p in fitting]
    for p, t in zip(fitting, times):
        if t["prefill_bound"] == "compute":
            return p
    return min(zip(fitting, times), key=lambda pt: pt[1]["prefill_s"])[0]


def decode_speed(step: dict, target) -> dict:
    """Predicted decode speed of a decode-step report (memory_report or estimate, phase="decode") on target:
    a roofline from the bytes the step moves. device seconds = (device_read_bytes + host_to_device_bytes) /
    memory bandwidth (streamed K/V are read again from device memory once they arrive); link seconds =
    host_to_device_bytes / host link bandwidth. The step brings each streamed layer over while the layer
    before it finishes (model.decode_step), so copies overlap the reads of weights and resident K/V, but a
    streamed layer's attention waits for its copy: a step takes max(device seconds, link seconds + the
    streamed K/V's read time) ("overlapped"); the plain sum is given too, as the bound if nothing
    overlapped. Compute is not counted: one token's matmuls are far below either limit. On several devices the
    step's all-reduces (allreduce_bytes, each device's share of the ring) add interconnect seconds on top: every
    layer waits for them. Their latency (microseconds each, 2 per layer) is not counted. Returns {} without
    a target (no bandwidths known)."""
    t = T.get(target)
    if t is None:
        return {}
    streamed = step["host_to_device_bytes"]
    device_s = (step["device_read_bytes"] + streamed) / t.memory_bandwidth
    link_s = streamed / t.host_link_bandwidth
    comm_s = step.get("allreduce_bytes", 0) / t.interconnect_bandwidth
    overlapped = max(device_s, link_s + streamed / t.memory_bandwidth)
    return dict(decode_tokens_per_s=1 / (overlapped + comm_s), decode_tokens_per_s_serial=1 / (device_s + link_s +
                                                                                                  comm_s),
                device_s=device_s, link_s=link_s, interconnect_s=comm_s,
                bound="host link" if overlapped > device_s else "device memory", overlap="overlapped")


def _plan_decode(result, cfg, context, hbm, host, dtype, new_tokens, source, t, kv_dtype, devices=1,
                 weights: str = "device") -> None:
    """result["decode"] and result["recommended"] for a prompt of `context` tokens (see plan)."""
    measure = _measure(source, t, devices, weights)
    candidates = {}
    for kv in (None,) if kv_dtype is None else (None, "int8"):
        for name in policy_names(host):
            policy = get_policy(name).replace(kv_dtype=kv)
            if name == "mom-host":
                policy = host_chunk(cfg, context, policy, dtype, hbm, host, new_tokens, t, measure, devices)
            if policy.kv_decode == "pinned_host":
                policy = most_resident(cfg, context, policy, dtype, hbm, host, new_tokens, source, t, devices, weights)
            ok = policy is not None and fits(cfg, context, policy, dtype, hbm, host, new_tokens, measure)
            streams = name in ("mom-stream", "mom-host")
            entry = dict(policy=name, kv_dtype=kv, fits=bool(ok),
                         kv_device_layers=None if not ok or not streams else policy.kv_device_layers or 0,
                         minisequence=policy.minisequence)
            if ok:
                step = measure(cfg, context, policy, dtype=dtype, phase="decode", new_tokens=new_tokens)
                before = measure(cfg, context, policy, dtype=dtype, phase="prefill", new_tokens=new_tokens)
                entry.update(host_to_device_bytes=step["host_to_device_bytes"],
                             device_read_bytes=step["device_read_bytes"],
                             host_bytes=max(step["host_bytes"], before["host_bytes"]),
                             device_bytes=max(step["device_bytes"], before["device_bytes"]),
                             **decode_speed(step, t),
                             **prefill_time(cfg, context, policy, dtype, t, weights=weights, devices=devices))
            candidates[name if kv is None else f"{name} int8"] = entry
    result["context"] = int(context)
    result["decode"] = candidates
    fitting = [c for c in candidates.values() if c["fits"]]
    if not fitting:
        longest = max(result["max_context"].values())
        raise InputError(
            f"context {context:,} tokens fits no policy in a {format_bytes(hbm)} device budget"
            + (f" and {format_bytes(host)} of host memory" if host is not None else "")
            + f" with {'int8' if kv_dtype else jnp.dtype(dtype).name} K/V; the longest that fits is {longest:,} "
            "tokens" + ("" if kv_dtype else " (kv_dtype='int8' fits about twice as many)"))
    # mom-host only when nothing else fits: it moves far more over the host link in prefill than mom-stream.
    others = [c for c in fitting if c["policy"] != "mom-host"]
    why = None
    if not others:
        why = (f"only mom-host fits {context:,} tokens: the other policies keep the residual stream and a layer's K/V "
               "on the device during prefill, and mom-host keeps nothing there that grows with the context")
    fitting = others or fitting
    if t is not None:
        best = max(fitting, key=lambda c: c["decode_tokens_per_s"])
    else:  # no bandwidths: fewest bytes across the host link, then fewest read from device memory
        best = min(fitting, key=lambda c: (c["host_to_device_bytes"], c["device_read_bytes"]))
    result["recommended"] = dict(best, why=why)


def most_resident(cfg, context, policy, dtype, hbm, host, new_tokens, source, t, devices: int = 1,
                  weights: str = "device"):
    """mom-stream with the most layers' prompt K/V kept on the device that still fits at `context` (the
    estimate chooses, the compiled programs confirm when source is "xla"); None when even 0 does not fit."""
    L = cfg.num_layers
    fits_estimate = lambda r: fits(cfg, context, policy.replace(kv_device_layers=r), dtype, hbm, host, new_tokens,
                                    _measure("estimate", devices=devices, weights=weights))
    r = next((r for r in range(L, -1, -1) if fits_estimate(r)), None)
    if r is None:
        r = 0
    if source == "xla":
        confirm = lambda r: fits(cfg, context, policy.replace(kv_device_layers=r), dtype, hbm, host, new_tokens,
                                  _measure("xla", t, devices, weights))
        while r > 0 and not confirm(r):
            r -= 1
    return policy.replace(kv_device_layers=r)


def _refine_with_xla(cfg, policy, guess, hbm, host, dtype, new_tokens, target=None, devices: int = 1,
                     weights: str = "device") -> int:
    """Bisect with the compiled programs within +-30% of the estimate (about ten compiles per policy)."""
    fits_at = lambda n: fits(cfg, n, get_policy(policy), dtype, hbm, host, new_tokens,
                             _measure("xla", target, devices, weights))
    resolution = max(1024, guess // 200 // 1024 * 1024)
    lo, hi = max(int(guess * 0.7) // 1024 * 1024, 1024), int(guess * 1.3) // 1024 * 1024 + 1024
    if not fits_at(lo):
        return max_context(cfg, policy, hbm, host, dtype, new_tokens, source="xla", resolution=resolution,
                           target=target, devices=devices, weights=weights)
    if fits_at(hi):
        return hi
    while hi - lo > resolution:
        mid = (lo + hi) // 2 // 1024 * 1024
        lo, hi = (mid, hi) if fits_at(mid) else (lo, mid)
    return lo


def _limiting_phase(cfg, policy, n, hbm, host, dtype, new_tokens, source, target=None, devices: int = 1,
                    weights: str = "device") -> str:
    """Which budget stops a longer context: 'prefill', 'decode' or 'host'."""
    measure = _measure(source, target, devices, weights)
    step = max(n // 50, 1024)
    for phase in ("prefill", "decode"):
        r = measure(cfg, n + step, policy, dtype=dtype, phase=phase, new_tokens=new_tokens)
        if host is not None and r["host_bytes"] > host:
            return "host"
        if r["device_bytes"] > hbm:
            return phase
    return "?"
