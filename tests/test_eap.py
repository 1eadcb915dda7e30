"""attribution.eap: every edge score equals the first-order term d/dα M(the edge's input moved by α·Δa_u) at α = 0,
computed here with plain HF hooks and autograd; the exact circuit evaluation gives the clean metric for the full
graph, the all-nodes mean-ablated metric (by hand) for the empty one, and the closed form for one missing edge."""
import pytest
import torch

import interp
from attribution.eap import EdgeAttributionPatching, Graph, circuit_metric, eap, mean_outputs
from tests.conftest import random_ids, tiny_hf

ANS, FOIL = 9, 21


@pytest.fixture(scope="module")
def setup():
    model = interp.load(tiny_hf("llama"), name="tiny-llama")
    clean = random_ids(7, seed=2)
    corrupt = clean.clone()
    corrupt[0, 3] = (clean[0, 3] + 17) % 128
    f = eap(model, {"input_ids": clean}, corrupted={"input_ids": corrupt}, answers=[ANS], foils=[FOIL],
            ks=[0, 5, 20])
    return model, clean, corrupt, f


@torch.no_grad()
def _outputs(model, ids):
    """Per node outputs by plain hooks: embed [T, d], heads {(l, h): [T, d]}, mlps {l: [T, d]}."""
    hf, got = model.hf, {}
    hs = [hf.model.embed_tokens.register_forward_hook(lambda m, a, o: got.__setitem__("e", o[0].clone()))]
    for l, layer in enumerate(hf.model.layers):
        hs.append(layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, l=l: got.__setitem__(("z", l), a[0][0].clone())))
        hs.append(layer.mlp.register_forward_hook(lambda m, a, o, l=l: got.__setitem__(("m", l), o[0].clone())))
    try:
        hf(input_ids=ids)
    finally:
        for h in hs:
            h.remove()
    hd, H = model.head_dim, model.n_heads
    heads = {}
    for l, layer in enumerate(hf.model.layers):
        W = layer.self_attn.o_proj.weight  # [d, H·hd]
        for h in range(H):
            heads[l, h] = got["z", l][:, h * hd:(h + 1) * hd] @ W[:, h * hd:(h + 1) * hd].T
    return got["e"], heads, {l: got["m", l] for l in range(model.n_layers)}


def _metric(model, ids, hooks):
    hs = [mod.register_forward_pre_hook(fn) if kind == "pre" else mod.register_forward_hook(fn, with_kwargs=True)
          for kind, mod, fn in hooks]
    try:
        z = model.hf(input_ids=ids, use_cache=False).logits[0, -1]
    finally:
        for h in hs:
            h.remove()
    return z[ANS] - z[FOIL]


def _first_order_at_norm(model, ids, norm, delta):
    """d/dα M with ``norm``'s input moved by α·delta (it feeds only its own branch)."""
    alpha = torch.zeros((), requires_grad=True)
    m = _metric(model, ids, [("pre", norm, lambda mod, a: (a[0] + alpha * delta,))])
    (d,) = torch.autograd.grad(m, alpha)
    return float(d)


def _first_order_one_head(model, ids, l, h, delta):
    """d/dα M with only head (l, h) reading x + α·delta: the attention reruns on the moved input and only head
    h's z is taken from that rerun."""
    layer = model.hf.model.layers[l]
    attn, hd = layer.self_attn, model.head_dim
    alpha = torch.zeros((), requires_grad=True)
    state = {"inner": False}

    def keep_x(mod, a):
        if not state["inner"]:
            state["x"] = a[0]

    def grab_z(mod, a):
        if state["inner"]:
            state["z"] = a[0]
            return None
        if "kw" not in state:
            return None
        state["inner"] = True
        try:
            attn(hidden_states=layer.input_layernorm(state["x"] + alpha * delta), **state["kw"])
        finally:
            state["inner"] = False
        z = a[0].clone()
        z[..., h * hd:(h + 1) * hd] = state["z"][..., h * hd:(h + 1) * hd]
        return (z,)

    def keep_kw(mod, a, kw):
        if not state["inner"]:
            state["kw"] = {k: v for k, v in kw.items() if k != "hidden_states"}

    hs = [layer.input_layernorm.register_forward_pre_hook(keep_x),
          attn.register_forward_pre_hook(keep_kw, with_kwargs=True),
          attn.o_proj.register_forward_pre_hook(grab_z)]
    try:
        z = model.hf(input_ids=ids, use_cache=False).logits[0, -1]
        m = z[ANS] - z[FOIL]
    finally:
        for x in hs:
            x.remove()
    (d,) = torch.autograd.grad(m, alpha)
    return float(d)


