"""Hugging Face safetensors weights: the one table of tensor names, header and index reading, and a streaming
loader that yields one leaf at a time.

`NAME_TABLE` is the one place that maps HF tensor names to our flat param names (params.py), with the layout
change each needs written as a small pattern, e.g. "(H E) D -> D H E": split the HF axis of size H*E into H
and E, then move D to the front. The expected HF shape of every tensor follows from the same pattern, so it is
checked from the file headers before any data is read, and every missing, unexpected or misshapen tensor is
reported in one `CheckpointError`. The safetensors header (8-byte little-endian length, then JSON) is parsed
here, and tensor bytes are read one tensor at a time: straight into their place in the stacked leaf when no
transpose or cast is needed, otherwise in blocks of a few MB. Leaves are assembled one at a time ([L, ...]
stacked over layers) and handed on as soon as they are complete, so a loader or converter holds at most one
leaf on the host besides what it keeps. Pickled weights (*.bin, *.pt) are never loaded.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import ml_dtypes
import numpy as np
from tqdm import tqdm

from momjax.arrays import count_nonfinite
from momjax.config import SUPPORTED_DTYPES, Config
from momjax.errors import CheckpointError
from momjax.params import param_shapes

# ---------------------------------------------------------------------- the name table
# HF tensor name ("{i}" = layer index)                 our leaf           HF layout -> our layout
NAME_TABLE = (
    ("model.embed_tokens.weight",                      "embed",           "V D -> V D"),
    ("model.layers.{i}.input_layernorm.weight",        "layers.attn_norm", "D -> D"),
    ("model.layers.{i}.self_attn.q_proj.weight",       "layers.wq",       "(H E) D -> D H E"),
    ("model.layers.{i}.self_attn.k_proj.weight",       "layers.wk",       "(K E) D -> D K E"),
    ("model.layers.{i}.self_attn.v_proj.weight",       "layers.wv",       "(K E) D -> D K E"),
    ("model.layers.{i}.self_attn.q_proj.bias",         "layers.bq",       "(H E) -> H E"),
    ("model.layers.{i}.self_attn.k_proj.bias",         "layers.bk",       "(K E) -> K E"),
    ("model.layers.{i}.self_attn.v_proj.bias",         "layers.bv",       "(K E) -> K E"),
    ("model.layers.{i}.self_attn.o_proj.weight",       "layers.wo",       "D (H E) -> H E D"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.mlp_norm",  "D -> D"),
    ("model.layers.{i}.mlp.gate_proj.weight",          "layers.w_gate",   "F D -> D F"),
    ("model.layers.{i}.mlp.up_proj.weight",            "layers.w_up",     "F D -> D F"),
    ("model.layers.{i}.mlp.down_proj.weight",          "layers.w_down",   "D F -> F D"),
    ("model.norm.weight",                              "final_norm",      "D -> D"),
    ("lm_head.weight",                                 "lm_head",         "V D -> D V"),
)  # fmt: skip
# Buffers some exporters write that carry no weights (rope frequencies are recomputed from the config).
IGNORED = re.compile(r"(.*\.)?rotary_emb\.inv_freq")

SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit: a larger "header" is not one, and is not read
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
_READ_BYTES = 8 << 20  # bytes per read() call, and per block transposed/cast at a time


def _axis_sizes(cfg: Config) -> dict[str, int]:
    return {"V": cfg.vocab_size, "D": cfg.hidden_size, "H": cfg.num_heads, "K": cfg.num_kv_heads,
            "E": cfg.head_dim, "F": cfg.intermediate_size}


@dataclass(frozen=True)
class Slot:
    """Where one HF tensor goes: leaf[layer] (or the whole leaf) = tensor.reshape(split).transpose(perm)."""

    hf_name: str
    leaf: str
    layer: int | None
    hf_shape: tuple[int, ...]
    split: tuple[int, ...]
    perm: tuple[int, ...]


def _parse_layout(layout: str, sizes: dict[str, int]):
    """'(H E) D -> D H E' -> HF shape (H*E, D), split shape (H, E, D), permutation (2, 0, 1)."""
    src, dst = layout.split("->")
    groups = [g.split() if g else [a] for g, a in re.findall(r"\(([^)]*)\)|(\w+)", src)]
    axes = [a for g in groups for a in g]
    hf_shape = tuple(math.prod(sizes[a] for a in g) for g in groups)
    split = tuple(sizes[a] for a in axes)
    perm = tuple(axes.index(a) for a in dst.split())
    return hf_shape, split, perm


def expected_tensors(cfg: Config) -> dict[str, Slot]:
    """HF name -> Slot for every tensor a checkpoint of this config must hold."""
    shapes, sizes = param_shapes(cfg), _axis_sizes(cfg)
    slots = {}
    for hf_name, leaf, layout in NAME_TABLE:
        if leaf not in shapes:  # biases without qkv_bias, lm_head with tied embeddings
            continue
        hf_shape, split, perm = _parse_layout(layout, sizes)
        per_layer = "{i}" in hf_name
        ours = tuple(split[p] for p in perm)
        assert ours == shapes[leaf][1 if per_layer else 0:], (leaf, ours, shapes[leaf])  # table vs params.py
        for i in range(cfg.num_layers) if per_layer else [None]:
            name = hf_name.format(i=i)
            slots[name] = Slot(name, leaf, i, hf_shape, split, perm)
    return slots


# ---------------------------------------------------------------------- safetensors files
@dataclass(frozen=True)
class TensorRef:
    """One tensor inside a safetensors file: absolute byte offset, size, dtype and shape."""

    file: str
    dtype: str  # safetensors spelling: "BF16", "F32", ...
    shape: tuple[int, ...]
    start: int
    nbytes: int


def read_safetensors_header(path: str) -> dict[str, TensorRef]:
    """Parse a safetensors header and check that every tensor lies inside the file."""
    size = os.path.getsize(path)
    redownload = "the file is truncated or corrupt; download it again"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: {size} bytes is too short for a safetensors file; {redownload}")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: header length {n} exceeds safetensors' limit of {MAX_HEADER_BYTES} bytes; "
                                  f"{redownload}")
        if 8 + n > size:
            raise CheckpointError(f"{path}: header length {n} runs past the end of the file ({size} bytes); "
                                  f"{redownload}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: the header is not valid JSON ({e}); {redownload}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the header is not a JSON object; {redownload}")
    refs = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        ok = isinstance(info, dict) and isinstance(info.get("dtype"), str) and isinstance(info.get("shape"), list)
        ok = ok and all(_is_count(s) for s in info["shape"]) and isinstance(info.get("data_offsets"), list)
        ok = ok and len(info["data_offsets"]) == 2 and all(_is_count(o) for o in info["data_offsets"])
        if not ok:  # JSON strings, floats, booleans or negatives where safetensors has non-negative integers
            raise CheckpointError(f"{path}: malformed header entry for {name!r} (dtype must be a string, shape and "
                                  f"data_offsets lists of non-negative integers): {str(info)[:200]}; {redownload}")
        dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        if not begin <= end or 8 + n + end > size:
            raise CheckpointError(f"{path}: tensor {name} has data offsets [{begin}, {end}) beyond the end of the "
                                  f"file ({size - 8 - n} data bytes); {redownload}")
        if dtype in SAFETENSORS_DTYPES and end - begin != math.prod(shape) * np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize:
            raise CheckpointError(f"{path}: tensor {name} ({dtype} {list(shape)}) has {end - begin} bytes; "
                                  f"{redownload}")
        refs[name] = TensorRef(path, dtype, shape, 8 + n + begin, end - begin)
    return refs


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


INDEX_FILE = "model.safetensors.index.json"


def read_index(path: str) -> dict[str, str] | None:
    """The index's weight_map as tensor name -> shard path, or None when the folder has no index.

    Shard names must be plain relative paths inside the folder: an absolute path or a `..` is refused
    (a checkpoint must not make momjax read files elsewhere).
    """
    index = os.path.join(path, INDEX_FILE)
    if not os.path.isfile(index):
        return None
    bad_index = f"{index} is not a valid safetensors index"
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{bad_index} (no weight_map); download it again") from None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) and v
                                                   for k, v in weight_map.items()):
        raise CheckpointError(f"{bad_index}: weight_map must map tensor names to shard file names; download it again")
    escaping = sorted({v for v in weight_map.values() if os.path.isabs(v) or ".." in re.split(r"[\\/]", v)})
    if escaping:
        raise CheckpointError(f"{index} names shard files outside the checkpoint folder ({', '.join(escaping[:3])}); "
                              "momjax reads only files inside the folder. Fix or re-download the index")
    return {name: os.path.join(path, os.path.normpath(shard)) for name, shard in weight_map.items()}


def weight_files(path: str) -> list[str]:
    """The safetensors files of a HF checkpoint folder: the index's shards, or model.safetensors."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a folder; pass a Hugging Face checkpoint folder (config.json + "
                              "*.safetensors)")
    weight_map = read_index(path)
    if weight_map is not None:
        files = sorted(set(weight_map.values()))
        absent = [os.path.relpath(f, path) for f in files if not os.path.isfile(f)]
        if absent:
            raise CheckpointError(f"{path}: shards listed in {INDEX_FILE} are missing: {', '.join(absent)}; "
                                  "download them")
        return files
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if files:
        return files
    pickles = sorted(os.path.basename(p) for pat in PICKLE_PATTERNS for p in glob.glob(os.path.join(path, pat)))
    if pickles:
        raise CheckpointError(
            f"{path} has only PyTorch pickle weights ({', '.join(pickles)}); momjax never loads pickles because "
            "unpickling can run arbitrary code. Download the checkpoint's safetensors files instead (most Hub "
            "repos have them, e.g. `hf download REPO --include '*.safetensors' '*.json'`), or convert on a "
            "trusted machine with transformers: AutoModelForCausalLM.from_pretrained(path)"
            ".save_pretrained(out_dir, safe_serialization=True)"
        )
    raise CheckpointError(f"{path} has no *.safetensors weights; pass a Hugging Face checkpoint folder")


