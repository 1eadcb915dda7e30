"""smol_llava: the LLaVA testbed on the embedded SmolLM2-135M-Instruct (interp/testbed/smol.py).

The assembled model is SmolLM2 plus the committed LoRA merge on text, holds exactly the committed vision weights,
inserts the projected patch features at the image-token positions as HF's own forward does, answers in the trained
one-word format and above chance (interp/testbed/TRAINING.md), and ``interp scan`` picks its vision analyses, which
run on it."""
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
    assert (FOLDER / "vision.safetensors").stat().st_size < 8_000_000
    meta = json.loads((FOLDER / "testbed.json").read_text())
    assert meta["language_model"] == "smollm2" and meta["n_image_tokens"] == 16
    assert set(meta["training"]["test_accuracy"]) >= {"colour", "exist", "count", "where", "caption", "overall"}


def test_committed_weights_load(vlm):
    from safetensors.torch import load_file
    model, tok, meta = vlm
    state = load_file(str(FOLDER / "vision.safetensors"))
    own = model.state_dict()
    vision = {k: v for k, v in state.items() if not k.endswith((".lora_A", ".lora_B"))}
    assert vision and all(k.startswith(("model.vision_tower.", "model.multi_modal_projector.")) for k in vision)
    for k, v in vision.items():
        assert torch.equal(own[k], v), k
    assert model.config.image_token_index == meta["image_token_id"] == tok.convert_tokens_to_ids("<filename>")
    assert len(tok) == model.config.text_config.vocab_size == 49152  # the vocabulary is not resized


def test_language_model_is_smollm2_plus_the_merged_lora(vlm, smol_lm):
    """Every LM weight is SmolLM2's, except the LoRA-adapted projections, which are W + (alpha/r) B A computed here
    from the committed factors; on text the VLM then equals SmolLM2 carrying those weights, logit for logit."""
    from safetensors.torch import load_file
    model, tok, meta = vlm
    lora = {k: v for k, v in load_file(str(FOLDER / "vision.safetensors")).items() if k.endswith((".lora_A", ".lora_B"))}
    spec = meta.get("lora")
    assert bool(lora) == bool(spec)
    expected = {k: v.clone() for k, v in smol_lm.hf.state_dict().items()}
    for name in {k.rsplit(".", 1)[0] for k in lora}:
        a, b = lora[name + ".lora_A"], lora[name + ".lora_B"]
        assert a.shape[0] == b.shape[1] == spec["rank"]
        key = name.replace("model.language_model.", "model.") + ".weight"
        expected[key] = expected[key] + (spec["alpha"] / spec["rank"]) * (b @ a)
    changed = 0
    for k, v in model.model.language_model.state_dict().items():
        torch.testing.assert_close(v, expected["model." + k], rtol=0, atol=1e-6)
        changed += int(not torch.equal(v, smol_lm.hf.state_dict()["model." + k]))
    assert changed == len(lora) // 2  # exactly the adapted projections differ from SmolLM2
    assert torch.equal(model.lm_head.weight, expected["lm_head.weight"])
    ids = tok("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n", return_tensors="pt")["input_ids"]
    assert not (ids == model.config.image_token_index).any()
    import copy
    ref_lm = copy.deepcopy(smol_lm.hf)
    ref_lm.load_state_dict(expected)
    model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            got = model(input_ids=ids).logits
            ref = ref_lm(input_ids=ids).logits
    finally:
        model.set_attn_implementation("eager")
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


def test_assembling_leaves_a_given_lm_untouched(smol_lm):
    """assemble_vlm(lm=...) reuses a loaded SmolLM2: the LoRA merge goes into a copy, never into the caller's model."""
    from interp.model import assemble_vlm
    before = {k: v.clone() for k, v in smol_lm.hf.state_dict().items()}
    hf, _ = assemble_vlm(FOLDER, lm=smol_lm.hf)
    for k, v in smol_lm.hf.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert hf.model.vision_tower is not None


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


def test_answers_in_the_trained_format(vlm):
    """Greedy decoding until <|im_end|> gives one answer of the question's type (a colour word, yes/no, a count
    word, a quadrant word, "<colour> <shape>"), where SmolLM2 alone answers in sentences; and the recorded held-out
    accuracy is far above chance (overall chance is about 0.26), which these few scenes confirm."""
    from interp.testbed.vocab import COLOURS, COUNT_WORDS, SHAPES, WHERE_WORDS
    model, tok, meta = vlm
    valid = {"colour": set(COLOURS), "exist": {"yes", "no"}, "count": set(COUNT_WORDS), "where": set(WHERE_WORDS),
             "caption": {f"{c} {s}" for c in COLOURS for s in SHAPES}}
    scenes = make_dataset(6, seed=7, split="test")
    acc = evaluate_accuracy(model, tok, meta, scenes, return_predictions=True)
    preds = acc["predictions"]
    assert len(preds) >= 25
    ok = [p in valid[q.qtype] for _, q, p in preds]
    assert sum(ok) / len(ok) >= 0.9, [(q.text, p) for _, q, p in preds]
    recorded = json.loads((FOLDER / "testbed.json").read_text())["training"]["test_accuracy"]
    assert recorded["overall"] >= 0.5 and sum(recorded["n"].values()) >= 500
    assert sum(p == q.answer for _, q, p in preds) / len(preds) >= 0.4


def test_scan_picks_the_vision_analyses(vlm):
    """`interp scan --model smol_llava` selects the analyses that require "vision" (the whole default scan of
    visual_sinks alone takes minutes on 63 prompts, so here it runs on the prompts of 2 scenes)."""
    import interp
    from interp import analysis
    from interp.cli import _analyses, _select
    from interp.testbed.items import default_items
    model = interp.load("smol_llava")
    assert model.adapter.image_token_id == 6 and model.n_layers == 30
    _analyses()
    chosen = {a.name for a in _select(analysis, model, None)}
    assert {"probes.visual_sinks", "probes.vhd", "probes.image_attention"} <= chosen
    items = default_items(model, n_scenes=2)
    f = analysis.REGISTRY["probes.visual_sinks"].run(model, items)
    assert f.metrics["n_prompts"] == len(items) and len(f.metrics["image_sinks_per_prompt_by_layer"]) == 30


def test_task_items_follow_the_model(vlm):
    """A `testbed_vqa` task item (a JSON object with a scene seed) becomes a VQAItem in the prompt template and patch
    grid of the model it is scored on: smol_llava's chat markup with 16 image tokens, not llava_ar's 64."""
    import interp
    from interp import vlm as vlm_mod
    from interp.tasks import load_task
    model, tok, meta = vlm
    m = interp.load(model, tokenizer=tok, name="smol_llava")
    d = load_task("testbed_vqa").items[0]
    it = vlm_mod.as_items([d], m)[0]
    assert it.prompt.startswith("<|im_start|>user\n") and it.prompt.count(meta["image_token"]) == 16
    assert d["question"] in it.prompt and it.prompt.endswith("<|im_start|>assistant\n")
    default = vlm_mod.as_items([d])[0]  # no model: the default testbed's template
    assert default.prompt != it.prompt and default.prompt.count(meta["image_token"]) == 0
    b = vlm_mod.encode_vqa(m, [d])
    assert int((b.input_ids[0] == meta["image_token_id"]).sum()) == 16
