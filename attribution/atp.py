"""Attribution patching (AtP; Nanda 2023, "Attribution Patching: Activation Patching At Industrial Scale")
and AtP* (Kramár, Lieberum, Shah & Nanda, "AtP*: An efficient and scalable method for localizing LLM
behaviour to components", 2024, arXiv:2403.00745).

A node n is one attention head's output z_{l,h}[t] at one position (``attn.z``, before the output
projection). Its patching effect is c(n) = M(x_clean | do(n ← n(x_corr))) − M(x_clean), M the logit
difference answer − foil at the answer position (Kramár et al.'s "noising" direction:
``probes.patching`` with ``direction="noise"``, ``head_positions="each"`` computes c exactly, one forward
per node). AtP is its first-order estimate, for every node at once from two forwards and one backward:

    ĉ_AtP(n) = (n(x_corr) − n(x_clean)) · ∂M/∂n |_{x_clean}

AtP* changes two things:

* **QK fix** (``qk=True``): a head's query q_t and key k_s enter M only through the attention softmax,
  where the linear approximation fails when attention saturates. For the query node (l, h, t) the row's
  logits are recomputed exactly with the corrupted query, s'_t = q_t^corr · K^clean · scale, and

      ĉ*(q_t) = (softmax(s'_t) − A_t) · ∂M/∂A_t ;   likewise for the key node (l, g, s) (g: its key/value
      head) ĉ*(k_s) = Σ_{h∈g} Σ_{t≥s} (softmax(s_t + δ_{ts} e_s) − A_t) · ∂M/∂A_t, δ_{ts} = q_t·(k_s^corr − k_s)·scale,

  in closed form (only one logit of each row moves). The plain-AtP value of the same node,
  Σ_s Δs_{ts} ∂M/∂s_{ts}, is reported beside it. Queries and keys are the capture sites ``attn.q`` and
  ``attn.k`` (post-RoPE, keys per key/value head).
* **GradDrop** (``graddrop=True``): the direct and indirect effects of a node can cancel in ĉ_AtP. For each
  layer ℓ the backward pass is repeated with the gradient through layer ℓ's attention and MLP outputs
  set to 0, giving ĉ_ℓ(n) (= ĉ_AtP(n) for nodes in layers after ℓ; the node's own layer keeps its gradient),
  and ĉ_AtP*(n) = 1/(L−1) Σ_{ℓ} |ĉ_ℓ(n)| — a magnitude. It costs L − 1 extra backward passes.
"""
from __future__ import annotations

from typing import Sequence

import pandas as pd
import torch

import interp
from interp.analysis import Analysis
from interp.finding import Finding, digest
from probes.dla import answer_positions, token_ids
from probes.patching import default_pairs, encode_pairs, metric_of
from viz import interactive as _interactive
from viz import static as _static


def _parts(tr: interp.Trace, name: str) -> list[torch.Tensor]:
    """The tensors a grad capture kept for ``name`` (one per query chunk), which the forward computed from."""
    v = tr._values[name]
    return [v] if isinstance(v, torch.Tensor) else list(v)


def _scaling(model: interp.Model, layer: int) -> float:
    return float(getattr(model.adapter.attn[layer], "scaling", model.head_dim ** -0.5))


def _qk_terms(A: torch.Tensor, g: torch.Tensor, q: torch.Tensor, k: torch.Tensor, qc: torch.Tensor,
              kc: torch.Tensor, scale: float, n_kv: int) -> dict[str, torch.Tensor]:
    """AtP and AtP* (QK fix) of query and key nodes of one layer, one row. A, g: the clean pattern and ∂M/∂A
    [h, T, T]; q, qc: clean / corrupted queries [h, T, d]; k, kc: clean / corrupted keys [kv, T, d]."""
    H, T = A.shape[0], A.shape[1]
    rep = H // n_kv
    A, g = A.double(), g.double()
    K, Kc = k.double().repeat_interleave(rep, 0), kc.double().repeat_interleave(rep, 0)  # [h, T, d]
    Q, Qc = q.double(), qc.double()
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    vis = A > 0
    vis = vis | causal  # keys the row can see (a zero weight can still be visible)
    G = (A * g).sum(-1, keepdim=True)  # [h, T, 1]
    dM_ds = A * (g - G)  # ∂M/∂s through the softmax
    # queries: row t's logits with the corrupted query, keys clean
    ds_q = torch.einsum("htd,hsd->hts", Qc - Q, K) * scale
    ds_q = torch.where(vis, ds_q, 0.0)
    s_logA = torch.where(A > 0, A.log(), -torch.inf)
    A_q = torch.softmax(s_logA + ds_q, -1)  # softmax(s + Δs) = softmax(log A + Δs)
    q_star = ((A_q - A) * g).sum(-1)  # [h, T]
    q_lin = (ds_q * dM_ds).sum(-1)
    # keys: one logit per row moves by δ_ts; closed form of the new row
    d = (torch.einsum("htd,hsd->hts", Q, Kc - K) * scale).clamp(max=600)
    d = torch.where(vis, d, 0.0)
    e = torch.exp(d)
    Z = 1 - A + A * e
    k_row = (A * e * g + G - A * g) / Z - G  # [h, t, s]: ΔA_t · g_t when key s moves
    k_star = k_row.sum(1).reshape(n_kv, rep, T).sum(1)  # [kv, T]
    k_lin = (d * dM_ds).sum(1).reshape(n_kv, rep, T).sum(1)
    return {"q_atp": q_lin, "q_star": q_star, "k_atp": k_lin, "k_star": k_star}


