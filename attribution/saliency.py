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
logits[pos, token_id]; ``("label", pos, gold_id, label_ids)`` is the Label Words loss, the
cross-entropy of the gold label among the label words' logits at pos,
−log softmax(logits[pos, label_ids])[gold]; a callable maps the logits [T, vocab] to a scalar.
Gradients come from ``interp.capture(..., grad=True)``; the analysis registers no hooks. On a bf16/fp16 model
A and ∂L/∂A are half precision; their product and the head reduction are taken in fp32 (the map is fp32).

Label-word flows (METHODS §4a; same code, ``get_proportion``), for label positions p_1..p_C and the
target position q (0-indexed), on I restricted to rows/columns ≤ q:

    S_wp = Σ_k Σ_{j<p_k} I(p_k, j) / Σ_k p_k          (text → label words)
    S_pq = Σ_k I(q, p_k) / C                          (label words → target)
    S_ww = (Σ I − both sums above) / (q(q+1)/2 − Σ_k p_k − C)    (all other edges)

``to_spec``: anchor re-weighting (Wang et al. 2023, §3.1; the source's ``AttentionAdapter`` in
reweighting.py): in the chosen layers and heads, the attention from the target position q to each
label word p_i is multiplied by its own scale exp(β_i),

    Â^{l,h}(q, p_i) = exp(β_i^{l,h}) · A^{l,h}(q, p_i),

