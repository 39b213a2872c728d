"""The demo model: a small random Llama written as a Hugging Face checkpoint offline, converted and cached.

The first use writes a Hugging Face style checkpoint (config.json, generation_config.json, model.safetensors
and a byte-level tokenizer) built with numpy and the `tokenizers` library, so torch is not needed, and
converts it to an Orbax folder with `momjax.convert`; both are cached under `$MOMJAX_CACHE/demo` (default
`~/.cache/momjax/demo`). `momjax demo` (momjax.cli.demo) runs every policy on it; the notebooks and README's
example use it offline.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np

from momjax.convert import convert

DEMO_VERSION = 4  # bump when the checkpoint below changes, so stale caches are rebuilt
SHAPES = {"hidden": 256, "layers": 4, "heads": 4, "kv_heads": 2, "head_dim": 64, "ffn": 768, "max_position": 4096}
SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
BOS_ID, EOS_ID = 256, 257  # byte b is token b; the special tokens follow the 256 bytes
VOCAB = 256 + len(SPECIAL_TOKENS)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
DEFAULT_PROMPT = "Mini-sequences keep long prompts on one accelerator."


def cache_root() -> str:
    """$MOMJAX_CACHE, or ~/.cache/momjax."""
    return os.environ.get("MOMJAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "momjax")


def demo_dir() -> str:
    return os.path.join(cache_root(), "demo")


# ---------------------------------------------------------------------- the checkpoint, without torch


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (what ByteLevel uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_tokenizer():
    """A byte-level BPE tokenizer without merges: token b is byte b, then the special tokens. Adds BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {ch: b for b, ch in byte_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL_TOKENS[0]} $A", pair=f"{SPECIAL_TOKENS[0]} $A $B", special_tokens=[(SPECIAL_TOKENS[0], BOS_ID)]
    )
    assert tok.get_vocab_size() == VOCAB and tok.token_to_id(SPECIAL_TOKENS[1]) == EOS_ID
    return tok


def random_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Hugging Face tensor names (from momjax.hf.tensors' one table) -> random float32 arrays in the HF layout,
    scaled so activations stay O(1)."""
    from momjax.hf.config import from_hf
    from momjax.hf.tensors import expected_tensors

    rng = np.random.default_rng(seed)
    weights = {}
    for name, slot in expected_tensors(from_hf(hf_config())).items():
        shape = slot.hf_shape
        if slot.leaf == "embed":
            w = rng.standard_normal(shape, np.float32)
        elif slot.leaf.endswith("norm"):
            w = 1.0 + 0.1 * rng.standard_normal(shape, np.float32)
        else:  # a torch Linear weight [out, in]
            w = rng.standard_normal(shape, np.float32) * shape[-1] ** -0.5
        weights[name] = w.astype(np.float32)
    head = weights["lm_head.weight"] * 4.0  # sharper next-token distributions than a flat random head
    printable = [b for b in range(128) if chr(b).isalnum() or chr(b) in " .,"]
    head[np.setdiff1d(np.arange(VOCAB), printable)] *= 0.1  # so the noise it generates is readable noise
    weights["lm_head.weight"] = head
    return weights


def hf_config() -> dict:
    s = SHAPES
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
        "hidden_size": s["hidden"], "intermediate_size": s["ffn"], "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"], "num_key_value_heads": s["kv_heads"], "head_dim": s["head_dim"],
        "hidden_act": "silu", "max_position_embeddings": s["max_position"], "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "torch_dtype": "float32",
    }


def write_checkpoint(folder: str, seed: int = 0) -> str:
    """Write the demo model as a Hugging Face checkpoint folder (what `momjax.load` and `convert` read)."""
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)

    def dump(name, obj):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(obj, f, indent=2)

    dump("config.json", hf_config())
    dump("generation_config.json", {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "do_sample": False})
    save_file(random_weights(seed), os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    build_tokenizer().save(os.path.join(folder, "tokenizer.json"))
    dump("tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIAL_TOKENS[0], "eos_token": SPECIAL_TOKENS[1],
        "model_max_length": SHAPES["max_position"], "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    })
    dump("special_tokens_map.json", {"bos_token": SPECIAL_TOKENS[0], "eos_token": SPECIAL_TOKENS[1]})
    return folder


def prepare(root: str | None = None, rebuild: bool = False, log=print) -> str:
    """The demo's Orbax folder, building and converting the checkpoint on first use. Returns its path."""
    root = root or demo_dir()
    stamp = os.path.join(root, "VERSION")
    orbax_dir = os.path.join(root, "orbax")
    current = False
    if os.path.isfile(stamp):
        with open(stamp) as f:
            current = f.read().strip() == str(DEMO_VERSION)
    if current and os.path.isdir(orbax_dir) and not rebuild:
        return orbax_dir
    if os.path.isdir(root):
        shutil.rmtree(root)
    # Build in a scratch folder and rename it into place, so an interrupted first run leaves no half cache.
    scratch = f"{root}.tmp-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    t0 = time.perf_counter()
    hf_dir = write_checkpoint(os.path.join(scratch, "hf"))
    log(f"  wrote a Hugging Face checkpoint ({time.perf_counter() - t0:.1f} s)")
    t0 = time.perf_counter()
    convert(hf_dir, os.path.join(scratch, "orbax"), progress=False)
    log(f"  converted it to Orbax with momjax.convert ({time.perf_counter() - t0:.1f} s)")
    with open(os.path.join(scratch, "VERSION"), "w") as f:
        f.write(f"{DEMO_VERSION}\n")
    os.makedirs(os.path.dirname(root) or ".", exist_ok=True)
    os.replace(scratch, root)
    return orbax_dir
