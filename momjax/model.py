"""The Llama-family decoder as pure functions over the params pytree (params.py).

Flax is used the functional way: `flax.struct` dataclass pytrees for params and cache, plain functions
for the math. The mini-sequence code calls these functions inside `lax.map` bodies that close over
weight arrays, which Linen submodules cannot be called from; and an explicit pytree is what Orbax saves.

Weights and KV caches are per-layer arrays (params.py, cache.py). Prefill is written for one layer
(`prefill_layer`); generation.py runs that one compiled program for every layer in turn, so compile time
is flat in depth and each layer's K/V leaves as its own array, offloaded as soon as the layer is done.
Decode walks the layers with a Python loop inside one jitted step, reading each weight and each cached
K/V byte where it lies. Norms, rope angles and softmax run in float32. Rope frequencies are constants of the
config, except dynamic NTK's, which depend on the length each program reaches: a traced scalar computed
inside the program (`rope_frequencies`), so one compiled program serves every length.

Prefill keeps the residual stream chunk-major, x: [N, B, C, D] (N mini-sequences of C tokens), so the
mini-sequence maps need no transposes; `baseline` is the same code with one chunk of the whole sequence.
The prompt is left-padded (`start[b]` pad tokens in row b) so every row ends at the same index.

Letters: B batch, N chunks, C chunk length, S sequence, T cache length, D model, H heads, K kv heads,
G heads per kv head, E head dim, F ffn, V vocab, L layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from momjax.attention import blockwise_attention, decode_attention
from momjax.cache import KVCache, quantize_kv, to_memory_kind
from momjax.config import Config
from momjax.mesh import embed_lookup, replicate, tensor_parallel
from momjax.minisequence import chunk_map, last_position
from momjax.params import LayerParams, Params, head_params, to_device, weights_on_host
from momjax.policy import MemoryPolicy
from momjax.rope import rope, rope_frequencies

# ---------------------------------------------------------------------- building blocks


def rms_norm(x, weight, eps):
    """RMSNorm in float32, scaled in the input dtype (as transformers does)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * y.astype(x.dtype)


# A product with at most this many rows (decode: one token per batch row) is a matrix-vector product, bound by
# reading the weight; see `linear`.
FEW_ROWS = 16