def plan_hf_load(path: str, cfg: Config) -> dict[str, list[tuple[Slot, TensorRef]]]:
    """Match a folder's tensors against the name table, from headers only: leaf -> [(slot, tensor)].

    Raises one CheckpointError naming every missing, unexpected, misshapen or non-float tensor.
    """
    refs: dict[str, TensorRef] = {}
    weight_map, misplaced = read_index(path), []
    for file in weight_files(path):
        for name, ref in read_safetensors_header(file).items():
            # The index is the truth: a tensor also found in a shard it is not assigned to is refused, not
            # taken from whichever file happens to be read last.
            where = weight_map.get(name) if weight_map is not None else refs[name].file if name in refs else file
            if where != file and not IGNORED.fullmatch(name):
                if weight_map is None:
                    why = f"also in {os.path.basename(where)}"
                else:
                    why = f"the index assigns it to {os.path.basename(where)}" if where else "not in the index"
                misplaced.append(f"{name} in {os.path.basename(file)} ({why})")
            elif where == file:
                refs[name] = ref
    if misplaced:
        raise CheckpointError(f"{path}: tensors stored where the checkpoint does not say they are: "
                              f"{', '.join(misplaced[:5])}" + (f" and {len(misplaced) - 5} more" if len(misplaced) > 5
                                                               else "") + "; re-download the checkpoint")
    slots = expected_tensors(cfg)
    missing = [n for n in slots if n not in refs]
    unexpected = [n for n in refs if n not in slots and not IGNORED.fullmatch(n)
                  and not (n == "lm_head.weight" and cfg.tie_embeddings)]  # tied checkpoints may still hold it
    misshapen = [f"{n} {list(refs[n].shape)} (expected {list(s.hf_shape)})"
                 for n, s in slots.items() if n in refs and refs[n].shape != s.hf_shape]
    bad_dtype = [f"{n} {refs[n].dtype}" for n in slots if n in refs and refs[n].dtype not in SAFETENSORS_DTYPES]
    problems = [f"{len(items)} {what}: {', '.join(items)}" for what, items in
                (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen),
                 ("not float (quantized checkpoints are not supported)", bad_dtype)) if items]
    if problems:
        raise CheckpointError(
            f"{path} does not match its config.json ({cfg.model_type}, {cfg.num_layers} layers, hidden "
            f"{cfg.hidden_size}, {cfg.num_heads}/{cfg.num_kv_heads} heads, head_dim {cfg.head_dim}, "
            f"tie_word_embeddings={cfg.tie_embeddings}): {'; '.join(problems)}. Check that config.json belongs "
            "to these weights, or download the checkpoint again"
        )
    plan: dict[str, list[tuple[Slot, TensorRef]]] = {leaf: [] for leaf in param_shapes(cfg)}
    for name, slot in slots.items():
        plan[slot.leaf].append((slot, refs[name]))
    for items in plan.values():
        items.sort(key=lambda item: (item[1].file, item[1].start))  # read each file front to back
    return plan


