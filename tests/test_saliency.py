"""Attention saliency: A ⊙ ∂L/∂A from capture equals ∂L/∂P for a ones-multiplier P on the pattern, by hand."""
import pytest
import torch

import interp
from attribution.saliency import label_word_flows, saliency

PROMPT = "Review: great film. Sentiment: positive. Review: awful plot. Sentiment: negative. Review: I loved it. Sentiment:"


class _OnesMultiplier:
    """Test-only engine hook: A' = A ⊙ P_l with P_l = 1 (requires grad), so ∂L/∂P_l = A ⊙ ∂L/∂A."""

    def __init__(self, n_layers, n_heads, T):
        self.P = [torch.ones(1, n_heads, T, T, requires_grad=True) for _ in range(n_layers)]

    def needs(self, layer):
        return {"weights"}

    def on_weights(self, layer, w, call):
        return w * self.P[layer]


def _by_hand(model, batch, scalar_fn):
    """∂L/∂P for every layer [L, H, T, T], from a forward pass through the hook above."""
    hook = _OnesMultiplier(model.n_layers, model.n_heads, batch.input_ids.shape[1])
    with torch.enable_grad(), model.engine.running(batch), model.engine.using(hook):
        logits = model.hf(**batch.model_inputs()).logits[0]
        grads = torch.autograd.grad(scalar_fn(logits), hook.P)
    return torch.cat(grads)


def _lm_loss(ids):
    return lambda logits: torch.nn.functional.cross_entropy(logits[:-1], ids[1:])


def test_attn_times_grad_equals_ones_multiplier_gradient(smol):
    b = smol.encode(PROMPT)
    ids = b.input_ids[0]
    tr = interp.capture(smol, b, sites="blocks.*.attn.pattern", grad=True)
    _lm_loss(ids)(tr.output.logits[0]).backward()
    ag = torch.cat([tr[f"blocks.{l}.attn.pattern"] * tr.grad(f"blocks.{l}.attn.pattern") for l in range(smol.n_layers)])
    smol.hf.zero_grad(set_to_none=True)  # that plain backward also filled the parameters' .grad
    ref = _by_hand(smol, b, _lm_loss(ids))
    err = (ag - ref).abs().max().item()
    print(f"max |A*dL/dA - dL/dP| = {err:.3g} (max |dL/dP| = {ref.abs().max().item():.3g})")
    assert err <= 1e-5
    assert ref.abs().max() > 1e-3  # the comparison is not between zeros

    # the analysis: both head reductions, against the by-hand gradient
    f = saliency(smol, b, head_reduce="abs_after_sum")
    want = ref.sum(1).abs()
    want[:, torch.arange(want.shape[-1]), torch.arange(want.shape[-1])] = 0
    assert f.arrays["I"].shape == want.shape and (f.arrays["I"] - want).abs().max() <= 1e-5
    g = saliency(smol, b, head_reduce="mean_abs", layers=[0, 29])
    assert (g.arrays["I"] - ref[[0, 29]].abs().mean(1)).abs().max() <= 1e-5
    assert list(g.table.layer) == [0, 29] and g.params["tokens"] == b.tokens[0]
    assert all(p.grad is None for p in smol.hf.parameters())  # the model's parameters are untouched


def test_logit_target_and_causality(smol):
    b = smol.encode("The capital of France is Paris")
    pos, tok = 3, int(b.input_ids[0, 4])
    f = saliency(smol, b, target=("logit", pos, tok), head_reduce="mean_abs")
    ref = _by_hand(smol, b, lambda lg: lg[pos, tok])
    assert (f.arrays["I"] - ref.abs().mean(1)).abs().max() <= 1e-5
    I = f.arrays["I"]
    assert torch.equal(I.triu(1), torch.zeros_like(I))  # causal: nothing above the diagonal
    assert torch.equal(I[:, pos + 1:], torch.zeros_like(I[:, pos + 1:]))  # queries after pos cannot affect logits[pos]


def test_label_word_flows_by_hand():
    g = torch.Generator().manual_seed(0)
    I = torch.rand(2, 8, 8, generator=g).tril()
    p, q = [3, 5], 7
    got = label_word_flows(I, p, q)
    for l in range(2):
        M = I[l].clone().fill_diagonal_(0)
        wp = sum(M[k, j] for k in p for j in range(k))
        pq = sum(M[q, k] for k in p)
        ww = (M.sum() - wp - pq) / (q * (q + 1) / 2 - sum(p) - len(p))
        assert torch.allclose(got["S_wp"][l], wp / sum(p))
        assert torch.allclose(got["S_pq"][l], pq / len(p))
        assert torch.allclose(got["S_ww"][l], ww)
    with pytest.raises(interp.InterpError):
        label_word_flows(I, [7], 7)


def test_bad_arguments(smol):
    with pytest.raises(interp.InterpError, match="head_reduce"):
        saliency(smol, "hi there", head_reduce="max")
    with pytest.raises(interp.InterpError, match="one sequence"):
        saliency(smol, ["a b", "c d"])
    with pytest.raises(interp.InterpError, match="target"):
        saliency(smol, "a b c", target="nope")
