"""Step-Saliency: segmentation, step maps, and the OEB / SMI ops it exports, against hand-written references."""
import pytest
import torch

import interp
from tests.conftest import ForceEager
from attribution.step_saliency import EXAMPLES, encode_steps, split_summary, split_thinking, step_saliency


def spec(model, *edits):
    return interp.Spec.for_model(model, list(edits))


@pytest.fixture(scope="module")
def ex(smol):
    """EXAMPLES[0]: the encoded batch with roles, its steps, and its Finding."""
    batch, steps = encode_steps(smol, **EXAMPLES[0])
    return batch, steps, step_saliency(smol, **EXAMPLES[0])


@pytest.fixture(scope="module")
def short(smol):
    """A short prompt with the same roles, for the op tests."""
    return encode_steps(smol, "Ann has 2 cats and 3 dogs. How many pets?", "She has 2 + 3 = 5 pets in total.",
                        "Two cats and three dogs.\n\nThe answer is 5.")[0]


# ---------------------------------------------------------------------------------- segmentation
def test_segmentation_rules():
    th = "Short one. This is a longer sentence here. 1234567890123456. | a | b | c | d | e |. Another long enough one"
    assert [th[a:b] for a, b in split_thinking(th)] == ["This is a longer sentence here.", "Another long enough one"]
    su = "Ok.\n\nThe final answer is 42.\n\n| x | y | z |"
    assert [su[a:b] for a, b in split_summary(su)] == ["The final answer is 42."]


def test_steps_can_be_given(smol):
    e = EXAMPLES[0]
    batch, steps = encode_steps(smol, **e, thinking_steps=["Tom eats 2 of them.", "So 12 - 2 = 10 apples are left."],
                                summary_steps=[(0, 11)])
    assert [s["kind"] for s in steps] == ["question", "thinking", "thinking", "summary"]
    assert [s["text"] for s in steps][1:] == ["Tom eats 2 of them.", "So 12 - 2 = 10 apples are left.", "Tom had 12 "]
    for i, s in enumerate(steps):
        assert batch.roles[0][f"step{i}"] == s["tokens"]
        assert s["text"].strip() in smol.tokenizer.decode(batch.input_ids[0, s["tokens"]])
    with pytest.raises(interp.InterpError, match="does not occur"):
        encode_steps(smol, **e, thinking_steps=["not in the text at all"])


# ---------------------------------------------------------------------------------- step maps
def test_step_map_is_lower_triangular_and_pools_token_saliency(smol, ex):
    batch, steps, f = ex
    M = f.arrays["M"]
    S = len(steps)
    assert M.shape == (smol.n_layers, S, S) and f.params["steps"] == [s["text"] for s in steps]
    assert torch.equal(M.triu(1), torch.zeros_like(M))  # causal: a step never draws on a later one
    assert (M.diagonal(dim1=1, dim2=2) > 0).all()
    # M^l[a, b] = mean_{i∈a, j∈b} I^l[i, j], with I the head-mean |A ⊙ ∂L/∂A|
    from attribution.saliency import saliency
    I = saliency(smol, batch, head_reduce="mean_abs", layers=[5]).arrays["I"][0]
    for a in range(S):
        for b in range(S):
            want = I[steps[a]["tokens"]][:, steps[b]["tokens"]].mean()
            assert abs(M[5, a, b] - want) <= 1e-9 + 1e-5 * want
    m = f.metrics
    assert m["n_thinking"] == 3 and m["n_summary"] == 2
    assert m["final_heat_anomaly"] == pytest.approx(m["final_block_intensity"] / m["analysis_block_intensity"])
    assert 0 < m["shallow_lock_in"] <= 1 and m["deep_decay"] > 0
    print({k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in m.items()})


