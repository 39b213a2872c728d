"""How much memory a context length needs, per policy: measured from XLA, estimated, and planned.

`memory_report` compiles the real prefill (or decode-step) program with abstract inputs
(`jax.ShapeDtypeStruct`) and reads `compiled.memory_analysis()`, so an 8B model at 128k tokens is
measured on a laptop CPU without allocating anything. The CPU backend does not split host from device
bytes, so host-placed arguments and outputs are counted from their shardings and taken out.
With `target="h100"` (or another of momjax.targets.TARGETS) the same programs are compiled by XLA's GPU
compiler for that GPU, without a GPU (momjax.targets explains what those figures are).

`estimate` is a closed-form model of the same programs (formulas in its docstring), checked against the
XLA figure in tests/test_memory.py. `plan` bisects over the context length for the largest prompt each
policy fits in a device (and host) budget, counting prefill and decode.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from momjax import generation as G
from momjax import targets as T
from momjax.cache import KVCache, sharding
from momjax.config import Config, MemoryPolicy, get_policy, preset
from momjax.params import abstract_params, param_bytes

DEFAULT_NEW_TOKENS = 1024  # decode room assumed by reports and plans unless told otherwise


def _resolve(model_or_config) -> Config:
    if isinstance(model_or_config, str):
        return preset(model_or_config)
    if isinstance(model_or_config, Config):
        return model_or_config
    return model_or_config.config  # a momjax.Model


def _nbytes(tree, memory_kind=None) -> int:
    total = 0
    for leaf in jax.tree.leaves(tree):
        if memory_kind is None or leaf.sharding.memory_kind == memory_kind:
            total += int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
    return total


def _abstract_cache(cfg: Config, seq_len: int, new_tokens: int, dtype, policy: MemoryPolicy, batch: int) -> KVCache:
    """The decode step's cache as abstract arrays, each layer's prompt K/V where the policy decodes from it;
    int8 K/V with their float32 scales when policy.quantized_kv."""
    L, K, E = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    N = max(new_tokens - 1, 1)
    dev = sharding("device")
    resident = policy.device_layers(L)
    kind = lambda l: sharding("device" if l < resident else policy.kv_decode)
    kv_dtype = jnp.int8 if policy.quantized_kv else dtype
    prompt = lambda l: jax.ShapeDtypeStruct((batch, K, seq_len, E), kv_dtype, sharding=kind(l))
    tail = jax.ShapeDtypeStruct((batch, K, N, E), kv_dtype, sharding=dev)
    cache = KVCache(
        k=tuple(map(prompt, range(L))), v=tuple(map(prompt, range(L))),
        start=jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=dev),
        tail_k=(tail,) * L, tail_v=(tail,) * L, length=jax.ShapeDtypeStruct((), jnp.int32, sharding=dev),
    )
    if policy.quantized_kv:
        scale = lambda l: jax.ShapeDtypeStruct((batch, K, seq_len), jnp.float32, sharding=kind(l))
        tail_scale = jax.ShapeDtypeStruct((batch, K, N), jnp.float32, sharding=dev)
        cache = cache.replace(k_scale=tuple(map(scale, range(L))), v_scale=tuple(map(scale, range(L))),
                              tail_k_scale=(tail_scale,) * L, tail_v_scale=(tail_scale,) * L)
    return cache


def compile_program(cfg: Config, seq_len: int, policy: MemoryPolicy, dtype="float32", phase="prefill", batch=1,
                    new_tokens=DEFAULT_NEW_TOKENS, target=None):
    """The compiled programs of a prefill or a decode step, for abstract inputs: [(stage, compiled, args, bytes)].

    Prefill is several programs (generation.prefill_stages: embed, one per-layer program run for every layer,
    the last layer, logits); a decode step is one. bytes: each program's memory analysis split into device
    and host bytes (momjax.targets.analyse). target: None = this machine's compiler, or a GPU (momjax.targets).
    """
    dtype = jnp.dtype(dtype)
    dev = sharding("device")
    params = abstract_params(cfg, dtype, sharding=dev)
    if phase == "prefill":
        padded = G.bucket_length(seq_len, policy)
        tokens = jax.ShapeDtypeStruct((batch, padded), jnp.int32, sharding=dev)
        start = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=dev)
        stages = G.prefill_stages(params, tokens, start, cfg, policy)
    elif phase == "decode":
        cache = _abstract_cache(cfg, seq_len, new_tokens, dtype, policy, batch)
        token = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=dev)
        stages = [G.Stage("decode", G.decode_step_fn, (params, token, cache), dict(cfg=cfg, policy=policy))]
    else:
        raise ValueError(f"phase must be 'prefill' or 'decode', got {phase!r}")
    out = []
    for s in stages:
        compiled, analysis = T.compile(s.fn, *s.args, target=target, **s.static)
        out.append((s, compiled, s.args, analysis))
    return out


def _check_request(**args) -> None:
    """InputError (a ValueError) for an argument of memory_report or plan that has no meaning: a length,
    batch or budget that is not a positive number, a dtype momjax does not run in, an unknown phase."""
    import math

    from momjax.api import InputError
    from momjax.config import KV_DTYPES, SUPPORTED_DTYPES

    def count(x):
        return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)) and x >= 1

    for name in ("seq_len", "batch", "new_tokens"):
        if name in args and not count(args[name]):
            raise InputError(f"{name} must be a positive integer, got {args[name]!r}")
    if args.get("context") is not None and not count(args["context"]):
        raise InputError(f"context must be a positive number of tokens, got {args['context']!r}")
    if args.get("kv_dtype") not in KV_DTYPES:
        raise InputError(f"kv_dtype must be None (the model's dtype) or 'int8', got {args['kv_dtype']!r}")
    if "dtype" in args:
        try:
            dtype = jnp.dtype(args["dtype"]).name
        except TypeError:
            dtype = None
        if dtype not in SUPPORTED_DTYPES:
            raise InputError(f"dtype must be one of {', '.join(SUPPORTED_DTYPES)}, got {args['dtype']!r}")
    if "phase" in args and args["phase"] not in ("prefill", "decode"):
        raise InputError(f"phase must be 'prefill' or 'decode', got {args['phase']!r}")
    if "source" in args and args["source"] not in ("auto", "xla", "estimate"):
        raise InputError(f"source must be 'auto', 'xla' or 'estimate', got {args['source']!r}")
    for name, minimum in (("hbm_bytes", 1), ("host_bytes", 0)):
        value = args.get(name)
        if name not in args or value is None:  # None: no host limit, or (hbm) the target's memory
            continue
        if isinstance(value, bool) or (isinstance(value, (int, float, np.number))
                                       and (not math.isfinite(value) or value < minimum)):
            raise InputError(f"{name} must be a size of at least {minimum} bytes, got {value!r}")
        if parse_bytes(value) < minimum:
            raise InputError(f"{name} must be a size of at least {minimum} bytes, got {value!r}")


def memory_report(model_or_config, seq_len: int, policy="mom", dtype="float32", phase="prefill", batch: int = 1,
                  new_tokens: int = DEFAULT_NEW_TOKENS, target=None) -> dict:
    """Bytes the compiled programs need, from XLA's memory analysis (no memory is allocated).

    model_or_config: a Model, a Config or a preset name. phase: "prefill" (the prompt of seq_len tokens)
    or "decode" (one step with seq_len prompt tokens cached and room for new_tokens).
    Returns device_bytes (the peak over the phase's programs of what is on the device: arguments, outputs and
    temporaries, aliasing counted once, plus what stays resident between programs: the weights, and in
    prefill the K/V of the layers already done when the policy keeps them on the device), host_bytes (pinned
    host arguments and outputs), weight_bytes, kv_bytes (the KV cache of the phase, wherever it lives),
    temp_bytes (XLA temporaries of the program at the peak) and source ("xla", or "xla-gpu:<target>").
    target: None or "cpu" = this machine's compiler (on CPU measure in float32: the CPU compiler upcasts
    bfloat16 matmuls and inflates bf16 figures); a GPU name ("h100", "a100-80gb", see momjax.targets) = XLA's
    GPU compiler for that GPU, deviceless, in any dtype (needs `pip install 'momjax[gpu-plan]'`). There the
    host-resident arguments (the prompt KV of a mom-stream decode step), which the deviceless compiler cannot
    be told about, are compiled as device arrays and moved by momjax from device_bytes to host_bytes (their
    bytes are in host_argument_counted_bytes), and the device copies the step makes of them (one layer's
    prompt K/V in flight), which that compile cannot show, are added to device_bytes. The figures are the compiled programs' buffer assignments, not
    a live allocator peak: no autotuning runs, and cuDNN workspaces count as 0.
    """
    _check_request(seq_len=seq_len, dtype=dtype, phase=phase, batch=batch, new_tokens=new_tokens)
    cfg = _resolve(model_or_config)
    policy = get_policy(policy)
    t = T.get(target)
    if t is not None:
        T.check_compiler()
    padded = G.bucket_length(seq_len, policy) if phase == "prefill" else seq_len
    report = dict(_memory_report(cfg, padded, policy, str(jnp.dtype(dtype)), phase, batch, new_tokens,
                                 None if t is None else t.name))
    report["seq_len"] = int(seq_len)
    return report


@functools.lru_cache(maxsize=256)
def _memory_report(cfg: Config, seq_len: int, policy: MemoryPolicy, dtype: str, phase: str, batch: int,
                   new_tokens: int, target: str | None = None) -> dict:
    programs = compile_program(cfg, seq_len, policy, dtype, phase, batch, new_tokens, target)
    weights = param_bytes(cfg, dtype)
    L = cfg.num_layers
    counted = 0  # host-resident argument bytes the GPU compiler was not told about (see memory_report)
    if phase == "decode":
        (_, compiled, args, b), = programs
        cache = args[2]
        device, host, temp, counted = b["device_bytes"], b["host_bytes"], b["temp_bytes"], b[
            "host_argument_counted_bytes"]
        kv_bytes = _nbytes(_kv_leaves(cache))
        streamed = L - policy.device_layers(L)
        if counted:
            # A GPU target compiled the host-resident prompt K/V as device arrays, so the copy that brings
            # them to the device is missing from its figure: add the one streamed layer the step holds at a
            # time (model.decode_step fetches layer l+1 once layer l's attention is done).
            device += min(streamed, 1) * _nbytes(_kv_leaves(cache, layer=L - 1, prompt_only=True))
        # What one step moves: the host-resident arguments cross the host link (read from this machine's
        # compile of the step, the only one that knows which arguments live in host memory: the same program
        # as a GPU target's), and everything else it reads comes from device memory.
        if target is None:
            h2d = T.host_parameter_bytes(compiled)
        elif not counted:
            h2d = 0  # nothing of the step lives in host memory
        else:
            h2d = _memory_report(cfg, seq_len, policy, dtype, phase, batch, new_tokens)["host_to_device_bytes"]
        extra = dict(host_to_device_bytes=int(h2d), device_read_bytes=int(b["argument_bytes"] - h2d))
    else:
        # Programs run one after another; between them the weights stay on the device, and so do the K/V of
        # finished layers when the policy keeps them there. The peak is the largest of: what a program holds
        # besides the weights it reads, plus the weights, plus the K/V still resident from earlier layers.
        layer_kv_device = 0
        device = host = temp = kv_bytes = 0
        extra = {}
        for stage, compiled, args, b in programs:
            own = b["device_bytes"] - _nbytes(args[0], "device")  # args[0]: the weights this program reads
            if stage.name in ("layer", "last"):
                _, k, v = T.output_avals(compiled)
                # Which outputs went to the host: from their shardings on this machine, from the compiler's
                # own count on a GPU target (deviceless shardings carry no memory kind).
                layer_kv_device = _nbytes((k, v)) - b["host_output_bytes"]
                kv_bytes = L * _nbytes((k, v))
                host = L * b["host_output_bytes"]
                counted += b["host_argument_counted_bytes"]
            layers_before = {"embed": 0, "layer": stage.runs - 1, "last": L - 1, "logits": L}[stage.name]
            peak = weights + own + layers_before * layer_kv_device
            if peak > device:
                device, temp = peak, b["temp_bytes"]
    return dict(
        device_bytes=int(device),
        host_bytes=int(host),
        weight_bytes=int(weights),
        kv_bytes=int(kv_bytes),
        temp_bytes=int(temp),
        host_argument_counted_bytes=int(counted),
        source=T.source_name(target),
        target=target or "cpu",
        seq_len=int(seq_len),
        phase=phase,
        policy=policy.name,
        dtype=str(jnp.dtype(dtype)),
        **extra,
    )


def _kv_leaves(cache: KVCache, layer=None, prompt_only=False):
    """The cache's K/V arrays (with the int8 scales when it has them), of one layer or all."""
    fields = ("k", "v", "k_scale", "v_scale") + (() if prompt_only else ("tail_k", "tail_v", "tail_k_scale",
                                                                          "tail_v_scale"))
    arrays = [getattr(cache, f) for f in fields]
    return [xs[layer] if layer is not None else xs for xs in arrays if xs]


