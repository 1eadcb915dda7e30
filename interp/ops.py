"""The ops a Spec can hold: one class per op, one table (:data:`OPS`), and a typed builder per op.

Each op class holds its schema (fields, with kinds and value ranges; the shapes and ranges of its sidecar
tensors), what it needs from the attention engine (``bias`` — an additive logit bias, which runs under SDPA —,
``logits``, ``weights``, ``z`` — per-head outputs before the output projection —, ``resid`` — a forward hook
on a residual site —, ``decode`` — the output logits — or ``graph`` — hooks on every node of the model), its
neutral value (an edit at it is skipped, so the model computes bit for bit what it computed before) and how it
applies. :class:`interp.spec.Spec` validates edits with these classes and :func:`interp.patch` applies them;
the math of each op is in :mod:`interp.patch` (METHODS.md §0, P1–P6).

Builders return an :class:`Edit` (a dict with the tensors it refers to; fields left out take the op's default,
as in a hand-written edit), composable into a Spec::

    from interp import ops
    spec = Spec.for_model(model, [ops.head_scale(layers=[3], heads=[1], factor=0.5),
                                  ops.resid_add(layers=[5], tensor=v, positions="last")])

Mean-ablation (``attn.head_ablate`` with ``mode="mean"``) replaces a head's output by its mean over a
reference set (Wang et al. 2022, IOI): :func:`mean_z` computes the per-layer, per-head mean of z over
reference prompts, and ``head_ablate(..., mode="mean", reference=(model, prompts))`` calls it.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .engine import BLOCK
from .errors import InterpError

SELECTOR_HELP = "'all', 'last', 'none', 'sink', 'role:NAME', an index, a range 'a:b', or a list of those"
DISTANCE_FNS = ("log1p", "linear", "constant")
MAX_GAIN = 1e4  # largest |multiplier| on an activation (scales, factors, α): beyond it fp32 overflows downstream
MAX_ACT = 1e6  # largest |value| written into an activation (sidecar vectors, patched values, mean values)
MAX_BIAS = 1e9  # largest |logit bias| (−1e9 blocks a key)
MAX_FACTOR = 1e6  # largest attention scale factor (a logit bias of log 1e6 ≈ 13.8)


# ------------------------------------------------------------------------------------------- schema
@dataclass(frozen=True)
class Field:
    """One field of an edit: its kind, whether it is required, and the range of a number."""

    kind: str | tuple  # selector | number | bool | ints | str | tensor | layers | heads | distance | a tuple of choices
    required: bool = False
    lo: float | None = None
    hi: float | None = None
    integer: bool = False

    def ok(self, v: Any, tensors: dict) -> bool:
        k = self.kind
        if isinstance(k, tuple):
            return isinstance(v, str) and v in k
        if k == "number":
            if not _is_num(v) or (self.integer and not (isinstance(v, int) or float(v).is_integer())):
                return False
            return (self.lo is None or v >= self.lo) and (self.hi is None or v <= self.hi)
        return {
            "str": lambda: isinstance(v, str),
            "bool": lambda: isinstance(v, bool),
            "ints": lambda: _is_ints(v),
            "selector": lambda: _is_selector(v),
            "tensor": lambda: isinstance(v, str) and v in tensors,
            "layers": lambda: v == "all" or _is_ints(v),
            "heads": lambda: v == "all" or _is_ints(v),
            "distance": lambda: _is_distance(v),
            "edges": lambda: v == "all" or isinstance(v, list),
        }[k]()

    def want(self, tensors: dict) -> str:
        k = self.kind
        if isinstance(k, tuple):
            return f"one of {list(k)}"
        if k == "number":
            rng = (f" in [{self.lo:g}, {self.hi:g}]" if self.lo is not None and self.hi is not None else
                   f" ≥ {self.lo:g}" if self.lo is not None else f" ≤ {self.hi:g}" if self.hi is not None else "")
            return ("an integer" if self.integer else "a finite number") + rng
        return {"selector": SELECTOR_HELP, "tensor": f"the name of a tensor in the sidecar ({sorted(tensors)})",
                "layers": "'all' or a list of ints ≥ 0", "heads": "'all' or a list of ints ≥ 0",
                "ints": "a list of ints ≥ 0", "bool": "true or false", "str": "a string",
                "distance": f"{{'fn': one of {DISTANCE_FNS}, 'scale': a number in [-{MAX_GAIN:g}, {MAX_GAIN:g}], "
                            f"'d0': a number in (0, {MAX_BIAS:g}]}}",
                "edges": "'all' or a list of [source, target] node-name pairs"}[k]


def _num(lo=None, hi=None, required=False, integer=False) -> Field:
    return Field("number", required, lo, hi, integer)


SEL, OPT_SEL = Field("selector"), Field("selector")
COMMON = {"op": Field("str", True), "layers": Field("layers", True), "heads": Field("heads"), "steps": Field("ints"),
          "note": Field("str")}


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def _is_ints(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)


def _is_selector(v) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return abs(v) < 2**31
    if isinstance(v, str):
        return bool(v.strip())
    return isinstance(v, list) and all(_is_selector(x) and not isinstance(x, list) for x in v)


def _is_distance(v) -> bool:
    if not isinstance(v, dict) or v.get("fn") not in DISTANCE_FNS or not set(v) <= {"fn", "scale", "d0"}:
        return False
    scale, d0 = v.get("scale", 1.0), v.get("d0", 1.0)
    return _is_num(scale) and abs(scale) <= MAX_GAIN and _is_num(d0) and 0 < d0 <= MAX_BIAS


def uses_sink(e: dict) -> bool:
    sels = [e.get(k) for k in ("queries", "keys", "redistribute_to", "positions", "segment", "bridge", "source")]
    return any(v == "sink" or (isinstance(v, list) and "sink" in v) for v in sels)


def _edit_layers(e: dict, n_layers: int | None) -> int | None:
    """How many layers an edit covers (None: 'all' before the model is known)."""
    return (n_layers if e["layers"] == "all" else len(e["layers"]))


# ------------------------------------------------------------------------------------------- ops
class Op:
    """One op: schema, engine need, neutral value, application. Subclasses set the class attributes and
    override what they use; the ``hook`` handed to the apply methods is the compiled spec (selectors, head
    masks, sidecar tensors)."""

    name = ""
    fields: dict[str, Field] = {}
    need = "bias"  # bias | logits | weights | z | resid
    on_heads = True  # False: acts on the residual stream ('heads' is refused)
    default_queries = "all"
    # sidecar tensor: allowed ranks (the shape per rank is checked against the model in check()), |max| value
    tensor_ranks: tuple[int, ...] = ()
    tensor_max = MAX_ACT

    def kind(self, e: dict) -> str:
        return self.need

    def neutral(self, e: dict) -> bool:
        """True when the edit is the identity at its parameters (it is then not run)."""
        return False

    # validation -----------------------------------------------------------------------------
    def validate(self, e: dict, path: str, tensors: dict) -> None:
        """Cross-field rules and the sidecar tensor's rank and values (model-independent)."""
        name = e.get("tensor")
        if name is not None and self.tensor_ranks:
            t = tensors[name]
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise InterpError(f"spec.{path}.tensor: sidecar tensor {name!r} must be a floating-point tensor, got "
                                  f"{getattr(t, 'dtype', type(t).__name__)}")
            if t.dim() not in self.tensor_ranks:
                raise InterpError(f"spec.{path}.tensor: sidecar tensor {name!r} has shape {list(t.shape)}; {self.name} "
                                  f"takes {self.shape_help()}")
            if t.numel() and not bool(torch.isfinite(t).all()):
                raise InterpError(f"spec.{path}.tensor: sidecar tensor {name!r} holds NaN or inf values")
            if t.numel() and float(t.abs().max()) > self.tensor_max:
                raise InterpError(f"spec.{path}.tensor: sidecar tensor {name!r} reaches |{float(t.abs().max()):.3g}|; "
                                  f"values up to {self.tensor_max:g} are allowed (larger ones overflow float32)")

    def check(self, e: dict, path: str, model, tensors: dict) -> None:
        """Model-dependent rules: the sidecar tensor's shape."""
        name = e.get("tensor")
        if name is None or not self.tensor_ranks:
            return
        t = tensors[name]
        want = self.shapes(e, model)
        if not any(_shape_ok(t.shape, w) for w in want):
            raise InterpError(f"spec.{path}.tensor: sidecar tensor {name!r} has shape {list(t.shape)}; on {model.name} "
                              f"{self.name} takes {' or '.join(_fmt_shape(w) for w in want)} ({self.shape_help()})")

    def shapes(self, e: dict, model) -> list[tuple]:
        """Allowed shapes (None: any size) of the sidecar tensor on ``model``."""
        return []

    def shape_help(self) -> str:
        return ""

    # application --------------------------------------------------------------------------
    def bias(self, hook, e: dict, b: int, call, layer: int) -> torch.Tensor:
        raise NotImplementedError

    def on_logits(self, hook, e: dict, z: torch.Tensor, call, layer: int) -> torch.Tensor:
        raise NotImplementedError

    def on_weights(self, hook, e: dict, w: torch.Tensor, call, layer: int) -> torch.Tensor:
        raise NotImplementedError

    def on_z(self, hook, e: dict, j: int, z: torch.Tensor, call, layer: int, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def on_resid(self, hook, e: dict, j: int, h: torch.Tensor, sel: torch.Tensor, off: int) -> torch.Tensor:
        raise NotImplementedError

    def site(self, e: dict) -> str:
        return e.get("site", "resid_post")


def _shape_ok(shape, want) -> bool:
    return len(shape) == len(want) and all(w is None or s == w or (w == "1|b" and s >= 1) for s, w in zip(shape, want))


def _fmt_shape(w) -> str:
    return "[" + ", ".join("any" if x is None else "b|1" if x == "1|b" else str(x) for x in w) + "]"


def _edge_bias(hook, e, b, call, layer, val) -> torch.Tensor:
    """val on (selected query, selected key) pairs, 0 elsewhere: [b, q, k] (float64; cast to the model's dtype)."""
    qsel = hook.qsel(e, b, call, layer)
    ksel = hook.ksel(e.get("keys", "all"), b, call, layer)
    return torch.where(qsel[:, :, None] & ksel[:, None, :], torch.tensor(val, dtype=torch.float64), 0.0)


class ScaleWeights(Op):
    name = "attn.scale_weights"
    fields = {"queries": SEL, "keys": Field("selector", True), "factor": _num(0, MAX_FACTOR, True),
              "renormalize": Field("bool"), "redistribute_to": SEL}

    def kind(self, e):
        return "bias" if e.get("renormalize", True) and "redistribute_to" not in e else "weights"

    def neutral(self, e):
        return float(e["factor"]) == 1.0

    def validate(self, e, path, tensors):
        if "redistribute_to" in e and e["factor"] > 1:
            raise InterpError(f"spec.{path}.factor: got {e['factor']!r}; expected ≤ 1 with redistribute_to")

    def bias(self, hook, e, b, call, layer):
        return _edge_bias(hook, e, b, call, layer, math.log(e["factor"]) if e["factor"] > 0 else BLOCK)

    def on_weights(self, hook, e, w, call, layer):
        # w'_qk = w_qk · m_qk with m = γ on K, (1 + gain_q) on R (ACT/VAR: the removed mass goes to R in
        # proportion to its weights), 1 elsewhere; row sums come from GEMVs, not [b, h, q, k] temporaries
        b = w.shape[0]
        rows = hook.qsel(e, b, call, layer)[:, None, :, None] & hook.head_mask(e)[None, :, None, None]
        ksel = hook.ksel(e["keys"], b, call, layer)[:, None, None, :]  # [b, 1, 1, k]
        kidx = ksel[0, 0, 0].nonzero()[:, 0]
        if e.get("redistribute_to") == "all" and len(kidx) <= 64 and (ksel == ksel[:1]).all():
            return _scale_few_keys_redistribute_all(w, kidx, float(e["factor"]), rows)
        colk = torch.where(ksel, float(e["factor"]), 1.0).to(w.dtype)
        if "redistribute_to" in e:
            rsel = hook.ksel(e["redistribute_to"], b, call, layer)[:, None, None, :] & ~ksel
            rf = rsel.to(w.dtype)
            removed = torch.matmul(w, (1 - colk).transpose(-1, -2))  # [b, h, q, 1]
            mass_r = torch.matmul(w, rf.transpose(-1, -2))
            rows = rows & (mass_r > 0)  # nothing to receive the mass: the row is kept
            gain = torch.where(rows, removed / mass_r.clamp_min(1e-30), 0.0)
            scaled = w * torch.addcmul(colk, rf, gain)
        else:
            scaled = w * colk
        return scaled if rows.all() else torch.where(rows, scaled, w)


def _scale_few_keys_redistribute_all(w: torch.Tensor, kidx: torch.Tensor, factor: float,
                                     rows: torch.Tensor) -> torch.Tensor:
    """ACT with R = every other key, for a few keys K (the common case): w'_K = γ w_K and
    w'_k = (1 + gain_q) w_k elsewhere, gain_q = (1 − γ) p_K / (1 − p_K) — one pass over w."""
    wk = w.index_select(-1, kidx)  # [b, h, q, |K|]
    p_k = wk.sum(-1, keepdim=True)
    mass_r = 1 - p_k  # rows are stochastic (every edit keeps them so): Σ over the other keys without a pass over w
    ok = rows & (mass_r > 4 * torch.finfo(w.dtype).eps)  # nothing (beyond rounding) to receive the mass: row kept
    gain = torch.where(ok, (1 - factor) * p_k / mass_r.clamp_min(1e-30), 0.0)
    out = w * (1 + gain)
    return out.index_copy_(-1, kidx, torch.where(ok, wk * factor, wk))


class AddLogitBias(Op):
    name = "attn.add_logit_bias"
    fields = {"queries": SEL, "keys": SEL, "bias": _num(-MAX_BIAS, MAX_BIAS), "distance": Field("distance"),
              "tensor": Field("tensor")}
    tensor_ranks, tensor_max = (2, 3), MAX_BIAS

    def neutral(self, e):
        return ("bias" in e and float(e["bias"]) == 0.0) or ("distance" in e and float(e["distance"].get("scale", 1.0)) == 0.0)

    def validate(self, e, path, tensors):
        if sum(x in e for x in ("bias", "distance", "tensor")) != 1:
            raise InterpError(f"spec.{path}: attn.add_logit_bias needs exactly one of bias, distance, tensor")
        super().validate(e, path, tensors)

    def shapes(self, e, model):
        return [(None, None), (1, None, None), (model.n_heads, None, None)]

    def shape_help(self):
        return "[query, key] or [n_heads | 1, query, key] (positions from 0)"

    def bias(self, hook, e, b, call, layer):
        qsel = hook.qsel(e, b, call, layer)
        if "distance" in e:
            d = e["distance"]
            dist = (call.q_positions[:, None].double() - call.k_positions[None, :].double()).abs() / float(d.get("d0", 1.0))
            g = {"log1p": torch.log1p(dist), "linear": dist, "constant": torch.ones_like(dist)}[d["fn"]]
            ksel = hook.ksel(e.get("keys", "all"), b, call, layer)
            return torch.where(qsel[:, :, None] & ksel[:, None, :], float(d.get("scale", 1.0)) * g[None], 0.0)
        if "tensor" in e:
            t = hook.spec.tensors[e["tensor"]].double()
            q1, k1 = call.q_start + call.q_len, call.k_start + call.k_len
            if t.shape[-2] < q1 or t.shape[-1] < k1:
                raise InterpError(f"attn.add_logit_bias tensor {e['tensor']!r} covers {t.shape[-2]} queries × "
                                  f"{t.shape[-1]} keys, but this run reaches query {q1 - 1} and key {k1 - 1}")
            t = t[..., call.q_start:q1, call.k_start:k1]
            bias = (t if t.dim() == 3 else t[None]).expand(hook.n_heads, -1, -1)[None] * qsel[:, None, :, None]
            return bias.expand(b, -1, -1, -1)
        return _edge_bias(hook, e, b, call, layer, float(e["bias"]))


class ReplacePattern(Op):
    name = "attn.replace_pattern"
    fields = {"queries": SEL, "mode": Field(("local_window", "copy_head"), True), "window": _num(0, 2**31),
              "keep_sink": Field("bool"), "source_head": _num(0, 2**31, integer=True)}

    def kind(self, e):
        return "bias" if e["mode"] == "local_window" else "weights"

    def neutral(self, e):
        return e["mode"] == "copy_head" and e.get("heads") == [e.get("source_head")]

    def validate(self, e, path, tensors):
        need = "window" if e["mode"] == "local_window" else "source_head"
        if need not in e:
            raise InterpError(f"spec.{path}.{need}: required for mode {e['mode']!r}")

    def check(self, e, path, model, tensors):
        if e.get("source_head") is not None and not 0 <= int(e["source_head"]) < model.n_heads:
            raise InterpError(f"spec.{path}.source_head: out of range (0..{model.n_heads - 1})")

    def bias(self, hook, e, b, call, layer):  # local window: z'_{qk} = −∞ for k ≤ q − w (key 0 kept if keep_sink)
        qsel = hook.qsel(e, b, call, layer)
        far = call.k_positions[None, :] <= call.q_positions[:, None] - float(e["window"])
        if e.get("keep_sink", True) and call.k_start == 0:
            far[:, 0] = False
        return torch.where(qsel[:, :, None] & far[None], torch.tensor(BLOCK, dtype=torch.float64), 0.0)

    def on_weights(self, hook, e, w, call, layer):  # copy_head: A'^h = A^{h*}
        rows = hook.qsel(e, w.shape[0], call, layer)[:, None, :, None] & hook.head_mask(e)[None, :, None, None]
        src = w[:, int(e["source_head"])][:, None].expand_as(w)
        return torch.where(rows, src, w)


class Knockout(Op):
    name = "attn.knockout"
    fields = {"queries": Field("selector", True), "keys": Field("selector", True)}

    def neutral(self, e):
        return e["keys"] in ("none", []) or e["queries"] in ("none", [])

    def bias(self, hook, e, b, call, layer):
        return _edge_bias(hook, e, b, call, layer, BLOCK)


class HeadScale(Op):
    name = "attn.head_scale"
    fields = {"queries": SEL, "factor": _num(-MAX_GAIN, MAX_GAIN, True)}
    need = "z"

    def neutral(self, e):
        return float(e["factor"]) == 1.0

    def on_z(self, hook, e, j, z, call, layer, v):
        return torch.where(hook.z_where(e, z, call, layer), z * float(e["factor"]), z)


class HeadAblate(Op):
    name = "attn.head_ablate"
    fields = {"queries": SEL, "mode": Field(("zero", "mean")), "tensor": Field("tensor")}
    need = "z"
    tensor_ranks = (2, 3)

    def validate(self, e, path, tensors):
        mode = e.get("mode", "zero")
        if mode == "mean" and "tensor" not in e:
            raise InterpError(f"spec.{path}.tensor: mode 'mean' needs the per-head mean of z over a reference set "
                              "([n_heads, head_dim], or [layers, n_heads, head_dim] with one row per layer of the "
                              "edit); compute it with interp.ops.mean_z(model, reference_prompts, layers) or build "
                              "the edit with interp.ops.head_ablate(..., mode='mean', reference=(model, prompts))")
        if mode == "zero" and "tensor" in e:
            raise InterpError(f"spec.{path}.tensor: mode 'zero' takes no tensor (did you mean mode 'mean'?)")
        super().validate(e, path, tensors)

    def shapes(self, e, model):
        return [(model.n_heads, model.head_dim), (_edit_layers(e, model.n_layers), model.n_heads, model.head_dim)]

    def shape_help(self):
        return "[n_heads, head_dim] or [layers of the edit, n_heads, head_dim]"

    def on_z(self, hook, e, j, z, call, layer, v):
        if e.get("mode", "zero") == "zero":
            repl = torch.zeros_like(z)
        else:  # the mean over a reference set, from the sidecar
            t = hook.spec.tensors[e["tensor"]].to(z.dtype)
            repl = (t[j] if t.dim() == 3 else t)[None, None].expand_as(z)
        return torch.where(hook.z_where(e, z, call, layer), repl, z)


class ResidAdd(Op):
    name = "resid.add"
    fields = {"positions": SEL, "site": Field(("resid_pre", "resid_post")), "tensor": Field("tensor", True),
              "scale": _num(-MAX_GAIN, MAX_GAIN)}
    need, on_heads, tensor_ranks = "resid", False, (1, 2)

    def neutral(self, e):
        return float(e.get("scale", 1.0)) == 0.0

    def shapes(self, e, model):
        return [(model.d_model,), (_edit_layers(e, model.n_layers), model.d_model)]

    def shape_help(self):
        return "[d_model] or [layers of the edit, d_model]"

    def on_resid(self, hook, e, j, h, sel, off):
        t = hook.spec.tensors[e["tensor"]].to(h.dtype)
        vec = t[j] if t.dim() == 2 else t
        return h + float(e.get("scale", 1.0)) * vec * sel[..., None].to(h.dtype)


class SuppressDims(Op):
    name = "resid.suppress_dims"
    fields = {"positions": SEL, "site": Field(("resid_pre", "resid_post")), "dims": Field("ints", True),
              "mode": Field(("zero", "mean", "clamp")), "value": _num(),
              "tensor": Field("tensor")}
    need, on_heads, tensor_ranks = "resid", False, (1, 2)

    def validate(self, e, path, tensors):
        mode = e.get("mode", "zero")
        if mode == "mean" and "tensor" not in e and "value" not in e:
            raise InterpError(f"spec.{path}: resid.suppress_dims mode 'mean' needs 'tensor' (per-dim means) or 'value'")
        if mode == "mean" and "value" in e and abs(e["value"]) > MAX_ACT:
            raise InterpError(f"spec.{path}.value: got {e['value']!r}; mode 'mean' writes it into the residual "
                              f"stream: expected a number in [-{MAX_ACT:g}, {MAX_ACT:g}]")
        if mode == "clamp" and e.get("value", 0.0) < 0:
            raise InterpError(f"spec.{path}.value: got {e['value']!r}; mode 'clamp' needs a bound ≥ 0")
        super().validate(e, path, tensors)

    def check(self, e, path, model, tensors):
        if e["dims"] and max(e["dims"]) >= model.d_model:
            raise InterpError(f"spec.{path}.dims: out of range (0..{model.d_model - 1})")
        super().check(e, path, model, tensors)

    def shapes(self, e, model):
        n = len(e["dims"])
        return [(n,), (_edit_layers(e, model.n_layers), n)]

    def shape_help(self):
        return "[len(dims)] or [layers of the edit, len(dims)]"

    def on_resid(self, hook, e, j, h, sel, off):
        dims, d = e["dims"], h.shape[-1]
        cols = torch.zeros(d, dtype=torch.bool)
        cols[dims] = True
        where = sel[..., None] & cols
        mode = e.get("mode", "zero")
        if mode == "zero":
            return torch.where(where, torch.zeros_like(h), h)
        if mode == "clamp":
            lim = float(e.get("value", 0.0))
            return torch.where(where, h.clamp(-lim, lim), h)
        vals = torch.zeros(d, dtype=h.dtype)
        if "tensor" in e:
            t = hook.spec.tensors[e["tensor"]].to(h.dtype)
            vals[dims] = t[j] if t.dim() == 2 else t
        else:
            vals[dims] = float(e["value"])
        return torch.where(where, vals.expand_as(h), h)


class Patch(Op):
    name = "patch"
    fields = {"site": Field(("resid_pre", "resid_post", "attn.out", "mlp.out", "attn.z"), True), "positions": SEL,
              "tensor": Field("tensor", True)}
    tensor_ranks = (3, 4, 5)  # 'heads' only on the attn.z site: only those heads' z is replaced

    def kind(self, e):
        return "z" if e["site"] == "attn.z" else "resid"

    def validate(self, e, path, tensors):
        if "heads" in e and e["site"] != "attn.z":
            raise InterpError(f"spec.{path}.heads: patch at {e['site']} acts on the residual stream, not on heads "
                              "(heads are patched at site 'attn.z')")
        super().validate(e, path, tensors)
        rank = tensors[e["tensor"]].dim()
        if rank not in ((4, 5) if e["site"] == "attn.z" else (3, 4)):
            raise InterpError(f"spec.{path}.tensor: a {e['site']} source has shape {self._help(e['site'])}, "
                              f"got rank {rank}")

    @staticmethod
    def _help(site):
        return ("[b|1, T, n_heads, head_dim] or [layers of the edit, b|1, T, n_heads, head_dim]" if site == "attn.z"
                else "[b|1, T, d_model] or [layers of the edit, b|1, T, d_model]")

    def shapes(self, e, model):
        L = _edit_layers(e, model.n_layers)
        if e["site"] == "attn.z":
            return [("1|b", None, model.n_heads, model.head_dim), (L, "1|b", None, model.n_heads, model.head_dim)]
        return [("1|b", None, model.d_model), (L, "1|b", None, model.d_model)]

    def shape_help(self):
        return "a saved activation of the site (see interp.capture)"

    def on_z(self, hook, e, j, z, call, layer, v):
        src = hook.spec.tensors[e["tensor"]].to(z.dtype)
        src = src[j] if src.dim() == 5 else src
        _check_len(src.shape[1], call.q_start + call.q_len)
        src = src[:, call.q_start:call.q_start + call.q_len]
        return torch.where(hook.z_where(e, z, call, layer, key="positions"), src.expand_as(z), z)

    def on_resid(self, hook, e, j, h, sel, off):
        src = hook.spec.tensors[e["tensor"]].to(h.dtype)
        src = src[j] if src.dim() == 4 else src
        _check_len(src.shape[1], off + h.shape[1])
        return torch.where(sel[..., None], src[:, off:off + h.shape[1]].expand_as(h), h)


def _check_len(have: int, need: int) -> None:
    if have < need:
        raise InterpError(f"patch source has {have} positions but the run reaches position {need - 1}: "
                          "patch runs of the same length")


class OEB(Op):
    name = "attn.oeb"
    fields = {"queries": SEL, "segment": Field("selector", True), "bridge": Field("selector", True),
              "tau_max": _num(0, 1)}
    need, default_queries = "logits", "last"  # τ_max = 0 leaves every row as it is, but on the eager path

    def on_logits(self, hook, e, z, call, layer):
        """The KL projection of each selected row onto p(B) = τ_B with p(O) fixed (METHODS §4b)."""
        b, n = z.shape[0], hook.engine.batch_len
        qsel = hook.qsel(e, b, call, layer)
        bsel = hook.ksel(e["bridge"], b, call, layer)
        ssel = hook.ksel(e["segment"], b, call, layer)
        gen = n - call.k_start
        if 0 < n and gen < call.k_len:  # tokens generated after the prompt belong to the current segment
            ssel[:, max(0, gen):] = True
        vis = z > BLOCK / 2  # masked or knocked-out keys are not counted
        B = bsel[:, None, None, :] & vis
        S = ssel[:, None, None, :] & ~bsel[:, None, None, :] & vis
        dt = torch.promote_types(z.dtype, torch.float32)  # fp32 at least, float64 kept
        p = torch.softmax(z.to(dt), -1)
        pB, pS = (p * B).sum(-1, keepdim=True), (p * S).sum(-1, keepdim=True)
        nB, nS = B.sum(-1, keepdim=True).to(dt), S.sum(-1, keepdim=True).to(dt)
        tau_b = torch.sqrt(nB / (nB + nS).clamp_min(1)).clamp(max=float(e.get("tau_max", 0.15)))
        tau_s = pB + pS - tau_b  # = 1 − p(O) − τ_B
        rows = qsel[:, None, :, None] & hook.head_mask(e)[None, :, None, None]
        active = rows & (pB < tau_b) & (pB > 0) & (pS > 0) & (tau_s > 0)
        lam_b = torch.log(tau_b / pB.clamp_min(1e-38))
        lam_s = torch.log(tau_s.clamp_min(1e-38) / pS.clamp_min(1e-38))
        shift = torch.where(B, lam_b, 0.0) + torch.where(S, lam_s, 0.0)
        return torch.where(active, z + shift.to(z.dtype), z)


class SMI(Op):
    name = "attn.smi"
    fields = {"queries": SEL, "source": Field("selector", True), "scale": _num(-MAX_GAIN, MAX_GAIN)}
    need, default_queries = "z", "last"

    def neutral(self, e):
        return float(e.get("scale", 0.06)) == 0.0

    def on_z(self, hook, e, j, z, call, layer, v):  # z'[t] = z[t] + s · mean_{j∈source} V[j], v [b, h, k, d]
        src = hook.ksel(e["source"], z.shape[0], call, layer).to(v.dtype)
        mean_v = torch.einsum("bk,bhkd->bhd", src, v) / src.sum(1).clamp_min(1)[:, None, None]
        return torch.where(hook.z_where(e, z, call, layer), z + float(e.get("scale", 0.06)) * mean_v[:, None].to(z.dtype), z)


class Amplify(Op):
    name = "attn.amplify"
    fields = {"queries": SEL, "keys": Field("selector", True), "alpha": _num(-MAX_GAIN, MAX_GAIN, True)}
    need, default_queries = "logits", "last"

    def neutral(self, e):
        return float(e["alpha"]) == 0.0

    def on_logits(self, hook, e, z, call, layer):
        """PAI (Liu et al., ECCV'24): z'_{qk} = z_{qk} + α·|z_{qk}| for k ∈ keys, on the selected query rows."""
        b = z.shape[0]
        qsel = hook.qsel(e, b, call, layer)
        ksel = hook.ksel(e["keys"], b, call, layer)[:, :z.shape[-1]]
        where = qsel[:, None, :, None] & ksel[:, None, None, :] & hook.head_mask(e)[None, :, None, None]
        return torch.where(where, z + float(e["alpha"]) * z.abs(), z)


class ProjectOut(Op):
    name = "resid.project_out"
    fields = {"positions": SEL, "site": Field(("resid_pre", "resid_post")), "tensor": Field("tensor", True),
              "strength": _num(-MAX_GAIN, MAX_GAIN), "value": _num(-MAX_ACT, MAX_ACT)}
    need, on_heads, tensor_ranks = "resid", False, (1, 2)

    def neutral(self, e):
        return float(e.get("strength", 1.0)) == 0.0

    def validate(self, e, path, tensors):
        super().validate(e, path, tensors)
        t = tensors[e["tensor"]]
        if bool((t.double().norm(dim=-1) == 0).any()):
            raise InterpError(f"spec.{path}.tensor: sidecar tensor {e['tensor']!r} has a zero direction: "
                              "resid.project_out needs a nonzero direction per layer")

    def shapes(self, e, model):
        return [(model.d_model,), (_edit_layers(e, model.n_layers), model.d_model)]

    def shape_help(self):
        return "[d_model] or [layers of the edit, d_model] (directions; normalised when applied)"

    def on_resid(self, hook, e, j, h, sel, off):
        """h'_t = h_t − s·(h_t·û − c)·û with û = v/‖v‖ (s = 1, c = 0: the component along v removed)."""
        t = hook.spec.tensors[e["tensor"]]
        u = (t[j] if t.dim() == 2 else t).double()
        u = (u / u.norm()).to(h.dtype)
        coef = (h @ u - float(e.get("value", 0.0))) * float(e.get("strength", 1.0))
        return h - (coef * sel.to(h.dtype))[..., None] * u


class Gift(Op):
    name = "attn.gift"
    fields = {"queries": SEL, "keys": Field("selector", True), "query_keys": SEL, "tensor": Field("tensor", True),
              "alpha": _num(-30, 30, True), "top": _num(1, 2**31, integer=True)}
    need, default_queries = "weights", "last"
    tensor_ranks, tensor_max = (1, 2), 1.0

    def neutral(self, e):
        return float(e["alpha"]) == 0.0  # m = exp(0·s) = 1 and r = 1

    def validate(self, e, path, tensors):
        super().validate(e, path, tensors)
        t = tensors[e["tensor"]]
        if t.numel() and float(t.min()) < 0:
            raise InterpError(f"spec.{path}.tensor: the GIFT saliency {e['tensor']!r} must lie in [0, 1] (min-max "
                              f"normalised), got a minimum of {float(t.min()):.3g}")

    def shapes(self, e, model):
        return [(None,), ("1|b", None)]

    def shape_help(self):
        return "[n] or [b|1, n]: one saliency in [0, 1] per selected key, in key order (n = keys the selector picks)"

    def on_weights(self, hook, e, w, call, layer):
        """GIFT (amazon-science/GIFT, modeling_llama.py): on each selected row, the ``top`` heads (default H/2) of the
        edit with the most mass on V = ``keys`` get a'_V = a_V ⊙ m, m = exp(α s); r = Σ a'_V / Σ a_V over those heads;
        the ``top`` heads with the most mass on Q = ``query_keys`` get a'_Q = r a_Q; every edited row is renormalised
        (ties between heads go to the lower index)."""
        b, H, q, k = w.shape
        rows = hook.qsel(e, b, call, layer)  # [b, q]
        if not bool(rows.any()):
            return w
        kv = hook.ksel(e["keys"], b, call, layer)[:, :k]
        kq = hook.ksel(e["query_keys"], b, call, layer)[:, :k] & ~kv if "query_keys" in e else torch.zeros_like(kv)
        s = hook.spec.tensors[e["tensor"]].to(w.dtype)
        s = s[None] if s.dim() == 1 else s
        if s.shape[0] not in (1, b):
            raise InterpError(f"attn.gift tensor {e['tensor']!r} has {s.shape[0]} rows for a batch of {b} sequences: "
                              "give one row, or one per sequence")
        m = torch.ones(b, k, dtype=w.dtype)
        for i in range(b):
            if not bool(rows[i].any()):
                continue
            idx = kv[i].nonzero()[:, 0]
            if len(idx) == 0:
                rows[i] = False  # no key to weight in this sequence: its rows are left as they are
                continue
            si = s[i if s.shape[0] > 1 else 0]
            if len(idx) != si.shape[0]:
                raise InterpError(f"attn.gift tensor {e['tensor']!r} holds {si.shape[0]} saliencies but the keys "
                                  f"selector {e['keys']!r} picks {len(idx)} keys in sequence {i}: build the saliency "
                                  "on the same inputs")
            m[i, idx] = torch.exp(float(e["alpha"]) * si)
        hm = hook.head_mask(e)
        top = min(int(e.get("top", max(1, H // 2))), int(hm.sum()))
        out_heads = (~hm)[None, :, None]
        kvf, kqf = kv[:, None, None, :].to(w.dtype), kq[:, None, None, :].to(w.dtype)
        mass_v = (w * kvf).sum(-1).masked_fill(out_heads, -1.0)  # [b, H, q]
        sel_v = torch.zeros_like(mass_v, dtype=torch.bool).scatter_(1, torch.sort(mass_v, dim=1, descending=True, stable=True).indices[:, :top], True) & hm[None, :, None]
        mw = torch.where(sel_v[..., None] & kv[:, None, None, :], m[:, None, None, :], torch.ones((), dtype=w.dtype))
        wv = w * mw
        orig = (w * kvf * sel_v[..., None]).sum((1, 3))  # [b, q]
        new = (wv * kvf * sel_v[..., None]).sum((1, 3))
        r = torch.where(orig > 0, new / orig.clamp_min(torch.finfo(w.dtype).tiny), torch.ones((), dtype=w.dtype))
        mass_q = (w * kqf).sum(-1).masked_fill(out_heads, -1.0)
        sel_q = torch.zeros_like(mass_q, dtype=torch.bool).scatter_(1, torch.sort(mass_q, dim=1, descending=True, stable=True).indices[:, :top], True) & hm[None, :, None]
        if "query_keys" not in e:
            sel_q = torch.zeros_like(sel_q)
        rq = torch.where(sel_q[..., None] & kq[:, None, None, :], r[:, None, :, None], torch.ones((), dtype=w.dtype))
        edited = wv * rq
        edited = edited / edited.sum(-1, keepdim=True)
        where = rows[:, None, :, None] & (sel_v | sel_q)[..., None]
        return torch.where(where, edited, w)


OPS: dict[str, Op] = {op.name: op for op in (ScaleWeights(), AddLogitBias(), ReplacePattern(), Knockout(),
                                             HeadScale(), HeadAblate(), ResidAdd(), SuppressDims(), Patch(),
                                             OEB(), SMI(), Amplify(), ProjectOut(), Gift())}


def op_of(e: dict) -> Op:
    return OPS[e["op"]]


# ------------------------------------------------------------------------------------------- builders
class Edit(dict):
    """One edit of a Spec (a plain dict of its fields), with the sidecar tensors it refers to (``.tensors``);
    ``Spec.for_model`` collects them."""

    def __init__(self, *args, tensors: dict | None = None, **kw):
        super().__init__(*args, **kw)
        self.tensors: dict[str, torch.Tensor] = dict(tensors or {})


Layers = Sequence[int] | str
Heads = Sequence[int] | str
Selector = str | int | Sequence[str | int]


def _tensor_name(op: str, t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    digest = hashlib.sha256(str((t.dtype, tuple(t.shape))).encode() + t.numpy().tobytes()).hexdigest()[:12]
    return f"{op}.{digest}"


def _edit(op: str, layers: Layers, heads: Heads | None = None, **fields) -> Edit:
    e = Edit(op=op, layers=layers if layers == "all" else [int(l) for l in layers])
    if heads is not None and heads != "all":
        e["heads"] = [int(h) for h in heads]
    for k, v in fields.items():
        if v is None:
            continue
        if isinstance(v, torch.Tensor):
            name = _tensor_name(op, v)
            e.tensors[name] = v.detach().float().cpu()
            v = name
        elif isinstance(v, tuple):
            v = list(v)
        e[k] = v
    return e


def scale_weights(layers: Layers, keys: Selector, factor: float, *, heads: Heads = "all", queries: Selector | None = None,
                  renormalize: bool = True, redistribute_to: Selector | None = None) -> Edit:
    """attn.scale_weights: A' = normalise(A ⊙ γ^{1[k∈K]}) (or redistribute the removed mass to R)."""
    return _edit("attn.scale_weights", layers, heads, queries=queries, keys=keys, factor=factor,
                 renormalize=None if renormalize else False, redistribute_to=redistribute_to)


def add_logit_bias(layers: Layers, *, heads: Heads = "all", queries: Selector | None = None, keys: Selector | None = None,
                   bias: float | None = None, distance: dict | None = None, tensor: torch.Tensor | str | None = None) -> Edit:
    """attn.add_logit_bias: z' = z + B (a constant, a distance function, or a [q, k] / [h, q, k] tensor)."""
    return _edit("attn.add_logit_bias", layers, heads, queries=queries, keys=keys, bias=bias, distance=distance,
                 tensor=tensor)


def replace_pattern(layers: Layers, mode: str, *, heads: Heads = "all", queries: Selector | None = None,
                    window: int | None = None, keep_sink: bool | None = None, source_head: int | None = None) -> Edit:
    """attn.replace_pattern: a local window (z' = −∞ for k ≤ q − w) or another head's pattern."""
    return _edit("attn.replace_pattern", layers, heads, queries=queries, mode=mode, window=window,
                 keep_sink=keep_sink, source_head=source_head)


def knockout(layers: Layers, queries: Selector, keys: Selector, *, heads: Heads = "all") -> Edit:
    """attn.knockout: z'_{qk} = −∞ for q ∈ queries, k ∈ keys."""
    return _edit("attn.knockout", layers, heads, queries=queries, keys=keys)


def head_scale(layers: Layers, factor: float, *, heads: Heads = "all", queries: Selector | None = None) -> Edit:
    """attn.head_scale: O'^h = α O^h."""
    return _edit("attn.head_scale", layers, heads, queries=queries, factor=factor)


def head_ablate(layers: Layers, *, heads: Heads = "all", mode: str | None = None, queries: Selector | None = None,
                tensor: torch.Tensor | str | None = None, reference: tuple | None = None) -> Edit:
    """attn.head_ablate: O'^h = 0, or (mode 'mean') the head's mean output over a reference set: pass it as
    ``tensor`` ([n_heads, head_dim] or [layers, n_heads, head_dim]) or as ``reference=(model, prompts)``."""
    if reference is not None:
        if mode != "mean" or tensor is not None:
            raise InterpError("head_ablate: reference= computes the mean for mode='mean'; pass it without tensor=")
        model, prompts = reference
        tensor = mean_z(model, prompts, list(range(model.n_layers)) if layers == "all" else list(layers))
    return _edit("attn.head_ablate", layers, heads, queries=queries, mode=mode, tensor=tensor)


def resid_add(layers: Layers, tensor: torch.Tensor | str, *, positions: Selector | None = None, site: str | None = None,
              scale: float | None = None) -> Edit:
    """resid.add: h'_t = h_t + s·v."""
    return _edit("resid.add", layers, None, positions=positions, site=site, tensor=tensor, scale=scale)


def suppress_dims(layers: Layers, dims: Sequence[int], *, positions: Selector | None = None, site: str | None = None,
                  mode: str | None = None, value: float | None = None, tensor: torch.Tensor | str | None = None) -> Edit:
    """resid.suppress_dims: h'_{t,c} = 0 | a mean | clamp(h, −v, v) for c ∈ dims."""
    return _edit("resid.suppress_dims", layers, None, positions=positions, site=site, dims=[int(d) for d in dims],
                 mode=mode, value=value, tensor=tensor)


def project_out(layers: Layers, tensor: torch.Tensor | str, *, positions: Selector | None = None,
                site: str | None = None, strength: float | None = None, value: float | None = None) -> Edit:
    """resid.project_out: h'_t = h_t − s·(h_t·û − c)·û, û = v/‖v‖ (s = 1, c = 0 removes the component on v)."""
    return _edit("resid.project_out", layers, None, positions=positions, site=site, tensor=tensor,
                 strength=strength, value=value)


def patch_site(layers: Layers, site: str, tensor: torch.Tensor | str, *, positions: Selector | None = None,
               heads: Heads | None = None) -> Edit:
    """patch: x'_t = x^{src}_t at a site (activation patching from a saved Trace); at ``attn.z``, ``heads``
    restricts it to those heads' z (z'_{t,h} = z^{src}_{t,h} for h ∈ heads, the other heads unchanged)."""
    return _edit("patch", layers, heads, site=site, positions=positions, tensor=tensor)


def oeb(layers: Layers, segment: Selector, bridge: Selector, *, heads: Heads = "all", queries: Selector | None = None,
        tau_max: float | None = None) -> Edit:
    """attn.oeb: Step-Saliency's odds-equal bridge (METHODS §4b)."""
    return _edit("attn.oeb", layers, heads, queries=queries, segment=segment, bridge=bridge, tau_max=tau_max)


def smi(layers: Layers, source: Selector, *, heads: Heads = "all", queries: Selector | None = None,
        scale: float | None = None) -> Edit:
    """attn.smi: O'^h[t] = O^h[t] + s · mean_{j∈source} V^h[j]."""
    return _edit("attn.smi", layers, heads, queries=queries, source=source, scale=scale)


def amplify(layers: Layers, keys: Selector, alpha: float, *, heads: Heads = "all", queries: Selector | None = None) -> Edit:
    """attn.amplify (PAI): z'_{qk} = z_{qk} + α|z_{qk}| on the keys."""
    return _edit("attn.amplify", layers, heads, queries=queries, keys=keys, alpha=alpha)


def gift(layers: Layers, keys: Selector, tensor: torch.Tensor | str, alpha: float, *, heads: Heads = "all",
         queries: Selector | None = None, query_keys: Selector | None = None, top: int | None = None) -> Edit:
    """attn.gift: a'_V = a_V ⊙ exp(α s) on the top heads by V-mass, a'_Q = r a_Q on the top heads by Q-mass,
    r = Σa'_V / Σa_V, rows renormalised (GIFT; s in [0, 1] per key of ``keys``, [n] or [b, n])."""
    return _edit("attn.gift", layers, heads, queries=queries, keys=keys, query_keys=query_keys, tensor=tensor,
                 alpha=alpha, top=top)


@torch.no_grad()
def mean_z(model, prompts, layers: Sequence[int]) -> torch.Tensor:
    """[len(layers), n_heads, head_dim]: each head's output z (before the output projection) averaged over every
    real token of the reference ``prompts`` — the value mean-ablation writes."""
    from .capture import capture
    layers = [int(l) for l in layers]
    if not layers:
        raise InterpError("mean_z: no layers given")
    tr = capture(model, prompts, sites=[f"blocks.{l}.attn.z" for l in layers])
    w = tr.attention_mask.to(torch.float64)[:, :, None, None]  # [b, T, 1, 1]
    n = w.sum()
    if n == 0:
        raise InterpError("mean_z: the reference prompts have no tokens")
    return torch.stack([(tr[f"blocks.{l}.attn.z"].double() * w).sum((0, 1)) / n for l in layers]).float()


# ------------------------------------------------------------------------------------------- decoding ops
class _Decode(Op):
    """An op on the model's output logits (kind ``decode``): the patching layer calls :meth:`on_output` with the
    logits of the forward, after every attention and residual edit of that forward. ``layers`` names the layers
    the op reads (SLA's window) or edits in its reference pass (CFG's knockout)."""

    need, on_heads = "decode", False

    def on_output(self, hook, e: dict, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class CFG(_Decode):
    name = "decode.cfg"
    fields = {"keys": Field("selector"), "gamma": _num(-MAX_GAIN, MAX_GAIN, True), "cutoff": _num(0.0, 1.0)}

    def neutral(self, e):
        return float(e["gamma"]) == 1.0

    def on_output(self, hook, e, logits):
        """PAI's CFG step (Liu et al., ECCV'24; LALBJ/PAI CFG.py): with ℓ = log_softmax(logits) and ℓ₀ the same from
        the reference pass (the image keys knocked out in ``layers``), ℓ' = γ(ℓ − ℓ₀) + ℓ₀ where p ≥ β·max p, and
        the blocking value elsewhere (β = ``cutoff``, 0.1)."""
        ref = hook.reference_logits(e)
        lp = torch.log_softmax(logits.double(), -1)
        l0 = torch.log_softmax(ref.double(), -1)
        out = float(e["gamma"]) * (lp - l0) + l0
        beta = float(e.get("cutoff", 0.1))
        if beta > 0:
            out = out.masked_fill(lp < math.log(beta) + lp.amax(-1, keepdim=True), BLOCK)
        return out.to(logits.dtype)


class SLA(_Decode):
    name = "decode.sla"
    fields = {"alpha": _num(0.0, 1.0, True)}

    def neutral(self, e):
        return float(e["alpha"]) == 0.0

    def on_output(self, hook, e, logits):
        """VISTA's SLA (Li et al., ICML'25): z' = (1−α) z^L + α · mean_{l∈layers} z^l, z^l = W_U norm_f(h^l) the
        logit lens of ``blocks.{l}.resid_post`` at the same positions."""
        lens = torch.stack([hook.lens(l, logits.shape[1]).double() for l in hook.layer_list(e)]).mean(0)
        a = float(e["alpha"])
        return ((1 - a) * logits.double() + a * lens).to(logits.dtype)


class VSV(Op):
    name = "resid.vsv"
    fields = {"positions": SEL, "site": Field(("mlp.out", "attn.out", "resid_post")), "tensor": Field("tensor", True),
              "lam": _num(-MAX_GAIN, MAX_GAIN, True)}
    need, on_heads, tensor_ranks = "resid", False, (1, 2)

    def neutral(self, e):
        return float(e["lam"]) == 0.0

    def validate(self, e, path, tensors):
        super().validate(e, path, tensors)
        t = tensors[e["tensor"]]
        if bool((t.double().norm(dim=-1) == 0).any()):
            raise InterpError(f"spec.{path}.tensor: sidecar tensor {e['tensor']!r} has a zero vector: resid.vsv needs "
                              "a nonzero steering vector per layer")

    def shapes(self, e, model):
        return [(model.d_model,), (_edit_layers(e, model.n_layers), model.d_model)]

    def shape_help(self):
        return "[d_model] or [layers of the edit, d_model] (steering vectors; normalised when applied)"

    def site(self, e):
        return e.get("site", "mlp.out")

    def on_resid(self, hook, e, j, h, sel, off):
        """VISTA's VSV: x' = ‖x‖ · n(n(x) + λ·λ_sim·n(v)), λ_sim = 1 + max(0, cos(x, −v)), n(u) = u/‖u‖."""
        t = hook.spec.tensors[e["tensor"]]
        v = (t[j] if t.dim() == 2 else t).double()
        v = v / v.norm()
        x = h.double()
        norm = x.norm(dim=-1, keepdim=True)
        xn = x / norm.clamp_min(1e-30)
        lam_sim = 1 + (-(xn @ v)).clamp_min(0)[..., None]
        y = xn + float(e["lam"]) * lam_sim * v
        new = (norm * y / y.norm(dim=-1, keepdim=True).clamp_min(1e-30)).to(h.dtype)
        return torch.where(sel[..., None], new, h)


class CircuitEdges(Op):
    name = "circuit.edges"
    fields = {"keep": Field("edges", True), "tensor": Field("tensor", True)}
    need, on_heads, tensor_ranks = "graph", False, (3, 4)

    def neutral(self, e):
        return e["keep"] == "all"

    def validate(self, e, path, tensors):
        from .edges import check_names
        if e["layers"] != "all":
            raise InterpError(f"spec.{path}.layers: circuit.edges spans the whole model's graph: give 'all'")
        if "steps" in e:
            raise InterpError(f"spec.{path}.steps: circuit.edges has no denoising steps (causal LMs only)")
        check_names(e["keep"], f"spec.{path}.keep")
        super().validate(e, path, tensors)

    def check(self, e, path, model, tensors):
        from .edges import EdgeGraph, check_model
        check_model(model)
        EdgeGraph(model.n_layers, model.n_heads).keep_mask(e["keep"], f"spec.{path}.keep")
        super().check(e, path, model, tensors)

    def shapes(self, e, model):
        U = 1 + model.n_layers * (model.n_heads + 1)
        return [(U, None, model.d_model), ("1|b", U, None, model.d_model)]

    def shape_help(self):
        return ("[sources, positions, d_model] (each source's ablated output per position; later positions take the "
                "last row) or [b|1, sources, positions, d_model] (one per sequence), sources = 1 + L·(H + 1)")

    def hooks(self, hook, e: dict, owner: int) -> list:
        """x_d = x_d^run − Σ_{u→d ∉ keep} (a_u^run − ã_u) at every downstream node d (:mod:`interp.edges`)."""
        from .edges import EdgeAblation, EdgeGraph
        m = hook.model
        keep = EdgeGraph(m.n_layers, m.n_heads).keep_mask(e["keep"])
        return EdgeAblation(m, keep, hook.spec.tensors[e["tensor"]], owner).hooks()


OPS.update({op.name: op for op in (CFG(), SLA(), VSV(), CircuitEdges())})


def cfg(gamma: float = 1.1, *, layers: Layers = "all", keys: Selector | None = None, cutoff: float | None = None) -> Edit:
    """decode.cfg (PAI): ℓ' = γ(ℓ − ℓ₀) + ℓ₀ on tokens with p ≥ cutoff·max p, ℓ₀ from the same input with ``keys``
    (default ``role:image``) knocked out in ``layers``."""
    return _edit("decode.cfg", layers, None, keys=keys, gamma=gamma, cutoff=cutoff)


def sla(layers: Layers, alpha: float = 0.3) -> Edit:
    """decode.sla (VISTA): z' = (1−α) z^L + α mean_{l∈layers} z^l (logit lens of each layer's resid_post)."""
    return _edit("decode.sla", layers, None, alpha=alpha)


def circuit_edges(keep: str | Sequence[Sequence[str]], tensor: torch.Tensor | str) -> Edit:
    """circuit.edges: every downstream node d (each head's input, each MLP's input, the logits) reads
    x_d = x_d^run − Σ_{u→d ∉ keep} (a_u^run − ã_u); ``keep``: "all" or [source, target] pairs of node names
    (embed, a{l}.h{h}, m{l} → a{l}.h{h}, m{l}, logits); ``tensor``: ã [sources, positions, d_model]
    (Syed et al. 2023, edge attribution patching; docs/methods.md §18)."""
    return _edit("circuit.edges", "all", None, keep=keep if keep == "all" else [[str(a), str(b)] for a, b in keep],
                 tensor=tensor)


def vsv(layers: Layers, tensor: torch.Tensor | str, lam: float = 0.17, *, positions: Selector | None = None,
        site: str | None = None) -> Edit:
    """resid.vsv (VISTA): x' = ‖x‖·n(n(x) + λ·λ_sim·n(v)), λ_sim = 1 + max(0, cos(x, −v)), at the MLP output."""
    return _edit("resid.vsv", layers, None, positions=positions, site=site, tensor=tensor, lam=lam)
