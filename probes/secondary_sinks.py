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

``to_spec`` suppresses the attention to the found sink tokens (docs/methods.md §8t): in
the layers they live in (creation to last candidate layer) and the heads there whose mean attention to them
α_j (docs/methods.md §1a) exceeds ε, their keys are scaled by a factor f < 1 and the row renormalised,
a'_{t,j} = f a_{t,j} / (1 − (1 − f) Σ_{j∈S} a_{t,j}) (≡ a logit bias log f on S). The tokens are found at run
time by the ``sink`` selector (φ = max_{c∈D} |RMSNorm(x)_c| > τ, position 0 excluded), with D the BOS state's
top-2 dims and τ the lowest φ the found sinks reach in their layers minus 0.5 (the finding's
``tau_other_rate`` says how often other tokens pass that τ: the selector's false-positive rate).
"""
from __future__ import annotations

import numpy as np
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

    def to_spec(self, finding: Finding, model: interp.Model, *, factor: float = 0.5, epsilon: float = 0.1,
                kinds: tuple[str, ...] = ("secondary",)) -> interp.Spec:
        """Scale the attention to the run-time sink tokens (the ``kinds`` found) by ``factor`` (< 1, renormalised)
        in their layers, in the heads where their mean attention α exceeds ``epsilon``."""
        if not 0 <= factor <= 1:
            raise interp.InterpError(f"factor={factor}: suppression scales the sinks' attention down, give 0 ≤ f ≤ 1")
        t = finding.table
        rows = t[t.sink_type.isin(list(kinds))]
        if rows.empty or "last_layer" not in t.columns:
            raise interp.InterpError(f"the finding has no sink of kind {list(kinds)} (found: "
                                     f"{sorted(set(t.sink_type))}): nothing to suppress; rerun with a lower "
                                     "cos_threshold or min_lifetime, or longer prompts")
        alpha = finding.arrays.get("sink_alpha")
        m = finding.metrics
        if alpha is None or not m.get("sink_dims"):
            raise interp.InterpError("the finding has no per-head attention to its sinks: rerun the probe")
        layers = sorted({l for r in rows.itertuples() for l in range(int(r.creation_layer), int(r.last_layer) + 1)})
        edits = []
        for l in layers:
            heads = [int(h) for h in torch.nonzero(alpha[l] > epsilon)[:, 0]]
            if heads:
                edits.append(interp.ops.scale_weights(layers=[l], heads=heads, keys="sink", factor=factor))
        if not edits:
            raise interp.InterpError(f"no head attends to the sinks with α > {epsilon} in layers {layers}: lower epsilon")
        tau = float(m["tau"]) if m.get("tau") is not None else float(rows.phi_min.min()) - 0.5
        return interp.Spec.for_model(model, edits, sink={"dims": [int(d) for d in m["sink_dims"]], "tau": tau,
                                                         "skip_first": True},
                                     analysis=self.name, prompts=finding.prompts,
                                     params={"method": "secondary_sink_suppression", "factor": factor,
                                             "epsilon": epsilon, "kinds": list(kinds)})

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
    rows, clip, pending, alphas, rms_h, bos_of = [], [], [], [], [], []
    for i, p in enumerate(prompts):
        b = model.encode(p)
        ids = b.input_ids[:, :max_tokens]
        tr = interp.capture(model, {"input_ids": ids}, sites=["blocks.*.resid_post", "blocks.*.mlp.out"],
                            reducers=[interp.KeyMass()])
        h = tr.stack("resid_post")[:, 0]  # [L, T, d]
        mlp = tr.stack("mlp.out")[:, 0]
        key_alpha = tr.stack("attn.key_mean")[:, 0].float()  # [L, H, T]
        hn = h.float() / torch.sqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        rms_h.append(hn)
        norms = h.norm(dim=-1)  # [L, T]
        cand = [0, 1] if ids.shape[1] > 1 else [0]
        bos = int(torch.tensor([norms[:, c].mean() for c in cand]).argmax())
        n = norms[:, bos]
        delta = n[1:] - n[:-1]
        l_start = int(delta.argmax()) + 1
        l_end = int(delta[l_start:].argmin()) + l_start + 1 if l_start < len(delta) else L
        clip.append((l_start, l_end))
        bos_of.append(bos)
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
                         "creation_layer": c0, "lifetime": life, "mlp_cos_at_creation": mlp_cos,
                         "last_layer": layers[-1]})
            pending.append((len(rows) - 1, i, j, layers))
            alphas.append(key_alpha[:, :, j])
    # the sink selector's dims: top-2 median |RMSNorm(h)| at the BOS position in the middle layer (METHODS §1d)
    mid = L // 2
    dims = sorted(torch.stack([r[mid, bos] for r, bos in zip(rms_h, bos_of)]).abs().median(0).values.topk(2)
                  .indices.tolist()) if rms_h else []
    for k, i, j, layers in pending:
        # φ of the token at the input of each of its layers (the residual after the layer before)
        ph = [float(rms_h[i][max(l - 1, 0), j, dims].abs().max()) for l in layers]
        rows[k]["phi_min"] = min(ph)
    table = pd.DataFrame(rows, columns=["prompt", "position", "token", "sink_type", "creation_layer", "lifetime",
                                        "mlp_cos_at_creation", "last_layer", "phi_min"])
    # the run-time rule: τ = the lowest φ a secondary sink reaches in its layers (− 0.5); how many other tokens pass it
    sec_phi = [r["phi_min"] for r in rows if r["sink_type"] == "secondary"]
    tau = min(sec_phi) - 0.5 if sec_phi else None
    other_rate = None
    if tau is not None:
        sec_layers = sorted({l for r in rows if r["sink_type"] == "secondary"
                             for l in range(r["creation_layer"], r["last_layer"] + 1)})
        taken = {(r["prompt"], r["position"]) for r in rows if r["sink_type"] in ("secondary", "bos")}
        hits = [bool(rms_h[i][max(l - 1, 0), j, dims].abs().max() > tau) for i in range(len(rms_h))
                for j in range(1, rms_h[i].shape[1]) if (i, j) not in taken for l in sec_layers]
        other_rate = float(np.mean(hits)) if hits else 0.0
    kinds = table.sink_type.to_numpy()
    sec_idx = [n for n, k in enumerate(kinds) if k == "secondary"]
    H = model.n_heads
    sink_alpha = (torch.stack([alphas[n] for n in sec_idx]).mean(0) if sec_idx
                  else torch.zeros(L, H))
    sec = table[table.sink_type == "secondary"]
    metrics = {"n_prompts": len(prompts), "layer_window": clip, "n_secondary": int(len(sec)),
               "secondary_tokens": sorted(set(sec.token)) if len(sec) else [],
               "bos_lifetime": [int(x) for x in table[table.sink_type == "bos"].lifetime],
               "mean_mlp_cos_secondary": float(sec.mlp_cos_at_creation.mean()) if len(sec) else None,
               "sink_dims": dims, "tau": tau, "tau_other_rate": other_rate}
    return Finding("probes.secondary_sinks", table, {"cos_threshold": cos_threshold, "margin": margin,
                                                     "min_lifetime": min_lifetime}, model.identity(),
                   digest(prompts), metrics, {"sink_alpha": sink_alpha})


secondary_sinks = SecondarySinks()
