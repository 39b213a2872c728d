"""momjax on a real GPU: one short check of everything only a GPU can show.

    PYTHONPATH=. python benchmarks/gpu_check.py OUT_DIR            # on a GPU: under 6 minutes on an H200
    PYTHONPATH=. python benchmarks/gpu_check.py --tiny OUT_DIR     # any CPU, tiny shapes: tests the script
    python benchmarks/gpu_check.py --predict      # no GPU, the gpu-plan extra: the predictions it is compared with

It needs only what the GPU machine already has (jax with its CUDA plugin, transformers, torch); nothing is
installed. Each stage runs in its own process (so a GPU's peak memory statistics start at zero and a crash
is contained), is recorded as it finishes, and a failing stage is recorded (stage, error type, message, the
end of its output) while the next one runs. OUT_DIR/gpu_check.json is rewritten after every stage and after
every measurement inside one, so a run cut short keeps what it measured. The stages:

  env           jax/jaxlib versions, backend, device kind, memory kinds, memory statistics, and the host link:
                pinned-host <-> device copies (jax.device_put) in GB/s.
  exact         float32 tiny random checkpoints of three families (Llama GQA, Qwen2 with biases, Mistral with
                a sliding window) built with transformers in the process: every policy, `mom-stream` with
                kv_device_layers 0..L, `mom-host` (16-token chunks in 8-token blocks streamed from pinned host
                memory) and int8 K/V give the same greedy tokens as `baseline` and as transformers on the same
                GPU (int8: equal across policies); a Session (feed a document, two questions,
                rewind, save, load) equals one-shot generate; the arrays that should be in host memory report
                memory_kind "pinned_host". Matmuls in float32 at "highest" precision on both sides (no TF32).
  long          Llama-3.1-8B shapes, random bfloat16 weights made on the device: `baseline`, `mom` and
                `mom-stream` at 32k and 128k tokens (one process per policy): time to first token (programs
                compiled ahead, compile time apart), peak device memory beside the estimate and beside the
                deviceless `memory_report(..., target="h200")` figures, decode tokens/s over 32 tokens beside
                `plan`'s roofline prediction, and for streamed decoding the host-to-device GB/s achieved.
  transformers  the same shapes in transformers on the same GPU (bf16, sdpa, logits_to_keep=1, offloaded
                DynamicCache: the MOM paper's setup) at 32k: time to first token and decode tokens/s.
  cudnn         jax.nn.dot_product_attention(implementation="cudnn") against momjax's blockwise attention for
                one 32k causal prefill layer (GQA 32/8, head dim 128, bf16): equal outputs, and the times.

A time budget (--budget-s) is shared out: each stage gets a cap, and a measurement that would not finish in
what is left is skipped and recorded as such. With --tiny everything runs on the CPU with tiny shapes: its
figures test the script, they are not GPU measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE, os.path.join(ROOT, "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

GIB = 2**30
STAGES = ("env", "exact", "programs", "long", "transformers", "cudnn")
# Share of the budget each stage may take at most (GPU run); what a stage leaves unused goes to the next ones.
SHARES = {"env": 0.06, "exact": 0.28, "programs": 0.10, "long": 0.55, "transformers": 0.15, "cudnn": 0.10}
RESULT = "RESULT "
PARTIAL = "PARTIAL "
PREDICTIONS = os.path.join(HERE, "results", "gpu_check_predictions_h200.json")
EXACT_FAMILIES = ("llama-gqa", "qwen2", "mistral-window")
POLICY_NAMES = ("baseline", "mom", "mom-stream")


# ---------------------------------------------------------------------- child side


def emit(tag: str, obj) -> None:
    print(tag + json.dumps(obj, default=str), flush=True)


class Clock:
    """Seconds left before the child's deadline (given by the parent)."""

    def __init__(self, deadline: float):
        self.deadline = deadline

    def left(self) -> float:
        return self.deadline - time.time()


