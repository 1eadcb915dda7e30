"""AtP / AtP*: the estimates equal first-order terms computed here with plain HF hooks and autograd."""
import pytest
import torch

import interp
from attribution.atp import AttributionPatching, atp
from tests.conftest import random_ids, tiny_hf

ANS, FOIL = 9, 21


def _pair(seed=2, n=7, at=3):
    clean = random_ids(n, seed=seed)
    corrupt = clean.clone()
    corrupt[0, at] = (clean[0, at] + 17) % 128
    return clean, corrupt


def _proj_out(model, ids, module):
    got = {}
    h = module.register_forward_hook(lambda m, a, o: got.__setitem__("x", o.detach().clone()))
    try:
        with torch.no_grad():
            model.hf(input_ids=ids)
    finally:
        h.remove()
    return got["x"]


def _first_order(model, clean, module, delta, sl, t, pre=False):
    """d/dα M(clean with module's input (pre) or output at [t, sl] moved by α·delta) at α = 0, by autograd."""
    alpha = torch.zeros((), requires_grad=True)

    def move(x):
        x = x.clone()
        x[:, t, sl] = x[:, t, sl] + alpha * delta
        return x
    h = (module.register_forward_pre_hook(lambda m, a: (move(a[0]),) + tuple(a[1:])) if pre
         else module.register_forward_hook(lambda m, a, o: move(o)))
    try:
        z = model.hf(input_ids=clean).logits[0, -1]
        (d,) = torch.autograd.grad(z[ANS] - z[FOIL], alpha)
    finally:
        h.remove()
    return float(d)


def _cell(f, node, layer, head, pos, col="atp"):
    t = f.table
    return float(t[(t.node == node) & (t.layer == layer) & (t["head"] == head) & (t.position == pos)][col].iloc[0])


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_atp_equals_the_first_order_term(kind):
    model = interp.load(tiny_hf(kind), name=f"tiny-{kind}")
    clean, corrupt = _pair()
    f = atp(model, {"input_ids": clean}, corrupted={"input_ids": corrupt}, answers=[ANS], foils=[FOIL], graddrop=False)
    hd = model.head_dim
    for layer, head, t in ((0, 1, 3), (1, 2, 5), (2, 0, 6), (2, 3, 4)):
        attn = model.adapter.attn[layer]
        sl = slice(head * hd, (head + 1) * hd)
        # z node: the output projection's input
        zc, zr = (_proj_out_pre(model, ids, attn.o_proj) for ids in (clean, corrupt))
        want = _first_order(model, clean, attn.o_proj, (zr - zc)[0, t, sl], sl, t, pre=True)
        assert _cell(f, "z", layer, head, t) == pytest.approx(want, rel=1e-4, abs=1e-6)
        # query node: q_proj's output (RoPE is linear at a fixed position, so the first-order term is the same)
        qc, qr = (_proj_out(model, ids, attn.q_proj) for ids in (clean, corrupt))
        want = _first_order(model, clean, attn.q_proj, (qr - qc)[0, t, sl], sl, t)
        assert _cell(f, "q", layer, head, t) == pytest.approx(want, rel=1e-3, abs=1e-5)
        # key node of the key/value head that query head serves
        g = head // (model.n_heads // model.n_kv_heads)
        kc, kr = (_proj_out(model, ids, attn.k_proj) for ids in (clean, corrupt))
        ks = slice(g * hd, (g + 1) * hd)
        want = _first_order(model, clean, attn.k_proj, (kr - kc)[0, t, ks], ks, t)
        assert _cell(f, "k", layer, g, t) == pytest.approx(want, rel=1e-3, abs=1e-5)
    # nodes before the corrupted token do not move (up to the rounding of eager vs SDPA attention)
    t = f.table
    assert (t[(t.position < 3)].atp.abs() < 1e-8).all() and (t[(t.position == 3)].atp.abs() > 1e-6).any()


def _proj_out_pre(model, ids, module):
    got = {}
    h = module.register_forward_pre_hook(lambda m, a: got.__setitem__("x", a[0].detach().clone()))
    try:
        with torch.no_grad():
            model.hf(input_ids=ids)
    finally:
        h.remove()
    return got["x"]


