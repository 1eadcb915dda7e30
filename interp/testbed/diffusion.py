"""LLaDA-style masked-diffusion training loss; the sampler lives in :mod:`interp.diffusion` (re-exported here).

The model is any HF causal-LM-shaped module whose text model attends bidirectionally
(here ``LlavaForConditionalGeneration`` with ``text_config.is_causal=False``).  There is no
label shift: the logits at a masked position predict the token *at* that position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..diffusion import DiffusionTrace, diffusion_generate, num_transfer_tokens

__all__ = ["DiffusionTrace", "diffusion_generate", "masked_diffusion_loss", "num_transfer_tokens"]


def masked_diffusion_loss(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, p_mask: torch.Tensor,
                          n_answer_tokens: torch.Tensor | int) -> torch.Tensor:
    """LLaDA SFT loss: sum over masked positions of CE / p_mask, divided by the number of
    answer tokens.  ``logits`` [B,L,V] at a masked position predict that position's token
    (no shift); ``p_mask`` [B,L] is the masking probability used for each position."""
    ce = F.cross_entropy(logits[masked].float(), targets[masked], reduction="none")
    return (ce / p_mask[masked]).sum() / n_answer_tokens
