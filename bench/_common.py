"""Shared helpers for the benchmarks in bench/: offline setup, memory probes, table printing."""
from __future__ import annotations

import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def offline() -> None:
    """No hub access here; make transformers / huggingface_hub fail fast instead of retrying."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no "Loading weights" bars in the tables


def block_torchvision_install() -> None:
    """TransformerLens 4.x may run `pip install torchvision` on the fly (multimodal processors).

    Never let it: any subprocess whose command line mentions torchvision raises instead, and TL's
    installer helper is replaced by one that reports "not available".
    """
    def guard(fn):
        def wrapped(cmd, *a, **kw):
            text = cmd if isinstance(cmd, str) else " ".join(map(str, cmd))
            if "torchvision" in text:
                raise RuntimeError(f"bench: blocked an attempt to run {text!r} (no torchvision installs)")
            return fn(cmd, *a, **kw)
        return wrapped
    for name in ("run", "call", "check_call", "check_output", "Popen"):
        orig = getattr(subprocess, name)
        if not getattr(orig, "_bench_guard", False):
            g = guard(orig) if name != "Popen" else _guard_popen(orig)
            g._bench_guard = True
            setattr(subprocess, name, g)
    try:
        from transformer_lens.model_bridge.sources.transformers import helpers
        helpers._ensure_torchvision = lambda: False
    except Exception:
        pass


def _guard_popen(Popen):
    class GuardedPopen(Popen):  # keep it a class so isinstance / subclassing keep working
        def __init__(self, args, *a, **kw):
            text = args if isinstance(args, str) else " ".join(map(str, args))
            if "torchvision" in text:
                raise RuntimeError(f"bench: blocked an attempt to run {text!r} (no torchvision installs)")
            super().__init__(args, *a, **kw)
    return GuardedPopen


# ------------------------------------------------------------------------------------- memory
def rss_kib() -> int:
    """Current resident set size (KiB)."""
    m = re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text())
    return int(m.group(1))


def hwm_kib() -> int:
    """Peak RSS of the live address space (VmHWM, KiB)."""
    m = re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text())
    return int(m.group(1))


def maxrss_kib() -> int:
    """resource.getrusage(RUSAGE_SELF).ru_maxrss (KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_peak() -> bool:
    """Reset the peak-RSS high-water mark (Linux >= 4.0: write 5 to /proc/self/clear_refs).

    Loading a model has its own transient peak; without a reset, ru_maxrss after the runs would
    report the load's peak whenever it is the larger one.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------- misc
def median(xs):
    return statistics.median(xs)


def machine() -> str:
    try:
        import psutil
        mem = f"{psutil.virtual_memory().total / 2**30:.0f} GiB"
    except Exception:
        mem = "?"
    cpu = platform.processor() or platform.machine()
    return f"{os.cpu_count()} cores ({cpu}), {mem} RAM, {platform.system()} {platform.release()}"


def loadavg() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def versions() -> str:
    out = []
    for mod in ("torch", "transformers", "transformer_lens", "nnsight"):
        try:
            from importlib.metadata import version
            out.append(f"{mod} {version(mod.replace('_', '-'))}")
        except Exception:
            out.append(f"{mod} (not installed)")
    return ", ".join(out)


def reproduce(script: str, argv: list[str]) -> str:
    py = os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) else sys.executable
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items())
                   if k == "PYTHONPATH" or k.startswith("MALLOC_"))
    cmd = f"{py} bench/{script} " + " ".join(shlex.quote(a) for a in argv)
    return f"cd {ROOT} && " + (f"{env} " if env else "") + cmd.rstrip()


def table(headers: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """A plain fixed-width table (first column left-aligned, the rest right-aligned)."""
    widths = [max(len(str(r[i])) for r in [headers] + rows) for i in range(len(headers))]
    align = align or "l" + "r" * (len(headers) - 1)

    def fmt(r):
        return "  ".join(str(c).ljust(w) if a == "l" else str(c).rjust(w) for c, w, a in zip(r, widths, align))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(headers), sep] + [fmt(r) for r in rows])


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t0
