"""Logit lens: decode every layer's residual stream with the model's own final norm and unembedding
(nostalgebraist, "interpreting GPT: the logit lens", LessWrong 2020; used for "early excitation"
in VISTA, Li et al., ICML 2025, LzVv123456/VISTA). METHODS.md §9a.

    z^l = W_U · norm_f(h^l[pos]),   p^l = softmax(z^l),   l = 0 … L−2   (h^l = ``blocks.{l}.resid_post``)
    z^{L−1} = W_U · final[pos]                                         (``final`` = norm_f(h^{L−1}))

The last layer reads the ``final`` site, which already carries the final norm (RMSNorm with a gain
is not idempotent, so it must not be applied twice): the last-layer lens *is* the model's logits.
Per target y: rank_l(y) (0 = top-1), p^l(y), z^l(y), the peak layer argmax_l p^l(y), and the first
layer where y enters the top-k. Targets are strings (their first token) or token ids; by default
the model's own top-1 prediction at the last layer. ``run(model)`` without inputs is what ``interp scan``
runs: the built-in facts, each with its answer as the target.

Models whose logits are soft-capped (Gemma 2: z ← c·tanh(z / c)) get the same cap on every layer's lens.
"""
from __future__ import annotations

from typing import Sequence, Union

import pandas as pd
import torch
from tqdm.auto import tqdm

import interp
from interp.analysis import Analysis
from interp.finding import Finding, digest
from interp.prompts import facts
from viz import interactive as _interactive
from viz import static as _static

Target = Union[str, int]


def _softcap(model: interp.Model) -> float | None:
    """The cap c of the model's final logits (z ← c·tanh(z / c), Gemma 2), None when uncapped. Only the
    adapter may know architectures: its ``logit_softcap`` when it has one, else the decoder's text config."""
    ad = model.adapter
    if hasattr(ad, "logit_softcap"):
        return ad.logit_softcap
    return getattr(getattr(ad.lm, "config", None), "final_logit_softcapping", None)


def _unembed(model: interp.Model, x: torch.Tensor) -> torch.Tensor:
    z = model.adapter.unembed(x).float()
    cap = _softcap(model)
    return torch.tanh(z / cap) * cap if cap else z


def _token_id(model: interp.Model, t: Target) -> int:
    if isinstance(t, int):
        return t
    ids = model.tokenizer.encode(t, add_special_tokens=False)
    if not ids:
        raise interp.InterpError(f"target {t!r} encodes to no tokens")
    return ids[0]


def _targets(model, targets, n: int) -> list[list[int]] | None:
    """None (model's own top-1), one target, a list shared by all prompts, or one list per prompt."""
    if targets is None:
        return None
    if isinstance(targets, (str, int)):
        targets = [targets]
    if all(isinstance(t, (list, tuple)) for t in targets):
        if len(targets) != n or len({len(t) for t in targets}) != 1:
            raise interp.InterpError(f"per-prompt targets need one list per prompt ({n}), all of the same length")
        return [[_token_id(model, t) for t in ts] for ts in targets]
    ids = [_token_id(model, t) for t in targets]
    return [ids] * n


