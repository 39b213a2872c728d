"""Convert a Hugging Face safetensors checkpoint folder, or a GGUF file, into a momjax Orbax folder.

The conversion streams: tensors are read one at a time, cast, and assembled into one leaf at a time,
which is written to its own Orbax checkpoint and freed before the next leaf starts. Peak memory is about
the largest leaf plus Orbax's write buffers, never the whole model (benchmarks/convert_rss.py measures
it). All names, shapes and file sizes are checked from the safetensors headers before any data is read.
A GGUF file (momjax/gguf.py) converts the same way, its tensors dequantized a block of rows at a time, and
the tokenizer its metadata describes is written beside the params (tokenizer.json, tokenizer_config.json).

The converter never destroys or half-writes anything:
- DST may not be SRC, lie inside SRC or contain SRC, compared after resolving symbolic links (and by
  inode, for bind mounts), whatever the flags.
- An existing DST is replaced only with `--force`, and only when it is a previous momjax conversion
  (momjax_config.json, params/ and the files a conversion copies, nothing else); any other folder needs
  `--force --replace-any-folder`.
- The result is written into `.DST.momjax-partial-<pid>` beside DST, locked by a `.lock` file next to
  it, and moved to DST with one rename that fails if DST appeared meanwhile (renameat2 RENAME_NOREPLACE,
  or RENAME_EXCHANGE when replacing). A partial folder whose lock is free belongs to a killed run and is
  removed by the next conversion to DST; one whose lock is held means a conversion to DST is running.
- SIGINT and SIGTERM are deferred while Orbax writes a leaf (its threads would keep writing after a
  cleanup) and raised as soon as the write ends; the partial folder is then removed.
- Tokenizer files that are symbolic links to a place outside SRC are not copied (a Hub cache snapshot's
  links into its own blobs/ folder are fine).

    momjax convert SRC DST [--dtype float32|bfloat16|float16] [--force [--replace-any-folder]] [--verify]

SRC: a Hugging Face checkpoint folder (config.json + *.safetensors) or a .gguf file.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time

import numpy as np

from momjax.checkpoint import CONFIG_FILE, PARAMS_DIR, CheckpointError, stream_hf_leaves, write_orbax
from momjax.config import SUPPORTED_DTYPES, Config, ConfigError

# Files copied next to the params when present: everything a tokenizer or generation config may need.
COPIED_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json",
)
VERIFY_TOKENS = 8
PARTIAL = ".momjax-partial-"  # .DST.momjax-partial-<pid> (folder) and .DST.momjax-partial-<pid>.lock


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived during a conversion; everything it wrote has been removed."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


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
    with _Signals() as signals, contextlib.ExitStack() as stack:
        with signals.allowed():
            gguf_src = os.path.isfile(src)
            if gguf_src:
                from momjax import gguf

                cfg, leaves = gguf.stream_gguf_leaves(src, dtype, progress, desc="converting")  # checks the header
                copies = []
            else:
                cfg = Config.from_folder(src)
                leaves = stream_hf_leaves(src, cfg, dtype or cfg.dtype, progress, desc="converting")  # checks headers
                copies = _files_to_copy(src)
            dtype = dtype or cfg.dtype
            # Closed on the way out even when interrupted between leaves, so the progress bar ends before any
            # message is printed.
            stack.callback(getattr(leaves, "close", lambda: None))
        with _staged_output(dst, force, replace_any, signals) as tmp, _quiet_orbax_thread_errors():
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
                raise CheckpointError(f"cannot write {dst}: {_os_reason(e)}") from None
            except Exception as e:
                if reader.failed:  # a bug or bad data while reading: not a write failure, keep its traceback
                    raise
                # Orbax/tensorstore wrap a failed write (disk full, read-only, quota) in their own types.
                code = re.search(r"os_error_code='?(\d+)", str(e))
                reason = f"{os.strerror(int(code.group(1)))} (errno {code.group(1)})" if code else _short(e)
                raise CheckpointError(f"cannot write {dst}: {reason}; check free space and permissions") from None
    return dst


def _write_gguf_tokenizer(src: str, folder: str) -> None:
    """The tokenizer a GGUF file's metadata describes, written as tokenizer files into folder. A file whose
    tokenizer transformers cannot build still converts (the weights are fine); that is said on stderr."""
    from momjax import gguf
    from momjax.tokenizer import TokenizerError

    try:
        gguf.save_tokenizer(src, folder, COPIED_FILES)
    except TokenizerError as e:
        print(f"momjax: no tokenizer written: {' '.join(str(e).split())}", file=sys.stderr)


def verify_conversion(src: str, converted: str, dtype: str) -> None:
    """Exactly equal float32 logits of a short forward pass from src (cast to dtype) and the converted folder."""
    import momjax

    if os.path.isfile(src):
        from momjax import gguf

        cfg = gguf.read_config(src)
    else:
        cfg = Config.from_folder(src)
    tokens = (np.arange(1, VERIFY_TOKENS + 1, dtype=np.int64) * 7919 % cfg.vocab_size)[None]
    model = momjax.load(src, dtype=dtype, progress=False)
    expected = np.asarray(momjax.forward(model, tokens))
    del model  # one model in memory at a time
    got = np.asarray(momjax.forward(momjax.load(converted, progress=False), tokens))
    if got.shape != expected.shape or not np.array_equal(got, expected):
        diff = float(np.max(np.abs(got - expected))) if got.shape == expected.shape else float("inf")
        raise CheckpointError(f"verification failed: logits from {src} and its conversion differ by up to {diff:g}; "
                              "the converted folder was not kept. Please report this as a momjax bug")


# ---------------------------------------------------------------------- paths


def _check_paths(src, dst) -> tuple[str, str]:
    """(src, dst) as absolute paths, after refusing any overlap between them."""
    for name, value in (("SRC", src), ("DST", dst)):
        if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
            raise CheckpointError(f"{name} must be a folder path, got {value!r}")
    src, dst = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(dst))
    if os.path.isfile(src):
        from momjax import gguf

        if not gguf.is_gguf(src):
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
    (~/.ssh/id_rsa) must not be copied into a folder the user may share."""
    src_real = os.path.realpath(src)
    roots = [src_real]
    if os.path.basename(os.path.dirname(src)) == "snapshots":
        roots.append(os.path.realpath(os.path.join(os.path.dirname(os.path.dirname(src)), "blobs")))
    copies, refused = [], []
    for name in COPIED_FILES:
        path = os.path.join(src, name)
        if not os.path.isfile(path):
            continue
        real = os.path.realpath(path)
        if not any(os.path.commonpath([real, root]) == root for root in roots):
            refused.append(name)
            continue
        copies.append((name, path))
    if refused:
        print(f"momjax: not copying {', '.join(refused)}: symbolic link to a file outside {src}", file=sys.stderr)
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