def _score(f, src, dst):
    t = f.table
    return float(t[(t.source == src) & (t.target == dst)].score.iloc[0])


def test_scores_equal_the_first_order_terms(setup):
    model, clean, corrupt, f = setup
    e_c, h_c, m_c = _outputs(model, clean)
    e_r, h_r, m_r = _outputs(model, corrupt)
    layers = model.hf.model.layers
    ups = {"embed": e_r - e_c, "a0.h1": h_r[0, 1] - h_c[0, 1], "m0": m_r[0] - m_c[0], "a1.h3": h_r[1, 3] - h_c[1, 3]}
    # into the logits: the final norm's input
    for u in ("embed", "a0.h1", "m0", "a1.h3"):
        want = _first_order_at_norm(model, clean, model.hf.model.norm, ups[u])
        assert _score(f, u, "logits") == pytest.approx(want, rel=1e-4, abs=1e-7), u
    # into an MLP: its norm's input (it feeds the MLP only)
    for u, l in (("embed", 1), ("a0.h1", 0), ("m0", 2), ("a1.h3", 1)):
        want = _first_order_at_norm(model, clean, layers[l].post_attention_layernorm, ups[u])
        assert _score(f, u, f"m{l}") == pytest.approx(want, rel=1e-4, abs=1e-7), (u, l)
    # into one head: only that head reads the moved input; the heads of a layer sum to its norm's input
    for u, l, h in (("embed", 0, 2), ("a0.h1", 1, 0), ("m0", 2, 3), ("a1.h3", 2, 1)):
        want = _first_order_one_head(model, clean, l, h, ups[u])
        assert _score(f, u, f"a{l}.h{h}") == pytest.approx(want, rel=1e-4, abs=1e-7), (u, l, h)
    for u, l in (("embed", 1), ("m0", 2)):
        want = _first_order_at_norm(model, clean, layers[l].input_layernorm, ups[u])
        got = sum(_score(f, u, f"a{l}.h{h}") for h in range(model.n_heads))
        assert got == pytest.approx(want, rel=1e-4, abs=1e-7)
    # no edge from a node into a node that reads before it
    t = f.table
    assert not ((t.source == "a1.h0") & (t.target == "a1.h2")).any() and not ((t.source == "m1") & (t.target == "m1")).any()
    assert ((t.source == "a1.h0") & (t.target == "m1")).any()
    L, H = model.n_layers, model.n_heads
    assert f.metrics["n_edges"] == len(t) == int(Graph(L, H).valid.sum())


def test_full_graph_is_clean_and_empty_graph_is_every_node_mean_ablated(setup):
    model, clean, corrupt, f = setup
    m = f.metrics
    with torch.no_grad():
        m_clean = float(_metric(model, clean, []))
    assert m["metric_full"] == pytest.approx(m_clean, abs=1e-5) and m["faithfulness"][-1] == 1.0
    assert m["faithfulness"][0] == 0.0 and m["ks"][0] == 0
    # by hand: every node replaced by its mean at each position over the reference (the clean and corrupted
    # prompts)
    ref = torch.cat([clean, corrupt])
    outs = [_outputs(model, ref[i:i + 1]) for i in range(2)]
    mean_e = torch.stack([o[0] for o in outs]).mean(0)
    mean_m = {l: torch.stack([o[2][l] for o in outs]).mean(0) for l in range(model.n_layers)}
    hd = model.head_dim
    zs = {}
    for l, layer in enumerate(model.hf.model.layers):
        got = []
        hk = layer.self_attn.o_proj.register_forward_pre_hook(lambda mod, a: got.append(a[0].clone()))
        with torch.no_grad():
            model.hf(input_ids=ref)
        hk.remove()
        zs[l] = got[0].mean(0)
    hooks = [("post", model.hf.model.embed_tokens, lambda mod, a, k, o: mean_e.expand_as(o).clone())]
    assert mean_e.shape == (7, model.d_model)
    for l, layer in enumerate(model.hf.model.layers):
        hooks.append(("pre", layer.self_attn.o_proj, lambda mod, a, l=l: (zs[l].expand_as(a[0]).clone(),)))
        hooks.append(("post", layer.mlp, lambda mod, a, k, o, l=l: mean_m[l].expand_as(o).clone()))
    with torch.no_grad():
        want = float(_metric(model, clean, hooks))
    assert m["metric_empty"] == pytest.approx(want, abs=1e-4)
    assert hd * model.n_heads == zs[0].shape[-1]