@torch.no_grad()
def lens_logits(model: interp.Model, prompts: str | list[str], position: str | int = "last",
                batch_size: int = 8, progress: bool = True, **encode_kw) -> torch.Tensor:
    """z^l at one position per prompt: [n_prompts, L, vocab] (float32). A selector naming several
    positions (e.g. a role) uses the last of them."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    L, out = model.n_layers, []
    chunks = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    for chunk in tqdm(chunks, desc="logit lens", disable=not progress or len(chunks) < 2):
        tr = interp.capture(model, chunk, sites=[f"blocks.{l}.resid_post" for l in range(L - 1)] + ["final"],
                            **encode_kw)
        rows = torch.arange(len(chunk))
        pos = torch.tensor([r.positions(position)[-1] for r in tr.roles])
        h = tr.stack("resid_post", range(L - 1))[:, rows, pos]  # [L−1, b, d]
        z = [_unembed(model, model.adapter.final_norm_apply(h[l])) for l in range(L - 1)]
        # ``final`` is already normalised. Unembedding the whole [b, T, d] block (as the model does) and
        # then indexing keeps the same matmul shapes, so z^{L−1} equals the model's logits bit for bit.
        z.append(_unembed(model, tr["final"])[rows, pos])
        out.append(torch.stack(z, 1))
    return torch.cat(out)


class LogitLens(Analysis):
    """Rank, probability and logit of each target at every layer, plus each layer's top-1 token."""

    name = "probes.logit_lens"
    title = "Logit lens"
    in_scan = True
    figures = (_static.logit_lens, _interactive.logit_lens)

    def run(self, model: interp.Model, inputs: str | list[str] | None = None, *,
            targets: Target | Sequence | None = None, position: str | int = "last", top_k: int = 10,
            batch_size: int = 8, progress: bool = True, **encode_kw) -> Finding:
        """Rank, probability and logit of each target at every layer, plus each layer's top-1 token.
        ``inputs``: prompts (None: the built-in facts, each with its answer as target); ``targets``: see
        :func:`_targets` (default: the model's own last-layer top-1)."""
        if inputs is None:
            fs = facts()
            inputs = [x["prompt"] for x in fs]
            targets = [[x["answer"]] for x in fs] if targets is None else targets
            progress = False
        prompts = [inputs] if isinstance(inputs, str) else list(inputs)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise interp.InterpError("the logit lens takes a prompt or a non-empty list of prompts (strings)")
        if top_k < 1:
            raise interp.InterpError(f"top_k={top_k}: give a positive number of top tokens")
        z = lens_logits(model, prompts, position, batch_size, progress, **encode_kw)  # [n, L, V]
        n, L, _ = z.shape
        tgt = _targets(model, targets, n)
        if tgt is None:
            tgt = [[int(z[i, -1].argmax())] for i in range(n)]
        y = torch.tensor(tgt)  # [n, K]
        logp = z.log_softmax(-1)
        ty = z.gather(2, y[:, None, :].expand(n, L, -1))  # [n, L, K]
        rank = (z[:, :, None, :] > ty[..., None]).sum(-1)  # strictly larger logits
        prob = logp.gather(2, y[:, None, :].expand(n, L, -1)).exp()
        topv, topi = logp.topk(top_k, -1)
        tok = model.tokenizer.decode
        rows = []
        for i in range(n):
            for l in range(L):
                top1 = tok([int(topi[i, l, 0])])
                for k, t in enumerate(tgt[i]):
                    rows.append({"prompt": i, "layer": l, "target": tok([t]), "target_id": t,
                                 "rank": int(rank[i, l, k]), "prob": float(prob[i, l, k]), "logit": float(ty[i, l, k]),
                                 "top1": top1, "top1_prob": float(topv[i, l, 0].exp())})
        inside = rank < top_k  # [n, L, K]
        first = torch.where(inside.any(1), inside.float().argmax(1), torch.full_like(rank[:, 0], -1))
        metrics = {
            "targets": [[tok([t]) for t in ts] for ts in tgt],
            "peak_layer": prob.argmax(1).tolist(),
            f"first_top{top_k}_layer": first.tolist(),  # −1: never in the top-k
            "final_rank": rank[:, -1].tolist(),
            "mean_rank_by_layer": [round(float(x), 2) for x in rank.float().mean((0, 2))],
        }
        params = {"position": position, "top_k": top_k, "texts": prompts,
                  "targets": targets if targets is None or isinstance(targets, (str, int)) else
                  [list(t) if isinstance(t, (list, tuple)) else t for t in targets]}
        return Finding(self.name, pd.DataFrame(rows), params, model.identity(), digest(prompts), metrics,
                       {"rank": rank, "prob": prob, "logit": ty, "topk_ids": topi},
                       ["last layer = the model's own logits (final site, norm applied once)"])

    def explain(self, finding: Finding) -> str:
        m, k = finding.metrics, finding.params.get("top_k", 10)
        first = [x for row in m[f"first_top{k}_layer"] for x in row]
        final = [x for row in m["final_rank"] for x in row]
        L = len(m["mean_rank_by_layer"])
        entered = sorted(x for x in first if x >= 0)
        n_top1 = sum(r == 0 for r in final)
        if not entered:
            return f"Read through the logit lens, no target enters the top {k} at any of the {L} layers."
        med = entered[(len(entered) - 1) // 2]
        if len(final) == 1:
            return (f"Read through the logit lens, the target first enters the top {k} at layer {med} (the last layer "
                    f"is {L - 1}) and {'is' if n_top1 else 'is not'} the model's top-1 token at the last layer.")
        never = len(first) - len(entered)
        return (f"Read through the logit lens, the {len(final)} targets first enter the top {k} at layer {med} "
                f"(median{f'; {never} never do' if never else ''}; the last layer is {L - 1}), and {n_top1} of "
                f"{len(final)} are the model's top-1 token at the last layer.")


logit_lens = LogitLens()
