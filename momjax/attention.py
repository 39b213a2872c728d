"""Causal grouped-query attention that never builds the S x S score matrix.

Prefill uses a blockwise online softmax (the flash-attention recurrence) in pure JAX: queries are taken
in blocks, and each block walks only the key blocks it can see (causal, left padding, sliding window),
so memory is O(block x block) per head and work skips the masked upper triangle. Decode attends one
query to the prompt cache and to the generated-token tail together.

Letters: B batch, S queries, T keys, K kv heads, G query heads per kv head, E head dim.
Masking: query at sequence index i sees key j iff  start[b] <= j <= i  and  i - j < window.
`start[b]` is the row's left padding. Masked scores use a finite -1e30 (not -inf) so a fully masked
row (a padding query) gives finite values, never NaN.

Prefill layout: the G query heads that share a KV head are stacked into the rows of one matrix, so a query
block is [B, K, G*qb, E] (rows ordered head, then query) and each tile is two plain batched matmuls over
(B, K): scores = rows x key block^T, then probabilities x value block. The queries are put in that layout
once, before the loops, and the output is put back once per query block; nothing inside the key loop
transposes.

Each query block walks the key blocks it can see in order, in three runs: blocks that hold some padding or
cross the window edge, blocks every query of the block sees whole, and blocks crossing the diagonal. Only the
first and last runs build a mask, and apply it once (to the scores): a masked score of -1e30 gives
probability 0 once a row has seen a visible key, and whatever a row accumulated before that (from keys it
cannot see) is scaled by exp(-1e30 - m) = 0 when its first visible key arrives. Every real query sees at
least itself; padding queries get finite values nobody reads.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

MASKED = -1e30


def _divisor_block(n: int, block: int) -> int:
    """The block size used for a length-n axis: n itself if short, else a divisor of n not above block."""
    return n if n <= block else math.gcd(n, block)


def _key_block_runs(first_q, qb: int, kb: int, T: int, window, padded_to):
    """(lo, full_lo, full_hi, hi): the key blocks a query block (queries first_q + [0, qb)) can see are [lo, hi);
    those in [full_lo, full_hi) are seen whole by every query of the block, so they need no mask."""
    last_q = first_q + qb - 1
    hi = jnp.minimum(last_q // kb + 1, T // kb)  # up to its last query (causal)
    lo = 0 if window is None else jnp.maximum(first_q - window + 1, 0) // kb  # from its window's start
    full_lo = -(-padded_to // kb)
    if window is not None:
        full_lo = jnp.maximum(full_lo, (last_q - window) // kb + 1)
    full_hi = (first_q + 1) // kb
    full_lo = jnp.clip(full_lo, lo, hi)
    return lo, full_lo, jnp.clip(full_hi, full_lo, hi), hi


def blockwise_attention(q, k, v, q_offset, start, *, window=None, q_block=512, kv_block=512, k_scale=None,
                        v_scale=None):
    """Causal attention of queries q at sequence indices q_offset + [0, S) over keys k, v at [0, T).

    q: [B, S, H, E]; k, v: [B, K, T, E]; start: [B] int32 (left padding); q_offset: int (may be traced).
    Returns [B, S, H, E] in q's dtype. Softmax statistics are float32.
    k_scale, v_scale: [B, K, T] float32 when k and v are int8 (cache.quantize_kv). A key block is converted to
    q's dtype (exact: |int8| <= 127) and its scale multiplies the scores; the value scale multiplies the
    probabilities. Only one block is converted at a time, never the layer's K/V.

    Layout and masking: see the module docstring.
    """
    B, S, H, E = q.shape
    K, T = k.shape[1], k.shape[2]
    G = H // K
    qb = _divisor_block(S, q_block)
    kb = _divisor_block(T, kv_block)
    Nq, M = S // qb, G * qb  # query blocks; rows of one block's matrix
    dtype = q.dtype
    q = query_tiles(q, K, qb)  # [Nq, B, K, G*qb, E]
    padded_to = jnp.max(start)  # keys below this index are padding for some row

    def one_query_block(args):
        qblk, i = args  # [B, K, M, E], block index
        first_q = q_offset + i * qb
        lo, full_lo, full_hi, hi = _key_block_runs(first_q, qb, kb, T, window, padded_to)
        q_idx = jnp.tile(first_q + jnp.arange(qb), G)[:, None]  # [M, 1]: each row's sequence index

        def step(masked):
            def body(j, carry):  # carry: m, l [B, K, M], acc [B, K, M, E]
                mask = _visible(q_idx, j * kb, kb, start, window) if masked else None
                return _key_tile(qblk, k, v, k_scale, v_scale, j, kb, carry, mask)

            return body

        carry = empty_carry((B, K, M), E)
        carry = jax.lax.fori_loop(lo, full_lo, step(True), carry)
        carry = jax.lax.fori_loop(full_lo, full_hi, step(False), carry)
        _, l, acc = jax.lax.fori_loop(full_hi, hi, step(True), carry)
        return (acc / l[..., None]).astype(dtype)  # [B, K, M, E]; l >= 1: the row's largest term is exp(0)

    return from_tiles(jax.lax.map(one_query_block, (q, jnp.arange(Nq))), G)


def query_tiles(q, K: int, qb: int):
    """q [B, S, H, E] -> [S/qb, B, K, G*qb, E]: query block i, then the (head, query) rows of each KV head."""
    B, S, H, E = q.shape
    G = H // K
    return q.reshape(B, S // qb, qb, K, G, E).transpose(1, 0, 3, 4, 2, 5).reshape(S // qb, B, K, G * qb, E)


def from_tiles(out, G: int):
    """The inverse of `query_tiles`: [Nq, B, K, G*qb, E] -> [B, Nq*qb, K*G, E] (G query heads per KV head)."""
    Nq, B, K, M, E = out.shape
    qb = M // G
    return out.reshape(Nq, B, K, G, qb, E).transpose(1, 0, 4, 2, 3, 5).reshape(B, Nq * qb, K * G, E)


def _visible(q_idx, first_key, kb: int, start, window, end=None):
    """[B, 1, M, kb] bool: key first_key + t is visible to the row at sequence index q_idx [M, 1] (causal, not left
    padding of its batch row, within the window, and before `end` when one is given)."""
    k_idx = first_key + jnp.arange(kb)
    ok = (k_idx <= q_idx)[None, None] & (k_idx >= start[:, None])[:, None, None, :]
    if window is not None:
        ok &= (q_idx - k_idx < window)[None, None]
    if end is not None:
        ok &= (k_idx < end)[None, None, None, :]
    return ok


def _key_tile(q, k, v, k_scale, v_scale, j: int, kb: int, carry, visible=None):
    """The online-softmax state (m, l, acc) of query rows q [B, K, M, E] after also seeing key tile j (kb keys at
    j*kb of k, v [B, K, T, E]; int8 with their scales [B, K, T], or the scales None). visible [B, 1|K, M, kb]
    masks the scores (None: the whole tile is seen). Float32 statistics; products in q's dtype."""
    m, l, acc = carry
    dtype = q.dtype
    take = lambda a: jax.lax.dynamic_slice_in_dim(a, j * kb, kb, axis=2)
    kj, vj = take(k).astype(dtype), take(v).astype(dtype)  # [B, K, kb, E]
    s = jax.lax.dot_general(q, kj, _SCORES_DIMS, preferred_element_type=jnp.float32) * (1.0 / math.sqrt(q.shape[-1]))
    if k_scale is not None:
        s = s * take(k_scale)[:, :, None, :]
    if visible is not None:
        s = jnp.where(visible, s, MASKED)
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.exp(s - m_new[..., None])  # f32 probabilities
    alpha = jnp.exp(m - m_new)
    l = alpha * l + p.sum(-1)
    if v_scale is not None:
        p = p * take(v_scale)[:, :, None, :]
    pv = jax.lax.dot_general(p.astype(dtype), vj, _VALUES_DIMS, preferred_element_type=jnp.float32)
    return m_new, l, alpha[..., None] * acc + pv


