"""DAPE-BR: the 1-D-vs-2-D mismatch of attention among image tokens, and patch-distance re-alignment
(docs/methods.md §8p, "DAPE-BR" [recon]: the paper's text and code were not available; only its one-line
description, "positional re-alignment for LVLMs: patch-distance metric, patch-distance causal mask").

Image token i of a g × g grid (raster order, as LLaVA flattens its patches) is patch (r_i, c_i) =
(i // g, i % g). Between image tokens i and j:

    d1(i, j) = |i − j|                                   (the 1-D sequence distance rotary positions see)
    d2(i, j) = sqrt((r_i − r_j)² + (c_i − c_j)²)          (the 2-D patch distance)

**Measure.** For each (layer, head), over image queries q and visible image keys k ≠ q, fit
log A[q, k] = a_q + β1·g(d1) + β2·g(d2) with g(d) = log(1 + d/d0) and a per-query intercept a_q (least
squares after removing each row's mean: the row's normaliser drops out, so the fit reads logits). β < 0 is
decay; a head aligned with the image plane has |β2| ≫ |β1|, a head that follows the sequence |β1| ≫ |β2|.
Two model-free checks of the same question, on neighbour pairs looking back: the mean attention to the
vertical neighbour (d1 = g, d2 = 1) and to the row-wrap neighbour (d1 = 1, d2 = √(1 + (g−1)²)), each
over the mean attention to the horizontal neighbour (d1 = d2 = 1). 2-D-aware: vertical/horizontal ≈ 1
and wrap/horizontal ≪ 1; 1-D: the reverse.

**Spec** (``to_spec``, ``attn.add_logit_bias`` with a sidecar tensor over the image block, queries and keys
the image tokens at the finding's image positions):

* ``mode="align"`` (patch-distance alignment): B[i, j] = −λ_l·(g(d2(i, j)) − g(d1(i, j))), λ_l = −β1 of
  layer l (heads pooled): the fitted 1-D decay is cancelled and the same decay is imposed in 2-D.
* ``mode="mask"`` (patch-distance causal mask, the concentric order of CCA, Xing et al. NeurIPS 2024, as
  the closest published rule): with ρ_i = max(|r_i − (g−1)/2|, |c_i − (g−1)/2|) the ring of patch i,
  image query i may attend image key j only if ρ_j ≥ ρ_i (from the periphery to the centre instead of
  the raster order): B[i, j] = −λ·1[ρ_j < ρ_i], λ = 1e9 blocks. On a causal model this is added to its
  own mask (the bias cannot open keys the sequence order hides).

λ = 0 gives a tensor of zeros: the engine then leaves SDPA's call as it was (bit-identical).
"""
from __future__ import annotations

import math

import pandas as pd
import torch

import interp
from interp import ops, vlm
from interp.analysis import Analysis
from interp.finding import Finding, digest
from interp.roles import Batch
from viz import interactive as _interactive
from viz import static as _static


def grid_of(n: int, grid: int | None = None) -> int:
    """The width g of the patch grid of n image tokens (n = g², or ``grid`` when the image is g columns wide)."""
    g = grid or math.isqrt(n)
    if g <= 0 or n % g:
        raise interp.InterpError(f"{n} image tokens do not fill a grid {g} wide: give grid= (the patch columns)")
    if grid is None and g * g != n:
        raise interp.InterpError(f"{n} image tokens are not a square grid: give grid= (the number of patch columns)")
    return g