class AttributionPatching(Analysis):
    """AtP and AtP* estimates of every head × position's patching effect (two forwards and one backward)."""

    name = "attribution.atp"
    title = "Attribution patching (AtP, AtP*)"
    in_scan = False  # hundreds of forwards (patching) / L backward passes (GradDrop): run on request
    figures = (_static.atp, _interactive.atp)

    def run(self, model: interp.Model, inputs=None, *, corrupted=None, answers=None, foils=None,
            qk: bool = True, graddrop: bool = True) -> Finding:
        """AtP of every head output z at every position (and, ``qk``, of every query and key with the QK fix);
        ``graddrop`` adds the GradDrop magnitudes (L − 1 extra backward passes). ``inputs`` are the clean prompts
        (or pairs); the metric is the logit difference answers − foils (default: the clean and corrupted top-1)."""
        if inputs is None:
            inputs, corrupted, d_ans, d_foil = default_pairs()
            answers = d_ans if answers is None else answers
            foils = d_foil if foils is None else foils
        clean, corr = encode_pairs(model, inputs, corrupted)
        n, T = len(clean), clean.lengths[0]
        L, H, KV = model.n_layers, model.n_heads, model.n_kv_heads
        pos = torch.tensor(answer_positions(clean))
        rows = torch.arange(n)
        zs = [f"blocks.{l}.attn.z" for l in range(L)]
        qks = [f"blocks.{l}.attn.{s}" for l in range(L) for s in ("q", "k")] if qk else []
        tr_r = interp.capture(model, corr, sites=zs + qks + ["logits"])
        outs = [f"blocks.{l}.{s}" for l in range(L) for s in ("attn.out", "mlp.out")] if graddrop else []
        pats = [f"blocks.{l}.attn.pattern" for l in range(L)] if qk else []
        with torch.enable_grad():
            tr_c = interp.capture(model, clean, sites=zs + outs + pats + qks + ["logits"], grad=True)
            lc = tr_c.output.logits[rows, pos]
            lr = tr_r["logits"][rows, pos]
            ans = token_ids(model, answers, n)
            ans = torch.tensor(ans if ans is not None else lc.argmax(-1).tolist())
            fl = token_ids(model, foils, n)
            fl = torch.tensor(fl if fl is not None else lr.argmax(-1).tolist())
            if bool((fl == ans).any()):
                raise interp.InterpError("a foil equals its answer: the logit difference cannot move; pass foils=")
            m = metric_of(lc, "logit_diff", ans, fl)  # [n], float64
            dz = torch.stack([(tr_r[name].double() - tr_c[name].detach().double())[:, :T] for name in zs], 1)
            drop = {"layer": -1}
            if graddrop:
                for l in range(L):
                    for s in ("attn.out", "mlp.out"):
                        tr_c[f"blocks.{l}.{s}"].register_hook(
                            lambda gr, l=l: torch.zeros_like(gr) if drop["layer"] == l else gr)
            seen: dict[str, torch.Tensor] = {}  # gradients accumulate over backward passes: keep the running sum

            def grad(name: str) -> torch.Tensor:
                total = tr_c.grad(name).double()
                g = total - seen[name] if name in seen else total
                seen[name] = total
                return g

            # the backward passes stop at the captured tensors they read: no weight gradients (L + 1 passes through
            # every parameter would dominate the cost and leave .grad on the model)
            wrt = [p for name in zs + pats for p in _parts(tr_c, name)]

            def backward(retain: bool):
                m.sum().backward(retain_graph=retain, inputs=wrt)
                gz = torch.stack([grad(name)[:, :T] for name in zs], 1)  # [n, L, T, H, d]
                est = {"z": (dz * gz).sum(-1)}  # [n, L, T, H]
                if qk:
                    est.update(self._qk(model, [(tr_c[p].detach(), grad(p)) for p in pats], tr_c, tr_r, T))
                return est

            base = backward(retain=graddrop)
            if graddrop:
                gd = {k: torch.zeros_like(v) for k, v in base.items()}
                for l in range(L):
                    drop["layer"] = l
                    est = backward(retain=l < L - 1)
                    for k in gd:  # Kramár et al.: Σ over dropped layers ℓ ≠ the node's own layer, / (L − 1)
                        shape = (1, L, *([1] * (est[k].dim() - 2)))
                        node = torch.arange(L).view(shape)
                        # nodes below ℓ reach the metric through it: their gradient changes; nodes above it do
                        # not (plain AtP); the node's own layer is left out of the sum
                        val = torch.where(node < l, est[k], torch.where(node == l, torch.zeros_like(base[k]), base[k]))
                        gd[k] += val.abs()
                gd = {k: v / max(1, L - 1) for k, v in gd.items()}
        m_r = metric_of(lr, "logit_diff", ans, fl)
        frames, arrays = [], {}
        node_kinds = [("z", "z", H)] + ([("q", "q_atp", H), ("k", "k_atp", KV)] if qk else [])
        for kind, key, nh in node_kinds:
            atp = base[key]  # [n, L, T, nh]
            star = base[key.replace("_atp", "_star")] if kind != "z" else atp
            df = pd.DataFrame({"node": kind, "layer": torch.arange(L).repeat_interleave(T * nh).numpy(),
                               "position": torch.arange(T).repeat_interleave(nh).repeat(L).numpy(),
                               "head": torch.arange(nh).repeat(L * T).numpy(),
                               "atp": atp.mean(0).reshape(-1).numpy()})
            if kind != "z":
                df["qk_fix"] = star.mean(0).reshape(-1).numpy()
            if graddrop:
                gkey = key if kind == "z" else key.replace("_atp", "_star")
                df["atp_star"] = gd[gkey].mean(0).reshape(-1).numpy()
            frames.append(df)
            arrays[f"atp.{kind}"] = atp.mean(0).permute(0, 2, 1).float()  # [L, nh, T]
            if kind != "z":
                arrays[f"qk_fix.{kind}"] = star.mean(0).permute(0, 2, 1).float()
            if graddrop:
                arrays[f"atp_star.{kind}"] = gd[gkey].mean(0).permute(0, 2, 1).float()
        table = pd.concat(frames, ignore_index=True)
        if graddrop:
            table["score"] = table["atp_star"]
        else:
            table["score"] = table["qk_fix"].fillna(table["atp"]) if qk else table["atp"]
        zt = table[table.node == "z"]
        best = zt.loc[zt.atp.abs().idxmax()]
        dec = model.tokenizer.decode if model.tokenizer is not None else str
        metrics = {"n_pairs": n, "n_tokens": T, "metric_clean": float(m.detach().mean()), "metric_corrupted": float(m_r.mean()),
                   "answers": [dec([int(a)]) for a in ans], "foils": [dec([int(f)]) for f in fl],
                   "top_layer": int(best.layer), "top_head": int(best["head"]), "top_position": int(best.position),
                   "top_atp": float(best.atp), "n_nodes": int(len(table)), "qk": qk, "graddrop": graddrop,
                   "backward_passes": 1 + (L if graddrop else 0)}
        panels = [["atp.z", "head", "AtP of z (largest |·| over positions)"]]
        if graddrop:
            panels.append(["atp_star.z", "head", "AtP* of z (GradDrop, magnitude)"])
        params = {"qk": qk, "graddrop": graddrop, "clean_ids": clean.input_ids[:, :T].tolist(),
                  "corrupted_ids": corr.input_ids[:, :T].tolist(), "answers": ans.tolist(), "foils": fl.tolist(),
                  "tokens": clean.tokens[0][:T], "panels": panels, "figure_title": "Attribution patching"}
        return Finding(self.name, table, params, model.identity(), digest([params["clean_ids"], params["corrupted_ids"]]),
                       metrics, arrays, ["estimates of M(clean with the node corrupted) − M(clean), M = logit difference"])

    @staticmethod
    def _qk(model, pats, tr_c, tr_r, T) -> dict[str, torch.Tensor]:
        """AtP / AtP* terms of every query and key node from each layer's (clean pattern, ∂M/∂pattern) and the
        clean / corrupted traces' ``attn.q`` / ``attn.k``: [n, L, T, h|kv]."""
        out: dict[str, list] = {"q_atp": [], "q_star": [], "k_atp": [], "k_star": []}
        for l, (P, G) in enumerate(pats):
            # [n, T, h|kv, d] -> [n, h|kv, T, d]
            q_clean, q_corr = (tr[f"blocks.{l}.attn.q"].detach().transpose(1, 2) for tr in (tr_c, tr_r))
            k_clean, k_corr = (tr[f"blocks.{l}.attn.k"].detach().transpose(1, 2) for tr in (tr_c, tr_r))
            per = [_qk_terms(P[i, :, :T, :T], G[i, :, :T, :T], q_clean[i, :, :T], k_clean[i, :, :T], q_corr[i, :, :T],
                             k_corr[i, :, :T], _scaling(model, l), model.n_kv_heads) for i in range(len(P))]
            for k in out:
                out[k].append(torch.stack([p[k] for p in per]).transpose(1, 2))  # [n, T, h]
        return {k: torch.stack(v, 1) for k, v in out.items()}

    def explain(self, finding: Finding) -> str:
        m = finding.metrics
        return (f"By attribution patching, corrupting head {m['top_head']} of layer {m['top_layer']} at position "
                f"{m['top_position']} would change the logit difference by {m['top_atp']:+.2f} (first-order estimate; "
                f"clean {m['metric_clean']:.2f}, corrupted {m['metric_corrupted']:.2f}), the largest of the head outputs "
                f"over {m['n_pairs']} prompt pairs.")


atp = AttributionPatching()
