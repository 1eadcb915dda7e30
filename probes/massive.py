"""Massive activations: Sun et al., "Massive Activations in Large Language Models" (COLM 2024;
locuslab/massive-activations).

An activation h^l_{t,c} of the residual stream after block l is massive when

    |h^l_{t,c}| > 100   and   |h^l_{t,c}| ≥ 1000 × median_{t',c'} |h^l_{t',c'}|

(median over the whole hidden state of that layer and prompt), and, as in the paper, they are very
few: a (layer, prompt) counts only when its hits sit in at most ``max_dims`` dimensions and at most
``max_token_frac`` of the tokens (at least 2). A layer where many tokens exceed both thresholds in some
dimension (common in the first blocks of small models) is a dense outlier feature, not a massive
activation: it is reported in the notes and does not set where the massive activations start. Per layer
the finder also keeps the top-3 |h| and the median (the paper's layerwise plot). Massive activations
sit in a few fixed dimensions, at the first token and at strong delimiters; they act as biases that
create the attention sinks.

Built-in check (the paper's ablation) at the layer l* where they first appear: set them to zero
(perplexity explodes), to their mean (perplexity barely moves), or zero as many random dimensions at
the same tokens (control). The mean of dim c is taken over the (prompt, token) pairs that are massive
at l* in that prompt: m_c = mean_{(i,t) ∈ M} h^{l*}_{i,t,c}.

``to_spec`` → ``resid.suppress_dims`` on h^{l*} (the input of block l*+1) at the tokens the ``sink``
selector finds at run time, φ(x_t) = max_{c∈dims} |x_t,c| / rms(x_t) > τ, with τ halfway between the
massive tokens' and the other tokens' φ on the probe prompts: a replay on another prompt hits that
prompt's own massive tokens. Or attention-side suppression of massive tokens other than the first
(a logit bias −λ on their keys, the TokenTruth-style reconstruction of METHODS §2 [recon]).
"""
from __future__ import annotations

import math

import pandas as pd
import torch

import interp
from interp.analysis import Analysis
from interp.finding import Finding, digest
from interp.prompts import paragraphs
from interp.roles import Batch, Roles
from viz import interactive as _interactive
from viz import static as _static


def _truncate(batch: Batch, n: int) -> Batch:
    """The first ``n`` tokens of every row."""
    n = min(n, batch.input_ids.shape[1])
    roles = [Roles({k: [p for p in v if p < n] for k, v in r.items()}, length=min(r.length, n)) for r in batch.roles]
    return Batch(batch.input_ids[:, :n], batch.attention_mask[:, :n], roles, [t[:n] for t in batch.tokens],
                 batch.texts, batch.extra)


def _phi(h: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """φ = max_{c∈dims} |h_c| / rms(h), as the ``sink`` selector computes it (interp.patch)."""
    h = h.float()
    return (h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))[..., dims].abs().amax(-1)


def find_massive(H: torch.Tensor, valid: torch.Tensor, *, threshold: float = 100.0, ratio: float = 1000.0,
                 max_dims: int = 8, max_token_frac: float = 0.1) -> tuple[list[dict], list[tuple[int, int]]]:
    """Massive activations in residual streams ``H`` [L, b, T, d] (``valid`` [b, T]: real tokens).

    Returns the hits ({layer, prompt, token, dim, value, ratio}) of the (layer, prompt) pairs whose
    thresholded activations are few (≤ ``max_dims`` dims, ≤ max(2, ``max_token_frac`` · tokens) tokens),
    and the (layer, prompt) pairs whose hits were too many to be massive activations."""
    absH = H.abs()
    rows, dense = [], []
    for l in range(H.shape[0]):
        for i in range(H.shape[1]):
            a = absH[l, i][valid[i]]  # [n, d]
            med = a.median()
            hits = torch.nonzero((a > threshold) & (a >= ratio * med))
            if not len(hits):
                continue
            idx = torch.nonzero(valid[i])[:, 0]
            toks, dims = hits[:, 0].unique(), hits[:, 1].unique()
            if len(dims) > max_dims or len(toks) > max(2, int(max_token_frac * len(idx))):
                dense.append((l, i))
                continue
            for t, c in hits.tolist():
                rows.append({"layer": l, "prompt": i, "token": int(idx[t]), "dim": c,
                             "value": float(H[l, i, idx[t], c]), "ratio": float(a[t, c] / med)})
    return rows, dense


def _nll(model, batch: Batch, *specs: interp.Spec) -> float:
    """Mean next-token negative log-likelihood (nats) over the real tokens of ``batch``."""
    logits = model.logits(batch, *specs)
    ids, am = batch.input_ids, batch.attention_mask
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    m = am[:, 1:].float()
    if not m.any():
        raise interp.InterpError("the perplexity ablation needs a prompt of at least 2 tokens")
    return float(-(lp * m).sum() / m.sum())


