"""PAI (attention step + CFG) and VISTA (SLA + VSV) on a testbed VLM: analysis → spec → interp.evaluate.

    python scripts/decode_results.py [--model llava_ar] [--limit N]

For each spec: accuracy on ``testbed_vqa`` (argmax = the answer's first token) and mean log p(answer's first
token) (the same items scored with ``"score": "logprob"``), without and with the spec, with paired bootstrap
95 % intervals on the difference (interp.evaluate). The analyses run on the testbed's held-out localisation
items (``default_items``, not the task's items).
"""
from __future__ import annotations

import argparse
import time

import interp
import interp.testbed  # noqa: F401 (registers the scene_seed item source)
import probes  # noqa: F401
from interp.tasks import Task, load_task
from probes.pai import pai
from probes.vista import vista


def load(name: str) -> interp.Model:
    from interp.testbed import load_testbed
    hf, tok, _ = load_testbed(name)
    return interp.load(hf, tokenizer=tok, name=name)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llava_ar")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--only", nargs="*", default=None, help="run only the specs whose name contains one of these")
    a = ap.parse_args(argv)
    m = load(a.model)
    task = load_task("testbed_vqa")
    items = task.items[:a.limit] if a.limit else task.items
    acc = Task(task.name, "vqa", items, task.path)
    lp = Task(task.name + "_logprob", "vqa", [{**it, "score": "logprob"} for it in items], task.path)
    t = time.time()
    fp = pai(m)
    fv = vista(m)
    print(f"[{a.model}] analyses {time.time() - t:.1f}s")
    print(" ", fp.explain())
    print(" ", fv.explain())
    print("  vista table:\n" + fv.table.to_string(index=False))
    print("  pai table:\n" + fp.table.to_string(index=False))
    specs = {
        "PAI attention α=0.2 (scope)": fp.to_spec(model=m, parts=("attention",)),
        "PAI attention α=0.5 (scope)": fp.to_spec(model=m, alpha=0.5, parts=("attention",)),
        "PAI CFG γ=1.1": fp.to_spec(model=m, parts=("cfg",)),
        "PAI CFG γ=2": fp.to_spec(model=m, gamma=2.0, parts=("cfg",)),
        "PAI CFG γ=1.1 β=0": fp.to_spec(model=m, cutoff=0.0, parts=("cfg",)),
        "PAI CFG γ=2 β=0": fp.to_spec(model=m, gamma=2.0, cutoff=0.0, parts=("cfg",)),
        "PAI attention α=0.2 + CFG γ=1.1": fp.to_spec(model=m),
        "VISTA SLA α=0.3": fv.to_spec(model=m, parts=("sla",)),
        "VISTA VSV λ=0.01": fv.to_spec(model=m, lam=0.01, parts=("vsv",)),
        "VISTA VSV λ=0.17": fv.to_spec(model=m, parts=("vsv",)),
        "VISTA VSV λ=0.5": fv.to_spec(model=m, lam=0.5, parts=("vsv",)),
        "VISTA SLA α=0.3 + VSV λ=0.17": fv.to_spec(model=m),
    }
    print(f"  {'spec':34s} {'acc without':>11s} {'acc with':>9s} {'Δacc [95% CI]':>24s}   "
          f"{'logp without':>12s} {'logp with':>9s} {'Δlogp [95% CI]':>26s}")
    for name, s in specs.items():
        if a.only and not any(o in name for o in a.only):
            continue
        t = time.time()
        ea = interp.evaluate(m, s, acc).metrics
        el = interp.evaluate(m, s, lp).metrics
        print(f"  {name:34s} {ea['without']:11.3f} {ea['with']:9.3f} {ea['delta']:+8.3f} "
              f"[{ea['delta_ci'][0]:+.3f}, {ea['delta_ci'][1]:+.3f}]   {el['without']:12.3f} {el['with']:9.3f} "
              f"{el['delta']:+9.3f} [{el['delta_ci'][0]:+.3f}, {el['delta_ci'][1]:+.3f}]  (n={ea['n']}, "
              f"{time.time() - t:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
