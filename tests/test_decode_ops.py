"""Decoding-level ops (decode.cfg: PAI's CFG step; decode.sla: VISTA's SLA), VISTA's steering op (resid.vsv), and the
analyses that export them (probes.pai, probes.vista), each against a reference written here: two explicit forwards
for CFG, a manual logit lens for SLA, the closed form of VSV as a Python hook, HF eager attentions for PAI's share.
"""
import copy
import math

import pytest
import torch

import interp
import probes  # noqa: F401 (registers the analyses)
from interp import InterpError, Spec, ops, vlm
from probes import pai as pai_mod
from probes import vista as vista_mod
from tests.conftest import load_testbed_model, random_ids, tiny_hf


@pytest.fixture(scope="module")
def tb():
    m, tok, meta = load_testbed_model("llava_ar")
    from interp.testbed.items import default_items
    items = default_items(m, 2)[:4]
    return m, items, vlm.encode_vqa(m, items)


@pytest.fixture(scope="module")
def llama():
    return interp.load(tiny_hf("llama", seed=3), name="tiny-llama")


def _no_image_hooks(m, batch):
    """Python hooks that remove the image keys from every attention row of every layer (zero, renormalise): the
    "no image" forward written independently of attn.knockout."""
    img = torch.zeros(batch.input_ids.shape[1], dtype=torch.bool)
    img[batch.roles[0]["image"]] = True
    assert all(r["image"] == batch.roles[0]["image"] for r in batch.roles)

    def fn(w):
        w = w.clone()
        w[..., img[:w.shape[-1]]] = 0
        return w / w.sum(-1, keepdim=True)
    return {f"blocks.{l}.attn.pattern": fn for l in range(m.n_layers)}


# ------------------------------------------------------------------------------------------ CFG
@pytest.mark.parametrize("gamma,cutoff", [(2.0, 0.1), (1.1, 0.0), (0.5, 0.3)])
def test_cfg_equals_closed_form_from_two_forwards(tb, gamma, cutoff):
    m, items, b = tb
    with_img = m.answer_logits(b).double()
    with interp.patch(m, hooks=_no_image_hooks(m, b)), m.engine.running(b):
        no_img = m.answer_logits(b).double()
    assert (with_img - no_img).abs().max() > 1.0  # the image matters on the testbed
    lp, l0 = torch.log_softmax(with_img, -1), torch.log_softmax(no_img, -1)
    keep = lp >= math.log(cutoff) + lp.max(-1, keepdim=True).values if cutoff > 0 else torch.ones_like(lp, dtype=bool)
    want = gamma * (lp - l0) + l0
    got = m.answer_logits(b, Spec.for_model(m, [ops.cfg(gamma, cutoff=cutoff)])).double()
    assert (got[keep] - want[keep]).abs().max() <= 1e-4
    assert bool((got[~keep] == interp.ops.BLOCK).all())
    if cutoff > 0:
        assert int((~keep).sum()) > 0


def test_cfg_knockout_layers_and_keys_select_the_reference_pass(tb):
    """A knockout of no key (keys 'none') makes the reference pass the plain forward: ℓ' = ℓ on the support."""
    m, items, b = tb
    lp = torch.log_softmax(m.answer_logits(b).double(), -1)
    got = m.answer_logits(b, Spec.for_model(m, [ops.cfg(3.0, keys="none", cutoff=0.0)])).double()
    assert (got - lp).abs().max() <= 1e-5
    one = m.answer_logits(b, Spec.for_model(m, [ops.cfg(3.0, layers=[2], cutoff=0.0)]))
    every = m.answer_logits(b, Spec.for_model(m, [ops.cfg(3.0, cutoff=0.0)]))
    assert (one - every).abs().max() > 1e-3


def test_cfg_cached_generation_equals_recompute(tb):
    m, items, b = tb
    one = vlm.slice_batch(b, 0, 1)
    s = Spec.for_model(m, [ops.cfg(1.5, cutoff=0.0)])
    with torch.no_grad(), interp.patch(m, s), m.engine.running(one):
        out = m.hf.generate(**one.model_inputs(), max_new_tokens=3, do_sample=False, output_logits=True,
                            return_dict_in_generate=True, pad_token_id=0)
        n = one.input_ids.shape[1]
        for i, step in enumerate(out.logits):
            seq = out.sequences[:, :n + i]
            full = m.hf(input_ids=seq, pixel_values=one.extra["pixel_values"], use_cache=False).logits[:, -1]
            assert (step - full).abs().max() <= 1e-4


# ------------------------------------------------------------------------------------------ SLA
def test_sla_equals_manual_logit_lens(llama):
    ids = random_ids(10, b=2, seed=4)
    window, alpha = [0, 1], 0.3
    tr = interp.capture(llama, ids, sites=[f"blocks.{l}.resid_post" for l in window])
    hf = llama.hf
    with torch.no_grad():
        lens = [hf.lm_head(hf.model.norm(tr[f"blocks.{l}.resid_post"])) for l in window]
        base = hf(input_ids=ids).logits
    want = (1 - alpha) * base.double() + alpha * torch.stack(lens).double().mean(0)
    got = llama.logits(ids, Spec.for_model(llama, [ops.sla(window, alpha)]))
    assert (got.double() - want).abs().max() <= 1e-5
    # the last layer's lens is the model's logits: SLA over it alone changes nothing (up to rounding)
    last = llama.logits(ids, Spec.for_model(llama, [ops.sla([2], 0.7)]))
    assert (last - base).abs().max() <= 1e-5


