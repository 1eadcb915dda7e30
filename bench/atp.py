"""Bench: attribution patching (AtP, AtP*) on SmolLM2 — its cost, and how well it ranks the nodes of the exact
activation-patching sweep.

Nodes: every head output z_{l,h}[t] at every position (30 layers × 9 heads × T positions). Exact effects
c(n) = M(clean | z_n ← corrupted) − M(clean), M = logit(clean answer) − logit(corrupted answer) at the last
token, from ``probes.patching`` (``direction="noise"``, ``head_positions="each"``: one patched row per node,
batched). Nodes before the corrupted token have c = 0 and AtP = 0 exactly; the correlations use the nodes at
and after it. Spearman ρ of AtP with c (signed) and of |AtP| and AtP* (GradDrop, a magnitude) with |c|.

Cost, in units of one plain forward + backward of the model on the clean prompts (``model.logits(...,
grad=True)``, backward of the metric): AtP (z nodes: a grad capture of every layer's z, a corrupted forward),
AtP with the QK fix (patterns captured with their gradient: eager attention), AtP* (QK fix + GradDrop: L − 1
more backward passes). Timed round-robin, median of ``--repeats``. Target: AtP ≤ 3; AtP* ρ ≥ 0.8. The exact
sweep's throughput (cells per second) is set against one plain forward per cell (the loop it replaces).

    .venv/bin/python bench/atp.py [--pairs 5 --repeats 3 --threads 2]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import loadavg, machine, median, offline, reproduce, table, versions  # noqa: E402


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's ρ with average ranks for ties."""
    from scipy.stats import spearmanr
    return float(spearmanr(a.numpy(), b.numpy()).statistic)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=5, help="capital prompt pairs (of the 5 built in)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-graddrop", action="store_true", help="accuracy rows without GradDrop (AtP* column = |AtP|)")
    args = ap.parse_args()
    offline()
    torch.set_num_threads(args.threads)
    import interp
    from attribution.atp import atp
    from probes.patching import default_pairs, metric_of, patching
    model = interp.load("smollm2")
    clean, corrupt, answers, foils = (x[:args.pairs] for x in default_pairs())
    tok = model.tokenizer

    # --- accuracy, pair by pair ---------------------------------------------------------------------
    rows, allc, alla, alls, sweeps = [], [], [], [], []
    for c, r, a, f in zip(clean, corrupt, answers, foils):
        t0 = time.perf_counter()
        ex = patching(model, c, corrupted=r, answers=a, foils=f, sites=["heads"], head_positions="each",
                      direction="noise", batch_size=64)
        t_exact = time.perf_counter() - t0
        sweeps.append((c, len(ex.table), t_exact))
        est = atp(model, c, corrupted=r, answers=a, foils=f, qk=False, graddrop=not args.no_graddrop)
        e = ex.table.sort_values(["layer", "head", "position"]).reset_index(drop=True)
        z = est.table[est.table.node == "z"].sort_values(["layer", "head", "position"]).reset_index(drop=True)
        first = next(i for i, (x, y) in enumerate(zip(tok.encode(c), tok.encode(r))) if x != y)
        keep = torch.tensor((e.position >= first).values)
        cval = torch.tensor(e.delta.values)[keep]
        aval = torch.tensor(z.atp.values)[keep]
        sval = torch.tensor(z.atp_star.values if "atp_star" in z else z.atp.abs().values)[keep]
        allc.append(cval), alla.append(aval), alls.append(sval)
        top = int(cval.abs().argmax())
        rows.append([f"{c.split()[-2]} -> {r.split()[-2]}", str(int(keep.sum())),
                     f"{spearman(aval, cval):.3f}", f"{spearman(aval.abs(), cval.abs()):.3f}",
                     f"{spearman(sval, cval.abs()):.3f}", f"{float(cval[top]):+.2f} / {float(aval[top]):+.2f}",
                     f"{t_exact:.0f}"])
        print(f"  {rows[-1][0]}: exact sweep {t_exact:.0f} s", flush=True)
    C, A, S = torch.cat(allc), torch.cat(alla), torch.cat(alls)
    rows.append(["all pairs", str(len(C)), f"{spearman(A, C):.3f}", f"{spearman(A.abs(), C.abs()):.3f}",
                 f"{spearman(S, C.abs()):.3f}", "", ""])
    T = model.encode(clean).input_ids.shape[1]
    print(f"\nAtP / AtP* vs the exact head-output sweep: SmolLM2, {len(clean)} capital pairs x {T} tokens, "
          f"M = logit difference (clean answer - corrupted answer), noising, {args.threads} thread(s)")
    print(f"machine: {machine()}, load average {loadavg()}\n{versions()}\n")
    print(table(["pair", "nodes", "rho AtP", "rho |AtP|", "rho AtP*", "top exact / AtP", "exact s"], rows))
    print("\n(nodes at and after the corrupted token; rho AtP*: GradDrop magnitude vs |exact|; target >= 0.8)\n",
          flush=True)

    # --- the exact sweep's throughput against one forward per cell -----------------------------------------
    one = []
    for _ in range(max(5, args.repeats)):
        for c, _, _ in sweeps:
            b1 = model.encode(c)
            t0 = time.perf_counter()
            with torch.no_grad():
                model.logits(b1)
            one.append(time.perf_counter() - t0)
    t_one = median(one)
    thr = [[c.split()[-2], str(n), f"{t:.1f}", f"{n / t:.1f}", f"{1 / t_one:.1f}", f"{(n / t) * t_one:.2f}"]
           for c, n, t in sweeps]
    print(table(["sweep (heads x positions)", "cells", "s", "cells/s", "forwards/s", "x one forward per cell"], thr))
    print("\n(forwards/s: one unpatched forward of the clean prompt, median; the sweep patches 64 cells per batched "
          "forward;\n x > 1: faster than a loop of one forward per cell could be)\n", flush=True)

    # --- cost ----------------------------------------------------------------------------------------
    batch = model.encode(clean)
    ans = torch.tensor([tok.encode(a, add_special_tokens=False)[0] for a in answers])
    fl = torch.tensor([tok.encode(f, add_special_tokens=False)[0] for f in foils])

    def plain():
        with torch.enable_grad():
            lg = model.logits(batch, grad=True)[:, -1]
            metric_of(lg, "logit_diff", ans, fl).sum().backward()

    kw = dict(corrupted=corrupt, answers=answers, foils=foils)
    fns = {"plain forward + backward": plain,
           "AtP (z nodes)": lambda: atp(model, clean, qk=False, graddrop=False, **kw),
           "AtP + QK fix (z, q, k nodes)": lambda: atp(model, clean, qk=True, graddrop=False, **kw),
           "AtP* (QK fix + GradDrop)": lambda: atp(model, clean, qk=True, graddrop=True, **kw)}
    times = {k: [] for k in fns}
    for k in ("plain forward + backward", "AtP (z nodes)"):
        fns[k]()  # warm-up (the others share its code paths)
    for _ in range(args.repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    base = median(times["plain forward + backward"])
    cost = [[k, f"{median(ts) * 1e3:.0f}", f"{median(ts) / base:.2f}"] for k, ts in times.items()]

    print(f"load average {loadavg()}")
    print(table(["cost (clean batch of all pairs)", "median ms", "x fwd+bwd"], cost))
    print(f"\n(median of {args.repeats}; target: AtP <= 3 x one forward + backward)")
    print("\nreproduce: " + reproduce("atp.py", sys.argv[1:]))


if __name__ == "__main__":
    main()
