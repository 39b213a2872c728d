"""The session file format: one conversation's KV cache on disk, as safetensors (never pickle).

A file holds the token ids ("tokens"), the valid K and V of every layer ("k.{i}", "v.{i}", and with int8 K/V
their scales "k_scale.{i}", "v_scale.{i}"), and metadata naming the format and its version, the policy, the
model (its config, dtype and a hash of its weights), the length, a checksum of the tensors and the caller's
notes (`info`). Writes are atomic: a temp file in the same folder, synced, then renamed over the path, so an
interrupted save leaves the old file or the new one. Reading checks the header before any tensor is read, and
the checksum as the tensors stream in.

This module knows the format, not the Session that uses it (momjax.session).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from momjax.errors import SessionError
from momjax.policy import MemoryPolicy

FORMAT = "momjax-session"
FORMAT_VERSION = 1
# safetensors dtype names of the tensors a session file holds
DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
          "I32": np.dtype(np.int32), "I8": np.dtype(np.int8)}


def fingerprint(model) -> dict:
    """What a session file records of the model it belongs to: config, dtype and a hash of the weights."""
    return dict(config=model.config.to_json(), dtype=np.dtype(model.dtype).name, weights=model.weights_hash())


def describe_difference(saved: dict, current: dict) -> str:
    """What differs between two fingerprints, in words, for an error message."""
    if saved.get("config") != current["config"]:
        a, b = saved.get("config") or {}, current["config"]
        fields = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        shown = ", ".join(f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in fields[:4])
        return f"another model architecture ({shown}{', ...' if len(fields) > 4 else ''})"
    if saved.get("dtype") != current["dtype"]:
        return f"the model in {saved.get('dtype')}, not {current['dtype']} (load the model with that dtype)"
    return "a model with the same architecture but other weights"


def layer_tensors(num_kv_heads: int, head_dim: int, dtype, quantized: bool, n: int) -> list[tuple[str, tuple, np.dtype]]:
    """The tensors a file holds per layer for K (and alike for V), for n tokens: (name suffix, shape, dtype)."""
    shape = (1, num_kv_heads, n, head_dim)
    if quantized:
        return [("", shape, np.dtype(np.int8)), ("_scale", shape[:3], np.dtype(np.float32))]
    return [("", shape, np.dtype(dtype))]


def _hash_tensor(h, name: str, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr)
    h.update(f"{name}:{arr.shape}:{arr.dtype};".encode())
    h.update(arr.view(np.uint8).reshape(-1).data)


def checksum(tensors: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        _hash_tensor(h, name, tensors[name])
    return h.hexdigest()


def is_session_file(path: str) -> bool:
    """Whether path holds a momjax session file (a safetensors header naming the format; tensors not read)."""
    try:
        meta, _ = _safetensors_header(path)
    except (SessionError, OSError):
        return False
    return meta.get("format") == FORMAT


def check_writable(path: str, what: str = "session file") -> str:
    """The absolute path a session may be written to, or a SessionError saying why not, before any work is done:
    a folder, a missing or read-only parent folder, a read-only file, or a file that is not a momjax session
    (momjax never replaces a file it did not write). `what` names the path in the message (e.g. an option)."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    folder = os.path.dirname(path)
    if os.path.isdir(path):
        raise SessionError(f"{what} {path} is a folder; give a file name")
    if not os.path.isdir(folder):
        raise SessionError(f"{what} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or not _can_create(folder):
        raise SessionError(f"{what} {path}: folder {folder} is not writable")
    if os.path.lexists(path):
        if os.path.islink(path) or not os.path.isfile(path):
            raise SessionError(f"{what} {path} is not a regular file; momjax writes sessions to new files or over "
                               "its own session files only")
        if not is_session_file(path):
            raise SessionError(f"{what} {path} exists and is not a momjax session file; momjax never replaces a "
                               "file it did not write. Choose another file name")
        if not os.access(path, os.W_OK):
            raise SessionError(f"{what} {path} is read-only")
    return path


def _can_create(folder: str) -> bool:
    """True when a file can be created in folder (os.access alone says yes on a read-only mount for root)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _remove_stale_temps(folder: str, name: str) -> None:
    """Remove the temp files of earlier saves to the same name that were killed midway (`.NAME.*.tmp` whose lock is
    free); a save in progress holds its temp file's lock, and its file is left alone."""
    for other in os.listdir(folder):
        if not (other.startswith(f".{name}.") and other.endswith(".tmp")):
            continue
        stale = os.path.join(folder, other)
        try:
            fd = os.open(stale, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(stale)
        except OSError:  # locked: another save is writing it
            pass
        finally:
            os.close(fd)


def write(path: str, tensors: dict[str, np.ndarray], policy: MemoryPolicy, model_fingerprint: dict,
          info: dict) -> None:
    """Write a session file at path, atomically. tensors: "tokens" and the per-layer K/V (see the module). A path
    that exists and is not a momjax session file is never replaced (check_writable)."""
    from safetensors.numpy import save_file

    path = check_writable(path)
    folder = os.path.dirname(path)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "policy": json.dumps(dataclasses.asdict(policy)),
        "model": json.dumps(model_fingerprint),
        "length": str(len(tensors["tokens"])),
        "checksum": checksum(tensors),
    }
    try:
        metadata["info"] = json.dumps(info)
    except TypeError as e:
        raise SessionError(f"session.info must hold JSON values only: {e}") from None
    _remove_stale_temps(folder, os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # this save is in progress: a later save must not take it for stale
        save_file(tensors, tmp, metadata=metadata)  # straight to the file: no second copy in memory
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private, and so does safetensors: the usual permissions
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # on disk before the rename, so a crash leaves the old file or the new one
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Header:
    """A session file's metadata, read and checked without reading its tensors."""

    path: str
    model: dict  # the fingerprint of the model that wrote it
    policy: MemoryPolicy
    length: int
    checksum: str
    info: dict
    tensors: dict  # name -> (shape, dtype)


def read_header(path: str) -> Header:
    """The header of a session file; SessionError if it is missing, truncated, not safetensors, not a momjax
    session, of another format version, or has damaged metadata."""
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise SessionError(f"session file {path} does not exist")
    meta, names = _safetensors_header(path)
    where = f"session file {path}"
    if meta.get("format") != FORMAT:
        raise SessionError(f"{where} is not a momjax session file (no '{FORMAT}' header)")
    version = meta.get("format_version", "?")
    if version != str(FORMAT_VERSION):
        raise SessionError(f"{where} has format version {version}; this momjax reads version {FORMAT_VERSION} "
                           "(save the session again with this version)")
    try:
        info = json.loads(meta.get("info", "{}"))
        return Header(path=path, model=json.loads(meta["model"]), policy=MemoryPolicy(**json.loads(meta["policy"])),
                      length=int(meta["length"]), checksum=meta["checksum"],
                      info=info if isinstance(info, dict) else {}, tensors=names)
    except (KeyError, ValueError, TypeError) as e:
        raise SessionError(f"{where} has damaged metadata ({e}); save the session again") from None


def _safetensors_header(path: str) -> tuple[dict, dict]:
    """(metadata, {name: (shape, dtype)}) of a safetensors file; SessionError if it is truncated or not one."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="np") as f:
            meta = f.metadata() or {}
            names, stored = {}, f.keys()  # safe_open has keys(), not dict iteration
            for name in stored:
                sl = f.get_slice(name)
                names[name] = (tuple(sl.get_shape()), DTYPES.get(sl.get_dtype()))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for truncated or garbled files
        message = " ".join(str(e).split()) or type(e).__name__
        raise SessionError(f"session file {path} is truncated or not a safetensors file ({message}); "
                           "save the session again") from None
    return meta, names


def read_tensors(header: Header, names) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) of the named tensors, one at a time, in sorted order; the checksum (over every tensor the
    file holds) is checked once the last has been read. SessionError for a truncated or corrupted file."""
    from safetensors import safe_open

    where = f"session file {header.path}"
    h = hashlib.sha256()
    try:
        with safe_open(header.path, framework="np") as f:
            for name in sorted(names):
                t = f.get_tensor(name)
                _hash_tensor(h, name, t)
                yield name, t
    except SessionError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types for data that is cut short
        raise SessionError(f"{where} is truncated or damaged ({' '.join(str(e).split())}); save the session "
                           "again") from None
    if h.hexdigest() != header.checksum:
        raise SessionError(f"{where} is corrupted (its checksum does not match its contents)")
