"""LLaVA-CAM: Grad-CAM on the image-token hidden states of every decoder layer, attention-share curves,
the cliff layer and the truncation test. Zhang et al., "From Redundancy to Relevance: Information Flow
in LVLMs Across Reasoning Tasks" (NAACL'25; zhangbaijin/From-Redundancy-to-Relevance,
demo_smooth_grad_threshold.py), after Grad-CAM (Selvaraju et al., ICCV'17). METHODS §5.

Features F^l ∈ R^{n×C} at the n image tokens of block l, on the h×w patch grid: by default the output of the
block's post-attention norm (``site="mlp.in"``, the MLP's input: where the source's code hooks
``post_attention_layernorm``), or the residual stream entering the block (``"resid_pre"``; layer 0 is the
projected image itself) or leaving it (``"resid_post"``).
Target y = Σ_j logit of the answer's j-th token at the position that predicts it (the answer teacher-forced
after the prompt, as the source targets every answer token); with one token per row, the logit of that token
at the answer query (the ``query`` role, else the last token). A batch sums its rows' targets; rows do not
interact, so each row gets its own gradient.

    Grad-CAM      α_c = (1/n) Σ_u ∂y/∂F_{u,c},   CAM_u = Σ_c α_c F_{u,c}          (``raw``: = captum LayerGradCam)
    "gradcam"     ReLU(CAM)
    "llava_cam"   the source's variant: α⁺_c = (1/n) Σ_u ReLU(∂y/∂F_{u,c}) (ReLU before pooling),
                  M = max(mean_c α⁺_c F_c, 0) / max_u, then M_u < 0.5 set to 0
    "grad_x_act"  |Σ_c F_{u,c} ∂y/∂F_{u,c}|  (gradient × activation, Shrikumar et al. 2016: the size of the
                  first-order effect of token u's state on y; the residual stream has no sign convention,
                  so its magnitude is kept)
    "attention"   (1/H) Σ_h A^{l,h}[last, u]  (where the last position reads at layer l)
    "attn_x_grad" attention ⊙ grad_x_act (read there and mattering to y; best on the testbed, attribution/RESULTS.md)
    SmoothGrad    every map averaged over N copies of the image with N(0, σ²) noise on the normalised
                  pixels (the source: N = 50, σ = 0.1).

Attention share λ^l_R = (1/H) Σ_h Σ_{j∈R} A^{l,h}[last, j] for R = image, bos and the text (the rest).
Cliff layer l* [recon; chosen by eye in the paper]: the first layer where λ_img < f · max_l λ_img and stays
below for every later layer (f = 0.2); None when λ_img never falls that far.
Truncation test: ``attn.knockout`` of keys ``role:image`` for all queries in layers > l (k = 0 of the
source's top-k pruning), through :func:`interp.patch`; accuracy = argmax at the last position equals the
target token.
"""
from __future__ import annotations

import math
from typing import Sequence

import pandas as pd
import torch

import interp
from interp import vlm
from interp.analysis import Analysis
from interp.capture import QueryRow, RoleMass
from interp.finding import Finding, digest
from interp.roles import Batch, Roles
from viz import interactive as _interactive
from viz import static as _static

METHODS = ("gradcam", "llava_cam", "grad_x_act", "attention", "attn_x_grad")


def grad_cam(F: torch.Tensor, G: torch.Tensor, relu_grad: bool = False, mean: bool = False) -> torch.Tensor:
    """Raw Grad-CAM over tokens: features and gradients [..., n, C] -> [..., n] = Σ_c α_c F_c
    (mean_c with ``mean=True``), α_c = mean_u G (of ReLU(G) with ``relu_grad=True``)."""
    a = (G.clamp(min=0) if relu_grad else G).mean(-2, keepdim=True)
    cam = (a * F).sum(-1)
    return cam / F.shape[-1] if mean else cam


def llava_cam(F: torch.Tensor, G: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """The source's map: max(mean_c α⁺_c F_c, 0) / max, values below ``threshold`` zeroed."""
    m = grad_cam(F, G, relu_grad=True, mean=True).clamp(min=0)
    m = m / m.amax(-1, keepdim=True).clamp_min(1e-30)
    return torch.where(m < threshold, torch.zeros_like(m), m)


def _encode(model: interp.Model, inputs) -> Batch:
    """VQAItems through :func:`interp.vlm.encode_vqa`, anything else through ``model.encode``."""
    if isinstance(inputs, vlm.VQAItem) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], vlm.VQAItem)):
        return vlm.encode_vqa(model, inputs)
    return model.encode(inputs)


