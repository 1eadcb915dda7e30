"""Shapley attribution of prompt spans: SalaMAnder + CoSP (Xin et al., Findings EMNLP'25).

No code was released; everything marked **[recon]** is reconstructed from the paper's abstract
(see METHODS.md section 7).

Players and game
    The players N = {1..n} are spans of the prompt: the mathematical expressions of few-shot CoT
    exemplars (the paper's choice), sentences, whole demonstrations, or spans given by hand
    (:func:`find_players`). For a coalition S ⊆ N the prompt keeps the players in S and replaces
    every other player by a neutral placeholder (default ``"..."``) **[recon]**; the value is

        v(S) = mean over questions q of  log p(gold answer of q | prompt_S + q)   (``value="logprob"``)

    summed over the answer tokens, or the teacher-forced greedy accuracy of the answer
    (``value="accuracy"``). Coalitions are evaluated in right-padded batches and cached by
    bitmask, so no coalition is ever evaluated twice; ``n_evals`` counts distinct coalitions.
    A batch of rows (coalition × question) runs as one right-padded ``model.logits`` call.

Shapley value
    φ_i = Σ_{S ⊆ N∖i} |S|! (n−|S|−1)! / n! · [v(S ∪ i) − v(S)]
    computed exactly by enumerating the 2^n coalitions (:func:`exact_shapley`, n ≤ 12).

Stratified estimators (:func:`stratified_shapley`)
    Coalitions are sampled by size, without replacement (the cache deduplicates); sizes 0, 1,
    n−1 and n (2n + 2 coalitions) are always evaluated, as is any size that is cheaper to enumerate
    than to sample. Designs (``design=``):

    * ``"spectral"`` (default; our construction **[recon]**): complementary pairs (S, N∖S) with
      |S| stratified over sizes 2..n−2 in proportion to C(n, s). In the ±1 (Walsh) basis
      v = Σ_A f̂(A) Π_{j∈A} z_j, the Shapley value of Π_{j∈A} z_j is 2/|A| for every i ∈ A when
      |A| is odd and 0 when |A| is even, so

          φ_i = Σ_{A ∋ i, |A| odd} (2/|A|) f̂(A)

      depends only on the odd part y(S) = (v(S) − v(N∖S))/2, which each pair gives exactly
      (paired sampling: Covert & Lee, AISTATS'21, "Improving KernelSHAP"). The estimate is the
      posterior mean of φ under y = Σ_i β_i z_i + g, β unpenalised (universal kriging) and g a
      Gaussian process over odd orders d ≥ 3 with independent coefficients of variance σ²ρ^{(d−3)/2};
      σ² and ρ (a grid) are chosen by restricted marginal likelihood on the run's own data. It is
      exact whenever the odd part is linear (any game with at most pairwise interactions),
      efficiency holds up to the 1e−9 jitter (the pair (∅, N) is interpolated), every coalition
      informs every player, ``se`` is the posterior standard deviation, and with every coalition
      evaluated it returns the exact values. It is a Bayesian (shrinkage) estimate, not unbiased.
    * ``"svarm"``: stratified SVARM (Kolpaczki, Bengs, Muschalik, Hüllermeier, AAAI'24,
      "Approximating the Shapley Value without Marginal Contributions"), no marginal pairs:

          φ_i = (1/n) Σ_{k=0}^{n−1} [φ⁺_{ik} − φ⁻_{ik}],   φ⁺_{ik} = mean v(S) over evaluated S ∋ i,
          |S| = k+1;  φ⁻_{ik} = mean v(S) over evaluated S ∌ i, |S| = k

      with a warm-up per size (blocks of a random circular order and complements of blocks) so
      that every cell has a sample, then a uniform sample without replacement of each size (the
      same number per size as ``"cyclic"``; the paper's size distribution is not used). Unbiased.
    * ``"cyclic"`` / ``"shared"``: marginal-contribution pairs, the estimator of the paper,
      φ_i ≈ (1/n) Σ_{k=0}^{n−1} μ̂_{ik},  μ̂_{ik} = mean of v(S ∪ i) − v(S) over the evaluated
      pairs with |S| = k. ``"cyclic"``: a random circular order σ, its cyclic intervals of lengths
      k and k+1; the k players just before and just after i are two uniform size-k subsets of
      N∖i and S ∪ i is again an interval (≈ 0.5 evaluations per marginal). ``"shared"``: a base
      set C of size k paired with C ∪ i for every i ∉ C that still needs samples. Both are
      invariant in distribution under relabelling the players, so μ̂_{ik} is unbiased; se_i² =
      (1/n²) Σ_k s²_{ik}/m_{ik} · (1 − m_{ik}/C(n−1,k)).

    On the bench's 10-player SmolLM2 prompt game (bench/shapley.py) captum ShapleyValueSampling
    needs 3.1x the distinct coalitions of ``"spectral"`` to reach the same error (20 seeds), and
    1.6x those of ``"cyclic"``; ``"svarm"`` is weaker there than ``"cyclic"`` because v varies
    far more within a size than a marginal contribution does. Only exact enumeration and
    ``"spectral"`` satisfy efficiency (exactly / up to jitter); the residual Σφ − (v(N) − v(∅))
    is reported.

CoSP **[recon]**
    CoSP = |{i : φ_i > 0}|, the number of expressions with positive Shapley value, which the
    paper reports to track accuracy monotonically; drop or replace players with φ < 0.

API: :func:`find_players`, :class:`PromptGame`, :class:`CallableGame`, :func:`exact_shapley`,
:func:`stratified_shapley`; the analysis :class:`Shapley` (``shapley(model, text, answer, ...)`` →
:class:`interp.finding.Finding`, ``"attribution.shapley"``) and :func:`shapley_of_game` for a Game or a
plain value function. Findings are diagnostic only (no ``to_spec``).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from interp.analysis import Analysis
from interp.errors import InterpError
from interp.finding import Finding, digest
from interp.model import Model
from viz import interactive as _interactive
from viz import static as _static

__all__ = ["find_players", "Game", "PromptGame", "CallableGame", "ShapleyEstimate", "exact_shapley",
           "stratified_shapley", "Shapley", "shapley", "shapley_of_game", "MAX_EXACT"]

MAX_EXACT = 12  # exact enumeration refuses more players (2^12 = 4096 coalitions)
DESIGNS = ("spectral", "svarm", "cyclic", "shared")
SPECTRAL_RHO = tuple(float(x) for x in np.geomspace(1e-4, 1.0, 13))  # prior variance ratio between odd orders d+2 and d
AUTO_EXACT = 10  # method="auto" enumerates up to this many players

# --------------------------------------------------------------------------------------------------
# players

_NUM = r"\(*[$€£]?\d+(?:[.,:]\d+)*%?\)*"
_OP = r"[=+\-−–×*/÷]"
_EXPR = re.compile(rf"{_NUM}(?:[ \t]*{_OP}[ \t]*{_NUM})+")
_LATEX = re.compile(r"\\\(.+?\\\)|\\\[.+?\\\]|\$\$.+?\$\$|\$[^$\n]*\\[A-Za-z]+[^$\n]*\$", re.S)


def find_players(text: str, kind: str | Sequence[tuple[int, int]] = "expressions") -> list[tuple[int, int]]:
    """Players as sorted, non-overlapping (start, end) character spans of ``text``.

    ``kind``: ``"expressions"`` (spans of numbers joined by =, +, -, ×, *, / or ÷, and LaTeX math),
    ``"sentences"``, ``"demos"`` (few-shot demonstrations separated by blank lines), or a list of
    (start, end) spans given by hand.
    """
    if not isinstance(kind, str):
        spans = sorted((int(a), int(b)) for a, b in kind)
        for (a, b), nxt in zip(spans, spans[1:] + [(len(text), len(text))]):
            if not 0 <= a < b <= len(text):
                raise InterpError(f"player span ({a}, {b}) is empty or outside the text (length {len(text)})")
            if b > nxt[0]:
                raise InterpError(f"player spans ({a}, {b}) and {nxt} overlap; players must be disjoint")
        return spans
    if kind == "expressions":
        spans = [m.span() for m in _LATEX.finditer(text)]
        for m in _EXPR.finditer(text):
            a, b = m.span()
            if not any(a < y and b > x for x, y in spans):
                spans.append((a, b))
        return sorted(spans)
    if kind == "sentences":
        pat = re.compile(r"[^\n]+?(?:[.!?]+(?=\s|$)|(?=\n)|$)")
    elif kind == "demos":
        pat = re.compile(r"\S(?:.*?\S)??(?=\n[ \t]*\n|\s*\Z)", re.S)
    else:
        raise InterpError(f"unknown player kind {kind!r}: use 'expressions', 'sentences', 'demos' "
                          "or a list of (start, end) character spans")
    out = []
    for m in pat.finditer(text):
        a, b = m.span()
        seg = text[a:b]
        a, b = a + len(seg) - len(seg.lstrip()), b - (len(seg) - len(seg.rstrip()))
        if b > a:
            out.append((a, b))
    return out


# --------------------------------------------------------------------------------------------------
# games

def _mask(c) -> int:
    if isinstance(c, (int, np.integer)):
        return int(c)
    m = 0
    for i in c:
        m |= 1 << int(i)
    return m


def _members(mask: int, n: int) -> frozenset:
    return frozenset(i for i in range(n) if mask >> i & 1)


class Game:
    """A cooperative game over ``n`` players with a value cache keyed by coalition bitmask.

    ``values(coalitions)`` takes frozensets (or bitmasks) and evaluates only the coalitions not
    seen before, in one batched call of ``_evaluate``; ``n_evals`` counts distinct coalitions.
    """

    n: int

    def __init__(self, n: int):
        if n < 1:
            raise InterpError("a game needs at least one player")
        self.n = int(n)
        self.cache: dict[int, float] = {}

    @property
    def n_evals(self) -> int:
        return len(self.cache)

    def _evaluate(self, masks: list[int]) -> list[float]:
        raise NotImplementedError

    def values(self, coalitions: Iterable) -> np.ndarray:
        masks = [_mask(c) for c in coalitions]
        full = (1 << self.n) - 1
        if any(m & ~full for m in masks):
            raise InterpError(f"a coalition names a player outside 0..{self.n - 1}")
        todo = list(dict.fromkeys(m for m in masks if m not in self.cache))
        if todo:
            vals = self._evaluate(todo)
            if len(vals) != len(todo):
                raise InterpError(f"the game returned {len(vals)} values for {len(todo)} coalitions")
            self.cache.update(zip(todo, (float(v) for v in vals)))
        return np.array([self.cache[m] for m in masks], dtype=np.float64)

    __call__ = values

    def view(self) -> "Game":
        """A game sharing this cache of values but with its own count of distinct coalitions.

        Use it to compare estimators fairly: every run pays for the coalitions it asks for,
        while the model evaluates each coalition at most once overall.
        """
        return _View(self)

    def describe(self, i: int) -> dict:
        return {"player": i}


class _View(Game):
    def __init__(self, base: Game):
        super().__init__(base.n)
        self.base = base

    def _evaluate(self, masks):
        return list(self.base.values(masks))

    def describe(self, i):
        return self.base.describe(i)


class CallableGame(Game):
    """Wrap ``value_fn(list[frozenset]) -> list[float]`` over ``n`` players."""

    def __init__(self, value_fn: Callable[[list[frozenset]], Sequence[float]], n: int):
        super().__init__(n)
        self.value_fn = value_fn

    def _evaluate(self, masks):
        return list(self.value_fn([_members(m, self.n) for m in masks]))


class PromptGame(Game):
    """v(S) for prompt spans on a causal LM (see the module docstring).

    ``players``: a kind for :func:`find_players` or explicit (start, end) spans of ``text``.
    ``question`` (str or list) is appended after ``text`` and never masked; ``answer`` (str, or
    one per question) is the gold continuation whose tokens are scored. With ``question=None``
    ``text`` is the whole prompt.
    """

    def __init__(self, model, text: str, players="expressions", answer: str | Sequence[str] = "",
                 placeholder: str = "...", value: str = "logprob", question: str | Sequence[str] | None = None,
                 batch_size: int = 16, progress: bool | None = None):
        import interp
        self.model = interp.load(model)
        self.tok = self.model.tokenizer
        if self.tok is None:
            raise InterpError("this model has no tokenizer: pass tokenizer= to interp.load")
        if value not in ("logprob", "accuracy"):
            raise InterpError(f"value must be 'logprob' or 'accuracy', not {value!r}")
        self.text, self.placeholder, self.value, self.batch_size = text, placeholder, value, int(batch_size)
        self.progress = progress
        self.spans = find_players(text, players)
        if not self.spans:
            raise InterpError(f"no players of kind {players!r} found in the text; give explicit (start, end) spans")
        super().__init__(len(self.spans))
        qs = [""] if question is None else ([question] if isinstance(question, str) else list(question))
        ans = [answer] * len(qs) if isinstance(answer, str) else list(answer)
        if len(ans) != len(qs) or not all(ans):
            raise InterpError("give one non-empty answer (or one per question)")
        self.questions, self.answers = qs, ans
        self.answer_ids = [self.tok(a, add_special_tokens=False)["input_ids"] for a in ans]
        self.n_rows = 0  # forward rows (coalitions × questions)

    def describe(self, i):
        a, b = self.spans[i]
        return {"player": i, "start": a, "end": b, "span": self.text[a:b]}

    def prompt(self, coalition) -> str:
        """The prompt text (without question) with only the players in ``coalition`` kept."""
        m, out, pos = _mask(coalition), [], 0
        for i, (a, b) in enumerate(self.spans):
            out += [self.text[pos:a], self.text[a:b] if m >> i & 1 else self.placeholder]
            pos = b
        return "".join(out + [self.text[pos:]])

    @torch.inference_mode()
    def _evaluate(self, masks):
        from tqdm.auto import tqdm
        rows = []  # (coalition index, question index, ids, n_prompt)
        for ci, m in enumerate(masks):
            p = self.prompt(m)
            for qi, q in enumerate(self.questions):
                ids = self.tok(p + q)["input_ids"]
                rows.append((ci, qi, ids + self.answer_ids[qi], len(ids)))
        # rows of similar length together: little padding in a batch
        order = sorted(range(len(rows)), key=lambda r: (len(rows[r][2]), rows[r][2]))
        vals = np.zeros((len(masks), len(self.questions)))
        batches = [[rows[r] for r in order[i:i + self.batch_size]] for i in range(0, len(order), self.batch_size)]
        show = self.progress if self.progress is not None else len(batches) >= 4
        for batch in tqdm(batches, desc=f"shapley: {len(masks)} coalitions", disable=not show, leave=False):
            for (ci, qi, _, _), lp in zip(batch, self._answer_logprobs(batch)):
                ans = torch.tensor(self.answer_ids[qi])
                if self.value == "logprob":
                    vals[ci, qi] = lp.gather(1, ans[:, None]).sum().item()
                else:
                    vals[ci, qi] = float(bool((lp.argmax(-1) == ans).all()))
        self.n_rows += len(rows)
        return list(vals.mean(1))

    def _answer_logprobs(self, batch) -> list[torch.Tensor]:
        """Per row, log-probs [answer length, vocab] predicting the answer tokens (one right-padded
        ``model.logits`` call; causal attention keeps the padding out of the real tokens' logits)."""
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else (self.tok.eos_token_id or 0)
        seqs = [r[2] for r in batch]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(batch), T), pad, dtype=torch.long)
        am = torch.zeros((len(batch), T), dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, :len(s)] = torch.tensor(s)
            am[j, :len(s)] = 1
        logits = self.model.logits({"input_ids": ids.to(self.model.device), "attention_mask": am.to(self.model.device)})
        out = []
        for j, (_, qi, _, n_p) in enumerate(batch):
            pos = torch.arange(len(self.answer_ids[qi]), device=logits.device) + n_p - 1
            out.append(torch.log_softmax(logits[j, pos].float(), dim=-1).cpu())
        return out


