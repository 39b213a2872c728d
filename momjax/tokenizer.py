"""Tokenizers from checkpoint folders and GGUF files, chat prompts, and text that streams out as tokens arrive.

Tokenizers load from local files only and never run code shipped with a checkpoint: a folder with a
tokenizer_config.json goes through `transformers.AutoTokenizer` (local_files_only, no remote code), one
with only a tokenizer.json through the `tokenizers` library, and a GGUF file through transformers' GGUF
support, from the file's metadata alone (its chat template is a string that transformers renders in its
sandboxed Jinja environment only when a chat prompt is encoded). `StreamDecoder` turns a growing list of token
ids into text pieces, holding back bytes that do not yet form a whole UTF-8 character.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings

from momjax.errors import CheckpointError, TokenizerError

# Files that make a folder's tokenizer loadable (any one of them, with tokenizer_config.json for the last two).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
REPLACEMENT = "\ufffd"  # what a decoder writes for bytes that are not (yet) valid UTF-8


class Tokenizer:
    """One interface over a transformers tokenizer or a bare `tokenizers.Tokenizer`."""

    def __init__(self, backend, path: str):
        self.backend = backend
        self.path = path
        self._fast = not hasattr(backend, "apply_chat_template")  # a bare tokenizers.Tokenizer
        self.chat_template = None if self._fast else getattr(backend, "chat_template", None)

    def __len__(self) -> int:
        return self.backend.get_vocab_size() if self._fast else len(self.backend)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text; add_special_tokens adds what the tokenizer adds by itself (e.g. BOS)."""
        if self._fast:
            return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def has_chat_template(self) -> bool:
        return not self._fast and bool(self.chat_template)

    def render_chat(self, messages: list[dict], generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation (a list of {"role": ..., "content": ...}) rendered with the chat template,
        ready for the assistant's reply when generation_prompt."""
        if not self.has_chat_template:
            raise TokenizerError(
                f"the tokenizer in {self.path} has no chat template; drop --chat to use the text as it is"
            )
        rendered = self.backend.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
        # The template writes the special tokens (BOS included) itself: do not add them a second time.
        return self.encode(rendered, add_special_tokens=False)

    def encode_chat(self, text: str, system: str | None = None) -> list[int]:
        """A one-turn chat (optional system message, then the user's text) ready for the assistant's reply."""
        for name, value in (("text", text), ("system", "" if system is None else system)):
            if not isinstance(value, str):
                hint = ("; for a whole conversation (a list of {'role': ..., 'content': ...}) use "
                        "render_chat(messages)") if isinstance(value, (list, tuple, dict)) else ""
                raise TokenizerError(f"encode_chat takes {name} as a string, got {type(value).__name__}{hint}")
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        return self.render_chat(messages)

    def stream(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)


def _import_transformers():
    """transformers' AutoTokenizer and logging module, imported without notices that read like errors.

    transformers prints that advice (even to `--quiet` commands) when it is imported without torch; momjax
    never needs torch, so the notice would only read like an error. It is silenced for the import alone:
    TRANSFORMERS_NO_ADVISORY_WARNINGS is restored afterwards, so later advice still reaches the user.
    """
    # transformers' hub code imports tqdm.auto, which warns "IProgress not found" in a notebook without
    # ipywidgets although its plain-text bars work: ignore exactly that message, not tqdm's other warnings.
    warnings.filterwarnings("ignore", message="IProgress not found", module="tqdm")
    name = "TRANSFORMERS_NO_ADVISORY_WARNINGS"
    before = os.environ.get(name)
    os.environ[name] = "1"
    try:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before
    return AutoTokenizer, hf_logging


def has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES)


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer saved in a checkpoint folder (a Hugging Face folder or an Orbax folder from convert), or the
    one a GGUF file's metadata describes."""
    path = os.path.expanduser(os.fspath(path))
    if os.path.isfile(path):
        return Tokenizer(gguf_backend(path), path)
    if not os.path.isdir(path):
        raise TokenizerError(f"{path} is not a folder; pass the checkpoint folder that holds the tokenizer files, "
                             "or a .gguf file")
    config_path = os.path.join(path, "tokenizer_config.json")
    json_path = os.path.join(path, "tokenizer.json")
    if not has_tokenizer(path):
        raise TokenizerError(
            f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the tokenizer files of the "
            "original checkpoint into it"
        )
    if not os.path.isfile(config_path):
        if not os.path.isfile(json_path):
            raise TokenizerError(f"{path} has a tokenizer but no tokenizer_config.json or tokenizer.json to read it")
        import tokenizers

        try:
            return Tokenizer(tokenizers.Tokenizer.from_file(json_path), path)
        except Exception as e:  # noqa: BLE001 - the Rust library raises bare Exceptions for malformed files
            raise TokenizerError(f"cannot read {json_path}: {e}") from None

    AutoTokenizer, hf_logging = _import_transformers()

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # keep transformers' advisory warnings out of the command's output
    try:
        backend = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises many types; all mean "cannot load it"
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TokenizerError(f"cannot load the tokenizer in {path}: {why}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return Tokenizer(backend, path)


def gguf_backend(path: str):
    """transformers' tokenizer built from a GGUF file's metadata alone (vocabulary, merges, special tokens, chat
    template).

    The file is reached through a link in an empty temporary folder, so tokenizer files that happen to lie
    beside it (another model's tokenizer_config.json) are never mixed in; nothing is fetched from the network.
    """
    from momjax.gguf.file import read_gguf

    try:
        read_gguf(path)  # a truncated or corrupt header: one clear error, not the reader's traceback
    except CheckpointError as e:
        raise TokenizerError(str(e)) from None
    AutoTokenizer, hf_logging = _import_transformers()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with tempfile.TemporaryDirectory(prefix="momjax-gguf-tokenizer-") as folder:
            name = os.path.basename(path)
            try:
                os.symlink(os.path.abspath(path), os.path.join(folder, name))
            except OSError:  # no symbolic links here (some Windows setups): read it where it is
                folder = os.path.dirname(os.path.abspath(path))
            return AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True,
                                                 trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises many types; all mean "cannot build it"
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TokenizerError(f"cannot build a tokenizer from the metadata of {path}: {why}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def save_gguf_tokenizer(path: str, folder: str, names) -> list[str]:
    """Write a GGUF file's tokenizer into folder as Hugging Face tokenizer files (tokenizer.json,
    tokenizer_config.json, ...), keeping only the files in names; returns the names written."""
    backend = gguf_backend(path)
    with tempfile.TemporaryDirectory(prefix="momjax-gguf-tokenizer-") as scratch:
        backend.save_pretrained(scratch)
        written = []
        for name in sorted(os.listdir(scratch)):
            if name in names:
                shutil.copyfile(os.path.join(scratch, name), os.path.join(folder, name))
                written.append(name)
    return written


class StreamDecoder:
    """Text of a growing token sequence, one new piece at a time.

    Decoding token by token is wrong for byte-level and SentencePiece tokenizers: one character can span
    several tokens, and a token's leading space depends on what precedes it. So each step decodes a short
    window of recent tokens twice, without and with the new ones, and emits only what the new tokens
    added. While the text ends in an incomplete UTF-8 sequence (decoded as U+FFFD) nothing is emitted; the
    bytes wait for the tokens that complete them. `flush` emits whatever is left at the end.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start: the text of ids[_prefix:_read] has been emitted already
        self._read = 0

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, ids) -> str:
        """Add token ids; return the text they complete ("" while a character is still incomplete)."""
        self.ids.extend(int(i) for i in ids)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""
        piece = after[len(before):] if after.startswith(before) else after[len(os.path.commonprefix([before, after])):]
        self._prefix, self._read = self._read, len(self.ids)
        return piece

    def flush(self) -> str:
        """The text not emitted yet, incomplete characters included."""
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return after[len(os.path.commonprefix([before, after])):]

    @property
    def text(self) -> str:
        """The whole text decoded at once (what the emitted pieces add up to after flush)."""
        return self._decode(self.ids)
