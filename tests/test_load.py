"""interp.load leaves a user's model as it is, checks what it loads, and fails fast and clearly."""
import json
import shutil
import threading
import time

import pytest
import torch

import interp
from interp import InterpError, KeyMass
from interp.embedded import embedded_path, lock, sha256_file
from interp.model import TESTBED_DIR, _save_converted
from tests.conftest import random_ids, tiny_hf


def _outputs(hf, ids):
    with torch.no_grad():
        return hf(input_ids=ids, output_attentions=True)


def test_user_model_keeps_dtype_attention_and_outputs():
    """Regression: load() converted a bf16 model to fp32 in place and switched its attention implementation, so
    the user's own output_attentions came back as an empty tuple."""
    hf = tiny_hf("llama").to(torch.bfloat16).eval()
    hf.set_attn_implementation("eager")
    ids = random_ids(10, b=2)
    before = _outputs(hf, ids)
    assert len(before.attentions) == 3
    model = interp.load(hf)

    def unchanged():
        assert all(p.dtype == torch.bfloat16 for p in hf.parameters())
        assert hf.config._attn_implementation == "eager"
        now = _outputs(hf, ids)
        assert torch.equal(now.logits, before.logits)
        assert len(now.attentions) == 3 and all(torch.equal(a, b) for a, b in zip(now.attentions, before.attentions))

    unchanged()
    tr = interp.capture(model, ids, sites="blocks.*.attn.pattern", reducers=[KeyMass()])
    unchanged()
    for l in range(3):  # a bf16 capture runs, and equals HF eager's own bf16 weights up to bf16 rounding
        assert tr[f"blocks.{l}.attn.pattern"].dtype == torch.bfloat16
        assert (tr[f"blocks.{l}.attn.pattern"].float() - before.attentions[l].float()).abs().max() <= 2e-2
        km = tr[f"blocks.{l}.attn.key_mass"]  # accumulated in fp32
        assert km.dtype == torch.float32
        assert (km - before.attentions[l].float().sum(2)).abs().max() <= 5e-2
    model.generate(ids[:1], max_new_tokens=2)
    unchanged()


def test_sdpa_model_stays_sdpa_and_dtype_converts_only_when_asked():
    hf = tiny_hf("qwen2").eval()
    impl = hf.config._attn_implementation
    ids = random_ids(8)
    with torch.no_grad():
        before = hf(input_ids=ids).logits
    model = interp.load(hf)
    assert hf.config._attn_implementation == impl != "interp"
    with torch.no_grad():
        assert torch.equal(hf(input_ids=ids).logits, before)
        assert torch.equal(model.logits(ids), before)  # interp's idle engine computes what the model computes
    assert hf.config._attn_implementation == impl
    half = interp.load(tiny_hf("qwen2"), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.hf.parameters())


def test_fp16_capture_runs():
    hf = tiny_hf("gpt2").to(torch.float16).eval()
    hf.set_attn_implementation("eager")
    ids = random_ids(9)
    ref = _outputs(hf, ids)
    tr = interp.capture(interp.load(hf), ids, sites="blocks.*.attn.pattern", reducers=[KeyMass()])
    for l in range(3):
        assert (tr[f"blocks.{l}.attn.pattern"].float() - ref.attentions[l].float()).abs().max() <= 5e-3
        assert tr[f"blocks.{l}.attn.key_mass"].dtype == torch.float32


def test_corrupt_embedded_gguf_is_refused_before_converting(tmp_path, monkeypatch):
    """Regression: the embedded GGUF was trusted by its lock-file hash, so a corrupted file was dequantised
    (NaN logits) and the bad conversion cached under the good hash."""
    src = embedded_path()
    if src is None:
        pytest.skip("the embedded model is not fetched here")
    monkeypatch.setenv("INTERP_CACHE", str(tmp_path))
    bad = tmp_path / "models" / lock()["file"]
    bad.parent.mkdir(parents=True)
    shutil.copyfile(src, bad)
    with open(bad, "r+b") as f:  # overwrite 4 KiB of tensor data in the middle
        f.seek(bad.stat().st_size // 2)
        f.write(b"\xff" * 4096)
    assert embedded_path() == bad and sha256_file(bad) != lock()["sha256"]
    with pytest.raises(InterpError, match="corrupt: its sha256"):
        interp.load("smollm2")
    assert not (tmp_path / "converted").exists() or not any((tmp_path / "converted").iterdir())


def test_concurrent_conversions_do_not_share_a_folder(tmp_path, smol):
    """Regression: every conversion wrote into the same '<sha>.tmp' folder, so two processes converting at once
    mixed their files or lost the rename."""
    hf = tiny_hf("llama")
    dest = tmp_path / "converted" / "abc"
    start, errors = threading.Barrier(4), []

    def convert():
        start.wait()
        try:
            _save_converted(hf, smol.tokenizer, dest)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=convert) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(p.name for p in dest.parent.iterdir()) == ["abc"]  # no temporary folder left behind
    back = interp.load(dest)
    for a, b in zip(back.hf.parameters(), hf.parameters()):
        assert torch.equal(a, b)


def _folder(tmp_path, name, config=None, weights=False):
    d = tmp_path / name
    d.mkdir()
    if config is not None:
        (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if weights:
        tiny_hf("llama").save_pretrained(d)
    return d


def test_bad_folders_give_clear_errors(tmp_path):
    """Regression: a folder with a bad config or no weights raised transformers' own errors."""
    llama = tiny_hf("llama").config.to_dict()
    with pytest.raises(InterpError, match="config.json"):
        interp.load(_folder(tmp_path, "badjson", "{not json"))
    with pytest.raises(InterpError, match="config.json"):
        interp.load(_folder(tmp_path, "badtype", {"model_type": "no-such-architecture"}))
    with pytest.raises(InterpError, match="no readable weights"):
        interp.load(_folder(tmp_path, "noweights", llama))
    d = _folder(tmp_path, "truncated", weights=True)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(InterpError, match="truncated"):
        interp.load(d)


def test_unreachable_hub_id_fails_fast():
    """Regression: an id not in the cache, without a network, retried for ~24 s before failing."""
    t = time.perf_counter()
    with pytest.raises(InterpError, match="local"):
        interp.load("someone/some-model-that-is-not-cached")
    assert time.perf_counter() - t < 8


def test_testbed_checkpoints_load_by_name():
    assert (TESTBED_DIR / "llava_ar" / "config.json").exists()
    m = interp.load("llava_ar")
    assert m.name == "llava_ar" and m.family == "llava"
