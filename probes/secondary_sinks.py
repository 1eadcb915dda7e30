"""Secondary attention sinks: Wong et al., arXiv 2512.22213 (JeffreyWong20/Secondary-Attention-Sinks,
src/hidden_state_base.py, mlp_base.py).

With h_l the residual stream after block l (HF hidden_states[1:]):

1. BOS = argmax over candidate positions {0, 1} ({0, 1, 2} with a chat template) of mean_l ‖h_l[pos]‖.
2. Layer clipper: n_l = ‖h_l[bos]‖, Δ_l = n_{l+1} − n_l; l_start = argmax Δ + 1;
   l_end = argmin Δ[l_start:] + l_start + 1.
3. Position j ≠ bos is a candidate at layer l ∈ [l_start, l_end) if |cos(h_l[j], h_l[bos])| > 0.9.
4. Lifetime = number of candidate layers: "bos_sink" if ≥ L − 15, "secondary" if 4 < lifetime < L − 15,
   otherwise "noise" (the margin of 15 layers is the authors' default for 28–64-layer models).

Mechanism check: at the creation layer (first candidate layer) cos(MLP_out[j], h[bos]) is high,
because an MLP writes the BOS direction into the token.
"""
from __future__ import annotations

import pandas as pd
import torch

import interp
from interp.analysis import Analysis
from interp.finding import Finding, digest
from interp.prompts import paragraphs
from viz import interactive as _interactive
from viz import static as _static


class SecondarySinks(Analysis):
    """BOS, BOS-like and secondary sink tokens with their lifetime and creation layer (Wong et al.)."""

    name = "probes.secondary_sinks"
    title = "Secondary attention sinks"
    takes_prompts = True
    figures = (_static.secondary_sinks, _interactive.secondary_sinks)

    def run(self, model: interp.Model, prompts: list[str] | None = None, *, cos_threshold: float = 0.9,
            margin: int = 15, min_lifetime: int = 4, max_tokens: int = 128) -> Finding:
        """Classify every position that lines up with the BOS hidden state in the clipped layer window."""
        return _secondary_sinks(model, prompts, cos_threshold, margin, min_lifetime, max_tokens)

    def explain(self, finding: Finding) -> str:
        m = finding.metrics
        life = m["bos_lifetime"]
        span = f"{min(life)}–{max(life)}" if life and min(life) != max(life) else str(life[0]) if life else ""
        s = f"The first-token sink stays aligned for {span} layers" if life else "No first-token sink is found"
        if not m["n_secondary"]:
            return s + f" and no secondary sink appears in {m['n_prompts']} prompts."
        toks = ", ".join(repr(t) for t in m["secondary_tokens"][:5])
        return (s + f"; {m['n_secondary']} secondary sinks appear in {m['n_prompts']} prompts (tokens {toks}), "
                f"written by an MLP whose output has cosine {m['mean_mlp_cos_secondary']:.2f} with the BOS state.")


def _secondary_sinks(model: interp.Model, prompts: list[str] | None, cos_threshold: float, margin: int,
                     min_lifetime: int, max_tokens: int) -> Finding:
    prompts = paragraphs()[:6] if prompts is None else prompts
    L = model.n_layers
    rows, clip = [], []
    for i, p in enumerate(prompts):
        b = model.encode(p)
        ids = b.input_ids[:, :max_tokens]
        tr = interp.capture(model, {"input_ids": ids}, sites=["blocks.*.resid_post", "blocks.*.mlp.out"])
        h = tr.stack("resid_post")[:, 0]  # [L, T, d]
        mlp = tr.stack("mlp.out")[:, 0]
        norms = h.norm(dim=-1)  # [L, T]
        cand = [0, 1] if ids.shape[1] > 1 else [0]
        bos = int(torch.tensor([norms[:, c].mean() for c in cand]).argmax())
        n = norms[:, bos]
        delta = n[1:] - n[:-1]
        l_start = int(delta.argmax()) + 1
        l_end = int(delta[l_start:].argmin()) + l_start + 1 if l_start < len(delta) else L
        clip.append((l_start, l_end))
        cos = torch.nn.functional.cosine_similarity(h, h[:, bos:bos + 1], dim=-1).abs()  # [L, T]
        window = torch.zeros(L, dtype=torch.bool)
        window[l_start:l_end] = True
        is_cand = (cos > cos_threshold) & window[:, None]
        for j in range(ids.shape[1]):
            layers = torch.nonzero(is_cand[:, j])[:, 0].tolist()
            if not layers:
                continue
            life = len(layers)
            kind = "bos_sink" if life >= L - margin else ("secondary" if min_lifetime < life < L - margin else "noise")
            if j == bos:
                kind = "bos"
            c0 = layers[0]
            mlp_cos = float(torch.nn.functional.cosine_similarity(mlp[c0, j], h[c0, bos], dim=0))
            rows.append({"prompt": i, "position": j, "token": b.tokens[0][j], "sink_type": kind,
                         "creation_layer": c0, "lifetime": life, "mlp_cos_at_creation": mlp_cos})
    table = pd.DataFrame(rows, columns=["prompt", "position", "token", "sink_type", "creation_layer", "lifetime",
                                        "mlp_cos_at_creation"])
    sec = table[table.sink_type == "secondary"]
    metrics = {"n_prompts": len(prompts), "layer_window": clip, "n_secondary": int(len(sec)),
               "secondary_tokens": sorted(set(sec.token)) if len(sec) else [],
               "bos_lifetime": [int(x) for x in table[table.sink_type == "bos"].lifetime],
               "mean_mlp_cos_secondary": float(sec.mlp_cos_at_creation.mean()) if len(sec) else None}
    return Finding("probes.secondary_sinks", table, {"cos_threshold": cos_threshold, "margin": margin,
                                                     "min_lifetime": min_lifetime}, model.identity(),
                   digest(prompts), metrics)


secondary_sinks = SecondarySinks()
