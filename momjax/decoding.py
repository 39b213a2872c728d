"""The one decode loop: the new tokens that follow a prefilled cache, yielded as they are decoded.

`generate`, `Session.generate`, `Session.stream`, `momjax generate` and `momjax chat` all decode through
`decode_stream`: the first token is sampled from the prefill's logits, then the resumable decode program
(generation.decode_chunk_fn, a `lax.while_loop` compiled once) runs in chunks. A caller that shows text as it
arrives starts with one-token chunks that double until a chunk takes about `chunk_seconds`, so text appears
promptly and throughput stays close to a single loop; a caller that only wants the result asks for one chunk
of everything. Either way the tokens are the same: every chunk runs the same steps with the same keys.

The decode program is compiled ahead of time (`lower(...).compile()`, which JAX caches in the process), so its
compile time is reported apart from decoding.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from momjax import generation as G
from momjax import offload
from momjax.cache import KVCache, place_for_decode
from momjax.checks import Sampling
from momjax.config import Config
from momjax.policy import MemoryPolicy

CHUNK_MAX = 64  # most tokens one streamed decode chunk may produce (its output buffer)
CHUNK_SECONDS = 0.25  # streamed chunks double until one takes about this long


@dataclass
class DecodeStats:
    """Filled in by decode_stream as it runs (batch row 0's view for stopped_at)."""

    new_tokens: int = 0  # longest row's new tokens so far, the first included
    first_token_s: float = 0.0  # sampling the first token (its program's compile included)
    decode_s: float = 0.0  # the decode chunks after the first token, compilation excluded
    decode_compile_s: float = 0.0
    stopped_at: int | None = None  # the stop token that ended row 0, if one did

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.new_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")


def prefill(params, tokens, start, cfg: Config, policy: MemoryPolicy, on_layer=None, compiled=None):
    """(logits [B, V], the prompt's cache) for any policy: generation.prefill_fn, or for `mom-host` its own
    chunk-by-chunk prefill (momjax.offload.prefill, which takes no programs compiled ahead)."""
    if policy.on_host:
        return offload.prefill(params, tokens, start, cfg, policy, on_layer=on_layer)
    return G.prefill_fn(params, tokens, start, cfg, policy, on_layer=on_layer, compiled=compiled)


def decode_stream(params, cache: KVCache, logits, sampling: Sampling, cfg: Config, policy: MemoryPolicy,
                  max_new_tokens: int, *, stats: DecodeStats | None = None, streamed: bool = True,
                  chunk_max: int = CHUNK_MAX,
                  chunk_seconds: float = CHUNK_SECONDS) -> Iterator[np.ndarray]:
    """New tokens after a prefill (logits [B, V] and its cache, as prefill_fn or a session feed gives them):
    yields int32 arrays [B, n] as they are decoded, at most max_new_tokens columns in all. A row that stopped
    (on one of sampling.stop_ids, included) is padded with sampling.pad_id; the loop ends when every row has.

    streamed: chunks grow from one token (for callers that show tokens as they come); False decodes everything
    after the first token in one chunk.
    The cache is placed for decoding as the policy says (`mom`: the one copy back to the device).
    """
    stats = stats if stats is not None else DecodeStats()
    key, temperature, top_k, top_p, stop_ids, pad_id = sampling.program_args()
    t0 = time.perf_counter()
    token, done = G.first_token_fn(logits, key, temperature, top_k, top_p, stop_ids)
    first = np.asarray(token)
    stats.first_token_s = time.perf_counter() - t0
    stats.new_tokens = 1
    all_done = bool(np.asarray(done).all())
    if all_done and sampling.stop_ids:
        stats.stopped_at = int(first[0])
    yield first[:, None]
    if all_done or max_new_tokens == 1:
        return

    if policy.on_host:  # mom-host: every step streams the prompt's K/V blocks (momjax.offload)
        for new, all_done in offload.decode_rest(params, cache, token, done, sampling.program_args(), cfg, policy,
                                                 max_new_tokens, stats):
            stats.new_tokens += 1
            if all_done and sampling.stop_ids and stats.stopped_at is None and int(new[0, 0]) in sampling.stop_ids:
                stats.stopped_at = int(new[0, 0])
            yield new
        return
    rest = max_new_tokens - 1
    steps = chunk_max if streamed else rest
    cache = place_for_decode(cache, policy).with_tail(max(rest, 1))
    tail_k, tail_v = cache.tails  # with int8 K/V: (values, scales) pairs
    t = jnp.int32(1)
    c0 = time.perf_counter()
    fn, args, static = decode_program(params, cache, token, done, (key, temperature, top_k, top_p, stop_ids, pad_id),
                                      cfg, policy, steps)
    step = fn.lower(*args, **static).compile()
    stats.decode_compile_s = time.perf_counter() - c0
    chunk = 1 if streamed else rest
    while stats.new_tokens < max_new_tokens:
        c0 = time.perf_counter()
        limit = jnp.int32(min(stats.new_tokens + chunk, max_new_tokens))
        out, n, t, done, tail_k, tail_v, token = step(params, cache, tail_k, tail_v, token, t, done, limit, key,
                                                      temperature, top_p, stop_ids, pad_id)  # top_k is static
        new = np.asarray(out)[:, : int(n)]
        elapsed = time.perf_counter() - c0
        stats.decode_s += elapsed  # chunks only: the time the caller spends printing is not decoding
        stats.new_tokens += new.shape[1]
        all_done = bool(np.asarray(done).all())
        if new.shape[1]:
            if all_done and sampling.stop_ids and stats.stopped_at is None and int(new[0, -1]) in sampling.stop_ids:
                stats.stopped_at = int(new[0, -1])
            yield new
        if all_done or not new.shape[1]:
            return
        if elapsed < chunk_seconds:
            chunk = min(2 * chunk, steps)


def decode_program(params, cache: KVCache, token, done, program_args: tuple, cfg: Config, policy: MemoryPolicy,
                   steps: int):
    """(fn, args, static) of the resumable decode program for a cache that has its tail (KVCache.with_tail): what
    decode_stream runs, to compile ahead (`fn.lower(*args, **static).compile()`) or for a GPU target without a
    GPU (momjax.targets.compile; args may be abstract). token, done: the last token and the stopped rows [B];
    program_args: Sampling.program_args()."""
    key, temperature, top_k, top_p, stop_ids, pad_id = program_args
    tail_k, tail_v = cache.tails
    t = jnp.int32(1)
    args = (params, cache, tail_k, tail_v, token, t, done, t, key, temperature, top_k, top_p, stop_ids, pad_id)
    return G.decode_chunk_fn, args, dict(cfg=cfg, policy=policy, steps=steps)


def collect(chunks, max_new_tokens: int, pad_id: int, stop_ids) -> tuple[np.ndarray, np.ndarray]:
    """The chunks of decode_stream as (tokens [B, max_new_tokens] padded with pad_id, lengths [B]): a row's
    length counts its tokens up to and including its first stop token."""
    out = np.concatenate(list(chunks), axis=1)
    B = out.shape[0]
    tokens = np.full((B, max_new_tokens), pad_id, np.int32)
    tokens[:, : out.shape[1]] = out[:, :max_new_tokens]
    stops = np.isin(tokens, list(stop_ids)) if len(stop_ids) else np.zeros_like(tokens, bool)
    lengths = np.where(stops.any(axis=1), stops.argmax(axis=1) + 1, max_new_tokens).astype(np.int32)
    return tokens, lengths
