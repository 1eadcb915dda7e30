"""Measured numbers of docs/methods.md §10 (causal probe) and §13 (retrieval heads) on SmolLM2:
the copy-paste scores on needle prompts, top-k retrieval heads ablated against k random heads on a held-out
copying task, and the sentiment probe direction removed against random directions (paired bootstrap CIs)."""
import json
import sys
import time

import torch

import interp
from probes.linear import causal_probe, linear_probe
from probes.retrieval import needle_task, retrieval, versus_random

torch.set_num_threads(2)
part = sys.argv[1] if len(sys.argv) > 1 else "all"
m = interp.load("smollm2")
if part in ("all", "retrieval"):
    t0 = time.time()
    f = retrieval(m, lengths=(160, 320), depths=(0.1, 0.5, 0.9))
    print(f.explain(), f"({time.time() - t0:.0f} s)", flush=True)
    print(json.dumps(f.metrics), flush=True)
    task = needle_task(m, lengths=(160,), depths=(0.1, 0.5, 0.9), repeats=2, seed=1)
    for k in (10,):
        print("top heads", retrieval.to_spec(f, m, k=k).provenance["params"]["heads"], "random heads",
              retrieval.to_spec(f, m, k=k, control=True).provenance["params"]["heads"], flush=True)
        r = versus_random(m, f, task, k=k, n_random=1)
        print(f"k={k}: n={r['n']} top: {r['top'].explain()}", flush=True)
        print(f"k={k}: random: {r['random'][0].explain()}", flush=True)
        print(f"k={k}: Δtop {r['delta_top']:+.3f} Δrandom {r['delta_random']:+.3f} top−random "
              f"{r['top_minus_random']:+.3f} CI {r['top_minus_random_ci']} ({time.time() - t0:.0f} s)", flush=True)
if part in ("all", "causal"):
    t0 = time.time()
    p = linear_probe(m, progress=False)
    print(p.explain(), flush=True)
    c = causal_probe(m, probe=p, task="sentiment", n_random=2, limit=60)
    print(c.explain(), json.dumps(c.metrics), f"({time.time() - t0:.0f} s)", flush=True)
