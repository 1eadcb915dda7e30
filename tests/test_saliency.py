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


# ---------------------------------------------------------------------------------- the analysis contract
def test_default_inputs_label_words_flows_and_label_loss(smol):
    """Built-in inputs: the ICL prompt, its label words, the Label Words loss; flows from the finding's I."""
    from attribution.saliency import GOLD, LABEL_WORDS, PROMPT
    f = saliency(smol)
    b = smol.encode(PROMPT)
    ids = b.input_ids[0]
    lab = [smol.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in LABEL_WORDS]
    want_pos = [p for p in range(len(ids) - 1) if int(ids[p]) in lab]
    assert f.params["label_positions"] == want_pos and len(want_pos) == 2
    assert f.params["target_pos"] == len(ids) - 1
    gold = LABEL_WORDS.index(GOLD)

    def label_loss(logits):  # CE of the gold label among the label words' logits at the last position
        return torch.nn.functional.cross_entropy(logits[-1, lab][None], torch.tensor([gold]))
    ref = _by_hand(smol, b, label_loss)
    want = ref.sum(1).abs()
    want[:, torch.arange(want.shape[-1]), torch.arange(want.shape[-1])] = 0
    assert (f.arrays["I"] - want).abs().max() <= 1e-5 and want.abs().max() > 1e-4
    flows = label_word_flows(f.arrays["I"], want_pos, len(ids) - 1)
    for k in ("S_wp", "S_pq", "S_ww"):
        assert torch.allclose(torch.tensor(f.table[k].to_numpy()), flows[k])
    text = f.explain()
    print(text)
    assert text.endswith(".") and "layer" in text and "S_pq" not in text
    assert interp.analysis.get("attribution.saliency") is not None and f.analysis == "attribution.saliency"
    import viz  # noqa: F401  (installs the figure view)
    ax = next(a for a in f.plot().axes if a.get_title(loc="left") == "Label-word flows per layer")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["S_wp", "S_pq", "S_ww"]
    assert [t.name for t in f.plot(interactive=True).data if t.type == "scatter"] == ["S_wp", "S_pq", "S_ww"]


def _pattern(model, batch, layer, *specs):
    site = f"blocks.{layer}.attn.pattern"
    if specs:
        with interp.patch(model, *specs):
            return interp.capture(model, batch, sites=site)[site][0]
    return interp.capture(model, batch, sites=site)[site][0]


@pytest.mark.parametrize("renormalize", [False, True])
def test_anchor_reweighting_spec_against_captured_patterns(smol, renormalize):
    """Â(q, p_i) = s_i · A(q, p_i) in the chosen layer (renormalised: the row divided by its new sum); every
    other row and every earlier layer untouched."""
    from attribution.saliency import PROMPT
    f = saliency(smol, layers=[0, 4, 12])
    b = smol.encode(PROMPT)
    p, q, l = f.params["label_positions"], f.params["target_pos"], 4
    scales = [3.0, 0.25]
    spec = f.to_spec(model=smol, scale=scales, layers=[l], renormalize=renormalize)
    assert len(spec.edits) == 2 and spec.edits[0]["queries"] == "last" and spec.edits[0]["keys"] == [p[0]]
    spec = interp.Spec.from_json(spec.to_json())  # what replays is the JSON document
    base, got = _pattern(smol, b, l), _pattern(smol, b, l, spec)
    want = base.clone()
    for pos, s in zip(p, scales):
        want[:, q, pos] *= s
    if renormalize:
        want[:, q] /= want[:, q].sum(-1, keepdim=True)
    err = (got - want).abs().max().item()
    print(f"renormalize={renormalize}: max |Â - reference| = {err:.3g}")
    assert err <= 1e-5
    assert (got[:, q, p] - base[:, q, p]).abs().max() > 1e-3  # the edit did something
    assert torch.equal(got[:, :q], base[:, :q])  # other query rows: untouched
    assert torch.equal(_pattern(smol, b, 2, spec), _pattern(smol, b, 2))  # an earlier layer: untouched
    if not renormalize:
        assert not torch.allclose(got[:, q].sum(-1), torch.ones(smol.n_heads))  # the source does not renormalise