def distances(n: int, grid: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(d1, d2), float64 [n, n]: the 1-D index distance and the 2-D patch (Euclidean) distance."""
    g = grid_of(n, grid)
    i = torch.arange(n, dtype=torch.float64)
    r, c = torch.div(i, g, rounding_mode="floor"), i % g
    d1 = (i[:, None] - i[None, :]).abs()
    d2 = torch.sqrt((r[:, None] - r[None, :]) ** 2 + (c[:, None] - c[None, :]) ** 2)
    return d1, d2


def rings(n: int, grid: int | None = None) -> torch.Tensor:
    """float64 [n]: ρ_i = Chebyshev distance of patch i from the grid centre (0.5, 1.5, … for an even grid)."""
    g = grid_of(n, grid)
    i = torch.arange(n, dtype=torch.float64)
    r, c = torch.div(i, g, rounding_mode="floor"), i % g
    rows = n // g
    return torch.maximum((r - (rows - 1) / 2).abs(), (c - (g - 1) / 2).abs())


def decay_fit(logA: torch.Tensor, feats: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Least squares of log A[r, k] = a_r + Σ_f β_f·feats[r, k, f] over ``valid`` entries, with one free
    intercept a_r per row (each row's mean removed). ``logA`` [R, K], ``feats`` [R, K, F], ``valid`` bool [R, K].
    Returns (β [F] float64, R² of the within-row fit)."""
    y, X, m = logA.double(), feats.double(), valid.bool()
    m = m & torch.isfinite(y)
    cnt = m.sum(1, keepdim=True)
    keep = cnt[:, 0] >= 2  # a row with one key has nothing to compare
    y, X, m, cnt = y[keep], X[keep], m[keep], cnt[keep]
    if not len(y):
        raise interp.InterpError("the decay fit needs query rows with at least two visible keys")
    mf = m.double()
    y = torch.where(m, y, 0.0)
    yc = (y - (y * mf).sum(1, keepdim=True) / cnt) * mf
    Xc = (X - (X * mf[..., None]).sum(1, keepdim=True) / cnt[..., None]) * mf[..., None]
    A, b = Xc.reshape(-1, X.shape[-1]), yc.reshape(-1)
    beta = torch.linalg.lstsq(A, b[:, None]).solution[:, 0]
    ss = float((b ** 2).sum())
    r2 = 1 - float(((b - A @ beta) ** 2).sum()) / ss if ss > 0 else 0.0
    return beta, r2


def grid_bias(image_positions: list[int], T: int, *, mode: str = "align", lam: float = 1.0, d0: float = 1.0,
              grid: int | None = None) -> torch.Tensor:
    """float64 [T, T]: the DAPE-BR bias over the image block at ``image_positions`` (see the module docstring)."""
    n = len(image_positions)
    if n < 2:
        raise interp.InterpError("a patch-distance bias needs at least two image tokens")
    if max(image_positions) >= T:
        raise interp.InterpError(f"image position {max(image_positions)} is beyond the tensor's {T} positions")
    if mode == "align":
        d1, d2 = distances(n, grid)
        block = -lam * (torch.log1p(d2 / d0) - torch.log1p(d1 / d0))
    elif mode == "mask":
        rho = rings(n, grid)
        block = torch.where(rho[None, :] < rho[:, None], -float(lam), 0.0).double()
    else:
        raise interp.InterpError(f"unknown mode {mode!r}: use 'align' (patch-distance alignment) or 'mask' "
                                 "(patch-distance causal mask)")
    B = torch.zeros(T, T, dtype=torch.float64)
    p = torch.tensor(image_positions)
    B[p[:, None], p[None, :]] = block
    return B


def vqa_batch(model: interp.Model, inputs, gen_len: int | None = None) -> Batch:
    """VQAItems (None: the testbed's held-out items) as a Batch with image roles; other inputs go to ``encode``."""
    if inputs is None:
        from interp.testbed.items import default_items
        inputs = default_items(model)
    if isinstance(inputs, vlm.VQAItem) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], vlm.VQAItem)):
        b = vlm.encode_vqa(model, inputs, gen_len=gen_len)
    else:
        b = model.encode(inputs)
    bad = [i for i, r in enumerate(b.roles) if len(r.get("image", [])) < 2]
    if bad:
        raise interp.InterpError(f"rows {bad[:5]} have fewer than two image tokens: give a vision-language model "
                                 "image prompts (VQAItems, or inputs with its image tokens and pixel_values)")
    return b


