"""Every op against a hand-written reference; neutral parameters are no-ops; specs refuse the wrong model."""
import copy
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import interp
import interp.ops
from interp import InterpError, Spec
from tests.conftest import ForceEager, random_ids, tiny_hf


@pytest.fixture(scope="module")
def llama():
    return interp.load(tiny_hf("llama", seed=1), name="tiny-llama")


def ids_batch(n=12):
    ids = random_ids(n, seed=3)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits(model, inputs):
    with torch.no_grad():
        return model.hf(**inputs).logits


def spec(model, *edits, **kw):
    return Spec.for_model(model, list(edits), **kw)


class _ByHand:
    """A hand-written P2 reference run through the engine: scale key set by γ, then renormalise."""

    def __init__(self, layers, heads, keys, gamma):
        self.layers, self.heads, self.keys, self.gamma = layers, heads, keys, gamma

    def needs(self, layer):
        return {"weights"} if layer in self.layers else set()

    def on_weights(self, layer, w, call):
        w = w.clone()
        for h in self.heads:
            w[:, h, :, self.keys] *= self.gamma
            w[:, h] = w[:, h] / w[:, h].sum(-1, keepdim=True)
        return w


def test_scale_renormalised_equals_p2_by_hand_and_log_bias(llama):
    x = ids_batch()
    s = spec(llama, {"op": "attn.scale_weights", "layers": [0, 2], "heads": [1, 3], "keys": [0, 4], "factor": 2.5})
    with interp.patch(llama, s):
        got = interp.capture(llama, x, sites=["blocks.*.attn.pattern", "logits"])
    with torch.no_grad(), llama.engine.using(_ByHand([0, 2], [1, 3], [0, 4], 2.5)):
        ref = interp.capture(llama, x, sites=["blocks.*.attn.pattern", "logits"])
    for l in range(3):
        assert (got[f"blocks.{l}.attn.pattern"] - ref[f"blocks.{l}.attn.pattern"]).abs().max() <= 1e-6
        rows = got[f"blocks.{l}.attn.pattern"].sum(-1)
        assert (rows - 1).abs().max() <= 1e-5
    assert (got["logits"] - ref["logits"]).abs().max() <= 1e-5
    # and the explicit log-γ logit bias form
    b = spec(llama, {"op": "attn.add_logit_bias", "layers": [0, 2], "heads": [1, 3], "keys": [0, 4],
                     "bias": float(torch.log(torch.tensor(2.5)))})
    with interp.patch(llama, b):
        assert (logits(llama, x) - got["logits"]).abs().max() <= 1e-6
    # ratios between untouched keys are preserved
    A0 = interp.capture(llama, x, sites="blocks.0.attn.pattern")["blocks.0.attn.pattern"]
    A1 = got["blocks.0.attn.pattern"]
    r0, r1 = A0[0, 1, 8, 5] / A0[0, 1, 8, 6], A1[0, 1, 8, 5] / A1[0, 1, 8, 6]
    assert abs(r0 - r1) <= 1e-5


def test_scale_key0_by_zero_equals_masking_key0(llama):
    x = ids_batch()
    s = spec(llama, {"op": "attn.scale_weights", "layers": "all", "queries": "1:", "keys": 0, "factor": 0.0})
    with interp.patch(llama, s):
        got = logits(llama, x)
    ref = copy.deepcopy(llama.hf)
    ref.set_attn_implementation("eager")
    T = x["input_ids"].shape[1]
    m = torch.full((T, T), torch.finfo(torch.float32).min).triu(1)
    m[1:, 0] = torch.finfo(torch.float32).min
    with torch.no_grad():
        want = ref(input_ids=x["input_ids"], attention_mask=m[None, None]).logits
    assert (got - want).abs().max() <= 1e-5


