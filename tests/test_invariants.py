"""Invariants of the patching layer, over every op × selector kind (all, last, role:NAME, index, range, sink), on
the tiny random families (gpt2, qwen2, gemma3 with a 4-token sliding window, llama) and on SmolLM2:

* cached greedy generation under a spec equals recomputing every step without a cache;
* an op at its neutral value is a bit-identical no-op;
* a padded batch equals each prompt run alone;
* chunked attention (the engine's query chunks) equals unchunked;
* in float64, each op equals an independent reference written here (the formulas of interp/patch.py).
"""
import math

import pytest
import torch

import interp
import interp.engine
import interp.ops
from interp import Spec
from tests.conftest import ForceEager, random_ids, tiny_hf

SELECTORS = ["all", "last", "role:subj", 2, "1:4", "sink"]
SUBJ = [2, 3]
TAU = 1.5  # sink threshold on the random models' φ (some tokens pass it)
T0 = 40  # sidecar tensors cover this many positions


def _rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def make_edit(name, sel, m):
    """(edit, tensors) for op variant ``name`` with the token selector ``sel`` in its selecting field."""
    h, d, hd = m.n_heads, m.d_model, m.head_dim
    L = [1]
    edits = {
        "scale": ({"op": "attn.scale_weights", "layers": L, "heads": [0, 2], "keys": sel, "factor": 0.4}, {}),
        "scale_redistribute": ({"op": "attn.scale_weights", "layers": L, "queries": sel, "keys": [0, 1], "factor": 0.3,
                                "redistribute_to": "all"}, {}),
        "scale_raw": ({"op": "attn.scale_weights", "layers": L, "keys": sel, "factor": 0.5, "renormalize": False}, {}),
        "bias": ({"op": "attn.add_logit_bias", "layers": L, "keys": sel, "bias": 1.5}, {}),
        "distance": ({"op": "attn.add_logit_bias", "layers": L, "queries": sel,
                      "distance": {"fn": "log1p", "scale": -0.7, "d0": 2.0}}, {}),
        "bias_tensor": ({"op": "attn.add_logit_bias", "layers": L, "queries": sel, "tensor": "B"},
                        {"B": _rand(h, T0, T0, seed=1).float()}),
        "local_window": ({"op": "attn.replace_pattern", "layers": L, "queries": sel, "mode": "local_window",
                          "window": 3}, {}),
        "copy_head": ({"op": "attn.replace_pattern", "layers": L, "heads": [1], "queries": sel, "mode": "copy_head",
                       "source_head": 0}, {}),
        "knockout": ({"op": "attn.knockout", "layers": L, "queries": sel, "keys": "1:3"}, {}),
        "head_scale": ({"op": "attn.head_scale", "layers": L, "heads": [1], "queries": sel, "factor": 0.3}, {}),
        "ablate_zero": ({"op": "attn.head_ablate", "layers": L, "heads": [0, 3], "queries": sel}, {}),
        "ablate_mean": ({"op": "attn.head_ablate", "layers": L, "heads": [2], "queries": sel, "mode": "mean",
                         "tensor": "mu"}, {"mu": _rand(h, hd, seed=2).float()}),
        "resid_add": ({"op": "resid.add", "layers": L, "positions": sel, "tensor": "v", "scale": 2.0},
                      {"v": _rand(d, seed=3).float()}),
        "suppress": ({"op": "resid.suppress_dims", "layers": L, "positions": sel, "dims": [1, 5]}, {}),
        "patch_resid": ({"op": "patch", "layers": L, "site": "resid_post", "positions": sel, "tensor": "src"},
                        {"src": _rand(1, T0, d, seed=4).float()}),
        "patch_z": ({"op": "patch", "layers": L, "site": "attn.z", "positions": sel, "tensor": "srcz"},
                    {"srcz": _rand(1, T0, h, hd, seed=5).float()}),
        "oeb": ({"op": "attn.oeb", "layers": L, "queries": sel, "segment": "1:4", "bridge": [4, 5], "tau_max": 0.6}, {}),
        "smi": ({"op": "attn.smi", "layers": L, "queries": sel, "source": [1, 2], "scale": 0.5}, {}),
        "amplify": ({"op": "attn.amplify", "layers": L, "queries": "all", "keys": sel, "alpha": 0.5}, {}),
        "project_out": ({"op": "resid.project_out", "layers": L, "positions": sel, "tensor": "u", "strength": 0.7,
                         "value": 0.3}, {"u": _rand(d, seed=6).float()}),
        "gift": ({"op": "attn.gift", "layers": L, "queries": sel, "keys": "1:4", "query_keys": [5, 6], "tensor": "s",
                  "alpha": 1.5, "top": 2}, {"s": torch.tensor([0.0, 1.0, 0.4])}),
        "vsv": ({"op": "resid.vsv", "layers": L, "positions": sel, "site": "resid_post", "tensor": "w", "lam": 0.4},
                {"w": _rand(d, seed=8).float()}),
    }
    return edits[name]


