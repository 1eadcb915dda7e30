"""Capture and patch across the denoising steps of a masked-diffusion LM (LLaDA-style, METHODS §6a).

Every step is a full bidirectional forward over [prompt; partially masked answer]; interp runs the
LLaDA low-confidence-remasking loop and, at each step, captures the requested sites with the
engine's ``step`` set, so specs scoped with ``"steps": [...]`` act only at those steps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .capture import Reducer, capture
from .errors import InterpError
from .roles import Batch
from .trace import Trace


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
    from .testbed.diffusion import diffusion_generate
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
