"""Where does the answer query look in the image? Attention-to-image maps, scored against ground truth.

For item n, layer l and head h, with q_n the position whose logits give the answer (the last prompt
token in an AR model; the first fully masked answer position in a masked-diffusion model) and
V_img the image tokens in patch order:

    M^{l,h}_n[p] = A^{l,h}[q_n, V_img[p]]            (p = 0..63, the 8×8 patch grid)
    M^{l}_n = mean_h M^{l,h}_n                        (the layer map)

Items are :class:`interp.vlm.VQAItem` (any LLaVA-style model, any images with the answer's object as boxes or
a mask; the testbed makes them with ``interp.testbed.items.as_vqa_items``). Each map is scored with the
localisation scores of :mod:`interp.vlm`: the pointing game (argmax patch inside the question's object) and energy in box (share of the map's
mass on the object), each with a 95% bootstrap interval, next to three references: random maps,
the all-objects map (ignores the question) and occlusion (the drop of the answer logit when one
patch is blanked out). Raw attention as an explanation: Jain & Wallace 2019 ("Attention is not
Explanation") and Abnar & Zuidema 2020 (attention rollout); attention-to-image localisation in
LVLMs: Zhang et al. NAACL'25 (LLaVA-CAM, METHODS §5) and Kang et al. ICLR'25 (visual sinks, §1d).

``to_spec`` turns the layers whose maps localise best into a PAI spec (Liu et al., ECCV'24:
z'_{qk} = z_{qk} + α|z_{qk}| for image keys at the answer query, METHODS §8).
"""
from __future__ import annotations

import math

import pandas as pd
import torch

import interp
from interp import vlm
from interp.analysis import Analysis
from interp.capture import QueryRow
from interp.finding import Finding, digest
from viz import interactive as _interactive
from viz import static as _static


def attention_maps(model: interp.Model, batch, chunk: int = 128) -> torch.Tensor:
    """float [N, L, H, n]: the query's attention to each image token, every layer and head."""
    out = []
    for i in range(0, len(batch), chunk):
        b = vlm.slice_batch(batch, i, min(len(batch), i + chunk))
        tr = interp.capture(model, b, reducers=[QueryRow(query="role:query")])
        rows = tr.stack("attn.query_row").permute(1, 0, 2, 3)  # [b, L, H, T]
        img = torch.tensor([r["image"] for r in b.roles])  # [b, n]
        out.append(torch.gather(rows, 3, img[:, None, None, :].expand(-1, rows.shape[1], rows.shape[2], -1)))
    return torch.cat(out)


def vqa_items(model: interp.Model, inputs) -> list[vlm.VQAItem]:
    """The VQA items an image analysis reads: the testbed's default items when ``inputs`` is None, the testbed's
    (scene, question) pairs, or anything :func:`interp.vlm.as_items` takes."""
    if inputs is None:
        from interp.testbed.items import default_items
        return default_items(model)
    if isinstance(inputs, list) and inputs and isinstance(inputs[0], tuple):  # the testbed's (scene, question) pairs
        from interp.testbed.items import as_vqa_items, testbed_meta
        inputs = as_vqa_items(inputs, testbed_meta(model))
    return vlm.as_items(inputs, model)


def _items(model, inputs) -> list[vlm.VQAItem]:
    items = vqa_items(model, inputs)
    missing = [k for k, it in enumerate(items) if not it.has_target]
    if missing:
        raise interp.InterpError(f"items {missing[:5]} say nowhere where the answer's object is: localisation needs "
                                 "boxes (pixels) or a mask on every item")
    return items


