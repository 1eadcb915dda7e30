"""Activation-patching sweeps (Vig et al. 2020, causal mediation; Meng et al., "Locating and Editing Factual
Associations in GPT", NeurIPS 2022; Wang et al., "Interpretability in the Wild", ICLR 2023; the metric
conventions of Heimersheim & Nanda, "How to use and interpret activation patching", 2024).

A clean prompt x_c and a corrupted prompt x_r of the same length differ in a few tokens (``The capital of
France is`` / ``The capital of Italy is``). Patching runs the **base** prompt with one activation a replaced by
its value on the **source** prompt; ``direction="denoise"`` (default) patches clean activations into the
corrupted run (which components suffice to restore the answer), ``"noise"`` corrupted into clean (which are
necessary). For each cell (site, layer, position) or (layer, head[, position]):

    m(a ← a^{src})  with  m = logit difference z[answer] − z[foil] at the answer position (default),
                          the answer's probability, or KL(p_src ‖ p) (p_src: the source run's distribution)
    score = (m_patched − m_base) / (m_src − m_base)          (1: the source's value restored, 0: no effect)

Sites: ``resid_pre``, ``attn.out``, ``mlp.out`` swept over (layer, position); ``heads``: the per-head output
z (``attn.z``, before the output projection) of one head at every position (``head_positions="all"``) or at
one position (``"each"``). Cells run batched: each row of one forward is the base prompt with its own patch
(a ``patch`` Spec whose positions are a per-row role). ``to_spec`` exports the top-k cells as one ``patch`` spec
(head cells as ``patch`` at ``attn.z`` restricted to those ``heads``), which ``interp.evaluate`` measures on a
task. docs/methods.md §16.
"""
from __future__ import annotations

from typing import Sequence

import pandas as pd
import torch

import interp
from interp.analysis import Analysis
from interp.finding import Finding, digest
from interp.prompts import facts
from interp.roles import Batch, Roles
from probes.dla import answer_positions, token_ids
from viz import interactive as _interactive
from viz import static as _static

RESID_SITES = ("resid_pre", "attn.out", "mlp.out")
SITES = RESID_SITES + ("heads",)
METRICS = ("logit_diff", "prob", "kl")


def default_pairs() -> tuple[list[str], list[str], list[str], list[str]]:
    """The built-in capital facts, each paired with the next one: (clean, corrupted, answers, foils)."""
    fs = [f for f in facts() if f["prompt"].startswith("The capital of")]
    nxt = fs[1:] + fs[:1]
    return ([f["prompt"] for f in fs], [g["prompt"] for g in nxt], [f["answer"] for f in fs], [g["answer"] for g in nxt])


def metric_of(logits: torch.Tensor, metric: str, answer: torch.Tensor, foil: torch.Tensor | None,
              ref_logp: torch.Tensor | None = None) -> torch.Tensor:
    """The metric per row from answer-position logits [n, V]: logit difference, probability or KL(ref ‖ p)."""
    logits = logits.double()
    rows = torch.arange(len(logits))
    if metric == "logit_diff":
        return logits[rows, answer] - (logits[rows, foil] if foil is not None else 0)
    if metric == "prob":
        return logits.softmax(-1)[rows, answer]
    logp = logits.log_softmax(-1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1)


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise interp.InterpError(f"metric={metric!r}: use one of {METRICS}")


def encode_pairs(model: interp.Model, clean, corrupted) -> tuple[Batch, Batch]:
    """Clean and corrupted batches, one row per pair, all of one length (what patching position by position needs)."""
    if clean is None:
        raise interp.InterpError("give clean prompts and corrupted= prompts (or inputs=None for the built-in pairs)")
    if corrupted is None and isinstance(clean, (list, tuple)) and clean and isinstance(clean[0], (list, tuple)):
        clean, corrupted = [c for c, _ in clean], [r for _, r in clean]
    if corrupted is None:
        raise interp.InterpError("activation patching needs corrupted= prompts, one per clean prompt")
    bc, br = model.encode(clean), model.encode(corrupted)
    if len(bc) != len(br):
        raise interp.InterpError(f"{len(bc)} clean prompts but {len(br)} corrupted ones: give pairs")
    lens = set(bc.lengths) | set(br.lengths)
    if len(lens) != 1:
        bad = [i for i, (a, b) in enumerate(zip(bc.lengths, br.lengths)) if a != b]
        raise interp.InterpError(f"clean and corrupted prompts must all have the same number of tokens (got "
                                 f"{sorted(lens)}{'; unequal pairs: ' + str(bad) if bad else ''}); reword them or "
                                 "run pairs of different lengths separately")
    return bc, br


