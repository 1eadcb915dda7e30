"""The edge-level circuit spec (op ``circuit.edges``, attribution.eap's default ``to_spec``): every downstream node
reads resid − Σ_{s→r removed} (out_s − mean_s). Checked against references built here with plain HF hooks: keeping
every edge is a bit-identical no-op, keeping none is the all-nodes mean-ablated forward, one removed edge is the
model with only that receiver's input shifted; the spec round-trips through JSON and replays the finding's curve."""
import pytest
import torch

import interp
from attribution.eap import Graph, eap, reference_means
from interp import Spec
from tests.conftest import random_ids, tiny_hf

ANS, FOIL, T = 9, 21, 7


@pytest.fixture(scope="module")
def llama():
    return interp.load(tiny_hf("llama", seed=3), name="tiny-llama")


@pytest.fixture(scope="module")
def pairs():
    clean = random_ids(T, seed=2)
    corrupt = clean.clone()
    corrupt[0, 3] = (clean[0, 3] + 17) % 128
    return clean, corrupt


@torch.no_grad()
def node_outputs_by_hand(model, ids):
    """[b, U, T, d]: the embedding, each head's z_h W_O^h, each MLP's output, by plain hooks on the HF modules."""
    hf, got = model.hf, {}
    llama = hasattr(hf, "model")
    stack = hf.model if llama else hf.transformer
    blocks = stack.layers if llama else stack.h
    hs = [blocks[0].register_forward_pre_hook(lambda m, a, k: got.__setitem__("e", (a[0] if a else k["hidden_states"]).clone()),
                                              with_kwargs=True)]
    for l, b in enumerate(blocks):
        proj = b.self_attn.o_proj if llama else b.attn.c_proj
        hs.append(proj.register_forward_pre_hook(lambda m, a, l=l: got.__setitem__(("z", l), a[0].clone())))
        hs.append(b.mlp.register_forward_hook(lambda m, a, o, l=l: got.__setitem__(("m", l), o.clone())))
    try:
        hf(input_ids=ids)
    finally:
        for h in hs:
            h.remove()
    H, hd = model.n_heads, model.head_dim
    outs = [got["e"]]
    for l, b in enumerate(blocks):
        W = b.self_attn.o_proj.weight.T if llama else b.attn.c_proj.weight  # [H·hd, d]
        for h in range(H):
            outs.append(got["z", l][..., h * hd:(h + 1) * hd] @ W[h * hd:(h + 1) * hd])
        outs.append(got["m", l])
    return torch.stack(outs, 1).double()


def means_by_hand(model, ref):
    """ã [U, T + 1, d]: per-position means over the reference rows, then the mean over every token."""
    A = node_outputs_by_hand(model, ref)  # [n, U, T, d]
    return torch.cat([A.mean(0), A.mean((0, 2))[:, None]], 1)


def run_with(model, ids, hooks):
    hs = [mod.register_forward_pre_hook(fn) if kind == "pre" else mod.register_forward_hook(fn) for kind, mod, fn in hooks]
    try:
        with torch.no_grad():
            return model.hf(input_ids=ids, use_cache=False).logits
    finally:
        for h in hs:
            h.remove()


def spec_of(model, keep, means):
    return Spec.for_model(model, [interp.ops.circuit_edges(keep, means.float())])


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2"])
def test_keeping_every_edge_is_a_bit_identical_noop(kind):
    m = interp.load(tiny_hf(kind, seed=1), name=f"tiny-{kind}")
    ids = random_ids(9, seed=4)
    g = Graph(m.n_layers, m.n_heads)
    means = torch.randn(len(g.up), 4, m.d_model)
    base = m.logits({"input_ids": ids})
    every = g.pairs(g.valid)  # the explicit list: the op runs, and touches no node's input
    assert len(every) == int(g.valid.sum())
    assert torch.equal(m.logits({"input_ids": ids}, spec_of(m, every, means)), base)
    assert torch.equal(m.logits({"input_ids": ids}, spec_of(m, "all", means)), base)  # neutral: not even hooked