# ---------------------------------------------------------------------- signals


class _Signals:
    """SIGINT/SIGTERM handling for one conversion: raise `Interrupted` at once where that is safe (reading
    tensors, copying files, verifying), otherwise remember it and raise it when the unsafe part ends (an
    Orbax save, whose threads would keep writing into a folder being removed; the final rename; cleanup)."""

    def __init__(self):
        self.safe = False
        self.pending: int | None = None
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        return False

    def _handle(self, signum, frame):
        if self.pending is None:
            self.pending = signum
        if self.safe:
            self.raise_pending()

    def raise_pending(self):
        if self.pending is not None:
            self.safe = False  # a second signal must not interrupt the cleanup this one starts
            raise Interrupted(self.pending)

    @contextlib.contextmanager
    def allowed(self):
        self.raise_pending()
        self.safe = True
        try:
            yield
        finally:
            self.safe = False
        self.raise_pending()


class _Reader:
    """Iterates the leaves for write_orbax, allowing interrupts only while a leaf is being read."""

    def __init__(self, leaves, signals: _Signals):
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


# ---------------------------------------------------------------------- the destination


def _is_momjax_output(path: str) -> tuple[bool, list[str]]:
    """(True, []) for a folder holding a previous conversion and nothing else; else (False, what is foreign)."""
    if os.path.islink(path) or not os.path.isdir(path):
        return False, ["it is not a folder"]
    try:
        names = os.listdir(path)
    except OSError as e:
        return False, [f"it cannot be listed ({_os_reason(e)})"]
    if not (os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isdir(os.path.join(path, PARAMS_DIR))):
        return False, [f"it has no {CONFIG_FILE} and {PARAMS_DIR}/"]
    foreign = sorted(set(names) - {CONFIG_FILE, PARAMS_DIR, *COPIED_FILES})
    return not foreign, [f"it also holds {', '.join(foreign[:5])}"] if foreign else []


