"""Retrieval heads: the copy-paste score of Wu et al., "Retrieval Head Mechanistically Explains Long-Context
Factuality" (arXiv 2404.15574, 2024), docs/methods.md §13.

A needle (n random words, each one token) is placed inside filler text at a depth, and the model is asked to
repeat it. While the model decodes greedily, a step that emits token w is a *copy-paste* of head (l, h) when w
occurs in the needle and the head's most-attended key at that step is a needle position holding w:

    cp(l, h) = #{steps s : w_s ∈ needle, argmax_k A^{l,h}[q_s, k] ∈ needle span, x_k = w_s} / |needle|

with q_s the query that predicts step s (the last position before w_s). The retrieval score is cp averaged over
the trials (haystack lengths × needle depths); heads above 0.1 are retrieval heads (Wu et al.'s threshold).
The attention of each decoding step is read from one forward pass over prompt + generated tokens with the
``TopK(k=1)`` reducer (cached greedy decoding computes the same rows), so no pattern is stored.

``to_spec`` zero-ablates the top k heads (``attn.head_ablate``), or, with ``control=True``, k heads drawn at
random among the others; :func:`needle_task` builds a held-out copying task (one next-token item per needle
word, teacher-forced) for ``interp.evaluate``, and :func:`versus_random` compares the two ablations with a
paired bootstrap interval on the per-item difference.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

import interp
from interp.analysis import Analysis
from interp.finding import Finding, digest
from interp.tasks import Task, bootstrap_ci
from viz import interactive as _interactive
from viz import static as _static

FILLER = (
    "The grass in the park was cut early in the morning.",
    "Many people like to walk along the river after work.",
    "The library opens at nine and closes at six on weekdays.",
    "A small bakery on the corner sells fresh bread every day.",
    "The train to the city leaves every twenty minutes.",
    "Children played football in the yard until it got dark.",
    "The weather report said it would rain later in the week.",
    "An old bridge crosses the valley north of the town.",
    "The museum has a large collection of paintings and maps.",
    "Farmers bring their vegetables to the market on Saturday.",
    "The road was closed for repairs during the summer.",
    "She planted tomatoes and beans in the garden behind the house.",
    "The school choir practised songs for the winter concert.",
    "A cold wind came down from the hills in the evening.",
    "The shop on the main street repairs bicycles and shoes.",
    "Most of the houses in the village are made of stone.",
)
NEEDLE = " The secret words are:{words}."
QUESTION = "\n\nWhat are the secret words in the text above? The secret words are:"


def _word_pool(tok) -> list[int]:
    """Ids of single-token lowercase words with a leading space (4–9 letters) that decode and re-encode to themselves."""
    if tok is None:
        raise interp.InterpError("needle prompts are built from words: the model needs a tokenizer (or give the "
                                 "trials as inputs=[{'input_ids': ..., 'needle': (start, end)}])")
    ids = [i for i, s in enumerate(tok.convert_ids_to_tokens(list(range(len(tok)))))
           if isinstance(s, str) and re.fullmatch(r"[Ġ▁][a-z]{4,9}", s)]
    return ids


def needle_trials(model: interp.Model, *, lengths: Sequence[int] = (160, 320), depths: Sequence[float] = (0.1, 0.5, 0.9),
                  n_words: int = 6, repeats: int = 1, seed: int = 0) -> list[dict]:
    """Needle-in-a-haystack prompts: per (length, depth, repeat), filler sentences (shuffled, ~``length`` tokens),
    the needle sentence " The secret words are: w1 … wn." at ``depth`` of the haystack, and the question.
    Each trial: {"prompt", "needle" (the words, a string), "words" (token ids), "length", "depth"}."""
    tok = model.tokenizer
    pool = _word_pool(tok)
    rng = np.random.default_rng(seed)
    n_tok = [len(tok(s, add_special_tokens=False)["input_ids"]) for s in FILLER]
    out = []
    for length in lengths:
        for depth in depths:
            if not 0 <= depth <= 1:
                raise interp.InterpError(f"depth {depth} is outside [0, 1] (0: the needle first, 1: last)")
            for _ in range(repeats):
                sents, total = [], 0
                while total < length:
                    i = int(rng.integers(len(FILLER)))
                    sents.append(FILLER[i])
                    total += n_tok[i] + 1
                words: list[int] = []
                while len(words) < n_words:
                    w = int(pool[rng.integers(len(pool))])
                    text = tok.decode([w])
                    if w not in words and tok(text, add_special_tokens=False)["input_ids"] == [w]:
                        words.append(w)
                needle = "".join(tok.decode([w]) for w in words)
                at = int(round(depth * len(sents)))
                body = " ".join(sents[:at]) + NEEDLE.format(words=needle) + (" " + " ".join(sents[at:]) if sents[at:] else "")
                out.append({"prompt": body.strip() + QUESTION, "needle": needle, "words": words, "length": int(length),
                            "depth": float(depth)})
    return out


def _find(seq: list[int], sub: list[int]) -> int:
    for i in range(len(seq) - len(sub), -1, -1):  # the last occurrence
        if seq[i:i + len(sub)] == sub:
            return i
    return -1


@torch.no_grad()
def copy_paste(model: interp.Model, prompt_ids: Sequence[int], needle: tuple[int, int],
               answer_ids: Sequence[int] | None = None, max_new_tokens: int = 8) -> tuple[torch.Tensor, list[int]]:
    """Copy-paste score [L, H] of one trial: ``prompt_ids`` with the needle at positions [start, end); the answer is
    ``answer_ids`` when given (teacher-forced), else the model's greedy continuation of ``max_new_tokens`` tokens.
    Returns (score, answer ids)."""
    ids = [int(i) for i in prompt_ids]
    s, e = int(needle[0]), int(needle[1])
    if not 0 <= s < e <= len(ids):
        raise interp.InterpError(f"needle span [{s}, {e}) is not inside the {len(ids)} prompt tokens")
    if answer_ids is None:
        x = torch.tensor([ids], device=model.device)
        pad = getattr(model.tokenizer, "pad_token_id", None) if model.tokenizer is not None else None
        gen = model.hf.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=pad if pad is not None else 0)
        answer_ids = gen[0, len(ids):].tolist()
    answer = [int(a) for a in answer_ids]
    if not answer:
        raise interp.InterpError("no answer token to score")
    full = ids + answer
    tr = interp.capture(model, {"input_ids": torch.tensor([full[:-1]])}, reducers=[interp.TopK(k=1)])
    top = torch.stack([tr[f"blocks.{l}.attn.topk_idx"][0, :, :, 0] for l in range(model.n_layers)])  # [L, H, T]
    needle_toks = torch.tensor(ids[s:e])
    score = torch.zeros(top.shape[:2], dtype=torch.float64)
    for j, w in enumerate(answer):
        if w not in ids[s:e]:
            continue
        q = len(ids) + j - 1  # the query whose prediction is w
        k = top[:, :, q].cpu()
        inside = (k >= s) & (k < e)
        hit = inside & (needle_toks[(k - s).clamp(0, e - s - 1)] == w)
        score += hit.double()
    return (score / (e - s)).float(), answer


def _trials_from_inputs(model: interp.Model, inputs: Any) -> list[dict]:
    if isinstance(inputs, dict):
        inputs = [inputs]
    if not isinstance(inputs, (list, tuple)) or not all(isinstance(t, dict) for t in inputs):
        raise interp.InterpError("retrieval inputs: a list of trials, each {'prompt': text, 'needle': the needle text "
                                 "in it} or {'input_ids': ids, 'needle': (start, end)}; or None for the built-in "
                                 "needle-in-a-haystack prompts")
    return list(inputs)


def _encode_trial(model: interp.Model, t: dict) -> tuple[list[int], tuple[int, int]]:
    if "input_ids" in t:
        ids = torch.as_tensor(t["input_ids"]).reshape(-1).tolist()
        return ids, tuple(t["needle"])
    if "prompt" not in t or "needle" not in t:
        raise interp.InterpError(f"a trial needs 'prompt' and 'needle' (or 'input_ids' and a (start, end) needle); "
                                 f"got keys {sorted(t)}")
    ids = model.encode(t["prompt"]).input_ids[0].tolist()
    words = t.get("words") or model.tokenizer(t["needle"], add_special_tokens=False)["input_ids"]
    at = _find(ids, list(words))
    if at < 0:
        raise interp.InterpError(f"the needle {t['needle']!r} is not a token subsequence of its prompt: put it after a "
                                 "space, as a run of whole words")
    return ids, (at, at + len(words))


class Retrieval(Analysis):
    """Copy-paste score per (layer, head) on needle-in-a-haystack prompts (Wu et al. 2024)."""

    name = "probes.retrieval"
    title = "Retrieval heads"
    in_scan = False
    figures = (_static.generic, _interactive.generic)  # the layer × head heatmap of the score

    def run(self, model: interp.Model, inputs: Any = None, *, lengths: Sequence[int] = (160, 320),
            depths: Sequence[float] = (0.1, 0.5, 0.9), n_words: int = 6, repeats: int = 1, seed: int = 0,
            max_new_tokens: int | None = None, threshold: float = 0.1) -> Finding:
        """``inputs``: trials ({'prompt', 'needle'} or {'input_ids', 'needle': (start, end)}); None: the built-in
        needle prompts (``lengths`` × ``depths`` × ``repeats``, ``n_words`` random words, ``seed``)."""
        trials = (needle_trials(model, lengths=lengths, depths=depths, n_words=n_words, repeats=repeats, seed=seed)
                  if inputs is None else _trials_from_inputs(model, inputs))
        if not trials:
            raise interp.InterpError("no trials: give at least one length and one depth")
        scores, exact, rows = [], [], []
        for t in trials:
            ids, (s, e) = _encode_trial(model, t)
            score, ans = copy_paste(model, ids, (s, e), t.get("answer_ids"),
                                    max_new_tokens or (e - s) + 2)
            scores.append(score)
            ok = ans[:e - s] == ids[s:e]
            exact.append(ok)
            rows.append({"length": len(ids), "depth": t.get("depth"), "copied": ok})
        score = torch.stack(scores).mean(0)
        L, H = score.shape
        table = pd.DataFrame({"layer": np.repeat(np.arange(L), H), "head": np.tile(np.arange(H), L),
                              "score": score.reshape(-1).numpy()})
        best = table.sort_values("score", ascending=False).head(10)
        n_ret = int((score > threshold).sum())
        metrics = {"n_trials": len(trials), "threshold": threshold, "n_retrieval_heads": n_ret,
                   "fraction_retrieval_heads": n_ret / (L * H),
                   "top_heads": [[int(a), int(b)] for a, b in zip(best.layer, best["head"])],
                   "top_scores": [float(x) for x in best.score], "copy_accuracy": float(np.mean(exact)),
                   "mean_tokens": float(np.mean([r["length"] for r in rows]))}
        params = {"lengths": list(lengths), "depths": list(depths), "n_words": n_words, "repeats": repeats,
                  "seed": seed, "threshold": threshold, "builtin": inputs is None}
        return Finding(self.name, table, params, model.identity(),
                       digest([t.get("prompt", str(t.get("input_ids"))) for t in trials]), metrics,
                       {"score": score, "per_trial": torch.stack(scores)})

    def to_spec(self, finding: Finding, model: interp.Model, *, k: int | None = 10, threshold: float | None = None,
                control: bool = False, seed: int = 0) -> interp.Spec:
        """Zero-ablate the top ``k`` heads (or those above ``threshold`` when k is None); ``control=True``: as many
        heads drawn at random (``seed``) among the others."""
        t = finding.table.sort_values(["score", "layer", "head"], ascending=[False, True, True])
        if k is None:
            t = t[t.score > (finding.params["threshold"] if threshold is None else threshold)]
            if t.empty:
                raise interp.InterpError("no head is above the threshold: lower it or give k")
        else:
            if not 0 < k <= len(t):
                raise interp.InterpError(f"k = {k}: choose 1…{len(t)} heads")
            t = t.head(k)
        chosen = list(zip(t.layer.astype(int), t["head"].astype(int)))
        if control:
            rest = [(int(l), int(h)) for l, h in zip(finding.table.layer, finding.table["head"]) if (l, h) not in set(chosen)]
            rng = np.random.default_rng(seed)
            chosen = [rest[i] for i in rng.choice(len(rest), size=len(chosen), replace=False)]
        by_layer: dict[int, list[int]] = {}
        for l, h in chosen:
            by_layer.setdefault(int(l), []).append(int(h))
        edits = [interp.ops.head_ablate([l], heads=sorted(hs)) for l, hs in sorted(by_layer.items())]
        return interp.Spec.for_model(model, edits, analysis=self.name, prompts=finding.prompts,
                                     params={"k": k, "threshold": threshold, "control": control, "seed": seed,
                                             "heads": [[int(l), int(h)] for l, h in sorted(chosen)]})

    def explain(self, finding: Finding) -> str:
        m = finding.metrics
        l, h = m["top_heads"][0]
        return (f"{m['n_retrieval_heads']} heads ({m['fraction_retrieval_heads'] * 100:.1f} %) copy-paste the needle "
                f"with a score above {m['threshold']:g} (the strongest, layer {l} head {h}: {m['top_scores'][0]:.2f}); "
                f"the model repeated the needle exactly in {m['copy_accuracy'] * 100:.0f} % of {m['n_trials']} trials.")


retrieval = Retrieval()


def needle_task(model: interp.Model, *, lengths: Sequence[int] = (160, 320), depths: Sequence[float] = (0.1, 0.5, 0.9),
                n_words: int = 6, repeats: int = 2, seed: int = 1) -> Task:
    """A copying task for ``interp.evaluate``: per needle trial (another seed than the detection's by default) and
    per needle word i, the prompt followed by the first i words, answer word i + 1 (next-token accuracy,
    teacher-forced)."""
    items = []
    for t in needle_trials(model, lengths=lengths, depths=depths, n_words=n_words, repeats=repeats, seed=seed):
        words = [model.tokenizer.decode([w]) for w in t["words"]]
        for i in range(len(words)):
            items.append({"kind": "next_token", "prompt": t["prompt"] + "".join(words[:i]), "answer": words[i]})
    return Task("needle_copy", "next_token", items)


def versus_random(model: interp.Model, finding: Finding, task: Task | str | None = None, *, k: int = 10,
                  seed: int = 0, n_random: int = 1) -> dict:
    """Ablate the top ``k`` retrieval heads and, ``n_random`` times, k random other heads; evaluate each on
    ``task`` (default :func:`needle_task`). Returns the evaluations and the paired bootstrap CI of
    Δ_top − Δ_random per item (random draws averaged per item)."""
    task = needle_task(model) if task is None else task
    top = interp.evaluate(model, retrieval.to_spec(finding, model, k=k), task)
    rand = [interp.evaluate(model, retrieval.to_spec(finding, model, k=k, control=True, seed=seed + i), task)
            for i in range(n_random)]
    d_top = top.table["delta"].to_numpy()
    d_rand = np.mean([r.table["delta"].to_numpy() for r in rand], 0)
    m, lo, hi = bootstrap_ci((d_top - d_rand).tolist(), seed=seed)
    return {"top": top, "random": rand, "k": k, "n": len(d_top), "delta_top": float(d_top.mean()),
            "delta_random": float(d_rand.mean()), "top_minus_random": m, "top_minus_random_ci": [lo, hi]}
