"""What every command shares: the one-line usage error, argument parsing that reports in one line, the compile
cache switch, the policy arguments and --policy auto, prompt files, and the per-layer prefill progress line."""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import time

from momjax.errors import InputError, MomjaxError

COMPILE_CACHE_ENV = "MOMJAX_COMPILATION_CACHE"
POLICY_NAMES = ("baseline", "mom", "mom-stream", "mom-host")
DTYPES = ("float32", "bfloat16", "float16")


class UsageError(MomjaxError):
    """A command-line request that cannot run as given (reported as one line, exit status 2)."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (raised as UsageError and reported by main) instead of two."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def enable_compile_cache(path: str) -> None:
    """Keep compiled programs in `path` across runs (JAX's persistent compilation cache), small ones too.

    The folder must be writable: JAX would otherwise fail (or warn on every compile) only later, mid-run.
    """
    import jax

    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the compile cache folder {path} ({e.strerror or e}); pass a writable "
                         f"folder with --compile-cache or ${COMPILE_CACHE_ENV}") from None
    if not os.access(path, os.W_OK | os.X_OK) or not _writable(path):
        raise UsageError(f"the compile cache folder {path} is not writable; pass a writable folder with "
                         f"--compile-cache or ${COMPILE_CACHE_ENV}")
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def _writable(folder: str) -> bool:
    """True when a file can be created in folder (os.access alone says yes on a read-only mount for root)."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def check_numbers(args) -> None:
    """The numeric arguments a generating command takes, checked before anything is loaded (one place for
    generate, chat and demo)."""
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    temperature = getattr(args, "temperature", 0.0)
    if not math.isfinite(temperature) or temperature < 0:
        raise UsageError(f"--temperature must be a finite number >= 0 (0 is greedy), got {temperature}")
    if getattr(args, "top_k", None) is not None and args.top_k < 1:
        raise UsageError(f"--top-k must be a positive integer, got {args.top_k}")
    if getattr(args, "top_p", None) is not None and not 0 < args.top_p <= 1:  # NaN fails the comparison too
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not -(2**63) <= getattr(args, "seed", 0) < 2**63:
        raise UsageError(f"--seed must be an integer in [-2**63, 2**63), got {args.seed}")


def note_sampling(args) -> None:
    """--top-k, --top-p and --seed only matter when sampling: say so when they come without a --temperature (as
    transformers warns), rather than decoding greedily in silence."""
    given = [name for name, value in (("--top-k", args.top_k), ("--top-p", args.top_p)) if value is not None]
    given += ["--seed"] if args.seed != 0 else []
    if given and args.temperature == 0:
        log(f"momjax: note: {', '.join(given)} only matter when sampling; without --temperature (0: greedy) they are "
            "ignored. Pass e.g. --temperature 0.7 to sample")
    if args.temperature == 0:
        args.top_k = args.top_p = None  # noted once here, not warned about again by the library


def note_dtype(dtype: str) -> None:
    """A line when bfloat16 (or float16) runs on a CPU, where XLA computes it several times slower than float32."""
    import jax

    if jax.default_backend() == "cpu" and str(dtype) in ("bfloat16", "float16"):
        log(f"momjax: note: {dtype} on a CPU decodes several times slower than float32 (XLA's CPU kernels convert "
            "it); pass --dtype float32 for speed here")


MODEL_HELP = "Hugging Face or Orbax checkpoint folder, or a .gguf file"


def check_model_path(path: str) -> None:
    """--model: a checkpoint folder or a GGUF file."""
    from momjax.gguf import is_gguf

    if os.path.isfile(path) and not is_gguf(path):
        raise UsageError(f"model {path} is a file but not a GGUF file (it does not start with the bytes 'GGUF'); pass "
                         "a Hugging Face or Orbax checkpoint folder or a .gguf file")
    if not os.path.exists(path):
        raise UsageError(f"model {path} does not exist; pass a Hugging Face or Orbax checkpoint folder or a .gguf "
                         "file")


def read_text_file(path: str, what: str) -> str:
    """A text file's contents as UTF-8 (a BOM dropped); one-line errors naming the file otherwise."""
    if os.path.isdir(path):
        raise UsageError(f"{what} {path} is a folder, not a file")
    if not os.path.isfile(path):
        raise UsageError(f"{what} {path} does not exist")
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UsageError(f"{what} {path} is not UTF-8 text (byte {e.start}: {e.reason}); convert it to UTF-8, e.g. "
                         f"`iconv -f latin1 -t utf-8`") from None


def read_prompt(args) -> str:
    if args.prompt_file is not None:
        text = sys.stdin.read() if args.prompt_file == "-" else read_text_file(args.prompt_file, "prompt file")
    else:
        text = args.prompt
    if not text.strip():
        raise UsageError("the prompt is empty; give some text with --prompt or --prompt-file")
    return text


def add_policy_args(p) -> None:
    """--policy and its knobs."""
    p.add_argument("--policy", choices=POLICY_NAMES + ("auto",), default="mom",
                   help="memory policy (default: mom); auto: the fastest that fits this prompt (momjax plan), in "
                        "--hbm or the device's memory")
    p.add_argument("--kv-dtype", choices=("int8",), default=None,
                   help="int8 K/V cache: about half the memory, approximate (logits change slightly)")
    p.add_argument("--kv-device-layers", type=int, default=None, metavar="N",
                   help="with mom-stream: keep the first N layers' prompt K/V on the device, stream the rest")
    p.add_argument("--hbm", default=None, help="device memory --policy auto may use, e.g. 20GiB (default: the "
                                               "device's memory; this machine's RAM on a CPU)")


def add_device_args(p, processes: bool = True) -> None:
    p.add_argument("--devices", type=int, default=1, metavar="N",
                   help="split the model tensor-parallel over N devices (default 1); N must divide its query and KV "
                        "heads")
    if processes:
        p.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                       help="join a run of several processes (hosts): process 0's address; with --num-processes "
                            "and --process-id, and --devices counting every process's devices")
        p.add_argument("--num-processes", type=int, default=None, metavar="N")
        p.add_argument("--process-id", type=int, default=None, metavar="I")


