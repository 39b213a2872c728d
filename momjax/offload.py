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

With weights in host memory (momjax.load(..., weights="host"), which every policy runs) each layer's weights come
to the device as its layer starts, the next layer's copy in flight (params.device_layers), so the device holds two
layers' weights; the embedding (prefill) and the LM head come over for their own phase, and mom-host's decoding
looks up each token's embedding row on the host.

Sessions run with it too (`feed`, which momjax.Session calls): a feed's tokens are right-padded chunks at the
session's length; their blocks are appended to the session's HostCache, each with the span of positions it holds
(a feed's last block may end partway, and keys past a block's end are masked: the next feed's overlap them).
Once a few short feeds' small blocks have built up they are merged into blocks of a long prompt's size
(HostCache.compact), so a long chat's decoding streams few blocks rather than two per turn.
On a mesh (momjax.mesh) every block is split on its KV heads like the other policies' caches: each device streams
its own heads' keys and values from its own pinned host memory, holds its share of the weights, and each layer costs
the same two all-reduces of the residual stream. The residual stream in host memory is split on its hidden axis
(one copy across the devices' host memory); each chunk's is gathered whole when it comes to the devices.
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
from momjax.errors import InputError
from momjax.mesh import traced_degree
from momjax.params import device_layers, head_params, to_device, weights_on_host
from momjax.policy import MemoryPolicy

layout = P.layout  # (Bk, Kg) of a policy's streamed blocks: offload_programs.layout

# mom-host's programs compile when first called (their shapes are known only then), so the time spent compiling
# is read from JAX's own compile events: compile_seconds() before and after a call.
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compiling = [0.0]


def _count_compile(event: str, seconds: float, **_) -> None:
    if event in _COMPILE_EVENTS:
        _compiling[0] += seconds


jax.monitoring.register_event_duration_secs_listener(_count_compile)


def compile_seconds() -> float:
    """Seconds this process has spent compiling JAX programs so far (every program, not only mom-host's)."""
    return _compiling[0]


# A session's HostCache merges its small trailing blocks (HostCache.compact) once this many have built up: each
# merge copies them on the host, so it is done once per few feeds rather than at every one.
COMPACT_AFTER = 4


@dataclass
class HostCache:
    """K/V as `mom-host` keeps them: blocks[l][b][g] = (k, v), or (k, v, k_scale, v_scale) with int8 K/V, each
    [B, Kg, T, E] (scales [B, Kg, T]): layer l's keys of KV heads g*Kg + [0, Kg) at sequence indices
    first + [0, T), where spans[b] = (first, end) and only the keys before `end` are valid (a session's last block
    of a feed may end partway; the rest is stale). In pinned host memory, or on the device for the layers decoding
    keeps there. A prompt's cache (prefill) has blocks of one size covering [0, S) exactly; a session's (feed)
    gains blocks at each feed."""

    blocks: list
    spans: list  # [(first, end)] per block, the same for every layer
    start: jax.Array  # [B] int32: each row's left padding
    length: int  # the sequence index the next token takes: the padded prompt's length, or the session's
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

    @property
    def capacity(self) -> int:
        """Positions the blocks have room for (stale ones included)."""
        return sum(layer_block[0][0].shape[2] for layer_block in self.blocks[0]) if self.blocks else 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in jax.tree.leaves(self.blocks))

    def rewind(self, n: int) -> None:
        """Keep the keys before sequence index n: blocks wholly past it are dropped, the one across it is cut
        short (its stale keys stay masked)."""
        keep = [b for b, (first, _) in enumerate(self.spans) if first < n]
        self.spans = [(self.spans[b][0], min(self.spans[b][1], n)) for b in keep]
        self.blocks = [[layer[b] for b in keep] for layer in self.blocks]
        self.length = n

    def layer_arrays(self, l: int, n: int, since: int = 0) -> tuple:
        """Layer l's keys and values at sequence indices [since, n) as host numpy arrays: (k, v) [B, K, n - since,
        E], or with int8 K/V (k, v, k_scale, v_scale) with scales [B, K, n - since] (a session file's layout)."""
        out = None
        for (first, end), groups in zip(self.spans, self.blocks[l]):
            lo, hi = max(first, since), min(end, n)
            if hi <= lo:
                continue
            parts = [np.concatenate([np.asarray(jax.device_get(g[i])) for g in groups], axis=1)
                     for i in range(len(groups[0]))]
            if out is None:
                out = [np.zeros((p.shape[0], p.shape[1], n - since, *p.shape[3:]), p.dtype) for p in parts]
            for o, p in zip(out, parts):
                o[:, :, lo - since:hi - since] = p[:, :, lo - first:hi - first]
        return tuple(out)

    def compact(self, size: int, after: int | None = None) -> bool:
        """Merge the trailing blocks that hold fewer than `size` positions each, once there are `after` of them,
        into blocks of `size` positions (the last one partly filled). A session's short feeds (a question, an
        answer) each leave such a block, and decoding streams every block for every token: merged, a long chat
        streams about one block per `size` positions. The blocks keep their placement and the same keys; in place,
        all layers at once. Returns whether it merged. after: COMPACT_AFTER when None."""
        after = COMPACT_AFTER if after is None else after
        b = len(self.spans)
        while b > 0 and self.spans[b - 1][1] - self.spans[b - 1][0] < size:
            b -= 1
        if len(self.spans) - b < after:
            return False
        if not all(a.is_fully_addressable for a in jax.tree.leaves(self.blocks[0][b:])):
            return False  # blocks spread over several processes (momjax.distributed_init): merging reads them here
        first, end = self.spans[b][0], self.length
        blocks = []
        for l in range(self.num_layers):
            where = [a.sharding for a in self.blocks[l][b][0]]  # (k, v[, scales]) of a group: all placed alike
            arrays = self.layer_arrays(l, end, since=first)  # (k, v[, k_scale, v_scale]) of every head
            cut = [cut_positions(a, end - first, size, self.heads, w) for a, w in zip(arrays, where)]
            merged = [[tuple(pieces[j][g] for pieces in cut) for g in range(len(cut[0][0]))]
                      for j in range(len(cut[0]))]
            blocks.append(self.blocks[l][:b] + merged)
        self.blocks = blocks
        self.spans = self.spans[:b] + [(first + f, min(first + f + size, end)) for f in range(0, end - first, size)]
        return True


def cut_positions(a: np.ndarray, n: int, block: int, heads: int, where) -> list:
    """One layer's keys, values or scales a [B, K, n, ...] (host numpy, a session file's layout) as pieces[b][g]:
    positions b*block + [0, block) (the last block padded with zeros) of KV heads g*heads + [0, heads), placed at
    `where` (a sharding). With `spans(n, block)`, the blocks of a HostCache."""
    pad = -n % block
    if pad:
        a = np.concatenate([a, np.zeros((*a.shape[:2], pad, *a.shape[3:]), a.dtype)], axis=2)
    return [[jax.device_put(np.ascontiguousarray(a[:, g * heads:(g + 1) * heads, first:first + block]), where)
             for g in range(a.shape[1] // heads)] for first in range(0, n, block)]


def spans(n: int, block: int) -> list:
    """The (first, end) of the blocks `cut_positions` cuts n positions into."""
    return [(first, min(first + block, n)) for first in range(0, n, block)]


def session_cache(pieces: dict, n: int, block: int, heads: int, num_layers: int, quantized: bool) -> HostCache:
    """A session's HostCache of n positions from a session file's tensors cut by `cut_positions`: pieces[name][b][g]
    for name k.l, v.l (and k_scale.l, v_scale.l when quantized)."""
    names = lambda l: (f"k.{l}", f"v.{l}") + ((f"k_scale.{l}", f"v_scale.{l}") if quantized else ())
    groups = len(pieces["k.0"][0])
    blocks = [[tuple(tuple(pieces[name][b][g] for name in names(l)) for g in range(groups))
               for b in range(len(pieces["k.0"]))] for l in range(num_layers)]
    return HostCache(blocks=blocks, spans=spans(n, block), start=jnp.zeros((1,), jnp.int32), length=n, heads=heads)


def _streamed(blocks, attend, carry):
    """carry after `attend(carry, block on the device, i)` for each host block blocks[i] in order, each brought
    over while the one before it is attended to. Waiting for each step before the next copy starts bounds the
    device to two blocks (the one read, the one arriving), however far ahead Python could queue copies."""
    arriving = to_device(blocks[0]) if blocks else None
    for i in range(len(blocks)):
        current = arriving
        arriving = to_device(blocks[i + 1]) if i + 1 < len(blocks) else None
        carry = attend(carry, current, i)
        jax.block_until_ready(carry)
    return carry


# ---------------------------------------------------------------------- prefill and feed


def prefill(params, tokens, start, cfg: Config, policy: MemoryPolicy, on_layer=None):
    """Last-position logits [B, V] and the prompt's HostCache, as generation.prefill_fn gives them for the other
    policies. tokens: [B, S] left-padded, S a multiple of the mini-sequence length C. on_layer(i) after layer i."""
    S = tokens.shape[1]
    start_np = np.asarray(start)
    rope_len = S - int(start_np.min())  # the longest row's length, as prefill_layer reads it
    cache = HostCache(blocks=[[] for _ in range(cfg.num_layers)], spans=[], start=start, length=0,
                      heads=P.stream_heads(cfg, policy, traced_degree()))
    return _run(params, np.asarray(tokens), S, cache, rope_len, cfg, policy, on_layer), cache


def feed(params, ids: list[int], cache: HostCache | None, cfg: Config, policy: MemoryPolicy, on_layer=None):
    """A session's feed (momjax.Session): logits [1, V] after the last of ids, their K/V appended to `cache` (a
    new one when None) at its length. ids are right-padded to a length bucket; chunks of padding only are not
    run, and blocks of padding only are not kept. The result is what a prefill of the session's tokens and ids
    together computes: the new queries see every valid key before them. Short feeds' small blocks are merged
    into blocks of a long prompt's size once a few have built up (HostCache.compact)."""
    n = len(ids)
    width = G.bucket_length(n, policy)
    tokens = np.zeros((1, width), np.int32)
    tokens[0, :n] = ids
    if cache is None:
        cache = HostCache(blocks=[[] for _ in range(cfg.num_layers)], spans=[], start=jnp.zeros((1,), jnp.int32),
                          length=0, heads=P.stream_heads(cfg, policy, traced_degree()))
    logits = _run(params, tokens, n, cache, cache.length + n, cfg, policy, on_layer)
    cache.compact(layout(cfg, policy, policy.minisequence, traced_degree())[0])  # a long prompt's block size
    return logits, cache


def _run(params, tokens: np.ndarray, n: int, cache: HostCache, rope_len: int, cfg: Config, policy: MemoryPolicy,
         on_layer):
    """Run tokens [B, W] (the first n of each row real, the rest right padding) through every layer chunk by chunk,
    at sequence indices cache.length + [0, W), appending their blocks to cache (in place; its length grows by n).
    Returns the logits [B, V] at the last real token."""
    B, W = tokens.shape
    C = M.chunk_length(W, policy)
    block, heads = layout(cfg, policy, C, traced_degree())
    if heads != cache.heads:
        raise InputError(f"this cache's blocks hold {cache.heads} KV heads each; host_heads={heads} cannot extend it")
    offset, end = cache.length, cache.length + n
    N, L, K, H = -(-n // C), cfg.num_layers, cfg.num_kv_heads, cfg.num_heads  # chunks with a real token
    rope_len = jnp.int32(rope_len)
    embed = to_device(params.embed)  # with host weights, on the device for the embedding only
    xs = [P.embed_fn(embed, jnp.asarray(tokens[:, c * C:(c + 1) * C])) for c in range(N)]
    del embed
    # The new blocks: chunk c's block j starts at offset + c*C + j*block, and is kept when it holds a real token.
    firsts = [f for f in range(offset, offset + N * C, block) if f < end]
    spans = list(cache.spans) + [(f, min(f + block, end)) for f in firsts]
    at = jnp.int32((n - 1) % C)  # the last real token's position in the last chunk
    x_last, layers = None, []
    for l, lp in enumerate(device_layers(params)):
        last = policy.last_position_only and l == L - 1
        stored = list(cache.blocks[l])  # this layer's blocks so far: stored[b][g]
        for c in range(N):
            q_first = offset + c * C
            x, q, blocks = P.qkv_fn(lp, xs[c], jnp.int32(q_first), cache.start, rope_len, cfg=cfg, policy=policy,
                                   block=block, heads=heads)
            stored.extend(b for j, b in enumerate(blocks) if q_first + j * block < end)
            if not last or c == N - 1:
                carries = _attend_chunk(q, stored, spans[:len(stored)], q_first, heads, cache.start, cfg, policy)
                out = P.finish_fn(lp, x, carries, at, cfg=cfg, G=H // K, last=last)
                if last:
                    x_last = out
                else:
                    xs[c] = out
            del x, q
        layers.append(stored)
        if on_layer is not None:
            jax.block_until_ready(x_last if last else xs[-1])
            on_layer(l)
    cache.blocks, cache.spans, cache.length = layers, spans, end  # all at once: a failed feed changes nothing
    head = head_params(params)
    x, at = (x_last, jnp.int32(0)) if x_last is not None else (xs[-1], at)  # the last layer's one position, or all
    return P.head_fn(to_device(head), x, at, cfg=cfg)


def _attend_chunk(q, stored, spans, q_first: int, heads: int, start, cfg: Config, policy: MemoryPolicy):
    """Every group's attention state for a chunk's queries (first at q_first) over the layer's blocks so far
    (stored, at spans: the chunk's own included), streamed from the host one block at a time."""
    window = cfg.sliding_window
    # Blocks wholly outside every query's window are skipped (the chunk's first query is its earliest).
    seen = [b for b, (_, end) in enumerate(spans) if window is None or q_first - (end - 1) < window]
    Nq, Bq, _, rows, E = q.shape
    G = cfg.num_heads // cfg.num_kv_heads
    common = dict(G=G, window=window, kv_block=policy.kv_block, heads=heads)
    carries = []
    for g in range(cfg.num_kv_heads // heads):
        def attend(carry, kv, i, g=g):
            first, end = spans[seen[i]]
            return P.attend_fn(q, carry, kv, g, jnp.int32(q_first), jnp.int32(first), jnp.int32(end), start, **common)
        carries.append(_streamed([stored[b][g] for b in seen], attend, P.empty_fn((Nq, Bq, heads, rows), E)))
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
    blocks = [[[to_device(b) for b in bj] for bj in layer] if l < resident else layer
              for l, layer in enumerate(cache.blocks)]
    kv_dtype = blocks[0][0][0][0].dtype
    tail_k, tail_v = _tails(cache, kv_dtype, max_new_tokens - 1, cfg)
    B, S, heads = cache.start.shape[0], cache.length, cache.heads
    Gh, E = cfg.num_heads // K, cfg.head_dim
    window = cfg.sliding_window
    head = head_params(params)
    host_weights = weights_on_host(params)
    # With host weights the token's embedding row is looked up here, not by bringing the whole table over.
    rows = np.asarray(params.embed) if host_weights else None
    for t in range(1, max_new_tokens):
        t0 = time.perf_counter()
        step = t - 1
        q_index = S + step
        # Prompt blocks wholly outside the new query's window are skipped.
        seen = [b for b, (_, end) in enumerate(cache.spans) if window is None or q_index - (end - 1) < window]
        x = None if rows is None else jnp.asarray(rows[np.asarray(token)][:, None, :])
        for l, lp in enumerate(device_layers(params)):
            x, q32, k_new, v_new = P.dec_qkv_fn(lp, None if host_weights else params.embed, token, jnp.int32(q_index),
                                               cache.start, x, cfg=cfg, quantized=cache.quantized)
            carries = []
            for g in range(K // heads):
                def attend(carry, kv, i, g=g):
                    first, end = cache.spans[seen[i]]
                    return P.dec_attend_fn(q32, carry, kv, g, jnp.int32(first), jnp.int32(end), jnp.int32(q_index),
                                           cache.start, window=window, heads=heads)
                carries.append(_streamed([blocks[l][b][g] for b in seen], attend, P.dec_empty_fn((B, heads, Gh), E)))
            x, tail_k[l], tail_v[l] = P.dec_finish_fn(lp, x, q32, tuple(carries), tail_k[l], tail_v[l], k_new, v_new,
                                                     jnp.int32(step), jnp.int32(q_index), jnp.int32(S), cfg=cfg)
        logits = P.head_fn(to_device(head), x, jnp.int32(0), cfg=cfg)
        token, done = P.next_fn(logits, key, jnp.int32(t), temperature, top_k, top_p, stop_ids, pad_id, done)
        new, all_done = np.asarray(token)[:, None], bool(np.asarray(done).all())
        stats.decode_s += time.perf_counter() - t0
        yield new, all_done
        if all_done:
            return
