"""The real-model demo (`momjax demo --real`): SmolLM2-135M-Instruct, a real trained model, answering questions
about a long real document held in a Session, with every memory policy.

`load` fetches SmolLM2-135M-Instruct's GGUF file once (momjax.gguf.fetch) and loads it with its tokenizer;
`ask_every_policy` puts the document in a Session per policy, asks the questions one after the other with the
model's chat template (each answer joins the conversation before the next question), and measures each policy's
memory for that document from the compiled programs. The default document is the Apache License 2.0 text that
jax ships (about 2,200 tokens). momjax.cli.demo prints what these return.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from momjax.chat import Conversation, common_prefix
from momjax.errors import InputError
from momjax.gguf.fetch import fetch_smollm2
from momjax.loading import Model, load
from momjax.memory import memory_report
from momjax.policy import POLICIES
from momjax.session import Session
from momjax.tokenizer import Tokenizer, load_tokenizer

QUESTIONS = ("Which version of the license is this?", "What must a redistributed copy of the Work include?")
NEW_TOKENS = 40
ANSWER_ROOM = 64  # Session capacity per question beyond its answer: the chat template's turn markers and the question


def default_document() -> tuple[str, str]:
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
    raise InputError("no Apache License text found among the installed packages; pass a document of your own "
                     "(momjax demo --real --document FILE)")


def load_model(log=None) -> tuple[str, Model, Tokenizer]:
    """(path, model, tokenizer) of SmolLM2-135M-Instruct, downloaded on first use (log: told about the download)."""
    path = fetch_smollm2(log=log)
    return path, load(path, progress=False), load_tokenizer(path)


@dataclass
class PolicyRun:
    """One policy's conversation: the document's prefill time, and per question the prompt (the whole
    conversation so far, as the chat template renders it), the answer's token ids and its time."""

    prefill_s: float
    prompts: list[list[int]] = field(default_factory=list)
    answers: list[list[int]] = field(default_factory=list)
    answer_s: list[float] = field(default_factory=list)


@dataclass
class RealRun:
    document_tokens: int
    runs: dict[str, PolicyRun]  # policy name -> its conversation
    reports: dict[tuple[str, str], dict]  # (policy, "prefill" | "decode") -> momjax.memory_report

    @property
    def reference(self) -> list[list[int]]:
        return next(iter(self.runs.values())).answers

    @property
    def differing(self) -> list[str]:
        """Policies whose answers are not the first policy's."""
        return [p for p, r in self.runs.items() if r.answers != self.reference]


def converse(model: Model, tok: Tokenizer, document: str, questions, max_new_tokens: int, policy) -> PolicyRun:
    """The document fed once into a Session, then each question answered greedily in turn: only what the cache
    lacks is fed, and each answer joins the conversation before the next question."""
    talk = Conversation(tok, document)
    doc_ids = talk.document_tokens()
    session = Session(model, policy, capacity=len(doc_ids) + len(questions) * (max_new_tokens + ANSWER_ROOM))
    t0 = time.perf_counter()
    session.feed(doc_ids)
    run = PolicyRun(prefill_s=time.perf_counter() - t0)
    for q in questions:
        ids = talk.tokens(q)
        run.prompts.append(ids)
        session.rewind(min(common_prefix(session.tokens, ids), len(ids) - 1))
        t0 = time.perf_counter()
        answer = session.generate(ids[session.length:], max_new_tokens).as_lists()[0]
        run.answer_s.append(time.perf_counter() - t0)
        run.answers.append(answer)
        talk.add_turn(q, tok.decode(answer))
    return run


def ask_every_policy(model: Model, tok: Tokenizer, document: str, questions=QUESTIONS,
                     max_new_tokens: int = NEW_TOKENS) -> RealRun:
    """Every policy's conversation over the document, and its float32 memory reports for the document's length.

    XLA compiles one program per thread: the policies and the memory reports run side by side."""
    if not document.strip() or not questions or not all(isinstance(q, str) and q.strip() for q in questions):
        raise InputError("give a document with some text and at least one question that is not empty")
    n_tokens = len(Conversation(tok, document).document_tokens())
    policies = list(POLICIES)
    phases = [(p, ph) for p in policies for ph in ("prefill", "decode")]
    with ThreadPoolExecutor(max_workers=len(policies)) as pool:
        reports = {key: pool.submit(memory_report, model, n_tokens, key[0], dtype="float32", phase=key[1])
                   for key in phases}
        runs = {p: pool.submit(converse, model, tok, document, questions, max_new_tokens, p) for p in policies}
        return RealRun(n_tokens, {p: r.result() for p, r in runs.items()},
                       {key: r.result() for key, r in reports.items()})