def _read_exact(f, view: memoryview, file: str) -> None:
    """Fill view from f's current position, one read() call of at most _READ_BYTES at a time."""
    pos = 0
    while pos < len(view):
        n = f.readinto(view[pos:pos + _READ_BYTES])
        if not n:
            raise CheckpointError(f"{file} ended while reading a tensor; the file is truncated, download it again")
        pos += n


def _copy_tensor(f, ref: TensorRef, slot: Slot, dest: np.ndarray, scratch: np.ndarray) -> None:
    """dest[...] = the tensor in slot's layout and dest's dtype; dest is C-contiguous.

    Same dtype and layout: read straight into dest. Otherwise read blocks of whole rows of the HF tensor
    (its outermost axis is contiguous in the file) into scratch and write each block, transposed and cast,
    to its slice of dest: no full-size temporary, even for a [V, D] -> [D, V] LM head.
    """
    src_dtype = np.dtype(SAFETENSORS_DTYPES[ref.dtype])
    f.seek(ref.start)
    if dest.dtype == src_dtype and slot.perm == tuple(range(len(slot.perm))):
        _read_exact(f, memoryview(dest.reshape(-1).view(np.uint8)), ref.file)
        return
    rows = slot.split[0]
    row_bytes = ref.nbytes // rows
    step = max(1, scratch.nbytes // row_bytes)
    axis = slot.perm.index(0)  # where the HF outermost axis goes in our layout
    index = [slice(None)] * dest.ndim
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        raw = scratch[:(r1 - r0) * row_bytes]
        _read_exact(f, memoryview(raw), ref.file)
        block = raw.view(src_dtype).reshape((r1 - r0, *slot.split[1:]))
        if block.dtype != dest.dtype:
            block = block.astype(dest.dtype)  # a contiguous cast, then a native-dtype transpose: faster than both at once
        index[axis] = slice(r0, r1)
        dest[tuple(index)] = block.transpose(slot.perm)


def check_dtype(dtype) -> str:
    """dtype, a name momjax loads weights in; ValueError otherwise."""
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(SUPPORTED_DTYPES)} or None, got {dtype!r}")
    return dtype


