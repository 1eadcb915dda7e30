"""Shapley attribution (attribution.shapley): axioms, closed forms, captum, the stratified estimator, SmolLM2."""
import math

import numpy as np
import pytest
import torch

from attribution.shapley import (FEW_SHOT, CallableGame, PromptGame, exact_shapley, find_players, shapley,
                                 shapley_of_game, stratified_shapley)
from interp.errors import InterpError


def random_game(n, seed=0):
    """A game with independent random values for every coalition (no structure to exploit)."""
    vals = np.random.default_rng(seed).normal(size=1 << n)

    def fn(coalitions):
        return [vals[sum(1 << i for i in c)] for c in coalitions]
    return fn, vals


def test_find_players_kinds():
    text = "Q: 5 pens, buy 3. Give 2.\nA: 5+3=8, 8 - 2 = 6. So 6\n\nQ: 4 × 3?\nA: 4 × 3 = 12."
    assert [text[a:b] for a, b in find_players(text)] == ["5+3=8", "8 - 2 = 6", "4 × 3", "4 × 3 = 12"]
    assert [text[a:b] for a, b in find_players(text, "demos")] == [text.split("\n\n")[0], text.split("\n\n")[1]]
    assert [text[a:b] for a, b in find_players(text, "sentences")][:3] == ["Q: 5 pens, buy 3.", "Give 2.", "A: 5+3=8, 8 - 2 = 6."]
    assert find_players(text, [(5, 9), (0, 2)]) == [(0, 2), (5, 9)]
    with pytest.raises(InterpError):
        find_players(text, [(0, 5), (3, 8)])
    with pytest.raises(InterpError):
        find_players(text, "words")


def test_additive_game_and_efficiency():
    w = np.array([0.5, -1.0, 2.0, 0.0, 3.25])
    est = exact_shapley(lambda cs: [sum(w[i] for i in c) + 7.0 for c in cs], n=5)
    np.testing.assert_allclose(est.phi, w, atol=1e-12)
    assert abs(est.efficiency_residual) <= 1e-6
    assert est.n_evals == 32 and est.cosp == 3


def test_unanimity_game():
    T = {1, 3, 4}
    est = exact_shapley(lambda cs: [float(T <= c) for c in cs], n=6)
    np.testing.assert_allclose(est.phi, [1 / 3 if i in T else 0.0 for i in range(6)], atol=1e-12)


def test_symmetry_dummy_efficiency_on_a_nonlinear_game():
    def v(c):  # players 0 and 1 symmetric, 5 a dummy, interactions between 2, 3, 4
        a = len(c & {0, 1})
        return a ** 2 + 3.0 * (2 in c) * (3 in c) - 1.5 * (4 in c) * (2 in c) + math.sin(len(c - {5}))
    est = exact_shapley(lambda cs: [v(c) for c in cs], n=6)
    assert abs(est.phi[0] - est.phi[1]) <= 1e-9
    assert abs(est.phi[5]) <= 1e-9
    assert abs(est.efficiency_residual) <= 1e-6
    for seed in range(3):
        fn, vals = random_game(7, seed)
        r = exact_shapley(fn, n=7)
        assert abs(r.phi.sum() - (vals[-1] - vals[0])) <= 1e-6


def test_exact_matches_captum_shapley_values():
    from captum.attr import ShapleyValues
    n = 5
    fn, _ = random_game(n, seed=3)
    game = CallableGame(fn, n)
    ours = exact_shapley(game).phi

    def forward(x):  # x: [b, n] mixture of the input (1 = present) and the baseline (0 = absent)
        cs = [frozenset(int(i) for i in torch.nonzero(row > 0.5).flatten()) for row in x]
        return torch.tensor(game.values(cs), dtype=torch.float64)
    attr = ShapleyValues(forward).attribute(torch.ones(1, n, dtype=torch.float64),
                                            baselines=torch.zeros(1, n, dtype=torch.float64),
                                            feature_mask=torch.arange(n)[None])
    np.testing.assert_allclose(attr[0].double().numpy(), ours, atol=1e-6)


