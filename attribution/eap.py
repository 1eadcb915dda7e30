"""Edge attribution patching (EAP; Aaquib Syed, Can Rager & Arthur Conmy, "Attribution Patching Outperforms
Automated Circuit Discovery", BlackboxNLP 2024, arXiv 2310.10348), with an exact faithfulness curve.
docs/methods.md §18.

The residual stream of a pre-norm transformer is a sum of the outputs of upstream nodes u: the embedding, each
attention head (l, h) (its output z_{l,h} W_O^{l,h}) and each MLP l. Each downstream node d reads the residual
stream at its own input: a head (l, h) (the input of layer l's attention norm, as seen by that head only), an MLP l
(the input of its norm) and the logits (the input of the final norm). An edge u → d exists where u is computed
before d reads. With M the logit difference answer − foil at the answer position on the clean prompt, EAP scores
every edge at once, from a clean forward with one backward and a corrupted forward:

    s(u → d) = Σ_t (a_u^corr[t] − a_u^clean[t]) · ∂M/∂x_d[t] |_clean

x_d being d's own copy of the residual input (the gradient that reaches the stream through d only): for the logits
∂M/∂x_final, for an MLP the VJP of its branch (∂mlp.out/∂x_mid)ᵀ ∂M/∂mlp.out, for a head (l, h) the VJP of that
head's z alone, (∂z_{l,h}/∂x_l)ᵀ ∂M/∂z_{l,h} (one small backward per head through one attention layer).
s estimates M(clean with the edge corrupted) − M(clean). Scores are averaged over the prompt pairs.

A circuit is the k edges of largest |s|. It is evaluated exactly: each downstream node d reads

    x_d = x_d^run − Σ_{u → d ∉ circuit} (a_u^run − ã_u)

(a_u^run: u's output in this very run, ã_u: its ablated value: its mean at that position over a reference set,
``ablation="mean"`` (default: the clean and corrupted prompts), or its value on the corrupted prompt,
``"corrupted"``), so a missing edge carries ã_u instead
of a_u and nothing else changes; each head of a layer gets its own input (the layer's attention is rerun once per
head with that head's input). The full graph gives the clean metric exactly; the empty graph gives every
downstream node the ablated values only, the same as ablating every node. The faithfulness curve is

    F(k) = (M(top-k edges) − M(∅)) / (M(clean) − M(∅))     (1 for the full graph, 0 for the empty one)

``to_spec`` exports the circuit as a spec that keeps only it (default ``level="edges"``): one ``circuit.edges``
edit (interp.edges, the mechanism the curve above is computed with), which feeds every downstream node
x_d^run − Σ_{u→d ∉ circuit} (a_u^run − ã_u) with ã from its sidecar: each node's mean output per position over the
reference prompts, positions past them taking its mean over every reference token. Replayed on the clean prompts it
gives F(k) exactly. ``level="nodes"`` keeps the heads and MLPs that the circuit's edges touch instead: every other
head is mean-ablated (``attn.head_ablate`` mode "mean") and every other MLP's output replaced by its mean (``patch``
at ``mlp.out``), the embedding kept, means over every token of the reference prompts (not per position).
Pre-norm models whose blocks add their sublayer outputs to the stream (Llama-like, GPT-2); not Gemma (sublayer
outputs are normalised before the add) and not masked-diffusion models.
"""
from __future__ import annotations

from typing import Sequence

import pandas as pd
import torch

import interp
from interp.analysis import Analysis
from interp.edges import EdgeGraph
from interp.finding import Finding, digest
from probes.dla import answer_positions, token_ids
from probes.patching import default_pairs, encode_pairs, metric_of


# ------------------------------------------------------------------------------------------ graph layout
Graph = EdgeGraph  # node indices and edges (interp.edges): the op circuit.edges uses the same layout


