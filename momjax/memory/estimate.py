"""A closed-form model of the same programs memory_report compiles (formulas in `estimate`'s docstring), checked
against the compiled figures in tests/test_memory.py: instant, at any length."""

from __future__ import annotations

import jax.numpy as jnp

from momjax import checks, offload_programs
from momjax import generation as G
from momjax.errors import InputError
from momjax.memory.shapes import DEFAULT_NEW_TOKENS, resolve
from momjax.params import param_bytes
from momjax.policy import get_policy


def estimate(model_or_config, seq_len: int, policy="mom", dtype="float32", phase="prefill", batch: int = 1,
             new_tokens: int = DEFAULT_NEW_TOKENS, devices: int = 1, weights: str = "device") -> dict:
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
    prompt K/V + tail (every argument of the step is read once). Weights and K/V are read in place.

    devices = n > 1: the model split tensor-parallel over n devices (momjax.mesh); every figure but host_bytes is
    per device. W is each device's share (params.param_bytes), K, H and F (when it divides) become K/n, H/n and
    F/n, the residual stream (B b S D) stays whole on every device, and the logits split with the vocabulary
    when it divides. host_bytes is all devices' together (what one host holds for them). A decode step adds
    allreduce_bytes = (2 L + 1) x (2 (n - 1) / n) B D b: the two all-reduces of the residual stream per layer and
    the embedding lookup's (when the vocabulary splits), as the bytes each device sends in a ring all-reduce.
    mom-host: `_host_estimate`. weights="host" (the others): `with_host_weights`."""
    cfg = resolve(model_or_config)
    policy = get_policy(policy)
    b = jnp.dtype(dtype).itemsize
    L, D, H, K, E, F, V = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                           cfg.intermediate_size, cfg.vocab_size)
    B, n = batch, checks.devices(devices)
    W = param_bytes(cfg, dtype, n)
    embed_split = n > 1 and V % n == 0  # then the embedding lookup ends in an all-reduce too
    H, K = H // n, K // n  # whole heads per device (momjax.mesh refuses degrees that do not divide them)
    F = F // n if F % n == 0 else F
    V = V // n if V % n == 0 else V
    e = E + 4 if policy.quantized_kv else E * b
    S = G.bucket_length(seq_len, policy) if phase == "prefill" else seq_len
    C = min(policy.minisequence or S, S)
    layer_kv = 2 * B * K * S * e
    kv_prompt = L * layer_kv
    logits = 4 * B * V
    extra = {}
    if policy.on_host:
        return _host_estimate(cfg, seq_len, policy, dtype, phase, batch, new_tokens, n, weights)
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
        host = 0 if on_device else n * kv_prompt
    elif phase == "decode":
        N = max(new_tokens - 1, 1)
        tail = 2 * L * B * K * N * e
        R = policy.device_layers(L)
        temp = 8 * B * H * (S + N) + min(1, L - R) * layer_kv
        kv_bytes = kv_prompt + tail
        device = W + temp + logits + tail + R * layer_kv
        host = n * (L - R) * layer_kv
        extra = dict(host_to_device_bytes=int(host // n), device_read_bytes=int(W + R * layer_kv + tail),
                     allreduce_bytes=int((2 * L + embed_split) * 2 * (n - 1) * B * D * b // n))
    else:
        raise InputError(f"phase must be 'prefill' or 'decode', got {phase!r}")
    report = dict(device_bytes=int(device), host_bytes=int(host), weight_bytes=int(W), kv_bytes=int(kv_bytes),
                  temp_bytes=int(temp), source="estimate", seq_len=int(seq_len), phase=phase, policy=policy.name)
    return with_host_weights(dict(report, dtype=str(jnp.dtype(dtype)), devices=n, **extra), cfg, n, weights)


def with_host_weights(report: dict, cfg, devices: int, weights: str) -> dict:
    """A report of baseline, mom or mom-stream with weights on the device, turned into the same policy's with
    weights="host": each device holds two layers' share of the weights (one running, the next arriving) and the
    larger of the embedding's and the LM head's instead of all of its share, host memory holds every device's
    share, and a decode step brings each device's share of every layer, of the embedding (its lookup runs in the
    step) and of the LM head over its host link (offload_programs.weight_bytes). weights="device" returns the
    report as it is."""
    if weights == "device":
        return report
    if weights != "host":
        raise InputError(f"weights must be 'device' or 'host', got {weights!r}")
    w = offload_programs.weight_bytes(cfg, report["dtype"], "host", lookup_on_host=False, devices=devices)
    out = dict(report, device_bytes=report["device_bytes"] - w["total"] + w["device"],
               host_bytes=report["host_bytes"] + w["host"], weights="host")
    if report["phase"] == "decode":
        out.update(host_to_device_bytes=report["host_to_device_bytes"] + w["streamed"],
                   device_read_bytes=report["device_read_bytes"] - w["total"])  # every weight arrives by the link
    return out


def _host_estimate(cfg, seq_len: int, policy, dtype, phase: str, batch: int, new_tokens: int, devices: int,
                   weights: str = "device") -> dict:
    """`estimate` for `mom-host` (momjax.offload), whose device bytes do not grow with the context. With C the
    chunk (mini-sequence), Bk x Kg the streamed block (host_block tokens x host_heads KV heads), qb the query
    tile and kb the key tile:

    prefill device = W + the larger of its two big programs, each holding every group's float32 attention state
                     for the chunk (4 B H C (E + 2)):
                       the rest of the layer: B C b (3F + 2D)  (the MLP, the residual in and out)
                       a block's attention: B C b (D + H E) (the residual and the queries) + 2 blocks (2 B Kg Bk e
                         each: the one read, the one arriving) + 8 B H qb kb (a tile's scores and probabilities)
    decode device  = W + tails (2 L B K N e) + R layers' K/V + 2 blocks + 4 B V (logits)
    host           = 2 L B K S e (every layer's K/V) + B (S + C) D b in prefill (the residual stream, and the
                     chunk being written back)
    Per decode step: host_to_device_bytes = (L - R) layers' K/V; device_read_bytes = W + R layers' K/V + tails.
    weights="host": W on the device becomes two layers' weights and the larger of the embedding and the LM head,
    host gains all the weights, and a decode step streams every layer's and the LM head
    (offload_programs.weight_bytes).
    devices = n > 1 (momjax.mesh): per device as `estimate` says (W, K, H, F and V each device's share; a block
    holds all KV heads, split over the devices; the residual stream in host memory is split on D, and whole on
    the device); host_bytes is all devices' together, and a decode step adds the same all-reduces as the other
    policies' (none for the embedding when the token's row is looked up on the host, with host weights).
    """
    n = devices
    b = jnp.dtype(dtype).itemsize
    L, D, H, K, E, F, V = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                           cfg.intermediate_size, cfg.vocab_size)
    embed_split = n > 1 and V % n == 0 and weights == "device"  # then the token's lookup ends in an all-reduce
    H, K = H // n, K // n
    F = F // n if F % n == 0 else F
    V = V // n if V % n == 0 else V
    B = batch
    S = G.bucket_length(seq_len, policy) if phase == "prefill" else seq_len
    C = min(policy.minisequence, S)
    block, heads = offload_programs.layout(cfg, policy, C, n)
    e = E + 4 if policy.quantized_kv else E * b
    blocks = 2 * 2 * B * (heads // n) * block * e
    w = offload_programs.weight_bytes(cfg, dtype, weights, devices=n)
    W = w["device"]
    h = offload_programs.host_bytes(cfg, policy, seq_len, dtype, batch, phase, n)
    R = policy.device_layers(L)
    extra = {}
    if phase == "prefill":
        qb, kb = min(policy.q_block, C), min(policy.kv_block, block)
        states = 4 * B * H * C * (E + 2)  # every group's float32 attention state for the chunk's queries
        finish = B * C * b * (3 * F + 2 * D) + states
        attend = B * C * b * (D + H * E) + states + blocks + 8 * B * H * qb * kb
        temp = max(finish, attend)
        device, kv_bytes = W + temp, h["kv"]
    elif phase == "decode":
        N = max(new_tokens - 1, 1)
        tails = 2 * L * B * K * N * e
        temp = blocks + 4 * B * V
        device, kv_bytes = W + tails + R * h["layer_kv"] + temp, h["kv"] + tails
        extra = dict(host_to_device_bytes=int(h["streamed"] + w["streamed"]),
                     device_read_bytes=int(w["total"] - w["streamed"] + R * h["layer_kv"] + tails),
                     allreduce_bytes=int((2 * L + embed_split) * 2 * (n - 1) * B * D * b // n))
    else:
        raise InputError(f"phase must be 'prefill' or 'decode', got {phase!r}")
    return dict(device_bytes=int(device), host_bytes=int(h["host"] + w["host"]), weight_bytes=int(w["total"]),
                kv_bytes=int(kv_bytes), temp_bytes=int(temp), source="estimate", seq_len=int(seq_len), phase=phase,
                policy=policy.name, dtype=str(jnp.dtype(dtype)), devices=n, weights=weights, **extra)
