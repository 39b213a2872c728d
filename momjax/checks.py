"""Inputs checked once, at the public boundary, into values the layers below take as they are.

The public functions (momjax.api, momjax.Session, momjax.memory) call these on what a user passes and hand the
checked values down: prompts as lists of ints, a `Sampling`, a MemoryPolicy (momjax.policy.get_policy). Each
failure is an InputError that says what was wrong and what to do.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from momjax.errors import InputError


def is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def scalar(x):
    """A 0-d numpy/JAX array as its Python value (so jnp.float32(0.7) is accepted like 0.7)."""
    if hasattr(x, "ndim") and hasattr(x, "item") and x.ndim == 0:
        return x.item()
    return x


def _is_array(x) -> bool:
    return isinstance(x, np.ndarray) or type(x).__module__.startswith("jax")


_NOT_SEQUENCES = (str, bytes, dict, set, frozenset)


def prompts(tokens, vocab_size: int) -> list[list[int]]:
    """A [B, S] array, a list of token lists (lengths may differ) or one flat list -> list of int lists."""
    if tokens is None or isinstance(tokens, _NOT_SEQUENCES) or is_real(tokens) or isinstance(tokens, bool):
        hint = " (tokenize the text first)" if isinstance(tokens, (str, bytes)) else ""
        raise InputError(f"tokens must be a [batch, length] array or a list of token id lists, got "
                         f"{type(tokens).__name__}{hint}")
    if _is_array(tokens):
        arr = np.asarray(tokens)
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2:
            raise InputError(f"tokens must be [batch, length] integers, got shape {arr.shape}")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise InputError(f"tokens must be integers, got dtype {arr.dtype}")
        rows = [list(map(int, row)) for row in arr]
    else:
        rows = _rows_of_lists(tokens)
    if not rows:
        raise InputError("no prompts given: pass at least one non-empty list of token ids")
    for b, p in enumerate(rows):
        if not p:
            raise InputError(f"prompt {b} is empty: give at least one token (e.g. the BOS token)")
        bad = [t for t in p if t < 0 or t >= vocab_size]
        if bad:
            raise InputError(f"prompt {b} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}; "
                             "was it tokenized with this model's tokenizer?")
    return rows


def _rows_of_lists(tokens) -> list[list[int]]:
    try:
        tokens = list(tokens)
    except TypeError:
        raise InputError(f"tokens must be a list of token ids or a list of such lists, got "
                         f"{type(tokens).__name__}") from None
    if tokens and not any(isinstance(t, (list, tuple)) or (_is_array(t) and np.ndim(t)) for t in tokens):
        tokens = [tokens]  # one flat prompt
    rows = []
    for row in tokens:
        if not isinstance(row, (list, tuple)) and not _is_array(row):
            raise InputError("tokens must be a list of token ids or a list of such lists")
        if _is_array(row):
            a = np.asarray(row)
            if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
                raise InputError(f"each prompt must be a 1-D array of integer token ids, got shape {a.shape} "
                                 f"and dtype {a.dtype}")
            row = a.tolist()
        row = [scalar(t) for t in row]  # 0-d numpy/JAX integers count as ids
        if not all(is_int(t) for t in row):
            raise InputError("tokens must be integer token ids (not booleans, floats or text; tokenize the text "
                             "first)")
        rows.append([int(t) for t in row])
    return rows


def new_tokens(n, name: str = "max_new_tokens") -> int:
    """A positive number of tokens to generate."""
    n = scalar(n)
    if not is_int(n) or n < 1:
        raise InputError(f"{name} must be a positive integer, got {n!r}")
    return int(n)


def callback(on_layer) -> None:
    if on_layer is not None and not callable(on_layer):
        raise InputError(f"on_layer must be a function of the layer index or None, got {on_layer!r}")


def context(max_context, prompt_len: int, new: int = 0, what: str = "prompt") -> None:
    """Refuse prompt + new tokens beyond the model's max_context (model.max_context)."""
    if not is_int(max_context) or max_context < 1:
        raise InputError(f"model.max_context must be a positive integer, got {max_context!r}")
    total = prompt_len + new
    if total > max_context:
        raise InputError(
            f"{what} ({prompt_len} tokens) + max_new_tokens ({new}) = {total} exceeds the model's context of "
            f"{max_context} tokens; shorten the prompt, or set model.max_context = {total} (Python) or pass "
            "--allow-long-context (command line) to allow it (beyond the trained length outputs may degrade)")


