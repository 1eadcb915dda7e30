"""Activation-patching sweeps: every batched cell equals one manual patch done with plain HF forward hooks."""
import pytest
import torch

import interp
from probes.patching import PatchingSweep, patching
from tests.conftest import random_ids, tiny_hf


def _grab(model, ids, site, layer):
    """The clean activation of one site with a plain hook (input of the block, attention / MLP output, or
    the output projection's input for heads)."""
    ad, got = model.adapter, {}
    if site == "resid_pre":
        h = ad.layers[layer].register_forward_pre_hook(
            lambda m, a, k: got.__setitem__("x", (a[0] if a else k["hidden_states"]).clone()), with_kwargs=True)
    elif site == "heads":
        attn = ad.attn[layer]
        proj = attn.o_proj if hasattr(attn, "o_proj") else attn.c_proj
        h = proj.register_forward_pre_hook(lambda m, a: got.__setitem__("x", a[0].clone()))
    else:
        mod = ad.attn[layer] if site == "attn.out" else ad.mlp[layer]
        h = mod.register_forward_hook(lambda m, a, o: got.__setitem__("x", (o[0] if isinstance(o, tuple) else o).clone()))
    try:
        with torch.no_grad():
            model.hf(input_ids=ids)
    finally:
        h.remove()
    return got["x"]


@torch.no_grad()
def _manual(model, clean, corrupt, site, layer, where, answer, foil):
    """Logit difference at the last token of the corrupted run with one activation taken from the clean run.
    ``where``: a position (residual sites) or a head (patched at every position)."""
    src = _grab(model, clean, site, layer)
    ad = model.adapter

    def put(x):
        x = x.clone()
        if site == "heads":
            hd = model.head_dim
            x[..., where * hd:(where + 1) * hd] = src[..., where * hd:(where + 1) * hd]
        else:
            x[:, where] = src[:, where]
        return x

    if site == "resid_pre":
        def pre(m, a, k):
            if a:
                return (put(a[0]),) + tuple(a[1:]), k
            return a, {**k, "hidden_states": put(k["hidden_states"])}
        h = ad.layers[layer].register_forward_pre_hook(pre, with_kwargs=True)
    elif site == "heads":
        attn = ad.attn[layer]
        proj = attn.o_proj if hasattr(attn, "o_proj") else attn.c_proj
        h = proj.register_forward_pre_hook(lambda m, a: (put(a[0]),) + tuple(a[1:]))
    else:
        mod = ad.attn[layer] if site == "attn.out" else ad.mlp[layer]
        h = mod.register_forward_hook(lambda m, a, o: (put(o[0]),) + tuple(o[1:]) if isinstance(o, tuple) else put(o))
    try:
        z = model.hf(input_ids=corrupt).logits[0, -1].double()
    finally:
        h.remove()
    return float(z[answer] - z[foil])


def _cell(f, site, layer, where):
    t = f.table[f.table.site == site].reset_index(drop=True)
    key = "head" if site == "heads" else "position"
    j = t.index[(t.layer == layer) & (t[key] == where)][0]
    return float(f.arrays[f"metric.{site}"][0, j])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_tiny_sweep_equals_manual_patches(kind):
    model = interp.load(tiny_hf(kind), name=f"tiny-{kind}")
    clean = random_ids(7, seed=2)
    corrupt = clean.clone()
    corrupt[0, 3] = (clean[0, 3] + 17) % 128
    f = patching(model, {"input_ids": clean}, corrupted={"input_ids": corrupt}, answers=[9], foils=[21],
                 batch_size=5)  # cells spread over several forwards, several layers per forward
    L, H, T = model.n_layers, model.n_heads, 7
    assert len(f.table) == 3 * L * T + L * H
    for site in ("resid_pre", "attn.out", "mlp.out"):
        for layer in range(L):
            for p in (2, 3, 6):  # before, at and after the corrupted token
                want = _manual(model, clean, corrupt, site, layer, p, 9, 21)
                assert _cell(f, site, layer, p) == pytest.approx(want, abs=1e-4), (site, layer, p)
    for layer in range(L):
        for h in (0, 3):
            want = _manual(model, clean, corrupt, "heads", layer, h, 9, 21)
            assert _cell(f, "heads", layer, h) == pytest.approx(want, abs=1e-4), (layer, h)
    # positions before the corrupted token are a no-op; the last layer's residual at the last token restores all
    t = f.table
    assert (t[(t.site == "resid_pre") & (t.position < 3)].score == 0).all()
    assert float(t[(t.site == "resid_pre") & (t.layer == 0) & (t.position == 3)].score.iloc[0]) == pytest.approx(1, abs=1e-4)


