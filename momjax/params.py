"""The parameter pytree: its layout, its abstract description, and random init.

Flax is used the functional way: parameters are `flax.struct` dataclass pytrees and the model is plain
functions over them (see model.py). Linen modules cannot be called from inside the `lax.map` bodies
that run mini-sequences, and a plain pytree is what Orbax saves as is.

Layout follows the hot path. `Params.layers` is a tuple of per-layer `LayerParams`, each leaf its own
array. Decoding is bandwidth-bound, and XLA copies a layer's slice out of a stacked [L, ...] array before
using it (on CPU and GPU alike, static slices too), which would double the bytes read per token; separate
arrays are read in place. Prefill runs one compiled per-layer program over them (generation.py), so its
compile time stays flat in depth anyway.

Storage is stacked: the flat description (`param_shapes`, `flatten`/`unflatten`) names one [L, ...] leaf
per weight kind ("layers.wq", ...), which is how the converter and Orbax folders hold a model. Loading
splits a stacked leaf into per-layer arrays as it places them.

Einsum-friendly layouts; letters D model, H heads, K kv heads, E head dim, F ffn, V vocab, L layers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from momjax.config import Config
from momjax.mesh import leaf_sharding, leaf_spec


@struct.dataclass
class LayerParams:
    attn_norm: jax.Array  # [D]
    wq: jax.Array  # [D, H, E]
    wk: jax.Array  # [D, K, E]
    wv: jax.Array  # [D, K, E]
    wo: jax.Array  # [H, E, D]
    mlp_norm: jax.Array  # [D]
    w_gate: jax.Array  # [D, F]
    w_up: jax.Array  # [D, F]
    w_down: jax.Array  # [F, D]
    bq: jax.Array | None = None  # [H, E] (Qwen2)
    bk: jax.Array | None = None  # [K, E]
    bv: jax.Array | None = None  # [K, E]


@struct.dataclass
class Params:
    embed: jax.Array  # [V, D]
    layers: tuple[LayerParams, ...]  # one per layer, each leaf a separate array
    final_norm: jax.Array  # [D]
    lm_head: jax.Array | None = None  # [D, V]; None when tied to embed


LAYER_FIELDS = tuple(LayerParams.__dataclass_fields__)


def param_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Flat name -> stored shape for every parameter this config has ("layers.wq" is [L, D, H, E], ...)."""
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


def unflatten(flat: dict[str, object], split=None) -> Params:
    """Build Params from a flat {"layers.wq": stacked [L, ...] leaf, ...} dict (absent optional leaves -> None).

    split(name, leaf) -> the per-layer pieces of a stacked leaf; the default indexes leaf[l] (numpy views
    on the host; copies for device arrays, so loaders place per-layer pieces themselves).
    """
    split = split or (lambda _, leaf: [leaf[i] for i in range(leaf.shape[0])])
    pieces = {k.split(".", 1)[1]: split(k, v) for k, v in flat.items() if k.startswith("layers.")}
    L = len(next(iter(pieces.values())))
    layers = tuple(LayerParams(**{f: p[i] for f, p in pieces.items()}) for i in range(L))
    return Params(embed=flat["embed"], layers=layers, final_norm=flat["final_norm"], lm_head=flat.get("lm_head"))


def stacked_leaves(params: Params) -> Iterator[tuple[str, np.ndarray]]:
    """(flat name, stacked host array) for every leaf, built one at a time (a saver holds one at once)."""
    host = lambda x: np.asarray(jax.device_get(x))
    yield "embed", host(params.embed)
    for name in LAYER_FIELDS:
        if getattr(params.layers[0], name) is not None:
            yield f"layers.{name}", np.stack([host(getattr(lp, name)) for lp in params.layers])
    yield "final_norm", host(params.final_norm)
    if params.lm_head is not None:
        yield "lm_head", host(params.lm_head)


def flatten(params: Params) -> dict[str, np.ndarray]:
    """Inverse of `unflatten`: flat name -> stacked host array, without the None leaves."""
    return dict(stacked_leaves(params))