def _check_model(model: interp.Model) -> None:
    ad = model.adapter
    if not ad.causal:
        raise interp.InterpError(f"{model.name} is a masked-diffusion model: EAP is built for a causal LM's logit "
                                 "difference; use a causal LM")
    if ad.family == "gemma" or not ad.attn_norm or any(n is None for n in ad.attn_norm + ad.mlp_norm):
        raise interp.InterpError(f"{model.name} ({ad.family}): EAP needs pre-norm blocks that add their attention and "
                                 "MLP outputs to the residual stream unnormalised (Llama-like, GPT-2); this one "
                                 "normalises its sublayer outputs (Gemma) or has no per-block norms in its adapter")


def _cat(v) -> torch.Tensor:
    return torch.cat(v, 1) if isinstance(v, list) else v


@torch.no_grad()
def node_outputs(model: interp.Model, batch, T: int) -> torch.Tensor:
    """Every upstream node's output [n, U, T, d] on ``batch`` (float64): embed, each head's z W_O, each MLP."""
    L, H = model.n_layers, model.n_heads
    sites = ["blocks.0.resid_pre"] + [f"blocks.{l}.{k}" for l in range(L) for k in ("attn.z", "mlp.out")]
    tr = interp.capture(model, batch, sites=sites)
    outs = [tr["blocks.0.resid_pre"][:, :T].double()[:, None]]
    for l in range(L):
        WO, _ = model.adapter.out_proj(l)
        outs.append(torch.einsum("nthe,hed->nhtd", tr[f"blocks.{l}.attn.z"][:, :T].double(), WO.double()))
        outs.append(tr[f"blocks.{l}.mlp.out"][:, :T].double()[:, None])
    return torch.cat(outs, 1)


def _check_additive(model: interp.Model, batch, T: int) -> None:
    tr = interp.capture(model, batch, sites=["blocks.0.resid_pre", "blocks.0.attn.out", "blocks.0.mlp.out",
                                             "blocks.0.resid_post"])
    got = tr["blocks.0.resid_pre"] + tr["blocks.0.attn.out"] + tr["blocks.0.mlp.out"]
    if not torch.allclose(got[:, :T], tr["blocks.0.resid_post"][:, :T], atol=1e-4, rtol=1e-4):
        raise interp.InterpError(f"{model.name}: resid_pre + attn.out + mlp.out is not resid_post; EAP needs blocks "
                                 "that add their sublayer outputs to the residual stream")


def edge_scores(model: interp.Model, clean, corr, ans: torch.Tensor, fl: torch.Tensor, pos: torch.Tensor,
                T: int, g: Graph) -> tuple[torch.Tensor, torch.Tensor]:
    """EAP scores [U, D] (mean over pairs; 0 where there is no edge) and the clean metric per pair."""
    L, H = model.n_layers, model.n_heads
    sites = ([f"blocks.{l}.{k}" for l in range(L) for k in ("resid_pre", "attn.z", "attn.out", "mlp.out")]
             + [f"blocks.{L - 1}.resid_post"])
    with torch.enable_grad():
        tr = interp.capture(model, clean, sites=sites, grad=True)
        rows = torch.arange(len(ans))
        m = metric_of(tr.output.logits[rows, pos], "logit_diff", ans, fl)
        m.sum().backward(retain_graph=True)
        n = len(ans)
        G = torch.zeros(n, len(g.down), T, model.d_model, dtype=torch.float64)
        G[:, g.logits_down] = tr.grad(f"blocks.{L - 1}.resid_post")[:, :T].double()
        for l in range(L):
            mo, ao = tr._values[f"blocks.{l}.mlp.out"], tr._values[f"blocks.{l}.attn.out"]
            mo, ao = (mo[0], ao[0]) if isinstance(mo, list) else (mo, ao)
            (gm,) = torch.autograd.grad(mo, ao, grad_outputs=mo.grad, retain_graph=True)
            G[:, g.mlp_down(l)] = gm[:, :T].double()
            zs = tr._values[f"blocks.{l}.attn.z"]
            zs = zs if isinstance(zs, list) else [zs]
            x = tr._values[f"blocks.{l}.resid_pre"]
            x = x[0] if isinstance(x, list) else x
            for h in range(H):
                outs = []
                for z in zs:
                    mask = torch.zeros_like(z)
                    mask[:, :, h] = 1
                    outs.append(z.grad * mask)
                (gh,) = torch.autograd.grad(zs, x, grad_outputs=outs, retain_graph=True)
                G[:, g.head_down(l, h)] = gh[:, :T].double()
        m = m.detach()
        del tr
    dA = node_outputs(model, corr, T) - node_outputs(model, clean, T)  # [n, U, T, d]
    S = torch.einsum("nutd,nvtd->uv", dA, G) / len(ans)
    return torch.where(g.valid, S, torch.zeros_like(S)), m


