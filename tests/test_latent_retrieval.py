"""Retrieval heads (docs/methods.md §13), the resid.project_out op and the causal probe (§10), the geometry of
steps: the copy-paste score against a brute-force count from HF's eager attentions, the projection removed
exactly (closed form) and a bit-identical no-op at strength 0, and the head-ablation spec replayed from JSON
against zeroing the heads' slices of the output projection's input by hand."""
import copy

import numpy as np
import pytest
import torch

import interp
from interp import Spec
from probes.linear import causal_probe, linear_probe, probe_features, random_direction
from probes.retrieval import copy_paste, retrieval
from tests.conftest import random_ids, tiny_hf

NEEDLE = (6, 11)


@pytest.fixture(scope="module")
def llama():
    return interp.load(tiny_hf("llama", seed=3), name="tiny-llama")


def _trial(seed=0, n=24):
    ids = random_ids(n, seed=seed)[0].tolist()
    s, e = NEEDLE
    answer = ids[s:e][:3] + [ids[2]] + ids[s:e][3:]  # copies the needle, with one token from outside it
    return ids, answer


def _brute_force(model, ids, needle, answer):
    """Count by hand from HF's eager output_attentions: for each answer token w, each head, the argmax key of the
    query predicting w; a copy-paste when that key lies in the needle and holds w."""
    eager = copy.deepcopy(model.hf)
    eager.set_attn_implementation("eager")
    full = ids + answer
    with torch.no_grad():
        att = eager(input_ids=torch.tensor([full[:-1]]), output_attentions=True).attentions
    s, e = needle
    L, H = len(att), att[0].shape[1]
    count = np.zeros((L, H))
    for j, w in enumerate(answer):
        if w not in ids[s:e]:
            continue
        q = len(ids) + j - 1
        for l in range(L):
            for h in range(H):
                k = int(att[l][0, h, q].argmax())
                if s <= k < e and ids[k] == w:
                    count[l, h] += 1
    return count / (e - s)


def test_copy_paste_equals_brute_force(llama):
    total = 0.0
    for seed in range(3):
        ids, answer = _trial(seed)
        got, ans = copy_paste(llama, ids, NEEDLE, answer_ids=answer)
        want = _brute_force(llama, ids, NEEDLE, answer)
        assert ans == answer
        assert np.allclose(got.numpy(), want, atol=1e-6), (got, want)
        total += want.sum()
    assert total > 0  # some head did copy-paste, so the comparison is not all zeros
    # a greedy answer (no answer_ids) is scored on what the model generated
    ids, _ = _trial(5)
    got, ans = copy_paste(llama, ids, NEEDLE, max_new_tokens=4)
    assert len(ans) == 4 and np.allclose(got.numpy(), _brute_force(llama, ids, NEEDLE, ans), atol=1e-6)


def test_project_out_closed_form_and_neutral(llama):
    b = llama.encode({"input_ids": random_ids(10, seed=1)})
    v = torch.randn(llama.d_model, generator=torch.Generator().manual_seed(2)) * 3.0
    u = v / v.norm()
    base = interp.capture(llama, b, sites="blocks.1.resid_post")["blocks.1.resid_post"][0]
    s = Spec.for_model(llama, [interp.ops.project_out([1], v, positions="1:5")])
    with interp.patch(llama, s):
        got = interp.capture(llama, b, sites="blocks.1.resid_post")["blocks.1.resid_post"][0]
    want = base.clone()
    want[1:5] = base[1:5] - (base[1:5] @ u)[:, None] * u
    assert (got - want).abs().max() <= 1e-5
    assert (got[1:5] @ u).abs().max() <= 1e-5  # nothing left along v
    assert torch.equal(got[[0, 5, 6, 7, 8, 9]], base[[0, 5, 6, 7, 8, 9]])
    logits = llama.logits(b)
    for neutral in (interp.ops.project_out("all", v, strength=0.0),):
        assert torch.equal(llama.logits(b, Spec.for_model(llama, [neutral])), logits)
    with pytest.raises(interp.InterpError, match="zero direction"):
        Spec.for_model(llama, [interp.ops.project_out([1], torch.zeros(llama.d_model))])