_SCORES_DIMS = (((3,), (3,)), ((0, 1), (0, 1)))  # [B, K, M, E] x [B, K, kb, E] -> [B, K, M, kb]
_VALUES_DIMS = (((3,), (2,)), ((0, 1), (0, 1)))  # [B, K, M, kb] x [B, K, kb, E] -> [B, K, M, E]


def decode_attention(q, k, v, tail_k, tail_v, k_new, v_new, q_index, step, start, *, window=None, prompt_end=None,
                     scales=None):
    """One new query per row over the prompt cache, the generated-token tail and the new token itself.

    q: [B, 1, H, E] at sequence index q_index (= prompt length + step); k, v: [B, K, T, E] prompt keys at
    [0, T); tail_k, tail_v: [B, K, N, E] generated keys at T + [0, N), filled below `step`; k_new, v_new:
    [B, 1, K, E] the new token's own key and value. The tail is only read here (the caller writes the new
    token into it afterwards), which lets XLA update it in place instead of copying it every step.
    prompt_end (may be traced): only the prompt keys below it are valid (a session's buffer has spare room
    after them) and the tail sits at prompt_end + [0, N); None means T. The softmax runs over the three parts
    without concatenating them.
    scales: for int8 K/V (k, v, tail_k, tail_v, k_new, v_new all int8), their float32 scales (k_scale, v_scale
    [B, K, T], tail_k_scale, tail_v_scale [B, K, N], new_k_scale, new_v_scale [B, 1, K]); see `_int8_decode`.
    """
    B, _, H, E = q.shape
    K = k.shape[1]
    G = H // K
    scale = 1.0 / math.sqrt(E)
    qg = q[:, 0].reshape(B, K, G, E)
    q32 = qg.astype(jnp.float32)
    if scales is not None:
        return _int8_decode(q32, k, v, tail_k, tail_v, k_new, v_new, q_index, step, start, window, prompt_end,
                            scales).reshape(B, 1, H, E).astype(q.dtype)
    s_prompt = jax.lax.platform_dependent(qg, k, cpu=_scores_keys_first, default=_scores) * scale  # [B, K, G, T]
    # The tail's and the new token's scores as multiply-and-sum, not dots: XLA's GPU compiler merges dots that
    # share an operand (q) by concatenating their other operands, which would copy the prompt's K every step.
    s_tail = jnp.sum(q32[:, :, :, None, :] * tail_k[:, :, None].astype(jnp.float32), -1) * scale  # [B, K, G, N]
    s_self = jnp.sum(q32 * k_new[:, 0, :, None, :].astype(jnp.float32), -1) * scale  # [B, K, G]
    p_prompt, p_tail, p_self, denom = _decode_softmax(s_prompt, s_tail, s_self, q_index, step, start, window,
                                                      prompt_end)
    out = jnp.einsum("bkgt,bkte->bkge", p_prompt.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out += jnp.einsum("bkgn,bkne->bkge", p_tail.astype(v.dtype), tail_v, preferred_element_type=jnp.float32)
    out += p_self[..., None] * v_new[:, 0, :, None, :].astype(jnp.float32)
    out = out / denom[..., None]
    return out.reshape(B, 1, H, E).astype(v.dtype)


def _scores(qg, k):
    """qg [B, K, G, E] . k [B, K, T, E] over E -> [B, K, G, T] float32."""
    return jnp.einsum("bkge,bkte->bkgt", qg, k, preferred_element_type=jnp.float32)


def _scores_keys_first(qg, k):
    """`_scores` as keys x queries, then a transpose of the small [B, K, T, G] result: on XLA's CPU backend
    this product reads the keys at twice the speed of the queries-first one (decode at a 512-token context
    runs about 3% faster on the benchmark machine)."""
    s = jax.lax.dot_general(k, qg, (((3,), (3,)), ((0, 1), (0, 1))), preferred_element_type=jnp.float32)
    return jnp.swapaxes(s, 2, 3)


def _decode_softmax(s_prompt, s_tail, s_self, q_index, step, start, window, prompt_end):
    """Masks and the unnormalised softmax over the three parts of a decode step's scores: (p_prompt [B, K, G, T],
    p_tail [B, K, G, N], p_self [B, K, G], denom [B, K, G]), float32."""
    B, T, N = s_prompt.shape[0], s_prompt.shape[-1], s_tail.shape[-1]
    j = jnp.arange(T)
    ok_prompt = j[None, :] >= start[:, None]  # [B, T]
    if prompt_end is not None:
        ok_prompt &= j[None, :] < prompt_end
    u = jnp.arange(N)
    ok_tail = jnp.broadcast_to(u < step, (B, N))
    if window is not None:
        tail_at = T if prompt_end is None else prompt_end
        ok_prompt &= q_index - j[None, :] < window
        ok_tail &= q_index - (tail_at + u)[None, :] < window
    s_prompt = jnp.where(ok_prompt[:, None, None, :], s_prompt, MASKED)
    s_tail = jnp.where(ok_tail[:, None, None, :], s_tail, MASKED)
    m = jnp.maximum(jnp.maximum(s_prompt.max(-1), s_tail.max(-1)), s_self)  # [B, K, G]
    p_prompt, p_tail = jnp.exp(s_prompt - m[..., None]), jnp.exp(s_tail - m[..., None])
    p_self = jnp.exp(s_self - m)
    denom = p_prompt.sum(-1) + p_tail.sum(-1) + p_self  # [B, K, G]
    return p_prompt, p_tail, p_self, denom


def _int8_decode(q32, k, v, tail_k, tail_v, k_new, v_new, q_index, step, start, window, prompt_end, scales):
    """decode_attention over int8 K/V: [B, K, G, E] float32. q32: [B, K, G, E].

    The K scale multiplies the scores, the V scale the probabilities, so no dequantised copy of the cache is
    built. Every part is a multiply-and-sum, not a dot: a dot over int8 would have XLA convert the whole
    [B, K, T, E] cache to a float copy first (on CPU the dot needs materialised operands), while a reduction
    fuses the conversion into its loop (tests/test_int8_kv.py reads the compiled program for such a copy)."""
    k_scale, v_scale, tail_k_scale, tail_v_scale, new_k_scale, new_v_scale = scales
    # Inside a decode loop the prompt K/V do not change, so XLA would hoist their int8 -> float conversion out
    # of the loop: a float copy of the whole cache, kept for the loop's life. Tying them to this step's query
    # makes the conversion part of each step, fused into the reductions that read it.
    k, v, q32 = jax.lax.optimization_barrier((k, v, q32))
    E = q32.shape[-1]
    scale = 1.0 / math.sqrt(E)
    f32 = lambda a: a.astype(jnp.float32)
    s_prompt = jnp.sum(q32[:, :, :, None, :] * f32(k[:, :, None]), -1) * (k_scale[:, :, None, :] * scale)
    s_tail = jnp.sum(q32[:, :, :, None, :] * f32(tail_k[:, :, None]), -1) * (tail_k_scale[:, :, None, :] * scale)
    s_self = jnp.sum(q32 * f32(k_new[:, 0, :, None, :]), -1) * (new_k_scale[:, 0, :, None] * scale)  # [B, K, G]
    p_prompt, p_tail, p_self, denom = _decode_softmax(s_prompt, s_tail, s_self, q_index, step, start, window,
                                                      prompt_end)
    p_prompt = p_prompt * v_scale[:, :, None, :]  # [B, K, G, T]
    p_tail = p_tail * tail_v_scale[:, :, None, :]
    p_self = p_self * new_v_scale[:, 0, :, None]
    out = jnp.sum(p_prompt[..., None] * f32(v[:, :, None]), axis=3)  # [B, K, G, E]
    out += jnp.sum(p_tail[..., None] * f32(tail_v[:, :, None]), axis=3)
    out += p_self[..., None] * f32(v_new[:, 0, :, None, :])
    return out / denom[..., None]

# ---------------------------------------------------------------------- attention in streamed blocks (mom-host)


def empty_carry(rows_shape, E: int):
    """The online softmax's state before any key: (m, l, acc) for rows of rows_shape, float32."""
    return (jnp.full(rows_shape, MASKED, jnp.float32), jnp.zeros(rows_shape, jnp.float32),
            jnp.zeros((*rows_shape, E), jnp.float32))


def attend_block(q, k, v, carry, q_first, k_first, k_end, start, *, G: int, window=None, kv_block=512, k_scale=None,
                 v_scale=None):
    """One block of keys' share of the attention of a chunk of queries: the online-softmax state `carry` after
    also seeing keys k, v at sequence indices k_first + [0, T), of which those before k_end hold keys (a session's
    block may end partway: what follows is stale). The block may lie anywhere before or across the queries; what a
    query cannot see (later keys, left padding, outside its window, past k_end) is masked.

    q: [Nq, B, Kg, G*qb, E] (`query_tiles` of queries at q_first + [0, Nq*qb), G query heads per KV head);
    k, v: [B, Kg, T, E] (int8 with k_scale, v_scale [B, Kg, T]); carry: (m, l, acc) [Nq, B, Kg, G*qb] (acc
    with E), float32 (`empty_carry`). Each query tile walks only the key tiles of kv_block keys it can see.
    """
    Nq, B, Kg, M, E = q.shape
    T = k.shape[2]
    qb = M // G
    kb = _divisor_block(T, kv_block)

    def one_tile(args):
        qt, m, l, acc, i = args
        first = q_first + i * qb
        q_idx = jnp.tile(first + jnp.arange(qb), G)[:, None]  # [M, 1]: each row's sequence index
        hi = jnp.clip((first + qb - 1 - k_first) // kb + 1, 0, jnp.clip((k_end - k_first + kb - 1) // kb, 0, T // kb))
        lo = 0 if window is None else jnp.clip((first - window + 1 - k_first) // kb, 0, hi)

        def body(j, carry):
            return _key_tile(qt, k, v, k_scale, v_scale, j, kb, carry, _visible(q_idx, k_first + j * kb, kb, start,
                                                                                 window, k_end))

        return jax.lax.fori_loop(lo, hi, body, (m, l, acc))

    m, l, acc = carry
    return jax.lax.map(one_tile, (q, m, l, acc, jnp.arange(Nq)))


def attend_one(q32, k, v, carry, visible, k_scale=None, v_scale=None):
    """A block of keys' share of one new query per row (decode), as `attend_block` for a chunk: the state
    (m, l, acc) [B, Kg, G] (acc with E) after also seeing k, v [B, Kg, T, E] where visible [B, T] says so.
    q32: [B, Kg, G, E] float32. int8 k, v come with their scales [B, Kg, T], folded into the scores and the
    probabilities as `decode_attention` does; every product is a multiply-and-sum, so no float copy of an int8
    block is built."""
    E = q32.shape[-1]
    f32 = lambda a: a.astype(jnp.float32)
    s = jnp.sum(q32[:, :, :, None, :] * f32(k[:, :, None]), -1) * (1.0 / math.sqrt(E))  # [B, Kg, G, T]
    if k_scale is not None:
        s = s * k_scale[:, :, None, :]
    s = jnp.where(visible[:, None, None, :], s, MASKED)
    m, l, acc = carry
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.exp(s - m_new[..., None])
    alpha = jnp.exp(m - m_new)
    l = alpha * l + p.sum(-1)
    if v_scale is not None:
        p = p * v_scale[:, :, None, :]
    acc = alpha[..., None] * acc + jnp.sum(p[..., None] * f32(v[:, :, None]), axis=3)
    return m_new, l, acc