def _halves_product(x, w):
    """x [M, I] @ w [I, O] as the sum of two products over the two halves of w's rows.

    w.reshape(2, I/2, O) is free (each half is contiguous), and XLA's CPU backend runs the two halves of
    this batched product on separate threads where it runs one matrix-vector product on one thread.
    """
    M, I = x.shape
    halves = jnp.moveaxis(x.reshape(M, 2, I // 2), 1, 0)  # [2, M, I/2]
    parts = jax.lax.dot_general(halves, w.reshape(2, I // 2, w.shape[1]), (((2,), (1,)), ((0,), (0,))))
    return parts[0] + parts[1]


def linear(x, w):
    """x [..., I] @ w [I, O], w a stored (row-major) weight.

    A product with few rows (decode) on the CPU backend is split over the two halves of I
    (`_halves_product`), so that both cores read the weight: decode on the 2-core benchmark machine runs
    about 18% faster. Other backends, and products with many rows, are one dot. The split changes only
    the order of a float sum, the same way in every policy."""
    *lead, I = x.shape
    rows = int(np.prod(lead))
    if rows > FEW_ROWS or I % 2 or tensor_parallel():  # split over a mesh, each device's product is smaller
        return x @ w
    flat = x.reshape(rows, I)
    out = jax.lax.platform_dependent(flat, w, cpu=_halves_product, default=lambda x, w: x @ w)
    return out.reshape(*lead, w.shape[1])


def mlp(lp: LayerParams, x):
    """SwiGLU: down(silu(gate(x)) * up(x)). x: [B, S, D]."""
    return linear(jax.nn.silu(linear(x, lp.w_gate)) * linear(x, lp.w_up), lp.w_down)


def project_q(lp: LayerParams, h, positions, inv_freq, rope_scale: float = 1.0):
    D, H, E = lp.wq.shape
    q = linear(h, lp.wq.reshape(D, H * E)).reshape(*h.shape[:-1], H, E)  # [B, S, H, E]
    if lp.bq is not None:
        q = q + lp.bq
    return rope(q, positions, inv_freq, rope_scale)


def project_o(lp: LayerParams, o):
    """o [B, S, H, E] -> [B, S, D] as one [S, H*E] x [H*E, D] matmul: an einsum over (h, e) would make XLA
    transpose wo on every call."""
    B, S, H, E = o.shape
    return linear(o.reshape(B, S, H * E), lp.wo.reshape(H * E, -1))


def project_kv(lp: LayerParams, h, positions, inv_freq, rope_scale: float = 1.0):
    D, K, E = lp.wk.shape
    k = linear(h, lp.wk.reshape(D, K * E)).reshape(*h.shape[:-1], K, E)  # [B, S, K, E]
    v = linear(h, lp.wv.reshape(D, K * E)).reshape(*h.shape[:-1], K, E)
    if lp.bk is not None:
        k, v = k + lp.bk, v + lp.bv
    return rope(k, positions, inv_freq, rope_scale), v


def lm_head(params: Params, x):
    """Final norm and vocabulary projection; float32 logits. x: [B, S, D] -> [B, S, V]."""
    if params.lm_head is None:  # tied: contract with the embedding's rows as they are stored
        return jnp.einsum("bsd,vd->bsv", x, params.embed).astype(jnp.float32)
    return linear(x, params.lm_head).astype(jnp.float32)


# ---------------------------------------------------------------------- prefill (chunk-major)


def _kv_pass(lp, x, pos, cfg, inv_freq, quantized=False):
    """K and V of every position of a layer, one mini-sequence at a time. Returns [B, K, S, E] each, or with
    `quantized` the pairs (int8 [B, K, S, E], float32 scale [B, K, S]) (cache.quantize_kv).

    Each chunk's K/V is written into its place in the cache-layout buffers (in place, in a fori_loop), so the
    layer's K/V exists once: not also chunk-major and then transposed. Quantised chunk by chunk, so the
    layer's K/V exist on the device as int8 and scales only."""
    N, B, C, _ = x.shape

    def kv_of(c):  # [B, K, C, E] each, or (int8, scale) pairs
        h = rms_norm(x[c], lp.attn_norm, cfg.rms_norm_eps)
        k, v = project_kv(lp, h, pos[c], inv_freq, cfg.rope_attention_factor)  # [B, C, K, E]
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
        return (quantize_kv(k), quantize_kv(v)) if quantized else (k, v)

    if N == 1:
        return kv_of(0)

    def write(c, kv):
        put = lambda buf, t: jax.lax.dynamic_update_slice_in_dim(buf, t, c * C, axis=2)
        return jax.tree.map(put, kv, kv_of(c))

    K, E = lp.wk.shape[1], lp.wk.shape[2]
    if quantized:
        empty = (jnp.zeros((B, K, N * C, E), jnp.int8), jnp.zeros((B, K, N * C), jnp.float32))
    else:
        empty = jnp.zeros((B, K, N * C, E), x.dtype)
    return jax.lax.fori_loop(0, N, write, (empty, empty))


def _place_kv(kv, memory_kind: str):
    """A layer's K or V (or its (int8, scale) pair) placed in memory_kind."""
    return jax.tree.map(lambda a: to_memory_kind(a, memory_kind), kv)


def _unpair(kv):
    """A layer's K or V as the prefill code carries it -> (values, scale or None)."""
    return kv if isinstance(kv, tuple) else (kv, None)


def _attend_and_mlp(lp, x_c, pos_c, q_offset, k, v, start, cfg, policy, inv_freq, with_mlp=True):
    """The rest of a layer for one mini-sequence x_c [B, C, D] whose first token sits at q_offset."""
    h = rms_norm(x_c, lp.attn_norm, cfg.rms_norm_eps)
    q = project_q(lp, h, pos_c, inv_freq, cfg.rope_attention_factor)
    (k, k_scale), (v, v_scale) = _unpair(k), _unpair(v)  # int8 K/V carry their scales
    o = blockwise_attention(
        q, k, v, q_offset, start, window=cfg.sliding_window, q_block=policy.q_block, kv_block=policy.kv_block,
        k_scale=k_scale, v_scale=v_scale,
    )  # [B, C, H, E]
    x_c = replicate(x_c + project_o(lp, o))
    if with_mlp:
        x_c = replicate(x_c + mlp(lp, rms_norm(x_c, lp.mlp_norm, cfg.rms_norm_eps)))
    return x_c


def _rest_all_positions(lp, x, pos, k, v, start, cfg, policy, inv_freq, offset=0):
    """Attention, o-projection and MLP for every position, as the policy's mini-sequences say. The first
    query sits at key index `offset` (0 in a prefill; a session's cached length when feeding it)."""
    N, B, C, D = x.shape
    if policy.minisequence_scope == "mlp" and N > 1:
        # The paper's MOM: attention over the whole sequence at once, only the MLP in mini-sequences.
        xs = jnp.moveaxis(x, 0, 1).reshape(B, N * C, D)
        ps = jnp.moveaxis(pos, 0, 1).reshape(B, N * C)
        xs = _attend_and_mlp(lp, xs, ps, offset, k, v, start, cfg, policy, inv_freq, with_mlp=False)
        x = jnp.moveaxis(xs.reshape(B, N, C, D), 1, 0)
        return chunk_map(lambda x_c: x_c + mlp(lp, rms_norm(x_c, lp.mlp_norm, cfg.rms_norm_eps)), x)

    if N == 1:
        return _attend_and_mlp(lp, x[0], pos[0], offset, k, v, start, cfg, policy, inv_freq)[None]

    def update(c, x):  # chunk c reads only its own rows of x before they are overwritten: in place
        x_c = _attend_and_mlp(lp, x[c], pos[c], offset + c * C, k, v, start, cfg, policy, inv_freq)
        return jax.lax.dynamic_update_index_in_dim(x, x_c, c, axis=0)

    # The residual stream is updated in place, one chunk at a time: a map would hold a second [N, B, C, D].
    return jax.lax.fori_loop(0, N, update, x)


def _rest_last_position(lp, x, pos, k, v, start, cfg, policy, inv_freq):
    """The final layer in prefill: only the last position's output is ever read, so compute only it: [B, 1, D]."""
    N, _, C, _ = x.shape
    x_last, pos_last = last_position(x), last_position(pos)  # [B, 1, D], [B, 1]
    return _attend_and_mlp(lp, x_last, pos_last, N * C - 1, k, v, start, cfg, policy, inv_freq)


def prefill_layer(lp: LayerParams, x, pos, start, cfg: Config, policy: MemoryPolicy, *, last: bool = False):
    """One layer over the chunk-major residual stream x [N, B, C, D]: (x out, k, v), k and v [B, K, S, E]
    placed at policy.kv_prefill (so with pinned_host the device holds one layer's K/V at a time). With
    policy.quantized_kv, k and v are (int8 [B, K, S, E], float32 scale [B, K, S]) pairs, placed together.

    last: this is the final layer and only its last position is read: compute that position only and
    return it as x [1, B, 1, D].
    """
    inv_freq = rope_frequencies(cfg, jnp.max(pos) + 1)  # the whole prompt's length, for every mini-sequence
    k, v = _kv_pass(lp, x, pos, cfg, inv_freq, policy.quantized_kv)
    if last:
        x = _rest_last_position(lp, x, pos, k, v, start, cfg, policy, inv_freq)[None]
    else:
        x = _rest_all_positions(lp, x, pos, k, v, start, cfg, policy, inv_freq)
    return x, _place_kv(k, policy.kv_prefill), _place_kv(v, policy.kv_prefill)


def feed_layer(lp: LayerParams, x, pos, k_cache, v_cache, offset, count, cfg: Config, policy: MemoryPolicy, *,
               last: bool = False):
    """One layer of a session feed: W new tokens (x [N, B, C, D], count of them real, the rest right padding)
    extend a cache buffer k_cache, v_cache [B, K, cap, E] that holds `offset` tokens. Returns (x out, k_cache,
    v_cache) with the new K/V written at [offset, offset + W).

    The buffer comes to the device for this layer only and goes back where the policy keeps the session's
    cache (policy.kv_prefill), so a host-resident cache is streamed one layer at a time. The new queries
    (at key indices offset + [0, W)) attend causally over the buffer: keys past a query are invisible to it,
    so the padding tokens' keys (written after the real ones) are seen by padding queries only, and the next
    feed overwrites them (padding past the buffer's end is dropped, see write_kv). last: only the last real
    token's output is read; compute it alone ([1, B, 1, D]). With policy.quantized_kv the buffers are
    (int8 [B, K, cap, E], float32 scale [B, K, cap]) pairs, and the new K/V are quantised as prefill does.
    """
    inv_freq = rope_frequencies(cfg, offset + count)  # the session's length at the end of this feed
    k_new, v_new = _kv_pass(lp, x, pos, cfg, inv_freq, policy.quantized_kv)  # [B, K, W, E] (or pairs)
    write = lambda buf, new: write_kv(to_memory_kind(buf, "device"), new.astype(buf.dtype), offset)
    k, v = jax.tree.map(write, k_cache, k_new), jax.tree.map(write, v_cache, v_new)
    start = jnp.zeros((x.shape[1],), jnp.int32)  # a session's rows have no left padding
    if last:
        x_last, pos_last = nth_position(x, count - 1), nth_position(pos, count - 1)  # [B, 1, D], [B, 1]
        x = _attend_and_mlp(lp, x_last, pos_last, offset + count - 1, k, v, start, cfg, policy, inv_freq)[None]
    else:
        x = _rest_all_positions(lp, x, pos, k, v, start, cfg, policy, inv_freq, offset=offset)
    return x, _place_kv(k, policy.kv_prefill), _place_kv(v, policy.kv_prefill)


def write_kv(buf, new, offset):
    """buf [B, K, T, E] with new [B, K, W, E] written at [offset, offset + W), W <= T, in place when buf is donated
    (or an int8 cache's scales: buf [B, K, T], new [B, K, W]).

    What would run past T is dropped: it is right padding (a session's buffer has room for the real tokens,
    not always for their padding). dynamic_update_slice would instead move the write back to fit, over valid
    keys; so when offset + W > T the write starts at T - W, keeps the buffer's own keys before `offset`, and
    the new keys are shifted to land at `offset`.
    """
    W, T = new.shape[2], buf.shape[2]
    at = jnp.minimum(offset, T - W)
    shift = offset - at  # 0 unless the padding would run past the end
    kept = jax.lax.dynamic_slice_in_dim(buf, at, W, axis=2)
    moved = jnp.roll(new, shift, axis=2)  # what rolls around to the front is padding, and is not kept
    keep = (jnp.arange(W) < shift).reshape((1, 1, W) + (1,) * (new.ndim - 3))
    return jax.lax.dynamic_update_slice_in_dim(buf, jnp.where(keep, kept, moved), at, axis=2)


def nth_position(x, n):
    """Position n (may be traced) of a chunk-major [N, B, C, ...] array, as [B, 1, ...]."""
    C = x.shape[2]
    chunk = jax.lax.dynamic_index_in_dim(x, n // C, axis=0, keepdims=False)  # [B, C, ...]
    return jax.lax.dynamic_slice_in_dim(chunk, n % C, 1, axis=1)


def embed_chunks(params: Params, tokens, start, chunk: int):
    """tokens [B, S] -> chunk-major embeddings [N, B, C, D] and rope positions [N, B, C]."""
    B, S = tokens.shape
    N = S // chunk
    pos = jnp.arange(S)[None, :] - start[:, None]  # [B, S]; padding gets negative positions, never seen
    to_chunks = lambda t: jnp.moveaxis(t.reshape(B, N, chunk), 1, 0)
    tok, pos = to_chunks(tokens), to_chunks(pos)
    if N == 1:
        return embed_lookup(params.embed, tok), pos
    # Gathered one chunk at a time into the output: a single gather would also build it in a temporary.
    fill = lambda c, x: jax.lax.dynamic_update_index_in_dim(x, embed_lookup(params.embed, tok[c]), c, axis=0)
    x = jnp.zeros((N, B, chunk, params.embed.shape[1]), params.embed.dtype)
    return jax.lax.fori_loop(0, N, fill, x), pos


def last_logits(params: Params, x, cfg: Config):
    """Final norm and LM head at the last position of chunk-major x [N, B, C, D]: logits [B, V]."""
    x_last = rms_norm(last_position(x), params.final_norm, cfg.rms_norm_eps)  # [B, 1, D]
    return lm_head(params, x_last)[:, 0]


def all_logits(params: Params, x, cfg: Config):
    """Logits at every position [B, S, V] of chunk-major x; the LM head runs over the mini-sequences."""
    logits = chunk_map(lambda x_c: lm_head(params, rms_norm(x_c, params.final_norm, cfg.rms_norm_eps)), x)
    N, B, C, V = logits.shape
    return jnp.moveaxis(logits, 0, 1).reshape(B, N * C, V)


def chunk_length(seq_len: int, policy: MemoryPolicy) -> int:
    """The mini-sequence length used for a padded sequence of seq_len tokens (it must divide seq_len)."""
    c = policy.minisequence
    if c is None or c >= seq_len:
        return seq_len
    if seq_len % c:
        raise ValueError(f"padded length {seq_len} is not a multiple of the mini-sequence length {c}")
    return c


# ---------------------------------------------------------------------- decode


def decode_step(params: Params, token, cache: KVCache, cfg: Config, policy: MemoryPolicy):
    """One new token per row: logits [B, V] and the cache with the token's K/V in the tail.

    The layers are walked by a Python loop, so every weight and every cached K/V array is read in place.
    With the prompt cache in pinned host memory (mom-stream) each layer's K/V is brought to the device
    while the layer before it finishes (its o-projection and MLP), so the device holds one layer's prompt
    K/V at a time, never all of them. With policy.kv_device_layers = R the first R layers' K/V are already
    on the device (cache.place_for_decode) and only layers R.. stream.
    """
    step = cache.length
    L = cache.num_layers
    q_index = cache.prompt_end + step
    positions = (q_index - cache.start)[:, None]  # [B, 1]
    inv_freq = rope_frequencies(cfg, jnp.max(positions) + 1)  # the longest row's length with this token
    # Weights in host memory (weights="host") are copied to the device here, a layer at a time: layer l+1's copy
    # waits (an optimization barrier on the residual) for layer l-1 to finish, so it overlaps layer l's compute
    # and the device holds two layers' weights, never all of them. The embedding comes over for the lookup, the
    # final norm and LM head for the last layer's duration. Device weights pass through untouched.
    host_weights = weights_on_host(params)
    x = embed_lookup(to_device(params.embed), token)[:, None, :]  # [B, 1, D]
    # Layers below `resident` have their prompt K/V on the device (all of them unless the policy streams);
    # the others are fetched from the host one at a time: the first streamed layer's copy is issued before
    # any math, so it overlaps the resident layers' compute, and layer l+1's copy once layer l's attention
    # has read its K/V (an optimization barrier makes the copy wait for that attention output). So the
    # device holds one streamed layer's K/V at a time, and each copy overlaps the rest of the layer before.
    resident = policy.device_layers(L)

    def fetch(kv):  # layer's (k, v, k_scale, v_scale) on the device; the scales None unless int8
        return jax.tree.map(lambda a: to_memory_kind(a, "device"), kv)

    kv = fetch(cache.layer(resident)) if resident < L else None
    tails_k, tails_v, tail_scales_k, tail_scales_v = [], [], [], []
    stages = [*params.layers, head_params(params)]  # the weights each stage reads: the layers, then the head
    arriving = to_device(stages[0])
    for l in range(L):
        lp, following = arriving, stages[l + 1]
        if host_weights:  # the next stage's copy starts once layer l-1 is done (x is its output)
            x, following = jax.lax.optimization_barrier((x, following))
        arriving = to_device(following)
        k, v, k_scale, v_scale = kv if l >= resident else cache.layer(l)
        h = rms_norm(x, lp.attn_norm, cfg.rms_norm_eps)
        q = project_q(lp, h, positions, inv_freq, cfg.rope_attention_factor)  # [B, 1, H, E]
        k_new, v_new = project_kv(lp, h, positions, inv_freq, cfg.rope_attention_factor)  # [B, 1, K, E]
        scales = None
        if cache.quantized:  # the new token's K/V as a prefill would store them, before anything reads them
            (k_new, k_new_scale), (v_new, v_new_scale) = quantize_kv(k_new), quantize_kv(v_new)  # scales [B, 1, K]
            scales = (k_scale, v_scale, cache.tail_k_scale[l], cache.tail_v_scale[l], k_new_scale, v_new_scale)
        o = decode_attention(q, k, v, cache.tail_k[l], cache.tail_v[l], k_new, v_new, q_index, step, cache.start,
                             window=cfg.sliding_window, prompt_end=cache.end, scales=scales)
        if l >= resident and l + 1 < L:
            # Layer l's K/V are dead now: bring layer l+1's over its o-projection and MLP. The barrier makes the
            # copy's source wait for o, and o is used from the barrier's output: were it not, XLA would drop o
            # from the barrier and start every layer's copy at the top of the step, holding the whole cache on
            # the device at once (seen on an H200; tests_gpu reads the compiled step for it).
            o, following = jax.lax.optimization_barrier((o, cache.layer(l + 1)))
            kv = fetch(following)
        # Written after the attention has read the tail, so the tail is updated in place.
        put = lambda tail, new: jax.lax.dynamic_update_slice_in_dim(tail, jnp.swapaxes(new, 1, 2), step, axis=2)
        tails_k.append(put(cache.tail_k[l], k_new))
        tails_v.append(put(cache.tail_v[l], v_new))
        if cache.quantized:
            tail_scales_k.append(put(cache.tail_k_scale[l], k_new_scale))
            tail_scales_v.append(put(cache.tail_v_scale[l], v_new_scale))
        x = replicate(x + project_o(lp, o))
        x = replicate(x + mlp(lp, rms_norm(x, lp.mlp_norm, cfg.rms_norm_eps)))
    head = arriving
    logits = lm_head(head, rms_norm(x, head.final_norm, cfg.rms_norm_eps))[:, 0]  # [B, V]
    cache = cache.replace(tail_k=tuple(tails_k), tail_v=tuple(tails_v), length=step + 1)
    if cache.quantized:
        cache = cache.replace(tail_k_scale=tuple(tail_scales_k), tail_v_scale=tuple(tail_scales_v))
    return logits, cache
