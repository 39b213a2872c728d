"""Peak memory of the HF -> Orbax converter, and load time from Orbax vs from safetensors.

Builds a random Llama-3.2-1B-shaped bfloat16 checkpoint offline (hidden 2048, 16 layers, 32 heads / 8 KV
heads, head_dim 64, ffn 8192, vocab 128256, tied embeddings: ~2.5 GB in ~1 GB shards with an index), written
with safetensors straight from numpy, so no torch model is ever built. Then, each in its own subprocess:

- baseline: an interpreter that imports jax, orbax and momjax and starts the JAX backend;
- convert: `python convert/hf_to_orbax.py SRC DST`;
- load: `momjax.load` from the Orbax folder and from the safetensors folder (timed inside the child,
  imports excluded), alternating, `--repeats` times each.

The peak RSS of each child comes from os.wait4, which reports that one child's ru_maxrss. On Linux a child's
ru_maxrss starts at its parent's RSS when it is spawned, so this parent stays small (the checkpoint is built
in a child too) and records its own peak to show it is below every child's. The converter's
figure of merit is (peak - baseline) / checkpoint bytes; the target is below 40%: a converter that held the
whole model would be at 100% or more. Prints a JSON summary and writes benchmarks/results/convert_rss.json.

--gguf measures the GGUF converter the same way: a GGUF file of the same shapes, every matrix Q8_0 (random
blocks, 1.3 GB; norms F32; no tokenizer metadata), written tensor by tensor with the gguf package's writer,
converted to bfloat16 (`hf_to_orbax.py model.gguf DST --dtype bfloat16`), and loaded with momjax.load
(bfloat16). Its figure of merit is the extra RSS over the bfloat16 model it produces (2.5 GB), and over the
file. Writes benchmarks/results/convert_rss_gguf.json.

    python benchmarks/convert_rss.py [--keep-dir DIR] [--repeats 2] [--gguf]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results", "convert_rss.json")
TARGET_RATIO = 0.40
SHARD_BYTES = 1 << 30

# Llama 3.2 1B shapes, hub spelling of config.json.
HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 64, "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "attention_bias": False, "mlp_bias": False,
}


def hf_tensor_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """HF name -> shape, in the order save_pretrained writes them."""
    D, F, E = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    H, K = c["num_attention_heads"], c["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], D)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (H * E, D), p + "self_attn.k_proj.weight": (K * E, D),
            p + "self_attn.v_proj.weight": (K * E, D), p + "self_attn.o_proj.weight": (D, H * E),
            p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D), p + "mlp.down_proj.weight": (D, F),
        })
    shapes["model.norm.weight"] = (D,)
    return shapes


def random_bf16(rng, shape) -> np.ndarray:
    """Random bfloat16 bits with the top exponent bit cleared: finite values below 2 in magnitude."""
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16) & np.uint16(0xBFFF)
    return bits.view(ml_dtypes.bfloat16)


def build_checkpoint(folder: str, seed: int = 0) -> int:
    """Write config.json, generation_config.json, ~1 GB shards and the index; return the weight bytes."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    shapes = hf_tensor_shapes(HF_CONFIG)
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * 2
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for k, names in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: random_bf16(rng, shapes[n]) for n in names}
        save_file(tensors, os.path.join(folder, file), metadata={"format": "pt"})
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update(dict.fromkeys(names, file))
        del tensors
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(HF_CONFIG, f, indent=2)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}, f)
    return total


