"""The `mom-host` policy: nothing on the device grows with the context.

`mom` and `mom-stream` keep the residual stream ([S, D]) and one layer's whole K/V on the device during prefill,
so their device memory grows with the prompt. `mom-host` keeps both in pinned host memory and runs each layer
chunk by chunk, from Python, over small jitted programs whose shapes do not depend on the prompt's length:

    for each layer, for each chunk of C tokens (the mini-sequence):
        _qkv_fn      the chunk's residual comes to the device; its q, k, v; its K/V go to host memory, cut in
                     blocks of Bk tokens and Kg KV heads (policy.host_block, policy.host_heads)
        _attend_fn   for each group of Kg KV heads: the online-softmax state of the chunk's queries after each
                     earlier block of that group's keys and values, streamed from host memory one block at a
                     time (the next block's copy in flight while the current one is attended to), then after
                     the chunk's own keys (already on the device)
        _finish_fn   o-projection and MLP; the chunk's new residual goes back to host memory

The device holds the weights, one chunk's activations and queries, the attention state of one group, and two
K/V blocks: the same bytes at 128k tokens as at 4M. What grows (the K/V and the residual stream) is in host
memory; `memory_report`, `estimate` and `plan` count it there.

Decoding streams the same blocks (`decode_stream`): each step, each layer's new query attends to the prompt's
blocks one at a time (again with the next block's copy in flight), then to the generated tokens' tail, which
lives on the device. With policy.kv_device_layers = R the first R layers' blocks are brought to the device once
and stay. Every step is the same function as `mom-stream`'s, computed in a different order (blocks of keys
instead of whole layers): greedy tokens equal `baseline`'s (tests/test_offload.py).

Sessions (Session.feed) and several devices do not run with `mom-host` yet; they refuse it with a clear error.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from momjax import generation as G
from momjax import model as M
from momjax.attention import attend_block, attend_one, empty_carry, from_tiles, query_tiles
from momjax.cache import quantize_kv, to_memory_kind
from momjax.config import Config
from momjax.errors import InputError
from momjax.mesh import embed_lookup
from momjax.params import param_bytes, param_shapes
from momjax.policy import MemoryPolicy
from momjax.rope import rope_frequencies

HOST, DEVICE = "pinned_host", "device"


def layout(cfg: Config, policy: MemoryPolicy, chunk: int) -> tuple[int, int]:
    """(Bk, Kg): tokens and KV heads of one streamed K/V block for a prompt cut in chunks of `chunk` tokens."""
    block = min(policy.host_block or chunk, chunk)
    heads = policy.host_heads or cfg.num_kv_heads
    if chunk % block:
        raise InputError(f"host_block ({block} tokens) must divide the mini-sequence length ({chunk})")
    if cfg.num_kv_heads % heads:
        raise InputError(f"host_heads ({heads}) must divide the model's {cfg.num_kv_heads} KV heads")
    return block, heads


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
    return params.layers[0].wq.sharding.memory_kind == HOST


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


# ---------------------------------------------------------------------- prefill programs


@jax.jit
def _embed_fn(embed, tokens):
    """A chunk's tokens [B, C] -> its residual [B, C, D], in host memory."""
    return to_memory_kind(embed_lookup(embed, tokens), HOST)


