"""Attention sinks: the sink metric of Gu et al., "When Attention Sink Emerges in Language Models"
(ICLR 2025; sail-sg/Attention-Sink, eval_sink_open_source.py).

Importance of key k in head (l, h), 0-indexed:

    α_k^{l,h} = 1/(T − k) · Σ_{t=k}^{T−1} A^{l,h}_{t,k}       (column sum over the queries that see k)

Sink rate Sink_k^ε = mean over prompts, layers and heads of 1[α_k > ε] × 100, with ε = 0.3 and
prompts truncated to T = 64 tokens. α comes from the ``KeyMass`` reducer (``attn.key_mean``), so
the metric runs at long context without materialising patterns. The control of the paper's
Table 1, one token repeated T times, is computed alongside: with RoPE every position then has the
same hidden state and the sink disappears.

``to_spec`` exports the heads where token 0 is a sink: ZeroTuning (Han et al., ICLR'26) scales the
first-token attention by γ and renormalises (≡ a log γ logit bias); ACT (Yu et al., ICML'24) scales
non-initial sink columns by β and hands the removed mass to the other keys.
"""
from __future__ import annotations

import pandas as pd
import torch
from tqdm.auto import tqdm

import interp
from interp.analysis import Analysis
from interp.finding import Finding, digest
from interp.prompts import paragraphs
from viz import interactive as _interactive
from viz import static as _static


def _alpha(model, ids: torch.Tensor, batch_size: int, progress: bool) -> torch.Tensor:
    """α [n, L, H, T] for token ids [n, T]."""
    out = []
    chunks = list(torch.split(ids, batch_size))
    for x in tqdm(chunks, desc="sinks", disable=not progress or len(chunks) < 2):
        tr = interp.capture(model, {"input_ids": x}, reducers=[interp.KeyMass()])
        out.append(tr.stack("attn.key_mean").permute(1, 0, 2, 3))
    return torch.cat(out)


class Sinks(Analysis):
    """Sink importance α per (layer, head, key) and the sink rate, with the repeated-token control."""

    name = "probes.sinks"
    title = "Attention sinks"
    in_scan = True
    figures = (_static.sinks, _interactive.sinks)

    def run(self, model: interp.Model, prompts: list[str] | None = None, *, epsilon: float = 0.3, T: int = 64,
            chat: bool = True, batch_size: int = 4, progress: bool = True) -> Finding:
        """Sink importance α per (layer, head, key) and the sink rate, with the repeated-token control."""
        prompts = prompts or paragraphs()
        batch = model.encode([[{"role": "user", "content": p}] for p in prompts] if chat else prompts)
        short = [n for n in batch.lengths if n < T]
        if short:
            raise interp.InterpError(f"{len(short)} prompt(s) have fewer than T={T} tokens; give longer prompts or lower T")
        ids = batch.input_ids[:, :T]
        alpha = _alpha(model, ids, batch_size, progress)  # [n, L, H, T]
        rep = ids[:, -1:].repeat(1, T)  # one token, repeated
        alpha_rep = _alpha(model, rep, batch_size, False)
        sink = alpha > epsilon
        L, H = model.n_layers, model.n_heads
        score = alpha[..., 0].mean(0)  # [L, H]
        table = pd.DataFrame({"layer": torch.arange(L).repeat_interleave(H).numpy(),
                              "head": torch.arange(H).repeat(L).numpy(),
                              "score": score.reshape(-1).numpy(),
                              "sink_rate": sink[..., 0].float().mean(0).reshape(-1).numpy(),
                              "is_sink": (score > epsilon).reshape(-1).numpy()})
        rate = sink.float().mean((0, 1, 2)) * 100  # Sink_k for every k
        metrics = {
            "epsilon": epsilon, "T": T, "n_prompts": len(prompts),
            "sink_rate_token0": float(rate[0]),
            "sink_rate_token0_layers_ge2": float(sink[:, 2:, :, 0].float().mean() * 100),
            "sink_rate_token0_repeated": float((alpha_rep[..., 0] > epsilon).float().mean() * 100),
            "sink_rate_token1_to_7_max": float(rate[1:8].max()),
            "sink_rate_by_layer": [round(float(x), 1) for x in sink[..., 0].float().mean((0, 2)) * 100],
            "n_sink_heads": int((score > epsilon).sum()),
        }
        return Finding("probes.sinks", table, {"epsilon": epsilon, "T": T, "chat": chat,
                                               "tokens": batch.tokens[0][:T]},
                       model.identity(), digest(ids), metrics,
                       {"importance": alpha.mean(0), "sink_rate": rate, "importance_repeated": alpha_rep.mean(0)})

    def to_spec(self, finding: Finding, model: interp.Model, *, method: str = "zerotuning", gamma: float = 0.6,
                beta: float = 0.4, theta: float = 0.1, layers: list[int] | None = None,
                max_heads: int | None = None) -> interp.Spec:
        """ZeroTuning: scale token-0 attention by γ (renormalised) in the sink heads.
        ACT: in the sink heads, scale keys that are non-initial sinks (α_k > θ, k > 0) by β and give the
        removed mass to the other keys (row sums preserved)."""
        t = finding.table
        t = t[t.is_sink] if layers is None else t[t.is_sink & t.layer.isin(layers)]
        if max_heads is not None:
            t = t.sort_values("score", ascending=False).head(max_heads)
        if t.empty:
            raise interp.InterpError("no sink heads selected: lower epsilon or widen layers")
        edits = []
        if method == "zerotuning":
            for l, g in t.groupby("layer"):
                edits.append({"op": "attn.scale_weights", "layers": [int(l)], "heads": sorted(map(int, g["head"])),
                              "keys": "role:bos", "factor": gamma, "renormalize": True})
            params = {"gamma": gamma}
        elif method == "act":
            imp = finding.arrays["importance"]  # [L, H, T]
            for l, g in t.groupby("layer"):
                heads = sorted(map(int, g["head"]))
                keys = sorted({int(k) for h in heads for k in torch.nonzero(imp[int(l), h, 1:] > theta)[:, 0] + 1})
                if keys:
                    edits.append({"op": "attn.scale_weights", "layers": [int(l)], "heads": heads, "queries": "all",
                                  "keys": keys, "factor": beta, "redistribute_to": "all"})
            if not edits:
                raise interp.InterpError(f"no non-initial sinks with α > θ={theta} in the sink heads: nothing for ACT to do")
            params = {"beta": beta, "theta": theta}
        else:
            raise interp.InterpError(f"unknown method {method!r}: use 'zerotuning' or 'act'")
        return interp.Spec.for_model(model, edits, analysis="probes.sinks", prompts=finding.prompts,
                                     params={**finding.params, "method": method, **params, "tokens": None})

    def explain(self, finding: Finding) -> str:
        m = finding.metrics
        return (f"Token 0 is an attention sink (α > {m['epsilon']:g}) in {m['sink_rate_token0']:.1f} % of "
                f"(prompt, layer, head) triples and in {m['n_sink_heads']} heads on average over the prompts; "
                f"{m['sink_rate_token0_repeated']:.1f} % when one token is repeated; no later token is a sink in more "
                f"than {m['sink_rate_token1_to_7_max']:.1f} %.")


sinks = Sinks()