def test_knockout_matches_explicit_mask_and_empty_set_is_noop(llama):
    x = ids_batch()
    s = spec(llama, {"op": "attn.knockout", "layers": [1], "queries": "last", "keys": "2:5"})
    with interp.patch(llama, s):
        got = interp.capture(llama, x, sites="blocks.1.attn.pattern")["blocks.1.attn.pattern"]
    assert got[0, :, -1, 2:5].abs().max() == 0
    assert (got.sum(-1) - 1).abs().max() <= 1e-5
    base = logits(llama, x)
    with interp.patch(llama, spec(llama, {"op": "attn.knockout", "layers": "all", "queries": "last", "keys": "none"})):
        assert torch.equal(logits(llama, x), base)


def test_head_ablate_equals_zeroing_the_slice_before_o_proj(llama):
    x = ids_batch()
    s = spec(llama, {"op": "attn.head_ablate", "layers": [1], "heads": [2], "mode": "zero"})
    with interp.patch(llama, s):
        got = logits(llama, x)
    d = llama.head_dim

    def zero(mod, args):
        z = args[0].clone()
        z[..., 2 * d:3 * d] = 0
        return (z,)
    h = llama.adapter.attn[1].o_proj.register_forward_pre_hook(zero)
    try:
        want = logits(llama, x)
    finally:
        h.remove()
    assert (got - want).abs().max() <= 1e-6


def test_head_scale_and_mean_ablate_by_hand(llama):
    x = ids_batch()
    ref_prompts = {"input_ids": random_ids(10, b=3, seed=21), "attention_mask": torch.ones(3, 10, dtype=torch.long)}
    ref_prompts["attention_mask"][1, 7:] = 0  # padding is not part of the reference mean
    zr = interp.capture(llama, ref_prompts, sites="blocks.2.attn.z")["blocks.2.attn.z"]
    m = ref_prompts["attention_mask"].bool()
    mu = zr[m].mean(0)  # [h, d]: mean over the real reference tokens
    assert torch.allclose(interp.ops.mean_z(llama, ref_prompts, [2])[0], mu, atol=1e-6)
    tr = interp.capture(llama, x, sites="blocks.2.attn.z")
    z = tr["blocks.2.attn.z"]
    mean_edit = interp.ops.head_ablate([2], heads=[0], mode="mean", reference=(llama, ref_prompts))
    for e, f in [(mean_edit, lambda t: mu[0].expand_as(t)),
                 ({"op": "attn.head_scale", "layers": [2], "heads": [0], "factor": 0.5}, lambda t: 0.5 * t)]:
        with interp.patch(llama, spec(llama, e)):
            got = interp.capture(llama, x, sites="blocks.2.attn.z")["blocks.2.attn.z"]
        assert (got[:, :, 0] - f(z[:, :, 0])).abs().max() <= 1e-6
        assert torch.equal(got[:, :, 1:], z[:, :, 1:])


def test_mean_ablate_needs_a_reference_mean_and_is_causal(llama):
    """Regression: mode 'mean' without a tensor averaged over the current call's queries, so later tokens leaked
    into earlier positions (and the result depended on the chunking and was a no-op in cached generation)."""
    with pytest.raises(InterpError, match="reference set"):
        spec(llama, {"op": "attn.head_ablate", "layers": [1], "heads": [0], "mode": "mean"})
    e = interp.ops.head_ablate([1], heads=[0], mode="mean", reference=(llama, ids_batch()))
    s = spec(llama, e)
    a, b = random_ids(12, seed=5), random_ids(12, seed=5)
    b[0, 8:] = random_ids(4, seed=6)[0]  # same prefix, different future
    with interp.patch(llama, s):
        la, lb = logits(llama, {"input_ids": a}), logits(llama, {"input_ids": b})
    assert torch.equal(la[:, :8], lb[:, :8])  # the future cannot change the past


def test_patch_full_residual_reproduces_source_run(llama):
    a, b = ids_batch(), {"input_ids": random_ids(12, seed=9)}
    tr = interp.capture(llama, a, sites="blocks.1.resid_post")
    s = spec(llama, {"op": "patch", "site": "resid_post", "layers": [1], "tensor": "src"},
             tensors={"src": tr["blocks.1.resid_post"]})
    with interp.patch(llama, s):
        got = logits(llama, b)
    assert (got - logits(llama, a)).abs().max() <= 1e-6


