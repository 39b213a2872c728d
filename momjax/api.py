"""The public API: load, forward, prefill, generate. Inputs are checked here, with errors that
say what is wrong and what to do, before anything reaches JAX."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from momjax import generation as G
from momjax.cache import KVCache, place_for_decode
from momjax.config import Config, MemoryPolicy
from momjax.config import get_policy as _get_policy
from momjax.params import Params


class InputError(ValueError):
    """A prompt or a generation request that momjax cannot run as given."""


@dataclass
class Model:
    """A loaded model: its config, its params pytree, and where it came from.

    max_context: the longest prompt + new tokens accepted; defaults to the config's
    max_position_embeddings. Set it higher (`model.max_context = 1_000_000`) to run past the length the
    model was trained for, knowing its outputs may degrade there.
    """

    config: Config
    params: Params
    path: str | None = None
    max_context: int = 0
    tokenizer_path: str | None = field(default=None, repr=False)

    def __post_init__(self):
        if not self.max_context:
            self.max_context = self.config.max_position_embeddings
        if self.tokenizer_path is None:
            self.tokenizer_path = self.path

    @property
    def dtype(self):
        return self.params.embed.dtype


def load(path: str, dtype: str | None = None, memory_kind: str = "device", progress: bool = True) -> Model:
    """Load a HF checkpoint folder (config.json + *.safetensors), an Orbax folder from convert/hf_to_orbax.py, or
    a GGUF file (llama.cpp's format: architectures llama and qwen2, dequantized to dtype; see momjax/gguf.py).

    dtype: "float32" | "bfloat16" | "float16" | None (the checkpoint's). memory_kind: "device" (the only
    placement the forward programs run from today; "pinned_host" is refused with an explanation).
    Weights holding NaN or inf (or overflowing float16) are refused with a CheckpointError.
    """
    from momjax import checkpoint

    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise InputError(f"path must be a checkpoint folder path, got {path!r}")
    path = os.fspath(path)
    if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
        raise InputError(f"dtype must be 'float32', 'bfloat16', 'float16' or None, got {dtype!r}")
    if memory_kind == "pinned_host":
        raise InputError("memory_kind='pinned_host' (weights in host memory) is not supported: the prefill and decode "
                         "programs read the weights from the device. Load with memory_kind='device' and keep long "
                         "prompts' KV cache on the host with policy='mom' or 'mom-stream'")
    if memory_kind != "device":
        raise InputError(f"memory_kind must be 'device', got {memory_kind!r}")
    if not isinstance(progress, bool):
        raise InputError(f"progress must be True or False, got {progress!r}")
    if os.path.isfile(path):
        from momjax import gguf

        cfg, params = gguf.load_gguf_params(path, dtype=dtype, memory_kind=memory_kind, progress=progress)
        return Model(config=cfg, params=params, path=path)
    if not os.path.isdir(path):
        raise checkpoint.CheckpointError(f"{path} is not a folder; pass a Hugging Face checkpoint folder, an "
                                         "Orbax folder written by convert/hf_to_orbax.py or a .gguf file")
    if checkpoint.is_orbax_folder(path):
        cfg, params = checkpoint.load_orbax(path, dtype=dtype, memory_kind=memory_kind)
    else:
        cfg = Config.from_folder(path)
        params = checkpoint.load_hf_params(path, cfg, dtype=dtype, memory_kind=memory_kind, progress=progress)
    return Model(config=cfg, params=params, path=path)


# ---------------------------------------------------------------------- input checks


def get_policy(policy) -> MemoryPolicy:
    if not isinstance(policy, (str, MemoryPolicy)):
        raise InputError(f"policy must be 'baseline', 'mom', 'mom-stream' or a MemoryPolicy, got {policy!r}")
    try:
        return _get_policy(policy)
    except ValueError as e:
        raise InputError(str(e)) from None


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def _scalar(x):
    """A 0-d numpy/JAX array as its Python value (so jnp.float32(0.7) is accepted like 0.7)."""
    if isinstance(x, (np.ndarray, jax.Array)) and x.ndim == 0:
        return x.item()
    return x


_ARRAYS = (np.ndarray, jax.Array)
_NOT_SEQUENCES = (str, bytes, dict, set, frozenset)


def check_prompts(model: Model, tokens) -> list[list[int]]:
    """A [B, S] array, a list of token lists (lengths may differ) or one flat list -> list of int lists."""
    if tokens is None or isinstance(tokens, _NOT_SEQUENCES) or _is_real(tokens) or isinstance(tokens, bool):
        hint = " (tokenize the text first)" if isinstance(tokens, (str, bytes)) else ""
        raise InputError(f"tokens must be a [batch, length] array or a list of token id lists, got "
                         f"{type(tokens).__name__}{hint}")
    if isinstance(tokens, _ARRAYS):
        arr = np.asarray(tokens)
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2:
            raise InputError(f"tokens must be [batch, length] integers, got shape {arr.shape}")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise InputError(f"tokens must be integers, got dtype {arr.dtype}")
        prompts = [list(map(int, row)) for row in arr]
    else:
        try:
            tokens = list(tokens)
        except TypeError:
            raise InputError(f"tokens must be a list of token ids or a list of such lists, got "
                             f"{type(tokens).__name__}") from None
        if tokens and not any(isinstance(t, (list, tuple)) or (isinstance(t, _ARRAYS) and t.ndim) for t in tokens):
            tokens = [tokens]  # one flat prompt
        prompts = []
        for row in tokens:
            if not isinstance(row, (list, tuple, *_ARRAYS)):
                raise InputError("tokens must be a list of token ids or a list of such lists")
            if isinstance(row, _ARRAYS):
                a = np.asarray(row)
                if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
                    raise InputError(f"each prompt must be a 1-D array of integer token ids, got shape {a.shape} "
                                     f"and dtype {a.dtype}")
                row = a.tolist()
            row = [_scalar(t) for t in row]  # 0-d numpy/JAX integers count as ids
            if not all(_is_int(t) for t in row):
                raise InputError("tokens must be integer token ids (not booleans, floats or text; tokenize the text "
                                 "first)")
            prompts.append([int(t) for t in row])
    if not prompts:
        raise InputError("no prompts given: pass at least one non-empty list of token ids")
    V = model.config.vocab_size
    for b, p in enumerate(prompts):
        if not p:
            raise InputError(f"prompt {b} is empty: give at least one token (e.g. the BOS token)")
        bad = [t for t in p if t < 0 or t >= V]
        if bad:
            raise InputError(f"prompt {b} has token ids outside the vocabulary [0, {V}): {bad[:5]}; "
                             "was it tokenized with this model's tokenizer?")
    return prompts


def _check_model(model) -> None:
    if not isinstance(model, Model):
        raise InputError(f"model must be a momjax.Model from momjax.load(path), got {type(model).__name__}")


def memory_limits() -> tuple[int | None, int | None]:
    """(device bytes, host bytes) of this machine: the first device's memory limit (None on CPU, where device
    and host are the same RAM) and the total RAM (None where the OS does not say)."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        ram = None
    device = jax.devices()[0]
    if device.platform == "cpu":
        return None, ram
    stats = device.memory_stats() or {}
    return stats.get("bytes_limit"), ram


