"""EAH / EVAS: the image-densest head of a shallow layer, copied into every head of that layer (Zhang et al.,
"Seeing Clearly by Layer Two: Enhancing Attention Heads to Alleviate Hallucination in LVLMs", arXiv 2411.09968;
docs/methods.md §8).

For layer l, head h and prompt n, with V the image tokens and Q the text queries that see the image (the tokens
after the first image token in a causal model; every non-image token in a masked-diffusion model):

    ā^{l,h}_n[j] = mean_{q ∈ Q} A^{l,h}[q, j]                          (j ∈ V)
    density_n(h) = #{j ∈ V : ā^{l,h}_n[j] > δ}
    density(h)   = mean_n density_n(h),      h* = argmax_h density(h)

(ties broken by the larger mean image mass Σ_j ā^{l,h}_n[j]). ``to_spec`` exports the EAH edit: A'^{l,h} = A^{l,h*}
for every head h of layer l (``attn.replace_pattern``, ``mode: copy_head``, all queries; P3). Defaults: l =
min(2, L // 3) ("by layer two"; a third of the depth in shallow models), δ = 1e−3 [recon]. The paper's option of
copying only the image columns and renormalising is not implemented.
"""
from __future__ import annotations

import pandas as pd
import torch

import interp
from interp import vlm
from interp.analysis import Analysis
from interp.finding import Finding, digest


def densities(A: torch.Tensor, image: list[int], text: list[int], delta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(density [H], image mass [H]) of one prompt's layer pattern A [H, T, T]."""
    abar = A[:, text][:, :, image].double().mean(1)  # [H, |V|]
    return (abar > delta).sum(-1), abar.sum(-1)


def text_queries(roles, length: int, causal: bool) -> list[int]:
    """The queries whose attention to the image EAH averages: non-image tokens that can see the image."""
    img = set(roles["image"])
    first = min(img)
    return [p for p in range(length) if p not in img and (not causal or p > first)]


class EAH(Analysis):
    """Image-attention density per head in a shallow layer; the densest head and its copy_head spec."""

    name = "probes.eah"
    title = "Enhanced attention head (EAH)"
    requires = ("vision",)

    def run(self, model: interp.Model, inputs=None, *, layer: int | None = None, delta: float = 1e-3) -> Finding:
        """``inputs``: VQAItems (None: the testbed's held-out items)."""
        if inputs is None:
            from interp.testbed.items import default_items
            inputs = default_items(model)
        items = vlm.as_items(inputs, model)
        L, H = model.n_layers, model.n_heads
        layer = min(2, L // 3) if layer is None else int(layer)
        if not 0 <= layer < L:
            raise interp.InterpError(f"layer must be within 0..{L - 1}, got {layer}")
        if not 0 <= delta < 1:
            raise interp.InterpError(f"delta is an attention weight threshold in [0, 1), got {delta}")
        batch = vlm.encode_vqa(model, items)
        A = interp.capture(model, batch, sites=[f"blocks.{layer}.attn.pattern"])[f"blocks.{layer}.attn.pattern"]
        dens, mass = [], []
        for i, r in enumerate(batch.roles):
            n_tok = int(batch.attention_mask[i].sum())
            d, m = densities(A[i], list(r["image"]), text_queries(r, n_tok, model.adapter.causal), delta)
            dens.append(d)
            mass.append(m)
        dens_t, mass_t = torch.stack(dens).double(), torch.stack(mass)  # [N, H]
        dm, mm = dens_t.mean(0), mass_t.mean(0)
        order = sorted(range(H), key=lambda h: (-float(dm[h]), -float(mm[h])))
        best = order[0]
        n_img = len(batch.roles[0]["image"])
        table = pd.DataFrame({"layer": layer, "head": list(range(H)), "density": dm.tolist(),
                              "image_mass": mm.tolist(), "best": [h == best for h in range(H)]})
        metrics = {"layer": layer, "delta": delta, "n_items": len(items), "n_image_tokens": n_img, "best_head": best,
                   "best_density": round(float(dm[best]), 3), "density_by_head": [round(float(x), 3) for x in dm],
                   "tied_on_density": int((dm == dm[best]).sum())}
        return Finding(self.name, table, {"layer": layer, "delta": delta}, model.identity(), digest(batch.input_ids),
                       metrics, {"density": dens_t, "image_mass": mass_t})

    def to_spec(self, finding: Finding, model: interp.Model, *, source_head: int | None = None,
                queries: str | None = None) -> interp.Spec:
        """EAH: every head of the finding's layer takes the pattern of the densest head (or ``source_head``)."""
        h = int(finding.metrics["best_head"] if source_head is None else source_head)
        layer = int(finding.params["layer"])
        edit = interp.ops.replace_pattern([layer], "copy_head", source_head=h, queries=queries)
        return interp.Spec.for_model(model, [edit], analysis=self.name, prompts=finding.prompts,
                                     params={"layer": layer, "source_head": h, "delta": finding.params["delta"]})

    def explain(self, finding: Finding) -> str:
        m = finding.metrics
        return (f"In layer {m['layer']}, head {m['best_head']} attends above δ = {m['delta']:g} to "
                f"{m['best_density']:.1f} of {m['n_image_tokens']} image tokens on average over {m['n_items']} "
                f"prompts, the most of the layer's heads (densities {', '.join(f'{x:g}' for x in m['density_by_head'])}).")


eah = EAH()
