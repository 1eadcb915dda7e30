"""Tests for the multimodal testbed (scenes, tokenizer, committed checkpoints)."""

import random

import pytest
import torch

from interp.testbed import (
    CHECKPOINT_DIR,
    QUESTION_TYPES,
    build_inputs,
    diffusion_generate,
    evaluate_accuracy,
    load_testbed,
    make_dataset,
    make_scene,
    object_patch_mask,
    pixel_patch_mask,
)
from interp.testbed.scenes import BACKGROUND, COLOUR_RGB, GRID, PATCH, scene_seed

torch.set_num_threads(1)  # robust on a shared / oversubscribed CPU



# ---------------------------------------------------------------------- scenes
def test_scenes_deterministic():
    a, b = make_scene(1234), make_scene(1234)
    assert torch.equal(a.image, b.image)
    assert a.objects == b.objects
    assert a.questions() == b.questions()
    c = make_scene(1235)
    assert not torch.equal(a.image, c.image)
    assert a.image.shape == (3, 32, 32) and a.image.dtype == torch.float32
    assert 0.0 <= a.image.min() and a.image.max() <= 1.0
    d1 = make_dataset(5, seed=0, split="test")
    d2 = make_dataset(5, seed=0, split="test")
    assert all(torch.equal(x.image, y.image) for x, y in zip(d1, d2))


def test_splits_disjoint():
    tr = {scene_seed(i, 0, "train") for i in range(1000)}
    te = {scene_seed(i, 0, "test") for i in range(1000)}
    va = {scene_seed(i, 0, "val") for i in range(1000)}
    assert not (tr & te) and not (tr & va) and not (va & te)


def test_patch_masks_match_pixels():
    bg = torch.tensor(BACKGROUND).view(3, 1, 1)
    for seed in range(300):
        s = make_scene(seed)
        assert 1 <= len(s.objects) <= 3
        union = torch.zeros(64, dtype=torch.bool)
        for o in s.objects:
            m = object_patch_mask(s, o)
            assert m.dtype == torch.bool and m.shape == (64,)
            assert not (m & union).any()  # objects never share a patch
            union |= m
            # pixels of this object's colour inside its box -> exactly its patches
            x0, y0, x1, y1 = o.box
            assert x0 % PATCH == 0 and y0 % PATCH == 0 and x1 % PATCH == 0 and y1 % PATCH == 0
            rgb = torch.tensor(COLOUR_RGB[o.colour]).view(3, 1, 1)
            pix = torch.zeros(32, 32, dtype=torch.bool)
            pix[y0:y1, x0:x1] = ((s.clean_image - rgb).abs().sum(0) < 1e-6)[y0:y1, x0:x1]
            from_pixels = pix.view(GRID, PATCH, GRID, PATCH).any(3).any(1).reshape(-1)
            assert torch.equal(from_pixels, m), (seed, o)
            assert torch.equal(object_patch_mask(s, s.objects.index(o)), m)
        assert torch.equal(union, pixel_patch_mask(s))
        # everything outside the objects is background
        outside = ~union.view(GRID, 1, GRID, 1).expand(GRID, PATCH, GRID, PATCH).reshape(32, 32)
        assert ((s.clean_image - bg).abs().sum(0)[outside] < 1e-6).all()


def test_questions_well_formed():
    n_yes = n_no = 0
    for seed in range(400):
        s = make_scene(seed)
        shapes = [o.shape for o in s.objects]
        qs = s.questions()
        assert {q.qtype for q in qs} <= set(QUESTION_TYPES)
        for q in qs:
            obj = s.question_object(q)
            if q.qtype in ("colour", "where"):
                assert shapes.count(obj.shape) == 1 and obj.shape in q.text
                assert q.answer == (obj.colour if q.qtype == "colour" else obj.quadrant)
            elif q.qtype == "exist":
                words = q.text.split()
                present = (words[3], words[4]) in {(o.colour, o.shape) for o in s.objects}
                assert q.answer == ("yes" if present else "no")
                assert (obj is not None) == present
                n_yes += q.answer == "yes"
                n_no += q.answer == "no"
            elif q.qtype == "count":
                assert q.answer == ["one", "two", "three"][len(s.objects) - 1] and obj is None
            elif q.qtype == "caption":
                assert q.answer == f"{s.objects[0].colour} {s.objects[0].shape}" and obj is s.objects[0]
            assert len(q.answer.split()) <= 2
    assert 0.4 < n_yes / (n_yes + n_no) < 0.6


# ---------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def ar():
    return load_testbed("llava_ar")


