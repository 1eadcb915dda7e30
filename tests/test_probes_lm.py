"""LM probes on the real SmolLM2, each checked against an independent computation."""
import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch

import interp
from interp.finding import Finding
from interp.prompts import facts, paragraphs
from probes.entropy import entropy
from probes.knockout import knockout
from probes.massive import find_massive, massive
from probes.secondary_sinks import secondary_sinks
from probes.sinks import sinks


@pytest.fixture(scope="module")
def sink_finding(smol):
    return sinks(smol, progress=False)


def test_sink_metric_matches_hf_output_attentions(smol, sink_finding):
    f = sink_finding
    # the paper's protocol: plain text, T = 64; one built-in paragraph has 63 tokens and is left out, and says so
    assert f.params["chat"] is False and f.metrics["n_prompts"] == len(paragraphs()) - 1
    assert any("1 of 12 prompts have fewer than T=64 tokens" in n for n in f.notes)
    assert f.metrics["sink_rate_token0_layers_ge2"] > 70.0
    assert f.metrics["sink_rate_token0_repeated"] < 5.0
    assert f.metrics["sink_rate_token1_to_7_max"] < 5.0
    assert f"{f.metrics['sink_rate_token0']:.1f} %" in f.explain() and "over 11 prompts" in f.explain()
    # independent computation from HF eager output_attentions on two of the prompts
    ref = copy.deepcopy(smol.hf)
    ref.set_attn_implementation("eager")
    b = smol.encode(paragraphs()[:2])
    with torch.no_grad():
        att = ref(input_ids=b.input_ids[:, :64], output_attentions=True).attentions
    A = torch.stack(att)  # [L, b, H, T, T]
    T = 64
    alpha = A.sum(3) / torch.arange(T, 0, -1).float()  # column sum / number of queries that see k
    mine = sinks(smol, paragraphs()[:2], progress=False)
    assert (alpha.mean(1) - mine.arrays["importance"]).abs().max() <= 1e-5
    rate = (alpha[2:, ..., 0] > 0.3).float().mean() * 100
    assert abs(rate - mine.metrics["sink_rate_token0_layers_ge2"]) < 1e-4
    assert mine.notes == []


def test_sinks_leave_out_short_prompts_or_refuse(smol):
    long, short = paragraphs()[0], "A short prompt."
    f = sinks(smol, [short, long], T=32, progress=False)
    assert f.metrics["n_prompts"] == 1 and f.notes == ["1 of 2 prompts have fewer than T=32 tokens and were left out"]
    assert torch.equal(f.arrays["importance"], sinks(smol, [long], T=32, progress=False).arrays["importance"])
    with pytest.raises(interp.InterpError, match="none of the 2 prompt"):
        sinks(smol, [short, short], T=32, progress=False)
    with pytest.raises(interp.InterpError, match="min_query=8"):  # entropy: every query row would be trivially short
        entropy(smol, [short])
    with pytest.raises(interp.InterpError, match="T=1"):
        sinks(smol, [long], T=1, progress=False)


def test_sinks_chat_without_a_chat_template_falls_back_to_plain_text(smol):
    plain = copy.copy(smol)  # same weights and engine, a tokenizer without a chat template
    plain.tokenizer = copy.deepcopy(smol.tokenizer)
    plain.tokenizer.chat_template = None
    f = sinks(plain, paragraphs()[:1], T=16, chat=True, progress=False)
    assert f.params["chat"] is False and "no chat template" in f.notes[0]
    g = sinks(smol, paragraphs()[:1], T=16, progress=False)
    assert torch.equal(f.arrays["importance"], g.arrays["importance"])
    # with a template, chat=True reads the prompts through it (another token 0)
    c = sinks(smol, paragraphs()[:1], T=16, chat=True, progress=False)
    assert c.params["tokens"][0] != g.params["tokens"][0]


