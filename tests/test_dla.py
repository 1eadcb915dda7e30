"""Direct logit attribution: components sum to the model's own logit; per-head terms equal a manual
computation from plain HF forward hooks (o_proj / c_proj input) and the final norm's formula."""
import pytest
import torch

import interp
from probes.dla import DirectLogitAttribution, dla
from tests.conftest import random_ids, tiny_hf


@torch.no_grad()
def _reference(model, ids, layer, head, target, foil=None):
    """(HF logit or logit difference at the last token, the head's direct effect computed by hand)."""
    ad, hf = model.adapter, model.hf
    attn = ad.attn[layer]
    proj = attn.o_proj if hasattr(attn, "o_proj") else attn.c_proj
    seen = {}
    h1 = proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("z", a[0].detach()))
    h2 = ad.final_norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("h", a[0].detach()))
    try:
        with torch.no_grad():
            logits = hf(input_ids=ids).logits[0, -1].double()
    finally:
        h1.remove(), h2.remove()
    hd = model.head_dim
    z = seen["z"][0, -1, head * hd:(head + 1) * hd].double()
    if isinstance(proj, torch.nn.Linear):
        out = proj.weight[:, head * hd:(head + 1) * hd].double() @ z  # Linear: x Wᵀ
    else:
        out = z @ proj.weight[head * hd:(head + 1) * hd].double()  # GPT-2 Conv1D: x W
    h = seen["h"][0, -1].double()
    norm = ad.final_norm
    WU = ad.unembed.weight.double()
    w = WU[target] - (WU[foil] if foil is not None else 0)
    if isinstance(norm, torch.nn.LayerNorm):
        s = 1 / torch.sqrt(h.var(unbiased=False) + norm.eps)
        manual = s * ((out - out.mean()) * norm.weight.double()) @ w
    else:
        s = 1 / torch.sqrt(h.pow(2).mean() + norm.variance_epsilon)
        manual = s * (out * norm.weight.double()) @ w
    value = logits[target] - (logits[foil] if foil is not None else 0)
    return float(value), float(manual)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2"])
def test_tiny_models_sum_and_per_head(kind):
    model = interp.load(tiny_hf(kind), name=f"tiny-{kind}")
    ids = random_ids(10, seed=3)
    f = dla(model, {"input_ids": ids}, target=7, foil=11)
    value, manual = _reference(model, ids, 1, 2, 7, 11)
    t = f.table
    total = t.score.sum()
    assert abs(total - value) <= 1e-4 * max(1.0, abs(value))
    assert f.metrics["value"] == pytest.approx(value, rel=1e-5, abs=1e-5)
    got = float(t[(t.kind == "head") & (t.layer == 1) & (t["head"] == 2)].score.iloc[0])
    assert got == pytest.approx(manual, rel=1e-4, abs=1e-6)
    assert len(t[t.kind == "head"]) == model.n_layers * model.n_heads
    assert f.arrays["heads"].shape == (model.n_layers, model.n_heads)


def test_tiny_gpt2_neurons_sum_to_their_mlp():
    model = interp.load(tiny_hf("gpt2"), name="tiny-gpt2")
    ids = random_ids(8, seed=1)
    f = dla(model, {"input_ids": ids}, target=5, neurons=True)
    t = f.table
    ad = model.adapter
    seen = {}
    hooks = [ad.mlp[2].c_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("a", a[0].detach())),
             ad.final_norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("h", a[0].detach()))]
    try:
        with torch.no_grad():
            model.hf(input_ids=ids)
    finally:
        [h.remove() for h in hooks]
    h, w = seen["h"][0, -1].double(), ad.unembed.weight[5].detach().double()
    s = 1 / torch.sqrt(h.var(unbiased=False) + ad.final_norm.eps)
    readout = lambda v: float(s * ((v - v.mean()) * ad.final_norm.weight.detach().double()) @ w)  # noqa: E731
    W = ad.mlp[2].c_proj.weight.double()  # Conv1D [d_mlp, d]: neuron n writes a_n W[n]
    a = seen["a"][0, -1].double()
    neur = t[(t.kind == "neuron") & (t.layer == 2)].sort_values("neuron")
    for n in (0, 17, 100):
        assert float(neur.score.iloc[n]) == pytest.approx(readout(a[n] * W[n]), rel=1e-4, abs=1e-7)
    mlp = float(t[(t.kind == "mlp") & (t.layer == 2)].score.iloc[0])
    bias = readout(ad.mlp[2].c_proj.bias.double())
    assert neur.score.sum() + bias == pytest.approx(mlp, rel=1e-4, abs=1e-6)
    assert len(t[t.kind == "neuron"]) == model.n_layers * W.shape[0]
    value, _ = _reference(model, ids, 0, 0, 5)
    assert t[t.kind != "neuron"].score.sum() == pytest.approx(value, rel=1e-4, abs=1e-5)


