"""Writing a folder so that nothing is ever destroyed or half-written: staging, locks, atomic renames, signals.

A writer gets a fresh folder `.DST.momjax-partial-<pid>` beside DST, locked by a `.lock` file next to it, and
the folder is moved to DST with one rename that fails if DST appeared meanwhile (renameat2 RENAME_NOREPLACE,
or RENAME_EXCHANGE when replacing). A partial folder whose lock is free belongs to a killed run and is removed
by the next writer to DST; one whose lock is held means a write to DST is running. An existing DST is
replaced only with `force`, and only when the caller's `is_ours(path)` says it holds a previous output (or
with `replace_any`). `Signals` defers SIGINT/SIGTERM while a write must not be cut short and raises them as
`Interrupted` once it may.

Used by the converter (momjax.convert) and by Orbax saving (momjax.store.orbax).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import os
import shutil
import signal
import sys
import threading
import time

from momjax.errors import CheckpointError

PARTIAL = ".momjax-partial-"  # .DST.momjax-partial-<pid> (folder) and .DST.momjax-partial-<pid>.lock


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived during a conversion; everything it wrote has been removed."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Signals:
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


def check_replaceable(dst: str, force: bool, replace_any: bool, is_ours) -> bool:
    """True when dst exists (and may be replaced); raises when it exists and may not. is_ours(path) -> (True, [])
    for a previous output of this writer, else (False, [what is foreign])."""
    if not os.path.lexists(dst):
        return False
    if not force:
        raise CheckpointError(f"{dst} already exists; pass --force (force=True) to replace a previous momjax "
                              "conversion, or choose another destination")
    ours, why = is_ours(dst)
    if not ours and not replace_any:
        raise CheckpointError(f"{dst} exists and is not a momjax conversion ({'; '.join(why)}); --force only "
                              "replaces a previous momjax output. Choose another destination, or pass --force "
                              "--replace-any-folder to delete it")
    return True


@functools.cache
def _libc():
    """The C library (for renameat2), or None where it cannot be loaded."""
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _renameat2(old: str, new: str, flags: int) -> bool:
    """renameat2(2) (Linux): True if done; False if unavailable here; raises OSError on failure."""
    fn = getattr(_libc(), "renameat2", None)
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


def remove(path: str, quiet_s: float = 0.5, patience_s: float = 15.0) -> None:
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
            raise CheckpointError(f"cannot inspect {lock}: {os_reason(e)}") from None
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    pid = folder.rsplit("-", 1)[-1]
                    raise CheckpointError(f"another conversion into {os.path.join(parent, base)} is running "
                                          f"(process {pid}); wait for it or choose another destination") from None
            remove(tmp)
            remove(lock)
        finally:
            if fd is not None:
                os.close(fd)
        if os.path.lexists(tmp):
            raise CheckpointError(f"{tmp} was left by an interrupted conversion and cannot be removed; remove it "
                                  "yourself, then run the conversion again")
        print(f"momjax: removed {tmp}, left by an interrupted conversion", file=sys.stderr)


@contextlib.contextmanager
def staged_output(dst: str, force: bool, replace_any: bool, signals: Signals, is_ours):
    """Yield a fresh locked folder beside dst; move it to dst when the block succeeds; on any failure or
    interrupt remove it (and any parent folders created for it). Not interruptible except inside the block's
    own `signals.allowed()` parts. is_ours: see check_replaceable."""
    parent, base = os.path.split(dst)
    exists = check_replaceable(dst, force, replace_any, is_ours)
    created = make_parents(parent)
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
            raise CheckpointError(f"cannot write into {parent}: {os_reason(e)}; choose a writable destination"
                                  ) from None
        yield tmp
        signals.raise_pending()  # one that arrived during the last unsafe write: discard rather than commit
        try:
            if exists:
                exists = check_replaceable(dst, force, replace_any, is_ours)  # it may have changed
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
            raise CheckpointError(f"cannot move the conversion to {dst}: {os_reason(e)}") from None
    except BaseException:
        signals.safe = False
        remove(tmp)
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise
    finally:
        remove(tmp)  # after a replace: the old dst
        if fd is not None:
            remove(lock)
            os.close(fd)


@contextlib.contextmanager
def staged_folder(dst: str, is_ours, force: bool = False, replace_any: bool = False):
    """staged_output for writers that defer no signals: yield a fresh folder beside dst, moved to dst when the
    block succeeds and removed otherwise; an existing dst is replaced only with force and, unless replace_any,
    only when is_ours(dst) says it is a previous output."""
    dst = os.path.abspath(os.fspath(dst))
    if os.path.islink(dst):
        raise CheckpointError(f"the destination {dst} is a symbolic link; pass the real path of a new folder")
    with staged_output(dst, force, replace_any, Signals(), is_ours) as tmp:
        yield tmp


def make_parents(parent: str) -> list[str]:
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
            raise CheckpointError(f"cannot create {folder}: {os_reason(e)}; choose a writable destination") from None
        created.append(folder)
    return created


def os_reason(e: OSError) -> str:
    return e.strerror or str(e)


def short(e: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
