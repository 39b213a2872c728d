"""Mini-sequences: map a function over the chunks of a chunk-major sequence, and the last position.

The residual stream in prefill is chunk-major, [N, B, C, ...]: N mini-sequences of C tokens. `chunk_map`
runs a function on one chunk at a time with `jax.lax.map`, so only one chunk's intermediates (the MLP's
[B, C, F] activations, the attention scores of C queries, a chunk of [C, V] logits) exist at once. With
N == 1 it is a plain call: the `baseline` policy is the same code with the whole sequence as one chunk.
"""

from __future__ import annotations

import jax


def chunk_map(fn, xs):
    """fn applied to each chunk of xs (a pytree of [N, ...] arrays), one chunk at a time. Returns [N, ...]."""
    n = jax.tree.leaves(xs)[0].shape[0]
    if n == 1:
        return jax.tree.map(lambda y: y[None], fn(jax.tree.map(lambda a: a[0], xs)))
    return jax.lax.map(fn, xs)


def last_position(x):
    """The last position of a chunk-major [N, B, C, ...] array, as [B, 1, ...]."""
    return x[-1][:, -1:]
