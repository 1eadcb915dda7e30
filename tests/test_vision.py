"""Vision probes and vision specs on both trained testbeds, checked against HF eager outputs and by-hand math."""
import copy

import pytest
import torch

import interp
from tests.conftest import load_testbed_model
from interp.testbed import CHECKPOINT_DIR, load_testbed
from interp.testbed.items import answer_ids, as_vqa_items, encode_items, score_vqa, vqa_items
from interp.testbed.localize import localisation_items, pointing_game, target_masks
from interp.tasks import Task, bootstrap_ci
from probes import image_attention as ia
from probes import visual_sinks as vs
from probes import vhd as vhd_mod
from probes.knockout import knockout

torch.set_num_threads(1)
pytestmark = pytest.mark.skipif(not (CHECKPOINT_DIR / "llada_diffusion" / "model.safetensors").exists(),
                                reason="testbed checkpoints are not committed")
NAMES = ["llava_ar", "llada_diffusion"]


@pytest.fixture(scope="module", params=NAMES)
def tb(request):
    hf, tok, meta = load_testbed(request.param)
    ref = copy.deepcopy(hf)
    ref.set_attn_implementation("eager")
    return interp.load(hf, tokenizer=tok, name=request.param), ref, meta


@pytest.fixture(scope="module")
def ar():
    return load_testbed_model("llava_ar")[0]


def _hf(ref, batch):
    with torch.no_grad():
        return ref(**batch.model_inputs(), output_attentions=True, output_hidden_states=True)


def test_encode_items_roles(tb):
    m, _, meta = tb
    items = localisation_items(6, seed=2)
    b = encode_items(m, items)
    tok = m.tokenizer
    for (scene, q), r, ids in zip(items, b.roles, b.input_ids):
        assert tok.decode(ids[r["question"]]) == q.text
        assert [p - 1 for p in r["object"]] == list(scene.objects[q.obj].patches)
        objs = {p for o in scene.objects for p in o.patches}
        assert len(r["background"]) == len(r["object"]) and not {p - 1 for p in r["background"]} & objs
        assert (ids[r["image"]] == meta["image_token_id"]).all()
        qtok = tok.convert_ids_to_tokens(int(ids[r["query"][0]]))
        assert qtok == (":" if meta["kind"] == "ar" else "<mask>")


def test_knockout_object_vs_background(ar):
    items = localisation_items(64, seed=4)  # held-out scenes, ≥ 200 questions about one object
    b = encode_items(ar, items)
    edges = [("role:object", "role:question"), ("role:background", "role:question"), ("none", "role:question")]
    f = knockout(ar, inputs=b, edges=edges, window=1, layers=[0], answers=answer_ids(ar, items).tolist(),
                 progress=False)
    assert f.metrics["n_items"] >= 200
    d = f.arrays["per_item"][:, :, 0]  # [n, edge]
    assert (d[:, 2] == 0).all()  # knocking out nothing changes nothing
    mean, lo, hi = bootstrap_ci((d[:, 0] - d[:, 1]).tolist())
    assert hi < 0 and mean < -2  # object patches carry the answer, background patches do not
    # per-item explicit index selectors (a tuple, one list per item) give the same numbers as the roles
    objs = tuple(r["object"] for r in b.roles[:8])
    one = interp.vlm.slice_batch(b, 0, 8)
    g = knockout(ar, inputs=one, source=objs, target="role:question", window=1, layers=[0], progress=False)
    assert torch.allclose(g.arrays["per_item"][:, 0], d[:8, 0], atol=1e-4)
    # by hand for item 0: an explicit index spec on the single prompt
    r0 = b.roles[0]
    single = interp.vlm.slice_batch(b, 0, 1)
    spec = interp.Spec.for_model(ar, [{"op": "attn.knockout", "layers": [0], "queries": r0["question"],
                                       "keys": r0["object"]}])
    with torch.no_grad():
        p0 = torch.softmax(ar.hf(**single.model_inputs()).logits[0, -1], -1)
        with interp.patch(ar, spec):
            p1 = torch.softmax(ar.hf(**single.model_inputs()).logits[0, -1], -1)
    y = int(p0.argmax())
    assert abs(float((p1[y] - p0[y]) / p0[y] * 100) - float(d[0, 0])) < 1e-3


