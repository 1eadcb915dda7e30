"""``Spec``: a versioned JSON intervention document (schema ``interp.spec/1``), validated on load.

    {"schema": "interp.spec/1",
     "model": {"name", "family", "n_layers", "n_heads", "fingerprint"},
     "edits": [{"op": "attn.scale_weights", "layers": [2, 3], "heads": [0, 4],
                "queries": "all", "keys": "role:bos", "factor": 0.6, "renormalize": true}, ...],
     "provenance": {"analysis", "params", "prompts", "toolkit", "created"}}

Tensors an edit needs (a steering vector, a bias matrix, a patched activation) live in a
safetensors sidecar next to the JSON (``NAME.safetensors``), referred to by name. Errors give the
field path (``edits[1].factor``) and the allowed values. The math of each op is in
:mod:`interp.patch`.
"""
from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import InterpError

SCHEMA = "interp.spec/1"
SELECTOR_HELP = "'all', 'last', 'none', 'sink', 'role:NAME', an index, a range 'a:b', or a list of those"
DISTANCE_FNS = ("log1p", "linear", "constant")

# op -> {field: (kind, required)}; shared fields are added below.
_SEL, _NUM, _BOOL, _INTS, _STR, _TENSOR = "selector", "number", "bool", "ints", "str", "tensor"
OPS: dict[str, dict[str, tuple[str, bool]]] = {
    "attn.scale_weights": {"queries": (_SEL, False), "keys": (_SEL, True), "factor": (_NUM, True),
                           "renormalize": (_BOOL, False), "redistribute_to": (_SEL, False)},
    "attn.add_logit_bias": {"queries": (_SEL, False), "keys": (_SEL, False), "bias": (_NUM, False),
                            "distance": ("distance", False), "tensor": (_TENSOR, False)},
    "attn.replace_pattern": {"queries": (_SEL, False), "mode": (("local_window", "copy_head"), True),
                             "window": (_NUM, False), "keep_sink": (_BOOL, False), "source_head": (_NUM, False)},
    "attn.knockout": {"queries": (_SEL, True), "keys": (_SEL, True)},
    "attn.head_scale": {"queries": (_SEL, False), "factor": (_NUM, True)},
    "attn.head_ablate": {"queries": (_SEL, False), "mode": (("zero", "mean"), False), "tensor": (_TENSOR, False)},
    "resid.add": {"positions": (_SEL, False), "site": (("resid_pre", "resid_post"), False),
                  "tensor": (_TENSOR, True), "scale": (_NUM, False)},
    "resid.suppress_dims": {"positions": (_SEL, False), "site": (("resid_pre", "resid_post"), False),
                            "dims": (_INTS, True), "mode": (("zero", "mean", "clamp"), False),
                            "value": (_NUM, False), "tensor": (_TENSOR, False)},
    "patch": {"site": (("resid_pre", "resid_post", "attn.out", "mlp.out", "attn.z"), True),
              "positions": (_SEL, False), "tensor": (_TENSOR, True)},
    "attn.oeb": {"queries": (_SEL, False), "segment": (_SEL, True), "bridge": (_SEL, True), "tau_max": (_NUM, False)},
    "attn.smi": {"queries": (_SEL, False), "source": (_SEL, True), "scale": (_NUM, False)},
    "attn.amplify": {"queries": (_SEL, False), "keys": (_SEL, True), "alpha": (_NUM, True)},
}
_COMMON = {"op": (_STR, True), "layers": ("layers", True), "heads": ("heads", False), "steps": (_INTS, False),
           "note": (_STR, False)}
_ATTN_NO_HEADS = ("resid.add", "resid.suppress_dims", "patch")