def test_keeping_no_edge_is_every_node_mean_ablated(llama, pairs):
    clean, corrupt = pairs
    ref = torch.cat([clean, corrupt])
    means = means_by_hand(llama, ref)
    torch.testing.assert_close(reference_means(llama, {"input_ids": ref})[0], means, atol=1e-5, rtol=1e-5)
    # by hand: the embedding, every head's z and every MLP's output replaced by their per-position means
    hf, H, hd = llama.hf, llama.n_heads, llama.head_dim
    mz = {}
    for l, b in enumerate(hf.model.layers):
        got = []
        hk = b.self_attn.o_proj.register_forward_pre_hook(lambda mod, a: got.append(a[0].clone()))
        with torch.no_grad():
            hf(input_ids=ref)
        hk.remove()
        mz[l] = got[0].mean(0)
    hooks = [("post", hf.model.embed_tokens, lambda mod, a, o: means[0, :T].float().expand_as(o).clone())]
    for l, b in enumerate(hf.model.layers):
        hooks.append(("pre", b.self_attn.o_proj, lambda mod, a, l=l: (mz[l].expand_as(a[0]).clone(),)))
        hooks.append(("post", b.mlp, lambda mod, a, o, l=l: means[1 + l * (H + 1) + H, :T].float().expand_as(o).clone()))
    want = run_with(llama, clean, hooks)
    got = llama.logits({"input_ids": clean}, spec_of(llama, [], means))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - llama.logits({"input_ids": clean})).abs().max() > 0.1  # the ablation does something
    assert hd * H == mz[0].shape[-1]


def _shifted_head_input(model, l, h, shift):
    """Hooks under which only head (l, h) reads resid − shift: layer l's attention reruns on the shifted input and
    head h's z is taken from that rerun (the other heads keep theirs)."""
    layer = model.hf.model.layers[l]
    attn, hd = layer.self_attn, model.head_dim
    st = {"inner": False}

    def keep_x(mod, a):
        if not st["inner"]:
            st["x"] = a[0]

    def keep_kw(mod, a, kw):
        if not st["inner"]:
            st["kw"] = {k: v for k, v in kw.items() if k != "hidden_states"}

    def swap_z(mod, a):
        if st["inner"]:
            st["z"] = a[0]
            return None
        st["inner"] = True
        try:
            attn(hidden_states=layer.input_layernorm(st["x"] - shift), **st["kw"])
        finally:
            st["inner"] = False
        z = a[0].clone()
        z[..., h * hd:(h + 1) * hd] = st["z"][..., h * hd:(h + 1) * hd]
        return (z,)

    return [layer.input_layernorm.register_forward_pre_hook(keep_x),
            attn.register_forward_pre_hook(keep_kw, with_kwargs=True),
            attn.o_proj.register_forward_pre_hook(swap_z)]


@pytest.mark.parametrize("edge", [("a0.h1", "a2.h3"), ("embed", "a1.h0"), ("m0", "m2"), ("a1.h2", "logits")])
def test_one_removed_edge_shifts_only_its_receiver(llama, pairs, edge):
    clean, corrupt = pairs
    means = means_by_hand(llama, torch.cat([clean, corrupt]))
    g = Graph(llama.n_layers, llama.n_heads)
    s, r = edge
    u = g.up_index[s]
    shift = (node_outputs_by_hand(llama, clean)[0, u] - means[u, :T]).float()  # out_s − mean_s, [T, d]
    keep = g.valid.clone()
    keep[u, g.down_index[r]] = False
    got = llama.logits({"input_ids": clean}, spec_of(llama, g.pairs(keep), means))
    layers = llama.hf.model.layers
    if r == "logits":
        hs = [llama.hf.model.norm.register_forward_pre_hook(lambda mod, a: (a[0] - shift,))]
    elif r.startswith("m"):
        hs = [layers[int(r[1:])].post_attention_layernorm.register_forward_pre_hook(lambda mod, a: (a[0] - shift,))]
    else:
        l, h = int(r[1:r.index(".")]), int(r.split(".h")[1])
        hs = _shifted_head_input(llama, l, h, shift)
    try:
        with torch.no_grad():
            want = llama.hf(input_ids=clean, use_cache=False).logits
    finally:
        for x in hs:
            x.remove()
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert (want - llama.logits({"input_ids": clean})).abs().max() > 1e-4  # the edge matters


@pytest.fixture(scope="module")
def finding(llama, pairs):
    clean, corrupt = pairs
    return eap(llama, {"input_ids": clean}, corrupted={"input_ids": corrupt}, answers=[ANS], foils=[FOIL],
               ks=[0, 5, 40])


def _metric(model, ids, *specs):
    z = model.logits({"input_ids": ids}, *specs)[0, -1]
    return float(z[ANS] - z[FOIL])


