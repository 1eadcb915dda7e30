"""DAPE-BR, EDAR and TokenTruth (probes/dape.py, probes/edar.py, probes/tokentruth.py): the distance formulas
and the decay fit against loops and planted slopes, the exported biases against HF runs given the same bias as a
4-D additive mask, neutral specs bit-identical, JSON replay, the anchors' sink mass against HF's own attentions
at every denoising step, and TokenTruth's verdict (refusal where only token 0 is massive) on real models."""
import copy
import math

import pytest
import torch

import interp
import probes  # noqa: F401
from interp import vlm
from interp.testbed.items import default_items
from probes.dape import dape, decay_fit, distances, grid_bias, rings
from probes.edar import anchors_of, edar
from probes.tokentruth import tokentruth, verdict

from conftest import load_testbed_model


@pytest.fixture(scope="module")
def ar():
    return load_testbed_model("llava_ar")[0]


@pytest.fixture(scope="module")
def diff():
    return load_testbed_model("llada_diffusion")[0]


@pytest.fixture(scope="module")
def edar_finding(diff):
    return edar(diff, _one(diff), gen_len=3, steps=3)


def _one(model, k=0):
    return default_items(model, 2)[k:k + 1]


# ------------------------------------------------------------------------------------------ formulas
def test_distances_and_rings_by_loops():
    for n, grid in ((16, None), (12, 4)):
        d1, d2 = distances(n, grid)
        g = grid or 4
        for i in range(n):
            for j in range(n):
                assert d1[i, j] == abs(i - j)
                assert d2[i, j] == pytest.approx(math.hypot(i // g - j // g, i % g - j % g), abs=1e-12)
    rho = rings(16)  # 4 × 4: centre at (1.5, 1.5)
    assert rho.tolist() == [1.5, 1.5, 1.5, 1.5, 1.5, 0.5, 0.5, 1.5, 1.5, 0.5, 0.5, 1.5, 1.5, 1.5, 1.5, 1.5]
    with pytest.raises(interp.InterpError, match="square"):
        distances(12)


def test_decay_fit_recovers_planted_slopes():
    n, d0 = 16, 2.0
    d1, d2 = distances(n)
    f = torch.stack([torch.log1p(d1 / d0), torch.log1p(d2 / d0)], -1)
    g = torch.Generator().manual_seed(0)
    z = -0.7 * f[..., 0] + 0.3 * f[..., 1] + torch.randn(n, 1, generator=g, dtype=torch.float64) * 3
    vis = torch.ones(n, n).tril(-1).bool()  # causal, self left out
    A = torch.softmax(z.masked_fill(~vis, float("-inf")), -1)  # row normalisers differ: the intercepts absorb them
    beta, r2 = decay_fit(A.clamp_min(1e-300).log(), f, vis)
    assert beta.tolist() == pytest.approx([-0.7, 0.3], abs=1e-9)
    assert r2 == pytest.approx(1.0, abs=1e-9)


def test_grid_bias_by_loops():
    pos, T, lam, d0 = list(range(3, 19)), 24, 0.8, 2.0
    B = grid_bias(pos, T, mode="align", lam=lam, d0=d0)
    M = grid_bias(pos, T, mode="mask", lam=7.0)
    ring = lambda i: max(abs(i // 4 - 1.5), abs(i % 4 - 1.5))  # noqa: E731
    for q in range(T):
        for k in range(T):
            if q in pos and k in pos:
                i, j = q - 3, k - 3
                d1, d2 = abs(i - j), math.hypot(i // 4 - j // 4, i % 4 - j % 4)
                assert B[q, k] == pytest.approx(-lam * (math.log1p(d2 / d0) - math.log1p(d1 / d0)), abs=1e-12)
                assert M[q, k] == (-7.0 if ring(j) < ring(i) else 0.0)
            else:
                assert B[q, k] == 0 and M[q, k] == 0
    assert not grid_bias(pos, T, lam=0.0).any()


# ------------------------------------------------------------------------------------------ DAPE-BR
def _hf_logits(model, b, bias):
    """HF's own forward with ``bias`` [T, T] added to its plain (causal or full) mask, in every layer."""
    T = b.input_ids.shape[1]
    base = torch.full((T, T), float("-inf")).triu(1) if model.adapter.causal else torch.zeros(T, T)
    with torch.no_grad():
        return model.hf(input_ids=b.input_ids, pixel_values=b.extra["pixel_values"],
                        attention_mask=(base + bias)[None, None].float()).logits


def test_dape_finding_spec_and_replay(ar, tmp_path):
    items = default_items(ar, 2)[:3]
    f = dape(ar, items)
    b = vlm.encode_vqa(ar, items)
    # neighbour ratios of one head against loops over the captured patterns
    P = interp.capture(ar, b, sites="blocks.2.attn.pattern")["blocks.2.attn.pattern"]
    img = b.roles[0]["image"]
    h, v = [], []
    for i in range(len(items)):
        for q in range(64):
            if q % 8:
                h.append(float(P[i, 1, img[q], img[q - 1]]))
            if q >= 8:
                v.append(float(P[i, 1, img[q], img[q - 8]]))
    row = f.table[(f.table.layer == 2) & (f.table["head"] == 1)].iloc[0]
    assert row.vertical_over_horizontal == pytest.approx((sum(v) / len(v)) / (sum(h) / len(h)), rel=1e-6)
    # the align spec equals HF's forward with the same bias as a 4-D mask (one λ, every layer)
    one = vlm.encode_vqa(ar, items[:1])
    T = one.input_ids.shape[1]
    spec = f.to_spec(model=ar, lam=0.9, layers=[0, 1, 2], max_len=T)
    got = ar.logits(one, spec)
    ref = _hf_logits(ar, one, grid_bias(img, T, mode="align", lam=0.9, d0=1.0))
    assert torch.allclose(got, ref, atol=2e-5)
    assert not torch.allclose(got, ar.logits(one), atol=1e-3)
    # replay from JSON, and λ = 0 is bit-identical
    spec.save(tmp_path / "dape.json")
    assert torch.equal(ar.logits(one, interp.Spec.load(tmp_path / "dape.json")), got)
    assert torch.equal(ar.logits(one, f.to_spec(model=ar, lam=0.0, layers=[0, 1, 2])), ar.logits(one))


def test_dape_mask_blocks_inner_rings(diff):
    items = _one(diff)
    f = dape(diff, items)
    b = vlm.encode_vqa(diff, items)
    spec = f.to_spec(model=diff, mode="mask")
    with interp.patch(diff, spec):
        P = interp.capture(diff, b, sites="blocks.1.attn.pattern")["blocks.1.attn.pattern"][0]
    img = torch.tensor(b.roles[0]["image"])
    rho = rings(64)
    A = P[:, img[:, None], img[None, :]]  # [H, 64, 64]
    blocked = rho[None, :] < rho[:, None]
    assert float(A[:, blocked].abs().max()) == 0.0
    assert float(A[:, ~blocked].min()) > 0
    assert torch.allclose(P.sum(-1), torch.ones_like(P.sum(-1)), atol=1e-5)


# ------------------------------------------------------------------------------------------ EDAR
def test_edar_sink_mass_against_hf_attentions(diff, edar_finding):
    items, f = _one(diff), edar_finding
    from interp.diffusion import denoise
    b = vlm.encode_vqa(diff, items, gen_len=3)
    r = b.roles[0]
    P0 = b.input_ids.shape[1] - 3
    d = denoise(diff, {"input_ids": b.input_ids[:, :P0], "pixel_values": b.extra["pixel_values"]}, gen_len=3, steps=3)
    N, R = anchors_of(r), r["answer"]
    assert N == [0, 65, 66, P0 - 2, P0 - 1]  # <bos> user : … assistant :
    mask_id = diff.adapter.mask_token_id
    total = torch.zeros(diff.n_layers, diff.n_heads)
    for s in range(3):  # the state entering step s, through HF's eager attention
        x = d.tokens.clone()
        x[:, P0:] = torch.where(d.step_of >= s, mask_id, x[:, P0:])
        with torch.no_grad():
            att = diff.hf(input_ids=x, pixel_values=b.extra["pixel_values"], output_attentions=True).attentions
        for l in range(diff.n_layers):
            for h in range(diff.n_heads):
                total[l, h] += sum(float(att[l][0, h, q, k]) for q in R for k in N) / len(R)
    total /= 3
    got = torch.tensor(f.table.sink_mass.values).view(diff.n_layers, diff.n_heads).float()
    assert torch.allclose(got, total, atol=1e-5)
    assert f.metrics["uniform_share"] == pytest.approx(5 / r.length)


def test_edar_spec_equals_hf_bias_and_evaluates(diff, edar_finding, tmp_path):
    items, f = _one(diff), edar_finding
    b = vlm.encode_vqa(diff, items, gen_len=3)
    T, r = b.input_ids.shape[1], b.roles[0]
    spec = f.to_spec(model=diff, lam=1.3, d0=4.0, layers=[0, 1, 2])
    bias = torch.zeros(T, T, dtype=torch.float64)
    for q in r["answer"]:
        for k in r["image"]:
            bias[q, k] = 1.3 * math.log1p(abs(q - k) / 4.0)
    assert torch.allclose(diff.logits(b, spec), _hf_logits(diff, b, bias), atol=2e-5)
    spec.save(tmp_path / "edar.json")
    assert torch.equal(diff.logits(b, interp.Spec.load(tmp_path / "edar.json")), diff.logits(b, spec))
    assert torch.equal(diff.logits(b, f.to_spec(model=diff, lam=0.0, layers=[0, 1, 2])), diff.logits(b))
    task = interp.tasks.Task("vqa4", "vqa", default_items(diff, 2)[:4])
    ev = interp.evaluate(diff, spec, task)
    with interp.patch(diff, spec):
        edited = vlm.score_vqa(diff, task.items)
    assert ev.table["with"].tolist() == edited
    assert ev.table["without"].tolist() == vlm.score_vqa(diff, task.items)
    lo, hi = ev.metrics["delta_ci"]
    assert lo <= ev.metrics["delta"] <= hi


# ------------------------------------------------------------------------------------------ TokenTruth
def test_verdict_cases():
    import pandas as pd
    img = [set(range(1, 5))]
    empty = pd.DataFrame(columns=["prompt", "token"])
    assert verdict(empty, img) == (False, verdict(empty, img)[1]) and "no massive" in verdict(empty, img)[1]
    only0 = pd.DataFrame({"prompt": [0, 0], "token": [0, 0]})
    assert not verdict(only0, img)[0] and "only token 0" in verdict(only0, img)[1]
    assert verdict(pd.DataFrame({"prompt": [0, 0], "token": [0, 3]}), img)[0]
    assert not verdict(pd.DataFrame({"prompt": [0], "token": [7]}), img)[0]


def test_tokentruth_refuses_without_massive_and_fits_decay(ar):
    items = default_items(ar, 2)[:3]
    f = tokentruth(ar, items)
    assert f.metrics["supported"] is False and "no massive" in f.metrics["reason"]
    with pytest.raises(interp.InterpError, match="no massive"):
        f.to_spec(model=ar)
    # the decay slope of layer 1 against a dummy-variable regression (one intercept per row and head)
    b = vlm.encode_vqa(ar, items)
    P = interp.capture(ar, b, sites="blocks.1.attn.pattern")["blocks.1.attn.pattern"].double()
    X, y, k = [], [], 0
    n_groups = len(items) * ar.n_heads
    for i, r in enumerate(b.roles):
        q = r["query"][0]
        for h in range(ar.n_heads):
            for p in r["image"]:
                row = [0.0] * n_groups
                row[k] = 1.0
                X.append(row + [math.log1p(abs(q - p))])
                y.append(math.log(float(P[i, h, q, p])))
            k += 1
    sol = torch.linalg.lstsq(torch.tensor(X, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)[:, None])
    assert f.metrics["decay_beta_by_layer"][1] == pytest.approx(float(sol.solution[-1, 0]), abs=1e-4)


@pytest.fixture(scope="module")
def smol_llava(smol):
    """SmolLM2 (real weights) as the language model of a LLaVA with a small random vision tower."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector
    vc = CLIPVisionConfig(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, projection_dim=32)
    cfg = LlavaConfig(vision_config=vc, text_config=smol.hf.config, image_token_id=49151,
                      vision_feature_layer=-1, vision_feature_select_strategy="default")
    with torch.device("meta"):
        hf = LlavaForConditionalGeneration(cfg)
    torch.manual_seed(0)
    hf.model.language_model = copy.deepcopy(smol.hf.model)
    hf.lm_head = copy.deepcopy(smol.hf.lm_head)
    hf.model.vision_tower = CLIPVisionModel(vc)
    hf.model.multi_modal_projector = LlavaMultiModalProjector(cfg)
    return interp.load(hf.eval(), tokenizer=smol.tokenizer, name="smollm2-llava-random-vision")


def test_tokentruth_refuses_when_only_token0_is_massive(smol_llava, smol):
    text = smol.tokenizer("The picture shows a small red house next to the old tree", add_special_tokens=False)
    ids = torch.tensor([text["input_ids"][:3] + [49151] * 16 + text["input_ids"][3:]])
    px = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    f = tokentruth(smol_llava, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": px})
    assert f.metrics["hits_on_token0"] > 0 and f.metrics["hits_on_image"] == 0  # SmolLM2's own sink, dims 507/247
    assert set(f.table.dim) <= {507, 247}
    assert f.metrics["supported"] is False and "only token 0" in f.metrics["reason"]
    assert any("only token 0" in n for n in f.notes)
    with pytest.raises(interp.InterpError, match="only token 0"):
        f.to_spec(model=smol_llava)


def test_tokentruth_penalty_on_planted_massive_image_token(ar, tmp_path):
    items = _one(ar)
    b = vlm.encode_vqa(ar, items)
    pos, dim, val = b.roles[0]["image"][19], 7, 1e5

    def plant(h):
        h = h.clone()
        h[:, pos, dim] = val
        return h

    with interp.patch(ar, hooks={"blocks.0.resid_post": plant}):
        f = tokentruth(ar, items)
        assert f.metrics["supported"] and f.metrics["image_tokens"] == [pos] and f.metrics["dims"] == [dim]
        spec = f.to_spec(model=ar, lam=2.0)
        spec.save(tmp_path / "tt.json")
        spec = interp.Spec.load(tmp_path / "tt.json")
        assert spec.edits[0]["layers"] == [1, 2]  # every layer after the first massive one (layer 0)
        P = interp.capture(ar, b, sites="blocks.1.attn.pattern")["blocks.1.attn.pattern"][0].double()
        with interp.patch(ar, spec):
            P2 = interp.capture(ar, b, sites="blocks.1.attn.pattern")["blocks.1.attn.pattern"][0].double()
    # the first edited layer: one key biased by −λ, a' = a e^{−λ} / (1 − a + a e^{−λ}) in every row that sees it
    a = P[:, pos:, pos]
    want = a * math.exp(-2.0) / (1 - a + a * math.exp(-2.0))
    assert torch.allclose(P2[:, pos:, pos], want, atol=1e-6)
    assert torch.equal(P2[:, :pos], P[:, :pos])  # rows before the token do not see it
