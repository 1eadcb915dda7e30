"""How long ``interp.load("smollm2")`` takes, cold (GGUF dequantised and converted) and warm (cached safetensors).

Every measurement is a fresh subprocess. The real cache is never touched: the runs use a temporary
``INTERP_CACHE`` holding a copy of ``models/`` only (the GGUF), and a cold run deletes its
``converted/`` folder first. The GGUF file itself is in the OS page cache after the first run, so
"cold" means "not converted yet", not "not on disk".

    .venv/bin/python bench/load.py                   # 2 cold + 5 warm runs, 2 threads
    .venv/bin/python bench/load.py --cold 3 --warm 7 --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

CHILD = r"""
import json, os, resource, sys, time
t0 = time.perf_counter()
sys.path.insert(0, os.environ["BENCH_ROOT"])
import torch
torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
import interp
from interp.embedded import cache_dir
t1 = time.perf_counter()
m = interp.load("smollm2")
t2 = time.perf_counter()
with torch.no_grad():
    logits = m.hf(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_forward_s": t3 - t2,
                  "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "converted": sorted(p.name for p in (cache_dir() / "converted").iterdir()),
                  "finite": bool(torch.isfinite(logits).all())}))
"""


def run_child(cache: Path, threads: int) -> dict:
    env = dict(os.environ, INTERP_CACHE=str(cache), BENCH_ROOT=str(C.ROOT), BENCH_THREADS=str(threads),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_DISABLE_PROGRESS_BARS="1")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, cwd=C.ROOT)
    wall = time.perf_counter() - t0
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            return {**json.loads(line), "process_s": wall}
    raise SystemExit(f"load subprocess failed ({p.returncode}):\n{p.stderr[-2000:]}")


def main(args) -> None:
    sys.path.insert(0, str(C.ROOT))
    from interp.embedded import cache_dir, embedded_path, lock

    src = embedded_path()
    if src is None:
        raise SystemExit("the embedded GGUF is not in the cache: run `python -m interp.embedded` first")
    print(f"# bench/load.py  {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"# machine: {C.machine()}; torch threads: {args.threads}; load average at start: {C.loadavg()}")
    print(f"# {C.versions()}")
    print(f"# model: {lock()['name']} ({src.name}, {src.stat().st_size / 2**20:.0f} MiB GGUF); "
          f"real cache {cache_dir()} left untouched")
    results = {"cold": [], "warm": []}
    with tempfile.TemporaryDirectory(prefix="interp-bench-cache-") as tmp:
        cache = Path(tmp)
        (cache / "models").mkdir()
        shutil.copy2(src, cache / "models" / src.name)  # models/ only: nothing converted yet
        converted = cache / "converted"
        for _ in range(args.cold):
            shutil.rmtree(converted, ignore_errors=True)
            r = run_child(cache, args.threads)
            assert r["converted"], "a cold load left no converted cache"
            results["cold"].append(r)
        if not args.cold:  # warm runs need a converted cache: make one, untimed
            run_child(cache, args.threads)
        for _ in range(args.warm):
            results["warm"].append(run_child(cache, args.threads))
    headers = ["interp.load('smollm2')", "runs", "load() s", "min-max s", "import s", "1st forward s",
               "process s", "peak RSS MiB"]
    rows = []
    for mode, label in (("cold", "cold (dequantise GGUF + write safetensors)"),
                        ("warm", "warm (cached safetensors)")):
        rs = results[mode]
        if not rs:
            continue
        loads = [r["load_s"] for r in rs]
        rows.append([label, str(len(rs)), f"{C.median(loads):.2f}", f"{min(loads):.2f}-{max(loads):.2f}",
                     f"{C.median([r['import_s'] for r in rs]):.2f}",
                     f"{C.median([r['first_forward_s'] for r in rs]):.2f}",
                     f"{C.median([r['process_s'] for r in rs]):.2f}",
                     f"{max(r['maxrss_kib'] for r in rs) / 1024:.0f}"])
    print()
    print(C.table(headers, rows))
    print()
    print("load() s: wall time of interp.load alone (median); import s: python + torch + interp imports; "
          "1st forward s: a 4-token forward right after loading; process s: the whole subprocess.")
    if results["cold"] and results["warm"]:
        print(f"cold / warm load(): {C.median([r['load_s'] for r in results['cold']]) / C.median([r['load_s'] for r in results['warm']]):.0f}x"
              f"; load average at end: {C.loadavg()}")
    print()
    print("Reproduce:", C.reproduce("load.py", sys.argv[1:]))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cold", type=int, default=2, help="cold runs (each deletes converted/ first)")
    p.add_argument("--warm", type=int, default=5, help="warm runs")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in the subprocesses")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse())
