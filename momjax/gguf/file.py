"""The GGUF file format: the header (metadata key/values, then one entry per tensor) parsed with a bounds check
on every read, and the table of ggml types momjax dequantizes.

A GGUF file is the magic bytes 'GGUF', a version, the metadata and the tensor table (name, dims innermost
first, ggml type, offset into the data), then the tensor data at the next multiple of the alignment. A
truncated or corrupt header is refused in one line (`CheckpointError`) before any tensor is read, and so is a
tensor that would end past the end of the file. Nothing in a GGUF file is ever executed: the format holds no
pickle.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass

import numpy as np

from momjax.errors import CheckpointError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
ROPE_FREQS = "rope_freqs.weight"  # Llama 3's rope frequency factors (read into the config, not a weight)

# ggml types momjax dequantizes (the gguf package's numpy code): name -> id, block size (elements), block bytes.
# The ids and sizes are llama.cpp's (ggml.h); tests/test_gguf.py checks them against the installed gguf package.
TYPES = {
    "F32": (0, 1, 4), "F16": (1, 1, 2), "BF16": (30, 1, 2),
    "Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20), "Q5_0": (6, 32, 22), "Q5_1": (7, 32, 24), "Q8_0": (8, 32, 34),
    "Q2_K": (10, 256, 84), "Q3_K": (11, 256, 110), "Q4_K": (12, 256, 144), "Q5_K": (13, 256, 176),
    "Q6_K": (14, 256, 210),
}  # fmt: skip
TYPE_BY_ID = {tid: (name, block, nbytes) for name, (tid, block, nbytes) in TYPES.items()}
REDOWNLOAD = "the file is truncated or corrupt; download it again"


def refuse(path: str, message: str, fix: str = REDOWNLOAD):
    """Raise the one-line CheckpointError for a file that cannot be read: where, what, and what to do."""
    raise CheckpointError(f"{path}: {message}; {fix}")


def type_name(ggml_type: int) -> str:
    """A ggml type's name: momjax's own table, else the gguf package's, else the number."""
    if ggml_type in TYPE_BY_ID:
        return TYPE_BY_ID[ggml_type][0]
    try:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(ggml_type).name
    except (ImportError, ValueError):
        return f"ggml type {ggml_type}"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file. shape is outermost first (numpy and Hugging Face order); nbytes is -1 for a
    type momjax does not dequantize or rows that are not whole blocks (reported when the tensors are matched)."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return type_name(self.ggml_type)


@dataclass(frozen=True)
class GGUFFile:
    path: str
    version: int
    size: int
    metadata: dict
    tensors: dict[str, TensorInfo]
    data_start: int


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
          12: "<f8"}
_STRING, _ARRAY = 8, 9
_MAX_NESTING = 4  # arrays of arrays are allowed; deeper nesting is not a model's metadata


class _Reader:
    """Sequential reads of a file's header, each checked against the bytes left in the file."""

    def __init__(self, f, size: int, path: str):
        self.f, self.size, self.path, self.pos = f, size, path, 0

    def take(self, n: int, what: str) -> bytes:
        if n > self.size - self.pos:
            refuse(self.path, f"the file ends inside its GGUF header (reading {what} at byte {self.pos} of "
                              f"{self.size})")
        data = self.f.read(n)
        if len(data) != n:
            refuse(self.path, f"the file ended while reading {what}")
        self.pos += n
        return data

    def scalar(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        raw = self.take(self.scalar("<Q", what), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            refuse(self.path, f"{what} is not valid UTF-8")

    def value(self, vtype: int, key: str, depth: int = 0):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], f"the value of {key}")
        if vtype == _STRING:
            return self.string(f"the value of {key}")
        if vtype == _ARRAY and depth < _MAX_NESTING:
            itype = self.scalar("<I", f"the array type of {key}")
            count = self.scalar("<Q", f"the array length of {key}")
            smallest = np.dtype(_NUMPY[itype]).itemsize if itype in _NUMPY else 8 if itype == _STRING else 12
            if count > (self.size - self.pos) // smallest:
                refuse(self.path, f"metadata array {key} ({count} items) runs past the end of the file")
            if itype in _NUMPY:
                item = np.dtype(_NUMPY[itype])
                return np.frombuffer(self.take(count * item.itemsize, key), item).copy()
            if itype == _STRING:
                return [self.string(f"item {i} of {key}") for i in range(count)]
            return [self.value(itype, f"item {i} of {key}", depth + 1) for i in range(count)]
        refuse(self.path, f"metadata {key} has value type {vtype}, which GGUF does not define")


