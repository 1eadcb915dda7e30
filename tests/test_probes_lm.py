"""LM probes on the real SmolLM2, each checked against an independent computation."""
import copy

import pytest
import torch

import interp
from interp.prompts import facts, paragraphs
from probes.entropy import entropy
from probes.knockout import knockout
from probes.massive import massive
from probes.secondary_sinks import secondary_sinks
from probes.sinks import sinks


@pytest.fixture(scope="module")
def sink_finding(smol):
    return sinks(smol, progress=False)


def test_sink_metric_matches_hf_output_attentions(smol, sink_finding):
    f = sink_finding
    assert f.metrics["sink_rate_token0_layers_ge2"] > 80.0
    assert f.metrics["sink_rate_token0_repeated"] < 5.0
    # independent computation from HF eager output_attentions on two of the prompts
    ref = copy.deepcopy(smol.hf)
    ref.set_attn_implementation("eager")
    b = smol.encode([[{"role": "user", "content": p}] for p in paragraphs()[:2]])
    with torch.no_grad():
        att = ref(input_ids=b.input_ids[:, :64], output_attentions=True).attentions
    A = torch.stack(att)  # [L, b, H, T, T]
    T = 64
    alpha = A.sum(3) / torch.arange(T, 0, -1).float()  # column sum / number of queries that see k
    mine = sinks(smol, paragraphs()[:2], progress=False).arrays["importance"]
    assert (alpha.mean(1) - mine).abs().max() <= 1e-5
    rate = (alpha[2:, ..., 0] > 0.3).float().mean() * 100
    assert abs(rate - sinks(smol, paragraphs()[:2], progress=False).metrics["sink_rate_token0_layers_ge2"]) < 1e-4


def test_sink_specs_replay(smol, sink_finding):
    b = smol.encode("The capital of Italy is")
    base = smol.logits(b)
    for method in ("zerotuning", "act"):
        spec = sink_finding.to_spec(model=smol, method=method)
        with interp.patch(smol, spec):
            assert not torch.equal(smol.logits(b), base)
        assert torch.equal(smol.logits(b), base)
    res = interp.evaluate(smol, sink_finding.to_spec(model=smol, gamma=0.6), "capitals", limit=40)
    lo, hi = res.metrics["delta_ci"]
    assert lo <= res.metrics["delta"] <= hi and res.metrics["n"] == 40


def test_massive_activations_and_ablation(smol):
    f = massive(smol, paragraphs()[:6])
    m = f.metrics
    assert m["token0_is_massive"] and m["max_ratio"] >= 1000
    hits0 = f.table[(f.table.token == 0) & (f.table.ratio >= 1000)]
    assert hits0.prompt.nunique() >= 5
    assert len(m["dims_in_every_prompt"]) >= 1  # the same dims in every prompt
    # the reported values are the residual stream itself (HF hidden_states)
    row = hits0.iloc[0]
    b = smol.encode(paragraphs()[int(row.prompt)])
    with torch.no_grad():
        hs = smol.hf(input_ids=b.input_ids[:, :64], output_hidden_states=True).hidden_states
    assert abs(float(hs[int(row.layer) + 1][0, int(row.token), int(row.dim)]) - row.value) <= 1e-3
    # set-zero explodes perplexity, set-mean and random dims barely move it
    assert m["set_zero_log10_ratio"] > 2
    assert abs(m["set_mean_rel_change"]) < 0.05
    assert abs(m["random_rel_change"]) < 0.05
    spec = f.to_spec(model=smol, method="set_mean")
    with interp.patch(smol, spec):
        smol.logits("The capital of France is")


def test_entropy_matches_patterns_and_exports_art(smol):
    f = entropy(smol, paragraphs()[:2], max_tokens=48)
    tr = interp.capture(smol, {"input_ids": smol.encode(paragraphs()[:2]).input_ids[:, :48]},
                        sites="blocks.*.attn.pattern", layers=[0, 5])
    for l in (0, 5):
        A = tr[f"blocks.{l}.attn.pattern"][:, :, 8:]  # queries ≥ min_query
        H = -(A * A.clamp_min(1e-30).log()).sum(-1) / torch.log(torch.arange(9, 49).float())
        want = H.mean((0, 2))
        got = torch.tensor(f.table[f.table.layer == l].entropy.values)
        assert (got - want).abs().max() <= 1e-5
    uniform = f.table[f.table.uniform]
    if len(uniform[uniform.layer <= 10]):
        spec = f.to_spec(model=smol, window=8)
        with interp.patch(smol, spec):
            smol.logits("The capital of France is")


