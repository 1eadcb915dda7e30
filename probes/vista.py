"""VISTA: Li et al., "The Hidden Life of Tokens: Reducing Hallucination of Large Vision-Language Models via
Visual Information Steering" (ICML 2025; LzVv123456/VISTA). docs/methods.md §9c (METHODS.md §9a).

Two parts, read off VQA items with images:

* **Early excitation → SLA window.** Logit lens at the answer query q of item n (the last prompt token):
  z^l = W_U · norm_f(h^l[q]) with h^l = ``blocks.{l}.resid_post`` (the last layer is the model's own logits),
  p^l = softmax(z^l). For the answer's first token y: the peak layer argmax_l p^l(y). The SLA window is the
  ``width`` contiguous layers before the last whose mean_n p^l(y) is highest (VISTA uses layers 25–30 of
  LLaVA-1.5's 32, chosen by hand). SLA (``decode.sla``): z' = (1−α) z^L + α · mean_{l∈window} z^l, α = 0.3.
* **Visual steering vector (VSV).** Per layer, D^l_n = h^l_pos[q] − h^l_neg[q]: the last-token residual stream
  with the image minus without it. "Without" here is the same input with the image keys knocked out from every
  query in every layer (``attn.knockout``, the reference pass of ``decode.cfg``); VISTA feeds a text-only prompt
  (the image tokens removed, so the positions after them shift). v^l = PC₁(D^l − mean) + mean_n D^l_n (rank-1
  PCA of the differences plus their mean, as VISTA's code does; PC₁'s sign is taken along the mean). Injected at
  every position of the MLP output (``resid.vsv``): x' = ‖x‖ · n(n(x) + λ·λ_sim·n(v^l)),
  λ_sim = 1 + max(0, cos(x, −v^l)), n(u) = u/‖u‖, λ = 0.17 (VISTA's CHAIR setting for LLaVA-1.5).

``to_spec`` exports SLA, VSV or both (the vectors in the spec's safetensors sidecar); α = 0 and λ = 0 are exact
no-ops (the edits are skipped).
"""
from __future__ import annotations

import contextlib

import pandas as pd
import torch

import interp
from interp import ops, vlm
from interp.analysis import Analysis
from interp.finding import Finding, digest
from viz import interactive as _interactive
from viz import static as _static


def _items(model, inputs) -> list[vlm.VQAItem]:
    from probes.image_attention import vqa_items
    return vqa_items(model, inputs)


def no_image_spec(model: interp.Model, layers: list[int] | str = "all") -> interp.Spec:
    """The "without image" input of VISTA and PAI: the image keys knocked out from every query in ``layers``."""
    return interp.Spec.for_model(model, [ops.knockout(layers, queries="all", keys="role:image")],
                                 analysis="probes.vista", params={"what": "no-image reference"})


@torch.no_grad()
def query_states(model: interp.Model, batch, *specs: interp.Spec) -> torch.Tensor:
    """float [N, L, d]: ``blocks.{l}.resid_post`` at each row's query position, under ``specs``."""
    L = model.n_layers
    out = []
    for i in range(0, len(batch), 64):
        b = vlm.slice_batch(batch, i, min(len(batch), i + 64))
        pos = torch.tensor([r["query"][0] for r in b.roles])
        with interp.patch(model, *specs) if specs else contextlib.nullcontext():
            tr = interp.capture(model, b, sites=[f"blocks.{l}.resid_post" for l in range(L)])
        out.append(torch.stack([tr[f"blocks.{l}.resid_post"][torch.arange(len(b)), pos] for l in range(L)], 1).float())
    return torch.cat(out)


def lens(model: interp.Model, h: torch.Tensor) -> torch.Tensor:
    """z^l = W_U · norm_f(h^l) for states h [..., d] (the same decoding ``decode.sla`` applies)."""
    from probes.logit_lens import _unembed
    ad = model.adapter
    with torch.no_grad():
        return _unembed(model, ad.final_norm.forward(h.to(next(model.hf.parameters()).dtype)))


