"""Convert a Hugging Face safetensors checkpoint folder, or a GGUF file, into a momjax Orbax folder.

The conversion streams: tensors are read one at a time, cast, and assembled into one leaf at a time,
which is written to its own Orbax checkpoint and freed before the next leaf starts. Peak memory is about
the largest leaf plus Orbax's write buffers, never the whole model (benchmarks/convert_rss.py measures
it). All names, shapes and file sizes are checked from the safetensors headers before any data is read.
A GGUF file (momjax.gguf) converts the same way, its tensors dequantized a block of rows at a time, and
the tokenizer its metadata describes is written beside the params (tokenizer.json, tokenizer_config.json).

The converter never destroys or half-writes anything:
- DST may not be SRC, lie inside SRC or contain SRC, compared after resolving symbolic links (and by
  inode, for bind mounts), whatever the flags.
- An existing DST is replaced only with `force`, and only when it is a previous momjax conversion
  (momjax_config.json, params/ and the files a conversion copies, nothing else); any other folder needs
  `force` and `replace_any`.
- The result is staged beside DST and moved there in one rename (momjax.store.staging); a killed run's
  leftovers are removed by the next conversion to DST.
- SIGINT and SIGTERM are deferred while Orbax writes a leaf (its threads would keep writing after a
  cleanup) and raised as soon as the write ends; the partial folder is then removed.
- Tokenizer files that are symbolic links to a place outside SRC are not copied (a Hub cache snapshot's
  links into its own blobs/ folder are fine).

The command line (`momjax convert`, convert/hf_to_orbax.py) is momjax.cli.convert.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys

import numpy as np

from momjax.api import forward
from momjax.config import SUPPORTED_DTYPES
from momjax.errors import CheckpointError, ConfigError, TokenizerError
from momjax.gguf import is_gguf, read_config, stream_gguf_leaves
from momjax.hf import config as hf_config
from momjax.hf.tensors import stream_hf_leaves
from momjax.loading import load
from momjax.store.orbax import SIDE_FILES, is_previous_output, write_orbax
from momjax.store.staging import Interrupted, Signals, os_reason, short, staged_output
from momjax.tokenizer import save_gguf_tokenizer

VERIFY_TOKENS = 8
__all__ = ["Interrupted", "convert", "verify_conversion"]


def convert(src: str, dst: str, dtype: str | None = None, force: bool = False, verify: bool = False,
            progress: bool = True, replace_any: bool = False) -> str:
    """Convert HF folder (or GGUF file) src into Orbax folder dst; returns dst's absolute path.

    dtype: "float32" | "bfloat16" | "float16" | None (the checkpoint's torch_dtype; a GGUF file's float type, or
    float32 for a quantized one).
    force: replace an existing dst that is a previous momjax conversion (only once the new one is complete).
    replace_any: with force, replace any existing dst (a file or a folder of anything).
    verify: compare a short forward pass of src and the converted params; they must be exactly equal.
    Raises CheckpointError / ConfigError on bad input before anything is written, CheckpointError when
    writing fails (nothing is left behind), and Interrupted on SIGINT/SIGTERM (nothing is left behind).
    """
    for name, value in (("force", force), ("verify", verify), ("progress", progress), ("replace_any", replace_any)):
        if not isinstance(value, bool):
            raise CheckpointError(f"{name} must be True or False, got {value!r}")
    if replace_any and not force:
        raise CheckpointError("--replace-any-folder (replace_any=True) only makes sense with --force (force=True)")
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not supported; choose one of {', '.join(SUPPORTED_DTYPES)}")
    src, dst = _check_paths(src, dst)
    with Signals() as signals, contextlib.ExitStack() as stack:
        with signals.allowed():
            gguf_src = os.path.isfile(src)
            if gguf_src:
                cfg, leaves = stream_gguf_leaves(src, dtype, progress, desc="converting")  # checks the header
                copies = []
            else:
                cfg = hf_config.from_folder(src)
                leaves = stream_hf_leaves(src, cfg, dtype or cfg.dtype, progress, desc="converting")  # checks headers
                copies = _files_to_copy(src)
            dtype = dtype or cfg.dtype
            # Closed on the way out even when interrupted between leaves, so the progress bar ends before any
            # message is printed.
            stack.callback(getattr(leaves, "close", lambda: None))
        with staged_output(dst, force, replace_any, signals, is_previous_output) as tmp, _quiet_orbax_thread_errors():
            reader = _Reader(leaves, signals)
            try:
                write_orbax(tmp, cfg.replace(dtype=dtype), reader)
                with signals.allowed():
                    for name, path in copies:
                        shutil.copyfile(path, os.path.join(tmp, name))
                    if gguf_src:
                        _write_gguf_tokenizer(src, tmp)
                    if verify:
                        verify_conversion(src, tmp, dtype)
            except (CheckpointError, ConfigError):
                raise
            except OSError as e:
                raise CheckpointError(f"cannot write {dst}: {os_reason(e)}") from None
            except Exception as e:
                if reader.failed:  # a bug or bad data while reading: not a write failure, keep its traceback
                    raise
                # Orbax/tensorstore wrap a failed write (disk full, read-only, quota) in their own types.
                code = re.search(r"os_error_code='?(\d+)", str(e))
                reason = f"{os.strerror(int(code.group(1)))} (errno {code.group(1)})" if code else short(e)
                raise CheckpointError(f"cannot write {dst}: {reason}; check free space and permissions") from None
    return dst


def _write_gguf_tokenizer(src: str, folder: str) -> None:
    """The tokenizer a GGUF file's metadata describes, written as tokenizer files into folder. A file whose
    tokenizer transformers cannot build still converts (the weights are fine); that is said on stderr."""
    try:
        save_gguf_tokenizer(src, folder, SIDE_FILES)
    except TokenizerError as e:
        print(f"momjax: no tokenizer written: {' '.join(str(e).split())}", file=sys.stderr)


def verify_conversion(src: str, converted: str, dtype: str) -> None:
    """Exactly equal float32 logits of a short forward pass from src (cast to dtype) and the converted folder."""
    cfg = read_config(src) if os.path.isfile(src) else hf_config.from_folder(src)
    tokens = (np.arange(1, VERIFY_TOKENS + 1, dtype=np.int64) * 7919 % cfg.vocab_size)[None]
    model = load(src, dtype=dtype, progress=False)
    expected = np.asarray(forward(model, tokens))
    del model  # one model in memory at a time
    got = np.asarray(forward(load(converted, progress=False), tokens))
    if got.shape != expected.shape or not np.array_equal(got, expected):
        diff = float(np.max(np.abs(got - expected))) if got.shape == expected.shape else float("inf")
        raise CheckpointError(f"verification failed: logits from {src} and its conversion differ by up to {diff:g}; "
                              "the converted folder was not kept. Please report this as a momjax bug")




def _check_paths(src, dst) -> tuple[str, str]:
    """(src, dst) as absolute paths, after refusing any overlap between them."""
    for name, value in (("SRC", src), ("DST", dst)):
        if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
            raise CheckpointError(f"{name} must be a folder path, got {value!r}")
    src, dst = (os.path.abspath(os.path.expanduser(os.fspath(p))) for p in (src, dst))
    if os.path.isfile(src):
        if not is_gguf(src):
            raise CheckpointError(f"{src} is not a folder, and not a GGUF file (it does not start with the bytes "
                                  "'GGUF'); pass a Hugging Face checkpoint folder (config.json + *.safetensors) or a "
                                  ".gguf file")
    elif not os.path.isdir(src):
        raise CheckpointError(f"{src} is not a folder or a file; pass a Hugging Face checkpoint folder (config.json "
                              "+ *.safetensors) or a .gguf file")
    src_real, dst_real = os.path.realpath(src), os.path.realpath(dst)
    overlap, kind = None, "file" if os.path.isfile(src) else "folder"
    if dst_real == src_real or _same_or_inside(dst, src_real):
        overlap = f"is the source {kind}" if dst_real == src_real else "is inside the source folder"
    elif _same_or_inside(src_real, dst_real):
        overlap = f"contains the source {kind}"
    if overlap:
        raise CheckpointError(f"the destination {dst} {overlap} {src} (after resolving links); choose a "
                              "destination outside it. Nothing was changed")
    if os.path.islink(dst):
        raise CheckpointError(f"the destination {dst} is a symbolic link; pass the real path of a new folder")
    return src, dst


def _same_or_inside(path: str, folder: str) -> bool:
    """True when path is folder or lies inside it: by resolved path, then by inode for each existing ancestor."""
    real = os.path.realpath(path)
    if os.path.commonpath([real, folder]) == folder:
        return True
    try:
        target = os.stat(folder)
    except OSError:
        return False
    p = real
    while True:
        with contextlib.suppress(OSError):
            if os.path.samestat(os.stat(p), target):  # a bind mount or a hard-linked path to the same folder
                return True
        parent = os.path.dirname(p)
        if parent == p:
            return False
        p = parent


def _files_to_copy(src: str) -> list[tuple[str, str]]:
    """(name, path) of the side files to copy. A symbolic link is followed only into SRC or, for a Hub
    cache snapshot (.../snapshots/<rev>), into that repository's blobs/ folder: a link to anywhere else
    (~/.ssh/id_rsa) must not be copied into a folder the user may share, and the conversion is refused (its
    folder would lack those files)."""
    src_real = os.path.realpath(src)
    roots = [src_real]
    if os.path.basename(os.path.dirname(src)) == "snapshots":
        roots.append(os.path.realpath(os.path.join(os.path.dirname(os.path.dirname(src)), "blobs")))
    copies, refused = [], []
    for name in SIDE_FILES:
        path = os.path.join(src, name)
        if not os.path.isfile(path):
            continue
        real = os.path.realpath(path)
        if not any(os.path.commonpath([real, root]) == root for root in roots):
            refused.append(name)
            continue
        copies.append((name, path))
    if refused:  # the converted folder would lack them (no tokenizer, no config): refuse before writing anything
        raise CheckpointError(f"{', '.join(refused)} in {src} are symbolic links to files outside it, which momjax "
                              "does not copy (a link must not carry a file from elsewhere into a folder you may "
                              "share); replace the links with the files themselves and convert again")
    return copies


class _DropThreadTracebacks(logging.Filter):
    """Orbax logs each failing writer thread's traceback before the main thread re-raises the same error,
    which convert reports in one line."""

    def filter(self, record):
        return "raised an exception" not in record.getMessage()


@contextlib.contextmanager
def _quiet_orbax_thread_errors():
    quiet = _DropThreadTracebacks()
    logging.getLogger("absl").addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger("absl").removeFilter(quiet)


class _Reader:
    """Iterates the leaves for write_orbax, allowing interrupts only while a leaf is being read."""

    def __init__(self, leaves, signals: Signals):
        self._it, self._signals, self.failed = iter(leaves), signals, False

    def __iter__(self):
        return self

    def __next__(self):
        try:
            with self._signals.allowed():
                return next(self._it)
        except StopIteration:
            raise
        except Exception:
            self.failed = True
            raise