OP_NAMES = ["scale", "scale_redistribute", "scale_raw", "bias", "distance", "bias_tensor", "local_window", "copy_head",
            "knockout", "head_scale", "ablate_zero", "ablate_mean", "resid_add", "suppress", "patch_resid", "patch_z",
            "oeb", "smi", "amplify", "project_out", "gift", "vsv"]
# Ops on the output logits (kind "decode") have no layer site to capture; tests/test_decode_ops.py checks them against
# closed forms from explicit forwards, with cached generation == recompute and their neutral values.
DECODE_OPS = {"decode.cfg", "decode.sla"}
# Ops on the whole graph (kind "graph": no token selector, no KV cache): tests/test_eap_edges.py checks circuit.edges
# against hooks written there (all edges kept: bit-identical; none: every node mean-ablated; one edge removed); its
# neutral value is checked below.
GRAPH_OPS = {"circuit.edges"}


def test_every_op_is_covered():
    covered = {make_edit(n, "all", _Geom())[0]["op"] for n in OP_NAMES}
    assert covered | DECODE_OPS | GRAPH_OPS == set(interp.ops.OPS)
    assert all(interp.ops.OPS[n].need == "decode" for n in DECODE_OPS)
    assert all(interp.ops.OPS[n].need == "graph" for n in GRAPH_OPS)


class _Geom:
    n_heads, d_model, head_dim = 4, 64, 16


def build(m, name, sel):
    e, t = make_edit(name, sel, m)
    sink = {"dims": list(range(m.d_model)), "tau": TAU} if sel == "sink" else None
    return Spec.for_model(m, [e], tensors=t, sink=sink)


_MODELS = {}


def tiny_model(kind, dtype=torch.float32):
    key = (kind, dtype)
    if key not in _MODELS:
        _MODELS[key] = interp.load(tiny_hf(kind, seed=7), name=f"tiny-{kind}", dtype=dtype)
    return _MODELS[key]


def prompt(m, n=9, seed=11):
    return m.encode({"input_ids": random_ids(n, seed=seed)}, roles={"subj": SUBJ})


# ------------------------------------------------------------------ cached generation == recompute
def cached_vs_recomputed(m, batch, s, n=4, s_full=None):
    """Greedy generation with the KV cache under ``s``; each step recomputed without a cache under ``s_full``
    (default ``s``), with the prompt's roles (generated tokens extend them, as in generation)."""
    with torch.no_grad():
        with interp.patch(m, s), m.engine.running(batch):
            out = m.hf.generate(**batch.model_inputs(), max_new_tokens=n, do_sample=False, output_logits=True,
                                return_dict_in_generate=True, pad_token_id=0)
        pairs = []
        with interp.patch(m, s_full or s), m.engine.running(batch):
            for i, step in enumerate(out.logits):
                seq = out.sequences[:, :batch.input_ids.shape[1] + i]
                pairs.append((step, m.hf(input_ids=seq, use_cache=False).logits[:, -1]))
    return pairs


KEY_SELECTED = {"scale", "scale_raw", "bias", "amplify"}  # the ops whose selector (in make_edit) picks keys


def check_generation(m, name, sel, tol=1e-4):
    """In generation, 'last' is the newest token at each step: every generated token was edited when it was the
    newest, so the recompute edits the range from the prompt's last token on. A key selector 'last' (each query
    sees its own newest key edited) has no such recompute and is checked on the first token only."""
    b = prompt(m)
    n = b.input_ids.shape[1]
    s = build(m, name, sel)
    s_full = build(m, name, f"{n - 1}:") if sel == "last" and name not in KEY_SELECTED else None
    steps = 1 if sel == "last" and name in KEY_SELECTED else 3
    for cached, full in cached_vs_recomputed(m, b, s, steps, s_full):
        assert (cached - full).abs().max() <= tol, (name, sel)