def _with_noise(batch: Batch, n: int, sigma: float, seed: int) -> Batch:
    """The batch repeated n times (row-major: item i's copies are rows i*n .. i*n+n-1), noise on pixels."""
    px = batch.extra["pixel_values"]
    g = torch.Generator().manual_seed(seed)
    noisy = px.repeat_interleave(n, 0)
    noisy = noisy + sigma * torch.randn(noisy.shape, generator=g).to(noisy)
    rep = lambda t: t.repeat_interleave(n, 0)  # noqa: E731
    return Batch(rep(batch.input_ids), rep(batch.attention_mask), [r for r in batch.roles for _ in range(n)],
                 [t for t in batch.tokens for _ in range(n)], [], {**batch.extra, "pixel_values": noisy})


SITES = ("mlp.in", "resid_pre", "resid_post")


def _teacher_force(batch: Batch, answers: list[list[int]]) -> Batch:
    """Each row with all but the last of its answer tokens appended after its real tokens (roles unchanged; the
    ``query`` role, the last prompt token unless the row has one, stays where the answer's first token is read)."""
    rows = [batch.input_ids[i, :n].tolist() + a[:-1] for i, (n, a) in enumerate(zip(batch.lengths, answers))]
    T = max(map(len, rows))
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    am = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], am[i, :len(r)] = torch.tensor(r), 1
    roles = [Roles({**r, "query": r.get("query") or [r.length - 1]}, length=len(row)) for r, row in zip(batch.roles, rows)]
    return Batch(ids, am, roles, batch.tokens, batch.texts, batch.extra)


def cam_maps(model: interp.Model, inputs, target=None, *, layers: Sequence[int] | None = None, site: str = "mlp.in",
             smooth: int = 0, sigma: float = 0.1, seed: int = 0, threshold: float = 0.5) -> dict[str, torch.Tensor]:
    """Every map of the module docstring from one forward and backward.

    ``target``: a token id (every row), one per row, or one list of answer tokens per row (all of them targeted,
    teacher-forced; causal models). Returns ``{method: [B, L, n] for METHODS, "raw": [B, L, n],
    "share_image"/"share_bos"/"share_text": [B, L], "target": [B]}`` (the first target token); ``target``
    defaults to the model's own argmax at the answer query."""
    if site not in SITES:
        raise interp.InterpError(f"site must be one of {SITES}, got {site!r}")
    batch = _encode(model, inputs)
    answers = None
    if target is not None and not isinstance(target, int) and any(isinstance(t, (list, tuple)) for t in target):
        answers = [list(t) if isinstance(t, (list, tuple)) else [int(t)] for t in target]
        if len(answers) != len(batch) or not all(answers):
            raise interp.InterpError("give one non-empty list of answer tokens per row")
        if any(len(a) > 1 for a in answers):
            if not model.adapter.causal:
                raise interp.InterpError("several answer tokens are teacher-forced after the prompt, which needs a "
                                         "causal model; give one target token per row")
            batch = _teacher_force(batch, answers)
        target = [a[0] for a in answers]
    img = [r.get("image", []) for r in batch.roles]
    if not all(img):
        raise interp.InterpError(f"LLaVA-CAM needs image tokens (role 'image'), and these inputs to {model.name} have "
                                 "none: give a vision-language model input_ids with its image tokens and pixel_values")
    if any(len(p) != len(img[0]) for p in img):
        raise interp.InterpError("LLaVA-CAM needs the same number of image tokens (role 'image') in every row")
    layers = list(range(model.n_layers)) if layers is None else [l % model.n_layers for l in layers]
    B = len(batch)
    n_copies = max(1, smooth)
    run = _with_noise(batch, n_copies, sigma, seed) if smooth else batch
    names = [f"blocks.{l}.{site}" for l in layers]
    tr = interp.capture(model, run, sites=names, reducers=[RoleMass(role="image"), RoleMass(role="bos"), QueryRow()],
                        layers=layers, grad=True)
    logits = tr.output.logits
    last = torch.tensor([r["query"][0] if r.get("query") else r.length - 1 for r in run.roles])
    rows = torch.arange(len(run))
    if target is None:
        tgt = logits[torch.arange(B) * n_copies, last[::n_copies]].argmax(-1).detach()
    else:
        tgt = torch.as_tensor([target] * B if isinstance(target, int) else list(target)).long()
    y = logits[rows, last, tgt.repeat_interleave(n_copies)].sum()
    for i, a in enumerate(answers or []):  # the later answer tokens, each where it is predicted
        for j, t in enumerate(a[1:], 1):
            y = y + logits[i * n_copies:(i + 1) * n_copies, last[i * n_copies] + j, t].sum()
    y.backward(inputs=[tr[n] for n in names])
    pos = torch.tensor([p for r in run.roles for p in r["image"]]).view(len(run), -1)  # [B*N, n]
    gather = lambda t: t[rows[:, None], pos]  # noqa: E731  [B*N, T, C] -> [B*N, n, C]
    out: dict[str, list] = {k: [] for k in METHODS + ("raw", "share_image", "share_bos")}
    for l, name in zip(layers, names):
        F = gather(tr[name].detach()).float()
        G = gather(tr.grad(name)).float()
        raw = grad_cam(F, G)
        gxa = (F * G).sum(-1).abs()
        att = gather(tr[f"blocks.{l}.attn.query_row"].mean(1)[..., None])[..., 0]
        maps = {"raw": raw, "gradcam": raw.clamp(min=0), "llava_cam": llava_cam(F, G, threshold),
                "grad_x_act": gxa, "attention": att, "attn_x_grad": att * gxa}
        for k, v in maps.items():
            out[k].append(v)
        for role in ("image", "bos"):
            out[f"share_{role}"].append(tr[f"blocks.{l}.attn.role_mass.{role}"][rows, :, last].mean(1))
    res = {k: torch.stack(v, 1).view(B, n_copies, len(layers), -1).mean(1) for k, v in out.items()
           if not k.startswith("share")}
    for k in ("share_image", "share_bos"):
        res[k] = torch.stack(out[k], 1).view(B, n_copies, len(layers)).mean(1)
    res["share_text"] = 1 - res["share_image"] - res["share_bos"]
    res["target"] = tgt
    return res