def test_tiny_kl_prob_noise_and_spec():
    model = interp.load(tiny_hf("qwen2"), name="tiny-qwen2")
    clean = random_ids(6, seed=5)
    corrupt = clean.clone()
    corrupt[0, 2] = (clean[0, 2] + 40) % 128
    kw = dict(inputs={"input_ids": clean}, corrupted={"input_ids": corrupt}, sites=["resid_pre"], answers=[3])
    kl = patching(model, metric="kl", **kw)
    with torch.no_grad():
        pc = model.hf(input_ids=clean).logits[0, -1].double().log_softmax(-1)
        pr = model.hf(input_ids=corrupt).logits[0, -1].double().log_softmax(-1)
    assert kl.metrics["metric_base"] == pytest.approx(float((pc.exp() * (pc - pr)).sum()), rel=1e-5)
    assert kl.metrics["metric_source"] == pytest.approx(0, abs=1e-9)
    t = kl.table
    assert float(t[(t.layer == 0) & (t.position == 2)].score.iloc[0]) == pytest.approx(1, abs=1e-4)
    prob = patching(model, metric="prob", **kw)
    assert prob.metrics["metric_base"] == pytest.approx(float(pr[3].exp()), rel=1e-5)
    noise = patching(model, direction="noise", foils=[4], **{k: v for k, v in kw.items()})
    assert noise.metrics["metric_base"] == pytest.approx(float(pc[3] - pc[4]), abs=1e-4)
    # the exported spec, replayed on the corrupted prompt, gives the top cell's patched metric
    f = patching(model, foils=[4], **kw)
    spec = f.to_spec(model=model, k=1)
    top = f.table.sort_values("score", ascending=False).iloc[0]
    z = model.answer_logits({"input_ids": corrupt}, spec)[0].double()
    assert float(z[3] - z[4]) == pytest.approx(f.metrics["metric_base"] + float(top.delta), abs=1e-4)
    heads_only = patching(model, sites=["heads"], **{k: v for k, v in kw.items() if k != "sites"}, foils=[4])
    spec = heads_only.to_spec(model=model, k=1)
    top = heads_only.table.sort_values("score", ascending=False).iloc[0]
    assert [e["heads"] for e in spec.edits] == [[int(top["head"])]]
    z = model.answer_logits({"input_ids": corrupt}, spec)[0].double()
    assert float(z[3] - z[4]) == pytest.approx(heads_only.metrics["metric_base"] + float(top.delta), abs=1e-4)
    with pytest.raises(interp.InterpError, match="sites"):
        heads_only.to_spec(model=model, sites=["resid_post"])


def test_bad_inputs_are_refused_and_leave_the_model_unchanged():
    model = interp.load(tiny_hf("llama"), name="tiny-llama")
    a, b = random_ids(6, seed=1), random_ids(7, seed=2)
    before = model.logits({"input_ids": a})
    with pytest.raises(interp.InterpError, match="same number of tokens"):
        patching(model, {"input_ids": a}, corrupted={"input_ids": b})
    with pytest.raises(interp.InterpError, match="corrupted"):
        patching(model, {"input_ids": a})
    c = a.clone()
    c[0, 2] = (a[0, 2] + 1) % 128
    with pytest.raises(interp.InterpError, match="foil equals"):
        patching(model, {"input_ids": a}, corrupted={"input_ids": c}, answers=[5], foils=[5])
    with pytest.raises(interp.InterpError, match="unknown site"):
        patching(model, {"input_ids": a}, corrupted={"input_ids": c}, sites=["resid_post"])
    with pytest.raises(interp.InterpError, match="metric"):
        patching(model, {"input_ids": a}, corrupted={"input_ids": c}, metric="accuracy")
    with pytest.raises(interp.InterpError, match="out of range"):
        patching(model, {"input_ids": a}, corrupted={"input_ids": c}, layers=[7])
    assert torch.equal(model.logits({"input_ids": a}), before)