def test_image_attention_maps_equal_hf_and_scores(tb):
    m, ref, meta = tb
    items = localisation_items(12, seed=9)
    b = encode_items(m, items)
    maps = ia.attention_maps(m, b, chunk=16)  # two chunks
    out = _hf(ref, b)
    q = torch.tensor([r["query"][0] for r in b.roles])
    for l in range(m.n_layers):
        rows = out.attentions[l][torch.arange(len(q)), :, q]  # [N, H, T]
        assert (maps[:, l] - rows[:, :, 1:65]).abs().max() <= 1e-5
    f = ia.image_attention(m, as_vqa_items(items), occlusion=False, n_boot=200)
    masks = target_masks(items)
    for l in range(m.n_layers):
        by_hand = pointing_game(out.attentions[l][torch.arange(len(q)), :, q][:, :, 1:65].mean(1), masks).mean()
        row = f.table[(f.table.layer == l) & (f.table["head"] == -1)].iloc[0]
        assert abs(row.pointing - float(by_hand)) < 1e-6
    # the last layer's head-mean map points at the question's object far above chance (|target|/64 ≈ 0.06)
    assert f.metrics["layer_pointing"][-1] > 0.5 > f.metrics["references"]["random"]["pointing"]


def test_visual_sinks_by_hand(tb):
    m, ref, meta = tb
    items = localisation_items(8, seed=1)
    b = encode_items(m, items)
    out = _hf(ref, b)
    mid = m.n_layers // 2
    x = out.hidden_states[mid][:, 0].float()
    xn = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    dims = xn.abs().median(0).values.topk(2).indices.tolist()
    f = vs.visual_sinks(m, as_vqa_items(items))
    assert f.params["dims"] == dims and abs(f.params["tau"] - 20 * (m.d_model / 4096) ** 0.5) < 1e-9
    q = torch.tensor([r["query"][0] for r in b.roles])
    for l in range(m.n_layers):
        h = out.hidden_states[l].float()
        phi = (h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))[..., dims].abs().amax(-1)
        real = b.attention_mask.bool()
        assert torch.allclose(f.arrays["phi"][:, l][real], phi[real], atol=1e-4)
        a = out.attentions[l][torch.arange(len(q)), :, q]  # [N, H, T]
        vsink = (phi > f.params["tau"])[:, None, 1:65]
        mass = a[..., 1:65].sum(-1)
        r = (a[..., 1:65] * vsink).sum(-1) / mass
        assert torch.equal(f.arrays["selected"][:, l], (r <= 0.5) & (mass >= 0.2))


def _specs(m, meta, items):
    b = encode_items(m, items)
    # the testbed has no massive dimension (see probes/VISION_RESULTS.md), so BOS-calibrated dims flag no image
    # token; to exercise VAR's redistribution take the dimension largest on image tokens, which flags many
    tr = interp.capture(m, b, sites="blocks.1.resid_pre")
    x = tr["blocks.1.resid_pre"][:, 1:65].float()
    dim = int((x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).abs().flatten(0, 1).median(0).values.argmax())
    var = vs.visual_sinks(m, b, dims=[dim]).to_spec(model=m, p=0.6, min_rate=0.0)
    pai = ia.image_attention(m, as_vqa_items(items), occlusion=False, n_boot=50).to_spec(model=m, alpha=0.5)
    r0 = interp.vlm.slice_batch(b, 0, 1)
    pos = -meta["gen_len"] if meta["kind"] == "diffusion" else -1
    f = vhd_mod.vhd(m, {"input_ids": r0.input_ids, "pixel_values": r0.extra["pixel_values"]}, position=pos,
                    **({"answer_ids": [0]} if meta["kind"] == "diffusion" else {}))
    vhr = f.to_spec(model=m, alpha=2.0, last_n=m.n_layers - 1)
    return b, {"var": (var, "factor", 1.0), "pai": (pai, "alpha", 0.0), "vhr": (vhr, "factor", 1.0)}


def _neutral(spec, key, value):
    s = copy.deepcopy(spec)
    for e in s.edits:
        e[key] = value
    return s


