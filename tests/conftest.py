import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def smol():
    import interp
    return interp.load("smollm2")


def tiny_hf(kind: str, seed: int = 0):
    """A tiny random model of one family, built from a config (offline)."""
    from transformers import (Gemma3TextConfig, Gemma3ForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM)
    torch.manual_seed(seed)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_layer=3, n_head=4, n_embd=64, vocab_size=128, n_positions=64))
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                            hidden_size=64, intermediate_size=128, vocab_size=128,
                                            max_position_embeddings=64))
    if kind == "gemma3":
        return Gemma3ForCausalLM(Gemma3TextConfig(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                                  hidden_size=64, intermediate_size=128, vocab_size=128, head_dim=16,
                                                  max_position_embeddings=64, sliding_window=4,
                                                  layer_types=["sliding_attention", "full_attention", "sliding_attention"]))
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                            hidden_size=64, intermediate_size=128, vocab_size=128,
                                            max_position_embeddings=64))
    raise ValueError(kind)


@pytest.fixture(params=["gpt2", "qwen2", "gemma3", "llama"])
def tiny(request):
    import interp
    return interp.load(tiny_hf(request.param), name=f"tiny-{request.param}")


def random_ids(n: int = 12, b: int = 1, vocab: int = 128, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (b, n), generator=g)


class ForceEager:
    """Test-only engine hook that edits nothing but does not promise to be read-only, so attention runs
    the eager formula for the output too (``with model.engine.using(ForceEager()): ...``)."""

    read_only = False

    def needs(self, layer):
        return {"weights"}

    def on_weights(self, layer, weights, call):
        return None


def load_testbed_model(name: str):
    """A committed testbed VLM (``"llava_ar"`` / ``"llada_diffusion"``) as an interp Model, with its tokenizer
    and meta."""
    import interp
    from interp.testbed import load_testbed
    hf, tok, meta = load_testbed(name)
    return interp.load(hf, tokenizer=tok, name=name), tok, meta