def test_cache_counts_distinct_coalitions():
    calls = []

    def fn(cs):
        calls.extend(cs)
        return [float(len(c)) for c in cs]
    game = CallableGame(fn, 4)
    exact_shapley(game)
    exact_shapley(game)
    game.values([frozenset({0, 1}), frozenset({1, 0}), 3])
    assert game.n_evals == 16 and len(calls) == 16 and len(set(calls)) == 16
    view = game.view()
    view.values([0, 1, 2])
    assert view.n_evals == 3 and len(calls) == 16


@pytest.mark.parametrize("design", ["spectral", "svarm", "cyclic", "shared"])
def test_stratified_converges_to_exact(design):
    n = 9
    fn, _ = random_game(n, seed=1)
    game = CallableGame(fn, n)
    exact = exact_shapley(game).phi
    mae = {}
    for m in (2, 8, 32):
        errs = [np.abs(stratified_shapley(game.view(), m, seed=s, design=design).phi - exact).mean()
                for s in range(5)]
        mae[m] = float(np.mean(errs))
    assert mae[2] > mae[8] > mae[32]
    # enough samples for every stratum: the estimate is exact
    full = stratified_shapley(game.view(), max(math.comb(n - 1, k) for k in range(n)), seed=0, design=design)
    np.testing.assert_allclose(full.phi, exact, atol=1e-9)
    assert np.allclose(full.se, 0) and abs(full.efficiency_residual) <= 1e-9
    np.testing.assert_allclose(stratified_shapley(game.view(), 1, exact_strata=True).phi, exact, atol=1e-9)


@pytest.mark.parametrize("design", ["svarm", "cyclic", "shared"])
def test_stratified_is_unbiased_and_se_is_calibrated(design):
    n = 6
    fn, _ = random_game(n, seed=2)
    game = CallableGame(fn, n)
    exact = exact_shapley(game).phi
    m = 4 if design == "svarm" else 2  # svarm: enough coalitions per size for a variance in every cell
    runs = [stratified_shapley(game.view(), m, seed=s, design=design) for s in range(300)]
    assert runs[0].info["exact_strata"] == [0, 5] and runs[0].n_evals < 64
    mean = np.mean([r.phi for r in runs], axis=0)
    sd = np.std([r.phi for r in runs], axis=0)
    assert np.all(np.abs(mean - exact) <= 4 * sd / math.sqrt(len(runs)) + 1e-12)
    z2 = np.mean([((r.phi - exact) / r.se) ** 2 for r in runs])
    assert 0.3 < z2 < 3.0  # the reported standard error is about right


def test_svarm_uses_every_coalition_for_every_player():
    """Stratified SVARM: φ_i = (1/n) Σ_s [mean v(S ∋ i, |S| = s) − mean v(S ∌ i, |S| = s−1)]."""
    n = 7
    fn, vals = random_game(n, seed=4)
    r = stratified_shapley(CallableGame(fn, n), 2, seed=1, design="svarm")
    sizes = r.info["coalitions_per_size"]
    assert sizes[:2] == [1, n] and sizes[-2:] == [n, 1] and all(0 < c < math.comb(n, s) for s, c in
                                                                 enumerate(sizes) if 2 <= s <= n - 2)
    assert r.n_evals == sum(sizes)
    # the formula by hand from the coalitions it evaluated
    game = CallableGame(fn, n)
    r2 = stratified_shapley(game, 2, seed=1, design="svarm")
    ev = list(game.cache)
    phi = np.zeros(n)
    for i in range(n):
        for s in range(1, n + 1):
            phi[i] += np.mean([vals[c] for c in ev if c >> i & 1 and bin(c).count("1") == s]) / n
            phi[i] -= np.mean([vals[c] for c in ev if not c >> i & 1 and bin(c).count("1") == s - 1]) / n
    np.testing.assert_allclose(r2.phi, phi, atol=1e-12)
    np.testing.assert_allclose(r.phi, r2.phi, atol=0)


