"""The probes run on a model in bf16 and fp16 (statistics accumulate in fp32) and find what the fp32 model
finds, up to the rounding of the half-precision forward."""
from __future__ import annotations

import pytest
import torch

import interp
from interp.prompts import paragraphs
from probes.dla import dla
from probes.entropy import entropy
from probes.induction import induction
from probes.logit_lens import logit_lens
from probes.massive import massive
from probes.sinks import sinks

PROMPTS = paragraphs()[:3]


@pytest.fixture(scope="module")
def fp32():
    return interp.load("smollm2")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_probes_run_in_half_precision(dtype, fp32):
    half = interp.load("smollm2", dtype=dtype)
    assert next(half.hf.parameters()).dtype == dtype
    s32, s16 = sinks(fp32, PROMPTS, T=32, progress=False), sinks(half, PROMPTS, T=32, progress=False)
    # the sink heads: α of token 0 per head, within half-precision rounding of the fp32 model's
    a32, a16 = (torch.tensor(f.table.sort_values(["layer", "head"]).score.values) for f in (s32, s16))
    assert torch.isfinite(a16).all() and (a16 - a32).abs().max() < 0.05
    assert abs(s16.metrics["sink_rate_token0"] - s32.metrics["sink_rate_token0"]) < 5.0
    m16 = massive(half, PROMPTS)
    assert m16.metrics["dims"] == massive(fp32, PROMPTS).metrics["dims"]  # the same massive dims (247, 507)
    e32, e16 = entropy(fp32, PROMPTS), entropy(half, PROMPTS)
    assert (torch.tensor(e16.table.entropy.values) - torch.tensor(e32.table.entropy.values)).abs().max() < 0.05
    i16 = induction(half, batch=4)
    assert i16.metrics["top_head"] == induction(fp32, batch=4).metrics["top_head"]
    d16 = dla(half, "The capital of France is", target=" Paris")
    assert all(torch.isfinite(torch.tensor(d16.table.select_dtypes("number").to_numpy(dtype=float))).reshape(-1))
    l16 = logit_lens(half, ["The capital of France is"], targets=[[" Paris"]])
    assert l16.table.select_dtypes("number").notna().all().all()