def test_resid_add_and_suppress_dims_by_hand(llama):
    x = ids_batch()
    v = torch.randn(llama.d_model)
    tr = interp.capture(llama, x, sites=["blocks.0.resid_post", "blocks.1.resid_pre"])
    s = spec(llama, {"op": "resid.add", "layers": [0], "positions": "last", "tensor": "v", "scale": 2.0},
             tensors={"v": v})
    with interp.patch(llama, s):
        got = interp.capture(llama, x, sites="blocks.1.resid_pre")["blocks.1.resid_pre"]
    want = tr["blocks.0.resid_post"].clone()
    want[:, -1] += 2.0 * v
    assert (got - want).abs().max() <= 1e-6
    s = spec(llama, {"op": "resid.suppress_dims", "layers": [1], "site": "resid_pre", "positions": [0, 3],
                     "dims": [5, 7], "mode": "mean", "value": 1.5})
    with interp.patch(llama, s):
        got = interp.capture(llama, x, sites="blocks.1.resid_pre")["blocks.1.resid_pre"]
    want = tr["blocks.1.resid_pre"].clone()
    for p in (0, 3):
        want[:, p, [5, 7]] = 1.5
    assert torch.equal(got, want)


def test_local_window_and_copy_head(llama):
    x = ids_batch()
    s = spec(llama, {"op": "attn.replace_pattern", "layers": [0], "mode": "local_window", "window": 3})
    with interp.patch(llama, s):
        A = interp.capture(llama, x, sites="blocks.0.attn.pattern")["blocks.0.attn.pattern"][0]
    q, k = torch.meshgrid(torch.arange(12), torch.arange(12), indexing="ij")
    far = (k <= q - 3) & (k > 0)
    assert A[:, far].abs().max() == 0 and (A.sum(-1) - 1).abs().max() <= 1e-5
    s = spec(llama, {"op": "attn.replace_pattern", "layers": [0], "heads": [1, 2], "mode": "copy_head", "source_head": 3})
    with interp.patch(llama, s):
        A = interp.capture(llama, x, sites="blocks.0.attn.pattern")["blocks.0.attn.pattern"][0]
    assert torch.equal(A[1], A[3]) and torch.equal(A[2], A[3]) and (A.sum(-1) - 1).abs().max() <= 1e-5


def test_distance_bias_closed_form(llama):
    x = ids_batch()
    base = interp.capture(llama, x, sites="blocks.0.attn.logits")["blocks.0.attn.logits"][0]
    s = spec(llama, {"op": "attn.add_logit_bias", "layers": [0], "heads": [0], "keys": "0:4",
                     "distance": {"fn": "log1p", "scale": 0.7, "d0": 2.0}})
    with interp.patch(llama, s):
        A = interp.capture(llama, x, sites="blocks.0.attn.pattern")["blocks.0.attn.pattern"][0, 0]
    q, k = torch.meshgrid(torch.arange(12.), torch.arange(12.), indexing="ij")
    bias = torch.where(k < 4, 0.7 * torch.log1p((q - k).abs() / 2.0), 0.0)
    want = torch.softmax(base[0] + bias, -1)
    assert (A - want).abs().max() <= 1e-6


NEUTRAL = [
    {"op": "attn.scale_weights", "layers": "all", "keys": "role:bos", "factor": 1.0},
    {"op": "attn.add_logit_bias", "layers": "all", "keys": "all", "bias": 0.0},
    {"op": "attn.add_logit_bias", "layers": "all", "distance": {"fn": "log1p", "scale": 0.0, "d0": 1.0}},
    {"op": "attn.replace_pattern", "layers": "all", "mode": "local_window", "window": 100000},
    {"op": "attn.knockout", "layers": "all", "queries": "all", "keys": "none"},
    {"op": "attn.head_scale", "layers": "all", "factor": 1.0},
    {"op": "resid.add", "layers": "all", "tensor": "zero", "scale": 0.0},
    {"op": "resid.suppress_dims", "layers": "all", "dims": [0, 1], "mode": "clamp", "value": 1e30},
]


