"""Attention knockout: Zhang, Yadav, Han & Shutova, "Cross-modal Information Flow in Multimodal
Large Language Models" (CVPR 2025; FightingFighting/cross-modal-information-flow-in-MLLM), after
Geva et al. 2023 (attention knockout for factual recall).

For a window of k layers around ℓ, W(ℓ) = [max(0, ℓ − ⌊k/2⌋), min(L, ℓ + ⌈k/2⌉)), block every
attention edge from the source tokens to the target tokens in all heads:

    Z^{l,h}[i, j] = −∞   for l ∈ W(ℓ), i ∈ target, j ∈ source          (P6)

and report Δ%(ℓ) = (p'(y) − p(y)) / p(y) × 100, y = the model's own greedy next token. Sources and
targets are token selectors (``role:subject``, ``last``, ``role:image`` …), so the same probe serves
text (subject → last) and images (image → question, object patches → question).
"""
from __future__ import annotations

import pandas as pd
import torch
from tqdm.auto import tqdm

import interp
from interp.finding import Finding, digest
from interp.prompts import facts


def _window(l: int, k: int, L: int) -> list[int]:
    return list(range(max(0, l - k // 2), min(L, l + (k + 1) // 2)))


def knockout(model: interp.Model, prompts: list | None = None, *, source: str = "role:subject",
             target: str = "last", window: int = 9, layers: list[int] | None = None, progress: bool = True,
             inputs: list[dict] | None = None) -> Finding:
    """Δ% in the probability of the model's answer when target→source edges are blocked around each layer.

    ``prompts``: a list of {"prompt", "subject"} dicts (default: the built-in facts) or strings;
    ``inputs``: alternatively, ready model inputs (dicts of tensors, e.g. with pixel_values) plus roles.
    """
    items = inputs if inputs is not None else [
        model.encode(p["prompt"], roles={"subject": p["subject"]}) if isinstance(p, dict) else model.encode(p)
        for p in (prompts or facts())]
    L = model.n_layers
    layers = list(range(L)) if layers is None else layers
    rows = []
    for i, batch in enumerate(tqdm(items, desc="knockout", disable=not progress)):
        batch = model.encode(batch)
        with torch.no_grad(), model.engine.running(batch):
            p0 = torch.softmax(model.hf(**batch.model_inputs()).logits[0, -1].float(), -1)
        y = int(p0.argmax())
        for l in layers:
            spec = interp.Spec.for_model(model, [{"op": "attn.knockout", "layers": _window(l, window, L),
                                                  "queries": target, "keys": source}])
            with torch.no_grad(), interp.patch(model, spec), model.engine.running(batch):
                p = torch.softmax(model.hf(**batch.model_inputs()).logits[0, -1].float(), -1)[y]
            rows.append({"item": i, "layer": l, "edge": f"{source}→{target}", "p_orig": float(p0[y]),
                         "p": float(p), "delta_pct": float((p - p0[y]) / p0[y] * 100)})
    per_item = pd.DataFrame(rows)
    table = per_item.groupby(["layer", "edge"], as_index=False).agg(delta_pct=("delta_pct", "mean"),
                                                                    sem=("delta_pct", "sem"))
    worst = table.loc[table.delta_pct.idxmin()]
    metrics = {"window": window, "n_items": len(items), "min_delta_pct": float(worst.delta_pct),
               "min_layer": int(worst.layer), "mean_delta_pct": float(table.delta_pct.mean()),
               "p_orig_mean": float(per_item.groupby("item").p_orig.first().mean())}
    return Finding("probes.knockout", table, {"source": source, "target": target, "window": window},
                   model.identity(), digest([b.input_ids for b in map(model.encode, items)] if inputs is None else len(items)),
                   metrics, {"per_item": torch.tensor(per_item.delta_pct.values).view(len(items), len(layers))})


def to_spec(finding: Finding, model: interp.Model, *, layer: int | None = None) -> interp.Spec:
    """The knockout at the most damaging window (or at ``layer``), as a replayable spec."""
    l = finding.metrics["min_layer"] if layer is None else layer
    p = finding.params
    return interp.Spec.for_model(model, [{"op": "attn.knockout", "layers": _window(l, p["window"], model.n_layers),
                                          "queries": p["target"], "keys": p["source"]}],
                                 analysis="probes.knockout", prompts=finding.prompts, params={**p, "layer": l})