one ``attn.scale_weights`` edit per label word. The source multiplies the softmax output and does not
renormalise (``renormalize=False``, the default); ``renormalize=True`` rescales the row back to sum 1
(≡ a log-scale logit bias). The paper learns β on demonstrations; here β (or exp β, ``scale``) is given.
"""
from __future__ import annotations

from typing import Callable, Sequence

import pandas as pd
import torch

import interp
from interp.analysis import Analysis
from interp.engine import CHUNK_ELEMENTS
from interp.finding import Finding, digest
from interp.roles import Batch
from viz import interactive as _interactive
from viz import static as _static

Target = str | tuple | Callable[[torch.Tensor], torch.Tensor]

# the built-in inputs: a 2-class sentiment ICL prompt, one demonstration per class (the paper's setting)
PROMPT = "Review: great film. Sentiment: positive\nReview: awful plot. Sentiment: negative\nReview: I loved it. Sentiment:"
LABEL_WORDS = (" positive", " negative")
GOLD = " positive"


def _scalar(logits: torch.Tensor, ids: torch.Tensor, target: Target) -> torch.Tensor:
    """The scalar to differentiate, from logits [T, vocab] and token ids [T]."""
    if callable(target):
        return target(logits)
    if target == "loss":
        return torch.nn.functional.cross_entropy(logits[:-1].float(), ids[1:])
    if isinstance(target, (tuple, list)) and len(target) == 3 and target[0] == "logit":
        return logits[int(target[1]), int(target[2])]
    if isinstance(target, (tuple, list)) and len(target) == 4 and target[0] == "label":
        labels = [int(i) for i in target[3]]
        if int(target[2]) not in labels:
            raise interp.InterpError(f"the gold label id {target[2]} is not among the label ids {labels}")
        z = logits[int(target[1]), labels].float()
        return -torch.log_softmax(z, -1)[labels.index(int(target[2]))]
    raise interp.InterpError(f"unknown target {target!r}: use 'loss', ('logit', pos, token_id), "
                             "('label', pos, gold_id, label_ids) or a callable")


def _one_sequence(model: interp.Model, inputs, encode_kw: dict) -> Batch:
    """``inputs`` through ``model.encode``, as one sequence without padding."""
    batch = model.encode(inputs, **encode_kw)
    if len(batch) != 1:
        raise interp.InterpError(f"saliency takes one sequence at a time, got a batch of {len(batch)}")
    n = int(batch.attention_mask[0].sum())
    if n == 0 or not bool(batch.attention_mask[0, :n].all()):
        raise interp.InterpError("this sequence's padding is not at its end (left-padded?): give the real tokens "
                                 "only, or a right-padded row")
    if n == batch.input_ids.shape[1]:
        return batch
    return Batch(batch.input_ids[:, :n], batch.attention_mask[:, :n], batch.roles, [batch.tokens[0][:n]],
                 batch.texts, batch.extra)


def _token_ids(model: interp.Model, words: Sequence[str]) -> list[int]:
    """The first token id of each word (as the source scores a label word by its first token)."""
    if model.tokenizer is None:
        raise interp.InterpError("label words need the model's tokenizer: give label_positions and label ids instead")
    out = []
    for w in words:
        ids = model.tokenizer(w, add_special_tokens=False)["input_ids"]
        if not ids:
            raise interp.InterpError(f"label word {w!r} encodes to no token")
        out.append(int(ids[0]))
    return out


def label_word_flows(I: torch.Tensor, label_positions: Sequence[int], target_pos: int) -> dict[str, torch.Tensor]:
    """S_wp, S_pq, S_ww per layer (each [L]) from I [L, T, T] or [T, T] (Wang et al. 2023, §4a)."""
    I = I[None] if I.dim() == 2 else I
    q = int(target_pos) % I.shape[-1]
    p = sorted(int(x) for x in label_positions)
    if not p or max(p) >= q or min(p) < 0:
        raise interp.InterpError(f"label positions {p} must be non-empty, ≥ 0 and before the target position {q}")
    M = I[:, :q + 1, :q + 1].clone()
    M[:, torch.arange(q + 1), torch.arange(q + 1)] = 0  # self-edges do not count, as in the source code
    wp = M[:, p, :].sum((1, 2))  # row p_k holds only keys j ≤ p_k, and the diagonal is 0
    pq = M[:, q, p].sum(1)
    rest = M.sum((1, 2)) - wp - pq
    C, n_rest = len(p), q * (q + 1) / 2 - sum(p) - len(p)
    return {"S_wp": wp / max(sum(p), 1), "S_pq": pq / C, "S_ww": rest / max(n_rest, 1)}


class Saliency(Analysis):
    """Per-layer token→token attention × gradient saliency, with the Label Words flows and anchor re-weighting."""

    name = "attribution.saliency"
    title = "Attention saliency (attention × gradient)"
    requires = ("causal",)
    figures = (_static.saliency, _interactive.saliency)

    def run(self, model: interp.Model, inputs=None, target: Target | None = None, head_reduce: str = "abs_after_sum",
            layers: Sequence[int] | None = None, near: int = 3, *, label_words: Sequence[str] | None = None,
            label_positions: Sequence[int] | None = None, target_pos: int = -1, **encode_kw) -> Finding:
        """Per-layer token→token saliency I [L, T, T] (rows = queries, columns = keys) for one sequence.

        ``inputs``: anything ``model.encode`` takes (one sequence); None: the built-in sentiment ICL prompt, its
        label words and the Label Words loss of the gold label. ``label_words`` (their positions are where their
        first tokens occur before ``target_pos``) or ``label_positions`` add the flows S_wp, S_pq, S_ww per layer.
        """
        if head_reduce not in ("abs_after_sum", "mean_abs"):
            raise interp.InterpError(f"unknown head_reduce {head_reduce!r}: use 'abs_after_sum' or 'mean_abs'")
        if inputs is None:
            inputs, label_words = PROMPT, LABEL_WORDS if label_words is None else label_words
            if target is None:
                ids = _token_ids(model, LABEL_WORDS)
                target = ("label", target_pos, ids[LABEL_WORDS.index(GOLD)], ids)
        target = "loss" if target is None else target
        batch = _one_sequence(model, inputs, encode_kw)
        T = batch.input_ids.shape[1]
        if model.n_heads * T * T > CHUNK_ELEMENTS:
            raise interp.InterpError(f"saliency keeps every layer's full pattern and its gradient; {T} tokens is too "
                                     f"long (at most {int((CHUNK_ELEMENTS / model.n_heads) ** 0.5)} for this model)")
        if not -T <= int(target_pos) < T:
            raise interp.InterpError(f"target_pos {target_pos} is outside a sequence of {T} tokens")
        q = int(target_pos) % T
        ids = batch.input_ids[0]
        if label_words is not None:
            wanted = set(_token_ids(model, label_words))
            label_positions = [p for p in range(q) if int(ids[p]) in wanted]
            if not label_positions:
                raise interp.InterpError(f"none of the label words {list(label_words)} occurs before the target "
                                         f"position {q}")
        layers = list(range(model.n_layers)) if layers is None else [l % model.n_layers for l in layers]
        tr = interp.capture(model, batch, sites="blocks.*.attn.pattern", layers=layers, grad=True)
        names = [f"blocks.{l}.attn.pattern" for l in layers]
        # gradients only into the captured patterns: the model's parameters keep their .grad untouched
        _scalar(tr.output.logits[0], ids, target).backward(inputs=[tr[n] for n in names])
        maps = []
        for name in names:
            # [H, T, T], the product and the head sum in fp32 (a bf16/fp16 model's pattern and gradient are half)
            s = (tr[name].detach()[0].float() * tr.grad(name).detach()[0].float())
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
        tgt = target if not callable(target) else "callable"
        metrics = {"T": T, "target": tgt, "head_reduce": head_reduce, "n_layers": len(layers),
                   "peak_layer": int(layers[int(total.argmax())]),
                   "mean_near_diag_share": float(table.near_diag_share.mean())}
        params = {"target": tgt, "head_reduce": head_reduce, "layers": layers, "near": near,
                  "tokens": batch.tokens[0]}
        if label_positions is not None:
            flows = label_word_flows(I, label_positions, q)
            for k, v in flows.items():
                table[k] = v.numpy()
            later = [l for l, a, b in zip(layers, flows["S_pq"], flows["S_wp"]) if a > b]
            metrics.update(label_positions=sorted(int(p) for p in label_positions), target_pos=q,
                           S_wp_mean=float(flows["S_wp"].mean()), S_pq_mean=float(flows["S_pq"].mean()),
                           S_ww_mean=float(flows["S_ww"].mean()), first_layer_pq_above_wp=later[0] if later else None)
            params.update(label_positions=metrics["label_positions"], target_pos=q)
        return Finding(self.name, table, params, model.identity(), digest(ids), metrics, {"I": I})

    def __call__(self, model, inputs=None, *args, **params) -> Finding:
        """Also ``saliency(model, inputs, target, head_reduce, layers, near)``, the positional call before the contract."""
        return self.run(model, inputs, *args, **params)

    def to_spec(self, finding: Finding, model: interp.Model, *, scale=None, beta=None, layers: Sequence[int] | None = None,
                heads: Sequence[int] | str = "all", renormalize: bool = False, label_positions: Sequence[int] | None = None,
                target_pos: int | None = None) -> interp.Spec:
        """Anchor re-weighting (module docstring): the attention of the target position to label word i scaled by
        ``scale`` = exp(``beta``): one number, one per label word, or a tensor [len(layers), n_heads, n_labels]
        (the paper's β per layer, head and label). ``layers``: default all the finding's layers."""
        p = label_positions if label_positions is not None else finding.params.get("label_positions")
        q = target_pos if target_pos is not None else finding.params.get("target_pos")
        if not p or q is None:
            raise interp.InterpError("anchor re-weighting needs the label-word positions and the target position: "
                                     "run saliency with label_words= (or label_positions=), or pass them here")
        p = sorted(int(x) for x in p)
        if (scale is None) == (beta is None):
            raise interp.InterpError("give the anchor scales as scale= (exp β) or beta= (log scale), exactly one: "
                                     "a number, one per label word, or a tensor [layers, heads, label words]")
        s = torch.as_tensor(scale if scale is not None else beta, dtype=torch.float64)
        s = s if scale is not None else s.exp()
        layers = list(finding.params.get("layers") or range(model.n_layers)) if layers is None else list(layers)
        layers = [int(l) % model.n_layers for l in layers]
        H, C = model.n_heads, len(p)
        hs = list(range(H)) if heads == "all" else sorted(int(h) for h in heads)
        if s.dim() == 0:
            s = s.expand(C)
        if s.dim() == 1:
            if s.numel() != C:
                raise interp.InterpError(f"{s.numel()} scales for {C} label words at positions {p}")
            s = s[None, None].expand(len(layers), H, C)
        if tuple(s.shape) != (len(layers), H, C):
            raise interp.InterpError(f"scale tensor of shape {tuple(s.shape)}; expected [layers, heads, label words] = "
                                     f"[{len(layers)}, {H}, {C}]")
        if (s < 0).any() or not torch.isfinite(s).all():
            raise interp.InterpError("anchor scales must be finite and ≥ 0")
        T = len(finding.params.get("tokens") or []) or None
        query = "last" if T is not None and q == T - 1 else [int(q)]
        edits = []
        for li, l in enumerate(layers):
            for i, pos in enumerate(p):
                groups: dict[float, list[int]] = {}
                for h in hs:
                    groups.setdefault(float(s[li, h, i]), []).append(h)
                for f, g in groups.items():
                    edits.append({"op": "attn.scale_weights", "layers": [l], "heads": g, "queries": query,
                                  "keys": [pos], "factor": f, "renormalize": bool(renormalize)})
        return interp.Spec.for_model(model, edits, analysis=self.name, prompts=finding.prompts,
                                     params={"method": "anchor_reweighting", "label_positions": p, "target_pos": int(q),
                                             "renormalize": bool(renormalize), "tokens": None})

    def explain(self, finding: Finding) -> str:
        m = finding.metrics
        share = f"{100 * m['mean_near_diag_share']:.0f} %"
        if "S_pq_mean" in m:
            cross = m.get("first_layer_pq_above_wp")
            where = (f"the flow from the label words to the target first exceeds the flow into the label words in layer "
                     f"{cross}" if cross is not None else "the flow into the label words stays above their flow "
                     "to the target in every layer")
            return (f"Over {m['n_layers']} layers of a {m['T']}-token prompt, {where} (layer means: "
                    f"{m['S_pq_mean']:.2g} vs {m['S_wp_mean']:.2g} per edge); the saliency peaks in layer "
                    f"{m['peak_layer']}.")
        return (f"Over {m['n_layers']} layers of a {m['T']}-token prompt, the attention × gradient saliency peaks in "
                f"layer {m['peak_layer']}, and {share} of it lies on the {finding.params.get('near', 3)} tokens just "
                f"before each query.")


saliency = Saliency()