@pytest.mark.parametrize("edit", NEUTRAL, ids=lambda e: e["op"])
def test_neutral_parameters_are_noops_on_smollm2(smol, edit):
    b = smol.encode("The capital of France is Paris, and the capital of Spain is")
    base = smol.logits(b)
    s = spec(smol, edit, tensors={"zero": torch.ones(smol.d_model)})
    with interp.patch(smol, s):
        assert (smol.logits(b) - base).abs().max() <= 1e-6


def test_weight_edits_at_neutral_parameters_equal_the_eager_baseline(smol, monkeypatch):
    """Identity edits are skipped, so the SDPA path stays bit-exact; run anyway on the eager path, the ops'
    formulas at their neutral parameters equal the eager computation without them."""
    for op in interp.ops.OPS.values():
        monkeypatch.setattr(type(op), "neutral", lambda self, e: False)
    b = smol.encode("The capital of France is")
    with smol.engine.using(ForceEager()):
        want = smol.logits(b)
    eager = copy.deepcopy(smol.hf)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        assert (eager(**b.model_inputs()).logits - want).abs().max() <= 1e-6 * want.abs().max()
    for e in [{"op": "attn.scale_weights", "layers": "all", "keys": "all", "factor": 1.0, "renormalize": False},
              {"op": "attn.scale_weights", "layers": "all", "keys": "role:bos", "factor": 1.0, "renormalize": True},
              {"op": "attn.amplify", "layers": "all", "keys": "all", "alpha": 0.0},
              {"op": "attn.head_scale", "layers": "all", "factor": 1.0}]:
        with interp.patch(smol, spec(smol, e)), smol.engine.using(ForceEager()):
            assert (smol.logits(b) - want).abs().max() <= 1e-6, e["op"]


def test_json_roundtrip_deterministic_replay_and_sidecar(tmp_path, llama):
    s = spec(llama, {"op": "resid.add", "layers": [1], "positions": "last", "tensor": "v", "scale": 0.5},
             {"op": "attn.scale_weights", "layers": [0], "heads": [1], "keys": "role:bos", "factor": 0.3},
             tensors={"v": torch.randn(llama.d_model)}, analysis="probes.sinks", params={"epsilon": 0.3})
    path = s.save(tmp_path / "s.json")
    back = Spec.load(path)
    assert back.to_json() == s.to_json()
    assert json.loads(path.read_text()) == s.to_dict()
    assert torch.equal(back.tensors["v"], s.tensors["v"])
    x = ids_batch()
    with interp.patch(llama, back):
        r1 = logits(llama, x)
    with interp.patch(llama, back):
        r2 = logits(llama, x)
    assert torch.equal(r1, r2)


def test_wrong_model_and_bad_ranges_refused(llama, smol):
    s = spec(llama, {"op": "attn.head_scale", "layers": [0], "heads": [0], "factor": 2.0})
    with pytest.raises(InterpError, match="written for tiny-llama"):
        with interp.patch(smol, s):
            pass
    other = interp.load(tiny_hf("llama", seed=1).__class__(copy.deepcopy(llama.hf.config).__class__(
        **{**llama.hf.config.to_dict(), "intermediate_size": 96})), name="other")
    with pytest.raises(InterpError, match="fingerprint"):
        s.check(other)
    with pytest.raises(InterpError, match="heads.*out of range"):
        spec(llama, {"op": "attn.head_scale", "layers": [0], "heads": [9], "factor": 2.0})
    with pytest.raises(InterpError, match="layers.*out of range"):
        spec(llama, {"op": "attn.head_scale", "layers": [3], "factor": 2.0})
    with pytest.raises(InterpError, match="not valid JSON"):
        Spec.from_json("{not json")
    with pytest.raises(InterpError, match=r"edits\[0\].factor"):
        Spec.from_dict({**s.to_dict(), "edits": [{"op": "attn.head_scale", "layers": [0], "factor": "big"}]})


