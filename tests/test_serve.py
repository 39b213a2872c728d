"""`momjax serve` against the real `openai` client: live servers (uvicorn in a background thread, on a free port)
over the demo checkpoint (byte-level tokenizer with a chat template), answers compared with momjax.generate on
the same templated prompt, prefix reuse, the queue, disconnects, bad requests, API keys, and a restart with
--cache-dir through the command line."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import uvicorn

import momjax
from momjax import demo_model as demo
from momjax.serve.app import create_app
from momjax.serve.cache import SessionStore
from momjax.serve.engine import Engine
from momjax.tokenizer import load_tokenizer

POLICY = "mom"  # kept caches in pinned host memory
DOCUMENT = ("Mini-sequences keep long prompts on one accelerator: the MLP runs on slices of the sequence, so its "
            "intermediate activations never exist for the whole prompt at once. ") * 5
QUESTIONS = ("What do mini-sequences keep?", "Why does the MLP run on slices?", "Say it again, shorter.")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return demo.write_checkpoint(str(tmp_path_factory.mktemp("serve-model") / "demo"))


@pytest.fixture(scope="module")
def model(folder):
    return momjax.load(folder, progress=False)


@pytest.fixture(scope="module")
def tok(folder):
    return load_tokenizer(folder)


def make_engine(model, tok, budget=2**30, cache_dir=None, policy=POLICY) -> Engine:
    policy = momjax.get_policy(policy)
    return Engine(model, tok, policy, SessionStore(model, policy, budget, cache_dir), "demo", default_max_tokens=16)


@contextlib.contextmanager
def live(engine, **kw):
    """A server on a free port in a background thread; yields its base URL (…/v1)."""
    config = uvicorn.Config(create_app(engine, **kw), host="127.0.0.1", port=0, log_level="warning",
                            lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def engine(model, tok):
    return make_engine(model, tok)


@pytest.fixture(scope="module")
def url(engine):
    with live(engine, max_body=2**20) as base:
        yield base


def client(url, key="none") -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120)


def expected(model, tok, messages, max_tokens) -> tuple[str, list[int]]:
    """momjax.generate's greedy answer to the templated conversation (text, tokens), in a fresh run."""
    ids = tok.render_chat(messages)
    tokens = momjax.generate(model, [ids], max_tokens, POLICY).as_lists()[0]
    return tok.decode(tokens), ids


def ask(c, messages, max_tokens=12, **kw):
    return c.chat.completions.create(model="demo", messages=messages, max_tokens=max_tokens, temperature=0, **kw)


