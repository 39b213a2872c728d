"""Nothing a user owns is ever overwritten, and what the command line says about files and timings is true.

Each case is one a user met (issue 27): a prompt cache or a chat session pointed at the user's own text file, a
session that belongs to another model or dtype, /save to a bad place, a folder where a file belongs, text files
in other encodings, temporary files of a killed save, the umask, `~` in paths. Run in-process through
momjax.cli.main on the demo checkpoint.
"""

from __future__ import annotations

import io
import os
import stat
import sys
import tempfile
import time

import numpy as np
import pytest

import momjax
from momjax.cli import main
from momjax.errors import SessionError, TokenizerError

TEXT = "my own notes: do not lose them\n"


def run(argv, capsys, stdin_lines=None, monkeypatch=None):
    if stdin_lines is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{line}\n" for line in stdin_lines)))
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def generate(cli_model, *extra):
    return ["generate", "--model", cli_model, "--prompt", "Hello", "--max-new-tokens", "4", "--quiet", *extra]


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("momjax: error: ") and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------- files that are not momjax's


def test_prompt_cache_onto_a_text_file_is_refused_and_the_file_kept(cli_model, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text(TEXT)
    t0 = time.perf_counter()
    code, out, err = run(generate(cli_model, "--prompt-cache", str(notes)), capsys)
    assert code == 2 and out == ""
    line = one_line(err)
    assert "--prompt-cache" in line and str(notes) in line and "not a momjax session file" in line
    assert notes.read_text() == TEXT
    assert time.perf_counter() - t0 < 5  # refused before any model work (no weights loaded, nothing compiled)


@pytest.mark.parametrize("target, words", [("folder", "is a folder"), ("missing parent", "does not exist")])
def test_prompt_cache_paths_are_checked_before_the_run(cli_model, tmp_path, capsys, target, words):
    path = tmp_path if target == "folder" else tmp_path / "no" / "such.cache"
    code, _, err = run(generate(cli_model, "--prompt-cache", str(path)), capsys)
    assert code == 2
    line = one_line(err)
    assert "--prompt-cache" in line and words in line


def test_read_only_place_is_refused_before_the_run(cli_model, tmp_path, capsys, monkeypatch):
    """A folder where no file can be created (a read-only mount: the tests run as root, for whom permission bits
    do not refuse anything, so the creation probe is made to fail as such a mount makes it fail)."""
    real = tempfile.TemporaryFile

    def read_only(*args, dir=None, **kwargs):
        if dir is not None and os.path.samefile(dir, tmp_path):
            raise OSError(30, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    code, _, err = run(generate(cli_model, "--prompt-cache", str(tmp_path / "x.cache")), capsys)
    assert code == 2 and "not writable" in one_line(err) and "--prompt-cache" in err


def test_chat_session_onto_a_text_file_is_refused(cli_model, tmp_path, capsys, monkeypatch):
    book = tmp_path / "book.txt"
    book.write_text(TEXT)
    code, _, err = run(["chat", "--model", cli_model, "--session", str(book), "--quiet"], capsys, ["hi"], monkeypatch)
    assert code == 2 and "--session" in one_line(err) and "not a momjax session file" in err
    assert book.read_text() == TEXT


def test_save_in_chat_onto_a_text_file_or_a_bad_place_is_reported_and_the_chat_goes_on(cli_model, tmp_path, capsys,
                                                                                         monkeypatch):
    essay = tmp_path / "essay.txt"
    essay.write_text(TEXT)
    session = tmp_path / "chat.session"
    lines = ["/save " + str(essay), "/save /no/such/dir/x.session", "/save " + str(tmp_path), "Hello", "/quit"]
    code, out, err = run(["chat", "--model", cli_model, "--session", str(session), "--max-new-tokens", "3",
                          "--quiet"], capsys, lines, monkeypatch)
    assert code == 0, err
    assert essay.read_text() == TEXT
    assert err.count("momjax: error:") == 3 and "not a momjax session file" in err and "does not exist" in err
    assert len(out.strip().splitlines()) == 1  # the question after the failed saves was answered
    assert momjax.session_file.is_session_file(str(session))  # and --session was saved at the end


def test_library_save_never_replaces_a_foreign_file(zoo, tmp_path):
    model = zoo.model("llama-gqa")
    notes = tmp_path / "notes.txt"
    notes.write_text(TEXT)
    session = momjax.Session(model, "baseline")
    session.feed([5, 6, 7])
    with pytest.raises(SessionError, match="not a momjax session file"):
        session.save(str(notes))
    assert notes.read_text() == TEXT
    session.save(str(tmp_path / "s.session"))
    session.save(str(tmp_path / "s.session"))  # over its own session file: fine


# ---------------------------------------------------------------------- sessions that do not fit this model


def test_a_session_for_another_dtype_is_refused_and_kept_unless_replace_session(cli_model, tmp_path, capsys):
    cache = tmp_path / "long.cache"
    code, _, err = run(generate(cli_model, "--prompt-cache", str(cache)), capsys)
    assert code == 0, err
    before = cache.read_bytes()
    code, _, err = run(generate(cli_model, "--prompt-cache", str(cache), "--dtype", "bfloat16"), capsys)
    assert code == 2
    line = [x for x in err.strip().splitlines() if x.startswith("momjax: error:")]
    assert len(line) == 1 and "--replace-session" in line[0] and "bfloat16" in line[0]
    assert cache.read_bytes() == before  # refused and kept
    code, _, err = run(generate(cli_model, "--prompt-cache", str(cache), "--dtype", "bfloat16",
                                "--replace-session"), capsys)
    assert code == 0, err
    assert cache.read_bytes() != before and "replace" in err


# ---------------------------------------------------------------------- text files, paths, arguments


def test_a_model_path_that_is_a_file_says_so(cli_model, capsys):
    code, _, err = run(["generate", "--model", os.path.join(cli_model, "config.json"), "--prompt", "hi"], capsys)
    assert code == 2 and "is a file but not a GGUF file" in one_line(err) and "checkpoint folder" in one_line(err)


def test_a_prompt_file_that_is_a_folder_says_so(cli_model, tmp_path, capsys):
    code, _, err = run(["generate", "--model", cli_model, "--prompt-file", str(tmp_path)], capsys)
    assert code == 2 and "is a folder, not a file" in one_line(err)


def test_latin1_prompt_file_names_the_file_and_a_bom_is_dropped(cli_model, tmp_path, capsys):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    code, _, err = run(["generate", "--model", cli_model, "--prompt-file", str(latin)], capsys)
    assert code == 2
    line = one_line(err)
    assert str(latin) in line and "UTF-8" in line
    plain, bom = tmp_path / "plain.txt", tmp_path / "bom.txt"
    plain.write_text("Hello there", encoding="utf-8")
    bom.write_bytes(b"\xef\xbb\xbfHello there")
    outs = []
    for f in (plain, bom):
        code, out, err = run(["generate", "--model", cli_model, "--prompt-file", str(f), "--max-new-tokens", "3"],
                             capsys)
        assert code == 0, err
        outs.append((out, err.split("prompt tokens:")[1].split()[0]))
    assert outs[0] == outs[1]  # the same prompt tokens (the BOM is not three tokens) and the same answer


def test_sampling_options_without_a_temperature_are_noted(cli_model, capsys):
    code, _, err = run(generate(cli_model, "--top-p", "0.5", "--seed", "3"), capsys)
    assert code == 0 and "--top-p" in err and "--temperature" in err and "note" in err


def test_bfloat16_on_a_cpu_is_noted(cli_model, capsys):
    code, _, err = run(generate(cli_model, "--dtype", "bfloat16"), capsys)
    assert code == 0 and "bfloat16 on a CPU" in err


def test_plan_of_a_float32_checkpoint_plans_float32_and_says_so(cli_model, capsys):
    code, out, err = run(["plan", "--model", cli_model, "--hbm", "8GiB"], capsys)
    assert code == 0, err
    assert "float32" in out.splitlines()[0] and "planned in float32, the checkpoint's dtype" in out


def test_memory_report_of_a_model_is_in_its_dtype(zoo):
    model = zoo.model("llama-gqa", "float32", "bfloat16")
    assert momjax.memory_report(model, 64, "baseline")["dtype"] == "bfloat16"
    assert momjax.memory_report(model.config, 64, "baseline")["dtype"] == "float32"


def test_tilde_is_expanded(zoo, monkeypatch, tmp_path):
    folder = zoo.folder("llama-gqa")
    monkeypatch.setenv("HOME", os.path.dirname(folder))
    model = momjax.load("~/" + os.path.basename(folder), progress=False)
    assert model.path == folder


def test_encode_chat_with_a_conversation_says_what_to_use(cli_model):
    tok = momjax.load_tokenizer(cli_model)
    with pytest.raises(TokenizerError, match="render_chat"):
        tok.encode_chat([{"role": "user", "content": "hi"}])


# ---------------------------------------------------------------------- what a save leaves behind


def test_session_files_take_the_umask_and_stale_temp_files_go(zoo, tmp_path):
    model = zoo.model("llama-gqa")
    session = momjax.Session(model, "baseline")
    session.feed([5, 6, 7])
    stale = tmp_path / ".s.session.abc123.tmp"  # what a save killed midway leaves
    stale.write_bytes(b"half a file")
    old = os.umask(0o022)
    try:
        session.save(str(tmp_path / "s.session"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "s.session").st_mode) == 0o644
    assert not stale.exists() and sorted(os.listdir(tmp_path)) == ["s.session"]


# ---------------------------------------------------------------------- timings that are true


def test_chat_reports_the_document_prefill_after_the_work_and_compile_time_apart(cli_model, tmp_path, capsys,
                                                                                monkeypatch):
    doc = tmp_path / "doc.txt"
    doc.write_text("A document to read. " * 30)
    code, _, err = run(["chat", "--model", cli_model, "--document", str(doc), "--max-new-tokens", "3", "--quiet"],
                       capsys, ["Hello"], monkeypatch)
    assert code == 0, err
    assert "of it compiling" in err.split("document prefilled")[1].splitlines()[0]
    assert "s compiling" in err.strip().splitlines()[-1]  # the turn's summary line


def test_a_feed_blocks_only_when_asked_but_reports_its_compile_time(zoo):
    model = zoo.model("llama-gqa")
    session = momjax.Session(model, "baseline", capacity=128)  # room for both feeds: one set of shapes
    logits = session.feed(list(range(5, 40)))
    assert np.isfinite(np.asarray(logits)).all() and session.last_feed_compile_s >= 0.0
    session.feed(list(range(5, 40)))
    assert session.last_feed_compile_s < 0.01  # the same shapes: compiled already, kept by the session