def _sync(x):
    import jax

    return jax.block_until_ready(x)


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def child_env(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp

    out = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count()}
    try:
        import jaxlib

        out["jaxlib"] = jaxlib.__version__
    except Exception as e:  # noqa: BLE001
        out["jaxlib"] = repr(e)
    out["jax"] = jax.__version__
    out["backend"] = jax.default_backend()
    devs = jax.devices()
    d = devs[0]
    out["devices"] = [str(x) for x in devs]
    out["device_kind"] = d.device_kind
    try:
        out["memory_kinds"] = [m.kind for m in d.addressable_memories()]
        out["default_memory_kind"] = d.default_memory().kind
    except Exception as e:  # noqa: BLE001
        out["memory_kinds"] = f"{type(e).__name__}: {e}"
    out["memory_stats"] = d.memory_stats()
    for name in ("transformers", "torch", "flax", "orbax.checkpoint", "numpy"):
        try:
            mod = __import__(name, fromlist=["__version__"])
            out[name] = getattr(mod, "__version__", "?")
        except Exception as e:  # noqa: BLE001
            out[name] = f"not importable: {type(e).__name__}: {e}"
    t0 = time.perf_counter()
    import momjax
    from momjax import targets

    out["momjax_import_s"] = time.perf_counter() - t0
    out["target_for_device"] = targets.from_device_kind(d.device_kind)
    out["env_vars"] = {k: os.environ.get(k) for k in ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE",
                                                      "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB", "XLA_FLAGS")}
    emit(PARTIAL, out)

    # The host link, as momjax moves K/V: device_put between pinned host and device memory, outside jit, and
    # inside jit (momjax.cache.to_memory_kind), median of 3 after a warm-up.
    from momjax.cache import sharding, to_memory_kind

    n = (2 * GIB if not spec["tiny"] else 8 * 2**20) // 2
    host = jax.device_put(jnp.zeros((n,), jnp.bfloat16) + 1, sharding("pinned_host"))
    dev = jax.device_put(jnp.zeros((n,), jnp.bfloat16) + 2, sharding("device"))
    _sync((host, dev))
    out["link_probe_bytes"] = 2 * n
    to_dev_jit = jax.jit(lambda x: to_memory_kind(x, "device"))
    to_host_jit = jax.jit(lambda x: to_memory_kind(x, "pinned_host"))

    def timed(fn, x):
        _sync(fn(x))
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            _sync(fn(x))
            ts.append(time.perf_counter() - t0)
        return 2 * n / _median(ts) / 1e9

    out["host_to_device_GBps"] = timed(lambda x: jax.device_put(x, sharding("device")), host)
    out["device_to_host_GBps"] = timed(lambda x: jax.device_put(x, sharding("pinned_host")), dev)
    out["host_to_device_in_jit_GBps"] = timed(to_dev_jit, host)
    out["device_to_host_in_jit_GBps"] = timed(to_host_jit, dev)
    y = to_host_jit(dev)
    out["in_jit_host_output_memory_kind"] = y.sharding.memory_kind
    # Device memory bandwidth: a copy of a large array (bytes read + written).
    copy = jax.jit(lambda x: x * 2)
    out["device_copy_GBps"] = timed(copy, dev) * 2
    del host, dev, y
    out["momjax_version"] = momjax.__version__
    return out


def _hf_greedy_on(hf_model, prompt, n, device):
    import torch

    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = hf_model(torch.as_tensor([tokens], dtype=torch.long, device=device)).logits[0, -1]
            tokens.append(int(logits.argmax()))
    return tokens[len(prompt):]


