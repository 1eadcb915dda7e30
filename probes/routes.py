"""Information-flow routes: the part of one forward pass that carries information to a prediction
(Javier Ferrando & Elena Voita, "Information Flow Routes: Automatically Interpreting Language Models at
Scale", EMNLP 2024, arXiv 2403.00824; the proximity is ALTI's: Ferrando, Gállego & Costa-jussà, "Measuring the
Mixing of Contextual Information in the Transformer", EMNLP 2022). docs/methods.md §14.

In a pre-norm transformer every residual update of position i in layer l is a sum of parts:

    m_i^l = x_i^{l-1} + Σ_h Σ_j A^{l,h}[i, j] · v_j^{l,h} W_O^{l,h} + b_O^l      (attention; v = value of token j)
    x_i^l = m_i^l + MLP(m_i^l)                                                   (MLP)

x^{-1} is the embedding (``blocks.0.resid_pre``). The importance of a part c of a sum y is its L1 proximity,
normalised over the parts of the same sum (the attention bias is a part too, though not an edge):

    prox(c, y) = max(‖y‖₁ − ‖y − c‖₁, 0),      imp(c, y) = prox(c, y) / Σ_{c'} prox(c', y)

An edge is (layer, head h, token j → token i) for a head part, ("resid", i → i) for the residual part of
either sum, ("mlp", i → i) for the MLP part. Routes are built top-down from one position (default: the last)
after the last layer: keep every part of its sums with importance > τ (default 0.04) and recurse into the
positions those parts come from, down to the embeddings. With ``combine_heads=True`` the token edge j → i of
a layer is the sum of its per-head importances (the paper's token graph); by default each head is an edge.

Everything comes from ONE forward pass: the patterns, the value vectors (a hook on the value projection),
``attn.z`` (checked against Σ_j A v_j), ``attn.out`` (checked against Σ_h z_h W_O^h + b_O), ``mlp.out`` and the
residual stream (checked: x^{l-1} + attn.out + mlp.out = x^l). Models whose sublayer outputs are normalised
before the residual add (Gemma) fail that check and are refused.

Masked-diffusion models (LLaDA-style) decode in steps, each a full bidirectional forward over [prompt; partially
masked answer]: ``probes.routes_steps`` decodes (``interp.diffusion.denoise``), rebuilds the input each step saw
(the positions committed at that step or later still masked) and builds one route graph per step, into the
position that step commits (or a given offset into the answer region); a key j may follow its query i.

``to_spec`` turns a route into an ``attn.knockout`` spec: ``mode="cut"`` blocks the route's head edges
(each query → key in that head and layer; the rest of the row is renormalised, as knockout does; where the
route uses every key of a row, the head's output at that query is zeroed instead, ``attn.head_ablate``, since
a row with every key blocked would renormalise to a uniform one); ``mode="keep"`` blocks, at each layer and
each position the route passes through, the keys that no route edge uses (all heads; a position whose route is
purely residual there is left alone, since blocking every key would leave a uniform pattern, not no attention).
"""
from __future__ import annotations

from typing import Any

import pandas as pd
import torch
from torch import nn

import interp
from interp import vlm
from interp.analysis import Analysis
from interp.finding import Finding, digest
from interp.prompts import facts
from probes.dla import _check
from viz import interactive as _interactive
from viz import static as _static

_MAX_PATTERN = 4_000_000  # attention weights kept in the finding (L·H·T² values) for the explorer page


def prox_importance(y: torch.Tensor, parts: torch.Tensor) -> torch.Tensor:
    """imp(c, y) for parts [..., n, d] of sums y [..., d] (L1 proximity, normalised over the n parts)."""
    prox = (y.abs().sum(-1, keepdim=True) - (y.unsqueeze(-2) - parts).abs().sum(-1)).clamp_min(0)
    return prox / prox.sum(-1, keepdim=True).clamp_min(1e-30)


