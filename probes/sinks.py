"""Attention sinks: the sink metric of Gu et al., "When Attention Sink Emerges in Language Models"
(ICLR 2025; sail-sg/Attention-Sink, eval_sink_open_source.py).

Importance of key k in head (l, h), 0-indexed:

    α_k^{l,h} = 1/(T − k) · Σ_{t=k}^{T−1} A^{l,h}_{t,k}       (column sum over the queries that see k)

Sink rate Sink_k^ε = mean over prompts, layers and heads of 1[α_k > ε] × 100, with ε = 0.3 and
prompts truncated to T = 64 tokens. α comes from the ``KeyMass`` reducer (``attn.key_mean``), so
the metric runs at long context without materialising patterns. The control of the paper's
Table 1, one token repeated T times, is computed alongside: with RoPE every position then has the
same hidden state and the sink disappears.

The protocol is the paper's: plain text (``chat=True`` wraps each prompt in the chat template), each
prompt cut to its first T tokens; prompts shorter than T are left out and the notes say how many.

``to_spec`` exports the heads where token 0 is a sink: ZeroTuning (Han et al., ICLR'26) scales the
first-token attention by γ and renormalises (≡ a log γ logit bias); ACT (Yu et al., ICML'24) keeps the
initial sink, scales the attention to the other sinks of the running input by β and hands the removed
mass to the other keys in proportion to their weights: a'_{t,k} = β a_{t,k} (k ∈ K),
a'_{t,j} = a_{t,j} (1 + (1 − β) Σ_K a_t / Σ_{j∉K} a_t) otherwise. The sink set K is found at run time,
in every layer, by the ``sink`` selector (φ = max_{c∈D} |x_c| / rms(x) > τ on the layer's input, D the
sink dimensions calibrated on the probe prompts: the top-2 of median |RMSNorm(h)| at token 0 in the
middle layer, METHODS §1d), minus position 0; the heads are the sink heads of the probe prompts (the
calibration data). ACT's per-head check on a labelled calibration set is left to ``interp.evaluate``.
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


def _sink_dims(model, ids: torch.Tensor, k: int = 2) -> list[int]:
    """The ``k`` dims with the largest median |RMSNorm(h)| at token 0 of the middle layer's input (METHODS §1d)."""
    mid = model.n_layers // 2
    h = interp.capture(model, {"input_ids": ids}, sites=f"blocks.{mid}.resid_pre")[f"blocks.{mid}.resid_pre"]
    h0 = h[:, 0].float()
    h0 = h0 / torch.sqrt(h0.pow(2).mean(-1, keepdim=True) + 1e-6)
    return sorted(h0.abs().median(0).values.topk(k).indices.tolist())


