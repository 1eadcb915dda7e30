"""Cost of capturing attention patterns: interp vs HF eager, TransformerLens 4.x and nnsight.

One table, one run, SmolLM2-135M-Instruct (the embedded model, fp32, CPU), random token ids
(fixed seed), batch 1. Time: warm-up runs, then the median of --repeats timed runs; the rows are
timed round-robin in one process, so load from other processes on the machine hits all rows alike,
in a fresh random order each round, so no row always runs right after the same (heavy or light) row.
Memory: every row again in fresh subprocesses (this script with --row NAME): the peak RSS of its
runs minus the RSS once its model is loaded and its weights paged in ("Δpeak", the high-water mark
is reset after loading through /proc/self/clear_refs, then read as ru_maxrss/VmHWM), median of
--mem-runs subprocesses; "live Δ", the same in one subprocess with MALLOC_MMAP_THRESHOLD_=65536 so
that RSS follows the bytes actually held (no glibc heap slack); and the total peak RSS.
Ratios are against row 1, the plain HF SDPA forward.

    .venv/bin/python bench/capture.py                      # 512 tokens, 2 threads, 5 repeats, + the 8,192-token rows
    .venv/bin/python bench/capture.py --long 0             # the 512-token table only

Long context (``--long T``, default 8192): the plain forward (row 1) and the reducer-only capture (row 4) again at
T tokens, each in fresh subprocesses (one warm-up and ``--long-repeats`` timed runs, then the peak RSS of the
process), the two rows alternated ``--long-rounds`` times. Both rows return the logits of the last position only
(``logits_to_keep=1``, passed through interp's inputs dict): at 8,192 tokens the full [T, 49152] fp32 logits are
1.5 GiB that neither a reducer-only capture nor the comparison needs.
    .venv/bin/python bench/capture.py --tokens 1024 --threads 2 --repeats 7
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import random
import subprocess
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

C.offline()
C.block_torchvision_install()
warnings.filterwarnings("ignore")

import torch  # noqa: E402

try:  # the installed (editable) interp, or a copy on PYTHONPATH to compare a change
    import interp  # noqa: E402
except ImportError:
    sys.path.insert(0, str(C.ROOT))
    import interp  # noqa: E402

ROWS = ["sdpa", "eager", "interp", "reducers", "idle", "tl", "nnsight", "tl_all"]
LABELS = {
    "sdpa": "1 plain forward (HF sdpa)",
    "eager": "2 HF eager, output_attentions=True",
    "interp": "3 interp.capture, all patterns",
    "reducers": "4 interp.capture, KeyMass+Entropy only",
    "idle": "5 interp idle (no capture)",
    "tl": "6 TransformerLens 4 run_with_cache",
    "nnsight": "7 nnsight trace, save patterns",
    "tl_all": "8 TransformerLens 4 run_with_cache()",
}
TL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # only names the bridge's config; nothing is downloaded


_ARGS = None  # the parsed arguments (``--logits-last`` reaches build())


class Unavailable(Exception):
    """A row that cannot run here; the message says why."""


# ------------------------------------------------------------------------------------- rows
def build(row: str, m, private: bool):
    """Return (run, patterns): run(ids) -> result; patterns(result) -> list of [b,h,q,k] or None.

    ``private``: the row may take ``m.hf`` itself (a subprocess measuring one row); otherwise it
    works on its own deep copy so rows in one process do not disturb each other.
    """
    L = m.n_layers

    def hf_copy(impl: str):
        hf = m.hf if private else copy.deepcopy(m.hf)
        hf.set_attn_implementation(impl)
        return hf

    extra = {"logits_to_keep": 1} if getattr(_ARGS, "logits_last", False) else {}
    if row == "sdpa":
        hf = hf_copy("sdpa")

        def run(ids):
            with torch.no_grad():
                return hf(input_ids=ids, **extra)
        return run, None

    if row == "eager":
        hf = hf_copy("eager")

        def run(ids):
            with torch.no_grad():
                return hf(input_ids=ids, output_attentions=True)
        return run, lambda out: list(out.attentions)

    if row == "interp":
        def run(ids):
            return interp.capture(m, {"input_ids": ids}, sites="blocks.*.attn.pattern")
        return run, lambda tr: [tr[f"blocks.{l}.attn.pattern"] for l in range(L)]

    if row == "reducers":
        def run(ids):
            return interp.capture(m, {"input_ids": ids, **extra}, reducers=[interp.KeyMass(), interp.Entropy()])
        return run, None

    if row == "idle":
        def run(ids):
            with torch.no_grad():
                return m.hf(input_ids=ids)
        return run, None

    if row in ("tl", "tl_all"):
        try:
            from transformer_lens.model_bridge import TransformerBridge
        except Exception as e:
            raise Unavailable(f"transformer_lens 4.x TransformerBridge not importable: {type(e).__name__}: {e}")
        hf = hf_copy("eager")
        try:
            bridge = TransformerBridge.boot_transformers(TL_NAME, hf_model=hf, tokenizer=m.tokenizer, device="cpu")
        except Exception as e:
            raise Unavailable(f"TransformerBridge.boot_transformers(hf_model=...) failed: "
                              f"{type(e).__name__}: {str(e)[:200]}")
        names = [f"blocks.{l}.attn.hook_pattern" for l in range(L)]
        missing = [n for n in names if n not in bridge.hook_dict]
        if missing:
            raise Unavailable(f"the bridge exposes no {missing[0]} hook")
        wanted = set(names)

        def run(ids):
            with torch.no_grad():
                if row == "tl_all":  # the default call: every hook point is cached
                    return bridge.run_with_cache(ids)
                return bridge.run_with_cache(ids, names_filter=lambda n: n in wanted)
        return run, lambda res: [res[1][n] for n in names]

    if row == "nnsight":
        try:
            import nnsight
        except Exception as e:
            raise Unavailable(f"nnsight not importable: {type(e).__name__}: {e}")
        hf = hf_copy("eager")  # eager attention returns the weights as self_attn's output[1]
        try:
            lm = nnsight.LanguageModel(hf, tokenizer=m.tokenizer)
        except Exception as e:
            raise Unavailable(f"nnsight.LanguageModel(hf_model) failed: {type(e).__name__}: {str(e)[:200]}")

        def run(ids):
            saved = []
            with torch.no_grad():
                with lm.trace(ids):
                    for l in range(L):  # a plain loop: nnsight 0.8 re-executes this block's source
                        saved.append(lm.model.layers[l].self_attn.output[1].save())
            return saved
        return run, lambda saved: list(saved)

    raise ValueError(f"unknown row {row!r}; rows are {ROWS}")


def make_ids(m, tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, m.adapter.vocab_size, (1, tokens), generator=g)


# ------------------------------------------------------------------------------------- one row
def measure_row(args) -> dict:
    """Subprocess body: build one row on a fresh model, then its peak memory over the runs."""
    torch.set_num_threads(args.threads)
    m = interp.load("smollm2")
    ids = make_ids(m, args.tokens, args.seed)
    out = {"row": args.row, "load_peak_kib": C.maxrss_kib()}
    try:
        run, _ = build(args.row, m, private=True)
    except Unavailable as e:
        return {**out, "error": str(e)}
    with torch.no_grad():  # page the weights in: safetensors are mmapped and read lazily by the first forward
        for t in list(m.hf.parameters()) + list(m.hf.buffers()):
            t.sum()
    gc.collect()
    out["loaded_kib"] = C.rss_kib()
    out["reset"] = C.reset_peak()
    times = []
    for i in range(args.warmup + args.mem_repeats):
        t0 = time.perf_counter()
        res = run(ids)
        dt = time.perf_counter() - t0
        if i >= args.warmup:
            times.append(dt)
        del res  # never hold one run's result while the next one computes
        gc.collect()
    out["maxrss_kib"] = C.maxrss_kib()
    out["hwm_kib"] = C.hwm_kib()
    # ru_maxrss also remembers threads that exited before the reset; VmHWM is the live address space's
    out["peak_kib"] = out["hwm_kib"] if out["reset"] else out["maxrss_kib"]
    out["delta_kib"] = out["peak_kib"] - out["loaded_kib"]
    out["time_s"] = C.median(times)
    return out


LIVE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # every block >= 64 KiB is its own mmap, unmapped on free


def memory_of(row: str, args, env: dict | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--row", row, "--tokens", str(args.tokens),
           "--threads", str(args.threads), "--seed", str(args.seed), "--warmup", str(args.warmup),
           "--mem-repeats", str(args.mem_repeats)] + (["--logits-last"] if getattr(args, "logits_last", False) else [])
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=C.ROOT, env={**os.environ, **(env or {})})
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"row": row, "error": f"subprocess exited {p.returncode}: {p.stderr.strip().splitlines()[-1:]}"}


def memory(row: str, args) -> dict:
    """Median over --mem-runs subprocesses with the default allocator, plus one 'live' subprocess.

    glibc's heap keeps freed [b,h,q,k] temporaries around in ways that vary from run to run (its mmap
    threshold adapts to the allocation pattern), so the same row can peak 200 MiB apart; the 'live'
    run fixes the threshold so that RSS follows the bytes actually held.
    """
    runs = [memory_of(row, args) for _ in range(args.mem_runs)]
    bad = [r for r in runs if "error" in r]
    if bad:
        return bad[0]
    out = {"row": row, "delta_kib": C.median([r["delta_kib"] for r in runs]),
           "peak_kib": C.median([r["peak_kib"] for r in runs]),
           "delta_runs_kib": [r["delta_kib"] for r in runs]}
    live = memory_of(row, args, LIVE_ENV)
    if "delta_kib" in live:
        out["live_kib"] = live["delta_kib"]
    return out


# ------------------------------------------------------------------------------------- checks
def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b, strict=True))


def checks(m, ids, runners, results) -> list[str]:
    """Same tensors in every row: patterns vs HF eager, reducers vs the full patterns."""
    lines = []
    ref = runners["eager"][1](results["eager"]) if "eager" in results else None
    if ref is None:
        return ["(no HF eager reference; pattern agreement not checked)"]
    shape = tuple(ref[0].shape)
    for row in ("interp", "tl", "nnsight", "tl_all"):
        if row not in results:
            lines.append(f"  {LABELS[row]}: not run")
            continue
        pats = runners[row][1](results[row])
        if len(pats) != len(ref) or tuple(pats[0].shape) != shape:
            lines.append(f"  {LABELS[row]}: {len(pats)} patterns of {tuple(pats[0].shape)} "
                         f"(expected {len(ref)} of {shape})  MISMATCH")
            continue
        lines.append(f"  {LABELS[row]:<40} max |Δ| vs HF eager = {max_abs_diff(pats, ref):.2e} "
                     f"({len(pats)} layers x {shape})")
    if "reducers" in results:
        tr = results["reducers"]
        d_mass = max((tr[f"blocks.{l}.attn.key_mass"] - ref[l].sum(2)).abs().max().item() for l in range(len(ref)))
        H = [-(p * torch.log(p.clamp_min(1e-30))).sum(-1) for p in ref]
        d_ent = max((tr[f"blocks.{l}.attn.entropy"] - H[l]).abs().max().item() for l in range(len(ref)))
        lines.append(f"  {LABELS['reducers']:<40} max |Δ| key_mass vs Σ_q eager = {d_mass:.2e}, "
                     f"entropy vs eager = {d_ent:.2e}")
    for row in ("sdpa", "idle"):
        if row in results:
            lo = results[row].logits
            lines.append(f"  {LABELS[row]:<40} max |Δ| logits vs HF eager = "
                         f"{(lo - results['eager'].logits).abs().max().item():.2e}")
    return lines


# ------------------------------------------------------------------------------------- main
def main(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    argv = [a for a in sys.argv[1:]]
    print(f"# bench/capture.py  {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"# machine: {C.machine()}; torch threads: {args.threads}; load average at start: {C.loadavg()}")
    print(f"# {C.versions()}")
    print(f"# interp {interp.__version__} from {Path(interp.__file__).parent}")
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    print(f"# allocator: glibc malloc{' with ' + str(malloc) if malloc else ' (default settings)'}")
    m = interp.load("smollm2")
    print(f"# model: {m.name} ({m.n_layers} layers, {m.n_heads} heads, {m.n_kv_heads} kv heads, d={m.d_model}), "
          f"fp32, batch 1, {args.tokens} random tokens (seed {args.seed}); "
          f"{args.warmup} warm-up + median of {args.repeats} timed runs, rows round-robin in a random order")
    ids = make_ids(m, args.tokens, args.seed)

    runners, errors = {}, {}
    for row in ROWS:
        try:
            runners[row] = build(row, m, private=False)
        except Unavailable as e:
            errors[row] = str(e)

    # warm-up, keeping the first result of each row for the agreement checks
    results = {}
    for row, (run, _) in runners.items():
        for i in range(args.warmup):
            try:
                res = run(ids)
            except Exception as e:  # a library that builds but cannot run this model
                errors[row] = f"run failed: {type(e).__name__}: {str(e)[:200]}"
                break
            if i == 0:
                results[row] = res
            del res
    for row in errors:
        runners.pop(row, None)
    check_lines = checks(m, ids, runners, results)
    results.clear()
    gc.collect()

    times = {row: [] for row in runners}
    order = list(runners)
    shuffle = random.Random(args.seed)
    for r in range(args.repeats):
        shuffle.shuffle(order)  # a rotation would keep every row behind the same neighbour
        for row in order:
            t0 = time.perf_counter()
            res = runners[row][0](ids)
            times[row].append(time.perf_counter() - t0)
            del res
    med = {row: C.median(ts) for row, ts in times.items()}
    spread = {row: (min(ts), max(ts)) for row, ts in times.items()}
    load_end = C.loadavg()
    del runners
    gc.collect()

    mem = {}
    if not args.no_memory:
        for row in ROWS:
            if row not in errors:
                mem[row] = memory(row, args)
                if "error" in mem[row]:
                    errors.setdefault(row, mem[row]["error"])

    base_t = med.get("sdpa")
    base = mem.get("sdpa", {})
    headers = ["row", "time ms", "x sdpa", "min-max ms", "Δpeak MiB", "x sdpa", "live Δ MiB", "x sdpa",
               "peak RSS MiB", "x sdpa"]
    rows = []
    for row in ROWS:
        if row in errors and row not in med:
            rows.append([LABELS[row], "n/a"] + [""] * (len(headers) - 2))
            continue
        t = med[row]
        lo, hi = spread[row]
        mm = mem.get(row, {})

        def ratio(key):
            return f"{mm[key] / base[key]:.2f}x" if base.get(key) else ""
        if "delta_kib" in mm and "delta_kib" in base:
            mcols = [f"{mm['delta_kib'] / 1024:.0f}", ratio("delta_kib"),
                     f"{mm['live_kib'] / 1024:.0f}" if "live_kib" in mm else "n/a", ratio("live_kib") if "live_kib" in mm else "",
                     f"{mm['peak_kib'] / 1024:.0f}", ratio("peak_kib")]
        else:
            mcols = ["n/a", "", "n/a", "", "n/a", ""]
        rows.append([LABELS[row], f"{t * 1e3:.0f}", f"{t / base_t:.2f}x", f"{lo * 1e3:.0f}-{hi * 1e3:.0f}"] + mcols)
    print()
    print(C.table(headers, rows))
    print()
    print(f"time: median of {args.repeats} runs, rows round-robin in one process, a random order each round; min-max: fastest and slowest run. "
          f"Load average at end of timing: {load_end}")
    print(f"Δpeak: peak RSS of the row's runs minus its RSS once loaded (weights paged in, peak reset), fresh "
          f"subprocess per row, median of {args.mem_runs}; live Δ: the same with " + " ".join(f"{k}={v}" for k, v in LIVE_ENV.items()) + f" (RSS = bytes held, "
          f"no allocator slack); peak RSS: the total, median")
    for row, why in errors.items():
        print(f"  {LABELS[row]}: NOT MEASURED: {why}")
    print("Same tensors in every row:")
    for line in check_lines:
        print(line)

    print("Targets:")

    def verdict(ok):
        return "PASS" if ok else "MISS"
    best = {row: lo for row, (lo, hi) in spread.items()}
    if "interp" in med and "eager" in med:
        r = med["interp"] / med["eager"]
        print(f"  [{verdict(r <= 1.1)}] all patterns <= 1.1x HF eager time: {r:.2f}x "
              f"(ratio of best runs: {best['interp'] / best['eager']:.2f}x)")
    if "reducers" in med and base_t:
        r = med["reducers"] / base_t
        print(f"  [{verdict(r <= 1.2)}] reducer-only <= 1.2x plain SDPA time: {r:.2f}x "
              f"(ratio of best runs: {best['reducers'] / best['sdpa']:.2f}x)")
    if "delta_kib" in mem.get("interp", {}) and "delta_kib" in mem.get("tl", {}):
        r = mem["interp"]["delta_kib"] / mem["tl"]["delta_kib"]
        rt = mem["interp"]["peak_kib"] / mem["tl"]["peak_kib"]
        rl = (f", live Δ: {mem['interp']['live_kib'] / mem['tl']['live_kib']:.2f}x"
              if "live_kib" in mem["interp"] and "live_kib" in mem["tl"] else "")
        runs = lambda row: "/".join(f"{d / 1024:.0f}" for d in mem[row]["delta_runs_kib"])  # noqa: E731
        print(f"  [{verdict(r <= 0.6)}] full-capture peak memory <= 0.6x TransformerLens run_with_cache, TL caching "
              f"the same 30 patterns (row 6), Δpeak: {r:.2f}x  (total peak RSS: {rt:.2f}x{rl}; Δpeak runs MiB: "
              f"interp {runs('interp')}, TL {runs('tl')})")
    else:
        print("  [n/a] full-capture peak memory vs TransformerLens: TransformerLens row not measured")
    if "peak_kib" in mem.get("interp", {}) and "peak_kib" in mem.get("tl_all", {}):
        r = mem["interp"]["peak_kib"] / mem["tl_all"]["peak_kib"]
        print(f"  [{verdict(r <= 0.6)}] full-capture peak memory <= 0.6x TransformerLens run_with_cache, TL's default "
              f"call (row 8, every hook point: the 2.5 GiB reference figure), total peak RSS: {r:.2f}x "
              f"({mem['interp']['peak_kib'] / 1024:.0f} vs {mem['tl_all']['peak_kib'] / 1024:.0f} MiB)")
    if args.long:
        long_rows(args)
    print()
    print("Reproduce:", C.reproduce("capture.py", argv))


def long_rows(args) -> None:
    """Rows 1 and 4 at ``args.long`` tokens: time and peak RSS from the same fresh subprocess, rows alternated."""
    la = argparse.Namespace(**{**vars(args), "tokens": args.long, "warmup": 1, "mem_repeats": args.long_repeats,
                               "logits_last": True})
    print()
    print(f"# long context: {args.long} random tokens (seed {args.seed}), logits of the last position only; "
          f"load average at start: {C.loadavg()}")
    runs: dict[str, list[dict]] = {"sdpa": [], "reducers": []}
    order = list(runs)
    for r in range(args.long_rounds):
        for row in (order if r % 2 == 0 else order[::-1]):
            res = memory_of(row, la)
            if "error" in res:
                print(f"  {LABELS[row]} at {args.long} tokens: NOT MEASURED: {res['error']}")
                return
            runs[row].append(res)
            print(f"  ({LABELS[row]}: {res['time_s']:.1f} s, peak RSS {res['peak_kib'] / 1024:.0f} MiB, "
                  f"load {C.loadavg()})", flush=True)
    t = {row: C.median([x["time_s"] for x in rs]) for row, rs in runs.items()}
    pk = {row: C.median([x["peak_kib"] for x in rs]) / 1024 for row, rs in runs.items()}
    dl = {row: C.median([x["delta_kib"] for x in rs]) / 1024 for row, rs in runs.items()}
    headers = ["row", "tokens", "time s", "x sdpa", "Δpeak MiB", "peak RSS MiB", "x sdpa"]
    rows = [[LABELS[row], str(args.long), f"{t[row]:.1f}", f"{t[row] / t['sdpa']:.2f}x", f"{dl[row]:.0f}",
             f"{pk[row]:.0f}", f"{pk[row] / pk['sdpa']:.2f}x"] for row in runs]
    print(C.table(headers, rows))
    print(f"time: median over {args.long_rounds} subprocess(es) per row of the median of {args.long_repeats} timed "
          f"run(s) after 1 warm-up; peak RSS of that subprocess (weights loaded). Load average at end: {C.loadavg()}")
    r, gib = t["reducers"] / t["sdpa"], pk["reducers"] / 1024
    print(f"  [{'PASS' if r <= 1.2 else 'MISS'}] reducer-only <= 1.2x plain SDPA time at {args.long} tokens: {r:.2f}x")
    print(f"  [{'PASS' if gib <= 3 else 'MISS'}] reducer-only peak RSS <= 3 GiB at {args.long} tokens: {gib:.2f} GiB")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per row; the median is reported (>= 5)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mem-repeats", type=int, default=2, help="runs after warm-up in each memory subprocess")
    p.add_argument("--mem-runs", type=int, default=3, help="memory subprocesses per row (median), default allocator")
    p.add_argument("--no-memory", action="store_true", help="skip the per-row memory subprocesses")
    p.add_argument("--long", type=int, default=8192, help="also rows 1 and 4 at this many tokens (0: skip)")
    p.add_argument("--long-rounds", type=int, default=1, help="subprocesses per long row, alternated (median)")
    p.add_argument("--long-repeats", type=int, default=1, help="timed runs per long subprocess, after 1 warm-up")
    p.add_argument("--logits-last", action="store_true", help=argparse.SUPPRESS)  # internal: logits_to_keep=1
    p.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)  # internal: measure one row's memory
    return p.parse_args(argv)


if __name__ == "__main__":
    a = _ARGS = parse()
    if a.row:
        print(json.dumps(measure_row(a)))
    else:
        if a.repeats < 5:
            print("note: fewer than 5 repeats; the medians are noisy", file=sys.stderr)
        main(a)
