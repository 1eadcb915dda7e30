"""Vision-aware head divergence: He et al., "Cracking the Code of Hallucination in LVLMs with Vision-aware
Head Divergence" (ACL 2025, arXiv 2412.13949; jinghan1he/VHR).

For head i of layer l at generated token y_t, with O^{l,i}[t] the head's output before W_O:

    VHD_{l,i}(y_t) = ‖ O^{l,i}[t](y_<t, image, text) − O^{l,i}[t](y_<t, text) ‖₂

(the second branch is the same prompt with the image tokens removed). Outlier pruning [3p]: with
TA_{l,i} = ‖O^{l,i}[t](text)‖₂, set VHD ← 0 where VHD > μ_l + σ_l and TA > μ'_l + σ'_l (statistics over
the heads of layer l). Token-VHD: T-VHD_t = Σ_l Σ_{i ∈ top-k_l} VHD_{l,i}(y_t), k = 8.
VHR selects H_l = {i : VHD_{l,i} > median_i VHD_{l,·}} (``torch.median``: the lower middle value for an even
head count; the metric ``max_over_median_by_layer`` uses the same median) and scales those heads' outputs by α = 2 in the
last N layers (``to_spec`` → ``attn.head_scale``). Here VHD is measured on the unreinforced model (the
paper recomputes it layer by layer on already-reinforced states during decoding).
"""
from __future__ import annotations

import pandas as pd
import torch

import interp
from interp import vlm
from interp.analysis import Analysis
from interp.finding import Finding, digest
from viz import interactive as _interactive
from viz import static as _static


def _z_last(model, ids, am, extra, position: int = -1) -> torch.Tensor:
    """Per-head output at ``position`` (default the last), every layer: [L, H, d]."""
    tr = interp.capture(model, {"input_ids": ids, "attention_mask": am, **extra}, sites="blocks.*.attn.z")
    return tr.stack("attn.z")[:, 0, position]


def _inputs(model, inputs) -> tuple[dict, dict]:
    """One image prompt as ``{input_ids [1, T], pixel_values, ...}``, and the defaults it implies: a VQAItem on a
    masked-diffusion model is encoded with its masked answer region, compared at its first position, for the first
    token of its answer."""
    if inputs is None:
        from interp.testbed.items import default_items
        inputs = default_items(model)[0]
    if isinstance(inputs, vlm.VQAItem):
        b = vlm.encode_vqa(model, [inputs])
        implied = {} if model.adapter.causal else {
            "answer_ids": vlm.answer_ids(model, [inputs]).tolist(),
            "position": b.roles[0]["query"][0] - b.input_ids.shape[1]}
        return {"input_ids": b.input_ids, **b.extra}, implied
    if not isinstance(inputs, dict) or "input_ids" not in inputs:
        raise interp.InterpError("vhd takes one image prompt: a VQAItem, or a dict with input_ids [1, T] holding the "
                                 "image tokens and pixel_values")
    return inputs, {}