def test_analysis_contract_inputs_and_explain(smol, ex):
    """Built-in inputs are EXAMPLES[0]; a dict and the old positional call give the same maps; one sentence."""
    _, steps, f = ex
    e = EXAMPLES[0]
    assert torch.equal(step_saliency(smol).arrays["M"], f.arrays["M"])
    assert torch.equal(step_saliency(smol, e["question"], e["thinking"], e["summary"]).arrays["M"], f.arrays["M"])
    assert f.analysis == "attribution.step_saliency" and interp.analysis.get(f.analysis).exports_spec
    text = f.explain()
    print(text)
    m = f.metrics
    assert f"{100 * m['shallow_lock_in']:.0f} %" in text and f"{m['deep_decay']:.2f}" in text and text.endswith(".")
    with pytest.raises(interp.InterpError, match="lack"):
        step_saliency(smol, {"question": "q"})
    with pytest.raises(interp.InterpError, match="each a string"):
        step_saliency(smol, "only a question")


# ---------------------------------------------------------------------------------- OEB
def test_oeb_puts_tau_b_on_the_bridge_and_keeps_other_mass(smol, short):
    batch = short
    l, T, r = 3, batch.input_ids.shape[1], batch.roles[0]
    site = f"blocks.{l}.attn.pattern"
    base = interp.capture(smol, batch, sites=site)[site][0]
    B = torch.zeros(T, dtype=torch.bool)
    B[r["think"]] = True
    S = torch.zeros(T, dtype=torch.bool)
    S[r["summary"]] = True
    vis = torch.ones(T, T, dtype=torch.bool).tril()  # query t sees keys ≤ t
    nB, nS = (vis & B).sum(1).float(), (vis & S).sum(1).float()
    pB, pS = (base * B).sum(-1), (base * S).sum(-1)
    for tau_max in (0.15, 0.6):
        s = spec(smol, {"op": "attn.oeb", "layers": [l], "queries": "all", "segment": "role:summary",
                        "bridge": "role:think", "tau_max": tau_max})
        with interp.patch(smol, s):
            got = interp.capture(smol, batch, sites=site)[site][0]
        tau_b = torch.sqrt(nB / (nB + nS).clamp_min(1)).clamp(max=tau_max)  # [T], the same for every head
        active = (pB < tau_b) & (pB > 0) & (pS > 0) & (pB + pS - tau_b > 0)
        err_b = ((got * B).sum(-1) - tau_b)[active].abs().max().item()
        err_o = ((got * ~(B | S)).sum(-1) - (base * ~(B | S)).sum(-1)).abs().max().item()
        print(f"tau_max={tau_max}: {int(active.sum())} active rows, |p'(B) - tau_B| max {err_b:.3g}, "
              f"|dp(O)| max {err_o:.3g}")
        assert active.sum() >= 5
        assert err_b <= 1e-5 and err_o <= 1e-5
        assert torch.equal(got[~active], base[~active])  # rows where OEB is inactive are untouched


def test_neutral_oeb_and_smi_are_exact_noops(smol, short):
    batch = short
    with smol.engine.using(ForceEager()):  # the eager path, which OEB runs on
        eager = interp.capture(smol, batch, sites="logits")["logits"]
    sdpa = interp.capture(smol, batch, sites="logits")["logits"]
    oeb = spec(smol, {"op": "attn.oeb", "layers": "all", "queries": "all", "segment": "role:summary",
                      "bridge": "role:think", "tau_max": 0.0})
    with interp.patch(smol, oeb):
        assert torch.equal(interp.capture(smol, batch, sites="logits")["logits"], eager)
    smi = spec(smol, {"op": "attn.smi", "layers": "all", "queries": "all", "source": "role:question", "scale": 0.0})
    with interp.patch(smol, smi):
        assert torch.equal(interp.capture(smol, batch, sites="logits")["logits"], sdpa)


