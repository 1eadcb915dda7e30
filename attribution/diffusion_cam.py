"""Diffusion-CAM: a contrastive Grad-CAM for masked-diffusion multimodal LMs and its four post-filters.
Zuo et al., ACL'26 (ZzzzzZhhmm/Diffusion-CAM: predict.py, method/diffusion_cam/numpy_ops.py). METHODS §6b.

1. Decode the answer with LLaDA low-confidence remasking (:func:`interp.diffusion.denoise`).
2. Take the sequence state x_s at a *structurally valid* step s (one whose forward holds the whole image
   span; with no prefix cache every step does): s = 0 is the first conditioning step (the answer fully
   masked), s = n_steps (default, the source's teacher-forced forward) the final sequence. The Finding
   records ``step_used``. Features leaving the last block at image tokens reach no logit (zero gradient).
3. Features F = the residual stream leaving block ``layer`` at the n image tokens (the source: block 10
   of 32; default here round(10/32 · L)), and the contrastive target, with t_tgt = the second generated
   word (the first if there is one) and t_dis = the first other generated word (else the last generated
   position):
       ``contrast="vocab_sum"`` (the source):  y = Σ_v logits[t_tgt, v] − Σ_v logits[t_dis, v]
       ``contrast="token"``:                    y = logits[t_tgt, x̂] − logits[t_dis, x̂],  x̂ = token at t_tgt
4. G = ReLU(∂y/∂F),  w_c = mean_u G_{u,c},  CAM_u = mean_c ReLU(w_c F_{u,c}),  raw = min-max(CAM).

Post-filters, each switchable, applied in order on the h×w map (each keeps values in [0, max(raw)]):
:func:`akd`, :func:`dacg`, :func:`cba`, :func:`sicd` (formulas in their docstrings).
"""
from __future__ import annotations

import math
from typing import Sequence

import pandas as pd
import torch
import torch.nn.functional as Fn

import interp
from interp import vlm
from interp.analysis import Analysis
from interp.finding import Finding, digest
from interp.roles import Batch, Roles
from viz import interactive as _interactive
from viz import static as _static

STAGES = ("raw", "akd", "dacg", "cba", "sicd")


# ------------------------------------------------------------------------------------------ post-filters
def akd_kernel_size(sigma: float, size: int, step_ratio: float = 0.5) -> int:
    """k = clip(odd(⌊3 · min(n/16, 2) · min(5σ, 2) · min(size/512, 1.5)⌋), 3, 11), n = ⌊1/step_ratio⌋
    (the source passes the map's height as ``size`` and step_ratio = 0.5)."""
    k = int(3 * min(int(1 / step_ratio) / 16, 2.0) * min(5 * sigma, 2.0) * min(size / 512, 1.5))
    k += 1 - k % 2
    return max(3, min(k, 11))