def test_qk_fix_is_the_exact_softmax_of_the_patched_row():
    """AtP*'s query / key terms: (softmax of the row with corrupted q or k) − A, times ∂M/∂A — with q and k rebuilt
    here from q_proj / k_proj and HF's own rotary embedding, and ∂M/∂A from a pattern capture."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    model = interp.load(tiny_hf("llama"), name="tiny-llama")
    clean, corrupt = _pair(seed=4)
    f = atp(model, {"input_ids": clean}, corrupted={"input_ids": corrupt}, answers=[ANS], foils=[FOIL], graddrop=False)
    layer, T, hd, rep = 1, 7, model.head_dim, model.n_heads // model.n_kv_heads
    attn = model.adapter.attn[layer]
    tr = interp.capture(model, {"input_ids": clean}, sites=f"blocks.{layer}.attn.pattern", grad=True)
    z = tr.output.logits[0, -1]
    (z[ANS] - z[FOIL]).backward()
    A, G = tr[f"blocks.{layer}.attn.pattern"][0].detach().double(), tr.grad(f"blocks.{layer}.attn.pattern")[0].double()
    cos_sin = {}
    h = attn.register_forward_pre_hook(lambda m, a, k: cos_sin.__setitem__("cs", k["position_embeddings"]),
                                       with_kwargs=True)
    try:
        qc, qr = (_proj_out(model, ids, attn.q_proj) for ids in (clean, corrupt))
        kc, kr = (_proj_out(model, ids, attn.k_proj) for ids in (clean, corrupt))
    finally:
        h.remove()
    cos, sin = cos_sin["cs"]

    def rope(q, k):
        q = q.view(1, T, -1, hd).transpose(1, 2)
        k = k.view(1, T, -1, hd).transpose(1, 2)
        return apply_rotary_pos_emb(q, k, cos, sin)
    Qc, Kc = (x[0].double() for x in rope(qc, kc))
    Qr, Kr = (x[0].double() for x in rope(qr, kr))
    scale = hd ** -0.5
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for head, t in ((0, 3), (2, 5), (3, 6)):
        K = Kc[head // rep]
        s = torch.where(mask[t], Qr[head, t] @ K.T * scale, -torch.inf)
        want = float(((torch.softmax(s, -1) - A[head, t]) * G[head, t]).sum())
        assert _cell(f, "q", layer, head, t, "qk_fix") == pytest.approx(want, rel=1e-4, abs=1e-7)
    for g, s_ in ((0, 3), (1, 3), (1, 5)):
        want = 0.0
        for head in range(g * rep, (g + 1) * rep):
            K = Kc[g].clone()
            K[s_] = Kr[g, s_]
            for t in range(s_, T):
                logit = torch.where(mask[t], Qc[head, t] @ K.T * scale, -torch.inf)
                want += float(((torch.softmax(logit, -1) - A[head, t]) * G[head, t]).sum())
        assert _cell(f, "k", layer, g, s_, "qk_fix") == pytest.approx(want, rel=1e-4, abs=1e-7)


def test_graddrop_and_model_restored():
    model = interp.load(tiny_hf("gpt2"), name="tiny-gpt2")
    clean, corrupt = _pair(seed=6)
    before = model.logits({"input_ids": clean})
    f = atp(model, {"input_ids": clean}, corrupted={"input_ids": corrupt}, answers=[ANS], foils=[FOIL])
    t = f.table
    L = model.n_layers
    # last layer: no later layer to drop, so each of the L − 1 terms is the plain |AtP|: AtP* = |AtP|
    last = t[(t.node == "z") & (t.layer == L - 1)]
    assert torch.allclose(torch.tensor(last.atp_star.values), torch.tensor(last.atp.abs().values), rtol=1e-5, atol=1e-9)
    # layer 0 reaches the metric through every later layer: dropping them changes its estimate (a mask that
    # left every node at plain AtP made AtP* a constant multiple of |AtP| everywhere)
    first = t[(t.node == "z") & (t.layer == 0)]
    ratio = torch.tensor(first.atp_star.values) / torch.tensor(first.atp.abs().values).clamp_min(1e-12)
    assert float(ratio.max() - ratio.min()) > 1e-3
    assert (t.atp_star >= 0).all() and f.metrics["backward_passes"] == 1 + L
    assert all(p.grad is None for p in model.hf.parameters())  # the backward passes stop at the captured sites
    assert torch.equal(model.logits({"input_ids": clean}), before)
    with pytest.raises(interp.InterpError, match="foil equals"):
        atp(model, {"input_ids": clean}, corrupted={"input_ids": corrupt}, answers=[ANS], foils=[ANS])
    assert torch.equal(model.logits({"input_ids": clean}), before)
    assert AttributionPatching().explain(f).startswith("By attribution patching")
    import viz  # noqa: F401
    assert f.plot() is not None and f.plot(interactive=True) is not None