def _row_batch(base: Batch, i: int, roles: list[dict]) -> Batch:
    """``len(roles)`` copies of row i of ``base``, each with its own extra roles."""
    n = len(roles)
    T = base.lengths[i]
    rl = [Roles({**base.roles[i], **r}, length=T) for r in roles]
    return Batch(base.input_ids[i:i + 1, :T].repeat(n, 1), base.attention_mask[i:i + 1, :T].repeat(n, 1), rl,
                 [base.tokens[i][:T]] * n, [], {})


def patched_metrics(model: interp.Model, base: Batch, i: int, src: interp.Trace, base_tr: interp.Trace | None,
                    cells: list[tuple], site: str, score_fn, batch_size: int) -> torch.Tensor:
    """The metric with each cell patched from ``src`` into row i of ``base``. Cells are (layer, position) for a
    residual site, (layer, head, positions) for ``heads``; ``batch_size`` of them per forward."""
    out = []
    for c0 in range(0, len(cells), batch_size):
        chunk = cells[c0:c0 + batch_size]
        layers = sorted({c[0] for c in chunk})
        roles = [{f"patch_l{l}": [] for l in layers} for _ in chunk]
        tensors, edits = {}, []
        if site == "heads":
            z0 = {l: base_tr[f"blocks.{l}.attn.z"][i:i + 1] for l in layers}  # [1, T, H, d]: the base run's own
            zs = {l: src[f"blocks.{l}.attn.z"][i:i + 1] for l in layers}
            srcs = {l: z0[l].repeat(len(chunk), 1, 1, 1) for l in layers}
            for r, (l, h, pos) in enumerate(chunk):
                roles[r][f"patch_l{l}"] = list(pos)
                srcs[l][r, :, h] = zs[l][0, :, h]  # other heads keep the base run's values
            for l in layers:
                tensors[f"z{l}"] = srcs[l]
                edits.append({"op": "patch", "site": "attn.z", "layers": [l], "positions": f"role:patch_l{l}",
                              "tensor": f"z{l}"})
        else:
            for r, (l, p) in enumerate(chunk):
                roles[r][f"patch_l{l}"] = [p]
            for l in layers:
                tensors[f"a{l}"] = src[f"blocks.{l}.{site}"][i:i + 1]
                edits.append({"op": "patch", "site": site, "layers": [l], "positions": f"role:patch_l{l}",
                              "tensor": f"a{l}"})
        spec = interp.Spec.for_model(model, edits, analysis="probes.patching", tensors=tensors)
        batch = _row_batch(base, i, roles)
        out.append(score_fn(model.answer_logits(batch, spec)))
    return torch.cat(out)


def _same(src: interp.Trace, base: interp.Trace, i: int, site: str, cell: tuple) -> bool:
    """Whether the patched value equals the base run's own (patching it changes nothing): positions before the
    first differing token of a causal model."""
    if site == "heads":
        l, h, pos = cell
        a, b = src[f"blocks.{l}.attn.z"][i, list(pos), h], base[f"blocks.{l}.attn.z"][i, list(pos), h]
    else:
        l, p = cell
        a, b = src[f"blocks.{l}.{site}"][i, p], base[f"blocks.{l}.{site}"][i, p]
    return torch.equal(a, b)


