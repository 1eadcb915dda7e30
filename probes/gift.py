"""GIFT: gaze-shift saliency of the image from the question, and the attention re-weighting it drives
(amazon-science/GIFT, arXiv 2510.22067; docs/methods.md §8).

Saliency (one prompt; layers l ∈ Λ_s, default one layer l_s; V the image tokens; C the question's content-word
tokens): for each content query i,

    ΔA^{l,h}_i = ReLU(A^{l,h}[i, V] − A^{l,h}[i − 1, V])                 (the "gaze shift" from the token before)

In each layer the ⌊H/2⌋ heads with the largest Σ_{i∈C} Σ_{j∈V} ΔA^{l,h}_i[j] are kept, and

    s_raw = mean over (l, kept h, i ∈ C) of ΔA^{l,h}_i                    (one value per image token)
    s     = minmax(clip(s_raw, μ − 3σ, μ + 3σ))  ∈ [0, 1]                 (σ: unbiased std, as torch.std)
    m     = exp(α s)

Decoding (``to_spec`` → the ``attn.gift`` op, layers Λ, the last query row): on the ⌊H/2⌋ heads with the most
image mass, a'_V = a_V ⊙ m; r = Σ a'_V / Σ a_V over those heads (one number per row); on the ⌊H/2⌋ heads with the
most mass on the question's tokens, a'_Q = r a_Q; the rows are renormalised. α = 0 gives m = 1, r = 1: the edit is
skipped (a bit-identical no-op). Heads are chosen at run time per row, as in the authors' code.

Deviations: content words come from a stop-word list (:data:`STOP_WORDS`; the authors keep spaCy's NOUN, PROPN, VERB,
ADJ, ADV and NUM tags) — every question token whose text, lower-cased and stripped of BPE markers, is alphanumeric
and not a stop word (articles, auxiliaries, pronouns, prepositions, conjunctions, chat-role words; wh-adverbs such as
"how" and "where" stay, as spaCy tags them ADV). Defaults scale the paper's LLaVA-1.5-7B layers (l_s = 11, Λ = 12..22 of 32) to the model's
depth: l_s = round(11 L / 32), Λ = l_s + 1 .. round(22 L / 32). The saliency is computed per prompt, so a spec holds
the saliency of the prompt(s) it was made on; :func:`evaluate_items` measures GIFT on a task the way the method runs,
one prompt and its own saliency at a time, and pools the paired differences.
"""
from __future__ import annotations

from collections.abc import Collection

import pandas as pd
import torch

import interp
from interp import vlm
from interp.analysis import Analysis
from interp.finding import Finding, digest
from interp.tasks import Task, bootstrap_ci, load_task

STOP_WORDS = frozenset("""a an the is are was were be been being am do does did there here what which who whom whose
of in on at to for from by with and or not it its this that these those any some
i you he she we they me my your our their his her them us can could would should will shall may might must has
have had user assistant""".split())


def content_positions(tokens: list[str], positions: list[int], stop_words: Collection[str] = STOP_WORDS) -> list[int]:
    """The positions among ``positions`` whose token is a content word: alphanumeric once lower-cased and stripped
    of BPE markers (Ġ ▁ ##), and not in ``stop_words``."""
    out = []
    for p in positions:
        t = tokens[p].replace("Ġ", "").replace("▁", "").replace("##", "").strip().lower()
        if t and any(c.isalnum() for c in t) and t not in stop_words:
            out.append(p)
    return out


def default_layers(n_layers: int) -> tuple[int, list[int]]:
    """(l_s, Λ): the paper's LLaVA-1.5-7B choice (11; 12..22 of 32 layers) scaled to ``n_layers``."""
    ls = min(n_layers - 1, max(0, round(11 * n_layers / 32)))
    hi = min(n_layers - 1, max(ls + 1, round(22 * n_layers / 32)))
    return ls, list(range(ls + 1, hi + 1))


def normalise(s_raw: torch.Tensor) -> torch.Tensor:
    """GIFT's normalisation of a raw saliency [n]: clip to μ ± 3σ (unbiased σ), then min-max to [0, 1]
    (all zeros when the clipped map is constant)."""
    s = s_raw.double()
    mu, sd = s.mean(), (s.std() if s.numel() > 1 else torch.zeros((), dtype=s.dtype))
    s = s.clamp(float(mu - 3 * sd), float(mu + 3 * sd))
    span = s.max() - s.min()
    return ((s - s.min()) / span if span > 0 else torch.zeros_like(s)).float()


