"""The probes run on a model in bf16 and fp16 (statistics accumulate in fp32) and find what the fp32 model
finds, up to the rounding of the half-precision forward.
The attribution analyses (saliency, Step-Saliency, AtP with the QK fix, Shapley, LLaVA-CAM) run on a bf16 model and
agree with the fp32 run within a tolerance set from bf16's rounding (see REL below)."""
from __future__ import annotations

import pytest
import torch

import interp
from interp.prompts import paragraphs
from probes.dla import dla
from probes.entropy import entropy
from probes.induction import induction
from probes.logit_lens import logit_lens
from probes.massive import massive
from probes.sinks import sinks

PROMPTS = paragraphs()[:3]


@pytest.fixture(scope="module")
def fp32(smol):
    return smol


@pytest.fixture(scope="module")
def fp32_probes(fp32):
    """The fp32 results both half-precision runs are compared with, computed once."""
    return {"sinks": sinks(fp32, PROMPTS, T=32, progress=False), "massive": massive(fp32, PROMPTS),
            "entropy": entropy(fp32, PROMPTS), "induction": induction(fp32, batch=4)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_probes_run_in_half_precision(dtype, fp32_probes, request):
    half = request.getfixturevalue("bf16") if dtype == torch.bfloat16 else interp.load("smollm2", dtype=dtype)
    assert next(half.hf.parameters()).dtype == dtype
    s32, s16 = fp32_probes["sinks"], sinks(half, PROMPTS, T=32, progress=False)
    # the sink heads: α of token 0 per head, within half-precision rounding of the fp32 model's
    a32, a16 = (torch.tensor(f.table.sort_values(["layer", "head"]).score.values) for f in (s32, s16))
    assert torch.isfinite(a16).all() and (a16 - a32).abs().max() < 0.05
    assert abs(s16.metrics["sink_rate_token0"] - s32.metrics["sink_rate_token0"]) < 5.0
    m16 = massive(half, PROMPTS)
    assert m16.metrics["dims"] == fp32_probes["massive"].metrics["dims"]  # the same massive dims (247, 507)
    e32, e16 = fp32_probes["entropy"], entropy(half, PROMPTS)
    assert (torch.tensor(e16.table.entropy.values) - torch.tensor(e32.table.entropy.values)).abs().max() < 0.05
    i16 = induction(half, batch=4)
    assert i16.metrics["top_head"] == fp32_probes["induction"].metrics["top_head"]
    d16 = dla(half, "The capital of France is", target=" Paris")
    assert all(torch.isfinite(torch.tensor(d16.table.select_dtypes("number").to_numpy(dtype=float))).reshape(-1))
    l16 = logit_lens(half, ["The capital of France is"], targets=[[" Paris"]])
    assert l16.table.select_dtypes("number").notna().all().all()


# ---------------------------------------------------------------------------------------------- attribution
# bf16 keeps 8 significant bits: unit roundoff u = 2^-8 ≈ 0.4 %. Every activation of the bf16 forward and backward
# is rounded, and the errors add up over 30 layers; attribution maps of the bf16 model differ from the fp32 ones by
# about 1-3 % of the map's largest value (measured: saliency 2.4 %, Step-Saliency 0.9 %, AtP 1.1 %). A map agrees
# when its largest difference is within REL = 5 % (≈ 13 u) of the fp32 map's largest value and the two maps keep
# their structure (Pearson r ≥ 0.999 over all cells).
REL, CORR = 0.05, 0.999


@pytest.fixture(scope="module")
def bf16():
    return interp.load("smollm2", dtype=torch.bfloat16)


def _agree(a32: torch.Tensor, a16: torch.Tensor, what: str, rel: float = REL, corr: float = CORR) -> None:
    a32, a16 = (torch.tensor(x).double().flatten() if not torch.is_tensor(x) else x.double().flatten() for x in (a32, a16))
    ok = torch.isfinite(a32)  # cells that hold no value in fp32 (NaN: not defined for that node) hold none in bf16
    assert a32.shape == a16.shape and torch.equal(torch.isfinite(a16), ok) and ok.any(), what
    a32, a16 = a32[ok], a16[ok]
    err, scale = (a16 - a32).abs().max().item(), a32.abs().max().item()
    assert scale > 0, f"{what}: the fp32 map is zero"
    print(f"{what}: max |Δ| / max |fp32| = {err / scale:.4f}")
    assert err <= rel * scale, f"{what}: max |Δ| {err:.3g} > {rel} x {scale:.3g}"
    r = torch.corrcoef(torch.stack([a32, a16]))[0, 1].item()
    assert r >= corr, f"{what}: Pearson r {r:.4f} < {corr}"


def test_saliency_and_step_saliency_in_bf16(fp32, bf16):
    from attribution.saliency import saliency
    from attribution.step_saliency import EXAMPLES, step_saliency
    for reduce in ("abs_after_sum", "mean_abs"):
        s32 = saliency(fp32, "The capital of France is Paris", layers=[0, 29], head_reduce=reduce)
        s16 = saliency(bf16, "The capital of France is Paris", layers=[0, 29], head_reduce=reduce)
        assert s16.arrays["I"].dtype == torch.float32  # A ⊙ ∂L/∂A and the head reduction in fp32
        _agree(s32.arrays["I"], s16.arrays["I"], f"saliency {reduce}")
    m32, m16 = step_saliency(fp32, **EXAMPLES[0]).arrays["M"], step_saliency(bf16, **EXAMPLES[0]).arrays["M"]
    _agree(m32, m16, "step saliency M")


def test_atp_in_bf16(fp32, bf16):
    from attribution.atp import atp
    tok = fp32.tokenizer
    clean, corrupt = (tok(p, return_tensors="pt").input_ids for p in ("The capital of France is", "The capital of Italy is"))
    ans, foil = tok(" Paris").input_ids[0], tok(" Rome").input_ids[0]
    f32, f16 = (atp(m, {"input_ids": clean}, corrupted={"input_ids": corrupt}, answers=[ans], foils=[foil],
                    graddrop=False) for m in (fp32, bf16))
    assert abs(f16.metrics["metric_clean"] - f32.metrics["metric_clean"]) <= REL * abs(f32.metrics["metric_clean"])
    # AtP multiplies a difference of two rounded activations (corrupted − clean) by a gradient: the difference's
    # relative rounding exceeds either's, so twice REL and r ≥ 0.99 (measured: AtP 1.1 %, QK fix 6.1 % of the largest
    # node, r = 0.9966)
    for col in [c for c in f32.table.columns if c.startswith(("atp", "qk"))]:
        _agree(f32.table[col].to_numpy(dtype=float), f16.table[col].to_numpy(dtype=float), f"atp {col}", 2 * REL, 0.99)
    assert (f16.metrics["top_layer"], f16.metrics["top_head"]) == (f32.metrics["top_layer"], f32.metrics["top_head"])


def test_shapley_in_bf16_moves_no_more_than_its_values(fp32, bf16):
    """φ_i = Σ_S w_S [v(S ∪ i) − v(S)] with Σ_S w_S = 1, so |φ_i(bf16) − φ_i(fp32)| ≤ 2 max_S |v_bf16(S) − v_fp32(S)|:
    the estimate adds no error of its own to the rounding of the model's log-probabilities."""
    import numpy as np
    from attribution.shapley import PromptGame, exact_shapley
    text = "2+3=5\n1+1=2\n4-1=3\n"
    games = [PromptGame(m, text, "expressions", "7", question="5+2=") for m in (fp32, bf16)]
    phis = [exact_shapley(g).phi for g in games]
    v32, v16 = (g.values(range(1 << g.n)) for g in games)
    assert np.isfinite(v16).all() and np.isfinite(phis[1]).all()
    assert np.abs(v16 - v32).max() <= REL * np.abs(v32).max()  # log p(answer) within bf16 rounding
    assert np.abs(phis[1] - phis[0]).max() <= 2 * np.abs(v16 - v32).max() + 1e-9


def test_llava_cam_in_bf16():
    from attribution.cam import cam_maps
    from tests.conftest import load_testbed_model
    from interp.testbed import CHECKPOINT_DIR
    from interp.testbed.items import default_items
    if not (CHECKPOINT_DIR / "llava_ar" / "model.safetensors").exists():
        pytest.skip("the AR testbed checkpoint is not committed")
    m32, tok, _ = load_testbed_model("llava_ar")
    import copy
    m16 = interp.load(copy.deepcopy(m32.hf).to(torch.bfloat16), tokenizer=tok, name="llava_ar-bf16")
    items = default_items(m32)[:1]
    r32, r16 = cam_maps(m32, items, layers=[0, 1]), cam_maps(m16, items, layers=[0, 1])
    _agree(r32["attention"], r16["attention"], "cam attention")
    for method in ("raw", "grad_x_act", "attn_x_grad"):  # gradient × activation: the AtP tolerance (r measured 0.9990)
        _agree(r32[method], r16[method], f"cam {method}", 2 * REL, 0.99)


def test_atp_graddrop_in_bf16(fp32, bf16):
    """AtP* (GradDrop): ĉ_AtP*(n) = 1/(L−1) Σ_ℓ |ĉ_ℓ(n)|, each ĉ_ℓ an AtP estimate (a difference of activations times
    a gradient) of the same form as AtP. Since ||a| − |b|| ≤ |a − b| and a mean of errors is at most their largest,
    GradDrop adds no rounding of its own to the AtP estimates it averages: AtP's tolerance, 2 REL and r ≥ 0.99
    (measured: 1.2 % of the largest node, r = 0.9999, over the z, q and k nodes)."""
    from attribution.atp import atp
    tok = fp32.tokenizer
    clean, corrupt = (tok(p, return_tensors="pt").input_ids for p in ("The capital of France is", "The capital of Italy is"))
    ans, foil = tok(" Paris").input_ids[0], tok(" Rome").input_ids[0]
    f32, f16 = (atp(m, {"input_ids": clean}, corrupted={"input_ids": corrupt}, answers=[ans], foils=[foil],
                    graddrop=True) for m in (fp32, bf16))
    assert f16.metrics["backward_passes"] == 1 + bf16.n_layers
    _agree(f32.table["atp_star"].to_numpy(dtype=float), f16.table["atp_star"].to_numpy(dtype=float), "atp* graddrop",
           2 * REL, 0.99)
    z32, z16 = (f.table[f.table.node == "z"] for f in (f32, f16))
    assert z16.atp_star.idxmax() == z32.atp_star.idxmax()  # the same top node


def test_diffusion_cam_in_bf16():
    """Diffusion-CAM: CAM_u = mean_c ReLU(w_c F_{u,c}), w = mean_u ReLU(∂y/∂F): a gradient times an activation, as
    LLaVA-CAM's grad_x_act, so the AtP tolerance, 2 REL and r ≥ 0.99; the min-max normalisation makes every stage's
    error relative to its largest value. The maps are of the decoded sequence, so bf16 must decode the same tokens
    first (the trained testbed's top-1 margins are far above bf16 rounding). Measured over 4 items x 2 steps: raw
    ≤ 5.2 %, filtered stages ≤ 6.5 % of the map's largest value, r ≥ 0.996."""
    import copy
    from attribution.diffusion_cam import STAGES, diffusion_cam
    from interp.testbed import CHECKPOINT_DIR, build_inputs, make_dataset
    from tests.conftest import load_testbed_model
    if not (CHECKPOINT_DIR / "llada_diffusion" / "model.safetensors").exists():
        pytest.skip("the diffusion testbed checkpoint is not committed")
    m32, tok, meta = load_testbed_model("llada_diffusion")
    m16 = interp.load(copy.deepcopy(m32.hf).to(torch.bfloat16), tokenizer=tok, name="llada_diffusion-bf16")
    for seed in (0, 1):
        sc = make_dataset(2, seed=seed, split="test")[0]
        inp = build_inputs(tok, meta, sc, sc.question("colour") or sc.question("caption"))
        for step in (None, 0):
            f32, f16 = (diffusion_cam(m, inp, gen_len=meta["gen_len"], step=step) for m in (m32, m16))
            for k in ("generated", "t_tgt", "t_dis", "step_used"):
                assert f16.metrics[k] == f32.metrics[k], (seed, step, k)
            for i, stage in enumerate(STAGES):
                _agree(f32.arrays["stages"][i], f16.arrays["stages"][i], f"diffusion-cam {stage} (item {seed}, "
                       f"step {step})", 2 * REL, 0.99)