def child_exact(spec: dict) -> dict:
    import jax
    import numpy as np
    import tiny
    import torch

    import momjax
    from momjax.cache import place_for_decode

    jax.config.update("jax_default_matmul_precision", "highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = "cuda" if torch.cuda.is_available() and not spec["tiny"] else "cpu"
    clock = Clock(spec["deadline"])
    families = spec.get("families") or (EXACT_FAMILIES if not spec["tiny"] else EXACT_FAMILIES[:1])
    new = 10
    out = {"families": {}, "torch_device": device, "jax_backend": jax.default_backend(),
           "matmul_precision": "highest (jax_default_matmul_precision); torch allow_tf32 off", "new_tokens": new}
    tmp = tempfile.mkdtemp(prefix="momjax-gpu-check-")
    for fam in families:
        if clock.left() < 10:
            out["families"][fam] = {"skipped": f"{clock.left():.0f} s left of the stage's budget"}
            continue
        t_fam = time.perf_counter()
        r = {}
        out["families"][fam] = r
        hf = tiny.build_hf_model(fam)
        folder = tiny.save_checkpoint(hf, os.path.join(tmp, fam))
        model = momjax.load(folder, progress=False)
        L, V = model.config.num_layers, model.config.vocab_size
        rng = np.random.default_rng(1)
        prompt = rng.integers(3, V, size=70).tolist()
        hf = hf.to(device)
        ref = _hf_greedy_on(hf, prompt, new, device)
        r["transformers"] = ref
        with torch.no_grad():
            ref_logits = hf(torch.as_tensor([prompt], device=device)).logits.float().cpu().numpy()
        ours_logits = np.asarray(momjax.forward(model, [prompt]))
        r["forward_rel_err"] = float(np.linalg.norm(ours_logits - ref_logits) / np.linalg.norm(ref_logits))

        small = lambda name: momjax.get_policy(name).replace(minisequence=16) if name != "baseline" else \
            momjax.get_policy(name)  # 16-token mini-sequences: the 128-token bucket really is split
        variants = {name: small(name) for name in POLICY_NAMES}
        for kdl in range(1, L + 1) if not spec["tiny"] else (1,):
            variants[f"mom-stream kv_device_layers={kdl}"] = small("mom-stream").replace(kv_device_layers=kdl)
        # (--tiny runs fewer variants: it tests the script's paths, not the GPU's arithmetic)
        for name in POLICY_NAMES if not spec["tiny"] else ("baseline", "mom-stream"):
            variants[f"{name} int8"] = small(name).replace(kv_dtype="int8")
        # mom-host: 16-token chunks cut in 8-token blocks, streamed from pinned host memory by momjax.offload.
        variants["mom-host"] = small("mom-host").replace(host_block=8)
        if not spec["tiny"]:
            variants["mom-host int8"] = variants["mom-host"].replace(kv_dtype="int8")
        tokens = {}
        for name, policy in variants.items():
            t0 = time.perf_counter()
            g = momjax.generate(model, [prompt], new, policy=policy, stop_tokens=[])
            tokens[name] = g.as_lists()[0]
            r.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 3)
        r["tokens"] = tokens
        exact = [n for n in variants if "int8" not in n]
        r["exact_equal_transformers"] = {n: tokens[n] == ref for n in exact}
        r["int8_equal_across_policies"] = len({tuple(tokens[n]) for n in variants if "int8" in n}) == 1
        r["int8_equal_exact"] = tokens["baseline int8"] == tokens["baseline"]

        # Where the arrays live.
        kinds = {}
        _, cache = momjax.prefill(model, [prompt], policy=variants["mom"])
        kinds["mom prefill cache"] = cache.memory_kind
        decode_cache = place_for_decode(cache, variants["mom"])
        kinds["mom decode cache"] = decode_cache.memory_kind
        _, cache = momjax.prefill(model, [prompt], policy=variants["mom-stream kv_device_layers=1"])
        placed = place_for_decode(cache, variants["mom-stream kv_device_layers=1"])
        kinds["mom-stream kv_device_layers=1 decode, per layer"] = [placed.k[l].sharding.memory_kind for l in range(L)]
        _, cache = momjax.prefill(model, [prompt], policy=variants["baseline"])
        kinds["baseline prefill cache"] = cache.memory_kind
        _, cache = momjax.prefill(model, [prompt], policy=variants["mom-host"])
        kinds["mom-host prefill cache"] = cache.memory_kind
        del cache, decode_cache, placed
        expect = {"mom prefill cache": "pinned_host", "mom decode cache": "device", "baseline prefill cache": "device",
                  "mom-stream kv_device_layers=1 decode, per layer": ["device"] + ["pinned_host"] * (L - 1),
                  "mom-host prefill cache": "pinned_host"}
        r["memory_kinds"] = kinds
        r["memory_kinds_as_expected"] = kinds == expect

        # Sessions: document, two questions (rewinding between them), save, load, ask again.
        doc, q1, q2 = prompt[:50], prompt[50:60], prompt[60:70]
        one_shot = {
            "q1": momjax.generate(model, [doc + q1], 6, policy="baseline", stop_tokens=[]).as_lists()[0],
            "q2": momjax.generate(model, [doc + q2], 6, policy="baseline", stop_tokens=[]).as_lists()[0]}
        sessions = {}
        for name in POLICY_NAMES if not spec["tiny"] else ("mom-stream",):
            s = momjax.Session(model, policy=variants[name])
            s.feed(doc)
            a1 = s.generate(q1, 6, stop_tokens=[]).as_lists()[0]
            s.rewind(len(doc))
            a2 = s.generate(q2, 6, stop_tokens=[]).as_lists()[0]
            kind = s.buffer_memory_kind
            path = os.path.join(tmp, f"{fam}-{name}.session")
            s.save(path)
            s2 = momjax.Session.load(model, path)
            s2.rewind(len(doc))
            a2_loaded = s2.generate(q2, 6, stop_tokens=[]).as_lists()[0]
            sessions[name] = {"q1": a1 == one_shot["q1"], "q2": a2 == one_shot["q2"],
                              "q2_after_save_load": a2_loaded == one_shot["q2"], "buffer_memory_kind": kind,
                              "buffer_memory_kind_as_expected": kind == variants[name].kv_prefill}
        r["session"] = sessions
        r["ok"] = (all(r["exact_equal_transformers"].values()) and r["int8_equal_across_policies"]
                   and r["memory_kinds_as_expected"]
                   and all(all(v for k, v in s.items() if k != "buffer_memory_kind") for s in sessions.values())
                   and r["forward_rel_err"] < 1e-4)
        r["family_s"] = round(time.perf_counter() - t_fam, 1)
        emit(PARTIAL, out)
    out["ok"] = all(f.get("ok") for f in out["families"].values())
    return out


def model_config(tiny: bool):
    from gpu_long_context import model_config as cfg_of

    return cfg_of(tiny)