def as_game(game, n: int | None = None) -> Game:
    if isinstance(game, Game):
        return game
    if callable(game):
        if n is None:
            raise InterpError("a plain value function needs the number of players: pass n=")
        return CallableGame(game, n)
    raise InterpError(f"not a game: {type(game).__name__}; give a Game or value_fn(list[frozenset]) with n=")


# --------------------------------------------------------------------------------------------------
# estimators

@dataclass
class ShapleyEstimate:
    phi: np.ndarray
    v_empty: float
    v_full: float
    n_evals: int  # distinct coalitions this run asked for
    method: str
    se: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    @property
    def efficiency_residual(self) -> float:
        return float(self.phi.sum() - (self.v_full - self.v_empty))

    @property
    def cosp(self) -> int:
        return int((self.phi > 0).sum())


def _popcount(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.int64)
    c = np.zeros_like(a)
    while a.any():
        c += a & 1
        a = a >> 1
    return c


def exact_shapley(game, n: int | None = None) -> ShapleyEstimate:
    """Shapley values by enumerating all 2^n coalitions (n ≤ 12)."""
    game = as_game(game, n)
    n = game.n
    if n > MAX_EXACT:
        raise InterpError(f"exact enumeration needs 2^{n} coalitions; use stratified_shapley for n > {MAX_EXACT}")
    seen = game.n_evals
    v = game.values(range(1 << n))
    return ShapleyEstimate(_exact_from_values(v, n), float(v[0]), float(v[-1]), 1 << n, "exact",
                           info={"new_evals": game.n_evals - seen})


