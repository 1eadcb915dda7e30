"""Linear probes (METHODS.md §10): recovery of a planted direction, chance on shuffled labels,
control tasks on recurring word types (Hewitt & Liang), and a steering spec from a real SmolLM2 probe."""
import numpy as np
import pytest
import torch

import interp
from probes.linear import linear_probe, probe_features

PLANTED = (1, 3)


def _synthetic(n=600, d=64, L=4, strength=2.5, seed=0, planted=PLANTED):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g)
    u /= u.norm()
    y = torch.randint(0, 2, (n,), generator=g)
    X = torch.randn(L, n, d, generator=g)
    for l in planted:
        X[l] += (2 * y[:, None] - 1) * strength * u
    return X, y, u


@pytest.fixture(scope="module")
def planted():
    X, y, u = _synthetic()
    types = torch.randint(0, 20, (len(y),), generator=torch.Generator().manual_seed(5)).tolist()  # carried by no feature
    return probe_features(X, y, word_types=types, progress=False), X, y, u


def test_recovers_planted_direction(planted):
    f, X, y, u = planted
    t = f.table.set_index("layer")
    print(t.round(3).to_string())
    assert f.arrays["weights"].shape == (4, 64) and f.arrays["bias"].shape == (4,)
    for l in PLANTED:
        assert t.accuracy[l] >= 0.95
        cos = float(f.arrays["weights"][l] @ u)
        print(f"layer {l}: accuracy {t.accuracy[l]:.3f}, cos(w, u) = {cos:.3f}")
        assert cos >= 0.9  # sign too: class 1 lies along +u
        assert t.selectivity[l] > 0.3
        # the stored direction and bias classify in the original feature space
        pred = (X[l] @ f.arrays["weights"][l] + f.arrays["bias"][l] > 0).long()
        assert (pred == y).float().mean() >= 0.95
    for l in set(range(4)) - set(PLANTED):
        assert abs(t.accuracy[l] - 0.5) <= 0.15
    assert f.metrics["best_layer"] in PLANTED and f.metrics["best_accuracy"] >= 0.95
    assert set(t.C.dropna()) <= {0.01, 0.1, 1.0, 10.0}


def test_shuffled_labels_are_chance(planted):
    _, X, y, _ = planted
    ys = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    f = probe_features({l: X[l] for l in PLANTED}, ys, progress=False)
    print(f.table.round(3).to_string())
    assert list(f.table.layer) == list(PLANTED)
    assert (f.table.accuracy - 0.5).abs().max() <= 0.1


def test_control_task_with_word_types():
    # 20 word types, each type's examples share a type-specific vector: a probe can memorise types,
    # so control accuracy is high and selectivity low, while the planted label is read off linearly
    X, y, u = _synthetic(n=400, d=32, L=2, planted=(1,))
    g = torch.Generator().manual_seed(3)
    types = torch.randint(0, 20, (400,), generator=g)
    X = X + 3 * torch.randn(20, 32, generator=g)[types]
    f = probe_features(X, y, word_types=types.tolist(), progress=False)
    t = f.table.set_index("layer")
    print(t.round(3).to_string())
    assert t.control_accuracy[0] >= 0.8  # memorised types, no planted signal
    assert t.accuracy[1] >= 0.9 and t.selectivity[1] > t.selectivity[0]
    assert f.params["control"] == "word types"


COUNTRIES = ["France is a country in western Europe.", "Japan is an island nation in Asia.",
             "Brazil is the largest country in South America.", "Canada has ten provinces.",
             "Germany borders Poland and Austria.", "Kenya is a country in East Africa.",
             "Italy has a long coastline.", "Peru is home to the Andes mountains.",
             "Norway is known for its fjords.", "Egypt lies along the river Nile.",
             "India is a large country in South Asia.", "Mexico shares a border with the United States.",
             "Spain is on the Iberian peninsula.", "Chile is a long and narrow country.",
             "Sweden is a Nordic country.", "Vietnam is in Southeast Asia.",
             "Argentina is a country in South America.", "Greece has many islands.",
             "Australia is a country and a continent.", "Turkey spans Europe and Asia."]
FOODS = ["Bread is baked from flour and water.", "An apple is a crunchy fruit.",
         "Cheese is made from milk.", "Soup is served hot in a bowl.", "Rice is boiled before eating.",
         "Chocolate cake is a sweet dessert.", "Pasta is cooked in salted water.",
         "A banana is a yellow fruit.", "Pizza has cheese and tomato sauce.", "Carrots are orange vegetables.",
         "Butter is spread on toast.", "Honey is made by bees.", "Eggs can be fried or boiled.",
         "A sandwich has two slices of bread.", "Yogurt is a dairy food.", "Potatoes can be mashed.",
         "Salad is made of fresh leaves.", "Cookies are baked in the oven.", "Oranges are full of juice.",
         "Pancakes are eaten for breakfast."]