@dataclass(frozen=True)
class Sampling:
    """Checked sampling settings. top_k 0 and top_p 1 mean off; stop_ids are the tokens that end a row (the first
    is also the padding of rows that stopped; 0 when there is none)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: tuple[int, ...] = ()

    @property
    def pad_id(self) -> int:
        return self.stop_ids[0] if self.stop_ids else 0

    def program_args(self) -> tuple:
        """(key, temperature, top_k, top_p, stop_ids, pad_id) as the decode programs take them. top_k is a Python
        int (static in the programs: each value compiles once); stop_ids has a fixed length (-1 padded) so
        different stop lists share one compiled program."""
        import jax
        import jax.numpy as jnp

        stop = np.full(max(8, len(self.stop_ids)), -1, np.int32)
        stop[: len(self.stop_ids)] = self.stop_ids
        return (jax.random.PRNGKey(self.seed), jnp.float32(self.temperature), self.top_k, jnp.float32(self.top_p),
                jnp.asarray(stop), jnp.int32(self.pad_id))


def sampling(vocab_size: int, eos_ids, temperature=0.0, top_k=None, top_p=None, seed=0, stop_tokens=None) -> Sampling:
    """Checked sampling settings. stop_tokens: None = the checkpoint's EOS ids (eos_ids); [] = never stop early."""
    temperature, top_k, top_p, seed = map(scalar, (temperature, top_k, top_p, seed))
    if not is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise InputError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (not is_int(top_k) or top_k < 1):
        raise InputError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and (not is_real(top_p) or not 0 < top_p <= 1):  # NaN fails the comparison too
        raise InputError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    if not is_int(seed) or not -(2**63) <= seed < 2**63:
        raise InputError(f"seed must be an integer in [-2**63, 2**63), got {seed!r}")
    if stop_tokens is None:
        stops = list(eos_ids)
    else:
        if _is_array(stop_tokens):
            stop_tokens = np.asarray(stop_tokens).tolist() if np.ndim(stop_tokens) == 1 else stop_tokens
        if not isinstance(stop_tokens, (list, tuple, range)) or not all(is_int(t) for t in stop_tokens):
            raise InputError(f"stop_tokens must be a list of integer token ids ([] never stops early) or None (the "
                             f"checkpoint's EOS ids), got {stop_tokens!r}")
        stops = [int(t) for t in stop_tokens]
        bad = [t for t in stops if not 0 <= t < vocab_size]
        if bad:
            raise InputError(f"stop_tokens outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    if temperature == 0 and (top_k is not None or top_p is not None):
        warnings.warn("top_k and top_p only matter when sampling; with temperature 0 (greedy) they are ignored. "
                      "Pass a temperature > 0 to sample", UserWarning, stacklevel=3)
    top_k = 0 if top_k is None or top_k >= vocab_size else int(top_k)  # top_k >= V keeps every token: off
    return Sampling(float(temperature), top_k, 1.0 if top_p is None else float(top_p), int(seed), tuple(stops))


def memory_request(**args) -> None:
    """InputError for an argument of memory_report or plan that has no meaning: a length, batch or budget that is
    not a positive number, a dtype momjax does not run in, an unknown phase."""
    import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy

    from momjax.config import SUPPORTED_DTYPES
    from momjax.policy import KV_DTYPES
    from momjax.units import parse_bytes

    def count(x):
        return is_int(x) and x >= 1

    for name in ("seq_len", "batch", "new_tokens"):
        if name in args and not count(args[name]):
            raise InputError(f"{name} must be a positive integer, got {args[name]!r}")
    if args.get("context") is not None and not count(args["context"]):
        raise InputError(f"context must be a positive number of tokens, got {args['context']!r}")
    if args.get("kv_dtype") not in KV_DTYPES:
        raise InputError(f"kv_dtype must be None (the model's dtype) or 'int8', got {args['kv_dtype']!r}")
    if "dtype" in args:
        try:
            dtype = np.dtype(args["dtype"]).name
        except TypeError:
            dtype = None
        if dtype not in SUPPORTED_DTYPES:
            raise InputError(f"dtype must be one of {', '.join(SUPPORTED_DTYPES)}, got {args['dtype']!r}")
    if "phase" in args and args["phase"] not in ("prefill", "decode"):
        raise InputError(f"phase must be 'prefill' or 'decode', got {args['phase']!r}")
    if "source" in args and args["source"] not in ("auto", "xla", "estimate"):
        raise InputError(f"source must be 'auto', 'xla' or 'estimate', got {args['source']!r}")
    for name, minimum in (("hbm_bytes", 1), ("host_bytes", 0)):
        value = args.get(name)
        if name not in args or value is None:  # None: no host limit, or (hbm) the target's memory
            continue
        if isinstance(value, bool) or (isinstance(value, (int, float, np.number))
                                       and (not math.isfinite(value) or value < minimum)):
            raise InputError(f"{name} must be a size of at least {minimum} bytes, got {value!r}")
        if parse_bytes(value) < minimum:
            raise InputError(f"{name} must be a size of at least {minimum} bytes, got {value!r}")


def devices(n) -> int:
    """A tensor-parallel degree for plans and reports: a positive number of devices."""
    if not is_int(n) or n < 1:
        raise InputError(f"devices must be a positive number of devices, got {n!r}")
    return int(n)
