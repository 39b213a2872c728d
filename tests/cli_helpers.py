"""Helpers for tests that run the command line as a real process: one-line errors, trees of files, JSON edits."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu"}


def tree(path) -> dict[str, int]:
    """Every file and folder under path (hidden ones too) -> size: to show that nothing was written or removed."""
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(root, name)
            out[os.path.relpath(p, path)] = os.lstat(p).st_size if name in files else -1
    return out


def momjax_cli(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "momjax.cli", *map(str, args)], cwd=cwd, env=ENV, text=True,
                          capture_output=True, timeout=timeout, check=False)


def assert_one_line_error(run: subprocess.CompletedProcess, needle: str) -> None:
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, (run.returncode, run.stderr)
    assert "Traceback" not in run.stderr and len(lines) == 1, run.stderr
    assert lines[0].startswith("momjax: error: ") and needle in lines[0], lines[0]
    assert run.stdout == "", run.stdout


def edit_json(folder, name="config.json", **changes) -> None:
    path = Path(folder, name)
    d = json.loads(path.read_text())
    for key, value in changes.items():
        if value is DELETE:
            d.pop(key, None)
        else:
            d[key] = value
    path.write_text(json.dumps(d))


DELETE = object()


def make_cli_model(tmp_path_factory) -> str:
    """A HF checkpoint with a tokenizer (the demo's, built without torch)."""
    from momjax import demo_model as demo

    return demo.write_checkpoint(str(tmp_path_factory.mktemp("hardening-model")))


def copy_model(cli_model, tmp_path) -> str:
    folder = str(tmp_path / "model")
    shutil.copytree(cli_model, folder)
    return folder


def rewrite_header(path: str, edit) -> None:
    """Rewrite a safetensors file's header JSON with edit(header) (the data bytes stay as they are)."""
    data = Path(path).read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])


# A small valid Llama config.json.
BASE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 100, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
        "eos_token_id": 2, "bos_token_id": 1, "torch_dtype": "float32", "tie_word_embeddings": False}
