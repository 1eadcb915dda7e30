"""Massive activations: Sun et al., "Massive Activations in Large Language Models" (COLM 2024;
locuslab/massive-activations).

An activation h^l_{t,c} of the residual stream after block l is massive when

    |h^l_{t,c}| > 100   and   |h^l_{t,c}| ≥ 1000 × median_{t',c'} |h^l_{t',c'}|

(median over the whole hidden state of that layer and prompt). Per layer the finder also keeps
the top-3 |h| and the median (the paper's layerwise plot). Massive activations sit in a few fixed
dimensions, at the first token and at strong delimiters; they act as biases that create the
attention sinks.

Built-in check (the paper's ablation): at the layer where they first appear, set those
activations to zero (perplexity explodes), to their mean over prompts (perplexity barely moves),
or zero as many random dimensions at the same tokens (control).

``to_spec`` → ``resid.suppress_dims`` (set-mean or zero of the massive dims at the massive tokens),
or attention-side suppression of massive tokens other than token 0 (a logit bias −λ on their keys,
the TokenTruth-style reconstruction of METHODS §2 [recon]).
"""
from __future__ import annotations

import math

import pandas as pd
import torch

import interp
from interp.finding import Finding, digest
from interp.prompts import paragraphs


def _resid(model, batch) -> torch.Tensor:
    """resid_post of every layer: [L, b, T, d]."""
    return interp.capture(model, batch, sites="blocks.*.resid_post").stack("resid_post")


def _perplexity(model, batch, spec: interp.Spec | None = None) -> float:
    ids, am = batch.input_ids, batch.attention_mask
    if spec is None:
        logits = model.logits(batch)
    else:
        with interp.patch(model, spec), model.engine.running(batch):
            logits = model.logits(batch)
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    m = am[:, 1:].float()
    return float(torch.exp(-(lp * m).sum() / m.sum()))


def massive(model: interp.Model, prompts: list[str] | None = None, *, threshold: float = 100.0,
            ratio: float = 1000.0, max_tokens: int = 64, ablation: bool = True, seed: int = 0) -> Finding:
    """Find massive activations; optionally run the set-zero / set-mean / random-dims ablation."""
    prompts = prompts or paragraphs()
    batch = model.encode(prompts)
    if max_tokens:
        n = min(max_tokens, batch.input_ids.shape[1])
        batch = model.encode({"input_ids": batch.input_ids[:, :n], "attention_mask": batch.attention_mask[:, :n]})
        batch.tokens = [t[:n] for t in model.encode(prompts).tokens]
    H = _resid(model, batch)  # [L, b, T, d]
    valid = batch.attention_mask.bool()
    L = H.shape[0]
    absH = H.abs()
    rows, top, med = [], torch.zeros(L, 3), torch.zeros(L)
    for l in range(L):
        per_prompt_median = torch.stack([absH[l, i][valid[i]].median() for i in range(H.shape[1])])
        med[l] = per_prompt_median.mean()
        top[l] = torch.stack([absH[l, i][valid[i]].flatten().topk(3).values for i in range(H.shape[1])]).mean(0)
        for i in range(H.shape[1]):
            a = absH[l, i] * valid[i, :, None]
            hits = torch.nonzero((a > threshold) & (a >= ratio * per_prompt_median[i]))
            for t, c in hits.tolist():
                rows.append({"layer": l, "prompt": i, "token": t, "token_str": batch.tokens[i][t], "dim": c,
                             "value": float(H[l, i, t, c]), "ratio": float(a[t, c] / per_prompt_median[i])})
    table = pd.DataFrame(rows, columns=["layer", "prompt", "token", "token_str", "dim", "value", "ratio"])
    metrics: dict = {"threshold": threshold, "ratio": ratio, "n_hits": len(table)}
    arrays = {"top": top, "median": med}
    notes = []
    if len(table):
        dims = sorted(table.dim.unique().tolist())
        per_prompt_dims = table.groupby("prompt").dim.apply(set)
        common = set.intersection(*per_prompt_dims) if len(per_prompt_dims) else set()
        first = int(table.layer.min())
        metrics.update({
            "dims": dims, "tokens": sorted(table.token.unique().tolist()), "first_layer": first,
            "layers": sorted(table.layer.unique().tolist()),
            "prompts_with_hits": int(table.prompt.nunique()),
            "dims_in_every_prompt": sorted(common),
            "max_ratio": float(table.ratio.max()), "max_abs": float(table.value.abs().max()),
            "token0_is_massive": bool((table.token == 0).any()),
        })
        arrays["layer_abs"] = absH[first, 0]
        if ablation:
            metrics.update(_ablation(model, batch, table, first, H, seed))
    else:
        notes.append("no massive activations found with these thresholds")
    return Finding("probes.massive", table, {"threshold": threshold, "ratio": ratio, "max_tokens": max_tokens,
                                             "tokens": batch.tokens[0]}, model.identity(),
                   digest(batch.input_ids), metrics, arrays, notes)