def check_fits(cfg: Config, prompt_len: int, new_tokens: int, policy: MemoryPolicy, dtype, batch: int = 1) -> None:
    """Refuse, before anything is allocated, a request whose prefill or decode cannot fit in this machine's memory
    by the closed-form estimate (`momjax.memory.estimate`, instant). Only a sure failure is refused: the
    estimate is compared with the total memory, not what is free now."""
    from momjax import memory

    try:
        policy.check_layers(cfg.num_layers)
    except ValueError as e:
        raise InputError(str(e)) from None
    device_limit, ram = memory_limits()
    phases = [("prefill", prompt_len)] + ([("decode", G.bucket_length(prompt_len, policy))] if new_tokens else [])
    for phase, n in phases:
        r = memory.estimate(cfg, n, policy, dtype=str(jnp.dtype(dtype)), phase=phase, batch=batch,
                            new_tokens=max(new_tokens, 1))
        if device_limit is None:  # CPU: device and host memory are the same RAM
            need, limit, where = r["device_bytes"] + r["host_bytes"], ram, "RAM on this machine"
        elif r["device_bytes"] > device_limit:
            need, limit, where = r["device_bytes"], device_limit, "device memory"
        else:
            need, limit, where = r["host_bytes"], ram, "host RAM"
        if limit is not None and need > limit:
            raise InputError(
                f"this request cannot fit: {phase} of {batch} x {prompt_len} prompt tokens"
                + (f" + {new_tokens} new tokens" if new_tokens else "")
                + f" with policy {policy.name!r} in {jnp.dtype(dtype)} needs about {memory.format_bytes(need)} "
                f"(momjax.memory.estimate), more than the {memory.format_bytes(limit)} of {where}; ask for fewer new "
                "tokens, a shorter prompt or a smaller batch"
                + (", or use policy 'mom-stream'" if device_limit is not None and policy.kv_decode == "device"
                   and phase == "decode" else ""))


