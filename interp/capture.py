"""``interp.capture``: run a model once and keep what was asked for, exactly as the model computed it.

Sites (TransformerLens-style names): ``embed``, ``blocks.{l}.resid_pre``, ``blocks.{l}.attn.q`` [b,q,h,d]
and ``blocks.{l}.attn.k`` [b,k,kv,d] (queries and keys as they enter the attention softmax: after the
projections, their norms where the model has them (Qwen3, Gemma) and RoPE; keys per key/value head, not
repeated, so query head h of ``attn.q`` and ``attn.pattern`` reads key head h // (n_heads / n_kv_heads):
attn.pattern[:, h] = softmax(scaling · q[:, :, h] · k[:, :, h // rep]ᵀ + mask), with the attention
module's ``scaling`` (head_dim^-1/2 unless the model says otherwise) and Gemma's logit soft-cap where it
has one), ``blocks.{l}.attn.logits`` [b,h,q,k], ``blocks.{l}.attn.pattern`` [b,h,q,k],
``blocks.{l}.attn.z`` [b,q,h,d] (per-head output before the output projection), ``blocks.{l}.attn.out``, ``blocks.{l}.mlp.in`` (the MLP's input: the
post-attention norm's output), ``blocks.{l}.mlp.out``,
``blocks.{l}.resid_post``, ``final`` (after the final norm), ``logits``. Select them by exact name,
glob (``blocks.*.attn.pattern``) or a callable on the name.

Reducers fold each layer's attention weights while they are computed (in query chunks), so a
capture of statistics keeps memory linear in sequence length. Their buffers live on the device of the
layer they serve and accumulate in float32 whatever the model's dtype (fp16 / bf16 models included):

* ``KeyMass``   ``attn.key_mass`` [b,h,k] = Σ_q A[q,k] over real queries; ``attn.key_mean`` = that sum
  divided by the number of real queries that can see k (the sink importance α_k of Gu et al. 2025).
* ``RoleMass(role)`` ``attn.role_mass.{role}`` [b,h,q] = Σ_{k∈role} A[q,k].
* ``Entropy``   ``attn.entropy`` [b,h,q] = −Σ_k A log A, and ``attn.entropy_norm`` = that / log(#visible keys).
* ``TopK(k)``   ``attn.topk_val`` / ``attn.topk_idx`` [b,h,q,k].
"""
from __future__ import annotations

import contextlib
import fnmatch
import math
import os
import re
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from .engine import AttnCall, entropy
from .errors import InterpError
from .roles import Batch
from .trace import Trace, split_site

DOT_ELEMENTS = 2**20  # the product buffer of Entropy's Σ p·z (4 MiB in fp32)
ATTN_KINDS = ("attn.q", "attn.k", "attn.logits", "attn.pattern", "attn.z")
RESID_KINDS = ("resid_pre", "attn.out", "mlp.in", "mlp.out", "resid_post")
GLOBAL_SITES = ("embed", "final", "logits")


def site_names(n_layers: int) -> list[str]:
    names = ["embed"]
    for l in range(n_layers):
        names += [f"blocks.{l}.{k}" for k in ("resid_pre",) + ATTN_KINDS + ("attn.out", "mlp.in", "mlp.out", "resid_post")]
    return names + ["final", "logits"]


def resolve_sites(model, sites, layers: Iterable[int] | None = None) -> list[str]:
    """Expand names / globs / a callable into concrete site names, with clear errors."""
    all_names = site_names(model.n_layers)
    if sites is None:
        return []
    if isinstance(sites, str) or callable(sites):
        sites = [sites]
    chosen: list[str] = []
    for s in sites:
        if callable(s):
            hits = [n for n in all_names if s(n)]
        else:
            hits = [n for n in all_names if fnmatch.fnmatchcase(n, s)]
            if not hits:
                raise InterpError(_unknown_site(s, model.n_layers))
        chosen += [h for h in hits if h not in chosen]
    if layers is not None:
        layers = set(_check_layers(model, layers))
        chosen = [n for n in chosen if split_site(n)[0] is None or split_site(n)[0] in layers]
    return chosen


