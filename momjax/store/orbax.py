"""momjax's Orbax folders: what `momjax convert` writes and `momjax.load` reads fastest.

A converted folder holds `momjax_config.json` (`Config.to_json`) and `params/<leaf>/`, one Orbax checkpoint
per flat leaf ("embed", "layers.wq", ...). One checkpoint per leaf is what lets the converter write a model
piece by piece: Orbax writes a whole pytree in one call, so a single checkpoint would need the whole model in
memory at once. Arrays are stored as zarr chunks of `CHUNK_BYTES` (uncompressed, no OCDBT: that keeps Orbax's
own write buffers small; weights barely compress). Layer weights are stored stacked ("layers.wq" is
[L, D, H, E]), as the converter assembles them; `read_leaves` yields one stacked leaf at a time in host
memory, in the requested dtype, and the loader places it layer by layer (momjax.loading).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator

import jax
import numpy as np

from momjax.arrays import INF_BITS, NUMPY_DTYPES, count_nonfinite, release_memory
from momjax.config import SUPPORTED_DTYPES, Config
from momjax.errors import CheckpointError, ConfigError
from momjax.params import Params, param_shapes, stacked_leaves
from momjax.store.staging import staged_folder

CONFIG_FILE = "momjax_config.json"
PARAMS_DIR = "params"
CHUNK_BYTES = 4 << 20  # zarr chunk: tensorstore encodes chunks concurrently, so its write buffers scale with it
# Files a conversion copies beside the params when the source has them: everything a tokenizer or a generation
# config may need. A folder holding the params and only these is a previous output that --force may replace.
SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json",
)


class _QuietNonOcdbtMerge(logging.Filter):
    """Orbax warns after every non-OCDBT save that it found no OCDBT files to merge: expected here."""

    def filter(self, record):
        return "Skipping merge of OCDBT checkpoints" not in record.getMessage()


def _checkpointer():
    import orbax.checkpoint as ocp

    # deepcopy_host_arrays=False: numpy leaves are written as they are, not copied first (half the peak memory).
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.ArrayHandler()),
    )
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_compression=False, type_handler_registry=registry)
    return ocp.Checkpointer(handler)


def is_orbax_folder(path: str) -> bool:
    """True for a folder written by save_orbax or `momjax convert`."""
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isdir(os.path.join(path, PARAMS_DIR))


def is_previous_output(path: str) -> tuple[bool, list[str]]:
    """(True, []) for a folder holding a previous conversion and nothing else; else (False, what is foreign)."""
    if os.path.islink(path) or not os.path.isdir(path):
        return False, ["it is not a folder"]
    try:
        names = os.listdir(path)
    except OSError as e:
        return False, [f"it cannot be listed ({e.strerror or e})"]
    if not is_orbax_folder(path):
        return False, [f"it has no {CONFIG_FILE} and {PARAMS_DIR}/"]
    foreign = sorted(set(names) - {CONFIG_FILE, PARAMS_DIR, *SIDE_FILES})
    return not foreign, [f"it also holds {', '.join(foreign[:5])}"] if foreign else []


def read_config(path: str) -> Config:
    """The Config of an Orbax folder, weights unread."""
    try:
        with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as f:
            return Config.from_json(json.load(f))
    except (ValueError, TypeError) as e:  # JSONDecodeError and ConfigError are ValueErrors
        raise CheckpointError(f"{path}/{CONFIG_FILE} is unreadable ({e}); convert the checkpoint again") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}/{CONFIG_FILE} ({e.strerror or e}); check its permissions") from None


def write_orbax(folder: str, cfg: Config, leaves: Iterable[tuple[str, np.ndarray]]) -> None:
    """Write momjax_config.json and one Orbax checkpoint per leaf into an existing empty folder.

    leaves: (flat name, host array) pairs, consumed one at a time so only one needs to exist at once.
    cfg.dtype should be the dtype the leaves are stored in.
    """
    import orbax.checkpoint as ocp

    ckptr = _checkpointer()
    quiet = _QuietNonOcdbtMerge()
    logging.getLogger("absl").addFilter(quiet)
    try:
        os.makedirs(os.path.join(folder, PARAMS_DIR))
        for name, x in leaves:
            item = {name: x}
            ckptr.save(os.path.join(folder, PARAMS_DIR, name),
                       args=ocp.args.PyTreeSave(item, save_args={name: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES)}))
            nbytes = x.nbytes
            del item, x
            release_memory(nbytes)
    finally:
        logging.getLogger("absl").removeFilter(quiet)
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump(cfg.to_json(), f, indent=2)


def save_orbax(params: Params, cfg: Config, dst: str, force: bool = False) -> None:
    """Save params (any memory kind) and cfg as an Orbax folder, one stacked leaf at a time, atomically.
    An existing dst is replaced only with force, and only when it is a previous momjax output."""
    stored = cfg.replace(dtype=str(np.dtype(params.embed.dtype)))
    with staged_folder(dst, is_previous_output, force) as tmp:
        write_orbax(tmp, stored, stacked_leaves(params))


def read_leaves(path: str, dtype=None) -> tuple[Config, Iterator[tuple[str, np.ndarray]]]:
    """An Orbax folder's Config and an iterator of (flat name, host array in dtype), one stacked leaf at a time.
    dtype: "float32" | "bfloat16" | "float16" | None (as stored). The folder is checked before returning."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a folder; pass a folder written by `momjax convert`")
    if not is_orbax_folder(path):
        raise CheckpointError(f"{path} is not a momjax Orbax folder (no {CONFIG_FILE} and {PARAMS_DIR}/); write one "
                              "with `momjax convert`")
    cfg = read_config(path)
    dtype = dtype or cfg.dtype
    if dtype not in SUPPORTED_DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(SUPPORTED_DTYPES)} or None, got {dtype!r}")
    shapes = param_shapes(cfg)
    absent = [n for n in shapes if not os.path.isdir(os.path.join(path, PARAMS_DIR, n))]
    if absent:
        raise CheckpointError(f"{path} lacks the params {', '.join(absent)}; the conversion did not finish, "
                              "convert the checkpoint again")
    return cfg, _restore(path, shapes, np.dtype(NUMPY_DTYPES[dtype]))


def _restore(path: str, shapes: dict, dtype: np.dtype) -> Iterator[tuple[str, np.ndarray]]:
    import orbax.checkpoint as ocp

    ckptr = _checkpointer()
    for name, shape in shapes.items():
        item = {name: np.zeros((), dtype)}
        try:
            restored = ckptr.restore(os.path.join(path, PARAMS_DIR, name), args=ocp.args.PyTreeRestore(
                item=item, restore_args={name: ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype)}))[name]
        except Exception as e:  # Orbax/tensorstore raise many types; name the leaf and say what to do
            raise CheckpointError(f"{path}: cannot restore {name} ({type(e).__name__}: {e}); convert the "
                                  "checkpoint again") from e
        if restored.shape != shape:
            raise CheckpointError(f"{path}: {name} has shape {list(restored.shape)}, its config needs "
                                  f"{list(shape)}; convert the checkpoint again")
        if dtype in INF_BITS and count_nonfinite(restored):
            overflow = " (or overflow float16: load it in bfloat16 or float32)" if dtype == np.float16 else ""
            raise CheckpointError(f"{path}: {count_nonfinite(restored)} values of {name} are NaN or inf{overflow}; "
                                  "convert the checkpoint again from a healthy source")
        yield name, restored.astype(dtype, copy=False)
        del restored