def is_gguf(path) -> bool:
    """True for an existing file that starts with the GGUF magic bytes."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def read_gguf(path: str) -> GGUFFile:
    """Parse a GGUF file's header (metadata and tensor table) and check that every tensor lies inside it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is not a file; pass a .gguf file")
    size = os.path.getsize(path)
    with open(path, "rb", buffering=1 << 20) as f:
        r = _Reader(f, size, path)
        if size < 4 or f.read(4) != MAGIC:
            raise CheckpointError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF'); pass a "
                                  ".gguf file written by llama.cpp, or a checkpoint folder (Hugging Face or Orbax)")
        r.pos = 4
        version = _version(r)
        n_tensors = r.scalar("<Q", "the tensor count")
        n_kv = r.scalar("<Q", "the metadata count")
        if n_kv > size // 13 or n_tensors > size // 24:  # the smallest entries: key length, a byte, the type...
            refuse(path, f"the header claims {n_kv} metadata entries and {n_tensors} tensors, more than {size} bytes "
                         "can hold")
        metadata = {}
        for i in range(n_kv):
            key = r.string(f"metadata key {i}")
            vtype = r.scalar("<I", f"the type of {key}")
            if key in metadata:
                refuse(path, f"metadata key {key} appears twice")
            metadata[key] = r.value(vtype, key)
        infos = [_tensor_entry(r, i) for i in range(n_tensors)]
        header_end = r.pos
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
        refuse(path, f"general.alignment={alignment!r} is not a power of two")
    data_start = -(-header_end // alignment) * alignment
    tensors = {}
    for name, shape, ggml_type, offset in infos:
        if name in tensors:
            refuse(path, f"tensor {name} appears twice")
        nbytes = tensor_nbytes(shape, ggml_type)
        start = data_start + offset
        if offset % alignment:
            refuse(path, f"tensor {name} starts at data offset {offset}, not a multiple of the alignment {alignment}")
        if nbytes is not None and start + nbytes > size:
            refuse(path, f"tensor {name} ({type_name(ggml_type)} {list(shape)}) ends at byte {start + nbytes}, past "
                         f"the end of the file ({size} bytes)")
        tensors[name] = TensorInfo(name, ggml_type, shape, start, -1 if nbytes is None else nbytes)
    return GGUFFile(path, version, size, metadata, tensors, data_start)


def _version(r: _Reader) -> int:
    version = r.scalar("<I", "the version")
    if version not in VERSIONS:
        if version & 0xFFFF == 0 and version >> 16:
            refuse(r.path, "it is a big-endian GGUF file, which momjax does not read",
                   "use the little-endian file (the usual one) of this model")
        refuse(r.path, f"GGUF version {version} is not supported (momjax reads versions 2 and 3)",
               "convert the model again with a current llama.cpp (convert_hf_to_gguf.py)")
    return version


def _tensor_entry(r: _Reader, i: int) -> tuple[str, tuple[int, ...], int, int]:
    """(name, shape outermost first, ggml type, offset into the data) of the next tensor table entry."""
    name = r.string(f"the name of tensor {i}")
    n_dims = r.scalar("<I", f"the dims of {name}")
    if not 1 <= n_dims <= MAX_DIMS:
        refuse(r.path, f"tensor {name} has {n_dims} dimensions (GGUF allows 1 to {MAX_DIMS})")
    dims = [r.scalar("<Q", f"the dims of {name}") for _ in range(n_dims)]
    ggml_type = r.scalar("<I", f"the type of {name}")
    offset = r.scalar("<Q", f"the offset of {name}")
    return name, tuple(reversed(dims)), ggml_type, offset


def tensor_nbytes(shape: tuple[int, ...], ggml_type: int) -> int | None:
    """Bytes of a tensor of a supported type whose rows are whole blocks; None otherwise (reported later)."""
    if ggml_type not in TYPE_BY_ID:
        return None
    _, block, block_bytes = TYPE_BY_ID[ggml_type]
    if shape[-1] % block:
        return None
    return math.prod(shape[:-1]) * (shape[-1] // block) * block_bytes
