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
    Rows are sorted by token ids so that a batch shares a common prefix, which runs once and
    is reused through the KV cache (no hooks are installed on the model).

Shapley value
    φ_i = Σ_{S ⊆ N∖i} |S|! (n−|S|−1)! / n! · [v(S ∪ i) − v(S)]
    computed exactly by enumerating the 2^n coalitions (:func:`exact_shapley`, n ≤ 12).

Stratified estimator (:func:`stratified_shapley`)
    φ_i ≈ (1/n) Σ_{k=0}^{n−1} μ̂_{ik},   μ̂_{ik} = (1/m_k) Σ_j [v(S_kj ∪ i) − v(S_kj)]
    with S_kj uniform size-k subsets of N∖i: each stratum keeps its exact weight 1/n, so the
    variance from mixing coalition sizes disappears. Strata k = 0 and k = n−1 (one coalition
    per player) are always computed exactly, as is any stratum that is cheaper to enumerate
    than to sample. The sampling design is ours **[recon]** (the paper gives only the estimator):

    * ``design="cyclic"`` (default): draw a random circular order σ of the players and evaluate
      its cyclic intervals of lengths k and k+1. For player i, the k players just before i and
      the k players just after i are two uniform size-k subsets S of N∖i, and S ∪ i is again an
      interval, so one order gives every player two samples in stratum k for about n
      evaluations (≈ 0.5 evaluations per marginal; permutation sampling needs ≈ 1).
    * ``design="shared"``: draw a base set C of size k (without replacement) and pair it with
      C ∪ i for every i ∉ C that still needs samples (1 + #players evaluations per base).

    Each μ̂_{ik} averages *every* pair (S, S ∪ i), |S| = k, among the coalitions the run
    evaluated. Both designs are invariant in distribution under relabelling the players, so,
    given their number, these pairs are a uniform sample of the stratum and μ̂_{ik} is unbiased.
    Standard error (treating the pairs as a simple random sample, which ignores the mild
    dependence within an order): se_i² = (1/n²) Σ_k s²_{ik}/m_{ik} · (1 − m_{ik}/C(n−1,k)).
    Stratified estimates do not satisfy efficiency exactly; the residual Σφ − (v(N) − v(∅)) is
    reported.

CoSP **[recon]**
    CoSP = |{i : φ_i > 0}|, the number of expressions with positive Shapley value, which the
    paper reports to track accuracy monotonically; drop or replace players with φ < 0.

API: :func:`find_players`, :class:`PromptGame`, :class:`CallableGame`, :func:`exact_shapley`,
:func:`stratified_shapley`, :func:`shapley` (→ :class:`interp.finding.Finding`, analysis
``"attribution.shapley"``). Findings are diagnostic only (no ``to_spec``).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from interp.errors import InterpError
from interp.finding import Finding, digest

__all__ = ["find_players", "Game", "PromptGame", "CallableGame", "ShapleyEstimate", "exact_shapley",
           "stratified_shapley", "shapley", "MAX_EXACT"]

MAX_EXACT = 12  # exact enumeration refuses more players (2^12 = 4096 coalitions)
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
        # lexicographic order: rows of a batch share a long common prefix, run once and cached
        order = sorted(range(len(rows)), key=lambda r: rows[r][2])
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
        """Per row, log-probs [answer length, vocab] predicting the answer tokens."""
        hf, dev = self.model.hf, self.model.device
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else (self.tok.eos_token_id or 0)
        seqs = [r[2] for r in batch]
        # shared prefix, kept short of every row's last prompt token (its logits are needed)
        P = min(r[3] for r in batch) - 1
        for j in range(P):
            if any(s[j] != seqs[0][j] for s in seqs):
                P = j
                break
        cache = None
        if P >= 8:
            try:
                cache = hf(input_ids=torch.tensor([seqs[0][:P]], device=dev), use_cache=True).past_key_values
                cache.batch_repeat_interleave(len(batch))
            except (AttributeError, TypeError, NotImplementedError):
                cache = None
        P = P if cache is not None else 0
        T = max(len(s) for s in seqs) - P
        ids = torch.full((len(batch), T), pad, dtype=torch.long)
        am = torch.zeros((len(batch), P + T), dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, :len(s) - P] = torch.tensor(s[P:])
            am[j, :len(s)] = 1
        keep = T - min(r[3] - 1 - P for r in batch)  # logits from the first answer prediction on
        kw = {"past_key_values": cache, "use_cache": True} if cache is not None else {}
        try:
            logits = hf(input_ids=ids.to(dev), attention_mask=am.to(dev), logits_to_keep=keep, **kw).logits
        except TypeError:
            logits = hf(input_ids=ids.to(dev), attention_mask=am.to(dev), **kw).logits[:, -keep:]
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        out = []
        for j, (_, qi, _, n_p) in enumerate(batch):
            pos = torch.arange(len(self.answer_ids[qi])) + (n_p - 1 - P) - (T - keep)
            out.append(logp[j, pos])
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
    masks = np.arange(1 << n, dtype=np.int64)
    v = game.values(masks.tolist())
    size = _popcount(masks)
    w = np.array([math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) if s < n else 0.0
                  for s in range(n + 1)])
    phi = np.zeros(n)
    for i in range(n):
        without = masks[(masks >> i & 1) == 0]
        phi[i] = float(np.sum(w[size[without]] * (v[without | (1 << i)] - v[without])))
    return ShapleyEstimate(phi, float(v[0]), float(v[-1]), 1 << n, "exact",
                           info={"new_evals": game.n_evals - seen})


