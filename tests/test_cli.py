"""The momjax command, run in-process through momjax.cli.main: demo, generate (streaming, summary, bad
input), plan, the compilation cache switch, and the tokenizer's streaming detokenizer."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import jax
import pytest
from cli_helpers import (
    assert_one_line_error,
    edit_json,
    momjax_cli,
    rewrite_header,
    tree,
)

import momjax
import momjax.cli
import momjax.convert
from momjax import demo_model as demo
from momjax.cli import main
from momjax.tokenizer import StreamDecoder, load_tokenizer

CONTEXT = 64  # the CLI test checkpoint's max_position_embeddings: small, so "too long" is cheap to reach
SHORT = "Hello there"
LONG = "x" * 60  # 61 tokens with BOS: with 16 new tokens past the 64-token context


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    """The demo's Hugging Face checkpoint with a tokenizer (built without torch), with a 64-token context."""
    path = demo.write_checkpoint(str(tmp_path_factory.mktemp("cli-model")))
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["max_position_embeddings"] = CONTEXT
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


class Recorder:
    """A stdout that keeps each write, to see text arrive in pieces."""

    def __init__(self):
        self.writes: list[str] = []

    def write(self, s):
        self.writes.append(s)
        return len(s)

    def flush(self):
        pass


def run(argv, capsys, monkeypatch=None):
    """main(argv) -> (exit code, stdout writes, stderr text)."""
    recorder = Recorder()
    if monkeypatch is not None:
        monkeypatch.setattr(sys, "stdout", recorder)
    code = main(argv)
    captured = capsys.readouterr()
    return code, recorder.writes or [captured.out], captured.err


def expected_text(folder: str, text: str, new_tokens: int, policy: str, **kwargs) -> str:
    tok = load_tokenizer(folder)
    model = momjax.load(folder, progress=False)
    model.max_context = max(model.max_context, len(tok.encode(text)) + new_tokens)
    gen = momjax.generate(model, [tok.encode(text)], new_tokens, policy=policy, **kwargs)
    return tok.decode(gen.as_lists()[0])