def _value_module(model: interp.Model, layer: int) -> tuple[nn.Module, Any]:
    """(module, how to read the values from its output) for ``layer``'s value projection."""
    attn = model.adapter.attn[layer]
    if isinstance(getattr(attn, "v_proj", None), nn.Module):
        return attn.v_proj, lambda out: out
    c_attn = getattr(attn, "c_attn", None)
    if c_attn is not None and getattr(attn, "split_size", None):
        return c_attn, lambda out: out[..., 2 * attn.split_size:]
    raise interp.InterpError(f"{model.name}: no v_proj/c_attn value projection in layer {layer}'s attention "
                             f"({type(attn).__name__}); routes need each token's value vector")


def _batch(model: interp.Model, inputs: Any) -> interp.Batch:
    if inputs is None:
        if "vision" in interp.analysis.traits(model):
            from interp.testbed.items import default_items
            return vlm.encode_vqa(model, default_items(model)[:1])
        inputs = facts()[0]["prompt"]
    if isinstance(inputs, vlm.VQAItem) or (isinstance(inputs, (list, tuple)) and inputs
                                           and all(isinstance(x, vlm.VQAItem) for x in inputs)):
        return vlm.encode_vqa(model, [inputs] if isinstance(inputs, vlm.VQAItem) else list(inputs))
    return model.encode(inputs)