def akd(m: torch.Tensor, step_ratio: float = 0.5) -> torch.Tensor:
    """Adaptive Kernel Denoising: a rank-Gaussian filter with k from :func:`akd_kernel_size`. In each k×k
    window (reflect padding) sort the values s_0 ≤ … ≤ s_{k²−1}; with r_i = i − ⌊k²/2⌋ and ς = std(s)/mean(s),
    out = Σ_i s_i e^{−r_i²/(2ς²)} / Σ_i e^{−r_i²/(2ς²)}  (a soft median; 0 where mean(s) ≤ 0, mean(s) where
    ς = 0). The source's 1e-6 · max jitter before filtering is left out (deterministic here)."""
    k = akd_kernel_size(float(m.std(unbiased=False)), m.shape[0], step_ratio)
    p = k // 2
    x = Fn.pad(m[None, None].double(), (p, p, p, p), mode="reflect")
    s = Fn.unfold(x, k)[0].T.sort(-1).values  # [h*w, k²]
    mean, std = s.mean(-1, keepdim=True), s.std(-1, unbiased=False, keepdim=True)
    r = (torch.arange(k * k, dtype=torch.float64) - k * k // 2)[None]
    w = torch.exp(-r ** 2 / (2 * (std / mean.clamp_min(1e-300)).clamp_min(1e-300) ** 2))
    val = (s * w).sum(-1, keepdim=True) / w.sum(-1, keepdim=True)
    val = torch.where(std > 0, val, mean)
    return torch.where(mean > 0, val, torch.zeros_like(val)).view(m.shape).to(m.dtype)


def dacg(m: torch.Tensor, d_sigma: float = 0.22, d_mu: float = 0.35, d_mu_low: float = 0.25) -> torch.Tensor:
    """Distribution-Aware Confidence Gating: percentile p = 90 if σ > δσ, else 75 if μ > δμ, else 80 if
    μ < δμ′, else 85 (μ, σ of the map); θ = max(P_p(nonzero values), 1e-6). The values ≤ θ, read in
    row-major order, are smoothed with the 3-tap Gaussian (σ = 0.3, reflect borders) along that list; values
    > θ stay. (The source calls cv2.GaussianBlur(ksize=(3, 1)) on an n×1 column, which leaves it unchanged;
    here the blur runs along the list, as described.)"""
    nz = m[m > 0]
    if nz.numel() == 0:
        return m.clone()
    mu, sd = float(m.mean()), float(m.std(unbiased=False))
    pct = 90 if sd > d_sigma else 75 if mu > d_mu else 80 if mu < d_mu_low else 85
    theta = max(float(torch.quantile(nz.double(), pct / 100)), 1e-6)
    low = m <= theta
    out = m.clone()
    v = m[low].double()
    if v.numel() > 1:
        g = torch.exp(-torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64) / (2 * 0.3 ** 2))
        v = Fn.conv1d(Fn.pad(v[None, None], (1, 1), mode="reflect"), (g / g.sum())[None, None])[0, 0]
    out[low] = v.to(m.dtype)
    return out


def cba(m: torch.Tensor, max_value: float | None = None) -> torch.Tensor:
    """Contextual Background Attenuation: θ = 0.15·P50(nonzero) + 0.15·P60(all) + 0.2·mean(nonzero)
    + 0.3·(0.05·max); for v < θ: f = clip(v/θ, 0, 1), f ← 0.3 f where v < 0.2θ, v ← v · clip(f, 0.5, 1);
    then clip to [0, max_value] (the raw map's max)."""
    nz = m[m > 0].double()
    if nz.numel():
        theta = (0.15 * torch.quantile(nz, 0.5) + 0.15 * torch.quantile(m.double().flatten(), 0.6)
                 + 0.2 * nz.mean() + 0.3 * 0.05 * m.max()).item()
    else:
        theta = 1e-6
    f = (m / max(theta, 1e-8)).clamp(0, 1)
    f = torch.where(m < 0.2 * theta, 0.3 * f, f).clamp(0.5, 1.0)
    out = torch.where(m < theta, m * f, m)
    return out.clamp(0, float(m.max()) if max_value is None else max_value)


def sicd(m: torch.Tensor, tokens: Sequence[int], max_value: float | None = None) -> torch.Tensor:
    """Single-Instance Causal Debiasing. First H = min-max(m) · max_value (the source normalises to [0, 1] here;
    ``max_value`` = the raw map's max, 1 for a min-max raw map, default max(m)). Interference
    I = 0.05 · (#distinct repeated tokens / #tokens) everywhere + 0.02 where H > μ + 2σ; c* = argmin_c
    ‖H − cI‖² = ⟨H, I⟩/⟨I, I⟩, capped at 0.5; H' = max(H − c*I, 0), kept unless its range shrinks by more
    than 10% (then H)."""
    lo, hi = m.min(), m.max()
    top = float(hi) if max_value is None else max_value
    H = (m - lo) / (hi - lo) * top if hi > lo else m.clone()
    toks = list(tokens)
    counts = {t: toks.count(t) for t in set(toks)}
    I = torch.full_like(H, 0.05 * sum(c > 1 for c in counts.values()) / max(len(toks), 1))
    I = I + 0.02 * (H > H.mean() + 2 * H.std(unbiased=False))
    if float(I.max()) <= 0:
        return H
    c = min(float((H * I).sum() / (I * I).sum()), 0.5)
    out = (H - c * I).clamp(min=0)
    return H if (out.max() - out.min()) < 0.9 * (H.max() - H.min()) else out