@dataclass
class Spec:
    model: dict
    edits: list[dict]
    provenance: dict = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    sink: dict | None = None  # {"dims": [...], "tau": 20.0}: how the 'sink' selector finds tokens

    @classmethod
    def for_model(cls, model, edits: list[dict], *, analysis: str = "manual", params: dict | None = None,
                  prompts: str = "", tensors: dict | None = None, sink: dict | None = None) -> "Spec":
        from . import __version__
        spec = cls(model.identity(), [dict(e) for e in edits],
                   {"analysis": analysis, "params": params or {}, "prompts": prompts, "toolkit": __version__,
                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
                   dict(tensors or {}), sink)
        spec.validate()
        spec.check(model)
        return spec

    # JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {"schema": SCHEMA, "model": self.model, "edits": self.edits, "provenance": self.provenance}
        if self.sink is not None:
            d["sink"] = self.sink
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False)

    @classmethod
    def from_json(cls, text: str, tensors: dict | None = None) -> "Spec":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise InterpError(f"spec is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        return cls.from_dict(doc, tensors)

    @classmethod
    def from_dict(cls, doc: Any, tensors: dict | None = None) -> "Spec":
        if not isinstance(doc, dict):
            raise InterpError(f"spec: expected a JSON object, got {type(doc).__name__}")
        if doc.get("schema") != SCHEMA:
            raise InterpError(f"spec.schema: expected {SCHEMA!r}, got {doc.get('schema')!r}")
        unknown = set(doc) - {"schema", "model", "edits", "provenance", "sink"}
        if unknown:
            raise InterpError(f"spec: unknown top-level field(s) {sorted(unknown)}; allowed: schema, model, edits, "
                              "provenance, sink")
        spec = cls(doc.get("model"), doc.get("edits"), doc.get("provenance", {}), dict(tensors or {}), doc.get("sink"))
        spec.validate()
        return spec

    def save(self, path: str | Path) -> Path:
        path = Path(path).with_suffix(".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())
        if self.tensors:
            from safetensors.torch import save_file
            save_file({k: v.detach().contiguous().cpu() for k, v in self.tensors.items()},
                      str(path.with_suffix(".safetensors")))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Spec":
        path = Path(path)
        if not path.is_file():
            raise InterpError(f"no spec file at {path}")
        tensors = {}
        side = path.with_suffix(".safetensors")
        if side.exists():
            from safetensors.torch import load_file
            tensors = load_file(str(side))
        return cls.from_json(path.read_text(), tensors)

    # validation ------------------------------------------------------------------------
    def validate(self) -> None:
        m = self.model
        if not isinstance(m, dict):
            raise InterpError("spec.model: expected an object with name, family, n_layers, n_heads, fingerprint")
        for k, t in (("name", str), ("family", str), ("n_layers", int), ("n_heads", int), ("fingerprint", str)):
            if not isinstance(m.get(k), t) or isinstance(m.get(k), bool):
                raise InterpError(f"spec.model.{k}: expected {t.__name__}, got {m.get(k)!r}")
        if not isinstance(self.provenance, dict):
            raise InterpError("spec.provenance: expected an object")
        if self.sink is not None:
            if not isinstance(self.sink, dict) or not _is_ints(self.sink.get("dims")) or \
                    not _is_num(self.sink.get("tau", 20.0)):
                raise InterpError("spec.sink: expected {'dims': [int, ...], 'tau': number}")
        if not isinstance(self.edits, list):
            raise InterpError("spec.edits: expected a list of edit objects")
        for i, e in enumerate(self.edits):
            self._validate_edit(e, f"edits[{i}]")

    def _validate_edit(self, e: Any, path: str) -> None:
        if not isinstance(e, dict):
            raise InterpError(f"spec.{path}: expected an object, got {type(e).__name__}")
        op = e.get("op")
        if op not in OPS:
            raise InterpError(f"spec.{path}.op: unknown op {op!r}; allowed: {', '.join(OPS)}")
        fields = {**_COMMON, **OPS[op]}
        for k in e:
            if k not in fields:
                raise InterpError(f"spec.{path}.{k}: unknown field for {op}; allowed: {', '.join(fields)}")
        for k, (kind, required) in fields.items():
            if k not in e:
                if required:
                    raise InterpError(f"spec.{path}.{k}: required for {op}")
                continue
            v = e[k]
            ok = {
                _STR: lambda: isinstance(v, str),
                _NUM: lambda: _is_num(v),
                _BOOL: lambda: isinstance(v, bool),
                _INTS: lambda: _is_ints(v),
                _SEL: lambda: _is_selector(v),
                _TENSOR: lambda: isinstance(v, str) and v in self.tensors,
                "layers": lambda: v == "all" or _is_ints(v),
                "heads": lambda: v == "all" or _is_ints(v),
                "distance": lambda: isinstance(v, dict) and v.get("fn") in DISTANCE_FNS and all(
                    _is_num(v.get(x, 1.0)) for x in ("scale", "d0")) and set(v) <= {"fn", "scale", "d0"},
            }[kind]() if isinstance(kind, str) else v in kind
            if not ok:
                want = {_SEL: SELECTOR_HELP, _TENSOR: f"the name of a tensor in the sidecar ({sorted(self.tensors)})",
                        "layers": "'all' or a list of ints", "heads": "'all' or a list of ints", _INTS: "a list of ints",
                        "distance": f"{{'fn': one of {DISTANCE_FNS}, 'scale': number, 'd0': number}}"}.get(
                    kind, f"one of {list(kind)}" if not isinstance(kind, str) else kind)
                raise InterpError(f"spec.{path}.{k}: got {v!r}; expected {want}")
        if op in _ATTN_NO_HEADS and "heads" in e:
            raise InterpError(f"spec.{path}.heads: {op} acts on the residual stream, not on heads")
        if op == "attn.scale_weights" and (e["factor"] < 0 or ("redistribute_to" in e and e["factor"] > 1)):
            raise InterpError(f"spec.{path}.factor: got {e['factor']!r}; expected ≥ 0 (≤ 1 with redistribute_to)")
        if op == "attn.add_logit_bias" and sum(x in e for x in ("bias", "distance", "tensor")) != 1:
            raise InterpError(f"spec.{path}: attn.add_logit_bias needs exactly one of bias, distance, tensor")
        if op == "attn.oeb" and not 0 <= e.get("tau_max", 0.15) <= 1:
            raise InterpError(f"spec.{path}.tau_max: got {e['tau_max']!r}; expected a number in [0, 1]")
        if op == "attn.replace_pattern":
            need = "window" if e["mode"] == "local_window" else "source_head"
            if need not in e:
                raise InterpError(f"spec.{path}.{need}: required for mode {e['mode']!r}")

    def check(self, model) -> None:
        """Refuse, with the reason, a spec written for another model; check layer/head ranges."""
        mine, theirs = model.identity(), self.model
        for k in ("n_layers", "n_heads", "family"):
            if mine[k] != theirs[k]:
                raise InterpError(f"this spec was written for {theirs['name']} ({k}={theirs[k]}), but "
                                  f"{mine['name']} has {k}={mine[k]}: it cannot be applied to this model")
        if mine["fingerprint"] != theirs["fingerprint"]:
            raise InterpError(f"this spec was written for {theirs['name']} (config fingerprint "
                              f"{theirs['fingerprint'][:12]}…), not {mine['name']} ({mine['fingerprint'][:12]}…): "
                              "the configs differ, so layer/head indices may not mean the same thing")
        for i, e in enumerate(self.edits):
            layers = e["layers"]
            if layers != "all":
                bad = [l for l in layers if not 0 <= l < mine["n_layers"]]
                if bad:
                    raise InterpError(f"spec.edits[{i}].layers: {bad} out of range (0..{mine['n_layers'] - 1})")
            heads = e.get("heads", "all")
            if heads != "all":
                bad = [h for h in heads if not 0 <= h < mine["n_heads"]]
                if bad:
                    raise InterpError(f"spec.edits[{i}].heads: {bad} out of range (0..{mine['n_heads'] - 1})")
            if e.get("source_head") is not None and not 0 <= int(e["source_head"]) < mine["n_heads"]:
                raise InterpError(f"spec.edits[{i}].source_head: out of range (0..{mine['n_heads'] - 1})")
            if e.get("dims") and max(e["dims"]) >= model.d_model:
                raise InterpError(f"spec.edits[{i}].dims: out of range (0..{model.d_model - 1})")


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def _is_ints(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)


def _is_selector(v) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return True
    if isinstance(v, str):
        return bool(v.strip())
    return isinstance(v, list) and all(_is_selector(x) and not isinstance(x, list) for x in v)