class ImageAttention(Analysis):
    """Localisation of the answer query's attention to the image, per layer and per head."""

    name = "probes.image_attention"
    title = "Attention to the image"
    requires = ("vision",)
    in_scan = True
    figures = (_static.image_map, _interactive.image_map)

    def run(self, model: interp.Model, inputs: list | None = None, *, occlusion: bool = True, seed: int = 0,
            n_boot: int = 1000, gen_len: int | None = None) -> Finding:
        """``inputs``: VQAItems whose answer is about one object (None: the testbed's held-out items)."""
        items = _items(model, inputs)
        batch = vlm.encode_vqa(model, items, gen_len=gen_len)
        maps = attention_maps(model, batch)  # [N, L, H, n]
        N, L, H, n = maps.shape
        masks, refs = vlm.reference_maps(model, items, occlusion=occlusion, seed=seed, gen_len=gen_len)
        rows = []
        for l in range(L):
            for h in list(range(H)) + [-1]:
                m = maps[:, l].mean(1) if h == -1 else maps[:, l, h]
                s = vlm.score_maps(m, masks, n_boot=n_boot, seed=seed)
                rows.append({"layer": l, "head": h, "pointing": s["pointing"], "pointing_lo": s["pointing_ci"][0],
                             "pointing_hi": s["pointing_ci"][1], "energy": s["energy"], "energy_lo": s["energy_ci"][0],
                             "energy_hi": s["energy_ci"][1]})
        table = pd.DataFrame(rows)
        ref_table = vlm.localisation_table(refs, masks, n_boot=n_boot, seed=seed)
        heads = table[table["head"] >= 0]
        best = heads.loc[heads.pointing.idxmax()]
        layer_rows = table[table["head"] == -1]
        best_layer = int(layer_rows.loc[layer_rows.pointing.idxmax(), "layer"])
        metrics = {"n_items": N, "query": "last token" if model.adapter.causal else "first masked answer position",
                   "layer_pointing": [round(float(x), 4) for x in layer_rows.pointing],
                   "layer_energy": [round(float(x), 4) for x in layer_rows.energy],
                   "best_head": [int(best.layer), int(best["head"])], "best_head_pointing": float(best.pointing),
                   "best_layer": best_layer,
                   "references": {r.method: {"pointing": round(float(r.pointing), 4), "energy": round(float(r.energy), 4),
                                             "pointing_ci": [round(float(r.pointing_lo), 4),
                                                             round(float(r.pointing_hi), 4)]}
                                  for r in ref_table.itertuples()}}
        g = math.isqrt(n)
        grid = (g, n // g) if g * g == n else (1, n)
        ex = 0  # the first item, for the overlay figure
        arrays = {"maps": maps, "map": maps[ex].mean(1).reshape(L, *grid), "image": items[ex].shown_image(),
                  "target": masks[ex].reshape(*grid).float()}
        if occlusion:
            arrays["occlusion"] = refs["occlusion"]
        return Finding(self.name, table,
                       {"layer": best_layer, "map_label": "attention from the answer query", "seed": seed},
                       model.identity(), digest(batch.input_ids), metrics, arrays,
                       ["head = -1 rows score the head-mean map of the layer"])

    def to_spec(self, finding: Finding, model: interp.Model, *, alpha: float = 0.2, layers: list[int] | None = None,
                queries: str | None = None) -> interp.Spec:
        """PAI: amplify the answer query's image logits, z' = z + α|z|, in ``layers`` (default: the layers whose
        head-mean map beats the all-objects reference in the pointing game, else the best layer)."""
        t = finding.table[finding.table["head"] == -1]
        if layers is None:
            ref = finding.metrics["references"]["all_objects"]["pointing"]
            layers = sorted(int(l) for l in t[t.pointing > ref].layer) or [int(finding.metrics["best_layer"])]
        queries = queries or ("last" if model.adapter.causal else "role:answer")
        return interp.Spec.for_model(model, [{"op": "attn.amplify", "layers": layers, "heads": "all",
                                              "queries": queries, "keys": "role:image", "alpha": alpha}],
                                     analysis=self.name, prompts=finding.prompts,
                                     params={"alpha": alpha, "layers": layers, "method": "pai"})

    def explain(self, finding: Finding) -> str:
        m = finding.metrics
        refs = m["references"]
        occ = f", occlusion {refs['occlusion']['pointing']:.2f}" if "occlusion" in refs else ""
        return (f"The answer query's head-mean attention points at the question's object in "
                f"{max(m['layer_pointing']) * 100:.0f} % of {m['n_items']} items at its best layer "
                f"({m['best_layer']}), against {refs['random']['pointing']:.2f} for random maps and "
                f"{refs['all_objects']['pointing']:.2f} for the all-objects map{occ}.")


image_attention = ImageAttention()