def _check_replaceable(dst: str, force: bool, replace_any: bool) -> bool:
    """True when dst exists (and may be replaced); raises when it exists and may not."""
    if not os.path.lexists(dst):
        return False
    if not force:
        raise CheckpointError(f"{dst} already exists; pass --force (force=True) to replace a previous momjax "
                              "conversion, or choose another destination")
    ours, why = _is_momjax_output(dst)
    if not ours and not replace_any:
        raise CheckpointError(f"{dst} exists and is not a momjax conversion ({'; '.join(why)}); --force only "
                              "replaces a previous momjax output. Choose another destination, or pass --force "
                              "--replace-any-folder to delete it")
    return True


_LIBC = None


def _renameat2(old: str, new: str, flags: int) -> bool:
    """renameat2(2) (Linux): True if done; False if unavailable here; raises OSError on failure."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
        except OSError:
            _LIBC = False
    fn = getattr(_LIBC, "renameat2", None) if _LIBC else None
    if fn is None:
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(old), at_fdcwd, os.fsencode(new), ctypes.c_uint(flags)) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL):  # old kernel or a filesystem without it
        return False
    raise OSError(err, os.strerror(err), new)


def _rename_noreplace(tmp: str, dst: str) -> None:
    if not _renameat2(tmp, dst, 1):  # RENAME_NOREPLACE
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "exists", dst)
        os.rename(tmp, dst)  # rename onto a non-empty folder fails anyway; the window is an empty folder


def _exchange(tmp: str, dst: str) -> None:
    """Atomically swap tmp and dst (the old dst ends up at tmp), or move dst aside and tmp in."""
    if _renameat2(tmp, dst, 2):  # RENAME_EXCHANGE
        return
    aside = tmp + ".old"
    os.rename(dst, aside)
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(aside, dst)
        raise
    os.rename(aside, tmp)


def _remove(path: str, quiet_s: float = 0.5, patience_s: float = 15.0) -> None:
    """Remove a file or folder tree. A writer thread that has not yet noticed a failed write may add files
    (and recreate folders) after a removal, so once something was removed the path must stay absent for
    quiet_s before this returns (retrying for up to patience_s). A path that was never there returns at once."""
    if not os.path.lexists(path):
        return
    deadline = time.monotonic() + patience_s
    absent_since = None
    while time.monotonic() < deadline:
        if os.path.lexists(path):
            absent_since = None
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.remove(path)
        elif absent_since is None:
            absent_since = time.monotonic()
        elif time.monotonic() - absent_since >= quiet_s:
            return
        time.sleep(0.05)


def _clear_stale(parent: str, base: str) -> None:
    """Remove partial folders of killed conversions to DST; refuse if a conversion to DST is running."""
    prefix = f".{base}{PARTIAL}"
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for folder in sorted({n.removesuffix(".lock") for n in names if n.startswith(prefix)}):
        tmp, lock = os.path.join(parent, folder), os.path.join(parent, folder + ".lock")
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            fd = None  # the lock is created before the folder and removed after it: a killed run's leftover
        except OSError as e:
            raise CheckpointError(f"cannot inspect {lock}: {_os_reason(e)}") from None
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    pid = folder.rsplit("-", 1)[-1]
                    raise CheckpointError(f"another conversion into {os.path.join(parent, base)} is running "
                                          f"(process {pid}); wait for it or choose another destination") from None
            _remove(tmp)
            _remove(lock)
        finally:
            if fd is not None:
                os.close(fd)
        if os.path.lexists(tmp):
            raise CheckpointError(f"{tmp} was left by an interrupted conversion and cannot be removed; remove it "
                                  "yourself, then run the conversion again")
        print(f"momjax: removed {tmp}, left by an interrupted conversion", file=sys.stderr)


@contextlib.contextmanager
def _staged_output(dst: str, force: bool, replace_any: bool, signals: _Signals):
    """Yield a fresh locked folder beside dst; move it to dst when the block succeeds; on any failure or
    interrupt remove it (and any parent folders created for it). Not interruptible except inside the block's
    own `signals.allowed()` parts."""
    parent, base = os.path.split(dst)
    exists = _check_replaceable(dst, force, replace_any)
    created = _make_parents(parent)
    tmp = os.path.join(parent, f".{base}{PARTIAL}{os.getpid()}")
    lock = tmp + ".lock"
    fd = None
    try:
        try:
            _clear_stale(parent, base)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.mkdir(tmp)
        except OSError as e:
            raise CheckpointError(f"cannot write into {parent}: {_os_reason(e)}; choose a writable destination"
                                  ) from None
        yield tmp
        signals.raise_pending()  # one that arrived during the last unsafe write: discard rather than commit
        try:
            if exists:
                exists = _check_replaceable(dst, force, replace_any)  # it may have changed meanwhile
            if exists:
                _exchange(tmp, dst)  # the old dst is now at tmp and is removed below
            else:
                _rename_noreplace(tmp, dst)
        except FileExistsError:
            raise CheckpointError(f"{dst} appeared while converting (another process wrote it); it was left as "
                                  "it is and this conversion was discarded") from None
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise CheckpointError(f"{dst} appeared while converting (another process wrote it); it was left "
                                      "as it is and this conversion was discarded") from None
            raise CheckpointError(f"cannot move the conversion to {dst}: {_os_reason(e)}") from None
    except BaseException:
        signals.safe = False
        _remove(tmp)
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise
    finally:
        _remove(tmp)  # after a replace: the old dst
        if fd is not None:
            _remove(lock)
            os.close(fd)


@contextlib.contextmanager
def staged_folder(dst: str, force: bool = False, replace_any: bool = False):
    """The converter's destination handling for other writers (checkpoint.save_orbax): yield a fresh folder
    beside dst, moved to dst when the block succeeds and removed otherwise; an existing dst is replaced only
    with force and, unless replace_any, only when it is a previous momjax output. Signals are not deferred."""
    dst = os.path.abspath(os.fspath(dst))
    if os.path.islink(dst):
        raise CheckpointError(f"the destination {dst} is a symbolic link; pass the real path of a new folder")
    with _staged_output(dst, force, replace_any, _Signals()) as tmp:
        yield tmp


def _make_parents(parent: str) -> list[str]:
    """Create parent's missing folders, outermost first; returns those created (removed again on failure)."""
    missing = []
    p = parent
    while not os.path.isdir(p):
        if os.path.lexists(p):
            raise CheckpointError(f"{p} is a file, not a folder; choose another destination")
        missing.append(p)
        p = os.path.dirname(p)
    created = []
    for folder in reversed(missing):
        try:
            os.mkdir(folder)
        except OSError as e:
            for done in reversed(created):
                with contextlib.suppress(OSError):
                    os.rmdir(done)
            raise CheckpointError(f"cannot create {folder}: {_os_reason(e)}; choose a writable destination") from None
        created.append(folder)
    return created


