"""Jitted prefill and decode programs, sampling, stop tokens, prompt padding into length buckets.

Prefill is a short sequence of jitted programs run from Python: `embed_fn`, then `layer_fn` once per layer
(one compiled program serves every layer: they all have the same shapes), `last_layer_fn` for the final
layer when only its last position is needed, and `logits_fn`. Compile time is therefore flat in depth,
each layer's K/V is its own array (offloaded as the layer finishes), and progress is reported in order.
`prefill_stages` lists these programs with their abstract arguments, so memory reports and the CLI can
compile exactly what `prefill_fn` runs.

Decode runs inside `lax.while_loop` (`decode_chunk_fn`, resumable, run in chunks by momjax.decoding); each step
walks the layers with a Python loop (model.decode_step); each row stops on its own stop token and the loop ends
when every row has stopped. Prompt lengths are
padded (on the left) to a small set of buckets so that many prompt lengths share one compiled prefill.

With weights in host memory (momjax.load(..., weights="host")) prefill and feeds bring each layer's weights to the
device as the Python loop reaches it, the next layer's copy in flight (params.device_layers), and the embedding
and the LM head for their own program; the decode step copies them in its program (model.decode_step).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from momjax import model as M
from momjax.cache import KVCache
from momjax.config import Config
from momjax.mesh import embed_lookup
from momjax.params import device_layers, head_params, to_device
from momjax.policy import MemoryPolicy

MIN_BUCKET = 16
# Above this length prompts are padded to a multiple of it instead of the next power of two.
BUCKET_GRANULE = 2048


def bucket_length(n: int, policy: MemoryPolicy) -> int:
    """Padded prompt length: a power of two from 16 up to 2048, then a multiple of 2048 (and of the chunk)."""
    if n <= MIN_BUCKET:
        padded = MIN_BUCKET
    elif n <= BUCKET_GRANULE:
        padded = 1 << (n - 1).bit_length()
    else:
        padded = -(-n // BUCKET_GRANULE) * BUCKET_GRANULE
    c = policy.minisequence
    if c is not None and padded > c and padded % c:
        padded = -(-padded // c) * c
    return padded


def left_pad(prompts: list[list[int]], length: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows right-aligned in a [B, length] int32 array; returns (tokens, start) with start = pad count."""
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    start = np.zeros(len(prompts), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, length - len(p):] = p
        start[b] = length - len(p)
    return tokens, start


# ---------------------------------------------------------------------- sampling


def sample(logits, key, temperature, top_k: int, top_p):
    """Next tokens [B] from logits [B, V]. temperature 0 = greedy (traced); top_k (static, 0 = off) keeps the k
    most likely tokens, found with lax.top_k; top_p (traced, 1 = off) the smallest prefix of the sorted
    distribution whose mass reaches top_p. Without top-k or top-p nothing is sorted at run time."""
    V = logits.shape[-1]

    def greedy(_):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def nucleus(values):  # values [B, n] sorted descending -> the same with the tokens outside top_p at -inf
        probs = jax.nn.softmax(values, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        return jnp.where(mass_before < top_p, values, -jnp.inf)

    def stochastic(_):
        scaled = logits / jnp.maximum(temperature, 1e-6)
        if top_k and top_k < V:
            values, ids = jax.lax.top_k(scaled, top_k)  # [B, k], sorted descending
            choice = jax.random.categorical(key, nucleus(values), axis=-1)
            return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)

        def top_p_only(_):
            desc = jnp.sort(scaled, axis=-1)[:, ::-1]  # [B, V]
            kept = nucleus(desc)
            cutoff = jnp.min(jnp.where(kept > -jnp.inf, desc, jnp.inf), axis=-1, keepdims=True)  # [B, 1]
            return jnp.where(scaled >= cutoff, scaled, -jnp.inf)

        masked = jax.lax.cond(top_p < 1, top_p_only, lambda _: scaled, None)
        return jax.random.categorical(key, masked, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, stochastic, greedy, None)


# ---------------------------------------------------------------------- jitted entry points