def _predictions() -> dict:
    if not os.path.isfile(PREDICTIONS):
        return {}
    with open(PREDICTIONS) as f:
        return json.load(f)


def child_long(spec: dict) -> dict:
    """One policy at each length: prefill, then decode (mom-stream: every layer streamed, then the planner's
    kv_device_layers)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from gpu_long_context import _random_params

    import momjax
    from momjax import generation as G
    from momjax import memory
    from momjax.cache import place_for_decode, sharding
    from momjax.checks import Sampling
    from momjax.decoding import DecodeStats, decode_stream
    from momjax.params import abstract_params

    clock = Clock(spec["deadline"])
    tiny, name, new = spec["tiny"], spec["policy"], spec["new_tokens"]
    cfg = model_config(tiny)
    dtype = jnp.dtype("float32" if tiny else "bfloat16")
    base = momjax.get_policy(name)
    if tiny and base.minisequence is not None:
        base = base.replace(minisequence=128)
    dev = jax.devices()[0]
    stats = lambda: dev.memory_stats() or {}
    on_device = sharding("device")
    target = "h200"
    predicted = _predictions()
    limit = stats().get("bytes_limit")
    out = {"policy": name, "dtype": str(dtype), "bytes_limit": limit, "runs": []}

    t0 = time.perf_counter()
    params = _random_params(cfg, dtype)
    out["weights_init_s"] = time.perf_counter() - t0
    out["weights_in_use_bytes"] = stats().get("bytes_in_use")
    emit(PARTIAL, out)
    prefill_s = None
    for n in spec["lengths"]:
        run = {"seq_len": n}
        out["runs"].append(run)
        # A prefill's time grows at most as the square of the length: skip what could not finish.
        margin = 3 if tiny else 30  # compiling the longer prompt's programs
        if prefill_s is not None:
            guess = prefill_s[1] * (n / prefill_s[0]) ** 2 + margin
            if guess > clock.left():
                run["skipped"] = f"predicted {guess:.0f} s from the shorter prompt; {clock.left():.0f} s left"
                emit(PARTIAL, out)
                break
        padded = G.bucket_length(n, base)
        tok_abs = jax.ShapeDtypeStruct((1, padded), jnp.int32, sharding=on_device)
        start_abs = jax.ShapeDtypeStruct((1,), jnp.int32, sharding=on_device)
        t0 = time.perf_counter()
        programs = G.compile_prefill(abstract_params(cfg, dtype, sharding=on_device), tok_abs, start_abs, cfg, base)
        run["prefill_compile_s"] = time.perf_counter() - t0
        prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, size=n).tolist()
        tokens, start = G.left_pad([prompt], padded)
        tokens, start = jax.device_put(tokens, on_device), jax.device_put(start, on_device)
        t0 = time.perf_counter()
        logits, cache = G.prefill_fn(params, tokens, start, cfg, base, compiled=programs)
        _sync((logits, cache))
        run["ttft_s"] = time.perf_counter() - t0
        prefill_s = (n, run["ttft_s"])
        run["peak_after_prefill_bytes"] = stats().get("peak_bytes_in_use")
        run["prompt_kv_memory_kind"] = cache.memory_kind
        est = memory.estimate(cfg, n, base, dtype=str(dtype), phase="prefill", new_tokens=new)
        run["estimate_prefill_device_bytes"] = est["device_bytes"]
        key = f"{name}/{n}"
        if key in predicted.get("memory", {}):
            run["predicted_h200"] = predicted["memory"][key]
        emit(PARTIAL, out)

        decodes = [base]
        if name == "mom-stream":
            plan = momjax.plan(cfg, hbm_bytes=limit or 2**40, host_bytes=None, dtype=str(dtype), target=target,
                               source="estimate", context=n, new_tokens=new)
            planned = plan["decode"]["mom-stream"].get("kv_device_layers") or 0
            run["planner_kv_device_layers"] = planned
            decodes = [base.replace(kv_device_layers=0)] + ([base.replace(kv_device_layers=planned)] if planned else [])
        run["decode"] = []
        for policy in decodes:
            d = {"kv_device_layers": policy.kv_device_layers}
            run["decode"].append(d)
            step = memory.estimate(cfg, padded, policy, dtype=str(dtype), phase="decode", new_tokens=new)
            d["predicted"] = memory.decode_speed(step, target)
            d["host_to_device_bytes_per_step"] = step["host_to_device_bytes"]
            d["estimate_decode_device_bytes"] = step["device_bytes"]
            secs = step["host_to_device_bytes"] * new / 20e9 + margin  # at a pessimistic 20 GB/s, + compile
            if secs > clock.left():
                d["skipped"] = f"needs about {secs:.0f} s; {clock.left():.0f} s left"
                emit(PARTIAL, out)
                continue
            placed = place_for_decode(cache, policy)
            t0 = time.perf_counter()
            placed = _sync(placed)
            d["place_for_decode_s"] = time.perf_counter() - t0
            # momjax's one decode loop, all tokens in one chunk (as generate runs it); never stops early
            decoding = DecodeStats()
            chunks = decode_stream(params, placed, logits, Sampling(), cfg, policy, new, stats=decoding,
                                   streamed=False)
            toks = np.concatenate(list(chunks), axis=1)
            d["decode_compile_s"] = decoding.decode_compile_s
            d["decode_s"] = decoding.decode_s  # the steps after the first token, compilation excluded
            d["decode_tokens_per_s"] = (new - 1) / d["decode_s"]
            d["first_tokens"] = toks[0, :8].tolist()
            d["peak_after_decode_bytes"] = stats().get("peak_bytes_in_use")
            if step["host_to_device_bytes"]:
                d["host_to_device_GBps_achieved"] = step["host_to_device_bytes"] * (new - 1) / d["decode_s"] / 1e9
            del placed
            emit(PARTIAL, out)
        del cache, logits
    return out


def child_transformers(spec: dict) -> dict:
    from gpu_long_context import worker_transformers

    return worker_transformers({"tiny": spec["tiny"], "seq_len": spec["seq_len"], "new_tokens": spec["new_tokens"],
                                "dtype": "float32" if spec["tiny"] else "bfloat16"})


def child_cudnn(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from momjax.attention import blockwise_attention

    tiny = spec["tiny"]
    S, H, K, E = (512, 4, 2, 32) if tiny else (32768, 32, 8, 128)
    dtype = jnp.float32 if tiny else jnp.bfloat16
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (1, S, H, E), dtype)
    k = jax.random.normal(keys[1], (1, S, K, E), dtype)
    v = jax.random.normal(keys[2], (1, S, K, E), dtype)
    start = jnp.zeros((1,), jnp.int32)
    ours = jax.jit(lambda q, k, v: blockwise_attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), 0, start))
    out = {"shape": dict(S=S, H=H, K=K, E=E, dtype=str(jnp.dtype(dtype)))}

    def time_it(fn):
        _sync(fn(q, k, v))
        ts = []
        for _ in range(3 if tiny else 5):
            t0 = time.perf_counter()
            _sync(fn(q, k, v))
            ts.append(time.perf_counter() - t0)
        return _median(ts)

    t0 = time.perf_counter()
    ref = np.asarray(ours(q, k, v), np.float32)
    out["momjax_first_call_s"] = time.perf_counter() - t0
    out["momjax_s"] = time_it(ours)
    # 4 S^2 H E / 2 FLOPs for causal attention (two matmuls, half the square)
    out["momjax_TFLOPs"] = 2 * S * S * H * E / out["momjax_s"] / 1e12
    emit(PARTIAL, out)
    for impl in ("cudnn", None):
        label = impl or "xla"
        if impl is None and not tiny:
            continue  # XLA's implementation builds the S x S scores: 128 GiB at 32k
        try:
            fn = jax.jit(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                                 implementation=impl))
            other = np.asarray(fn(q, k, v), np.float32)
            out[label] = {"runs": True, "rel_err_vs_momjax": float(np.linalg.norm(other - ref) / np.linalg.norm(ref)),
                          "seconds": time_it(fn)}
            out[label]["TFLOPs"] = 2 * S * S * H * E / out[label]["seconds"] / 1e12
            out[label]["momjax_over_it"] = out["momjax_s"] / out[label]["seconds"]
        except Exception as e:  # noqa: BLE001 - "does it run here" is the question
            out[label] = {"runs": False, "error": f"{type(e).__name__}: {str(e)[:600]}"}
        emit(PARTIAL, out)
    # momjax's attention with larger blocks (MemoryPolicy q_block / kv_block): fewer, larger matmuls per layer.
    out["momjax_blocks"] = {}
    for qb, kb in ((128, 128), (256, 256)) if tiny else ((1024, 1024), (2048, 2048), (1024, 4096)):
        fn = jax.jit(lambda q, k, v, qb=qb, kb=kb: blockwise_attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2),
                                                                      0, start, q_block=qb, kv_block=kb))
        try:
            got = np.asarray(fn(q, k, v), np.float32)
            secs = time_it(fn)
            out["momjax_blocks"][f"{qb}x{kb}"] = {"seconds": secs, "TFLOPs": 2 * S * S * H * E / secs / 1e12,
                                                  "rel_err_vs_512": float(np.linalg.norm(got - ref) / np.linalg.norm(ref))}
        except Exception as e:  # noqa: BLE001
            out["momjax_blocks"][f"{qb}x{kb}"] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
        emit(PARTIAL, out)
    return out


def child_programs(spec: dict) -> dict:
    """Where a streamed decode keeps its K/V: the mom-stream (every layer streamed) decode step and decode loop
    compiled on this device, their memory analysis, the peak each reaches when run over a host-resident cache,
    and their optimized HLO (written beside the JSON, to read without a GPU)."""
    import gzip

    import jax
    import jax.numpy as jnp
    from gpu_long_context import _random_params

    import momjax
    import momjax.model
    from momjax.cache import KVCache, sharding
    from momjax.checks import Sampling
    from momjax.decoding import decode_program

    tiny = spec["tiny"]
    cfg = model_config(tiny)
    dtype = jnp.dtype("float32" if tiny else "bfloat16")
    S = 256 if tiny else 32768
    new = spec["new_tokens"]
    policy = momjax.get_policy("mom-stream").replace(kv_device_layers=0)
    dev = jax.devices()[0]
    stats = lambda: dev.memory_stats() or {}
    params = _random_params(cfg, dtype)
    L, K, E = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    make = jax.jit(lambda key: jax.random.normal(key, (1, K, S, E), dtype))
    host = lambda l: jax.device_put(make(jax.random.PRNGKey(l)), sharding("pinned_host"))
    ks = tuple(_sync(host(2 * l)) for l in range(L))
    vs = tuple(_sync(host(2 * l + 1)) for l in range(L))
    start = jnp.zeros((1,), jnp.int32)
    cache = KVCache.from_prompt(ks, vs, start)
    out = {"seq_len": S, "layer_kv_bytes": 2 * K * S * E * dtype.itemsize, "weights_bytes": stats().get("bytes_in_use"),
           "peak_before_bytes": stats().get("peak_bytes_in_use"), "prompt_kv_memory_kind": cache.memory_kind}
    emit(PARTIAL, out)

    def analysis(compiled):
        ma = compiled.memory_analysis()
        return {k: getattr(ma, k) for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                                            "alias_size_in_bytes", "host_argument_size_in_bytes",
                                            "host_output_size_in_bytes", "host_temp_size_in_bytes")
                if hasattr(ma, k)}

    def save_text(name, compiled):
        path = os.path.join(spec["out_dir"], f"{name}.hlo.txt.gz")
        with gzip.open(path, "wt") as f:
            f.write(compiled.as_text())
        return os.path.basename(path)

    token = jnp.zeros((1,), jnp.int32)
    step_cache = cache.with_tail(new)
    t0 = time.perf_counter()
    # decode_step_fn donates its cache; this one does not, so the host K/V stay for the loop below.
    keep = jax.jit(momjax.model.decode_step, static_argnames=("cfg", "policy"))
    step = keep.lower(params, token, step_cache, cfg=cfg, policy=policy).compile()
    out["step"] = {"compile_s": time.perf_counter() - t0, "memory_analysis": analysis(step),
                   "hlo": save_text("decode_step_mom_stream", step)}
    emit(PARTIAL, out)
    logits, _ = step(params, token, step_cache)
    _sync(logits)
    out["step"]["peak_after_bytes"] = stats().get("peak_bytes_in_use")
    emit(PARTIAL, out)

    loop_cache = cache.with_tail(new)
    fn, args, static = decode_program(params, loop_cache, token, jnp.zeros((1,), bool), Sampling().program_args(), cfg,
                                      policy, new - 1)
    t0 = time.perf_counter()
    loop = fn.lower(*args, **static).compile()
    out["loop"] = {"compile_s": time.perf_counter() - t0, "memory_analysis": analysis(loop),
                   "hlo": save_text("decode_loop_mom_stream", loop)}
    emit(PARTIAL, out)
    limit = jnp.int32(new)
    toks = loop(*args[:7], limit, *args[8:10], *args[11:])[0]  # the compiled program takes no static top_k
    _sync(toks)
    out["loop"]["peak_after_bytes"] = stats().get("peak_bytes_in_use")
    return out


CHILDREN = {"env": child_env, "programs": child_programs, "exact": child_exact, "long": child_long, "transformers": child_transformers,
            "cudnn": child_cudnn}


def run_child_main(stage: str, spec: dict) -> int:
    t0 = time.perf_counter()
    try:
        out = CHILDREN[stage](spec)
        out["ok"] = out.get("ok", True)
    except BaseException as e:  # noqa: BLE001 - recorded, and the parent goes on
        out = {"ok": False, "error_type": type(e).__name__, "error": str(e)[:3000],
               "traceback": traceback.format_exc()[-4000:]}
    out["wall_s"] = time.perf_counter() - t0
    emit(RESULT, out)
    return 0


# ---------------------------------------------------------------------- parent side


def child_process_env() -> dict:
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch and jax children never fight over memory
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    env.setdefault("XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB", "96")  # pinned host pool (XLA's default is 64 GB)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_children(stage: str, specs: list[dict], timeout: float) -> list[dict]:
    """Run one stage's processes side by side (one per spec), each a fresh process. A crash, a timeout or an
    exception comes back as a result, with the last partial results the child reported."""
    t0 = time.perf_counter()
    deadline = time.time() + timeout
    procs = []
    for spec in specs:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", stage, json.dumps({**spec, "deadline": deadline - 5})]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=child_process_env()))
    results = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=max(deadline - time.time(), 1))
            code = proc.returncode
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            code = "timeout"
        result, partial = None, None
        for line in stdout.splitlines():
            if line.startswith(RESULT):
                result = json.loads(line[len(RESULT):])
            elif line.startswith(PARTIAL):
                partial = json.loads(line[len(PARTIAL):])
        if result is None:
            result = {**(partial or {}), "ok": False, "error_type": "timeout" if code == "timeout" else "crash",
                      "error": f"the stage's process ended ({code}) without a result after "
                               f"{time.perf_counter() - t0:.0f} s", "stderr_tail": stderr[-3000:]}
        elif not result.get("ok"):
            result["stderr_tail"] = stderr[-3000:]
        result["process_s"] = round(time.perf_counter() - t0, 1)
        results.append(result)
    return results


def run_child(stage: str, spec: dict, timeout: float) -> dict:
    return run_children(stage, [spec], timeout)[0]


def predict(lengths, new_tokens: int, path: str = PREDICTIONS) -> dict:
    """The figures the GPU run is compared with, made without a GPU (XLA's GPU compiler, deviceless, for the
    `h200` target; needs `pip install -e ".[gpu-plan]"`): memory_report for each policy and length, both phases,
    and the decode roofline of each decode step (mom-stream: every layer streamed, and every layer resident)."""
    import momjax
    from momjax import memory

    cfg = model_config(False)
    out = {"target": "h200", "dtype": "bfloat16", "new_tokens": new_tokens, "memory": {}, "made_with":
           "python benchmarks/gpu_check.py --predict (XLA's GPU compiler, deviceless)", "jax": __import__("jax").__version__}
    for name in POLICY_NAMES:
        for n in lengths:
            t0 = time.perf_counter()
            pre = momjax.memory_report(cfg, n, name, dtype="bfloat16", phase="prefill", target="h200")
            entry = {"prefill_device_bytes": pre["device_bytes"], "prefill_host_bytes": pre["host_bytes"],
                     "decode": {}}
            policies = [momjax.get_policy(name)]
            if name == "mom-stream":
                policies = [p.replace(kv_device_layers=k) for p in policies for k in (0, cfg.num_layers)]
            for policy in policies:
                padded = __import__("momjax.generation", fromlist=["x"]).bucket_length(n, policy)
                dec = momjax.memory_report(cfg, padded, policy, dtype="bfloat16", phase="decode", target="h200",
                                           new_tokens=new_tokens)
                entry["decode"][str(policy.kv_device_layers)] = {
                    "device_bytes": dec["device_bytes"], "host_bytes": dec["host_bytes"],
                    "host_to_device_bytes": dec["host_to_device_bytes"], "device_read_bytes": dec["device_read_bytes"],
                    **memory.decode_speed(dec, "h200")}
            out["memory"][f"{name}/{n}"] = entry
            print(f"{name} {n}: {time.perf_counter() - t0:.0f} s", flush=True)
            with open(path, "w") as f:
                json.dump(out, f, indent=1)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:
        return run_child_main(argv[1], json.loads(argv[2]))
    if argv[:1] == ["--predict"]:
        predict([32768, 131072], 32)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="where gpu_check.json goes")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on a CPU: tests the script")
    parser.add_argument("--budget-s", type=float, help="seconds for the whole check (default 330; tiny 100)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--lengths", nargs="+", type=int, help="prompt lengths of the long stage "
                        "(default 32768 131072; tiny 256 512)")
    parser.add_argument("--policies", nargs="+", choices=POLICY_NAMES, default=list(POLICY_NAMES),
                        help="the long stage's policies, in this order (mom-stream's process also decodes as mom)")
    parser.add_argument("--families", nargs="+", choices=EXACT_FAMILIES, help="the exact stage's families")
    args = parser.parse_args(argv)

    tiny = args.tiny
    budget = args.budget_s or (100 if tiny else 330)
    t_start = time.time()
    end = t_start + budget
    lengths = args.lengths or ([256, 512] if tiny else [32768, 131072])
    new_tokens = 8 if tiny else 32
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "gpu_check.json")
    from provenance import git_state

    results = {"command": " ".join(["python", "benchmarks/gpu_check.py"] + argv),
               "tiny": tiny, "budget_s": budget, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
               "git": git_state(), "new_tokens": new_tokens, "lengths": lengths, "stages": {}}

    def save():
        results["elapsed_s"] = round(time.time() - t_start, 1)
        with open(path + ".tmp", "w") as f:
            json.dump(results, f, indent=1, default=str)
        os.replace(path + ".tmp", path)

    def log(*a):
        print(f"[{time.time() - t_start:6.1f} s]", *a, flush=True)

    def cap(stage: str) -> float:
        """This stage's time: its share of the budget, or what is left less the minimum the later stages need."""
        later = [s for s in STAGES if s in args.stages and STAGES.index(s) > STAGES.index(stage)]
        reserve = sum(min(SHARES[s] * budget, 40 if not tiny else 10) for s in later)
        chosen = sum(SHARES[s] for s in args.stages)
        share = float("inf") if tiny else SHARES[stage] / chosen * budget  # tiny: take what the others leave
        return max(min(share, end - time.time() - reserve), 0)

    log(f"gpu_check: {'tiny, CPU' if tiny else 'GPU'}; budget {budget:.0f} s; results -> {path}")
    base = {"tiny": tiny, "new_tokens": new_tokens}
    for stage in STAGES:
        if stage not in args.stages:
            continue
        if stage == "long":
            results["stages"]["long"] = {}
            policies = list(args.policies)
            for i, name in enumerate(policies):
                left = cap("long") / (len(policies) - i) if not tiny else cap("long")
                if left < 15:
                    results["stages"]["long"][name] = {"ok": False, "skipped": f"{left:.0f} s left"}
                    continue
                log(f"long: {name}, {lengths}, up to {left:.0f} s")
                r = run_child("long", {**base, "policy": name, "lengths": lengths}, left)
                results["stages"]["long"][name] = r
                log(f"  -> {summary_long(r)}")
                save()
            continue
        t = cap(stage)
        if t < (3 if tiny else 10):
            results["stages"][stage] = {"ok": False, "skipped": f"{t:.0f} s left"}
            save()
            continue
        log(f"{stage}: up to {t:.0f} s")
        spec = dict(base, out_dir=os.path.abspath(args.out_dir))
        if stage == "transformers":
            spec["seq_len"] = lengths[0]
        if stage == "exact":  # one process per family, side by side: compiling is most of the work
            families = args.families or (EXACT_FAMILIES if not tiny else EXACT_FAMILIES[:1])
            parts = run_children(stage, [{**spec, "families": [f]} for f in families], t)
            r = {"families": {f: part.get("families", {}).get(f, part) for f, part in zip(families, parts)},
                 "process_s": max(part.get("process_s", 0) for part in parts)}
            for part in parts:
                for k in ("torch_device", "jax_backend", "matmul_precision", "new_tokens"):
                    if k in part:
                        r[k] = part[k]
            r["ok"] = all(part.get("ok") for part in parts)
        else:
            r = run_child(stage, spec, t)
        results["stages"][stage] = r
        log(f"  -> ok={r.get('ok')} in {r.get('process_s')} s" + ("" if r.get("ok") else
                                                                    f": {r.get('error_type')}: {str(r.get('error'))[:300]}"))
        save()
    results["ok"] = all(all(rr.get("ok") for rr in r.values()) if stage == "long" else r.get("ok")
                        for stage, r in results["stages"].items())
    save()
    print(table(results))
    log(f"wrote {path}")
    return 0