def start_devices(args, cfg):
    """The mesh the command line asks for (None for one device), after joining a multi-process run when
    --coordinator is given: called before anything touches a device."""
    from momjax.mesh import check_mesh, distributed_init, make_mesh

    parts = tuple(getattr(args, name, None) for name in ("coordinator", "num_processes", "process_id"))
    if any(x is not None for x in parts):
        if any(x is None for x in parts):
            raise UsageError("a run of several processes needs all three of --coordinator HOST:PORT, "
                             "--num-processes N and --process-id I")
        try:
            distributed_init(args.coordinator, args.num_processes, args.process_id)
        except InputError as e:
            raise UsageError(str(e)) from None
    if parts[1] not in (None, 1):
        import jax

        if args.devices != len(jax.devices()):
            raise UsageError(f"--devices {args.devices}: a run of {parts[1]} processes splits the model "
                             f"over all their devices; give --devices {len(jax.devices())}")
    elif args.devices == 1:
        return None
    try:
        mesh = make_mesh(tp=args.devices)
        check_mesh(mesh, cfg)
    except InputError as e:
        raise UsageError(f"--devices {args.devices}: {e}") from None
    return mesh


def add_sampling_args(p, max_new_tokens: int, max_help: str | None = None) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=max_help)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=DTYPES, default=None, help="weights dtype (default: the checkpoint's)")


def add_weights_arg(p) -> None:
    p.add_argument("--weights", choices=("device", "host"), default="device",
                   help="host: keep the weights in host memory and bring each layer's to the device as it runs, the "
                        "next one's copy in flight (any policy, with --devices too: a model larger than the devices runs; "
                        "decoding is then bound by the host link)")


def loaded_weight_bytes(model) -> int:
    """The bytes of a loaded model's weights on each device (0 with weights="host"): free for --policy auto's plan."""
    from momjax.mesh import tp_degree
    from momjax.params import param_bytes

    return 0 if model.weights == "host" else param_bytes(model.config, model.dtype, tp_degree(model.mesh))