@pytest.mark.parametrize("sel", SELECTORS, ids=str)
@pytest.mark.parametrize("name", OP_NAMES)
def test_cached_generation_equals_recompute_llama(name, sel):
    check_generation(tiny_model("llama"), name, sel)


@pytest.mark.parametrize("kind", ["gpt2", "qwen2", "gemma3"])
@pytest.mark.parametrize("name", OP_NAMES)
def test_cached_generation_equals_recompute_families(kind, name):
    for sel in ("1:4", "sink"):  # every selector kind runs on llama above
        check_generation(tiny_model(kind), name, sel)


@pytest.mark.parametrize("name", ["scale", "knockout", "resid_add", "head_scale", "local_window"])
def test_cached_generation_equals_recompute_smollm2(smol, name):
    b = smol.encode("The capital of France is", roles={"subj": "France"})
    e, t = make_edit(name, 2, smol)
    e = {**e, "layers": [2, 9]}
    s = Spec.for_model(smol, [e], tensors={k: v.expand(2, -1).contiguous() if v.dim() == 1 else v for k, v in t.items()})
    for cached, full in cached_vs_recomputed(smol, b, s, n=3):
        assert (cached - full).abs().max() <= 1e-3


# ------------------------------------------------------------------ neutral values are bit-identical
NEUTRAL = [
    {"op": "attn.scale_weights", "layers": "all", "keys": "1:3", "factor": 1.0},
    {"op": "attn.scale_weights", "layers": "all", "keys": "1:3", "factor": 1.0, "redistribute_to": "all"},
    {"op": "attn.scale_weights", "layers": "all", "keys": "all", "factor": 1.0, "renormalize": False},
    {"op": "attn.add_logit_bias", "layers": "all", "bias": 0.0},
    {"op": "attn.add_logit_bias", "layers": "all", "distance": {"fn": "linear", "scale": 0.0}},
    {"op": "attn.add_logit_bias", "layers": "all", "tensor": "zeros"},
    {"op": "attn.replace_pattern", "layers": "all", "mode": "local_window", "window": 1000},
    {"op": "attn.replace_pattern", "layers": "all", "heads": [2], "mode": "copy_head", "source_head": 2},
    {"op": "attn.knockout", "layers": "all", "queries": "all", "keys": "none"},
    {"op": "attn.head_scale", "layers": "all", "factor": 1.0},
    {"op": "resid.add", "layers": "all", "tensor": "v", "scale": 0.0},
    {"op": "resid.suppress_dims", "layers": "all", "dims": [0, 3], "mode": "clamp", "value": 1e30},
    {"op": "attn.smi", "layers": "all", "queries": "all", "source": "1:3", "scale": 0.0},
    {"op": "attn.amplify", "layers": "all", "keys": "all", "alpha": 0.0},
    {"op": "resid.project_out", "layers": "all", "tensor": "v", "strength": 0.0},
    {"op": "resid.vsv", "layers": "all", "tensor": "v", "lam": 0.0},
]


