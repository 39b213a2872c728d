"""`momjax demo`: the whole pipeline on a small random Llama, offline, in well under a minute; `momjax demo
--real`: a real trained model (SmolLM2-135M-Instruct, downloaded once) answering questions about a real
document held in a Session, with every memory policy.

Every run loads the demo model (momjax.demo_model builds and converts it on first use), generates from a text
prompt with each memory policy, checks that all policies produce the same tokens, and prints the demo model's
memory report and the context plan of Llama-3.1-8B on an 80 GiB accelerator.

`--real` (opt-in: it downloads 93 MB once) puts a long real document in a Session with each policy (the Apache
License 2.0 text that jax ships, about 2,200 tokens, or --document FILE), asks two questions (or --question) with
the model's chat template (momjax.demo_real), and prints the answers, which every policy must give identically,
and the memory table for that document.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor

from momjax import demo_real
from momjax.cli.common import UsageError, read_text_file
from momjax.demo_model import DEFAULT_PROMPT

PLAN_PRESET, PLAN_HBM = "llama-3.1-8b", "80GiB"
REPORT_TOKENS = 4096
RANDOM_NEW_TOKENS = 24


def add_parser(sub, common) -> None:
    p = sub.add_parser("demo", parents=[common], help="build a small random model offline and run every policy on "
                                                      "it (--real: a real model reading a document)")
    p.add_argument("--prompt", default=None, help="text to continue (default: a sentence about mini-sequences)")
    p.add_argument("--max-new-tokens", type=int, default=None, help=f"default {RANDOM_NEW_TOKENS} (--real: "
                                                                    f"{demo_real.NEW_TOKENS})")
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached demo checkpoint")
    p.add_argument("--real", action="store_true",
                   help="download SmolLM2-135M-Instruct once (93 MB) and ask it about a long document in a Session "
                        "with every policy")
    p.add_argument("--document", metavar="FILE", default=None,
                   help="with --real: the document (default: the Apache License 2.0 text jax ships)")
    p.add_argument("--question", action="append", default=None, metavar="TEXT",
                   help="with --real: a question (repeat for several; default: two about the license)")
    p.set_defaults(run=run)


def run(args) -> int:
    # Checked before anything is built, downloaded or loaded, with the same rules as generate.
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not args.real:
        if args.document is not None or args.question:
            raise UsageError("--document and --question go with --real (the random demo model cannot read)")
        prompt = DEFAULT_PROMPT if args.prompt is None else args.prompt
        if not prompt.strip():
            raise UsageError("the prompt is empty; give some text with --prompt (or leave it out for the default)")
        return demo(prompt=prompt, max_new_tokens=args.max_new_tokens or RANDOM_NEW_TOKENS, rebuild=args.rebuild)
    if args.prompt is not None:
        raise UsageError("--prompt is for the random demo; with --real ask with --question (and --document FILE)")
    document = source = None
    if args.document is not None:
        document = read_text_file(args.document, "document")
        if not document.strip():
            raise UsageError(f"document {args.document} is empty")
        source = args.document
    questions = args.question or demo_real.QUESTIONS
    if not all(q.strip() for q in questions):
        raise UsageError("a --question is empty; give some text")
    return real(document, questions, args.max_new_tokens or demo_real.NEW_TOKENS, source=source)


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:8.2f} MiB"


def demo(prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 24, rebuild: bool = False, out=None) -> int:
    """Run the demo; returns 0 when every policy generated the same tokens, 1 otherwise."""
    out = out or sys.stdout

    def log(*a):
        print(*a, file=out, flush=True)

    import momjax
    from momjax import memory
    from momjax.demo_model import SHAPES, VOCAB, demo_dir, prepare
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
        log("  prefill: mom and mom-stream run alike (mini-sequences, KV cache sent to the host layer by layer);\n"
            "  mom-host also keeps the residual stream on the host and streams the K/V back in blocks.\n"
            "  decode (one step): mom copies the KV cache back to the device, mom-stream leaves it on the host\n"
            "  and brings one layer at a time, mom-host one block at a time.\n"
            "  host = pinned host memory, the CPU RAM beside a GPU. On this CPU device and host are the same RAM;\n"
            "  the columns show how a GPU would split it.")

    log(f"\ncontext plan for {PLAN_PRESET} on {PLAN_HBM} of accelerator memory (bfloat16):")
    plan_cfg = momjax.preset(PLAN_PRESET)
    plan = memory.plan(plan_cfg, memory.parse_bytes(PLAN_HBM), dtype="bfloat16")
    log(memory.plan_table(plan))
    for note in memory.plan_notes(plan_cfg, plan):
        log(note)
    log(f"\ntry the demo model from the command line (random weights, so the text is noise):\n"
        f"  momjax generate --model {path} --chat --prompt \"Hello\"")
    log(f"\ndemo finished in {time.perf_counter() - t_start:.1f} s")
    return 0 if same else 1


def real(document: str | None = None, questions=demo_real.QUESTIONS, max_new_tokens: int = demo_real.NEW_TOKENS,
         out=None, source: str | None = None) -> int:
    """`momjax demo --real`; returns 0 when every policy gave the same answers, 1 otherwise."""
    out = out or sys.stdout

    def log(*a):
        print(*a, file=out, flush=True)

    t_start = time.perf_counter()
    if document is None:
        source, document = demo_real.default_document()
    log("momjax demo --real: SmolLM2-135M-Instruct (a real trained model, 4-bit GGUF) reading "
        f"{source or 'your document'}")
    path, model, tok = demo_real.load_model(log=lambda m: log(f"  {m}"))
    log(f"  loaded {path}: {model.config.num_layers} layers, hidden {model.config.hidden_size}, dequantized to "
        f"{model.dtype}")
    log(f"  each policy prefills the document once into a Session, then answers {len(questions)} questions "
        f"(greedy, at most {max_new_tokens} new tokens each)")
    result = demo_real.ask_every_policy(model, tok, document, questions, max_new_tokens)
    for i, q in enumerate(questions):
        log(f"\nQ: {q}")
        if all(r.answers[i] == result.reference[i] for r in result.runs.values()):
            log(f"A: {tok.decode(result.reference[i]).strip()}")
        else:
            for p, r in result.runs.items():
                log(f"A ({p}): {tok.decode(r.answers[i]).strip()}")
    log("")
    for p, r in result.runs.items():
        log(f"  {p:<11} {result.document_tokens}-token document prefilled in {r.prefill_s:.1f} s, answers in "
            + ", ".join(f"{t:.1f} s" for t in r.answer_s) + " (compilation included)")
    if result.differing:
        log("✗ the policies' answers differ from the first one's: " + ", ".join(result.differing))
    else:
        log(f"✓ all {len(result.runs)} policies gave the same answers, token for token")
    log(f"\nmemory of SmolLM2-135M with this {result.document_tokens}-token document (float32, from the compiled "
        "programs):")
    log(f"  {'policy':<11} {'phase':<8} {'device':>12} {'host':>12} {'weights':>12} {'kv cache':>12} {'temp':>12}")
    for (p, ph), r in result.reports.items():
        cells = [_mib(r.get(k)) for k in ("device_bytes", "host_bytes", "weight_bytes", "kv_bytes", "temp_bytes")]
        log(f"  {p:<11} {ph:<8} " + " ".join(f"{c:>12}" for c in cells) + f"   ({r.get('source', '?')})")
    log(f"\nchat with it yourself:\n  momjax chat --model {path} --document FILE")
    log(f"\ndemo finished in {time.perf_counter() - t_start:.1f} s")
    return 1 if result.differing else 0
