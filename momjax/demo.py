"""`momjax demo`: the whole pipeline on a small random Llama, offline, in well under a minute; `momjax demo
--real`: a real trained model (SmolLM2-135M-Instruct, downloaded once) answering questions about a real
document held in a Session, with every memory policy.

The first run writes a Hugging Face style checkpoint (config.json, generation_config.json,
model.safetensors and a byte-level tokenizer) built with numpy and the `tokenizers` library, so torch is
not needed, and converts it to an Orbax folder with `momjax.convert`; both are cached under
`$MOMJAX_CACHE/demo` (default `~/.cache/momjax/demo`). Every run then loads the Orbax folder, generates
from a text prompt with each memory policy, checks that all policies produce the same tokens, and prints
the demo model's memory report and the context plan of Llama-3.1-8B on an 80 GiB accelerator.

`--real` (opt-in: it downloads 93 MB once) fetches SmolLM2-135M-Instruct's GGUF file (momjax.gguf.
fetch_smollm2), puts a long real document in a Session with each policy (the Apache License 2.0 text that
jax ships, about 2,200 tokens, or --document FILE), asks two questions with the model's chat template, and
prints the answers, which every policy must give identically, and the memory table for that document.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

DEMO_VERSION = 3  # bump when the checkpoint below changes, so stale caches are rebuilt
SHAPES = {"hidden": 256, "layers": 4, "heads": 4, "kv_heads": 2, "head_dim": 64, "ffn": 768, "max_position": 4096}
SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
BOS_ID, EOS_ID = 256, 257  # byte b is token b; the special tokens follow the 256 bytes
VOCAB = 256 + len(SPECIAL_TOKENS)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
DEFAULT_PROMPT = "Mini-sequences keep long prompts on one accelerator."
PLAN_PRESET, PLAN_HBM = "llama-3.1-8b", "80GiB"
REPORT_TOKENS = 4096


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
    """Hugging Face Llama tensor names -> random float32 arrays, scaled so activations stay O(1)."""
    s = SHAPES
    D, F, H, K, E = s["hidden"], s["ffn"], s["heads"], s["kv_heads"], s["head_dim"]
    rng = np.random.default_rng(seed)

    def dense(out_dim, in_dim):  # torch Linear layout [out, in]
        return (rng.standard_normal((out_dim, in_dim), np.float32) * in_dim**-0.5).astype(np.float32)

    def norm():
        return (1.0 + 0.1 * rng.standard_normal(D, np.float32)).astype(np.float32)

    w = {"model.embed_tokens.weight": rng.standard_normal((VOCAB, D), np.float32)}
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm()
        w[p + "self_attn.q_proj.weight"] = dense(H * E, D)
        w[p + "self_attn.k_proj.weight"] = dense(K * E, D)
        w[p + "self_attn.v_proj.weight"] = dense(K * E, D)
        w[p + "self_attn.o_proj.weight"] = dense(D, H * E)
        w[p + "post_attention_layernorm.weight"] = norm()
        w[p + "mlp.gate_proj.weight"] = dense(F, D)
        w[p + "mlp.up_proj.weight"] = dense(F, D)
        w[p + "mlp.down_proj.weight"] = dense(D, F)
    w["model.norm.weight"] = norm()
    head = dense(VOCAB, D) * 4.0  # sharper next-token distributions than a flat random head
    printable = [b for b in range(128) if chr(b).isalnum() or chr(b) in " .,"]
    head[np.setdiff1d(np.arange(VOCAB), printable)] *= 0.1  # so the noise it generates is readable noise
    w["lm_head.weight"] = head
    return w


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
    from momjax.convert import convert

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


# ---------------------------------------------------------------------- the demo


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:8.2f} MiB"


def run(prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 24, rebuild: bool = False, out=None) -> int:
    """Run the demo; returns 0 when every policy generated the same tokens, 1 otherwise."""
    out = out or sys.stdout

    def log(*a):
        print(*a, file=out, flush=True)

    import momjax
    from momjax import memory
    from momjax.params import param_bytes
    from momjax.tokenizer import load_tokenizer

    t_start = time.perf_counter()
    root = demo_dir()
    log(f"momjax demo: a random {SHAPES['layers']}-layer Llama (hidden {SHAPES['hidden']}, vocab {VOCAB}), "
        f"cached in {root}")
    path = prepare(root, rebuild=rebuild, log=log)
    policies = list(momjax.POLICIES)
    # Compilation dominates a first run and XLA compiles one program per thread: the memory reports compile
    # while the tokenizer loads, and the policies' programs compile side by side, so both cores work.
    with ThreadPoolExecutor(max_workers=len(policies)) as pool:
        tokenizer = pool.submit(load_tokenizer, path)
        model = momjax.load(path, progress=False)
        n_params = param_bytes(model.config, "float32") // 4
        log(f"  loaded {path}: {n_params / 1e6:.1f}M parameters, {model.dtype}")
        phases = [(p, ph) for p in policies for ph in ("prefill", "decode")]
        reports = [pool.submit(momjax.memory_report, model, REPORT_TOKENS, p, dtype="float32", phase=ph)
                   for p, ph in phases]
        tok = tokenizer.result()
        ids = tok.encode(prompt)
        log(f"\nprompt: {prompt!r} ({len(ids)} tokens); {max_new_tokens} new tokens, greedy, with each policy")
        t0 = time.perf_counter()
        gens = [pool.submit(momjax.generate, model, [ids], max_new_tokens, policy=p, stop_tokens=[]) for p in policies]
        results = {p: g.result().as_lists()[0] for p, g in zip(policies, gens)}
        for p in policies:
            log(f"  {p:<11} {results[p]}")
        log(f"  ({time.perf_counter() - t0:.1f} s, compilation included)")
        reference = results["baseline"]
        same = all(r == reference for r in results.values())
        if same:
            log(f"✓ all {len(results)} policies generated the same {len(reference)} tokens")
        else:
            differ = [p for p, r in results.items() if r != reference]
            log(f"✗ tokens differ from baseline for: {', '.join(differ)}")
        log(f"  text (random weights, so it is noise): {tok.decode(reference)!r}")

        log(f"\nmemory of the demo model with a {REPORT_TOKENS}-token prompt (float32, from the compiled programs):")
        log(f"  {'policy':<11} {'phase':<8} {'device':>12} {'host':>12} {'weights':>12} {'kv cache':>12} {'temp':>12}")
        for (p, ph), report in zip(phases, reports):
            r = report.result()
            cells = [_mib(r.get(k)) for k in ("device_bytes", "host_bytes", "weight_bytes", "kv_bytes", "temp_bytes")]
            log(f"  {p:<11} {ph:<8} " + " ".join(f"{c:>12}" for c in cells) + f"   ({r.get('source', '?')})")
        log("  prefill: mom and mom-stream run alike (mini-sequences, KV cache sent to the host layer by layer).\n"
            "  decode (one step): mom copies the KV cache back to the device, mom-stream leaves it on the host.\n"
            "  host = pinned host memory, the CPU RAM beside a GPU. On this CPU device and host are the same RAM;\n"
            "  the columns show how a GPU would split it.")

    log(f"\ncontext plan for {PLAN_PRESET} on {PLAN_HBM} of accelerator memory (bfloat16):")
    from momjax.cli import plan_notes

    plan_cfg = momjax.preset(PLAN_PRESET)
    plan = memory.plan(plan_cfg, memory.parse_bytes(PLAN_HBM), dtype="bfloat16")
    log(memory.plan_table(plan))
    for note in plan_notes(plan_cfg, plan):
        log(note)
    log(f"\ntry the demo model from the command line (random weights, so the text is noise):\n"
        f"  momjax generate --model {path} --chat --prompt \"Hello\"")
    log(f"\ndemo finished in {time.perf_counter() - t_start:.1f} s")
    return 0 if same else 1


# ---------------------------------------------------------------------- the real model


REAL_QUESTIONS = ("Which version of the license is this?", "What must a redistributed copy of the Work include?")
REAL_NEW_TOKENS = 40


def real_document() -> tuple[str, str]:
    """(where it came from, text) of the default long document: the Apache License 2.0 text in jax's package."""
    from importlib import metadata

    for dist in ("jax", "flax", "orbax-checkpoint", "safetensors"):  # momjax's Apache-2.0 dependencies
        try:
            files = metadata.files(dist) or []
        except metadata.PackageNotFoundError:
            continue
        for f in files:
            if f.name.upper().startswith("LICENSE"):
                text = f.read_text(encoding="utf-8")
                if "Apache License" in text and len(text) > 5000:
                    return f"the Apache License 2.0 text shipped with the {dist} package ({f.locate()})", text
    from momjax.cli import UsageError

    raise UsageError("no Apache License text found among the installed packages; pass a document with --document")


