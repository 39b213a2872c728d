"""The parameter pytree: its layout, its abstract description, and random init.

Flax is used the functional way: parameters are `flax.struct` dataclass pytrees and the model is plain
functions over them (see model.py). Linen modules cannot be called from inside the `lax.map` bodies
that run mini-sequences, and a plain pytree is what Orbax saves as is.

Layers are stacked on a leading L axis so the forward pass scans over them. Layouts are einsum-friendly:
letters D model, H heads, K kv heads, E head dim, F ffn, V vocab, L layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from momjax.config import Config


@struct.dataclass
class LayerParams:
    attn_norm: jax.Array  # [L, D]
    wq: jax.Array  # [L, D, H, E]
    wk: jax.Array  # [L, D, K, E]
    wv: jax.Array  # [L, D, K, E]
    wo: jax.Array  # [L, H, E, D]
    mlp_norm: jax.Array  # [L, D]
    w_gate: jax.Array  # [L, D, F]
    w_up: jax.Array  # [L, D, F]
    w_down: jax.Array  # [L, F, D]
    bq: jax.Array | None = None  # [L, H, E] (Qwen2)
    bk: jax.Array | None = None  # [L, K, E]
    bv: jax.Array | None = None  # [L, K, E]


@struct.dataclass
class Params:
    embed: jax.Array  # [V, D]
    layers: LayerParams
    final_norm: jax.Array  # [D]
    lm_head: jax.Array | None = None  # [D, V]; None when tied to embed


def param_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Flat name -> shape for every parameter this config has ("layers.wq", "embed", ...)."""
    L, D, H, K, E, F, V = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                           cfg.intermediate_size, cfg.vocab_size)
    shapes = {
        "embed": (V, D),
        "layers.attn_norm": (L, D),
        "layers.wq": (L, D, H, E),
        "layers.wk": (L, D, K, E),
        "layers.wv": (L, D, K, E),
        "layers.wo": (L, H, E, D),
        "layers.mlp_norm": (L, D),
        "layers.w_gate": (L, D, F),
        "layers.w_up": (L, D, F),
        "layers.w_down": (L, F, D),
        "final_norm": (D,),
    }
    if cfg.qkv_bias:
        shapes.update({"layers.bq": (L, H, E), "layers.bk": (L, K, E), "layers.bv": (L, K, E)})
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


def unflatten(flat: dict[str, object]) -> Params:
    """Build Params from a flat {"layers.wq": array, ...} dict (missing optional leaves become None)."""
    layer_fields = {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith("layers.")}
    return Params(
        embed=flat["embed"],
        layers=LayerParams(**layer_fields),
        final_norm=flat["final_norm"],
        lm_head=flat.get("lm_head"),
    )


def flatten(params: Params) -> dict[str, object]:
    """Inverse of `unflatten`: a flat name -> leaf dict without the None leaves."""
    flat = {"embed": params.embed, "final_norm": params.final_norm}
    if params.lm_head is not None:
        flat["lm_head"] = params.lm_head
    for name in LayerParams.__dataclass_fields__:
        leaf = getattr(params.layers, name)
        if leaf is not None:
            flat[f"layers.{name}"] = leaf
    return flat


def abstract_params(cfg: Config, dtype=None, sharding=None) -> Params:
    """The params as a tree of ShapeDtypeStruct: drives loading, memory planning and compile-only runs."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    return unflatten({k: jax.ShapeDtypeStruct(s, dtype, sharding=sharding) for k, s in param_shapes(cfg).items()})


def param_bytes(cfg: Config, dtype) -> int:
    size = jnp.dtype(dtype).itemsize
    return sum(int(np.prod(s)) * size for s in param_shapes(cfg).values())


def init_random(cfg: Config, seed: int = 0, dtype=None) -> Params:
    """Random weights with a sane scale (for demos, benchmarks and compile tests; not a trained model)."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    key = jax.random.PRNGKey(seed)
    flat = {}
    for i, (name, shape) in enumerate(sorted(param_shapes(cfg).items())):
        if name.endswith("norm"):
            flat[name] = jnp.ones(shape, dtype)
            continue
        fan_in = shape[-2] if name in ("lm_head", "layers.w_gate", "layers.w_up", "layers.w_down") else shape[-1]
        if name in ("layers.wq", "layers.wk", "layers.wv"):
            fan_in = shape[1]
        elif name == "layers.wo":
            fan_in = shape[1] * shape[2]
        elif name == "embed":
            fan_in = 1
        scale = 0.02 if name == "embed" else fan_in**-0.5
        flat[name] = (jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32) * scale).astype(dtype)
    return unflatten(flat)
