"""Induction heads (probes/induction.py): the prefix-matching score against HF eager attentions with the
targets found by a loop written here, SmolLM2's known induction heads, and the causal check that ablating
the top heads hurts in-context copying more than ablating as many random heads."""
from __future__ import annotations

import copy

import pytest
import torch

import interp
from probes.induction import Induction, induction, repeated_tokens
from tests.conftest import tiny_hf


def _reference_score(attn: tuple, ids: torch.Tensor) -> torch.Tensor:
    """[L, H]: for each query whose token occurred before, attention on the key after its latest occurrence."""
    vals = []
    for b in range(ids.shape[0]):
        row = ids[b].tolist()
        for t in range(len(row)):
            prev = [j for j in range(t) if row[j] == row[t]]
            if prev and prev[-1] + 1 < t:
                vals.append(torch.stack([a[b, :, t, prev[-1] + 1] for a in attn]))
    return torch.stack(vals).mean(0)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_score_equals_hf_eager_attention(kind):
    hf = tiny_hf(kind)
    ref = copy.deepcopy(hf).eval()
    ref.set_attn_implementation("eager")
    m = interp.load(hf, name=f"tiny-{kind}")
    g = torch.Generator().manual_seed(1)
    half = torch.randint(3, 128, (3, 9), generator=g)
    ids = torch.cat([half, half[:, :5]], 1)  # a partial repeat, so queries differ in whether they have a target
    f = induction(m, {"input_ids": ids})
    with torch.no_grad():
        attn = ref(input_ids=ids, output_attentions=True).attentions
    want = _reference_score(attn, ids)
    got = torch.tensor(f.table.sort_values(["layer", "head"])["score"].to_numpy()).reshape(want.shape)
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)


def test_no_repeats_is_refused():
    m = interp.load(tiny_hf("llama"), name="tiny-llama")
    with pytest.raises(interp.InterpError, match="no token repeats"):
        induction(m, {"input_ids": torch.arange(3, 15)[None]})


def test_smollm2_has_induction_heads_and_they_copy(smol):
    f = induction(smol)
    m = f.metrics
    assert m["top_score"] > 0.6 and m["n_induction_heads"] >= 3  # 0.89 at layer 18 head 6 on the default inputs
    assert m["loss_repeated"] < m["loss_other"] / 2  # in-context copying: the repeat is far easier
    assert "heads attend to the token after the earlier copy" in f.explain()
    # causal: zero the top-8 heads vs 8 random heads (paired over 12 fresh sequences)
    ids = {"input_ids": repeated_tokens(smol, n=30, batch=12, seed=7)}
    base = Induction.copying_loss(smol, ids)
    top = Induction.copying_loss(smol, ids, f.to_spec(model=smol, k=8))
    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(f.table), generator=g)[:8].numpy()
    rnd = copy.copy(f)
    rnd.table = f.table.iloc[pick].assign(score=1.0)
    rand = Induction.copying_loss(smol, ids, rnd.to_spec(model=smol, k=8))
    diff = (top - base) - (rand - base)
    boot = torch.stack([diff[torch.randint(len(diff), (len(diff),), generator=g)].mean() for _ in range(2000)])
    lo = float(boot.quantile(0.025))
    assert float(top.mean() - base.mean()) > 0.5, (base.mean(), top.mean())
    assert lo > 0, f"top-8 ablation does not hurt copying more than random: paired CI low {lo:.3f}"