def test_smollm2_probe_and_steering_spec(smol):
    texts = COUNTRIES + FOODS
    labels = [1] * len(COUNTRIES) + [0] * len(FOODS)
    f = linear_probe(smol, texts, labels=labels, concept="country vs food", position="mean", control_types=False,
                     progress=False)
    assert "no control task" in f.notes[0] and f.table.control_accuracy.isna().all()
    assert f.explain().startswith(f"A linear probe reads country vs food from layer {f.metrics['best_layer']}'s")
    L = smol.n_layers
    print(f.table.round(3).to_string())
    print(f.summary())
    assert len(f.table) == L and f.arrays["weights"].shape == (L, smol.d_model)
    assert f.metrics["best_accuracy"] >= 0.875  # 8 held-out sentences: at most one wrong
    spec = f.to_spec(model=smol, scale=8.0, positions="all")
    assert spec.edits[0]["layers"] == [f.metrics["best_layer"]]
    assert torch.allclose(spec.tensors["probe_direction"].norm(), torch.tensor(1.0), atol=1e-5)
    batch = smol.encode("I would like to eat")
    before = smol.logits(batch)
    with interp.patch(smol, spec):
        steered = smol.logits(batch)
    after = smol.logits(batch)
    assert (steered - before).abs().max() > 1e-2
    assert torch.equal(before, after)
    # JSON round trip keeps the vector
    again = interp.Spec.from_json(spec.to_json(), spec.tensors)
    assert again.edits == spec.edits
    # interp evaluate reports its effect on a shipped task: steering every token moves perplexity
    res = interp.evaluate(smol, spec, "text", limit=12)
    assert res.metrics["n"] == 12 and res.metrics["changed_items"] == 12
    lo, hi = res.metrics["delta_ci"]
    assert lo <= res.metrics["delta"] <= hi and res.metrics["ppl_with"] != res.metrics["ppl_without"]


WORDS = {" cat": 1, " dog": 1, " horse": 1, " cow": 1, " sheep": 1, " table": 0, " chair": 0, " lamp": 0, " door": 0,
         " window": 0}
FRAMES = ["I saw a", "She painted a", "There was a", "We talked about the", "He drew the", "They bought the"]


@pytest.fixture(scope="module")
def animals(smol):
    texts = [f + w for f in FRAMES for w in WORDS]  # the last token is the word: each type recurs 6 times
    labels = [WORDS[w] for f in FRAMES for w in WORDS]
    for w in WORDS:
        assert len(smol.tokenizer.encode(w, add_special_tokens=False)) == 1
    f = linear_probe(smol, texts, labels=labels, concept="animacy", layers=[1, 8, 16, 24], progress=False)
    return f, texts, labels


def test_control_types_recur_so_the_control_task_is_learnable(animals):
    """The control task made every text its own type, so its accuracy was chance by construction. Types are now
    the token at the probed position: 10 words, 6 texts each, so a probe can memorise the random label per word."""
    f, texts, labels = animals
    t = f.table.set_index("layer")
    print(t.round(3).to_string())
    print(f.explain())
    assert f.params["control"] == "token at the probed position" and f.metrics["n_control_types"] == 10
    assert f.params["concept"] == "animacy" and "reads animacy from layer" in f.explain()
    ctl = f.arrays["control_label_index"]
    words = [t.split()[-1] for t in texts]
    for w in set(words):  # every example of a type carries one control label
        assert len({int(ctl[i]) for i in range(len(words)) if words[i] == w}) == 1
    assert 0 < int(ctl.sum()) < len(ctl)
    assert t.control_accuracy.max() >= 0.9  # memorisable: the word identity sits at its own position
    assert t.accuracy.max() >= 0.9


def test_control_probe_uses_the_real_probes_hyper_parameters(smol, animals):
    """The control probe's C was tuned separately; it is now the real probe's C at that layer, on the same split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from probes.linear import features
    f, texts, labels = animals
    X = features(smol, texts, "last", progress=False).double().numpy()
    test = f.arrays["test_mask"].numpy()
    y_ctl = np.asarray(f.metrics["classes"])[f.arrays["control_label_index"].numpy()]
    assert "control_C" not in f.table
    for _, r in f.table.iterrows():
        pipe = make_pipeline(StandardScaler(), LogisticRegression(C=r.C, max_iter=5000))
        pipe.fit(X[int(r.layer)][~test], y_ctl[~test])
        assert abs(pipe.score(X[int(r.layer)][test], y_ctl[test]) - r.control_accuracy) < 1e-9
        assert abs(r.selectivity - (r.accuracy - r.control_accuracy)) < 1e-12


def test_control_types_that_cannot_recur_are_refused(smol):
    texts = [f"Sentence number {i} ends here." for i in range(12)]
    labels = [i % 2 for i in range(12)]
    with pytest.raises(interp.InterpError, match="chance by construction"):  # one type: the final "."
        linear_probe(smol, texts, labels=labels, progress=False)
    with pytest.raises(interp.InterpError, match="chance by construction"):  # one type per text
        linear_probe(smol, texts, labels=labels, control_types=list(range(12)), progress=False)
    with pytest.raises(interp.InterpError, match="mean"):
        linear_probe(smol, texts, labels=labels, position="mean", progress=False)
    with pytest.raises(interp.InterpError, match="labels"):
        linear_probe(smol, texts, labels=labels[:5], progress=False)
    with pytest.raises(interp.InterpError, match="labels are missing"):
        linear_probe(smol, texts, progress=False)


def test_scan_default_is_sentiment_with_recurring_word_types():
    import json
    from probes.linear import _sentiment
    texts, labels, types = _sentiment()
    items = [json.loads(l) for l in open(interp.tasks.__file__.replace("tasks.py", "data/tasks/sentiment.jsonl"))][:160]
    assert texts == [it["prompt"] for it in items]
    assert labels == [1 - it["answer"] for it in items]  # choices are [" positive", " negative"]
    assert types[0] == "fun" and types[1] == "enjoyable"  # each review's last word
    counts = {t: types.count(t) for t in types}
    assert len(counts) >= 20 and sum(c for c in counts.values() if c > 1) >= 0.5 * len(types)