def _exact_from_values(v: np.ndarray, n: int) -> np.ndarray:
    """φ from the values of all 2^n coalitions, indexed by bitmask."""
    masks = np.arange(1 << n, dtype=np.int64)
    size = _popcount(masks)
    w = np.array([math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) if s < n else 0.0
                  for s in range(n + 1)])
    phi = np.zeros(n)
    for i in range(n):
        without = masks[(masks >> i & 1) == 0]
        phi[i] = float(np.sum(w[size[without]] * (v[without | (1 << i)] - v[without])))
    return phi


def stratified_shapley(game, m_per_stratum: int | Sequence[int] = 8, seed: int | None = 0, *,
                       design: str = "spectral", exact_strata="auto", n: int | None = None) -> ShapleyEstimate:
    """Shapley estimate from coalitions sampled by size (see the module docstring for the designs).

    ``m_per_stratum`` (m_k) sets the budget: in the pair designs about m_k samples per player in
    each sampled stratum k (``"cyclic"`` rounds m_k up to an even number); ``"svarm"`` and
    ``"spectral"`` evaluate the same number of coalitions per size as ``"cyclic"`` would,
    ⌈(m_{s−1} + m_s)·n/4⌉ (``"spectral"`` spreads that total over sizes 2..n−2 in proportion to
    C(n, s)). ``design``: ``"spectral"`` (default), ``"svarm"``, ``"cyclic"`` or ``"shared"``.
    ``exact_strata``: ``"auto"`` (k = 0, n−1 and whatever is cheaper to enumerate than to sample),
    ``False`` (only k = 0 and n−1), ``True`` (every stratum: the exact values) or a list of strata
    k to enumerate as well (sizes k and k+1).
    """
    game = as_game(game, n)
    n = game.n
    m = [int(m_per_stratum)] * n if np.isscalar(m_per_stratum) else [int(x) for x in m_per_stratum]
    if len(m) != n or min(m) < 1:
        raise InterpError(f"m_per_stratum must be a positive int or {n} positive ints (one per stratum)")
    if design not in DESIGNS:
        raise InterpError(f"design must be one of {', '.join(map(repr, DESIGNS))}, not {design!r}")
    rng = np.random.default_rng(seed)
    if design in ("svarm", "spectral"):
        enum_sizes: set[int] = set()
        if exact_strata is True:
            enum_sizes = set(range(n + 1))
        elif exact_strata not in ("auto", False, None):
            enum_sizes = {s for k in exact_strata for s in (int(k), int(k) + 1)}
        phi, se, vals, masks, info = (_svarm if design == "svarm" else _spectral)(game, n, m, rng, enum_sizes)
        done = set(info["exact_sizes"])
        info.update(design=design, m_per_stratum=m, exact_strata=[k for k in range(n) if {k, k + 1} <= done])
        return ShapleyEstimate(phi, vals[0], vals[(1 << n) - 1], len(masks), "stratified", se, info=info)
    full = (1 << n) - 1
    # which strata are enumerated: k = 0 and n-1 always, then by rule
    exact = {0, n - 1}
    if exact_strata is True:
        exact = set(range(n))
    elif exact_strata not in ("auto", False, None):
        exact |= {int(k) for k in exact_strata}
    sampled = [k for k in range(n) if k not in exact]
    # the design: a set of coalitions chosen from random draws only, never from values, and
    # invariant in distribution under relabelling the players
    want: set[int] = {0, full}
    if design == "cyclic":
        blocks = {k: -(-m[k] // 2) for k in sampled}  # circular orders giving stratum k two samples each
        draws = [0] * (n + 1)  # coalitions of each size the orders would draw
        for k, b in blocks.items():
            draws[k] = max(draws[k], b * n)
            draws[k + 1] = max(draws[k + 1], b * n)
        enumerate_size = [exact_strata == "auto" and 0 < draws[s] and math.comb(n, s) <= draws[s]
                          for s in range(n + 1)]
        orders = [rng.permutation(n) for _ in range(max(blocks.values(), default=0))]
        for k, b in blocks.items():
            for sigma in orders[:b]:
                for size in (k, k + 1):
                    if not enumerate_size[size]:
                        want.update(_mask(sigma[(np.arange(size) + start) % n]) for start in range(n))
        for size, yes in enumerate(enumerate_size):
            if yes:
                want.update(_subsets_of_size(n, size))
    else:
        for k in sampled:
            if exact_strata == "auto" and (math.comb(n, k) + math.comb(n, k + 1) <= m[k] * n
                                           or m[k] >= math.comb(n - 1, k)):
                exact.add(k)
                continue
            pool, counts, drawn = math.comb(n, k), np.zeros(n, dtype=int), set()
            target = min(m[k], math.comb(n - 1, k))
            while (counts < target).any() and len(drawn) < pool:
                c = _mask(rng.choice(n, size=k, replace=False))
                if c in drawn:
                    continue
                drawn.add(c)
                users = [i for i in range(n) if not c >> i & 1 and counts[i] < target]
                if users:
                    want.add(c)
                    for i in users:
                        want.add(c | 1 << i)
                        counts[i] += 1
    for k in exact:
        want.update(_subsets_of_size(n, k))
        want.update(_subsets_of_size(n, k + 1))
    masks = sorted(want)
    vals = dict(zip(masks, game.values(masks)))
    # every pair (S, S ∪ i) among the evaluated coalitions, per player i and stratum k = |S|
    cnt, tot, sq = np.zeros((n, n)), np.zeros((n, n)), np.zeros((n, n))
    for s in masks:
        k = bin(s).count("1")
        for i in range(n):
            if not s >> i & 1 and (s | 1 << i) in vals:
                d = vals[s | 1 << i] - vals[s]
                cnt[i, k] += 1
                tot[i, k] += d
                sq[i, k] += d * d
    if (cnt == 0).any():  # cannot happen with the designs above
        raise InterpError("a stratum has no sample for some player; raise m_per_stratum")
    mu = tot / cnt
    var = np.maximum(sq / cnt - mu ** 2, 0.0) * cnt / np.maximum(cnt - 1, 1)
    pool_i = np.array([[math.comb(n - 1, k) for k in range(n)]] * n)
    var[(cnt == 1) & (pool_i > 1)] = np.nan  # one sample of a sampled stratum: no variance estimate
    se = np.sqrt((var / cnt * np.clip(1 - cnt / pool_i, 0, 1)).sum(1)) / n
    done = [k for k in range(n) if (cnt[:, k] == pool_i[:, k]).all()]
    return ShapleyEstimate(mu.mean(1), vals[0], vals[full], len(masks), "stratified", se,
                           info={"design": design, "exact_strata": done, "m_per_stratum": m,
                                 "samples": cnt.astype(int).tolist()})


def _budget_per_size(n: int, m: Sequence[int]) -> list[int]:
    """Coalitions per size s (2 ≤ s ≤ n−2) for the svarm/spectral designs: the cyclic design's m_k / 2
    orders of n intervals per size, i.e. ⌈m·n/2⌉ with m the mean of m_{s−1} and m_s."""
    out = [0] * (n + 1)
    for s in range(2, n - 1):
        out[s] = min(math.comb(n, s), -(-((m[s - 1] + m[s]) * n) // 4))
    return out


def _proportional(n: int, total: int) -> list[int]:
    """``total`` coalitions spread over sizes 2..n−2 in proportion to C(n, s), capped at C(n, s)."""
    out, free = [0] * (n + 1), set(range(2, n - 1))
    while free and total > 0:
        w = sum(math.comb(n, s) for s in free)
        share = {s: total * math.comb(n, s) / w for s in free}
        capped = {s for s in free if share[s] >= math.comb(n, s)}
        if not capped:
            for s in free:
                out[s] = math.ceil(share[s] - 1e-9)
            break
        for s in capped:
            out[s] = math.comb(n, s)
            total -= out[s]
        free -= capped
    return out


def _sample_size(rng, n: int, s: int, count: int, taken: set[int]) -> set[int]:
    """``count`` distinct size-s coalitions drawn uniformly without replacement, avoiding ``taken``."""
    pool = math.comb(n, s)
    count = min(count, pool - len(taken))
    if count <= 0:
        return set()
    if 2 * (count + len(taken)) > pool:  # dense: a random prefix of the whole stratum
        rest = [c for c in _subsets_of_size(n, s) if c not in taken]
        return {rest[j] for j in rng.permutation(len(rest))[:count]}
    out: set[int] = set()
    while len(out) < count:
        c = _mask(rng.choice(n, size=s, replace=False))
        if c not in taken:
            out.add(c)
    return out


def _svarm(game, n, m, rng, enum_sizes):
    """Stratified SVARM: every coalition updates every player, no marginal-contribution pairs."""
    full = (1 << n) - 1
    per = _budget_per_size(n, m)
    want = {0, full} | {1 << i for i in range(n)} | {full ^ 1 << i for i in range(n)}
    chosen: dict[int, set[int]] = {}
    for s in range(2, n - 1):
        if s in enum_sizes or per[s] >= math.comb(n, s):
            chosen[s] = set(_subsets_of_size(n, s))
            continue
        # warm-up, invariant under relabelling: consecutive blocks of a random circular order cover
        # every player (size s), complements of blocks of length n−s leave every player out once
        sig = rng.permutation(n)
        warm = {_mask(sig[(np.arange(s) + a) % n]) for a in range(0, n, s)}
        sig = rng.permutation(n)
        warm |= {full ^ _mask(sig[(np.arange(n - s) + a) % n]) for a in range(0, n, n - s)}
        chosen[s] = warm | _sample_size(rng, n, s, per[s] - len(warm), warm)
        want |= chosen[s]
    for s in chosen:
        want |= chosen[s]
    masks = sorted(want)
    vals = dict(zip(masks, game.values(masks)))
    # A[i, s]: mean of v(S) over evaluated |S| = s, i ∈ S; B[i, s]: the same with i ∉ S
    A, B = np.zeros((n, n + 1)), np.zeros((n, n + 1))
    vA, vB = np.zeros((n, n + 1)), np.zeros((n, n + 1))
    for s in range(n + 1):
        cs = [c for c in masks if bin(c).count("1") == s]
        x = np.array([[c >> i & 1 for i in range(n)] for c in cs], dtype=bool)
        y = np.array([vals[c] for c in cs])
        for i in range(n):
            for M, V, sel, pool in ((A, vA, x[:, i], math.comb(n - 1, s - 1) if s else 0),
                                    (B, vB, ~x[:, i], math.comb(n - 1, s) if s < n else 0)):
                if pool == 0:
                    continue
                yi = y[sel]
                M[i, s] = yi.mean()
                c = len(yi)
                V[i, s] = (yi.var(ddof=1) / c * (1 - c / pool)) if c > 1 else (0.0 if pool == 1 else np.nan)
    phi = (A[:, 1:].sum(1) - B[:, :n].sum(1)) / n
    se = np.sqrt(vA[:, 1:].sum(1) + vB[:, :n].sum(1)) / n
    counts = [len(chosen.get(s, ())) if 2 <= s <= n - 2 else math.comb(n, s) for s in range(n + 1)]
    done = [s for s in range(n + 1) if counts[s] == math.comb(n, s)]
    return phi, se, vals, masks, {"coalitions_per_size": counts, "exact_sizes": done}


def _krawtchouk(d: int, h: np.ndarray, N: int) -> np.ndarray:
    """Σ_{A ⊆ [N], |A| = d} Π_{j∈A} z_j for z ∈ {±1}^N with h coordinates equal to −1 (Krawtchouk)."""
    h = np.asarray(h, dtype=np.int64)
    comb = np.vectorize(math.comb, otypes=[float])
    out = np.zeros(h.shape)
    for j in range(d + 1):
        out += (-1) ** j * comb(h, j) * comb(N - h, d - j)
    return out


def _spectral(game, n, m, rng, enum_sizes):
    """Complementary pairs stratified by size; GP posterior mean of φ on the odd Walsh part of v."""
    full = (1 << n) - 1
    per = _proportional(n, sum(_budget_per_size(n, m)))
    reps = {min(c, full ^ c) for c in [0] + [1 << i for i in range(n)]}
    for s in range(2, n // 2 + 1):
        pool = math.comb(n, s) // (2 if 2 * s == n else 1)
        cnt = -(-per[s] // (2 if 2 * s == n else 1))  # pairs: sizes s and n−s share them
        if s in enum_sizes or (n - s) in enum_sizes or cnt >= pool:
            reps |= {min(c, full ^ c) for c in _subsets_of_size(n, s)}
        else:
            got: set[int] = set()
            while len(got) < cnt:  # distinct pairs, uniform among the size-{s, n−s} pairs
                got |= {min(c, full ^ c) for c in _sample_size(rng, n, s, cnt - len(got), set())}
            reps |= got
    reps_l = sorted(reps)
    masks = sorted(set(reps_l) | {full ^ c for c in reps_l})
    vals = dict(zip(masks, game.values(masks)))
    counts = [sum(1 for c in masks if bin(c).count("1") == s) for s in range(n + 1)]
    info = {"coalitions_per_size": counts,
            "exact_sizes": [s for s in range(n + 1) if counts[s] == math.comb(n, s)]}
    if len(masks) == 1 << n:  # every coalition: the exact values
        v = np.array([vals[c] for c in range(1 << n)])
        return _exact_from_values(v, n), np.zeros(n), vals, masks, info
    try:  # small dense solves: BLAS threads only contend
        from threadpoolctl import threadpool_limits
        limit = threadpool_limits(1)
    except ImportError:
        from contextlib import nullcontext
        limit = nullcontext()
    with limit:
        phi, se, rho = _spectral_fit(n, reps_l, vals)
    info["rho"] = rho
    return phi, se, vals, masks, info


def _spectral_fit(n, reps_l, vals):
    full = (1 << n) - 1
    R = np.array(reps_l, dtype=np.int64)
    X = ((R[:, None] >> np.arange(n)) & 1).astype(bool)
    Zm = np.where(X, 1.0, -1.0)
    y = np.array([(vals[c] - vals[full ^ c]) / 2 for c in reps_l])  # odd part of v at S
    minus = n - X.sum(1)  # coordinates equal to −1
    H = np.array([[bin(a ^ b).count("1") for b in reps_l] for a in reps_l])
    orders = list(range(3, n + 1, 2))
    KH = {d: _krawtchouk(d, np.arange(n + 1), n) for d in orders}
    Kd = {d: KH[d][H] for d in orders}
    # cov(φ_i(g), g(S)) per order d: z_i · (2/d) · Σ_{B ⊆ N∖i, |B| = d−1} χ_B(S)
    Cd = {d: Zm * (2.0 / d) * _krawtchouk(d - 1, minus[:, None] - (~X), n - 1) for d in orders}
    pd_ = {d: (2.0 / d) ** 2 * math.comb(n - 1, d - 1) for d in orders}
    best = None
    for rho in (SPECTRAL_RHO if orders else (0.0,)):
        lam = {d: rho ** ((d - 3) // 2) for d in orders}
        K = sum((lam[d] * Kd[d] for d in orders), np.zeros((len(R), len(R))))
        jit = 1e-9 * max(float(np.mean(np.diag(K))), 1e-300) if orders else 1.0
        try:
            L = np.linalg.cholesky(K + jit * np.eye(len(R)))
        except np.linalg.LinAlgError:
            continue
        solve = lambda b: np.linalg.solve(L.T, np.linalg.solve(L, b))  # noqa: E731
        KiZ, Kiy = solve(Zm), solve(y)
        G = Zm.T @ KiZ
        beta = np.linalg.lstsq(G, Zm.T @ Kiy, rcond=None)[0]
        r = y - Zm @ beta
        alpha = solve(r)
        dof = max(len(R) - n, 1)
        s2 = max(float(r @ alpha) / dof, 0.0)
        sign, logdetG = np.linalg.slogdet(G)
        reml = -0.5 * dof * math.log(max(s2, 1e-300)) - np.log(np.diag(L)).sum() - 0.5 * logdetG
        if best is None or reml > best[0]:
            C = sum((lam[d] * Cd[d] for d in orders), np.zeros((len(R), n)))
            phi = 2 * beta + C.T @ alpha
            KiC = solve(C)
            U = 2 * np.eye(n) - Zm.T @ KiC  # column i: the unbiasedness defect for φ_i
            prior = sum(lam[d] * pd_[d] for d in orders)
            var = s2 * (prior - np.einsum("ti,ti->i", C, KiC)
                        + np.einsum("ij,ij->j", U, np.linalg.lstsq(G, U, rcond=None)[0]))
            best = (reml, phi, np.sqrt(np.maximum(var, 0.0)), rho)
    if best is None:
        raise InterpError("the spectral estimate failed (singular kernel); use design='cyclic'")
    return best[1], best[2], best[3]


def _subsets_of_size(n: int, k: int) -> list[int]:
    if not 0 <= k <= n:
        return []
    from itertools import combinations
    return [_mask(c) for c in combinations(range(n), k)]


# --------------------------------------------------------------------------------------------------
# the analysis

# the built-in inputs: six worked sums before a question (the paper's expressions as players)
FEW_SHOT = "2+3=5\n6-2=4\n3*3=9\n8-5=3\n4+4=8\n7-1=6\n"
FEW_SHOT_QUESTION = "5+2="
FEW_SHOT_ANSWER = "7"


def _estimate(game: Game, method: str, m_per_stratum, seed, design: str, exact_strata) -> ShapleyEstimate:
    if method == "auto":
        method = "exact" if game.n <= AUTO_EXACT else "stratified"
    if method == "exact":
        return exact_shapley(game)
    if method == "stratified":
        return stratified_shapley(game, m_per_stratum, seed, design=design, exact_strata=exact_strata)
    raise InterpError(f"method must be 'auto', 'exact' or 'stratified', not {method!r}")


def _finding(game: Game, est: ShapleyEstimate, ident: dict, params: dict, prompts: str) -> Finding:
    rows = []
    for i in range(game.n):
        row = {"player": i, "start": None, "end": None, "span": "", **game.describe(i), "phi": est.phi[i]}
        if est.se is not None:
            row["se"] = est.se[i]
        rows.append(row)
    metrics = {"method": est.method, "n_players": game.n, "v_empty": est.v_empty, "v_full": est.v_full,
               "cosp": est.cosp, "n_evals": est.n_evals, "efficiency_residual": est.efficiency_residual,
               "value": params.get("value", "value")}
    if est.method == "stratified":
        metrics["exact_strata"] = est.info["exact_strata"]
        params = {**params, "design": est.info["design"]}
    notes = [] if est.method == "exact" else [
        "stratified estimate: efficiency holds only approximately (see efficiency_residual)"]
    return Finding(Shapley.name, pd.DataFrame(rows), {**params, "method": est.method}, ident, prompts, metrics,
                   {"phi": torch.tensor(est.phi)}, notes)


class Shapley(Analysis):
    """Shapley value of each prompt span for the gold answer (SalaMAnder / CoSP)."""

    name = "attribution.shapley"
    title = "Shapley values of prompt spans"
    requires = ("causal",)
    figures = (_static.shapley, _interactive.shapley)

    def run(self, model, inputs: str | None = None, answer: str | Sequence[str] | None = None, players="expressions",
            method: str = "auto", *, question: str | Sequence[str] | None = None, placeholder: str = "...",
            value: str = "logprob", m_per_stratum: int | Sequence[int] = 8, seed: int | None = 0,
            design: str = "spectral", exact_strata="auto", batch_size: int = 16,
            progress: bool | None = None) -> Finding:
        """Shapley value of each span of the prompt text ``inputs`` for the gold ``answer``, as a Finding.

        ``model``: an interp model (or anything ``interp.load`` takes). ``inputs=None``: six worked sums and the
        question "5+2=" with the answer "7". ``method``: ``"exact"`` (n ≤ 12), ``"stratified"``, or ``"auto"``
        (exact for n ≤ 10). A :class:`Game` or a plain value function goes to :func:`shapley_of_game`."""
        if isinstance(model, Game) or (callable(model) and not isinstance(model, (Model, torch.nn.Module))):
            raise InterpError("shapley(model, ...) takes a model; for a Game or a value function over coalitions "
                              "use shapley_of_game(game, n=...)")
        if inputs is None:
            inputs = FEW_SHOT
            if answer is None and question is None:
                answer, question = FEW_SHOT_ANSWER, FEW_SHOT_QUESTION
        if not isinstance(inputs, str):
            raise InterpError(f"shapley's inputs are the prompt text whose spans are the players (a string), not "
                              f"{type(inputs).__name__}")
        if answer is None:
            raise InterpError("shapley on a model needs the gold answer: pass answer=")
        game = PromptGame(model, inputs, players, answer, placeholder=placeholder, value=value,
                          question=question, batch_size=batch_size, progress=progress)
        est = _estimate(game, method, m_per_stratum, seed, design, exact_strata)
        params = {"players": players if isinstance(players, str) else [list(p) for p in players],
                  "placeholder": placeholder, "value": value, "question": question}
        if est.method == "stratified":
            params.update(m_per_stratum=m_per_stratum, seed=seed, exact_strata=exact_strata)
        return _finding(game, est, game.model.identity(), params,
                        digest({"text": inputs, "question": question, "answer": answer}))

    def __call__(self, model, inputs=None, *args, **params) -> Finding:
        """Also ``shapley(model, text, answer, players, method)``, the positional call before the analysis contract."""
        return self.run(model, inputs, *args, **params)

    def explain(self, finding: Finding) -> str:
        m, t = finding.metrics, finding.table
        unit = " nats" if m.get("value", "logprob") == "logprob" else ""
        what = "log-probability of the answer" if unit else "value"
        top = t.loc[t["phi"].idxmax()] if len(t) else None
        best = ""
        if top is not None:
            label = str(top.get("span") or "") or f"player {int(top['player'])}"
            best = f"; the largest, {label!r}, adds {top['phi']:+.2f}{unit}"
        est = "exact" if m["method"] == "exact" else "estimated"
        return (f"{m['cosp']} of {m['n_players']} prompt spans raise the {what} ({est} Shapley values{best}), and "
                f"all of them together move it from {m['v_empty']:.2f} to {m['v_full']:.2f}{unit}.")


shapley = Shapley()


def shapley_of_game(game, n: int | None = None, method: str = "auto", *, m_per_stratum: int | Sequence[int] = 8,
                    seed: int | None = 0, design: str = "spectral", exact_strata="auto") -> Finding:
    """Shapley values of a :class:`Game`, or of a plain ``value_fn(list[frozenset]) -> list[float]`` over ``n``
    players, as an ``attribution.shapley`` Finding (see :func:`exact_shapley`, :func:`stratified_shapley`)."""
    g = as_game(game, n)
    est = _estimate(g, method, m_per_stratum, seed, design, exact_strata)
    params = {"players": "game", "value": "value"}
    if est.method == "stratified":
        params.update(m_per_stratum=m_per_stratum, seed=seed, exact_strata=exact_strata)
    return _finding(g, est, {"name": type(g).__name__}, params, "")
