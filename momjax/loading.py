"""A loaded model (`Model`) and `load`: a Hugging Face folder, an Orbax folder or a GGUF file, placed on the
device.

Each reader yields the weights one stacked leaf at a time in host memory (momjax.hf.tensors,
momjax.store.orbax, momjax.gguf.tensors); each leaf is placed as soon as it arrives, a "layers.*" leaf as one
array per layer (params.py), so the host holds at most one leaf in flight and no stacked copy exists where the
model runs.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import jax
import numpy as np

from momjax.arrays import release_memory
from momjax.config import SUPPORTED_DTYPES, Config
from momjax.errors import CheckpointError, InputError
from momjax.gguf import read_config, stream_gguf_leaves
from momjax.hf import config as hf_config
from momjax.hf.tensors import stream_hf_leaves
from momjax.mesh import check_mesh, leaf_sharding, place_leaf, tp_degree
from momjax.offload_programs import stream_heads
from momjax.params import Params, unflatten
from momjax.store import orbax


@dataclass
class Model:
    """A loaded model: its config, its params pytree, and where it came from.

    max_context: the longest prompt + new tokens accepted; defaults to the config's context_length
    (max_position_embeddings, or what yarn or dynamic rope scaling extends it to). Set it higher
    (`model.max_context = 1_000_000`) to run past the length the model was trained for, knowing its outputs
    may degrade there.
    """

    config: Config
    params: Params
    path: str | None = None
    max_context: int = 0
    tokenizer_path: str | None = field(default=None, repr=False)
    mesh: jax.sharding.Mesh | None = field(default=None, repr=False)  # tensor-parallel mesh (momjax.mesh)
    weights: str = "device"  # "host": the weights live in pinned host memory, each layer's brought over as it runs
    _hash: tuple | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if not self.max_context:
            self.max_context = self.config.context_length
        if self.tokenizer_path is None:
            self.tokenizer_path = self.path

    @property
    def dtype(self):
        return self.params.embed.dtype

    def weights_hash(self) -> str:
        """sha256 over every weight's name, shape, dtype and bytes (a session file names the weights it was made
        with). Computed once per params object: hashing an 8B model reads all 16 GB once."""
        if self._hash is not None and self._hash[0] is self.params:
            return self._hash[1]
        h = hashlib.sha256()
        for path, leaf in jax.tree_util.tree_leaves_with_path(self.params):
            arr = np.asarray(leaf)
            h.update(f"{jax.tree_util.keystr(path)}:{arr.shape}:{arr.dtype};".encode())
            h.update(np.ascontiguousarray(arr).view(np.uint8).reshape(-1).data)
        self._hash = (self.params, h.hexdigest())
        return self._hash[1]


def check_model(model) -> None:
    if not isinstance(model, Model):
        raise InputError(f"model must be a momjax.Model from momjax.load(path), got {type(model).__name__}")


def check_weights(model: Model) -> None:
    """InputError when the model's params are not where model.weights says (device or pinned host memory)."""
    where = model.params.layers[0].wq.sharding.memory_kind if hasattr(model.params.layers[0].wq, "sharding") else None
    if where is not None and (where == "pinned_host") != (model.weights == "host"):
        raise InputError(f"the model says weights={model.weights!r} but its params are in {where} memory; load it "
                         "again with momjax.load(path, weights=...)")


def check_runs(model: Model, policy) -> None:
    """InputError when the model cannot run the policy as it is placed: params not where model.weights says, or a
    mom-host block grouping (host_heads) that its mesh cannot split."""
    check_weights(model)
    if policy.on_host:
        stream_heads(model.config, policy, tp_degree(model.mesh))


def folder_config(path: str) -> Config:
    """The Config of a checkpoint folder (Hugging Face config.json, or an Orbax folder's) or of a GGUF file (its
    metadata), weights unread."""
    if os.path.isfile(path):
        return read_config(path)
    if orbax.is_orbax_folder(path):
        return orbax.read_config(path)
    return hf_config.from_folder(path)


