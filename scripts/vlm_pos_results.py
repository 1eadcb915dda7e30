#!/usr/bin/env python
"""DAPE-BR, EDAR and TokenTruth on the testbeds (and on ``smol_llava`` where its checkpoint loads): the findings,
the exported specs, and their effect on the held-out VQA task (``testbed_vqa``, 292 questions; accuracy and
log p(answer's first token), paired bootstrap CI). CPU.

    .venv/bin/python scripts/vlm_pos_results.py [--scenes 20] [--edar-scenes 8] > scripts/results_vlm_pos.txt
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import interp  # noqa: E402
import probes  # noqa: E402,F401
from interp.tasks import Task, load_task  # noqa: E402
from interp.testbed import load_testbed  # noqa: E402
from interp.testbed.items import default_items  # noqa: E402
from probes.dape import dape  # noqa: E402
from probes.edar import edar  # noqa: E402
from probes.tokentruth import tokentruth  # noqa: E402


def load(name: str) -> interp.Model:
    hf, tok, _ = load_testbed(name)
    return interp.load(hf, tokenizer=tok, name=name)


def tasks() -> list[Task]:
    t = load_task("testbed_vqa")
    lp = Task("testbed_vqa_logprob", "vqa", [{**it, "score": "logprob"} for it in t.items])
    return [t, lp]


def evaluate(model, spec, label: str) -> None:
    for task in tasks():
        t0 = time.time()
        ev = interp.evaluate(model, spec, task)
        m = ev.metrics
        print(f"  {label:<28} {task.name:<20} n={m['n']}  without {m['without']:.4f}  with {m['with']:.4f}  "
              f"Δ {m['delta']:+.4f} [{m['delta_ci'][0]:+.4f}, {m['delta_ci'][1]:+.4f}]  changed {m['changed_items']}"
              f"  ({time.time() - t0:.0f} s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenes", type=int, default=20)
    ap.add_argument("--edar-scenes", type=int, default=8)
    a = ap.parse_args()
    torch.manual_seed(0)
    for name in ("llava_ar", "llada_diffusion"):
        m = load(name)
        items = default_items(m, a.scenes)
        print(f"\n== {name}: {len(items)} held-out items ({a.scenes} scenes)", flush=True)
        f = dape(m, items)
        print("DAPE-BR:", f.explain())
        print(f.table.round(3).to_string(index=False))
        try:
            evaluate(m, f.to_spec(model=m), "dape align (λ_l = −β1_l)")
        except interp.InterpError as e:
            print("  no align spec:", e)
        evaluate(m, f.to_spec(model=m, mode="mask"), "dape concentric mask")
        t = tokentruth(m, items)
        print("TokenTruth:", t.explain())
        if name == "llada_diffusion":
            ei = default_items(m, a.edar_scenes)
            t0 = time.time()
            e = edar(m, ei)
            print(f"EDAR ({len(ei)} items, {time.time() - t0:.0f} s):", e.explain())
            print({k: v for k, v in e.metrics.items() if k.endswith("by_layer")})
            print(e.table.round(3).to_string(index=False))
            try:
                spec = e.to_spec(model=m)
                print("  spec:", spec.edits)
                evaluate(m, spec, "edar distance bias")
            except interp.InterpError as err:
                print("  no EDAR spec:", err)
            for lam in (1.0, 3.0):
                evaluate(m, e.to_spec(model=m, lam=lam, d0=8.0, layers=list(range(m.n_layers))),
                         f"edar λ={lam:g}, d0=8, all layers")
    try:
        m = interp.load("smol_llava")
    except Exception as err:  # noqa: BLE001  (a checkpoint still being trained)
        print(f"\n== smol_llava: not loadable here ({type(err).__name__}: {str(err)[:160]})")
    else:
        items = default_items(m, a.scenes)
        t = tokentruth(m, items)
        print(f"\n== smol_llava ({len(items)} items)\nTokenTruth:", t.explain())
        print({k: v for k, v in t.metrics.items() if k != "decay_beta_by_layer"})


if __name__ == "__main__":
    main()