def stream_text(c, messages, max_tokens=12, **kw) -> tuple[str, list]:
    chunks = list(c.chat.completions.create(model="demo", messages=messages, max_tokens=max_tokens, temperature=0,
                                            stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    return text, chunks


def test_answers_equal_generate_streamed_or_not(url, model, tok):
    messages = [{"role": "user", "content": "Tell me about KV caches."}]
    want, ids = expected(model, tok, messages, 12)
    c = client(url)
    r = ask(c, messages)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "demo"
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 12, len(ids) + 12)
    text, chunks = stream_text(c, messages)
    assert text == want
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    # The second time the prompt is in a kept session: all of it but the token that must be fed.
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == len(ids) - 1
    # A stop string cuts the text before it, and finishes with "stop".
    cut = want[3:6]
    r = ask(c, messages, stop=[cut, "never there"])
    assert r.choices[0].message.content == want[: want.index(cut)] and r.choices[0].finish_reason == "stop"
    text, chunks = stream_text(c, messages, stop=cut)
    assert text == want[: want.index(cut)] and chunks[-2].choices[0].finish_reason == "stop"


def test_completions_take_text_or_token_ids(url, model, tok):
    ids = tok.encode("Once upon a time")
    want = tok.decode(momjax.generate(model, [ids], 8, POLICY).as_lists()[0])
    c = client(url)
    for prompt in ("Once upon a time", ids):
        r = c.completions.create(model="demo", prompt=prompt, max_tokens=8, temperature=0)
        assert r.object == "text_completion" and r.choices[0].text == want and r.usage.prompt_tokens == len(ids)
    chunks = list(c.completions.create(model="demo", prompt=ids, max_tokens=8, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == want
    assert [m.id for m in c.models.list().data] == ["demo"]
    # Sampling: temperature, top_p, seed and the top_k extension reach the decoder as momjax.generate takes them.
    want = momjax.generate(model, [ids], 8, POLICY, temperature=0.9, top_k=20, top_p=0.95, seed=7).as_lists()[0]
    r = c.completions.create(model="demo", prompt=ids, max_tokens=8, temperature=0.9, top_p=0.95, seed=7,
                             extra_body={"top_k": 20})
    assert r.choices[0].text == tok.decode(want)


def test_a_document_then_three_questions_reuses_its_cache(url, model, tok):
    """As a chat front end sends them: the whole conversation every time. The 2nd and 3rd questions find the
    document (and the turns before) in a kept session; every answer equals a fresh run's."""
    three_questions(client(url), model, tok)


def test_mom_host_sessions_serve_the_same_answers(model, tok):
    """The same conversation served with mom-host, whose kept sessions are blocks in host memory."""
    with live(make_engine(model, tok, policy="mom-host")) as base:
        three_questions(client(base), model, tok)


def three_questions(c, model, tok):
    doc_tokens = len(tok.render_chat([{"role": "system", "content": DOCUMENT}], generation_prompt=False))
    messages = [{"role": "system", "content": DOCUMENT}]
    cached = []
    for question in QUESTIONS:
        messages.append({"role": "user", "content": question})
        want, ids = expected(model, tok, messages, 10)
        r = ask(c, messages, max_tokens=10)
        assert r.choices[0].message.content == want
        assert r.usage.prompt_tokens == len(ids)
        cached.append(r.usage.prompt_tokens_details.cached_tokens)
        messages.append({"role": "assistant", "content": r.choices[0].message.content})
    assert cached[0] < doc_tokens  # nothing kept holds this document yet
    assert cached[1] >= doc_tokens and cached[2] >= doc_tokens and cached[2] > cached[1]


def test_eight_concurrent_clients_get_their_answers(url, model, tok):
    questions = [f"Question number {i}: what is {i} plus {i}?" for i in range(8)]
    wants = [expected(model, tok, [{"role": "user", "content": q}], 8)[0] for q in questions]
    got = [None] * 8

    def one(i):
        got[i] = ask(client(url), [{"role": "user", "content": questions[i]}], max_tokens=8).choices[0].message.content

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == wants


def test_a_client_leaving_mid_stream_stops_its_generation(url, engine, tok):
    body = {"model": "demo", "messages": [{"role": "user", "content": "Go on forever."}], "max_tokens": 3000,
            "temperature": 0, "stream": True}
    prompt = tok.render_chat(body["messages"])
    health = f"{url.removesuffix('/v1')}/health"
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", f"{url}/chat/completions", json=body) as r:
            assert r.status_code == 200
            pieces = []
            for line in r.iter_lines():
                pieces += [line] if line.startswith("data: ") else []
                if len(pieces) == 3:
                    break
        # The connection is closed here: the server must stop generating and give the model back.
        deadline = time.time() + 20
        while (state := h.get(health).json())["running"] or state["waiting"]:
            assert time.time() < deadline, "the generation went on after its client left"
            time.sleep(0.05)
        # What was answered so far is kept, far shorter than the 3000 tokens asked for.
        (kept,) = [t for t in engine.store.token_lists() if t[: len(prompt)] == prompt]
        assert 1 <= len(kept) - len(prompt) < 1000
        r = h.post(f"{url}/chat/completions", json={**body, "stream": False, "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        assert h.get(health).json()["status"] == "ok"


BAD = [  # (body or raw bytes, status, code, param)
    (b"{not json", 400, "invalid_json", None),
    ({"model": "demo"}, 400, "missing_required_parameter", "messages"),
    ({"messages": []}, 400, "invalid_value", "messages"),
    ({"messages": "hello"}, 400, "invalid_value", "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "invalid_type", "messages[0].content"),
    ({"messages": [{"content": "hi"}]}, 400, "invalid_type", "messages[0]"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "invalid_type", "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4"}, 404, "model_not_found", "model"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, 400, "invalid_value", "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}, 400, "invalid_value", "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi" * 2040}], "max_tokens": 100}, 400, "context_length_exceeded",
     "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi" * 2040}], "max_completion_tokens": 100}, 400,
     "context_length_exceeded", "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400, "unsupported_parameter", "logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "unsupported_value", "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": [1]}, 400, "invalid_type", "stop"),
    (b"[" + b" " * (2**20 + 10) + b"]", 413, "request_too_large", None),
]


@pytest.mark.parametrize("body,status,code,param", BAD, ids=[f"{s}-{c}-{p}" for _, s, c, p in BAD])
def test_bad_requests_get_4xx_and_an_error_body(url, body, status, code, param):
    with httpx.Client(timeout=60) as h:
        kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else \
            {"json": body}
        r = h.post(f"{url}/chat/completions", **kw)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert (error["code"], error["param"]) == (code, param)
        assert "Traceback" not in r.text
        assert h.get(f"{url.removesuffix('/v1')}/health").json()["status"] == "ok"


def test_completions_refuse_token_ids_outside_the_vocabulary(url):
    r = httpx.post(f"{url}/completions", json={"prompt": [1, 2, 10**6], "max_tokens": 2}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_api_key_and_queue_limit(model, tok):
    """--api-key: 401 without it or with a wrong one; --max-queue 1: a third request while one runs and one
    waits gets 429 with Retry-After; the waiting one then runs."""
    with live(make_engine(model, tok), api_key="s3cret", max_queue=1) as base:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.get(f"{base}/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(base, "wrong").models.list()
        good = client(base, "s3cret")
        assert ask(good, [{"role": "user", "content": "hi"}], max_tokens=2).usage.completion_tokens == 2

        auth = {"Authorization": "Bearer s3cret"}
        long = {"messages": [{"role": "user", "content": "Go on."}], "max_tokens": 3000, "temperature": 0,
                "stream": True}
        short = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
        waited = {}
        with httpx.Client(timeout=60, headers=auth) as h:
            with h.stream("POST", f"{base}/chat/completions", json=long) as running:
                lines = running.iter_lines()  # kept: dropping the iterator would close the response
                next(lines)  # it runs
                waiter = threading.Thread(target=lambda: waited.update(r=h.post(f"{base}/chat/completions",
                                                                               json=short)))
                waiter.start()
                deadline = time.time() + 20
                while h.get(f"{base.removesuffix('/v1')}/health").json()["waiting"] != 1:
                    assert time.time() < deadline
                    time.sleep(0.05)
                r = h.post(f"{base}/chat/completions", json=short)
                assert r.status_code == 429 and r.headers["retry-after"] == "1"
                assert r.json()["error"]["type"] == "rate_limit_error"
            waiter.join(60)  # the long answer's client left: the waiting request runs
        assert waited["r"].status_code == 200 and waited["r"].json()["usage"]["completion_tokens"] == 2


def test_serve_command_restarts_with_its_cache_dir(folder, tmp_path, tok):
    """Two runs of `momjax serve --cache-dir`: the second serves the document the first kept, from disk."""
    cache, compiled = str(tmp_path / "kept"), str(tmp_path / "compiled")  # the second run loads the programs
    messages = [{"role": "system", "content": DOCUMENT}, {"role": "user", "content": QUESTIONS[0]}]
    doc_tokens = len(tok.render_chat(messages[:1], generation_prompt=False))
    answers, cached = [], []
    for run in range(2):
        proc = subprocess.Popen([sys.executable, "-m", "momjax.cli", "serve", "--model", folder, "--port", "0",
                                 "--cache-dir", cache, "--policy", POLICY, "--compile-cache", compiled],
                                stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            line = proc.stdout.readline()
            assert "momjax serve: demo on http://127.0.0.1:" in line, proc.stderr.read()
            base = line.split(" on ")[1].split()[0]
            r = ask(client(base), messages, max_tokens=6)
            answers.append(r.choices[0].message.content)
            cached.append(r.usage.prompt_tokens_details.cached_tokens)
            if run:  # SIGTERM while an answer streams: it finishes, then the server exits with status 0
                chunks = client(base).chat.completions.create(model="demo", messages=messages, max_tokens=300,
                                                              temperature=0, stream=True)
                next(chunks)
                proc.terminate()
                assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
        finally:
            proc.terminate()
            assert proc.wait(60) == 0
            assert "momjax serve: stopped" in proc.stderr.read()
        assert os.listdir(cache)
    assert cached[0] == 0 and cached[1] >= doc_tokens and answers[0] == answers[1]


def test_a_second_sigterm_while_the_server_shuts_down_is_still_a_clean_stop(folder):
    """SIGTERM, then another once the server has stopped serving but the process has not ended yet (JAX's teardown
    takes a moment, and Python drops its own handlers as it finalizes): status 0, not death by the signal."""
    proc = subprocess.Popen([sys.executable, "-m", "momjax.cli", "serve", "--model", folder, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert "momjax serve: demo on http://127.0.0.1:" in proc.stdout.readline(), proc.stderr.read()
        proc.terminate()
        lines = iter(proc.stderr.readline, "")
        assert any("momjax serve: stopped (SIGTERM)" in line for line in lines)
        time.sleep(0.2)
        proc.terminate()
    finally:
        code = proc.wait(60)
    assert code == 0


def test_serve_command_without_the_extra_or_exposed(folder, capsys, monkeypatch):
    from momjax.cli import main
    from momjax.cli.serve import warn_exposed

    with socket.socket() as taken:  # a port in use: one line before the model loads
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", "--model", folder, "--port", str(taken.getsockname()[1])]) == 2
        assert "cannot listen on 127.0.0.1 port" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert main(["serve", "--model", folder]) == 2
    assert 'pip install "momjax[serve]"' in capsys.readouterr().err
    warn_exposed("0.0.0.0", None)
    assert "WITHOUT an API key" in capsys.readouterr().err
    warn_exposed("127.0.0.1", None)
    warn_exposed("0.0.0.0", "key")
    assert capsys.readouterr().err == ""


def test_kept_sessions_stay_within_their_budget_least_recently_used_first(model, tmp_path):
    """Three conversations whose caches fit two at a time: the least recently used one goes, from memory and
    from the folder; a new store on the folder finds the two kept, and a prompt sharing a kept one's prefix is
    served from it."""
    policy = momjax.get_policy(POLICY)
    one = momjax.Session(model, policy, capacity=16)
    one.feed([5])
    budget = 2 * one.nbytes + one.nbytes // 2
    store = SessionStore(model, policy, budget, str(tmp_path))
    prompts = [[10 + i] * 12 for i in range(3)]
    for i, ids in enumerate(prompts):
        session, name, cached = store.take(ids, capacity=16)
        assert cached == 0 and session.length == 0
        session.feed(ids)
        store.keep(session, name, fed=len(ids))
        assert store.nbytes <= budget and len(store) == min(i + 1, 2)
    assert sorted(store.lengths()) == [12, 12] and len(os.listdir(tmp_path)) == 2
    # prompts[0] was dropped: nothing shares its prefix; prompts[2] + 3 tokens reuses all of prompts[2].
    assert store.best(prompts[0] + [7]) == (None, 0)
    again = SessionStore(model, policy, budget, str(tmp_path))
    session, name, cached = again.take(prompts[2] + [7, 8, 9], capacity=16)
    assert cached == 12 and session.tokens == prompts[2] and len(again) == 1


def test_stop_tokens_and_stop_strings_cut_the_answer(engine, tok):
    """The decoded chunks as Session.stream yields them: an end-of-sequence token ends the answer (counted, not
    shown, and what follows it in its chunk dropped); a stop string split across chunks is held back and cut."""
    from momjax.serve.engine import Job, StopText
    from momjax.serve.protocol import Request

    eos = demo.EOS_ID
    job = Job(engine, Request(kind="completion", model=None), [1], 10)
    text = "".join(job._decode(iter([[72, 105], [33, eos, 0]]), tok.stream(), StopText([])))
    assert (text, job.finish_reason, job.completion_tokens) == ("Hi!", "stop", 4)
    job = Job(engine, Request(kind="completion", model=None), [1], 10)
    pieces = list(job._decode(iter([[ord(c)] for c in "abcXY"] + [[ord("Z")], [ord("d")]]), tok.stream(),
                              StopText(["XYZ", "nope"])))
    assert ("".join(pieces), job.finish_reason) == ("abc", "stop")
    assert all("X" not in p for p in pieces)
    job = Job(engine, Request(kind="completion", model=None), [1], 3)
    text = "".join(job._decode(iter([[ord("a")], [ord("b")], [ord("c")]]), tok.stream(), StopText(["zz"])))
    assert (text, job.finish_reason, job.completion_tokens) == ("abc", "length", 3)