def refine(raw: torch.Tensor, tokens: Sequence[int], *, akd_on: bool = True, dacg_on: bool = True,
           cba_on: bool = True, sicd_on: bool = True) -> dict[str, torch.Tensor]:
    """Every stage of the cumulative pipeline: {"raw", "akd", "dacg", "cba", "sicd"} (a switched-off
    module passes its input on)."""
    out = {"raw": raw}
    m = akd(raw) if akd_on else raw
    out["akd"] = m
    m = dacg(m) if dacg_on else m
    out["dacg"] = m
    m = cba(m, float(raw.max())) if cba_on else m
    out["cba"] = m
    out["sicd"] = sicd(m, tokens, float(raw.max())) if sicd_on else m
    return out


# ------------------------------------------------------------------------------------------ raw map
def _positions(gen: torch.Tensor, start: int, special: set[int]) -> tuple[int, int]:
    """(t_tgt, t_dis) from the generated tokens [gen_len] that start at ``start``."""
    words = [i for i, t in enumerate(gen.tolist()) if t not in special]
    tgt = words[1] if len(words) > 1 else (words[0] if words else 0)
    others = [i for i in words if i != tgt]
    dis = others[0] if others else (len(gen) - 1 if tgt != len(gen) - 1 else 0)
    return start + tgt, start + dis


def _prompt_batch(model: interp.Model, inputs, gen_len: int) -> Batch:
    """The prompts (VQAItems: without their masked answer region) as a Batch."""
    items = inputs if isinstance(inputs, list) else [inputs]
    if not (items and isinstance(items[0], vlm.VQAItem)):
        return model.encode(inputs)
    b = vlm.encode_vqa(model, items, gen_len=gen_len)
    if len(set(b.lengths)) != 1:
        raise interp.InterpError("Diffusion-CAM decodes a batch of equal-length prompts: give items whose prompts "
                                 "have the same number of tokens (or one at a time)")
    P = b.input_ids.shape[1] - gen_len
    roles = [Roles({k: v for k, v in r.items() if k not in ("answer", "query")}, length=P) for r in b.roles]
    return Batch(b.input_ids[:, :P], b.attention_mask[:, :P], roles, [t[:P] for t in b.tokens], b.texts, b.extra)