def resolve_policy(args, cfg, context: int, dtype, log=None, loaded_weight_bytes: int = 0):
    """The MemoryPolicy the command line asks for. --policy auto asks momjax.plan for the fastest policy that
    fits `context` tokens in --hbm (or the device's free memory, counting the model's weights as free when
    they are already loaded there, loaded_weight_bytes; the RAM on a CPU), with int8 K/V allowed when
    --kv-dtype int8 is given, and says which it chose on stderr."""
    import jax

    from momjax import machine
    from momjax import targets as T
    from momjax.memory import plan
    from momjax.policy import describe_policy, get_policy
    from momjax.units import format_bytes, parse_bytes

    if args.policy != "auto":
        try:
            policy = get_policy(args.policy).replace(kv_dtype=args.kv_dtype, kv_device_layers=args.kv_device_layers)
            policy.check_layers(cfg.num_layers)
        except ValueError as e:
            raise UsageError(f"--kv-device-layers: {e}") from None
        return policy
    if args.kv_device_layers is not None:
        raise UsageError("--kv-device-layers is chosen by --policy auto; give one or the other")
    device_limit, ram = machine.memory_limits()
    free = None
    if device_limit is not None:  # a GPU: what is free now, plus the weights if they are already loaded there
        free = device_limit - machine.device_memory_in_use() + loaded_weight_bytes
    kind = jax.devices()[0].device_kind if device_limit is not None else None
    target = T.from_device_kind(kind) if kind else None
    try:
        hbm = parse_bytes(args.hbm) if args.hbm is not None else (free or ram)
        if hbm is None:
            raise UsageError("--policy auto needs --hbm here (this machine does not say how much memory it has)")
        result = plan(cfg, hbm, ram, dtype=str(dtype), source="estimate", target=target, kv_dtype=args.kv_dtype,
                      context=context, new_tokens=max(args.max_new_tokens, 1), devices=getattr(args, "devices", 1),
                      weights=getattr(args, "weights", "device"))
    except UsageError:
        raise
    except ValueError as e:  # no policy fits, an unreadable --hbm, weights larger than the budget
        raise UsageError(f"--policy auto: {e}") from None
    rec = result["recommended"]
    policy = get_policy(rec["policy"]).replace(kv_dtype=rec["kv_dtype"], kv_device_layers=rec["kv_device_layers"],
                                               minisequence=rec["minisequence"])
    if log is not None:
        log(f"momjax: --policy auto chose {describe_policy(policy, cfg.num_layers)} for {context:,} tokens in "
            f"{format_bytes(hbm)}" + (f" (predicted {rec['decode_tokens_per_s']:.1f} tokens/s on "
                                      f"{result['target']['name']})" if target else "")
            + (f": {rec['why']}" if rec.get("why") else ""))
    return policy


def peak_device_memory() -> str:
    import jax

    from momjax.machine import peak_device_memory as peak
    from momjax.units import format_bytes

    n = peak()
    return f"n/a on {jax.default_backend().upper()}" if n is None else format_bytes(n)


class Interrupts:
    """Ctrl-C (SIGINT) held back while a block runs: the block checks `requested` between steps and stops cleanly,
    so a computation is never cut off midway (which could leave JAX's runtime mid-transfer at exit). Outside the
    main thread nothing changes, nor in a process started with SIGINT ignored (a shell's background job, which
    Ctrl-C at the terminal is not meant for)."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


class PrefillProgress:
    """The "prefill: layer i/L" line on stderr, driven by the model's per-layer callback.

    The model calls on_layer(i) once layer i (0-based) has finished, so the line shows i + 1 layers done:
    "layer L/L" appears only when the last layer is done. The line ends (a newline) then, or at close(),
    which the caller runs before it prints the first token, so the text never starts on the progress line.
    One instance serves every prefill of a command: jit keys its programs on the callback.
    """

    def __init__(self, stream=None):
        self.stream = stream  # None: sys.stderr at the time of writing (tests swap it)
        self.layers, self.done, self.t0, self.open = 0, 0, 0.0, False

    def start(self, layers: int) -> None:
        self.layers, self.done, self.t0, self.open = layers, 0, time.perf_counter(), False

    def __call__(self, layer) -> None:
        i = int(layer) + 1
        if i <= self.done or self.done >= self.layers:  # a late or repeated callback, or after close(): ignore
            return
        self.done = i
        last = i == self.layers
        print(f"\rprefill: layer {i}/{self.layers} ({time.perf_counter() - self.t0:.1f} s)", end="\n" if last else "",
              file=self.stream or sys.stderr, flush=True)
        self.open = not last

    def close(self) -> None:
        """End the line if it is still open, and ignore any callback that arrives afterwards."""
        if self.open:
            print(file=self.stream or sys.stderr, flush=True)
        self.open, self.done = False, self.layers
