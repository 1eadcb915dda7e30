"""ZeroTuning, ACT and secondary-sink suppression on SmolLM2: selections against brute force written here, the
specs' formulas on captured patterns, neutral values as bit-identical no-ops, JSON replay."""
import copy
import math

import pytest
import torch

import interp
from interp.tasks import Task, load_task
from probes.act import act, act_spec, theta_columns
from probes.secondary_sinks import secondary_sinks
from probes.zerotuning import first_token_spec, held_out, zerotuning

PROMPT = "The capital of Portugal is Lisbon. The capital of Kenya is Nairobi. The capital of Peru is"


def _small(name: str, n: int) -> Task:
    t = load_task(name)
    return Task(t.name, t.kind, t.items[:n], t.path)


def _gold_logp(model, items, spec=None):
    """Per item (one forward each, no batching): log p of the answer's first token at the last prompt token, and
    whether it is the argmax."""
    tok = model.tokenizer
    out = []
    for it in items:
        p = tok(it["prompt"])["input_ids"]
        full = tok(it["prompt"] + it["answer"])["input_ids"]
        gold = full[len(p)] if full[:len(p)] == p else full[len(p) - 1]
        lg = model.logits(torch.tensor([p]), *([spec] if spec else []))[0, -1].double()
        lp = torch.log_softmax(lg, -1)
        out.append((float(lp[gold]), float(int(lp.argmax()) == gold)))
    return out


def test_zerotuning_selection_matches_brute_force(smol):
    task = _small("capitals", 7)
    f = zerotuning(smol, task, n_val=4, layers=[2, 3], n_candidates=2, top_k=1, grid=(0.5, 1.0, 3.0), progress=False)
    val = task.items[:4]
    # α_0 from HF eager attentions
    ref = copy.deepcopy(smol.hf)
    ref.set_attn_implementation("eager")
    a0 = torch.zeros(smol.n_layers, smol.n_heads)
    for it in val:
        ids = torch.tensor([smol.tokenizer(it["prompt"])["input_ids"]])
        with torch.no_grad():
            A = torch.stack(ref(input_ids=ids, output_attentions=True).attentions)[:, 0]  # [L, H, T, T]
        a0 += A[..., 0].mean(-1) / len(val)
    pool = sorted([(l, h) for l in (2, 3) for h in range(smol.n_heads)], key=lambda lh: -float(a0[lh]))[:2]
    assert [(r.layer, r.head) for r in f.table.itertuples()] == pool
    assert torch.allclose(f.arrays["alpha0"][2:4], a0[2:4], atol=1e-5)

    # profile through the P1 form (a log γ logit bias on key 0), one prompt at a time
    def J(spec=None):
        r = _gold_logp(smol, val, spec)
        return sum(x for x, _ in r) / len(r), sum(a for _, a in r) / len(r)

    def bias_spec(heads, g):
        return interp.Spec.for_model(smol, [interp.ops.add_logit_bias(layers=[l], heads=[h], keys=0, bias=math.log(g))
                                            for l, h in heads])
    j0 = J()[0]
    gains = {lh: (J(bias_spec([lh], 0.5))[0] - j0, J(bias_spec([lh], 2.0))[0] - j0) for lh in pool}
    for r in f.table.itertuples():
        assert r.gain_down == pytest.approx(gains[(r.layer, r.head)][0], abs=1e-5)
        assert r.gain_up == pytest.approx(gains[(r.layer, r.head)][1], abs=1e-5)
    up = {lh: g[1] for lh, g in gains.items() if g[1] > max(0, g[0])}
    dn = {lh: g[0] for lh, g in gains.items() if g[0] > max(0, g[1])}
    sel = up if sum(up.values()) >= sum(dn.values()) else dn
    if not sel or sum(sel.values()) <= 0:
        assert f.metrics["selected_heads"] == []
        return
    best_head = max(sel, key=sel.get)
    assert [tuple(h) for h in f.metrics["selected_heads"]] == [best_head]
    keyed = {g: tuple(reversed(J(bias_spec([best_head], g)))) for g in (0.5, 1.0, 3.0)}  # (accuracy, mean log p)
    assert f.metrics["gamma"] == max(keyed, key=keyed.get)
    # the spec replays from JSON to the same logits; held-out items are the ones the search did not see
    spec = f.to_spec(smol)
    again = interp.Spec.from_json(spec.to_json())
    b = smol.encode(PROMPT)
    assert torch.equal(smol.logits(b, spec), smol.logits(b, again))
    assert held_out(f).items == task.items[4:]


