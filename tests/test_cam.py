"""LLaVA-CAM on the trained AR testbed: Grad-CAM against captum, localisation against the testbed's
ground truth (pointing game / energy in box vs random, all-objects and occlusion), attention share,
cliff layer and the truncation test."""
import copy

import pytest
import torch
from torch import nn

import interp
from attribution.cam import METHODS, cam, cam_maps, cliff_layer, truncation_accuracy
from interp.testbed import CHECKPOINT_DIR, GRID, build_inputs, load_testbed, make_dataset
from interp.testbed.localize import (all_objects_maps, localisation_items, localisation_table, occlusion_maps,
                                     random_maps, target_masks)

pytestmark = pytest.mark.skipif(not (CHECKPOINT_DIR / "llava_ar" / "model.safetensors").exists(),
                                reason="the AR testbed checkpoint is not committed")


@pytest.fixture(scope="module")
def testbed():
    torch.set_num_threads(1)
    hf, tok, meta = load_testbed("llava_ar")
    return interp.load(hf, tokenizer=tok, name="testbed-llava-ar"), tok, meta


class _ImageGrid(nn.Module):
    """Wraps a decoder layer so that the image rows of its input (``resid_pre``) or output (``resid_post``)
    pass through ``self.grid``, an identity module, in the [B, C, h, w] layout captum's LayerGradCam
    expects (it averages gradients over dims ≥ 2 and sums dim 1; on the layer's own [B, T, C] output the
    tokens would be the channels). Values and gradients are unchanged."""

    def __init__(self, layer: nn.Module, pos: torch.Tensor, where: str):
        super().__init__()
        self.layer, self.pos, self.where, self.grid = layer, pos, where, nn.Identity()

    def route(self, h):
        B, _, C = h.shape
        img = self.grid(h[:, self.pos].transpose(1, 2).reshape(B, C, GRID, GRID))
        return h.index_copy(1, self.pos, img.reshape(B, C, -1).transpose(1, 2))

    def forward(self, hidden_states, *args, **kw):
        if self.where == "resid_pre":
            hidden_states = self.route(hidden_states)
        out = self.layer(hidden_states, *args, **kw)
        if self.where == "resid_post":
            out = (self.route(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else self.route(out)
        return out


@pytest.mark.parametrize("site,layer", [("resid_pre", 0), ("resid_pre", 2), ("resid_post", 1)])
def test_grad_cam_equals_captum(testbed, site, layer):
    from captum.attr import LayerGradCam
    m, tok, meta = testbed
    scenes = make_dataset(3, seed=11, split="test")
    qs = [s.question("colour") or s.question("count") for s in scenes]
    encs = [build_inputs(tok, meta, s, q) for s, q in zip(scenes, qs)]
    for inp, q in zip(encs, qs):
        target = tok.convert_tokens_to_ids(q.answer.split()[0])
        raw = cam_maps(m, inp, target, layers=[layer], site=site)["raw"][0, 0]  # [64]
        ref_model = copy.deepcopy(m.hf)
        ref_model.set_attn_implementation("eager")
        pos = torch.nonzero(inp["input_ids"][0] == m.adapter.image_token_id)[:, 0]
        layers = ref_model.model.language_model.layers
        layers[layer] = _ImageGrid(layers[layer], pos, site)

        def forward(px):
            return ref_model(input_ids=inp["input_ids"], pixel_values=px).logits[:, -1, target]
        ref = LayerGradCam(forward, layers[layer].grid).attribute(inp["pixel_values"].clone())  # [1, 1, 8, 8]
        ref = ref.detach().reshape(-1)
        assert ref.abs().max() > 1e-4  # a real map, not zeros on both sides
        assert (raw - ref).abs().max() <= 1e-5
        assert (raw - ref).abs().max() <= 1e-4 * ref.abs().max()