def test_exception_inside_patch_restores_model(llama):
    x = ids_batch()
    base = logits(llama, x)
    s = spec(llama, {"op": "attn.head_scale", "layers": "all", "factor": 3.0},
             {"op": "resid.add", "layers": [0], "tensor": "v"}, tensors={"v": torch.ones(llama.d_model)})
    with pytest.raises(RuntimeError):
        with interp.patch(llama, s):
            assert not torch.equal(logits(llama, x), base)
            raise RuntimeError("interrupted")
    assert llama.engine.hooks == []
    assert torch.equal(logits(llama, x), base)


def test_patch_during_generation_acts_on_new_tokens(smol):
    prompt = "The capital of France is"
    plain = smol.generate(prompt, max_new_tokens=6)
    s = spec(smol, {"op": "attn.head_scale", "layers": "all", "queries": "6:", "factor": 0.0})
    with interp.patch(smol, s):  # only generated positions (>= 6) are edited: the first token is unchanged
        edited = smol.generate(prompt, max_new_tokens=6)
    assert edited[0] != plain[0]
    assert smol.tokenizer(edited[0])["input_ids"][0] == smol.tokenizer(plain[0])["input_ids"][0]


# ------------------------------------------------------------------------- fuzzing
_leaf = st.one_of(st.none(), st.booleans(), st.integers(-5, 40), st.floats(allow_nan=True), st.text(max_size=8))
_json = st.recursive(_leaf, lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=8), c, max_size=4)),
                     max_leaves=12)
_edit = st.fixed_dictionaries({"op": st.sampled_from(["attn.scale_weights", "attn.head_scale", "attn.knockout",
                                                      "resid.add", "patch", "nope", "attn.add_logit_bias"])},
                              optional={"layers": st.one_of(st.just("all"), st.lists(st.integers(-2, 5), max_size=3), _leaf),
                                        "heads": st.one_of(st.just("all"), st.lists(st.integers(-1, 6), max_size=3), _leaf),
                                        "keys": _json, "queries": _json, "factor": _leaf, "bias": _leaf,
                                        "tensor": _leaf, "extra": _leaf, "renormalize": _leaf})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(_edit, max_size=3), top=st.dictionaries(st.sampled_from(["schema", "model", "junk"]), _json, max_size=2))
def test_fuzzed_specs_only_raise_validation_errors(llama, edits, top):
    doc = {**spec(llama).to_dict(), "edits": edits, **top}
    x = ids_batch(8)
    try:
        s = Spec.from_dict(json.loads(json.dumps(doc)))
        with interp.patch(llama, s):
            logits(llama, x)
    except InterpError:
        return
    # accepted: it must have been a valid, applicable spec
    assert s.edits == edits


def test_redistribute_matches_act_formula(llama):
    """ACT: a'_K = β a_K, a'_j = a_j + (1−β)Σ_K a · a_j / Σ_{j∉K} a (METHODS §8), rows stay stochastic."""
    x = ids_batch()
    A = interp.capture(llama, x, sites="blocks.1.attn.pattern")["blocks.1.attn.pattern"]
    s = spec(llama, {"op": "attn.scale_weights", "layers": [1], "heads": [0], "queries": "1:", "keys": [1, 2],
                     "factor": 0.4, "redistribute_to": "all"})
    with interp.patch(llama, s):
        B = interp.capture(llama, x, sites="blocks.1.attn.pattern")["blocks.1.attn.pattern"]
    a = A[0, 0, 3]
    sk = a[[1, 2]].sum()
    want = a * (1 + 0.6 * sk / (1 - sk))
    want[[1, 2]] = 0.4 * a[[1, 2]]
    want[4:] = 0
    assert (B[0, 0, 3] - want).abs().max() <= 1e-6
    assert (B.sum(-1) - 1).abs().max() <= 1e-5
    assert torch.equal(B[0, 1:], A[0, 1:]) and torch.equal(B[0, 0, 0], A[0, 0, 0])
    # a row whose visible keys are all in K has nothing to receive the mass: it is kept as it was
    s0 = spec(llama, {"op": "attn.scale_weights", "layers": [1], "keys": [0], "factor": 0.4, "redistribute_to": "all"})
    with interp.patch(llama, s0):
        C = interp.capture(llama, x, sites="blocks.1.attn.pattern")["blocks.1.attn.pattern"]
    assert torch.equal(C[:, :, 0], A[:, :, 0]) and (C.sum(-1) - 1).abs().max() <= 1e-5
    assert (C[:, :, 1:, 0] - 0.4 * A[:, :, 1:, 0]).abs().max() <= 1e-7


