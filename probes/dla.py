"""Direct logit attribution (DLA): how much each attention head, each MLP (each neuron, on request) and the
embedding write the answer's logit directly, through the final norm and the unembedding
(Elhage et al., "A Mathematical Framework for Transformer Circuits", 2021; Wang et al., "Interpretability in
the Wild", ICLR 2023, the logit-difference form).

At the answer position the last residual stream is a sum of components (pre-norm models such as Llama,
Qwen2 and GPT-2; models that normalise a sublayer's output before adding it, such as Gemma, are refused):

    h = e + Σ_l ( Σ_h z_{l,h} W_O^{l,h} + b_O^l ) + Σ_l m_l          (e = ``blocks.0.resid_pre``)

The final norm is made linear by **freezing its scale**: s = 1/rms(h) (RMSNorm) or 1/std(h) (LayerNorm)
is computed once on the full residual h and the same s is applied to every component:
norm(h) = s · g ⊙ P h + β, with P the mean-centring of LayerNorm (identity for RMSNorm). For the direction
w = W_U[target] − W_U[foil] (just W_U[target] without a foil) the effective read-out vector is
u = s · P (g ⊙ w), so component c contributes c · u and, exactly,

    logit(target) − logit(foil) = Σ_c c · u + β · w + b_U[target] − b_U[foil]

(the last two are the "bias" row). A neuron n of layer l contributes a_{l,n} · (W_down[:, n] · u); the
neurons of a layer plus its down-projection bias sum to its MLP row. The per-head term needs each head's
output z_{l,h} (``blocks.{l}.attn.z``) times its slice of the output projection W_O^{l,h}.
"""
from __future__ import annotations

from typing import Sequence, Union

import pandas as pd
import torch
from torch import nn

import interp
from interp.analysis import Analysis
from interp.finding import Finding, digest
from interp.prompts import facts
from probes.logit_lens import _token_id
from viz import interactive as _interactive
from viz import static as _static

Target = Union[str, int]
_TOL = 1e-4  # relative: the reconstructions below are exact up to float rounding