def stratified_shapley(game, m_per_stratum: int | Sequence[int] = 8, seed: int | None = 0, *,
                       design: str = "cyclic", exact_strata="auto", n: int | None = None) -> ShapleyEstimate:
    """Stratified Shapley estimate with about m_k samples per player in each sampled stratum k.

    ``design``: ``"cyclic"`` (default) or ``"shared"``, see the module docstring; in the cyclic
    design m_k is rounded up to an even number. ``exact_strata``: ``"auto"`` (k = 0, n−1 and
    whatever is cheaper to enumerate than to sample), ``False`` (only k = 0 and n−1), ``True``
    (every stratum: the exact values) or a list of strata to enumerate as well.
    """
    game = as_game(game, n)
    n = game.n
    m = [int(m_per_stratum)] * n if np.isscalar(m_per_stratum) else [int(x) for x in m_per_stratum]
    if len(m) != n or min(m) < 1:
        raise InterpError(f"m_per_stratum must be a positive int or {n} positive ints (one per stratum)")
    if design not in ("cyclic", "shared"):
        raise InterpError(f"design must be 'cyclic' or 'shared', not {design!r}")
    rng = np.random.default_rng(seed)
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


def _subsets_of_size(n: int, k: int) -> list[int]:
    if not 0 <= k <= n:
        return []
    from itertools import combinations
    return [_mask(c) for c in combinations(range(n), k)]


# --------------------------------------------------------------------------------------------------
# the analysis

def shapley(model, text: str | None = None, answer: str | Sequence[str] | None = None, players="expressions",
            method: str = "auto", *, question: str | Sequence[str] | None = None, placeholder: str = "...",
            value: str = "logprob", m_per_stratum: int | Sequence[int] = 8, seed: int | None = 0,
            design: str = "cyclic", exact_strata="auto", n: int | None = None, batch_size: int = 16,
            progress: bool | None = None) -> Finding:
    """Shapley value of each prompt span for the gold answer, as a :class:`Finding`.

    ``model``: an interp model (or anything ``interp.load`` takes) with ``text`` and ``answer``;
    or a :class:`Game`; or a plain ``value_fn(list[frozenset]) -> list[float]`` with ``n``.
    ``method``: ``"exact"`` (n ≤ 12), ``"stratified"``, or ``"auto"`` (exact for n ≤ 10).
    """
    from interp.model import Model
    if isinstance(model, Game) or (callable(model) and not isinstance(model, (Model, torch.nn.Module))):
        game = as_game(model, n)
        ident = {"name": type(game).__name__}
    else:
        if text is None or answer is None:
            raise InterpError("shapley on a model needs the prompt text and the gold answer")
        game = PromptGame(model, text, players, answer, placeholder=placeholder, value=value,
                          question=question, batch_size=batch_size, progress=progress)
        ident = game.model.identity()
    if method == "auto":
        method = "exact" if game.n <= AUTO_EXACT else "stratified"
    if method == "exact":
        est = exact_shapley(game)
    elif method == "stratified":
        est = stratified_shapley(game, m_per_stratum, seed, design=design, exact_strata=exact_strata)
    else:
        raise InterpError(f"method must be 'auto', 'exact' or 'stratified', not {method!r}")
    rows = []
    for i in range(game.n):
        row = {"player": i, "start": None, "end": None, "span": "", **game.describe(i), "phi": est.phi[i]}
        if est.se is not None:
            row["se"] = est.se[i]
        rows.append(row)
    table = pd.DataFrame(rows)
    metrics = {"method": est.method, "n_players": game.n, "v_empty": est.v_empty, "v_full": est.v_full,
               "cosp": est.cosp, "n_evals": est.n_evals, "efficiency_residual": est.efficiency_residual}
    if est.method == "stratified":
        metrics["exact_strata"] = est.info["exact_strata"]
    params = {"players": players if isinstance(players, str) else [list(p) for p in players], "method": method,
              "placeholder": placeholder, "value": value, "question": question}
    if method == "stratified":
        params.update(m_per_stratum=m_per_stratum, seed=seed, design=design, exact_strata=exact_strata)
    prompts = digest({"text": text, "question": question, "answer": answer}) if text is not None else ""
    notes = [] if est.method == "exact" else [
        "stratified estimate: efficiency holds only approximately (see efficiency_residual)"]
    return Finding("attribution.shapley", table, params, ident, prompts, metrics,
                   {"phi": torch.tensor(est.phi)}, notes)
