"""Host arrays: numpy dtypes by name, a fast NaN/inf count, and handing freed memory back to the OS.

Shared by the checkpoint readers (momjax.hf.tensors, momjax.store.orbax) and the loader (momjax.loading).
"""

from __future__ import annotations

import ctypes
import gc

import ml_dtypes
import numpy as np

NUMPY_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
RELEASE_BYTES = 64 << 20  # leaves at least this large are freed eagerly (see release_memory)

INF_BITS = {np.dtype(np.float32): (np.uint32, 0x7FFFFFFF, 0x7F800000), np.dtype(np.float16): (np.uint16, 0x7FFF, 0x7C00),
             np.dtype(ml_dtypes.bfloat16): (np.uint16, 0x7FFF, 0x7F80)}
_FINITE_BLOCK = 1 << 22  # elements checked per step (a few MB of temporaries)


def count_nonfinite(x: np.ndarray) -> int:
    """NaN and inf values in x, by integer compares on the bits (fast for every float dtype, bfloat16 too)."""
    utype, mask, inf = INF_BITS[x.dtype]
    flat = np.ascontiguousarray(x).reshape(-1).view(utype)
    return sum(int(np.count_nonzero((flat[i:i + _FINITE_BLOCK] & mask) >= inf))
               for i in range(0, flat.size, _FINITE_BLOCK))


def release_memory(nbytes: int) -> None:
    """After a large leaf (nbytes) is done, free its buffers now: collect the reference cycles Orbax leaves
    them in, and hand memory freed by tensorstore's threads back to the OS (glibc keeps it otherwise).

    Without this, resident memory grows by a leaf or two over a model (measured by
    benchmarks/convert_rss.py). Small leaves skip it: a full gc pass can take a few tenths of a second.
    malloc_trim is glibc only; elsewhere that step is skipped.
    """
    if nbytes < RELEASE_BYTES:
        return
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
