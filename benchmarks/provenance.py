"""Provenance for benchmark results: the commit the figures were made with."""

from __future__ import annotations

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_state() -> dict:
    """The commit the figures were made with, and whether momjax/ had uncommitted changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "momjax"], cwd=ROOT, capture_output=True, text=True,
                               check=True)
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "momjax_modified": None}
    return {"commit": commit.stdout.strip(), "momjax_modified": bool(dirty.stdout.strip())}
