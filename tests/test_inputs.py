"""One inputs contract: every form of the same prompts (text, ids, dicts with left/right padding or 4-D masks,
a BatchEncoding, a Batch) gives the same right-padded Batch and bit-identical captures; bad inputs are refused."""
import signal

import pytest
import torch

import interp
from interp import InterpError, KeyMass, QueryRow
from interp.tasks import _item_roles

PROMPTS = ["The capital of France is", "Water boils at one hundred degrees Celsius at sea level."]
SITES = ["blocks.0.attn.pattern", "blocks.5.attn.pattern", "blocks.5.resid_post", "logits"]


def _capture(model, inputs, **kw):
    return interp.capture(model, inputs, sites=SITES, reducers=[KeyMass(layers=[3]), QueryRow(layers=[3])], **kw)


def _assert_same(a, b):
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)
    assert [dict(r) for r in a.roles] == [dict(r) for r in b.roles] and [r.length for r in a.roles] == [
        r.length for r in b.roles]
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def right(smol):
    """The plain right-padded reference: the prompts as strings."""
    return smol.encode(PROMPTS), _capture(smol, PROMPTS)


def _left(batch):
    """The same rows, left-padded (as a tokenizer with padding_side='left' gives them)."""
    ids, am = batch.input_ids.clone(), batch.attention_mask.clone()
    for i, n in enumerate(am.sum(1).tolist()):
        ids[i] = torch.roll(ids[i], ids.shape[1] - n)
        am[i] = torch.roll(am[i], am.shape[1] - n)
    assert am[0, 0] == 0 and am[0, -1] == 1  # row 0 is padded on the left
    return ids, am


def test_one_prompt_in_every_form_gives_the_same_capture(smol):
    ref = _capture(smol, PROMPTS[1])
    ids = smol.encode(PROMPTS[1]).input_ids
    enc = smol.tokenizer(PROMPTS[1], return_tensors="pt")  # a BatchEncoding: a mapping, not a dict
    for form in (ids, ids[0], {"input_ids": ids[0]}, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                 enc, [PROMPTS[1]], smol.encode(PROMPTS[1])):
        _assert_same(_capture(smol, form), ref)


def test_right_padded_dict_and_batch_equal_the_strings(smol, right):
    batch, ref = right
    _assert_same(_capture(smol, {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}), ref)
    _assert_same(_capture(smol, batch), ref)


def test_left_padded_dict_is_moved_to_the_right(smol, right):
    """Regression: a left-padded dict kept its padding first, so ``last`` (length - 1) pointed into the prompt
    and the captures were shifted."""
    batch, ref = right
    ids, am = _left(batch)
    b = smol.encode({"input_ids": ids, "attention_mask": am})
    assert torch.equal(b.input_ids, batch.input_ids) and torch.equal(b.attention_mask, batch.attention_mask)
    n0 = int(batch.attention_mask[0].sum())
    assert b.tokens[0][b.roles[0].positions("last")[0]] == batch.tokens[0][n0 - 1]  # the real last token
    _assert_same(_capture(smol, {"input_ids": ids, "attention_mask": am.bool()}), ref)
    assert torch.equal(smol.answer_logits({"input_ids": ids, "attention_mask": am}), smol.answer_logits(batch))
    # position ids given with the left padding move with their tokens
    pos = (am.cumsum(1) - 1).clamp_min(0)
    b = smol.encode({"input_ids": ids, "attention_mask": am, "position_ids": pos})
    assert torch.equal(b.extra["position_ids"][0, :n0], torch.arange(n0))


def _causal_4d(am: torch.Tensor) -> torch.Tensor:
    """The plain causal mask with padding, as bool [b, 1, T, T] (True = may attend), written out here."""
    T = am.shape[1]
    causal = torch.ones(T, T).tril().bool()
    return (causal[None] & am.bool()[:, None, :])[:, None]


def test_4d_masks_causal_with_padding_are_accepted(smol, right):
    batch, ref = right
    ids, am = batch.input_ids, batch.attention_mask
    m = _causal_4d(am)
    _assert_same(_capture(smol, {"input_ids": ids, "attention_mask": m}), ref)
    additive = torch.zeros(m.shape).masked_fill(~m, torch.finfo(torch.float32).min)
    _assert_same(_capture(smol, {"input_ids": ids, "attention_mask": additive}), ref)
    # left-padded, with the fully masked padding rows opened to every key (as HF does for SDPA)
    lids, lam = _left(batch)
    lm = _causal_4d(lam)
    lm[0, 0, :int((lam[0] == 0).sum())] = True
    _assert_same(_capture(smol, {"input_ids": lids, "attention_mask": lm}), ref)


def test_custom_4d_masks_are_refused(smol, right):
    batch, _ = right
    ids, am = batch.input_ids, batch.attention_mask
    packed = _causal_4d(torch.ones_like(am))
    packed[:, :, 4:, :4] = False  # two packed sequences in each row
    with pytest.raises(InterpError, match="not the plain causal mask"):
        smol.encode({"input_ids": ids, "attention_mask": packed})
    bias = torch.zeros(packed.shape)
    bias[..., 0] = -2.0
    with pytest.raises(InterpError, match="biases"):
        smol.encode({"input_ids": ids, "attention_mask": bias})
    with pytest.raises(InterpError, match=r"must be \[2, 1, "):
        smol.encode({"input_ids": ids, "attention_mask": packed[:, :, :-1]})


