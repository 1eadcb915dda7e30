"""``Trace``: what a capture kept — named tensors, the tokens and their roles — saved as safetensors + JSON."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import load_file, save_file

from .errors import InterpError
from .roles import Roles

# Axis names per site kind, for the tidy view.
AXES = {
    "attn.pattern": ("batch", "head", "query", "key"),
    "attn.logits": ("batch", "head", "query", "key"),
    "attn.z": ("batch", "query", "head", "dim"),
    "attn.q": ("batch", "query", "head", "dim"),
    "attn.k": ("batch", "key", "kv_head", "dim"),
    "attn.key_mass": ("batch", "head", "key"),
    "attn.key_mean": ("batch", "head", "key"),
    "attn.entropy": ("batch", "head", "query"),
    "attn.entropy_norm": ("batch", "head", "query"),
    "attn.topk_val": ("batch", "head", "query", "rank"),
    "attn.topk_idx": ("batch", "head", "query", "rank"),
    "resid_pre": ("batch", "token", "dim"), "resid_post": ("batch", "token", "dim"),
    "attn.out": ("batch", "token", "dim"), "mlp.in": ("batch", "token", "dim"), "mlp.out": ("batch", "token", "dim"),
    "embed": ("batch", "token", "dim"), "final": ("batch", "token", "dim"), "logits": ("batch", "token", "vocab"),
}
_LAYER = re.compile(r"^blocks\.(\d+)\.(.+)$")


def split_site(name: str) -> tuple[int | None, str]:
    """'blocks.3.attn.pattern' -> (3, 'attn.pattern'); 'embed' -> (None, 'embed')."""
    m = _LAYER.match(name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


class Trace:
    """Captured tensors by site name, plus tokens, roles and the model's identity."""

    def __init__(self, values: dict, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 tokens: list[list[str]], roles: list[Roles], meta: dict, grads: bool = False):
        self._values = values  # name -> tensor or list of query-chunks
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.tokens = tokens
        self.roles = roles
        self.meta = meta
        self._grads = grads

    # access --------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._values:
            raise InterpError(f"{name!r} was not captured; this trace holds {self._describe()}")
        v = self._values[name]
        return v if isinstance(v, torch.Tensor) else _cat(v, name)

    def __contains__(self, name: str) -> bool:
        return name in self._values

    def keys(self) -> list[str]:
        return list(self._values)

    def grad(self, name: str) -> torch.Tensor:
        """Gradient of the last backward w.r.t. a captured site (capture with ``grad=True``)."""
        if not self._grads:
            raise InterpError("this trace was captured without grad=True, so it holds no gradients")
        v = self._values[name]
        parts = [v] if isinstance(v, torch.Tensor) else v
        if any(p.grad is None for p in parts):
            raise InterpError(f"no gradient reached {name!r}: call .backward() on a scalar that depends on it")
        return _cat([p.grad for p in parts], name)

    def layers(self, kind: str) -> list[int]:
        return sorted(l for l, k in map(split_site, self._values) if k == kind and l is not None)

    def stack(self, kind: str, layers: Iterable[int] | None = None) -> torch.Tensor:
        """Stack one site kind over layers: ``trace.stack('attn.pattern')`` -> [L, b, h, q, k]."""
        ls = list(layers) if layers is not None else self.layers(kind)
        if not ls:
            raise InterpError(f"no {kind!r} in this trace; it holds {self._describe()}")
        return torch.stack([self[f"blocks.{l}.{kind}"] for l in ls])

    def _describe(self) -> str:
        kinds = sorted({k for _, k in map(split_site, self._values)})
        return ", ".join(kinds) or "nothing"

    def __repr__(self) -> str:
        return f"Trace({len(self._values)} tensors: {self._describe()}; batch={tuple(self.input_ids.shape)})"

    def plot(self, kind: str = "attn.pattern", interactive: bool = False, **kw):
        """A figure of what was captured: ``attn.pattern`` (``layer=``, ``head=`` an index or "mean", ``batch=``)
        or per-token norms by layer of a residual-like site (``resid_post`` …); drawn by viz."""
        from . import analysis
        draw = analysis.view("trace")
        if draw is None:
            raise InterpError("figures are drawn by the viz package: `import viz` first")
        return draw(self, kind, interactive=interactive, **kw)

    def _repr_html_(self) -> str:
        """The notebook view: the prompt(s), then one row per site kind with its layers and shape."""
        import html
        kinds: dict[str, list] = {}
        for name in self._values:
            l, k = split_site(name)
            kinds.setdefault(k, []).append(l)
        rows = []
        for k, ls in kinds.items():
            ls = sorted(x for x in ls if x is not None)
            first = self[f"blocks.{ls[0]}.{k}" if ls else k]
            where = f"layers {ls[0]}–{ls[-1]} ({len(ls)})" if ls else "—"
            axes = " × ".join(f"{a} {n}" for a, n in zip(AXES.get(k, ()), first.shape)) or str(tuple(first.shape))
            rows.append(f"<tr><td><code>{html.escape(k)}</code></td><td>{where}</td><td>{html.escape(axes)}</td>"
                        f"<td>{html.escape(str(first.dtype).replace('torch.', ''))}</td></tr>")
        text = " ".join(self.tokens[0])[:160] if self.tokens else ""
        return (f"<div><b>Trace</b> of {html.escape(self.meta.get('model', {}).get('name', '?'))}: "
                f"{self.input_ids.shape[0]} sequence(s) × {self.input_ids.shape[1]} tokens "
                f"<span style='color:#666'>({html.escape(text)}…)</span>"
                "<table style='border-collapse:collapse;font-size:12px'><tr><th align=left>site</th>"
                "<th align=left>where</th><th align=left>shape</th><th align=left>dtype</th></tr>"
                + "".join(rows) + "</table><div style='color:#666;font-size:12px'>trace.plot(layer=…, head=…) draws "
                "a pattern; trace[name] gives a tensor</div></div>")

    # tidy view -------------------------------------------------------------
    def to_frame(self, name: str | None = None):
        """Without a name: one row per tensor. With a name: long format, one row per element."""
        import pandas as pd
        if name is None:
            rows = []
            for k in self._values:
                t = self[k]
                layer, kind = split_site(k)
                rows.append({"site": k, "layer": layer, "kind": kind, "shape": tuple(t.shape),
                             "dtype": str(t.dtype).replace("torch.", ""), "MB": t.numel() * t.element_size() / 2**20})
            return pd.DataFrame(rows)
        t = self[name].detach().float().cpu()
        axes = AXES.get(split_site(name)[1], tuple(f"d{i}" for i in range(t.dim())))
        idx = torch.cartesian_prod(*[torch.arange(s) for s in t.shape]) if t.dim() > 1 else torch.arange(t.numel())[:, None]
        df = pd.DataFrame(idx.numpy(), columns=list(axes))
        df["value"] = t.reshape(-1).numpy()
        return df

    # persistence -----------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``path.safetensors`` (tensors) and ``path.json`` (tokens, roles, identity)."""
        path = Path(path)
        stem = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
        stem.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: self[k].detach().cpu().contiguous() for k in self._values}
        tensors["__input_ids__"] = self.input_ids.cpu()
        tensors["__attention_mask__"] = self.attention_mask.cpu()
        save_file(tensors, str(stem) + ".safetensors")
        doc = {"schema": "interp.trace/1", "meta": self.meta, "tokens": self.tokens,
               "roles": [r.to_json() for r in self.roles]}
        Path(str(stem) + ".json").write_text(json.dumps(doc, indent=1, default=str))
        return stem

    @classmethod
    def load(cls, path: str | Path) -> "Trace":
        path = Path(path)
        stem = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
        try:
            doc = json.loads(Path(str(stem) + ".json").read_text())
        except FileNotFoundError:
            raise InterpError(f"no trace at {stem}.json") from None
        except json.JSONDecodeError as e:
            raise InterpError(f"{stem}.json is not valid JSON ({e}); it is not a saved Trace") from None
        if doc.get("schema") != "interp.trace/1":
            raise InterpError(f"{stem}.json is not an interp trace (schema {doc.get('schema')!r})")
        tensors = load_file(str(stem) + ".safetensors")
        ids, am = tensors.pop("__input_ids__"), tensors.pop("__attention_mask__")
        return cls(tensors, ids, am, doc["tokens"], [Roles.from_json(r) for r in doc["roles"]], doc["meta"])


def _cat(parts: list[torch.Tensor], name: str) -> torch.Tensor:
    """Join query chunks. Pattern chunks of a causal model may stop at their last visible key (the engine
    never computes the masked upper triangle): they are padded with the zeros of the masked keys."""
    kind = split_site(name)[1]
    width = max(p.shape[-1] for p in parts)
    if kind == "attn.pattern" and any(p.shape[-1] < width for p in parts):
        parts = [torch.nn.functional.pad(p, (0, width - p.shape[-1])) for p in parts]
    if len(parts) == 1:
        return parts[0]
    axes = AXES.get(kind, ())
    dim = axes.index("query") if "query" in axes else 1
    return torch.cat(parts, dim=dim)