def test_amplify_pai_formula_and_neutral(llama):
    x = ids_batch()
    Z = interp.capture(llama, x, sites="blocks.2.attn.logits")["blocks.2.attn.logits"]
    s = spec(llama, {"op": "attn.amplify", "layers": [2], "queries": "last", "keys": "3:7", "alpha": 0.5})
    with interp.patch(llama, s):
        A = interp.capture(llama, x, sites="blocks.2.attn.pattern")["blocks.2.attn.pattern"]
    z = Z[0, :, -1].clone()
    z[:, 3:7] += 0.5 * z[:, 3:7].abs()
    assert (A[0, :, -1] - torch.softmax(z, -1)).abs().max() <= 1e-6
    assert A[0, :, -1, 3:7].sum() > torch.softmax(Z[0, :, -1], -1)[:, 3:7].sum()  # α > 0 raises the mass on keys
    with interp.patch(llama, spec(llama, {"op": "attn.amplify", "layers": "all", "keys": "all", "alpha": 0.0})):
        tr = interp.capture(llama, x, sites="logits")
    assert (tr["logits"] - interp.capture(llama, x, sites=["logits", "blocks.*.attn.logits"])["logits"]).abs().max() <= 1e-6


# ------------------------------------------------------------------------- regressions
def _cached_vs_recomputed(model, prompt_ids, s, n=4):
    """Greedy generation with the KV cache under ``s``, and each step's logits recomputed without a cache on the
    sequence so far (same prompt roles): [(cached logits, recomputed logits)]."""
    batch = model.encode({"input_ids": prompt_ids})
    with interp.patch(model, s), model.engine.running(batch), torch.no_grad():
        out = model.hf.generate(**batch.model_inputs(), max_new_tokens=n, do_sample=False, output_logits=True,
                                return_dict_in_generate=True, pad_token_id=0)
        pairs = []
        for i, step in enumerate(out.logits):
            seq = out.sequences[:, :prompt_ids.shape[1] + i]
            pairs.append((step, model.hf(input_ids=seq, use_cache=False).logits[:, -1]))
    return pairs


def test_cached_generation_under_a_position_edit_equals_recompute(smol):
    """Regression: transformers passes the cache as ``cache``, not ``past_key_values``, so the offset stayed 0
    and a position-0 edit hit every generated token."""
    ids = smol.encode("The capital of France is").input_ids
    v = torch.randn(smol.d_model, generator=torch.Generator().manual_seed(0)) * 20
    s = spec(smol, interp.ops.resid_add([3], v, positions=0))
    for cached, full in _cached_vs_recomputed(smol, ids, s):
        assert (cached - full).abs().max() <= 1e-3


def test_cache_offset_is_read_from_what_the_model_receives(smol):
    """Fails loudly if transformers changes how the cache reaches the language model again."""
    from interp.patch import cache_offset
    seen = []
    h = smol.adapter.lm.register_forward_pre_hook(lambda m, a, k: seen.append(cache_offset(a, k)), with_kwargs=True)
    try:
        smol.generate("The capital of France is", max_new_tokens=3)
    finally:
        h.remove()
    n = len(smol.encode("The capital of France is").input_ids[0])
    assert seen == [0, n, n + 1]


def test_patches_exited_out_of_order_keep_each_others_edits(llama):
    """Regression: engine.using dropped every hook added after the one that left (``del hooks[n:]``)."""
    x = ids_batch()
    a = spec(llama, {"op": "attn.head_scale", "layers": [0], "factor": 0.3})
    b = spec(llama, {"op": "attn.knockout", "layers": [1], "queries": "last", "keys": "1:6"})
    with interp.patch(llama, b):
        only_b = logits(llama, x)
    pa, pb = interp.patch(llama, a), interp.patch(llama, b)
    pa.__enter__()
    pb.__enter__()
    pa.__exit__(None, None, None)  # the outer one leaves first
    try:
        assert torch.equal(logits(llama, x), only_b)
    finally:
        pb.__exit__(None, None, None)
    assert llama.engine.hooks == []


