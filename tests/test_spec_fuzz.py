"""Fuzzing the Spec schema: generated and mutated spec documents and sidecars.

Every document is either refused with an InterpError before any forward, or accepted; an accepted one, run on a
tiny model, gives finite logits or an InterpError (a role the input lacks, a sidecar too short for the run) —
never another exception, never NaN/inf logits silently. Mutations that are malformed by construction (a wrong
type, a number out of its range, a bad sidecar) must be refused before any forward.
"""
import copy
import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import interp
from interp import InterpError, Spec
from interp.ops import OPS
from tests.conftest import random_ids, tiny_hf

COUNTS = {"docs": 0, "refused": 0, "refused_bad": 0, "accepted": 0, "ran": 0, "run_refused": 0}


@pytest.fixture(scope="module")
def model():
    m = interp.load(tiny_hf("llama", seed=2), name="tiny-llama")
    calls = []
    m.adapter.lm.register_forward_pre_hook(lambda *a: calls.append(1))
    m._fuzz_calls = calls
    return m


def valid_edits(m):
    h, d, hd = m.n_heads, m.d_model, m.head_dim
    tensors = {"v": torch.randn(d), "mu": torch.randn(h, hd), "B": torch.randn(h, 16, 16),
               "src": torch.randn(1, 16, d), "srcz": torch.randn(1, 16, h, hd), "means": torch.randn(2)}
    edits = [
        {"op": "attn.scale_weights", "layers": [0], "heads": [1], "keys": "role:bos", "factor": 0.5},
        {"op": "attn.scale_weights", "layers": "all", "queries": "1:", "keys": [0, 1], "factor": 0.2, "redistribute_to": "all"},
        {"op": "attn.add_logit_bias", "layers": [1], "keys": "0:3", "bias": -2.0},
        {"op": "attn.add_logit_bias", "layers": [1], "distance": {"fn": "linear", "scale": -0.1, "d0": 3.0}},
        {"op": "attn.add_logit_bias", "layers": [2], "tensor": "B"},
        {"op": "attn.replace_pattern", "layers": [0], "mode": "local_window", "window": 2},
        {"op": "attn.replace_pattern", "layers": [0], "heads": [2], "mode": "copy_head", "source_head": 0},
        {"op": "attn.knockout", "layers": [1, 2], "queries": "last", "keys": "2:5"},
        {"op": "attn.head_scale", "layers": [2], "heads": [0, 3], "factor": 1.7},
        {"op": "attn.head_ablate", "layers": [1], "heads": [1], "mode": "mean", "tensor": "mu"},
        {"op": "resid.add", "layers": [0], "positions": "last", "tensor": "v", "scale": 0.5},
        {"op": "resid.suppress_dims", "layers": [1], "dims": [3, 9], "mode": "mean", "tensor": "means"},
        {"op": "patch", "layers": [2], "site": "resid_pre", "positions": [1, 2], "tensor": "src"},
        {"op": "patch", "layers": [0], "site": "attn.z", "tensor": "srcz"},
        {"op": "attn.oeb", "layers": [1], "segment": "1:4", "bridge": [5], "tau_max": 0.3},
        {"op": "attn.smi", "layers": [1], "source": "0:2", "scale": 0.2},
        {"op": "attn.amplify", "layers": [2], "keys": "1:3", "alpha": 0.3},
    ]
    return edits, tensors


# mutations: (name, malformed by construction?, fn(edit, tensors, m) -> None, mutating in place)
def _set(k, v):
    return lambda e, t, m: e.__setitem__(k, v)


BAD = [
    ("layers_neg", _set("layers", [-1])), ("layers_str", _set("layers", "some")), ("layers_big", _set("layers", [99])),
    ("layers_huge", _set("layers", [10**40])), ("heads_big", _set("heads", [99])), ("heads_float", _set("heads", [0.5])),
    ("op_dict", _set("op", {"x": 1})), ("op_list", _set("op", ["attn.knockout"])), ("op_none", _set("op", None)),
    ("op_unknown", _set("op", "attn.nope")), ("extra_field", _set("zzz", 1)), ("note_int", _set("note", 3)),
    ("steps_neg", _set("steps", [-2])),
]
NUMERIC_BAD = [float("nan"), float("inf"), -float("inf"), 1e300, -1e300, 10**400, "1.0", None, True, [1.0]]
RANGE = {"factor", "bias", "scale", "alpha", "tau_max", "window", "source_head"}


def _sidecar_bad(kind):
    def fn(e, t, m):
        name = e.get("tensor")
        x = t[name]
        if kind == "nan":
            x = x.clone()
            x.view(-1)[0] = float("nan")
        elif kind == "inf":
            x = x.clone()
            x.view(-1)[-1] = float("inf")
        elif kind == "huge":
            x = x * 1e12
        elif kind == "shape":  # one more head for the bias tensor (its query/key sizes are free), else one more column
            x = torch.cat([x, x[:1]], 0) if name == "B" else torch.cat([x, x[..., :1]], -1)
        elif kind == "rank":
            x = x[None, None, None]
        elif kind == "int":
            x = x.long()
        t[name] = x
    return fn


SIDECAR_BAD = ["nan", "inf", "huge", "shape", "rank", "int"]


