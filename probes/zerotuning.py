"""ZeroTuning: head-specific scaling of the first token's attention (Han et al., ICLR'26; docs/methods.md §8t).

For a head h with first-token weight a_0 of a query row, ZeroTuning sets

    a'_0 = γ a_0 / D,   a'_i = a_i / D,   D = (γ − 1) a_0 + 1        (≡ z'_0 = z_0 + log γ)

(``attn.scale_weights`` on key 0, renormalised). The search follows the paper's recipe:

1. candidates: the ``n_candidates`` heads with the largest mean first-token attention α_0 (the sink importance of
   Gu et al., docs/methods.md §1a) on the search prompts, in ``layers`` (default: the first half, where the paper
   finds the effects strongest);
2. profile: every candidate alone at γ_down and γ_up (default 0.5 and 2); gain_± = J(γ_±) − J(1), with J the
   objective (supervised: mean log-probability of the correct answer on the search split; unsupervised: minus
   the mean next-token entropy on the same prompts, labels unused);
3. select: a head is up-effective if gain_up > max(0, gain_down), down-effective if gain_down > max(0, gain_up);
   the direction with the larger summed gain is the dominant one and its ``top_k`` heads (by gain) are kept;
4. search γ on the paper's grid {0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 5, 10} for the kept heads together:
   supervised by accuracy on the search split (mean log-probability breaks ties), unsupervised by the mean
   output entropy (lowest wins). γ = 1 is on the grid, so "no edit" wins when nothing beats it.

The search split is the first ``n_val`` items of the task; :func:`held_out` gives the rest, on which
``interp.evaluate`` measures the exported spec (never the items the search saw).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

import interp
from interp.analysis import Analysis
from interp.finding import Finding, digest
from interp.tasks import Task, load_task

GRID: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 10.0)


# ------------------------------------------------------------------------------------------ task helpers
def as_task(task: Task | str) -> Task:
    """A shipped task name, a .jsonl path or a Task, as a Task of kind next_token or choice."""
    t = task if isinstance(task, Task) else load_task(task)
    if t.kind not in ("next_token", "choice"):
        raise interp.InterpError(f"task {t.name!r} is of kind {t.kind!r}; the search scores next_token or choice "
                                 "tasks (capitals, arithmetic, sentiment, agreement)")
    return t


def search_split(task: Task | str, n_val: int) -> tuple[Task, Task]:
    """(search split, held-out split): the first ``n_val`` items and the rest."""
    t = as_task(task)
    if not 0 < n_val < len(t):
        raise interp.InterpError(f"n_val={n_val}: the task {t.name!r} has {len(t)} items; keep 0 < n_val < {len(t)} "
                                 "so that items are left for the held-out evaluation")
    return Task(t.name, t.kind, t.items[:n_val], t.path), Task(t.name, t.kind, t.items[n_val:], t.path)


def held_out(finding: Finding, limit: int | None = None) -> Task:
    """The items a search finding did not see (its task minus the first ``n_val``), for ``interp.evaluate``."""
    p = finding.params
    _, test = search_split(p["task"], int(p["n_val"]))
    n = int(p.get("n_items", len(test) + int(p["n_val"]))) - int(p["n_val"])  # a Task given as a subset of its file
    test = test.subset(n)
    return test.subset(limit) if limit else test


def _first_token(tok, prompt: str, cont: str) -> int:
    """The first token of ``cont`` after ``prompt`` (tokens of prompt+cont after their common prefix)."""
    a, b = tok(prompt, add_special_tokens=False)["input_ids"], tok(prompt + cont, add_special_tokens=False)["input_ids"]
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    if n >= len(b):
        raise interp.InterpError(f"continuation {cont!r} adds no token after prompt {prompt[-40:]!r}")
    return b[n]


def targets(model: interp.Model, task: Task) -> tuple[list[str], list[list[int]], list[int]]:
    """(prompts, candidate first tokens per item, index of the correct one). next_token items have one candidate
    (the answer's first token, scored against the whole vocabulary); choice items one per choice (scored among
    the choices' first tokens, which is the task's own score when every choice is one token)."""
    tok = model.tokenizer
    prompts, cands, gold = [], [], []
    for it in task.items:
        prompts.append(it["prompt"])
        if task.kind == "next_token":
            cands.append([_first_token(tok, it["prompt"], it["answer"])]), gold.append(0)
        else:
            cands.append([_first_token(tok, it["prompt"], c) for c in it["choices"]]), gold.append(int(it["answer"]))
    return prompts, cands, gold


@torch.no_grad()
def score(model: interp.Model, task: Task, spec: interp.Spec | None = None, batch_size: int = 16,
          prepared: tuple | None = None) -> dict[str, torch.Tensor]:
    """Per item: ``acc`` (1/0), ``logp`` (log-probability of the correct answer; among the choices for choice
    tasks) and ``entropy`` (nats, of the next-token distribution after the prompt), under ``spec``."""
    prompts, cands, gold = prepared if prepared is not None else targets(model, task)
    acc, logp, ent = [], [], []
    for s in range(0, len(prompts), batch_size):
        batch = model.encode(prompts[s:s + batch_size])
        lg = model.logits(batch, *([spec] if spec is not None else []))
        last = torch.tensor(batch.lengths, device=lg.device) - 1
        lp = torch.log_softmax(lg[torch.arange(len(last), device=lg.device), last].double(), -1).cpu()
        ent.append(-(lp.exp() * lp).sum(-1))
        for i, row in enumerate(lp):
            c, g = cands[s + i], gold[s + i]
            if task.kind == "next_token":
                logp.append(float(row[c[0]])), acc.append(float(int(row.argmax()) == c[0]))
            else:
                sub = torch.log_softmax(row[c], -1)
                logp.append(float(sub[g])), acc.append(float(int(sub.argmax()) == g))
    return {"acc": torch.tensor(acc, dtype=torch.float64), "logp": torch.tensor(logp, dtype=torch.float64),
            "entropy": torch.cat(ent)}


def first_token_spec(model: interp.Model, heads: Sequence[tuple[int, int]], gamma: float | dict,
                     **provenance: Any) -> interp.Spec:
    """ZeroTuning spec: key 0's attention scaled by γ (renormalised) in ``heads`` [(layer, head)]; ``gamma`` one
    number or {(layer, head): γ}. One edit per (layer, γ)."""
    gam = gamma if isinstance(gamma, dict) else {tuple(h): float(gamma) for h in heads}
    groups: dict[tuple[int, float], list[int]] = {}
    for (l, h) in heads:
        groups.setdefault((int(l), float(gam[(l, h)])), []).append(int(h))
    edits = [interp.ops.scale_weights(layers=[l], heads=sorted(hs), keys=0, factor=g)
             for (l, g), hs in sorted(groups.items())]
    if not edits:
        raise interp.InterpError("no heads given: nothing to scale")
    return interp.Spec.for_model(model, edits, **provenance)


def first_token_alpha(model: interp.Model, prompts: list[str], batch_size: int = 16) -> torch.Tensor:
    """α_0 [L, H]: mean over prompts and queries of the attention to token 0 (docs/methods.md §1a)."""
    out = []
    for s in range(0, len(prompts), batch_size):
        tr = interp.capture(model, prompts[s:s + batch_size], reducers=[interp.KeyMass()])
        out.append(tr.stack("attn.key_mean")[..., 0])  # [L, b, H]
    return torch.cat(out, 1).float().mean(1)


def _objective(s: dict[str, torch.Tensor], mode: str) -> float:
    return float(s["logp"].mean()) if mode == "supervised" else -float(s["entropy"].mean())


def _grid_key(s: dict[str, torch.Tensor], mode: str) -> tuple[float, float]:
    """What the γ search maximises: (accuracy, mean log p) supervised; (−mean entropy, 0) unsupervised."""
    if mode == "supervised":
        return float(s["acc"].mean()), float(s["logp"].mean())
    return -float(s["entropy"].mean()), 0.0


def _check(mode: str, grid: Sequence[float], profile_gammas: Sequence[float]) -> None:
    if mode not in ("supervised", "unsupervised"):
        raise interp.InterpError(f"mode={mode!r}: use 'supervised' (accuracy on the search split) or "
                                 "'unsupervised' (minimise the mean output entropy)")
    if not grid or any(not (isinstance(g, (int, float)) and 0 < g <= 1e6) for g in grid):
        raise interp.InterpError(f"grid={list(grid)!r}: give factors in (0, 1e6], e.g. {list(GRID)}")
    lo, hi = profile_gammas
    if not (0 < lo < 1 < hi):
        raise interp.InterpError(f"profile_gammas={tuple(profile_gammas)!r}: give (γ_down < 1, γ_up > 1), e.g. (0.5, 2)")


# ------------------------------------------------------------------------------------------ analysis
class ZeroTuning(Analysis):
    """Profile heads under first-token scaling, keep the dominant up- or down-effective ones, search γ."""

    name = "probes.zerotuning"
    title = "ZeroTuning: per-head first-token scaling"

    def run(self, model: interp.Model, inputs: Task | str | None = None, *, task: Task | str | None = None,
            n_val: int = 40, mode: str = "supervised", layers: Sequence[int] | None = None, n_candidates: int = 12,
            top_k: int = 4, profile_gammas: Sequence[float] = (0.5, 2.0), grid: Sequence[float] = GRID,
            batch_size: int = 16, progress: bool = True) -> Finding:
        """``inputs``/``task``: a next_token or choice task (default ``sentiment``); the search uses its first
        ``n_val`` items (labels only when ``mode='supervised'``)."""
        _check(mode, grid, profile_gammas)
        task = task if task is not None else (inputs if inputs is not None else "sentiment")
        val, _ = search_split(task, n_val)
        L, H = model.n_layers, model.n_heads
        layers = list(range(L // 2)) if layers is None else [int(l) for l in layers]
        if not layers or any(not 0 <= l < L for l in layers):
            raise interp.InterpError(f"layers={layers}: give layer indices in 0..{L - 1}")
        if n_candidates < 1 or top_k < 1:
            raise interp.InterpError(f"n_candidates={n_candidates}, top_k={top_k}: both must be ≥ 1")
        prep = targets(model, val)
        alpha = first_token_alpha(model, prep[0], batch_size)  # [L, H]
        pool = [(l, h) for l in layers for h in range(H)]
        pool.sort(key=lambda lh: -float(alpha[lh]))
        cands = pool[:n_candidates]
        base = score(model, val, None, batch_size, prep)
        j0 = _objective(base, mode)
        g_dn, g_up = (float(g) for g in profile_gammas)
        rows = []
        for (l, h) in tqdm(cands, desc="zerotuning: profile", disable=not progress):
            gains = [_objective(score(model, val, first_token_spec(model, [(l, h)], g), batch_size, prep), mode) - j0
                     for g in (g_dn, g_up)]
            rows.append({"layer": l, "head": h, "alpha0": float(alpha[l, h]), "gain_down": gains[0],
                         "gain_up": gains[1]})
        table = pd.DataFrame(rows, columns=["layer", "head", "alpha0", "gain_down", "gain_up"])
        table["direction"] = np.where(table.gain_up > np.maximum(0, table.gain_down), "up",
                                      np.where(table.gain_down > np.maximum(0, table.gain_up), "down", "none"))
        tot = {d: float(table.loc[table.direction == d, f"gain_{d}"].sum()) for d in ("up", "down")}
        direction = "up" if tot["up"] >= tot["down"] else "down"
        if tot[direction] <= 0:
            direction = "none"
        table["selected"] = False
        if direction != "none":
            pick = table[table.direction == direction].sort_values(f"gain_{direction}", ascending=False).head(top_k)
            table.loc[pick.index, "selected"] = True
        heads = [(int(r.layer), int(r.head)) for r in table[table.selected].itertuples()]
        grid_rows = []
        for g in tqdm(list(grid), desc="zerotuning: γ grid", disable=not progress or not heads):
            if not heads:
                break
            s = base if float(g) == 1.0 else score(model, val, first_token_spec(model, heads, g), batch_size, prep)
            grid_rows.append({"gamma": float(g), "acc": float(s["acc"].mean()), "logp": float(s["logp"].mean()),
                              "entropy": float(s["entropy"].mean()), "key": _grid_key(s, mode)})
        best = max(grid_rows, key=lambda r: r["key"]) if grid_rows else {"gamma": 1.0}
        gamma = float(best["gamma"])
        t = as_task(task)
        metrics = {
            "task": t.name, "mode": mode, "n_val": n_val, "n_held_out": len(t) - n_val,
            "direction": direction, "gain_total_up": tot["up"], "gain_total_down": tot["down"],
            "selected_heads": [list(h) for h in heads], "gamma": gamma,
            "val_acc_base": float(base["acc"].mean()), "val_logp_base": float(base["logp"].mean()),
            "val_entropy_base": float(base["entropy"].mean()),
            "val_acc_best": best.get("acc", float(base["acc"].mean())),
            "val_entropy_best": best.get("entropy", float(base["entropy"].mean())),
            "grid": [{k: v for k, v in r.items() if k != "key"} for r in grid_rows],
        }
        notes = [] if heads else ["no candidate head improves the objective at either profile γ: nothing selected"]
        return Finding(self.name, table, {"task": t.name if not isinstance(task, Task) else str(t.path or t.name),
                                          "n_val": n_val, "n_items": len(t), "mode": mode, "layers": layers, "top_k": top_k,
                                          "n_candidates": n_candidates, "profile_gammas": [g_dn, g_up],
                                          "grid": [float(g) for g in grid]},
                       model.identity(), digest(prep[0]), metrics, {"alpha0": alpha}, notes)

    def to_spec(self, finding: Finding, model: interp.Model, *, gamma: float | None = None) -> interp.Spec:
        """The selected heads with the searched γ (or ``gamma``): key 0 scaled, renormalised."""
        heads = [tuple(h) for h in finding.metrics["selected_heads"]]
        if not heads:
            raise interp.InterpError("the search selected no head (no candidate improved the objective): widen "
                                     "layers or n_candidates, or use another task")
        g = float(finding.metrics["gamma"] if gamma is None else gamma)
        return first_token_spec(model, heads, g, analysis=self.name, prompts=finding.prompts,
                                params={"method": "zerotuning", "gamma": g, "mode": finding.metrics["mode"],
                                        "task": finding.metrics["task"], "n_val": finding.metrics["n_val"]})

    def explain(self, finding: Finding) -> str:
        m = finding.metrics
        if not m["selected_heads"]:
            return (f"No head among {len(finding.table)} candidates improves the {m['mode']} objective on "
                    f"{m['task']} (n = {m['n_val']}) when its first-token attention is scaled.")
        hs = ", ".join(f"L{l}H{h}" for l, h in m["selected_heads"])
        what = (f"validation accuracy {m['val_acc_base']:.3f} → {m['val_acc_best']:.3f}" if m["mode"] == "supervised"
                else f"mean output entropy {m['val_entropy_base']:.3f} → {m['val_entropy_best']:.3f} nats")
        return (f"The dominant {m['direction']}-effective heads on {m['task']} are {hs}; the best γ on the grid is "
                f"{m['gamma']:g} ({what}, n = {m['n_val']}).")


def _figure(finding: Finding, **kw: Any):
    """Left: each candidate's profile gain (γ_down, γ_up), selected heads marked; right: the γ search."""
    import matplotlib.pyplot as plt
    t, m = finding.table, finding.metrics
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    x = np.arange(len(t))
    a.bar(x - 0.2, t.gain_down, 0.4, label=f"γ = {finding.params['profile_gammas'][0]:g}")
    a.bar(x + 0.2, t.gain_up, 0.4, label=f"γ = {finding.params['profile_gammas'][1]:g}")
    a.set_xticks(x, [("*" if s else "") + f"L{l}H{h}" for l, h, s in zip(t.layer, t.head, t.selected)],
                 rotation=60, fontsize=8)
    a.axhline(0, color="0.5", lw=0.8)
    a.set_ylabel("Δ objective vs γ = 1")
    a.set_title("profile (* selected)")
    a.legend(fontsize=8)
    if m["grid"]:
        g = [r["gamma"] for r in m["grid"]]
        y = [r["acc"] if m["mode"] == "supervised" else r["entropy"] for r in m["grid"]]
        b.plot(g, y, "o-")
        b.axvline(m["gamma"], color="C3", ls="--", label=f"best γ = {m['gamma']:g}")
        b.set_xscale("log")
        b.legend(fontsize=8)
    b.set_xlabel("γ")
    b.set_ylabel("validation accuracy" if m["mode"] == "supervised" else "mean entropy (nats)")
    b.set_title(f"γ search on {m['task']} (n = {m['n_val']})")
    return fig


ZeroTuning.figures = (_figure, None)
zerotuning = ZeroTuning()
