"""Visual attention sinks and VAR: Kang et al., "See What You Are Told: Visual Attention Sink in Large
Multimodal Models" (ICLR 2025; seilk/VisAttnSink, src/logic/logic.py), METHODS §1d.

Sink dimensions D_sink (calibrated per model): RMS-normalise (no gain, fp32) the input hidden state of
the middle layer, x̂ = x / sqrt(mean(x²) + 1e−6), and take the top-2 dimensions by median |x̂_c| at the
BOS token over the prompts. Per layer l (its input hidden state x):

    φ(x_j) = max_{c ∈ D_sink} |x̂_{j,c}|;   token j is a sink if φ(x_j) > τ.

τ = 20 in LLaMA-2 (d = 4096). Since Σ_c x̂_c² = d, φ ≤ √d: τ is only meaningful relative to √d, so the
per-model default is τ = 20·√(d/4096) (the paper's threshold at the same fraction of √d).

Image-centric heads, per layer l, head h and query q, with a = A^{l,h}[q], S_v the image sinks:

    r_sink = Σ_{j∈S_v} a_j / Σ_{j∈V_img} a_j;   selected if r_sink ≤ ρ and Σ_{j∈V_img} a_j ≥ summ
    (ρ = 0.5, summ = 0.2).

``to_spec`` → VAR (P2, rows keep their sum): in the selected heads, a'_j = p·a_j on every sink (text and
visual), and the removed mass Ω = (1−p)Σ_{sinks} a goes to the non-sink image tokens in proportion to
their weights (``attn.scale_weights`` with ``keys: sink``, ``redistribute_to: role:image``, p = 0.6).
Here the queries are the answer queries (``last`` for AR, the masked answer region for diffusion) and
heads are selected statically (selected on ≥ half the prompts); the paper selects per (h, q) at run time.

Inputs: :class:`interp.vlm.VQAItem` items, a Batch, or anything ``model.encode`` takes with the image tokens in
it (and ``pixel_values``). The answer query is each row's ``query`` role, else its last real token. Where the
rows say where the objects are (role ``objects``), the share of image sinks on the background is reported;
otherwise that metric is None and a note says why.
"""
from __future__ import annotations

import math

import pandas as pd
import torch

import interp
from interp.capture import QueryRow
from interp import vlm
from interp.analysis import Analysis
from interp.finding import Finding, digest
from interp.roles import Batch, Roles
from viz import interactive as _interactive
from viz import static as _static


def _rms_norm(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def default_tau(model: interp.Model) -> float:
    """τ = 20·√(d/4096): the paper's LLaMA-2 threshold at the same fraction of the bound φ ≤ √d."""
    return 20.0 * math.sqrt(model.d_model / 4096)


def calibrate_dims(model: interp.Model, batch, layer: int | None = None, k: int = 2) -> list[int]:
    """D_sink: the top-k dimensions by median |RMSNorm(x)| at the BOS token of the middle layer's input."""
    layer = model.n_layers // 2 if layer is None else layer
    tr = interp.capture(model, batch, sites=f"blocks.{layer}.resid_pre")
    xb = _rms_norm(tr[f"blocks.{layer}.resid_pre"][:, 0])  # [b, d]
    return [int(c) for c in xb.abs().median(0).values.topk(k).indices]


def _batch(model: interp.Model, inputs, gen_len: int | None) -> Batch:
    """The inputs as a Batch whose every row has image tokens and a ``query`` role (its last real token if none)."""
    if inputs is None:
        from interp.testbed.items import default_items
        inputs = default_items(model)
    if isinstance(inputs, list) and inputs and isinstance(inputs[0], tuple):  # the testbed's (scene, question) pairs
        from interp.testbed.items import as_vqa_items, testbed_meta
        inputs = as_vqa_items(inputs, testbed_meta(model))
    if isinstance(inputs, vlm.VQAItem) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], vlm.VQAItem)):
        batch = vlm.encode_vqa(model, inputs, gen_len=gen_len)
    else:
        batch = model.encode(inputs)
    no_image = [i for i, r in enumerate(batch.roles) if not r.get("image")]
    if no_image:
        raise interp.InterpError(f"rows {no_image[:5]} have no image tokens: visual sinks are image tokens, so give a "
                                 "vision-language model inputs with its image tokens and pixel_values")
    if "pixel_values" not in batch.extra:
        raise interp.InterpError("the inputs have image tokens but no pixel_values: give the image too")
    roles = [r if r.get("query") else Roles({**r, "query": [r.length - 1]}, length=r.length) for r in batch.roles]
    return Batch(batch.input_ids, batch.attention_mask, roles, batch.tokens, batch.texts, batch.extra)