# ---------------------------------------------------------------------- byte strings


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(text) -> int:
    """'80GiB', '80 GB', '1TiB', '512M' or a number of bytes -> int bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 80GiB, 80GB, 1TiB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


# ---------------------------------------------------------------------- analytic estimate


def estimate(model_or_config, seq_len: int, policy="mom", dtype="float32", phase="prefill", batch: int = 1,
             new_tokens: int = DEFAULT_NEW_TOKENS) -> dict:
    """Closed-form estimate of `memory_report` (same keys, source="estimate"). b = bytes per element,
    S = padded prompt length, C = mini-sequence length (S when the policy has none), N = new_tokens - 1,
    W = all weights, e = bytes of one token's K (or V) of one KV head: E b, or E + 4 with int8 K/V (int8
    values and a float32 scale), R = layers whose prompt K/V are on the device while decoding (L unless
    the policy streams; then its kv_device_layers). Prefill runs one program per layer; its peak is the
    last run of that program:

    KV (prompt)         = 2 L B K S e                       (device or pinned host, as the policy says)
    prefill temporaries = B b C (3F + D)                      (whole-layer mini-sequences)
                          B b [ S (2D + HE + 2KE) + C 3F ]    (MLP-only mini-sequences)
                          B b S (3F + D)                      (baseline: one chunk of S)
      3F + D: the MLP's gate, up and product and the layer's output for one mini-sequence (the residual
      stream and the layer's K/V are updated in place, chunk by chunk).
    prefill device      = W + B b S D (the residual stream, donated to the output) + temporaries
                          + the prompt KV when the policy keeps it on the device (all L layers' by then),
                          or else one layer's K/V on its way to the host (2 B K S e; the CPU compiler
                          writes it to host memory directly, so CPU figures come out that much lower)
    decode temporaries  = 8 B H (S + N) (one layer's float32 scores and probabilities), plus, when
                          streaming from the host, one layer's prompt K/V (the step fetches layer l+1 once
                          layer l's attention has read its own)
    decode device       = W + temporaries + R layers' prompt KV + tail KV (2 L B K N e) + logits (4 B V)
    host                = the prompt KV the policy places in pinned host memory (L - R layers' in decode).
    Per decode step: host_to_device_bytes = (L - R) layers' prompt K/V; device_read_bytes = W + R layers'
    prompt K/V + tail (every argument of the step is read once).
    Weights and K/V are read in place (per-layer arrays): no slice of either is copied.
    """
    cfg = _resolve(model_or_config)
    policy = get_policy(policy)
    b = jnp.dtype(dtype).itemsize
    L, D, H, K, E, F, V = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                           cfg.intermediate_size, cfg.vocab_size)
    B = batch
    W = param_bytes(cfg, dtype)
    e = E + 4 if policy.quantized_kv else E * b
    S = G.bucket_length(seq_len, policy) if phase == "prefill" else seq_len
    C = min(policy.minisequence or S, S)
    layer_kv = 2 * B * K * S * e
    kv_prompt = L * layer_kv
    logits = 4 * B * V
    extra = {}
    if phase == "prefill":
        if policy.minisequence is None or C == S:
            temp = B * b * S * (3 * F + D)
        elif policy.minisequence_scope == "mlp":
            temp = B * b * (S * (2 * D + H * E + 2 * K * E) + C * 3 * F)
        else:
            temp = B * b * C * (3 * F + D)
        on_device = policy.kv_prefill == "device"
        kv_bytes = kv_prompt
        device = W + B * b * S * D + temp + (kv_prompt if on_device else layer_kv)
        host = 0 if on_device else kv_prompt
    elif phase == "decode":
        N = max(new_tokens - 1, 1)
        tail = 2 * L * B * K * N * e
        R = policy.device_layers(L)
        temp = 8 * B * H * (S + N) + min(1, L - R) * layer_kv
        kv_bytes = kv_prompt + tail
        device = W + temp + logits + tail + R * layer_kv
        host = (L - R) * layer_kv
        extra = dict(host_to_device_bytes=int(host), device_read_bytes=int(W + R * layer_kv + tail))
    else:
        raise ValueError(f"phase must be 'prefill' or 'decode', got {phase!r}")
    return dict(device_bytes=int(device), host_bytes=int(host), weight_bytes=int(W), kv_bytes=int(kv_bytes),
                temp_bytes=int(temp), source="estimate", seq_len=int(seq_len), phase=phase, policy=policy.name,
                dtype=str(jnp.dtype(dtype)), **extra)


# ---------------------------------------------------------------------- planning


def _fits(cfg, seq_len, policy, dtype, hbm, host, new_tokens, measure) -> bool:
    for phase in ("prefill", "decode"):
        r = measure(cfg, seq_len, policy, dtype=dtype, phase=phase, new_tokens=new_tokens)
        if r["device_bytes"] > hbm or (host is not None and r["host_bytes"] > host):
            return False
    return True


def _measure(source: str, target=None):
    return estimate if source == "estimate" else functools.partial(memory_report, target=target)


def max_context(cfg: Config, policy, hbm_bytes: int, host_bytes: int | None = None, dtype="bfloat16",
                new_tokens: int = DEFAULT_NEW_TOKENS, source: str = "estimate", resolution: int = 1024,
                target=None) -> int:
    """The longest prompt (to `resolution` tokens) whose prefill and decode both fit; 0 if none does.

    source="estimate" uses `estimate` (instant); source="xla" compiles the programs at each step (for
    `target`, see memory_report).
    """
    policy = get_policy(policy)
    measure = _measure(source, target)
    fits = lambda n: _fits(cfg, n, policy, dtype, hbm_bytes, host_bytes, new_tokens, measure)
    if not fits(resolution):
        return 0
    lo, hi = resolution, 2 * resolution
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > 2**34:
            return lo
    while hi - lo > resolution:  # invariant: fits(lo) and not fits(hi)
        mid = (lo + hi) // 2 // resolution * resolution
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def plan(model_or_config, hbm_bytes=None, host_bytes=None, dtype="bfloat16", new_tokens: int = DEFAULT_NEW_TOKENS,
         source: str = "auto", target=None, kv_dtype=None, context: int | None = None) -> dict:
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
    Raises ValueError when the budget cannot hold even the weights (TargetError for an unknown target),
    InputError when no policy fits `context`.
    """
    _check_request(dtype=dtype, new_tokens=new_tokens, hbm_bytes=hbm_bytes, host_bytes=host_bytes, source=source,
                   kv_dtype=kv_dtype, context=context)
    cfg = _resolve(model_or_config)
    t = T.get(target)
    if hbm_bytes is None:
        if t is None:
            raise ValueError("give the device budget (hbm_bytes, e.g. '80GiB') or a GPU target such as 'h100'")
        hbm_bytes = t.memory_bytes
    if t is not None and source != "estimate":
        T.check_compiler()
    hbm, host = parse_bytes(hbm_bytes), (None if host_bytes is None else parse_bytes(host_bytes))
    weights = param_bytes(cfg, dtype)
    if weights >= hbm:
        raise ValueError(
            f"the weights alone need {format_bytes(weights)} in {jnp.dtype(dtype)}, more than the "
            f"{format_bytes(hbm)} device budget; use a smaller dtype or a larger device"
        )
    if source == "auto":
        source = "xla" if _on_gpu() or t is not None else "estimate"
    result = {"max_context": {}, "source": {}, "weight_bytes": weights, "hbm_bytes": hbm, "host_bytes": host,
              "dtype": str(jnp.dtype(dtype)), "kv_dtype": kv_dtype, "new_tokens": new_tokens, "limits": {},
              "target": None if t is None else dict(
                  name=t.name, description=t.description, memory_bytes=t.memory_bytes,
                  memory_bandwidth=t.memory_bandwidth, host_link=t.host_link,
                  host_link_bandwidth=t.host_link_bandwidth)}
    for name in ("baseline", "mom", "mom-stream"):
        policy = get_policy(name).replace(kv_dtype=kv_dtype)
        n = max_context(cfg, policy, hbm, host, dtype, new_tokens, source="estimate")
        if source == "xla" and n:
            # Refine around the estimate with the compiled programs (a few compiles, not a full search).
            n = _refine_with_xla(cfg, policy, n, hbm, host, dtype, new_tokens, target=t)
        result["max_context"][name] = n
        result["source"][name] = T.source_name(t) if source == "xla" else source
        result["limits"][name] = _limiting_phase(cfg, policy, n, hbm, host, dtype, new_tokens, source, target=t)
    if context is not None:
        _plan_decode(result, cfg, context, hbm, host, dtype, new_tokens, source, t, kv_dtype)
    return result


def decode_speed(step: dict, target) -> dict:
    """Predicted decode speed of a decode-step report (memory_report or estimate, phase="decode") on target:
    a roofline from the bytes the step moves. device seconds = (device_read_bytes + host_to_device_bytes) /
    memory bandwidth (streamed K/V are read again from device memory once they arrive); link seconds =
    host_to_device_bytes / host link bandwidth. The step brings each streamed layer over while the layer
    before it finishes (model.decode_step), so copies overlap the reads of weights and resident K/V, but a
    streamed layer's attention waits for its copy: a step takes max(device seconds, link seconds + the
    streamed K/V's read time) ("overlapped"); the plain sum is given too, as the bound if nothing
    overlapped. Compute is not counted: one token's matmuls are far below either limit. Returns {} without
    a target (no bandwidths known)."""
    t = T.get(target)
    if t is None:
        return {}
    streamed = step["host_to_device_bytes"]
    device_s = (step["device_read_bytes"] + streamed) / t.memory_bandwidth
    link_s = streamed / t.host_link_bandwidth
    overlapped = max(device_s, link_s + streamed / t.memory_bandwidth)
    return dict(decode_tokens_per_s=1 / overlapped, decode_tokens_per_s_serial=1 / (device_s + link_s),
                device_s=device_s, link_s=link_s, bound="host link" if overlapped > device_s else "device memory",
                overlap="overlapped")


def _plan_decode(result, cfg, context, hbm, host, dtype, new_tokens, source, t, kv_dtype) -> None:
    """result["decode"] and result["recommended"] for a prompt of `context` tokens (see plan)."""
    from momjax.api import InputError

    measure = _measure(source, t)
    candidates = {}
    for kv in (None,) if kv_dtype is None else (None, "int8"):
        for name in ("baseline", "mom", "mom-stream"):
            policy = get_policy(name).replace(kv_dtype=kv)
            if name == "mom-stream":
                policy = _most_resident(cfg, context, policy, dtype, hbm, host, new_tokens, source, t)
            fits = policy is not None and _fits(cfg, context, policy, dtype, hbm, host, new_tokens, measure)
            entry = dict(policy=name, kv_dtype=kv, fits=bool(fits),
                         kv_device_layers=None if not fits or name != "mom-stream" else policy.kv_device_layers or 0)
            if fits:
                step = measure(cfg, context, policy, dtype=dtype, phase="decode", new_tokens=new_tokens)
                entry.update(host_to_device_bytes=step["host_to_device_bytes"],
                             device_read_bytes=step["device_read_bytes"], **decode_speed(step, t))
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
    if t is not None:
        best = max(fitting, key=lambda c: c["decode_tokens_per_s"])
    else:  # no bandwidths: fewest bytes across the host link, then fewest read from device memory
        best = min(fitting, key=lambda c: (c["host_to_device_bytes"], c["device_read_bytes"]))
    result["recommended"] = dict(best)


def _most_resident(cfg, context, policy, dtype, hbm, host, new_tokens, source, t):
    """mom-stream with the most layers' prompt K/V kept on the device that still fits at `context` (the
    estimate chooses, the compiled programs confirm when source is "xla"); None when even 0 does not fit."""
    L = cfg.num_layers
    fits_estimate = lambda r: _fits(cfg, context, policy.replace(kv_device_layers=r), dtype, hbm, host, new_tokens,
                                    estimate)
    r = next((r for r in range(L, -1, -1) if fits_estimate(r)), None)
    if r is None:
        r = 0
    if source == "xla":
        confirm = lambda r: _fits(cfg, context, policy.replace(kv_device_layers=r), dtype, hbm, host, new_tokens,
                                  _measure("xla", t))
        while r > 0 and not confirm(r):
            r -= 1
    return policy.replace(kv_device_layers=r)


def _refine_with_xla(cfg, policy, guess, hbm, host, dtype, new_tokens, target=None) -> int:
    """Bisect with the compiled programs within +-30% of the estimate (about ten compiles per policy)."""
    fits = lambda n: _fits(cfg, n, get_policy(policy), dtype, hbm, host, new_tokens, _measure("xla", target))
    resolution = max(1024, guess // 200 // 1024 * 1024)
    lo, hi = max(int(guess * 0.7) // 1024 * 1024, 1024), int(guess * 1.3) // 1024 * 1024 + 1024
    if not fits(lo):
        return max_context(cfg, policy, hbm, host, dtype, new_tokens, source="xla", resolution=resolution,
                           target=target)
    if fits(hi):
        return hi
    while hi - lo > resolution:
        mid = (lo + hi) // 2 // 1024 * 1024
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _limiting_phase(cfg, policy, n, hbm, host, dtype, new_tokens, source, target=None) -> str:
    """Which budget stops a longer context: 'prefill', 'decode' or 'host'."""
    measure = _measure(source, target)
    step = max(n // 50, 1024)
    for phase in ("prefill", "decode"):
        r = measure(cfg, n + step, policy, dtype=dtype, phase=phase, new_tokens=new_tokens)
        if host is not None and r["host_bytes"] > host:
            return "host"
        if r["device_bytes"] > hbm:
            return phase
    return "?"


def plan_table(result: dict) -> str:
    """A readable table of `plan`'s result."""
    lines = [
        f"device budget {format_bytes(result['hbm_bytes'])}"
        + (f", host budget {format_bytes(result['host_bytes'])}" if result["host_bytes"] else "")
        + f", {result['dtype']}, weights {format_bytes(result['weight_bytes'])}, "
        f"room for {result['new_tokens']} new tokens",
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
    tgt = result["target"]
    lines = [f"decoding after a {result['context']:,}-token prompt"
             + (f" on {tgt['name']}: predicted tokens/s, a roofline of the step's bytes at "
                f"{tgt['memory_bandwidth'] / 1e9:,.0f} GB/s memory and {tgt['host_link_bandwidth'] / 1e9:.1f} "
                f"GB/s {tgt['host_link']} (copies overlapped with compute as the step issues them; not measured "
                "on a GPU)" if tgt else " (give --target for predicted speed)"),
             f"{'policy':<18}{'K/V':<6}{'layers on device':>17}{'host->device/token':>20}{'tokens/s':>10}"]
    for c in result["decode"].values():
        kv = c["kv_dtype"] or result["dtype"].replace("bfloat16", "bf16").replace("float", "f")
        if not c["fits"]:
            lines.append(f"{c['policy']:<18}{kv:<6}{'does not fit':>17}")
            continue
        layers = "all" if c["kv_device_layers"] is None else str(c["kv_device_layers"])
        speed = f"{c['decode_tokens_per_s']:>10.2f}" if "decode_tokens_per_s" in c else f"{'-':>10}"
        lines.append(f"{c['policy']:<18}{kv:<6}{layers:>17}{format_bytes(c['host_to_device_bytes']):>20}{speed}")
    rec = result["recommended"]
    text = rec["policy"] + (f" with kv_device_layers={rec['kv_device_layers']}" if rec["kv_device_layers"] else "")
    text += f", {rec['kv_dtype']} K/V" if rec["kv_dtype"] else ""
    lines.append(f"recommended: {text}"
                 + (f" ({rec['decode_tokens_per_s']:.2f} tokens/s predicted)" if "decode_tokens_per_s" in rec else ""))
    return "\n".join(lines)
