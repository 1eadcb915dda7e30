"""`interp scan` runs every default analysis on any supported causal LM: tiny random models of each family,
paired with a real tokenizer (SmolLM2's), with and without a chat template. Every analysis either writes a
finding or is listed in the report with the reason it could not run; none crashes."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import interp
from interp.cli import scan

VOCAB = 49152  # SmolLM2's tokenizer


def _tiny(kind: str):
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM)
    torch.manual_seed(0)
    common = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                  intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=1024)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=VOCAB, n_positions=1024))
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common))
    if kind == "gemma3":
        return Gemma3ForCausalLM(Gemma3TextConfig(**common, head_dim=16, sliding_window=16,
                                                  layer_types=["sliding_attention", "full_attention"]))
    return LlamaForCausalLM(LlamaConfig(**common))


@pytest.mark.parametrize("kind,chat_template", [("llama", True), ("qwen2", False), ("gpt2", False), ("gemma3", True)])
def test_scan_runs_every_default_analysis(kind, chat_template, smol, tmp_path):
    tok = copy.deepcopy(smol.tokenizer)
    if not chat_template:
        tok.chat_template = None
    model = interp.load(_tiny(kind), tokenizer=tok, name=f"tiny-{kind}")
    out = tmp_path / "out"
    report = scan(model, out=str(out))  # raises ScanFailed if any analysis crashed
    html = report.read_text()
    import attribution  # noqa: F401
    import probes  # noqa: F401
    from interp import analysis
    for a in analysis.registered(model, scan_only=True):
        short = a.name.rsplit(".", 1)[-1]
        ran = (out / "findings" / f"{short}.json").exists()
        assert ran or f"<b>{short}</b>:" in html, f"{a.name} neither ran nor says why on {kind}"
    assert json.loads((out / "timings.json").read_text())