# ------------------------------------------------------------------------------------------ exact evaluation
def edge_spec(model: interp.Model, keep: torch.Tensor, ablated: torch.Tensor, g: Graph, *,
              analysis: str = "attribution.eap", params: dict | None = None, prompts: str = "") -> interp.Spec:
    """The spec that keeps only the edges ``keep`` [U, D] (bool): one ``circuit.edges`` edit, every downstream node
    reading x_d^run − Σ_{u→d missing} (a_u^run − ã_u) with ã = ``ablated`` ([1|n, U, P, d]; a single row is stored
    as [U, P, d] and replays on any prompt, later positions taking row P − 1)."""
    keep = keep.bool() & g.valid
    pairs = "all" if bool((keep == g.valid).all()) else g.pairs(keep)
    tensor = ablated[0] if ablated.shape[0] == 1 else ablated
    return interp.Spec.for_model(model, [interp.ops.circuit_edges(pairs, tensor.float())], analysis=analysis,
                                 params=params, prompts=prompts)


@torch.no_grad()
def circuit_metric(model: interp.Model, batch, keep: torch.Tensor, ablated: torch.Tensor, g: Graph, T: int,
                   pos: torch.Tensor, ans: torch.Tensor, fl: torch.Tensor) -> torch.Tensor:
    """The metric per pair with only the edges ``keep`` [U, D] (bool) carrying their run's values, every other
    edge carrying ``ablated`` (exact: one forward under the ``circuit.edges`` spec of :func:`edge_spec`, each
    head fed its own input)."""
    logits = model.logits(batch, edge_spec(model, keep, ablated, g))
    rows = torch.arange(len(ans))
    return metric_of(logits[rows, pos], "logit_diff", ans, fl)


@torch.no_grad()
def mean_outputs(model: interp.Model, reference, T: int) -> torch.Tensor:
    """ã for ``ablation="mean"``: each upstream node's output at each position t < T averaged over the reference
    prompts that reach t (Wang et al.'s per-position mean; prompts are right-aligned as encoded, so use reference
    prompts of the circuit's length); a position no reference prompt reaches takes the mean over every real
    token: [1, U, T, d]."""
    batch = model.encode(reference)
    A = node_outputs(model, batch, batch.input_ids.shape[1])  # [n, U, T', d]
    w = batch.attention_mask[:, None, :, None].double()
    pooled = (A * w).sum((0, 2)) / w.sum((0, 2)).clamp_min(1)  # [U, d]
    out = pooled[:, None].expand(-1, T, -1).clone()
    Tm = min(T, A.shape[2])
    cnt = w[:, :, :Tm].sum(0)  # [1, Tm, 1]
    per = (A[:, :, :Tm] * w[:, :, :Tm]).sum(0) / cnt.clamp_min(1)
    out[:, :Tm] = torch.where(cnt > 0, per, out[:, :Tm])
    return out[None]


def reference_means(model: interp.Model, reference) -> torch.Tensor:
    """ã for ``ablation="mean"`` as the spec stores it: :func:`mean_outputs` at every position of the reference
    prompts plus one row, the mean over every real token, which positions past them take: [1, U, T_ref + 1, d]."""
    return mean_outputs(model, reference, model.encode(reference).input_ids.shape[1] + 1)


