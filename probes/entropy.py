"""Attention entropy per head, and uniform-pattern heads (the detection step of ART, Luo et al.,
arXiv 2604.06393 [recon]).

For query t with visible keys 0..t, the normalised entropy of its attention row is

    Ĥ_t = −Σ_k A_{t,k} log A_{t,k} / log(t + 1)        ∈ [0, 1]   (1 = uniform)

A head's score is the mean of Ĥ_t over queries t ≥ ``min_query`` (short rows are trivially
uniform) and prompts. Heads with score > η are "uniform" heads; ART replaces them, in shallow
layers, with a local window (z'_{qk} = −∞ for k ≤ q − w, the sink key 0 kept). η ≈ 0.9 and
w ≈ 32–128 are reconstructions: both are parameters. The ``Entropy`` reducer computes Ĥ while
attention runs, so this probe works at long context.

On a vision-language model the prompts may be VQAItems (the testbed's held-out items by default on a testbed
model): they are encoded with their images and kept whole (``max_tokens`` cuts plain prompts only). ART's measured
effect on the testbed task is in docs/methods.md §8.
"""
from __future__ import annotations

import pandas as pd
import torch

import interp
from interp import vlm
from interp.analysis import Analysis
from interp.finding import Finding, digest
from interp.prompts import paragraphs
from viz import interactive as _interactive
from viz import static as _static


def _are_items(x) -> bool:
    return isinstance(x, vlm.VQAItem) or (isinstance(x, (list, tuple)) and bool(x) and all(
        isinstance(i, vlm.VQAItem) or (isinstance(i, dict) and "prompt" not in i and "role" not in i) for i in x))


class Entropy(Analysis):
    """Mean normalised attention entropy per (layer, head); heads above η are flagged uniform."""

    name = "probes.entropy"
    title = "Attention entropy"
    in_scan = True
    takes_prompts = True
    figures = (_static.entropy, _interactive.entropy)

    def run(self, model: interp.Model, prompts: list[str] | None = None, *, eta: float = 0.9, min_query: int = 8,
            max_tokens: int = 128) -> Finding:
        """Mean normalised attention entropy per (layer, head); heads above η are flagged uniform."""
        from interp.testbed.items import default_items, is_testbed
        vision = model.adapter.image_token_id is not None
        if vision and prompts is None and is_testbed(model):
            prompts = default_items(model)
        if vision and _are_items(prompts):  # image prompts, whole (image tokens are not cut)
            batch = vlm.encode_vqa(model, vlm.as_items(prompts, model))
            ids, am = batch.input_ids, batch.attention_mask
            inputs = batch
        else:
            prompts = paragraphs() if prompts is None else prompts
            batch = model.encode(prompts)
            ids, am = batch.input_ids[:, :max_tokens], batch.attention_mask[:, :max_tokens]
            inputs = {"input_ids": ids, "attention_mask": am}
        valid = am.bool().clone()
        valid[:, :min_query] = False
        if not valid.any():
            raise interp.InterpError(f"no prompt is longer than min_query={min_query} tokens: give longer prompts or "
                                     "lower min_query")
        tr = interp.capture(model, inputs, reducers=[interp.Entropy()])
        Hn = tr.stack("attn.entropy_norm")  # [L, b, H, T]
        w = valid[None, :, None, :].float()
        score = (Hn * w).sum((1, 3)) / w.sum((1, 3))  # [L, H]
        L, H = score.shape
        table = pd.DataFrame({"layer": torch.arange(L).repeat_interleave(H).numpy(),
                              "head": torch.arange(H).repeat(L).numpy(), "entropy": score.reshape(-1).numpy(),
                              "uniform": (score > eta).reshape(-1).numpy()})
        uni = table[table.uniform]
        metrics = {"eta": eta, "n_uniform": int(len(uni)), "uniform_layers": sorted(uni.layer.unique().tolist()),
                   "mean_entropy_by_layer": [round(float(x), 3) for x in score.mean(1)],
                   "lowest_entropy_head": tuple(int(x) for x in table.loc[table.entropy.idxmin(), ["layer", "head"]])}
        return Finding(self.name, table, {"eta": eta, "min_query": min_query, "max_tokens": max_tokens},
                       model.identity(), digest(ids), metrics, {"entropy": score})

    def to_spec(self, finding: Finding, model: interp.Model, *, window: int = 32, max_layer: int | None = None,
                keep_sink: bool = True) -> interp.Spec:
        """ART: replace uniform heads in shallow layers (≤ ``max_layer``, default the first third) with a local
        window."""
        max_layer = model.n_layers // 3 if max_layer is None else max_layer
        t = finding.table[finding.table.uniform & (finding.table.layer <= max_layer)]
        if t.empty:
            raise interp.InterpError(f"no uniform heads (entropy > {finding.params['eta']}) in layers ≤ {max_layer}: "
                                     "lower eta or raise max_layer")
        edits = [{"op": "attn.replace_pattern", "layers": [int(l)], "heads": sorted(map(int, g["head"])),
                  "mode": "local_window", "window": window, "keep_sink": keep_sink} for l, g in t.groupby("layer")]
        return interp.Spec.for_model(model, edits, analysis=self.name, prompts=finding.prompts,
                                     params={"window": window, "max_layer": max_layer, "eta": finding.params["eta"]})

    def explain(self, finding: Finding) -> str:
        m = finding.metrics
        by_layer = m["mean_entropy_by_layer"]
        lo = min(range(len(by_layer)), key=by_layer.__getitem__)
        uni = (f"{m['n_uniform']} head{'s are' if m['n_uniform'] != 1 else ' is'} near-uniform (normalised entropy "
               f"above {m['eta']:g}) in layer{'s' if len(m['uniform_layers']) > 1 else ''} "
               f"{', '.join(map(str, m['uniform_layers']))}" if m["n_uniform"] else
               f"no head is near-uniform (normalised entropy above {m['eta']:g})")
        return (f"{uni[0].upper()}{uni[1:]}; attention is most concentrated in layer {lo} (mean normalised entropy "
                f"{by_layer[lo]:.2f}, layer {m['lowest_entropy_head'][0]} head {m['lowest_entropy_head'][1]} lowest).")


entropy = Entropy()