@functools.partial(jax.jit, static_argnames=("chunk",))
def embed_fn(embed, tokens, start, chunk: int):
    """tokens [B, S] -> chunk-major embeddings x [N, B, C, D] and rope positions [N, B, C]."""
    return M.embed_chunks(M.Params(embed=embed, layers=(), final_norm=None), tokens, start, chunk)


@functools.partial(jax.jit, static_argnames=("cfg", "policy", "keep_kv"), donate_argnames=("x",))
def layer_fn(lp, x, pos, start, cfg: Config, policy: MemoryPolicy, keep_kv: bool = True):
    """One layer of prefill: x [N, B, C, D] -> (x, k, v), or x alone without keep_kv. x is donated."""
    x, k, v = M.prefill_layer(lp, x, pos, start, cfg, policy)
    return (x, k, v) if keep_kv else x


@functools.partial(jax.jit, static_argnames=("cfg", "policy"))
def last_layer_fn(lp, x, pos, start, cfg: Config, policy: MemoryPolicy):
    """The final layer at the last position only: (x [1, B, 1, D], k, v)."""
    return M.prefill_layer(lp, x, pos, start, cfg, policy, last=True)


@functools.partial(jax.jit, static_argnames=("cfg", "every_position"))
def logits_fn(head: M.Params, x, cfg: Config, every_position: bool = False):
    """Last-position logits [B, V], or logits at every position [B, S, V]. head: Params without layers."""
    return M.all_logits(head, x, cfg) if every_position else M.last_logits(head, x, cfg)


def device_weights(params: M.Params) -> M.Params:
    """The weights as the prefill and feed programs receive them: abstract, on the device (weights in host memory
    come over before each program runs), split as they are."""
    def on_device(a):
        where = getattr(a, "sharding", None)
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=where and where.with_memory_kind("device"))
    return jax.tree.map(on_device, params)


@dataclass(frozen=True)
class Stage:
    """One jitted program of a prefill: what it is, the function, its arguments (arrays or abstract
    ShapeDtypeStructs), static keyword arguments, and how many times one prefill runs it."""

    name: str
    fn: Callable
    args: tuple
    static: dict
    runs: int = 1

    def lower(self):
        return self.fn.lower(*self.args, **self.static)


def prefill_stages(params, tokens, start, cfg: Config, policy: MemoryPolicy, every_position: bool = False):
    """The programs a prefill (or, with every_position, a forward pass) runs, in order, each listed once with
    its arguments' abstract shapes: "embed", "layer" (runs times), "last" (the final layer at its last
    position, when the policy says so) and "logits". Arguments keep their shardings (memory kinds)."""
    if every_position:
        policy = exact(policy)
    chunk = M.chunk_length(tokens.shape[1], policy)
    abstract = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None))
    params = device_weights(params)
    x, pos = jax.eval_shape(functools.partial(embed_fn, chunk=chunk), params.embed, tokens, start)
    x, pos = (jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(start, "sharding", None)) for a in (x, pos))
    L = cfg.num_layers
    last = policy.last_position_only and not every_position
    lp = jax.tree.map(abstract, params.layers[0])
    stages = [Stage("embed", embed_fn, (params.embed, tokens, start), dict(chunk=chunk))]
    if L - last:
        stages.append(Stage("layer", layer_fn, (lp, x, pos, start), dict(cfg=cfg, policy=policy,
                                                                           keep_kv=not every_position), L - last))
    if last:
        stages.append(Stage("last", last_layer_fn, (lp, x, pos, start), dict(cfg=cfg, policy=policy)))
        x = jax.ShapeDtypeStruct((1, x.shape[1], 1, x.shape[3]), x.dtype, sharding=x.sharding)
    stages.append(Stage("logits", logits_fn, (head_params(params), x), dict(cfg=cfg, every_position=every_position)))
    return stages