def test_sla_on_the_testbed_and_in_cached_generation(tb, llama):
    m, items, b = tb
    tr = interp.capture(m, b, sites=["blocks.0.resid_post"])
    pos = torch.tensor([r["query"][0] for r in b.roles])
    h = tr["blocks.0.resid_post"][torch.arange(len(b)), pos]
    lm = m.hf
    with torch.no_grad():
        lens0 = lm.lm_head(lm.model.language_model.norm(h)).double()
    base = m.answer_logits(b).double()
    got = m.answer_logits(b, Spec.for_model(m, [ops.sla([0], 0.4)])).double()
    assert (got - (0.6 * base + 0.4 * lens0)).abs().max() <= 1e-5
    ids = random_ids(6, seed=9)
    s = Spec.for_model(llama, [ops.sla([0, 1], 0.5)])
    with torch.no_grad(), interp.patch(llama, s):
        out = llama.hf.generate(input_ids=ids, max_new_tokens=4, do_sample=False, output_logits=True,
                                return_dict_in_generate=True, pad_token_id=0)
        for i, step in enumerate(out.logits):
            full = llama.hf(input_ids=out.sequences[:, :6 + i], use_cache=False).logits[:, -1]
            assert (step - full).abs().max() <= 1e-5


# ------------------------------------------------------------------------------------------ VSV
def _vsv_ref(lam, v):
    v = v.double() / v.double().norm()

    def fn(x):
        x64 = x.double()
        n = x64.norm(dim=-1, keepdim=True)
        xn = x64 / n
        cos = (xn @ (-v))[..., None]
        y = xn + lam * (1 + torch.clamp(cos, min=0)) * v
        return (n * y / y.norm(dim=-1, keepdim=True)).to(x.dtype)
    return fn


def test_vsv_equals_closed_form(llama):
    ids = random_ids(8, b=2, seed=5)
    v = torch.randn(2, llama.d_model, generator=torch.Generator().manual_seed(0))
    lam = 0.4
    want = llama.logits(ids)  # the hooks path below must differ from this
    with interp.patch(llama, hooks={"blocks.0.mlp.out": _vsv_ref(lam, v[0]), "blocks.2.mlp.out": _vsv_ref(lam, v[1])}):
        want = llama.logits(ids)
    got = llama.logits(ids, Spec.for_model(llama, [ops.vsv([0, 2], v, lam)]))
    assert (got - want).abs().max() <= 1e-5
    assert (got - llama.logits(ids)).abs().max() > 1e-3
    # the norm of the MLP output is kept, and only the selected positions move
    tr0 = interp.capture(llama, ids, sites=["blocks.1.mlp.out"])
    with interp.patch(llama, Spec.for_model(llama, [ops.vsv([1], v[0], 2.0, positions="last")])):
        tr1 = interp.capture(llama, ids, sites=["blocks.1.mlp.out"])
    a, c = tr0["blocks.1.mlp.out"], tr1["blocks.1.mlp.out"]
    assert torch.equal(a[:, :-1], c[:, :-1])
    assert (a[:, -1].norm(dim=-1) - c[:, -1].norm(dim=-1)).abs().max() <= 1e-4 * a[:, -1].norm(dim=-1).max()
    assert (a[:, -1] - c[:, -1]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------ neutral, JSON, errors
def test_neutral_values_are_bit_identical_noops(tb, llama):
    m, items, b = tb
    base = m.answer_logits(b)
    v = torch.randn(m.n_layers, m.d_model)
    for e in [ops.cfg(1.0), ops.sla([0, 1], 0.0), ops.vsv("all", v, 0.0)]:
        assert torch.equal(m.answer_logits(b, Spec.for_model(m, [e])), base), e["op"]
    ids = random_ids(7, seed=1)
    base = llama.logits(ids)
    for e in [ops.cfg(1.0, keys=[1, 2]), ops.sla("all", 0.0), ops.vsv("all", torch.randn(3, llama.d_model), 0.0)]:
        assert torch.equal(llama.logits(ids, Spec.for_model(llama, [e])), base), e["op"]


def test_analyses_export_specs_that_replay_from_json(tb, tmp_path):
    m, items, b = tb
    fv = vista_mod.vista(m, items)
    fp = pai_mod.pai(m, items)
    for spec in (fv.to_spec(model=m), fv.to_spec(model=m, parts=("vsv",), layers=[1, 2]), fp.to_spec(model=m)):
        want = m.answer_logits(b, spec)
        back = Spec.load(spec.save(tmp_path / f"{len(spec.edits)}-{spec.edits[-1]['op']}.json"))
        assert back.to_json() == spec.to_json()
        assert torch.equal(m.answer_logits(b, back), want)
        assert (want - m.answer_logits(b)).abs().max() > 1e-4
    assert (tmp_path / "2-resid.vsv.safetensors").exists()


def test_vista_finding_against_references(tb):
    m, items, b = tb
    f = vista_mod.vista(m, items, width=1)
    L, N = m.n_layers, len(items)
    y = vlm.answer_ids(m, items)
    p_last = torch.softmax(m.answer_logits(b), -1)[torch.arange(N), y]
    assert abs(f.table.p_answer.iloc[L - 1] - float(p_last.mean())) <= 1e-5
    means = f.table.p_answer.tolist()
    assert f.metrics["window"] == [max(range(L - 1), key=lambda l: means[l])]  # width 1: the best layer before the last
    # VSV: with and without the image, at the query, PC1 + mean
    pos = vista_mod.query_states(m, b)
    with interp.patch(m, hooks=_no_image_hooks(m, b)), m.engine.running(b):
        neg = vista_mod.query_states(m, b)
    d = (pos - neg).double()
    for l in range(L):
        mu = d[:, l].mean(0)
        _, _, vh = torch.linalg.svd(d[:, l] - mu)
        pc = vh[0] * torch.sign(vh[0] @ mu)
        assert (f.arrays["vsv"][l].double() - (pc + mu)).abs().max() <= 1e-3 * mu.abs().max()


def test_steering_vectors_recover_a_planted_direction():
    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(16, generator=g), dim=0)
    mu = 3 * torch.randn(16, generator=g)
    coef = torch.randn(50, generator=g) * 5
    d = (mu + coef[:, None] * u + 0.01 * torch.randn(50, 16, generator=g))[:, None]  # [N, 1, 16]
    v, share = vista_mod.steering_vectors(d)
    pc = v[0].double() - d[:, 0].double().mean(0)
    assert abs(abs(float(pc @ u.double())) - 1) <= 1e-3 and float(pc @ mu.double()) >= 0
    assert float(share[0]) > 0.99


