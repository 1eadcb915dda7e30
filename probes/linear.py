"""Linear probes on the residual stream, with control tasks (METHODS.md §10).

Alain & Bengio, "Understanding intermediate layers using linear classifier probes" (2016);
Hewitt & Liang, "Designing and Interpreting Probes with Control Tasks" (EMNLP 2019).

Per layer l, features x = h^l[positions] (``blocks.{l}.resid_post``, one position or the mean over a
role / the whole sequence), labels y of one ``concept`` (e.g. "sentiment"):

    x̃ = (x − μ) / σ                       (standardised on the train split)
    p(y | x) = softmax(W x̃ + b),          L2-regularised logistic regression, C by 5-fold CV
                                          over {0.01, 0.1, 1, 10} on an 80/20 train split (fixed seed)
    accuracy_l = held-out accuracy;       control_l = the same probe on the control task;
    selectivity_l = accuracy_l − control_l.

Control task (Hewitt & Liang): every word TYPE gets one label, drawn at random from the empirical label
distribution, and all its examples carry it. Types must recur across items (by default: the token at
the probed position; or types given per item, e.g. the review's last word), so a probe can only solve
the control task by memorising types: high control accuracy means the probe is expressive enough to
memorise, and selectivity says how much of the real accuracy that does not explain. The control probe
uses the real probe's hyper-parameters (its C at that layer) on the same split. Types that do not
recur (one per item) would make the control chance by construction, and are refused.

The probe direction in the original feature space is w / σ (since W x̃ = (W/σ)·x − W·μ/σ); it is
unit-normalised and kept as ``weights`` [L, d] with ``bias`` [L] such that the probe predicts the
second class in sorted order (1 for 0/1 labels) where ŵ·x + bias > 0; with K > 2 classes, one
direction per class ([L, K, d], [L, K]). Ties in accuracy pick the earliest layer as ``best_layer``.
``to_spec`` turns it into a steering vector (P5, ``resid.add``), or (``mode="ablate"``) into the causal probe's
edit h' = h − (h·ŵ)ŵ (``resid.project_out``); :data:`causal_probe` measures that edit on a task with
``interp.evaluate`` against removing random unit directions (paired bootstrap CI). ``run(model)`` without inputs is what
``interp scan`` runs: sentiment on the first 160 items of the shipped sentiment task, at the last token,
control types = each review's last word. Features computed elsewhere are probed with :func:`probe_features`.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

import interp
from interp.analysis import Analysis
from interp.finding import Finding, digest
from viz import interactive as _interactive
from viz import static as _static

CS = (0.01, 0.1, 1.0, 10.0)


@torch.no_grad()
def features(model: interp.Model, texts: Sequence[str], position: str | int = "last", *, batch_size: int = 16,
             progress: bool = True, **encode_kw) -> torch.Tensor:
    """resid_post of every layer, pooled over ``position`` per text: [L, n, d]. ``"mean"`` averages
    over all real tokens; a role or selector naming several positions is averaged over them."""
    sel = "all" if position == "mean" else position
    chunks = [list(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
    out = []
    for chunk in tqdm(chunks, desc="probe features", disable=not progress or len(chunks) < 2):
        tr = interp.capture(model, chunk, sites="blocks.*.resid_post", **encode_kw)
        h = tr.stack("resid_post")  # [L, b, T, d]
        out.append(torch.stack([h[:, i, r.positions(sel)].mean(1) for i, r in enumerate(tr.roles)], 1))
    return torch.cat(out, 1).float()


def _fit(X: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, Cs, seed: int,
         C: float | None = None):
    """Standardise + L2 logistic regression; C by CV on the train split unless given.
    -> (acc, C, pipeline | None)."""
    ytr = y[train]
    classes, counts = np.unique(ytr, return_counts=True)
    if len(classes) < 2:  # nothing to learn: predict the only class
        return float((y[test] == classes[0]).mean()), float("nan") if C is None else C, None
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    folds = int(min(5, counts.min()))
    if C is None and folds >= 2:
        cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
        pipe = GridSearchCV(pipe, {"logisticregression__C": list(Cs)}, cv=cv).fit(X[train], ytr).best_estimator_
    else:
        pipe.set_params(logisticregression__C=1.0 if C is None or np.isnan(C) else C).fit(X[train], ytr)
    return float(pipe.score(X[test], y[test])), float(pipe[-1].C), pipe


def _check_types(types: Sequence) -> None:
    """Control types must recur: with one type, or one type per item, the control task is chance by construction."""
    n_types = len(set(types))
    shared = sum(c for c in pd.Series(list(types)).value_counts() if c > 1) / max(len(types), 1)
    if n_types < 2 or shared < 0.5:
        raise interp.InterpError(
            f"control task: {n_types} distinct word type(s), and {shared:.0%} of the items share their type with "
            "another: the control labels would be constant or one per item, so control accuracy would be chance "
            "by construction. Pass control_types (word_types) with one RECURRING type per item (e.g. the token at "
            "the probed position, or a key word of each text), or control_types=False to skip the control task")


def _control_labels(y: np.ndarray, types: Sequence, seed: int) -> np.ndarray:
    """One label per type, drawn from the empirical label distribution; every example of a type carries it."""
    _check_types(types)
    rng = np.random.default_rng(seed + 1)
    uniq = list(dict.fromkeys(types))
    draw = dict(zip(uniq, rng.choice(y, size=len(uniq), replace=True)))  # from the empirical distribution
    return np.array([draw[t] for t in types])


def probe_features(feats: Mapping[int, torch.Tensor] | torch.Tensor, labels: Sequence, *, word_types: Sequence | None = None, concept: str = "the labels",
                   Cs: Sequence[float] = CS, test_size: float = 0.2, seed: int = 0, progress: bool = True,
                   model: interp.Model | None = None, texts: Sequence[str] | None = None,
                   params: dict | None = None) -> Finding:
    """Probe features computed elsewhere: ``feats`` a dict layer -> [n, d], a tensor [L, n, d] or a single
    [n, d]; ``labels`` one per example; ``word_types`` one recurring type per example for the control task
    (None: no control task)."""
    if isinstance(feats, Mapping):
        layers = sorted(feats)
        feats = torch.stack([torch.as_tensor(feats[l]) for l in layers])
    else:
        feats = torch.as_tensor(feats)
        feats = feats[None] if feats.dim() == 2 else feats
        layers = list(range(feats.shape[0]))
    if feats.dim() != 3:
        raise interp.InterpError(f"features must be [n, d] or [L, n, d]; got shape {tuple(feats.shape)}")
    y = np.asarray(labels.tolist() if isinstance(labels, torch.Tensor) else list(labels))
    L, n, d = feats.shape
    if len(y) != n:
        raise interp.InterpError(f"{len(y)} labels for {n} examples: give one label per example")
    counts = np.unique(y, return_counts=True)[1]
    if len(counts) < 2:
        raise interp.InterpError(f"all {n} labels are {y[0]!r}: a probe needs at least two classes")
    y_ctl = None
    if word_types is not None:
        types = list(word_types)
        if len(types) != n:
            raise interp.InterpError(f"{len(types)} word types for {n} examples: give one type per example")
        y_ctl = _control_labels(y, types, seed)
    train, test = train_test_split(np.arange(n), test_size=test_size, random_state=seed,
                                   stratify=y if counts.min() >= 2 else None)
    X_all = feats.detach().cpu().double().numpy()
    n_out = 1 if len(counts) <= 2 else len(counts)  # binary: one direction; else one per class
    rows, W, B = [], [], []
    for i in tqdm(range(L), desc="probes", disable=not progress or L < 8):
        with threadpool_limits(1):  # many small fits: BLAS threads only add overhead
            acc, C, pipe = _fit(X_all[i], y, train, test, Cs, seed)
            # the control probe: the same hyper-parameters (this layer's C), the same split
            ctl = _fit(X_all[i], y_ctl, train, test, Cs, seed, C=C)[0] if y_ctl is not None else float("nan")
        rows.append({"layer": layers[i], "accuracy": acc, "control_accuracy": ctl, "selectivity": acc - ctl, "C": C})
        if pipe is None:
            W.append(np.zeros((n_out, d)))
            B.append(np.zeros(n_out))
            continue
        sc, lr = pipe[0], pipe[-1]
        w = lr.coef_ / sc.scale_  # original feature space
        b = lr.intercept_ - w @ sc.mean_
        norm = np.linalg.norm(w, axis=1).clip(1e-12)
        W.append(w / norm[:, None])
        B.append(b / norm)
    table = pd.DataFrame(rows)
    best = int(table.accuracy.idxmax())
    weights, bias = torch.tensor(np.stack(W)).float(), torch.tensor(np.stack(B)).float()
    if weights.shape[1] == 1:  # binary: one direction per layer
        weights, bias = weights[:, 0], bias[:, 0]
    classes = np.unique(y)
    metrics = {"best_layer": layers[best], "best_accuracy": float(table.accuracy[best]),
               "control_at_best": float(table.control_accuracy[best]),
               "selectivity_at_best": float(table.selectivity[best]),
               "best_selectivity": float(table.selectivity.max()),
               "chance": float(np.unique(y[test], return_counts=True)[1].max() / len(test)),
               "n_train": len(train), "n_test": len(test), "classes": classes.tolist(),
               "n_control_types": len(set(word_types)) if word_types is not None else 0}
    p = {"concept": concept, "Cs": list(Cs), "test_size": test_size, "seed": seed, "layers": layers,
         "control": "word types" if word_types is not None else "none", **(params or {})}
    arrays = {"weights": weights, "bias": bias, "test_mask": torch.from_numpy(np.isin(np.arange(n), test))}
    if y_ctl is not None:
        arrays["control_label_index"] = torch.from_numpy(np.searchsorted(classes, y_ctl))
    notes = [] if y_ctl is not None else ["no control task (no word types given): selectivity is unknown"]
    return Finding("probes.linear", table, p, model.identity() if model is not None else {},
                   digest(list(texts) if texts is not None else y.tolist()), metrics, arrays, notes)


def _sentiment() -> tuple[list[str], list[int], list[str]]:
    """The scan's default: the first 160 sentiment items (1 = positive) and each review's last word as its type."""
    from interp.tasks import load_task
    items = load_task("sentiment").items[:160]
    texts = [it["prompt"] for it in items]
    labels = [int(it["choices"][it["answer"]].strip() == "positive") for it in items]
    types = [re.findall(r"[A-Za-z]+", t.split("\n")[0])[-1].lower() for t in texts]
    return texts, labels, types


def _token_types(model: interp.Model, texts: Sequence[str], position: str | int, **encode_kw) -> list[str]:
    """The token at the probed position of each text (the default control types)."""
    if position == "mean":
        raise interp.InterpError("position='mean' pools every token, so there is no token at the probed position to "
                                 "serve as control type: pass control_types=[one recurring type per text] "
                                 "or control_types=False")
    b = model.encode(list(texts), **encode_kw)
    out = []
    for r, toks in zip(b.roles, b.tokens):
        pos = r.positions(position)
        if len(pos) != 1:
            raise interp.InterpError(f"position {position!r} names {len(pos)} tokens in a text, so there is no single "
                                     "token to serve as control type: pass control_types=[...] or control_types=False")
        out.append(toks[pos[0]])
    return out


class Linear(Analysis):
    """Linear probes of one concept at every layer, with a control task on recurring word types."""

    name = "probes.linear"
    title = "Linear probe"
    in_scan = True
    figures = (_static.linear, _interactive.linear)

    def run(self, model: interp.Model, inputs: Sequence[str] | None = None, *, labels: Sequence | None = None,
            concept: str | None = None, position: str | int = "last", control_types: Sequence | bool | None = None,
            layers: Sequence[int] | None = None, Cs: Sequence[float] = CS, test_size: float = 0.2, seed: int = 0,
            batch_size: int = 16, progress: bool = True, **encode_kw) -> Finding:
        """Probe ``labels`` (one per text of ``inputs``) at every layer (or ``layers``). ``control_types``: one
        recurring type per text; None: the token at ``position``; False: no control task. ``concept`` names
        what the labels mean (e.g. "sentiment"). ``inputs=None``: the scan's sentiment probe."""
        if inputs is None:
            if labels is not None:
                raise interp.InterpError("labels without inputs: give the texts they label as inputs")
            inputs, labels, default_types = _sentiment()
            concept = concept or "sentiment"
            control_types = default_types if control_types is None else control_types
        if isinstance(inputs, str) or not all(isinstance(t, str) for t in inputs):
            raise interp.InterpError("a linear probe takes a list of texts (strings) as inputs, and labels=[...]")
        texts = list(inputs)
        if labels is None:
            raise interp.InterpError("linear_probe(model, texts, labels=[one label per text]): labels are missing")
        if len(labels) != len(texts):
            raise interp.InterpError(f"{len(labels)} labels for {len(texts)} texts: give one label per text")
        if control_types is None:
            types, control = _token_types(model, texts, position, **encode_kw), "token at the probed position"
        elif control_types is False:
            types, control = None, "none"
        else:
            types, control = list(control_types), "given types"
        if types is not None:
            if len(types) != len(texts):
                raise interp.InterpError(f"{len(types)} control types for {len(texts)} texts: give one per text")
            _check_types(types)  # before the forward passes
        feats = features(model, texts, position, batch_size=batch_size, progress=progress, **encode_kw)
        if layers is not None:
            bad = [l for l in layers if not 0 <= l < model.n_layers]
            if bad:
                raise interp.InterpError(f"layers {bad} are outside the model's layers 0…{model.n_layers - 1}")
            feats = {int(l): feats[l] for l in layers}
        f = probe_features(feats, labels, word_types=types, concept=concept or "the labels", Cs=Cs,
                           test_size=test_size, seed=seed, progress=progress, model=model, texts=texts,
                           params={"position": position})
        f.params["control"] = control
        return f

    def to_spec(self, finding: Finding, model: interp.Model, *, layer: int | None = None, scale: float = 4.0,
                positions: str | int | list = "last", class_index: int | None = None, mode: str = "steer",
                control: bool = False, seed: int = 0) -> interp.Spec:
        """Steer with the probe direction: h'_t = h_t + scale · ŵ_l at ``layer`` (default: the best layer).
        ``mode="ablate"``: the causal probe, h'_t = h_t − (h_t·ŵ_l) ŵ_l (``resid.project_out``) at ``positions``;
        ``control=True`` uses a random unit direction (``seed``) instead of ŵ_l."""
        layer = finding.metrics["best_layer"] if layer is None else layer
        layers = finding.params["layers"]
        if layer not in layers:
            raise interp.InterpError(f"no probe at layer {layer}; probed layers are {layers}")
        w = finding.arrays["weights"][layers.index(layer)]
        if w.dim() == 2:
            if class_index is None:
                raise interp.InterpError(f"a {w.shape[0]}-class probe has one direction per class: pass class_index")
            w = w[class_index]
        if mode not in ("steer", "ablate"):
            raise interp.InterpError(f"mode must be 'steer' (add the direction) or 'ablate' (project it out), got {mode!r}")
        if control:
            w = random_direction(w.shape[-1], seed) * w.norm()
        if mode == "ablate":
            edit = interp.ops.project_out([int(layer)], w.float().contiguous(), positions=positions)
            return interp.Spec.for_model(model, [edit], analysis=self.name, prompts=finding.prompts,
                                         params={"layer": int(layer), "mode": mode, "control": control, "seed": seed,
                                                 "positions": positions, "concept": finding.params.get("concept")})
        edit = {"op": "resid.add", "layers": [int(layer)], "positions": positions, "tensor": "probe_direction",
                "scale": float(scale)}
        return interp.Spec.for_model(model, [edit], analysis=self.name,
                                     params={"layer": int(layer), "scale": scale, **finding.params},
                                     prompts=finding.prompts, tensors={"probe_direction": w.float().contiguous()})

    def explain(self, finding: Finding) -> str:
        m, p = finding.metrics, finding.params
        head = (f"A linear probe reads {p.get('concept', 'the labels')} from layer {m['best_layer']}'s residual stream "
                f"with {m['best_accuracy'] * 100:.0f} % held-out accuracy (chance {m['chance'] * 100:.0f} %)")
        if np.isnan(m["control_at_best"]):
            return head + "; no control task was run, so its selectivity is unknown."
        return (head + f"; the same probe on a control task (random labels per word type) reaches "
                f"{m['control_at_best'] * 100:.0f} %, a selectivity of {m['selectivity_at_best'] * 100:.0f} points.")