def load(path: str, dtype: str | None = None, mesh: jax.sharding.Mesh | None = None, weights: str = "device",
         progress: bool = True, max_context: int | None = None) -> Model:
    """Load a HF checkpoint folder (config.json + *.safetensors), an Orbax folder from `momjax convert`, or a GGUF
    file (llama.cpp's format: architectures llama and qwen2, dequantized to dtype; see momjax.gguf).

    dtype: "float32" | "bfloat16" | "float16" | None (the checkpoint's). weights: "device", or "host": the weights
    stay in pinned host memory and each layer's come to the device when it runs, the next layer's copy in flight
    (with every policy, on one device or a mesh, each device keeping its own piece: a model larger than the
    devices runs; decoding is then bound by the host link, since every token brings every layer over).
    mesh: a jax.sharding.Mesh with a "tp" axis (momjax.make_mesh(tp=N)): every weight is split over it as it
    loads (momjax.mesh says how), each device receiving only its piece, and every program runs tensor-parallel.
    max_context: the longest prompt + new tokens accepted (default: the config's context_length).
    Weights holding NaN or inf (or overflowing float16) are refused with a CheckpointError.
    """
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise InputError(f"path must be a checkpoint folder path, got {path!r}")
    path = os.path.expanduser(os.fspath(path))
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        raise InputError(f"dtype must be 'float32', 'bfloat16', 'float16' or None, got {dtype!r}")
    if weights not in ("device", "host"):
        raise InputError(f"weights must be 'device' or 'host' (pinned host memory, each layer brought to the device "
                         f"as it runs), got {weights!r}")
    memory_kind = "pinned_host" if weights == "host" else "device"
    if not isinstance(progress, bool):
        raise InputError(f"progress must be True or False, got {progress!r}")
    if max_context is not None and (isinstance(max_context, bool) or not isinstance(max_context, int)
                                    or max_context < 1):
        raise InputError(f"max_context must be a positive number of tokens or None, got {max_context!r}")
    if os.path.isfile(path):  # a GGUF file (anything else is refused by its header check)
        cfg, leaves = stream_gguf_leaves(path, dtype, progress)
        return _placed_model(cfg, leaves, path, memory_kind, mesh, max_context)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a folder; pass a Hugging Face checkpoint folder, an Orbax folder "
                              "written by `momjax convert` or a .gguf file")
    if orbax.is_orbax_folder(path):
        cfg, leaves = orbax.read_leaves(path, dtype)
    else:
        cfg = hf_config.from_folder(path)
        leaves = stream_hf_leaves(path, cfg, dtype, progress)
    return _placed_model(cfg, leaves, path, memory_kind, mesh, max_context)


def _placed_model(cfg: Config, leaves, path: str, memory_kind: str, mesh, max_context) -> Model:
    """The Model of a checkpoint whose leaves are still unread: the mesh is checked against its config first."""
    if mesh is not None:
        check_mesh(mesh, cfg)
    return Model(config=cfg, params=place(leaves, memory_kind, mesh), path=path, max_context=max_context or 0,
                 mesh=mesh, weights="host" if memory_kind == "pinned_host" else "device")


def place(leaves: Iterable[tuple[str, np.ndarray]], memory_kind: str = "device", mesh=None) -> Params:
    """Params from (flat name, host array) leaves, each placed in memory_kind as it arrives: on the first
    device, or split over mesh as momjax.mesh says."""
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind=memory_kind)
    flat = {}
    for name, x in leaves:
        if mesh is None:
            flat[name] = _place_leaf(name, x, single)
        else:
            per_layer = name.startswith("layers.")
            sharding = leaf_sharding(mesh, name.removeprefix("layers."), x.shape[per_layer:], memory_kind)
            flat[name] = [place_leaf(x[i], sharding) for i in range(x.shape[0])] if per_layer else \
                place_leaf(x, sharding)
        nbytes = x.nbytes
        del x
        release_memory(nbytes)
    return unflatten(flat, lambda _, pieces: pieces)


def _placed(name: str, x: jax.Array, sharding) -> jax.Array:
    """x on the requested memory kind (moved there if a restore put it elsewhere), transfer finished.

    Waiting for the transfer lets the host buffer it came from be freed before the next leaf is read.
    """
    if x.sharding.memory_kind != sharding.memory_kind:
        x = jax.device_put(x, sharding)
    x.block_until_ready()
    if x.sharding.memory_kind != sharding.memory_kind:
        raise RuntimeError(f"{name} landed in {x.sharding.memory_kind!r} memory, not {sharding.memory_kind!r}; "
                           "this backend does not support that memory kind (jax >= 0.10.2 is required on CPU)")
    return x


def _place_leaf(name: str, x: np.ndarray, sharding):
    """A host leaf on the device (or pinned host): a stacked "layers.*" leaf becomes one array per layer,
    each placed from a view of x, so no stacked copy ever exists where the model runs."""
    if not name.startswith("layers."):
        return _placed(name, jax.device_put(x, sharding), sharding)
    return [_placed(f"{name}[{i}]", jax.device_put(x[i], sharding), sharding) for i in range(x.shape[0])]