class Sinks(Analysis):
    """Sink importance α per (layer, head, key) and the sink rate, with the repeated-token control."""

    name = "probes.sinks"
    title = "Attention sinks"
    in_scan = True
    takes_prompts = True
    figures = (_static.sinks, _interactive.sinks)

    def run(self, model: interp.Model, prompts: list[str] | None = None, *, epsilon: float = 0.3, T: int = 64,
            chat: bool = False, batch_size: int = 4, progress: bool = True) -> Finding:
        """Sink importance α per (layer, head, key) and the sink rate, with the repeated-token control."""
        if prompts is None:
            prompts = paragraphs()
        elif isinstance(prompts, str):
            prompts = [prompts]  # one prompt, not its characters
        texts = isinstance(prompts, (list, tuple)) and all(isinstance(p, str) for p in prompts)
        if T < 2:
            raise interp.InterpError(f"T={T}: the sink metric needs at least 2 tokens per prompt (the paper uses 64)")
        notes = []
        if chat and not getattr(model.tokenizer, "chat_template", None):
            chat = False
            notes.append("the tokenizer has no chat template: the prompts were read as plain text")
        if chat and not texts:
            chat = False
            notes.append("the inputs are token ids, not text: no chat template was applied")
        batch = model.encode([[{"role": "user", "content": p}] for p in prompts] if chat else prompts)
        n_in = len(batch)
        keep = [i for i, n in enumerate(batch.lengths) if n >= T]
        if not keep:
            raise interp.InterpError(f"none of the {n_in} prompt(s) has T={T} tokens (longest: "
                                     f"{max(batch.lengths)}): give longer prompts or lower T")
        if len(keep) < n_in:
            notes.append(f"{n_in - len(keep)} of {n_in} prompts have fewer than T={T} tokens and "
                         "were left out")
        ids = batch.input_ids[keep, :T]
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
            "epsilon": epsilon, "T": T, "n_prompts": len(keep), "chat": chat,
            "sink_rate_token0": float(rate[0]),
            "sink_rate_token0_layers_ge2": float(sink[:, 2:, :, 0].float().mean() * 100),
            "sink_rate_token0_repeated": float((alpha_rep[..., 0] > epsilon).float().mean() * 100),
            "sink_rate_token1_to_7_max": float(rate[1:8].max()),
            "sink_rate_by_layer": [round(float(x), 1) for x in sink[..., 0].float().mean((0, 2)) * 100],
            "n_sink_heads": int((score > epsilon).sum()),
            "sink_dims": _sink_dims(model, ids),
        }
        return Finding(self.name, table, {"epsilon": epsilon, "T": T, "chat": chat,
                                          "tokens": batch.tokens[keep[0]][:T]},
                       model.identity(), digest(ids), metrics,
                       {"importance": alpha.mean(0), "sink_rate": rate, "importance_repeated": alpha_rep.mean(0)},
                       notes)

    def to_spec(self, finding: Finding, model: interp.Model, *, method: str = "zerotuning", gamma: float = 0.6,
                beta: float = 0.4, tau: float = 20.0, dims: list[int] | None = None, layers: list[int] | None = None,
                max_heads: int | None = None) -> interp.Spec:
        """ZeroTuning: scale token-0 attention by γ (renormalised) in the sink heads.
        ACT: in the sink heads, scale the attention to the run-time sinks other than position 0 (φ > ``tau`` in
        ``dims``, default the finding's calibrated sink dims) by β and give the removed mass to the other keys
        (row sums preserved)."""
        t = finding.table
        t = t[t.is_sink] if layers is None else t[t.is_sink & t.layer.isin(layers)]
        if max_heads is not None:
            t = t.sort_values("score", ascending=False).head(max_heads)
        if t.empty:
            raise interp.InterpError("no sink heads selected: lower epsilon or widen layers")
        sink = None
        if method == "zerotuning":
            edits = [{"op": "attn.scale_weights", "layers": [int(l)], "heads": sorted(map(int, g["head"])),
                      "keys": "role:bos", "factor": gamma, "renormalize": True} for l, g in t.groupby("layer")]
            params = {"gamma": gamma}
        elif method == "act":
            dims = dims if dims is not None else finding.metrics.get("sink_dims")
            if not dims:
                raise interp.InterpError("ACT needs the sink dimensions: rerun the probe (it calibrates them) or "
                                         "pass dims=[...]")
            edits = [{"op": "attn.scale_weights", "layers": [int(l)], "heads": sorted(map(int, g["head"])),
                      "queries": "all", "keys": "sink", "factor": beta, "redistribute_to": "all"}
                     for l, g in t.groupby("layer")]
            sink = {"dims": [int(d) for d in dims], "tau": float(tau), "skip_first": True}
            params = {"beta": beta, "tau": tau}
        else:
            raise interp.InterpError(f"unknown method {method!r}: use 'zerotuning' or 'act'")
        return interp.Spec.for_model(model, edits, analysis=self.name, prompts=finding.prompts, sink=sink,
                                     params={**finding.params, "method": method, **params, "tokens": None})

    def explain(self, finding: Finding) -> str:
        m = finding.metrics
        return (f"Token 0 is an attention sink (α > {m['epsilon']:g}) in {m['sink_rate_token0']:.1f} % of "
                f"(prompt, layer, head) triples ({m['n_sink_heads']} of {len(finding.table)} heads by their mean α "
                f"over {m['n_prompts']} prompts); "
                f"{m['sink_rate_token0_repeated']:.1f} % when one token is repeated; no later token is a sink in more "
                f"than {m['sink_rate_token1_to_7_max']:.1f} %.")


sinks = Sinks()
