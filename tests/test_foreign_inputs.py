"""Every text analysis takes the shapes a user brings — a bare id tensor, a left-padded dict with its mask, a
plain causal 4-D mask — and finds exactly what it finds on the same prompt given as a string."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import probes  # noqa: F401  (registers the analyses)
from attribution.saliency import saliency
from probes.dla import dla
from probes.entropy import entropy
from probes.induction import induction
from probes.routes import routes
from probes.sinks import sinks

PROMPT = "The cat sat on the mat. The cat sat on the mat, and then the dog ran to the door."

RUNS = {  # analysis -> how it is called on one input (params chosen for a 20-token prompt)
    "induction": lambda m, x: induction(m, x),
    "dla": lambda m, x: dla(m, x),
    "routes": lambda m, x: routes(m, x),
    "sinks": lambda m, x: sinks(m, x, T=12, progress=False),
    "entropy": lambda m, x: entropy(m, x, min_query=4),
    "saliency": lambda m, x: saliency(m, x),
}


def _shapes(model) -> dict:
    ids = model.encode(PROMPT).input_ids  # [1, T]
    T, pad = ids.shape[1], 3
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    left = {"input_ids": torch.cat([torch.full((1, pad), pad_id), ids], 1),
            "attention_mask": torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones(1, T, dtype=torch.long)], 1)}
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))[None, None]
    return {"bare id tensor": ids.clone(), "left-padded dict": left,
            "4-D causal mask": {"input_ids": ids.clone(), "attention_mask": causal}}


def _numeric(t: pd.DataFrame) -> np.ndarray:
    return t.select_dtypes("number").to_numpy(dtype=float)


@pytest.mark.parametrize("name", list(RUNS))
def test_foreign_shapes_find_what_the_string_finds(name, smol):
    want = RUNS[name](smol, PROMPT)
    for shape, x in _shapes(smol).items():
        got = RUNS[name](smol, x)
        assert list(got.table.columns) == list(want.table.columns), (name, shape)
        np.testing.assert_allclose(_numeric(got.table), _numeric(want.table), rtol=1e-4, atol=1e-5,
                                   err_msg=f"{name} on a {shape}")
        for k, v in want.metrics.items():
            if isinstance(v, float):
                assert got.metrics[k] == pytest.approx(v, rel=1e-4, abs=1e-5), (name, shape, k)
