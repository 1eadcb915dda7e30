"""EDAR on masked-diffusion VLMs: the anchors' sink mass, the image's blind spots, and a distance-aware key
bias (docs/methods.md §8p, "EDAR" [recon]: from the abstract only, no paper text or code).

The claim: in diffusion MLLMs the special tokens act as anchors that gather the image, become attention sinks
that take the budget, and rotary long-range decay leaves image regions they barely see (blind spots). On each
item the answer region is decoded by LLaDA low-confidence remasking (:func:`interp.diffusion.denoise`) and the
attention patterns A are captured at every step s. With R the response (masked answer) positions, N the
anchors (the prompt tokens that are neither image, question nor answer: BOS and the template words), V the
image tokens, T the sequence length:

* sink mass  m = mean_{q∈R} Σ_{k∈N} A[q, k], over the uniform share |N|/T (ratio > 1: the anchors are sinks);
* patch attention a_p = mean_{q∈N∪R} A[q, p] for p ∈ V; a blind spot is a patch with a_p < θ·mean_{p'} a_{p'}
  (θ = 0.5); its share of the image, and a_p against the mean distance from the queries;
* decay fit: log A[q, p] = c_q + β·log(1 + |q − p|/d0) over q ∈ N∪R, p ∈ V with one intercept per query row
  (:func:`probes.dape.decay_fit`), d0 chosen from {1, 2, 4, 8, 16, 32} by the best fit, per layer (heads,
  steps and items pooled).

``to_spec`` → ``attn.add_logit_bias`` with ``distance: {fn: log1p, scale: λ_l, d0}``, keys ``role:image``,
queries the response (``role:answer``), at every denoising step, in the layers whose fit decays (β_l < 0),
λ_l = −β_l: z'_{q,p} = z_{q,p} + λ_l·log(1 + |q − p|/d0) cancels the fitted decay, so the response sees
the image evenly and the added image logits take mass from the anchors. λ = 0 is a no-op.
"""
from __future__ import annotations

import pandas as pd
import torch

import interp
from interp import ops, vlm
from interp.analysis import Analysis
from interp.finding import Finding, digest
from interp.roles import Batch, Roles
from probes.dape import decay_fit
from viz import interactive as _interactive
from viz import static as _static

D0_GRID = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


def anchors_of(roles: Roles) -> list[int]:
    """The anchor positions of one row: every token that is not image, question or answer."""
    skip = set(roles.get("image", [])) | set(roles.get("question", [])) | set(roles.get("answer", []))
    return [p for p in range(roles.length) if p not in skip]


def _items(model: interp.Model, inputs) -> list[vlm.VQAItem]:
    if inputs is None:
        from interp.testbed.items import default_items
        inputs = default_items(model, 8)
    return vlm.as_items(inputs, model)


def _step_patterns(model: interp.Model, item: vlm.VQAItem, gen_len: int, steps: int) -> tuple[Roles, list, list]:
    """Roles of the decoded row (with its answer region), and per step the patterns [L, H, T, T] and the masked
    positions."""
    from interp.diffusion import denoise
    b = vlm.encode_vqa(model, [item], gen_len=gen_len)
    P = b.input_ids.shape[1] - gen_len
    r = b.roles[0]
    prompt_roles = Roles({k: v for k, v in r.items() if k not in ("answer", "query")}, length=P)
    pb = Batch(b.input_ids[:, :P], b.attention_mask[:, :P], [prompt_roles], [b.tokens[0][:P]], b.texts, b.extra)
    d = denoise(model, pb, gen_len=gen_len, steps=steps, sites="blocks.*.attn.pattern",
                roles=None)
    pats = [tr.stack("attn.pattern")[:, 0].double() for tr in d.traces]  # [L, H, T, T] per step
    return r, pats, [torch.tensor(tr.meta["mask_state"][0]) for tr in d.traces]


