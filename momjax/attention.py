"""Causal grouped-query attention that never builds the S x S score matrix.

Prefill uses a blockwise online softmax (the flash-attention recurrence) in pure JAX: queries are taken
in blocks, and each block walks only the key blocks it can see (causal, left padding, sliding window),
so memory is O(block x block) per head and work skips the masked upper triangle. Decode attends one
query to the prompt cache and to the generated-token tail together.

Letters: B batch, S queries, T keys, K kv heads, G query heads per kv head, E head dim.
Masking: query at sequence index i sees key j iff  start[b] <= j <= i  and  i - j < window.
`start[b]` is the row's left padding. Masked scores use a finite -1e30 (not -inf) so a fully masked
row (a padding query) gives zeros, never NaN.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

MASKED = -1e30


def _divisor_block(n: int, block: int) -> int:
    """The block size used for a length-n axis: n itself if short, else a divisor of n not above block."""
    return n if n <= block else math.gcd(n, block)


def _visible(q_idx, k_idx, start, window):
    """[B, 1, 1, Sq, Tk] bool: which keys each query may see."""
    q = q_idx[None, None, None, :, None]
    k = k_idx[None, None, None, None, :]
    ok = (k <= q) & (k >= start[:, None, None, None, None])
    if window is not None:
        ok &= q - k < window
    return ok


def blockwise_attention(q, k, v, q_offset, start, *, window=None, q_block=512, kv_block=512):
    """Causal attention of queries q at sequence indices q_offset + [0, S) over keys k, v at [0, T).

    q: [B, S, H, E]; k, v: [B, K, T, E]; start: [B] int32 (left padding); q_offset: int (may be traced).
    Returns [B, S, H, E] in q's dtype. Softmax statistics are float32.
    """
    B, S, H, E = q.shape
    K, T = k.shape[1], k.shape[2]
    G = H // K
    qb = _divisor_block(S, q_block)
    kb = _divisor_block(T, kv_block)
    scale = 1.0 / math.sqrt(E)
    q = q.reshape(B, S // qb, qb, K, G, E)  # [B, Nq, qb, K, G, E]
    q = jnp.moveaxis(q, 1, 0)  # [Nq, B, qb, K, G, E]

    def one_query_block(args):
        qblk, i = args  # [B, qb, K, G, E], block index
        first_q = q_offset + i * qb
        last_q = first_q + qb - 1
        # Key blocks this query block can see: up to its last query (causal), from its window start.
        hi = jnp.minimum(last_q // kb + 1, T // kb)
        lo = 0 if window is None else jnp.maximum(first_q - window + 1, 0) // kb
        q_idx = first_q + jnp.arange(qb)

        def step(j, carry):
            m, l, acc = carry  # [B, K, G, qb], [B, K, G, qb], [B, K, G, qb, E]
            kj = jax.lax.dynamic_slice_in_dim(k, j * kb, kb, axis=2)  # [B, K, kb, E]
            vj = jax.lax.dynamic_slice_in_dim(v, j * kb, kb, axis=2)
            s = jnp.einsum("bqkge,bkte->bkgqt", qblk, kj, preferred_element_type=jnp.float32) * scale
            ok = _visible(q_idx, j * kb + jnp.arange(kb), start, window)  # [B, 1, 1, qb, kb]
            s = jnp.where(ok, s, MASKED)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.where(ok, jnp.exp(s - m_new[..., None]), 0.0)  # f32 probabilities
            alpha = jnp.exp(m - m_new)
            l = alpha * l + p.sum(-1)
            acc = alpha[..., None] * acc + jnp.einsum(
                "bkgqt,bkte->bkgqe", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32
            )
            return m_new, l, acc

        init = (
            jnp.full((B, K, G, qb), MASKED, jnp.float32),
            jnp.zeros((B, K, G, qb), jnp.float32),
            jnp.zeros((B, K, G, qb, E), jnp.float32),
        )
        _, l, acc = jax.lax.fori_loop(lo, hi, step, init)
        out = acc / jnp.maximum(l, 1e-30)[..., None]  # [B, K, G, qb, E]; padding rows -> 0
        return jnp.einsum("bkgqe->bqkge", out).reshape(B, qb, H, E).astype(v.dtype)

    out = jax.lax.map(one_query_block, (q, jnp.arange(S // qb)))  # [Nq, B, qb, H, E]
    return jnp.moveaxis(out, 0, 1).reshape(B, S, H, E)


def decode_attention(q, k, v, tail_k, tail_v, q_index, step, start, *, window=None):
    """One new query per row over the prompt cache and the generated-token tail.

    q: [B, 1, H, E] at sequence index q_index (= prompt length + step); k, v: [B, K, T, E] prompt keys at
    [0, T); tail_k, tail_v: [B, K, N, E] generated keys at T + [0, N), filled up to and including `step`.
    """
    B, _, H, E = q.shape
    K, T, N = k.shape[1], k.shape[2], tail_k.shape[2]
    G = H // K
    scale = 1.0 / math.sqrt(E)
    qg = q[:, 0].reshape(B, K, G, E)
    s_prompt = jnp.einsum("bkge,bkte->bkgt", qg, k, preferred_element_type=jnp.float32) * scale  # [B, K, G, T]
    s_tail = jnp.einsum("bkge,bkne->bkgn", qg, tail_k, preferred_element_type=jnp.float32) * scale  # [B, K, G, N]
    j = jnp.arange(T)
    ok_prompt = j[None, :] >= start[:, None]  # [B, T]
    u = jnp.arange(N)
    ok_tail = jnp.broadcast_to(u <= step, (B, N))
    if window is not None:
        ok_prompt &= q_index - j[None, :] < window
        ok_tail &= q_index - (T + u)[None, :] < window
    s = jnp.concatenate([s_prompt, s_tail], axis=-1)
    ok = jnp.concatenate([ok_prompt, ok_tail], axis=-1)[:, None, None, :]  # [B, 1, 1, T + N]
    s = jnp.where(ok, s, MASKED)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("bkgt,bkte->bkge", p[..., :T].astype(v.dtype), v, preferred_element_type=jnp.float32)
    out += jnp.einsum("bkgn,bkne->bkge", p[..., T:].astype(v.dtype), tail_v, preferred_element_type=jnp.float32)
    return out.reshape(B, 1, H, E).astype(v.dtype)
