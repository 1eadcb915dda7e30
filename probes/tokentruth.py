"""TokenTruth: massive activations on image tokens and positional decay of attention over the image
(docs/methods.md §2 and §8p, "TokenTruth" [recon]: from the abstract only, no paper text or code).

The claim: multimodal models hallucinate because of massive activations and rotary positional decay; a
token-level penalty that moves attention off the irrelevant image tokens toward informative regions helps,
while perturbing the massive-activation tokens' own values hurts badly (they must be kept).

**Measure.**

* Massive activations (Sun et al., ``probes.massive.find_massive``): |h^l_{t,c}| > 100 and ≥ 1000× the
  median |h^l| of that prompt and layer, at a few tokens and dims; each hit is classed as token 0, an image
  token or another text token.
* Positional decay over the image: at each row's answer query q (the ``query`` role), for every layer,
  fit log A[q, p] = c + β·log(1 + |q − p|) over the image tokens p, heads pooled, one intercept per
  (row, head) (:func:`probes.dape.decay_fit`); and the share of the image mass on the nearer half of the
  image tokens (0.5: no positional preference).

**Verdict.** TokenTruth acts on massive *image* tokens. Where no token is massive, or where only token 0 is
(the usual text sink, which must be kept), the Finding says so (``metrics["supported"] = False`` and the
reason) and ``to_spec`` refuses with that reason; nothing crashes.

**Spec** (where supported): ``method="penalty"`` (the [recon] of METHODS §2, option 2):
``attn.add_logit_bias`` bias −λ (default 5) on the keys of the massive tokens other than token 0, found at
run time by the ``sink`` selector (φ = max_{c∈dims} |x_c|/rms(x) > τ, τ halfway between the massive and the
other tokens' φ on the probe rows, ``skip_first``), in every layer after the first massive one; their
activations are left as they are. ``method="suppress"``: ``resid.suppress_dims`` set-mean of the massive
dims at those tokens (the values the tokens had, so a no-op on them at the probe; a control).
"""
from __future__ import annotations

import pandas as pd
import torch

import interp
from interp import ops
from interp.analysis import Analysis
from interp.finding import Finding, digest
from probes.dape import decay_fit, vqa_batch
from probes.massive import _phi, find_massive
from viz import interactive as _interactive
from viz import static as _static


def verdict(hits: pd.DataFrame, image_positions: list[set[int]]) -> tuple[bool, str]:
    """(supported, reason) from massive-activation hits (columns prompt, token) and each row's image positions."""
    if hits.empty:
        return False, "no massive activations: no token of the probe rows exceeds both thresholds"
    on_image = [(i, t) for i, t in zip(hits.prompt, hits.token) if t in image_positions[int(i)]]
    if on_image:
        return True, f"{len({t for _, t in on_image})} image token position(s) carry massive activations"
    if set(hits.token) == {0}:
        return False, ("only token 0 is massive: that is the text attention sink, which TokenTruth keeps, and no "
                       "image token carries a massive activation")
    return False, "massive activations sit only on text tokens, not on image tokens"