def _check_callback(on_layer) -> None:
    if on_layer is not None and not callable(on_layer):
        raise InputError(f"on_layer must be a function of the layer index or None, got {on_layer!r}")


def _check_context(model: Model, prompt_len: int, new_tokens: int = 0):
    if not _is_int(model.max_context) or model.max_context < 1:
        raise InputError(f"model.max_context must be a positive integer, got {model.max_context!r}")
    total = prompt_len + new_tokens
    if total > model.max_context:
        raise InputError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({new_tokens}) = {total} exceeds the model's context of "
            f"{model.max_context} tokens; shorten the prompt, or set model.max_context = {total} to allow it "
            "(beyond the trained length outputs may degrade)"
        )


def _padded(model: Model, prompts, policy: MemoryPolicy):
    S = max(len(p) for p in prompts)
    tokens, start = G.left_pad(prompts, G.bucket_length(S, policy))
    return jnp.asarray(tokens), jnp.asarray(start)


def sampling_args(model: Model, temperature=0.0, top_k=None, top_p=None, seed=0, stop_tokens=None) -> tuple:
    """Checked sampling settings as the decode programs take them:
    (key, temperature, top_k, top_p, stop_ids, pad_id). top_k is a Python int (static in the programs: each
    value compiles once); top_k 0 and top_p 1 mean off; stop_ids has a
    fixed length (-1 padded) so different stop lists share one compiled program; rows that stopped are
    padded with the first stop token (0 when there is none)."""
    V = model.config.vocab_size
    temperature, top_k, top_p, seed = map(_scalar, (temperature, top_k, top_p, seed))
    if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise InputError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise InputError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and (not _is_real(top_p) or not 0 < top_p <= 1):  # NaN fails the comparison too
        raise InputError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    if not _is_int(seed) or not -(2**63) <= seed < 2**63:
        raise InputError(f"seed must be an integer in [-2**63, 2**63), got {seed!r}")
    if stop_tokens is None:
        stops = list(model.config.eos_token_ids)
    else:
        if isinstance(stop_tokens, _ARRAYS):
            stop_tokens = np.asarray(stop_tokens).tolist() if np.asarray(stop_tokens).ndim == 1 else stop_tokens
        if not isinstance(stop_tokens, (list, tuple, range)) or not all(_is_int(t) for t in stop_tokens):
            raise InputError(f"stop_tokens must be a list of integer token ids ([] never stops early) or None (the "
                             f"checkpoint's EOS ids), got {stop_tokens!r}")
        stops = [int(t) for t in stop_tokens]
        bad = [t for t in stops if not 0 <= t < V]
        if bad:
            raise InputError(f"stop_tokens outside the vocabulary [0, {V}): {bad[:5]}")
    top_k = 0 if top_k is None or top_k >= V else int(top_k)  # top_k >= V keeps every token: the same as off
    stop_ids = np.full(max(8, len(stops)), -1, np.int32)
    stop_ids[: len(stops)] = stops
    return (jax.random.PRNGKey(int(seed)), jnp.float32(temperature), top_k,
            jnp.float32(1.0 if top_p is None else top_p), jnp.asarray(stop_ids), jnp.int32(stops[0] if stops else 0))