# ------------------------------------------------------------------------------------------ the analysis
class EdgeAttributionPatching(Analysis):
    """EAP scores of every edge between components, the top-edge circuit and its exact faithfulness curve."""

    name = "attribution.eap"
    title = "Edge attribution patching (EAP) circuit"
    in_scan = False  # a backward per head plus one exact forward per point of the curve: run on request

    def run(self, model: interp.Model, inputs=None, *, corrupted=None, answers=None, foils=None,
            ablation: str = "mean", reference=None, ks: Sequence[int] | None = None,
            n_pairs: int | None = 4) -> Finding:
        """Score every edge on the clean/corrupted pairs (``inputs``: clean prompts or pairs; None: the built-in
        capital pairs, the first ``n_pairs``), then evaluate the top-k circuits exactly for each k in ``ks``
        (default: a log grid up to every edge). ``ablation``: "mean" (over ``reference``, default the clean and
        corrupted prompts) or "corrupted"."""
        _check_model(model)
        if ablation not in ("mean", "corrupted"):
            raise interp.InterpError(f"ablation={ablation!r}: use 'mean' (over a reference set) or 'corrupted'")
        if inputs is None:
            inputs, corrupted, d_ans, d_foil = default_pairs()
            k = n_pairs or len(inputs)
            inputs, corrupted, d_ans, d_foil = inputs[:k], corrupted[:k], d_ans[:k], d_foil[:k]
            answers = d_ans if answers is None else answers
            foils = d_foil if foils is None else foils
        clean, corr = encode_pairs(model, inputs, corrupted)
        n, T = len(clean), clean.lengths[0]
        _check_additive(model, clean, T)
        L, H = model.n_layers, model.n_heads
        g = Graph(L, H)
        pos = torch.tensor(answer_positions(clean))
        with torch.no_grad():
            lc = model.answer_logits(clean)
            lr = model.answer_logits(corr)
        ans = token_ids(model, answers, n)
        ans = torch.tensor(ans if ans is not None else lc.argmax(-1).tolist())
        fl = token_ids(model, foils, n)
        fl = torch.tensor(fl if fl is not None else lr.argmax(-1).tolist())
        if bool((fl == ans).any()):
            raise interp.InterpError("a foil equals its answer: the logit difference cannot move; pass foils=")
        S, m_clean = edge_scores(model, clean, corr, ans, fl, pos, T, g)
        if ablation == "mean":
            ref = reference if reference is not None else {
                "input_ids": torch.cat([clean.input_ids[:, :T], corr.input_ids[:, :T]]),
                "attention_mask": torch.cat([clean.attention_mask[:, :T], corr.attention_mask[:, :T]])}
            ablated = reference_means(model, ref)
        else:
            ablated = node_outputs(model, corr, T)
        n_edges = int(g.valid.sum())
        rank = torch.where(g.valid, S.abs(), torch.full_like(S, -1.0))  # non-edges last (scores of 0 tie)
        order = torch.argsort(rank.flatten(), descending=True, stable=True)[:n_edges]
        grid = sorted({int(k) for k in (ks if ks is not None else
                                        [0] + [int(round(n_edges ** (i / 12))) for i in range(13)]) if 0 <= k <= n_edges}
                      | {0, n_edges})
        curve = []
        for k in grid:
            keep = torch.zeros(S.numel(), dtype=torch.bool)
            keep[order[:k]] = True
            mk = circuit_metric(model, clean, keep.view_as(S), ablated, g, T, pos, ans, fl)
            curve.append(float(mk.mean()))
        m_empty, m_full = curve[0], curve[-1]
        faith = [(c - m_empty) / (m_full - m_empty) if abs(m_full - m_empty) > 1e-12 else float("nan") for c in curve]
        up, down = order // S.shape[1], order % S.shape[1]  # the table in the curve's order: head(k) is its circuit
        table = pd.DataFrame({"source": [g.up[int(u)] for u in up], "target": [g.down[int(d)] for d in down],
                              "score": S[up, down].numpy()})
        table["abs_score"] = table.score.abs()
        table["rank"] = range(len(table))
        k80 = next((k for k, f in zip(grid, faith) if f >= 0.8), None)
        metrics = {"n_pairs": n, "n_tokens": T, "n_edges": n_edges, "n_nodes": len(g.up) + len(g.down) - 1,
                   "ablation": ablation, "metric_clean": float(m_clean.mean()), "metric_empty": m_empty,
                   "metric_full": m_full, "ks": grid, "curve": curve, "faithfulness": faith,
                   "edges_for_80pct": k80, "top_edge": f"{table.source[0]} → {table.target[0]}",
                   "top_score": float(table.score[0])}
        tokens = clean.tokens[0][:T]
        params = {"ablation": ablation, "reference": "pairs" if reference is None else "given",
                  "clean_ids": clean.input_ids[:, :T].tolist(),
                  "corrupted_ids": corr.input_ids[:, :T].tolist(), "answers": ans.tolist(), "foils": fl.tolist(),
                  "tokens": tokens, "ks": grid}
        arrays = {"scores": S.float(), "valid": g.valid.float(), "ablated_mean": ablated.mean((0, 2)).float()}
        notes = ["score = Σ_t (a_u^corr − a_u^clean) · ∂M/∂x_d (first-order estimate of corrupting the edge); "
                 f"circuits evaluated exactly with missing edges carrying their {ablation} value"]
        return Finding(self.name, table, params, model.identity(),
                       digest([params["clean_ids"], params["corrupted_ids"]]), metrics, arrays, notes)

    @staticmethod
    def circuit(finding: Finding, k: int) -> dict:
        """The circuit of the top-k edges as a graph: {"nodes": [...], "edges": [(source, target, score), ...]}."""
        t = finding.table.head(int(k))
        nodes = sorted(set(t.source) | set(t.target))
        return {"nodes": nodes, "edges": [(r.source, r.target, float(r.score)) for r in t.itertuples()]}

    def to_spec(self, finding: Finding, model: interp.Model, *, k: int | None = None, level: str = "edges",
                reference=None, length: int = 128) -> interp.Spec:
        """The spec that keeps only the top-k circuit (default k: the smallest grid point with faithfulness ≥ 0.8).

        ``level="edges"`` (default): one ``circuit.edges`` edit; every downstream node (each head's input, each
        MLP's input, the logits) reads x_d = x_d^run − Σ_{u→d ∉ circuit} (a_u^run − ã_u), with the finding's own
        ã: for ``ablation="mean"`` each node's mean output per position over ``reference`` (default: the finding's
        clean and corrupted prompts), positions past the reference taking its mean over every token; for
        ``"corrupted"`` the corrupted run's outputs (the spec then replays on the finding's pairs only). Replayed
        on the clean prompts it gives the finding's curve at k exactly.

        ``level="nodes"``: heads and MLPs on a kept edge are kept, every other head is mean-ablated and every other
        MLP's output is replaced by its mean over ``reference`` (means over every token); the embedding is kept.
        ``length``: positions covered by the MLP means (the longest prompt it replays on)."""
        m = finding.metrics
        if k is None:
            k = m.get("edges_for_80pct") or m["n_edges"]
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= m["n_edges"]:
            raise interp.InterpError(f"k={k!r}: give a number of edges in 0..{m['n_edges']}")
        if level not in ("edges", "nodes"):
            raise interp.InterpError(f"level={level!r}: use 'edges' (keep the circuit's edges) or 'nodes' (keep the "
                                     "heads and MLPs its edges touch)")
        L, H = model.n_layers, model.n_heads
        fp = finding.model.get("fingerprint")
        if [L, H] != [finding.model.get("n_layers"), finding.model.get("n_heads")] or (fp and fp != model.fingerprint):
            raise interp.InterpError(f"this EAP finding was computed on {finding.model.get('name')}, not {model.name}: "
                                     "its circuit names that model's heads")
        c = self.circuit(finding, k)
        p = finding.params
        if level == "edges":
            return self._edge_spec(finding, model, k, c, reference)
        kept = set(c["nodes"])
        if reference is None:
            reference = {"input_ids": torch.tensor(p["clean_ids"] + p["corrupted_ids"])}
        edits: list = []
        heads_off = {l: [h for h in range(H) if f"a{l}.h{h}" not in kept] for l in range(L)}
        layers = [l for l in range(L) if heads_off[l]]
        if layers:
            mz = interp.ops.mean_z(model, reference, layers)
            for j, l in enumerate(layers):
                edits.append(interp.ops.head_ablate([l], heads=heads_off[l], mode="mean", tensor=mz[j]))
        mlps = [l for l in range(L) if f"m{l}" not in kept]
        if mlps:
            tr = interp.capture(model, reference, sites=[f"blocks.{l}.mlp.out" for l in mlps])
            w = tr.attention_mask.double()[:, :, None]
            for l in mlps:
                mu = (tr[f"blocks.{l}.mlp.out"].double() * w).sum((0, 1)) / w.sum()
                edits.append(interp.ops.patch_site([l], "mlp.out", mu.float()[None, None].expand(1, length, -1).clone()))
        return interp.Spec.for_model(model, edits, analysis=self.name, prompts=finding.prompts,
                                     params={"k": k, "level": "nodes",
                                             "keeps": "nodes: heads and MLPs on a kept edge, the embedding; "
                                             "other heads mean-ablated, other MLP outputs replaced by their mean",
                                             "n_heads_kept": sum(H - len(v) for v in heads_off.values()),
                                             "n_mlps_kept": L - len(mlps)})

    def _edge_spec(self, finding: Finding, model: interp.Model, k: int, c: dict, reference) -> interp.Spec:
        p, m = finding.params, finding.metrics
        g = Graph(model.n_layers, model.n_heads)
        keep = torch.zeros_like(g.valid)
        for src, dst, _ in c["edges"]:
            keep[g.up_index[src], g.down_index[dst]] = True
        if p["ablation"] == "mean":
            if reference is None:
                if p.get("reference", "pairs") != "pairs":
                    raise interp.InterpError("this finding's means came from a reference= set: pass the same "
                                             "reference= to to_spec")
                reference = {"input_ids": torch.tensor(p["clean_ids"] + p["corrupted_ids"])}
            ablated = reference_means(model, reference)
            how = "each node's mean output per position over the reference prompts (later positions: its mean over every token)"
        else:
            if reference is not None:
                raise interp.InterpError("ablation='corrupted': the ablated values are the corrupted run's; "
                                         "reference= applies to mean ablation")
            ids = torch.tensor(p["corrupted_ids"])
            ablated = node_outputs(model, model.encode({"input_ids": ids}), ids.shape[1])
            how = "each node's output on the corrupted prompts (replays on the finding's pairs)"
        faith = dict(zip(m["ks"], m["faithfulness"]))
        params = {"k": k, "level": "edges", "n_edges": m["n_edges"],
                  "keeps": "edges: each head's, MLP's and the logits' input keeps the circuit's sources; every "
                           f"other source's output is replaced by its ablated value ({how})",
                  "ablation": p["ablation"], "metric": "logit_diff",
                  "faithfulness": faith.get(k)}
        return edge_spec(model, keep, ablated, g, analysis=self.name, params=params, prompts=finding.prompts)

    def explain(self, finding: Finding) -> str:
        m = finding.metrics
        k80 = m.get("edges_for_80pct")
        where = (f"the top {k80} of {m['n_edges']} edges recover ≥ 80 % of the logit difference"
                 if k80 is not None else f"no evaluated circuit below all {m['n_edges']} edges recovers 80 %")
        return (f"By edge attribution patching, {where} (clean {m['metric_clean']:.2f}, every edge {m['ablation']}-"
                f"ablated {m['metric_empty']:.2f}); the strongest edge is {m['top_edge']} ({m['top_score']:+.2f}).")


eap = EdgeAttributionPatching()
