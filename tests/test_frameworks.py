"""Models from other frameworks: accelerate ``device_map`` with disk offload, nnsight, TransformerLens 4 bridges."""
import tempfile

import pytest
import torch

import interp
from interp import InterpError, Spec
from tests.conftest import random_ids, tiny_hf

OFFLOAD = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
           "model.layers.1": "disk", "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def saved():
    with tempfile.TemporaryDirectory() as d:
        tiny_hf("llama").save_pretrained(d)
        yield d


def _patterns(model, ids):
    tr = interp.capture(model, ids, sites=["blocks.*.attn.pattern", "logits"])
    return [tr[f"blocks.{l}.attn.pattern"] for l in range(model.n_layers)], tr["logits"]


def test_accelerate_disk_offload_captures_patches_and_generates(saved, tmp_path):
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(saved, device_map=OFFLOAD, offload_folder=str(tmp_path))
    assert any(p.device.type == "meta" for p in hf.parameters())  # layers 1-2 live on disk
    eager = AutoModelForCausalLM.from_pretrained(saved, attn_implementation="eager")
    plain = interp.load(AutoModelForCausalLM.from_pretrained(saved))
    model = interp.load(hf)
    assert model.device == torch.device("cpu")
    ids = random_ids(12, b=2)
    with torch.no_grad():
        ref = eager(input_ids=ids, output_attentions=True)
    pats, logits = _patterns(model, ids)
    for l in range(3):
        assert (pats[l] - ref.attentions[l]).abs().max() <= 1e-5, l
    assert (logits - ref.logits).abs().max() <= 1e-5
    spec = Spec.for_model(model, [{"op": "attn.head_ablate", "layers": [1], "heads": [2], "mode": "zero"}])
    edited = model.logits(ids, spec)
    assert (edited - plain.logits(ids, spec)).abs().max() <= 1e-5  # the same edit as on the model in memory
    assert (edited - logits).abs().max() > 1e-4  # and it did change something
    with torch.no_grad():
        want = eager.generate(input_ids=ids[:1], max_new_tokens=4, do_sample=False)[0, 12:].tolist()
    assert model.generate(ids[:1], max_new_tokens=4) == [want]


def test_nnsight_language_model_is_unwrapped(saved, smol):
    nnsight = pytest.importorskip("nnsight")
    from transformers import AutoModelForCausalLM
    lm = nnsight.LanguageModel(AutoModelForCausalLM.from_pretrained(saved), tokenizer=smol.tokenizer)
    model = interp.load(lm)
    assert model.hf is lm._module and model.tokenizer is smol.tokenizer
    ids = random_ids(10)
    got = _patterns(model, ids)
    want = _patterns(interp.load(AutoModelForCausalLM.from_pretrained(saved)), ids)
    for a, b in zip(got[0] + [got[1]], want[0] + [want[1]]):
        assert torch.equal(a, b)


def test_attention_outside_the_engine_is_refused_not_empty():
    """A layer whose attention does not reach interp's function (replaced, or tied to no engine) is named in an
    error instead of missing from the trace."""
    model = interp.load(tiny_hf("llama"))
    model.adapter.attn[1]._interp_engine = None
    with pytest.raises(InterpError, match=r"layers \[1\] did not run through"):
        interp.capture(model, random_ids(6), sites="blocks.*.attn.pattern")
    assert model.engine.hooks == []


def _boot_bridge(folder, hf, tokenizer, monkeypatch):
    pytest.importorskip("transformer_lens")
    from transformer_lens.model_bridge.sources.transformers import helpers
    monkeypatch.setattr(helpers, "_ensure_torchvision", lambda: False)  # never let it pip-install torchvision
    from transformer_lens.model_bridge.sources.transformers.source import boot
    tokenizer.save_pretrained(folder)
    return boot(folder, hf_model=hf, tokenizer=tokenizer, device="cpu")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_transformer_lens_bridge_is_unwrapped(kind, smol, monkeypatch, tmp_path):
    """interp.load(bridge) captures the HF model the bridge wraps: the patterns and residual stream of interp.load
    on the same weights, and of the bridge's own hooks; the bridge itself is left as it is."""
    from transformers import AutoModelForCausalLM
    tiny_hf(kind).save_pretrained(tmp_path)
    bridge = _boot_bridge(tmp_path, AutoModelForCausalLM.from_pretrained(tmp_path), smol.tokenizer, monkeypatch)
    ids = random_ids(10)
    with torch.no_grad():
        before, cache = bridge.run_with_cache(ids)
    model = interp.load(bridge)
    assert model.source == "transformer_lens.TransformerBridge" and model.tokenizer is bridge.tokenizer
    assert not any(type(m).__module__.startswith("transformer_lens") for m in model.hf.modules())
    assert model.hf.lm_head.weight is bridge.original_model.lm_head._original_component.weight  # shared, not copied
    sites = ["blocks.*.attn.pattern", "blocks.*.resid_post", "logits"]
    got = interp.capture(model, ids, sites=sites)
    want = interp.capture(interp.load(AutoModelForCausalLM.from_pretrained(tmp_path)), ids, sites=sites)
    L = model.n_layers
    for l in range(L):
        pat = got[f"blocks.{l}.attn.pattern"]
        assert (pat - want[f"blocks.{l}.attn.pattern"]).abs().max() <= 1e-5, l
        assert (pat - cache[f"blocks.{l}.attn.hook_pattern"]).abs().max() <= 1e-5, l  # the bridge's own pattern
        assert torch.equal(got[f"blocks.{l}.resid_post"], want[f"blocks.{l}.resid_post"]), l
        assert (got[f"blocks.{l}.resid_post"] - cache[f"blocks.{l}.hook_out"]).abs().max() <= 1e-5, l
    assert torch.equal(got["logits"], want["logits"])
    spec = Spec.for_model(model, [{"op": "attn.head_ablate", "layers": [1], "heads": [2], "mode": "zero"}])
    assert (model.logits(ids, spec) - got["logits"]).abs().max() > 1e-4  # edits reach the unwrapped model
    with torch.no_grad():
        after = bridge(ids)
    assert torch.equal(before, after)  # the bridge computes what it computed before
    assert type(bridge.blocks[0].attn).__module__.startswith("transformer_lens")


def test_transformer_lens_bridge_with_processed_weights_is_refused(saved, smol, monkeypatch):
    """A bridge whose weights were processed (layer norms folded) no longer wraps the checkpoint's computation."""
    from transformers import AutoModelForCausalLM
    bridge = _boot_bridge(saved, AutoModelForCausalLM.from_pretrained(saved), smol.tokenizer, monkeypatch)
    bridge._weights_processed = True
    with pytest.raises(InterpError, match="processed its weights"):
        interp.load(bridge)


def test_nnsight_patterns_equal_hf_eager(saved, smol):
    """nnsight's own view (eager self_attn weights saved in a trace) and interp.load(LanguageModel) agree."""
    nnsight = pytest.importorskip("nnsight")
    from transformers import AutoModelForCausalLM
    lm = nnsight.LanguageModel(AutoModelForCausalLM.from_pretrained(saved, attn_implementation="eager"),
                               tokenizer=smol.tokenizer)
    ids = random_ids(10)
    saved_w = []
    with torch.no_grad(), lm.trace(ids):
        for l in range(3):
            saved_w.append(lm.model.layers[l].self_attn.output[1].save())
    got = _patterns(interp.load(lm), ids)[0]
    for l in range(3):
        assert (got[l] - saved_w[l]).abs().max() <= 1e-5, l
