"""Induction heads: the prefix-matching score of Olsson et al., "In-context Learning and Induction Heads"
(Transformer Circuits Thread, 2022), docs/methods.md §12.

An induction head at query t, whose token x_t occurred before at position j < t (the latest such j),
attends to j + 1, the token that followed it, and copies it. Its prefix-matching score is the mean
attention on that key over every query that has an earlier occurrence:

    score(l, h) = mean_{b, t : ∃ j < t, x_j = x_t} A^{l,h}_b[t, j(t) + 1]

On the default inputs, n random tokens repeated twice (with BOS in front when the tokenizer has one),
j(t) + 1 = t − n + 1 for every query of the second repeat, and the loss there drops far below the first
repeat's (in-context copying). Any other input works too: the score is taken over the repeats it has.
Olsson et al. also score copying by the eigenvalues of each head's OV circuit; here copying is measured
causally instead: ``to_spec`` ablates (zero) or scales the top heads, and ``interp.evaluate`` or
:meth:`Induction.copying_loss` measures what that does to the repeated half's loss.
"""
from __future__ import annotations

import pandas as pd
import torch

import interp
from interp.analysis import Analysis
from interp.finding import Finding, digest
from viz import interactive as _interactive
from viz import static as _static


def repeated_tokens(model: interp.Model, n: int = 40, batch: int = 8, seed: int = 0,
                    prepend_bos: bool = True) -> torch.Tensor:
    """[batch, (1 +) 2n] ids: n random ordinary tokens (no special token), repeated once; BOS first if the
    tokenizer has one and ``prepend_bos``."""
    tok = model.tokenizer
    vocab = model.adapter.embed.weight.shape[0] if tok is None else len(tok)
    special = set(getattr(tok, "all_special_ids", []) or [])
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor([i for i in range(min(vocab, 50_000)) if i not in special])
    half = pool[torch.randint(len(pool), (batch, n), generator=g)]
    ids = torch.cat([half, half], 1)
    bos = getattr(tok, "bos_token_id", None) if tok is not None else None
    if prepend_bos and bos is not None:
        ids = torch.cat([torch.full((batch, 1), bos), ids], 1)
    return ids


def induction_targets(ids: torch.Tensor, mask: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, (query t, key j(t) + 1) for every real query whose token occurred before (latest j)."""
    out = []
    for row, m in zip(ids.tolist(), mask.tolist()):
        last, pairs = {}, []
        for t, (x, real) in enumerate(zip(row, m)):
            if not real:
                break
            if x in last and last[x] + 1 < t:
                pairs.append((t, last[x] + 1))
            last[x] = t
        out.append(pairs)
    return out


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token NLL [b, T-1] (fp32)."""
    lp = torch.log_softmax(logits[:, :-1].float(), -1)
    return -lp.gather(-1, ids[:, 1:, None])[..., 0]


class Induction(Analysis):
    """Prefix-matching score per (layer, head) on repeated sequences, and the in-context loss drop."""

    name = "probes.induction"
    title = "Induction heads"
    in_scan = True
    figures = (_static.generic, _interactive.generic)  # the layer × head heatmap of the score

    def run(self, model: interp.Model, inputs=None, *, n: int = 40, batch: int = 8, seed: int = 0,
            prepend_bos: bool = True, threshold: float = 0.4) -> Finding:
        """``inputs``: anything ``model.encode`` takes (default: ``batch`` random sequences of ``n`` tokens, repeated)."""
        if inputs is None:
            inputs = {"input_ids": repeated_tokens(model, n, batch, seed, prepend_bos)}
        b = model.encode(inputs)
        pairs = induction_targets(b.input_ids, b.attention_mask)
        if not any(pairs):
            raise interp.InterpError("no token repeats in these inputs, so no query has an induction target: give "
                                     "text with repeated tokens, or inputs=None for repeated random sequences")
        tr = interp.capture(model, b, sites=["blocks.*.attn.pattern", "logits"])
        A = tr.stack("attn.pattern")  # [L, b, H, T, T]
        rows = torch.tensor([r for r, p in enumerate(pairs) for _ in p])
        q = torch.tensor([t for p in pairs for t, _ in p])
        k = torch.tensor([j for p in pairs for _, j in p])
        score = A[:, rows, :, q, k].float().mean(0)  # advanced indices first: [N, L, H] -> [L, H]
        L, H = score.shape
        nll = _nll(tr["logits"], b.input_ids)
        valid = b.attention_mask[:, 1:].bool()
        repeat = torch.zeros_like(valid)
        repeat[rows, q - 1] = True  # predicting a token that repeats (its query t-1 sees the earlier copy)
        first = valid & ~repeat
        table = pd.DataFrame({"layer": torch.arange(L).repeat_interleave(H).numpy(),
                              "head": torch.arange(H).repeat(L).numpy(), "score": score.reshape(-1).numpy()})
        best = table.sort_values("score", ascending=False).iloc[0]
        metrics = {"n_queries": len(q), "threshold": threshold,
                   "n_induction_heads": int((score > threshold).sum()),
                   "top_head": [int(best["layer"]), int(best["head"])], "top_score": float(best["score"]),
                   "loss_repeated": float(nll[repeat].mean()) if repeat.any() else float("nan"),
                   "loss_other": float(nll[first].mean()) if first.any() else float("nan")}
        return Finding(self.name, table, {"n": n, "batch": batch, "seed": seed, "prepend_bos": prepend_bos,
                                          "threshold": threshold}, model.identity(), digest(b.input_ids), metrics,
                       {"score": score})

    def to_spec(self, finding: Finding, model: interp.Model, *, k: int | None = None, factor: float = 0.0,
                threshold: float | None = None) -> interp.Spec:
        """Scale the output of the induction heads by ``factor`` (0: zero-ablate): those above ``threshold``
        (default: the finding's), or the top ``k``."""
        t = finding.table.sort_values("score", ascending=False)
        t = t.head(k) if k is not None else t[t.score > (finding.params["threshold"] if threshold is None else threshold)]
        if t.empty:
            raise interp.InterpError("no head is above the threshold: lower it or give k")
        edits = [{"op": "attn.head_scale", "layers": [int(l)], "heads": sorted(map(int, g["head"])), "factor": factor}
                 for l, g in t.groupby("layer")]
        return interp.Spec.for_model(model, edits, analysis=self.name, prompts=finding.prompts,
                                     params={"k": k, "factor": factor, "threshold": threshold})

    def explain(self, finding: Finding) -> str:
        m = finding.metrics
        l, h = m["top_head"]
        return (f"{m['n_induction_heads']} heads attend to the token after the earlier copy with a mean weight above "
                f"{m['threshold']:g} (the strongest, layer {l} head {h}: {m['top_score']:.2f}); the loss on repeated "
                f"tokens is {m['loss_repeated']:.2f} nats against {m['loss_other']:.2f} on the rest.")

    @staticmethod
    def copying_loss(model: interp.Model, inputs, spec: interp.Spec | None = None) -> torch.Tensor:
        """Per-row mean NLL of the tokens that repeat an earlier one (in-context copying), optionally under a spec."""
        b = model.encode(inputs)
        nll = _nll(model.logits(b, *([spec] if spec is not None else [])), b.input_ids)
        pairs = induction_targets(b.input_ids, b.attention_mask)
        return torch.stack([nll[i, [t - 1 for t, _ in p]].mean() for i, p in enumerate(pairs)])


induction = Induction()