def test_var_pai_vhr_replay_stochastic_and_neutral(tb):
    m, ref, meta = tb
    items = localisation_items(10, seed=5)
    b, specs = _specs(m, meta, items)
    sites = ["blocks.*.attn.pattern", "blocks.*.attn.logits", "logits"]
    base = interp.capture(m, b, sites=sites)  # eager everywhere: the same arithmetic the edits run in
    real = b.attention_mask.bool()
    for name, (spec, key, neutral) in specs.items():
        with interp.patch(m, spec):
            tr = interp.capture(m, b, sites=sites)
        changed = False
        for l in range(m.n_layers):
            A = tr[f"blocks.{l}.attn.pattern"]
            rows = A.sum(-1)[real[:, None].expand(-1, m.n_heads, -1)]
            assert (rows - 1).abs().max() <= 1e-5 and A.min() >= 0, (name, l)
            changed |= not torch.equal(A, base[f"blocks.{l}.attn.pattern"])
        if name == "pai":  # closed form at the answer query: softmax(z + α|z|) on image keys
            e = spec.edits[0]
            l = e["layers"][0]
            z = base[f"blocks.{l}.attn.logits"]
            for i, r in enumerate(b.roles):
                qs = r["answer"] if meta["kind"] == "diffusion" else r["query"]
                zz = z[i, :, qs].clone()
                zz[..., r["image"]] += e["alpha"] * zz[..., r["image"]].abs()
                assert torch.allclose(tr[f"blocks.{l}.attn.pattern"][i, :, qs], torch.softmax(zz, -1), atol=1e-6)
        if name == "var":  # closed form of VAR on one edited row
            e = spec.edits[0]
            l, h = e["layers"][0], e["heads"][0]
            x = base[f"blocks.{l}.attn.pattern"]
            i, qpos = 0, b.roles[0]["query"][0]
            hs = interp.capture(m, b, sites=f"blocks.{l}.resid_pre")[f"blocks.{l}.resid_pre"][i].float()
            phi = (hs / torch.sqrt(hs.pow(2).mean(-1, keepdim=True) + 1e-6))[:, spec.sink["dims"]].abs().amax(-1)
            sink = phi > spec.sink["tau"]
            a = x[i, h, qpos]
            img = torch.zeros_like(sink)
            img[b.roles[0]["image"]] = True
            recv = img & ~sink
            want = torch.where(sink, e["factor"] * a, a)
            want = torch.where(recv, a + (1 - e["factor"]) * a[sink].sum() * a / a[recv].sum(), want)
            assert sink.any() and torch.allclose(tr[f"blocks.{l}.attn.pattern"][i, h, qpos], want, atol=1e-6)
        logit_changed = not torch.equal(tr["logits"], base["logits"])
        assert changed or name == "vhr"
        assert logit_changed, name
        plain = m.logits(b)
        with interp.patch(m, _neutral(spec, key, neutral)):
            assert torch.equal(m.logits(b), plain), name  # neutral parameters: bit-identical
        near = neutral + (1e-6 if key == "alpha" else -1e-6)  # the formula itself is continuous at neutral
        with interp.patch(m, _neutral(spec, key, near)), m.engine.running(b):
            assert (m.logits(b) - plain).abs().max() <= 1e-4, name


def test_vqa_task_scores_equal_hf_and_evaluate(tb, capsys, tmp_path):
    m, ref, meta = tb
    items = vqa_items(12, seed=3)
    acc = score_vqa(items, m)
    lp = score_vqa([dict(it, score="logprob") for it in items], m)
    # by hand with the eager HF model, one item at a time
    from interp.testbed import build_inputs
    from interp.testbed.scenes import make_scene
    for it, a, l in zip(items, acc, lp):
        inp = build_inputs(m.tokenizer, meta, make_scene(it["scene_seed"]), it["question"])
        ids = inp["input_ids"]
        if meta["kind"] == "diffusion":
            ids = torch.cat([ids, torch.full((1, meta["gen_len"]), meta["mask_token_id"])], 1)
        pos = inp["input_ids"].shape[1] - (1 if meta["kind"] == "ar" else 0)
        with torch.no_grad():
            logits = ref(input_ids=ids, pixel_values=inp["pixel_values"]).logits[0, pos]
        y = m.tokenizer.convert_tokens_to_ids(it["answer"].split()[0])
        assert a == float(logits.argmax() == y) and abs(l - float(torch.log_softmax(logits, -1)[y])) < 1e-4
    spec = interp.Spec.for_model(m, [{"op": "attn.knockout", "layers": "all", "queries": "all", "keys": "role:image"}])
    task = Task("vqa_lp", "vqa", [dict(it, score="logprob") for it in items])
    f = interp.evaluate(m, spec, task)
    assert f.metrics["metric"] == "logprob" and abs(f.metrics["without"] - sum(lp) / len(lp)) < 1e-6
    assert f.metrics["delta"] < -1  # blind to the image, the answers lose most of their probability
    path = spec.save(tmp_path / "blind")
    from interp.cli import main
    assert main(["evaluate", str(path), "testbed_vqa", "--model", m.name, "--limit", "30"]) == 0
    out = capsys.readouterr().out
    assert "testbed_vqa (accuracy, n=30)" in out and "without 1.000" in out
