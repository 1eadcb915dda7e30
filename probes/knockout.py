"""Attention knockout: Zhang, Yadav, Han & Shutova, "Cross-modal Information Flow in Multimodal
Large Language Models" (CVPR 2025; FightingFighting/cross-modal-information-flow-in-MLLM), after
Geva et al. 2023 (attention knockout for factual recall).

For a window of k layers centred on layer ℓ, W(ℓ) = [max(0, ℓ − ⌊k/2⌋), min(L, ℓ + ⌈k/2⌉)), block every
attention edge from the source tokens to the target tokens in all heads:

    Z^{l,h}[i, j] = −∞   for l ∈ W(ℓ), i ∈ target, j ∈ source          (P6)

and report Δ%(ℓ) = (p'(y) − p(y)) / p(y) × 100, y = the model's own greedy next token (or the given
answer, keeping only the items the model answers correctly, as in the paper). Sources and targets are
token selectors (``role:subject``, ``last``, ``role:image`` …) or, per item, explicit index lists, so the
same probe serves text (subject → last) and images (image → question, object patches → question).
Several edges (``edges=[(source, target), ...]`` or ``(source, target, name)``) share the unpatched
forward, and each edge keeps its own label in the table (per-item selectors are ``per-item#e``), so two
per-item edges are never averaged together. A multi-row Batch runs in chunks of ``batch_size``
sequences, the answer read at each row's ``query`` role (else its last token). ``run(model)`` without
inputs is what ``interp scan`` runs: the built-in facts, last → subject, windows centred on every 3rd layer.
"""
from __future__ import annotations

from typing import Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

import interp
from interp.analysis import Analysis
from interp.finding import Finding, digest
from interp.prompts import facts
from interp.roles import Batch, Roles
from viz import interactive as _interactive
from viz import static as _static

Selector = str | int | list