def test_finding_faithfulness_equals_the_replayed_spec(llama, pairs, finding):
    clean, _ = pairs
    m = finding.metrics
    for k in (5, 40):
        spec = finding.to_spec(model=llama, k=k)
        assert [e["op"] for e in spec.edits] == ["circuit.edges"] and len(spec.edits[0]["keep"]) == k
        assert sorted(spec.edits[0]["keep"]) == sorted([r.source, r.target] for r in finding.table.head(k).itertuples())
        with interp.patch(llama, spec):
            mk = _metric(llama, clean)
        f = (mk - m["metric_empty"]) / (m["metric_full"] - m["metric_empty"])
        i = m["ks"].index(k)
        assert mk == pytest.approx(m["curve"][i], abs=1e-6)
        assert f == pytest.approx(m["faithfulness"][i], abs=1e-6)
        assert spec.provenance["params"]["faithfulness"] == m["faithfulness"][i]
    assert _metric(llama, clean, finding.to_spec(model=llama, k=0)) == pytest.approx(m["metric_empty"], abs=1e-6)
    full = finding.to_spec(model=llama, k=m["n_edges"])
    assert full.edits[0]["keep"] == "all"
    assert torch.equal(llama.logits({"input_ids": clean}, full), llama.logits({"input_ids": clean}))


def test_spec_round_trips_through_json_and_refuses_other_models(llama, pairs, finding, tmp_path):
    clean, _ = pairs
    spec = finding.to_spec(model=llama, k=5)
    assert spec.model["name"] == "tiny-llama" and spec.provenance["params"]["level"] == "edges"
    path = spec.save(tmp_path / "circuit.json")
    back = Spec.load(path)
    assert back.to_json() == spec.to_json()
    assert set(back.tensors) == set(spec.tensors) and all(torch.equal(back.tensors[k], spec.tensors[k]) for k in spec.tensors)
    assert torch.equal(llama.logits({"input_ids": clean}, back), llama.logits({"input_ids": clean}, spec))
    other = interp.load(tiny_hf("qwen2"), name="tiny-qwen2")
    with pytest.raises(interp.InterpError, match="written for tiny-llama"):
        interp.patch(other, back)
    with pytest.raises(interp.InterpError, match="computed on tiny-llama"):
        finding.to_spec(model=other, k=5)
    # a node name that does not exist, a pair that is no edge, a tensor of the wrong shape
    t = spec.tensors
    name = spec.edits[0]["tensor"]
    bad = [{"op": "circuit.edges", "layers": "all", "keep": [["a0.h9", "logits"]], "tensor": name},
           {"op": "circuit.edges", "layers": "all", "keep": [["m2", "a1.h0"]], "tensor": name},
           {"op": "circuit.edges", "layers": "all", "keep": [["mlp0", "logits"]], "tensor": name},
           {"op": "circuit.edges", "layers": [0], "keep": "all", "tensor": name}]
    for e, msg in zip(bad, ["no source node 'a0.h9'", "no edge", "no source node", "layers"]):
        with pytest.raises(interp.InterpError, match=msg):
            Spec.for_model(llama, [e], tensors=t)
    with pytest.raises(interp.InterpError, match="sources"):
        Spec.for_model(llama, [{"op": "circuit.edges", "layers": "all", "keep": [], "tensor": "x"}],
                       tensors={"x": torch.zeros(5, 3, llama.d_model)})


def test_node_level_export_and_refusals(llama, pairs, finding):
    clean, _ = pairs
    nodes = finding.to_spec(model=llama, k=5, level="nodes")
    assert {e["op"] for e in nodes.edits} <= {"attn.head_ablate", "patch"}
    assert nodes.provenance["params"]["level"] == "nodes"
    with pytest.raises(interp.InterpError, match="level"):
        finding.to_spec(model=llama, k=5, level="heads")
    spec = finding.to_spec(model=llama, k=5)
    with interp.patch(llama, spec), torch.no_grad():  # a whole sequence with a fresh cache (as HF runs by default)
        cached = llama.hf(input_ids=clean, use_cache=True).logits
    torch.testing.assert_close(cached, llama.logits({"input_ids": clean}, spec), atol=1e-6, rtol=1e-6)
    with pytest.raises(interp.InterpError, match="KV cache"):
        with interp.patch(llama, finding.to_spec(model=llama, k=5)):
            llama.hf.generate(input_ids=clean, max_new_tokens=2, do_sample=False, pad_token_id=0)
    gemma = interp.load(tiny_hf("gemma3"), name="tiny-gemma3")
    g = Graph(gemma.n_layers, gemma.n_heads)
    with pytest.raises(interp.InterpError, match="normalises"):
        Spec.for_model(gemma, [interp.ops.circuit_edges([], torch.zeros(len(g.up), 2, gemma.d_model))])
