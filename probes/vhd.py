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
from interp.finding import Finding, digest


def _z_last(model, ids, am, extra, position: int = -1) -> torch.Tensor:
    """Per-head output at ``position`` (default the last), every layer: [L, H, d]."""
    tr = interp.capture(model, {"input_ids": ids, "attention_mask": am, **extra}, sites="blocks.*.attn.z")
    return tr.stack("attn.z")[:, 0, position]


def vhd(model: interp.Model, inputs: dict, *, n_tokens: int = 1, k: int = 8, prune: bool = True,
        answer_ids: list[int] | None = None, position: int = -1) -> Finding:
    """VHD per (step, layer, head) for one image prompt (``inputs``: input_ids [1, T] with image tokens, pixel_values).

    ``position`` (counted from the end, with the answer prefix appended) is the query compared; for a
    masked-diffusion model give the prompt with its masked answer region and ``position=-gen_len`` (the first
    masked answer position) with ``answer_ids=[y]`` (one step, no prefix)."""
    ad = model.adapter
    ids = torch.as_tensor(inputs["input_ids"])
    if ids.shape[0] != 1:
        raise interp.InterpError("vhd takes one prompt at a time (input_ids of shape [1, T])")
    img = ids[0] == ad.image_token_id
    if not img.any():
        raise interp.InterpError("the prompt has no image tokens: VHD compares with and without the image")
    extra = {k_: v for k_, v in inputs.items() if k_ not in ("input_ids", "attention_mask")}
    text_ids = ids[:, ~img]
    if answer_ids is None:  # greedy answer with the image
        answer_ids, cur = [], ids
        for _ in range(n_tokens):
            with torch.no_grad():
                nxt = int(model.hf(input_ids=cur, attention_mask=torch.ones_like(cur), **extra).logits[0, -1].argmax())
            answer_ids.append(nxt)
            cur = torch.cat([cur, torch.tensor([[nxt]])], 1)
    rows, V, TA = [], [], []
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
    for l in range(L):
        for h in range(H):
            rows.append({"layer": l, "head": h, "score": float(mean[l, h]), "ta": float(TA[:, l, h].mean()),
                         "selected": bool(selected[:, l, h].float().mean() > 0.5)})
    table = pd.DataFrame(rows)
    med = mean.median(-1).values.clamp_min(1e-12)
    sparsity = (mean.max(-1).values / med)
    metrics = {"n_tokens": len(answer_ids), "tvhd": [float(x) for x in tvhd],
               "max_over_median_by_layer": [round(float(x), 2) for x in sparsity],
               "layers_sparse_gt3": int((sparsity > 3).sum()), "answer_ids": list(answer_ids)}
    if model.tokenizer is not None:
        metrics["answer"] = model.tokenizer.decode(answer_ids)
    return Finding("probes.vhd", table, {"k": k, "prune": prune, "position": position}, model.identity(), digest(ids), metrics,
                   {"vhd": V, "ta": TA, "selected": selected})


def to_spec(finding: Finding, model: interp.Model, *, alpha: float = 2.0, last_n: int | None = None,
            queries: str | None = None) -> interp.Spec:
    """VHR: scale the selected heads (VHD above the layer median) by α in the last N layers (default: last half),
    at the answer queries (``last``; the masked answer region ``role:answer`` for a diffusion model)."""
    L = model.n_layers
    last_n = max(1, L // 2) if last_n is None else last_n
    t = finding.table[finding.table.selected & (finding.table.layer >= L - last_n)]
    if t.empty:
        raise interp.InterpError("no heads selected in the chosen layers")
    edits = [{"op": "attn.head_scale", "layers": [int(l)], "heads": sorted(map(int, g["head"])), "queries": queries or ("last" if model.adapter.causal else "role:answer"),
              "factor": alpha} for l, g in t.groupby("layer")]
    return interp.Spec.for_model(model, edits, analysis="probes.vhd", prompts=finding.prompts,
                                 params={"alpha": alpha, "last_n": last_n})