def test_anchor_reweighting_beta_per_head_and_the_neutral_spec(smol):
    from attribution.saliency import PROMPT
    f = saliency(smol, layers=[3])
    b = smol.encode(PROMPT)
    p, q, H = f.params["label_positions"], f.params["target_pos"], smol.n_heads
    beta = torch.linspace(-1, 1, H * 2).reshape(1, H, 2)
    spec = f.to_spec(model=smol, beta=beta)
    assert len(spec.edits) == 2 * H  # every (head, label) has its own scale
    base, got = _pattern(smol, b, 3), _pattern(smol, b, 3, spec)
    want = base.clone()
    want[:, q, p] *= beta[0].exp()
    assert (got - want).abs().max() <= 1e-5
    logits = interp.capture(smol, b, sites="logits")["logits"]
    with interp.patch(smol, f.to_spec(model=smol, beta=0.0)):  # exp(0) = 1 everywhere: exactly a no-op
        assert torch.equal(interp.capture(smol, b, sites="logits")["logits"], logits)
    assert torch.equal(interp.capture(smol, b, sites="logits")["logits"], logits)  # restored after the patch
    with pytest.raises(interp.InterpError, match="exactly one"):
        f.to_spec(model=smol)
    with pytest.raises(interp.InterpError, match="label words"):
        f.to_spec(model=smol, scale=[1.0, 2.0, 3.0])
    with pytest.raises(interp.InterpError, match="shape"):
        f.to_spec(model=smol, beta=torch.zeros(2, H, 2))
    with pytest.raises(interp.InterpError, match="label-word positions"):
        saliency(smol, "a b c", layers=[0]).to_spec(model=smol, scale=2.0)


# ---------------------------------------------------------------------------------- inputs
def test_right_padded_row_equals_the_unpadded_sequence(smol):
    """Regression: a right-padded row used to be analysed with its padding (pads in I and in the loss)."""
    b = smol.encode("The capital of France is Paris")
    ids, T = b.input_ids, b.input_ids.shape[1]
    ref = saliency(smol, b, layers=[0, 5]).arrays["I"]
    padded = {"input_ids": torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1),
              "attention_mask": torch.cat([torch.ones(1, T, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long)], 1)}
    got = saliency(smol, padded, layers=[0, 5])
    assert got.arrays["I"].shape == ref.shape and (got.arrays["I"] - ref).abs().max() <= 1e-6
    assert len(got.params["tokens"]) == T


def test_bare_id_tensor(smol):
    """A bare tensor of ids ([T] or [1, T]) goes through model.encode like any other input."""
    b = smol.encode("The capital of France is Paris")
    ref = saliency(smol, b, layers=[1]).arrays["I"]
    for ids in (b.input_ids, b.input_ids[0]):
        assert (saliency(smol, ids, layers=[1]).arrays["I"] - ref).abs().max() <= 1e-6


def test_left_padded_dict(smol):
    """A left-padded row gives the saliency of its real tokens (model.encode moves the padding to the end)."""
    b = smol.encode("The capital of France is Paris")
    ids, T = b.input_ids, b.input_ids.shape[1]
    ref = saliency(smol, b, layers=[1]).arrays["I"]
    pad = smol.tokenizer.pad_token_id or 0
    d = {"input_ids": torch.cat([torch.full((1, 2), pad), ids], 1),
         "attention_mask": torch.cat([torch.zeros(1, 2, dtype=torch.long), torch.ones(1, T, dtype=torch.long)], 1)}
    got = saliency(smol, d, layers=[1]).arrays["I"]
    assert got.shape == ref.shape and (got - ref).abs().max() <= 1e-5