def test_a_second_thread_is_refused_while_a_patch_is_active(llama):
    """Regression: a forward in another thread ran under the active patch, and two threads capturing mixed rows."""
    import threading
    x = ids_batch()
    base = logits(llama, x)
    inside, release, errors = threading.Event(), threading.Event(), []

    def holder():
        with interp.patch(llama, spec(llama, {"op": "attn.head_scale", "layers": "all", "factor": 0.0})):
            inside.set()
            release.wait(30)

    def other():
        for run in (lambda: logits(llama, x), lambda: interp.capture(llama, x, sites="logits")):
            try:
                run()
                errors.append(None)
            except InterpError as e:
                errors.append(str(e))
    t = threading.Thread(target=holder)
    t.start()
    try:
        assert inside.wait(30)
        t2 = threading.Thread(target=other)
        t2.start()
        t2.join(30)
    finally:
        release.set()
        t.join(30)
    assert len(errors) == 2 and all(e and "another thread" in e for e in errors)
    assert torch.equal(logits(llama, x), base)  # and the model is free again, unpatched


def test_knocking_out_every_key_of_a_row_keeps_the_row(llama):
    """Regression: blocking every visible key made the row uniform; it now keeps its distribution."""
    x = ids_batch()
    A = interp.capture(llama, x, sites="blocks.1.attn.pattern")["blocks.1.attn.pattern"]
    s = spec(llama, {"op": "attn.knockout", "layers": [1], "queries": [5], "keys": "all"},
             {"op": "attn.knockout", "layers": [1], "queries": [7], "keys": "0:4"},
             {"op": "attn.scale_weights", "layers": [1], "queries": [7], "keys": "4:", "factor": 0.0})
    with interp.patch(llama, s):
        B = interp.capture(llama, x, sites="blocks.1.attn.pattern")["blocks.1.attn.pattern"]
    assert (B[0, :, 5] - A[0, :, 5]).abs().max() <= 1e-6  # one edit blocks all keys: row kept
    assert (B[0, :, 7] - A[0, :, 7]).abs().max() <= 1e-6  # two edits together block all keys: row kept
    assert (B[0, :, 6] - A[0, :, 6]).abs().max() <= 1e-6


def _bad_specs(m):
    v = torch.zeros(m.d_model)
    return [
        ({"op": "resid.add", "layers": [0], "tensor": "t"}, {"t": torch.zeros(m.d_model + 1)}, "shape"),
        ({"op": "attn.head_ablate", "layers": [0], "mode": "mean", "tensor": "t"}, {"t": torch.zeros(3, 3)}, "shape"),
        ({"op": "resid.add", "layers": [0], "tensor": "t"}, {"t": v.clone().fill_(float("nan"))}, "NaN"),
        ({"op": "attn.add_logit_bias", "layers": [0], "tensor": "t"}, {"t": torch.full((4, 4), float("inf"))}, "NaN"),
        ({"op": "resid.add", "layers": [0], "tensor": "t"}, {"t": v + 1e30}, "values up to"),
        ({"op": "attn.head_scale", "layers": [0], "factor": 1e30}, {}, "factor"),
        ({"op": "resid.add", "layers": [0], "tensor": "t", "scale": 1e300}, {"t": v}, "scale"),
        ({"op": "attn.amplify", "layers": [0], "keys": "all", "alpha": 1e20}, {}, "alpha"),
        ({"op": "attn.add_logit_bias", "layers": [0], "distance": {"fn": "linear", "d0": 0.0}}, {}, "distance"),
        ({"op": "attn.add_logit_bias", "layers": [0], "distance": {"fn": "linear", "d0": -2.0}}, {}, "distance"),
        ({"op": {"a": 1}, "layers": [0]}, {}, "unknown op"),
        ({"op": ["attn.knockout"], "layers": [0]}, {}, "unknown op"),
        ({"op": "resid.add", "layers": [0], "tensor": "t"}, {"t": torch.zeros(m.d_model, dtype=torch.long)}, "floating"),
    ]


