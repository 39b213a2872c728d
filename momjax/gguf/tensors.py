"""GGUF tensors -> momjax's flat params, one stacked leaf at a time, dequantized a block of rows at a time.

The tensors keep Hugging Face's shapes in GGUF (dims are listed innermost first), so each maps to a Hugging
Face name (`GGUF_NAMES`) and from there through momjax.hf.tensors' one name table to momjax's flat parameter
and layout. Tensors are dequantized with the `gguf` package (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and
the K-quants Q2_K..Q6_K) a block of rows at a time, straight into their stacked leaf in the requested dtype;
so a loader or converter holds one leaf and a few MB of temporaries, never the file. llama.cpp's converter
reorders the rows of Llama's q and k projections within each head (from the half-split rotary layout of
Hugging Face to interleaved pairs); that is undone here. Qwen2 is stored unpermuted.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator

import numpy as np

from momjax.arrays import INF_BITS, NUMPY_DTYPES, count_nonfinite
from momjax.config import Config
from momjax.errors import CheckpointError
from momjax.gguf.config import config_from_gguf
from momjax.gguf.file import ROPE_FREQS, TYPE_BY_ID, TYPES, GGUFFile, TensorInfo, read_gguf, refuse
from momjax.hf.tensors import Slot, check_dtype, expected_tensors
from momjax.params import param_shapes

_BLOCK_ELEMENTS = 1 << 20  # elements dequantized at a time (a few MB of float32 temporaries)

# GGUF tensor name ("{i}" = layer) -> Hugging Face tensor name; momjax.hf.tensors.NAME_TABLE takes it from there.
GGUF_NAMES = (
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("blk.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("blk.{i}.attn_q.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("blk.{i}.attn_k.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("blk.{i}.attn_v.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("blk.{i}.attn_q.bias", "model.layers.{i}.self_attn.q_proj.bias"),
    ("blk.{i}.attn_k.bias", "model.layers.{i}.self_attn.k_proj.bias"),
    ("blk.{i}.attn_v.bias", "model.layers.{i}.self_attn.v_proj.bias"),
    ("blk.{i}.attn_output.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("blk.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("blk.{i}.ffn_gate.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("blk.{i}.ffn_up.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("blk.{i}.ffn_down.weight", "model.layers.{i}.mlp.down_proj.weight"),
)
IGNORED = re.compile(r"blk\.\d+\.attn_rot_embd\.weight")  # rotary buffers some old converters wrote
# llama.cpp permutes these rows for the `llama` architecture (convert_hf_to_gguf.py, LlamaModel.permute).
PERMUTED = re.compile(r"blk\.\d+\.attn_[qk]\.weight")


def _gguf_to_hf(cfg: Config) -> dict[str, str]:
    out = {}
    for gguf_name, hf_name in GGUF_NAMES:
        for i in range(cfg.num_layers) if "{i}" in gguf_name else [None]:
            out[gguf_name.format(i=i)] = hf_name.format(i=i)
    return out


def plan_gguf_load(g: GGUFFile, cfg: Config) -> dict[str, list[tuple[Slot, TensorInfo]]]:
    """Match a file's tensors against the config, from the header only: leaf -> [(slot, tensor)].

    Raises one CheckpointError naming every missing, unexpected, misshapen or undequantizable tensor."""
    slots = expected_tensors(cfg)
    to_hf = _gguf_to_hf(cfg)
    from_hf = {hf: name for name, hf in to_hf.items()}
    missing = [from_hf[hf] for hf in slots if from_hf[hf] not in g.tensors]
    unexpected = [n for n in g.tensors if n not in to_hf and n != ROPE_FREQS and not IGNORED.fullmatch(n)]
    unexpected += [n for n in g.tensors if n in to_hf and to_hf[n] not in slots]  # e.g. biases in a Llama file
    misshapen, bad_type = [], []
    for hf, slot in slots.items():
        t = g.tensors.get(from_hf[hf])
        if t is None:
            continue
        if t.shape != slot.hf_shape:
            misshapen.append(f"{t.name} {list(t.shape)} (expected {list(slot.hf_shape)})")
        elif t.ggml_type not in TYPE_BY_ID:
            bad_type.append(f"{t.name} ({t.type_name})")
        elif t.nbytes < 0:
            bad_type.append(f"{t.name} ({t.type_name} rows of {t.shape[-1]}, not whole blocks)")
    problems = [f"{len(items)} {what}: {', '.join(items[:6])}" + (f" and {len(items) - 6} more" if len(items) > 6
                                                                  else "")
                for what, items in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen),
                                    ("stored in a type momjax does not dequantize", bad_type)) if items]
    if problems:
        fix = ("requantize the model to one of " + ", ".join(TYPES) + " (llama.cpp's llama-quantize), or use "
               "another file of this model") if bad_type and not (missing or unexpected or misshapen) else (
            "check that the file is a complete Llama/Mistral/Qwen2 model, or download it again")
        raise CheckpointError(
            f"{g.path} does not match its metadata ({cfg.model_type}, {cfg.num_layers} layers, hidden "
            f"{cfg.hidden_size}, {cfg.num_heads}/{cfg.num_kv_heads} heads, head_dim {cfg.head_dim}, vocab "
            f"{cfg.vocab_size}): {'; '.join(problems)}; {fix}")
    plan: dict[str, list[tuple[Slot, TensorInfo]]] = {leaf: [] for leaf in param_shapes(cfg)}
    for hf, slot in slots.items():
        plan[slot.leaf].append((slot, g.tensors[from_hf[hf]]))
    for items in plan.values():
        items.sort(key=lambda item: item[1].start)  # read the file front to back
    return plan


def _dequantize(raw: np.ndarray, ggml_type: int) -> np.ndarray:
    """float32 values of raw blocks [rows, bytes per row] -> [rows, elements per row]."""
    import gguf

    name = TYPE_BY_ID[ggml_type][0]
    if name == "F32":
        return raw.view("<f4")
    if name == "F16":
        return raw.view("<f2").astype(np.float32)
    out = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name])
    return out.astype(np.float32, copy=False)


def _read_into(f, view: memoryview, path: str, name: str) -> None:
    pos = 0
    while pos < len(view):
        n = f.readinto(view[pos:])
        if not n:
            refuse(path, f"the file ended while reading tensor {name}")
        pos += n


class _NonFinite(Exception):
    pass


def _copy_tensor(f, t: TensorInfo, slot: Slot, dest: np.ndarray, permute: bool, path: str, scratch) -> None:
    """dest[...] = the tensor dequantized, un-permuted, reshaped and transposed to slot's layout, in dest's dtype.

    The tensor is read in blocks of whole units of its outermost split axis (whole heads for q/k/v, rows
    otherwise), each dequantized to float32 and written to its slice of dest: no full-size temporary.
    """
    f.seek(t.start)
    if len(t.shape) == 1:  # norms and biases: small, one read
        raw = np.empty(t.nbytes, np.uint8)
        _read_into(f, memoryview(raw), path, t.name)
        x = _dequantize(raw.reshape(1, -1), t.ggml_type).reshape(-1)
        if not np.isfinite(x).all():
            raise _NonFinite(t.name)
        dest[...] = x.reshape(slot.split).astype(dest.dtype).transpose(slot.perm)
        return
    rows, cols = t.shape
    units = slot.split[0]
    rows_per_unit = rows // units  # head_dim for "(H E) D" layouts, else 1
    row_bytes = t.nbytes // rows
    step = max(1, _BLOCK_ELEMENTS // (rows_per_unit * cols))
    axis = slot.perm.index(0)  # where the outermost split axis goes in our layout
    index = [slice(None)] * dest.ndim
    for u0 in range(0, units, step):
        u1 = min(units, u0 + step)
        n = (u1 - u0) * rows_per_unit
        if scratch[0].size < n * row_bytes:
            scratch[0] = np.empty(n * row_bytes, np.uint8)
        raw = scratch[0][: n * row_bytes]
        _read_into(f, memoryview(raw), path, t.name)
        x = _dequantize(raw.reshape(n, row_bytes), t.ggml_type)  # float32 [n, cols]
        if not np.isfinite(x).all():
            raise _NonFinite(t.name)
        if permute:  # llama.cpp's interleaved rotary pairs back to Hugging Face's halves, within each head
            x = x.reshape(u1 - u0, rows_per_unit // 2, 2, cols).swapaxes(1, 2)
        block = x.reshape((u1 - u0, *slot.split[1:]))
        if block.dtype != dest.dtype:
            block = block.astype(dest.dtype)
        index[axis] = slice(u0, u1)
        dest[tuple(index)] = block.transpose(slot.perm)


def stream_gguf_leaves(path: str, dtype: str | None = None, progress: bool = True,
                       desc: str = "loading") -> tuple[Config, Iterator[tuple[str, np.ndarray]]]:
    """(config, iterator of (leaf name, numpy array in dtype)), one leaf at a time, one block of rows at a time.

    Everything that can be checked from the header (metadata, names, shapes, types, file size) is checked
    before this returns. config.dtype is the file's (its matrices' F16 or BF16, else float32: momjax.gguf.config);
    the leaves come in dtype (None: that).
    """
    g = read_gguf(path)
    cfg = config_from_gguf(g)
    dtype = check_dtype(dtype or cfg.dtype)
    plan = plan_gguf_load(g, cfg)
    permute = cfg.model_type == "llama"
    return cfg, _assemble(g, plan, param_shapes(cfg), dtype, permute, progress, desc)


def _assemble(g: GGUFFile, plan, shapes, dtype: str, permute: bool, progress: bool, desc: str):
    from tqdm import tqdm

    scratch = [np.empty(0, np.uint8)]
    np_dtype = np.dtype(NUMPY_DTYPES[dtype])
    with open(g.path, "rb", buffering=0) as f, tqdm(total=sum(map(len, plan.values())), desc=desc, unit="tensor",
                                                     file=sys.stderr, disable=not progress) as bar:
        for leaf, items in plan.items():
            out = np.empty(shapes[leaf], np_dtype)
            for slot, t in items:
                try:
                    with np.errstate(over="ignore"):  # an overflowing float16 cast is reported below
                        _copy_tensor(f, t, slot, out if slot.layer is None else out[slot.layer],
                                     permute and bool(PERMUTED.fullmatch(t.name)), g.path, scratch)
                except _NonFinite:
                    refuse(g.path, f"tensor {t.name} ({t.type_name}) holds NaN or inf values")
                bar.update()
            if np_dtype in INF_BITS:
                bad = count_nonfinite(out)
                if bad:  # the source values were finite (checked per block): a float16 overflow
                    raise CheckpointError(f"{g.path}: {bad} of {out.size} values of {leaf} overflow float16 (beyond "
                                          "+-65504); load or convert in bfloat16 or float32 instead")
            yield leaf, out
            del out