linear_probe = Linear()


def random_direction(d: int, seed: int = 0) -> torch.Tensor:
    """A unit vector drawn uniformly on the sphere of R^d (a normalised Gaussian), for the causal probe's control."""
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (v / v.norm()).float()


class CausalProbe(Analysis):
    """The causal test of a linear probe (docs/methods.md §10a): remove the probe direction from the residual
    stream and measure the behaviour on a task, against removing random directions."""

    name = "probes.linear_causal"
    title = "Causal probe"
    in_scan = False
    figures = (_static.generic, _interactive.generic)

    def run(self, model: interp.Model, inputs=None, *, probe: Finding | None = None, task=None,
            layer: int | None = None, positions: str | int | list = "all", n_random: int = 3, seed: int = 0,
            limit: int | None = None, class_index: int | None = None) -> Finding:
        """``probe``: a ``probes.linear`` Finding (None: the built-in sentiment probe); ``task`` (or ``inputs``): what
        to measure with ``interp.evaluate`` (default: "sentiment"). h' = h − (h·ŵ)ŵ at ``layer`` (default: the
        probe's best) at ``positions``; the control removes ``n_random`` random unit directions, one at a time.
        The table has one row per item; Δ = with − without, and the paired bootstrap CI of Δ_probe − Δ_random."""
        from interp.tasks import bootstrap_ci
        task = task if task is not None else (inputs if inputs is not None else "sentiment")
        if probe is None:
            probe = linear_probe(model, progress=False)
        if probe.analysis != Linear.name:
            raise interp.InterpError(f"probe must be a probes.linear Finding, got {probe.analysis!r}")
        if n_random < 1:
            raise interp.InterpError(f"n_random = {n_random}: the control needs at least one random direction")
        layer = probe.metrics["best_layer"] if layer is None else int(layer)
        kw = {"layer": layer, "positions": positions, "mode": "ablate", "class_index": class_index}
        spec = linear_probe.to_spec(probe, model, **kw)
        ev = interp.evaluate(model, spec, task, limit=limit, seed=seed)
        rand = [interp.evaluate(model, linear_probe.to_spec(probe, model, **kw, control=True, seed=seed + 1 + i), task,
                                limit=limit, seed=seed) for i in range(n_random)]
        base = ev.table["without"].to_numpy()
        d_probe = ev.table["delta"].to_numpy()
        d_rand = np.mean([r.table["delta"].to_numpy() for r in rand], 0)
        table = pd.DataFrame({"item": ev.table["item"], "without": base, "probe_removed": ev.table["with"].to_numpy(),
                              "random_removed": base + d_rand, "delta_probe": d_probe, "delta_random": d_rand})
        m, lo, hi = bootstrap_ci((d_probe - d_rand).tolist(), seed=seed)
        em = ev.metrics
        _, rlo, rhi = bootstrap_ci(d_rand.tolist(), seed=seed)
        metrics = {"task": em["task"], "metric": em["metric"], "n": em["n"], "layer": layer, "without": em["without"],
                   "with_probe_removed": em["with"], "delta_probe": em["delta"], "delta_probe_ci": em["delta_ci"],
                   "delta_random": float(d_rand.mean()), "delta_random_ci": [rlo, rhi],
                   "probe_minus_random": m, "probe_minus_random_ci": [lo, hi], "n_random": n_random}
        if layer in probe.params.get("layers", []):
            metrics["probe_accuracy"] = float(probe.table.set_index("layer").accuracy[layer])
        params = {"layer": layer, "positions": positions, "n_random": n_random, "seed": seed, "limit": limit,
                  "concept": probe.params.get("concept"), "class_index": class_index}
        return Finding(self.name, table, params, model.identity(), probe.prompts, metrics,
                       {"direction": spec.tensors[spec.edits[0]["tensor"]]})

    def to_spec(self, finding: Finding, model: interp.Model, **params) -> interp.Spec:
        """The probe-direction ablation that was measured (``resid.project_out``)."""
        p = finding.params
        edit = interp.ops.project_out([int(p["layer"])], finding.arrays["direction"], positions=p["positions"])
        return interp.Spec.for_model(model, [edit], analysis=self.name, prompts=finding.prompts,
                                     params={"layer": p["layer"], "positions": p["positions"], "concept": p["concept"]})

    def explain(self, finding: Finding) -> str:
        m = finding.metrics
        lo, hi = m["probe_minus_random_ci"]
        worse = (hi < 0) if m["metric"] != "nll" else (lo > 0)
        better = (lo > 0) if m["metric"] != "nll" else (hi < 0)
        verdict = "more than" if worse else "less than" if better else "no more than (distinguishably)"
        return (f"Removing the probe direction at layer {m['layer']} moves {m['task']} {m['metric']} from "
                f"{m['without']:.3f} to {m['with_probe_removed']:.3f} (Δ {m['delta_probe']:+.3f}), against Δ "
                f"{m['delta_random']:+.3f} for random directions: Δ_probe − Δ_random {m['probe_minus_random']:+.3f}, 95 % "
                f"paired CI [{lo:+.3f}, {hi:+.3f}]; it hurts {verdict} a random direction.")


causal_probe = CausalProbe()