def _window(l: int, k: int, L: int) -> list[int]:
    return list(range(max(0, l - k // 2), min(L, l + (k + 1) // 2)))


def _rows(batch: Batch) -> list[Batch]:
    return [Batch(batch.input_ids[i:i + 1], batch.attention_mask[i:i + 1], batch.roles[i:i + 1], batch.tokens[i:i + 1],
                  batch.texts[i:i + 1], {k: v[i:i + 1] if torch.is_tensor(v) and v.shape[0] == len(batch) else v
                                         for k, v in batch.extra.items()}) for i in range(len(batch))]


def _cat(rows: list[Batch]) -> Batch:
    """One right-padded batch from single-row batches."""
    T = max(b.input_ids.shape[1] for b in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    am = torch.zeros(len(rows), T, dtype=torch.long)
    for i, b in enumerate(rows):
        n = b.input_ids.shape[1]
        ids[i, :n], am[i, :n] = b.input_ids[0], b.attention_mask[0]
    extra = {k: torch.cat([b.extra[k] for b in rows]) if torch.is_tensor(v) else v for k, v in rows[0].extra.items()}
    return Batch(ids, am, [r for b in rows for r in b.roles], [t for b in rows for t in b.tokens],
                 [t for b in rows for t in b.texts], extra)


def _edge_roles(roles: Roles, i: int, edges: list[tuple[Selector, Selector]]) -> tuple[Roles, list[tuple[str, str]]]:
    """Per-item explicit selectors (a list with one entry per item) become roles ``ko_src{e}``/``ko_tgt{e}``."""
    r = Roles(roles, length=roles.length)
    names = []
    for e, (src, tgt) in enumerate(edges):
        pair = []
        for kind, sel in (("src", src), ("tgt", tgt)):
            if isinstance(sel, tuple):  # per-item selectors
                r[f"ko_{kind}{e}"] = r.positions(sel[i], strict=False)
                pair.append(f"role:ko_{kind}{e}")
            else:
                pair.append(sel)
        names.append((pair[0], pair[1]))
    return r, names


def _answer_probs(model: interp.Model, batch: Batch, *specs: interp.Spec) -> torch.Tensor:
    """softmax probabilities [b, V] at each row's ``query`` role (its last real token if it has none)."""
    return torch.softmax(model.answer_logits(batch, *specs).float(), -1)


def _label(sel, e: int) -> str:
    return f"per-item#{e}" if isinstance(sel, tuple) else str(sel)


def _edge_labels(edges: list[tuple]) -> list[str]:
    """One distinct label per edge: its name when given, else "source→target" (per-item selectors are
    ``per-item#e``, e = the edge's index), suffixed with the index where two edges would still share one."""
    labels = [str(e[2]) if len(e) == 3 else f"{_label(e[0], i)}→{_label(e[1], i)}" for i, e in enumerate(edges)]
    return [f"{lab} ({i})" if labels.count(lab) > 1 else lab for i, lab in enumerate(labels)]


class Knockout(Analysis):
    """Δ% in the probability of the model's answer when target→source attention is blocked around each layer."""

    name = "probes.knockout"
    title = "Attention knockout"
    in_scan = True
    figures = (_static.knockout, _interactive.knockout)

    def run(self, model: interp.Model, inputs: list | Batch | None = None, *,
            source: Selector | Sequence = "role:subject", target: Selector | Sequence = "last", window: int = 9,
            layers: list[int] | None = None, edges: list[tuple] | None = None,
            answers: Sequence[int] | None = None, batch_size: int = 64, progress: bool = True) -> Finding:
        """Δ% in the probability of the model's answer when target→source edges are blocked around each layer.

        ``inputs``: a list of {"prompt", "subject"} dicts or strings, ready model inputs (dicts of tensors, e.g.
        with pixel_values) or one Batch of many rows with roles; None: the built-in facts, with a window centred
        on every 3rd layer (what ``interp scan`` runs). ``layers``: the window centres (default: every layer).
        ``source``/``target`` are selectors, or a tuple with one selector per item (e.g. explicit patch indices per
        scene). ``edges`` lists several (source, target) or (source, target, name) edges; each gets its own label.
        ``answers``: the expected token per item; items the model gets wrong are dropped (``n_dropped``).
        """
        L = model.n_layers
        if inputs is None:
            inputs = facts()
            layers = list(range(0, L, 3)) if layers is None else layers
        if isinstance(inputs, Batch):
            rows = _rows(inputs)
        else:
            items = [model.encode(p["prompt"], roles={"subject": p["subject"]})
                     if isinstance(p, dict) and "prompt" in p else model.encode(p) for p in inputs]
            rows = [r for b in items for r in _rows(b)]
        edges = [(source, target)] if edges is None else [tuple(e) for e in edges]
        for e in edges:
            if len(e) not in (2, 3):
                raise interp.InterpError(f"an edge is (source, target) or (source, target, name); got {e!r}")
            for sel in e[:2]:
                if isinstance(sel, tuple) and len(sel) != len(rows):
                    raise interp.InterpError(f"a per-item selector (a tuple) needs one entry per item: got {len(sel)} "
                                             f"for {len(rows)} items")
        names = []
        for i, b in enumerate(rows):
            r, names = _edge_roles(b.roles[0], i, [e[:2] for e in edges])
            b.roles = [r]
        labels = _edge_labels(edges)
        layers = list(range(L)) if layers is None else list(layers)
        bad = [l for l in layers if not 0 <= l < L]
        if bad:
            raise interp.InterpError(f"window centres {bad} are outside the model's layers 0…{L - 1}")
        # unpatched answer probabilities; keep the items answered correctly when answers are given
        P0 = torch.cat([_answer_probs(model, _cat(rows[c:c + batch_size])) for c in range(0, len(rows), batch_size)])
        Y = P0.argmax(-1)
        if answers is not None and len(answers) != len(rows):
            raise interp.InterpError(f"{len(answers)} answers for {len(rows)} items: give one token id per item")
        keep = torch.ones(len(rows), dtype=torch.bool) if answers is None else Y == torch.as_tensor(list(answers))
        idx = torch.nonzero(keep)[:, 0].tolist()
        rows = [rows[i] for i in idx]
        p0 = P0[idx, Y[idx]]
        y = Y[idx]
        delta = torch.zeros(len(rows), len(edges), len(layers))
        steps = [(e, j) for e in range(len(edges)) for j in range(len(layers))]
        for e, j in tqdm(steps, desc="knockout", disable=not progress):
            src, tgt = names[e]
            spec = interp.Spec.for_model(model, [{"op": "attn.knockout", "layers": _window(layers[j], window, L),
                                                  "queries": tgt, "keys": src}])
            for c in range(0, len(rows), batch_size):
                p = _answer_probs(model, _cat(rows[c:c + batch_size]), spec)
                yy = y[c:c + batch_size]
                pc = p[torch.arange(len(yy)), yy]
                delta[c:c + len(yy), e, j] = (pc - p0[c:c + len(yy)]) / p0[c:c + len(yy)] * 100
        recs = [{"item": i, "layer": layers[j], "edge": labels[e], "delta_pct": float(delta[i, e, j])}
                for i in range(len(rows)) for e in range(len(edges)) for j in range(len(layers))]
        per_item = pd.DataFrame(recs, columns=["item", "layer", "edge", "delta_pct"])
        table = per_item.groupby(["layer", "edge"], as_index=False, sort=False).agg(
            delta_pct=("delta_pct", "mean"), sem=("delta_pct", "sem")) if len(per_item) else per_item
        metrics = {"window": window, "n_items": len(rows), "n_dropped": len(keep) - len(rows),
                   "p_orig_mean": float(p0.mean()) if len(rows) else float("nan")}
        if len(table):
            worst = table.loc[table.delta_pct.idxmin()]
            metrics.update({"min_delta_pct": float(worst.delta_pct), "min_layer": int(worst.layer),
                            "min_edge": str(worst.edge), "mean_delta_pct": float(table.delta_pct.mean())})
        e0 = labels.index(metrics["min_edge"]) if "min_edge" in metrics else 0
        params = {"source": _label(edges[e0][0], e0), "target": _label(edges[e0][1], e0), "window": window,
                  "edges": labels, "layers": layers}
        ids = [b.input_ids[0].tolist() for b in rows]
        return Finding(self.name, table, params, model.identity(), digest(ids), metrics,
                       {"per_item": delta if len(edges) > 1 else delta[:, 0], "p_orig": p0, "answer": y})

    def to_spec(self, finding: Finding, model: interp.Model, *, layer: int | None = None) -> interp.Spec:
        """The knockout of the most damaging edge at its most damaging window (or at ``layer``), as a spec."""
        if "min_layer" not in finding.metrics:
            raise interp.InterpError("this knockout kept no item (the model answered none correctly): no spec")
        l = finding.metrics["min_layer"] if layer is None else layer
        p = finding.params
        if p["source"].startswith("per-item") or p["target"].startswith("per-item"):
            raise interp.InterpError("this knockout used per-item index sets: name them as roles to export a spec")
        return interp.Spec.for_model(model, [{"op": "attn.knockout", "layers": _window(l, p["window"], model.n_layers),
                                              "queries": p["target"], "keys": p["source"]}],
                                     analysis=self.name, prompts=finding.prompts, params={**p, "layer": l})

    def explain(self, finding: Finding) -> str:
        m = finding.metrics
        if "min_delta_pct" not in m:
            return f"No item was kept ({m.get('n_dropped', 0)} answered wrongly), so nothing was knocked out."
        src, tgt = finding.params["source"], finding.params["target"]
        plain = [s.removeprefix("role:") for s in (tgt, src)]
        edge = f"{plain[0]} → {plain[1]}" if m["min_edge"] == f"{src}→{tgt}" else m["min_edge"]
        d = m["min_delta_pct"]
        change = f"lowers the answer's probability by {-d:.0f} %" if d < 0 else \
            f"never lowers the answer's probability (at best it changes by {d:+.0f} %)"
        return (f"Blocking {edge} attention in a {m['window']}-layer window centred at layer {m['min_layer']} "
                f"{change} (mean over {m['n_items']} items).")


knockout = Knockout()