@pytest.mark.parametrize("kind", ["gpt2", "qwen2", "gemma3", "llama"])
def test_neutral_values_are_bit_identical_noops(kind):
    m = tiny_model(kind)
    b = prompt(m)
    base = m.logits(b)
    tensors = {"zeros": torch.zeros(T0, T0), "v": _rand(m.d_model, seed=1).float()}
    for e in NEUTRAL:
        assert torch.equal(m.logits(b, Spec.for_model(m, [e], tensors=tensors)), base), e
    # the ops without a neutral parameter: patch with the run's own values; OEB at τ_max = 0 (on the eager path)
    tr = interp.capture(m, b, sites=["blocks.1.attn.z", "blocks.1.resid_post"])
    own = Spec.for_model(m, [{"op": "patch", "layers": [1], "site": "resid_post", "tensor": "r"},
                             {"op": "patch", "layers": [1], "site": "attn.z", "tensor": "z"}],
                         tensors={"r": tr["blocks.1.resid_post"], "z": tr["blocks.1.attn.z"]})
    assert torch.equal(m.logits(b, own), base)
    oeb = Spec.for_model(m, [{"op": "attn.oeb", "layers": "all", "queries": "all", "segment": "1:4", "bridge": [5],
                              "tau_max": 0.0}])
    with m.engine.using(ForceEager()):
        eager = m.logits(b)
        assert torch.equal(m.logits(b, oeb), eager)
    if kind != "gemma3":  # circuit.edges: every edge kept ('all', neutral; or listed, so the op runs); Gemma is refused
        U = 1 + m.n_layers * (m.n_heads + 1)
        means = {"mu": _rand(U, 3, m.d_model, seed=9).float()}
        every = [[u, d] for u in ["embed"] + [f"a{l}.h{h}" if h < m.n_heads else f"m{l}" for l in range(m.n_layers)
                                              for h in range(m.n_heads + 1)]
                 for d in [f"a{l}.h{h}" if h < m.n_heads else f"m{l}" for l in range(m.n_layers)
                           for h in range(m.n_heads + 1)] + ["logits"]
                 if _before(u, d)]
        for keep in ("all", every):
            e = {"op": "circuit.edges", "layers": "all", "keep": keep, "tensor": "mu"}
            assert torch.equal(m.logits(b, Spec.for_model(m, [e], tensors=means)), base)


def _before(u: str, d: str) -> bool:
    """u is computed before d reads the residual stream: embed first; layer l's heads, then its MLP; logits last."""
    def t(n):
        return -1 if n == "embed" else 10**6 if n == "logits" else 2 * int(n[1:].split(".")[0]) + n.startswith("m")
    return t(u) < t(d)


# ------------------------------------------------------------------ padded batch == each prompt alone
@pytest.mark.parametrize("kind", ["gpt2", "gemma3", "llama"])
@pytest.mark.parametrize("name", OP_NAMES)
def test_padded_batch_equals_each_prompt_alone(kind, name):
    m = tiny_model(kind)
    a, c = random_ids(9, seed=11)[0], random_ids(6, seed=12)[0]
    ids = torch.zeros(2, 9, dtype=torch.long)
    ids[0], ids[1, :6] = a, c
    mask = (torch.arange(9)[None] < torch.tensor([[9], [6]])).long()
    both = m.encode({"input_ids": ids, "attention_mask": mask}, roles={"subj": SUBJ})
    for sel in ("last", "role:subj", "sink", "1:4"):
        s = build(m, name, sel)
        got = m.logits(both, s)
        for i, x in enumerate((a, c)):
            alone = m.logits(m.encode({"input_ids": x}, roles={"subj": SUBJ}), s)[0]
            assert (got[i, :len(x)] - alone).abs().max() <= 1e-5, (sel, i)


# ------------------------------------------------------------------ chunked == unchunked
@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_chunked_equals_unchunked(kind, monkeypatch):
    m = tiny_model(kind)
    b = prompt(m, n=13)
    for name in OP_NAMES:
        for sel in ("all", "last", "sink"):
            s = build(m, name, sel)
            with m.engine.using(ForceEager()):
                whole = m.logits(b, s)
                monkeypatch.setattr(interp.engine, "CHUNK_ELEMENTS", 3 * m.n_heads * 13)  # 3 queries a chunk
                chunked = m.logits(b, s)
                monkeypatch.undo()
            assert (chunked - whole).abs().max() <= 1e-6, (name, sel)


# ------------------------------------------------------------------ float64 references
def positions(sel, T, sinks=None):
    """The token selector, resolved independently of interp.roles."""
    if sel == "all":
        return list(range(T))
    if sel == "last":
        return [T - 1]
    if sel == "role:subj":
        return SUBJ
    if sel == "sink":
        return sinks
    if isinstance(sel, int):
        return [sel]
    if isinstance(sel, list):
        return sel
    a, b = sel.split(":")
    return list(range(int(a), min(T, int(b))))


def onehot(pos, T):
    x = torch.zeros(T, dtype=torch.bool)
    x[pos] = True
    return x


