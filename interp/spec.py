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
from .ops import COMMON, DISTANCE_FNS, OPS, SELECTOR_HELP, _is_ints, _is_num, _is_selector  # noqa: F401 (re-exported)

SCHEMA = "interp.spec/1"
MAX_JSON_BYTES = 64 * 2**20  # a spec document is small; its tensors live in the sidecar
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
        if not isinstance(edits, (list, tuple)):
            raise InterpError(f"Spec.for_model: edits must be a list of edits (dicts or interp.ops builders), got "
                              f"{type(edits).__name__}")
        tensors = dict(tensors or {})
        for e in edits:  # builder-made edits carry their tensors
            for k, t in getattr(e, "tensors", {}).items():
                if k in tensors and not torch.equal(tensors[k], t):
                    raise InterpError(f"Spec.for_model: two different tensors are named {k!r}")
                tensors[k] = t
        spec = cls(model.identity(), [dict(e) if isinstance(e, dict) else e for e in edits],
                   {"analysis": analysis, "params": params or {}, "prompts": prompts, "toolkit": __version__,
                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
                   tensors, sink)
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
    def from_json(cls, text: str | bytes, tensors: dict | None = None) -> "Spec":
        if isinstance(text, (bytes, bytearray)):
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError as e:
                raise InterpError(f"spec is not UTF-8 text (byte {e.start}); a spec is a JSON file") from None
        if not isinstance(text, str):
            raise InterpError(f"spec: expected JSON text, got {type(text).__name__}")
        if len(text) > MAX_JSON_BYTES:
            raise InterpError(f"spec is {len(text)} characters, more than {MAX_JSON_BYTES}: tensors belong in the "
                              "safetensors sidecar")
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise InterpError(f"spec is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        except RecursionError:
            raise InterpError("spec is not valid: its JSON is nested too deeply") from None
        except ValueError as e:  # e.g. an integer literal with thousands of digits
            raise InterpError(f"spec is not valid JSON: {str(e)[:120]}") from None
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
            try:
                tensors = load_file(str(side))
            except Exception as e:  # safetensors raises its own error types for a corrupt file
                raise InterpError(f"could not read the spec's sidecar {side}: {type(e).__name__}: {str(e)[:160]}") from None
        return cls.from_json(path.read_bytes(), tensors)

    # validation ------------------------------------------------------------------------
    def validate(self) -> None:
        m = self.model
        if not isinstance(m, dict):
            raise InterpError("spec.model: expected an object with name, family, n_layers, n_heads, fingerprint")
        for k, t in (("name", str), ("family", str), ("n_layers", int), ("n_heads", int), ("fingerprint", str)):
            if not isinstance(m.get(k), t) or isinstance(m.get(k), bool):
                raise InterpError(f"spec.model.{k}: expected {t.__name__}, got {_short(m.get(k))}")
        if not isinstance(self.provenance, dict):
            raise InterpError("spec.provenance: expected an object")
        try:
            json.dumps(self.provenance)
        except (TypeError, ValueError, RecursionError) as e:
            raise InterpError(f"spec.provenance: not JSON-serialisable ({type(e).__name__})") from None
        if not isinstance(self.tensors, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in self.tensors.items()):
            raise InterpError("spec.tensors: expected a dict of name -> torch.Tensor (the safetensors sidecar)")
        if self.sink is not None:
            s = self.sink
            if not isinstance(s, dict) or not set(s) <= {"dims", "tau", "skip_first"} or \
                    not _is_ints(s.get("dims")) or not s.get("dims") or not _is_num(s.get("tau", 20.0)) or \
                    not s.get("tau", 20.0) > 0 or not isinstance(s.get("skip_first", False), bool):
                raise InterpError("spec.sink: expected {'dims': [int ≥ 0, ...] (not empty), 'tau': a number > 0, "
                                  "'skip_first': a bool (optional)}")
        if not isinstance(self.edits, list):
            raise InterpError("spec.edits: expected a list of edit objects")
        for i, e in enumerate(self.edits):
            self._validate_edit(e, f"edits[{i}]")

    def _validate_edit(self, e: Any, path: str) -> None:
        if not isinstance(e, dict):
            raise InterpError(f"spec.{path}: expected an object, got {type(e).__name__}")
        name = e.get("op")
        if not isinstance(name, str) or name not in OPS:
            raise InterpError(f"spec.{path}.op: unknown op {_short(name)}; allowed: {', '.join(OPS)}")
        op = OPS[name]
        fields = {**COMMON, **op.fields}
        for k in e:
            if k not in fields:
                raise InterpError(f"spec.{path}.{_short(k)}: unknown field for {name}; allowed: {', '.join(fields)}")
        for k, f in fields.items():
            if k not in e:
                if f.required:
                    raise InterpError(f"spec.{path}.{k}: required for {name}")
                continue
            if not f.ok(e[k], self.tensors):
                raise InterpError(f"spec.{path}.{k}: got {_short(e[k])}; expected {f.want(self.tensors)}")
        if not op.on_heads and "heads" in e:
            raise InterpError(f"spec.{path}.heads: {name} acts on the residual stream, not on heads")
        op.validate(e, path, self.tensors)

    def check(self, model) -> None:
        """Refuse, with the reason, a spec written for another model; check layer/head ranges."""
        mine, theirs = model.identity(), self.model
        for k in ("n_layers", "n_heads", "family"):
            if mine[k] != theirs[k]:
                raise InterpError(f"this spec was written for {theirs['name']} ({k}={_short(theirs[k])}), but "
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
                    raise InterpError(f"spec.edits[{i}].layers: {_short(bad)} out of range (0..{mine['n_layers'] - 1})")
            heads = e.get("heads", "all")
            if heads != "all":
                bad = [h for h in heads if not 0 <= h < mine["n_heads"]]
                if bad:
                    raise InterpError(f"spec.edits[{i}].heads: {_short(bad)} out of range (0..{mine['n_heads'] - 1})")
            OPS[e["op"]].check(e, f"edits[{i}]", model, self.tensors)
        if self.sink is not None and max(self.sink["dims"]) >= model.d_model:
            raise InterpError(f"spec.sink.dims: {_short([d for d in self.sink['dims'] if d >= model.d_model])} out of range "
                              f"(0..{model.d_model - 1})")


def _short(v: Any) -> str:
    """repr of a value for an error message, cut short (a field may hold anything)."""
    try:
        r = repr(v)
    except Exception:  # e.g. an int with more digits than Python will print
        r = f"<{type(v).__name__}>"
    return r if len(r) <= 80 else r[:77] + "..."