@torch.no_grad()
def contributions(model: interp.Model, batch: interp.Batch) -> dict[str, torch.Tensor]:
    """The importance of every part of every residual update of row 0 (float64):
    ``head`` [L, T(i), H, T(j)], ``attn_resid`` [L, T], ``attn_bias`` [L, T] (zeros without a bias),
    ``mlp`` [L, T], ``mlp_resid`` [L, T], the attention ``pattern`` [L, H, T, T]; ``parts_error``: the largest
    relative error of the decomposition."""
    L, H, hd = model.n_layers, model.n_heads, model.head_dim
    T = int(batch.lengths[0])
    sites = ["blocks.0.resid_pre"] + [f"blocks.{l}.{k}" for l in range(L)
                                       for k in ("attn.pattern", "attn.z", "attn.out", "mlp.out", "resid_post")]
    vals: dict[int, torch.Tensor] = {}
    handles = []
    try:
        for l in range(L):
            mod, read = _value_module(model, l)

            def keep(m, args, out, l=l, read=read):
                vals[l] = read(out).detach()[0, :T]
            handles.append(mod.register_forward_hook(keep))
        tr = interp.capture(model, batch, sites=sites)
    finally:
        for h in handles:
            h.remove()
    at = lambda name: tr[name][0, :T].double()  # noqa: E731
    x = at("blocks.0.resid_pre")
    imp_head = torch.zeros(L, T, H, T, dtype=torch.float64)
    pattern = torch.zeros(L, H, T, T)
    out = {k: torch.zeros(L, T, dtype=torch.float64) for k in ("attn_resid", "attn_bias", "mlp", "mlp_resid")}
    worst = 0.0
    for l in range(L):
        A = tr[f"blocks.{l}.attn.pattern"][0, :, :T, :T].double()  # [H, i, j]
        pattern[l] = A.float()
        v = vals[l].double()
        n_kv = v.shape[-1] // hd
        if n_kv * hd != v.shape[-1] or H % n_kv:
            raise interp.InterpError(f"{model.name}: layer {l}'s values have width {v.shape[-1]}, not a multiple of "
                                     f"head_dim {hd} dividing {H} heads")
        v = v.reshape(T, n_kv, hd).repeat_interleave(H // n_kv, dim=1)  # [j, H, hd]
        z = at(f"blocks.{l}.attn.z")  # [i, H, hd]
        _check(torch.einsum("hij,jhd->ihd", A, v), z, f"layer {l}: Σ_j A[i,j]·v_j is not the head output z (values "
               "transformed after the projection are not supported)")
        WO, bO = model.adapter.out_proj(l)
        u = torch.einsum("jhd,hdm->hjm", v, WO.double())  # [H, j, d]: v_j W_O^h
        bias = bO.double() if bO is not None else torch.zeros(u.shape[-1], dtype=torch.float64)
        attn_out = at(f"blocks.{l}.attn.out")
        mid = x + attn_out
        for i in range(T):
            heads = A[:, i, :, None] * u  # [H, j, d]
            parts = torch.cat([x[i][None], bias[None], heads.reshape(H * T, -1)])
            worst = max(worst, float((parts.sum(0) - mid[i]).abs().max() / mid[i].abs().max().clamp_min(1)))
            imp = prox_importance(mid[i], parts)
            out["attn_resid"][l, i], out["attn_bias"][l, i] = imp[0], imp[1]
            imp_head[l, i] = imp[2:].reshape(H, T)
        mlp = at(f"blocks.{l}.mlp.out")
        post = at(f"blocks.{l}.resid_post")
        _check(mid + mlp, post, f"layer {l}: resid_pre + attn.out + mlp.out is not resid_post: this architecture "
               "normalises sublayer outputs before the residual add (e.g. Gemma), which routes do not split")
        imp = prox_importance(post, torch.stack([mid, mlp], 1))
        out["mlp_resid"][l], out["mlp"][l] = imp[:, 0], imp[:, 1]
        x = post
    if worst > 1e-4:
        raise interp.InterpError(f"the attention parts do not sum to the mid-block residual (relative error "
                                 f"{worst:.3g})")
    return {"head": imp_head, **out, "pattern": pattern, "parts_error": torch.tensor(worst)}


def trace_routes(imp: dict[str, torch.Tensor], start: int, tau: float, combine_heads: bool = False) -> list[dict]:
    """The edges of the route into position ``start`` after the last layer (module docstring), top-down."""
    L, T, H, _ = imp["head"].shape
    rows: list[dict] = []
    post = {start}
    for l in range(L - 1, -1, -1):
        mid: set[int] = set()
        for i in sorted(post):
            for kind, key in (("resid", "mlp_resid"), ("mlp", "mlp")):
                w = float(imp[key][l, i])
                if w > tau:
                    rows.append(dict(layer=l, stage="mlp", kind=kind, head=-1, source=i, target=i, importance=w))
                    mid.add(i)
        pre: set[int] = set()
        for i in sorted(mid):
            w = float(imp["attn_resid"][l, i])
            if w > tau:
                rows.append(dict(layer=l, stage="attn", kind="resid", head=-1, source=i, target=i, importance=w))
                pre.add(i)
            hi = imp["head"][l, i]  # [H, j]
            if combine_heads:
                for j in (hi.sum(0) > tau).nonzero().flatten().tolist():
                    rows.append(dict(layer=l, stage="attn", kind="attn", head=-1, source=j, target=i,
                                     importance=float(hi[:, j].sum())))
                    pre.add(j)
            else:
                for h, j in (hi > tau).nonzero().tolist():
                    rows.append(dict(layer=l, stage="attn", kind="head", head=h, source=j, target=i,
                                     importance=float(hi[h, j])))
                    pre.add(j)
        post = pre
    return rows


class Routes(Analysis):
    """The information-flow route into one prediction, from a single forward pass."""

    name = "probes.routes"
    title = "Information-flow routes"
    requires = ("causal",)
    in_scan = True
    figures = (getattr(_static, "routes", None), getattr(_interactive, "routes", None))

    def run(self, model: interp.Model, inputs: Any = None, *, tau: float = 0.04, position: int | None = None,
            combine_heads: bool = False) -> Finding:
        """Routes into ``position`` (default: the last real token) of ONE input (a prompt, token ids, a Batch or a
        VQAItem for a vision-language model; None: the first built-in fact, or the testbed's first item)."""
        if not model.adapter.causal:
            raise interp.InterpError(f"{model.name} is a masked-diffusion model: probes.routes traces one causal "
                                     "forward pass; for routes per denoising step use probes.routes_steps "
                                     "(probes.routes.routes_steps)")
        if not 0 <= float(tau) < 1:
            raise interp.InterpError(f"tau={tau!r}: the importance threshold must be in [0, 1)")
        batch = _batch(model, inputs)
        if len(batch) != 1:
            raise interp.InterpError(f"routes trace one input at a time, got {len(batch)}: run once per prompt")
        T = int(batch.lengths[0])
        start = T - 1 if position is None else int(position)
        if not 0 <= start < T:
            raise interp.InterpError(f"position={position}: out of range for a {T}-token input (0..{T - 1})")
        imp = contributions(model, batch)
        rows = trace_routes(imp, start, float(tau), combine_heads)
        toks = list(batch.tokens[0][:T])
        table = pd.DataFrame(rows, columns=["layer", "stage", "kind", "head", "source", "target", "importance"])
        table["source_token"] = [toks[j] for j in table.source]
        table["target_token"] = [toks[i] for i in table.target]
        L = model.n_layers
        attn = table[table.kind.isin(["head", "attn"])]
        cross = attn[attn.source != attn.target]
        metrics: dict[str, Any] = {
            "n_tokens": T, "position": start, "tau": float(tau), "n_edges": int(len(table)),
            "n_head_edges": int(len(attn)), "n_cross_token_edges": int(len(cross)),
            "tokens_reached": int(len(set(table.source) | {start})),
            "parts_error": float(imp["parts_error"]),
            "cross_token_by_layer": [round(float(cross[cross.layer == l].importance.sum()), 4) for l in range(L)],
        }
        if not cross.empty:
            top = cross.loc[cross.importance.idxmax()]
            metrics["top_edge"] = {"layer": int(top.layer), "head": int(top["head"]), "source": int(top.source),
                                   "target": int(top.target), "importance": round(float(top.importance), 4)}
        img = batch.roles[0].get("image") or []
        if img:
            s = set(img)
            from_img = attn[attn.source.isin(s) & ~attn.target.isin(s)]
            metrics["image_to_text_by_layer"] = [round(float(from_img[from_img.layer == l].importance.sum()), 4)
                                                 for l in range(L)]
            metrics["n_image_tokens"] = len(img)
        arrays = {k: imp[k].float() for k in ("head", "attn_resid", "attn_bias", "mlp", "mlp_resid")}
        notes = ["L1 proximity (ALTI) normalised over the parts of each sum; kept parts are not renormalised"]
        if imp["pattern"].numel() <= _MAX_PATTERN:  # for the explorer page (viz.explorer)
            arrays["pattern"] = imp["pattern"]
        else:
            notes.append(f"attention patterns not kept ({imp['pattern'].numel():,} values > {_MAX_PATTERN:,})")
        params = {"tau": float(tau), "position": start, "combine_heads": combine_heads, "tokens": toks}
        return Finding(self.name, table, params, model.identity(), digest(batch.input_ids), metrics, arrays, notes)

    def to_spec(self, finding: Finding, model: interp.Model, *, mode: str = "cut") -> interp.Spec:
        """``mode="cut"``: knock out the route's attention edges (per head); ``"keep"``: knock out, at each layer
        and each position the route passes through, the keys no route edge uses (all heads)."""
        t = finding.table
        attn = t[t.kind.isin(["head", "attn"])]
        edits: list[dict] = []
        if mode == "cut":
            for (l, h, i), g in attn.groupby(["layer", "head", "target"]):
                keys, heads = sorted(map(int, set(g.source))), "all" if h < 0 else [int(h)]
                if len(keys) == int(i) + 1:  # every key: a fully blocked row would renormalise to uniform
                    edits.append(interp.ops.head_ablate([int(l)], heads=heads, queries=[int(i)]))
                else:
                    edits.append(interp.ops.knockout([int(l)], [int(i)], keys, heads=heads))
        elif mode == "keep":
            for (l, i), g in t[t.stage == "attn"].groupby(["layer", "target"]):
                used = set(map(int, g[g.kind.isin(["head", "attn"])].source))
                if not used:
                    continue
                block = [j for j in range(int(i) + 1) if j not in used]
                if block:
                    edits.append(interp.ops.knockout([int(l)], [int(i)], block))
        else:
            raise interp.InterpError(f"mode={mode!r}: use 'cut' (block the route's edges) or 'keep' (block the others)")
        if not edits:
            raise interp.InterpError(f"the route has no attention edge to {mode}: lower tau")
        return interp.Spec.for_model(model, edits, analysis=self.name, prompts=finding.prompts,
                                     params={"mode": mode, "tau": finding.params.get("tau")})

    def explain(self, finding: Finding) -> str:
        m = finding.metrics
        top = m.get("top_edge")
        best = (f"; the strongest cross-token edge is token {top['source']} → {top['target']} through head "
                f"{top['head'] if top['head'] >= 0 else '(all)'} of layer {top['layer']} ({top['importance']:.2f})"
                if top else "; no attention edge from another token passes the threshold")
        return (f"The route into token {m['position']} keeps {m['n_edges']} edges above importance {m['tau']:.2f}, "
                f"reaching {m['tokens_reached']} of {m['n_tokens']} tokens{best}.")


routes = Routes()


def step_inputs(model: interp.Model, batch: interp.Batch, tokens: torch.Tensor, step_of: torch.Tensor,
                step: int) -> interp.Batch:
    """The input denoising step ``step`` saw: the final ``tokens`` [1, P + G] with every answer position committed
    at that step or later (``step_of`` [1, G]) masked again."""
    P = tokens.shape[1] - step_of.shape[1]
    x = tokens.clone()
    x[:, P:] = torch.where(step_of >= step, model.adapter.mask_token_id, x[:, P:])
    toks = [model.tokenizer.convert_ids_to_tokens(r) if model.tokenizer is not None else [str(t) for t in r]
            for r in x.tolist()]
    roles = [interp.Roles({k: v for k, v in r.items() if k not in ("answer", "query")}, length=x.shape[1])
             for r in batch.roles]
    return interp.Batch(x, torch.ones_like(x), roles, toks, [], batch.extra)


class StepRoutes(Analysis):
    """Information-flow routes of a masked-diffusion LM, one route graph per denoising step."""

    name = "probes.routes_steps"
    title = "Information-flow routes per denoising step"
    requires = ("diffusion",)
    in_scan = False  # one decoding plus one decomposition per step: run on request

    def run(self, model: interp.Model, inputs: Any = None, *, gen_len: int | None = None, steps: int | None = None,
            block_len: int | None = None, tau: float = 0.04, offset: int | None = None,
            only_steps: list[int] | None = None, combine_heads: bool = False) -> Finding:
        """Decode ONE input (a VQAItem, a prompt or ids; None: the testbed's first item) with LLaDA remasking and
        build, for each step (``only_steps``: a subset), the route into the answer position ``offset`` (default: the
        first position that step commits)."""
        from interp.diffusion import denoise
        if model.adapter.causal:
            raise interp.InterpError(f"{model.name} attends causally: use probes.routes (one forward pass)")
        if model.adapter.mask_token_id is None:
            raise interp.InterpError("routes per step need the mask token id: set model.adapter.mask_token_id")
        if not 0 <= float(tau) < 1:
            raise interp.InterpError(f"tau={tau!r}: the importance threshold must be in [0, 1)")
        if inputs is None:
            from interp.testbed.items import default_items
            inputs = default_items(model)[:1]
        items = [inputs] if isinstance(inputs, vlm.VQAItem) else inputs
        if isinstance(items, (list, tuple)) and items and all(isinstance(x, vlm.VQAItem) for x in items):
            gen_len = gen_len or items[0].gen_len
            if not gen_len:
                raise interp.InterpError("give gen_len, the length of the answer region to decode")
            full = vlm.encode_vqa(model, list(items), gen_len=gen_len)
            P = full.input_ids.shape[1] - gen_len
            batch = interp.Batch(full.input_ids[:, :P], full.attention_mask[:, :P],
                                 [interp.Roles(dict(r), length=P) for r in full.roles], [t[:P] for t in full.tokens],
                                 full.texts, full.extra)
        else:
            if not gen_len:
                raise interp.InterpError("give gen_len, the length of the answer region to decode")
            batch = model.encode(inputs)
        if len(batch) != 1:
            raise interp.InterpError(f"routes trace one input at a time, got {len(batch)}: run once per prompt")
        if offset is not None and not 0 <= int(offset) < gen_len:
            raise interp.InterpError(f"offset={offset}: give an answer position 0..{gen_len - 1}")
        steps = steps or gen_len
        d = denoise(model, batch, gen_len=gen_len, steps=steps, block_len=block_len)
        P = batch.input_ids.shape[1]
        todo = list(range(d.n_steps)) if only_steps is None else sorted({int(s) for s in only_steps})
        bad = [s for s in todo if not 0 <= s < d.n_steps]
        if bad:
            raise interp.InterpError(f"only_steps={bad}: decoding took {d.n_steps} steps (0..{d.n_steps - 1})")
        frames, per_step, arrays = [], [], {}
        for s in todo:
            b = step_inputs(model, batch, d.tokens, d.step_of, s)
            committed = (d.step_of[0] == s).nonzero().flatten().tolist()
            start = P + (int(offset) if offset is not None else (committed[0] if committed else 0))
            imp = contributions(model, b)
            rows = trace_routes(imp, start, float(tau), combine_heads)
            df = pd.DataFrame(rows, columns=["layer", "stage", "kind", "head", "source", "target", "importance"])
            df.insert(0, "step", s)
            toks = list(b.tokens[0])
            df["source_token"] = [toks[j] for j in df.source]
            df["target_token"] = [toks[i] for i in df.target]
            frames.append(df)
            attn = df[df.kind.isin(["head", "attn"])]
            cross = attn[attn.source != attn.target]
            per_step.append({"step": s, "position": start, "n_edges": int(len(df)), "n_head_edges": int(len(attn)),
                             "from_prompt": round(float(cross[cross.source < P].importance.sum()), 4),
                             "from_answer": round(float(cross[cross.source >= P].importance.sum()), 4),
                             "n_masked": int((b.input_ids[0, P:] == model.adapter.mask_token_id).sum()),
                             "parts_error": float(imp["parts_error"])})
            arrays[f"head.step{s}"] = imp["head"].float()
        table = pd.concat(frames, ignore_index=True)
        metrics = {"n_steps": d.n_steps, "steps_traced": todo, "gen_len": gen_len, "prompt_len": P, "tau": float(tau),
                   "per_step": per_step, "n_edges": int(len(table)),
                   "parts_error": max(x["parts_error"] for x in per_step)}
        params = {"tau": float(tau), "gen_len": gen_len, "steps": steps, "block_len": block_len, "offset": offset,
                  "combine_heads": combine_heads, "tokens": d.tokens[0].tolist()}
        return Finding(self.name, table, params, model.identity(), digest(batch.input_ids), metrics, arrays,
                       ["one route graph per denoising step (column step), into the position that step commits; "
                        "importances as in probes.routes (ALTI L1 proximity)"])

    def explain(self, finding: Finding) -> str:
        m = finding.metrics
        ps = m["per_step"]
        first, last = ps[0], ps[-1]
        return (f"Over {len(ps)} denoising steps the route into the committed answer token keeps {first['n_edges']} "
                f"edges at step {first['step']} ({first['n_masked']} masked answer positions) and {last['n_edges']} at "
                f"step {last['step']}; attention from the answer region carries {first['from_answer']:.2f} then "
                f"{last['from_answer']:.2f} of the cross-token importance.")


routes_steps = StepRoutes()