@pytest.mark.parametrize("sel", SELECTORS, ids=str)
@pytest.mark.parametrize("name", OP_NAMES)
def test_float64_reference(name, sel):
    m = tiny_model("llama", torch.float64)
    b = prompt(m, n=10)
    T, H, l = 10, m.n_heads, 1
    base = interp.capture(m, b, sites=[f"blocks.{l}.{k}" for k in ("resid_pre", "attn.logits", "attn.pattern",
                                                                     "attn.z", "resid_post")])
    x = base[f"blocks.{l}.resid_pre"][0]
    xf = x.float()  # φ is computed in fp32 (METHODS §1d), here over all dims
    phi = (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).abs().amax(-1)
    sinks = (phi > TAU).nonzero()[:, 0].tolist()
    e, tensors = make_edit(name, sel, m)
    tensors = {k: v.double() for k, v in tensors.items()}
    s = Spec.for_model(m, [e], tensors=tensors, sink={"dims": list(range(m.d_model)), "tau": TAU} if sel == "sink" else None)
    P = positions(sel, T, sinks)
    z = base[f"blocks.{l}.attn.logits"][0].clone()  # [h, q, k], −big on masked keys
    A = base[f"blocks.{l}.attn.pattern"][0]
    Z = base[f"blocks.{l}.attn.z"][0]  # [q, h, d]
    R = base[f"blocks.{l}.resid_post"][0]
    heads = onehot(e.get("heads", list(range(H))), H)[:, None, None]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    qdefault = "last" if e["op"] in ("attn.oeb", "attn.smi", "attn.amplify") else "all"
    qsel = onehot(positions(e.get("queries", qdefault), T, sinks), T)
    ksel = onehot(positions(e["keys"], T, sinks), T) if "keys" in e else torch.ones(T, dtype=torch.bool)
    edge = qsel[:, None] & ksel[None, :] & heads  # [h, q, k]
    kpos, qpos = torch.arange(T)[None, :].double(), torch.arange(T)[:, None].double()

    def soft(bias):  # softmax of the edited logits; a row whose every visible key is blocked keeps its distribution
        blocked = (bias <= -1e8) | ~causal
        keep = blocked.all(-1, keepdim=True)
        return torch.where(keep, A, torch.softmax(torch.where(causal, z + torch.where(keep, 0.0, bias), -math.inf), -1))
    site, want = "attn.pattern", None
    f = e.get("factor")
    if name == "scale":
        want = soft(torch.where(edge, torch.tensor(math.log(f), dtype=torch.float64), 0.0))
    elif name == "scale_raw":
        want = torch.where(edge, f * A, A)
    elif name == "scale_redistribute":
        kk = onehot([0, 1], T)
        pk = (A * kk).sum(-1, keepdim=True)
        rest = (A * ~kk).sum(-1, keepdim=True)
        new = torch.where(kk, f * A, A * (1 + (1 - f) * pk / rest.clamp_min(1e-300)))
        want = torch.where(qsel[:, None] & (rest > 1e-12) & heads, new, A)
    elif name == "bias":
        want = soft(torch.where(edge, 1.5, 0.0))
    elif name == "distance":
        want = soft(torch.where(edge, -0.7 * torch.log1p((qpos - kpos).abs() / 2.0), 0.0))
    elif name == "bias_tensor":
        want = soft(torch.where(qsel[:, None] & heads, tensors["B"][:, :T, :T], 0.0))
    elif name == "local_window":
        far = (kpos <= qpos - 3) & (kpos > 0)
        want = soft(torch.where(qsel[:, None] & far & heads, -1e9, 0.0))
    elif name == "copy_head":
        want = torch.where(qsel[:, None] & heads, A[0:1], A)
    elif name == "knockout":
        want = soft(torch.where(qsel[:, None] & onehot([1, 2], T)[None, :] & heads, -1e9, 0.0))
    elif name == "amplify":
        want = soft(torch.where(edge, 0.5 * z.abs(), 0.0))
    elif name == "gift":  # top-2 heads by image mass: a_V ⊙ exp(1.5 s); top-2 by question mass: a_Q · r; renormalise
        V, Q = onehot([1, 2, 3], T), onehot([5, 6], T)
        mvec = torch.ones(T, dtype=torch.float64)
        mvec[[1, 2, 3]] = torch.exp(1.5 * tensors["s"])

        def top2(mass):  # [h, q] -> bool [h, q], ties to the lower head
            out = torch.zeros_like(mass, dtype=torch.bool)
            for q in range(mass.shape[1]):
                out[sorted(range(H), key=lambda h: (-float(mass[h, q]), h))[:2], q] = True
            return out
        sv, sq = top2((A * V).sum(-1)), top2((A * Q).sum(-1))
        wv = torch.where(sv[..., None] & V, A * mvec, A)
        orig, new = (A * V * sv[..., None]).sum((0, 2)), (wv * V * sv[..., None]).sum((0, 2))
        r = torch.where(orig > 0, new / orig.clamp_min(1e-300), 1.0)  # [q]
        edited = torch.where(sq[..., None] & Q, wv * r[None, :, None], wv)
        edited = edited / edited.sum(-1, keepdim=True)
        want = torch.where(qsel[None, :, None] & (sv | sq)[..., None], edited, A)
    elif name == "oeb":
        p = torch.softmax(torch.where(causal, z, -math.inf), -1)
        Bm, Sm = onehot([4, 5], T) & causal, onehot([1, 2, 3], T) & causal
        pB, pS = (p * Bm).sum(-1, keepdim=True), (p * Sm).sum(-1, keepdim=True)
        nB, nS = Bm.sum(-1, keepdim=True).double(), Sm.sum(-1, keepdim=True).double()
        tb = torch.sqrt(nB / (nB + nS).clamp_min(1)).clamp(max=0.6)
        ts = pB + pS - tb
        act = qsel[:, None] & heads & (pB < tb) & (pB > 0) & (pS > 0) & (ts > 0)
        shift = torch.where(Bm, torch.log(tb / pB.clamp_min(1e-300)), 0.0) + \
            torch.where(Sm, torch.log(ts.clamp_min(1e-300) / pS.clamp_min(1e-300)), 0.0)
        want = torch.softmax(torch.where(causal, torch.where(act, z + shift, z), -math.inf), -1)
    else:
        site = "attn.z" if name in ("head_scale", "ablate_zero", "ablate_mean", "patch_z", "smi") else "resid_post"
        rows = onehot(positions(e.get("positions", e.get("queries", "last" if name == "smi" else "all")), T, sinks), T)
        hz = heads[:, 0, 0][None, :, None]  # [1, h, 1]
        where = rows[:, None, None] & hz
        if name == "head_scale":
            want = torch.where(where, 0.3 * Z, Z)
        elif name == "ablate_zero":
            want = torch.where(where, 0.0, Z)
        elif name == "ablate_mean":
            want = torch.where(where, tensors["mu"][None], Z)
        elif name == "patch_z":
            want = torch.where(rows[:, None, None], tensors["srcz"][0, :T], Z)
        elif name == "smi":  # V by hand: v_proj of the normed residual, kv heads repeated
            with torch.no_grad():
                v = m.adapter.attn[l].v_proj(m.adapter.layers[l].input_layernorm(x))
            v = v.view(T, m.n_kv_heads, -1).repeat_interleave(H // m.n_kv_heads, dim=1)  # [T, h, d]
            want = torch.where(where, Z + 0.5 * v[[1, 2]].mean(0)[None], Z)
        elif name == "resid_add":
            want = torch.where(rows[:, None], R + 2.0 * tensors["v"], R)
        elif name == "suppress":
            want = R.clone()
            want[rows.nonzero()[:, 0][:, None], torch.tensor([1, 5])] = 0.0
        elif name == "patch_resid":
            want = torch.where(rows[:, None], tensors["src"][0, :T], R)
        elif name == "project_out":
            u = tensors["u"] / tensors["u"].norm()
            want = torch.where(rows[:, None], R - 0.7 * (R @ u - 0.3)[:, None] * u, R)
        elif name == "vsv":  # x' = ‖x‖·n(n(x) + λ·(1 + max(0, cos(x, −v)))·n(v))
            v = tensors["w"] / tensors["w"].norm()
            xn = R / R.norm(dim=-1, keepdim=True)
            y = xn + 0.4 * (1 + (-(xn @ v)).clamp_min(0))[:, None] * v
            want = torch.where(rows[:, None], R.norm(dim=-1, keepdim=True) * y / y.norm(dim=-1, keepdim=True), R)
    with interp.patch(m, s):
        got = interp.capture(m, b, sites=f"blocks.{l}.{site}")[f"blocks.{l}.{site}"][0]
    assert want is not None
    assert (got - want).abs().max() <= 1e-9