def test_spectral_exact_on_games_with_linear_odd_part_and_efficient():
    """The spectral design fits the odd Walsh part of v: exact whenever it is linear (any game with
    at most pairwise interactions), efficient (Σφ = v(N) − v(∅)) at any budget, and exact once
    every coalition is evaluated."""
    n = 9
    rng = np.random.default_rng(5)
    w, g = rng.normal(size=n), np.triu(rng.normal(size=(n, n)), 1)

    def pairwise(cs):
        return [sum(w[i] for i in c) + sum(g[i, j] for i in c for j in c) + 0.3 * len(c) ** 2 for c in cs]
    ex = exact_shapley(pairwise, n=n)
    for seed in range(3):
        r = stratified_shapley(CallableGame(pairwise, n), 1, seed=seed)
        assert r.info["design"] == "spectral" and r.n_evals < 1 << n
        np.testing.assert_allclose(r.phi, ex.phi, atol=1e-7)
    fn, vals = random_game(n, seed=6)
    gap = vals[-1] - vals[0]
    for m in (1, 4):
        r = stratified_shapley(CallableGame(fn, n), m, seed=0)
        assert abs(r.efficiency_residual) <= 1e-6 * abs(gap)
    # a third-order game: the GP on orders ≥ 3 gets it to within its reported standard error
    def cubic(cs):
        return [sum(w[i] for i in c) + 2.0 * ({0, 1, 2} <= c) - 1.5 * ({3, 4, 8} <= c) for c in cs]
    ex3 = exact_shapley(cubic, n=n).phi
    runs = [stratified_shapley(CallableGame(cubic, n), 2, seed=s) for s in range(20)]
    z2 = np.mean([((r.phi - ex3) / r.se) ** 2 for r in runs])
    assert 0.1 < z2 < 4.0
    assert np.mean([np.abs(r.phi - ex3).mean() for r in runs]) < 0.25 * np.abs(ex3).mean()


def test_spectral_beats_the_pair_designs_on_a_structured_game():
    """At about the same number of distinct coalitions, on a game with sparse low-order interactions."""
    n = 10
    rng = np.random.default_rng(7)
    w = rng.normal(size=n)
    triples = [tuple(rng.choice(n, 3, replace=False)) for _ in range(8)]
    coef = rng.normal(size=len(triples))

    def v(cs):
        return [sum(w[i] for i in c) + sum(a for t, a in zip(triples, coef) if set(t) <= c)
                + 0.5 * math.sin(len(c)) for c in cs]
    game = CallableGame(v, n)
    ex = exact_shapley(game).phi
    err, evals = {}, {}
    for design, m in (("spectral", 2), ("cyclic", 2)):
        rs = [stratified_shapley(game.view(), m, seed=s, design=design) for s in range(10)]
        err[design] = np.mean([np.abs(r.phi - ex).mean() for r in rs])
        evals[design] = np.mean([r.n_evals for r in rs])
    assert evals["spectral"] <= 1.1 * evals["cyclic"]
    assert err["spectral"] < 0.75 * err["cyclic"]


