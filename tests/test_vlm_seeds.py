"""GIFT, EAH and ART on the llava_ar testbed (docs/methods.md §8): the saliency, the attn.gift weights and the EAH
densities against closed forms computed here from HF's eager output_attentions; neutral parameters are bit-identical
no-ops; exported specs replay from JSON."""
import copy
import math
import statistics

import pytest
import torch

import interp
import probes  # noqa: F401  (registers the analyses)
from conftest import load_testbed_model
from interp.tasks import Task, load_task
from probes.eah import eah
from probes.entropy import entropy
from probes.gift import evaluate_items, gift

CONTENT = {"color", "cross", "circle", "square", "triangle", "red", "green", "blue", "yellow", "purple", "objects",
           "many", "how", "where", "describe", "top-left", "top-right", "bottom-left", "bottom-right"}


@pytest.fixture(scope="module")
def tb():
    m, tok, meta = load_testbed_model("llava_ar")
    from interp.testbed.items import default_items
    return m, default_items(m)[:6]


@pytest.fixture(scope="module")
def hf_attn(tb):
    """HF eager output_attentions of the items (one forward each, no padding)."""
    m, items = tb
    eager = copy.deepcopy(m.hf)
    eager.set_attn_implementation("eager")
    out = []
    for it in items:
        b = interp.vlm.encode_vqa(m, [it])
        with torch.no_grad():
            o = eager(input_ids=b.input_ids, attention_mask=b.attention_mask, pixel_values=b.extra["pixel_values"],
                      output_attentions=True)
        out.append((b, [a[0].double() for a in o.attentions], o.logits[0, -1]))
    return out


def _content(b):
    r = b.roles[0]
    return [p for p in r["question"] if b.tokens[0][p].lower() not in
            {"what", "is", "the", "there", "a", "?", ".", "user", "assistant", ":"}]


