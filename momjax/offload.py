"""The `mom-host` policy: nothing on the device grows with the context.

`mom` and `mom-stream` keep the residual stream ([S, D]) and one layer's whole K/V on the device during prefill,
so their device memory grows with the prompt. `mom-host` keeps both in pinned host memory and runs each layer
chunk by chunk, from Python, over small jitted programs whose shapes do not depend on the prompt's length:

    for each layer, for each chunk of C tokens (the mini-sequence), with the programs of offload_programs:
        qkv_fn      the chunk's residual comes to the device; its q, k, v; its K/V go to host memory, cut in
                    blocks of Bk tokens and Kg KV heads (policy.host_block, policy.host_heads)
        attend_fn   for each group of Kg KV heads: the online-softmax state of the chunk's queries after each
                    block of that group's keys and values up to the chunk's end (its own included), streamed
                    from host memory one block at a time, the next block's copy in flight while the current
                    one is attended to
        finish_fn   o-projection and MLP; the chunk's new residual goes back to host memory

The device holds the weights, one chunk's activations and queries, the attention state of one group, and two
K/V blocks: the same bytes at 128k tokens as at 4M. What grows (the K/V and the residual stream) is in host
memory; `memory_report`, `estimate` and `plan` count it there.

Decoding streams the same blocks (`decode_rest`, which momjax.decoding.decode_stream runs): each step, each layer's new query attends to the prompt's
blocks one at a time (again with the next block's copy in flight), then to the generated tokens' tail, which
lives on the device. With policy.kv_device_layers = R the first R layers' blocks are brought to the device once
and stay. Every step is the same function as `mom-stream`'s, computed in a different order (blocks of keys
instead of whole layers): greedy tokens equal `baseline`'s (tests/test_offload.py).

With weights in host memory (momjax.load(..., weights="host")) each layer's weights come to the device as its
layer starts, the next layer's copy in flight, so the device holds two layers' weights; the embedding (prefill)
and the LM head come over for their own phase, and decoding looks up each token's embedding row on the host.

Sessions (Session.feed) and several devices do not run with `mom-host` yet; they refuse it with a clear error.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from momjax import generation as G
from momjax import model as M
from momjax import offload_programs as P
from momjax.config import Config
from momjax.policy import MemoryPolicy

layout = P.layout  # (Bk, Kg) of a policy's streamed blocks: offload_programs.layout


@dataclass
class HostCache:
    """A prompt's K/V as `mom-host` keeps them: blocks[l][j][g] = (k, v), or (k, v, k_scale, v_scale) with int8
    K/V, each [B, Kg, Bk, E] (scales [B, Kg, Bk]): layer l's keys at sequence indices j*Bk + [0, Bk) of KV heads
    g*Kg + [0, Kg), in pinned host memory (or on the device, for the layers decoding keeps there)."""

    blocks: list
    start: jax.Array  # [B] int32: each row's left padding
    length: int  # the padded prompt's length S
    block: int  # Bk
    heads: int  # Kg

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def quantized(self) -> bool:
        return len(self.blocks[0][0][0]) == 4

    @property
    def memory_kind(self) -> str:
        return self.blocks[-1][0][0][0].sharding.memory_kind


def _to_device(tree):
    """Start copying host arrays to the device (asynchronous: the copy runs while the caller goes on)."""
    return jax.tree.map(lambda a: jax.device_put(a, jax.memory.Space.Device), tree)


def weights_on_host(params) -> bool:
    """Whether the model's weights live in pinned host memory (momjax.load(..., weights="host"))."""
    return params.layers[0].wq.sharding.memory_kind == P.HOST


def _layer_weights(params, host: bool):
    """Each layer's weights on the device as the layer starts: with host weights, layer l+1's copy is started when
    layer l is handed out (so it arrives while layer l runs) and the device holds two layers' weights at most."""
    if not host:
        yield from params.layers
        return
    arriving = _to_device(params.layers[0])
    for l in range(len(params.layers)):
        current = arriving
        arriving = _to_device(params.layers[l + 1]) if l + 1 < len(params.layers) else None
        yield current