def test_zerotuning_formula_and_neutral(smol):
    site = "blocks.3.attn.pattern"
    A = interp.capture(smol, PROMPT, sites=site)[site][0]
    spec = first_token_spec(smol, [(3, 1), (3, 4)], {(3, 1): 2.0, (3, 4): 0.25})
    with interp.patch(smol, spec):
        got = interp.capture(smol, PROMPT, sites=site)[site][0]
    want = A.clone()
    for h, g in ((1, 2.0), (4, 0.25)):
        a0 = A[h, :, 0:1]
        D = (g - 1) * a0 + 1
        want[h] = A[h] / D
        want[h, :, 0] = g * A[h, :, 0] / D[:, 0]
    assert (got - want).abs().max() <= 1e-5 and (got - A).abs()[[1, 4]].max() > 1e-3
    b = smol.encode(PROMPT)
    assert torch.equal(smol.logits(b, first_token_spec(smol, [(3, 1), (5, 2)], 1.0)), smol.logits(b))


def test_act_theta_rule_formula_neutral_and_selection(smol):
    # θ rule against a brute-force loop
    g = torch.Generator().manual_seed(0)
    alpha = torch.rand(2, 2, 3, 6, generator=g) * 0.3
    lens = [6, 4]
    cols = theta_columns(alpha, lens, 0.1)
    for i, n in enumerate(lens):
        for l in range(2):
            for h in range(3):
                K = [k for k in range(n) if alpha[i, l, h, k] > 0.1][1:]
                assert cols[i][l, h].nonzero()[:, 0].tolist() == K
    # ACT formula at one layer, K from φ computed here
    dims, tau, beta, layer = [247, 507], 15.0, 0.4, 6
    site = f"blocks.{layer}.attn.pattern"
    tr = interp.capture(smol, PROMPT, sites=[site, f"blocks.{layer}.resid_pre"])
    A, x = tr[site][0].double(), tr[f"blocks.{layer}.resid_pre"][0].double()
    phi = (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))[:, dims].abs().amax(-1)
    K = phi > tau
    K[0] = False
    assert 0 < int(K.sum()) < len(K) - 1
    spec = act_spec(smol, [(layer, 2), (layer, 7)], beta, dims, tau)
    with interp.patch(smol, spec):
        got = interp.capture(smol, PROMPT, sites=site)[site][0].double()
    want = A.clone()
    for h in (2, 7):
        pk = (A[h] * K).sum(-1, keepdim=True)
        gain = torch.where(1 - pk > 1e-6, (1 - beta) * pk / (1 - pk).clamp_min(1e-30), 0.0)
        want[h] = torch.where(K, beta * A[h], A[h] * (1 + gain))
        want[h] = torch.where(1 - pk > 1e-6, want[h], A[h])
    assert (got - want).abs().max() <= 1e-5 and (got - A).abs()[[2, 7]].max() > 1e-3
    b = smol.encode(PROMPT)
    assert torch.equal(smol.logits(b, act_spec(smol, [(layer, 2)], 1.0, dims, tau)), smol.logits(b))

    # selection: the greedy keep rule on calibration accuracy (log p ties), recomputed one prompt at a time
    task = _small("capitals", 6)
    f = act(smol, task, n_val=4, layers=[5, 6], heads_per_layer=1, max_candidates=2, progress=False)
    m = f.metrics
    assert m["sink_dims"] == dims
    cands = [(r.layer, r.head) for r in f.table.itertuples()]
    best = tuple(reversed([sum(v) / 4 for v in zip(*_gold_logp(smol, task.items[:4]))]))
    kept = []
    for lh in cands:
        s = act_spec(smol, kept + [lh], 0.4, m["sink_dims"], m["tau"])
        key = tuple(reversed([sum(v) / 4 for v in zip(*_gold_logp(smol, task.items[:4], s))]))
        assert key[0] == pytest.approx(f.table.acc_with[cands.index(lh)], abs=1e-9)
        assert key[1] == pytest.approx(f.table.logp_with[cands.index(lh)], abs=1e-5)
        if key > best:
            kept.append(lh)
            best = key
    assert [tuple(h) for h in m["kept_heads"]] == kept
    if kept:
        spec = f.to_spec(smol)
        again = interp.Spec.from_json(spec.to_json())
        assert torch.equal(smol.logits(b, spec), smol.logits(b, again))
    else:
        with pytest.raises(interp.InterpError, match="no head was kept"):
            f.to_spec(smol)


