"""Model adapters: the one place that knows where things live in each architecture family.

An adapter answers, for one loaded HF model: which modules are the decoder layers, the attention
modules, the MLPs, the final norm and the unembedding; the layer/head geometry; and whether the
language model attends causally. Everything else in interp (capture, patching, probes) asks the
adapter and never inspects architectures itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .errors import InterpError


@dataclass
class Adapter:
    """Where the pieces of one model are. Built by :func:`adapter_for`."""

    family: str
    lm: nn.Module  # the module whose forward takes input_ids/inputs_embeds (the text decoder stack)
    layers: list[nn.Module]  # decoder blocks, in order
    attn: list[nn.Module]  # self-attention module of each block (routes through the attention interface)
    mlp: list[nn.Module]  # MLP of each block
    embed: nn.Module  # token embedding
    final_norm: nn.Module
    unembed: nn.Module  # lm_head (Linear, may be tied)
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int
    vocab_size: int
    max_positions: int | None
    causal: bool = True
    image_token_id: int | None = None  # VLMs: the placeholder token spliced with image features
    mask_token_id: int | None = None  # masked-diffusion LMs
    extra: dict = field(default_factory=dict)
    attn_norm: list = field(default_factory=list)  # the norm each block applies before attention (pre-norm models)
    mlp_norm: list = field(default_factory=list)  # the norm each block applies before its MLP
    attn_out: list = field(default_factory=list)  # each attention's output projection (its input: the heads' z)
    mlp_out: list = field(default_factory=list)  # each MLP's output (down) projection (its input: the neurons)

    def final_norm_apply(self, h: torch.Tensor) -> torch.Tensor:
        return self.final_norm(h)

    def out_proj(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The attention output projection of ``layer`` as W_O [n_heads, head_dim, d_model] and its bias b_O
        [d_model] or None, so that attn.out = Σ_h z_h W_O[h] + b_O with z = ``blocks.{layer}.attn.z``
        (Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits": W_O split by head)."""
        lin = self.attn_out[layer] if layer < len(self.attn_out) else None
        if lin is None or getattr(lin, "weight", None) is None:
            raise InterpError(f"{self.family}: no output projection in layer {layer}'s attention "
                              f"({type(self.attn[layer]).__name__}); per-head attribution needs it")
        W = _in_out(lin)  # [n_heads·head_dim, d_model]
        if W.shape[0] != self.n_heads * self.head_dim:
            raise InterpError(f"{self.family}: the output projection takes {W.shape[0]} inputs, not "
                              f"n_heads·head_dim = {self.n_heads * self.head_dim}")
        return W.reshape(self.n_heads, self.head_dim, -1), (lin.bias.detach() if lin.bias is not None else None)

    def down_proj(self, layer: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor | None]:
        """The MLP output projection of ``layer``: (the module, whose input holds the neurons' activations a;
        W_down [d_mlp, d_model]; its bias [d_model] or None), so that mlp.out = Σ_n a_n W_down[n] + b."""
        m = self.mlp_out[layer] if layer < len(self.mlp_out) else None
        if m is None or getattr(m, "weight", None) is None:
            raise InterpError(f"{self.family}: no down projection in layer {layer}'s MLP "
                              f"({type(self.mlp[layer]).__name__}); neuron attribution needs it")
        return m, _in_out(m), (m.bias.detach() if m.bias is not None else None)