class Massive(Analysis):
    """Massive activations (Sun et al.) per layer, with the set-zero / set-mean / random-dims ablation."""

    name = "probes.massive"
    title = "Massive activations"
    in_scan = True
    takes_prompts = True
    figures = (_static.massive, _interactive.massive)

    def run(self, model: interp.Model, prompts: list[str] | None = None, *, threshold: float = 100.0,
            ratio: float = 1000.0, max_dims: int = 8, max_token_frac: float = 0.1, max_tokens: int = 64,
            ablation: bool = True, seed: int = 0) -> Finding:
        """Find massive activations; optionally run the set-zero / set-mean / random-dims ablation."""
        prompts = paragraphs() if prompts is None else prompts
        batch = model.encode(prompts)
        if max_tokens:
            batch = _truncate(batch, max_tokens)
        H = interp.capture(model, batch, sites="blocks.*.resid_post").stack("resid_post")  # [L, b, T, d]
        valid = batch.attention_mask.bool()
        L, b = H.shape[0], H.shape[1]
        absH = H.abs()
        top, med = torch.zeros(L, 3), torch.zeros(L)
        for l in range(L):
            med[l] = torch.stack([absH[l, i][valid[i]].median() for i in range(b)]).mean()
            top[l] = torch.stack([absH[l, i][valid[i]].flatten().topk(3).values for i in range(b)]).mean(0)
        rows, dense = find_massive(H, valid, threshold=threshold, ratio=ratio, max_dims=max_dims,
                                   max_token_frac=max_token_frac)
        for r in rows:
            r["token_str"] = batch.tokens[r["prompt"]][r["token"]]
        table = pd.DataFrame(rows, columns=["layer", "prompt", "token", "token_str", "dim", "value", "ratio"])
        metrics: dict = {"threshold": threshold, "ratio": ratio, "n_hits": len(table), "n_prompts": b}
        arrays: dict = {"top": top, "median": med}
        notes = []
        if dense:
            ls = sorted({l for l, _ in dense})
            metrics["dense_layers"] = ls
            notes.append(f"layers {ls} have activations above both thresholds at too many tokens or dims "
                         f"(> {max_dims} dims or > {max_token_frac:.0%} of the tokens) in some prompts: dense "
                         "outlier features, not counted as massive activations")
        if len(table):
            first = int(table.layer.min())
            at = table[table.layer == first]
            dims = sorted(at.dim.unique().tolist())
            positions = sorted({(int(i), int(t)) for i, t in zip(at.prompt, at.token)})
            h = H[first]  # [b, T, d]
            means = torch.stack([h[i, t, dims] for i, t in positions]).mean(0)
            phi = _phi(h, dims)
            inside = torch.zeros_like(valid)
            for i, t in positions:
                inside[i, t] = True
            rest = phi[valid & ~inside]
            phi_in, phi_out = float(phi[inside].min()), float(rest.max()) if rest.numel() else 0.0
            per_prompt_dims = table.groupby("prompt").dim.apply(set)
            metrics.update({
                "dims": dims, "tokens": sorted(table.token.unique().tolist()), "first_layer": first,
                "layers": sorted(table.layer.unique().tolist()),
                "prompts_with_hits": int(table.prompt.nunique()),
                "dims_in_every_prompt": sorted(set.intersection(*per_prompt_dims)) if len(per_prompt_dims) == b else [],
                "max_ratio": float(table.ratio.max()), "max_abs": float(table.value.abs().max()),
                "token0_is_massive": bool((table.token == 0).any()),
                "first_layer_tokens": sorted({t for _, t in positions}),
                "n_massive_positions": len(positions),
                "set_mean_values": [float(v) for v in means],
                "phi_massive_min": phi_in, "phi_other_max": phi_out,
            })
            if phi_in > phi_out:
                metrics["sink_tau"] = (phi_in + phi_out) / 2
            arrays["layer_abs"] = absH[first, 0][valid[0]]
            if ablation:
                try:
                    metrics.update(self._ablation(model, batch, metrics, seed))
                except interp.InterpError as e:
                    notes.append(f"no ablation: {e}")
        else:
            notes.append("no massive activations found with these thresholds")
        params = {"threshold": threshold, "ratio": ratio, "max_dims": max_dims, "max_token_frac": max_token_frac,
                  "max_tokens": max_tokens, "tokens": batch.tokens[0][:int(valid[0].sum())]}
        return Finding(self.name, table, params, model.identity(), digest(batch.input_ids), metrics, arrays, notes)

    def _ablation(self, model, batch: Batch, m: dict, seed: int) -> dict:
        """NLL and perplexity with the massive activations set to zero, to their mean, or random dims zeroed."""
        g = torch.Generator().manual_seed(seed)
        others = [c for c in torch.randperm(model.d_model, generator=g).tolist() if c not in m["dims"]][:len(m["dims"])]
        base = _nll(model, batch)
        zero = _nll(model, batch, self._spec(m, model, "set_zero"))
        mean = _nll(model, batch, self._spec(m, model, "set_mean"))
        rand = _nll(model, batch, self._spec(m, model, "set_zero", dims=others))
        ppl = {k: math.exp(v) for k, v in (("ppl", base), ("ppl_set_zero", zero), ("ppl_set_mean", mean),
                                            ("ppl_random_dims_zero", rand))}
        return {"nll": base, "nll_set_zero": zero, "nll_set_mean": mean, "nll_random_dims_zero": rand, **ppl,
                "ablation_layer": m["first_layer"], "random_dims": others,
                "set_zero_log10_ratio": (zero - base) / math.log(10), "set_mean_rel_change": math.exp(mean - base) - 1,
                "random_rel_change": math.exp(rand - base) - 1}

    def _spec(self, m: dict, model, method: str, dims: list[int] | None = None, analysis: str = "manual",
              prompts: str = "") -> interp.Spec:
        if "sink_tau" not in m:
            raise interp.InterpError(
                f"the massive tokens (φ ≥ {m['phi_massive_min']:.1f}) are not separable from the other tokens "
                f"(φ up to {m['phi_other_max']:.1f}) by the run-time sink selector at layer {m['first_layer']}")
        first = m["first_layer"]
        if first + 1 >= model.n_layers:
            raise interp.InterpError("massive activations appear only at the last layer: no later block reads them")
        edit = {"op": "resid.suppress_dims", "layers": [first + 1], "site": "resid_pre", "positions": "sink",
                "dims": list(dims if dims is not None else m["dims"]), "mode": "zero"}
        tensors = {}
        if method == "set_mean":
            edit.update(mode="mean", tensor="means")
            tensors["means"] = torch.tensor(m["set_mean_values"], dtype=torch.float32)
        return interp.Spec.for_model(model, [edit], analysis=analysis, prompts=prompts, tensors=tensors,
                                     params={"method": method}, sink={"dims": list(m["dims"]), "tau": m["sink_tau"]})

    def to_spec(self, finding: Finding, model: interp.Model, *, method: str = "set_mean",
                bias: float = -5.0) -> interp.Spec:
        """set_mean / set_zero of the massive dims at the massive tokens of each prompt, found at run time, after
        the block where they first appear; or a key bias ``bias`` on massive tokens other than the first in every
        later layer (attention-side suppression)."""
        m = finding.metrics
        if "dims" not in m:
            raise interp.InterpError("this finding has no massive activations to act on")
        if method in ("set_mean", "set_zero"):
            return self._spec(m, model, method, analysis=self.name, prompts=finding.prompts)
        if method == "attention":
            if not [t for t in m["tokens"] if t != 0]:
                raise interp.InterpError("token 0 is the only massive token: nothing to suppress besides the sink")
            if "sink_tau" not in m:
                self._spec(m, model, method)  # raises: the selector cannot find them
            edit = {"op": "attn.add_logit_bias", "layers": list(range(m["first_layer"] + 1, model.n_layers)),
                    "keys": "sink", "bias": bias}
            return interp.Spec.for_model(model, [edit], analysis=self.name, prompts=finding.prompts,
                                         params={"method": method, "bias": bias},
                                         sink={"dims": list(m["dims"]), "tau": m["sink_tau"], "skip_first": True})
        raise interp.InterpError(f"unknown method {method!r}: use set_mean, set_zero or attention")

    def explain(self, finding: Finding) -> str:
        m = finding.metrics
        if "dims" not in m:
            return (f"No activation exceeds {m['threshold']:g} and {m['ratio']:g}× its layer's median at a few tokens "
                    "in any layer.")
        dims = ", ".join(map(str, m["dims"]))
        toks = m["first_layer_tokens"]
        s = (f"Massive activations (up to {m['max_abs']:,.0f}, {m['max_ratio']:,.0f}× the layer median) appear from "
             f"layer {m['first_layer']} on in dim{'s' if len(m['dims']) > 1 else ''} {dims} at "
             f"{'token 0' if toks == [0] else 'tokens ' + ', '.join(map(str, toks))}")
        if "ppl" in m:
            s += (f"; setting them to zero raises perplexity from {m['ppl']:.1f} to {m['ppl_set_zero']:.3g}, setting "
                  f"them to their mean changes it by {100 * m['set_mean_rel_change']:+.2f} %")
        return s + "."


massive = Massive()