def test_zerotuning_spec_scales_token0_and_renormalises(smol, sink_finding):
    l0 = int(sink_finding.table[sink_finding.table.is_sink].layer.min())
    spec = sink_finding.to_spec(model=smol, gamma=0.6, layers=[l0])
    heads = spec.edits[0]["heads"]
    x = "The capital of Italy is Rome, and the capital of France is"
    site = f"blocks.{l0}.attn.pattern"
    A = interp.capture(smol, x, sites=site)[site][0]  # [H, T, T]
    with interp.patch(smol, spec):
        got = interp.capture(smol, x, sites=site)[site][0]
    want = A.clone()
    w = A[heads].clone()
    w[..., 0] *= 0.6
    want[heads] = w / w.sum(-1, keepdim=True)  # ZeroTuning: γ on token 0, rows renormalised
    assert (got - want).abs().max() <= 1e-5
    assert (A[heads, 1:, 0] - got[heads, 1:, 0]).abs().min() > 0  # and it did change every row that sees token 0
    # γ = 1 is the identity: logits bit-identical
    b = smol.encode(x)
    with interp.patch(smol, sink_finding.to_spec(model=smol, gamma=1.0)):
        same = smol.logits(b)
    assert torch.equal(same, smol.logits(b))


def test_act_spec_scales_the_running_inputs_sinks(smol, sink_finding):
    """ACT finds the sinks of the running input (not positions of the probe prompts): on a short prompt, the
    attention to every sink except position 0 is scaled by β and the removed mass goes to the other keys."""
    f = sink_finding
    dims, tau, beta = f.metrics["sink_dims"], 20.0, 0.4
    x = paragraphs()[0]
    ids = smol.encode(x).input_ids[:, :24]
    layers = sorted(f.table[f.table.is_sink].layer.unique().tolist())
    tr = interp.capture(smol, {"input_ids": ids}, sites=[f"blocks.{l}.{s}" for l in layers
                                                            for s in ("resid_pre", "attn.pattern")])
    for l in layers:
        h = tr[f"blocks.{l}.resid_pre"][0].float()
        phi = (h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))[:, dims].abs().amax(-1)
        K = [k for k in torch.nonzero(phi > tau)[:, 0].tolist() if k > 0]
        if K:
            break
    assert K, "no non-initial sink in this prompt"
    spec = f.to_spec(model=smol, method="act", beta=beta, tau=tau, layers=[l])
    assert spec.edits[0]["keys"] == "sink" and spec.sink["skip_first"]
    heads = spec.edits[0]["heads"]
    A = tr[f"blocks.{l}.attn.pattern"][0]
    pK = A[heads][..., K].sum(-1, keepdim=True)
    want = A.clone()
    w = A[heads] * (1 + (1 - beta) * pK / (1 - pK))
    w[..., K] = A[heads][..., K] * beta
    want[heads] = w
    site = f"blocks.{l}.attn.pattern"
    with interp.patch(smol, spec):
        got = interp.capture(smol, {"input_ids": ids}, sites=site)[site][0]
    assert (got - want).abs().max() <= 1e-5
    assert (got.sum(-1) - 1).abs().max() <= 1e-5
    # position 0 is left alone by the selector: its weight only grows (by the redistributed mass)
    assert (got[heads, :, 0] >= A[heads, :, 0]).all()


def test_massive_activations_and_ablation(smol):
    f = massive(smol, paragraphs()[:3])
    m = f.metrics
    assert m["token0_is_massive"] and m["max_ratio"] >= 1000
    assert m["first_layer"] == 11 and m["first_layer_tokens"] == [0]  # SmolLM2: after block 11, at token 0
    assert 507 in m["dims_in_every_prompt"]
    # the reported values are the residual stream itself (HF hidden_states)
    b = smol.encode(paragraphs()[:3])
    with torch.no_grad():
        hs = smol.hf(input_ids=b.input_ids[:, :64], attention_mask=b.attention_mask[:, :64],
                     output_hidden_states=True).hidden_states
    for row in f.table.head(20).itertuples():
        assert abs(float(hs[row.layer + 1][row.prompt, row.token, row.dim]) - row.value) <= 1e-3
    # set-mean writes each dim's mean over the prompts' own massive positions (token 0 here)
    want = hs[12][:, 0, m["dims"]].mean(0)
    assert torch.allclose(torch.tensor(m["set_mean_values"]), want, rtol=1e-4)
    # the paper's ablation inside the probe: set-zero explodes perplexity, set-mean and random dims barely move it
    assert m["set_zero_log10_ratio"] > 2
    assert abs(m["nll_set_mean"] - m["nll"]) < 0.01 and abs(m["random_rel_change"]) < 0.05
    assert "layer 11" in f.explain() and "token 0" in f.explain()


