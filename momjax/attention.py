"""Causal grouped-query attention that never builds the S x S score matrix.

Prefill uses a blockwise online softmax (the flash-attention recurrence) in pure JAX: queries are taken
in blocks, and each block walks only the key blocks it can see (causal, left padding, sliding window),
so memory is O(block x block) per head and work skips the masked upper triangle. Decode attends one
query to the prompt cache and to the generated-token tail together.

Letters: B batch, S queries, T keys, K kv heads, G query heads per kv head, E head dim.
Masking: query at sequence index i sees key j iff  start[b] <= j <= i  and  i - j < window.
`start[b]` is the row's left padding. Masked scores use a finite -1e30 (not -inf) so a fully masked
row (a padding query) gives finite values, never NaN.
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

    Each query block walks the key blocks it can see in order, in three runs: blocks that hold some
    padding or cross the window edge, blocks every query of the block sees whole, and blocks crossing
    the diagonal. Only the first and last runs build a mask, and apply it once (to the scores): a masked
    score of -1e30 gives probability 0 once a row has seen a visible key, and whatever a row accumulated
    before that (from keys it cannot see) is scaled by exp(-1e30 - m) = 0 when its first visible key
    arrives. Every real query sees at least itself; padding queries get finite values nobody reads.
    """
    B, S, H, E = q.shape
    K, T = k.shape[1], k.shape[2]
    G = H // K
    qb = _divisor_block(S, q_block)
    kb = _divisor_block(T, kv_block)
    scale = 1.0 / math.sqrt(E)
    q = q.reshape(B, S // qb, qb, K, G, E)  # [B, Nq, qb, K, G, E]
    q = jnp.moveaxis(q, 1, 0)  # [Nq, B, qb, K, G, E]
    padded_to = jnp.max(start)  # keys below this index are padding for some row

    def one_query_block(args):
        qblk, i = args  # [B, qb, K, G, E], block index
        first_q = q_offset + i * qb
        last_q = first_q + qb - 1
        # Key blocks this query block can see: up to its last query (causal), from its window start.
        hi = jnp.minimum(last_q // kb + 1, T // kb)
        lo = 0 if window is None else jnp.maximum(first_q - window + 1, 0) // kb
        # Blocks in [full_lo, full_hi) are seen whole by every query of the block: no mask needed.
        full_lo = -(-padded_to // kb)
        if window is not None:
            full_lo = jnp.maximum(full_lo, (last_q - window) // kb + 1)
        full_hi = (first_q + 1) // kb
        full_lo = jnp.clip(full_lo, lo, hi)
        full_hi = jnp.clip(full_hi, full_lo, hi)
        q_idx = first_q + jnp.arange(qb)

        def step(masked):
            def body(j, carry):
                m, l, acc = carry  # [B, K, G, qb], [B, K, G, qb], [B, K, G, qb, E]
                kj = jax.lax.dynamic_slice_in_dim(k, j * kb, kb, axis=2)  # [B, K, kb, E]
                vj = jax.lax.dynamic_slice_in_dim(v, j * kb, kb, axis=2)
                s = jnp.einsum("bqkge,bkte->bkgqt", qblk, kj, preferred_element_type=jnp.float32) * scale
                if masked:
                    s = jnp.where(_visible(q_idx, j * kb + jnp.arange(kb), start, window), s, MASKED)
                m_new = jnp.maximum(m, s.max(-1))
                p = jnp.exp(s - m_new[..., None])  # f32 probabilities
                alpha = jnp.exp(m - m_new)
                l = alpha * l + p.sum(-1)
                acc = alpha[..., None] * acc + jnp.einsum(
                    "bkgqt,bkte->bkgqe", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32
                )
                return m_new, l, acc

            return body

        carry = (
            jnp.full((B, K, G, qb), MASKED, jnp.float32),
            jnp.zeros((B, K, G, qb), jnp.float32),
            jnp.zeros((B, K, G, qb, E), jnp.float32),
        )
        carry = jax.lax.fori_loop(lo, full_lo, step(True), carry)
        carry = jax.lax.fori_loop(full_lo, full_hi, step(False), carry)
        _, l, acc = jax.lax.fori_loop(full_hi, hi, step(True), carry)
        out = acc / l[..., None]  # [B, K, G, qb, E]; l >= 1: the row's largest term is exp(0)
        return jnp.einsum("bkgqe->bqkge", out).reshape(B, qb, H, E).astype(v.dtype)

    out = jax.lax.map(one_query_block, (q, jnp.arange(S // qb)))  # [Nq, B, qb, H, E]
    return jnp.moveaxis(out, 0, 1).reshape(B, S, H, E)


def decode_attention(q, k, v, tail_k, tail_v, q_index, step, start, *, window=None):
    """One new query per row over the prompt cache and the generated-token tail.

    q: [B, 1, H, E] at sequence index q_index (= prompt length + step); k, v: [B, K, T, E] prompt keys at
    [0, T); tail_k, tail_v: [B, K, N, E] generated keys at T + [0, N), filled up to and including `step`.
    The softmax runs over both parts without concatenating them (no copy of the prompt's scores).
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
    s_prompt = jnp.where(ok_prompt[:, None, None, :], s_prompt, MASKED)
    s_tail = jnp.where(ok_tail[:, None, None, :], s_tail, MASKED)
    m = jnp.maximum(s_prompt.max(-1), s_tail.max(-1))[..., None]  # [B, K, G, 1]; the new token itself is seen
    p_prompt, p_tail = jnp.exp(s_prompt - m), jnp.exp(s_tail - m)
    denom = p_prompt.sum(-1) + p_tail.sum(-1)  # [B, K, G]
    out = jnp.einsum("bkgt,bkte->bkge", p_prompt.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out += jnp.einsum("bkgn,bkne->bkge", p_tail.astype(v.dtype), tail_v, preferred_element_type=jnp.float32)
    out = out / denom[..., None]
    return out.reshape(B, 1, H, E).astype(v.dtype)