def test_malformed_specs_are_refused_before_any_forward(llama):
    """Regression: unchecked sidecar shapes and values, sink.dims range, a dict/list op, d0 ≤ 0, huge scales."""
    calls = []
    h = llama.adapter.lm.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        for edit, tensors, msg in _bad_specs(llama):
            with pytest.raises(InterpError, match=msg):
                s = Spec(llama.identity(), [edit], {}, tensors)
                s.validate()
                s.check(llama)
        with pytest.raises(InterpError, match="sink.dims"):
            spec(llama, {"op": "attn.knockout", "layers": [0], "queries": "all", "keys": "sink"},
                 sink={"dims": [llama.d_model], "tau": 5.0})
    finally:
        h.remove()
    assert calls == []


def test_malformed_json_is_an_interp_error():
    """Regression: non-UTF-8 bytes, deep nesting and 5000-digit numbers escaped as raw exceptions."""
    for text, msg in [(b'{"schema": "\xff\xfe"}', "UTF-8"), ("[" * 100000 + "]" * 100000, "nested|JSON"),
                      ('{"schema": ' + "9" * 5000 + "}", "JSON"), ('{"a": 1e999999}', "schema")]:
        with pytest.raises(InterpError, match=msg):
            Spec.from_json(text)


def test_the_largest_accepted_values_stay_finite_and_overflow_is_refused_at_run_time(llama):
    from interp.ops import MAX_ACT, MAX_GAIN
    s = spec(llama, {"op": "attn.head_scale", "layers": "all", "factor": MAX_GAIN},
             {"op": "resid.add", "layers": [0, 1, 2], "tensor": "t", "scale": MAX_GAIN},
             tensors={"t": torch.full((llama.d_model,), MAX_ACT)})
    x = ids_batch()
    with interp.patch(llama, s):
        assert torch.isfinite(logits(llama, x)).all()
    with pytest.raises(InterpError, match="NaN/inf"):  # what no range can rule out: a Python edit
        with interp.patch(llama, hooks={"blocks.1.mlp.out": lambda t: t * float("inf")}):
            logits(llama, x)
    assert llama.engine.hooks == [] and torch.isfinite(logits(llama, x)).all()


def test_builders_equal_dict_edits_and_hooks_equal_ops(llama, tmp_path):
    v = torch.randn(llama.d_model)
    made = spec(llama, interp.ops.head_scale([1], 0.5, heads=[2]), interp.ops.knockout([0], "last", "1:3"),
                interp.ops.resid_add([2], v, positions="last", scale=2.0))
    name = made.edits[2]["tensor"]
    by_dict = spec(llama, {"op": "attn.head_scale", "layers": [1], "heads": [2], "factor": 0.5},
                   {"op": "attn.knockout", "layers": [0], "queries": "last", "keys": "1:3"},
                   {"op": "resid.add", "layers": [2], "positions": "last", "tensor": name,
                    "scale": 2.0}, tensors={name: v})
    assert made.edits == by_dict.edits and torch.equal(made.tensors[name], by_dict.tensors[name])
    x = ids_batch()
    with interp.patch(llama, made):
        want = logits(llama, x)
    d = llama.head_dim

    def scale_head(z):  # z [b, q, h, d]
        z = z.clone()
        z[:, :, 2] *= 0.5
        return z

    def add_last(h):
        h = h.clone()
        h[:, -1] += 2.0 * v
        return h
    with interp.patch(llama, spec(llama, interp.ops.knockout([0], "last", "1:3")),
                      hooks={"blocks.1.attn.z": scale_head, "blocks.2.resid_post": add_last}) as p:
        got = logits(llama, x)
        with pytest.raises(InterpError, match="cannot be serialised"):
            p.save(tmp_path / "x.json")
    assert (got - want).abs().max() <= 1e-6
    assert llama.engine.hooks == [] and d > 0
