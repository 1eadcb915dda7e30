"""smol_llava: the LLaVA testbed on the embedded SmolLM2-135M-Instruct (interp/testbed/smol.py).

The assembled model is SmolLM2 on text, holds exactly the committed vision weights, inserts the projected patch
features at the image-token positions as HF's own forward does, answers held-out scene questions far above chance,
and ``interp scan`` picks and runs its vision analyses."""
from __future__ import annotations

import json
import random

import pytest
import torch

from interp.testbed import CHECKPOINT_DIR, build_inputs, evaluate_accuracy, load_testbed, make_dataset

FOLDER = CHECKPOINT_DIR / "smol_llava"


@pytest.fixture(scope="module")
def vlm():
    return load_testbed("smol_llava")


@pytest.fixture(scope="module")
def smol_lm():
    import interp
    return interp.load("smollm2")


def test_folder_holds_only_the_vision_part():
    files = sorted(p.name for p in FOLDER.iterdir())
    assert files == ["config.json", "testbed.json", "vision.safetensors"]
    assert (FOLDER / "vision.safetensors").stat().st_size < 5_000_000
    meta = json.loads((FOLDER / "testbed.json").read_text())
    assert meta["language_model"] == "smollm2" and meta["n_image_tokens"] == 16
    assert set(meta["training"]["test_accuracy"]) >= {"colour", "exist", "count", "where", "caption", "overall"}


def test_committed_weights_load(vlm):
    from safetensors.torch import load_file
    model, tok, meta = vlm
    state = load_file(str(FOLDER / "vision.safetensors"))
    own = model.state_dict()
    assert state and all(k.startswith(("model.vision_tower.", "model.multi_modal_projector.")) for k in state)
    for k, v in state.items():
        assert torch.equal(own[k], v), k
    assert model.config.image_token_index == meta["image_token_id"] == tok.convert_tokens_to_ids("<filename>")
    assert len(tok) == model.config.text_config.vocab_size == 49152  # the vocabulary is not resized


def test_text_only_equals_smollm2(vlm, smol_lm):
    model, tok, _ = vlm
    ids = tok("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n", return_tensors="pt")["input_ids"]
    assert not (ids == model.config.image_token_index).any()
    model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            got = model(input_ids=ids).logits
            ref = smol_lm.hf(input_ids=ids).logits
    finally:
        model.set_attn_implementation("eager")
    assert torch.equal(got, ref)
    # the LM weights are SmolLM2's, parameter for parameter (the tied head included)
    lm_state = smol_lm.hf.state_dict()
    for k, v in model.model.language_model.state_dict().items():
        assert torch.equal(v, lm_state["model." + k]), k
    assert torch.equal(model.lm_head.weight, lm_state["lm_head.weight"])


def test_image_features_at_image_tokens(vlm):
    """Reference: the projected patch features written into the token embeddings by hand, run through the LM."""
    model, tok, meta = vlm
    scene = make_dataset(1, seed=5, split="test")[0]
    inp = build_inputs(tok, meta, scene, scene.question("count"))
    ids = inp["input_ids"]
    at = (ids[0] == meta["image_token_id"]).nonzero()[:, 0]
    assert at.tolist() == list(range(meta["image_token_offset"], meta["image_token_offset"] + 16))
    with torch.no_grad():
        out = model(**inp).logits
        vt = model.model.vision_tower(inp["pixel_values"], output_hidden_states=True).hidden_states[-1][:, 1:]
        feats = model.model.multi_modal_projector(vt)[0]  # [16, 576]: CLS dropped, row-major patches
        emb = model.model.language_model.embed_tokens(ids).clone()
        emb[0, at] = feats
        h = model.model.language_model(inputs_embeds=emb, attention_mask=inp["attention_mask"]).last_hidden_state
        ref = model.lm_head(h)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    # and the image matters: another scene's image changes the answer logits
    other = make_dataset(2, seed=5, split="test")[1]
    with torch.no_grad():
        out2 = model(input_ids=ids, pixel_values=build_inputs(tok, meta, other, "x")["pixel_values"]).logits
    assert (out2[0, -1] - out[0, -1]).abs().max() > 1e-2


def test_held_out_accuracy_far_above_chance(vlm):
    """20 held-out scenes (test split, seed 7): chance is ~0.2-0.5 per type (5 colours, yes/no, 3 counts,
    4 quadrants, 20 captions); greedy decoding until <|im_end|>, exact match."""
    model, tok, meta = vlm
    scenes = make_dataset(20, seed=7, split="test")
    acc = evaluate_accuracy(model, tok, meta, scenes, qtypes=("colour", "count", "exist"))
    assert acc["overall"] >= 0.7, acc
    # a text-only baseline (the image of every scene replaced by an empty one) is near chance: it is the image
    blank = [s for s in scenes]
    for s in blank:
        s.image = torch.full_like(s.image, 0.08)
    acc0 = evaluate_accuracy(model, tok, meta, blank, qtypes=("colour", "count", "exist"))
    assert acc0["overall"] < acc["overall"] - 0.2, (acc, acc0)


def test_scan_picks_the_vision_analyses(vlm, tmp_path):
    import interp
    from interp import analysis
    from interp.cli import _analyses, scan
    model = interp.load("smol_llava")
    assert model.adapter.image_token_id == 6 and model.n_layers == 30
    _analyses()
    chosen = {a.name for a in analysis.registered(model, scan_only=True)}
    assert {"probes.visual_sinks", "probes.vhd", "probes.image_attention"} <= chosen
    random.seed(0)
    report = scan(model, probes="visual_sinks", out=str(tmp_path))
    f = json.loads((tmp_path / "findings" / "visual_sinks" / "finding.json").read_text()) \
        if (tmp_path / "findings" / "visual_sinks" / "finding.json").exists() else None
    assert report.exists()
    assert (tmp_path / "findings" / "visual_sinks").exists()
    assert f is None or f["name"] == "probes.visual_sinks"