class VHD(Analysis):
    """VHD per (step, layer, head) for one image prompt, and the VHR spec."""

    name = "probes.vhd"
    title = "Vision-aware head divergence"
    requires = ("vision",)
    in_scan = True
    figures = (_static.image_map, _interactive.image_map)  # a finding with no "map" array is drawn as a generic one

    def run(self, model: interp.Model, inputs=None, *, n_tokens: int = 1, k: int = 8, prune: bool = True,
            answer_ids: list[int] | None = None, position: int | None = None) -> Finding:
        """VHD per (step, layer, head) for one image prompt (``inputs``: a VQAItem, or input_ids [1, T] with image
        tokens and pixel_values; None: the first of the testbed's held-out items).

        ``position`` (counted from the end, with the answer prefix appended) is the query compared; for a
        masked-diffusion model give the prompt with its masked answer region and ``position=-gen_len`` (the first
        masked answer position) with ``answer_ids=[y]`` (one step, no prefix); a VQAItem implies both."""
        inputs, implied = _inputs(model, inputs)
        answer_ids = implied.get("answer_ids") if answer_ids is None else answer_ids
        position = implied.get("position", -1) if position is None else position
        ad = model.adapter
        ids = torch.as_tensor(inputs["input_ids"])
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise interp.InterpError("vhd takes one prompt at a time (input_ids of shape [1, T])")
        img = ids[0] == ad.image_token_id
        if ad.image_token_id is None or not img.any():
            raise interp.InterpError("the prompt has no image tokens: VHD compares with and without the image")
        if answer_ids is None and not ad.causal:
            raise interp.InterpError("a masked-diffusion model does not decode left to right: give answer_ids=[y] "
                                     "and position=-gen_len (the first masked answer position)")
        extra = {k_: v for k_, v in inputs.items() if k_ not in ("input_ids", "attention_mask")}
        text_ids = ids[:, ~img]
        if answer_ids is None:  # greedy answer with the image
            answer_ids, cur = [], ids
            for _ in range(n_tokens):
                nxt = int(model.answer_logits({"input_ids": cur, **extra})[0].argmax())
                answer_ids.append(nxt)
                cur = torch.cat([cur, torch.tensor([[nxt]])], 1)
        V, TA = [], []
        for t in range(len(answer_ids)):
            prefix = torch.tensor([answer_ids[:t]], dtype=torch.long)
            a, b = torch.cat([ids, prefix], 1), torch.cat([text_ids, prefix], 1)
            za = _z_last(model, a, torch.ones_like(a), extra, position)
            zb = _z_last(model, b, torch.ones_like(b), {}, position)
            v = (za - zb).norm(dim=-1)  # [L, H]
            ta = zb.norm(dim=-1)
            if prune:
                out = (v > v.mean(1, keepdim=True) + v.std(1, keepdim=True)) & \
                      (ta > ta.mean(1, keepdim=True) + ta.std(1, keepdim=True))
                v = torch.where(out, torch.zeros_like(v), v)
            V.append(v)
            TA.append(ta)
        V, TA = torch.stack(V), torch.stack(TA)  # [steps, L, H]
        selected = V > V.median(-1, keepdim=True).values
        kk = min(k, V.shape[-1])
        tvhd = V.topk(kk, dim=-1).values.sum((1, 2))
        mean = V.mean(0)
        L, H = mean.shape
        rows = [{"layer": l, "head": h, "score": float(mean[l, h]), "ta": float(TA[:, l, h].mean()),
                 "selected": bool(selected[:, l, h].float().mean() > 0.5)} for l in range(L) for h in range(H)]
        table = pd.DataFrame(rows)
        med = mean.median(-1).values.clamp_min(1e-12)
        sparsity = (mean.max(-1).values / med)
        metrics = {"n_tokens": len(answer_ids), "tvhd": [float(x) for x in tvhd],
                   "max_over_median_by_layer": [round(float(x), 2) for x in sparsity],
                   "layers_sparse_gt3": int((sparsity > 3).sum()), "answer_ids": list(answer_ids)}
        if model.tokenizer is not None:
            metrics["answer"] = model.tokenizer.decode(answer_ids)
        return Finding(self.name, table, {"k": k, "prune": prune, "position": position}, model.identity(),
                       digest(ids), metrics, {"vhd": V, "ta": TA, "selected": selected})

    def to_spec(self, finding: Finding, model: interp.Model, *, alpha: float = 2.0, last_n: int | None = None,
                queries: str | None = None) -> interp.Spec:
        """VHR: scale the selected heads (VHD above the layer median) by α in the last N layers (default: last
        half), at the answer queries (``last``; the masked answer region ``role:answer`` for a diffusion model)."""
        L = model.n_layers
        last_n = max(1, L // 2) if last_n is None else last_n
        t = finding.table[finding.table.selected & (finding.table.layer >= L - last_n)]
        if t.empty:
            raise interp.InterpError("no heads selected in the chosen layers")
        queries = queries or ("last" if model.adapter.causal else "role:answer")
        edits = [{"op": "attn.head_scale", "layers": [int(l)], "heads": sorted(map(int, g["head"])),
                  "queries": queries, "factor": alpha} for l, g in t.groupby("layer")]
        return interp.Spec.for_model(model, edits, analysis=self.name, prompts=finding.prompts,
                                     params={"alpha": alpha, "last_n": last_n})

    def explain(self, finding: Finding) -> str:
        m = finding.metrics
        r = m["max_over_median_by_layer"]
        return (f"Over {m['n_tokens']} answer token(s), the head whose output moves most when the image is removed "
                f"moves {min(r):.1f}–{max(r):.1f} times as much as the median head of its layer; the ratio is above 3 "
                f"in {m['layers_sparse_gt3']} of {len(r)} layers.")


vhd = VHD()
