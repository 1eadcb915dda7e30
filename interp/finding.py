"""``Finding``: the one result type of every analysis.

A Finding is a tidy table of scores (one row per (layer, head), per (layer, token, dim), ...), the
scalar results (``metrics``), optional arrays (saved as a safetensors sidecar), the analysis name
and parameters, the model's identity and a digest of the prompts. Analyses stay plain functions:
``to_spec`` and ``plot`` dispatch to the ``to_spec`` function of the analysis module and to
:mod:`viz`, so there is a single Finding class for all of them.
"""
from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .errors import InterpError


def digest(items: Any) -> str:
    """sha256 of prompts (strings, token ids or anything JSON-able)."""
    if isinstance(items, torch.Tensor):
        items = items.tolist()
    return "sha256:" + hashlib.sha256(json.dumps(items, default=str, sort_keys=True).encode()).hexdigest()


@dataclass
class Finding:
    analysis: str  # module path, e.g. "probes.sinks"
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

    def summary(self) -> str:
        lines = [f"{self.analysis} on {self.model.get('name', '?')} ({len(self.table)} rows)"]
        for k, v in self.metrics.items():
            lines.append(f"  {k}: {_fmt(v)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Finding({self.analysis!r}, rows={len(self.table)}, metrics={list(self.metrics)})"

    # dispatch to the analysis module and viz ------------------------------------
    def to_spec(self, **kw):
        """The intervention this finding suggests, as an :class:`interp.Spec`."""
        mod = importlib.import_module(self.analysis)
        if not hasattr(mod, "to_spec"):
            raise InterpError(f"{self.analysis} findings are diagnostic only: there is no spec to export")
        return mod.to_spec(self, **kw)

    def plot(self, interactive: bool = False, **kw):
        """A matplotlib Figure (default) or a plotly Figure (``interactive=True``)."""
        import viz
        return viz.plot(self, interactive=interactive, **kw)

    def _repr_html_(self) -> str:
        import viz
        return viz.finding_html(self)

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
        t = doc["table"]
        arrays = {}
        if doc.get("arrays"):
            from safetensors.torch import load_file
            arrays = load_file(str(path.with_suffix(".safetensors")))
        return cls(doc["analysis"], pd.DataFrame(t["data"], columns=t["columns"]), doc["params"], doc["model"],
                   doc["prompts"], doc["metrics"], arrays, doc.get("notes", []))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)) and len(v) > 12:
        return f"{list(v[:12])} … ({len(v)} items)"
    return str(v)


def _jsonable(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)