def test_secondary_sink_suppression_spec(smol):
    prompts = [PROMPT]
    f = secondary_sinks(smol, prompts)  # the paper's thresholds: SmolLM2 has no secondary sink here
    assert f.metrics["n_secondary"] == 0
    with pytest.raises(interp.InterpError, match="no sink of kind"):
        f.to_spec(smol)
    g = secondary_sinks(smol, prompts, cos_threshold=0.5, min_lifetime=1)
    rows = g.table[g.table.sink_type == "secondary"]
    if rows.empty:
        pytest.skip("no BOS-aligned token at cos 0.5 on this prompt")
    spec = g.to_spec(smol, factor=0.3, epsilon=0.05)
    e = spec.edits[0]
    layer, heads = e["layers"][0], e["heads"]
    assert e["keys"] == "sink" and e["factor"] == 0.3 and spec.sink["skip_first"]
    # the heads are those with mean α > ε on the found sinks (brute force from HF eager attentions)
    ref = copy.deepcopy(smol.hf)
    ref.set_attn_implementation("eager")
    ids = smol.encode(PROMPT).input_ids
    with torch.no_grad():
        A = torch.stack(ref(input_ids=ids, output_attentions=True).attentions)[:, 0].double()  # [L, H, T, T]
    T = A.shape[-1]
    al = A.sum(2) / torch.arange(T, 0, -1).double()  # [L, H, T]
    want_alpha = al[:, :, list(g.table.loc[rows.index, "position"])].mean(-1)
    assert heads == [h for h in range(smol.n_heads) if want_alpha[layer, h] > 0.05]
    # formula at that layer: a'_j = f a_j / (1 − (1 − f) Σ_S a) for j ∈ S (run-time φ set), a_k / (…) elsewhere
    site = f"blocks.{layer}.attn.pattern"
    tr = interp.capture(smol, PROMPT, sites=[site, f"blocks.{layer}.resid_pre"])
    x = tr[f"blocks.{layer}.resid_pre"][0].double()
    S = (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))[:, spec.sink["dims"]].abs().amax(-1) > spec.sink["tau"]
    S[0] = False
    assert bool(S[list(rows.position)].all())  # every found sink is selected at run time
    P = tr[site][0].double()
    with interp.patch(smol, spec):
        got = interp.capture(smol, PROMPT, sites=site)[site][0].double()
    fac = torch.where(S, 0.3, 1.0)
    want = P.clone()
    want[heads] = P[heads] * fac / (P[heads] * fac).sum(-1, keepdim=True)
    assert (got - want).abs().max() <= 1e-5
    b = smol.encode(PROMPT)
    assert torch.equal(smol.logits(b, g.to_spec(smol, factor=1.0, epsilon=0.05)), smol.logits(b))
    again = interp.Spec.from_json(spec.to_json())
    assert torch.equal(smol.logits(b, spec), smol.logits(b, again))