def stream_hf_leaves(path: str, cfg: Config, dtype=None, progress: bool = True,
                     desc: str = "loading") -> Iterator[tuple[str, np.ndarray]]:
    """An iterator of (leaf name, numpy array in dtype), one leaf at a time, reading one tensor at a time.

    All checks (names, shapes, dtypes, file sizes) run here, before the iterator is returned.
    """
    dtype = check_dtype(dtype or cfg.dtype)
    plan = plan_hf_load(path, cfg)
    return _finite_leaves(_assemble_leaves(plan, param_shapes(cfg), dtype, progress, desc), plan, path, dtype)


# dtype -> (unsigned view, mask of everything but the sign, the bits of +inf): |x| >= inf means inf or NaN.

def _finite_leaves(leaves, plan, path: str, dtype: str):
    """Pass leaves through, refusing one with NaN or inf: generating from such weights gives token 0 forever."""
    leaves = iter(leaves)
    while True:
        with np.errstate(over="ignore"):  # a cast that overflows float16 is reported below, not warned about
            item = next(leaves, None)
        if item is None:
            return
        leaf, x = item
        bad = count_nonfinite(x)
        if bad:
            names = [slot.hf_name for slot, _ in plan[leaf]][:3] + (["..."] if len(plan[leaf]) > 3 else [])
            sources = {ref.dtype for _, ref in plan[leaf]}
            what = f"{bad} of {x.size} values of {leaf} ({', '.join(names)}) in {path}"
            if dtype == "float16" and sources != {"F16"} and not any(
                    count_nonfinite(np.fromfile(ref.file, SAFETENSORS_DTYPES[ref.dtype], ref.nbytes //
                                                 np.dtype(SAFETENSORS_DTYPES[ref.dtype]).itemsize, offset=ref.start)
                                     .astype(np.float32)) for _, ref in plan[leaf]):
                raise CheckpointError(f"{what} overflow float16 (beyond +-65504); load or convert in bfloat16 or "
                                      "float32 instead")
            raise CheckpointError(f"{what} are NaN or inf; the checkpoint is corrupt (or was saved after a "
                                  "numerical overflow); download it again")
        yield leaf, x


def _assemble_leaves(plan, shapes, dtype, progress, desc):
    largest_row = max(ref.nbytes // slot.split[0] for items in plan.values() for slot, ref in items)
    scratch = np.empty(max(_READ_BYTES, largest_row), np.uint8)  # reused for every block of every tensor
    files = {}
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(tqdm(total=sum(map(len, plan.values())), desc=desc, unit="tensor",
                                       file=sys.stderr, disable=not progress))
        for leaf, items in plan.items():
            out = np.empty(shapes[leaf], dtype)
            for slot, ref in items:
                if ref.file not in files:
                    files[ref.file] = stack.enter_context(open(ref.file, "rb", buffering=0))
                _copy_tensor(files[ref.file], ref, slot, out if slot.layer is None else out[slot.layer], scratch)
                bar.update()
            yield leaf, out
            del out
