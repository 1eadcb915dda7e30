"""Edge-level ablation of a transformer's computational graph: the mechanism behind the ``circuit.edges`` op
(docs/methods.md §18).

The residual stream of a pre-norm transformer whose blocks add their sublayer outputs to it is a sum of the
outputs a_u of upstream nodes u: the embedding, each attention head (l, h) (its z_{l,h} W_O^{l,h}) and each MLP.
Each downstream node d reads the stream at its own input: a head (l, h) (the input of layer l's attention norm,
as seen by that head alone: its queries, keys and values), an MLP (its norm's input) and the logits (the final
norm's input). An edge u → d exists where u is computed before d reads. Keeping only the edges K, every
downstream node reads

    x_d = x_d^run − Σ_{u → d ∉ K} (a_u^run − ã_u)

with a_u^run u's output in this very run and ã_u its ablated value at that position (a mean over a reference
set, or a saved run's value). A missing edge thus carries ã_u instead of a_u, and nothing else changes; a
layer whose heads read different inputs reruns its attention once per such head (batched) and keeps head h's z
from run h. Keeping every edge computes the model exactly (no node's input is touched); keeping none gives
every downstream node the ablated values only. (Edge attribution patching: Syed, Rager & Conmy, BlackboxNLP
2024, arXiv 2310.10348; mean ablation over a reference set: Wang et al., ICLR 2023.)
"""
from __future__ import annotations

import contextlib
import re
import threading
from typing import Any, Iterator, Sequence

import torch

from .errors import InterpError

_UP = re.compile(r"^(embed|a(\d+)\.h(\d+)|m(\d+))$")
_DOWN = re.compile(r"^(logits|a(\d+)\.h(\d+)|m(\d+))$")


class EdgeGraph:
    """The nodes and edges of an L-layer, H-head model. Upstream index 0 is ``embed``, then per layer its heads
    ``a{l}.h{h}`` then its MLP ``m{l}``; downstream per layer its heads then its MLP, then ``logits``.
    ``valid[u, d]``: u is computed before d reads the stream (the edge exists)."""

    def __init__(self, L: int, H: int):
        self.L, self.H = L, H
        self.up = ["embed"] + [f"a{l}.h{h}" if h < H else f"m{l}" for l in range(L) for h in range(H + 1)]
        self.down = [f"a{l}.h{h}" if h < H else f"m{l}" for l in range(L) for h in range(H + 1)] + ["logits"]
        self.up_index = {n: i for i, n in enumerate(self.up)}
        self.down_index = {n: i for i, n in enumerate(self.down)}
        # order along the forward: embed −1, head of layer l 2l, MLP of layer l 2l + 1, logits 2L
        up_t = torch.tensor([-1] + [2 * l + (h == H) for l in range(L) for h in range(H + 1)])
        down_t = torch.tensor([2 * l + (h == H) for l in range(L) for h in range(H + 1)] + [2 * L])
        self.valid = up_t[:, None] < down_t[None, :]

    def head_up(self, l: int, h: int) -> int:
        return 1 + l * (self.H + 1) + h

    def mlp_up(self, l: int) -> int:
        return 1 + l * (self.H + 1) + self.H

    def head_down(self, l: int, h: int) -> int:
        return l * (self.H + 1) + h

    def mlp_down(self, l: int) -> int:
        return l * (self.H + 1) + self.H

    @property
    def logits_down(self) -> int:
        return self.L * (self.H + 1)

    @property
    def n_up(self) -> int:
        return len(self.up)

    def keep_mask(self, keep: str | Sequence[Sequence[str]], what: str = "keep") -> torch.Tensor:
        """bool [U, D] from ``"all"`` (every edge) or a list of ``[source, target]`` names; an unknown node or a
        pair that is no edge (the source is computed after the target reads) is refused."""
        if keep == "all":
            return self.valid.clone()
        mask = torch.zeros_like(self.valid)
        for i, pair in enumerate(keep):
            src, dst = pair
            u, d = self.up_index.get(src), self.down_index.get(dst)
            if u is None or d is None:
                bad, have = (src, "source") if u is None else (dst, "target")
                raise InterpError(f"{what}[{i}]: no {have} node {bad!r} in a model of {self.L} layers × {self.H} "
                                  "heads (sources: embed, a{l}.h{h}, m{l}; targets: a{l}.h{h}, m{l}, logits)")
            if not bool(self.valid[u, d]):
                raise InterpError(f"{what}[{i}]: {src} → {dst} is no edge ({src} is computed after {dst} reads the "
                                  "residual stream)")
            mask[u, d] = True
        return mask

    def pairs(self, mask: torch.Tensor) -> list[list[str]]:
        """The ``[source, target]`` names of the edges set in ``mask`` [U, D], in index order."""
        up, down = torch.nonzero(mask & self.valid, as_tuple=True)
        return [[self.up[int(u)], self.down[int(d)]] for u, d in zip(up, down)]


