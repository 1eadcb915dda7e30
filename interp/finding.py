"""``Finding``: the one result type of every analysis.

A Finding is a tidy table of scores (one row per (layer, head), per (layer, token, dim), ...), the
scalar results (``metrics``), optional arrays (saved as a safetensors sidecar), the analysis name
and parameters, the model's identity and a digest of the prompts. ``to_spec``, ``plot`` and
``explain`` dispatch to the registered :class:`interp.analysis.Analysis` named by ``analysis``, so
there is a single Finding class for all of them.
"""
from __future__ import annotations

import hashlib
import re
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from . import analysis as _analysis
from .errors import InterpError


def digest(items: Any) -> str:
    """sha256 of prompts (strings, token ids or anything JSON-able)."""
    if isinstance(items, torch.Tensor):
        items = items.tolist()
    return "sha256:" + hashlib.sha256(json.dumps(items, default=str, sort_keys=True).encode()).hexdigest()


@dataclass
class Finding:
    analysis: str  # the registered analysis' name, e.g. "probes.sinks"
    table: pd.DataFrame
    params: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    prompts: str = ""
    metrics: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)  # name -> tensor
    notes: list[str] = field(default_factory=list)

    # views -------------------------------------------------------------------
    def to_frame(self) -> pd.DataFrame:
        return self.table.copy()

    def top(self, k: int = 10, by: str | None = None, ascending: bool = False) -> pd.DataFrame:
        """The k rows with the largest (or smallest) ``by`` score (default: the ``score`` column)."""
        by = by or ("score" if "score" in self.table else self.table.select_dtypes("number").columns[-1])
        if by not in self.table:
            raise InterpError(f"no column {by!r} in this finding; columns are {list(self.table.columns)}")
        return self.table.sort_values(by, ascending=ascending).head(k).reset_index(drop=True)

    def explain(self) -> str:
        """The finding in one plain sentence ("" when its analysis is not registered or says nothing)."""
        a = _analysis.REGISTRY.get(self.analysis)
        return a.explain(self) if a is not None else ""

    def summary(self) -> str:
        lines = [f"{self.analysis} on {self.model.get('name', '?')} ({len(self.table)} rows)"]
        if takeaway := self.explain():
            lines.insert(0, takeaway)
        for k, v in self.metrics.items():
            lines.append(f"  {metric_label(k)}: {metric_value(k, v)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Finding({self.analysis!r}, rows={len(self.table)}, metrics={list(self.metrics)})"

    # dispatch to the registered analysis ------------------------------------------
    def to_spec(self, model=None, **kw):
        """The intervention this finding suggests, as an :class:`interp.Spec` (``model``: the model it is for)."""
        if model is None:
            raise InterpError("to_spec needs the model the spec is for: finding.to_spec(model=model, ...)")
        return _analysis.get(self.analysis).to_spec(self, model, **kw)

    def plot(self, interactive: bool = False, **kw):
        """A matplotlib Figure (default) or a plotly Figure (``interactive=True``) of this finding."""
        return _analysis.get(self.analysis).plot(self, interactive=interactive, **kw)

    def _repr_html_(self) -> str:
        html = _analysis.view("html")
        if html is None:
            import html as _h
            return f"<pre>{_h.escape(self.summary())}</pre>"
        return html(self)

    # persistence ----------------------------------------------------------------
    def to_json(self) -> str:
        doc = {"schema": "interp.finding/1", "analysis": self.analysis, "params": self.params, "model": self.model,
               "prompts": self.prompts, "metrics": self.metrics, "notes": self.notes,
               "table": json.loads(self.table.to_json(orient="split", index=False)),
               "arrays": sorted(self.arrays)}
        return json.dumps(doc, indent=1, default=_jsonable)

    def save(self, path: str | Path) -> Path:
        """``path`` (.json) plus ``path.safetensors`` for the arrays, if any."""
        path = Path(path).with_suffix(".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())
        if self.arrays:
            from safetensors.torch import save_file
            save_file({k: v.detach().contiguous().cpu() for k, v in self.arrays.items()},
                      str(path.with_suffix(".safetensors")))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Finding":
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InterpError(f"cannot read finding {path}: {e}") from None
        if doc.get("schema") != "interp.finding/1":
            raise InterpError(f"{path} is not an interp finding (schema {doc.get('schema')!r})")
        _analysis.get(doc.get("analysis"))  # refused, with the reason, unless a registered analysis made it
        t = doc["table"]
        arrays = {}
        if doc.get("arrays"):
            from safetensors.torch import load_file
            arrays = load_file(str(path.with_suffix(".safetensors")))
        return cls(doc["analysis"], pd.DataFrame(t["data"], columns=t["columns"]), doc["params"], doc["model"],
                   doc["prompts"], doc["metrics"], arrays, doc.get("notes", []))


def metric_label(key: str) -> str:
    """A metric key as words: ``sink_rate_token0_layers_ge2`` → "sink rate token0 layers ≥ 2"."""
    words = re.sub(r"_ge(\d)", r" ≥ \1", str(key))
    words = re.sub(r"_le(\d)", r" ≤ \1", words)
    words = re.sub(r"_ci$", " (95 % CI)", words).replace("_", " ")
    return re.sub(r"\s+", " ", words).strip()


def metric_value(key: str, v: Any) -> str:
    """A metric value, rounded: CIs as [lo, hi], floats to 3 significant digits, long lists shortened."""
    if hasattr(v, "tolist"):
        v = v.tolist()
    if str(key).endswith("_ci") and isinstance(v, (list, tuple)) and len(v) == 2 and all(
            isinstance(x, (int, float)) for x in v):
        return f"[{v[0]:.3g}, {v[1]:.3g}]"
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        flat = [metric_value("", x) for x in list(v)[:12]]
        return "[" + ", ".join(flat) + (f", … ({len(v)} items)]" if len(v) > 12 else "]")
    return str(v)



def _jsonable(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)
