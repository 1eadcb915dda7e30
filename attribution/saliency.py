"""Attention saliency: attention × gradient, per layer, token → token.

For a scalar L of the model output, with A^{l,h} the attention weights (rows = queries t, columns =
keys k), multiplying A by a ones-parameter P and back-propagating gives ∂L/∂P = A ⊙ ∂L/∂A, the
first-order change of L when edge (t, k) is scaled. Two head reductions:

* ``head_reduce="abs_after_sum"`` — Label Words are Anchors (Wang et al., EMNLP'23;
  lancopku/label-words-are-anchors, attention_attr.py):   I^l = | Σ_h A^{l,h} ⊙ ∂L/∂A^{l,h} |,
  with the diagonal set to 0.
* ``head_reduce="mean_abs"`` — Step-Saliency rule "ag" (Xu et al., ACL'26;
  XiaoyuXu-Vincent/step-saliency, src/saliency_extractor.py):   I^l = (1/H) Σ_h |A^{l,h} ⊙ ∂L/∂A^{l,h}|,
  diagonal kept.

The scalar: ``target="loss"`` is the LM cross-entropy over the sequence (labels = input_ids, logits
at t predict token t+1, mean over the T−1 predictions); ``("logit", pos, token_id)`` is
logits[pos, token_id]; a callable maps the logits [T, vocab] to a scalar. Gradients come from
``interp.capture(..., grad=True)``; the analysis registers no hooks.

Label-word flows (METHODS §4a; same code, ``get_proportion``), for label positions p_1..p_C and the
target position q (0-indexed), on I restricted to rows/columns ≤ q:

    S_wp = Σ_k Σ_{j<p_k} I(p_k, j) / Σ_k p_k          (text → label words)
    S_pq = Σ_k I(q, p_k) / C                          (label words → target)
    S_ww = (Σ I − both sums above) / (q(q+1)/2 − Σ_k p_k − C)    (all other edges)
"""
from __future__ import annotations

from typing import Callable, Sequence

import pandas as pd
import torch

import interp
from interp.engine import CHUNK_ELEMENTS
from interp.finding import Finding, digest

Target = str | tuple | Callable[[torch.Tensor], torch.Tensor]


def _scalar(logits: torch.Tensor, ids: torch.Tensor, target: Target) -> torch.Tensor:
    """The scalar to differentiate, from logits [T, vocab] and token ids [T]."""
    if callable(target):
        return target(logits)
    if target == "loss":
        return torch.nn.functional.cross_entropy(logits[:-1].float(), ids[1:])
    if isinstance(target, (tuple, list)) and len(target) == 3 and target[0] == "logit":
        return logits[int(target[1]), int(target[2])]
    raise interp.InterpError(f"unknown target {target!r}: use 'loss', ('logit', pos, token_id) or a callable")


def saliency(model: interp.Model, inputs, target: Target = "loss", head_reduce: str = "abs_after_sum",
             layers: Sequence[int] | None = None, near: int = 3, **encode_kw) -> Finding:
    """Per-layer token→token saliency I [L, T, T] (rows = queries, columns = keys) for one sequence."""
    if head_reduce not in ("abs_after_sum", "mean_abs"):
        raise interp.InterpError(f"unknown head_reduce {head_reduce!r}: use 'abs_after_sum' or 'mean_abs'")
    batch = model.encode(inputs, **encode_kw)
    if len(batch) != 1:
        raise interp.InterpError(f"saliency takes one sequence at a time, got a batch of {len(batch)}")
    T = batch.input_ids.shape[1]
    if model.n_heads * T * T > CHUNK_ELEMENTS:
        raise interp.InterpError(f"saliency keeps every layer's full pattern and its gradient; {T} tokens is too "
                                 f"long (at most {int((CHUNK_ELEMENTS / model.n_heads) ** 0.5)} for this model)")
    layers = list(range(model.n_layers)) if layers is None else [l % model.n_layers for l in layers]
    tr = interp.capture(model, batch, sites="blocks.*.attn.pattern", layers=layers, grad=True)
    ids = batch.input_ids[0]
    names = [f"blocks.{l}.attn.pattern" for l in layers]
    # gradients only into the captured patterns: the model's parameters keep their .grad untouched
    _scalar(tr.output.logits[0], ids, target).backward(inputs=[tr[n] for n in names])
    maps = []
    for l in layers:
        name = f"blocks.{l}.attn.pattern"
        s = (tr[name] * tr.grad(name)).detach()[0].float()  # [H, T, T]
        if head_reduce == "abs_after_sum":
            m = s.sum(0).abs()
            m.fill_diagonal_(0)
        else:
            m = s.abs().mean(0)
        maps.append(m)
    I = torch.stack(maps)  # [L, T, T]
    dist = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    total = I.sum((1, 2))
    safe = total.clamp_min(1e-30)
    table = pd.DataFrame({"layer": layers, "total": total.numpy(),
                          "diag_share": (I * (dist == 0)).sum((1, 2)).div(safe).numpy(),
                          "near_diag_share": (I * ((dist >= 1) & (dist <= near))).sum((1, 2)).div(safe).numpy(),
                          "bos_share": I[:, :, 0].sum(1).div(safe).numpy()})
    table["score"] = table["total"]
    metrics = {"T": T, "target": target if not callable(target) else "callable", "head_reduce": head_reduce,
               "peak_layer": int(layers[int(total.argmax())]), "mean_near_diag_share": float(table.near_diag_share.mean())}
    params = {"target": metrics["target"], "head_reduce": head_reduce, "layers": layers, "near": near,
              "tokens": batch.tokens[0]}
    return Finding("attribution.saliency", table, params, model.identity(), digest(ids), metrics, {"I": I})


def label_word_flows(I: torch.Tensor, label_positions: Sequence[int], target_pos: int) -> dict[str, torch.Tensor]:
    """S_wp, S_pq, S_ww per layer (each [L]) from I [L, T, T] or [T, T] (Wang et al. 2023, §4a)."""
    I = I[None] if I.dim() == 2 else I
    q = int(target_pos) % I.shape[-1]
    p = sorted(int(x) for x in label_positions)
    if not p or max(p) >= q:
        raise interp.InterpError(f"label positions {p} must be non-empty and before the target position {q}")
    M = I[:, :q + 1, :q + 1].clone()
    M[:, torch.arange(q + 1), torch.arange(q + 1)] = 0  # self-edges do not count, as in the source code
    wp = M[:, p, :].sum((1, 2))  # row p_k holds only keys j ≤ p_k, and the diagonal is 0
    pq = M[:, q, p].sum(1)
    rest = M.sum((1, 2)) - wp - pq
    C, n_rest = len(p), q * (q + 1) / 2 - sum(p) - len(p)
    return {"S_wp": wp / max(sum(p), 1), "S_pq": pq / C, "S_ww": rest / max(n_rest, 1)}
