"""Ctrl-C in a terminal, for real: the command runs in a pseudo-terminal and the test types Ctrl-C into it, so
the kernel sends SIGINT to the command as it does for a user. While an answer streams, chat stops that answer
and comes back to the prompt; at the prompt, chat saves --session and exits 130; `generate --prompt-cache`
stops, saves the cache and exits 130. Nothing crashes the interpreter (a Ctrl-C used to end in "Fatal Python
error: Segmentation fault")."""

from __future__ import annotations

import glob
import os
import pty
import select
import signal
import sys
import time

import momjax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRASH = ("Segmentation fault", "Fatal Python error", "Traceback")


class Terminal:
    """A command running in a pseudo-terminal, with what it printed so far."""

    def __init__(self, argv):
        env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: a session leader with this terminal as its controlling terminal
            # As a shell starts a foreground job: Ctrl-C not ignored, whatever this test process inherited (a shell
            # starts a background job, and everything it runs, with SIGINT ignored, and exec keeps that).
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execvpe(sys.executable, [sys.executable, "-m", "momjax.cli", *argv], env)
        self.text = ""

    def read_until(self, needle: str, timeout: float = 240, start: int = 0) -> int:
        """Read until needle appears after position start; its position."""
        deadline = time.monotonic() + timeout
        while needle not in self.text[start:]:
            left = deadline - time.monotonic()
            assert left > 0, f"no {needle!r} within {timeout} s; the terminal shows:\n{self.text[-3000:]}"
            ready, _, _ = select.select([self.fd], [], [], min(left, 1.0))
            if ready:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # the command exited and the terminal closed
                    chunk = b""
                if not chunk:
                    assert needle in self.text[start:], f"ended without {needle!r}:\n{self.text[-3000:]}"
                self.text += chunk.decode(errors="replace")
        return self.text.index(needle, start)

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 120) -> int:
        """The exit status (a negative signal number if a signal ended it), reading all it prints meanwhile."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.fd], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:
                    chunk = b""
                self.text += chunk.decode(errors="replace")
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
        state = _signal_state(self.pid)  # what each thread blocks, ignores and has pending, for the message below
        os.kill(self.pid, 9)
        raise AssertionError(f"still running after {timeout} s:\n{self.text[-3000:]}\n{state}")


def _signal_state(pid: int) -> str:
    """Each thread's state and signal masks (pending, blocked, ignored, caught) as /proc shows them (Linux)."""
    lines = []
    for task in sorted(glob.glob(f"/proc/{pid}/task/*")):
        try:
            with open(f"{task}/status") as f:
                fields = [line.split()[:2] for line in f if line.startswith(("State", "SigPnd", "ShdPnd", "SigBlk",
                                                                               "SigIgn", "SigCgt"))]
        except OSError:
            continue
        lines.append(f"thread {os.path.basename(task)}: " + " ".join(f"{k}{v}" for k, v in fields))
    return "\n".join(lines)


def _answer_started(term: Terminal, after: int, chars: int = 12) -> None:
    """Wait until the answer to the line typed at `after` has printed some characters."""
    line_end = term.read_until("\n", start=after)
    deadline = time.monotonic() + 240
    while len(term.text) - line_end < chars:
        assert time.monotonic() < deadline, term.text[-2000:]
        ready, _, _ = select.select([term.fd], [], [], 1.0)
        if ready:
            term.text += os.read(term.fd, 4096).decode(errors="replace")


def test_chat_ctrl_c_stops_an_answer_then_at_the_prompt_saves_and_exits(cli_model, tmp_path):
    session = tmp_path / "chat.session"
    term = Terminal(["chat", "--model", cli_model, "--session", str(session), "--max-new-tokens", "4000",
                     "--quiet"])
    term.read_until("> ")
    mark = len(term.text)
    term.type("Tell me a long story\n")
    _answer_started(term, mark)
    term.type("\x03")  # Ctrl-C while the answer streams
    stopped = term.read_until("stopped by Ctrl-C")
    term.read_until("> ", start=stopped)  # back at the prompt: the chat goes on
    mark = len(term.text)
    term.type("And another\n")
    _answer_started(term, mark)
    term.type("\x03")
    stopped = term.read_until("stopped by Ctrl-C", start=mark)
    term.read_until("> ", start=stopped)
    term.type("\x03")  # Ctrl-C at the prompt: saves --session as Ctrl-D does, and exits
    code = term.wait()
    assert code == 130, term.text[-2000:]
    assert not any(c in term.text for c in CRASH), term.text[-3000:]
    assert "saved" in term.text and momjax.session_file.is_session_file(str(session))
    saved = momjax.session_file.read_header(str(session))
    assert len(saved.info["chat"]["messages"]) == 4  # both turns, with the answers as far as they went


def test_generate_prompt_cache_ctrl_c_saves_the_cache_and_exits_130(cli_model, tmp_path):
    cache = tmp_path / "long.cache"
    term = Terminal(["generate", "--model", cli_model, "--prompt", "Once upon a time", "--max-new-tokens", "4000",
                     "--prompt-cache", str(cache), "--quiet"])
    deadline = time.monotonic() + 240
    while len(term.text) < 20:  # the text has started to stream
        assert time.monotonic() < deadline, term.text
        ready, _, _ = select.select([term.fd], [], [], 1.0)
        if ready:
            term.text += os.read(term.fd, 4096).decode(errors="replace")
    term.type("\x03")
    code = term.wait()
    assert code == 130, term.text[-2000:]
    assert not any(c in term.text for c in CRASH), term.text[-3000:]
    assert "interrupted" in term.text and momjax.session_file.is_session_file(str(cache))


def test_a_process_started_with_ctrl_c_ignored_keeps_ignoring_it():
    """A shell's background job starts with SIGINT ignored: Ctrl-C at the terminal is not for it, so holding Ctrl-C
    back while an answer streams leaves it ignored, and a foreground process gets its handler back afterwards."""
    from momjax.cli.common import Interrupts

    before = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with Interrupts():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with Interrupts():
            assert signal.getsignal(signal.SIGINT) not in (signal.SIG_IGN, signal.default_int_handler)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
