"""ACT, the Attention Calibration Technique (Yu et al., ICML'24; GATECH-EIC/ACT; docs/methods.md §8t).

Sink columns by the θ rule, per head and calibration prompt (α as in docs/methods.md §1a):

    K^{l,h} = {k : α_k^{l,h} = Σ_{t≥k} A^{l,h}_{t,k} / (T − k) > θ}  minus its first element (usually token 0)

and the calibration (row sums kept):

    a'_{t,k} = β a_{t,k} (k ∈ K),   a'_{t,j} = a_{t,j} (1 + (1 − β) Σ_{k∈K} a_{t,k} / Σ_{j∉K} a_{t,j}) otherwise.

1. candidates: in ``layers`` (default 2..L−1), the ``heads_per_layer`` heads with the largest mean mass on their
   non-initial θ-rule sinks, at most ``max_candidates`` overall (largest mass first);
2. run-time K: a spec cannot see the attention before it edits it, so the exported spec finds K with the
   ``sink`` selector (φ(x_j) = max_{c∈D} |RMSNorm(x_j)_c| > τ on the layer input, position 0 excluded;
   docs/methods.md §1d), D the two sink dims of the model (probes.sinks calibration) and τ chosen on the
   calibration prompts as the value of ``tau_grid`` whose φ-rule sets agree best (F1) with the θ-rule columns of
   the candidate heads; the finding reports that agreement;
3. keep a head only if adding it (with the heads kept so far, β = 0.4) raises calibration-set accuracy (mean
   log-probability of the correct answer breaks ties), candidates taken in order of sink mass (greedy, as ACT's
   per-head calibration search).

The calibration set is the first ``n_val`` items of a task; ``probes.zerotuning.held_out`` gives the rest.
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
from interp.tasks import Task
from probes.sinks import _sink_dims
from probes.zerotuning import as_task, score, search_split, targets

TAU_GRID: tuple[float, ...] = (8.0, 10.0, 12.0, 14.0, 15.0, 16.0, 17.0, 18.0, 20.0)


def theta_columns(alpha: torch.Tensor, lengths: Sequence[int], theta: float) -> list[torch.Tensor]:
    """Per prompt i, bool [L, H, T_i]: the θ-rule sink columns minus their first element. ``alpha`` [n, L, H, T]."""
    out = []
    for i, n in enumerate(lengths):
        k = alpha[i, ..., :n] > theta  # [L, H, n]
        first = torch.where(k.any(-1), k.float().argmax(-1), -1)  # the first element of each K
        k = k.clone()
        idx = first.clamp_min(0)[..., None]
        k.scatter_(-1, idx, k.gather(-1, idx) & (first[..., None] < 0))
        out.append(k)
    return out


def phi(model: interp.Model, prompts: list[str], dims: Sequence[int], batch_size: int = 16) -> list[torch.Tensor]:
    """Per prompt, φ [L, T_i] = max_{c∈dims} |x_c| / rms(x) of every layer's input (the ``sink`` selector's score)."""
    out = []
    for s in range(0, len(prompts), batch_size):
        b = model.encode(prompts[s:s + batch_size])
        h = interp.capture(model, b, sites="blocks.*.resid_pre").stack("resid_pre").float()  # [L, b, T, d]
        xn = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        p = xn[..., list(dims)].abs().amax(-1)  # [L, b, T]
        out += [p[:, i, :n] for i, n in enumerate(b.lengths)]
    return out


def alpha_of(model: interp.Model, prompts: list[str], batch_size: int = 16) -> tuple[torch.Tensor, list[int]]:
    """α [n, L, H, T_max] (key mass per key, padding excluded) and the prompt lengths."""
    al, lens = [], []
    for s in range(0, len(prompts), batch_size):
        b = model.encode(prompts[s:s + batch_size])
        al.append(interp.capture(model, b, reducers=[interp.KeyMass()]).stack("attn.key_mean").permute(1, 0, 2, 3))
        lens += list(b.lengths)
    T = max(a.shape[-1] for a in al)
    return torch.cat([torch.nn.functional.pad(a, (0, T - a.shape[-1])) for a in al]).float(), lens


def act_spec(model: interp.Model, heads: Sequence[tuple[int, int]], beta: float, dims: Sequence[int], tau: float,
             **provenance: Any) -> interp.Spec:
    """ACT on ``heads`` [(layer, head)]: the run-time sinks but position 0 scaled by β, the mass moved to the rest."""
    by: dict[int, list[int]] = {}
    for l, h in heads:
        by.setdefault(int(l), []).append(int(h))
    if not by:
        raise interp.InterpError("no heads given: nothing to calibrate")
    edits = [interp.ops.scale_weights(layers=[l], heads=sorted(hs), queries="all", keys="sink", factor=beta,
                                      redistribute_to="all") for l, hs in sorted(by.items())]
    return interp.Spec.for_model(model, edits, sink={"dims": [int(d) for d in dims], "tau": float(tau),
                                                     "skip_first": True}, **provenance)


class ACT(Analysis):
    """θ-rule sink columns, candidate heads, and the heads whose calibration raises calibration-set accuracy."""

    name = "probes.act"
    title = "ACT: attention calibration heads"

    def run(self, model: interp.Model, inputs: Task | str | None = None, *, task: Task | str | None = None,
            n_val: int = 40, theta: float = 0.1, beta: float = 0.4, layers: Sequence[int] | None = None,
            heads_per_layer: int = 2, max_candidates: int = 8, tau_grid: Sequence[float] = TAU_GRID,
            batch_size: int = 16, progress: bool = True) -> Finding:
        """``inputs``/``task``: a next_token or choice task (default ``sentiment``); calibration on its first
        ``n_val`` items."""
        if not 0 < theta < 1:
            raise interp.InterpError(f"theta={theta}: the θ rule compares a mean attention weight, give 0 < θ < 1 "
                                     "(ACT uses 0.1)")
        if not 0 <= beta <= 1:
            raise interp.InterpError(f"beta={beta}: ACT scales the sinks down, give 0 ≤ β ≤ 1 (ACT uses 0.4)")
        if heads_per_layer < 1 or max_candidates < 1 or not tau_grid:
            raise interp.InterpError("heads_per_layer and max_candidates must be ≥ 1 and tau_grid non-empty")
        task = task if task is not None else (inputs if inputs is not None else "sentiment")
        val, _ = search_split(task, n_val)
        t = as_task(task)
        L, H = model.n_layers, model.n_heads
        layers = list(range(2, L)) if layers is None else [int(l) for l in layers]
        if not layers or any(not 0 <= l < L for l in layers):
            raise interp.InterpError(f"layers={layers}: give layer indices in 0..{L - 1}")
        prep = targets(model, val)
        prompts = prep[0]
        alpha, lens = alpha_of(model, prompts, batch_size)
        cols = theta_columns(alpha, lens, theta)  # per prompt [L, H, T_i]
        mass = torch.stack([(alpha[i, ..., :n] * c).sum(-1) for i, (n, c) in enumerate(zip(lens, cols))]).mean(0)
        freq = torch.stack([c.any(-1).float() for c in cols]).mean(0)  # share of prompts with a non-initial sink
        cands = []
        for l in layers:
            order = mass[l].argsort(descending=True)[:heads_per_layer]
            cands += [(l, int(h)) for h in order if mass[l, h] > 0]
        cands = sorted(cands, key=lambda lh: -float(mass[lh]))[:max_candidates]
        dims = _sink_dims(model, model.encode(prompts).input_ids)
        ph = phi(model, prompts, dims, batch_size)
        cl = sorted({l for l, _ in cands})
        f1s = []
        for tau in tau_grid:
            tp = fp = fn = 0
            for i, n in enumerate(lens):
                pred = ph[i][cl] > tau
                pred[:, 0] = False
                truth = torch.stack([cols[i][l, [h for ll, h in cands if ll == l]].any(0) for l in cl])
                tp += int((pred & truth).sum()); fp += int((pred & ~truth).sum()); fn += int((~pred & truth).sum())
            f1s.append(2 * tp / max(1, 2 * tp + fp + fn))
        tau = float(tau_grid[int(np.argmax(f1s))])
        base = score(model, val, None, batch_size, prep)
        best = (float(base["acc"].mean()), float(base["logp"].mean()))
        kept, rows = [], []
        for (l, h) in tqdm(cands, desc="act: calibrate", disable=not progress):
            s = score(model, val, act_spec(model, kept + [(l, h)], beta, dims, tau), batch_size, prep)
            key = (float(s["acc"].mean()), float(s["logp"].mean()))
            keep = key > best
            if keep:
                kept.append((l, h))
                best = key
            rows.append({"layer": l, "head": h, "sink_mass": float(mass[l, h]), "sink_freq": float(freq[l, h]),
                         "acc_with": key[0], "logp_with": key[1], "kept": keep})
        table = pd.DataFrame(rows, columns=["layer", "head", "sink_mass", "sink_freq", "acc_with", "logp_with", "kept"])
        tokens = [model.encode(p).tokens[0] for p in prompts[:1]][0]
        sink_tokens = sorted({tokens[k] for k in torch.nonzero(cols[0].any((0, 1)))[:, 0].tolist()})
        metrics = {"task": t.name, "n_val": n_val, "theta": theta, "beta": beta, "n_candidates": len(cands),
                   "kept_heads": [list(h) for h in kept], "sink_dims": dims, "tau": tau,
                   "tau_f1": [round(x, 4) for x in f1s], "tau_grid": [float(x) for x in tau_grid],
                   "f1": float(max(f1s)), "val_acc_base": float(base["acc"].mean()),
                   "val_logp_base": float(base["logp"].mean()), "val_acc_kept": best[0], "val_logp_kept": best[1],
                   "theta_sink_tokens_prompt0": sink_tokens}
        notes = [] if kept else ["no candidate head raised calibration-set accuracy: no head kept"]
        return Finding(self.name, table, {"task": t.name if not isinstance(task, Task) else str(t.path or t.name),
                                          "n_val": n_val, "n_items": len(t), "theta": theta, "beta": beta, "layers": layers},
                       model.identity(), digest(prompts), metrics, {"sink_mass": mass, "sink_freq": freq}, notes)

    def to_spec(self, finding: Finding, model: interp.Model, *, beta: float | None = None) -> interp.Spec:
        """ACT on the kept heads (β from the finding unless given), K found at run time by the calibrated φ rule."""
        m = finding.metrics
        if not m["kept_heads"]:
            raise interp.InterpError("no head was kept (none raised calibration accuracy): use more calibration "
                                     "items, more candidates or another task")
        b = float(m["beta"] if beta is None else beta)
        return act_spec(model, [tuple(h) for h in m["kept_heads"]], b, m["sink_dims"], m["tau"],
                        analysis=self.name, prompts=finding.prompts,
                        params={"method": "act", "beta": b, "theta": m["theta"], "task": m["task"],
                                "n_val": m["n_val"]})

    def explain(self, finding: Finding) -> str:
        m = finding.metrics
        hs = ", ".join(f"L{l}H{h}" for l, h in m["kept_heads"]) or "none"
        return (f"Of {m['n_candidates']} candidate heads with non-initial θ-rule sinks (θ = {m['theta']:g}), ACT "
                f"(β = {m['beta']:g}) keeps {hs} on {m['task']} (calibration accuracy {m['val_acc_base']:.3f} → "
                f"{m['val_acc_kept']:.3f}, n = {m['n_val']}); the run-time φ rule (τ = {m['tau']:g}) matches the "
                f"θ-rule columns with F1 {m['f1']:.2f}.")


def _figure(finding: Finding, **kw: Any):
    """Left: sink mass of each candidate (kept heads marked); right: F1 of the φ rule against the θ rule over τ."""
    import matplotlib.pyplot as plt
    t, m = finding.table, finding.metrics
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    x = np.arange(len(t))
    a.bar(x, t.sink_mass, color=["C3" if k else "C0" for k in t.kept])
    a.set_xticks(x, [f"L{l}H{h}" for l, h in zip(t.layer, t.head)], rotation=60, fontsize=8)
    a.set_ylabel("mean α on non-initial sinks")
    a.set_title("candidates (red: kept)")
    b.plot(m["tau_grid"], m["tau_f1"], "o-")
    b.axvline(m["tau"], color="C3", ls="--", label=f"τ = {m['tau']:g}")
    b.set_xlabel("τ (φ rule)")
    b.set_ylabel("F1 vs θ-rule columns")
    b.legend(fontsize=8)
    return fig


ACT.figures = (_figure, None)
act = ACT()