def test_smollm2_sum_and_per_head(smol):
    prompt = "The capital of France is"
    ids = smol.encode(prompt).input_ids
    paris = smol.tokenizer.encode(" Paris", add_special_tokens=False)[0]
    rome = smol.tokenizer.encode(" Rome", add_special_tokens=False)[0]
    f = dla(smol, prompt, target=" Paris", foil=" Rome")
    t = f.table
    layer, head = 23, 4
    value, manual = _reference(smol, ids, layer, head, paris, rome)
    assert abs(t.score.sum() - value) <= 1e-4 * abs(value)
    got = float(t[(t.kind == "head") & (t.layer == layer) & (t["head"] == head)].score.iloc[0])
    assert got == pytest.approx(manual, rel=1e-4, abs=1e-5)
    print(f.explain())
    # SmolLM2 has no biases: rows are the embedding, 30 x 9 heads, 30 MLPs and one (zero) bias row
    assert len(t) == 1 + 30 * 9 + 30 + 1 and float(t[t.kind == "bias"].score.iloc[0]) == 0.0
    # plain logit, default target = the model's top-1 (" Paris")
    g = dla(smol, prompt)
    assert g.metrics["target"] == [" Paris"] and g.metrics["max_rel_error"] <= 1e-4


def test_default_inputs_and_spec(smol):
    f = dla(smol)  # the built-in facts, their answers as targets
    assert f.metrics["n_prompts"] == 8 and f.metrics["max_rel_error"] <= 1e-4
    spec = f.to_spec(model=smol, k=3)
    heads = [(l, h) for e in spec.edits for l in e["layers"] for h in e["heads"]]
    top = f.table[f.table.kind == "head"].nlargest(3, "score")
    assert sorted(heads) == sorted(zip(top.layer, top["head"]))
    assert all(e["op"] == "attn.head_scale" and e["factor"] == 0.0 for e in spec.edits)
    assert DirectLogitAttribution().explain(f).startswith("The ")
    import viz  # noqa: F401
    assert f.plot() is not None and f.plot(interactive=True) is not None


def test_bad_inputs_are_refused_and_leave_the_model_unchanged():
    model = interp.load(tiny_hf("llama"), name="tiny-llama")
    ids = random_ids(6)
    before = model.logits({"input_ids": ids})
    with pytest.raises(interp.InterpError, match="foil equals"):
        dla(model, {"input_ids": ids}, target=5, foil=5)
    with pytest.raises(interp.InterpError, match="one per prompt"):
        dla(model, {"input_ids": ids}, target=[5, 6])
    assert torch.equal(model.logits({"input_ids": ids}), before)
    gemma = interp.load(tiny_hf("gemma3"), name="tiny-gemma3")  # post-norms: not a sum of sublayer outputs
    before = gemma.logits({"input_ids": ids})
    with pytest.raises(interp.InterpError, match="normalises sublayer outputs"):
        dla(gemma, {"input_ids": ids}, target=5)
    assert torch.equal(gemma.logits({"input_ids": ids}), before)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])  # nn.Linear ([out, in]) and GPT-2's Conv1D ([in, out])
def test_adapter_projections_rebuild_the_sublayer_outputs(kind):
    """adapter.out_proj: attn.out = Σ_h z_h W_O[h] + b_O; adapter.down_proj: mlp.out = Σ_n a_n W_down[n] + b, with
    z and the neurons a read by hooks on the projection modules themselves and the outputs from their forward."""
    model = interp.load(tiny_hf(kind), name=f"tiny-{kind}")
    attn, mlp = model.adapter.attn[1], model.adapter.mlp[1]
    o = attn.o_proj if kind == "llama" else attn.c_proj
    d = mlp.down_proj if kind == "llama" else mlp.c_proj
    seen = {}
    hs = [m.register_forward_hook(lambda m, a, out, k=k: seen.__setitem__(k, (a[0].detach(), out.detach())))
          for k, m in (("o", o), ("d", d))]
    try:
        with torch.no_grad():
            model.hf(input_ids=random_ids(7))
    finally:
        for h in hs:
            h.remove()
    WO, bO = model.adapter.out_proj(1)
    assert WO.shape == (model.n_heads, model.head_dim, model.d_model) and (bO is None) == (kind == "llama")
    z, out = seen["o"]
    got = torch.einsum("bthd,hdm->btm", z.unflatten(-1, (model.n_heads, -1)), WO) + (0 if bO is None else bO)
    assert (got - out).abs().max() <= 1e-5
    mod, Wd, bd = model.adapter.down_proj(1)
    a, out = seen["d"]
    assert mod is d and Wd.shape == (a.shape[-1], model.d_model)
    assert ((a @ Wd + (0 if bd is None else bd)) - out).abs().max() <= 1e-5
    saved, model.adapter.mlp_out[1] = model.adapter.mlp_out[1], None  # a family without one is refused clearly
    try:
        with pytest.raises(interp.InterpError, match="no down projection in layer 1"):
            model.adapter.down_proj(1)
    finally:
        model.adapter.mlp_out[1] = saved
