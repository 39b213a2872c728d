"""What the memory figures are about: a model given as a Model, a Config or a preset name, byte counts of array
trees, and the decode step's cache described abstractly (what memory_report compiles and estimate counts)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from momjax.cache import KVCache, sharding
from momjax.config import Config, preset
from momjax.mesh import kv_sharding, replicated, shard_bytes
from momjax.policy import MemoryPolicy

DEFAULT_NEW_TOKENS = 1024  # decode room assumed by reports and plans unless told otherwise


def resolve(model_or_config) -> Config:
    """The Config of a Model, a Config or a preset name."""
    if isinstance(model_or_config, str):
        return preset(model_or_config)
    if isinstance(model_or_config, Config):
        return model_or_config
    return model_or_config.config  # a momjax.Model


def nbytes(tree, memory_kind=None) -> int:
    """Bytes of a tree of arrays (or ShapeDtypeStructs) on each device (a leaf split over a mesh counts its one
    piece), or of its leaves in memory_kind."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        if memory_kind is None or leaf.sharding.memory_kind == memory_kind:
            total += shard_bytes(leaf)
    return total


def placement(mesh=None):
    """where(memory_kind, ndim=None, axis=1) -> the sharding of an abstract argument: on this machine's first
    device, or with a mesh, an array of KV heads (ndim given: [B, K, ...], or its heads on `axis`) split on them
    and anything else whole on every device."""
    if mesh is None:
        return lambda kind, ndim=None, axis=1: sharding(kind)
    return lambda kind, ndim=None, axis=1: replicated(mesh, kind) if ndim is None else kv_sharding(mesh, ndim, kind,
                                                                                                  axis)


def abstract_cache(cfg: Config, seq_len: int, new_tokens: int, dtype, policy: MemoryPolicy, batch: int,
                   mesh=None) -> KVCache:
    """The decode step's cache as abstract arrays, each layer's prompt K/V where the policy decodes from it;
    int8 K/V with their float32 scales when policy.quantized_kv. With a mesh, split on the KV heads."""
    L, K, E = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    N = max(new_tokens - 1, 1)
    where = placement(mesh)
    dev = where("device")
    resident = policy.device_layers(L)
    kind = lambda l, ndim=4: where("device" if l < resident else policy.kv_decode, ndim)
    kv_dtype = jnp.int8 if policy.quantized_kv else dtype
    prompt = lambda l: jax.ShapeDtypeStruct((batch, K, seq_len, E), kv_dtype, sharding=kind(l))
    tail = jax.ShapeDtypeStruct((batch, K, N, E), kv_dtype, sharding=where("device", 4))
    cache = KVCache(
        k=tuple(map(prompt, range(L))), v=tuple(map(prompt, range(L))),
        start=jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=dev),
        tail_k=(tail,) * L, tail_v=(tail,) * L, length=jax.ShapeDtypeStruct((), jnp.int32, sharding=dev),
    )
    if policy.quantized_kv:
        scale = lambda l: jax.ShapeDtypeStruct((batch, K, seq_len), jnp.float32, sharding=kind(l, 3))
        tail_scale = jax.ShapeDtypeStruct((batch, K, N), jnp.float32, sharding=where("device", 3))
        cache = cache.replace(k_scale=tuple(map(scale, range(L))), v_scale=tuple(map(scale, range(L))),
                              tail_k_scale=(tail_scale,) * L, tail_v_scale=(tail_scale,) * L)
    return cache


def kv_leaves(cache: KVCache, layer=None, prompt_only=False):
    """The cache's K/V arrays (with the int8 scales when it has them), of one layer or all."""
    fields = ("k", "v", "k_scale", "v_scale") + (() if prompt_only else ("tail_k", "tail_v", "tail_k_scale",
                                                                          "tail_v_scale"))
    arrays = [getattr(cache, f) for f in fields]
    return [xs[layer] if layer is not None else xs for xs in arrays if xs]
