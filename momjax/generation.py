"""Jitted prefill and decode loop, sampling, stop tokens, prompt padding into length buckets.

`prefill_fn` and `decode_fn` are the only jitted entry points for generation. The decode loop runs inside
`lax.while_loop`; each row stops on its own stop token and the loop ends when every row has stopped.
Prompt lengths are padded (on the left) to a small set of buckets so that many prompt lengths share
one compiled prefill.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from momjax import model as M
from momjax.cache import KVCache
from momjax.config import Config, MemoryPolicy

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


def sample(logits, key, temperature, top_k, top_p):
    """Next tokens [B] from logits [B, V]. temperature 0 = greedy; top_k 0 and top_p 1 switch those off."""

    def greedy(_):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def stochastic(_):
        scaled = logits / jnp.maximum(temperature, 1e-6)
        desc = jnp.sort(scaled, axis=-1)[:, ::-1]  # [B, V]
        V = logits.shape[-1]
        k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
        kth = jnp.take_along_axis(desc, (k - 1)[None, None].repeat(logits.shape[0], 0), axis=-1)  # [B, 1]
        # top-p: keep the smallest prefix of the sorted distribution whose mass reaches top_p.
        probs = jax.nn.softmax(jnp.where(desc >= kth, desc, -jnp.inf), axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = mass_before < top_p
        cutoff = jnp.min(jnp.where(keep_sorted, desc, jnp.inf), axis=-1, keepdims=True)  # [B, 1]
        masked = jnp.where((scaled >= kth) & (scaled >= cutoff), scaled, -jnp.inf)
        return jax.random.categorical(key, masked, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, stochastic, greedy, None)


# ---------------------------------------------------------------------- jitted entry points


@functools.partial(jax.jit, static_argnames=("cfg", "policy", "on_layer"))
def prefill_fn(params, tokens, start, cfg: Config, policy: MemoryPolicy, on_layer=None):
    return M.prefill(params, tokens, start, cfg, policy, on_layer=on_layer)


@functools.partial(jax.jit, static_argnames=("cfg", "policy"))
def forward_fn(params, tokens, start, cfg: Config, policy: MemoryPolicy):
    return M.forward_all(params, tokens, start, cfg, policy)


@functools.partial(jax.jit, static_argnames=("cfg", "policy"), donate_argnames=("cache",))
def decode_step_fn(params, token, cache: KVCache, cfg: Config, policy: MemoryPolicy):
    return M.decode_step(params, token, cache, cfg, policy)


def is_stop(token, stop_ids):
    """[B] bool: which tokens are stop tokens. stop_ids: [n] int32, -1 entries are ignored."""
    return jnp.any((token[:, None] == stop_ids[None, :]) & (stop_ids[None, :] >= 0), axis=-1)


@jax.jit
def first_token_fn(logits, key, temperature, top_k, top_p, stop_ids):
    """The first new token of each row, sampled from the prefill logits, and whether it is a stop token."""
    token = sample(logits, jax.random.fold_in(key, 0), temperature, top_k, top_p)
    return token, is_stop(token, stop_ids)


def decode_loop(params, cache: KVCache, tail_k, tail_v, token, t, done, limit, key, temperature, top_k, top_p,
                stop_ids, pad_id, cfg: Config, policy: MemoryPolicy, steps: int):
    """Decode new tokens t, t+1, ... (token is new token t-1) in a lax.while_loop, until new token `limit`,
    `steps` tokens, or every row stopped. Rows that stopped get pad_id.

    The prompt K/V are closed over, not carried: only the generated-token tail changes while decoding.
    Returns (tokens [B, steps], count, t, done, tail_k, tail_v, token) to resume from.
    """
    B = token.shape[0]

    def cond(state):
        i, t, done = state[:3]
        return (i < steps) & (t < limit) & ~jnp.all(done)

    def body(state):
        i, t, done, tail_k, tail_v, token, out = state
        step_cache = cache.replace(tail_k=tail_k, tail_v=tail_v, length=t - 1)
        logits, step_cache = M.decode_step(params, token, step_cache, cfg, policy)
        nxt = jnp.where(done, pad_id, sample(logits, jax.random.fold_in(key, t), temperature, top_k, top_p))
        out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], i, axis=1)
        done = done | is_stop(nxt, stop_ids)
        return i + 1, t + 1, done, step_cache.tail_k, step_cache.tail_v, nxt, out

    out = jnp.full((B, steps), pad_id, jnp.int32)
    state = (jnp.int32(0), t, done, tail_k, tail_v, token, out)
    i, t, done, tail_k, tail_v, token, out = jax.lax.while_loop(cond, body, state)
    return out, i, t, done, tail_k, tail_v, token


# Decoding in resumable chunks (streaming): `limit` is traced, so any chunk length up to `steps` shares one program.
decode_chunk_fn = jax.jit(decode_loop, static_argnames=("cfg", "policy", "steps"), donate_argnames=("tail_k", "tail_v"))


@functools.partial(jax.jit, static_argnames=("cfg", "policy", "max_new_tokens"))
def decode_fn(params, cache: KVCache, first_logits, key, temperature, top_k, top_p, stop_ids, pad_id,
              cfg: Config, policy: MemoryPolicy, max_new_tokens: int):
    """Sample the first token from the prefill logits, then decode the rest in one while_loop.

    Returns (tokens [B, max_new_tokens], lengths [B]): row b's tokens after lengths[b] are pad_id.
    """
    cache = cache.with_tail(max(max_new_tokens - 1, 1))
    first, done = first_token_fn(first_logits, key, temperature, top_k, top_p, stop_ids)
    rest, *_ = decode_loop(params, cache, cache.tail_k, cache.tail_v, first, jnp.int32(1), done,
                           jnp.int32(max_new_tokens), key, temperature, top_k, top_p, stop_ids, pad_id, cfg, policy,
                           max(max_new_tokens - 1, 1))
    out = jnp.concatenate([first[:, None], rest], axis=1)[:, :max_new_tokens]  # [B, max_new_tokens]
    stops = is_stop(out.reshape(-1), stop_ids).reshape(out.shape)
    first_stop = jnp.argmax(stops, axis=1)
    lengths = jnp.where(stops.any(axis=1), first_stop + 1, max_new_tokens).astype(jnp.int32)
    return out, lengths