def test_demo_runs_and_policies_agree(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOMJAX_CACHE", str(tmp_path))
    code, out, err = run(["demo", "--max-new-tokens", "8"], capsys)
    out = "".join(out)
    assert code == 0, out + err
    assert "✓ all 4 policies generated the same 8 tokens" in out
    assert "max context" in out and "mom-stream" in out  # the plan table
    assert os.path.isdir(tmp_path / "demo" / "orbax")
    code, out, _ = run(["demo", "--max-new-tokens", "8"], capsys)  # the second run uses the cached checkpoint
    assert code == 0 and "converted" not in "".join(out)


def test_generate_streams_text_and_summarizes(folder, capsys, monkeypatch):
    want = expected_text(folder, SHORT, 24, "mom")
    code, writes, err = run(["generate", "--model", folder, "--prompt", SHORT, "--max-new-tokens", "24", "--quiet"],
                            capsys, monkeypatch)
    assert code == 0, err
    assert "".join(writes) == want + "\n"
    assert len([w for w in writes if w]) >= 3, f"text came in {writes!r}, not streamed"
    for line in ("prompt tokens:        12", "new tokens:           24 (reached --max-new-tokens 24)",
                 "time to first token:", "tokens/s", "policy:               mom", "peak device memory:   n/a on CPU"):
        assert line in err, err


def test_stream_records_the_stop_token(folder):
    from momjax.cli.generate import StreamStats, stream_tokens

    model = momjax.load(folder, progress=False)
    ids = load_tokenizer(folder).encode(SHORT)
    free = [t for piece in stream_tokens(model, ids, 8, stop_tokens=[]) for t in piece]
    stats = StreamStats(len(ids), "mom")
    stop = free[4]  # the greedy path reaches this token at step 5 (or earlier, if it occurs before)
    stopped = [t for piece in stream_tokens(model, ids, 8, stop_tokens=[stop], stats=stats) for t in piece]
    assert stopped == free[: free.index(stop) + 1] and stats.stopped_at == stop
    stats = StreamStats(len(ids), "mom")
    [t for piece in stream_tokens(model, ids, 8, stop_tokens=[], stats=stats) for t in piece]
    assert stats.stopped_at is None and stats.new_tokens == 8


@pytest.mark.parametrize("policy", ["baseline", "mom-stream"])
def test_generate_sampling_matches_the_api(folder, capsys, monkeypatch, policy):
    sampling = {"temperature": 0.9, "top_k": 40, "top_p": 0.95, "seed": 7}
    want = expected_text(folder, SHORT, 12, policy, **sampling)
    argv = ["generate", "--model", folder, "--prompt", SHORT, "--max-new-tokens", "12", "--policy", policy,
            "--temperature", "0.9", "--top-k", "40", "--top-p", "0.95", "--seed", "7", "--quiet"]
    code, writes, err = run(argv, capsys, monkeypatch)
    assert code == 0, err
    assert "".join(writes) == want + "\n"


def test_generate_chat_and_prompt_file(folder, tmp_path, capsys, monkeypatch):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(SHORT, encoding="utf-8")
    argv = ["generate", "--model", folder, "--prompt-file", str(prompt_file), "--chat", "--max-new-tokens", "4",
            "--quiet"]
    code, _, err = run(argv, capsys, monkeypatch)
    assert code == 0, err
    assert "prompt tokens:        15" in err  # BOS <|user|> 11 bytes <|end|> <|assistant|>


def test_allow_long_context(folder, capsys, monkeypatch):
    argv = ["generate", "--model", folder, "--prompt", LONG, "--max-new-tokens", "16", "--quiet"]
    code, _, err = run(argv + ["--allow-long-context"], capsys, monkeypatch)
    assert code == 0, err
    assert "prompt tokens:        61" in err


# case -> (argv with {folder} and {tmp} placeholders, text the one error line must contain)
GEN = ["generate", "--model", "{folder}", "--max-new-tokens", "16"]
BAD_INPUTS = {
    "missing folder": (["generate", "--model", "{tmp}/nope", "--prompt", "hi"], "does not exist"),
    "no tokenizer": (["generate", "--model", "{tmp}/no-tokenizer", "--prompt", "hi"], "no tokenizer"),
    "unknown policy": (GEN + ["--prompt", "hi", "--policy", "fastest"], "invalid choice"),
    "empty prompt": (GEN + ["--prompt", "  "], "prompt is empty"),
    "missing prompt file": (GEN + ["--prompt-file", "{tmp}/none.txt"], "does not exist"),
    "no prompt": (GEN, "--prompt"),
    "prompt too long": (GEN + ["--prompt", LONG], "--allow-long-context"),
    "bad max-new-tokens": (GEN[:-1] + ["0", "--prompt", "hi"], "--max-new-tokens"),
    "plan budget too small": (["plan", "--model", "llama-3.1-8b", "--hbm", "8GiB"], "weights"),
    "plan unknown model": (["plan", "--model", "llama-9", "--hbm", "80GiB"], "neither a preset"),
    "plan bad size": (["plan", "--model", "llama-3.1-8b", "--hbm", "eighty"], "80GiB"),
    "unknown command": (["frobnicate"], "invalid choice"),
    "demo no new tokens": (["demo", "--max-new-tokens", "0"], "--max-new-tokens"),
    "demo empty prompt": (["demo", "--prompt", ""], "prompt is empty"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(folder, tmp_path, capsys, case):
    no_tokenizer = tmp_path / "no-tokenizer"  # weights and config, but no tokenizer files
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        os.symlink(os.path.join(folder, name), no_tokenizer / name)
    template, needle = BAD_INPUTS[case]
    argv = [a.format(folder=folder, tmp=tmp_path) for a in template]
    code, out, err = run(argv, capsys)
    assert code == 2, (case, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"{case}: {err!r}"
    assert lines[0].startswith("momjax: error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in err and "".join(out) == ""


def test_plan_json(capsys):
    code, out, err = run(["plan", "--model", "llama-3.1-8b", "--hbm", "80GiB", "--host-memory", "1TiB", "--json"],
                         capsys)
    assert code == 0, err
    result = json.loads("".join(out))
    assert set(result["max_context"]) == {"baseline", "mom", "mom-stream", "mom-host"}  # mom-host: a host budget
    assert all(isinstance(n, int) and n > 0 for n in result["max_context"].values())
    assert result["max_context"]["mom"] >= result["max_context"]["baseline"]
    assert result["max_context"]["mom-host"] > result["max_context"]["mom-stream"] and result["limits"]["mom-host"] == "host"


def test_demo_refuses_bad_input_before_building_or_loading(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOMJAX_CACHE", str(tmp_path))
    for argv in (["demo", "--max-new-tokens", "0"], ["demo", "--prompt", " "]):
        code, out, err = run(argv, capsys)
        assert code == 2 and "".join(out) == "" and len(err.strip().splitlines()) == 1, err
    assert os.listdir(tmp_path) == []  # no checkpoint was written, so none was loaded


def test_plan_notes_trained_length_and_host_budget(capsys):
    code, out, err = run(["plan", "--model", "llama-3.1-8b", "--hbm", "80GiB"], capsys)
    out = "".join(out)
    assert code == 0, err
    assert "trained on 131,072 tokens" in out and "--allow-long-context" in out
    assert "no host budget was given" in out and "unlimited" in out
    # A budget whose every limit is within the trained length, with a host budget: nothing to note.
    code, out, err = run(["plan", "--model", "llama-3.1-8b", "--hbm", "20GiB", "--host-memory", "8GiB"], capsys)
    out = "".join(out)
    assert code == 0, err
    assert "note:" not in out and "host budget 8.00 GiB" in out
    code, out, err = run(["plan", "--model", "llama-3.1-8b", "--hbm", "80GiB", "--json"], capsys)
    assert code == 0 and json.loads("".join(out))["host_bytes"] is None  # stdout stays JSON
    assert "trained on 131,072 tokens" in err and "no host budget" in err


def test_plan_table_from_a_folder(folder, capsys):
    code, out, err = run(["plan", "--model", folder, "--hbm", "1GiB"], capsys)
    assert code == 0, err
    assert "max context" in "".join(out)


def test_compile_cache_option_before_or_after_the_command():
    from momjax.cli import build_parser

    for argv in (["--compile-cache", "D", "plan", "--model", "m", "--hbm", "1GB"],
                 ["plan", "--model", "m", "--hbm", "1GB", "--compile-cache", "D"]):
        assert build_parser().parse_args(argv).compile_cache == "D"


def test_compile_cache_switch(folder, tmp_path, capsys, monkeypatch):
    from jax._src import compilation_cache

    cache = tmp_path / "xla-cache"
    saved = {name: getattr(jax.config, name) for name in (
        "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes")}
    monkeypatch.setenv("MOMJAX_COMPILATION_CACHE", str(cache))
    try:
        code, _, err = run(["generate", "--model", folder, "--prompt", "cache me", "--max-new-tokens", "2",
                            "--quiet"], capsys, monkeypatch)
        assert code == 0, err
        assert jax.config.jax_compilation_cache_dir == str(cache)
        assert cache.is_dir() and any(cache.iterdir()), "nothing was written to the compilation cache"
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


def test_stream_decoder_holds_back_partial_characters(folder):
    tok = load_tokenizer(folder)
    text = "naïve café — 日本語 ✓ done"
    ids = tok.encode(text, add_special_tokens=False)
    stream = StreamDecoder(tok)
    pieces = [stream.push([i]) for i in ids]
    pieces.append(stream.flush())
    assert "".join(pieces) == text == stream.text
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # multi-byte characters were held back until complete


def test_convert_then_generate_from_the_orbax_folder(folder, tmp_path, capsys, monkeypatch):
    orbax = str(tmp_path / "orbax")
    code, _, err = run(["convert", folder, orbax, "--quiet"], capsys)
    assert code == 0, err
    want = expected_text(folder, SHORT, 24, "mom")
    code, writes, err = run(["generate", "--model", orbax, "--prompt", SHORT, "--max-new-tokens", "24", "--quiet"],
                            capsys, monkeypatch)
    assert code == 0, err
    assert "".join(writes) == want + "\n"  # the Orbax folder carries the tokenizer too


@pytest.mark.parametrize("policy", ["baseline", "mom"])
def test_long_prefill_progress_callback(folder, capsys, policy):
    from momjax.cli.generate import stream_tokens

    model = momjax.load(folder, progress=False)
    ids = load_tokenizer(folder).encode(SHORT)
    quiet = [t for piece in stream_tokens(model, ids, 4, policy=policy, progress=False) for t in piece]
    capsys.readouterr()
    shown, err = [], ""
    for piece in stream_tokens(model, ids, 4, policy=policy, progress=True):
        if not shown:  # what the terminal holds when the first token is about to be printed
            err = capsys.readouterr().err
            assert err.endswith("\n"), "the progress line must be closed before the first token"
        shown += piece
    err += capsys.readouterr().err
    assert shown == quiet
    L = model.config.num_layers
    assert f"prefill: layer {L}/{L}" in err
    assert err.count("\n") == 1  # one line, rewritten in place


def test_prefill_progress_shows_finished_layers():
    """on_layer(i) arrives once layer i (0-based) has finished: the line shows i + 1 layers done."""
    import io

    from momjax.cli.common import PrefillProgress

    out = io.StringIO()
    progress = PrefillProgress(stream=out)
    progress.start(6)
    for i in range(5):
        progress(i)
    assert out.getvalue().split("\r")[-1].startswith("prefill: layer 5/6 (") and "6/6" not in out.getvalue()
    progress(2)  # a late or repeated callback never steps back
    assert out.getvalue().split("\r")[-1].startswith("prefill: layer 5/6 (")
    progress(5)
    assert out.getvalue().split("\r")[-1].startswith("prefill: layer 6/6 (") and out.getvalue().endswith("\n")
    progress.close()  # already closed by the last layer: nothing more
    assert out.getvalue().count("\n") == 1

    out = io.StringIO()
    progress = PrefillProgress(stream=out)
    progress.start(4)
    progress(0)
    progress(1)
    progress.close()  # the first token is ready before the last callbacks arrived: end the line now
    assert out.getvalue().endswith("layer 2/4 (0.0 s)\n")
    progress(2)
    progress(3)  # after close: ignored, nothing is printed over the generated text
    assert out.getvalue().count("prefill") == 2 and out.getvalue().count("\n") == 1


def test_bench_without_torch_says_what_to_install(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    code, _, err = run(["bench", "--quick"], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "pip install momjax[test]" in err



# ---------------------------------------------------------------------- CLI: a real process, exit 2, one line
CLI_CASES = {  # name -> (arguments, words in the one line), "{m}" is a copy of a checkpoint with a tokenizer
    "top-k in scientific notation": (["generate", "--model", "{m}", "--prompt", "hi", "--top-k", "1e12"], "--top-k"),
    "seed beyond 64 bits": (["generate", "--model", "{m}", "--prompt", "hi", "--seed", str(2**70)], "--seed"),
    "temperature nan": (["generate", "--model", "{m}", "--prompt", "hi", "--temperature", "nan"], "--temperature"),
    "top-p inf": (["generate", "--model", "{m}", "--prompt", "hi", "--top-p", "inf"], "--top-p"),
    "cannot fit in memory": (["generate", "--model", "{m}", "--prompt", "hi", "--max-new-tokens", "100000000",
                              "--allow-long-context"], "cannot fit"),
    "compile cache is a file": (["generate", "--model", "{m}", "--prompt", "hi", "--compile-cache", "{m}/config.json"],
                                "compile cache"),
    "convert compile cache is a file": (["--compile-cache", "{m}/config.json", "convert", "{m}", "{m}-out"],
                                        "compile cache"),
    "string offsets in a header": (["convert", "{m}", "{m}-out", "--quiet"], "malformed header"),
    "tie as a string": (["generate", "--model", "{m}", "--prompt", "hi"], "tie_word_embeddings"),
    "bad generation config": (["generate", "--model", "{m}", "--prompt", "hi"], "generation_config.json"),
    "plan negative size": (["plan", "--model", "llama-3.1-8b", "--hbm=-5GB"], "size"),
    "plan negative hidden size": (["plan", "--model", "{m}", "--hbm", "8GiB"], "hidden_size"),
}
CLI_SETUP = {
    "string offsets in a header": lambda m: rewrite_header(
        os.path.join(m, "model.safetensors"),
        lambda h: h[next(k for k in h if k != "__metadata__")].update(data_offsets=["0", "8"])),
    "tie as a string": lambda m: edit_json(m, tie_word_embeddings="false"),
    "bad generation config": lambda m: Path(m, "generation_config.json").write_text('{"eos_token_id": [1, 99999]}'),
    "plan negative hidden size": lambda m: edit_json(m, hidden_size=-64),
}


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(model_copy, tmp_path, case):
    CLI_SETUP.get(case, lambda m: None)(model_copy)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before = tree(tmp_path)
    args, words = CLI_CASES[case]
    run = momjax_cli(*[a.format(m=model_copy) for a in args], cwd=cwd)
    assert_one_line_error(run, words)
    assert tree(tmp_path) == before