def test_gift_saliency_equals_the_closed_form_from_hf_attentions(tb, hf_attn):
    m, items = tb
    f = gift.run(m, items, layers=[1], alpha=5.0)
    checked = 0
    for i, (b, att, _) in enumerate(hf_attn):
        A, V = att[1], b.roles[0]["image"]
        C = _content(b)
        assert C and all(b.tokens[0][p] in CONTENT for p in C)
        H = A.shape[0]
        mass, shifts = [], []
        for h in range(H):
            d = [[max(0.0, float(A[h, c, j] - A[h, c - 1, j])) for j in V] for c in C]
            shifts.append(d)
            mass.append(sum(map(sum, d)))
        kept = sorted(range(H), key=lambda h: (-mass[h], h))[:H // 2]
        raw = [sum(shifts[h][ci][jj] for h in kept for ci in range(len(C))) / (len(kept) * len(C))
               for jj in range(len(V))]
        mu, sd = statistics.mean(raw), statistics.stdev(raw)
        clipped = [min(max(x, mu - 3 * sd), mu + 3 * sd) for x in raw]
        lo, hi = min(clipped), max(clipped)
        sal = [(x - lo) / (hi - lo) for x in clipped]
        # the shifts are tiny here (1e-9..1e-4): compare relatively (capture and HF eager differ by fp32 rounding)
        ms = sorted(mass, reverse=True)
        if ms[H // 2 - 1] > (1 + 1e-3) * ms[H // 2]:  # the kept heads are not decided by rounding
            assert sorted(torch.nonzero(f.arrays["kept"][i][0])[:, 0].tolist()) == sorted(kept)
            assert torch.allclose(f.arrays["raw"][i].double(), torch.tensor(raw, dtype=torch.float64), atol=1e-12,
                                  rtol=1e-3)
            assert torch.allclose(f.arrays["saliency"][i].double(), torch.tensor(sal, dtype=torch.float64), atol=2e-3)
            checked += 1
    assert checked >= 3


def test_gift_weights_equal_the_authors_procedure(tb, hf_attn):
    """Layer 2 is the only edited layer, so its unedited pattern is HF's; the edited last row follows the
    authors' modeling_llama.py step by step."""
    m, items = tb
    f = gift.run(m, items, layers=[1], alpha=5.0)
    spec = gift.to_spec(f, m, item=None, layers=[2])
    b = interp.vlm.encode_vqa(m, items)
    with interp.patch(m, spec):
        got = interp.capture(m, b, sites=["blocks.2.attn.pattern"])["blocks.2.attn.pattern"].double()
    for i, (bi, att, _) in enumerate(hf_attn):
        A = att[2].clone()
        T = A.shape[-1]
        V, Q = bi.roles[0]["image"], bi.roles[0]["question"]
        mvec = torch.exp(5.0 * f.arrays["saliency"][i].double())
        row = A[:, -1].clone()  # [H, T]
        k = A.shape[0] // 2
        vis = row[:, V].sum(-1).topk(k).indices
        before = row[vis][:, V].sum()
        row_v = row[vis][:, V] * mvec
        r = row_v.sum() / before
        for n, h in enumerate(vis.tolist()):
            row[h, V] = row_v[n]
        qh = row[:, Q].sum(-1).topk(k).indices
        for h in qh.tolist():
            row[h, Q] = row[h, Q] * r
        row = row / row.sum(-1, keepdim=True)
        assert torch.allclose(got[i, :, T - 1, :T], row, atol=1e-5)
        assert torch.allclose(got[i, :, :T - 1, :T], A[:, :T - 1], atol=1e-5)  # other rows untouched
        assert torch.allclose(got[i, :, T - 1, :T].sum(-1), torch.ones(A.shape[0], dtype=torch.float64), atol=1e-6)


def test_gift_neutral_alpha_is_bit_identical_and_spec_replays_from_json(tb, tmp_path):
    m, items = tb
    f = gift.run(m, items[:3])
    b = interp.vlm.encode_vqa(m, items[:3])
    base = interp.vlm.answer_logits(m, b)
    with interp.patch(m, gift.to_spec(f, m, item=None, alpha=0.0)):
        assert torch.equal(interp.vlm.answer_logits(m, b), base)
    spec = gift.to_spec(f, m, item=None)
    with interp.patch(m, spec):
        edited = interp.vlm.answer_logits(m, b)
    assert (edited - base).abs().max() > 1e-3  # α = 5 does change the answer logits
    spec.save(tmp_path / "gift.json")
    with interp.patch(m, interp.Spec.load(tmp_path / "gift.json")):
        assert torch.equal(interp.vlm.answer_logits(m, b), edited)
    with pytest.raises(interp.InterpError, match="rows for a batch"):
        with interp.patch(m, spec):
            interp.vlm.answer_logits(m, interp.vlm.encode_vqa(m, items[:2]))
    with pytest.raises(interp.InterpError, match=r"\[0, 1\]"):
        interp.Spec.for_model(m, [interp.ops.gift([2], "role:image", -torch.ones(64), 5.0)])


def test_gift_task_evaluation_rows_meet_their_items(tb):
    """Chunks of several items (one saliency row per sequence) score exactly as one item at a time."""
    m, _ = tb
    task = load_task("testbed_vqa")
    t = Task("t", "vqa", task.items[:6])
    a = evaluate_items(m, t, chunk=4)
    one = evaluate_items(m, t, chunk=1)
    assert a.table["with"].tolist() == one.table["with"].tolist()
    assert a.metrics["n"] == 6 and a.metrics["delta"] == pytest.approx(sum(a.table["delta"]) / 6)


def test_eah_density_and_argmax_equal_brute_force(tb, hf_attn):
    m, items = tb
    layer, delta = 1, 2e-3
    f = eah.run(m, items, layer=layer, delta=delta)
    dens = []
    for i, (b, att, _) in enumerate(hf_attn):
        A = att[layer]
        V = b.roles[0]["image"]
        text = [q for q in range(A.shape[-1]) if q > max(V)]
        row = []
        for h in range(A.shape[0]):
            row.append(sum(1 for j in V if sum(float(A[h, q, j]) for q in text) / len(text) > delta))
        dens.append(row)
        assert f.arrays["density"][i].tolist() == row
    mean = [sum(d[h] for d in dens) / len(dens) for h in range(len(dens[0]))]
    assert f.metrics["density_by_head"] == [round(x, 3) for x in mean]
    best = max(range(len(mean)), key=lambda h: mean[h])
    if mean.count(mean[best]) == 1:
        assert f.metrics["best_head"] == best
    spec = f.to_spec(m)
    assert spec.edits == [{"op": "attn.replace_pattern", "layers": [layer], "mode": "copy_head",
                           "source_head": f.metrics["best_head"]}]


def test_eah_spec_copies_the_head_neutral_is_bit_identical_and_replays(tb, tmp_path):
    m, items = tb
    f = eah.run(m, items, layer=1)
    h = f.metrics["best_head"]
    b = interp.vlm.encode_vqa(m, items[:2])
    base = interp.vlm.answer_logits(m, b)
    neutral = interp.Spec.for_model(m, [interp.ops.replace_pattern([1], "copy_head", heads=[h], source_head=h)])
    with interp.patch(m, neutral):
        assert torch.equal(interp.vlm.answer_logits(m, b), base)
    spec = f.to_spec(m)
    with interp.patch(m, spec):
        A = interp.capture(m, b, sites=["blocks.1.attn.pattern"])["blocks.1.attn.pattern"]
        edited = interp.vlm.answer_logits(m, b)
    for i in range(2):
        T = int(b.attention_mask[i].sum())
        for g in range(A.shape[1]):
            assert torch.equal(A[i, g, :T, :T], A[i, h, :T, :T])  # every real row is the source head's
    spec.save(tmp_path / "eah.json")
    with interp.patch(m, interp.Spec.load(tmp_path / "eah.json")):
        assert torch.equal(interp.vlm.answer_logits(m, b), edited)


def test_art_on_image_prompts_blocks_far_keys_and_replays(tb, tmp_path):
    m, items = tb
    f = entropy.run(m, items, eta=0.8)
    spec = f.to_spec(m, window=8)
    (e0,) = [e for e in spec.edits if e["layers"] == [0]] or [spec.edits[0]]
    layer, heads = e0["layers"][0], e0["heads"]
    b = interp.vlm.encode_vqa(m, items[:2])
    with interp.patch(m, spec):
        A = interp.capture(m, b, sites=[f"blocks.{layer}.attn.pattern"])[f"blocks.{layer}.attn.pattern"]
        edited = interp.vlm.answer_logits(m, b)
    T = int(b.attention_mask[0].sum())
    q = torch.arange(T)[:, None]
    k = torch.arange(T)[None, :]
    far = (k <= q - 8) & (k > 0)
    for h in heads:
        assert float(A[0, h, :T, :T][far].abs().max()) < 1e-8  # blocked keys get no weight (key 0 kept)
    spec.save(tmp_path / "art.json")
    with interp.patch(m, interp.Spec.load(tmp_path / "art.json")):
        assert torch.equal(interp.vlm.answer_logits(m, b), edited)
    ent = f.arrays["entropy"]
    assert ent.shape == (m.n_layers, m.n_heads) and math.isfinite(float(ent.sum()))