def abstract_params(cfg: Config, dtype=None, sharding=None, mesh=None) -> Params:
    """The params as a tree of ShapeDtypeStruct: drives loading, memory planning and compile-only runs. With a
    mesh (concrete or abstract), each leaf is split over it as momjax.mesh says, instead of `sharding`."""
    dtype = jnp.dtype(dtype or cfg.dtype)

    def where(name, shape):
        return sharding if mesh is None else leaf_sharding(mesh, name.removeprefix("layers."), shape)

    flat = {k: jax.ShapeDtypeStruct(s, dtype, sharding=where(k, s[k.startswith("layers."):]))
            for k, s in param_shapes(cfg).items()}
    per_layer = lambda k, s: [jax.ShapeDtypeStruct(s.shape[1:], dtype, sharding=where(k, s.shape[1:]))] * s.shape[0]
    return unflatten(flat, per_layer)


def leaf_bytes(cfg: Config, dtype, tp: int = 1) -> dict[str, int]:
    """Flat name -> bytes of that stored leaf (all layers of a "layers." one) on each device when the weights are
    split tensor-parallel over tp devices (momjax.mesh): all of it for tp = 1, or for a leaf kept whole."""
    size = jnp.dtype(dtype).itemsize
    out = {}
    for name, shape in param_shapes(cfg).items():
        per_layer = name.startswith("layers.")
        spec = leaf_spec(name.removeprefix("layers."), shape[per_layer:], tp)
        out[name] = int(np.prod(shape)) * size // (tp if "tp" in spec else 1)
    return out


def param_bytes(cfg: Config, dtype, tp: int = 1) -> int:
    """Bytes of the weights on each device when they are split tensor-parallel over tp devices (momjax.mesh):
    all of them for tp = 1."""
    return sum(leaf_bytes(cfg, dtype, tp).values())


def init_random(cfg: Config, seed: int = 0, dtype=None) -> Params:
    """Random weights with a sane scale (for demos, benchmarks and compile tests; not a trained model)."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    key = jax.random.PRNGKey(seed)
    fan_in_axes = {"wq": (0,), "wk": (0,), "wv": (0,), "wo": (0, 1), "w_gate": (0,), "w_up": (0,), "w_down": (0,),
                   "lm_head": (0,), "bq": (1,), "bk": (1,), "bv": (1,)}

    def init(name, shape, i):
        if name.endswith("norm"):
            return jnp.ones(shape, dtype)
        scale = 0.02 if name == "embed" else math.prod(shape[a] for a in fan_in_axes[name]) ** -0.5
        return (jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32) * scale).astype(dtype)

    flat = {}
    for i, (name, shape) in enumerate(sorted(param_shapes(cfg).items())):
        if name.startswith("layers."):
            flat[name] = [init(name[7:], shape[1:], i * 1000 + l) for l in range(shape[0])]
        else:
            flat[name] = init(name, shape, i * 1000)
    return unflatten(flat, lambda _, pieces: pieces)


# ---------------------------------------------------------------------- weights in host memory (weights="host")


def head_params(params: Params) -> Params:
    """The params the LM head reads: the final norm and lm_head (or the tied embedding), no layers."""
    return params.replace(layers=(), embed=params.embed if params.lm_head is None else None)


def in_host_memory(a) -> bool:
    """Whether an array (or, inside jit, a traced argument) lives in pinned host memory."""
    return getattr(jax.typeof(a), "memory_space", None) == jax.memory.Space.Host


def weights_on_host(params: Params) -> bool:
    """Whether the model's weights live in pinned host memory (momjax.load(..., weights="host"))."""
    return in_host_memory(params.layers[0].wq)


def to_device(tree):
    """The tree's host arrays copied to the device. Outside jit the copy is asynchronous (it runs while the caller
    goes on); inside jit it is a copy in the program. Arrays already on the device are left as they are."""
    return jax.tree.map(lambda a: jax.device_put(a, jax.memory.Space.Device) if in_host_memory(a) else a, tree)


def device_layers(params: Params) -> Iterator[LayerParams]:
    """Each layer's weights on the device as a Python loop over the layers reaches it. With host weights, layer
    l+1's copy is started when layer l is handed out, so it arrives while layer l runs and the device holds two
    layers' weights at most; device weights are handed out as they are."""
    if not weights_on_host(params):
        yield from params.layers
        return
    arriving = to_device(params.layers[0])
    for l in range(len(params.layers)):
        current = arriving
        arriving = to_device(params.layers[l + 1]) if l + 1 < len(params.layers) else None
        yield current