def test_pai_share_equals_hf_eager_attentions(tb):
    m, items, b = tb
    f = pai_mod.pai(m, items, rule="paper", start=1)
    eager = copy.deepcopy(m.hf)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        att = eager(**b.model_inputs(), output_attentions=True).attentions  # L × [b, h, T, T]
    pos = torch.tensor([r["query"][0] for r in b.roles])
    img = torch.tensor(b.roles[0]["image"])
    want = torch.stack([a[torch.arange(len(b)), :, pos][..., img].sum(-1).mean() for a in att])
    assert (torch.tensor(f.metrics["image_share"]) - want).abs().max() <= 1e-4
    assert f.metrics["layers"] == list(range(1, m.n_layers))
    low = pai_mod.pai(m, items, start=0)
    sh = want[0:].tolist()
    assert low.metrics["layers"] == [l for l in range(m.n_layers) if sh[l] <= sum(sh) / len(sh) + 1e-6]
    s = low.to_spec(model=m, gamma=1.0)
    assert [e["op"] for e in s.edits] == ["attn.amplify", "decode.cfg"]


def test_bad_input_is_refused(tb, llama):
    m, items, b = tb
    with pytest.raises(InterpError, match="width"):
        vista_mod.vista(m, items, width=3)
    with pytest.raises(InterpError, match="rule"):
        pai_mod.pai(m, items, rule="high")
    with pytest.raises(InterpError, match="zero vector"):
        Spec.for_model(llama, [ops.vsv([0], torch.zeros(llama.d_model), 0.2)])
    with pytest.raises(InterpError, match="cutoff"):
        Spec.for_model(llama, [ops.cfg(1.1, cutoff=2.0)])
    with pytest.raises(InterpError, match="alpha"):
        Spec.for_model(llama, [ops.sla([0], 1.5)])
    with pytest.raises(InterpError, match="heads"):
        Spec.for_model(llama, [{"op": "decode.sla", "layers": [0], "heads": [1], "alpha": 0.2}])
    with pytest.raises(InterpError, match="parts"):
        vista_mod.vista.to_spec(vista_mod.vista(m, items[:2]), m, parts=("cfg",))


def test_two_specs_compose_and_the_reference_pass_runs_no_decoding_edit(tb):
    """SLA in one spec, CFG in another: CFG reads the SLA-mixed logits, and its no-image pass is the plain one."""
    m, items, b = tb
    sla = Spec.for_model(m, [ops.sla([0], 0.5)])
    cfg = Spec.for_model(m, [ops.cfg(2.0, cutoff=0.0)])
    mixed = m.answer_logits(b, sla).double()
    with interp.patch(m, hooks=_no_image_hooks(m, b)), m.engine.running(b):
        no_img = m.answer_logits(b).double()
    lp, l0 = torch.log_softmax(mixed, -1), torch.log_softmax(no_img, -1)
    with interp.patch(m, sla, cfg):
        got = m.answer_logits(b).double()
    assert (got - (2.0 * (lp - l0) + l0)).abs().max() <= 1e-4