def contrastive_maps(model: interp.Model, inputs, *, gen_len: int, steps: int | None = None,
                     block_len: int | None = None, step: int | None = None, layer: int | None = None,
                     contrast: str = "vocab_sum", positions: tuple[int, int] | None = None,
                     special_ids: Sequence[int] | None = None) -> dict:
    """Decode, then the raw contrastive Grad-CAM (unnormalised CAM and min-max ``raw``, [B, n]) at ``step``
    for a batch of equal-length prompts, with the generated tokens and the positions used.

    ``positions`` = (t_tgt, t_dis), offsets into the generated region, overrides the choice from the generated
    words; otherwise the words are the generated tokens that are not special (``special_ids``, default the
    tokenizer's special tokens and the mask token). Without a tokenizer one of the two must be given."""
    from interp.diffusion import denoise
    if contrast not in ("vocab_sum", "token"):
        raise interp.InterpError(f"contrast must be 'vocab_sum' or 'token', got {contrast!r}")
    if model.adapter.mask_token_id is None:
        raise interp.InterpError("Diffusion-CAM needs the mask token id: set model.adapter.mask_token_id")
    tok = model.tokenizer
    if positions is None and special_ids is None and tok is None:
        raise interp.InterpError("without a tokenizer interp cannot tell the generated words from <eos>/<pad>: give "
                                 "positions=(t_tgt, t_dis) (offsets into the generated region) or special_ids")
    if positions is not None and not all(0 <= int(p) < gen_len for p in positions):
        raise interp.InterpError(f"positions {positions} must be offsets 0..{gen_len - 1} into the generated region")
    batch = _prompt_batch(model, inputs, gen_len)
    steps = steps or gen_len
    d = denoise(model, batch, gen_len=gen_len, steps=steps, block_len=block_len)
    step = d.n_steps if step is None else step
    if not 0 <= step <= d.n_steps:
        raise interp.InterpError(f"step {step} is out of range: decoding took {d.n_steps} steps (0..{d.n_steps})")
    P = batch.input_ids.shape[1]
    x = d.tokens.clone()
    x[:, P:] = torch.where(d.step_of >= step, model.adapter.mask_token_id, x[:, P:])  # state entering `step`
    layer = round(10 / 32 * model.n_layers) if layer is None else layer % model.n_layers
    ext = Batch(x, torch.ones_like(x), [Roles(dict(r), length=x.shape[1]) for r in batch.roles], batch.tokens, [],
                batch.extra)
    name = f"blocks.{layer}.resid_post"
    tr = interp.capture(model, ext, sites=name, layers=[layer], grad=True)
    logits = tr.output.logits
    special = (set(special_ids) if special_ids is not None else set(getattr(tok, "all_special_ids", []) or [])) \
        | {model.adapter.mask_token_id}
    pos = [(P + int(positions[0]), P + int(positions[1])) if positions is not None
           else _positions(d.tokens[b, P:], P, special) for b in range(len(ext))]
    rows = torch.arange(len(ext))
    t_tgt, t_dis = torch.tensor([p[0] for p in pos]), torch.tensor([p[1] for p in pos])
    if contrast == "vocab_sum":
        y = logits[rows, t_tgt].sum() - logits[rows, t_dis].sum()
    else:
        xh = d.tokens[rows, t_tgt]
        y = (logits[rows, t_tgt, xh] - logits[rows, t_dis, xh]).sum()
    y.backward(inputs=[tr[name]])
    img = torch.tensor([r["image"] for r in batch.roles])
    F = tr[name].detach()[rows[:, None], img].float()
    G = tr.grad(name)[rows[:, None], img].float().clamp(min=0)
    cam = (G.mean(1, keepdim=True) * F).clamp(min=0).mean(-1)  # mean_c ReLU(w_c F_c), [B, n]
    lo, hi = cam.amin(-1, keepdim=True), cam.amax(-1, keepdim=True)
    raw = torch.where(hi > lo, (cam - lo) / (hi - lo).clamp_min(1e-30), torch.zeros_like(cam))
    return {"cam": cam, "raw": raw, "generated": d.tokens[:, P:], "t_tgt": t_tgt,
            "t_dis": t_dis, "step": step, "layer": layer, "n_steps": d.n_steps}