def test_bad_masks_and_ids_are_refused(smol, right):
    """Regression: a mask of the wrong shape was silently ignored."""
    batch, _ = right
    ids = batch.input_ids
    with pytest.raises(InterpError, match="attention_mask has shape"):
        interp.capture(smol, {"input_ids": ids, "attention_mask": torch.ones(2, 5, dtype=torch.long)}, sites="logits")
    with pytest.raises(InterpError, match="attention_mask has shape"):
        smol.encode({"input_ids": ids, "attention_mask": torch.ones(1, ids.shape[1], dtype=torch.long)})
    with pytest.raises(InterpError, match="padding between tokens"):
        smol.encode({"input_ids": ids[:1, :5], "attention_mask": torch.tensor([[1, 1, 0, 1, 1]])})
    with pytest.raises(InterpError, match="no token"):
        smol.encode({"input_ids": ids[:1, :3], "attention_mask": torch.zeros(1, 3, dtype=torch.long)})
    with pytest.raises(InterpError, match="other values"):
        smol.encode({"input_ids": ids[:1, :3], "attention_mask": torch.tensor([[1, 2, 1]])})
    with pytest.raises(InterpError, match="integer token ids"):
        smol.encode(ids.float())
    with pytest.raises(InterpError, match="needs 'input_ids'"):
        smol.encode({"text": "hello"})


class _Hang(Exception):
    pass


@pytest.fixture
def alarm():
    """Fail (instead of hanging the suite) if the block runs past 20 s."""
    def on_alarm(*_):
        raise _Hang("still running after 20 s: the loop does not end")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_empty_role_substring_is_refused_not_a_hang(smol, alarm):
    """Regression: ``roles={"x": ""}`` looped for ever (str.find of "" never moves on)."""
    with pytest.raises(InterpError, match="empty string"):
        smol.encode("The capital of France is", roles={"subject": ""})
    with pytest.raises(InterpError, match="non-empty substring"):
        _item_roles(smol.tokenizer, [{"prompt": "The capital of France is", "roles": {"subject": ""}}])
    assert smol.encode("The capital of France is", roles={"subject": "France"}).roles[0]["subject"] == [3]


def test_substring_roles_need_text(smol):
    ids = smol.encode(PROMPTS[0]).input_ids
    with pytest.raises(InterpError, match="have no text"):
        smol.encode(ids, roles={"subject": "France"})
    assert smol.encode(ids, roles={"subject": [3]}).roles[0]["subject"] == [3]


def test_reducer_reused_after_a_layer_restricted_capture_keeps_its_own_layers(smol):
    """Regression: ``capture(..., layers=[3])`` wrote [3] into the reducer, so its next capture saw layer 3 only."""
    km = KeyMass()
    tr = interp.capture(smol, PROMPTS[0], reducers=[km], layers=[3])
    assert tr.layers("attn.key_mass") == [3] and km.layers is None
    tr = interp.capture(smol, PROMPTS[0], reducers=[km])
    assert tr.layers("attn.key_mass") == list(range(smol.n_layers))
    own = KeyMass(layers=[2, -1])  # its own layers, within the capture's
    tr = interp.capture(smol, PROMPTS[0], reducers=[own], layers=[2, 3])
    assert tr.layers("attn.key_mass") == [2] and own.layers == [2, -1]
    assert interp.capture(smol, PROMPTS[0], reducers=[own]).layers("attn.key_mass") == [2, smol.n_layers - 1]


def test_4d_full_mask_of_a_bidirectional_model():
    """A masked-diffusion LM attends both ways: its plain 4-D mask is the full one with padding."""
    from tests.conftest import load_testbed_model
    m, _, _ = load_testbed_model("llada_diffusion")
    assert not m.adapter.causal
    ids = torch.randint(5, 20, (2, 10), generator=torch.Generator().manual_seed(0))
    am = torch.ones(2, 10, dtype=torch.long)
    am[0, 7:] = 0
    ref = interp.capture(m, {"input_ids": ids, "attention_mask": am}, sites=["blocks.*.attn.pattern", "logits"])
    full = am.bool()[:, None, None, :].expand(2, 1, 10, 10)
    _assert_same(interp.capture(m, {"input_ids": ids, "attention_mask": full}, sites=["blocks.*.attn.pattern",
                                                                                    "logits"]), ref)
    with pytest.raises(InterpError, match="not the plain full"):
        m.encode({"input_ids": ids, "attention_mask": full & torch.ones(10, 10).tril().bool()})


def test_left_padded_vlm_rows_keep_their_image_roles():
    """Two LLaVA rows of different lengths, each with an image: left padding gives the right-padded capture."""
    from tests.test_capture import tiny_llava
    m = interp.load(tiny_llava(), name="tiny-llava")
    g = torch.Generator().manual_seed(0)
    rows = [torch.cat([torch.tensor([1]), torch.full((17,), 99), torch.randint(2, 90, (n,), generator=g)]) for n in (6, 2)]
    T = max(len(r) for r in rows)
    right_ids, right_am = torch.zeros(2, T, dtype=torch.long), torch.zeros(2, T, dtype=torch.long)
    left_ids, left_am = right_ids.clone(), right_am.clone()
    for i, r in enumerate(rows):
        right_ids[i, :len(r)], right_am[i, :len(r)] = r, 1
        left_ids[i, T - len(r):], left_am[i, T - len(r):] = r, 1
    pix = torch.randn(2, 3, 16, 16, generator=g)
    sites = ["blocks.*.attn.pattern", "logits"]
    ref = interp.capture(m, {"input_ids": right_ids, "attention_mask": right_am, "pixel_values": pix}, sites=sites)
    got = interp.capture(m, {"input_ids": left_ids, "attention_mask": left_am, "pixel_values": pix}, sites=sites)
    assert got.roles[1]["image"] == ref.roles[1]["image"] == list(range(1, 18))
    _assert_same(got, ref)