def _in_out(proj: nn.Module) -> torch.Tensor:
    """A projection's weight as [inputs, outputs] (detached): nn.Linear stores [out, in] (y = x Wᵀ + b), GPT-2's
    Conv1D [in, out] (y = x W + b)."""
    return (proj.weight.T if isinstance(proj, nn.Linear) else proj.weight).detach()


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _llama_like(model: nn.Module, family: str) -> Adapter:
    base = model.model if hasattr(model, "model") else model
    # VLMs (LLaVA-style): model.model.language_model is the decoder stack.
    lm = getattr(base, "language_model", base)
    cfg = _text_config(model.config)
    layers = list(lm.layers)
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    return Adapter(
        family=family,
        lm=lm,
        layers=layers,
        attn=[layer.self_attn for layer in layers],
        mlp=[layer.mlp for layer in layers],
        embed=lm.embed_tokens,
        final_norm=lm.norm,
        unembed=model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else model.lm_head,
        n_layers=len(layers),
        n_heads=n_heads,
        n_kv_heads=getattr(cfg, "num_key_value_heads", None) or n_heads,
        head_dim=head_dim,
        d_model=cfg.hidden_size,
        vocab_size=cfg.vocab_size,
        max_positions=getattr(cfg, "max_position_embeddings", None),
        causal=getattr(cfg, "is_causal", True) is not False,
        attn_norm=[getattr(layer, "input_layernorm", None) for layer in layers],
        mlp_norm=[getattr(layer, "post_attention_layernorm", None) for layer in layers],
        attn_out=[getattr(layer.self_attn, "o_proj", None) for layer in layers],
        mlp_out=[getattr(layer.mlp, "down_proj", None) for layer in layers],
    )


def _gpt2(model: nn.Module, family: str) -> Adapter:
    tr = model.transformer
    cfg = model.config
    layers = list(tr.h)
    return Adapter(
        family=family,
        lm=tr,
        layers=layers,
        attn=[b.attn for b in layers],
        mlp=[b.mlp for b in layers],
        embed=tr.wte,
        final_norm=tr.ln_f,
        unembed=model.lm_head,
        n_layers=len(layers),
        n_heads=cfg.n_head,
        n_kv_heads=cfg.n_head,
        head_dim=cfg.n_embd // cfg.n_head,
        d_model=cfg.n_embd,
        vocab_size=cfg.vocab_size,
        max_positions=cfg.n_positions,
        attn_norm=[b.ln_1 for b in layers],
        mlp_norm=[b.ln_2 for b in layers],
        attn_out=[b.attn.c_proj for b in layers],
        mlp_out=[b.mlp.c_proj for b in layers],
    )


def _llava(model: nn.Module, family: str) -> Adapter:
    ad = _llama_like(model, family)
    cfg = model.config
    ad.image_token_id = getattr(cfg, "image_token_id", None)
    if ad.image_token_id is None:
        ad.image_token_id = getattr(cfg, "image_token_index", None)
    return ad


# model_type -> (family, builder). Llama-like families share one builder: same module names.
FAMILIES: dict[str, tuple[str, Callable[[nn.Module, str], Adapter]]] = {
    "llama": ("llama", _llama_like),
    "mistral": ("llama", _llama_like),
    "qwen2": ("qwen2", _llama_like),
    "qwen3": ("qwen3", _llama_like),
    "gemma2": ("gemma", _llama_like),
    "gemma3_text": ("gemma", _llama_like),
    "gemma": ("gemma", _llama_like),
    "phi3": ("llama", _llama_like),
    "gpt2": ("gpt2", _gpt2),
    "llava": ("llava", _llava),
    "llava_next": ("llava", _llava),
    "llava_onevision": ("llava", _llava),
    "qwen2_vl": ("qwen2_vl", _llava),
    "qwen2_5_vl": ("qwen2_vl", _llava),
}


def adapter_for(model: nn.Module) -> Adapter:
    """Build the adapter for an HF model, or raise a clear error naming the supported families."""
    mtype = getattr(model.config, "model_type", None)
    if mtype not in FAMILIES:
        raise InterpError(
            f"unsupported architecture {mtype!r}: interp has adapters for "
            f"{', '.join(sorted(FAMILIES))}. Add one in interp/adapters.py (a dozen lines: where the "
            "decoder layers, attention, MLP, final norm and unembedding live)."
        )
    family, build = FAMILIES[mtype]
    ad = build(model, family)
    for i, a in enumerate(ad.attn):
        if getattr(a, "layer_idx", None) is None:
            a.layer_idx = i
    return ad
