"""Memory measured from the compiled programs themselves: `memory_report` compiles the real prefill (or
decode-step) programs with abstract inputs (`jax.ShapeDtypeStruct`) and reads `compiled.memory_analysis()`, so
an 8B model at 128k tokens is measured on a laptop CPU without allocating anything. The CPU backend does not
split host from device bytes, so host-placed arguments and outputs are counted from their shardings and taken
out. With `target="h100"` (or another of momjax.targets.TARGETS) the same programs are compiled by XLA's GPU
compiler for that GPU, without a GPU (momjax.targets explains what those figures are).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from momjax import checks
from momjax import generation as G
from momjax import offload_programs
from momjax import targets as T
from momjax.cache import sharding
from momjax.config import Config
from momjax.errors import InputError
from momjax.memory.estimate import with_host_weights
from momjax.memory.shapes import DEFAULT_NEW_TOKENS, abstract_cache, kv_leaves, nbytes, placement, resolve
from momjax.mesh import check_degree
from momjax.params import abstract_params, head_params, param_bytes
from momjax.policy import MemoryPolicy, get_policy


def compile_program(cfg: Config, seq_len: int, policy: MemoryPolicy, dtype="float32", phase="prefill", batch=1,
                    new_tokens=DEFAULT_NEW_TOKENS, target=None, devices: int = 1):
    """The compiled programs of a prefill or a decode step, for abstract inputs: [(stage, compiled, args, bytes)].

    Prefill is several programs (generation.prefill_stages: embed, one per-layer program run for every layer,
    the last layer, logits); a decode step is one. bytes: each program's memory analysis split into device
    and host bytes (momjax.targets.analyse). target: None = this machine's compiler, or a GPU (momjax.targets).
    devices > 1: the programs of the model split tensor-parallel over that many devices (momjax.mesh), described
    on an abstract mesh and compiled for this machine's first `devices` devices or the target's (per-device bytes).
    """
    dtype = jnp.dtype(dtype)
    mesh = _mesh(devices)
    dev = placement(mesh)("device")
    params = abstract_params(cfg, dtype, sharding=dev, mesh=mesh)
    if phase == "prefill":
        padded = G.bucket_length(seq_len, policy)
        tokens = jax.ShapeDtypeStruct((batch, padded), jnp.int32, sharding=dev)
        start = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=dev)
        stages = G.prefill_stages(params, tokens, start, cfg, policy)
    elif phase == "decode":
        cache = abstract_cache(cfg, seq_len, new_tokens, dtype, policy, batch, mesh)
        token = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=dev)
        stages = [G.Stage("decode", G.decode_step_fn, (params, token, cache), dict(cfg=cfg, policy=policy))]
    else:
        raise InputError(f"phase must be 'prefill' or 'decode', got {phase!r}")
    out = []
    for s in stages:
        compiled, analysis = T.compile(s.fn, *s.args, target=target, **s.static)
        out.append((s, compiled, s.args, analysis))
    return out


def memory_report(model_or_config, seq_len: int, policy="mom", dtype=None, phase="prefill", batch: int = 1,
                  new_tokens: int = DEFAULT_NEW_TOKENS, target=None, devices: int = 1, weights=None) -> dict:
    """Bytes the compiled programs need, from XLA's memory analysis (no memory is allocated).

    model_or_config: a Model, a Config or a preset name. phase: "prefill" (the prompt of seq_len tokens)
    or "decode" (one step with seq_len prompt tokens cached and room for new_tokens). dtype: None = a loaded
    Model's own dtype, or float32 for a Config or a preset (what this machine's CPU compiler measures faithfully);
    the report's "dtype" says which was used.
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
    prompt K/V in flight), which that compile cannot show, are added to device_bytes. The figures are the
    compiled programs' buffer assignments, not a live allocator peak: no autotuning runs, and cuDNN workspaces
    count as 0.
    devices = n > 1: the programs compiled for the model split tensor-parallel over n devices (momjax.mesh): n of
    this machine's devices (on a CPU, start JAX with XLA_FLAGS=--xla_force_host_platform_device_count=n) or n
    GPUs of the target in one host, without GPUs. Every figure is then per device except host_bytes (all
    devices' together), and a decode step adds allreduce_bytes (its all-reduces, read from the compiled program,
    as the bytes each device sends in a ring).
    weights: "device", or "host" (momjax.load(..., weights="host")): the weights counted in host_bytes, two
    layers' and the larger of the embedding and the LM head on the device (each device's share of them on a mesh),
    and in decode all of them streamed every step (in host_to_device_bytes). The programs are the same (the weights come over before
    each prefill program, and a decode step copies them in its program a layer at a time), so the figures are the
    compiled ones with the weights' bytes moved (memory.estimate.with_host_weights). None: a loaded Model's own
    placement, else "device".
    """
    if dtype is None:  # a loaded model's own dtype; for a Config or a preset, float32 (see above)
        dtype = str(jnp.dtype(model_or_config.dtype)) if hasattr(model_or_config, "params") else "float32"
    checks.memory_request(seq_len=seq_len, dtype=dtype, phase=phase, batch=batch, new_tokens=new_tokens)
    cfg = resolve(model_or_config)
    policy = get_policy(policy)
    n = checks.devices(devices)
    check_degree(cfg, n)
    t = T.get(target)
    if t is not None:
        T.check_compiler()
    padded = G.bucket_length(seq_len, policy) if phase == "prefill" else seq_len
    weights = _weights_placement(model_or_config, weights, policy)
    if policy.on_host:
        report = dict(_host_report(cfg, padded, policy, str(jnp.dtype(dtype)), phase, batch, new_tokens,
                                   None if t is None else t.name, weights, n))
        report["seq_len"] = int(seq_len)
        return report
    report = dict(_memory_report(cfg, padded, policy, str(jnp.dtype(dtype)), phase, batch, new_tokens,
                                 None if t is None else t.name, n))
    report["seq_len"] = int(seq_len)
    return with_host_weights(report, cfg, n, weights)


@functools.lru_cache(maxsize=256)
def _memory_report(cfg: Config, seq_len: int, policy: MemoryPolicy, dtype: str, phase: str, batch: int,
                   new_tokens: int, target: str | None = None, devices: int = 1) -> dict:
    programs = compile_program(cfg, seq_len, policy, dtype, phase, batch, new_tokens, target, devices)
    weights = param_bytes(cfg, dtype, devices)
    L = cfg.num_layers
    counted = 0  # host-resident argument bytes the GPU compiler was not told about (see memory_report)
    if phase == "decode":
        (_, compiled, args, b), = programs
        cache = args[2]
        device, host, temp, counted = b["device_bytes"], b["host_bytes"], b["temp_bytes"], b[
            "host_argument_counted_bytes"]
        kv_bytes = nbytes(kv_leaves(cache))
        streamed = L - policy.device_layers(L)
        if counted:
            # A GPU target compiled the host-resident prompt K/V as device arrays, so the copy that brings
            # them to the device is missing from its figure: add the one streamed layer the step holds at a
            # time (model.decode_step fetches layer l+1 once layer l's attention is done).
            device += min(streamed, 1) * nbytes(kv_leaves(cache, layer=L - 1, prompt_only=True))
        # What one step moves: the host-resident arguments cross the host link (read from this machine's
        # compile of the step, the only one that knows which arguments live in host memory: the same program
        # as a GPU target's), and everything else it reads comes from device memory.
        if target is None:
            h2d = T.host_parameter_bytes(compiled)
        elif not counted:
            h2d = 0  # nothing of the step lives in host memory
        elif devices > 1:  # the per-device host-resident arguments momjax described (this CPU may lack n devices)
            h2d = counted
        else:
            h2d = _memory_report(cfg, seq_len, policy, dtype, phase, batch, new_tokens)["host_to_device_bytes"]
        extra = dict(host_to_device_bytes=int(h2d), device_read_bytes=int(b["argument_bytes"] - h2d),
                     allreduce_bytes=T.allreduce_bytes(compiled, devices))
    else:
        # Programs run one after another; between them the weights stay on the device, and so do the K/V of
        # finished layers when the policy keeps them there. The peak is the largest of: what a program holds
        # besides the weights it reads, plus the weights, plus the K/V still resident from earlier layers.
        layer_kv_device = 0
        device = host = temp = kv_bytes = 0
        extra = {}
        for stage, compiled, args, b in programs:
            own = b["device_bytes"] - nbytes(args[0], "device")  # args[0]: the weights this program reads
            if stage.name in ("layer", "last"):
                _, k, v = T.output_avals(compiled)
                # Which outputs went to the host: from their shardings on this machine, from the compiler's
                # own count on a GPU target (deviceless shardings carry no memory kind).
                layer_kv_device = nbytes((k, v)) - b["host_output_bytes"]
                kv_bytes = L * nbytes((k, v))
                host = L * b["host_output_bytes"]
                counted += b["host_argument_counted_bytes"]
            layers_before = {"embed": 0, "layer": stage.runs - 1, "last": L - 1, "logits": L}[stage.name]
            peak = weights + own + layers_before * layer_kv_device
            if peak > device:
                device, temp = peak, b["temp_bytes"]
    return dict(
        device_bytes=int(device),
        host_bytes=int(host) * devices,  # every device's own pinned host memory, together
        weight_bytes=int(weights),
        kv_bytes=int(kv_bytes),
        temp_bytes=int(temp),
        host_argument_counted_bytes=int(counted),
        devices=devices,
        source=T.source_name(target),
        target=target or "cpu",
        seq_len=int(seq_len),
        phase=phase,
        policy=policy.name,
        dtype=str(jnp.dtype(dtype)),
        **extra,
    )


def _mesh(devices: int):
    """The abstract mesh programs for `devices` devices are described on (None for one device)."""
    return None if devices == 1 else jax.sharding.AbstractMesh((1, devices), ("dp", "tp"))


@functools.lru_cache(maxsize=64)
def _host_programs(cfg: Config, policy: MemoryPolicy, dtype: str, phase: str, batch: int, new_tokens: int,
                   target: str | None, chunk: int, devices: int = 1) -> tuple:
    """`mom-host`'s programs compiled once for a shape (they do not depend on the prompt's length, save for the
    chunk length of a short prompt): ((name, device bytes besides its weights, held, temp bytes, all-reduce
    bytes), ...), per device of `devices`."""
    mesh = _mesh(devices)
    where = placement(mesh)
    params = abstract_params(cfg, jnp.dtype(dtype), sharding=where("device"), mesh=mesh)
    out = []
    weights = {id(params.embed)} | {id(a) for a in jax.tree.leaves((params.layers[0], head_params(params)))}
    for stage, held in offload_programs.stages(params, cfg, policy, chunk, phase, batch, new_tokens, where, devices):
        compiled, b = T.compile(stage.fn, *stage.args, target=target, **stage.static)
        # What the program holds besides the weights: its arguments counted without the weights (XLA leaves the
        # weights a program does not read out of its argument size, so they cannot simply be subtracted).
        others = sum(nbytes(a) for a in jax.tree.leaves(stage.args) if id(a) not in weights)
        own = b["device_bytes"] - b["argument_bytes"] + others
        out.append((stage.name, own, held, b["temp_bytes"], T.allreduce_bytes(compiled, devices)))
    return tuple(out)


def _weights_placement(model_or_config, weights, policy: MemoryPolicy) -> str:
    """"device" or "host": the weights argument of a report, a loaded Model's own placement when it is None."""
    if weights is None:
        weights = getattr(model_or_config, "weights", "device")
    if weights not in ("device", "host"):
        raise InputError(f"weights must be 'device' or 'host', got {weights!r}")
    return weights