def test_shapley_finding_on_a_callable_game():
    f = shapley_of_game(lambda cs: [float({0, 2} <= c) + 0.5 * (1 in c) for c in cs], n=3)
    assert f.analysis == "attribution.shapley"
    assert list(f.table["player"]) == [0, 1, 2]
    np.testing.assert_allclose(f.table["phi"], [0.5, 0.5, 0.5])
    assert f.metrics["method"] == "exact" and f.metrics["cosp"] == 3 and f.metrics["n_evals"] == 8
    assert f.metrics["v_empty"] == 0.0 and f.metrics["v_full"] == 1.5
    s = shapley_of_game(lambda cs: [float(len(c)) for c in cs], n=11, method="auto", m_per_stratum=4)
    assert s.metrics["method"] == "stratified" and "se" in s.table
    np.testing.assert_allclose(s.table["phi"], 1.0)
    assert s.params["design"] == "spectral"
    with pytest.raises(InterpError, match="shapley_of_game"):  # the analysis takes a model
        shapley(lambda cs: [0.0 for c in cs])
    with pytest.raises(InterpError, match="n="):
        shapley_of_game(lambda cs: [0.0 for c in cs])


def test_smollm2_few_shot_expressions(smol):
    f = shapley(smol)  # the built-in inputs: FEW_SHOT, question "5+2=", answer "7", exact
    assert f.metrics["n_players"] == 6 and f.metrics["n_evals"] == 64
    assert list(f.table["span"]) == ["2+3=5", "6-2=4", "3*3=9", "8-5=3", "4+4=8", "7-1=6"]
    gap = f.metrics["v_full"] - f.metrics["v_empty"]
    assert abs(f.metrics["efficiency_residual"]) <= 1e-4 * abs(gap)
    assert f.metrics["cosp"] == int((f.table["phi"] > 0).sum())
    assert f.metrics["v_full"] > f.metrics["v_empty"]  # the worked examples help
    assert f.model["name"] == smol.identity()["name"]
    text = f.explain()
    print(text)
    top = f.table.loc[f.table["phi"].idxmax()]
    assert text.startswith(f"{f.metrics['cosp']} of 6 prompt spans") and repr(top["span"]) in text
    assert f"{f.metrics['v_full']:.2f} nats." in text
    # regression: the figures label the bars with the spans (they looked for a "text" column and showed numbers)
    ax = f.plot().axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"{i}: {s}" for i, s in enumerate(f.table["span"])]
    fig = f.plot(interactive=True)
    assert list(fig.layout.yaxis.ticktext) == [f"{i}: {s}" for i, s in enumerate(f.table["span"])]


def test_prompt_game_batching_and_values(smol):
    # the positional call (text, answer, players, method) still reaches the analysis
    f = shapley(smol, "2+3=5\n", "7", "expressions", "exact", question="5+2=")
    assert list(f.table["span"]) == ["2+3=5"] and f.metrics["n_evals"] == 2
    g = PromptGame(smol, FEW_SHOT, "expressions", "7", question="5+2=", batch_size=8)
    assert g.prompt({0, 5}) == "2+3=5\n...\n...\n...\n...\n7-1=6\n"
    batched = g.values([0, 63, 5, 17, 42])  # no common prefix: one plain padded batch
    single = PromptGame(smol, FEW_SHOT, "expressions", "7", question="5+2=", batch_size=1)
    # one row per batch: its prompt runs as a cached prefix, then the last token and the answer
    np.testing.assert_allclose(single.values([63, 42]), batched[[1, 4]], atol=1e-4)
    assert g.n_rows == 5 and g.n_evals == 5
    g.values([63, 5])  # cached: no new rows
    assert g.n_rows == 5
    acc = PromptGame(smol, FEW_SHOT, "expressions", "7", question="5+2=", value="accuracy")
    assert acc.values([63])[0] in (0.0, 1.0)
    # against HF's own forward on the unpadded prompt: log p(answer | prompt_S + question)
    tok = smol.tokenizer
    for c, v in zip([0, 63, 42], g.values([0, 63, 42])):
        ids = tok(g.prompt(c) + "5+2=")["input_ids"]
        ans = tok("7", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(smol.hf(input_ids=torch.tensor([ids + ans])).logits[0].double(), -1)
        want = sum(float(lp[len(ids) - 1 + k, a]) for k, a in enumerate(ans))
        assert abs(v - want) <= 1e-4, (c, v, want)
