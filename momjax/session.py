"""Sessions: one conversation's KV cache kept between calls, so a long document is prefilled once and then
questioned many times, rewound, saved to disk and loaded again.

A `Session` holds, per layer, a K and a V buffer [1, K, capacity, E] of which the first `length` positions
are valid, and the token ids they came from. `feed` extends them: the new tokens are right-padded to a
length bucket and run layer by layer by one compiled per-layer program (generation.feed_layer_fn) that
writes their K/V at index `length` (in place: the buffer is donated) and lets their queries attend to the
cached tokens and to themselves, in the policy's mini-sequences. The buffers live where the policy puts a
prompt's KV cache: on the device for `baseline`, in pinned host memory for `mom` and `mom-stream`, where
each layer's buffer comes to the device for that layer's program only. When a feed does not fit, the
buffers grow to the next bucket, one layer at a time.

`generate` feeds the question, decodes exactly as `momjax.generate` does (the same jitted decode program,
over the session's buffers with the keys past `length` masked; `mom` copies the cache to the device for
decoding, `mom-stream` streams it from the host), then feeds the answer so the next call continues the
conversation. Every step is the computation a one-shot prefill of the concatenated tokens does, so the
greedy tokens are the same.

Session files are safetensors (never pickle): the valid K/V per layer, the token ids, and metadata naming
the format version, the policy, the model's config and dtype, a hash of its weights and a checksum of the
tensors, so a file is never loaded into another model and a damaged one is refused. Writes are atomic.

With an int8 policy (MemoryPolicy(kv_dtype="int8")) each layer's K and V buffer is a pair (int8 [1, K, capacity,
E], float32 scales [1, K, capacity]), fed, grown, placed, decoded and saved together; such a session loads
only with an int8 policy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from momjax import generation as G
from momjax.api import (
    Generation,
    InputError,
    Model,
    _check_callback,
    _check_model,
    check_fits,
    check_prompts,
    get_policy,
    sampling_args,
)
from momjax.cache import KVCache, place_for_decode, sharding, to_memory_kind
from momjax.config import MemoryPolicy

FORMAT = "momjax-session"
FORMAT_VERSION = 1
# safetensors dtype names of the tensors a session file holds
_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(jnp.bfloat16),
           "I32": np.dtype(np.int32), "I8": np.dtype(np.int8)}


class SessionError(InputError):
    """A session operation that cannot run as given (bad tokens, out of range, an unusable session file)."""


# ---------------------------------------------------------------------- model fingerprint


def weights_hash(model: Model) -> str:
    """sha256 over every weight's name, shape, dtype and bytes; computed once per params object and cached on
    the model (hashing an 8B model reads all 16 GB once)."""
    cached = model.__dict__.get("_weights_hash")
    if cached is not None and cached[0] is model.params:
        return cached[1]
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(model.params):
        arr = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}:{arr.shape}:{arr.dtype};".encode())
        h.update(np.ascontiguousarray(arr).view(np.uint8).reshape(-1).data)
    digest = h.hexdigest()
    model.__dict__["_weights_hash"] = (model.params, digest)
    return digest


def _describe_difference(saved: dict, current: dict) -> str:
    """What differs between two fingerprints, in words, for the error message."""
    if saved.get("config") != current["config"]:
        a, b = saved.get("config") or {}, current["config"]
        fields = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        shown = ", ".join(f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in fields[:4])
        return f"another model architecture ({shown}{', ...' if len(fields) > 4 else ''})"
    if saved.get("dtype") != current["dtype"]:
        return f"the model in {saved.get('dtype')}, not {current['dtype']} (load the model with that dtype)"
    return "a model with the same architecture but other weights"


# ---------------------------------------------------------------------- buffers


def _grow_impl(buf, capacity: int, memory_kind: str):
    """A copy of one layer's buffer [B, K, cap, E] (or an int8 buffer's scales [B, K, cap]) with room for
    `capacity` positions, placed in memory_kind."""
    out = jnp.zeros((*buf.shape[:2], capacity, *buf.shape[3:]), buf.dtype)
    out = jax.lax.dynamic_update_slice_in_dim(out, to_memory_kind(buf, "device"), 0, axis=2)
    return to_memory_kind(out, memory_kind)


# Not donated: the grown buffer has another shape, so it cannot reuse the old one's memory; the old one is freed
# when the caller drops it, so the copy costs one layer's buffer at a time.
_grow = jax.jit(_grow_impl, static_argnames=("capacity", "memory_kind"))


def _placed_buffer(values: np.ndarray, capacity: int, memory_kind: str):
    """A buffer [B, K, capacity, ...] holding values [B, K, n, ...] in its first n positions, placed in
    memory_kind."""
    n = values.shape[2]
    buf = np.zeros((*values.shape[:2], capacity, *values.shape[3:]), values.dtype)
    buf[:, :, :n] = values
    return jax.device_put(buf, sharding(memory_kind))


# ---------------------------------------------------------------------- the session


class Session:
    """One conversation's KV cache (batch 1), kept between calls.

        s = momjax.Session(model, policy="mom")
        s.feed(document_ids)                          # prefill once
        mark = s.length
        out = s.generate(question_ids, 64)            # == momjax.generate(model, [document + question], 64)
        s.rewind(mark)                                # back to just after the document
        s.save("doc.session"); s2 = momjax.Session.load(model, "doc.session")

    Results equal `momjax.generate` on the concatenated tokens (the same greedy tokens), for every policy.
    Errors (SessionError, an InputError) leave the session as it was.
    """

    def __init__(self, model: Model, policy="mom", capacity: int = 0):
        """capacity: room to allocate now, in tokens (rounded up to a length bucket); the buffers grow anyway
        when a feed needs more, but each new capacity compiles the feed and decode programs again, so pass
        the expected total (e.g. the document's length plus some questions) to compile them once."""
        _check_model(model)
        self.model = model
        self.policy: MemoryPolicy = get_policy(policy)
        self._tokens: list[int] = []
        # Per-layer buffers [1, K, capacity, E] (int8 policy: (int8 buffer, scales [1, K, capacity]) pairs);
        # allocated by the first feed.
        self._k: tuple = ()
        self._v: tuple = ()
        self.info: dict = {}  # the caller's notes (JSON-serializable), saved with the session (e.g. chat messages)
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 0:
            raise SessionError(f"capacity must be a number of tokens >= 0, got {capacity!r}")
        if capacity:
            self._reserve(int(capacity))

    # ------------------------------------------------------------------ state

    @property
    def length(self) -> int:
        """Tokens in the cache."""
        return len(self._tokens)

    @property
    def tokens(self) -> list[int]:
        """The token ids in the cache (a copy)."""
        return list(self._tokens)

    @property
    def capacity(self) -> int:
        """Positions the buffers have room for (grows as needed)."""
        return jax.tree.leaves(self._k[0])[0].shape[2] if self._k else 0

    @property
    def memory_kind(self) -> str:
        """Where the cache lives between calls: "device" or "pinned_host" (the policy's kv_prefill)."""
        return self.policy.kv_prefill

    @property
    def buffer_memory_kind(self) -> str | None:
        """Where the cache's buffers really are, read from the arrays themselves (None before the first feed)."""
        return jax.tree.leaves(self._k[0])[0].sharding.memory_kind if self._k else None

    def __repr__(self) -> str:
        return f"Session(length={self.length}, capacity={self.capacity}, policy={self.policy.name!r})"

    def rewind(self, n: int) -> None:
        """Keep only the first n tokens (0 <= n <= length): e.g. go back to just after the document."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise SessionError(f"rewind takes a number of tokens, got {n!r}")
        if not 0 <= n <= self.length:
            raise SessionError(f"cannot rewind to {n} tokens: the session holds {self.length}; pass 0 to "
                               f"{self.length}")
        # The K/V past n stay in the buffers: later feeds overwrite them and nothing reads them before.
        del self._tokens[int(n):]

    def reset(self) -> None:
        """Forget every token (the buffers are kept for the next feed)."""
        self.rewind(0)

    # ------------------------------------------------------------------ feeding

    def _check_tokens(self, tokens, new_tokens: int = 0) -> list[int]:
        if isinstance(tokens, (np.ndarray, jax.Array)) and tokens.size == 0 or \
                isinstance(tokens, (list, tuple)) and len(tokens) == 0:
            raise SessionError("nothing to feed: pass at least one token id")
        prompts = check_prompts(self.model, tokens)
        if len(prompts) != 1:
            raise SessionError(f"a Session holds one conversation: pass one list of token ids, not {len(prompts)}")
        ids = prompts[0]
        total = self.length + len(ids) + new_tokens
        if total > self.model.max_context:
            what = f" + max_new_tokens ({new_tokens})" if new_tokens else ""
            raise SessionError(
                f"the session ({self.length} tokens) + {len(ids)} new tokens{what} = {total} exceeds the model's "
                f"context of {self.model.max_context} tokens; rewind the session, or set model.max_context = "
                f"{total} to allow it (beyond the trained length outputs may degrade)")
        # A feed never needs more memory than a one-shot prefill of all the tokens (tests/test_session.py):
        # refuse what that prefill could not do.
        check_fits(self.model.config, self.length + len(ids), new_tokens, self.policy, self.model.dtype)
        return ids

    def feed(self, tokens, on_layer=None) -> jax.Array:
        """Extend the cache with tokens (a list of ids or a [n] / [1, n] array); returns the float32 logits [V]
        that follow the last of them. on_layer(i) is called after layer i (0-based) has finished."""
        _check_callback(on_layer)
        ids = self._check_tokens(tokens)
        return self._feed(ids, on_layer)[0]

    def _feed(self, ids: list[int], on_layer=None) -> jax.Array:
        cfg, n, offset = self.model.config, len(ids), self.length
        width = G.bucket_length(n, self.policy)
        # Room for the real tokens only (their padding may be dropped at the end): the capacity is then the
        # length bucket a one-shot prefill of all the tokens would use, never more.
        self._reserve(offset + n)
        tokens = np.zeros((1, width), np.int32)  # right padding: causally invisible to the real tokens
        tokens[0, :n] = ids
        logits, self._k, self._v = G.feed_fn(self.model.params, jnp.asarray(tokens), self._k, self._v, offset, n,
                                             cfg, self.policy, on_layer=on_layer)
        self._tokens.extend(ids)
        return logits

    def _reserve(self, needed: int) -> None:
        """Make room for `needed` positions: allocate, or grow to the next bucket one layer at a time."""
        if needed <= self.capacity:
            return
        cfg, kind = self.model.config, self.memory_kind
        capacity = G.bucket_length(needed, self.policy)
        if not self._k:
            shape = (1, cfg.num_kv_heads, capacity, cfg.head_dim)
            zeros = lambda shape, dtype: jax.device_put(jnp.zeros(shape, dtype), sharding(kind))
            if self.policy.quantized_kv:
                buffer = lambda: (zeros(shape, jnp.int8), zeros(shape[:3], jnp.float32))
            else:
                buffer = lambda: zeros(shape, self.model.dtype)
            self._k = tuple(buffer() for _ in range(cfg.num_layers))
            self._v = tuple(buffer() for _ in range(cfg.num_layers))
            return
        ks, vs = list(self._k), list(self._v)
        grow = lambda buf: jax.tree.map(lambda b: _grow(b, capacity=capacity, memory_kind=kind), buf)
        for i in range(cfg.num_layers):  # one layer at a time: never two copies of the whole cache
            ks[i] = grow(ks[i])
            vs[i] = grow(vs[i])
        self._k, self._v = tuple(ks), tuple(vs)

    def decode_cache(self) -> KVCache:
        """The cache as decoding reads it: the buffers, with the keys past `length` masked, placed as the policy
        says for decoding (mom: a device copy; the session's own buffers stay where they are)."""
        scales = {}
        if self.policy.quantized_kv:
            (k, k_scale), (v, v_scale) = zip(*self._k), zip(*self._v)
            scales = dict(k_scale=tuple(k_scale), v_scale=tuple(v_scale))
        else:
            k, v = self._k, self._v
        cache = KVCache(k=tuple(k), v=tuple(v), start=jnp.zeros((1,), jnp.int32), tail_k=(), tail_v=(),
                        length=jnp.zeros((), jnp.int32), end=jnp.int32(self.length), **scales)
        return place_for_decode(cache, self.policy)

    # ------------------------------------------------------------------ generating

    def generate(self, tokens, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int = 0, stop_tokens=None, on_layer=None) -> Generation:
        """Feed tokens, generate up to max_new_tokens, and keep the answer in the cache (up to and including a
        stop token) so the next call continues the conversation. Returns what `momjax.generate` returns, with
        tokens [1, max_new_tokens]; time_to_first_token_s is the feed's time, prompt_tokens the tokens fed.
        Sampling is exactly momjax.generate's: the same seed gives the same tokens."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or \
                max_new_tokens < 1:
            raise SessionError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        _check_callback(on_layer)
        ids = self._check_tokens(tokens, int(max_new_tokens))
        sampling = sampling_args(self.model, temperature, top_k, top_p, seed, stop_tokens)
        t0 = time.perf_counter()
        logits = self._feed(ids, on_layer)
        logits.block_until_ready()
        ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        out, lengths = G.decode_fn(self.model.params, self.decode_cache(), logits, *sampling, cfg=self.model.config,
                                   policy=self.policy, max_new_tokens=int(max_new_tokens))
        out, lengths = np.asarray(out), np.asarray(lengths)
        decode_s = time.perf_counter() - t1
        self._feed(out[0, : int(lengths[0])].tolist())  # the answer's K/V, as a prefill of it would compute them
        return Generation(tokens=out, lengths=lengths, pad_id=int(sampling[-1]), prompt_tokens=len(ids),
                          time_to_first_token_s=ttft, decode_s=decode_s, policy=self.policy.name)

    def stream(self, tokens, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, seed: int = 0, stop_tokens=None, chunk_max: int = 64,
               chunk_seconds: float = 0.25, stats: dict | None = None):
        """As `generate`, but yields lists of new token ids as they are decoded (the same tokens, in chunks of
        the resumable decode program, whose length grows until a chunk takes about chunk_seconds). The answer
        is fed into the cache when the generator finishes; one closed early keeps what was yielded.
        stats, if given, receives time_to_first_token_s, decode_s and new_tokens."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or \
                max_new_tokens < 1:
            raise SessionError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        ids = self._check_tokens(tokens, int(max_new_tokens))
        key, temperature, top_k, top_p, stop_ids, pad_id = sampling_args(self.model, temperature, top_k, top_p,
                                                                          seed, stop_tokens)
        stats = stats if stats is not None else {}
        cfg, policy, params = self.model.config, self.policy, self.model.params
        t0 = time.perf_counter()
        logits = self._feed(ids)
        token, done = G.first_token_fn(logits, key, temperature, top_k, top_p, stop_ids)
        answer = [int(np.asarray(token)[0])]
        stats.update(time_to_first_token_s=time.perf_counter() - t0, decode_s=0.0, new_tokens=1)
        try:
            yield list(answer)
            if bool(np.asarray(done)[0]) or max_new_tokens == 1:
                return
            cache = self.decode_cache().with_tail(max(int(max_new_tokens) - 1, 1))  # generate's tail shape
            (tail_k, tail_v), t, chunk = cache.tails, jnp.int32(1), 1
            while len(answer) < max_new_tokens:
                c0 = time.perf_counter()
                limit = jnp.int32(min(len(answer) + chunk, int(max_new_tokens)))
                out, n, t, done, tail_k, tail_v, token = G.decode_chunk_fn(
                    params, cache, tail_k, tail_v, token, t, done, limit, key, temperature, top_k, top_p, stop_ids,
                    pad_id, cfg=cfg, policy=policy, steps=chunk_max)
                new = np.asarray(out)[0, : int(n)].tolist()
                elapsed = time.perf_counter() - c0
                stats["decode_s"] += elapsed
                answer.extend(new)
                stats["new_tokens"] = len(answer)
                if new:
                    yield new
                if bool(np.asarray(done)[0]) or not new:
                    return
                if elapsed < chunk_seconds:
                    chunk = min(2 * chunk, chunk_max)
        finally:
            self._feed(answer)

    # ------------------------------------------------------------------ files

    def _layout(self, n: int) -> list:
        """The tensors a session file holds per layer for K (and the same for V), for n tokens: (name suffix,
        the tensor taken from a layer's buffer, (shape, dtype))."""
        cfg = self.model.config
        shape = (1, cfg.num_kv_heads, n, cfg.head_dim)
        if self.policy.quantized_kv:
            return [("", lambda b: b[0], (shape, np.dtype(np.int8))),
                    ("_scale", lambda b: b[1], (shape[:3], np.dtype(np.float32)))]
        return [("", lambda b: b, (shape, np.dtype(self.model.dtype)))]

    def _fingerprint(self) -> dict:
        return dict(config=self.model.config.to_json(), dtype=str(jnp.dtype(self.model.dtype)),
                    weights=weights_hash(self.model))

    def save(self, path: str) -> None:
        """Write the session to a safetensors file at path, atomically (a temp file in the same folder, then
        renamed over path): an interrupted save never leaves a half-written session file."""
        from safetensors.numpy import save_file

        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise SessionError(f"cannot save the session to {path}: folder {folder} does not exist")
        n, cfg = self.length, self.model.config
        tensors = {"tokens": np.asarray(self._tokens, np.int32)}
        valid = lambda buf: np.ascontiguousarray(np.asarray(buf[:, :, :n]))
        for i in range(cfg.num_layers):
            for name, bufs in (("k", self._k), ("v", self._v)):
                for suffix, buf, shape in self._layout(n):
                    tensors[f"{name}{suffix}.{i}"] = valid(buf(bufs[i])) if bufs else np.zeros(*shape)
        metadata = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "policy": json.dumps(dataclasses.asdict(self.policy)),
            "model": json.dumps(self._fingerprint()),
            "length": str(n),
            "checksum": _checksum(tensors),
        }
        try:
            metadata["info"] = json.dumps(self.info)
        except TypeError as e:
            raise SessionError(f"session.info must hold JSON values only: {e}") from None
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
        try:
            os.close(fd)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give the file the usual permissions
            save_file(tensors, tmp, metadata=metadata)  # straight to the file: no second copy in memory
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())  # on disk before the rename, so a crash leaves the old file or the new one
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, model: Model, path: str, policy=None, capacity: int = 0) -> Session:
        """A session read from a file written by `save`, for the same model (config, dtype and weights).
        policy: None for the saved one; any other gives the same results (it only moves the cache).
        capacity: room to allocate, as in `Session` (at least the saved tokens)."""
        from safetensors import safe_open

        meta, names = _read_header(path)
        where = f"session file {path}"
        if meta.get("format") != FORMAT:
            raise SessionError(f"{where} is not a momjax session file (no '{FORMAT}' header)")
        version = meta.get("format_version", "?")
        if version != str(FORMAT_VERSION):
            raise SessionError(f"{where} has format version {version}; this momjax reads version {FORMAT_VERSION} "
                               "(save the session again with this version)")
        try:
            saved_model = json.loads(meta["model"])
            saved_policy = MemoryPolicy(**json.loads(meta["policy"]))
            n = int(meta["length"])
            checksum = meta["checksum"]
            info = json.loads(meta.get("info", "{}"))
        except (KeyError, ValueError, TypeError) as e:
            raise SessionError(f"{where} has damaged metadata ({e}); save the session again") from None
        session = cls(model, saved_policy if policy is None else policy)
        if session.policy.kv_dtype != saved_policy.kv_dtype:
            raise SessionError(f"session file {path} holds a K/V cache with kv_dtype={saved_policy.kv_dtype!r}; load "
                               f"it with a policy of the same kv_dtype (policy=None keeps the saved one), not "
                               f"{session.policy.kv_dtype!r}")
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 0:
            raise SessionError(f"capacity must be a number of tokens >= 0, got {capacity!r}")
        current = session._fingerprint()
        if saved_model != current:
            raise SessionError(f"{where} was saved from {_describe_difference(saved_model, current)}; a session "
                               "can only be loaded into the model that wrote it")
        cfg = model.config
        expected = {"tokens": ((n,), np.dtype(np.int32))}
        for i in range(cfg.num_layers):
            for suffix, _, shape in session._layout(n):
                expected[f"k{suffix}.{i}"] = expected[f"v{suffix}.{i}"] = shape
        if names != expected:
            wrong = sorted(k for k in set(names) | set(expected) if names.get(k) != expected.get(k))
            raise SessionError(f"{where} does not hold this model's cache layout (tensors {', '.join(wrong[:4])} "
                               "missing or misshapen); save the session again")
        if n > model.max_context:
            raise SessionError(f"{where} holds {n} tokens, more than model.max_context = {model.max_context}")
        # One tensor at a time (the checksum is built as they are read), so loading holds the session's
        # buffers and one layer's K or V, not a second copy of the whole cache.
        room, kind = G.bucket_length(max(n, int(capacity), 1), session.policy), session.memory_kind
        buffers, h = {}, hashlib.sha256()
        try:
            with safe_open(path, framework="np") as f:
                for name in sorted(expected):
                    t = f.get_tensor(name)
                    _hash_tensor(h, name, t)
                    if name == "tokens":
                        ids = t.tolist()
                    elif n:
                        buffers[name] = _placed_buffer(t, room, kind)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own types for data that is cut short
            raise SessionError(f"{where} is truncated or damaged ({' '.join(str(e).split())}); save the session "
                               "again") from None
        if h.hexdigest() != checksum:
            raise SessionError(f"{where} is corrupted (its checksum does not match its contents)")
        if any(not 0 <= t < cfg.vocab_size for t in ids):
            raise SessionError(f"{where} holds token ids outside the vocabulary")
        if n:
            pair = session.policy.quantized_kv
            layer = lambda name, i: (buffers[f"{name}.{i}"], buffers[f"{name}_scale.{i}"]) if pair else \
                buffers[f"{name}.{i}"]
            session._k = tuple(layer("k", i) for i in range(cfg.num_layers))
            session._v = tuple(layer("v", i) for i in range(cfg.num_layers))
        elif capacity:
            session._reserve(int(capacity))
        session._tokens = ids
        session.info = info if isinstance(info, dict) else {}
        return session