def _cut(kv, block: int, heads: int):
    """[B, K, C, ...] (or an (int8, scale) pair of them) -> blocks[j][g] of [B, Kg, Bk, ...], in host memory."""
    pair = kv if isinstance(kv, tuple) else (kv,)
    K, C = pair[0].shape[1], pair[0].shape[2]
    return tuple(tuple(tuple(to_memory_kind(a[:, g * heads:(g + 1) * heads, j * block:(j + 1) * block], HOST)
                             for a in pair) for g in range(K // heads)) for j in range(C // block))


@functools.partial(jax.jit, static_argnames=("cfg", "policy", "block", "heads"))
def _qkv_fn(lp, x_host, q_first, start, rope_len, cfg: Config, policy: MemoryPolicy, block: int, heads: int):
    """A chunk's residual (host, [B, C, D], first token at q_first) -> (its residual on the device, its queries
    as `query_tiles` [Nq, B, K, G*qb, E], and its K/V as host blocks[j][g] of (k, v[, k_scale, v_scale])).

    The chunk's own K/V are not also returned on the device: its attention streams them back like every other
    block (a little more traffic, one program shape; and XLA's CPU backend cannot return one value both on the
    device and in host memory, which a block of the whole chunk would be)."""
    x = to_memory_kind(x_host, DEVICE)
    C = x.shape[1]
    pos = q_first + jnp.arange(C)[None, :] - start[:, None]  # [B, C]; padding gets negative positions
    inv_freq = rope_frequencies(cfg, rope_len)
    h = M.rms_norm(x, lp.attn_norm, cfg.rms_norm_eps)
    q = M.project_q(lp, h, pos, inv_freq, cfg.rope_attention_factor)  # [B, C, H, E]
    k, v = M.project_kv(lp, h, pos, inv_freq, cfg.rope_attention_factor)
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, K, C, E]
    if policy.quantized_kv:
        k, v = quantize_kv(k), quantize_kv(v)
    ks, vs = _cut(k, block, heads), _cut(v, block, heads)
    blocks = tuple(tuple(kg + vg for kg, vg in zip(kj, vj)) for kj, vj in zip(ks, vs))  # (k, [ks,] v, [vs])
    blocks = tuple(tuple(_kv_order(b) for b in bj) for bj in blocks)
    qb = C if C <= policy.q_block else math.gcd(C, policy.q_block)
    return x, query_tiles(q, cfg.num_kv_heads, qb), blocks


def _kv_order(b):
    """(k, v) or, cut from (int8, scale) pairs, (k, k_scale, v, v_scale) -> (k, v[, k_scale, v_scale])."""
    return b if len(b) == 2 else (b[0], b[2], b[1], b[3])


@functools.partial(jax.jit, static_argnames=("G", "window", "kv_block", "heads"), donate_argnames=("carry",))
def _attend_fn(q, carry, kv, group, q_first, k_first, start, *, G: int, window, kv_block: int, heads: int):
    """carry (one group's online-softmax state) after keys and values kv = (k, v[, k_scale, v_scale]) [B, Kg, T, E]
    at k_first + [0, T), a host block already on the device. q: all heads' query tiles; the group's are taken."""
    qg = jax.lax.dynamic_slice_in_dim(q, group * heads, heads, axis=2)
    k, v, *scales = kv
    k_scale, v_scale = scales if scales else (None, None)
    return attend_block(qg, k, v, carry, q_first, k_first, start, G=G, window=window, kv_block=kv_block,
                        k_scale=k_scale, v_scale=v_scale)


@functools.partial(jax.jit, static_argnames=("rows", "E"))
def _empty_fn(rows: tuple, E: int):
    return empty_carry(rows, E)


# x is not donated: the output goes to host memory, and XLA's CPU backend would alias it to x's device buffer.
@functools.partial(jax.jit, static_argnames=("cfg", "G", "last"))
def _finish_fn(lp, x, carries, cfg: Config, G: int, last: bool):
    """The rest of the layer for a chunk (x [B, C, D] on the device) from its groups' attention states: its new
    residual in host memory, or with `last` only the last position's, on the device ([B, 1, D])."""
    out = jnp.concatenate([acc / l[..., None] for _, l, acc in carries], axis=2)  # [Nq, B, K, G*qb, E]
    o = from_tiles(out, G).astype(x.dtype)  # [B, C, H, E]
    if last:
        x, o = x[:, -1:], o[:, -1:]
    x = x + M.project_o(lp, o)
    x = x + M.mlp(lp, M.rms_norm(x, lp.mlp_norm, cfg.rms_norm_eps))
    return x if last else to_memory_kind(x, HOST)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _head_fn(head: M.Params, x, cfg: Config):
    """Logits [B, V] at the last position of x [B, C, D] (on the device, or in host memory)."""
    x = to_memory_kind(x, DEVICE)[:, -1:]
    return M.lm_head(head, M.rms_norm(x, head.final_norm, cfg.rms_norm_eps))[:, 0]


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
    xs = [_embed_fn(embed, jnp.asarray(tokens[:, c * C:(c + 1) * C])) for c in range(N)]
    del embed
    layers, x_last = [], None
    for l, lp in enumerate(_layer_weights(params, host_weights)):
        last = policy.last_position_only and l == L - 1
        stored = []  # this layer's blocks so far: stored[j][g]
        for c in range(N):
            x, q, blocks = _qkv_fn(lp, xs[c], jnp.int32(c * C), start, rope_len, cfg=cfg, policy=policy,
                                   block=block, heads=heads)
            stored.extend(blocks)
            if not last or c == N - 1:
                carries = _attend_chunk(q, stored, c * C, block, heads, start, cfg, policy)
                out = _finish_fn(lp, x, carries, cfg=cfg, G=H // K, last=last)
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
    logits = _head_fn(_to_device(head) if host_weights else head, x_last if x_last is not None else xs[-1], cfg=cfg)
    return logits, HostCache(blocks=layers, start=start, length=S, block=block, heads=heads)


def _unpair(kv):
    """(int8, scale) pair -> its two arrays; an array -> itself alone."""
    return kv if isinstance(kv, tuple) else (kv,)


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
        attend = lambda carry, kv, i: _attend_fn(q, carry, kv, g, jnp.int32(q_first), jnp.int32(seen[i] * block),
                                                 start, **common)
        carries.append(_streamed([stored[j][g] for j in seen], attend, _empty_fn((Nq, Bq, heads, rows), E)))
    return tuple(carries)


# ---------------------------------------------------------------------- decode programs


@functools.partial(jax.jit, static_argnames=("cfg", "quantized"))
def _dec_qkv_fn(lp, embed, token, q_index, start, x, cfg: Config, quantized: bool):
    """A decode step's layer input x [B, 1, D] (the embedded token when x is None) -> (x, the new query as
    float32 [B, K, G, E], the new token's K and V [B, K, 1, E], int8 with scales [B, K, 1] when quantized)."""
    if x is None:
        x = embed_lookup(embed, token)[:, None, :]
    positions = (q_index - start)[:, None]  # [B, 1]
    inv_freq = rope_frequencies(cfg, jnp.max(positions) + 1)
    h = M.rms_norm(x, lp.attn_norm, cfg.rms_norm_eps)
    q = M.project_q(lp, h, positions, inv_freq, cfg.rope_attention_factor)  # [B, 1, H, E]
    k, v = M.project_kv(lp, h, positions, inv_freq, cfg.rope_attention_factor)  # [B, 1, K, E]
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    if quantized:  # as a prefill would store them, before anything reads them
        k, v = quantize_kv(k), quantize_kv(v)
    B, _, H, E = q.shape
    K = cfg.num_kv_heads
    return x, q[:, 0].reshape(B, K, H // K, E).astype(jnp.float32), k, v


@functools.partial(jax.jit, static_argnames=("window", "heads"), donate_argnames=("carry",))
def _dec_attend_fn(q32, carry, kv, group, k_first, q_index, start, *, window, heads: int):
    """One group's decode attention state after a prompt block kv = (k, v[, k_scale, v_scale]) [B, Kg, T, E] at
    k_first + [0, T), on the device."""
    qg = jax.lax.dynamic_slice_in_dim(q32, group * heads, heads, axis=1)
    k, v, *scales = kv
    j = k_first + jnp.arange(k.shape[2])
    visible = j[None, :] >= start[:, None]  # [B, T]
    if window is not None:
        visible &= (q_index - j < window)[None, :]
    return attend_one(qg, k, v, carry, visible, *scales)


@functools.partial(jax.jit, static_argnames=("rows", "E"))
def _dec_empty_fn(rows: tuple, E: int):
    return empty_carry(rows, E)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("tail_k", "tail_v"))
def _dec_finish_fn(lp, x, q32, carries, tail_k, tail_v, k_new, v_new, step, q_index, prompt_end, cfg: Config):
    """The rest of a decode step's layer: attention over the generated tokens' tail (device, [B, K, N, E], the
    first `step` filled) and the new token itself, merged with the prompt's state from the groups' carries;
    o-projection and MLP. Returns (x, the tail with the new token written at `step`)."""
    carry = tuple(jnp.concatenate(parts, axis=1) for parts in zip(*carries))  # all KV heads' (m, l, acc)
    (tk, *tks), (tv, *tvs) = _unpair(tail_k), _unpair(tail_v)
    (kn, *kns), (vn, *vns) = _unpair(k_new), _unpair(v_new)
    B, N = tk.shape[0], tk.shape[2]
    u = jnp.arange(N)
    visible = jnp.broadcast_to(u < step, (B, N))
    if cfg.sliding_window is not None:
        visible &= (q_index - (prompt_end + u) < cfg.sliding_window)[None, :]
    carry = attend_one(q32, tk, tv, carry, visible, *(tks + tvs))
    carry = attend_one(q32, kn, vn, carry, jnp.ones((B, 1), bool), *(kns + vns))
    _, l, acc = carry
    K, Gh, E = acc.shape[1:]
    o = (acc / l[..., None]).reshape(B, 1, K * Gh, E).astype(x.dtype)
    x = x + M.project_o(lp, o)
    x = x + M.mlp(lp, M.rms_norm(x, lp.mlp_norm, cfg.rms_norm_eps))
    put = lambda tail, new: jax.lax.dynamic_update_slice_in_dim(tail, new.astype(tail.dtype), step, axis=2)
    return x, jax.tree.map(put, tail_k, k_new), jax.tree.map(put, tail_v, v_new)


@functools.partial(jax.jit, static_argnames=("top_k",))
def _next_fn(logits, key, t, temperature, top_k: int, top_p, stop_ids, pad_id, done):
    """New token t of each row, as the decode loop of the other policies samples it (generation.decode_loop)."""
    token = jnp.where(done, pad_id, G.sample(logits, jax.random.fold_in(key, t), temperature, top_k, top_p))
    return token, done | G.is_stop(token, stop_ids)


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
            x, q32, k_new, v_new = _dec_qkv_fn(lp, None if host_weights else params.embed, token, jnp.int32(q_index),
                                               cache.start, x, cfg=cfg, quantized=cache.quantized)
            carries = []
            for g in range(K // heads):
                attend = lambda carry, kv, i: _dec_attend_fn(q32, carry, kv, g, jnp.int32(seen[i] * Bk),
                                                             jnp.int32(q_index), cache.start, window=window,
                                                             heads=heads)
                carries.append(_streamed([blocks[l][j][g] for j in seen], attend, _dec_empty_fn((B, heads, Gh), E)))
            x, tail_k[l], tail_v[l] = _dec_finish_fn(lp, x, q32, tuple(carries), tail_k[l], tail_v[l], k_new, v_new,
                                                     jnp.int32(step), jnp.int32(q_index), jnp.int32(S), cfg=cfg)
        logits = _head_fn(_to_device(head) if host_weights else head, x, cfg=cfg)
        token, done = _next_fn(logits, key, jnp.int32(t), temperature, top_k, top_p, stop_ids, pad_id, done)
        new, all_done = np.asarray(token)[:, None], bool(np.asarray(done).all())
        stats.decode_s += time.perf_counter() - t0
        yield new, all_done
        if all_done:
            return


# ---------------------------------------------------------------------- the programs, for memory reports


def _abstract(shape, dtype, kind=DEVICE, where=None):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=where(kind))


def _block_avals(cfg: Config, policy: MemoryPolicy, B: int, block: int, heads: int, dtype, kind, where):
    """One host block (k, v[, k_scale, v_scale]) as abstract arrays in memory kind `kind`."""
    E = cfg.head_dim
    if policy.quantized_kv:
        kv = _abstract((B, heads, block, E), jnp.int8, kind, where)
        scale = _abstract((B, heads, block), jnp.float32, kind, where)
        return kv, kv, scale, scale
    kv = _abstract((B, heads, block, E), dtype, kind, where)
    return kv, kv


def stages(params, cfg: Config, policy: MemoryPolicy, seq_len: int, phase: str, batch: int, new_tokens: int,
           where) -> list:
    """The programs one chunk of a `mom-host` prefill (phase="prefill") or one layer of a decode step runs, with
    abstract arguments, as (generation.Stage, held): `held` is what else stays on the device while the program
    runs (the values kept between programs: the chunk's residual and queries, the other groups' attention
    states, the next block arriving, and in decode the tails and the resident layers' blocks). None of it
    depends on seq_len except the resident layers' blocks. where(kind): the sharding of an abstract argument."""
    dtype = params.embed.dtype
    B, L, K, H, E, D = batch, cfg.num_layers, cfg.num_kv_heads, cfg.num_heads, cfg.head_dim, cfg.hidden_size
    Gh = H // K
    lp = params.layers[0]
    scalar = _abstract((), jnp.int32, DEVICE, where)
    start = _abstract((B,), jnp.int32, DEVICE, where)
    S = G.bucket_length(seq_len, policy) if phase == "prefill" else seq_len
    C = M.chunk_length(S, policy) if phase == "prefill" else min(policy.minisequence, S)
    block, heads = layout(cfg, policy, C)
    blk = _block_avals(cfg, policy, B, block, heads, dtype, DEVICE, where)
    nbytes = lambda tree: sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))
    groups = K // heads
    head = G.head_params(params)
    common = dict(window=cfg.sliding_window, heads=heads)
    if phase == "prefill":
        x_host = _abstract((B, C, D), dtype, HOST, where)
        x, q, _ = jax.eval_shape(functools.partial(_qkv_fn, cfg=cfg, policy=policy, block=block, heads=heads), lp,
                                 x_host, scalar, start, scalar)
        x, q = (_abstract(a.shape, a.dtype, DEVICE, where) for a in (x, q))
        Nq, _, _, rows, _ = q.shape
        carry = tuple(_abstract(a.shape, a.dtype, DEVICE, where) for a in
                      jax.eval_shape(lambda: empty_carry((Nq, B, heads, rows), E)))
        carries = (carry,) * groups
        x_last = _abstract((B, 1, D), dtype, DEVICE, where)
        return [
            (G.Stage("embed", _embed_fn, (params.embed, _abstract((B, C), jnp.int32, DEVICE, where)), {}), 0),
            (G.Stage("qkv", _qkv_fn, (lp, x_host, scalar, start, scalar),
                     dict(cfg=cfg, policy=policy, block=block, heads=heads)), 0),
            (G.Stage("attend", _attend_fn, (q, carry, blk, scalar, scalar, scalar, start),
                     dict(G=Gh, kv_block=policy.kv_block, **common)), nbytes((x, carries[1:], blk))),
            (G.Stage("finish", _finish_fn, (lp, x, carries), dict(cfg=cfg, G=Gh, last=False)), 0),
            (G.Stage("last", _finish_fn, (lp, x, carries), dict(cfg=cfg, G=Gh, last=True)), 0),
            (G.Stage("logits", _head_fn, (head, x_last), dict(cfg=cfg)), 0),
        ]
    if phase != "decode":
        raise InputError(f"phase must be 'prefill' or 'decode', got {phase!r}")
    n = max(new_tokens - 1, 1)
    kv_dtype = jnp.int8 if policy.quantized_kv else dtype
    tail = _abstract((B, K, n, E), kv_dtype, DEVICE, where)
    if policy.quantized_kv:
        tail = (tail, _abstract((B, K, n), jnp.float32, DEVICE, where))
    x = _abstract((B, 1, D), dtype, DEVICE, where)
    token = _abstract((B,), jnp.int32, DEVICE, where)
    _, q32, k_new, v_new = jax.eval_shape(functools.partial(_dec_qkv_fn, cfg=cfg, quantized=policy.quantized_kv),
                                          lp, params.embed, token, scalar, start, x)
    q32, k_new, v_new = jax.tree.map(lambda a: _abstract(a.shape, a.dtype, DEVICE, where), (q32, k_new, v_new))
    carry = tuple(_abstract(a.shape, a.dtype, DEVICE, where) for a in
                  jax.eval_shape(lambda: empty_carry((B, heads, Gh), E)))
    carries = (carry,) * groups
    # Between programs: every layer's tail, and the blocks of the layers kept on the device.
    resident = policy.device_layers(L) * (S // block) * groups * nbytes(blk)
    tails = L * 2 * nbytes(tail)
    return [
        (G.Stage("qkv", _dec_qkv_fn, (lp, params.embed, token, scalar, start, x),
                 dict(cfg=cfg, quantized=policy.quantized_kv)), tails + resident),
        (G.Stage("attend", _dec_attend_fn, (q32, carry, blk, scalar, scalar, scalar, start), common),
         tails + resident + nbytes((x, k_new, v_new, carries[1:], blk))),
        (G.Stage("finish", _dec_finish_fn, (lp, x, q32, carries, tail, tail, k_new, v_new, scalar, scalar, scalar),
                 dict(cfg=cfg)), tails - 2 * nbytes(tail) + resident),
        (G.Stage("logits", _head_fn, (head, x), dict(cfg=cfg)), tails + resident),
    ]


def host_bytes(cfg: Config, policy: MemoryPolicy, seq_len: int, dtype, batch: int, phase: str) -> dict:
    """What `mom-host` keeps in pinned host memory: kv (every layer's K/V, int8 with scales when quantised),
    residual (the prompt's residual stream, in prefill, plus the chunk being written back), host (both), and
    streamed (the K/V a decode step brings over: the layers not kept on the device)."""
    b = jnp.dtype(dtype).itemsize
    L, K, E, D = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    S = G.bucket_length(seq_len, policy) if phase == "prefill" else seq_len
    e = E + 4 if policy.quantized_kv else E * b
    layer_kv = 2 * batch * K * S * e
    C = min(policy.minisequence, S)
    residual = batch * (S + C) * D * b if phase == "prefill" else 0
    streamed = (L - policy.device_layers(L)) * layer_kv if phase == "decode" else 0
    # Decoding keeps the host blocks of the layers it copies to the device (the prefill's cache holds them).
    return dict(kv=L * layer_kv, layer_kv=layer_kv, residual=residual, streamed=streamed,
                host=L * layer_kv + residual)


def weight_bytes(cfg: Config, dtype, weights: str = "device") -> dict:
    """Where `mom-host` keeps the weights' bytes: device (all of them; with weights="host" two layers', one running
    and the next arriving, plus the larger of the embedding and the LM head, each on the device for its own phase),
    host (with weights="host", all of them), and streamed (what one decode step brings over with host weights: every
    layer and the LM head; the token's embedding row is looked up on the host)."""
    total = param_bytes(cfg, dtype)
    if weights == "device":
        return dict(device=total, host=0, streamed=0, total=total)
    if weights != "host":
        raise InputError(f"weights must be 'device' or 'host', got {weights!r}")
    b = jnp.dtype(dtype).itemsize
    shapes = param_shapes(cfg)
    layer = sum(int(np.prod(s[1:])) for k, s in shapes.items() if k.startswith("layers.")) * b
    embed = int(np.prod(shapes["embed"])) * b
    head = int(np.prod(shapes["lm_head"])) * b if "lm_head" in shapes else embed
    return dict(device=2 * layer + max(embed, head), host=total, streamed=cfg.num_layers * layer + head, total=total)