def check_names(keep: Any, what: str) -> None:
    """Model-independent check of a keep list: ``"all"`` or a list of ``[source, target]`` node names."""
    if keep == "all":
        return
    if not isinstance(keep, list):
        raise InterpError(f"{what}: expected 'all' or a list of [source, target] pairs, got {type(keep).__name__}")
    for i, p in enumerate(keep):
        if not (isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p)):
            raise InterpError(f"{what}[{i}]: expected a [source, target] pair of node names, got {str(p)[:60]}")
        if not _UP.match(p[0]):
            raise InterpError(f"{what}[{i}]: {p[0][:40]!r} is no source node (embed, a{{l}}.h{{h}}, m{{l}})")
        if not _DOWN.match(p[1]):
            raise InterpError(f"{what}[{i}]: {p[1][:40]!r} is no target node (a{{l}}.h{{h}}, m{{l}}, logits)")


def check_model(model) -> None:
    """Refuse, with the reason, a model whose stream is not a plain sum of its nodes' outputs."""
    ad = model.adapter
    if not ad.causal:
        raise InterpError(f"{model.name} is a masked-diffusion model: edge ablation is built for causal LMs")
    if (ad.family == "gemma" or not ad.attn_norm or not ad.attn_out
            or any(n is None for n in ad.attn_norm + ad.mlp_norm + ad.attn_out)):
        raise InterpError(f"{model.name} ({ad.family}): edge ablation needs pre-norm blocks that add their attention "
                          "and MLP outputs to the residual stream unnormalised (Llama-like, GPT-2) and an attention "
                          "output projection in the adapter; this one normalises its sublayer outputs (Gemma) or "
                          "lacks them")


