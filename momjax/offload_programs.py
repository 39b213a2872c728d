"""The jitted programs of `mom-host` (momjax.offload drives them) and their sizes, for memory reports.

Every program's shapes are fixed by the chunk (C tokens), the streamed block (Bk tokens x Kg KV heads) and the
model, never by the prompt's length: that is why nothing on the device grows with the context. `stages` lists
them with abstract arguments for memory_report, which compiles them once per shape; `layout`, `host_bytes` and
`weight_bytes` are the sizes estimate and plan count.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from momjax import generation as G
from momjax import model as M
from momjax.attention import attend_block, attend_one, empty_carry, from_tiles, query_tiles
from momjax.cache import quantize_kv, to_memory_kind
from momjax.config import Config
from momjax.errors import InputError
from momjax.mesh import embed_lookup, replicate, shard_bytes, split_hidden
from momjax.params import head_params, leaf_bytes
from momjax.policy import MemoryPolicy
from momjax.rope import rope_frequencies

HOST, DEVICE = "pinned_host", "device"


def layout(cfg: Config, policy: MemoryPolicy, chunk: int, devices: int = 1) -> tuple[int, int]:
    """(Bk, Kg): tokens and KV heads of one streamed K/V block for a prompt cut in chunks of `chunk` tokens, the
    model split over `devices` devices (`stream_heads`)."""
    block = min(policy.host_block or chunk, chunk)
    if chunk % block:
        raise InputError(f"host_block ({block} tokens) must divide the mini-sequence length ({chunk})")
    return block, stream_heads(cfg, policy, devices)


def stream_heads(cfg: Config, policy: MemoryPolicy, devices: int = 1) -> int:
    """Kg, the KV heads of one streamed block (policy.host_heads, all by default). On a mesh of `devices` devices
    each block is split on its KV heads like the rest of the cache (each device streams its own heads' keys and
    values), so a block holds all of them: the mesh already groups them."""
    heads = policy.host_heads or cfg.num_kv_heads
    if cfg.num_kv_heads % heads:
        raise InputError(f"host_heads ({heads}) must divide the model's {cfg.num_kv_heads} KV heads")
    if devices > 1 and heads != cfg.num_kv_heads:
        raise InputError(f"host_heads={heads} with the model split over {devices} devices: each device already streams "
                         f"only its own {cfg.num_kv_heads // devices} KV heads; leave host_heads unset (a smaller "
                         "host_block makes the streamed blocks smaller)")
    return heads


# ---------------------------------------------------------------------- prefill programs


@jax.jit
def embed_fn(embed, tokens):
    """A chunk's tokens [B, C] -> its residual [B, C, D], in host memory (split on D over a mesh: `split_hidden`)."""
    return to_memory_kind(split_hidden(embed_lookup(embed, tokens)), HOST)


