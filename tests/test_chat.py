"""`momjax chat` and `momjax generate --prompt-cache`, run in-process through momjax.cli.main on the demo
checkpoint (byte-level tokenizer with a chat template), with piped input."""

from __future__ import annotations

import io
import os
import re
import sys

import pytest

import momjax
from momjax import demo_model as demo
from momjax.cli import main
from momjax.tokenizer import load_tokenizer

DOCUMENT = "Mini-sequences keep long prompts on one accelerator. " * 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return demo.write_checkpoint(str(tmp_path_factory.mktemp("chat-model")))


def chat(argv, lines, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    code = main(["chat", *argv])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def test_chat_turns_commands_and_session_file(folder, tmp_path, capsys, monkeypatch):
    """Piped turns with /rewind, /save, /reset: the same question right after the document gets the same
    answer every time (greedy), also from the saved session in a new run, and each turn has a summary line."""
    doc = tmp_path / "doc.txt"
    doc.write_text(DOCUMENT, encoding="utf-8")
    session = str(tmp_path / "chat.session")
    argv = ["--model", folder, "--document", str(doc), "--session", session, "--max-new-tokens", "6", "--quiet"]
    code, out, err = chat(argv, ["What keeps prompts short?", "And why?", "/rewind", "/save", "/reset",
                                 "What keeps prompts short?", "/quit"], capsys, monkeypatch)
    assert code == 0, err
    assert len(out) == 3 and out[0] == out[2]  # three answers; the first question asked again after /reset
    assert len(re.findall(r"\[\d+ tokens fed, \d+ new, first token in", err)) == 3
    assert "document prefilled" in err and "last turn dropped" in err and "conversation reset" in err
    assert os.path.isfile(session)

    code, out2, err2 = chat(argv, ["/reset", "What keeps prompts short?"], capsys, monkeypatch)
    assert code == 0, err2
    assert "loaded" in err2 and out2 == [out[0]]

    # The answer is the one-shot answer to the rendered conversation.
    tok = load_tokenizer(folder)
    rendered = tok.backend.apply_chat_template([{"role": "system", "content": DOCUMENT},
                                                {"role": "user", "content": "What keeps prompts short?"}],
                                               add_generation_prompt=True, tokenize=False)
    model = momjax.load(folder, progress=False)
    ids = tok.encode(rendered, add_special_tokens=False)
    assert out[0] == tok.decode(momjax.generate(model, [ids], 6, "mom").as_lists()[0])


def test_generate_prompt_cache_reuses_the_prefix(folder, tmp_path, capsys):
    cache = str(tmp_path / "prompt.cache")
    argv = ["generate", "--model", folder, "--prompt", "Once upon a time", "--max-new-tokens", "5", "--quiet",
            "--prompt-cache", cache]
    assert main(argv) == 0
    first = capsys.readouterr()
    assert "(0 reused" in first.err and os.path.isfile(cache)
    assert main(argv) == 0
    second = capsys.readouterr()
    n = len(load_tokenizer(folder).encode("Once upon a time"))
    assert f"({n - 1} reused" in second.err and second.out == first.out
    assert main(argv[:-1] + [str(tmp_path / "no" / "such.cache")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [(["--document", "/no/such/file"], "does not exist"),
                                           (["--max-new-tokens", "0"], "at least 1"),
                                           (["--session", "/no/such/dir/s.session"], "folder /no/such/dir does not exist")])
def test_chat_bad_input_is_one_line(folder, capsys, monkeypatch, extra, message):
    code, _, err = chat(["--model", folder, *extra], [], capsys, monkeypatch)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