class DiffusionCam(Analysis):
    """Diffusion-CAM of one image and prompt: the raw contrastive map and each post-filter stage."""

    name = "attribution.diffusion_cam"
    title = "Diffusion-CAM"
    requires = ("diffusion", "vision")
    in_scan = True
    figures = (_static.image_map, _interactive.image_map)

    def run(self, model: interp.Model, inputs=None, *, gen_len: int | None = None, steps: int | None = None,
            block_len: int | None = None, step: int | None = None, layer: int | None = None,
            contrast: str = "vocab_sum", akd_on: bool = True, dacg_on: bool = True, cba_on: bool = True,
            sicd_on: bool = True, image: torch.Tensor | None = None, positions: tuple[int, int] | None = None,
            special_ids: Sequence[int] | None = None) -> Finding:
        """Diffusion-CAM of one image + prompt: ``arrays["map"]`` = the refined map [h, w], ``arrays["raw"]``, every
        stage in ``arrays["stages"]`` [5, h, w]; the step, layer, target and distractor are in the metrics."""
        if inputs is None:
            from interp.testbed.items import default_items
            inputs = default_items(model)[:1]
        if isinstance(inputs, vlm.VQAItem):
            inputs = [inputs]
        if isinstance(inputs, list) and inputs and isinstance(inputs[0], vlm.VQAItem):
            gen_len = gen_len or inputs[0].gen_len
            image = inputs[0].shown_image() if image is None else image
        if not gen_len:
            raise interp.InterpError("give gen_len, the length of the answer region to decode")
        batch = _prompt_batch(model, inputs, gen_len)
        if len(batch) != 1:
            raise interp.InterpError(f"diffusion_cam takes one image and prompt at a time, got {len(batch)}")
        r = contrastive_maps(model, batch, gen_len=gen_len, steps=steps, block_len=block_len, step=step, layer=layer,
                             contrast=contrast, positions=positions, special_ids=special_ids)
        n = r["raw"].shape[-1]
        side = math.isqrt(n)
        shape = (side, n // side) if side * side == n else (1, n)
        st = refine(r["raw"][0].view(shape), r["generated"][0].tolist(), akd_on=akd_on, dacg_on=dacg_on,
                    cba_on=cba_on, sicd_on=sicd_on)
        stages = torch.stack([st[k] for k in STAGES])
        tok = model.tokenizer
        name = (lambda i: tok.convert_ids_to_tokens(int(i))) if tok is not None else str
        x = batch.input_ids.shape[1]
        gen = r["generated"][0]
        metrics = {"step_used": r["step"], "n_steps": r["n_steps"], "layer": r["layer"], "contrast": contrast,
                   "t_tgt": int(r["t_tgt"][0]), "t_dis": int(r["t_dis"][0]),
                   "target_token": name(gen[int(r["t_tgt"][0]) - x]), "distractor_token": name(gen[int(r["t_dis"][0]) - x]),
                   "generated": [name(t) for t in gen]}
        table = pd.DataFrame({"stage": list(STAGES), "max": stages.flatten(1).amax(1).numpy(),
                              "mean": stages.flatten(1).mean(1).numpy(), "l1_share_top4": _top_share(stages)})
        if image is None:
            px = batch.extra["pixel_values"][0].float()
            image = (px - px.min()) / (px.max() - px.min()).clamp_min(1e-12)
        params = {"gen_len": gen_len, "steps": steps or gen_len, "block_len": block_len, "step": step,
                  "layer": r["layer"], "contrast": contrast, "akd": akd_on, "dacg": dacg_on, "cba": cba_on,
                  "sicd": sicd_on, "map_label": "Diffusion-CAM (refined)"}
        arrays = {"map": st["sicd"], "raw": st["raw"], "stages": stages, "image": image.detach().float().cpu()}
        return Finding(self.name, table, params, model.identity(), digest(batch.input_ids), metrics,
                       arrays)

    def explain(self, finding: Finding) -> str:
        m = finding.metrics
        top = finding.table.set_index("stage")["l1_share_top4"]
        return (f"Contrasting {m['target_token']!r} with {m['distractor_token']!r} at step {m['step_used']} of "
                f"{m['n_steps']} (layer {m['layer']}), the top 4 patches hold {top['raw'] * 100:.0f} % of the raw "
                f"map's mass and {top['sicd'] * 100:.0f} % after the four filters.")


diffusion_cam = DiffusionCam()


def _top_share(stages: torch.Tensor, k: int = 4) -> list[float]:
    flat = stages.flatten(1).clamp(min=0)
    return (flat.topk(k, -1).values.sum(-1) / flat.sum(-1).clamp_min(1e-30)).tolist()


class DiffusionCamLocalisation(Analysis):
    """The Diffusion-CAM ablation scored against the answer's object, beside the references."""

    name = "attribution.diffusion_cam_localisation"
    title = "Diffusion-CAM localisation"
    requires = ("diffusion", "vision")
    in_scan = False
    figures = (_static.localisation, _interactive.localisation)

    def run(self, model: interp.Model, inputs=None, *, gen_len: int | None = None, steps: int | None = None,
            block_len: int | None = None, seed: int = 0, step: int | None = None, layer: int | None = None,
            contrast: str = "vocab_sum", occlusion: bool = True, n_boot: int = 1000, n_scenes: int = 70,
            batch_size: int = 64) -> Finding:
        """The ablation (raw, +AKD, +DACG, +CBA, +SICD, cumulative) of pointing game and energy in box against
        each item's object (``inputs``: VQAItems with boxes or masks; None: the questions about one object of
        ``n_scenes`` held-out testbed scenes), beside random, all-objects and occlusion."""
        if inputs is None:
            from interp.testbed.items import default_items
            inputs = default_items(model, n_scenes, seed=seed)
        items = vlm.as_items(inputs, model)
        if not all(it.has_target for it in items):
            raise interp.InterpError("every item needs boxes or a mask of the answer's object to score maps")
        gen_len = gen_len or items[0].gen_len
        if not gen_len:
            raise interp.InterpError("give gen_len, the length of the answer region to decode")
        enc = vlm.encode_vqa(model, items, gen_len=gen_len)
        n = len(enc.roles[0]["image"])
        groups: dict[int, list[int]] = {}
        for i, L in enumerate(enc.lengths):
            groups.setdefault(L, []).append(i)
        stages = {k: torch.zeros(len(items), n) for k in STAGES}
        gold = vlm.answer_ids(model, items)
        steps_used, wrong = set(), 0
        for _, idx in sorted(groups.items()):
            for b0 in range(0, len(idx), batch_size):
                bi = idx[b0:b0 + batch_size]
                r = contrastive_maps(model, [items[i] for i in bi], gen_len=gen_len, steps=steps, block_len=block_len,
                                     step=step, layer=layer, contrast=contrast)
                steps_used.add(r["step"])
                wrong += int((r["generated"][:, 0] != gold[bi]).sum())
                for j, i in enumerate(bi):
                    side = math.isqrt(n)
                    st = refine(r["raw"][j].view(side, n // side), r["generated"][j].tolist())
                    for k in STAGES:
                        stages[k][i] = st[k].flatten()
        masks, maps = vlm.reference_maps(model, items, occlusion=occlusion, seed=seed, gen_len=gen_len)
        maps.update({("raw" if k == "raw" else f"+{k.upper()}"): v for k, v in stages.items()})
        table = vlm.localisation_table(maps, masks, n_boot=n_boot, seed=seed)
        metrics = {"n_items": len(items), "step_used": sorted(steps_used)[0] if len(steps_used) == 1
                   else sorted(steps_used), "layer": r["layer"], "contrast": contrast, "first_token_errors": wrong,
                   "in_range": bool(all(((v >= 0) & (v <= stages["raw"].amax(1, keepdim=True) + 1e-6)).all()
                                        for v in stages.values()))}
        params = {"seed": seed, "step": step, "layer": r["layer"], "contrast": contrast, "n_boot": n_boot,
                  "gen_len": gen_len}
        return Finding(self.name, table, params, model.identity(), digest(enc.input_ids), metrics,
                       {k: v for k, v in stages.items()})

    def explain(self, finding: Finding) -> str:
        t = finding.table.set_index("method")
        return (f"Over {finding.metrics['n_items']} items the raw Diffusion-CAM map points at the answer's object "
                f"{t.loc['raw', 'pointing'] * 100:.0f} % of the time and {t.loc['+SICD', 'pointing'] * 100:.0f} % "
                f"after all four filters, against {t.loc['random', 'pointing']:.2f} for random maps and "
                f"{t.loc['all_objects', 'pointing']:.2f} for the all-objects map.")


diffusion_cam_localisation = DiffusionCamLocalisation()