class PatchingSweep(Analysis):
    """Activation patching over (site, layer, position) and over heads, batched; heatmaps; a patch spec."""

    name = "probes.patching"
    title = "Activation-patching sweep"
    in_scan = False  # hundreds of forwards (patching) / L backward passes (GradDrop): run on request
    figures = (_static.patching_sweep, _interactive.patching_sweep)

    @torch.no_grad()
    def run(self, model: interp.Model, inputs=None, *, corrupted: str | Sequence[str] | None = None,
            answers=None, foils=None, metric: str = "logit_diff", sites: Sequence[str] = SITES,
            layers: Sequence[int] | None = None, direction: str = "denoise", head_positions: str = "all",
            batch_size: int = 32) -> Finding:
        """Patch every cell of ``sites`` (``layers``: a subset) and score it; ``inputs`` are the clean prompts
        (or (clean, corrupted) pairs), ``answers``/``foils`` the tokens of the logit difference (default: each
        prompt's own top-1 on the clean / corrupted prompt)."""
        _check_metric(metric)
        if inputs is None:
            inputs, corrupted, d_ans, d_foil = default_pairs()
            answers = d_ans if answers is None else answers
            foils = d_foil if foils is None else foils
        if direction not in ("denoise", "noise"):
            raise interp.InterpError(f"direction={direction!r}: use 'denoise' (clean into corrupted) or 'noise'")
        if head_positions not in ("all", "each"):
            raise interp.InterpError(f"head_positions={head_positions!r}: use 'all' or 'each'")
        sites = [sites] if isinstance(sites, str) else list(sites)
        bad = [s for s in sites if s not in SITES]
        if bad or not sites:
            raise interp.InterpError(f"unknown site(s) {bad}: sweep sites are {SITES}")
        if batch_size < 1:
            raise interp.InterpError(f"batch_size={batch_size}: give a positive number of cells per forward")
        clean, corr = encode_pairs(model, inputs, corrupted)
        n, T = len(clean), clean.lengths[0]
        L, H = model.n_layers, model.n_heads
        if layers is not None and any(not isinstance(l, int) or not -L <= l < L for l in layers):
            raise interp.InterpError(f"layers={list(layers)} out of range: the model has {L} layers (0..{L - 1})")
        layers = list(range(L)) if layers is None else sorted({l % L for l in layers})
        base, source = (corr, clean) if direction == "denoise" else (clean, corr)
        names = [f"blocks.{l}.{s}" for l in layers for s in
                 (["attn.z"] if "heads" in sites else []) + [s for s in sites if s != "heads"]]
        tr_c = interp.capture(model, clean, sites=names + ["logits"])
        tr_r = interp.capture(model, corr, sites=names + ["logits"])
        tr_base, tr_src = (tr_r, tr_c) if direction == "denoise" else (tr_c, tr_r)
        pos = torch.tensor(answer_positions(clean))
        if pos.tolist() != answer_positions(corr):
            raise interp.InterpError("clean and corrupted prompts have their answer at different positions")
        rows = torch.arange(n)
        lc, lr = tr_c["logits"][rows, pos], tr_r["logits"][rows, pos]
        ans = token_ids(model, answers, n)
        ans = torch.tensor(ans if ans is not None else lc.argmax(-1).tolist())
        fl = token_ids(model, foils, n)
        fl = torch.tensor(fl if fl is not None else lr.argmax(-1).tolist()) if metric == "logit_diff" else None
        if fl is not None and bool((fl == ans).any()):
            raise interp.InterpError("a foil equals its answer (the corrupted prompt's top-1 is the clean answer?): "
                                     "the logit difference cannot move; pass foils= or use metric='kl'")
        l_base, l_src = (lr, lc) if direction == "denoise" else (lc, lr)
        ref = l_src.double().log_softmax(-1)
        m_base = metric_of(l_base, metric, ans, fl, ref)
        m_src = metric_of(l_src, metric, ans, fl, ref)
        if bool(((m_src - m_base).abs() < 1e-9).any()):
            raise interp.InterpError("for some pair the metric is the same on both prompts: nothing to restore "
                                     "(check the answers/foils, or that the prompts differ)")
        arrays, tables = {}, []
        for site in sites:
            if site == "heads":
                cells = [(l, h, tuple(range(T)) if head_positions == "all" else (p,)) for l in layers for h in range(H)
                         for p in ([None] if head_positions == "all" else range(T))]
            else:
                cells = [(l, p) for l in layers for p in range(T)]
            raw = m_base[:, None].repeat(1, len(cells))  # [n, cells]; a cell whose source equals the base is a no-op
            for i in range(n):
                todo = [j for j, c in enumerate(cells) if not _same(tr_src, tr_base, i, site, c)]
                if todo:
                    raw[i, todo] = patched_metrics(
                        model, base, i, tr_src, tr_base, [cells[j] for j in todo], site,
                        lambda lg, i=i: metric_of(lg, metric, ans[i].expand(len(lg)),
                                                  None if fl is None else fl[i].expand(len(lg)),
                                                  ref[i:i + 1].expand(len(lg), -1)), batch_size)
            score = (raw - m_base[:, None]) / (m_src - m_base)[:, None]
            if site == "heads":
                shape = (len(layers), H) if head_positions == "all" else (len(layers), H, T)
                df = pd.DataFrame({"site": site, "layer": [c[0] for c in cells], "head": [c[1] for c in cells],
                                   "position": [-1 if head_positions == "all" else c[2][0] for c in cells]})
            else:
                shape = (len(layers), T)
                df = pd.DataFrame({"site": site, "layer": [c[0] for c in cells], "head": -1,
                                   "position": [c[1] for c in cells]})
            df["score"] = score.mean(0).numpy()
            df["delta"] = (raw - m_base[:, None]).mean(0).numpy()
            tables.append(df)
            full = torch.full((L,) + shape[1:], float("nan"))
            full[layers] = score.mean(0).reshape(shape).float()
            arrays[site] = full
            arrays[f"metric.{site}"] = raw.float()  # [n, cells]: the patched metric itself, per pair
        table = pd.concat(tables, ignore_index=True)
        best = table.loc[table.score.abs().idxmax()]
        dec = model.tokenizer.decode if model.tokenizer is not None else str
        metrics = {"n_pairs": n, "n_tokens": T, "metric": metric, "direction": direction,
                   "metric_base": float(m_base.mean()), "metric_source": float(m_src.mean()),
                   "answers": [dec([int(a)]) for a in ans], "foils": None if fl is None else [dec([int(f)]) for f in fl],
                   "top_site": str(best.site), "top_layer": int(best.layer), "top_head": int(best["head"]),
                   "top_position": int(best.position), "top_score": float(best.score),
                   "n_cells": int(len(table))}
        panels = [[s, "head" if s == "heads" else "position", f"{s}: {metric} restored" if direction == "denoise"
                   else f"{s}: {metric} destroyed"] for s in sites]
        params = {"metric": metric, "direction": direction, "sites": sites, "layers": layers,
                  "head_positions": head_positions, "clean_ids": clean.input_ids[:, :T].tolist(),
                  "corrupted_ids": corr.input_ids[:, :T].tolist(), "tokens": clean.tokens[0][:T],
                  "answers": ans.tolist(), "foils": None if fl is None else fl.tolist(), "panels": panels,
                  "figure_title": "Activation patching"}
        return Finding(self.name, table, params, model.identity(), digest([params["clean_ids"], params["corrupted_ids"]]),
                       metrics, arrays, [f"score = (m_patched − m_base) / (m_source − m_base); {direction}: "
                                         f"{'clean into corrupted' if direction == 'denoise' else 'corrupted into clean'}"])

    def to_spec(self, finding: Finding, model: interp.Model, *, k: int = 1, pair: int = 0,
                sites: Sequence[str] | None = None) -> interp.Spec:
        """A ``patch`` spec of the k highest-scoring cells of ``sites`` (default: every swept site) with the source
        prompt's activations (pair ``pair``) in the sidecar; it replays on the base prompt (any prompt of that
        length). A residual cell (resid_pre / attn.out / mlp.out) patches its position; a head cell patches that
        head's z only (``patch`` at ``attn.z`` with ``heads``), at every position or at its own one."""
        t = finding.table
        want = list(sites or SITES)
        bad = [s for s in want if s not in SITES]
        if bad:
            raise interp.InterpError(f"sites={bad}: sweep sites are {SITES}")
        t = t[t.site.isin(want)]
        if t.empty:
            raise interp.InterpError(f"no cells of {want} in this finding (it swept {sorted(set(finding.table.site))})")
        p = finding.params
        if not 0 <= pair < len(p["clean_ids"]):
            raise interp.InterpError(f"pair={pair}: the finding has {len(p['clean_ids'])} pairs")
        if not isinstance(k, int) or k < 1:
            raise interp.InterpError(f"k={k!r}: give the number of cells to export (≥ 1)")
        top = t.sort_values("score", ascending=False).head(k)
        src_ids = p["clean_ids" if p["direction"] == "denoise" else "corrupted_ids"][pair]
        names = sorted({f"blocks.{int(r.layer)}.{'attn.z' if r.site == 'heads' else r.site}" for r in top.itertuples()})
        tr = interp.capture(model, {"input_ids": torch.tensor([src_ids])}, sites=names)
        edits, tensors = [], {}
        for (site, l), g in top.groupby(["site", "layer"]):
            if site == "heads":
                name = f"z_{int(l)}"
                tensors[name] = tr[f"blocks.{int(l)}.attn.z"]
                for pos, gh in g.groupby("position"):  # position -1: the head at every position
                    edits.append(interp.ops.patch_site([int(l)], "attn.z", name, heads=sorted(int(h) for h in gh["head"]),
                                                       positions="all" if int(pos) < 0 else [int(pos)]))
                continue
            name = f"{site.replace('.', '_')}_{int(l)}"
            tensors[name] = tr[f"blocks.{int(l)}.{site}"]
            edits.append({"op": "patch", "site": site, "layers": [int(l)],
                          "positions": sorted(int(x) for x in g.position), "tensor": name})
        return interp.Spec.for_model(model, edits, analysis=self.name, prompts=finding.prompts, tensors=tensors,
                                     params={"k": k, "pair": pair, "direction": p["direction"], "metric": p["metric"],
                                             "sites": want})

    def explain(self, finding: Finding) -> str:
        m = finding.metrics
        where = (f"head {m['top_head']} of layer {m['top_layer']}" if m["top_site"] == "heads" else
                 f"{m['top_site']} of layer {m['top_layer']} at position {m['top_position']}")
        verb = "restores" if m["direction"] == "denoise" else "removes"
        return (f"Patching {where} {verb} {m['top_score'] * 100:.0f} % of the {m['metric'].replace('_', ' ')} gap "
                f"({m['metric_base']:.2f} on the base prompt vs {m['metric_source']:.2f} on the source), the "
                f"largest of {m['n_cells']} cells over {m['n_pairs']} prompt pairs.")


patching = PatchingSweep()