def compile_prefill(params, tokens, start, cfg: Config, policy: MemoryPolicy, every_position: bool = False):
    """Compile the prefill's programs ahead of time: {stage name: compiled program}, for `prefill_fn`."""
    return {s.name: s.lower().compile() for s in prefill_stages(params, tokens, start, cfg, policy, every_position)}


def exact(policy: MemoryPolicy) -> MemoryPolicy:
    """The policy with K/V kept in the model's dtype: a forward pass keeps no cache, so it has nothing to
    quantise and stays exact."""
    return policy.replace(kv_dtype=None) if policy.quantized_kv else policy


def _run_layers(params, tokens, start, cfg, policy, *, every_position, on_layer, compiled):
    compiled = compiled or {}
    call = lambda name, fn, *args, **static: compiled[name](*args) if name in compiled else fn(*args, **static)
    chunk = M.chunk_length(tokens.shape[1], policy)
    x, pos = call("embed", embed_fn, to_device(params.embed), tokens, start, chunk=chunk)
    L = cfg.num_layers
    last = policy.last_position_only and not every_position
    ks, vs = [], []
    for i, lp in enumerate(device_layers(params)):
        if last and i == L - 1:
            x, k, v = call("last", last_layer_fn, lp, x, pos, start, cfg=cfg, policy=policy)
        elif every_position:
            x, k, v = call("layer", layer_fn, lp, x, pos, start, cfg=cfg, policy=policy, keep_kv=False), None, None
        else:
            x, k, v = call("layer", layer_fn, lp, x, pos, start, cfg=cfg, policy=policy, keep_kv=True)
        ks.append(k)
        vs.append(v)
        if on_layer is not None:
            x.block_until_ready()  # report a layer when it has finished, not when it was queued
            on_layer(i)
    logits = call("logits", logits_fn, to_device(head_params(params)), x, cfg=cfg, every_position=every_position)
    return logits, ks, vs


def prefill_fn(params, tokens, start, cfg: Config, policy: MemoryPolicy, on_layer=None, compiled=None):
    """Last-position logits [B, V] and the prompt's KVCache. tokens: [B, S] left-padded, S a chunk multiple.

    on_layer(i) is called after layer i (0-based) has finished. compiled: programs from `compile_prefill`
    (otherwise each is compiled on first use by jax.jit).
    """
    logits, ks, vs = _run_layers(params, tokens, start, cfg, policy, every_position=False, on_layer=on_layer,
                                 compiled=compiled)
    if policy.quantized_kv:  # per-layer (int8, scale) pairs
        (ks, k_scale), (vs, v_scale) = zip(*ks), zip(*vs)
        return logits, KVCache.from_prompt(ks, vs, start, k_scale=k_scale, v_scale=v_scale)
    return logits, KVCache.from_prompt(ks, vs, start)


def forward_fn(params, tokens, start, cfg: Config, policy: MemoryPolicy):
    """Logits at every position [B, S, V]; the LM head runs over the policy's mini-sequences. Exact whatever
    the policy's kv_dtype (see `exact`)."""
    return _run_layers(params, tokens, start, cfg, exact(policy), every_position=True, on_layer=None,
                       compiled=None)[0]


@functools.partial(jax.jit, static_argnames=("cfg", "policy"), donate_argnames=("cache",))
def decode_step_fn(params, token, cache: KVCache, cfg: Config, policy: MemoryPolicy):
    return M.decode_step(params, token, cache, cfg, policy)


def is_stop(token, stop_ids):
    """[B] bool: which tokens are stop tokens. stop_ids: [n] int32, -1 entries are ignored."""
    return jnp.any((token[:, None] == stop_ids[None, :]) & (stop_ids[None, :] >= 0), axis=-1)


@functools.partial(jax.jit, static_argnames=("top_k",))
def first_token_fn(logits, key, temperature, top_k, top_p, stop_ids):
    """The first new token of each row, sampled from the prefill logits, and whether it is a stop token."""
    token = sample(logits, jax.random.fold_in(key, 0), temperature, top_k, top_p)
    return token, is_stop(token, stop_ids)