class EdgeAblation:
    """Forward hooks that feed every downstream node x_d^run − Σ_{u→d missing} (a_u^run − ã_u).

    ``keep``: bool [U, D]; ``values``: ã as [U, P, d] (row t for position t; positions ≥ P take row P − 1) or
    [b, U, P, d] (one row per sequence of the batch, P ≥ the run's length). The hooks act only in the thread
    ``owner``; a forward that continues from a KV cache is refused (whole sequences only)."""

    def __init__(self, model, keep: torch.Tensor, values: torch.Tensor, owner: int | None = None):
        check_model(model)
        self.model, self.g = model, EdgeGraph(model.n_layers, model.n_heads)
        g = self.g
        if keep.shape != g.valid.shape:
            raise InterpError(f"edge mask of shape {list(keep.shape)}; this model's graph is {list(g.valid.shape)}")
        keep = keep.bool() & g.valid
        miss = g.valid & ~keep
        self.miss = [torch.nonzero(miss[:, d])[:, 0].tolist() for d in range(len(g.down))]
        self.kept = [torch.nonzero(keep[:, d])[:, 0].tolist() for d in range(len(g.down))]
        if values.dim() not in (3, 4) or values.shape[-3] != g.n_up or values.shape[-1] != model.d_model:
            raise InterpError(f"ablated values of shape {list(values.shape)}; expected [{g.n_up}, positions, "
                              f"{model.d_model}] or [batch, {g.n_up}, positions, {model.d_model}]")
        self.values = values
        self.owner = threading.get_ident() if owner is None else owner
        self.inner = False
        self.diffs: dict[int, torch.Tensor] = {}
        self.total: torch.Tensor | None = None  # Σ of every diff so far (the stream's deviation from ã)
        self.x: dict[int, torch.Tensor] = {}
        self.z: torch.Tensor | None = None

    # bookkeeping ---------------------------------------------------------------------------------
    def _mine(self) -> bool:
        if threading.get_ident() != self.owner:
            self.model.engine.check_thread()
            return False
        return not self.inner

    def _ablated(self, u: int, T: int, b: int) -> torch.Tensor:
        """ã_u at positions 0..T−1: [1|b, T, d] (float64)."""
        v = self.values
        P = v.shape[-2]
        if v.dim() == 3:
            idx = torch.arange(T).clamp(max=P - 1)
            return v[u, idx].double()[None]
        if P < T or v.shape[0] not in (1, b):
            raise InterpError(f"circuit.edges: the per-sequence ablated values cover {v.shape[0]} sequences × {P} "
                              f"positions; this run has {b} × {T}")
        return v[:, u, :T].double()

    def _record(self, u: int, a: torch.Tensor) -> None:
        diff = a.double() - self._ablated(u, a.shape[1], a.shape[0])
        self.diffs[u] = diff
        self.total = diff.clone() if self.total is None else self.total + diff

    def delta(self, d: int, like: torch.Tensor) -> torch.Tensor | None:
        """Σ_{u→d missing} (a_u^run − ã_u) in ``like``'s dtype, or None when no edge into d is missing. Every
        source of d has run when d reads, so the sum is taken over the missing edges or, when fewer edges into d
        are kept, as the total so far minus the kept ones."""
        miss, kept = self.miss[d], self.kept[d]
        if not miss:
            return None
        if len(miss) <= len(kept) + 1:
            out = self.diffs[miss[0]].clone()
            for u in miss[1:]:
                out += self.diffs[u]
        else:
            out = self.total.clone()
            for u in kept:
                out -= self.diffs[u]
        return out.to(like.dtype).expand_as(like)

    # hooks -----------------------------------------------------------------------------------------
    def hooks(self) -> list:
        ad, g = self.model.adapter, self.g
        hs = [ad.layers[0].register_forward_pre_hook(self._embed, with_kwargs=True)]
        for l in range(self.model.n_layers):
            hs.append(ad.attn_norm[l].register_forward_pre_hook(lambda mod, args, l=l: self._keep_x(l, args[0])))
            hs.append(ad.attn_out[l].register_forward_pre_hook(lambda mod, args: self._keep_z(args[0])))
            hs.append(ad.attn[l].register_forward_hook(lambda mod, a, k, out, l=l: self._attn(l, mod, a, k, out),
                                                       with_kwargs=True))
            hs.append(ad.mlp_norm[l].register_forward_pre_hook(
                lambda mod, args, l=l: self._shift(args, g.mlp_down(l))))
            hs.append(ad.mlp[l].register_forward_hook(
                lambda mod, a, out, l=l: self._mlp(l, out)))
        hs.append(ad.final_norm.register_forward_pre_hook(lambda mod, args: self._shift(args, g.logits_down)))
        return hs

    def _embed(self, mod, args, kwargs):
        if not self._mine():
            return None
        self.diffs, self.total, self.x = {}, None, {}
        self._record(0, args[0] if args else kwargs["hidden_states"])
        return None

    def _keep_x(self, l: int, x: torch.Tensor) -> None:
        if self._mine():
            self.x[l] = x

    def _keep_z(self, z: torch.Tensor) -> None:
        if threading.get_ident() == self.owner:
            self.z = z

    def _mlp(self, l: int, out) -> None:
        if self._mine():
            self._record(self.g.mlp_up(l), out[0] if isinstance(out, tuple) else out)

    def _shift(self, args, d: int):
        if not self._mine():
            return None
        dx = self.delta(d, args[0])
        return None if dx is None else (args[0] - dx,) + tuple(args[1:])

    def _record_heads(self, l: int, z: torch.Tensor) -> None:
        """Each head's output z_h W_O^h = proj(z with only head h) − proj(0), through the projection itself."""
        proj, H = self.model.adapter.attn_out[l], self.model.n_heads
        zz = z.unflatten(-1, (H, -1))  # [n, T, H, hd]
        one = torch.eye(H, dtype=torch.bool)[:, None, None, :, None]  # [H(head kept), 1, 1, H, 1]
        outs = proj.forward(torch.where(one, zz[None], torch.zeros((), dtype=z.dtype)).flatten(-2))
        outs = outs - proj.forward(torch.zeros_like(z[:1, :1]))
        for h in range(H):
            self._record(self.g.head_up(l, h), outs[h])

    def _attn(self, l: int, mod, args, kwargs, out):
        """Rerun layer l's attention once per head whose input differs, and keep head h's z from run h."""
        if not self._mine():
            return None
        from transformers.cache_utils import Cache
        if self.model.engine.offset > 0:
            raise InterpError("circuit.edges scores whole sequences: this forward continues from a KV cache (cached "
                              "generation), where the heads' reruns would need keys and values of their own; "
                              "score full sequences (model.logits, interp.evaluate)")
        g, H, x, z_main = self.g, self.model.n_heads, self.x[l], self.z
        deltas = {h: dx for h in range(H) if (dx := self.delta(g.head_down(l, h), x)) is not None}
        if not deltas:
            self._record_heads(l, z_main)
            return None
        heads = sorted(deltas)
        n, k = x.shape[0], len(heads)
        X = torch.cat([x - deltas[h] for h in heads], 0)  # [k·n, T, d]
        # the reruns see only this forward's tokens (no cache before it): they run without the cache, which keeps
        # what the model's own run wrote
        kw = {key: None if isinstance(v, Cache) else _rep(v, n, k) for key, v in kwargs.items() if key != "hidden_states"}
        norm = self.model.adapter.attn_norm[l]
        self.inner = True
        try:
            with _rows_repeated(self.model.engine, k):
                if args:
                    mod.forward(norm.forward(X), *(None if isinstance(a, Cache) else _rep(a, n, k) for a in args[1:]),
                                **kw)
                else:
                    mod.forward(hidden_states=norm.forward(X), **kw)
        finally:
            self.inner = False
        zin = self.z.unflatten(-1, (H, -1))  # [k·n, T, H, hd]
        z = z_main.unflatten(-1, (H, -1)).clone()
        for i, h in enumerate(heads):
            z[:, :, h] = zin[i * n:(i + 1) * n, :, h]
        z = z.flatten(2)
        o = self.model.adapter.attn_out[l](z)
        self._record_heads(l, z)
        return (o,) + tuple(out[1:]) if isinstance(out, tuple) else o