def _streamed(blocks, attend, carry):
    """carry after `attend(carry, block on the device, i)` for each host block blocks[i] in order, each brought
    over while the one before it is attended to. Waiting for each step before the next copy starts bounds the
    device to two blocks (the one read, the one arriving), however far ahead Python could queue copies."""
    arriving = _to_device(blocks[0]) if blocks else None
    for i in range(len(blocks)):
        current = arriving
        arriving = _to_device(blocks[i + 1]) if i + 1 < len(blocks) else None
        carry = attend(carry, current, i)
        jax.block_until_ready(carry)
    return carry


# ---------------------------------------------------------------------- prefill


def prefill(params, tokens, start, cfg: Config, policy: MemoryPolicy, on_layer=None):
    """Last-position logits [B, V] and the prompt's HostCache, as generation.prefill_fn gives them for the other
    policies. tokens: [B, S] left-padded, S a multiple of the mini-sequence length C. on_layer(i) after layer i."""
    B, S = tokens.shape
    C = M.chunk_length(S, policy)
    block, heads = layout(cfg, policy, C)
    N, L = S // C, cfg.num_layers
    K, H = cfg.num_kv_heads, cfg.num_heads
    start_np = np.asarray(start)
    rope_len = jnp.int32(S - int(start_np.min()))  # the longest row's length, as prefill_layer reads it
    tokens = np.asarray(tokens)
    host_weights = weights_on_host(params)
    embed = _to_device(params.embed) if host_weights else params.embed  # on the device for the embedding only
    xs = [P.embed_fn(embed, jnp.asarray(tokens[:, c * C:(c + 1) * C])) for c in range(N)]
    del embed
    layers, x_last = [], None
    for l, lp in enumerate(_layer_weights(params, host_weights)):
        last = policy.last_position_only and l == L - 1
        stored = []  # this layer's blocks so far: stored[j][g]
        for c in range(N):
            x, q, blocks = P.qkv_fn(lp, xs[c], jnp.int32(c * C), start, rope_len, cfg=cfg, policy=policy,
                                   block=block, heads=heads)
            stored.extend(blocks)
            if not last or c == N - 1:
                carries = _attend_chunk(q, stored, c * C, block, heads, start, cfg, policy)
                out = P.finish_fn(lp, x, carries, cfg=cfg, G=H // K, last=last)
                if last:
                    x_last = out
                else:
                    xs[c] = out
            del x, q
        layers.append(stored)
        if on_layer is not None:
            jax.block_until_ready(x_last if last else xs[-1])
            on_layer(l)
    head = G.head_params(params)
    logits = P.head_fn(_to_device(head) if host_weights else head, x_last if x_last is not None else xs[-1], cfg=cfg)
    return logits, HostCache(blocks=layers, start=start, length=S, block=block, heads=heads)


def _attend_chunk(q, stored, q_first: int, block: int, heads: int, start, cfg: Config, policy: MemoryPolicy):
    """Every group's attention state for a chunk's queries (first at q_first) over the layer's blocks so far
    (stored: the chunk's own included), streamed from the host one block at a time."""
    window = cfg.sliding_window
    # Blocks wholly outside every query's window are skipped (the chunk's first query is its earliest).
    seen = [j for j in range(len(stored)) if window is None or q_first - ((j + 1) * block - 1) < window]
    Nq, Bq, _, rows, E = q.shape
    G = cfg.num_heads // cfg.num_kv_heads
    common = dict(G=G, window=window, kv_block=policy.kv_block, heads=heads)
    carries = []
    for g in range(cfg.num_kv_heads // heads):
        attend = lambda carry, kv, i: P.attend_fn(q, carry, kv, g, jnp.int32(q_first), jnp.int32(seen[i] * block),
                                                 start, **common)
        carries.append(_streamed([stored[j][g] for j in seen], attend, P.empty_fn((Nq, Bq, heads, rows), E)))
    return tuple(carries)


# ---------------------------------------------------------------------- decode


def _tails(cache: HostCache, kv_dtype, n: int, cfg: Config):
    """Per layer, the generated tokens' K and V on the device: [B, K, n, E] (int8: with scales [B, K, n])."""
    B = cache.start.shape[0]
    K, E = cfg.num_kv_heads, cfg.head_dim
    one = lambda: jnp.zeros((B, K, n, E), kv_dtype)
    if cache.quantized:
        pair = lambda: (one(), jnp.zeros((B, K, n), jnp.float32))
        return [pair() for _ in range(cache.num_layers)], [pair() for _ in range(cache.num_layers)]
    return [one() for _ in range(cache.num_layers)], [one() for _ in range(cache.num_layers)]


def decode_rest(params, cache: HostCache, token, done, program_args: tuple, cfg: Config, policy: MemoryPolicy,
                max_new_tokens: int, stats) -> Iterator[np.ndarray]:
    """New tokens 1, 2, ... after the first (token, done: [B], sampled from the prefill's logits), one step at a
    time: (int32 [B, 1], whether every row has stopped); rows that stopped get the pad id; ends when every row
    has stopped. stats: the caller's momjax.decoding.DecodeStats, whose decode_s this adds to."""
    key, temperature, top_k, top_p, stop_ids, pad_id = program_args
    L, K = cfg.num_layers, cfg.num_kv_heads
    resident = policy.device_layers(L)  # these layers' blocks come to the device once and stay
    blocks = [[[_to_device(b) for b in bj] for bj in layer] if l < resident else layer
              for l, layer in enumerate(cache.blocks)]
    kv_dtype = blocks[0][0][0][0].dtype
    tail_k, tail_v = _tails(cache, kv_dtype, max_new_tokens - 1, cfg)
    B, S, Bk, heads = cache.start.shape[0], cache.length, cache.block, cache.heads
    Gh, E = cfg.num_heads // K, cfg.head_dim
    window = cfg.sliding_window
    head = G.head_params(params)
    host_weights = weights_on_host(params)
    # With host weights the token's embedding row is looked up here, not by bringing the whole table over.
    rows = np.asarray(params.embed) if host_weights else None
    for t in range(1, max_new_tokens):
        t0 = time.perf_counter()
        step = t - 1
        q_index = S + step
        # Prompt blocks wholly outside the new query's window are skipped.
        seen = [j for j in range(S // Bk) if window is None or q_index - ((j + 1) * Bk - 1) < window]
        x = None if rows is None else jnp.asarray(rows[np.asarray(token)][:, None, :])
        for l, lp in enumerate(_layer_weights(params, host_weights)):
            x, q32, k_new, v_new = P.dec_qkv_fn(lp, None if host_weights else params.embed, token, jnp.int32(q_index),
                                               cache.start, x, cfg=cfg, quantized=cache.quantized)
            carries = []
            for g in range(K // heads):
                attend = lambda carry, kv, i: P.dec_attend_fn(q32, carry, kv, g, jnp.int32(seen[i] * Bk),
                                                             jnp.int32(q_index), cache.start, window=window,
                                                             heads=heads)
                carries.append(_streamed([blocks[l][j][g] for j in seen], attend, P.dec_empty_fn((B, heads, Gh), E)))
            x, tail_k[l], tail_v[l] = P.dec_finish_fn(lp, x, q32, tuple(carries), tail_k[l], tail_v[l], k_new, v_new,
                                                     jnp.int32(step), jnp.int32(q_index), jnp.int32(S), cfg=cfg)
        logits = P.head_fn(_to_device(head) if host_weights else head, x, cfg=cfg)
        token, done = P.next_fn(logits, key, jnp.int32(t), temperature, top_k, top_p, stop_ids, pad_id, done)
        new, all_done = np.asarray(token)[:, None], bool(np.asarray(done).all())
        stats.decode_s += time.perf_counter() - t0
        yield new, all_done
        if all_done:
            return