def _nll(model, texts, spec=None):
    b = model.encode(texts)
    logits = model.logits(b, spec) if spec is not None else model.logits(b)
    lp = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), b.input_ids[:, 1:], reduction="none")
    m = b.attention_mask[:, 1:].float()
    return float((lp * m).sum() / m.sum())


def test_massive_spec_replays_on_other_prompts(smol):
    """The exported spec finds each prompt's own massive tokens at run time: on prompts the probe never saw, set-mean
    is a near no-op (Sun et al.) while set-zero blows the loss up."""
    f = massive(smol, paragraphs()[:2], ablation=False)
    spec = f.to_spec(model=smol, method="set_mean")
    e = spec.edits[0]
    assert e["positions"] == "sink" and spec.sink["dims"] == f.metrics["dims"] and e["layers"] == [12]
    texts = [paragraphs()[5][:200], "The capital of France is Paris. The capital of Italy is Rome."]
    base = _nll(smol, texts)
    assert abs(_nll(smol, texts, spec) - base) < 0.01
    assert _nll(smol, texts, f.to_spec(model=smol, method="set_zero")) - base > 2.0
    with pytest.raises(interp.InterpError, match="only massive token"):
        f.to_spec(model=smol, method="attention")


def test_massive_attention_spec_biases_the_running_inputs_massive_tokens_but_the_first(smol):
    """method='attention': a logit bias on the keys the sink selector finds at run time, position 0 excepted. SmolLM2
    has one massive token (position 0), so the finding is made up with a low τ that also catches a few others."""
    dims, tau, first = [247, 507], 12.0, 11
    f = Finding("probes.massive", pd.DataFrame(), {}, smol.identity(), "",
                {"dims": dims, "tokens": [0, 3], "first_layer": first, "sink_tau": tau})
    spec = f.to_spec(model=smol, method="attention", bias=-5.0)
    assert spec.edits[0]["layers"] == list(range(first + 1, smol.n_layers)) and spec.sink["skip_first"]
    x = paragraphs()[1][:160]
    l = first + 1
    tr = interp.capture(smol, x, sites=[f"blocks.{l}.resid_pre", f"blocks.{l}.attn.pattern"])
    h = tr[f"blocks.{l}.resid_pre"][0].float()
    phi = (h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))[:, dims].abs().amax(-1)
    K = (phi > tau) & (torch.arange(len(phi)) > 0)
    assert K.any() and phi[0] > tau  # position 0 is a sink, and it is left alone
    A = tr[f"blocks.{l}.attn.pattern"][0]
    w = A * torch.where(K, math.exp(-5.0), 1.0)
    want = w / w.sum(-1, keepdim=True)
    with interp.patch(smol, spec):
        got = interp.capture(smol, x, sites=f"blocks.{l}.attn.pattern")[f"blocks.{l}.attn.pattern"][0]
    assert (got - want).abs().max() <= 1e-5


def test_massive_start_layer_needs_few_tokens_and_dims():
    """A constructed residual stream: in layers 0-1 one dim exceeds 100 and 1000x the median at every token (a dense
    outlier feature), from layer 2 on two dims are massive at token 0 only. Massive activations start at layer 2."""
    g = torch.Generator().manual_seed(0)
    L, b, T, d = 5, 2, 20, 32
    H = torch.randn(L, b, T, d, generator=g) * 0.1
    H[:2, :, :, 3] = 500.0
    H[2:, :, 0, 7] = 2000.0
    H[2:, :, 0, 9] = -1500.0
    valid = torch.ones(b, T, dtype=torch.bool)
    valid[1, 15:] = False  # padding is never a hit
    H[2:, 1, 17, 7] = 9000.0
    rows, dense = find_massive(H, valid)
    assert sorted(dense) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert {(r["layer"], r["prompt"], r["token"], r["dim"]) for r in rows} == \
        {(l, i, 0, c) for l in range(2, L) for i in range(b) for c in (7, 9)}


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
    # ART: uniform heads of the first third get a local window of w keys plus the sink key 0
    spec = f.to_spec(model=smol, window=8)
    e = spec.edits[0]
    l0, heads = e["layers"][0], e["heads"]
    x = paragraphs()[3][:150]
    site = f"blocks.{l0}.attn.pattern"
    A = interp.capture(smol, x, sites=site)[site][0]
    with interp.patch(smol, spec):
        got = interp.capture(smol, x, sites=site)[site][0]
    T = A.shape[-1]
    q, k = torch.arange(T)[:, None], torch.arange(T)[None, :]
    keep = (k > q - 8) | (k == 0)
    want = A.clone()
    w = A[heads] * keep
    want[heads] = w / w.sum(-1, keepdim=True)
    assert T > 16 and (got - want).abs().max() <= 1e-5


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