def cliff_layer(share: Sequence[float], f: float = 0.2) -> int | None:
    """First layer from which the share stays below f · its peak (METHODS §5; None if it never does)."""
    s = torch.as_tensor(share, dtype=torch.float64)
    below = s < f * s.max()
    for l in range(int(s.argmax()) + 1, len(s)):
        if below[l:].all():
            return l
    return None


@torch.no_grad()
def truncation_accuracy(model: interp.Model, batches: Sequence, targets: Sequence[Sequence[int]],
                        layers: Sequence[int] | None = None) -> dict[int, float]:
    """Accuracy (argmax at the answer query, the ``query`` role or the last token, == target) when every query's attention to ``role:image`` is
    knocked out in all layers > l, for each l in ``layers`` (default −1 .. L−1; −1: no image at all,
    L−1: nothing blocked)."""
    L = model.n_layers
    layers = list(range(-1, L)) if layers is None else list(layers)
    acc = {}
    for l in layers:
        blocked = list(range(l + 1, L))
        spec = interp.Spec.for_model(model, [{"op": "attn.knockout", "layers": blocked, "queries": "all",
                                              "keys": "role:image"}] if blocked else [],
                                     analysis="attribution.cam", params={"truncate_after": l})
        hit = n = 0
        for inputs, tgt in zip(batches, targets):
            batch = _encode(model, inputs)
            pred = model.answer_logits(batch, spec).argmax(-1)
            hit += int((pred == torch.as_tensor(tgt)).sum())
            n += len(batch)
        acc[l] = hit / max(n, 1)
    return acc