def _hash_tensor(h, name: str, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr)
    h.update(f"{name}:{arr.shape}:{arr.dtype};".encode())
    h.update(arr.view(np.uint8).reshape(-1).data)


def _checksum(tensors: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        _hash_tensor(h, name, tensors[name])
    return h.hexdigest()


def _read_header(path: str) -> tuple[dict, dict]:
    """Metadata and {name: (shape, dtype)} of a safetensors file, without reading its tensors; SessionError if
    it is missing, truncated or not safetensors."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise SessionError(f"session file {path} does not exist")
    try:
        with safe_open(path, framework="np") as f:
            meta = f.metadata() or {}
            names, stored = {}, f.keys()  # safe_open has keys(), not dict iteration
            for name in stored:
                sl = f.get_slice(name)
                names[name] = (tuple(sl.get_shape()), _DTYPES.get(sl.get_dtype()))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for truncated or garbled files
        message = " ".join(str(e).split()) or type(e).__name__
        raise SessionError(f"session file {path} is truncated or not a safetensors file ({message}); "
                           "save the session again") from None
    return meta, names


# ---------------------------------------------------------------------- memory


def feed_memory_report(model_or_config, length: int, new_tokens: int, policy="mom", dtype="float32",
                       target=None) -> dict:
    """Device bytes of a session feed of new_tokens tokens into a session holding `length`, from XLA's memory
    analysis of the feed's compiled programs with abstract inputs, composed as `memory_report` composes a
    prefill's: between programs the weights stay on the device, and so does the whole cache when the policy
    keeps it there. target: as in `memory_report` (None = this machine's compiler, or a GPU name).
    Returns device_bytes, host_bytes, weight_bytes, kv_bytes (the buffers) and capacity."""
    from momjax import memory
    from momjax import targets as T
    from momjax.params import abstract_params, param_bytes

    cfg = memory._resolve(model_or_config)
    policy = get_policy(policy)
    dtype = jnp.dtype(dtype)
    width = G.bucket_length(new_tokens, policy)
    capacity = G.bucket_length(length + new_tokens, policy)  # as Session._reserve grows it
    dev = sharding("device")
    params = abstract_params(cfg, dtype, sharding=dev)
    tokens = jax.ShapeDtypeStruct((1, width), jnp.int32, sharding=dev)
    shape, kv_dtype = (1, cfg.num_kv_heads, capacity, cfg.head_dim), jnp.int8 if policy.quantized_kv else dtype
    buf = jax.ShapeDtypeStruct(shape, kv_dtype, sharding=sharding(policy.kv_prefill))
    if policy.quantized_kv:
        buf = (buf, jax.ShapeDtypeStruct(shape[:3], jnp.float32, sharding=sharding(policy.kv_prefill)))
    layer_kv = 2 * sum(int(np.prod(b.shape)) * jnp.dtype(b.dtype).itemsize for b in jax.tree.leaves(buf))
    on_device = policy.kv_prefill == "device"
    weights = param_bytes(cfg, dtype)
    L, device = cfg.num_layers, 0
    for stage in G.feed_stages(params, tokens, buf, buf, cfg, policy):
        _, b = T.compile(stage.fn, *stage.args, target=target, **stage.static)
        own = b["device_bytes"] - memory._nbytes(stage.args[0], "device")  # args[0]: the weights it reads
        if b["host_argument_counted_bytes"]:
            # A GPU target compiled the host-resident buffers as device arrays, so the program's copy of this
            # layer's K/V on the device is missing from its figure: add it.
            own += layer_kv
        others = (L - 1 if stage.name in ("layer", "last") else L) * layer_kv * on_device  # this layer's is an arg
        device = max(device, weights + own + others)
    return dict(device_bytes=int(device), host_bytes=0 if on_device else L * layer_kv, weight_bytes=int(weights),
                kv_bytes=L * layer_kv, capacity=capacity, length=int(length), new_tokens=int(new_tokens),
                policy=policy.name, dtype=str(dtype), source="xla" if target is None else f"xla-gpu:{target}")