def run_real(document: str | None = None, questions=REAL_QUESTIONS, max_new_tokens: int = REAL_NEW_TOKENS,
             out=None, source: str | None = None, record: dict | None = None) -> int:
    """`momjax demo --real`; returns 0 when every policy gave the same answers, 1 otherwise.

    record: a dict to receive the run's token ids: "prompts" (the whole conversation up to each question, as
    rendered by the chat template) and "answers" ({policy: [answer ids per question]}), e.g. to check them
    against another implementation."""
    out = out or sys.stdout

    def log(*a):
        print(*a, file=out, flush=True)

    import momjax
    from momjax.chat import Conversation, _common_prefix
    from momjax.gguf import fetch_smollm2

    t_start = time.perf_counter()
    if document is None:
        source, document = real_document()
    log("momjax demo --real: SmolLM2-135M-Instruct (a real trained model, 4-bit GGUF) reading "
        f"{source or 'your document'}")
    path = fetch_smollm2(log=lambda m: log(f"  {m}"))
    policies = list(momjax.POLICIES)
    with ThreadPoolExecutor(max_workers=len(policies)) as pool:
        model = momjax.load(path, progress=False)
        tok = momjax.load_tokenizer(path)
        log(f"  loaded {path}: {model.config.num_layers} layers, hidden {model.config.hidden_size}, dequantized to "
            f"{model.dtype}")
        convo = Conversation(tok, document)
        doc_ids = convo.document_tokens()
        n_tokens = len(doc_ids)
        log(f"  the document is {n_tokens} tokens; each policy prefills it once into a Session, then answers "
            f"{len(questions)} questions (greedy, at most {max_new_tokens} new tokens each)")
        phases = [(p, ph) for p in policies for ph in ("prefill", "decode")]
        reports = [pool.submit(momjax.memory_report, model, n_tokens, p, dtype="float32", phase=ph) for p, ph in phases]

        def converse(policy):
            """(seconds to prefill the document, [answer ids], [seconds per answer]) with one policy."""
            session = momjax.Session(model, policy, capacity=n_tokens + len(questions) * (max_new_tokens + 64))
            t0 = time.perf_counter()
            session.feed(doc_ids)
            prefill_s, answers, times, prompts = time.perf_counter() - t0, [], [], []
            talk = Conversation(tok, document)
            for q in questions:
                ids = talk.tokens(q)
                prompts.append(ids)
                session.rewind(min(_common_prefix(session.tokens, ids), len(ids) - 1))
                t0 = time.perf_counter()
                gen = session.generate(ids[session.length:], max_new_tokens)
                times.append(time.perf_counter() - t0)
                answer = gen.as_lists()[0]
                answers.append(answer)
                talk.messages += [{"role": "user", "content": q}, {"role": "assistant", "content": tok.decode(answer)}]
            return prefill_s, answers, times, prompts

        runs = {p: pool.submit(converse, p) for p in policies}
        results = {p: r.result() for p, r in runs.items()}
        if record is not None:
            record.update(prompts=results[policies[0]][3], answers={p: r[1] for p, r in results.items()})
        reference = results[policies[0]][1]
        same = all(r[1] == reference for r in results.values())
        for i, q in enumerate(questions):
            log(f"\nQ: {q}")
            if all(r[1][i] == reference[i] for r in results.values()):
                log(f"A: {tok.decode(reference[i]).strip()}")
            else:
                for p in policies:
                    log(f"A ({p}): {tok.decode(results[p][1][i]).strip()}")
        log("")
        for p in policies:
            prefill_s, _, times, _ = results[p]
            log(f"  {p:<11} document prefilled in {prefill_s:.1f} s, answers in "
                + ", ".join(f"{t:.1f} s" for t in times) + " (compilation included)")
        if same:
            log(f"✓ all {len(policies)} policies gave the same answers, token for token")
        else:
            log("✗ the policies' answers differ: " + ", ".join(p for p, r in results.items() if r[1] != reference))

        log(f"\nmemory of SmolLM2-135M with this {n_tokens}-token document (float32, from the compiled programs):")
        log(f"  {'policy':<11} {'phase':<8} {'device':>12} {'host':>12} {'weights':>12} {'kv cache':>12} {'temp':>12}")
        for (p, ph), report in zip(phases, reports):
            r = report.result()
            cells = [_mib(r.get(k)) for k in ("device_bytes", "host_bytes", "weight_bytes", "kv_bytes", "temp_bytes")]
            log(f"  {p:<11} {ph:<8} " + " ".join(f"{c:>12}" for c in cells) + f"   ({r.get('source', '?')})")
    log(f"\nchat with it yourself:\n  momjax chat --model {path} --document FILE")
    log(f"\ndemo finished in {time.perf_counter() - t_start:.1f} s")
    return 0 if same else 1