def _unknown_site(s: str, n_layers: int) -> str:
    m = re.match(r"^blocks\.(\d+)\.(.+)$", s)
    if m and int(m.group(1)) >= n_layers:
        return f"layer {m.group(1)} is out of range in site {s!r}: the model has {n_layers} layers (0..{n_layers - 1})"
    kinds = ", ".join(("embed",) + tuple(f"blocks.{{l}}.{k}" for k in ("resid_pre",) + ATTN_KINDS
                                         + ("attn.out", "mlp.in", "mlp.out", "resid_post")) + ("final", "logits"))
    return f"unknown site {s!r}; sites are {kinds} (globs such as 'blocks.*.attn.pattern' work)"


def _check_layers(model, layers) -> list[int]:
    out = []
    for l in layers:
        if not isinstance(l, int) or not -model.n_layers <= l < model.n_layers:
            raise InterpError(f"layer {l!r} is out of range: the model has {model.n_layers} layers "
                              f"(0..{model.n_layers - 1})")
        out.append(l % model.n_layers)
    return out


# --------------------------------------------------------------------------------------- reducers
@dataclass
class Reducer:
    """Folds attention weights chunk by chunk. Subclasses implement ``update`` and ``finish``."""

    layers: Sequence[int] | None = field(default=None, kw_only=True)

    def applies(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def start(self, batch: Batch) -> None:
        self._state: dict[int, dict] = {}
        self._batch = batch
        self._mask_stats: dict[tuple, tuple] = {}

    def update(self, layer: int, weights: torch.Tensor, call: AttnCall) -> None:  # weights [b,h,qc,k]
        raise NotImplementedError

    def finish(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _rows(self, layer: int, name: str, chunk: torch.Tensor, call: AttnCall) -> None:
        """Write a per-query chunk result [b, h, q_chunk, ...] into this layer's [b, h, T, ...] output, allocated
        once: many small per-chunk tensors kept until the end would fragment the heap at long context."""
        st = self._state.setdefault(layer, {})
        if name not in st:
            T = self._batch.input_ids.shape[1]
            dtype = torch.float32 if chunk.is_floating_point() else chunk.dtype
            st[name] = torch.zeros(*chunk.shape[:2], T, *chunk.shape[3:], dtype=dtype, device=chunk.device)
        st[name][:, :, call.q_start:call.q_start + call.q_len] = chunk

    def _per_mask(self, name: str, call: AttnCall, width: int | None, compute: Callable[[], object]):
        """A statistic of the mask and padding alone, which the layers of a forward usually share: computed
        once per chunk (``width`` None: once per call), keyed by the identity of the (weakly referenced, so
        live) mask and padding tensors."""
        bases = tuple(t if t is None or t._base is None else t._base for t in (call.mask, call.query_valid))
        key = (name, *map(id, bases)) + ((call.k_len,) if width is None else (call.q_start, call.q_len, width))
        hit = self._mask_stats.get(key)
        if hit is None or any((r is None) != (t is None) or (r is not None and r() is not t) for r, t in zip(hit[0], bases)):
            hit = self._mask_stats[key] = (tuple(None if t is None else weakref.ref(t) for t in bases), compute())
        return hit[1]

    def _shared(self, name: str, call: AttnCall, layer: int, make: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, bool]:
        """A per-layer state tensor that depends on the mask and padding alone: layers that run with the same
        mask share one, and only the first of them (the owner: second value True) fills it in."""
        owner, t = self._per_mask(name, call, None, lambda: (layer, make()))
        return t, owner == layer

    @staticmethod
    def _valid(call: AttnCall, weights: torch.Tensor) -> torch.Tensor:
        """float32 [b,1,qc,1]: 1 for real queries."""
        if call.query_valid is None:
            return torch.ones(weights.shape[0], 1, weights.shape[2], 1, device=weights.device)
        return call.query_valid[:, None, :, None].to(device=weights.device, dtype=torch.float32)

    @staticmethod
    def _visible(call: AttnCall, weights: torch.Tensor) -> torch.Tensor:
        """bool [b,1|h,qc,k]: keys each query can see."""
        if call.visible is None:
            return torch.ones_like(weights[:, :1], dtype=torch.bool)
        return call.visible


@dataclass
class KeyMass(Reducer):
    """Σ_q A[q,k] (``key_mass``) and its mean over the real queries that can see k (``key_mean``)."""

    def update(self, layer, weights, call):
        w = weights.detach()
        kc = w.shape[-1]  # keys handed over (every later key is masked in this chunk)

        def row():  # [b,1,1,qc]: 1 for real queries (looked up only where needed: this runs for every chunk)
            return self._per_mask("row", call, kc, lambda: self._valid(call, w).transpose(2, 3))
        s = self._state.get(layer)
        if s is None:
            count, owner = self._shared("count", call, layer,
                                        lambda: w.new_zeros(w.shape[0], 1, call.k_len, dtype=torch.float32))
            s = self._state[layer] = {"sum": w.new_zeros(*w.shape[:2], call.k_len, dtype=torch.float32),
                                      "count": count, "owner": owner}
        if call.query_valid is None or self._per_mask("all_real", call, kc, lambda: bool(call.query_valid.all())):
            if w.dtype == torch.float32:  # Σ_q as a ones-vector GEMM over [b·h, q, k]: one pass, vectorised along k
                ones = w.new_ones(1, w.shape[2])
                s["sum"][..., :kc] += torch.matmul(ones, w.reshape(-1, w.shape[2], kc)).view(*w.shape[:2], kc)
            else:
                s["sum"][..., :kc] += w.sum(2, dtype=torch.float32)  # every query is real
        else:
            # Σ over real queries, without a [b,h,q,k] temporary; in float64 because BLAS sums in an order that
            # depends on the chunk's width, and a mass of ~T must not depend on how the keys were chunked
            s["sum"][..., :kc] += torch.matmul(row().double(), w.double())[:, :, 0].float()
        if s["owner"]:  # how many real queries see each key
            s["count"][..., :kc] += torch.matmul(row(), self._visible(call, w).float())[:, :, 0]

    def finish(self):
        out = {}
        for l, s in self._state.items():
            out[f"blocks.{l}.attn.key_mass"] = s["sum"]
            out[f"blocks.{l}.attn.key_mean"] = s["sum"] / s["count"].clamp_min(1)
        return out


@dataclass
class RoleMass(Reducer):
    """Σ_{k∈role} A[q,k] for every query: attention from each query to a token role."""

    role: str = "bos"

    def update(self, layer, weights, call):
        sel = torch.zeros(weights.shape[0], 1, 1, weights.shape[-1], device=weights.device)
        for i, r in enumerate(self._batch.roles):
            pos = [p for p in r.positions(self.role) if p < weights.shape[-1]]
            sel[i, 0, 0, pos] = 1
        mass = (weights.detach().float() * sel).sum(-1)
        self._rows(layer, "mass", mass * self._valid(call, weights)[..., 0], call)

    def finish(self):
        return {f"blocks.{l}.attn.role_mass.{self.role}": st["mass"] for l, st in self._state.items()}


@dataclass
class QueryRow(Reducer):
    """A[q, :] of one query per sequence (the first position of the ``query`` selector: ``last`` = its last
    real token, or a role) -> ``blocks.{l}.attn.query_row`` [b, h, k], without storing the pattern."""

    query: str = "last"

    def update(self, layer, weights, call):
        out = self._state.get(layer)
        if out is None:
            out = self._state[layer] = torch.zeros(weights.shape[0], weights.shape[1], call.k_len, device=weights.device)
        kc = weights.shape[-1]  # keys handed over (every later key is masked in this chunk)
        for i, r in enumerate(self._batch.roles):
            p = r.positions(self.query)[0] - call.q_start
            if 0 <= p < call.q_len:
                out[i, :, :kc] = weights[i, :, p].detach().float()

    def finish(self):
        return {f"blocks.{l}.attn.query_row": v for l, v in self._state.items()}


@dataclass
class Entropy(Reducer):
    """Per-query attention entropy (nats) and its normalisation by log(#visible keys)."""

    def update(self, layer, weights, call):
        w = weights.detach().float()
        z = None
        if call.logits is not None:
            z = call.logits.detach().float()
            if call.logits.dtype in (torch.float16, torch.bfloat16):
                # a half-precision mask (finfo.min plus a negative score) rounds to -inf, and 0 · -inf is NaN
                z = torch.nan_to_num(z, nan=0.0, neginf=torch.finfo(torch.float32).min)
        if z is not None and call.lse is not None:  # H = log Z − Σ_k p_k z_k, log Z from the kernel
            H = call.lse.float() - self._dot(w, z)
        elif z is not None:
            # H = log Z − Σ_k p_k z_k with log Z = z_max − log p_max: no log over [b, h, q, k]
            # (softmax is monotonic, so p_max is the weight at z's argmax; two amax passes beat max + gather)
            H = z.amax(-1) - torch.log(w.amax(-1)) - self._dot(w, z)
        else:
            H = entropy(w)
        self._rows(layer, "H", H, call)
        st = self._state[layer]
        if "nvis" not in st:  # [b, 1, T] visible keys per query
            T = self._batch.input_ids.shape[1]
            st["nvis"], st["owner"] = self._shared("nvis", call, layer, lambda: H.new_zeros(H.shape[0], 1, T))
        if st["owner"]:
            st["nvis"][:, :, call.q_start:call.q_start + call.q_len] = self._visible(call, w).sum(-1, dtype=H.dtype)

    def _dot(self, w: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Σ_k w·z along the last axis: the product goes through one buffer reused from chunk to chunk, in
        blocks of rows of at most ``DOT_ELEMENTS`` (a batched einsum dot runs ~7x slower than multiply and sum,
        and a fresh [b, h, q, k] product per chunk costs page faults)."""
        kc = w.shape[-1]
        w2, z2 = w.reshape(-1, kc), z.reshape(-1, kc)
        rows = max(1, DOT_ELEMENTS // max(1, kc))
        n = min(rows, w2.shape[0]) * kc
        buf = getattr(self, "_buf", None)
        if buf is None or buf.numel() < n or buf.device != w.device:
            self._buf = buf = torch.empty(n, device=w.device)
        out = torch.empty(w2.shape[0], device=w.device)
        for i in range(0, w2.shape[0], rows):
            j = min(w2.shape[0], i + rows)
            prod = torch.mul(w2[i:j], z2[i:j], out=buf[:(j - i) * kc].view(j - i, kc))
            torch.sum(prod, -1, out=out[i:j])
        return out.view(w.shape[:-1])

    def finish(self):
        self._buf = None
        out = {}
        for l, st in self._state.items():
            H, nvis = st["H"], st["nvis"]
            valid = self._batch.attention_mask.bool()[:, None, :].to(H.device)  # [b, 1, T]: padded queries never count
            Hn = torch.where(nvis > 1, H / torch.log(nvis.clamp_min(2)), 0.0)
            out[f"blocks.{l}.attn.entropy"] = torch.where(valid, H, 0.0)  # padded rows may hold inf/nan
            out[f"blocks.{l}.attn.entropy_norm"] = torch.where(valid, Hn, 0.0)
        return out


@dataclass
class TopK(Reducer):
    """The k keys each query attends to most, with their weights."""

    k: int = 5

    def update(self, layer, weights, call):
        k = min(self.k, call.k_len)
        w = weights.detach()
        if w.shape[-1] < k:  # only the first keys were handed over: the rest weigh 0
            w = torch.nn.functional.pad(w, (0, k - w.shape[-1]))
        v, i = w.topk(k, dim=-1)
        self._rows(layer, "v", v.float(), call)
        self._rows(layer, "i", i, call)

    def finish(self):
        out = {}
        for l, st in self._state.items():
            out[f"blocks.{l}.attn.topk_val"] = st["v"]
            out[f"blocks.{l}.attn.topk_idx"] = st["i"]
        return out


# --------------------------------------------------------------------------------------- the hook
class _CaptureHook:
    read_only = True  # never edits what it sees: the engine may keep the SDPA output (see engine.py)

    def __init__(self, sites: list[str], reducers: list[Reducer], grad: bool,
                 layers: list[set[int] | None] | None = None):
        self.by_layer: dict[int, set[str]] = {}
        for n in sites:
            l, k = split_site(n)
            if l is not None and k in ATTN_KINDS:
                self.by_layer.setdefault(l, set()).add(k)
        self.reducers = reducers
        # where each reducer runs: its own layers (negative ones counted from the end) within the capture's
        # ``layers=``; worked out here so that the reducers themselves are never changed by a capture
        self.reducer_layers = layers if layers is not None else [None] * len(reducers)
        self.grad = grad
        self.store: dict[str, list[torch.Tensor]] = {}
        self.seen: set[int] = set()  # layers whose attention ran through the engine

    def needs(self, layer):
        kinds = self.by_layer.get(layer, set())
        out = set()
        if "attn.logits" in kinds:
            out.add("logits")
        if "attn.pattern" in kinds or any(self._applies(i, layer) for i in range(len(self.reducers))):
            out.add("weights")
        if "attn.z" in kinds:
            out.add("z")
        if "attn.q" in kinds or "attn.k" in kinds:
            out.add("qk")
        return out

    def keeps_tensors(self, layer: int) -> set[str]:
        """Patterns are kept as handed over (no copy); logits are copied; reducers keep only their folds."""
        if self.grad:
            return {"logits", "weights"}
        return {"weights"} if "attn.pattern" in self.by_layer.get(layer, ()) else set()

    def accepts_visible_prefix(self, layer: int) -> bool:
        """Reducers and pattern chunks take rows that stop at the last visible key (the trace pads pattern
        chunks with the zeros of the masked keys); captured logits need the full row."""
        return not self.grad and "attn.logits" not in self.by_layer.get(layer, ())

    def _keep(self, name, t, copy: bool = True):
        """Keep a tensor. Attention tensors are fresh per call and never edited in place, so they are kept
        without a copy (a full-pattern capture then holds one copy of each pattern, like HF eager)."""
        if self.grad:
            if t.requires_grad:
                t.retain_grad()
        else:
            t = t.detach().clone() if copy else t.detach()
        self.store.setdefault(name, []).append(t)

    def on_logits(self, layer, logits, call):
        self.seen.add(layer)
        self._keep(f"blocks.{layer}.attn.logits", logits)  # copied: logit edits may follow

    def on_weights(self, layer, weights, call):
        self.seen.add(layer)
        if "attn.pattern" in self.by_layer.get(layer, ()):
            self._keep(f"blocks.{layer}.attn.pattern", weights, copy=False)
        for i, r in enumerate(self.reducers):
            if self._applies(i, layer):
                r.update(layer, weights, call)

    def _applies(self, i: int, layer: int) -> bool:
        ls = self.reducer_layers[i]
        return ls is None or layer in ls

    def on_qk(self, layer, q, k, call):
        """Queries [b, q, h, d] and keys [b, k, kv, d] of the call (copied without grad: a KV cache may be
        written in place later; with grad the tensors themselves, which the attention is computed from)."""
        self.seen.add(layer)
        kinds = self.by_layer.get(layer, ())
        if "attn.q" in kinds:
            self._keep(f"blocks.{layer}.attn.q", q)
        if "attn.k" in kinds:
            self._keep(f"blocks.{layer}.attn.k", k)

    def on_z(self, layer, z, call, v, weights):
        self.seen.add(layer)
        self._keep(f"blocks.{layer}.attn.z", z)

    def logit_bias(self, *a):
        return None


def estimate_bytes(model, sites: list[str], batch_size: int, seq_len: int, itemsize: int = 4) -> int:
    """Memory the stored tensors of a capture will take."""
    b, T = batch_size, seq_len
    per = {"attn.logits": b * model.n_heads * T * T, "attn.pattern": b * model.n_heads * T * T,
           "attn.z": b * T * model.n_heads * model.head_dim, "attn.q": b * T * model.n_heads * model.head_dim,
           "attn.k": b * T * model.n_kv_heads * model.head_dim, "logits": b * T * model.adapter.vocab_size}
    return sum(per.get(split_site(n)[1], b * T * model.d_model) for n in sites) * itemsize


def available_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def _gb(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def capture(model, inputs, sites=None, reducers: Sequence[Reducer] = (), *, layers: Iterable[int] | None = None,
            grad: bool = False, max_memory: int | None = None, **encode_kw) -> Trace:
    """Run ``model`` on ``inputs`` once; return a :class:`Trace` of the requested sites and reducers.

    ``inputs``: anything :meth:`Model.encode` takes (text, chat messages, token ids, a dict with a left- or
    right-padded or 4-D mask, a Batch); it runs right-padded on the model's device. ``layers`` restricts the
    sites and the reducers to those layers for this capture only (the reducers are not changed)."""
    from .model import Model
    if not isinstance(model, Model):
        raise InterpError(f"capture needs an interp Model (from interp.load), got {type(model).__name__}")
    batch = model.encode(inputs, **encode_kw)
    names = resolve_sites(model, sites, layers)
    reducers = list(reducers)
    only = set(_check_layers(model, layers)) if layers is not None else None
    reducer_layers = []
    for r in reducers:
        own = set(_check_layers(model, r.layers)) if r.layers is not None else None
        reducer_layers.append(own if only is None else (only if own is None else own & only))
    need = estimate_bytes(model, names, *batch.input_ids.shape)
    budget = max_memory if max_memory is not None else int(available_bytes() * 0.6)
    if need > budget:
        big = [n for n in names if split_site(n)[1] in ("attn.pattern", "attn.logits")]
        hint = ("use reducers instead of full patterns, e.g. reducers=[KeyMass(), Entropy(), TopK(5)] "
                "(memory linear in tokens)" if big else "capture fewer sites or layers")
        raise InterpError(f"this capture would keep ~{_gb(need)} of tensors ({len(names)} sites at "
                          f"{batch.input_ids.shape[1]} tokens), more than the {_gb(budget)} available: {hint}")
    hook = _CaptureHook(names, reducers, grad, reducer_layers)
    for r in reducers:
        r.start(batch)
    ad = model.adapter
    handles = []

    def keep(name):
        def fn(mod, args, kwargs, out):
            t = out[0] if isinstance(out, tuple) else out
            hook._keep(name, t)
        return fn

    def keep_input(name):
        def fn(mod, args, kwargs):
            t = args[0] if args else kwargs["hidden_states"]
            hook._keep(name, t)
        return fn

    try:
        for n in names:
            l, k = split_site(n)
            if k == "embed":
                handles.append(ad.embed.register_forward_hook(keep(n), with_kwargs=True))
            elif k == "final":
                handles.append(ad.final_norm.register_forward_hook(keep(n), with_kwargs=True))
            elif k == "logits":
                handles.append(ad.unembed.register_forward_hook(keep(n), with_kwargs=True))
            elif k == "resid_pre":
                handles.append(ad.layers[l].register_forward_pre_hook(keep_input(n), with_kwargs=True))
            elif k == "resid_post":
                handles.append(ad.layers[l].register_forward_hook(keep(n), with_kwargs=True))
            elif k == "attn.out":
                handles.append(ad.attn[l].register_forward_hook(keep(n), with_kwargs=True))
            elif k == "mlp.out":
                handles.append(ad.mlp[l].register_forward_hook(keep(n), with_kwargs=True))
            elif k == "mlp.in":  # the MLP's input: the post-attention norm's output (Llama's post_attention_layernorm)
                handles.append(ad.mlp[l].register_forward_pre_hook(keep_input(n), with_kwargs=True))
        ctx = torch.enable_grad() if grad else torch.no_grad()
        with ctx, model.engine.running(batch), model.engine.using(hook):
            out = model.hf(**batch.model_inputs(), use_cache=False)  # a capture never continues: no KV cache to hold
        missed = [l for l in range(model.n_layers) if hook.needs(l) and l not in hook.seen]
        if missed:
            raise InterpError(f"the attention of layers {missed[:8]} did not run through interp's attention function, "
                              "so what was asked of it cannot be captured (the attention modules were replaced or "
                              "compute attention themselves, e.g. after a TransformerLens bridge or a custom "
                              f"patch of {type(model.adapter.attn[missed[0]]).__name__}); load the plain HF model")
        values: dict = {}
        for n in names:  # keep the requested order
            if n in hook.store:
                values[n] = hook.store[n] if grad else _merge(hook.store[n], n)
        for r in reducers:
            values.update(r.finish())
    finally:
        for h in handles:
            h.remove()
    trace = Trace(values, batch.input_ids, batch.attention_mask, batch.tokens, batch.roles,
                  {"model": model.identity(), "sites": names, "reducers": [type(r).__name__ for r in reducers]},
                  grads=grad)
    trace.output = out
    return trace


def _merge(parts: list[torch.Tensor], name: str):
    return parts[0] if len(parts) == 1 else parts