def _host_report(cfg: Config, seq_len: int, policy: MemoryPolicy, dtype: str, phase: str, batch: int,
                 new_tokens: int, target: str | None, weights: str = "device", devices: int = 1) -> dict:
    """memory_report for `mom-host` (momjax.offload): the peak over its programs of what each holds besides the
    weights, plus what stays on the device between them, plus the weights. The programs' shapes do not grow with
    the context, so they are compiled once and only the resident layers' blocks (kv_device_layers) and the host
    figures depend on seq_len. Per device of `devices`; host_bytes all devices' together."""
    w = offload_programs.weight_bytes(cfg, dtype, weights, devices=devices)
    chunk = min(policy.minisequence, seq_len)
    programs = _host_programs(cfg, policy, dtype, phase, batch, new_tokens, target, chunk, devices)
    # `held` of the resident layers' blocks depends on seq_len: recompute it for this length (no compile).
    where = placement(_mesh(devices))
    params = abstract_params(cfg, jnp.dtype(dtype), sharding=where("device"), mesh=_mesh(devices))
    held = {s.name: h for s, h in offload_programs.stages(params, cfg, policy, seq_len, phase, batch, new_tokens,
                                                          where, devices)}
    device, temp = 0, 0
    for name, own, _, program_temp, _ in programs:
        if w["device"] + own + held[name] > device:
            device, temp = w["device"] + own + held[name], program_temp
    h = offload_programs.host_bytes(cfg, policy, seq_len, dtype, batch, phase, devices)
    report = dict(device_bytes=int(device), host_bytes=int(h["host"] + w["host"]), weight_bytes=int(w["total"]),
                  kv_bytes=int(h["kv"]), temp_bytes=int(temp), host_argument_counted_bytes=0, devices=devices,
                  source=T.source_name(target), target=target or "cpu", seq_len=int(seq_len), phase=phase,
                  policy=policy.name, dtype=dtype, weights=weights)
    if phase == "decode":
        n = max(new_tokens - 1, 1)
        e = cfg.head_dim + 4 if policy.quantized_kv else cfg.head_dim * jnp.dtype(dtype).itemsize
        tails = 2 * cfg.num_layers * batch * cfg.num_kv_heads // devices * n * e
        resident = policy.device_layers(cfg.num_layers) * h["layer_kv"]
        report.update(kv_bytes=int(h["kv"] + tails), host_to_device_bytes=int(h["streamed"] + w["streamed"]),
                      device_read_bytes=int(w["total"] - w["streamed"] + resident + tails),
                      allreduce_bytes=_host_allreduce(cfg, policy, seq_len, weights, programs))
    return report