def run_child(args: list[str]) -> dict:
    """Run a child process; return its wall time, peak RSS (os.wait4) and the JSON it printed last, if any."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(args, cwd=REPO, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (RUSAGE_CHILDREN would be the max of all)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        out, err = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{err[-3000:]}")
    result = {"wall_s": round(wall, 3), "peak_rss_bytes": usage.ru_maxrss * 1024}  # Linux: ru_maxrss in KiB
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if lines:
        result.update(json.loads(lines[-1]))
    return result


BASELINE = "import jax, orbax.checkpoint, momjax, momjax.hf.tensors, momjax.convert; jax.devices()"
BASELINE_GGUF = BASELINE + "; import gguf, momjax.gguf"
LOAD = """
import json, sys, time, jax, momjax
t = time.perf_counter()
model = momjax.load(sys.argv[1], progress=False)
jax.block_until_ready(model.params)
print(json.dumps({"load_s": round(time.perf_counter() - t, 3)}))
"""
LOAD_BF16 = LOAD.replace("progress=False", "dtype='bfloat16', progress=False")


def build_gguf(path: str, seed: int = 0) -> int:
    """Write a Llama-3.2-1B-shaped GGUF file: matrices Q8_0 (random int8 blocks, float16 scales near 0.01),
    norms F32, tensor by tensor (only one tensor in memory); return the file's size."""
    import gguf

    c = HF_CONFIG
    rng = np.random.default_rng(seed)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    tensors = []
    for hf, shape in hf_tensor_shapes(c).items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", hf)
        tensors.append((names[hf] if m is None else f"blk.{m.group(1)}.{layer[m.group(2)]}.weight", shape))
    q8 = gguf.GGMLQuantizationType.Q8_0
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_rope_freq_base(c["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_rope_dimension_count(c["head_dim"])
    w.add_vocab_size(c["vocab_size"])
    for name, shape in tensors:
        if len(shape) == 1:
            w.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
        else:
            w.add_tensor_info(name, (shape[0], shape[1] // 32 * 34), np.dtype(np.uint8), shape[0] * shape[1] // 32 * 34,
                              raw_dtype=q8)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, shape in tensors:
        if len(shape) == 1:
            w.write_tensor_data(np.ones(shape, np.float32))
            continue
        blocks = rng.integers(-127, 128, size=(shape[0], shape[1] // 32, 34), dtype=np.int8).view(np.uint8)
        blocks[..., :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
        w.write_tensor_data(blocks.reshape(shape[0], -1))
        del blocks
    w.close()
    return os.path.getsize(path)


def main_gguf(args) -> dict:
    """--gguf: the GGUF converter's peak RSS, and load time and peak from the GGUF file and from its conversion."""
    work = args.keep_dir or tempfile.mkdtemp(prefix="momjax-convert-rss-gguf-", dir="/tmp")
    src, dst = os.path.join(work, "model.gguf"), os.path.join(work, "orbax")
    try:
        os.makedirs(work, exist_ok=True)
        build = run_child([sys.executable, __file__, "--build-gguf", src])
        if os.path.exists(dst):
            shutil.rmtree(dst)
        baseline = run_child([sys.executable, "-c", BASELINE_GGUF])
        conv = run_child([sys.executable, "convert/hf_to_orbax.py", src, dst, "--dtype", "bfloat16", "--quiet"])
        loads = {"orbax": [], "gguf": []}
        for _ in range(args.repeats):
            loads["orbax"].append(run_child([sys.executable, "-c", LOAD, dst]))
            loads["gguf"].append(run_child([sys.executable, "-c", LOAD_BF16, src]))
        model_bytes = sum(int(np.prod(s)) * 2 for s in hf_tensor_shapes(HF_CONFIG).values())
        leaf_bytes = {}
        for name, shape in hf_tensor_shapes(HF_CONFIG).items():
            leaf = re.sub(r"layers\.\d+\.", "layers.", name)
            leaf_bytes[leaf] = leaf_bytes.get(leaf, 0) + int(np.prod(shape)) * 2
        extra = conv["peak_rss_bytes"] - baseline["peak_rss_bytes"]
        summary = {
            "benchmark": "convert_rss_gguf",
            "command": "python benchmarks/convert_rss.py --gguf",
            "model": "random Llama-3.2-1B shapes, GGUF: matrices Q8_0, norms F32, tied embeddings; converted to "
                     "bfloat16",
            "gguf_bytes": build["gguf_bytes"],
            "bfloat16_model_bytes": model_bytes,
            "largest_leaf_bytes": max(leaf_bytes.values()),
            "baseline_peak_rss_bytes": baseline["peak_rss_bytes"],
            "convert_peak_rss_bytes": conv["peak_rss_bytes"],
            "convert_extra_rss_bytes": extra,
            "convert_extra_over_bfloat16_model": round(extra / model_bytes, 4),
            "convert_extra_over_gguf_file": round(extra / build["gguf_bytes"], 4),
            "largest_leaf_over_bfloat16_model": round(max(leaf_bytes.values()) / model_bytes, 4),
            "target_ratio": TARGET_RATIO,
            "meets_target": extra / model_bytes < TARGET_RATIO,
            "convert_wall_s": conv["wall_s"],
            "orbax_bytes": sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(dst) for f in fs),
            "load_s": {fmt: [r["load_s"] for r in runs] for fmt, runs in loads.items()},
            "load_peak_rss_bytes": {fmt: max(r["peak_rss_bytes"] for r in runs) for fmt, runs in loads.items()},
            "gguf_build_s": build["wall_s"],
            "parent_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "jax": version("jax"), "orbax_checkpoint": version("orbax-checkpoint"), "gguf": version("gguf"),
                        "backend": "cpu", "page_cache": "warm (file just written)",
                        "load_average_1min_at_end": round(os.getloadavg()[0], 2)},
        }
    finally:
        if not args.keep_dir:
            shutil.rmtree(work, ignore_errors=True)
    out = RESULTS.replace("convert_rss.json", "convert_rss_gguf.json")
    with open(out, "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    print(json.dumps(summary, indent=2))
    return summary


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep-dir", help="build the checkpoints here and keep them (default: a /tmp folder, deleted)")
    parser.add_argument("--repeats", type=int, default=2, help="load timings per format")
    parser.add_argument("--gguf", action="store_true", help="measure the GGUF converter (a Q8_0 file) instead")
    parser.add_argument("--build", metavar="DIR", help=argparse.SUPPRESS)  # internal: build the checkpoint only
    parser.add_argument("--build-gguf", metavar="FILE", help=argparse.SUPPRESS)  # internal: build the GGUF file only
    args = parser.parse_args(argv)
    if args.build:
        print(json.dumps({"checkpoint_bytes": build_checkpoint(args.build)}))
        return {}
    if args.build_gguf:
        print(json.dumps({"gguf_bytes": build_gguf(args.build_gguf)}))
        return {}
    if args.gguf:
        return main_gguf(args)

    work = args.keep_dir or tempfile.mkdtemp(prefix="momjax-convert-rss-", dir="/tmp")
    src, dst = os.path.join(work, "hf"), os.path.join(work, "orbax")
    try:
        build = run_child([sys.executable, __file__, "--build", src])
        ckpt_bytes = build["checkpoint_bytes"]
        if os.path.exists(dst):
            shutil.rmtree(dst)

        baseline = run_child([sys.executable, "-c", BASELINE])
        conv = run_child([sys.executable, "convert/hf_to_orbax.py", src, dst, "--quiet"])
        loads = {"orbax": [], "safetensors": []}
        for _ in range(args.repeats):
            for fmt, path in (("orbax", dst), ("safetensors", src)):
                loads[fmt].append(run_child([sys.executable, "-c", LOAD, path]))

        leaf_bytes = {}  # our stacked leaves: each HF per-layer name summed over the layers
        for name, shape in hf_tensor_shapes(HF_CONFIG).items():
            leaf = re.sub(r"layers\.\d+\.", "layers.", name)
            leaf_bytes[leaf] = leaf_bytes.get(leaf, 0) + int(np.prod(shape)) * 2
        largest_leaf = max(leaf_bytes.values())
        extra = conv["peak_rss_bytes"] - baseline["peak_rss_bytes"]
        summary = {
            "benchmark": "convert_rss",
            "command": "python benchmarks/convert_rss.py",
            "model": "random Llama-3.2-1B shapes, bfloat16, tied embeddings, "
                     f"{sum(f.endswith('.safetensors') for f in os.listdir(src))} safetensors shards",
            "checkpoint_bytes": ckpt_bytes,
            "largest_leaf_bytes": largest_leaf,
            "baseline_peak_rss_bytes": baseline["peak_rss_bytes"],
            "convert_peak_rss_bytes": conv["peak_rss_bytes"],
            "convert_extra_rss_bytes": extra,
            "convert_extra_over_checkpoint": round(extra / ckpt_bytes, 4),
            "largest_leaf_over_checkpoint": round(largest_leaf / ckpt_bytes, 4),
            "target_ratio": TARGET_RATIO,
            "meets_target": extra / ckpt_bytes < TARGET_RATIO,
            "convert_wall_s": conv["wall_s"],
            "orbax_bytes": sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(dst) for f in fs),
            "load_s": {fmt: [r["load_s"] for r in runs] for fmt, runs in loads.items()},
            "load_peak_rss_bytes": {fmt: max(r["peak_rss_bytes"] for r in runs) for fmt, runs in loads.items()},
            "checkpoint_build_s": build["wall_s"],
            "parent_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "jax": version("jax"), "orbax_checkpoint": version("orbax-checkpoint"),
                        "backend": "cpu", "page_cache": "warm (files just written)",
                        "load_average_1min_at_end": round(os.getloadavg()[0], 2)},
        }
    finally:
        if not args.keep_dir:
            shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