class Cam(Analysis):
    """LLaVA-CAM of one image and prompt: maps per layer, attention shares, cliff layer (and truncation)."""

    name = "attribution.cam"
    title = "LLaVA-CAM"
    requires = ("vision",)
    in_scan = True
    figures = (_static.image_map, _interactive.image_map)

    def run(self, model: interp.Model, inputs=None, target: int | None = None, *, method: str = "gradcam",
            layers: Sequence[int] | None = None, site: str = "mlp.in", smooth: int = 0, sigma: float = 0.1,
            f: float = 0.2, image: torch.Tensor | None = None, truncation: tuple[Sequence, Sequence] | None = None,
            seed: int = 0) -> Finding:
        """LLaVA-CAM of one image + prompt: maps [L, h, w] (``method`` of METHODS), attention shares, cliff layer,
        and, with ``truncation=(batches, targets)``, the accuracy when image tokens are blocked after each layer.

        ``image`` [3, H, W] in 0..1 is what the figure shows (default: the pixel values rescaled to 0..1)."""
        if method not in METHODS:
            raise interp.InterpError(f"unknown method {method!r}: use one of {METHODS}")
        if inputs is None:
            from interp.testbed.items import default_items
            inputs = default_items(model)[:1]
        if image is None and isinstance(inputs, (vlm.VQAItem, list)) and inputs and isinstance(
                (inputs if isinstance(inputs, list) else [inputs])[0], vlm.VQAItem):
            image = (inputs if isinstance(inputs, list) else [inputs])[0].shown_image()
        batch = _encode(model, inputs)
        if len(batch) != 1:
            raise interp.InterpError(f"cam takes one image and prompt at a time, got a batch of {len(batch)}")
        layers = list(range(model.n_layers)) if layers is None else [l % model.n_layers for l in layers]
        r = cam_maps(model, batch, target, layers=layers, site=site, smooth=smooth, sigma=sigma, seed=seed)
        n = r[method].shape[-1]
        side = int(math.isqrt(n))
        grid = (side, n // side) if side * side == n else (1, n)
        maps = r[method][0].view(len(layers), *grid)
        mass = r[method][0].clamp(min=0).sum(-1)
        table = pd.DataFrame({"layer": layers, "attn_image": r["share_image"][0].numpy(),
                              "cam_mass": (mass / mass.max().clamp_min(1e-30)).numpy(),
                              "attn_bos": r["share_bos"][0].numpy(), "attn_text": r["share_text"][0].numpy(),
                              "cam_l1": mass.numpy()})
        cliff = cliff_layer(table.attn_image, f)
        metrics = {"target_id": int(r["target"][0]), "cliff_layer": None if cliff is None else layers[cliff],
                   "attn_image_peak_layer": int(layers[int(table.attn_image.values.argmax())]),
                   "cam_peak_layer": int(layers[int(mass.argmax())])}
        if model.tokenizer is not None:
            metrics["target"] = model.tokenizer.convert_ids_to_tokens(metrics["target_id"])
        if truncation is not None:
            acc = truncation_accuracy(model, *truncation)
            metrics["truncation_acc"] = {int(k): v for k, v in acc.items()}
            table.insert(3, "trunc_acc", [acc.get(l, float("nan")) for l in layers])
        if image is None:
            px = batch.extra["pixel_values"][0].float()
            image = (px - px.min()) / (px.max() - px.min()).clamp_min(1e-12)
        params = {"method": method, "site": site, "layers": layers, "smooth": smooth, "sigma": sigma, "f": f,
                  "grid": list(grid), "map_label": f"{method} (layer per panel)", "layer": int(mass.argmax())}
        arrays = {"map": maps, "raw": r["raw"][0].view(len(layers), *grid), "image": image.detach().float().cpu()}
        return Finding(self.name, table, params, model.identity(), digest(batch.input_ids), metrics, arrays)

    def explain(self, finding: Finding) -> str:
        m, p = finding.metrics, finding.params
        cliff = ("no cliff layer (the image share never stays below a fifth of its peak)" if m["cliff_layer"] is None
                 else f"the image share falls for good at layer {m['cliff_layer']}")
        return (f"The {p['method']} map for {m.get('target', m['target_id'])!r} is largest at layer {m['cam_peak_layer']} "
                f"and the answer query reads the image most at layer {m['attn_image_peak_layer']}; {cliff}.")


cam = Cam()


# ------------------------------------------------------------------------------------ testbed evaluation
def testbed_batches(tokenizer, meta: dict, items: Sequence, batch_size: int = 64) -> list[tuple[dict, list[int], list[int]]]:
    """(inputs, first-answer-token ids, item indices) per batch of equal-length testbed prompts."""
    from interp.testbed import build_inputs
    enc = [build_inputs(tokenizer, meta, s, q) for s, q in items]
    groups: dict[int, list[int]] = {}
    for i, e in enumerate(enc):
        groups.setdefault(e["input_ids"].shape[1], []).append(i)
    out = []
    for _, idx in sorted(groups.items()):
        for b0 in range(0, len(idx), batch_size):
            bi = idx[b0:b0 + batch_size]
            inputs = {k: torch.cat([enc[i][k] for i in bi]) for k in enc[0]}
            out.append((inputs, [tokenizer.convert_tokens_to_ids(items[i][1].answer.split()[0]) for i in bi], bi))
    return out


def item_maps(model: interp.Model, items: Sequence[vlm.VQAItem], batch_size: int = 64, **kw) -> dict[str, torch.Tensor]:
    """:func:`cam_maps` for every VQAItem, target = every token of its answer (the first only with
    ``first_token=True``); [N, L, n]."""
    items = vlm.as_items(items, model)
    first = kw.pop("first_token", False)
    tgt = vlm.answer_token_ids(model, items)
    tgt = [a[:1] if first else a for a in tgt]
    res: dict[str, torch.Tensor] = {}
    for i in range(0, len(items), batch_size):
        for k, v in cam_maps(model, items[i:i + batch_size], tgt[i:i + batch_size], **kw).items():
            res.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in res.items()}


