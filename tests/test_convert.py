"""The HF -> Orbax converter (momjax/convert.py, convert/hf_to_orbax.py).

A conversion must give exactly the params and logits of loading the HF folder directly; it must be
atomic (an interrupted or failed run leaves neither DST nor a temp folder); and every bad input must end
the command line with exit code 2 and one line on stderr.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import (
    BASE,
    ENV,
    REPO,
    assert_one_line_error,
    momjax_cli,
    tree,
)
from conftest import FAMILY_NAMES, load_hf_params, load_orbax, random_tokens
from safetensors.numpy import load_file, save_file

import momjax
import momjax.cli
import momjax.convert
import momjax.hf.tensors
import momjax.store.staging
from momjax.cli import main as cli_main
from momjax.convert import convert
from momjax.errors import CheckpointError, ConfigError
from momjax.hf import config as hf_config
from momjax.params import flatten
from momjax.store.orbax import is_orbax_folder


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
    cfg = hf_config.from_folder(src)
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
    params_equal(params, load_hf_params(src, hf_config.from_folder(src), dtype="bfloat16", progress=False))


def test_cli_verify_passes(zoo, tmp_path, capsys):
    dst = str(tmp_path / "out")
    assert cli_main(["convert", zoo.folder("llama31-mha"), dst, "--verify", "--quiet"]) == 0
    assert "verified" in capsys.readouterr().out
    assert momjax.store.orbax.is_orbax_folder(dst)


def test_script_runs_from_the_repo_root(zoo, tmp_path):
    dst = str(tmp_path / "out")
    run = subprocess.run([sys.executable, "convert/hf_to_orbax.py", zoo.folder("llama-gqa"), dst, "--quiet"],
                         check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert momjax.store.orbax.is_orbax_folder(dst)


def test_verify_failure_keeps_nothing(zoo, tmp_path, monkeypatch):
    real = momjax.forward
    monkeypatch.setattr(momjax.convert, "forward", lambda m, t: real(m, t) * (1.0 if m.path == zoo.folder("qwen2") else 1.5))
    dst = str(tmp_path / "out")
    with pytest.raises(CheckpointError, match="verification failed"):
        convert(zoo.folder("qwen2"), dst, verify=True, progress=False)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------- atomicity
def interrupt_after(monkeypatch, reads: int) -> None:
    """Raise KeyboardInterrupt at the reads-th tensor read: some leaves are already written by then."""
    real, calls = momjax.hf.tensors._copy_tensor, []

    def flaky(*args):
        calls.append(args)
        if len(calls) == reads:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(momjax.hf.tensors, "_copy_tensor", flaky)


def test_interrupted_conversion_leaves_nothing(zoo, tmp_path, monkeypatch):
    interrupt_after(monkeypatch, 12)
    dst = str(tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        convert(zoo.folder("llama-gqa"), dst, progress=False)
    assert os.listdir(tmp_path) == []


def test_cli_interrupted(zoo, tmp_path, monkeypatch, capsys):
    interrupt_after(monkeypatch, 5)
    dst = str(tmp_path / "out")
    assert cli_main(["convert", zoo.folder("llama-gqa"), dst, "--quiet"]) == 130
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
    "longrope rope": _edit_config("longrope", rope_scaling={"rope_type": "longrope", "factor": 4.0,
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
    assert cli_main(["convert", src, dst, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("momjax: error: ") and expected in err, err
    assert "Traceback" not in err
    assert not os.path.exists(dst) and leftovers(tmp_path) == []


def test_cli_refuses_existing_destination(zoo, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert cli_main(["convert", zoo.folder("llama-gqa"), str(dst), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err and "--force" in err
    assert os.listdir(dst) == ["keep.txt"]


def test_library_errors_are_value_errors(zoo, tmp_path):
    src = str(tmp_path / "src")
    shutil.copytree(zoo.folder("llama31-mha"), src)
    _edit_config("longrope", rope_scaling={"rope_type": "longrope", "factor": 4.0,
                                           "original_max_position_embeddings": 64})(src)
    with pytest.raises(ConfigError, match="longrope"):
        convert(src, str(tmp_path / "out"), progress=False)
    with pytest.raises(CheckpointError, match="dtype"):
        convert(zoo.folder("llama-gqa"), str(tmp_path / "out"), dtype="int8", progress=False)



# ---------------------------------------------------------------------- convert: never destroy, never half-write
@pytest.fixture
def src(zoo, tmp_path) -> str:
    folder = str(tmp_path / "src")
    shutil.copytree(zoo.folder("llama31-mha"), folder)
    return folder


def test_dst_reaching_src_through_a_symlink_is_refused_even_with_force(src, tmp_path, capsys):
    before = tree(tmp_path)
    os.symlink(src, tmp_path / "link")
    for dst in (tmp_path / "link", src, Path(src) / ".", tmp_path, Path(src) / "sub", tmp_path / "link" / "sub"):
        for flags in ([], ["--force"], ["--force", "--replace-any-folder"]):
            assert momjax.cli.main(["convert", src, str(dst), "--quiet", *flags]) == 2, (dst, flags)
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "source folder" in err, err
    os.remove(tmp_path / "link")
    assert tree(tmp_path) == before


def test_dst_reaching_src_through_a_bind_or_parent_symlink(src, tmp_path, capsys):
    os.symlink(tmp_path, tmp_path.parent / f"{tmp_path.name}-alias")
    alias = tmp_path.parent / f"{tmp_path.name}-alias"
    try:
        assert momjax.cli.main(["convert", src, str(alias / "src"), "--quiet", "--force"]) == 2
        assert momjax.cli.main(["convert", str(alias / "src"), str(tmp_path), "--quiet", "--force"]) == 2
        assert "source folder" in capsys.readouterr().err
    finally:
        os.remove(alias)
    assert hf_config.from_folder(src).num_layers == 3


def test_force_replaces_only_a_previous_momjax_output(src, tmp_path, capsys):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"\xff\xd8 precious")
    assert momjax.cli.main(["convert", src, str(mine), "--quiet", "--force"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a momjax conversion" in err and "--replace-any-folder" in err
    assert (mine / "holiday.jpg").read_bytes() == b"\xff\xd8 precious"

    out = tmp_path / "out"  # a previous conversion is replaced with --force
    assert momjax.cli.main(["convert", src, str(out), "--quiet"]) == 0
    assert momjax.cli.main(["convert", src, str(out), "--quiet", "--force"]) == 0
    (out / "notes.txt").write_text("mine")  # ... but not once the user put files of their own in it
    assert momjax.cli.main(["convert", src, str(out), "--quiet", "--force"]) == 2
    assert "notes.txt" in capsys.readouterr().err and (out / "notes.txt").exists()

    a_file = tmp_path / "file.bin"
    a_file.write_bytes(b"data")
    assert momjax.cli.main(["convert", src, str(a_file), "--quiet", "--force"]) == 2
    assert a_file.read_bytes() == b"data"
    assert momjax.cli.main(["convert", src, str(out), "--quiet", "--replace-any-folder"]) == 2  # needs --force too
    capsys.readouterr()

    assert momjax.cli.main(["convert", src, str(mine), "--quiet", "--force", "--replace-any-folder"]) == 0
    assert is_orbax_folder(str(mine)) and not (mine / "holiday.jpg").exists()
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith(".")) == []


def test_dst_appearing_during_the_conversion_is_left_alone(src, tmp_path, monkeypatch):
    dst = tmp_path / "out"
    real = momjax.convert.write_orbax

    def racing(folder, cfg, leaves):  # another process creates DST while this one converts
        real(folder, cfg, leaves)
        dst.mkdir()
        (dst / "theirs.txt").write_text("first")

    monkeypatch.setattr(momjax.convert, "write_orbax", racing)
    with pytest.raises(CheckpointError, match="appeared while converting"):
        convert(src, str(dst), progress=False)
    assert os.listdir(dst) == ["theirs.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]

    shutil.rmtree(dst)  # an empty folder appearing is not replaced either
    monkeypatch.setattr(momjax.convert, "write_orbax", lambda f, c, leaves: (real(f, c, leaves), dst.mkdir()))
    with pytest.raises(CheckpointError, match="appeared while converting"):
        convert(src, str(dst), progress=False)
    assert os.listdir(dst) == []


def test_a_running_conversion_to_the_same_dst_is_not_disturbed(src, tmp_path):
    partial = tmp_path / f".out{momjax.store.staging.PARTIAL}999999"
    partial.mkdir()
    (partial / "leaf").write_text("being written")
    fd = os.open(str(partial) + ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held, as by a live conversion
    try:
        with pytest.raises(CheckpointError, match="another conversion"):
            convert(src, str(tmp_path / "out"), progress=False)
        assert (partial / "leaf").read_text() == "being written"
    finally:
        os.close(fd)
    convert(src, str(tmp_path / "out"), progress=False)  # the lock is free now: a killed run's leftover
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]


def test_read_only_destination(src, tmp_path, monkeypatch, capsys):
    real = os.mkdir

    def read_only(path, *args, **kwargs):
        if str(tmp_path) in os.fspath(path):
            raise OSError(30, "Read-only file system", path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only)
    before = tree(tmp_path)
    assert momjax.cli.main(["convert", src, str(tmp_path / "out"), "--quiet"]) == 2
    assert momjax.cli.main(["convert", src, str(tmp_path / "new" / "deeper" / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and err.count("Read-only file system") == 2, err
    assert tree(tmp_path) == before


def test_full_disk_leaves_nothing(big, tmp_path):
    limit = 1 << 20  # bytes per file: a large chunk Orbax writes fails (EFBIG, as a full disk would)
    code = (f"import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
            f"sys.argv = ['momjax', 'convert', {big!r}, {str(tmp_path / 'out')!r}, '--quiet']; "
            "runpy.run_module('momjax.cli', run_name='__main__')")
    run = subprocess.run([sys.executable, "-c", code], env=ENV, text=True, capture_output=True, timeout=300, check=False)
    assert_one_line_error(run, "cannot write")
    assert "File too large" in run.stderr
    assert os.listdir(tmp_path) == []


def test_symlinks_out_of_src_are_refused_and_nothing_is_written(src, tmp_path, capsys):
    """A tokenizer (or config) that is a link out of SRC is not copied, so the folder would be unusable: exit 2,
    one line naming the file, nothing written (it used to exit 0 with no tokenizer in the output)."""
    secret = tmp_path / "secret.txt"
    secret.write_text("not for sharing")
    os.symlink(secret, os.path.join(src, "tokenizer.json"))
    dst = tmp_path / "out"
    assert momjax.cli.main(["convert", src, str(dst), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "tokenizer.json" in err and "symbolic link" in err and len(err.strip().splitlines()) == 1
    assert not dst.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".out")]


def test_symlinks_inside_src_are_copied_as_files(src, tmp_path):
    Path(src, "vocab.txt").write_text("a\nb\n")
    os.symlink(os.path.join(src, "vocab.txt"), os.path.join(src, "merges.txt"))  # inside SRC: fine
    dst = tmp_path / "out"
    assert momjax.cli.main(["convert", src, str(dst), "--quiet"]) == 0
    assert (dst / "merges.txt").read_text() == "a\nb\n" and not (dst / "merges.txt").is_symlink()


def test_hub_cache_snapshot_links_are_copied(src, tmp_path):
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for name in os.listdir(src):
        shutil.copy(os.path.join(src, name), repo / "blobs" / f"blob-{name}")
        os.symlink(f"../../blobs/blob-{name}", snapshot / name)
    Path(repo / "blobs" / "blob-tok").write_text("{}")
    os.symlink("../../blobs/blob-tok", snapshot / "tokenizer.json")
    convert(str(snapshot), str(tmp_path / "out"), progress=False)
    assert Path(tmp_path / "out" / "tokenizer.json").read_text() == "{}"


@pytest.mark.parametrize("kwargs, words", [
    ({"force": "yes"}, "force"), ({"dtype": "int8"}, "dtype"), ({"replace_any": True}, "force"),
    ({"dst": None}, "DST"), ({"dst": ""}, "DST"),
])
def test_bad_convert_arguments(src, tmp_path, kwargs, words):
    kwargs = {"src": src, "dst": str(tmp_path / "out"), "progress": False, **kwargs}
    with pytest.raises(CheckpointError, match=words):
        convert(**kwargs)
    assert sorted(os.listdir(tmp_path)) == ["src"]


# ---------------------------------------------------------------------- convert under real signals
@pytest.fixture(scope="module")
def big(tmp_path_factory) -> str:
    """A random 32-layer float32 checkpoint of ~100 MB: a conversion takes long enough to be caught midway."""
    folder = tmp_path_factory.mktemp("big")
    L, V, D, F, H, K, E = 32, 512, 256, 768, 8, 4, 32
    cfg = {**BASE, "vocab_size": V, "hidden_size": D, "intermediate_size": F, "num_hidden_layers": L,
           "num_attention_heads": H, "num_key_value_heads": K}
    Path(folder, "config.json").write_text(json.dumps(cfg))
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                       p + "self_attn.q_proj.weight": (H * E, D), p + "self_attn.k_proj.weight": (K * E, D),
                       p + "self_attn.v_proj.weight": (K * E, D), p + "self_attn.o_proj.weight": (D, H * E),
                       p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                       p + "mlp.down_proj.weight": (D, F)})
    rng = np.random.default_rng(0)
    save_file({n: rng.standard_normal(s, np.float32) * 0.02 for n, s in shapes.items()},
              str(folder / "model.safetensors"))
    return str(folder)


def _convert_until_midway(src: str, parent: Path, leaves: int) -> subprocess.Popen:
    """Start a conversion of src into parent/out and return once `leaves` of its leaves are being written."""
    proc = subprocess.Popen([sys.executable, "-m", "momjax.cli", "convert", src, str(parent / "out"), "--quiet"],
                            env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        partial = [p for p in parent.glob(".out.momjax-partial-*") if p.is_dir()]
        with contextlib.suppress(OSError):  # the folder may vanish between the glob and the listing
            if partial and len(os.listdir(partial[0] / "params")) >= leaves:
                break
        time.sleep(0.002)
    assert proc.poll() is None, "the conversion finished before it could be interrupted; make `big` larger"
    return proc


@pytest.mark.parametrize("sig, leaves", [(signal.SIGINT, 1), (signal.SIGTERM, 1), (signal.SIGINT, 5),
                                         (signal.SIGTERM, 8)])
def test_signals_mid_conversion_leave_nothing_and_print_one_line(big, tmp_path, sig, leaves):
    proc = _convert_until_midway(big, tmp_path, leaves)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, (proc.returncode, err)
    assert err.count("\n") == 1 and err.startswith("momjax: interrupted") and sig.name in err, err
    assert "Traceback" not in err and out == ""
    time.sleep(0.2)  # any writer thread that survived would show up now
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)


def test_a_killed_conversion_is_cleaned_up_by_the_next_one(big, tmp_path):
    proc = _convert_until_midway(big, tmp_path, 2)
    proc.kill()
    proc.communicate(timeout=60)
    left = sorted(os.listdir(tmp_path))
    assert len(left) == 2 and all(momjax.store.staging.PARTIAL in n for n in left), left  # the folder and its lock
    run = momjax_cli("convert", big, tmp_path / "out", "--quiet")
    assert run.returncode == 0, run.stderr
    assert "removed" in run.stderr and "interrupted conversion" in run.stderr
    assert os.listdir(tmp_path) == ["out"] and is_orbax_folder(str(tmp_path / "out"))
    assert math.isclose(hf_config.from_folder(big).num_layers, 32)


def test_two_conversions_to_one_dst_at_once_one_wins(big, tmp_path):
    cmd = [sys.executable, "-m", "momjax.cli", "convert", big, str(tmp_path / "out"), "--quiet"]
    procs = [subprocess.Popen(cmd, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    results = sorted((p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs)
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    (ok, out, _), (refused, _, err) = results
    assert ok == 0 and out.startswith("wrote"), results
    assert refused == 2 and err.count("\n") == 1 and "Traceback" not in err, results
    assert "another conversion" in err or "appeared while converting" in err, err
    assert os.listdir(tmp_path) == ["out"] and is_orbax_folder(str(tmp_path / "out"))