def cut(kv, block: int, heads: int):
    """[B, K, C, ...] (or an (int8, scale) pair of them) -> blocks[j][g] of [B, Kg, Bk, ...], in host memory."""
    pair = kv if isinstance(kv, tuple) else (kv,)
    K, C = pair[0].shape[1], pair[0].shape[2]
    return tuple(tuple(tuple(to_memory_kind(a[:, g * heads:(g + 1) * heads, j * block:(j + 1) * block], HOST)
                             for a in pair) for g in range(K // heads)) for j in range(C // block))


@functools.partial(jax.jit, static_argnames=("cfg", "policy", "block", "heads"))
def qkv_fn(lp, x_host, q_first, start, rope_len, cfg: Config, policy: MemoryPolicy, block: int, heads: int):
    """A chunk's residual (host, [B, C, D], first token at q_first) -> (its residual on the device, its queries
    as `query_tiles` [Nq, B, K, G*qb, E], and its K/V as host blocks[j][g] of (k, v[, k_scale, v_scale])).

    The chunk's own K/V are not also returned on the device: its attention streams them back like every other
    block (a little more traffic, one program shape; and XLA's CPU backend cannot return one value both on the
    device and in host memory, which a block of the whole chunk would be)."""
    x = replicate(to_memory_kind(x_host, DEVICE))  # on a mesh, each device's share of D gathered
    C = x.shape[1]
    pos = q_first + jnp.arange(C)[None, :] - start[:, None]  # [B, C]; padding gets negative positions
    inv_freq = rope_frequencies(cfg, rope_len)
    h = M.rms_norm(x, lp.attn_norm, cfg.rms_norm_eps)
    q = M.project_q(lp, h, pos, inv_freq, cfg.rope_attention_factor)  # [B, C, H, E]
    k, v = M.project_kv(lp, h, pos, inv_freq, cfg.rope_attention_factor)
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, K, C, E]
    if policy.quantized_kv:
        k, v = quantize_kv(k), quantize_kv(v)
    ks, vs = cut(k, block, heads), cut(v, block, heads)
    blocks = tuple(tuple(kg + vg for kg, vg in zip(kj, vj)) for kj, vj in zip(ks, vs))  # (k, [ks,] v, [vs])
    blocks = tuple(tuple(kv_order(b) for b in bj) for bj in blocks)
    qb = C if C <= policy.q_block else math.gcd(C, policy.q_block)
    return x, query_tiles(q, cfg.num_kv_heads, qb), blocks


def kv_order(b):
    """(k, v) or, cut from (int8, scale) pairs, (k, k_scale, v, v_scale) -> (k, v[, k_scale, v_scale])."""
    return b if len(b) == 2 else (b[0], b[2], b[1], b[3])


@functools.partial(jax.jit, static_argnames=("G", "window", "kv_block", "heads"), donate_argnames=("carry",))
def attend_fn(q, carry, kv, group, q_first, k_first, k_end, start, *, G: int, window, kv_block: int, heads: int):
    """carry (one group's online-softmax state) after keys and values kv = (k, v[, k_scale, v_scale]) [B, Kg, T, E]
    at k_first + [0, T), those before k_end valid, a host block already on the device. q: all heads' query tiles;
    the group's are taken."""
    qg = jax.lax.dynamic_slice_in_dim(q, group * heads, heads, axis=2)
    k, v, *scales = kv
    k_scale, v_scale = scales if scales else (None, None)
    return attend_block(qg, k, v, carry, q_first, k_first, k_end, start, G=G, window=window, kv_block=kv_block,
                        k_scale=k_scale, v_scale=v_scale)


@functools.partial(jax.jit, static_argnames=("rows", "E"))
def empty_fn(rows: tuple, E: int):
    return empty_carry(rows, E)


# x is not donated: the output goes to host memory, and XLA's CPU backend would alias it to x's device buffer.
@functools.partial(jax.jit, static_argnames=("cfg", "G", "last"))
def finish_fn(lp, x, carries, at, cfg: Config, G: int, last: bool):
    """The rest of the layer for a chunk (x [B, C, D] on the device) from its groups' attention states: its new
    residual in host memory, or with `last` only position `at`'s (the last real token), on the device ([B, 1, D])."""
    # A row that saw no key (right padding past every valid key of its window, in a tile of padding only: no key
    # tile was walked) has l = 0 and acc = 0: 0, not 0/0, so that no NaN reaches the padding's K/V, which a later
    # program masks (a masked NaN still poisons the probabilities-times-values sum).
    out = jnp.concatenate([acc / jnp.where(l > 0, l, 1.0)[..., None] for _, l, acc in carries], axis=2)
    o = from_tiles(out, G).astype(x.dtype)  # [B, C, H, E]
    if last:
        x, o = (jax.lax.dynamic_slice_in_dim(a, at, 1, axis=1) for a in (x, o))
    x = replicate(x + M.project_o(lp, o))  # on a mesh: whole on every device, after one all-reduce each
    x = replicate(x + M.mlp(lp, M.rms_norm(x, lp.mlp_norm, cfg.rms_norm_eps)))
    return x if last else to_memory_kind(split_hidden(x), HOST)


@functools.partial(jax.jit, static_argnames=("cfg",))
def head_fn(head: M.Params, x, at, cfg: Config):
    """Logits [B, V] at position `at` of x [B, C, D] (on the device, or in host memory)."""
    x = replicate(jax.lax.dynamic_slice_in_dim(to_memory_kind(x, DEVICE), at, 1, axis=1))
    return M.lm_head(head, M.rms_norm(x, head.final_norm, cfg.rms_norm_eps))[:, 0]


# ---------------------------------------------------------------------- decode programs


@functools.partial(jax.jit, static_argnames=("cfg", "quantized"))
def dec_qkv_fn(lp, embed, token, q_index, start, x, cfg: Config, quantized: bool):
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
def dec_attend_fn(q32, carry, kv, group, k_first, k_end, q_index, start, *, window, heads: int):
    """One group's decode attention state after a prompt block kv = (k, v[, k_scale, v_scale]) [B, Kg, T, E] at
    k_first + [0, T), those before k_end valid, on the device."""
    qg = jax.lax.dynamic_slice_in_dim(q32, group * heads, heads, axis=1)
    k, v, *scales = kv
    j = k_first + jnp.arange(k.shape[2])
    visible = (j[None, :] >= start[:, None]) & (j < k_end)[None, :]  # [B, T]
    if window is not None:
        visible &= (q_index - j < window)[None, :]
    return attend_one(qg, k, v, carry, visible, *scales)


@functools.partial(jax.jit, static_argnames=("rows", "E"))
def dec_empty_fn(rows: tuple, E: int):
    return empty_carry(rows, E)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("tail_k", "tail_v"))
def dec_finish_fn(lp, x, q32, carries, tail_k, tail_v, k_new, v_new, step, q_index, prompt_end, cfg: Config):
    """The rest of a decode step's layer: attention over the generated tokens' tail (device, [B, K, N, E], the
    first `step` filled) and the new token itself, merged with the prompt's state from the groups' carries;
    o-projection and MLP. Returns (x, the tail with the new token written at `step`)."""
    carry = tuple(jnp.concatenate(parts, axis=1) for parts in zip(*carries))  # all KV heads' (m, l, acc)
    (tk, *tks), (tv, *tvs) = unpair(tail_k), unpair(tail_v)
    (kn, *kns), (vn, *vns) = unpair(k_new), unpair(v_new)
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
def next_fn(logits, key, t, temperature, top_k: int, top_p, stop_ids, pad_id, done):
    """New token t of each row, as the decode loop of the other policies samples it (generation.decode_loop)."""
    token = jnp.where(done, pad_id, G.sample(logits, jax.random.fold_in(key, t), temperature, top_k, top_p))
    return token, done | G.is_stop(token, stop_ids)


# ---------------------------------------------------------------------- the programs, for memory reports


def abstract(shape, dtype, kind=DEVICE, where=None, heads_axis=None):
    """An abstract argument in memory kind `kind`: on a mesh split on its KV-head axis `heads_axis` (None: whole
    on every device). where(kind, ndim, axis): momjax.memory.shapes.placement's."""
    sharding = where(kind) if heads_axis is None else where(kind, len(shape), heads_axis)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def block_avals(cfg: Config, policy: MemoryPolicy, B: int, block: int, heads: int, dtype, kind, where):
    """One host block (k, v[, k_scale, v_scale]) as abstract arrays in memory kind `kind`."""
    E = cfg.head_dim
    if policy.quantized_kv:
        kv = abstract((B, heads, block, E), jnp.int8, kind, where, 1)
        scale = abstract((B, heads, block), jnp.float32, kind, where, 1)
        return kv, kv, scale, scale
    kv = abstract((B, heads, block, E), dtype, kind, where, 1)
    return kv, kv


def _on_device(tree, where, heads_axis):
    """Abstract values (from eval_shape) on the device, split on their KV-head axis on a mesh."""
    return jax.tree.map(lambda a: abstract(a.shape, a.dtype, DEVICE, where, heads_axis), tree)


def stages(params, cfg: Config, policy: MemoryPolicy, seq_len: int, phase: str, batch: int, new_tokens: int,
           where, devices: int = 1) -> list:
    """The programs one chunk of a `mom-host` prefill (phase="prefill") or one layer of a decode step runs, with
    abstract arguments, as (generation.Stage, held): `held` is what else stays on each device while the program
    runs (the values kept between programs: the chunk's residual and queries, the other groups' attention
    states, the next block arriving, and in decode the tails and the resident layers' blocks). None of it
    depends on seq_len except the resident layers' blocks. where(kind, ndim=None, axis=1): the sharding of an
    abstract argument (momjax.memory.shapes.placement: on a mesh of `devices`, split on the KV heads when ndim is
    given); params: abstract, placed as where says."""
    dtype = params.embed.dtype
    B, L, K, H, E, D = batch, cfg.num_layers, cfg.num_kv_heads, cfg.num_heads, cfg.head_dim, cfg.hidden_size
    Gh = H // K
    lp = params.layers[0]
    scalar = abstract((), jnp.int32, DEVICE, where)
    start = abstract((B,), jnp.int32, DEVICE, where)
    S = G.bucket_length(seq_len, policy) if phase == "prefill" else seq_len
    C = M.chunk_length(S, policy) if phase == "prefill" else min(policy.minisequence, S)
    block, heads = layout(cfg, policy, C, devices)
    blk = block_avals(cfg, policy, B, block, heads, dtype, DEVICE, where)
    nbytes = lambda tree: sum(shard_bytes(a) for a in jax.tree.leaves(tree))  # each device's share
    groups = K // heads
    head = head_params(params)
    common = dict(window=cfg.sliding_window, heads=heads)
    if phase == "prefill":
        x_host = abstract((B, C, D), dtype, HOST, where, 2 if D % devices == 0 else None)  # split_hidden's
        x, q, _ = jax.eval_shape(functools.partial(qkv_fn, cfg=cfg, policy=policy, block=block, heads=heads), lp,
                                 x_host, scalar, start, scalar)
        x, q = abstract(x.shape, x.dtype, DEVICE, where), _on_device(q, where, 2)  # q: [Nq, B, K, rows, E]
        Nq, _, _, rows, _ = q.shape
        carry = tuple(_on_device(jax.eval_shape(lambda: empty_carry((Nq, B, heads, rows), E)), where, 2))
        carries = (carry,) * groups
        x_last = abstract((B, 1, D), dtype, DEVICE, where)
        return [
            (G.Stage("embed", embed_fn, (params.embed, abstract((B, C), jnp.int32, DEVICE, where)), {}), 0),
            (G.Stage("qkv", qkv_fn, (lp, x_host, scalar, start, scalar),
                     dict(cfg=cfg, policy=policy, block=block, heads=heads)), 0),
            (G.Stage("attend", attend_fn, (q, carry, blk, scalar, scalar, scalar, scalar, start),
                     dict(G=Gh, kv_block=policy.kv_block, **common)), nbytes((x, carries[1:], blk))),
            (G.Stage("finish", finish_fn, (lp, x, carries, scalar), dict(cfg=cfg, G=Gh, last=False)), 0),
            (G.Stage("last", finish_fn, (lp, x, carries, scalar), dict(cfg=cfg, G=Gh, last=True)), 0),
            (G.Stage("logits", head_fn, (head, x_last, scalar), dict(cfg=cfg)), 0),
        ]
    if phase != "decode":
        raise InputError(f"phase must be 'prefill' or 'decode', got {phase!r}")
    n = max(new_tokens - 1, 1)
    kv_dtype = jnp.int8 if policy.quantized_kv else dtype
    tail = abstract((B, K, n, E), kv_dtype, DEVICE, where, 1)
    if policy.quantized_kv:
        tail = (tail, abstract((B, K, n), jnp.float32, DEVICE, where, 1))
    x = abstract((B, 1, D), dtype, DEVICE, where)
    token = abstract((B,), jnp.int32, DEVICE, where)
    _, q32, k_new, v_new = jax.eval_shape(functools.partial(dec_qkv_fn, cfg=cfg, quantized=policy.quantized_kv),
                                          lp, params.embed, token, scalar, start, x)
    q32, k_new, v_new = _on_device((q32, k_new, v_new), where, 1)  # [B, K, ...]
    carry = tuple(_on_device(jax.eval_shape(lambda: empty_carry((B, heads, Gh), E)), where, 1))
    carries = (carry,) * groups
    # Between programs: every layer's tail, and the blocks of the layers kept on the device.
    resident = policy.device_layers(L) * (S // block) * groups * nbytes(blk)
    tails = L * 2 * nbytes(tail)
    return [
        (G.Stage("embed", dec_qkv_fn, (lp, params.embed, token, scalar, start, None),  # the first layer's, on device
                 dict(cfg=cfg, quantized=policy.quantized_kv)), tails + resident),
        (G.Stage("qkv", dec_qkv_fn, (lp, params.embed, token, scalar, start, x),
                 dict(cfg=cfg, quantized=policy.quantized_kv)), tails + resident),
        (G.Stage("attend", dec_attend_fn, (q32, carry, blk, scalar, scalar, scalar, scalar, start), common),
         tails + resident + nbytes((x, k_new, v_new, carries[1:], blk))),
        (G.Stage("finish", dec_finish_fn, (lp, x, q32, carries, tail, tail, k_new, v_new, scalar, scalar, scalar),
                 dict(cfg=cfg)), tails - 2 * nbytes(tail) + resident),
        (G.Stage("logits", head_fn, (head, x, scalar), dict(cfg=cfg)), tails + resident),
    ]


def host_bytes(cfg: Config, policy: MemoryPolicy, seq_len: int, dtype, batch: int, phase: str,
               devices: int = 1) -> dict:
    """What `mom-host` keeps in pinned host memory, on each device of `devices` (split on the KV heads): kv (every
    layer's K/V, int8 with scales when quantised), layer_kv (one layer's), residual (the prompt's residual
    stream, in prefill, plus the chunk being written back; split on the hidden axis), streamed (the K/V a decode
    step brings over: the layers not kept on the device); and host: all devices' kv and residual together (what
    one host holds for them)."""
    b = jnp.dtype(dtype).itemsize
    L, K, E, D = cfg.num_layers, cfg.num_kv_heads // devices, cfg.head_dim, cfg.hidden_size
    D = D // devices if D % devices == 0 else D  # each device's share of the residual (split_hidden)
    S = G.bucket_length(seq_len, policy) if phase == "prefill" else seq_len
    e = E + 4 if policy.quantized_kv else E * b
    layer_kv = 2 * batch * K * S * e
    C = min(policy.minisequence, S)
    residual = batch * (S + C) * D * b if phase == "prefill" else 0
    streamed = (L - policy.device_layers(L)) * layer_kv if phase == "decode" else 0
    # Decoding keeps the host blocks of the layers it copies to the device (the prefill's cache holds them).
    return dict(kv=L * layer_kv, layer_kv=layer_kv, residual=residual, streamed=streamed,
                host=devices * (L * layer_kv + residual))


def weight_bytes(cfg: Config, dtype, weights: str = "device", lookup_on_host: bool = True, devices: int = 1) -> dict:
    """Where the weights' bytes are, on each device of `devices` (its share when split over a mesh): device (all of
    them; with weights="host" two layers', one running and the next arriving, plus the larger of the embedding and
    the LM head, each on the device for its own phase), total (all of them), host (with weights="host", every
    device's share together: what one host holds), and streamed (what one decode step brings over with host
    weights: every layer and the LM head, and the embedding unless the token's row is looked up on the host, as
    `mom-host` does; the other policies' decode step brings the table over for its lookup)."""
    leaves = leaf_bytes(cfg, dtype, devices)
    total = sum(leaves.values())
    if weights == "device":
        return dict(device=total, host=0, streamed=0, total=total)
    if weights != "host":
        raise InputError(f"weights must be 'device' or 'host', got {weights!r}")
    layer = sum(v for k, v in leaves.items() if k.startswith("layers.")) // cfg.num_layers
    embed = leaves["embed"]
    head = leaves.get("lm_head", embed) + leaves["final_norm"]  # the LM head reads the final norm too
    streamed = cfg.num_layers * layer + head + (0 if lookup_on_host else embed)
    return dict(device=2 * layer + max(embed, head), host=devices * total, streamed=streamed, total=total)


def unpair(kv):
    """(int8, scale) pair -> its two arrays; an array -> itself alone."""
    return kv if isinstance(kv, tuple) else (kv,)