class EDAR(Analysis):
    """Anchor sink mass, image blind spots and distance decay per layer over the denoising steps."""

    name = "probes.edar"
    title = "Anchors, blind spots and distance decay (EDAR)"
    requires = ("diffusion", "vision")
    figures = (_static.generic, _interactive.generic)

    def run(self, model: interp.Model, inputs=None, *, gen_len: int | None = None, steps: int | None = None,
            theta: float = 0.5) -> Finding:
        """``inputs``: VQAItems (None: 8 held-out testbed items), decoded one at a time with ``gen_len`` masks in
        ``steps`` steps (defaults: the item's gen_len, one token per step)."""
        items = _items(model, inputs)
        gen_len = gen_len or items[0].gen_len
        if not gen_len:
            raise interp.InterpError("give gen_len, the length of the answer region to decode")
        steps = steps or gen_len
        L, H = model.n_layers, model.n_heads
        sink, uniform = torch.zeros(L, H), 0.0
        patch_att, n_obs = None, 0
        fit_rows: dict[int, list] = {l: [] for l in range(L)}
        anchor_tokens, n_img, mean_dist = None, None, None
        for item in items:
            r, pats, masks = _step_patterns(model, item, gen_len, steps)
            img, R, N = list(r["image"]), list(r["answer"]), anchors_of(r)
            if n_img is None:
                n_img = len(img)
                patch_att = torch.zeros(L, H, n_img)
            elif len(img) != n_img:
                raise interp.InterpError("the items have different numbers of image tokens: give one image size")
            if anchor_tokens is None and model.tokenizer is not None:
                ids = vlm.encode_vqa(model, [item], gen_len=gen_len).input_ids[0]
                anchor_tokens = model.tokenizer.convert_ids_to_tokens([int(ids[p]) for p in N])
            T = r.length
            Q = sorted(N + R)
            qd = torch.tensor(Q, dtype=torch.float64)[:, None]
            dist = (qd - torch.tensor(img, dtype=torch.float64)[None, :]).abs()  # [|Q|, n]
            mean_dist = dist.mean(0) if mean_dist is None else mean_dist
            for A in pats:  # [L, H, T, T]
                sink += A[:, :, R][..., N].sum(-1).mean(-1)
                uniform += len(N) / T
                a = A[:, :, Q][..., img]  # [L, H, |Q|, n]
                patch_att += a.mean(2)
                n_obs += 1
                for l in range(L):
                    fit_rows[l].append((a[l].reshape(-1, n_img), dist.repeat(H, 1)))
        sink, patch_att, uniform = sink / n_obs, patch_att / n_obs, uniform / n_obs
        per_layer = []
        for l in range(L):
            y = torch.cat([x[0] for x in fit_rows[l]]).clamp_min(1e-300).log()
            d = torch.cat([x[1] for x in fit_rows[l]])
            best = None
            for d0 in D0_GRID:
                beta, r2 = decay_fit(y, torch.log1p(d / d0)[..., None], torch.ones_like(y, dtype=torch.bool))
                if best is None or r2 > best[2]:
                    best = (float(beta[0]), d0, r2)
            per_layer.append(best)
        pa = patch_att.mean(1)  # [L, n] heads pooled
        blind = pa < theta * pa.mean(-1, keepdim=True)
        near = torch.argsort(mean_dist)[: n_img // 2]
        far = torch.argsort(mean_dist)[n_img // 2:]
        rows = [{"layer": l, "head": h, "sink_mass": float(sink[l, h]), "sink_ratio": float(sink[l, h] / uniform),
                 "blind_share": float((patch_att[l, h] < theta * patch_att[l, h].mean()).float().mean())}
                for l in range(L) for h in range(H)]
        table = pd.DataFrame(rows)
        metrics = {
            "n_items": len(items), "gen_len": gen_len, "steps": steps, "theta": theta,
            "anchor_tokens": anchor_tokens, "uniform_share": uniform,
            "sink_mass_by_layer": [round(float(x), 4) for x in sink.mean(1)],
            "sink_ratio_by_layer": [round(float(x / uniform), 2) for x in sink.mean(1)],
            "blind_share_by_layer": [round(float(x), 3) for x in blind.float().mean(1)],
            "near_over_far_by_layer": [round(float(pa[l, near].mean() / pa[l, far].mean()), 3) for l in range(L)],
            "beta_by_layer": [round(x[0], 4) for x in per_layer], "d0_by_layer": [x[1] for x in per_layer],
            "r2_by_layer": [round(x[2], 3) for x in per_layer],
        }
        return Finding(self.name, table, {"gen_len": gen_len, "steps": steps, "theta": theta}, model.identity(),
                       digest([it.prompt for it in items]), metrics,
                       {"patch_attention": pa, "blind": blind, "sink_mass": sink})

    def to_spec(self, finding: Finding, model: interp.Model, *, lam: float | None = None, d0: float | None = None,
                layers: list[int] | None = None, queries: str | list = "role:answer") -> interp.Spec:
        """The distance-aware image-key bias λ_l·log(1 + d/d0_l) in the layers whose fit decays (λ_l = −β_l);
        ``lam``/``d0`` override the finding's values (λ = 0: a no-op)."""
        m = finding.metrics
        beta, d0s = m["beta_by_layer"], m["d0_by_layer"]
        if layers is None:
            layers = [l for l, b in enumerate(beta) if b < 0]
        if not layers:
            raise interp.InterpError(f"attention to the image does not decay with distance in any layer (β by layer "
                                     f"{beta}): there is no long-range decay to compensate; give layers= and lam=")
        edits = [ops.add_logit_bias([l], queries=queries, keys="role:image",
                                    distance={"fn": "log1p", "scale": float(-beta[l] if lam is None else lam),
                                              "d0": float(d0s[l] if d0 is None else d0)}) for l in layers]
        return interp.Spec.for_model(model, edits, analysis=self.name, prompts=finding.prompts,
                                     params={"lam": lam, "d0": d0, "layers": layers})

    def explain(self, finding: Finding) -> str:
        m = finding.metrics
        return (f"Over {m['n_items']} items and {m['steps']} denoising steps, the response positions give the "
                f"anchors {m['anchor_tokens']} {m['sink_ratio_by_layer']}× their uniform share by layer; "
                f"{m['blind_share_by_layer']} of the patches are blind spots (< {m['theta']:g}× the mean attention) and "
                f"attention to the image goes as distance^β with β {m['beta_by_layer']} (log(1 + d/d0) fit).")


edar = EDAR()