def test_smollm2_small_sweep(smol):
    clean, corrupt = "The capital of France is", "The capital of Italy is"
    tok = smol.tokenizer
    paris, rome = (tok.encode(s, add_special_tokens=False)[0] for s in (" Paris", " Rome"))
    f = patching(smol, clean, corrupted=corrupt, layers=[20], sites=["resid_pre", "attn.out", "heads"],
                 answers=" Paris", foils=" Rome")
    ci, ri = smol.encode(clean).input_ids, smol.encode(corrupt).input_ids
    for site, layer, where in (("resid_pre", 20, 3), ("attn.out", 20, 4)):
        want = _manual(smol, ci, ri, site, layer, where, paris, rome)
        assert _cell(f, site, layer, where) == pytest.approx(want, abs=1e-3), (site, layer, where)
    t = f.table[f.table.site == "heads"]
    for h in t.sort_values("score").iloc[[-1]]["head"].tolist():
        want = _manual(smol, ci, ri, "heads", 20, int(h), paris, rome)
        assert _cell(f, "heads", 20, int(h)) == pytest.approx(want, abs=1e-3)
    assert f.metrics["answers"] == [" Paris"] and f.metrics["foils"] == [" Rome"]
    # the top head cells export as one head-restricted patch spec (France's z in the top heads), which
    # interp.evaluate measures on a next-token task of prompts as long as the source
    spec = f.to_spec(model=smol, k=2, sites=["heads"])
    assert all(e["op"] == "patch" and e["site"] == "attn.z" and len(e["heads"]) >= 1 for e in spec.edits)
    items = [{"kind": "next_token", "prompt": f"The capital of {c} is", "answer": f" {a}"}
             for c, a in (("Italy", "Rome"), ("Spain", "Madrid"), ("France", "Paris"))]
    assert {len(smol.encode(it["prompt"]).input_ids[0]) for it in items} == {len(ci[0])}
    ev = interp.evaluate(smol, spec, interp.tasks.Task("capitals-short", "next_token", items))
    assert ev.metrics["n"] == 3 and -1 <= ev.metrics["delta"] <= 1
    print(ev.explain())
    print(PatchingSweep().explain(f))
    import viz  # noqa: F401
    assert f.plot() is not None and f.plot(interactive=True) is not None


def test_head_restricted_patch_changes_only_those_heads():
    """patch at attn.z with heads: z'_{t,h} = z^{src}_{t,h} for the listed heads at the listed positions, every
    other (head, position) bit-identical; the layer's output is o_proj(z') (closed form, from the weights)."""
    model = interp.load(tiny_hf("llama"), name="tiny-llama")
    a, b = random_ids(6, seed=1), random_ids(6, seed=2)
    site = "blocks.1.attn.z"
    za = interp.capture(model, {"input_ids": a}, sites=[site])[site]
    zb = interp.capture(model, {"input_ids": b}, sites=[site])[site]
    spec = interp.Spec.for_model(model, [interp.ops.patch_site([1], "attn.z", zb, heads=[0, 3], positions=[2, 4])])
    with interp.patch(model, spec):
        tr = interp.capture(model, {"input_ids": a}, sites=[site, "blocks.1.attn.out"])
    z = tr[site]
    want = za.clone()
    for h in (0, 3):
        for t in (2, 4):
            want[0, t, h] = zb[0, t, h]
    assert torch.equal(z, want)
    W = model.adapter.attn[1].o_proj.weight
    torch.testing.assert_close(tr["blocks.1.attn.out"], want.flatten(2) @ W.T, atol=1e-5, rtol=1e-5)
    with pytest.raises(interp.InterpError, match="heads"):
        interp.Spec.for_model(model, [interp.ops.patch_site([1], "mlp.out", torch.zeros(1, 6, 64), heads=[0])])


def test_top_head_cells_export_as_one_spec_and_evaluate():
    """The top-k head cells of a sweep export as one head-restricted patch spec: replayed on the base prompt it
    equals patching those heads by hand; interp.evaluate measures it on a task."""
    model = interp.load(tiny_hf("qwen2"), name="tiny-qwen2")
    clean = random_ids(6, seed=5)
    corrupt = clean.clone()
    corrupt[0, 2] = (clean[0, 2] + 40) % 128
    f = patching(model, {"input_ids": clean}, corrupted={"input_ids": corrupt}, sites=["heads"], answers=[3],
                 foils=[4])
    spec = f.to_spec(model=model, k=3)
    top = f.table.sort_values("score", ascending=False).head(3)
    cells = {(int(r.layer), int(r["head"])) for _, r in top.iterrows()}
    assert {(e["layers"][0], h) for e in spec.edits for h in e["heads"]} == cells
    zc = interp.capture(model, {"input_ids": clean}, sites=[f"blocks.{l}.attn.z" for l in range(3)])
    hooks = {}
    for l in {l for l, _ in cells}:
        def fn(z, l=l):
            z = z.clone()
            for ll, h in cells:
                if ll == l:
                    z[:, :, h] = zc[f"blocks.{l}.attn.z"][:, :, h]
            return z
        hooks[f"blocks.{l}.attn.z"] = fn
    with interp.patch(model, hooks=hooks):
        want = model.answer_logits({"input_ids": corrupt})[0]
    torch.testing.assert_close(model.answer_logits({"input_ids": corrupt}, spec)[0], want, atol=1e-5, rtol=1e-5)