def summary_long(r: dict) -> str:
    if not r.get("ok"):
        return f"FAILED {r.get('error_type')}: {str(r.get('error'))[:300]}"
    parts = []
    for run in r.get("runs", []):
        if "ttft_s" not in run:
            parts.append(f"{run['seq_len']}: {run.get('skipped', '?')}")
            continue
        dec = ", ".join(f"kdl={d['kv_device_layers']}: {d.get('decode_tokens_per_s', 0):.1f} tok/s"
                        if "decode_s" in d else f"kdl={d['kv_device_layers']}: {d.get('skipped')}"
                        for d in run.get("decode", []))
        parts.append(f"{run['seq_len']}: ttft {run['ttft_s']:.2f} s, peak {run['peak_after_prefill_bytes']} [{dec}]")
    return "; ".join(parts)


def table(results: dict) -> str:
    """A short text table of the main figures (the run's last lines)."""
    lines = ["", "stage          ok     seconds"]
    for stage, r in results["stages"].items():
        if stage == "long":
            for name, rr in r.items():
                lines.append(f"long/{name:<9} {rr.get('ok')!s:<6} {rr.get('process_s', '-')}")
                if rr.get("ok"):
                    lines.append("    " + summary_long(rr))
        else:
            lines.append(f"{stage:<14} {r.get('ok')!s:<6} {r.get('process_s', '-')}"
                         + ("" if r.get("ok") else f"  {r.get('error_type')}: {str(r.get('error'))[:200]}"))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