def steering_vectors(diff: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VSV per layer from differences D [N, L, d]: v^l = PC₁ + mean (PC₁ of the centred D^l, sign along the mean),
    and PC₁'s share of the variance [L]."""
    d = diff.double()
    mu = d.mean(0)  # [L, d]
    vs, share = [], []
    for l in range(d.shape[1]):
        c = d[:, l] - mu[l]
        if d.shape[0] < 2 or float(c.norm()) == 0.0:
            vs.append(mu[l])
            share.append(float("nan"))
            continue
        _, s, vh = torch.linalg.svd(c, full_matrices=False)
        pc = vh[0] if float(vh[0] @ mu[l]) >= 0 else -vh[0]
        vs.append(pc + mu[l])
        share.append(float(s[0] ** 2 / (s ** 2).sum()))
    return torch.stack(vs).float(), torch.tensor(share)


class Vista(Analysis):
    """Where the answer peaks in the logit lens (the SLA window) and the visual steering vectors (VSV)."""

    name = "probes.vista"
    title = "VISTA: early excitation and visual steering"
    requires = ("vision", "causal")
    figures = (_static.generic, _interactive.generic)

    def run(self, model: interp.Model, inputs: list | None = None, *, width: int | None = None) -> Finding:
        """``inputs``: VQAItems (None: the testbed's held-out items); ``width``: SLA window length (default
        6/32 of the layers, at least 1)."""
        items = _items(model, inputs)
        L = model.n_layers
        if L < 2:
            raise interp.InterpError("VISTA's SLA mixes earlier layers into the last: the model needs ≥ 2 layers")
        width = width if width is not None else max(1, round(6 * L / 32))
        if not isinstance(width, int) or not 1 <= width <= L - 1:
            raise interp.InterpError(f"width={width!r}: the SLA window needs 1 ≤ width ≤ {L - 1} (layers before the last)")
        batch = vlm.encode_vqa(model, items)
        pos_h = query_states(model, batch)  # [N, L, d]
        neg_h = query_states(model, batch, no_image_spec(model))
        y = vlm.answer_ids(model, items)
        N = len(items)
        z = lens(model, pos_h)  # [N, L, V]; the last layer's lens is the model's own logits
        p = torch.softmax(z.float(), -1)
        py = p[torch.arange(N), :, y]  # [N, L]
        rank = (z > z[torch.arange(N), :, y][..., None]).sum(-1)  # [N, L]
        peak = py.argmax(1)
        mean_py = py.mean(0)
        starts = range(0, L - width)
        best = max(starts, key=lambda s: float(mean_py[s:s + width].mean()))
        window = list(range(best, best + width))
        vsv, share = steering_vectors(pos_h - neg_h)
        table = pd.DataFrame({"layer": range(L), "p_answer": mean_py.tolist(),
                              "rank_answer": rank.float().mean(0).tolist(),
                              "n_peak": [int((peak == l).sum()) for l in range(L)],
                              "in_window": [l in window for l in range(L)],
                              "diff_norm": (pos_h - neg_h).norm(dim=-1).mean(0).tolist(),
                              "pc1_share": share.tolist()})
        metrics = {"n_items": N, "window": window, "width": width,
                   "early_peak_share": float((peak < L - 1).float().mean()),
                   "answer_top1_last": float((rank[:, L - 1] == 0).float().mean()),
                   "p_answer_window": float(mean_py[window].mean()), "p_answer_last": float(mean_py[L - 1])}
        return Finding(self.name, table, {"width": width}, model.identity(), digest(batch.input_ids), metrics,
                       {"vsv": vsv, "p_answer": py},
                       ["without image = the image keys knocked out from every query in every layer"])

    def to_spec(self, finding: Finding, model: interp.Model, *, alpha: float = 0.3, lam: float = 0.17,
                parts: tuple[str, ...] = ("sla", "vsv"), window: list[int] | None = None,
                layers: list[int] | str = "all") -> interp.Spec:
        """SLA over the finding's window (or ``window``) with mixing ``alpha``, and/or VSV with strength ``lam``
        in ``layers`` (the vectors go to the sidecar)."""
        bad = set(parts) - {"sla", "vsv"}
        if bad or not parts:
            raise interp.InterpError(f"parts={parts!r}: give 'sla', 'vsv' or both")
        window = list(window if window is not None else finding.metrics["window"])
        edits = []
        if "sla" in parts:
            edits.append(ops.sla(window, alpha))
        if "vsv" in parts:
            v = finding.arrays["vsv"]
            sel = list(range(model.n_layers)) if layers == "all" else [int(l) for l in layers]
            edits.append(ops.vsv(layers, v[sel] if layers != "all" else v, lam))
        return interp.Spec.for_model(model, edits, analysis=self.name, prompts=finding.prompts,
                                     params={"alpha": alpha, "lam": lam, "parts": list(parts), "window": window,
                                             "layers": layers, "method": "vista"})

    def explain(self, finding: Finding) -> str:
        m = finding.metrics
        w = m["window"]
        return (f"Over {m['n_items']} items the answer token's logit-lens probability peaks before the last layer in "
                f"{m['early_peak_share'] * 100:.0f} % of them; the SLA window is layers {w[0]}–{w[-1]} (mean p(answer) "
                f"{m['p_answer_window']:.3f} there, {m['p_answer_last']:.3f} at the last layer).")


vista = Vista()