def test_knockout_lowers_answer_and_empty_is_noop(smol):
    f = knockout(smol, progress=False)  # what `interp scan` runs: built-in facts, every 3rd window centre
    assert f.params["layers"] == list(range(0, smol.n_layers, 3)) and f.metrics["n_items"] == len(facts())
    assert f.metrics["min_delta_pct"] < -10  # blocking last→subject hurts the factual answer
    m = f.metrics
    print(f.explain())
    assert f.explain() == (f"Blocking last → subject attention in a 9-layer window centred at layer {m['min_layer']} "
                           f"lowers the answer's probability by {-m['min_delta_pct']:.0f} % (mean over 8 items).")
    items = facts()[:4]
    empty = knockout(smol, items[:2], source="none", layers=[0, 15], progress=False)
    assert (empty.table.delta_pct == 0).all()
    spec = f.to_spec(model=smol)
    b = smol.encode(items[0]["prompt"], roles={"subject": items[0]["subject"]})
    p = torch.softmax(smol.logits(b, spec)[0, -1], -1)
    p0 = torch.softmax(smol.logits(b)[0, -1], -1)
    assert p[p0.argmax()] < p0.max()
    # the exported spec is evaluable on the shipped capitals task (its items name their subject)
    res = interp.evaluate(smol, spec, "capitals", limit=24)
    assert res.metrics["with"] < res.metrics["without"] and res.metrics["delta_ci"][1] < 0


def test_knockout_per_item_edges_keep_their_own_labels(smol):
    """Two edges with per-item selectors used to share the label "per-item→last", so the table averaged them."""
    items = facts()[:3]
    subj = tuple(smol.encode(x["prompt"], roles={"subject": x["subject"]}).roles[0]["subject"] for x in items)
    first = tuple([1] for _ in items)
    f = knockout(smol, items, edges=[(subj, "last"), (first, "last")], layers=[12], progress=False)
    t = f.table
    assert len(t) == 2 and t.edge.nunique() == 2, t
    d = f.arrays["per_item"][:, :, 0]  # [item, edge]
    assert torch.allclose(torch.tensor(t.delta_pct.tolist()), d.mean(0).double().float(), atol=1e-5)
    # the subject edge equals the same knockout addressed by role; the other edge differs from it
    by_role = knockout(smol, items, layers=[12], progress=False)
    assert abs(float(by_role.table.delta_pct[0]) - float(t.delta_pct[0])) < 1e-4
    assert abs(float(t.delta_pct[0]) - float(t.delta_pct[1])) > 1.0
    # named edges keep their names
    g = knockout(smol, items[:1], edges=[("role:subject", "last", "subject"), ("none", "last", "nothing")],
                 layers=[12], progress=False)
    assert list(g.table.edge) == ["subject", "nothing"]


def test_knockout_figure_says_windows_are_centred():
    import viz
    from interp.finding import Finding
    import pandas as pd
    f = Finding("probes.knockout", pd.DataFrame({"layer": [0, 3, 6], "edge": ["role:subject→last"] * 3,
                                                  "delta_pct": [-5.0, -40.0, -2.0]}), {"window": 9})
    for fig in (f.plot(), f.plot(interactive=True)):
        label = fig.axes[0].get_xlabel() if hasattr(fig, "axes") else fig.layout.xaxis.title.text
        assert "centre" in label and "start" not in label, label


def test_knockout_refuses_bad_input_and_leaves_model_unhooked(smol):
    b = smol.encode("The capital of France is")
    before = smol.logits(b)
    with pytest.raises(interp.InterpError, match="outside"):
        knockout(smol, ["The capital of France is"], source="0", layers=[smol.n_layers], progress=False)
    with pytest.raises(interp.InterpError, match="answers"):
        knockout(smol, ["The capital of France is"], source="0", layers=[1], answers=[1, 2], progress=False)
    with pytest.raises(interp.InterpError, match="per-item"):
        knockout(smol, ["The capital of France is"], source=([0], [1]), layers=[1], progress=False)
    assert torch.equal(smol.logits(b), before)


def test_secondary_sinks_runs(smol):
    f = secondary_sinks(smol, paragraphs()[:2])
    assert set(f.table.sink_type) <= {"bos", "bos_sink", "secondary", "noise"}
    assert (f.table.lifetime > 0).all()