def decode_loop(params, cache: KVCache, tail_k, tail_v, token, t, done, limit, key, temperature, top_k, top_p,
                stop_ids, pad_id, cfg: Config, policy: MemoryPolicy, steps: int):
    """Decode new tokens t, t+1, ... (token is new token t-1) in a lax.while_loop, until new token `limit`,
    `steps` tokens, or every row stopped. Rows that stopped get pad_id.

    The prompt K/V are closed over, not carried: only the generated-token tail changes while decoding.
    tail_k, tail_v: the tail as `cache.tails` gives it (for an int8 cache, (values, scales) pairs).
    top_k is static (a Python int, 0 = off): lax.top_k needs it at compile time.
    Returns (tokens [B, steps], count, t, done, tail_k, tail_v, token) to resume from.
    """
    B = token.shape[0]

    def cond(state):
        i, t, done = state[:3]
        return (i < steps) & (t < limit) & ~jnp.all(done)

    def body(state):
        i, t, done, tail_k, tail_v, token, out = state
        step_cache = cache.with_tails(tail_k, tail_v).replace(length=t - 1)
        logits, step_cache = M.decode_step(params, token, step_cache, cfg, policy)
        nxt = jnp.where(done, pad_id, sample(logits, jax.random.fold_in(key, t), temperature, top_k, top_p))
        out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], i, axis=1)
        done = done | is_stop(nxt, stop_ids)
        return i + 1, t + 1, done, *step_cache.tails, nxt, out

    out = jnp.full((B, steps), pad_id, jnp.int32)
    state = (jnp.int32(0), t, done, tail_k, tail_v, token, out)
    i, t, done, tail_k, tail_v, token, out = jax.lax.while_loop(cond, body, state)
    return out, i, t, done, tail_k, tail_v, token


# Decoding in resumable chunks: `limit` is traced, so any chunk length up to `steps` shares one program. The one
# decode loop of momjax.decoding runs it, for generate and for every streamed answer.
decode_chunk_fn = jax.jit(decode_loop, static_argnames=("cfg", "policy", "steps", "top_k"),
                          donate_argnames=("tail_k", "tail_v"))


# ---------------------------------------------------------------------- session feeds


