"""Bench: stratified Shapley vs captum ShapleyValueSampling on a 10-player prompt game on SmolLM2.

The game: a few-shot arithmetic prompt whose 10 expressions are the players, v(S) = log p(gold
chain-of-thought answer | prompt with the expressions outside S replaced by "..."). The exact Shapley
values come from enumerating all 2^10 = 1024 coalitions (batched, cached). Both estimators then
run on views of that cache, so each is charged the number of *distinct* coalitions it asked for
(captum gets the same caching as ours; its raw forward rows are printed too) while the model
evaluates every coalition once. Errors are mean absolute errors against the exact values,
averaged over seeds.

Target: take the MAE captum reaches at its largest budget; read off (log-log interpolation
along each method's budget sweep) how many evaluations each method needs to reach it; the claim
holds if captum needs >= 3x the evaluations of the stratified estimator in its default design
("spectral"; the "svarm", "cyclic" and "shared" designs are run too).

    .venv/bin/python bench/shapley.py [--seeds 20] [--threads 1] [--save-values F | --values F]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from attribution.shapley import CallableGame, PromptGame, exact_shapley, stratified_shapley  # noqa: E402

TEXT = ("2*3+4: 2*3=6, 6+4=10\n"
        "5*2-3: 5*2=10, 10-3=7\n"
        "8+5: 8+5=13\n"
        "9-4: 9-4=5\n")
QUESTION = "7*2+5:"
ANSWER = " 7*2=14, 14+5=19"
CAPTUM_SAMPLES = (1, 2, 4, 8, 16, 32, 64)
STRAT_M = {"spectral": (1, 2, 3, 4, 6, 8, 12), "svarm": (2, 4, 8, 12, 16, 24),
           "cyclic": (2, 4, 6, 8, 12, 16, 24), "shared": (1, 2, 3, 4, 6, 8, 12, 16)}
DEFAULT = "strat/" + next(iter(STRAT_M))  # the default design of stratified_shapley


def captum_run(game, n_samples: int, seed: int):
    """captum ShapleyValueSampling over a binary presence mask; returns (phi, distinct, raw rows)."""
    from captum.attr import ShapleyValueSampling
    view, rows = game.view(), [0]
    n = game.n

    def forward(x):  # x [b, n]: 1 = player present (input), 0 = absent (baseline)
        rows[0] += x.shape[0]
        masks = [int(sum(1 << int(i) for i in torch.nonzero(r > 0.5).flatten())) for r in x]
        return torch.tensor(view.values(masks), dtype=torch.float64)
    torch.manual_seed(seed)
    attr = ShapleyValueSampling(forward).attribute(
        torch.ones(1, n, dtype=torch.float64), baselines=torch.zeros(1, n, dtype=torch.float64),
        feature_mask=torch.arange(n)[None], n_samples=n_samples, perturbations_per_eval=n)
    return attr[0].double().numpy(), view.n_evals, rows[0]


def evals_to_reach(evals, maes, target):
    """Evaluations at which a (decreasing) MAE curve first reaches ``target``, log-log interpolated."""
    pts = sorted(zip(evals, maes))
    if pts[0][1] <= target:
        return pts[0][0], "<="  # already below the target at the smallest budget: an upper bound
    for (e0, a0), (e1, a1) in zip(pts, pts[1:]):
        if a1 <= target < a0:
            t = (math.log(target) - math.log(a0)) / (math.log(a1) - math.log(a0))
            return math.exp(math.log(e0) + t * (math.log(e1) - math.log(e0))), ""
    return float("nan"), "not reached"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save-values", help="write the 1024 exact coalition values to this JSON file")
    ap.add_argument("--values", help="reuse coalition values saved by --save-values instead of running the model")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or 1)))
    t0 = time.time()
    if args.values:
        vals = json.loads(Path(args.values).read_text())
        game = CallableGame(lambda cs: [vals[sum(1 << i for i in c)] for c in cs], 10)
        where = f"values from {args.values}"
    else:
        import interp
        model = interp.load("smollm2")
        game = PromptGame(model, TEXT, "expressions", ANSWER, question=QUESTION, batch_size=args.batch_size,
                          progress=True)
        where = f"{model.name}, CPU x{torch.get_num_threads()}"
    n = game.n
    exact = exact_shapley(game)
    t_exact = time.time() - t0
    if args.save_values:
        Path(args.save_values).write_text(json.dumps(game.values(range(1 << n)).tolist()))

    rows = []
    for design, ms in STRAT_M.items():
        for m in ms:
            res = [stratified_shapley(game.view(), m, seed=s, design=design) for s in range(args.seeds)]
            rows.append((f"strat/{design}", f"m={m}", [r.n_evals for r in res], None,
                         [np.abs(r.phi - exact.phi).mean() for r in res],
                         [abs(r.efficiency_residual) for r in res]))
    for k in CAPTUM_SAMPLES:
        res = [captum_run(game, k, s) for s in range(args.seeds)]
        rows.append(("captum SVS", f"perms={k}", [r[1] for r in res], [r[2] for r in res],
                     [np.abs(r[0] - exact.phi).mean() for r in res],
                     [abs(r[0].sum() - (exact.v_full - exact.v_empty)) for r in res]))
    t_all = time.time() - t0

    print(f"\nShapley bench: {n} players (expressions), few-shot arithmetic prompt, {where}")
    print(f"  v(empty)={exact.v_empty:.3f}  v(full)={exact.v_full:.3f}  exact CoSP={exact.cosp}  "
          f"exact phi=[{', '.join(f'{p:+.3f}' for p in exact.phi)}]")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"  exact: 1024 coalitions in {t_exact:.0f}s (load average {load:.1f} on {os.cpu_count()} cores); "
          f"{args.seeds} seeds per budget;\n  evals = distinct coalitions (captum through the same cache; "
          "raw = its forward rows)\n")
    hdr = f"{'method':<14} {'budget':<9} {'evals':>7} {'raw':>6} {'MAE':>8} {'±sd':>7} {'|Σφ-Δv|':>8}"
    print(hdr)
    print("-" * len(hdr))
    for meth, b, ev, raw, mae, resid in rows:
        print(f"{meth:<14} {b:<9} {np.mean(ev):7.1f} {'' if raw is None else f'{np.mean(raw):6.0f}':>6} "
              f"{np.mean(mae):8.4f} {np.std(mae):7.4f} {np.mean(resid):8.4f}")
    methods = list(dict.fromkeys(r[0] for r in rows))
    curve = {meth: ([np.mean(r[2]) for r in rows if r[0] == meth], [np.mean(r[4]) for r in rows if r[0] == meth])
             for meth in methods}
    target = curve["captum SVS"][1][-1]
    need = {meth: evals_to_reach(*curve[meth], target) for meth in methods}
    print(f"\ntarget MAE = captum at perms={CAPTUM_SAMPLES[-1]}: {target:.4f}")
    for meth, (e, flag) in need.items():
        if flag == "not reached":
            print(f"  {meth:<14} does not reach it within its sweep -> target >= 3x DOES NOT HOLD")
            continue
        ratio = need["captum SVS"][0] / e
        extra = "" if meth == "captum SVS" else (
            f"  -> captum needs {'>=' if flag else ''}{ratio:.2f}x as many: "
            f"target >= 3x {'HOLDS' if ratio >= 3 else 'DOES NOT HOLD'}")
        print(f"  {meth:<14} reaches it at {flag}{e:.0f} distinct evaluations{extra}")
    raw_need, _ = evals_to_reach([np.mean(r[3]) for r in rows if r[0] == "captum SVS"], curve["captum SVS"][1], target)
    print(f"  without its cache captum makes {raw_need:.0f} forward rows: "
          f"{raw_need / need[DEFAULT][0]:.2f}x the {DEFAULT} evaluations")
    print(f"total {t_all:.0f}s\nreproduce: .venv/bin/python bench/shapley.py --seeds {args.seeds} --threads {args.threads}")


if __name__ == "__main__":
    main()