def _top(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries along dim 1, ties to the lower index (as the ``attn.gift`` op)."""
    return torch.sort(x, dim=1, descending=True, stable=True).indices[:, :k]


def _items(model, inputs) -> list[vlm.VQAItem]:
    if inputs is None:
        from interp.testbed.items import default_items
        return default_items(model)
    items = vlm.as_items(inputs, model)
    bad = [k for k, it in enumerate(items) if not it.question]
    if bad:
        raise interp.InterpError(f"items {bad[:5]} have no question: GIFT reads the gaze shift over the question's "
                                 "tokens; give each VQAItem question= (a substring of its prompt)")
    return items


class Gift(Analysis):
    """Gaze-shift saliency of the image tokens per prompt, and the GIFT spec."""

    name = "probes.gift"
    title = "GIFT gaze-shift saliency"
    requires = ("vision",)

    def run(self, model: interp.Model, inputs=None, *, layers: list[int] | None = None, alpha: float = 5.0,
            top: int | None = None, stop_words: Collection[str] = STOP_WORDS) -> Finding:
        """``inputs``: VQAItems with ``question`` (None: the testbed's held-out items); ``layers``: Λ_s (default
        [l_s]); ``top``: heads kept per layer (default ⌊H/2⌋)."""
        items = _items(model, inputs)
        L, H = model.n_layers, model.n_heads
        ls, enh = default_layers(L)
        layers = [ls] if layers is None else [int(l) for l in layers]
        if not layers or min(layers) < 0 or max(layers) >= L:
            raise interp.InterpError(f"layers must be a non-empty list within 0..{L - 1}, got {layers}")
        top = max(1, H // 2) if top is None else int(top)
        if not 1 <= top <= H:
            raise interp.InterpError(f"top must be in 1..{H} (heads kept per layer), got {top}")
        batch = vlm.encode_vqa(model, items)
        tr = interp.capture(model, batch, sites=[f"blocks.{l}.attn.pattern" for l in layers])
        A = torch.stack([tr[f"blocks.{l}.attn.pattern"] for l in layers], 1).double()  # [N, Ls, H, T, T]
        raw, sal, rows, kept, n_content = [], [], [], [], []
        for i, r in enumerate(batch.roles):
            V = list(r["image"])
            C = content_positions(batch.tokens[i], list(r["question"]), stop_words)
            n_content.append(len(C))
            if C:
                c = torch.tensor(C)
                dA = (A[i][:, :, c][..., V] - A[i][:, :, c - 1][..., V]).clamp_min(0)  # [Ls, H, |C|, n]
                mass = dA.sum((2, 3))  # [Ls, H]
                sel = torch.zeros_like(mass, dtype=torch.bool).scatter_(1, _top(mass, top), True)
                s_raw = dA[sel].mean((0, 1))  # mean over (layer, kept head) pairs and content queries
            else:
                mass = torch.zeros(len(layers), H, dtype=torch.float64)
                sel = torch.zeros_like(mass, dtype=torch.bool)
                s_raw = torch.zeros(len(V), dtype=torch.float64)
            raw.append(s_raw.float())
            sal.append(normalise(s_raw))
            kept.append(sel)
            rows += [{"item": i, "layer": l, "head": h, "shift_mass": float(mass[j, h]), "kept": bool(sel[j, h]),
                      "n_content": len(C)} for j, l in enumerate(layers) for h in range(H)]
        raw_t, sal_t = torch.stack(raw), torch.stack(sal)
        metrics = {"n_items": len(items), "layers": layers, "enhance_layers": enh, "alpha": alpha, "top": top,
                   "mean_content_tokens": round(sum(n_content) / len(n_content), 3),
                   "items_without_content": sum(n == 0 for n in n_content),
                   "m_max_mean": round(float(torch.exp(alpha * sal_t).amax(1).mean()), 4)}
        n = sal_t.shape[1]
        masks = vlm.target_masks(items, n) if all(it.has_target for it in items) else None
        if masks is not None and bool(masks.any(1).any()):
            has = masks.any(1)
            sc = vlm.score_maps(sal_t[has], masks[has], n_boot=1000, seed=0)
            rnd = vlm.score_maps(vlm.random_maps(int(has.sum()), n, seed=0), masks[has], n_boot=1000, seed=0)
            metrics["localisation"] = {"n": int(has.sum()), "pointing": round(float(sc["pointing"]), 4),
                                       "pointing_ci": [round(float(x), 4) for x in sc["pointing_ci"]],
                                       "energy": round(float(sc["energy"]), 4),
                                       "random_pointing": round(float(rnd["pointing"]), 4),
                                       "random_energy": round(float(rnd["energy"]), 4)}
        return Finding(self.name, pd.DataFrame(rows), {"layers": layers, "alpha": alpha, "top": top},
                       model.identity(), digest(batch.input_ids), metrics,
                       {"saliency": sal_t, "raw": raw_t, "kept": torch.stack(kept)},
                       ["content words: question tokens minus a stop-word list (the authors use spaCy POS tags)"])

    def to_spec(self, finding: Finding, model: interp.Model, *, item: int | None = 0, alpha: float | None = None,
                layers: list[int] | None = None, top: int | None = None, queries: str | None = None) -> interp.Spec:
        """The ``attn.gift`` edit in layers Λ (default: the finding's) with the saliency of ``item`` ([n]; None:
        every item's, [N, n], one row per sequence of a batch of the same items in the same order)."""
        sal = finding.arrays["saliency"]
        if item is not None and not 0 <= item < sal.shape[0]:
            raise interp.InterpError(f"item {item} is out of range: the finding holds {sal.shape[0]} items")
        s = sal[item] if item is not None else sal
        alpha = float(finding.params["alpha"] if alpha is None else alpha)
        layers = list(finding.metrics["enhance_layers"] if layers is None else layers)
        if not layers:
            raise interp.InterpError("no layers to enhance: give layers= (GIFT acts in layers after l_s)")
        queries = queries or ("last" if model.adapter.causal else "role:answer")
        edit = interp.ops.gift(layers, "role:image", s, alpha, queries=queries, query_keys="role:question",
                               top=top if top is not None else finding.params["top"])
        return interp.Spec.for_model(model, [edit], analysis=self.name, prompts=finding.prompts,
                                     params={"alpha": alpha, "layers": layers, "item": item})

    def explain(self, finding: Finding) -> str:
        m = finding.metrics
        loc = m.get("localisation")
        where = (f"; its peak falls on the question's object in {loc['pointing'] * 100:.0f} % of {loc['n']} items "
                 f"(random maps {loc['random_pointing'] * 100:.0f} %)" if loc else "")
        return (f"Over {m['n_items']} prompts, the gaze shift of {m['mean_content_tokens']:.1f} content tokens per "
                f"question at layer(s) {', '.join(map(str, m['layers']))} gives image weights up to "
                f"×{m['m_max_mean']:.1f} (α = {m['alpha']:g}){where}.")


gift = Gift()


def evaluate_items(model: interp.Model, task: Task | str = "testbed_vqa", *, limit: int | None = None,
                   alpha: float = 5.0, layers: list[int] | None = None, enhance_layers: list[int] | None = None,
                   top: int | None = None, chunk: int = 16, seed: int = 0) -> Finding:
    """GIFT on a VQA task as the method runs: each item with its own saliency (:class:`Gift` on the task's items),
    measured with :func:`interp.evaluate` on ``chunk`` items at a time (the spec's saliency has one row per item, in
    the task's order: VQA tasks run as one batch up to 64 items, so the rows meet their sequences); the per-item
    scores are pooled into the Finding ``interp.evaluate`` returns (means and the paired difference, 95 % bootstrap
    intervals)."""
    if not 1 <= chunk <= 64:
        raise interp.InterpError(f"chunk must be in 1..64 (one VQA batch), got {chunk}")
    task = task if isinstance(task, Task) else load_task(task)
    items = vlm.as_items(task.items[:limit] if limit else task.items, model)
    f = gift.run(model, items, layers=layers, alpha=alpha, top=top)
    base, edited = [], []
    for a in range(0, len(items), chunk):
        part = items[a:a + chunk]
        sub = Finding(f.analysis, f.table, f.params, f.model, f.prompts, f.metrics,
                      {"saliency": f.arrays["saliency"][a:a + chunk]})
        spec = gift.to_spec(sub, model, item=None, layers=enhance_layers)
        ev = interp.evaluate(model, spec, Task(f"{task.name}[{a}:{a + len(part)}]", "vqa", part))
        base += [float(x) for x in ev.table["without"]]
        edited += [float(x) for x in ev.table["with"]]
    diff = [e - b for b, e in zip(base, edited)]
    (mb, lb, hb), (me, le, he), (md, ld, hd) = (bootstrap_ci(x, seed=seed) for x in (base, edited, diff))
    metric = "logprob" if items[0].meta.get("score") == "logprob" else "accuracy"
    table = pd.DataFrame({"item": range(len(base)), "without": base, "with": edited, "delta": diff})
    metrics = {"task": task.name, "kind": "vqa", "metric": metric, "n": len(base), "without": mb,
               "without_ci": [lb, hb], "with": me, "with_ci": [le, he], "delta": md, "delta_ci": [ld, hd],
               "changed_items": int(sum(d != 0 for d in diff))}
    return Finding("interp.evaluate", table, {"task": task.name, "limit": limit, "specs": [
        {"analysis": gift.name, "alpha": alpha, "layers": f.metrics["layers"],
         "enhance_layers": enhance_layers or f.metrics["enhance_layers"], "per_item": True}]},
        model.identity(), task.name, metrics)