class TokenTruth(Analysis):
    """Massive activations on image tokens and attention decay over the image, with a verdict."""

    name = "probes.tokentruth"
    title = "Massive image tokens and positional decay (TokenTruth)"
    requires = ("vision",)
    figures = (_static.generic, _interactive.generic)

    def run(self, model: interp.Model, inputs=None, *, threshold: float = 100.0, ratio: float = 1000.0,
            max_dims: int = 8, max_token_frac: float = 0.1, gen_len: int | None = None) -> Finding:
        """``inputs``: VQAItems (None: the testbed's held-out items) or image inputs ``model.encode`` takes."""
        b = vqa_batch(model, inputs, gen_len)
        tr = interp.capture(model, b, sites=["blocks.*.resid_post", "blocks.*.attn.pattern"])
        Hs = tr.stack("resid_post")  # [L, b, T, d]
        P = tr.stack("attn.pattern").double()  # [L, b, H, T, T]
        valid = b.attention_mask.bool()
        rows, dense = find_massive(Hs, valid, threshold=threshold, ratio=ratio, max_dims=max_dims,
                                   max_token_frac=max_token_frac)
        hits = pd.DataFrame(rows, columns=["layer", "prompt", "token", "dim", "value", "ratio"])
        img_sets = [set(r["image"]) for r in b.roles]
        hits["where"] = [("token0" if t == 0 else "image" if t in img_sets[int(i)] else "text")
                         for i, t in zip(hits.prompt, hits.token)]
        supported, reason = verdict(hits, img_sets)
        L, n_rows, H = P.shape[0], P.shape[1], P.shape[2]
        betas, near_share = [], []
        for l in range(L):
            ys, ds = [], []
            share = []
            for i, r in enumerate(b.roles):
                q = (r.get("query") or [r.length - 1])[0]
                img = torch.tensor(r["image"])
                a = P[l, i, :, q, img]  # [H, n]
                d = (q - img).abs().double()
                ys.append(a.clamp_min(1e-300).log())
                ds.append(d.expand(H, -1))
                order = torch.argsort(d)
                share.append(float((a[:, order[: len(order) // 2]].sum(-1) / a.sum(-1).clamp_min(1e-300)).mean()))
            y, d = torch.cat(ys), torch.cat(ds)
            beta, _ = decay_fit(y, torch.log1p(d)[..., None], torch.ones_like(y, dtype=torch.bool))
            betas.append(float(beta[0]))
            near_share.append(sum(share) / len(share))
        metrics: dict = {
            "supported": supported, "reason": reason, "n_rows": n_rows, "threshold": threshold, "ratio": ratio,
            "n_hits": len(hits), "hits_on_token0": int((hits["where"] == "token0").sum()),
            "hits_on_image": int((hits["where"] == "image").sum()), "hits_on_text": int((hits["where"] == "text").sum()),
            "max_abs_over_median_by_layer": [round(float(x), 1) for x in _ratio_by_layer(Hs, valid)],
            "decay_beta_by_layer": [round(x, 4) for x in betas],
            "near_half_share_by_layer": [round(x, 3) for x in near_share],
        }
        notes = [] if supported else [f"TokenTruth does not apply here: {reason}"]
        if dense:
            notes.append(f"layers {sorted({l for l, _ in dense})} have dense outliers (too many tokens or dims above "
                         "both thresholds): not counted as massive activations")
        if supported:
            img_hits = hits[hits["where"] == "image"]
            first = int(img_hits.layer.min())
            at = img_hits[img_hits.layer == first]
            dims = sorted(int(c) for c in at.dim.unique())
            positions = sorted({(int(i), int(t)) for i, t in zip(at.prompt, at.token)})
            phi = _phi(Hs[first], dims)
            inside = torch.zeros_like(valid)
            for i, t in positions:
                inside[i, t] = True
            rest = phi[valid & ~inside & (torch.arange(valid.shape[1]) > 0)[None]]
            phi_in, phi_out = float(phi[inside].min()), float(rest.max()) if rest.numel() else 0.0
            metrics.update({"dims": dims, "first_layer": first, "image_tokens": sorted({t for _, t in positions}),
                            "set_mean_values": [float(v) for v in torch.stack([Hs[first, i, t, dims]
                                                                               for i, t in positions]).mean(0)],
                            "phi_massive_min": phi_in, "phi_other_max": phi_out})
            if phi_in > phi_out:
                metrics["sink_tau"] = (phi_in + phi_out) / 2
        return Finding(self.name, hits, {"threshold": threshold, "ratio": ratio}, model.identity(),
                       digest(b.input_ids), metrics, {"decay_beta": torch.tensor(betas)}, notes)

    def to_spec(self, finding: Finding, model: interp.Model, *, method: str = "penalty",
                lam: float = 5.0) -> interp.Spec:
        """``penalty``: key bias −λ on the run-time massive tokens other than token 0 after the first massive
        layer; ``suppress``: set-mean of the massive dims at those tokens."""
        m = finding.metrics
        if not m["supported"]:
            raise interp.InterpError(f"no TokenTruth spec for this model: {m['reason']}")
        if "sink_tau" not in m:
            raise interp.InterpError(f"the massive image tokens (φ ≥ {m['phi_massive_min']:.1f}) cannot be told from "
                                     f"the other tokens (φ up to {m['phi_other_max']:.1f}) by the run-time selector")
        first = m["first_layer"]
        if first + 1 >= model.n_layers:
            raise interp.InterpError("the massive image tokens appear only at the last layer: no later layer reads them")
        sink = {"dims": list(m["dims"]), "tau": float(m["sink_tau"]), "skip_first": True}
        if method == "penalty":
            edits = [ops.add_logit_bias(list(range(first + 1, model.n_layers)), keys="sink", bias=-float(lam))]
        elif method == "suppress":
            edits = [ops.suppress_dims([first + 1], m["dims"], positions="sink", site="resid_pre", mode="mean",
                                       tensor=torch.tensor(m["set_mean_values"]))]
        else:
            raise interp.InterpError(f"unknown method {method!r}: use 'penalty' or 'suppress'")
        return interp.Spec.for_model(model, edits, analysis=self.name, prompts=finding.prompts, sink=sink,
                                     params={"method": method, "lam": lam})

    def explain(self, finding: Finding) -> str:
        m = finding.metrics
        head = (f"Massive activations on image tokens {m['image_tokens']} from layer {m['first_layer']} (dims "
                f"{m['dims']})" if m["supported"] else f"TokenTruth does not apply: {m['reason']}")
        return (f"{head}; attention from the answer query to the image goes as (1 + distance)^β with β "
                f"{m['decay_beta_by_layer']} by layer, and the nearer half of the image tokens gets "
                f"{m['near_half_share_by_layer']} of the image mass.")


def _ratio_by_layer(Hs: torch.Tensor, valid: torch.Tensor) -> list[float]:
    """max |h| / median |h| per layer (each prompt's own median, the largest ratio over prompts)."""
    out = []
    for l in range(Hs.shape[0]):
        out.append(max(float(Hs[l, i][valid[i]].abs().max() / Hs[l, i][valid[i]].abs().median().clamp_min(1e-12))
                       for i in range(Hs.shape[1])))
    return out


tokentruth = TokenTruth()