# ------------------------------------------------------------------------------------ weights
def frozen_norm_readout(model: interp.Model, h: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows h [n, d] (the full last residual) and directions w [n, d]: u [n, d] and the constant c [n] with
    norm_f(x) · w = x · u + c for every x when norm_f's scale is frozen at its value on h (module docstring).
    Checked against the norm module itself on h; an unrecognised norm is refused."""
    norm = model.adapter.final_norm
    h64, w64 = h.double(), w.double()
    if isinstance(norm, nn.LayerNorm):
        g = norm.weight.double() if norm.weight is not None else torch.ones_like(h64[0])
        beta = norm.bias.double() if norm.bias is not None else torch.zeros_like(h64[0])
        s = 1 / torch.sqrt(h64.var(-1, unbiased=False, keepdim=True) + norm.eps)
        gw = g * w64
        u = s * (gw - gw.mean(-1, keepdim=True))
        center = True
    else:
        eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None)
        if getattr(norm, "weight", None) is None or eps is None:
            raise interp.InterpError(f"{model.name}: the final norm {type(norm).__name__} is neither a LayerNorm nor "
                                     "an RMSNorm with a weight and an epsilon; DLA cannot freeze its scale")
        g = norm.weight.double() + (1.0 if "gemma" in type(norm).__name__.lower() else 0.0)
        beta = torch.zeros_like(h64[0])
        s = 1 / torch.sqrt(h64.pow(2).mean(-1, keepdim=True) + float(eps))
        u = s * g * w64
        center = False
    c = w64 @ beta
    with torch.no_grad():
        want = (norm(h[:, None])[:, 0].double() * w64).sum(-1)
    got = (h64 * u).sum(-1) + c
    tol = tolerance(model)
    if not torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max().clamp_min(1))):
        raise interp.InterpError(f"{model.name}: the final norm {type(norm).__name__} is not the "
                                 f"{'LayerNorm' if center else 'RMSNorm'} formula DLA assumes (max error "
                                 f"{float((got - want).abs().max()):.3g}); its scale cannot be frozen this way")
    return u, c


def token_ids(model: interp.Model, t: Target | Sequence[Target] | None, n: int) -> list[int] | None:
    """One token id per prompt from None, a target shared by all prompts, or one per prompt."""
    if t is None:
        return None
    if isinstance(t, (str, int)):
        return [_token_id(model, t)] * n
    t = list(t)
    if len(t) != n:
        raise interp.InterpError(f"got {len(t)} targets for {n} prompts: give one per prompt, or one for all")
    return [_token_id(model, x) for x in t]


def answer_positions(batch: interp.Batch) -> list[int]:
    """Each row's answer position: its ``query`` role if it has one, else its last real token."""
    return [r["query"][0] if r.get("query") else r.length - 1 for r in batch.roles]


# ------------------------------------------------------------------------------------ analysis
class DirectLogitAttribution(Analysis):
    """Each head's, MLP's (neuron's) and the embedding's direct contribution to a logit or a logit difference."""

    name = "probes.dla"
    title = "Direct logit attribution"
    in_scan = True
    takes_prompts = True
    figures = (_static.dla, _interactive.dla)

    @torch.no_grad()
    def run(self, model: interp.Model, inputs=None, *, target: Target | Sequence[Target] | None = None,
            foil: Target | Sequence[Target] | None = None, neurons: bool = False) -> Finding:
        """DLA at each prompt's answer position. ``target``: the token whose logit is split (default: the
        built-in facts' answers, else the model's top-1); ``foil``: subtract its logit (logit difference);
        ``neurons``: also one row per MLP neuron."""
        if inputs is None:
            fs = facts()
            inputs, target = [f["prompt"] for f in fs], target if target is not None else [f["answer"] for f in fs]
        batch = model.encode(inputs)
        n, L, H = len(batch), model.n_layers, model.n_heads
        tol = tolerance(model)
        pos = torch.tensor(answer_positions(batch))
        rows = torch.arange(n)
        sites = (["blocks.0.resid_pre", f"blocks.{L - 1}.resid_post", "logits"]
                 + [f"blocks.{l}.{k}" for l in range(L) for k in ("attn.z", "attn.out", "mlp.out")])
        acts: dict[int, torch.Tensor] = {}
        handles = []
        if neurons:
            def keep(l):
                def fn(mod, args):
                    acts[l] = args[0].detach()[rows, pos]
                return fn
            handles = [model.adapter.down_proj(l)[0].register_forward_pre_hook(keep(l)) for l in range(L)]
        try:
            tr = interp.capture(model, batch, sites=sites)
        finally:
            for hd in handles:
                hd.remove()
        at = lambda name: tr[name][rows, pos].double()  # noqa: E731  [n, ...] at the answer positions
        logits = tr["logits"][rows, pos].double()  # [n, V]
        tgt = token_ids(model, target, n) or logits.argmax(-1).tolist()
        fl = token_ids(model, foil, n)
        if fl is not None and any(a == b for a, b in zip(tgt, fl)):
            raise interp.InterpError("a foil equals its target: the logit difference would be 0 by construction")
        WU = model.adapter.unembed.weight.detach().double()
        w = WU[tgt] - (WU[fl] if fl is not None else 0)
        h = at(f"blocks.{L - 1}.resid_post")
        u, const = frozen_norm_readout(model, h.float(), w.float())
        bU = getattr(model.adapter.unembed, "bias", None)
        if bU is not None:
            bU = bU.detach().double()
            const = const + bU[tgt] - (bU[fl] if fl is not None else 0)
        value = logits[rows, tgt] - (logits[rows, fl] if fl is not None else 0)  # the model's own number

        names, kinds, layers, heads, cols = ["embed"], ["embed"], [-1], [-1], []
        embed = at("blocks.0.resid_pre")
        recon = embed.clone()
        cols.append((embed * u).sum(-1))
        head_mat = torch.zeros(n, L, H, dtype=torch.float64)
        for l in range(L):
            WO, bO = model.adapter.out_proj(l)
            z = at(f"blocks.{l}.attn.z")  # [n, H, hd]
            per_head = torch.einsum("nhd,hdm->nhm", z, WO.double())  # [n, H, d]
            attn_out = at(f"blocks.{l}.attn.out")
            recon_attn = per_head.sum(1) + (bO.double() if bO is not None else 0)
            _check(recon_attn, attn_out, f"layer {l}: heads' outputs through W_O do not sum to attn.out", tol)
            head_mat[:, l] = (per_head * u[:, None]).sum(-1)
            for hh in range(H):
                names.append(f"L{l}H{hh}"), kinds.append("head"), layers.append(l), heads.append(hh)
                cols.append(head_mat[:, l, hh])
            if bO is not None:
                names.append(f"L{l} attn bias"), kinds.append("attn_bias"), layers.append(l), heads.append(-1)
                cols.append((bO.double() * u).sum(-1))
            mlp = at(f"blocks.{l}.mlp.out")
            names.append(f"L{l} MLP"), kinds.append("mlp"), layers.append(l), heads.append(-1)
            cols.append((mlp * u).sum(-1))
            recon = recon + attn_out + mlp
        _check(recon, h, "embedding + attention + MLP outputs do not add up to the last residual stream: this "
               "architecture normalises sublayer outputs before the residual add (e.g. Gemma), which DLA does not split",
               tol)
        names.append("bias"), kinds.append("bias"), layers.append(-1), heads.append(-1)
        cols.append(const)
        per_prompt = torch.stack(cols, 1)  # [n, components]
        total = per_prompt.sum(1)
        err = float(((total - value).abs() / value.abs().clamp_min(1e-6)).max())
        _check(total[:, None], value[:, None], "the components do not sum to the model's logit (a model that caps "
               "its logits, e.g. with tanh, is not a sum of components)", tol)
        table = pd.DataFrame({"component": names, "kind": kinds, "layer": layers, "head": heads,
                              "score": per_prompt.mean(0).numpy(), "std": per_prompt.std(0, unbiased=False).numpy()})
        arrays = {"per_prompt": per_prompt.float(), "heads": head_mat.mean(0).float()}
        if neurons:
            nrows = []
            for l in range(L):
                _, Wd, bd = model.adapter.down_proj(l)  # [d_mlp, d], [d] or None
                contrib = acts[l].double() * (u @ Wd.double().T)  # [n, d_mlp]
                nrows.append(contrib)
                _check(contrib.sum(1) + ((bd.double() * u).sum(-1) if bd is not None else 0),
                       per_prompt[:, names.index(f"L{l} MLP")], f"layer {l}: neurons do not sum to the MLP's contribution",
                       tol)
            neur = torch.stack(nrows, 1)  # [n, L, d_mlp]
            arrays["neurons"] = neur.mean(0).float()
            d_mlp = neur.shape[-1]
            table = pd.concat([table, pd.DataFrame({
                "component": [f"L{l}N{i}" for l in range(L) for i in range(d_mlp)], "kind": "neuron",
                "layer": torch.arange(L).repeat_interleave(d_mlp).numpy(), "head": -1,
                "neuron": torch.arange(d_mlp).repeat(L).numpy(), "score": neur.mean(0).reshape(-1).numpy(),
                "std": neur.std(0, unbiased=False).reshape(-1).numpy()})], ignore_index=True)
        main = table[table.kind.isin(["embed", "head", "mlp", "attn_bias"])]
        best = main.loc[main.score.abs().idxmax()]
        dec = model.tokenizer.decode if model.tokenizer is not None else str
        metrics = {
            "n_prompts": n, "value": float(value.mean()), "sum_of_components": float(total.mean()),
            "max_rel_error": err, "target": [dec([t]) for t in tgt], "foil": None if fl is None else [dec([t]) for t in fl],
            "top_component": str(best.component), "top_score": float(best.score),
            "heads_total": float(head_mat.sum((1, 2)).mean()),
            "mlp_total": float(per_prompt[:, [i for i, k in enumerate(kinds) if k == "mlp"]].sum(1).mean()),
            "embed": float(per_prompt[:, 0].mean()),
        }
        params = {"target": None if target is None else (target if isinstance(target, (str, int)) else list(target)),
                  "foil": None if foil is None else (foil if isinstance(foil, (str, int)) else list(foil)),
                  "neurons": neurons, "tokens": batch.tokens[0][:batch.lengths[0]]}
        return Finding(self.name, table, params, model.identity(), digest(batch.input_ids), metrics, arrays,
                       ["final norm's scale frozen at its value on the full residual (applied to every component)"])

    def to_spec(self, finding: Finding, model: interp.Model, *, k: int = 5, factor: float = 0.0,
                sign: str = "positive") -> interp.Spec:
        """Scale the outputs of the k heads that write the answer most (``sign="positive"``), suppress it most
        (``"negative"``) or either (``"abs"``) by ``factor`` (0 removes them, at every position)."""
        t = finding.table[finding.table.kind == "head"]
        if sign == "positive":
            t = t[t.score > 0].sort_values("score", ascending=False)
        elif sign == "negative":
            t = t[t.score < 0].sort_values("score")
        elif sign == "abs":
            t = t.reindex(t.score.abs().sort_values(ascending=False).index)
        else:
            raise interp.InterpError(f"sign={sign!r}: use 'positive', 'negative' or 'abs'")
        t = t.head(k)
        if t.empty:
            raise interp.InterpError(f"no head has a {sign} direct effect on the logit: nothing to export")
        edits = [{"op": "attn.head_scale", "layers": [int(l)], "heads": sorted(map(int, g["head"])),
                  "factor": float(factor)} for l, g in t.groupby("layer")]
        return interp.Spec.for_model(model, edits, analysis=self.name, prompts=finding.prompts,
                                     params={"k": k, "factor": factor, "sign": sign, "target": finding.params.get("target"),
                                             "foil": finding.params.get("foil")})

    def explain(self, finding: Finding) -> str:
        m = finding.metrics
        what = "logit difference" if m.get("foil") else "logit"
        return (f"The {m['top_component']} component writes {m['top_score']:+.2f} of the target's {what} of "
                f"{m['value']:.2f} (mean over {m['n_prompts']} prompts); all heads together {m['heads_total']:+.2f}, "
                f"all MLPs {m['mlp_total']:+.2f}, the embedding {m['embed']:+.2f}, and the components sum to the "
                f"model's {what} within {m['max_rel_error'] * 100:.1g} %.")


def tolerance(model: interp.Model) -> float:
    """Relative tolerance of the reconstruction checks: float rounding of the model's own dtype (the parts are
    summed in float64, the model's activations they are checked against carry its rounding)."""
    return max(_TOL, 8 * torch.finfo(model.adapter.embed.weight.dtype).eps)


def _check(got: torch.Tensor, want: torch.Tensor, what: str, tol: float = _TOL) -> None:
    scale = float(want.abs().max().clamp_min(1))
    err = float((got - want).abs().max())
    if err > tol * scale:
        raise interp.InterpError(f"{what} (max error {err:.3g} at scale {scale:.3g})")


dla = DirectLogitAttribution()
