"""probes.routes: every edge importance against a brute-force computation from the HF weights and HF's own
attention weights; the parts of every residual update sum to HF's hidden states; the knockout spec of a route
is causal on SmolLM2; refusals."""
from __future__ import annotations

import random

import pytest
import torch

import interp
from conftest import load_testbed_model, random_ids, tiny_hf
from probes.routes import routes


def _prox(y: torch.Tensor, parts: list[torch.Tensor]) -> list[float]:
    p = [max(float(y.abs().sum() - (y - c).abs().sum()), 0.0) for c in parts]
    s = sum(p)
    return [x / s for x in p]


def _brute(hf, ids: torch.Tensor, lm=None, **inputs):
    """Per-part importances computed with plain torch from HF weights and HF eager output_attentions (``lm``: the
    decoder stack, for a VLM; ``inputs``: what else the forward takes, e.g. pixel_values)."""
    hf.set_attn_implementation("eager")
    lm = lm if lm is not None else hf.model
    with torch.no_grad():
        out = hf(input_ids=ids, output_attentions=True, output_hidden_states=True, **inputs)
        cfg = hf.config.get_text_config()
        H, hd = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        rep = H // cfg.num_key_value_heads
        x = out.hidden_states[0][0].double()
        T = x.shape[0]
        head, attn_resid, mlp, mlp_resid = {}, {}, {}, {}
        for l, layer in enumerate(lm.layers):
            A = out.attentions[l][0].double()  # [H, T, T], HF's own
            a = layer.self_attn
            v = (layer.input_layernorm(x.float()).double() @ a.v_proj.weight.double().T).reshape(T, -1, hd)
            WO = a.o_proj.weight.double()  # [d, H*hd]
            mid = x.clone()
            rows = {}
            for i in range(T):
                parts = [x[i]]
                for h in range(H):
                    for j in range(T):
                        c = A[h, i, j] * (v[j, h // rep] @ WO[:, h * hd:(h + 1) * hd].T)
                        parts.append(c)
                mid[i] = torch.stack(parts).sum(0)
                rows[i] = parts
            for i in range(T):
                imp = _prox(mid[i], rows[i])
                attn_resid[l, i] = imp[0]
                for h in range(H):
                    for j in range(T):
                        head[l, i, h, j] = imp[1 + h * T + j]
            m = layer.mlp(layer.post_attention_layernorm(mid.float())).double()
            post = mid + m
            if l + 1 < len(lm.layers):  # the decomposition is exact: HF's own next hidden state
                torch.testing.assert_close(post, out.hidden_states[l + 1][0].double(), atol=1e-5, rtol=1e-5)
            else:
                torch.testing.assert_close(lm.norm(post.float()), out.hidden_states[-1][0], atol=1e-5, rtol=1e-5)
            for i in range(T):
                mlp_resid[l, i], mlp[l, i] = _prox(post[i], [mid[i], m[i]])
            x = post
    return head, attn_resid, mlp, mlp_resid, H, T, torch.stack([a[0] for a in out.attentions])


def test_every_importance_equals_brute_force_on_tiny_llama():
    ids = random_ids(8)
    model = interp.load(tiny_hf("llama"), name="tiny-llama")
    f = routes(model, ids, tau=0.04)
    head, attn_resid, mlp, mlp_resid, H, T, pattern = _brute(tiny_hf("llama"), ids)
    torch.testing.assert_close(f.arrays["pattern"], pattern, atol=1e-5, rtol=1e-5)  # HF's own weights
    L = 3
    got = f.arrays
    for (l, i, h, j), w in head.items():
        assert abs(float(got["head"][l, i, h, j]) - w) < 1e-5, (l, i, h, j)
    for (l, i), w in attn_resid.items():
        assert abs(float(got["attn_resid"][l, i]) - w) < 1e-5
        assert abs(float(got["mlp"][l, i]) - mlp[l, i]) < 1e-5
        assert abs(float(got["mlp_resid"][l, i]) - mlp_resid[l, i]) < 1e-5
    assert f.metrics["parts_error"] < 1e-6
    # the route: every edge above tau into a reached node, top-down from the last token, and nothing else
    want, post = set(), {T - 1}
    for l in range(L - 1, -1, -1):
        mid = set()
        for i in post:
            for kind, w in (("resid", mlp_resid[l, i]), ("mlp", mlp[l, i])):
                if w > 0.04:
                    want.add((l, "mlp", kind, -1, i, i)), mid.add(i)
        pre = set()
        for i in mid:
            if attn_resid[l, i] > 0.04:
                want.add((l, "attn", "resid", -1, i, i)), pre.add(i)
            for h in range(H):
                for j in range(T):
                    if head[l, i, h, j] > 0.04:
                        want.add((l, "attn", "head", h, j, i)), pre.add(j)
        post = pre
    have = {(int(r.layer), r.stage, r.kind, int(r.head), int(r.source), int(r.target)) for r in f.table.itertuples()}
    assert have == want and any(k[2] == "head" for k in want)
    for r in f.table.itertuples():
        resid = {"attn": attn_resid, "mlp": mlp_resid}[r.stage]
        w = (head[r.layer, r.target, r.head, r.source] if r.kind == "head"
             else resid[r.layer, r.target] if r.kind == "resid" else mlp[r.layer, r.target])
        assert abs(r.importance - w) < 1e-5
    assert f.explain().startswith("The route into token 7 keeps")


def test_combined_heads_sum_per_head_importances():
    model = interp.load(tiny_hf("llama"), name="tiny-llama")
    f = routes(model, random_ids(8), tau=0.0, combine_heads=True)
    t = f.table[f.table.kind == "attn"]
    assert len(t) > 0 and (t["head"] == -1).all()
    for r in t.itertuples():
        assert abs(r.importance - float(f.arrays["head"][r.layer, r.target, :, r.source].sum())) < 1e-5


def test_refusals_leave_the_model_unchanged():
    model = interp.load(tiny_hf("llama"), name="tiny-llama")
    ids = random_ids(8)
    before = model.logits(model.encode(ids))
    for kw in ({"tau": 1.5}, {"position": 8}):
        with pytest.raises(interp.InterpError):
            routes(model, ids, **kw)
    with pytest.raises(interp.InterpError, match="one input at a time"):
        routes(model, random_ids(8, b=2))
    f = routes(model, ids, tau=0.99)
    with pytest.raises(interp.InterpError, match="no attention edge"):
        f.to_spec(model=model)
    with pytest.raises(interp.InterpError, match="mode"):
        routes(model, ids).to_spec(model=model, mode="both")
    gemma = interp.load(tiny_hf("gemma3"), name="tiny-gemma3")
    with pytest.raises(interp.InterpError, match="normalises sublayer outputs"):
        routes(gemma, ids)
    assert torch.equal(model.logits(model.encode(ids)), before)
    assert not any(m._forward_hooks for m in model.hf.modules())


def test_cutting_the_route_hurts_more_than_cutting_random_edges(smol):
    for prompt in ["The capital of France is", "The Eiffel Tower is in the city of"]:
        f = routes(smol, prompt, tau=0.04)
        cut, rand = _drop_vs_random(smol, smol.encode(prompt), f)
        assert cut > max(rand), (prompt, cut, rand)


def _drop_vs_random(model, batch, f, seeds: int = 3) -> tuple[float, list[float]]:
    """p(answer) drop when the route's head edges are cut, and when as many random head edges are cut."""
    def p(spec=None):
        if spec is None:
            return model.answer_logits(batch)[0].float().softmax(-1)
        with interp.patch(model, spec):
            return model.answer_logits(batch)[0].float().softmax(-1)
    p0 = p()
    ans = int(p0.argmax())
    edges = f.table[f.table.kind == "head"]
    route = set(zip(edges.layer, edges["head"], edges.target, edges.source))
    T = f.metrics["n_tokens"]
    others = [(l, h, i, j) for l in range(model.n_layers) for h in range(model.n_heads) for i in range(T)
              for j in range(i + 1) if (l, h, i, j) not in route]
    rng = random.Random(0)
    drops = []
    for _ in range(seeds):
        spec = interp.Spec.for_model(model, [interp.ops.knockout([l], [i], [j], heads=[h])
                                             for l, h, i, j in rng.sample(others, len(route))])
        drops.append(float(p0[ans] - p(spec)[ans]))
    return float(p0[ans] - p(f.to_spec(model=model, mode="cut"))[ans]), drops


def test_vlm_routes_carry_the_image_into_the_answer():
    from interp import vlm
    from interp.testbed.items import default_items
    model = load_testbed_model("llava_ar")[0]
    f = routes(model)  # the testbed's first item
    batch = vlm.encode_vqa(model, default_items(model)[:1])
    img = set(batch.roles[0]["image"])
    assert f.metrics["n_image_tokens"] == len(img) == 64 and f.metrics["parts_error"] < 1e-5
    t = f.table[(f.table.kind == "head") & f.table.source.isin(img) & ~f.table.target.isin(img)]
    assert len(t) > 0
    by_layer = f.metrics["image_to_text_by_layer"]
    for l in range(model.n_layers):
        assert abs(by_layer[l] - t[t.layer == l].importance.sum()) < 1e-3
    cut, rand = _drop_vs_random(model, batch, f)
    assert cut > max(rand), (cut, rand)


def test_diffusion_is_refused():
    model = load_testbed_model("llada_diffusion")[0]
    with pytest.raises(interp.InterpError, match="per denoising step"):
        routes(model)
    from probes.routes import routes_steps
    with pytest.raises(interp.InterpError, match="causally"):
        routes_steps(interp.load(tiny_hf("llama"), name="tiny-llama"), random_ids(6), gen_len=2)


def test_specs_block_exactly_the_route_or_its_complement():
    model = interp.load(tiny_hf("llama"), name="tiny-llama")
    ids = random_ids(8)
    f = routes(model, ids, tau=0.04)
    heads = f.table[f.table.kind == "head"]
    sites = [f"blocks.{l}.attn.pattern" for l in range(model.n_layers)]
    with interp.patch(model, f.to_spec(model=model, mode="cut")):
        tr = interp.capture(model, ids, sites=sites + [f"blocks.{l}.attn.z" for l in range(model.n_layers)])
    n_full = 0
    for (l, h, i), g in heads.groupby(["layer", "head", "target"]):
        if len(g) == i + 1:  # every key of the row is on the route: the head's output there is removed
            assert float(tr[f"blocks.{l}.attn.z"][0, i, h].abs().max()) == 0
            n_full += 1
        for j in g.source:
            assert len(g) == i + 1 or float(tr[f"blocks.{l}.attn.pattern"][0, h, i, j]) < 1e-6
    assert 0 < n_full < heads.groupby(["layer", "head", "target"]).ngroups  # both cases are exercised
    idx = [torch.tensor(heads[c].tolist()) for c in ("layer", "head", "target", "source")]
    assert float(f.arrays["pattern"][tuple(idx)].min()) > 1e-3  # those edges carried attention before
    with interp.patch(model, f.to_spec(model=model, mode="keep")):
        tr = interp.capture(model, ids, sites=sites)
    for (l, i), g in heads.groupby(["layer", "target"]):
        A = tr[f"blocks.{l}.attn.pattern"][0, :, i, :i + 1]  # [H, keys]
        used = set(g.source)
        for j in range(i + 1):
            assert (float(A[:, j].max()) < 1e-6) == (j not in used), (l, i, j)


def test_figures_draw_every_edge():
    model = interp.load(tiny_hf("llama"), name="tiny-llama")
    f = routes(model, random_ids(8))
    fig = f.plot()
    assert len(fig.axes[0].lines) == len(f.table)  # one line (or MLP marker) per edge
    assert len(f.plot(interactive=True).data) == len(f.table)


def test_diffusion_routes_per_step_equal_brute_force():
    """probes.routes_steps at one denoising step: the input that step saw (answer positions committed at it or
    later masked again) and every importance against the brute force from HF's own eager attention weights."""
    from interp.diffusion import denoise
    from interp.testbed import load_testbed
    from interp.testbed.items import default_items
    from probes.routes import routes_steps, step_inputs
    model = load_testbed_model("llada_diffusion")[0]
    item = default_items(model)[:1]
    f = routes_steps(model, item, only_steps=[1], tau=0.04)
    assert f.metrics["steps_traced"] == [1] and set(f.table.step) == {1}
    # the step's input, rebuilt independently from a fresh decoding
    enc = interp.vlm.encode_vqa(model, item, gen_len=item[0].gen_len)
    G = item[0].gen_len
    P = enc.input_ids.shape[1] - G
    prompt = interp.Batch(enc.input_ids[:, :P], enc.attention_mask[:, :P], [interp.Roles({}, length=P)],
                          [enc.tokens[0][:P]], [], enc.extra)
    d = denoise(model, prompt, gen_len=G, steps=G)
    x = d.tokens.clone()
    x[0, P:][d.step_of[0] >= 1] = model.adapter.mask_token_id
    assert torch.equal(step_inputs(model, prompt, d.tokens, d.step_of, 1).input_ids, x)
    assert int((x[0, P:] == model.adapter.mask_token_id).sum()) == f.metrics["per_step"][0]["n_masked"] > 0
    hf = load_testbed("llada_diffusion")[0]
    head, attn_resid, mlp, mlp_resid, H, T, pattern = _brute(hf, x, lm=hf.model.language_model,
                                                            pixel_values=enc.extra["pixel_values"])
    got = f.arrays["head.step1"]
    for (l, i, h, j), w in head.items():
        assert abs(float(got[l, i, h, j]) - w) < 1e-4, (l, i, h, j)
    assert (pattern[:, :, P, P + 1:] > 0).any()  # bidirectional: a query sees later keys
    # the route's edges are the brute-force importances above tau, into the position that step commits
    start = f.metrics["per_step"][0]["position"]
    assert start == P + int((d.step_of[0] == 1).nonzero()[0])
    for r in f.table.itertuples():
        if r.kind == "head":
            assert abs(r.importance - head[r.layer, r.target, r.head, r.source]) < 1e-4 and r.importance > 0.04
        elif r.kind == "mlp":
            assert abs(r.importance - mlp[r.layer, r.target]) < 1e-4
    assert f.explain().startswith("Over 1 denoising steps")
