"""Linear probes on the residual stream, with control tasks (METHODS.md §10).

Alain & Bengio, "Understanding intermediate layers using linear classifier probes" (2016);
Hewitt & Liang, "Designing and Interpreting Probes with Control Tasks" (EMNLP 2019).

Per layer l, features x = h^l[positions] (``blocks.{l}.resid_post``, one position or the mean over a
role / the whole sequence), labels y:

    x̃ = (x − μ) / σ                       (standardised on the train split)
    p(y | x) = softmax(W x̃ + b),          L2-regularised logistic regression, C by 5-fold CV
                                          over {0.01, 0.1, 1, 10} on an 80/20 train split (fixed seed)
    accuracy_l = held-out accuracy;       control_l = the same on the control task;
    selectivity_l = accuracy_l − control_l.

Control task: every word type (or, without types, every distinct input) gets a label drawn at random
from the empirical label distribution, and all its examples carry it. A probe that reaches high
control accuracy memorises types rather than reading a property of the representation.

The probe direction in the original feature space is w / σ (since W x̃ = (W/σ)·x − W·μ/σ); it is
unit-normalised and kept as ``weights`` [L, d] with ``bias`` [L] such that the probe predicts the
second class in sorted order (1 for 0/1 labels) where ŵ·x + bias > 0; with K > 2 classes, one
direction per class ([L, K, d], [L, K]). Ties in accuracy pick the earliest layer as ``best_layer``. ``to_spec`` turns it into a steering vector (P5, ``resid.add``).
"""
from __future__ import annotations

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
from interp.finding import Finding, digest

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


def _fit(X: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, Cs, seed: int):
    """Standardise + L2 logistic regression, C by CV on the train split. -> (acc, C, pipeline | None)."""
    ytr = y[train]
    classes, counts = np.unique(ytr, return_counts=True)
    if len(classes) < 2:  # nothing to learn: predict the only class
        return float((y[test] == classes[0]).mean()), float("nan"), None
    folds = int(min(5, counts.min()))
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    if folds >= 2:
        cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
        pipe = GridSearchCV(pipe, {"logisticregression__C": list(Cs)}, cv=cv).fit(X[train], ytr).best_estimator_
    else:
        pipe.set_params(logisticregression__C=1.0).fit(X[train], ytr)
    return float(pipe.score(X[test], y[test])), float(pipe[-1].C), pipe


def _control_labels(y: np.ndarray, types: Sequence, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1)
    uniq = list(dict.fromkeys(types))
    draw = dict(zip(uniq, rng.choice(y, size=len(uniq), replace=True)))  # from the empirical distribution
    return np.array([draw[t] for t in types])


def linear_probe(model_or_features, texts_or_labels, labels: Sequence | None = None, *,
                 position: str | int = "last", word_types: Sequence | None = None, Cs: Sequence[float] = CS,
                 test_size: float = 0.2, seed: int = 0, batch_size: int = 16, progress: bool = True,
                 **encode_kw) -> Finding:
    """Probe every layer. Either ``linear_probe(model, texts, labels, position=...)`` (captures
    resid_post) or ``linear_probe(feats, labels, word_types=...)`` with ``feats`` a dict layer -> [n, d],
    a tensor [L, n, d] or a single [n, d]."""
    texts = None
    if isinstance(model_or_features, interp.Model):
        model, texts = model_or_features, list(texts_or_labels)
        if labels is None:
            raise interp.InterpError("linear_probe(model, texts, labels): labels are missing")
        feats = features(model, texts, position, batch_size=batch_size, progress=progress, **encode_kw)
        layers = list(range(model.n_layers))
    else:
        model, labels, f = None, texts_or_labels, model_or_features
        if isinstance(f, Mapping):
            layers = sorted(f)
            feats = torch.stack([torch.as_tensor(f[l]) for l in layers])
        else:
            feats = torch.as_tensor(f)
            feats = feats[None] if feats.dim() == 2 else feats
            layers = list(range(feats.shape[0]))
    y = np.asarray(labels.tolist() if isinstance(labels, torch.Tensor) else labels)
    L, n, d = feats.shape
    if len(y) != n:
        raise interp.InterpError(f"{len(y)} labels for {n} examples")
    types = list(word_types) if word_types is not None else (texts if texts is not None else list(range(n)))
    if len(types) != n:
        raise interp.InterpError(f"{len(types)} word types for {n} examples")
    y_ctl = _control_labels(y, types, seed)
    counts = np.unique(y, return_counts=True)[1]
    train, test = train_test_split(np.arange(n), test_size=test_size, random_state=seed,
                                   stratify=y if counts.min() >= 2 else None)
    X_all = feats.detach().cpu().double().numpy()
    n_out = 1 if len(counts) <= 2 else len(counts)  # binary: one direction; else one per class
    rows, W, B = [], [], []
    for i in tqdm(range(L), desc="probes", disable=not progress or L < 8):
        with threadpool_limits(1):  # many small fits: BLAS threads only add overhead
            acc, C, pipe = _fit(X_all[i], y, train, test, Cs, seed)
            ctl, C_ctl, _ = _fit(X_all[i], y_ctl, train, test, Cs, seed)
        rows.append({"layer": layers[i], "accuracy": acc, "control_accuracy": ctl, "selectivity": acc - ctl,
                     "C": C, "control_C": C_ctl})
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
    metrics = {"best_layer": layers[best], "best_accuracy": float(table.accuracy[best]),
               "best_selectivity": float(table.selectivity.max()),
               "chance": float(np.unique(y[test], return_counts=True)[1].max() / len(test)),
               "n_train": len(train), "n_test": len(test), "classes": np.unique(y).tolist()}
    params = {"position": position if texts is not None else None, "Cs": list(Cs), "test_size": test_size,
              "seed": seed, "layers": layers, "control": "word_types" if word_types is not None else
              ("per text" if texts is not None else "per example")}
    return Finding("probes.linear", table, params, model.identity() if model is not None else {},
                   digest(texts if texts is not None else y.tolist()), metrics,
                   {"weights": weights, "bias": bias}, [])


def to_spec(finding: Finding, model: interp.Model, *, layer: int | None = None, scale: float = 4.0,
            positions: str | int | list = "last", class_index: int | None = None) -> interp.Spec:
    """Steer with the probe direction: h'_t = h_t + scale · ŵ_l at ``layer`` (default: the best layer)."""
    layer = finding.metrics["best_layer"] if layer is None else layer
    layers = finding.params["layers"]
    if layer not in layers:
        raise interp.InterpError(f"no probe at layer {layer}; probed layers are {layers}")
    w = finding.arrays["weights"][layers.index(layer)]
    if w.dim() == 2:
        if class_index is None:
            raise interp.InterpError(f"a {w.shape[0]}-class probe has one direction per class: pass class_index")
        w = w[class_index]
    edit = {"op": "resid.add", "layers": [int(layer)], "positions": positions, "tensor": "probe_direction",
            "scale": float(scale)}
    return interp.Spec.for_model(model, [edit], analysis="probes.linear",
                                 params={"layer": int(layer), "scale": scale, **finding.params},
                                 prompts=finding.prompts, tensors={"probe_direction": w.float().contiguous()})