def _os_reason(e: OSError) -> str:
    return e.strerror or str(e)


def _short(e: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors raised (and reported in one line by main), not printed over two."""

    def error(self, message):
        raise CheckpointError(f"{message} (see {self.prog} --help)")


def main(argv: list[str] | None = None, prog: str = "momjax convert") -> int:
    """Command line: convert SRC DST. Exit 0 on success, 2 on bad input or a failed write (one line on stderr),
    130 on SIGINT and 143 on SIGTERM (one line; nothing is left behind)."""
    parser = _Parser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("src", metavar="SRC",
                        help="Hugging Face checkpoint folder (config.json + *.safetensors) or a .gguf file")
    parser.add_argument("dst", metavar="DST", help="Orbax folder to create")
    parser.add_argument("--dtype", choices=SUPPORTED_DTYPES, default=None,
                        help="dtype to store (default: the checkpoint's torch_dtype; for GGUF its float type, or "
                             "float32 when quantized)")
    parser.add_argument("--force", action="store_true", help="replace DST if it is a previous momjax conversion")
    parser.add_argument("--replace-any-folder", action="store_true",
                        help="with --force: replace DST whatever it holds (its contents are deleted)")
    parser.add_argument("--verify", action="store_true",
                        help="compare a short forward pass of SRC and DST (loads the model twice, one at a time)")
    parser.add_argument("--compile-cache", metavar="DIR", default=os.environ.get("MOMJAX_COMPILATION_CACHE"),
                        help="keep compiled programs (of --verify) in DIR across runs")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    from momjax.cli import UsageError, enable_compile_cache

    dst = None
    try:
        args = parser.parse_args(argv)
        dst = args.dst
        if args.compile_cache:
            enable_compile_cache(args.compile_cache)
        out = convert(args.src, args.dst, dtype=args.dtype, force=args.force, verify=args.verify,
                      progress=not args.quiet, replace_any=args.replace_any_folder)
    except (CheckpointError, ConfigError, UsageError) as e:
        print(f"momjax: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        name = signal.Signals(signum).name
        where = f" to {dst}" if dst else ""
        print(f"momjax: interrupted ({name}); nothing was written{where}", file=sys.stderr)
        return 128 + int(signum)
    print(f"wrote {out}" + (" (verified: logits equal)" if args.verify else ""))
    return 0