@functools.partial(jax.jit, static_argnames=("chunk",))
def feed_embed_fn(embed, tokens, offset, chunk: int):
    """Tokens [B, W] fed at key indices offset + [0, W) -> chunk-major x [N, B, C, D] and positions [N, B, C]."""
    B, W = tokens.shape
    to_chunks = lambda t: jnp.moveaxis(t.reshape(B, W // chunk, chunk), 1, 0)
    pos = jnp.broadcast_to(offset + jnp.arange(W, dtype=jnp.int32), (B, W))
    return embed_lookup(embed, to_chunks(tokens)), to_chunks(pos)


@functools.partial(jax.jit, static_argnames=("cfg", "policy"), donate_argnames=("x", "k_cache", "v_cache"))
def feed_layer_fn(lp, x, pos, k_cache, v_cache, offset, count, cfg: Config, policy: MemoryPolicy):
    """One layer of a session feed (model.feed_layer): (x, k_cache, v_cache); x and the buffers are donated,
    so the new K/V are written in place. offset and count are traced: one program serves every offset."""
    return M.feed_layer(lp, x, pos, k_cache, v_cache, offset, count, cfg, policy)


@functools.partial(jax.jit, static_argnames=("cfg", "policy"), donate_argnames=("k_cache", "v_cache"))
def feed_last_fn(lp, x, pos, k_cache, v_cache, offset, count, cfg: Config, policy: MemoryPolicy):
    """The final layer of a feed at the last real token only: (x [1, B, 1, D], k_cache, v_cache)."""
    return M.feed_layer(lp, x, pos, k_cache, v_cache, offset, count, cfg, policy, last=True)


@functools.partial(jax.jit, static_argnames=("cfg",))
def feed_logits_fn(head: M.Params, x, count, cfg: Config):
    """Logits [B, V] at the last real token of a feed: position count - 1 of x (or x's one position)."""
    x_last = M.nth_position(x, count - 1 if x.shape[0] * x.shape[2] > 1 else 0)  # [B, 1, D]
    return M.lm_head(head, M.rms_norm(x_last, head.final_norm, cfg.rms_norm_eps))[:, 0]


def feed_stages(params, tokens, k_cache, v_cache, cfg: Config, policy: MemoryPolicy):
    """The programs a session feed runs, in order, with abstract arguments (as `prefill_stages`): "embed",
    "layer" (runs times), "last" (when the policy computes only the last position) and "logits".
    tokens: [B, W] (W a bucket length); k_cache, v_cache: one layer's buffer [B, K, cap, E] (int8: with its scales)."""
    abstract = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None))
    params = device_weights(params)
    chunk = M.chunk_length(tokens.shape[1], policy)
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=getattr(tokens, "sharding", None))
    x, pos = jax.eval_shape(functools.partial(feed_embed_fn, chunk=chunk), params.embed, tokens, scalar)
    x, pos = (jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(tokens, "sharding", None)) for a in (x, pos))
    L, last = cfg.num_layers, policy.last_position_only
    lp = jax.tree.map(abstract, params.layers[0])
    kc, vc = jax.tree.map(abstract, k_cache), jax.tree.map(abstract, v_cache)
    stages = [Stage("embed", feed_embed_fn, (params.embed, tokens, scalar), dict(chunk=chunk))]
    static = dict(cfg=cfg, policy=policy)
    if L - last:
        stages.append(Stage("layer", feed_layer_fn, (lp, x, pos, kc, vc, scalar, scalar), static, L - last))
    if last:
        stages.append(Stage("last", feed_last_fn, (lp, x, pos, kc, vc, scalar, scalar), static))
        x = jax.ShapeDtypeStruct((1, x.shape[1], 1, x.shape[3]), x.dtype, sharding=x.sharding)
    stages.append(Stage("logits", feed_logits_fn, (head_params(params), x, scalar), dict(cfg=cfg)))
    return stages


def compile_feed(params, tokens, k_cache, v_cache, cfg: Config, policy: MemoryPolicy) -> dict:
    """Compile a session feed's programs ahead of time: {stage name: compiled program}, for `feed_fn`. k_cache,
    v_cache: one layer's buffer (as feed_stages takes them)."""
    return {s.name: s.lower().compile() for s in feed_stages(params, tokens, k_cache, v_cache, cfg, policy)}


def feed_fn(params, tokens, ks, vs, offset: int, count: int, cfg: Config, policy: MemoryPolicy, on_layer=None,
            compiled=None):
    """Run a session feed layer by layer: tokens [B, W] (count real ones, then right padding) at key index
    offset, into the per-layer buffers ks, vs (donated; pass them on only through the result).
    Returns (logits [B, V] at the last real token, new ks, new vs). on_layer(i) as in `prefill_fn`; compiled:
    programs from `compile_feed` (otherwise each is compiled on first use by jax.jit)."""
    compiled = compiled or {}
    call = lambda name, fn, *args, **static: compiled[name](*args) if name in compiled else fn(*args, **static)
    chunk = M.chunk_length(tokens.shape[1], policy)
    offset, count = jnp.int32(offset), jnp.int32(count)
    x, pos = call("embed", feed_embed_fn, to_device(params.embed), tokens, offset, chunk=chunk)
    L, last = cfg.num_layers, policy.last_position_only
    new_k, new_v = [], []
    for i, lp in enumerate(device_layers(params)):
        name, fn = ("last", feed_last_fn) if last and i == L - 1 else ("layer", feed_layer_fn)
        x, k, v = call(name, fn, lp, x, pos, ks[i], vs[i], offset, count, cfg=cfg, policy=policy)
        new_k.append(k)
        new_v.append(v)
        if on_layer is not None:
            x.block_until_ready()
            on_layer(i)
    logits = call("logits", feed_logits_fn, to_device(head_params(params)), x, count, cfg=cfg)
    return logits, tuple(new_k), tuple(new_v)