@pytest.fixture(scope="module")
def dif():
    return load_testbed("llada_diffusion")


@pytest.fixture(scope="module")
def heldout():
    # seed 7 of the test split: disjoint from training scenes and from the scenes used
    # for the numbers in TRAINING.md
    return make_dataset(100, seed=7, split="test")


@pytest.mark.parametrize("name", ["llava_ar", "llada_diffusion"])
def test_checkpoint_files(name):
    d = CHECKPOINT_DIR / name
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "testbed.json"):
        assert (d / f).is_file(), d / f
    assert (d / "model.safetensors").stat().st_size < 4_000_000


def test_build_inputs_format(ar):
    model, tok, meta = ar
    s = make_scene(99)
    q = s.question("count")
    inp = build_inputs(tok, meta, s, q)
    ids = inp["input_ids"][0]
    assert ids[0] == tok.bos_token_id
    assert (ids[1:65] == meta["image_token_id"]).all() and (ids == meta["image_token_id"]).sum() == 64
    assert tok.decode(ids[65:]) == "user : how many objects ? assistant :"
    assert inp["pixel_values"].shape == (1, 3, 32, 32)
    assert inp["attention_mask"].shape == inp["input_ids"].shape
    full = build_inputs(tok, meta, s, q, answer=q.answer)["input_ids"][0]
    assert tok.decode(full[65:]) == f"user : how many objects ? assistant : {q.answer} <eos>"
    assert model.config.text_config.is_causal and model.config.image_token_id == meta["image_token_id"]


def test_ar_accuracy(ar, heldout):
    model, tok, meta = ar
    acc = evaluate_accuracy(model, tok, meta, heldout, kind="ar")
    for t in QUESTION_TYPES:
        assert acc[t] >= 0.9, acc


def test_diffusion_accuracy(dif, heldout):
    model, tok, meta = dif
    acc = evaluate_accuracy(model, tok, meta, heldout, kind="diffusion")
    assert acc["overall"] >= 0.85, acc
    for t in QUESTION_TYPES:  # measured: 1.0 on every type
        assert acc[t] >= 0.9, acc
    assert not model.config.text_config.is_causal


def _later_token_effect(model, tok, meta):
    s = make_scene(5)
    q = s.question("colour")
    inp = build_inputs(tok, meta, s, q, answer=q.answer)
    ids = inp["input_ids"]
    ids2 = ids.clone()
    ids2[0, -2] = tok.convert_tokens_to_ids("no" if q.answer != "no" else "yes")
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=inp["pixel_values"]).logits
        b = model(input_ids=ids2, pixel_values=inp["pixel_values"]).logits
    return (a[0, :-2] - b[0, :-2]).abs().max().item()


def test_ar_is_causal(ar):
    assert _later_token_effect(*ar) == 0.0  # causal: later tokens never affect earlier logits


def test_diffusion_is_bidirectional(dif):
    assert _later_token_effect(*dif) > 1e-4


def test_diffusion_generate_trace(dif):
    model, tok, meta = dif
    scenes = make_dataset(4, seed=3, split="test")
    qs = [s.question("caption") for s in scenes]
    inps = [build_inputs(tok, meta, s, q) for s, q in zip(scenes, qs)]
    ids = torch.cat([i["input_ids"] for i in inps])
    px = torch.cat([i["pixel_values"] for i in inps])
    L = ids.shape[1]
    x, trace = diffusion_generate(model, ids, px, gen_len=meta["gen_len"], steps=meta["gen_len"], block_len=1,
                                  mask_id=meta["mask_token_id"], return_trace=True)
    assert torch.equal(x[:, :L], ids) and not (x == meta["mask_token_id"]).any()
    assert len(trace.committed) == meta["gen_len"]
    total = torch.stack(trace.committed).sum(0)
    assert (total[:, :L] == 0).all() and (total[:, L:] == 1).all()  # each generated position once
    # block_len=1 -> left-to-right order
    assert torch.equal(trace.step_of, torch.arange(meta["gen_len"]).expand(4, -1))
    x2 = diffusion_generate(model, ids, px, gen_len=meta["gen_len"], steps=meta["gen_len"],
                            block_len=meta["gen_len"], mask_id=meta["mask_token_id"])
    assert x2.shape == x.shape