def test_retrieval_spec_replays_from_json(llama, tmp_path):
    trials = []
    for seed in range(2):
        ids, answer = _trial(seed)
        trials.append({"input_ids": ids, "needle": NEEDLE, "answer_ids": answer})
    f = retrieval(llama, trials)
    want = np.mean([_brute_force(llama, t["input_ids"], NEEDLE, t["answer_ids"]) for t in trials], 0)
    assert np.allclose(f.arrays["score"].numpy(), want, atol=1e-6)
    top = f.table.sort_values(["score", "layer", "head"], ascending=[False, True, True]).head(3)
    spec = retrieval.to_spec(f, llama, k=3)
    heads = spec.provenance["params"]["heads"]
    assert sorted(map(tuple, heads)) == sorted(zip(top.layer.astype(int), top["head"].astype(int)))
    ctl = retrieval.to_spec(f, llama, k=3, control=True, seed=1)
    assert not set(map(tuple, ctl.provenance["params"]["heads"])) & set(map(tuple, heads))
    path = spec.save(tmp_path / "retrieval.json")
    loaded = Spec.load(path)
    b = llama.encode({"input_ids": random_ids(12, seed=9)})
    # reference: zero each chosen head's slice of the o_proj input, by hand
    hd = llama.head_dim
    handles = []
    for l in sorted({h[0] for h in heads}):
        hs = [h for (ll, h) in heads if ll == l]

        def pre(mod, args, hs=hs):
            x = args[0].clone()
            for h in hs:
                x[..., h * hd:(h + 1) * hd] = 0
            return (x,)
        handles.append(llama.hf.model.layers[l].self_attn.o_proj.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            ref = llama.hf(**b.model_inputs()).logits
    finally:
        for h in handles:
            h.remove()
    got = llama.logits(b, loaded)
    assert (got - ref).abs().max() <= 1e-5
    assert (got - llama.logits(b)).abs().max() > 1e-4  # the ablation changes something


def test_causal_probe_spec_removes_the_probe_direction(llama):
    """Probe features planted along a direction; the ablate spec leaves no component along it at that layer, and
    the control direction is a random unit vector of the same width."""
    ids = random_ids(8, b=40, seed=4)
    tr = interp.capture(llama, {"input_ids": ids}, sites="blocks.*.resid_post")
    X = tr.stack("resid_post")[:, :, -1]  # [L, b, d]
    y = (X[1] @ torch.randn(llama.d_model, generator=torch.Generator().manual_seed(0)) > 0).long()
    if y.sum() in (0, len(y)):
        pytest.skip("degenerate labels")
    f = probe_features(X, y, progress=False)
    spec = linear_probe.to_spec(f, llama, layer=1, mode="ablate", positions="all")
    w = f.arrays["weights"][1]
    with interp.patch(llama, spec):
        h = interp.capture(llama, {"input_ids": ids}, sites="blocks.1.resid_post")["blocks.1.resid_post"]
    assert (h @ (w / w.norm())).abs().max() <= 1e-4
    ctl = linear_probe.to_spec(f, llama, layer=1, mode="ablate", control=True, seed=3)
    r = ctl.tensors[ctl.edits[0]["tensor"]]
    assert torch.allclose(r / r.norm(), random_direction(llama.d_model, 3), atol=1e-6)
    assert abs(float(r / r.norm() @ (w / w.norm()))) < 0.5


def test_geometry_cosines_equal_hf_hidden_states(smol):
    from probes.geometry import chain_prompts, geometry, step_positions
    chains = chain_prompts(4, 3, seed=2)
    f = geometry(smol, chains)
    reps = []
    for c in chains:
        ids, ends = step_positions(smol.tokenizer, c)
        assert [smol.tokenizer.decode(ids[e]) for e in ends] == ["."] * 3  # each step ends at its full stop
        with torch.no_grad():
            hs = smol.hf(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        reps.append(torch.stack([h[0, ends] for h in hs[1:]]).double())  # [L, S, d]
    R = torch.stack(reps, 1)
    Rn = R / R.norm(dim=-1, keepdim=True)
    want = torch.stack([torch.stack([torch.stack([(Rn[:, n, s] * Rn[:, n, t]).sum(-1) for n in range(4)]).mean(0)
                                     for t in range(3)], -1) for s in range(3)], -2)  # [L, S, S]
    # HF's last hidden state is taken after the final norm: compare the layers before it
    assert (f.arrays["cos"].double()[:-1] - want[:-1]).abs().max() <= 1e-4
    assert f.metrics["chance"] == pytest.approx(1 / 3)
    assert ((f.table.order_accuracy >= 0) & (f.table.order_accuracy <= 1)).all()
    with pytest.raises(interp.InterpError, match="same number of steps"):
        geometry(smol, [["a.", "b."], ["a."], ["c.", "d."], ["e.", "f."]])