@st.composite
def documents(draw, m):
    edits, tensors = valid_edits(m)
    picks = draw(st.lists(st.integers(0, len(edits) - 1), min_size=1, max_size=3))
    es = [copy.deepcopy(edits[i]) for i in picks]
    tensors = {k: v.clone() for k, v in tensors.items()}
    bad = False
    kind = draw(st.sampled_from(["none", "bad", "numeric", "sidecar", "selector", "random_field", "sink", "top"]))
    i = draw(st.integers(0, len(es) - 1))
    e = es[i]
    sink = None
    top = {}
    if kind == "bad":
        _name, fn = draw(st.sampled_from(BAD))
        if _name.startswith("heads") and not OPS[e["op"]].on_heads:
            e.pop("heads", None)
            e["heads"] = [0]  # heads on a residual op is malformed too
        fn(e, tensors, m)
        bad = True
    elif kind == "numeric":
        fields = [k for k in e if k in RANGE]
        if fields:
            k = draw(st.sampled_from(fields))
            e[k] = draw(st.sampled_from(NUMERIC_BAD))
            bad = True
    elif kind == "sidecar":
        if "tensor" in e:
            _sidecar_bad(draw(st.sampled_from(SIDECAR_BAD)))(e, tensors, m)
            bad = True
    elif kind == "selector":
        k = draw(st.sampled_from(["queries", "keys", "positions", "segment", "bridge", "source"]))
        if k in OPS[e["op"]].fields:
            v = draw(st.one_of(st.just([[0, 1]]), st.just(""), st.just(True), st.just({"a": 1}), st.just(1.5),
                               st.just(None), st.just(2**40)))
            e[k] = v
            bad = True
    elif kind == "random_field":  # anything JSON in any field of the op: accepted or refused, never a crash
        k = draw(st.sampled_from(sorted({**OPS[e["op"]].fields, "layers": 0, "heads": 0})))
        e[k] = draw(_json)
    elif kind == "sink":
        sink = draw(st.sampled_from([{"dims": [m.d_model]}, {"dims": []}, {"dims": [0], "tau": 0},
                                     {"dims": [0], "tau": float("nan")}, {"dims": "0"}, {"tau": 2.0},
                                     {"dims": [1], "tau": -1.0}, {"dims": [0], "tau": 3.0, "x": 1}]))
        bad = True
    elif kind == "top":
        top = draw(st.sampled_from([{"schema": "interp.spec/2"}, {"junk": 1}, {"model": None}, {"provenance": []},
                                    {"edits": {}}]))
        bad = True
    doc = {"schema": "interp.spec/1", "model": m.identity(), "edits": es, "provenance": {}, **top}
    if sink is not None:
        doc["sink"] = sink
    return doc, tensors, bad


_leaf = st.one_of(st.none(), st.booleans(), st.integers(-5, 40), st.floats(allow_nan=True), st.text(max_size=6))
_json = st.recursive(_leaf, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=5), c,
                                                                                          max_size=3)), max_leaves=8)


def _run_one(m, doc, tensors, bad):
    COUNTS["docs"] += 1
    x = {"input_ids": random_ids(10, seed=3)}
    before = len(m._fuzz_calls)
    try:
        text = json.dumps(doc, allow_nan=True)
        s = Spec.from_json(text, tensors)
        s.check(m)
    except InterpError:
        assert len(m._fuzz_calls) == before  # refused before any forward
        COUNTS["refused"] += 1
        COUNTS["refused_bad"] += bad
        return
    assert not bad, f"a malformed spec was accepted: {doc}"
    COUNTS["accepted"] += 1
    try:
        out = m.logits(m.encode(x), s)
    except InterpError:
        COUNTS["run_refused"] += 1
        return
    assert torch.isfinite(out).all(), f"non-finite logits under an accepted spec: {doc}"
    COUNTS["ran"] += 1


@settings(max_examples=1100, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(data=st.data())
def test_fuzzed_spec_documents(model, data):
    doc, tensors, bad = data.draw(documents(model))
    _run_one(model, doc, tensors, bad)


def test_fuzz_counts(model):
    """Runs after the fuzz test in this module: at least 1,000 documents, both outcomes seen."""
    print("spec fuzz counts:", COUNTS)
    assert COUNTS["docs"] >= 1000
    assert COUNTS["refused_bad"] >= 300 and COUNTS["ran"] >= 100
    assert COUNTS["refused"] + COUNTS["accepted"] == COUNTS["docs"]


@pytest.mark.parametrize("text", [b"\xff\xfe{}", "[" * 50000, '{"schema": ' + "1" * 5000 + "}", "", "null", "[]",
                                  '{"schema": "interp.spec/1", "model": {}, "edits": []}', "{" * 3000 + "}" * 3000,
                                  '{"schema": "interp.spec/1", "edits": [], "model": {"name": "x", "family": "llama",'
                                  ' "n_layers": ' + "9" * 5000 + ', "n_heads": 4, "fingerprint": "f"}}'])
def test_malformed_json_texts(text):
    with pytest.raises(InterpError):
        Spec.from_json(text)


def test_huge_values_are_refused_or_finite(model):
    """Scales at and beyond their bounds: beyond is refused, at the bound the logits stay finite."""
    from interp.ops import MAX_GAIN
    x = model.encode({"input_ids": random_ids(10, seed=3)})
    for f in (MAX_GAIN, -MAX_GAIN):
        s = Spec.for_model(model, [{"op": "attn.head_scale", "layers": "all", "factor": f}])
        assert torch.isfinite(model.logits(x, s)).all()
    for f in (MAX_GAIN * 1.01, 1e30, math.inf):
        with pytest.raises(InterpError):
            Spec.for_model(model, [{"op": "attn.head_scale", "layers": "all", "factor": f}])