def test_one_missing_edge_is_the_closed_form(setup):
    """Only the edge a0.h1 → logits missing: the final norm reads x_final − a + ã, nothing else changes."""
    model, clean, corrupt, f = setup
    L, H, T = model.n_layers, model.n_heads, 7
    g = Graph(L, H)
    batch = model.encode({"input_ids": clean})
    ref = {"input_ids": torch.cat([clean, corrupt])}
    abl = mean_outputs(model, ref, T)
    keep = g.valid.clone()
    u = g.head_up(0, 1)
    keep[u, g.logits_down] = False
    got = circuit_metric(model, batch, keep, abl, g, T, torch.tensor([T - 1]), torch.tensor([ANS]), torch.tensor([FOIL]))
    _, heads, _ = _outputs(model, clean)
    shift = (heads[0, 1] - abl[0, u].float())
    with torch.no_grad():
        want = _metric(model, clean, [("pre", model.hf.model.norm, lambda mod, a: (a[0] - shift,))])
    assert float(got[0]) == pytest.approx(float(want), abs=1e-5)


def test_node_spec_keeps_the_circuit_nodes(setup):
    """k = 0: every head mean-ablated and every MLP at its mean (the embedding kept) — by hand with hooks."""
    model, clean, corrupt, f = setup
    spec = f.to_spec(model=model, k=0, level="nodes")
    assert spec.provenance["params"]["n_heads_kept"] == 0 and spec.provenance["params"]["n_mlps_kept"] == 0
    ops = sorted(e["op"] for e in spec.edits)
    assert ops == ["attn.head_ablate"] * 3 + ["patch"] * 3
    mz = interp.ops.mean_z(model, {"input_ids": torch.cat([clean, corrupt])}, range(model.n_layers))
    tr = interp.capture(model, {"input_ids": torch.cat([clean, corrupt])},
                        sites=[f"blocks.{l}.mlp.out" for l in range(model.n_layers)])
    hooks = {}
    for l in range(model.n_layers):
        hooks[f"blocks.{l}.attn.z"] = lambda z, l=l: mz[l].expand_as(z).clone()
        hooks[f"blocks.{l}.mlp.out"] = lambda o, l=l: tr[f"blocks.{l}.mlp.out"].mean((0, 1)).expand_as(o).clone()
    with interp.patch(model, hooks=hooks):
        want = model.answer_logits({"input_ids": clean})
    torch.testing.assert_close(model.answer_logits({"input_ids": clean}, spec), want, atol=1e-5, rtol=1e-5)
    top = EdgeAttributionPatching.circuit(f, 5)
    assert len(top["edges"]) == 5 and top["edges"][0][0] == f.table.source[0]
    assert "edge attribution patching" in f.explain()


def test_refusals():
    model = interp.load(tiny_hf("llama"), name="tiny-llama")
    a = random_ids(6, seed=1)
    c = a.clone()
    c[0, 2] = (a[0, 2] + 1) % 128
    with pytest.raises(interp.InterpError, match="ablation"):
        eap(model, {"input_ids": a}, corrupted={"input_ids": c}, answers=[5], foils=[6], ablation="zero")
    with pytest.raises(interp.InterpError, match="foil equals"):
        eap(model, {"input_ids": a}, corrupted={"input_ids": c}, answers=[5], foils=[5])
    gemma = interp.load(tiny_hf("gemma3"), name="tiny-gemma3")
    with pytest.raises(interp.InterpError, match="normalises"):
        eap(gemma, {"input_ids": a}, corrupted={"input_ids": c}, answers=[5], foils=[6])