def _rep(v: Any, n: int, k: int) -> Any:
    """Repeat batch-first tensors (and tuples of them) k times along the batch (1-D tensors, e.g. cache positions,
    are not batch-first)."""
    if isinstance(v, torch.Tensor) and v.dim() > 1 and v.shape[0] == n and n > 0:
        return v.repeat(k, *([1] * (v.dim() - 1)))
    if isinstance(v, tuple):
        return tuple(_rep(x, n, k) for x in v)
    return v


@contextlib.contextmanager
def _rows_repeated(engine, k: int) -> Iterator[None]:
    """While an attention reruns on k copies of the batch: the running inputs' padding, roles and sinks repeated
    k times (so other specs' edits select the same tokens in every copy), and read-only hooks (captures) left out
    (they record the run, not its reruns)."""
    saved = (engine.query_valid, engine.roles, dict(engine.sinks), list(engine.hooks))
    try:
        if engine.query_valid is not None:
            engine.query_valid = engine.query_valid.repeat(k, 1)
        if engine.roles is not None:
            engine.roles = list(engine.roles) * k
        for key, v in list(engine.sinks.items()):
            engine.sinks[key] = v.repeat(k, 1)
        engine.hooks[:] = [hk for hk in engine.hooks if not getattr(hk, "read_only", False)]
        yield
    finally:
        engine.query_valid, engine.roles = saved[0], saved[1]
        engine.sinks.clear()
        engine.sinks.update(saved[2])
        engine.hooks[:] = saved[3]