class VisualSinks(Analysis):
    """φ per (item, layer, token), the image sinks, and the image-centric heads at the answer query."""

    name = "probes.visual_sinks"
    title = "Visual attention sinks"
    requires = ("vision",)
    in_scan = True
    figures = (_static.generic, _interactive.generic)

    def run(self, model: interp.Model, inputs=None, *, dims: list[int] | None = None, tau: float | None = None,
            rho: float = 0.5, summ: float = 0.2, chunk: int = 128, gen_len: int | None = None) -> Finding:
        """``inputs``: VQAItems, a Batch, or what ``model.encode`` takes (None: the testbed's held-out items)."""
        return _run(model, _batch(model, inputs, gen_len), dims, tau, rho, summ, chunk)

    def to_spec(self, finding: Finding, model: interp.Model, *, p: float = 0.6, layers: list[int] | None = None,
                min_rate: float = 0.5, queries: str | None = None) -> interp.Spec:
        """VAR: in the image-centric heads (selected on ≥ ``min_rate`` of the prompts), scale the attention of the
        answer queries to every sink by p and give the removed mass to the non-sink image tokens.
        ``layers`` default: 2..L−2 as in the paper (except the last), or 1..L−1 for models of < 5 layers."""
        L = model.n_layers
        layers = layers if layers is not None else (list(range(2, L - 1)) if L >= 5 else list(range(1, L)))
        t = finding.table[(finding.table.score >= min_rate) & finding.table.layer.isin(layers)]
        if t.empty:
            raise interp.InterpError("no image-centric heads in the chosen layers: lower min_rate or widen layers")
        queries = queries or ("last" if model.adapter.causal else "role:answer")
        edits = [{"op": "attn.scale_weights", "layers": [int(l)], "heads": sorted(map(int, g["head"])), "queries": queries,
                  "keys": "sink", "factor": p, "redistribute_to": "role:image"} for l, g in t.groupby("layer")]
        return interp.Spec.for_model(model, edits, analysis="probes.visual_sinks", prompts=finding.prompts,
                                     params={"p": p, "min_rate": min_rate, "layers": layers},
                                     sink={"dims": finding.params["dims"], "tau": finding.params["tau"]})

    def explain(self, finding: Finding) -> str:
        m = finding.metrics
        per = m["image_sinks_per_prompt_by_layer"]
        bg = m["image_sinks_in_background"]
        where = "" if bg is None else f", {bg * 100:.0f} % of them on the background"
        return (f"Image tokens above the sink threshold τ = {m['tau']:.2f} (φ ≤ {m['phi_bound_sqrt_d']:.1f}): at most "
                f"{max(per):.1f} per prompt in any layer{where}; {m['n_image_centric_heads']} image-centric heads "
                f"over {m['n_prompts']} prompts.")


