"""Keep a CUDA-enabled JAX quiet on a machine without a GPU, before jax is imported.

With `momjax[gpu-plan]` (or `jax[cuda12]`, or jax's CUDA 13 plugin) installed and no NVIDIA driver, importing jax prints absl
lines such as "Could not find cuda drivers on your machine", and the first use of jax prints a
traceback ("Unable to load CUDA. Is it installed?") before falling back to the CPU. Neither means
anything is wrong for momjax: the CUDA plugin is there to compile for a GPU target without a GPU
(momjax.targets). So when the plugin is installed, no driver can be loaded and the user chose no
platform, momjax imports jax with those lines filtered out and selects the CPU platform explicitly,
which also keeps jax from ever picking a GPU backend that is not there. On a machine with a GPU, or
when JAX_PLATFORMS is set, nothing changes.

This module must not import jax at module level: `momjax/__init__.py` calls `prepare()` first.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import re
import sys
import tempfile

# The lines jaxlib's CUDA libraries print when there is no driver; nothing else is ever dropped.
_NO_DRIVER_NOISE = re.compile(
    r"(cudart_stub\.cc.*Could not find cuda drivers)|(All log messages before absl::InitializeLog\(\) is called)"
)


CUDA_PLUGINS = ("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")


def cuda_plugin() -> str | None:
    """The module name of JAX's CUDA plugin (CUDA 12 or 13) when one is installed, found without importing it."""
    for name in CUDA_PLUGINS:
        try:
            if importlib.util.find_spec(name) is not None:
                return name
        except (ImportError, ValueError):
            continue
    return None


def cuda_plugin_installed() -> bool:
    """Whether a JAX CUDA plugin is importable."""
    return cuda_plugin() is not None


def gpu_driver_present() -> bool:
    """Whether the NVIDIA driver library loads: without it no CUDA device can exist on this machine."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def without_gpu() -> bool:
    return cuda_plugin_installed() and not gpu_driver_present()


@contextlib.contextmanager
def filtered_stderr(also: re.Pattern | None = None):
    """Capture file descriptor 2 (where the C++ libraries write), then pass on every line but the noise.

    The noise: the no-driver lines (when the CUDA plugin is installed without a driver), and lines matching
    `also`. A no-op when there is nothing to filter.
    """
    noise = [p for p in (_NO_DRIVER_NOISE if without_gpu() else None, also) if p is not None]
    if not noise:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode(errors="replace").splitlines(keepends=True)
                    if not any(p.search(line) for p in noise)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def prepare() -> None:
    """Import jax quietly and pin the CPU platform when the CUDA plugin is installed without a GPU driver."""
    if not without_gpu():
        return
    with filtered_stderr():
        import jax
    from jax._src import xla_bridge

    chosen = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms
    # libtpu beside the CUDA plugin: the TPU may be real, so leave the choice to jax.
    if chosen or xla_bridge.backends_are_initialized() or importlib.util.find_spec("libtpu") is not None:
        return
    jax.config.update("jax_platforms", "cpu")
    # Registering the plugin loads its libraries, which print the same lines again: do it now, filtered,
    # rather than at jax's first use. Registration creates no backend (jax_num_cpu_devices and the like
    # can still be set). _discover_and_register_pjrt_plugins runs once and is jax's own lazy first step.
    register = getattr(xla_bridge, "_discover_and_register_pjrt_plugins", None)
    if register is not None:
        with filtered_stderr():
            register()
