"""Capture and patch across the denoising steps of a masked-diffusion LM (LLaDA-style, METHODS §6a).

Every step is a full bidirectional forward over [prompt; partially masked answer]; interp runs the
LLaDA low-confidence-remasking loop (:func:`diffusion_generate`, Nie et al. 2025, "Large Language Diffusion
Models", ML-GSAI/LLaDA generate.py) and, at each step, captures the requested sites with the
engine's ``step`` set, so specs scoped with ``"steps": [...]`` act only at those steps.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .capture import Reducer, capture
from .errors import InterpError
from .roles import Batch
from .trace import Trace


@dataclass
class DiffusionTrace:
    """What ``diffusion_generate(..., return_trace=True)`` records.

    * ``committed[s]``: bool [B, L] -- positions committed (unmasked) at step ``s``.
    * ``tokens[s]``: long [B, L] -- the sequence after step ``s``.
    * ``confidence[s]``: float [B, L] -- the confidence used for ranking at step ``s``
      (-inf outside the current block / at already-decoded positions).
    * ``block[s]``: index of the block decoded at step ``s``.
    * ``step_of``: long [B, gen_len] -- the step at which each generated position was committed.
    """

    committed: list = field(default_factory=list)
    tokens: list = field(default_factory=list)
    confidence: list = field(default_factory=list)
    block: list = field(default_factory=list)
    step_of: torch.Tensor | None = None


def num_transfer_tokens(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """Spread the masked-token count of each row evenly over ``steps`` (LLaDA).

    mask_index: bool [B, n] -> long [B, steps]; the remainder goes to the first steps.
    """
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base = mask_num // steps
    remainder = mask_num % steps
    out = base.expand(-1, steps).clone()
    ar = torch.arange(steps, device=mask_index.device).unsqueeze(0)
    out += (ar < remainder).long()
    return out


def _add_gumbel_noise(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand_like(logits)
    gumbel_noise = (-torch.log(noise)) ** temperature
    return logits.exp() / gumbel_noise


@torch.no_grad()
def diffusion_generate(model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, gen_len: int, steps: int,
                       block_len: int, mask_id: int, temperature: float = 0.0, attention_mask: torch.Tensor | None = None,
                       return_trace: bool = False, **model_kwargs):
    """LLaDA sampling with low-confidence remasking.

    ``x = [input_ids ; <mask> * gen_len]``; the generation region is decoded block by
    block (``block_len`` tokens, ``steps // n_blocks`` steps per block).  At each step the
    model predicts every position, ``x0 = argmax`` (Gumbel-perturbed if
    ``temperature > 0``), confidence = softmax probability of ``x0``; confidence is -inf
    outside the current block and at already decoded positions; the ``k`` most confident
    masked positions are committed, with ``k`` spreading the block's masks evenly over its
    steps.

    Returns the final ``x`` [B, L+gen_len] (and a :class:`DiffusionTrace` with
    ``return_trace=True``).  ``attention_mask`` (2D, for the prompt) is extended with ones.
    """
    B, P = input_ids.shape
    device = input_ids.device
    x = torch.full((B, P + gen_len), mask_id, dtype=torch.long, device=device)
    x[:, :P] = input_ids
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, gen_len)], dim=1)
    if gen_len % block_len:
        raise InterpError(f"gen_len={gen_len} must be a multiple of block_len={block_len}")
    n_blocks = gen_len // block_len
    if steps % n_blocks:
        raise InterpError(f"steps={steps} must be a multiple of the number of blocks ({n_blocks}); change steps or block_len")
    steps_per_block = steps // n_blocks
    trace = DiffusionTrace() if return_trace else None
    step_of = torch.full((B, gen_len), -1, dtype=torch.long, device=device)
    step = 0
    for nb in range(n_blocks):
        b0, b1 = P + nb * block_len, P + (nb + 1) * block_len
        block_mask_index = x[:, b0:b1] == mask_id
        n_transfer = num_transfer_tokens(block_mask_index, steps_per_block)
        for i in range(steps_per_block):
            mask_index = x == mask_id
            logits = model(input_ids=x, pixel_values=pixel_values, attention_mask=attention_mask, **model_kwargs).logits
            x0 = torch.argmax(_add_gumbel_noise(logits, temperature), dim=-1)
            p = F.softmax(logits.float(), dim=-1)
            x0_p = torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)
            x0_p[:, b1:] = -float("inf")
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.full_like(x0_p, -float("inf")))
            transfer = torch.zeros_like(x, dtype=torch.bool)
            for j in range(B):
                k = int(n_transfer[j, i])
                if k > 0:
                    _, sel = torch.topk(confidence[j], k=k)
                    transfer[j, sel] = True
            x[transfer] = x0[transfer]
            step_of[transfer[:, P:]] = step
            if trace is not None:
                trace.committed.append(transfer.clone())
                trace.tokens.append(x.clone())
                trace.confidence.append(confidence.clone())
                trace.block.append(nb)
            step += 1
    if trace is not None:
        trace.step_of = step_of
        return x, trace
    return x


@dataclass
class Denoising:
    """The result of :func:`denoise`: the final tokens, one Trace per step, and the schedule."""

    tokens: torch.Tensor  # [b, T] after the last step
    traces: list[Trace]  # one per step (empty captures when no sites were asked for)
    committed: list[torch.Tensor]  # bool [b, T] per step: positions unmasked at that step
    step_of: torch.Tensor  # [b, gen_len]: step at which each generated position was committed
    schedule: dict

    @property
    def n_steps(self) -> int:
        return len(self.committed)


class _StepForward:
    """Stands in for the HF model inside the decoding loop: each call is one captured step."""

    def __init__(self, model, sites, reducers, roles):
        self.model, self.sites, self.reducers, self.roles = model, sites, reducers, roles
        self.traces: list[Trace] = []

    def __call__(self, input_ids, attention_mask=None, **kw):
        eng = self.model.engine
        eng.step = len(self.traces)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask if attention_mask is not None
                  else torch.ones_like(input_ids), **{k: v for k, v in kw.items() if v is not None}}
        try:
            tr = capture(self.model, inputs, self.sites, self.reducers, roles=self.roles)
        finally:
            eng.step = None
        tr.meta["step"] = len(self.traces)
        tr.meta["mask_state"] = (input_ids == self.model.adapter.mask_token_id).tolist() \
            if self.model.adapter.mask_token_id is not None else None
        self.traces.append(tr)
        return tr.output


def denoise(model, inputs: Batch | dict, *, gen_len: int, steps: int, block_len: int | None = None,
            sites=None, reducers: list[Reducer] = (), temperature: float = 0.0, roles: dict | None = None) -> Denoising:
    """Run LLaDA decoding on ``inputs`` (prompt ids, optional pixel_values) and capture every step."""
    ad = model.adapter
    if ad.causal:
        raise InterpError(f"{model.name} attends causally: denoise() is for masked-diffusion (bidirectional) LMs")
    if ad.mask_token_id is None:
        raise InterpError("this model has no mask token id: set model.adapter.mask_token_id")
    batch = model.encode(inputs)
    extra = dict(batch.extra)
    pix = extra.pop("pixel_values", None)
    fwd = _StepForward(model, sites, list(reducers), roles)
    block_len = block_len or gen_len
    x, info = diffusion_generate(fwd, batch.input_ids, pix, gen_len, steps, block_len, ad.mask_token_id,
                                 temperature=temperature, attention_mask=batch.attention_mask, return_trace=True,
                                 **extra)
    return Denoising(x, fwd.traces, info.committed, info.step_of,
                     {"gen_len": gen_len, "steps": steps, "block_len": block_len, "temperature": temperature})
