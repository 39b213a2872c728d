"""The kept sessions: the KV caches of recent conversations, found by their longest shared token prefix.

A request takes the kept `Session` whose tokens share the longest prefix with its prompt (`take`), rewinds it to
that prefix and feeds only the rest; afterwards the session (prompt and answer) is kept again (`keep`) as the
most recently used. The sessions' buffers (Session.nbytes: the whole capacity, where the policy puts them:
pinned host memory for `mom` and `mom-stream`) stay within a byte budget; the least recently used go first.

With a folder (`--cache-dir`), a kept session is also written there in the session file format (Session.save,
atomic: a file is whole or absent) when it is new or its request fed at least SAVE_MIN_FED tokens (a document),
not after every short turn, which would rewrite a long document's whole cache each time; a session dropped
from memory is removed from the folder, so the folder holds what memory holds (the latest short turns aside). A new store on the same folder loads its files back, newest
first, within the budget: a restart keeps the documents. Files that cannot be used with this model (another
model, dtype or K/V dtype, a damaged file) are left in place and skipped.
"""

from __future__ import annotations

import os
import secrets
from collections import OrderedDict

from momjax.chat import common_prefix
from momjax.errors import MomjaxError
from momjax.session import Session

SUFFIX = ".session"
SAVE_MIN_FED = 256  # a kept session is written to the folder again when its request fed this many tokens


class SessionStore:
    """Kept sessions of one model and policy, least recently used first, within `budget` bytes."""

    def __init__(self, model, policy, budget: int, folder: str | None = None, log=None):
        self.model, self.policy, self.budget = model, policy, int(budget)
        self.folder = folder
        self.log = log or (lambda message: None)
        self._kept: OrderedDict[str, Session] = OrderedDict()  # name -> session, least recently used first
        self.skipped: list[str] = []  # files in the folder that could not be loaded
        if folder:
            os.makedirs(folder, exist_ok=True)
            self._load_folder()

    # ------------------------------------------------------------------ state

    def __len__(self) -> int:
        return len(self._kept)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._kept.values())

    def lengths(self) -> list[int]:
        """The kept sessions' token counts, least recently used first."""
        return [s.length for s in self._kept.values()]

    def token_lists(self) -> list[list[int]]:
        """The kept sessions' tokens, least recently used first."""
        return [s.tokens for s in self._kept.values()]

    # ------------------------------------------------------------------ use

    def best(self, ids: list[int]) -> tuple[str | None, int]:
        """The kept session sharing the longest prefix with ids (at most len(ids) - 1 tokens: one is always fed)
        and that length; (None, 0) when none shares a token."""
        name, shared = None, 0
        for key, session in self._kept.items():
            n = min(common_prefix(session.tokens, ids), len(ids) - 1)
            if n > shared or (n == shared and n and name is not None):  # ties: the most recently used
                name, shared = key, n
        return (name, shared) if shared else (None, 0)

    def take(self, ids: list[int], capacity: int) -> tuple[Session, str, int]:
        """(session, name, cached): the kept session sharing the longest prefix with ids, rewound to it and
        taken out of the store until `keep` puts it back, or a new empty session with room for `capacity`
        tokens; cached is the number of prompt tokens it already holds."""
        name, shared = self.best(ids)
        if name is None:
            return Session(self.model, self.policy, capacity=capacity), secrets.token_hex(8), 0
        session = self._kept.pop(name)
        session.rewind(shared)
        return session, name, shared

    def keep(self, session: Session, name: str, fed: int = SAVE_MIN_FED) -> None:
        """Keep the session as the most recently used, save it to the folder (when it is new there or `fed`, the
        tokens its request fed, is at least SAVE_MIN_FED), and drop the least recently used sessions until the
        store fits its budget (a session larger than the whole budget is not kept)."""
        if session.length == 0:
            self._remove_file(name)
            return
        self._kept[name] = session
        self._kept.move_to_end(name)
        while self._kept and self.nbytes > self.budget:
            old, dropped = self._kept.popitem(last=False)
            self._remove_file(old)
            self.log(f"momjax serve: dropped a kept session of {dropped.length} tokens ({dropped.nbytes:,} bytes) "
                     "to stay within --cache-memory")
        if name in self._kept and self.folder and (fed >= SAVE_MIN_FED or not os.path.exists(self._path(name))):
            session.save(self._path(name))

    def discard(self, name: str) -> None:
        """Forget a taken session (its request failed, so its state is unknown)."""
        self._kept.pop(name, None)
        self._remove_file(name)

    # ------------------------------------------------------------------ the folder

    def _path(self, name: str) -> str:
        return os.path.join(self.folder, name + SUFFIX)

    def _remove_file(self, name: str) -> None:
        if self.folder:
            try:
                os.remove(self._path(name))
            except FileNotFoundError:
                pass

    def _load_folder(self) -> None:
        """The folder's session files, newest first, as long as they fit the budget."""
        files = [f for f in os.listdir(self.folder) if f.endswith(SUFFIX)]
        files.sort(key=lambda f: os.path.getmtime(os.path.join(self.folder, f)), reverse=True)
        loaded = []
        for f in files:
            path = os.path.join(self.folder, f)
            try:
                session = Session.load(self.model, path, policy=self.policy)
            except (MomjaxError, OSError) as e:
                self.skipped.append(f)
                self.log(f"momjax serve: skipped {path}: {' '.join(str(e).split())}")
                continue
            if sum(s.nbytes for _, s in loaded) + session.nbytes > self.budget:
                break
            loaded.append((f[: -len(SUFFIX)], session))
        for name, session in reversed(loaded):  # oldest first: the newest ends most recently used
            self._kept[name] = session