# ---------------------------------------------------------------------------------- SMI
def test_smi_adds_scaled_mean_value_by_hand(smol, short):
    batch = short
    l, heads, s, T = 25, [0, 4], 0.5, batch.input_ids.shape[1]
    H, kv, d = smol.n_heads, smol.n_kv_heads, smol.head_dim
    rows, src = [10, T - 1], batch.roles[0]["step1"]
    tr = interp.capture(smol, batch, sites=[f"blocks.{l}.resid_pre", f"blocks.{l}.attn.z"])
    with torch.no_grad():  # V by hand: v_proj of the normed residual, kv heads repeated for the query heads
        x = smol.adapter.layers[l].input_layernorm(tr[f"blocks.{l}.resid_pre"])
        v = smol.adapter.attn[l].v_proj(x).view(1, T, kv, d).repeat_interleave(H // kv, dim=2)  # [1, T, H, d]
    want = tr[f"blocks.{l}.attn.z"].clone()
    for t in rows:
        for h in heads:
            want[0, t, h] += s * v[0, src, h].mean(0)
    e = {"op": "attn.smi", "layers": [l], "heads": heads, "queries": rows, "source": "role:step1", "scale": s}
    with interp.patch(smol, spec(smol, e)):
        got = interp.capture(smol, batch, sites=f"blocks.{l}.attn.z")[f"blocks.{l}.attn.z"]
    assert (got - want).abs().max() <= 1e-5
    assert (got - tr[f"blocks.{l}.attn.z"]).abs().max() > 1e-3  # the edit did something


# ---------------------------------------------------------------------------------- replay
class _LastRow:
    """Test-only probe after the spec: the edited attention of the last query row at each call."""

    def __init__(self, layers):
        self.layers, self.rows = layers, []

    def needs(self, layer):
        return {"weights"} if layer in self.layers else set()

    def on_weights(self, layer, w, call):
        self.rows.append((call.k_len, w[0, :, -1].detach().clone()))


def test_specs_from_a_finding_replay_during_generation(smol, ex):
    batch, _, f = ex
    n_hooks = len(smol.engine.hooks)
    plain = smol.generate(batch, max_new_tokens=3)
    base = interp.capture(smol, batch, sites="logits")["logits"]
    oeb, smi = f.to_spec(model=smol, method="oeb"), f.to_spec(model=smol, method="smi")
    assert oeb.edits[0]["layers"] == list(range(8)) and smi.edits[0]["layers"] == list(range(22, 30))
    for s in (oeb, smi):
        s = interp.Spec.from_json(s.to_json())  # what replays is the JSON document
        probe = _LastRow(oeb.edits[0]["layers"])
        with interp.patch(smol, s), smol.engine.using(probe):
            out = smol.generate(batch, max_new_tokens=3)
        print(s.edits[0]["op"], repr(plain[0]), "->", repr(out[0]))
        assert isinstance(out[0], str) and len(probe.rows) == 3 * 8  # prefill + 2 decoding steps, 8 layers
        if s.edits[0]["op"] == "attn.oeb":  # wherever the projection is feasible, the bridge holds at least τ_B
            r, T = batch.roles[0], batch.input_ids.shape[1]
            n_tau = 0
            for k_len, w in probe.rows:
                B = torch.zeros(k_len, dtype=torch.bool)
                B[r["think"]] = True
                nS = len(r["summary"]) + k_len - T
                tau_b = min((len(r["think"]) / (len(r["think"]) + nS)) ** 0.5, 0.15)
                pB, pO = w[:, B].sum(-1), 1 - w[:, B].sum(-1) - w[:, r["summary"] + list(range(T, k_len))].sum(-1)
                feasible = pO < 1 - tau_b - 1e-4
                assert (pB[feasible] >= tau_b - 1e-5).all()
                n_tau += int(((pB - tau_b).abs() <= 1e-5).sum())
            print(f"OEB held the bridge at exactly tau_B in {n_tau} of {len(probe.rows) * smol.n_heads} rows")
            assert n_tau > 0
    # leaving the patch restored the model
    assert len(smol.engine.hooks) == n_hooks
    assert smol.generate(batch, max_new_tokens=3) == plain
    assert torch.equal(interp.capture(smol, batch, sites="logits")["logits"], base)


def test_bad_oeb_specs_are_refused(smol):
    with pytest.raises(interp.InterpError, match="tau_max"):
        spec(smol, {"op": "attn.oeb", "layers": [0], "segment": "all", "bridge": "0", "tau_max": 2.0})
    with pytest.raises(interp.InterpError, match="bridge"):
        spec(smol, {"op": "attn.oeb", "layers": [0], "segment": "all"})
    with pytest.raises(interp.InterpError, match="source"):
        spec(smol, {"op": "attn.smi", "layers": [0], "scale": 0.1})