def test_secondary_sinks_against_hf_hidden_states(smol):
    f = secondary_sinks(smol, paragraphs()[:2])
    L = smol.n_layers
    assert all(x >= L - 15 for x in f.metrics["bos_lifetime"])  # METHODS §1c: the BOS lives ≥ L − 15 layers
    # independent recomputation of prompt 0 from HF hidden_states[1:]
    b = smol.encode(paragraphs()[0])
    with torch.no_grad():
        h = torch.stack(smol.hf(input_ids=b.input_ids[:, :128], output_hidden_states=True).hidden_states[1:])[:, 0]
    n = h.norm(dim=-1)
    bos = int(n[:, :2].mean(0).argmax())
    delta = n[1:, bos] - n[:-1, bos]
    start = int(delta.argmax()) + 1
    end = int(delta[start:].argmin()) + start + 1
    assert f.metrics["layer_window"][0] == (start, end)
    cos = torch.nn.functional.cosine_similarity(h[start:end], h[start:end, bos:bos + 1], dim=-1).abs()
    life = (cos > 0.9).sum(0)
    t = f.table[f.table.prompt == 0]
    assert dict(zip(t.position, t.lifetime)) == {j: int(life[j]) for j in range(len(life)) if life[j] > 0}
    assert set(t[t.position == bos].sink_type) == {"bos"}
    assert f.explain().startswith("The first-token sink stays aligned for")


def _boxes_overlap(a, b) -> bool:
    return a.x0 < b.x1 - 1 and b.x0 < a.x1 - 1 and a.y0 < b.y1 - 1 and b.y0 < a.y1 - 1


@pytest.mark.parametrize("name", ["sinks", "massive", "entropy", "secondary_sinks"])
def test_probe_figures_keep_titles_and_colorbars_apart_at_narrow_widths(name):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    import probes  # noqa: F401  (registers the probes' figures)
    import viz
    from tests.test_viz import synthetic_findings
    f = synthetic_findings()[name]
    for width in ((5.0, 6.5) if name in ("sinks", "massive") else (3.5, 4.5)):  # two panels / one panel
        fig = viz.plot(f, width=width)
        assert fig.get_figwidth() == width
        FigureCanvasAgg(fig).draw()
        r = fig.canvas.get_renderer()
        W = fig.bbox.width
        titles = [t.get_window_extent(r) for ax in fig.axes for t in (ax.title, ax._left_title, ax._right_title)
                  if t.get_text()]
        if fig._suptitle is not None:
            titles.append(fig._suptitle.get_window_extent(r))
        cbars = [ax.get_tightbbox(r) for ax in fig.axes if hasattr(ax, "_colorbar")]
        assert titles
        for i, a in enumerate(titles):
            assert a.x0 >= -1 and a.x1 <= W + 1, (name, width, "title outside the figure")
            for b in titles[i + 1:] + cbars:
                assert not _boxes_overlap(a, b), (name, width)


def test_massive_figures_log_colour_scale_real_tokens_only():
    import matplotlib.colors

    import probes  # noqa: F401
    import viz
    from tests.test_viz import synthetic_findings
    f = synthetic_findings()["massive"]
    f.params = {**f.params, "tokens": f.params["tokens"][:5]}  # 5 real tokens, the rest of layer_abs is padding
    fig = viz.plot(f)
    im = fig.axes[1].images[0]
    assert isinstance(im.norm, matplotlib.colors.LogNorm) and im.get_array().shape[0] == 5
    go = viz.plot(f, interactive=True)
    heat = [t for t in go.data if t.type == "heatmap"][0]
    assert len(heat.z) == 5
    z = np.array(heat.z, dtype=float)
    assert np.nanmax(z) == pytest.approx(np.log10(float(f.arrays["layer_abs"][:5].abs().max())), rel=1e-6)
