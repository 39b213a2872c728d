"""The HF -> Orbax converter (momjax/convert.py, convert/hf_to_orbax.py).

A conversion must give exactly the params and logits of loading the HF folder directly; it must be
atomic (an interrupted or failed run leaves neither DST nor a temp folder); and every bad input must end
the command line with exit code 2 and one line on stderr.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FAMILY_NAMES, random_tokens
from safetensors.numpy import load_file, save_file

import momjax
import momjax.checkpoint
from momjax.checkpoint import CheckpointError, load_hf_params, load_orbax
from momjax.config import Config, ConfigError
from momjax.convert import convert, main
from momjax.params import flatten

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def params_equal(a, b) -> None:
    fa, fb = flatten(a), flatten(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        assert fa[name].dtype == fb[name].dtype, name
        np.testing.assert_array_equal(np.asarray(fa[name]), np.asarray(fb[name]), err_msg=name)


def leftovers(parent) -> list[str]:
    return sorted(f for f in os.listdir(parent) if f.startswith("."))


def hf_copy(zoo, family, tmp_path, name="src") -> str:
    folder = str(tmp_path / name)
    shutil.copytree(zoo.folder(family), folder)
    return folder


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_round_trip_gives_equal_params_and_logits(zoo, tmp_path, family):
    src = zoo.folder(family)
    dst = str(tmp_path / "out")
    assert convert(src, dst, progress=False) == dst
    cfg = Config.from_folder(src)
    cfg2, params = load_orbax(dst)
    assert cfg2 == cfg
    params_equal(params, load_hf_params(src, cfg, progress=False))
    assert sorted(os.listdir(dst)) == ["config.json", "generation_config.json", "momjax_config.json", "params"]
    tokens = random_tokens(cfg.vocab_size, (2, 12))
    np.testing.assert_array_equal(np.asarray(momjax.forward(momjax.load(dst), tokens)),
                                  np.asarray(momjax.forward(zoo.model(family), tokens)))


def test_bfloat16_conversion_and_tokenizer_files(zoo, tmp_path):
    src = hf_copy(zoo, "qwen2", tmp_path)
    side = {"tokenizer.json": "{}", "tokenizer_config.json": "{}", "chat_template.jinja": "{{ x }}",
            "merges.txt": "a b\n", "README.md": "not copied"}
    for name, text in side.items():
        Path(src, name).write_text(text)
    dst = str(tmp_path / "out")
    convert(src, dst, dtype="bfloat16", progress=False)
    for name, text in side.items():
        assert os.path.exists(os.path.join(dst, name)) == (name != "README.md")
    cfg, params = load_orbax(dst)
    assert cfg.dtype == "bfloat16"
    params_equal(params, load_hf_params(src, Config.from_folder(src), dtype="bfloat16", progress=False))


def test_cli_verify_passes(zoo, tmp_path, capsys):
    dst = str(tmp_path / "out")
    assert main([zoo.folder("llama31-mha"), dst, "--verify", "--quiet"]) == 0
    assert "verified" in capsys.readouterr().out
    assert momjax.checkpoint.is_orbax_folder(dst)


def test_script_runs_from_the_repo_root(zoo, tmp_path):
    dst = str(tmp_path / "out")
    run = subprocess.run([sys.executable, "convert/hf_to_orbax.py", zoo.folder("llama-gqa"), dst, "--quiet"],
                         check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert momjax.checkpoint.is_orbax_folder(dst)


def test_verify_failure_keeps_nothing(zoo, tmp_path, monkeypatch):
    real = momjax.forward
    monkeypatch.setattr(momjax, "forward", lambda m, t: real(m, t) * (1.0 if m.path == zoo.folder("qwen2") else 1.5))
    dst = str(tmp_path / "out")
    with pytest.raises(CheckpointError, match="verification failed"):
        convert(zoo.folder("qwen2"), dst, verify=True, progress=False)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------- atomicity
def interrupt_after(monkeypatch, reads: int) -> None:
    """Raise KeyboardInterrupt at the reads-th tensor read: some leaves are already written by then."""
    real, calls = momjax.checkpoint._copy_tensor, []

    def flaky(*args):
        calls.append(args)
        if len(calls) == reads:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(momjax.checkpoint, "_copy_tensor", flaky)


def test_interrupted_conversion_leaves_nothing(zoo, tmp_path, monkeypatch):
    interrupt_after(monkeypatch, 12)
    dst = str(tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        convert(zoo.folder("llama-gqa"), dst, progress=False)
    assert os.listdir(tmp_path) == []


def test_cli_interrupted(zoo, tmp_path, monkeypatch, capsys):
    interrupt_after(monkeypatch, 5)
    dst = str(tmp_path / "out")
    assert main([zoo.folder("llama-gqa"), dst, "--quiet"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_existing_destination_needs_force_and_survives_a_failed_replace(zoo, tmp_path, monkeypatch):
    dst = str(tmp_path / "out")
    convert(zoo.folder("llama-gqa"), dst, progress=False)
    with pytest.raises(CheckpointError, match="already exists"):
        convert(zoo.folder("qwen2"), dst, progress=False)
    assert load_orbax(dst)[0].model_type == "llama"

    with monkeypatch.context() as m:
        interrupt_after(m, 7)
        with pytest.raises(KeyboardInterrupt):
            convert(zoo.folder("qwen2"), dst, force=True, progress=False)
    assert load_orbax(dst)[0].model_type == "llama"  # the old folder is untouched
    assert leftovers(tmp_path) == []

    convert(zoo.folder("qwen2"), dst, force=True, progress=False)
    assert load_orbax(dst)[0].model_type == "qwen2"
    assert os.listdir(tmp_path) == ["out"]


# ---------------------------------------------------------------------- bad input: exit 2, one line, nothing written
def _drop_tensor(folder):
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, path)
    return "model.layers.1.mlp.down_proj.weight"


def _extra_tensor(folder):
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.q_norm.weight"] = np.ones(16, np.float32)
    save_file(tensors, path)
    return "model.layers.0.self_attn.q_norm.weight"


def _truncate(folder):
    path = os.path.join(folder, "model.safetensors")
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) - 100])
    return "truncated"


def _pickle_only(folder):
    os.remove(os.path.join(folder, "model.safetensors"))
    Path(folder, "pytorch_model.bin").write_bytes(b"\x80\x04never unpickled")
    return "pickles"


def _edit_config(expected: str, **changes):
    def edit(folder):
        path = Path(folder, "config.json")
        hf = json.loads(path.read_text())
        hf.update(changes)
        path.write_text(json.dumps(hf))
        return expected

    return edit


def _gpt2(folder):
    import transformers

    for f in os.listdir(folder):
        os.remove(os.path.join(folder, f))
    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100).save_pretrained(folder)
    return "gpt2"


def _a_file(folder):
    shutil.rmtree(folder)
    Path(folder).write_text("not a folder")
    return "is not a folder"


BAD_INPUTS = {
    "missing tensor": _drop_tensor,
    "unexpected tensor": _extra_tensor,
    "truncated file": _truncate,
    "pickle only": _pickle_only,
    "gpt2": _gpt2,
    "yarn rope": _edit_config("yarn", rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                            "original_max_position_embeddings": 64}),
    "non-silu activation": _edit_config("gelu", hidden_act="gelu"),
    "unsupported architecture": _edit_config("LlamaForSequenceClassification",
                                             architectures=["LlamaForSequenceClassification"]),
    "src is a file": _a_file,
    "src does not exist": lambda folder: shutil.rmtree(folder) or "is not a folder",
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_cli_bad_input(zoo, tmp_path, capsys, case):
    src = str(tmp_path / "src")
    shutil.copytree(zoo.folder("llama31-mha"), src)  # a single-file checkpoint
    expected = BAD_INPUTS[case](src)
    dst = str(tmp_path / "out")
    assert main([src, dst, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("momjax: error: ") and expected in err, err
    assert "Traceback" not in err
    assert not os.path.exists(dst) and leftovers(tmp_path) == []


def test_cli_refuses_existing_destination(zoo, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert main([zoo.folder("llama-gqa"), str(dst), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err and "--force" in err
    assert os.listdir(dst) == ["keep.txt"]


def test_library_errors_are_value_errors(zoo, tmp_path):
    src = str(tmp_path / "src")
    shutil.copytree(zoo.folder("llama31-mha"), src)
    _edit_config("yarn", rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})(src)
    with pytest.raises(ConfigError, match="yarn"):
        convert(src, str(tmp_path / "out"), progress=False)
    with pytest.raises(CheckpointError, match="dtype"):
        convert(zoo.folder("llama-gqa"), str(tmp_path / "out"), dtype="int8", progress=False)