def _run(model, batch: Batch, dims, tau, rho, summ, chunk) -> Finding:
    dims = calibrate_dims(model, batch) if dims is None else list(dims)
    tau = default_tau(model) if tau is None else float(tau)
    L, H = model.n_layers, model.n_heads
    phis, rows = [], []
    for i in range(0, len(batch), chunk):
        b = vlm.slice_batch(batch, i, min(len(batch), i + chunk))
        tr = interp.capture(model, b, sites="blocks.*.resid_pre", reducers=[QueryRow(query="role:query")])
        x = tr.stack("resid_pre")  # [L, b, T, d]
        phi = _rms_norm(x)[..., dims].abs().amax(-1)  # [L, b, T]
        pad = torch.full((L, len(b), batch.input_ids.shape[1] - phi.shape[-1]), float("nan"))
        phis.append(torch.cat([phi, pad], -1))
        rows.append(tr.stack("attn.query_row"))  # [L, b, H, T]
        if rows[-1].shape[-1] < batch.input_ids.shape[1]:
            rows[-1] = torch.nn.functional.pad(rows[-1], (0, batch.input_ids.shape[1] - rows[-1].shape[-1]))
    phi = torch.cat(phis, 1).permute(1, 0, 2)  # [N, L, T]
    A = torch.cat(rows, 1).permute(1, 0, 2, 3)  # [N, L, H, T]
    N = len(batch)
    img = torch.zeros(N, batch.input_ids.shape[1], dtype=torch.bool)
    obj = torch.zeros_like(img)
    for n, r in enumerate(batch.roles):
        img[n, r["image"]] = True
        for p in r.get("objects", []):
            obj[n, p] = True
    sink = (phi > tau) & batch.attention_mask.bool()[:, None, :]  # [N, L, T]
    vsink = sink & img[:, None]
    mass_img = (A * img[:, None, None]).sum(-1)  # [N, L, H]
    mass_vs = (A * vsink[:, :, None]).sum(-1)
    r_sink = mass_vs / mass_img.clamp_min(1e-30)
    selected = (r_sink <= rho) & (mass_img >= summ)
    # attention per image sink token relative to the mean non-sink image token (sinks draw attention?)
    n_vs = vsink.sum(-1, keepdim=True).float()  # [N, L, 1]
    n_ns = (img[:, None] & ~vsink).sum(-1, keepdim=True).float()
    per_sink = mass_vs / n_vs.clamp_min(1)
    per_other = (mass_img - mass_vs) / n_ns.clamp_min(1)
    recs = []
    for l in range(L):
        for h in range(H):
            has = n_vs[:, l, 0] > 0
            ratio = (per_sink[has, l, h] / per_other[has, l, h].clamp_min(1e-30)).mean() if has.any() else torch.tensor(float("nan"))
            recs.append({"layer": l, "head": h, "score": float(selected[:, l, h].float().mean()),
                         "image_mass": float(mass_img[:, l, h].mean()), "r_sink": float(r_sink[:, l, h].mean()),
                         "sink_attention_ratio": float(ratio)})
    table = pd.DataFrame(recs)
    bos_phi = phi[:, :, 0].median(0).values
    img_phi = torch.where(img[:, None], phi, torch.nan)
    n_img_sinks = vsink.sum(-1).float().mean(0)
    located = all("objects" in r for r in batch.roles)
    bg = img[:, None] & ~obj[:, None]
    metrics = {"dims": dims, "tau": round(tau, 4), "phi_bound_sqrt_d": round(math.sqrt(model.d_model), 3),
               "bos_phi_by_layer": [round(float(v), 3) for v in bos_phi],
               "bos_is_sink_by_layer": [float(v) for v in sink[:, :, 0].float().mean(0)],
               "image_phi_median_by_layer": [round(float(v), 3) for v in img_phi.nanmedian(-1).values.nanmedian(0).values],
               "image_phi_max_by_layer": [round(float(v), 3) for v in torch.nan_to_num(img_phi, -1).amax((0, 2))],
               "image_sinks_per_prompt_by_layer": [round(float(v), 3) for v in n_img_sinks],
               "image_sinks_in_background": float((vsink & bg).sum() / vsink.sum().clamp_min(1))
               if vsink.any() and located else None,
               "n_image_centric_heads": int((table.score >= 0.5).sum()), "n_prompts": N,
               "rho": rho, "summ": summ}
    notes = [] if located else ["the inputs do not say where the objects are (no 'objects' role): the share of "
                                "image sinks on the background is not computed"]
    return Finding("probes.visual_sinks", table, {"dims": dims, "tau": tau, "rho": rho, "summ": summ},
                   model.identity(), digest(batch.input_ids), metrics,
                   {"phi": phi, "r_sink": r_sink, "image_mass": mass_img, "selected": selected, "sinks": sink}, notes)


visual_sinks = VisualSinks()