def _ablation(model, batch, table, layer, H, seed) -> dict:
    """Perplexity with the massive activations (at ``layer``) set to zero, to their mean, or random dims zeroed."""
    hits = table[table.layer == layer]
    dims = sorted(hits.dim.unique().tolist())
    tokens = sorted(hits.token.unique().tolist())
    means = H[layer][:, tokens][..., dims].mean((0, 1))  # mean value of each massive dim at the massive tokens
    g = torch.Generator().manual_seed(seed)
    others = [c for c in torch.randperm(model.d_model, generator=g).tolist() if c not in dims][:len(dims)]

    def spec(ds, **mode):
        edit = {"op": "resid.suppress_dims", "layers": [layer], "positions": tokens, "dims": ds, **mode}
        return interp.Spec.for_model(model, [edit], tensors={"means": means})
    base = _perplexity(model, batch)
    zero = _perplexity(model, batch, spec(dims, mode="zero"))
    mean = _perplexity(model, batch, spec(dims, mode="mean", tensor="means"))
    rand = _perplexity(model, batch, spec(others, mode="zero"))
    return {"ppl": base, "ppl_set_zero": zero, "ppl_set_mean": mean, "ppl_random_dims_zero": rand,
            "ablation_layer": layer, "ablation_tokens": tokens, "set_mean_values": [round(float(v), 2) for v in means],
            "set_zero_log10_ratio": math.log10(zero / base), "set_mean_rel_change": mean / base - 1,
            "random_rel_change": rand / base - 1}


def to_spec(finding: Finding, model: interp.Model, *, method: str = "set_mean", bias: float = -5.0) -> interp.Spec:
    """set_mean / set_zero of the massive dims at the massive tokens (first layer), or a key bias
    ``bias`` on massive tokens other than token 0 in every later layer (attention-side suppression)."""
    m = finding.metrics
    if "dims" not in m:
        raise interp.InterpError("this finding has no massive activations to act on")
    layer, dims = m["first_layer"], m["dims"]
    tokens = m.get("ablation_tokens", m["tokens"])
    if method in ("set_mean", "set_zero"):
        edit = {"op": "resid.suppress_dims", "layers": [layer], "positions": tokens, "dims": dims,
                "mode": "mean" if method == "set_mean" else "zero"}
        tensors = {}
        if method == "set_mean":
            edit["tensor"] = "means"
            tensors["means"] = torch.tensor(m["set_mean_values"])
        return interp.Spec.for_model(model, [edit], analysis="probes.massive", prompts=finding.prompts,
                                     params={"method": method}, tensors=tensors)
    if method == "attention":
        keys = [t for t in m["tokens"] if t != 0]
        if not keys:
            raise interp.InterpError("token 0 is the only massive token: nothing to suppress besides the sink")
        edit = {"op": "attn.add_logit_bias", "layers": list(range(layer + 1, model.n_layers)), "keys": keys,
                "bias": bias}
        return interp.Spec.for_model(model, [edit], analysis="probes.massive", prompts=finding.prompts,
                                     params={"method": method, "bias": bias})
    raise interp.InterpError(f"unknown method {method!r}: use set_mean, set_zero or attention")