def neighbour_means(P: torch.Tensor, img: list[int], g: int) -> dict[str, float]:
    """Mean attention of image queries to the horizontal, row-wrap and vertical neighbour looking back, from
    patterns P [..., T, T] (means over every leading index)."""
    n = len(img)
    pos = torch.tensor(img)
    A = P[..., pos[:, None], pos[None, :]]  # [..., n, n]
    q = torch.arange(n)
    hor = q[(q % g != 0)]
    wrap = q[(q % g == 0) & (q > 0)]
    vert = q[q >= g]
    out = {"horizontal": float(A[..., hor, hor - 1].mean()), "vertical": float(A[..., vert, vert - g].mean())}
    out["wrap"] = float(A[..., wrap, wrap - 1].mean()) if len(wrap) else float("nan")
    return out


class DAPE(Analysis):
    """1-D vs 2-D distance decay of attention among image tokens, per (layer, head), and the DAPE-BR spec."""

    name = "probes.dape"
    title = "Patch-distance alignment (DAPE-BR)"
    requires = ("vision",)
    figures = (_static.generic, _interactive.generic)

    def run(self, model: interp.Model, inputs=None, *, d0: float = 1.0, grid: int | None = None,
            gen_len: int | None = None) -> Finding:
        """``inputs``: VQAItems (None: the testbed's held-out items) or what ``model.encode`` takes, with image
        tokens and pixel_values."""
        b = vqa_batch(model, inputs, gen_len)
        P = interp.capture(model, b, sites="blocks.*.attn.pattern").stack("attn.pattern").double()  # [L,b,H,T,T]
        L, n_rows, H = P.shape[0], P.shape[1], P.shape[2]
        n = len(b.roles[0]["image"])
        if any(len(r["image"]) != n for r in b.roles):
            raise interp.InterpError("the rows have different numbers of image tokens: give one image size")
        g = grid_of(n, grid)
        d1, d2 = distances(n, grid)
        feats = torch.stack([torch.log1p(d1 / d0), torch.log1p(d2 / d0)], -1)  # [n, n, 2]
        rows, per_layer = [], []
        logs, valids = {}, {}
        for i, r in enumerate(b.roles):
            pos = torch.tensor(r["image"])
            A = P[:, i][..., pos[:, None], pos[None, :]]  # [L, H, n, n]
            vis = (A > 0) & ~torch.eye(n, dtype=torch.bool)
            logs[i], valids[i] = A.clamp_min(1e-300).log(), vis
        for l in range(L):
            for h in range(H):
                y = torch.cat([logs[i][l, h] for i in logs])
                v = torch.cat([valids[i][l, h] for i in valids])
                beta, r2 = decay_fit(y, feats.repeat(n_rows, 1, 1), v)
                nb = neighbour_means(torch.stack([P[l, i, h] for i in range(n_rows)]), b.roles[0]["image"], g) \
                    if all(r["image"] == b.roles[0]["image"] for r in b.roles) else \
                    _neighbours_rows(P[l, :, h], b, g)
                rows.append({"layer": l, "head": h, "beta_1d": float(beta[0]), "beta_2d": float(beta[1]), "r2": r2,
                             "vertical_over_horizontal": nb["vertical"] / nb["horizontal"],
                             "wrap_over_horizontal": nb["wrap"] / nb["horizontal"]})
            y = torch.cat([logs[i][l].reshape(-1, n) for i in logs])
            v = torch.cat([valids[i][l].reshape(-1, n) for i in valids])
            beta, r2 = decay_fit(y, feats.repeat(n_rows * H, 1, 1), v)
            per_layer.append((float(beta[0]), float(beta[1]), r2))
        table = pd.DataFrame(rows)
        b1 = [x[0] for x in per_layer]
        b2 = [x[1] for x in per_layer]
        metrics = {
            "n_rows": n_rows, "n_image_tokens": n, "grid": g, "d0": d0,
            "beta_1d_by_layer": [round(x, 4) for x in b1], "beta_2d_by_layer": [round(x, 4) for x in b2],
            "r2_by_layer": [round(x[2], 3) for x in per_layer],
            "heads_1d_dominant": int((table.beta_1d.abs() > table.beta_2d.abs()).sum()),
            "n_heads": len(table),
            "vertical_over_horizontal_median": float(table.vertical_over_horizontal.median()),
            "wrap_over_horizontal_median": float(table.wrap_over_horizontal.median()),
        }
        same = all(r["image"] == b.roles[0]["image"] for r in b.roles)
        params = {"d0": d0, "grid": g, "image_positions": list(b.roles[0]["image"]) if same else None,
                  "max_len": int(b.input_ids.shape[1]), "causal": bool(model.adapter.causal)}
        notes = [] if same else ["the rows put their image at different positions: to_spec needs one layout"]
        return Finding(self.name, table, params, model.identity(), digest(b.input_ids), metrics,
                       {"beta_1d": torch.tensor(b1), "beta_2d": torch.tensor(b2)}, notes)

    def to_spec(self, finding: Finding, model: interp.Model, *, mode: str = "align", lam: float | None = None,
                layers: list[int] | None = None, max_len: int | None = None) -> interp.Spec:
        """``align``: per layer, B = −λ_l (g(d2) − g(d1)) with λ_l = −β1_l (layers whose 1-D fit decays, β1 < 0);
        ``mask``: the concentric patch-distance causal mask with penalty λ (default 1e9, a block) in ``layers``
        (default all). ``lam`` overrides λ (0: a no-op). The tensor covers ``max_len`` positions (default the
        finding's longest input + 64)."""
        p = finding.params
        pos = p.get("image_positions")
        if not pos:
            raise interp.InterpError("the finding's rows put their image at different positions: the bias tensor "
                                     "needs one layout; rerun on items of one layout")
        T = max_len or p["max_len"] + 64
        b1 = finding.metrics["beta_1d_by_layer"]
        if mode == "align":
            if layers is None:
                layers = [l for l, x in enumerate(b1) if x < 0]
            if not layers:
                raise interp.InterpError(f"no layer's attention decays with the 1-D distance (β1 by layer: {b1}): "
                                         "there is no sequence decay to re-align; give layers= and lam=")
            edits = [ops.add_logit_bias([l], queries="role:image", tensor=grid_bias(
                pos, T, mode="align", lam=-b1[l] if lam is None else lam, d0=p["d0"], grid=p["grid"]).float())
                for l in layers]
        elif mode == "mask":
            lam = 1e9 if lam is None else lam
            layers = list(range(model.n_layers)) if layers is None else layers
            edits = [ops.add_logit_bias(layers, queries="role:image",
                                        tensor=grid_bias(pos, T, mode="mask", lam=lam, grid=p["grid"]).float())]
        else:
            raise interp.InterpError(f"unknown mode {mode!r}: use 'align' or 'mask'")
        return interp.Spec.for_model(model, edits, analysis=self.name, prompts=finding.prompts,
                                     params={"mode": mode, "lam": lam, "layers": layers, "d0": p["d0"]})

    def explain(self, finding: Finding) -> str:
        m = finding.metrics
        return (f"Among the {m['n_image_tokens']} image tokens, attention decays with the 1-D sequence distance more "
                f"than with the 2-D patch distance in {m['heads_1d_dominant']} of {m['n_heads']} heads (β1 by layer "
                f"{m['beta_1d_by_layer']}, β2 {m['beta_2d_by_layer']}); the vertical neighbour gets "
                f"{m['vertical_over_horizontal_median']:.2f}× and the row-wrap neighbour "
                f"{m['wrap_over_horizontal_median']:.2f}× the horizontal neighbour's attention (medians over heads).")


def _neighbours_rows(P: torch.Tensor, b: Batch, g: int) -> dict[str, float]:
    """neighbour_means averaged over rows whose images sit at different positions (P [b, T, T])."""
    parts = [neighbour_means(P[i], r["image"], g) for i, r in enumerate(b.roles)]
    return {k: sum(x[k] for x in parts) / len(parts) for k in parts[0]}


dape = DAPE()
