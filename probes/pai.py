"""PAI: Liu et al., "Paying More Attention to Image: A Training-Free Method for Alleviating Hallucination in
LVLMs" (ECCV 2024; LALBJ/PAI attention.py, CFG.py). docs/methods.md §8a (METHODS.md §8, PAI row).

The finding picks PAI's layer scope from the model's own image attention. For item n, layer l, with q_n the
answer query (the last prompt token) and V_img the image tokens:

    s_l = mean_{n, h} Σ_{j∈V_img} A^{l,h}[q_n, j]          (the query's image-attention share)

PAI amplifies image attention where the model under-uses the image ("text inertia"): the scope is the layers
at or after ``start`` (PAI skips the first 2 of LLaVA-1.5's 32; by default here round(2/32·L)) whose share
is at most the mean share over those layers (``rule="low"``); ``rule="paper"`` keeps every layer from ``start``
on, as PAI's ``start_layer=2, end_layer=32``. ``to_spec`` exports both of PAI's steps:

* attention (``attn.amplify``): z'_{qj} = z_{qj} + α·|z_{qj}| for image keys j at the last query, before the
  softmax, in the scope's layers (α = 0.2, PAI's POPE/CHAIR setting);
* decoding (``decode.cfg``): ℓ' = γ(ℓ_img − ℓ_noimg) + ℓ_noimg on the tokens with p_img ≥ 0.1·max p_img (the others
  blocked), γ = 1.1, ℓ = log_softmax of the logits. The "no image" logits come from the same input with the image
  keys knocked out from every query in every layer (PAI's code drops the image tokens instead, so the text after
  them sits at shifted positions; here positions, and the image tokens' own states, are unchanged but no other
  token can read them). γ = 1 is an exact no-op (the step is skipped, as PAI's processor returns early).
"""
from __future__ import annotations

import pandas as pd
import torch

import interp
from interp import ops, vlm
from interp.analysis import Analysis
from interp.finding import Finding, digest
from viz import interactive as _interactive
from viz import static as _static

RULES = ("low", "paper")


def _items(model, inputs) -> list[vlm.VQAItem]:
    from probes.image_attention import vqa_items
    return vqa_items(model, inputs)


def image_share(model: interp.Model, batch) -> torch.Tensor:
    """float [N, L, H]: the answer query's attention mass on the image tokens, every layer and head."""
    from probes.image_attention import attention_maps
    return attention_maps(model, batch).sum(-1)


def scope(share: torch.Tensor, start: int, rule: str = "low") -> list[int]:
    """PAI's layers from the per-layer image share [L]: layers ≥ ``start``, all of them (``paper``) or those at
    or below their mean share (``low``)."""
    if rule not in RULES:
        raise interp.InterpError(f"rule={rule!r}: use one of {RULES}")
    L = share.shape[0]
    if not 0 <= start < L:
        raise interp.InterpError(f"start={start}: PAI's scope must start at a layer in 0..{L - 1}")
    cand = list(range(start, L))
    if rule == "paper":
        return cand
    mean = float(share[cand].mean())
    return [l for l in cand if float(share[l]) <= mean]


class PAI(Analysis):
    """The answer query's image-attention share per layer, PAI's layer scope, and the PAI spec (attention + CFG)."""

    name = "probes.pai"
    title = "PAI: image attention scope"
    requires = ("vision", "causal")
    figures = (_static.generic, _interactive.generic)

    def run(self, model: interp.Model, inputs: list | None = None, *, start: int | None = None,
            rule: str = "low") -> Finding:
        """``inputs``: VQAItems (None: the testbed's held-out items); ``start``: first layer PAI may edit
        (default round(2/32·L)); ``rule``: ``low`` or ``paper`` (see the module docstring)."""
        items = _items(model, inputs)
        L = model.n_layers
        start = start if start is not None else round(2 * L / 32)
        batch = vlm.encode_vqa(model, items)
        share = image_share(model, batch)  # [N, L, H]
        per_layer = share.mean((0, 2))
        layers = scope(per_layer, start, rule)
        n_img = len(batch.roles[0]["image"])
        uniform = torch.tensor([n_img / (r["query"][0] + 1) for r in batch.roles]).mean()
        table = pd.DataFrame({"layer": range(L), "image_share": per_layer.tolist(),
                              "image_share_min_head": share.mean(0).min(1).values.tolist(),
                              "image_share_max_head": share.mean(0).max(1).values.tolist(),
                              "in_scope": [l in layers for l in range(L)]})
        metrics = {"n_items": len(items), "layers": layers, "start": start, "rule": rule,
                   "image_share": [round(float(x), 4) for x in per_layer],
                   "uniform_share": float(uniform), "image_tokens": n_img}
        return Finding(self.name, table, {"start": start, "rule": rule}, model.identity(), digest(batch.input_ids),
                       metrics, {"image_share": share})

    def to_spec(self, finding: Finding, model: interp.Model, *, alpha: float = 0.2, gamma: float = 1.1,
                cutoff: float = 0.1, layers: list[int] | None = None, parts: tuple[str, ...] = ("attention", "cfg")
                ) -> interp.Spec:
        """PAI's attention step (α) in the finding's scope (or ``layers``) and/or its CFG step (γ, cutoff)."""
        bad = set(parts) - {"attention", "cfg"}
        if bad or not parts:
            raise interp.InterpError(f"parts={parts!r}: give 'attention', 'cfg' or both")
        layers = list(layers if layers is not None else finding.metrics["layers"])
        edits = []
        if "attention" in parts:
            if not layers:
                raise interp.InterpError("PAI's attention step needs at least one layer: the finding's scope is empty; "
                                         "pass layers= or run with rule='paper'")
            edits.append(ops.amplify(layers, "role:image", alpha, queries="last"))
        if "cfg" in parts:
            edits.append(ops.cfg(gamma, keys="role:image", cutoff=cutoff))
        return interp.Spec.for_model(model, edits, analysis=self.name, prompts=finding.prompts,
                                     params={"alpha": alpha, "gamma": gamma, "cutoff": cutoff, "layers": layers,
                                             "parts": list(parts), "method": "pai"})

    def explain(self, finding: Finding) -> str:
        m = finding.metrics
        sh = ", ".join(f"{x:.2f}" for x in m["image_share"])
        return (f"The answer query gives the image {sh} of its attention by layer (a uniform spread would give "
                f"{m['uniform_share']:.2f}); PAI's scope ({m['rule']} rule, from layer {m['start']}) is layers "
                f"{m['layers']}.")


pai = PAI()