class CamLocalisation(Analysis):
    """Every LLaVA-CAM map and layer scored against the answer's object, beside the references."""

    name = "attribution.cam_localisation"
    title = "LLaVA-CAM localisation"
    requires = ("vision",)
    in_scan = False
    figures = (_static.localisation, _interactive.localisation)

    def run(self, model: interp.Model, inputs=None, *, seed: int = 0, methods: Sequence[str] = METHODS,
            occlusion: bool = True, n_boot: int = 1000, n_scenes: int = 70, **kw) -> Finding:
        """Pointing game and energy in box (95% bootstrap CIs) of every map and layer against each item's object
        (``inputs``: VQAItems with boxes or masks; None: the questions about one object of ``n_scenes`` held-out
        testbed scenes), beside the random, all-objects and occlusion references (rows with ``layer = -1``), plus
        the mean attention shares per layer, the cliff layer and the truncation accuracies."""
        if inputs is None:
            from interp.testbed.items import default_items
            inputs = default_items(model, n_scenes, seed=seed)
        items = vlm.as_items(inputs, model)
        if not all(it.has_target for it in items):
            raise interp.InterpError("every item needs boxes or a mask of the answer's object to score maps")
        r = item_maps(model, items, **kw)
        masks, refs = vlm.reference_maps(model, items, occlusion=occlusion, seed=seed)
        rows = [vlm.localisation_table({name: mp}, masks, n_boot=n_boot, seed=seed).assign(layer=-1)
                for name, mp in refs.items()]
        for meth in methods:
            for l in range(r[meth].shape[1]):
                rows.append(vlm.localisation_table({meth: r[meth][:, l]}, masks, n_boot=n_boot, seed=seed)
                            .assign(layer=l))
        table = pd.concat(rows, ignore_index=True)
        share = {k: r[f"share_{k}"].mean(0) for k in ("image", "bos", "text")}
        tgt = vlm.answer_ids(model, items)
        chunks = [(items[i:i + 64], tgt[i:i + 64].tolist()) for i in range(0, len(items), 64)]
        acc = truncation_accuracy(model, [c[0] for c in chunks], [c[1] for c in chunks])
        cliff = cliff_layer(share["image"])
        best = table[table.layer >= 0].sort_values("pointing", ascending=False).iloc[0]
        metrics = {"n_items": len(items), "cliff_layer": cliff,
                   "attn_share_image": share["image"].tolist(), "attn_share_bos": share["bos"].tolist(),
                   "attn_share_text": share["text"].tolist(), "truncation_acc": {int(k): v for k, v in acc.items()},
                   "best": f"{best.method}@{int(best.layer)}", "best_pointing": float(best.pointing),
                   "references": {m: float(table[(table.layer == -1) & (table.method == m)].pointing.iloc[0])
                                  for m in refs}}
        params = {"seed": seed, "methods": list(methods), "n_boot": n_boot, **kw}
        enc = vlm.encode_vqa(model, items)
        return Finding(self.name, table, params, model.identity(), digest(enc.input_ids), metrics,
                       {"share": torch.stack([share[k] for k in ("image", "bos", "text")])})

    def explain(self, finding: Finding) -> str:
        m = finding.metrics
        refs = ", ".join(f"{k} {v:.2f}" for k, v in m["references"].items())
        L = max(m["truncation_acc"])
        return (f"Over {m['n_items']} items the best map ({m['best']}) points at the answer's object "
                f"{m['best_pointing'] * 100:.0f} % of the time (references: {refs}); blocking the image after "
                f"every layer drops accuracy from {m['truncation_acc'][L]:.2f} to {m['truncation_acc'][-1]:.2f}.")


cam_localisation = CamLocalisation()