def _host_allreduce(cfg: Config, policy: MemoryPolicy, seq_len: int, weights: str, programs) -> int:
    """Bytes each device sends in one `mom-host` decode step's all-reduces: each program's (read from its compiled
    text) times the runs of it in a step: the embedding lookup once (with device weights; host weights look the
    row up on the host), the other layers' qkv, every layer's blocks and finish, and the LM head once."""
    L = cfg.num_layers
    block, heads = offload_programs.layout(cfg, policy, min(policy.minisequence, seq_len))
    runs = dict(embed=weights == "device", qkv=L - (weights == "device"),
                attend=L * -(-seq_len // block) * (cfg.num_kv_heads // heads), finish=L, logits=1)
    return int(sum(runs[name] * reduced for name, _, _, _, reduced in programs))


def feed_memory_report(model_or_config, length: int, new_tokens: int, policy="mom", dtype="float32",
                       target=None) -> dict:
    """Device bytes of a session feed of new_tokens tokens into a session holding `length`, from XLA's memory
    analysis of the feed's compiled programs with abstract inputs, composed as `memory_report` composes a
    prefill's: between programs the weights stay on the device, and so does the whole cache when the policy
    keeps it there. target: as in `memory_report` (None = this machine's compiler, or a GPU name).
    Returns device_bytes, host_bytes, weight_bytes, kv_bytes (the buffers) and capacity."""
    cfg = resolve(model_or_config)
    policy = get_policy(policy)
    dtype = jnp.dtype(dtype)
    width = G.bucket_length(new_tokens, policy)
    capacity = G.bucket_length(length + new_tokens, policy)  # as Session._reserve grows it
    dev = sharding("device")
    params = abstract_params(cfg, dtype, sharding=dev)
    tokens = jax.ShapeDtypeStruct((1, width), jnp.int32, sharding=dev)
    shape, kv_dtype = (1, cfg.num_kv_heads, capacity, cfg.head_dim), jnp.int8 if policy.quantized_kv else dtype
    buf = jax.ShapeDtypeStruct(shape, kv_dtype, sharding=sharding(policy.kv_prefill))
    if policy.quantized_kv:
        buf = (buf, jax.ShapeDtypeStruct(shape[:3], jnp.float32, sharding=sharding(policy.kv_prefill)))
    layer_kv = 2 * sum(int(np.prod(b.shape)) * jnp.dtype(b.dtype).itemsize for b in jax.tree.leaves(buf))
    on_device = policy.kv_prefill == "device"
    weights = param_bytes(cfg, dtype)
    L, device = cfg.num_layers, 0
    for stage in G.feed_stages(params, tokens, buf, buf, cfg, policy):
        _, b = T.compile(stage.fn, *stage.args, target=target, **stage.static)
        own = b["device_bytes"] - nbytes(stage.args[0], "device")  # args[0]: the weights it reads
        if b["host_argument_counted_bytes"]:
            # A GPU target compiled the host-resident buffers as device arrays, so the program's copy of this
            # layer's K/V on the device is missing from its figure: add it.
            own += layer_kv
        others = (L - 1 if stage.name in ("layer", "last") else L) * layer_kv * on_device  # this layer's is an arg
        device = max(device, weights + own + others)
    return dict(device_bytes=int(device), host_bytes=0 if on_device else L * layer_kv, weight_bytes=int(weights),
                kv_bytes=L * layer_kv, capacity=capacity, length=int(length), new_tokens=int(new_tokens),
                policy=policy.name, dtype=str(dtype), source="xla" if target is None else f"xla-gpu:{target}")