def test_text_copy_batch_targets_the_repeat():
    """The text-only copy task (train.py --text-steps/--text-weight): the loss falls on the second copy only,
    and the logits at p are scored against the token at p + 1."""
    from scripts.train_testbed import TOK, make_text_batch
    b = make_text_batch(random.Random(0), 8)
    for ids, am, tg in zip(b["input_ids"], b["attention_mask"], b["targets"]):
        n_tok = int(am.sum())
        n = (n_tok - 2) // 2  # <bos> w*n w*n <eos>
        seq = ids[:n_tok].tolist()
        assert seq[0] == TOK["<bos>"] and seq[-1] == TOK["<eos>"] and seq[1:n + 1] == seq[n + 1:2 * n + 1]
        scored = (tg != -100).nonzero()[:, 0].tolist()
        assert scored == list(range(n, 2 * n + 1))  # predicts the repeat and <eos>
        assert all(tg[p] == ids[p + 1] for p in scored)


def test_text_questions_and_chat_batch():
    """Questions answered from their own words (--text-questions, --text-chat): each answer follows from the text
    alone, and a chat sequence is scored on every next token."""
    from scripts.train_testbed import TOK, make_text_batch, text_questions
    for q in text_questions(random.Random(1), 200):
        w = q.text.split()
        if w[:4] == ["what", "color", "is", "a"]:
            assert q.answer == w[4]
        elif w[0] == "is":  # is a <c> <s> a <s2> ?
            assert q.answer == ("yes" if w[3] == w[5] else "no")
        elif w[:2] == ["how", "many"]:
            assert q.answer == ["one", "two", "three"][len(w) - 4]
        else:
            assert w[0] == "describe" and q.answer == " ".join(w[1:3])
    b = make_text_batch(random.Random(0), 16, chat_share=1.0)
    for ids, am, tg in zip(b["input_ids"], b["attention_mask"], b["targets"]):
        n = int(am.sum())
        assert ids[0] == TOK["<bos>"] and ids[n - 1] == TOK["<eos>"]
        assert torch.equal(tg[: n - 1], ids[1:n]) and (tg[n - 1:] == -100).all()


def test_vary_background_repaints_only_the_background():
    from interp.testbed import make_scene, pixel_patch_mask
    from interp.testbed.scenes import BACKGROUND
    from scripts.train_testbed import vary_background
    rng = random.Random(0)
    for seed in range(5):
        s = make_scene(seed)
        assert vary_background(s, rng, 0.0) is s
        v = vary_background(s, rng, 1.0)
        bg = ((s.clean_image - torch.tensor(BACKGROUND).view(3, 1, 1)).abs().sum(0) <= 1e-6)[None].expand(3, -1, -1)
        assert torch.equal(v.image[~bg], s.image[~bg]) and not torch.equal(v.image[bg], s.image[bg])
        assert v.objects == s.objects and torch.equal(v.clean_image, s.clean_image) and torch.equal(pixel_patch_mask(v), pixel_patch_mask(s))
        assert 0.0 <= v.image.min() and v.image.max() <= 1.0


def test_image_attention_penalty_matches_hf_attentions():
    """The AR training penalty (--image-head-sparsity): sum over LM heads of sqrt(m + 1e-4), m the mean attention
    that question and answer tokens give to the image tokens, rebuilt here from HF's own output_attentions with the
    text positions found from the token ids; the loss is the plain one plus weight x penalty."""
    from scripts.train_testbed import TOK, build_model, compute_loss, image_attention_penalty, make_batch
    model = build_model("ar", seed=0)
    scenes = [make_scene(scene_seed(j, 0, "train")) for j in range(3)]
    b = make_batch(scenes, "ar", random.Random(0), torch.Generator().manual_seed(0))
    with torch.no_grad():
        att = model(input_ids=b["input_ids"], pixel_values=b["pixel_values"], attention_mask=b["attention_mask"],
                    position_ids=b["position_ids"], output_attentions=True).attentions
        ids = b["input_ids"]
        text = (torch.arange(ids.shape[1]) > 64) & (ids != TOK["<pad>"])  # after <bos> + 64 image tokens
        image = ids[0] == TOK["<image>"]
        want = sum((a[..., image].sum(-1).permute(1, 0, 2)[:, text].mean(-1) + 1e-4).sqrt().sum() for a in att)
        assert abs(float(image_attention_penalty(att, b["text_query"]) - want)) < 1e-4
        plain, with_penalty = compute_loss(model, b, "ar"), compute_loss(model, b, "ar", 0.01)
        assert abs(float(with_penalty - plain - 0.01 * want)) < 1e-5
    with pytest.raises(ValueError, match="negative weight"):
        from scripts.train_testbed import train
        train("ar", None, image_head_sparsity=-0.01)