# ---------------------------------------------------------------------- public functions


def forward(model: Model, tokens, policy="baseline") -> jax.Array:
    """float32 logits [B, S, V] at every position of tokens [B, S] (all rows the same length)."""
    _check_model(model)
    policy = get_policy(policy)
    prompts = check_prompts(model, tokens)
    S = len(prompts[0])
    if any(len(p) != S for p in prompts):
        raise InputError("forward takes rows of one length; pad them yourself or call prefill/generate with a list")
    _check_context(model, S)
    padded, start = _padded(model, prompts, policy)
    logits = G.forward_fn(model.params, padded, start, model.config, policy)
    return logits[:, padded.shape[1] - S:]


def prefill(model: Model, tokens, policy="mom", on_layer=None) -> tuple[jax.Array, KVCache]:
    """Logits [B, V] at each row's last token, and the prompt's KV cache (placed as the policy says)."""
    _check_model(model)
    policy = get_policy(policy)
    prompts = check_prompts(model, tokens)
    _check_callback(on_layer)
    _check_context(model, max(len(p) for p in prompts))
    check_fits(model.config, max(len(p) for p in prompts), 0, policy, model.dtype, len(prompts))
    padded, start = _padded(model, prompts, policy)
    return G.prefill_fn(model.params, padded, start, model.config, policy, on_layer=on_layer)


@dataclass
class Generation:
    """Result of `generate`: tokens [B, max_new_tokens] (rows that stopped are padded with pad_id)."""

    tokens: np.ndarray
    lengths: np.ndarray  # valid new tokens per row (including the stop token)
    pad_id: int
    prompt_tokens: int
    time_to_first_token_s: float
    decode_s: float
    policy: str

    def __array__(self, dtype=None, copy=None):
        return self.tokens if dtype is None else self.tokens.astype(dtype)

    def as_lists(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]

    @property
    def decode_tokens_per_s(self) -> float:
        steps = int(self.lengths.max()) - 1
        return steps / self.decode_s if self.decode_s > 0 and steps > 0 else float("nan")

    def summary(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("tokens")
        d["lengths"] = self.lengths.tolist()
        d["decode_tokens_per_s"] = self.decode_tokens_per_s
        return d


def generate(model: Model, tokens, max_new_tokens: int, policy="mom", temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0, stop_tokens=None,
             on_layer=None) -> Generation:
    """Generate up to max_new_tokens per prompt. tokens: [B, S] array or a list of token lists.

    temperature 0 is greedy. stop_tokens: None = the checkpoint's EOS ids; [] = never stop early.
    """
    _check_model(model)
    policy = get_policy(policy)
    prompts = check_prompts(model, tokens)
    max_new_tokens = _scalar(max_new_tokens)
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    _check_callback(on_layer)
    _check_context(model, max(len(p) for p in prompts), max_new_tokens)
    sampling = sampling_args(model, temperature, top_k, top_p, seed, stop_tokens)
    check_fits(model.config, max(len(p) for p in prompts), int(max_new_tokens), policy, model.dtype, len(prompts))

    padded, start = _padded(model, prompts, policy)
    t0 = time.perf_counter()
    logits, cache = G.prefill_fn(model.params, padded, start, model.config, policy, on_layer=on_layer)
    logits.block_until_ready()
    ttft = time.perf_counter() - t0
    cache = place_for_decode(cache, policy)  # mom: the paper's one copy back to the device
    t1 = time.perf_counter()
    out, lengths = G.decode_fn(model.params, cache, logits, *sampling, cfg=model.config, policy=policy,
                               max_new_tokens=int(max_new_tokens))
    out = np.asarray(out)
    decode_s = time.perf_counter() - t1
    return Generation(tokens=out, lengths=np.asarray(lengths), pad_id=int(sampling[-1]), prompt_tokens=sum(map(len, prompts)),
                      time_to_first_token_s=ttft, decode_s=decode_s, policy=policy.name)
