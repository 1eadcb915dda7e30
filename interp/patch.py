"""``interp.patch(model, spec)``: the one patching layer. A context manager that applies a Spec's
edits through the engine's attention function and forward hooks; leaving it restores the model.

Each op is one formula (METHODS.md §0 primitives P1–P6). z = pre-softmax logits of a query row,
A = softmax(z), O = per-head output before the output projection, h = residual stream:

* ``attn.scale_weights``  renormalize: A' = normalise(A ⊙ γ^{1[k∈K]}) ≡ softmax(z + log γ·1_K) (P1, runs
  under SDPA as a logit bias; γ = 0 is a knockout); with ``redistribute_to`` R (ACT, VAR):
  A'_K = γ A_K and A'_R = A_R + (1−γ) Σ_K A · A_R / Σ_R A (P2, rows keep their sum);
  without renormalize: A'_{qk} = γ A_{qk} (P2, eager, rows no longer sum to 1).
* ``attn.add_logit_bias`` z' = z + B, B a constant on (Q, K), λ·g(|q−k|) with g ∈ {log1p(d/d0),
  d/d0, 1}, or a sidecar tensor (P1, SDPA).
* ``attn.replace_pattern`` local_window: z'_{qk} = −∞ for k ≤ q − w (key 0 kept if keep_sink) (P1/P6,
  SDPA); copy_head: A'^{h} = A^{h*} (P3, eager).
* ``attn.knockout``       z'_{qk} = −∞ for q ∈ targets, k ∈ sources (P6, SDPA).
* ``attn.head_scale``     O'^{h} = α O^{h} (P4).   ``attn.head_ablate``  O'^{h} = 0, or (mode ``mean``) the head's
  mean output over a reference set, μ^{h} = mean over the real tokens t of reference prompts of O^{h}_t, from the
  sidecar (:func:`interp.ops.mean_z`; Wang et al. 2022). Never a mean over the current call, which would leak later
  tokens into earlier ones and depend on the chunking.
* ``resid.add``           h'_t = h_t + s·v (P5).   ``resid.suppress_dims`` h'_{t,c} = 0 | mean_c | clamp.
* ``patch``               x'_t = x^{src}_t at a site, from a saved Trace (activation patching).
* ``attn.amplify``        PAI: z'_{qk} = z_{qk} + α|z_{qk}| for image keys k, before the softmax (P1 on logits).
* ``attn.oeb``            Step-Saliency OEB (METHODS §4b): at a query row with p = softmax(z), segment S, bridge B,
  O the rest, τ_B = min(√(|B|/(|B|+|S|)), τ_max), τ_S = 1 − p(O) − τ_B; if p(B) < τ_B (and τ_S > 0):
  z'_k = z_k + log(τ_B/p(B)) on B, z_k + log(τ_S/p(S)) on S, O unchanged, so p'(B) = τ_B and p'(O) = p(O)
  (P1 on the logits, eager). Counts and masses use visible keys only; generated tokens belong to S.
* ``attn.smi``            Step-Saliency SMI: O'^{h}[t] = O^{h}[t] + s · mean_{j∈source} V^{h}[j] (P5 on z).
* ``circuit.edges``       edge ablation (EAP circuits, METHODS §18): every downstream node d (a head's input, an
  MLP's input, the logits) reads x_d = x_d^run − Σ_{u→d ∉ keep} (a_u^run − ã_u), ã from the sidecar
  (:mod:`interp.edges`; whole sequences: a forward that continues a KV cache is refused).

Each op is one class in :mod:`interp.ops` (schema, engine need, neutral value, application); this module
compiles a Spec into engine hooks and forward hooks and dispatches to those classes. Edits at their identity
parameters (each op's ``neutral``: factor 1 for ``attn.scale_weights`` and ``attn.head_scale``, α = 0 for
``attn.amplify``, a zero bias, ...) are skipped, so a neutral spec leaves the logits bit-identical whichever
attention path (SDPA or eager) the engine takes. A row whose every visible key would be blocked (by one edit
or several together) gets no logit bias at all and keeps its original distribution (blocking is a finite
−1e9 bias; without that rule such a row would become uniform over its keys).

Positions are absolute: during cached generation the offset (tokens already cached) is read from the cache
object the model receives, whatever transformers calls the argument, or from ``cache_position``;
a sliding-window cache that hands attention only the last keys is handled through ``AttnCall.k_start``.

``interp.patch(model, hooks={site: fn})`` applies arbitrary Python edits at capture's site names
(``blocks.{l}.resid_pre``, ``blocks.{l}.attn.z``, ``blocks.{l}.attn.out``, ...; ``fn(tensor) -> tensor | None``),
restored on exit like every patch; such a patch has no JSON form, and ``save`` says so.

"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

import torch

from .engine import BLOCK, AttnCall  # noqa: F401 (BLOCK re-exported)
from .errors import InterpError
from .ops import OPS, uses_sink
from .roles import Roles
from .spec import Spec


class _SpecHook:
    """A compiled Spec: attention edits by layer (dispatched to the op classes), plus residual edits as
    forward hooks."""

    def __init__(self, model, spec: Spec):
        self.model, self.spec = model, spec
        self.engine = model.engine
        n_layers, n_heads = model.n_layers, model.n_heads
        self.by_layer: dict[int, list[tuple[dict, str, int]]] = {}
        self.decode: list[dict] = []
        self.graph: list[dict] = []
        for e in spec.edits:
            op = OPS[e["op"]]
            if op.neutral(e):  # an identity edit is not run: the model computes exactly what it computed before
                continue
            if op.kind(e) == "decode":  # on the output logits (see _Decoder), not at a layer
                self.decode.append(e)
                continue
            if op.kind(e) == "graph":  # hooks on every node of the model (circuit.edges), not at a layer
                self.graph.append(e)
                continue
            layers = list(range(n_layers)) if e["layers"] == "all" else e["layers"]
            for j, l in enumerate(layers):
                self.by_layer.setdefault(l, []).append((e, op.kind(e), j))
        self.n_heads = n_heads
        self.bias_cache: dict[tuple, torch.Tensor | None] = {}  # cleared at every forward (see patch())
        self.head_masks = {}
        for e in spec.edits:
            hm = torch.zeros(n_heads, dtype=torch.bool)
            hm[list(range(n_heads)) if e.get("heads", "all") == "all" else e["heads"]] = True
            self.head_masks[id(e)] = hm

    # selectors ----------------------------------------------------------------------
    def _active(self, e) -> bool:
        return "steps" not in e or self.engine.step in e["steps"]

    def _roles(self, b: int, length: int) -> list[Roles]:
        """Roles of the running sequences; each one's length grows with generated tokens."""
        rl = self.engine.roles
        if rl is None:
            return [Roles({"bos": [0]}, length=length) for _ in range(b)]
        rl = rl[:b] if len(rl) >= b else [rl[0]] * b
        extra = max(0, length - self.engine.batch_len)
        return [Roles(r, length=min(length, r.length + extra)) for r in rl]

    def _select(self, sel, b: int, length: int, layer: int) -> torch.Tensor:
        """bool [b, length] for a token selector over absolute positions 0..length-1."""
        out = torch.zeros(b, length, dtype=torch.bool)
        if sel == "sink" or (isinstance(sel, list) and "sink" in sel):
            sinks = self.engine.sinks.get(layer)
            if sinks is None:
                raise InterpError("the 'sink' selector needs spec.sink = {'dims': [...], 'tau': ...}")
            n = min(length, sinks.shape[1])
            out[:, :n] |= sinks[:b, :n]
            if sel == "sink":
                return out
            sel = [s for s in sel if s != "sink"]
        for i, r in enumerate(self._roles(b, length)):
            try:
                out[i, r.positions(sel, strict=False)] = True
            except InterpError as err:
                if self.engine.roles is None and "role" in str(err):
                    raise InterpError(f"{err}. Roles come from the inputs: run through interp.capture, "
                                      "interp.generate or interp.evaluate, or pass roles= to interp.patch") from None
                raise
        return out

    def qsel(self, e: dict, b: int, call: AttnCall, layer: int, key: str = "queries") -> torch.Tensor:
        """bool [b, q]: the edit's selected queries (or positions) among this call's."""
        sel = e.get(key, OPS[e["op"]].default_queries)  # resolved over the whole sequence (a chunk's 'last' is not)
        return self._select(sel, b, call.k_start + call.k_len, layer)[:, call.q_start:call.q_start + call.q_len]

    def ksel(self, sel, b: int, call: AttnCall, layer: int) -> torch.Tensor:
        """bool [b, k]: a key selector over this call's keys (absolute positions k_start..)."""
        return self._select(sel, b, call.k_start + call.k_len, layer)[:, call.k_start:]

    def head_mask(self, e: dict) -> torch.Tensor:
        return self.head_masks[id(e)]

    def z_where(self, e: dict, z: torch.Tensor, call: AttnCall, layer: int, key: str = "queries") -> torch.Tensor:
        """bool [b, q, h, 1]: where a head-output edit applies."""
        return self.qsel(e, z.shape[0], call, layer, key)[:, :, None, None] & self.head_mask(e)[None, None, :, None]

    # AttentionHook --------------------------------------------------------------------
    def needs(self, layer):
        return {k for e, k, _ in self.by_layer.get(layer, ()) if k != "resid" and self._active(e)}

    def keeps_tensors(self, layer: int) -> set[str]:
        return set()  # edits return new tensors and keep nothing

    def logit_bias(self, layer, call: AttnCall, q, k):
        b = q.shape[0]
        total = None
        for e, kind, _ in self.by_layer.get(layer, ()):
            if kind != "bias" or not self._active(e):
                continue
            # an edit's bias is the same in every layer unless it selects run-time sinks: built once per forward
            key = (id(e), b, call.q_start, call.q_len, call.k_start, call.k_len, self.engine.step)
            if uses_sink(e) or key not in self.bias_cache:
                bias = OPS[e["op"]].bias(self, e, b, call, layer)
                if bias.dim() == 3:
                    bias = bias[:, None]
                hm = self.head_masks[id(e)]
                if not hm.all():
                    bias = bias * hm[None, :, None, None]
                bias = bias if bool(bias.any()) else None  # a bias of zeros leaves SDPA's call as it was
                if not uses_sink(e):
                    self.bias_cache[key] = bias
            else:
                bias = self.bias_cache[key]
            if bias is not None:
                total = bias if total is None else total + bias
        return None if total is None else total.to(q.dtype)

    def on_logits(self, layer, logits, call: AttnCall):
        for e, kind, _ in self.by_layer.get(layer, ()):
            if kind == "logits" and self._active(e):
                logits = OPS[e["op"]].on_logits(self, e, logits, call, layer)
        return logits

    def on_weights(self, layer, w, call: AttnCall):
        for e, kind, _ in self.by_layer.get(layer, ()):
            if kind == "weights" and self._active(e):
                w = OPS[e["op"]].on_weights(self, e, w, call, layer)
        return w

    def on_z(self, layer, z, call: AttnCall, v, weights):  # z [b, q, h, d]
        for e, kind, j in self.by_layer.get(layer, ()):
            if kind == "z" and self._active(e):
                z = OPS[e["op"]].on_z(self, e, j, z, call, layer, v)
        return z

    # residual edits ---------------------------------------------------------------------
    def resid_hooks(self, owner: int) -> list:
        ad, handles = self.model.adapter, []
        for l, edits in self.by_layer.items():
            for e, kind, j in edits:
                if kind != "resid":
                    continue
                site = OPS[e["op"]].site(e)
                fn = self._edit_fn(e, j, l)
                handles.append(_site_hook(self.model, l, site, fn, owner))
        for e in self.graph:
            handles += OPS[e["op"]].hooks(self, e, owner)
        if self.decode:
            self.decoder = _Decoder(self, owner)
            handles += self.decoder.handles
        return handles

    # decoding edits (called by the decode ops through the compiled spec) ----------------------------------
    def layer_list(self, e: dict) -> list[int]:
        return list(range(self.model.n_layers)) if e["layers"] == "all" else list(e["layers"])

    def lens(self, layer: int, n: int) -> torch.Tensor:
        return self.decoder.lens(layer, n)

    def reference_logits(self, e: dict) -> torch.Tensor:
        return self.decoder.reference_logits(e)

    def _edit_fn(self, e, j, layer):
        op = OPS[e["op"]]

        def fn(h):
            if not self._active(e):
                return h
            b, T, _ = h.shape
            off = self.engine.offset
            sel = self._select(e.get("positions", "all"), b, off + T, layer)[:, off:off + T]
            return op.on_resid(self, e, j, h, sel, off)
        return fn


class _Decoder:
    """Decoding edits of one compiled spec (``decode.sla``, ``decode.cfg``): a forward hook on the whole model
    rewrites its output logits, edit by edit in spec order, after every other edit of the forward has run.

    * SLA reads the residual stream ``blocks.{l}.resid_post`` of its window, recorded during the same forward by
      forward hooks on those layers, and decodes it with the model's own final norm and unembedding (their
      ``forward``, so hooks on them, e.g. a capture of ``final``, do not fire twice; a soft cap is applied as the
      model applies it), at the positions the model returned logits for (the last ones under ``logits_to_keep``).
    * CFG's reference pass is the same call again (same inputs, pixels, mask and positions) with the edit's
      ``keys`` (the image tokens) knocked out from every query in its ``layers``, under every other edit of the
      spec; decoding edits (of any spec) do not run inside it. Under cached generation it keeps a KV cache of its own, started
      afresh at every forward that begins at position 0.
    """

    def __init__(self, hook: "_SpecHook", owner: int):
        self.hook, self.model, self.owner = hook, hook.model, owner
        self.states: dict[int, torch.Tensor] = {}
        self.caches: dict[int, object] = {}
        self.call: tuple = ((), {})
        ad = self.model.adapter
        self.knockouts = {}
        for e in hook.decode:
            if e["op"] == "decode.cfg":
                ko = Spec(hook.spec.model, [{"op": "attn.knockout", "layers": e["layers"], "queries": "all",
                                             "keys": e.get("keys", "role:image")}])
                self.knockouts[id(e)] = _SpecHook(self.model, ko)
        sla = sorted({l for e in hook.decode if e["op"] == "decode.sla" for l in hook.layer_list(e)})
        self.handles = [ad.layers[l].register_forward_hook(self._record(l)) for l in sla]
        self.handles.append(self.model.hf.register_forward_hook(self._post, with_kwargs=True))

    def _mine(self) -> bool:
        if threading.get_ident() != self.owner:
            self.model.engine.check_thread()
            return False
        return not getattr(self.model.engine, "decode_reference_pass", False)  # none inside a CFG reference pass

    def _record(self, layer: int) -> Callable:
        def fn(mod, args, out):
            if self._mine():
                self.states[layer] = out[0] if isinstance(out, tuple) else out
        return fn

    def _post(self, mod, args, kwargs, out):
        if not self._mine():
            return out
        logits = out[0] if isinstance(out, tuple) else out.logits
        if logits is None:
            return out
        self.call = (args, kwargs)
        try:
            for e in self.hook.decode:
                if self.hook._active(e):
                    logits = OPS[e["op"]].on_output(self.hook, e, logits)
        finally:
            self.states.clear()
            self.call = ((), {})
        if isinstance(out, tuple):
            return (logits,) + tuple(out[1:])
        out.logits = logits
        return out

    def lens(self, layer: int, n: int) -> torch.Tensor:
        """z^l = W_U · norm_f(h^l) at the last ``n`` positions of this forward."""
        ad = self.model.adapter
        h = self.states.get(layer)
        if h is None:
            raise InterpError(f"decode.sla: layer {layer}'s residual stream was not recorded in this forward")
        z = ad.unembed.forward(ad.final_norm.forward(h[:, h.shape[1] - n:]))
        cap = getattr(ad, "logit_softcap", None)
        if cap is None:
            cap = getattr(getattr(ad.lm, "config", None), "final_logit_softcapping", None)
        return torch.tanh(z / cap) * cap if cap else z

    def reference_logits(self, e: dict) -> torch.Tensor:
        """The logits of this forward's inputs with the edit's keys knocked out (CFG's "no image" pass)."""
        from transformers.cache_utils import Cache, DynamicCache
        args, kwargs = self.call
        kwargs = dict(kwargs)
        eng = self.model.engine
        for k, v in list(kwargs.items()):
            if isinstance(v, Cache):
                mine = self.caches.get(id(e))
                if eng.offset == 0 or mine is None:
                    mine = self.caches[id(e)] = DynamicCache(config=self.model.hf.config)
                if mine.get_seq_length() != eng.offset:
                    raise InterpError(f"decode.cfg: the reference pass holds {mine.get_seq_length()} cached tokens but "
                                      f"the model's cache holds {eng.offset}: generate from the start under the patch")
                kwargs[k] = mine
        ko = self.knockouts[id(e)]
        ko.bias_cache.clear()
        offset = eng.offset
        eng.decode_reference_pass = True
        try:
            with eng.using(ko):
                out = self.model.hf(*args, **kwargs)
        finally:
            eng.decode_reference_pass = False
            eng.offset = offset
        return out[0] if isinstance(out, tuple) else out.logits


def _site_hook(model, layer: int | None, site: str, fn: Callable, owner: int):
    """A forward (pre-)hook that replaces the value at a residual site with fn(value) (None: unchanged). It acts
    only in the thread that made the patch (the engine refuses the others)."""
    ad = model.adapter

    def edit(t):
        if threading.get_ident() != owner:
            model.engine.check_thread()
            return t
        new = fn(t)
        return t if new is None else new

    if site == "resid_pre":
        def pre(mod, args, kwargs):
            if args:
                return (edit(args[0]),) + tuple(args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = edit(kwargs["hidden_states"])
            return args, kwargs
        return ad.layers[layer].register_forward_pre_hook(pre, with_kwargs=True)
    module = {"resid_post": lambda: ad.layers[layer], "attn.out": lambda: ad.attn[layer],
              "mlp.out": lambda: ad.mlp[layer], "embed": lambda: ad.embed, "final": lambda: ad.final_norm,
              "logits": lambda: ad.unembed}[site]()

    def post(mod, args, kwargs, out):
        if isinstance(out, tuple):
            return (edit(out[0]),) + tuple(out[1:])
        return edit(out)
    return module.register_forward_hook(post, with_kwargs=True)


class _FnHook:
    """Python edits of attention sites (``hooks={"blocks.3.attn.z": fn}``), as an engine hook."""

    def __init__(self):
        self.fns: dict[tuple[int, str], Callable] = {}

    def needs(self, layer):
        return {{"attn.z": "z", "attn.logits": "logits", "attn.pattern": "weights"}[k]
                for (l, k) in self.fns if l == layer}

    def keeps_tensors(self, layer):
        return set()

    def _run(self, layer, kind, t):
        fn = self.fns.get((layer, kind))
        if fn is None:
            return t
        new = fn(t)
        if new is not None and new.shape != t.shape:
            raise InterpError(f"hook on blocks.{layer}.{kind} returned shape {list(new.shape)}; expected {list(t.shape)}")
        return t if new is None else new

    def on_logits(self, layer, logits, call):
        return self._run(layer, "attn.logits", logits)

    def on_weights(self, layer, w, call):
        return self._run(layer, "attn.pattern", w)

    def on_z(self, layer, z, call, v, weights):
        return self._run(layer, "attn.z", z)


class Patch:
    """What :func:`patch` returns: a context manager that applies specs and Python hooks, and restores the model
    on exit, even on error. Contexts may be nested and closed in any order."""

    def __init__(self, model, specs: tuple, hooks: dict | None, roles):
        if not specs and not hooks:
            raise InterpError("interp.patch needs at least one Spec or hooks={site: fn}")
        compiled = []
        for s in specs:
            if isinstance(s, (str, bytes)) or not isinstance(s, Spec):
                raise InterpError(f"interp.patch takes Spec objects (Spec.load(path)), got {type(s).__name__}")
            s.validate()
            s.check(model)
            compiled.append(_SpecHook(model, s))
        self.model, self.specs, self.roles, self.compiled = model, specs, roles, compiled
        self.hooks = self._resolve(model, hooks or {})
        self._exit: list = []

    @staticmethod
    def _resolve(model, hooks: dict) -> dict[str, Callable]:
        from .capture import resolve_sites
        if not isinstance(hooks, dict):
            raise InterpError("interp.patch hooks= takes a dict {site name: fn(tensor) -> tensor or None}")
        out = {}
        for site, fn in hooks.items():
            if not callable(fn):
                raise InterpError(f"interp.patch hooks[{site!r}]: expected a function, got {type(fn).__name__}")
            if not isinstance(site, str):
                raise InterpError(f"interp.patch hooks: site names are strings, got {type(site).__name__}")
            for name in resolve_sites(model, site):
                out[name] = fn
        return out

    def save(self, path: str | Path) -> Path:
        """Save the patch's spec (JSON + sidecar). A patch made of Python hooks has no JSON form."""
        if self.hooks:
            raise InterpError("this patch applies Python functions (hooks=), which cannot be serialised: build it "
                              "from ops (interp.ops builders or Spec edits) to save it")
        if len(self.specs) != 1:
            raise InterpError(f"this patch applies {len(self.specs)} specs: save each Spec on its own (spec.save)")
        return self.specs[0].save(path)

    def __enter__(self) -> "Patch":
        model = self.model
        eng, ad = model.engine, model.adapter
        claim = eng.claimed()
        claim.__enter__()
        handles, owner = [], threading.get_ident()
        saved = (eng.roles, eng.offset, dict(eng.sinks))
        try:
            handles.append(ad.lm.register_forward_pre_hook(_track_offset(eng, self.compiled), with_kwargs=True))
            eng.tracking_offset += 1
            handles.append(ad.lm.register_forward_hook(_check_finite, with_kwargs=True))
            for c in self.compiled:
                if c.spec.sink is not None:
                    handles += _sink_hooks(model, c.spec.sink)
                handles += c.resid_hooks(owner)
            fn_hook = _FnHook()
            for name, fn in self.hooks.items():
                from .trace import split_site
                l, k = split_site(name)
                if k in ("attn.z", "attn.logits", "attn.pattern"):
                    fn_hook.fns[(l, k)] = fn
                else:
                    handles.append(_site_hook(model, l, k, fn, owner))
            if self.roles is not None:
                eng.roles = self.roles
            using = eng.using(*self.compiled, *([fn_hook] if fn_hook.fns else []))
            using.__enter__()
        except BaseException:
            self._restore(handles, saved, None, claim)
            raise
        self._exit.append((handles, saved, using, claim))
        return self

    def __exit__(self, *exc) -> None:
        handles, saved, using, claim = self._exit.pop()
        self._restore(handles, saved, using, claim, exc)

    def _restore(self, handles, saved, using, claim, exc=(None, None, None)) -> None:
        eng = self.model.engine
        try:
            if using is not None:
                using.__exit__(*exc)
        finally:
            for h in handles:
                h.remove()
            if handles:
                eng.tracking_offset -= 1
            eng.roles, eng.offset = saved[0], saved[1]
            eng.sinks.clear()
            eng.sinks.update(saved[2])
            claim.__exit__(*exc)


def patch(model, *specs: Spec, hooks: dict[str, Callable] | None = None, roles: list[Roles] | None = None) -> Patch:
    """Apply specs (in order) and Python ``hooks`` ({site name: fn(tensor) -> tensor or None}, site names as in
    :func:`interp.capture`) inside the ``with`` block; the model is restored on exit, even on error."""
    return Patch(model, specs, hooks, roles)


def cache_offset(args: tuple, kwargs: dict) -> int:
    """Tokens already in the KV cache at a forward of the language model: from the cache object, whatever
    transformers names the argument (``past_key_values``, ``cache``), else ``cache_position``, else 0."""
    from transformers.cache_utils import Cache
    for v in list(kwargs.values()) + list(args):
        if isinstance(v, Cache):
            return int(v.get_seq_length())
    cp = kwargs.get("cache_position")
    if isinstance(cp, torch.Tensor) and cp.numel():
        return int(cp.reshape(-1)[0])
    legacy = kwargs.get("past_key_values")
    if isinstance(legacy, (tuple, list)) and legacy and isinstance(legacy[0], (tuple, list)) and legacy[0]:
        return int(legacy[0][0].shape[-2])
    return 0


def _track_offset(eng, compiled=()):
    def fn(mod, args, kwargs):
        eng.check_thread()
        for c in compiled:
            c.bias_cache.clear()
        eng.offset = cache_offset(args, kwargs)
    return fn


def _check_finite(mod, args, kwargs, out) -> None:
    """An edit must never turn the hidden states NaN/inf silently (the spec's ranges keep them finite; this
    catches what the ranges cannot, e.g. a huge factor on an already large activation)."""
    h = out[0] if isinstance(out, tuple) else getattr(out, "last_hidden_state", None)
    if isinstance(h, torch.Tensor) and h.is_floating_point() and not bool(torch.isfinite(h).all()):
        raise InterpError("under this patch the model's hidden states became NaN/inf: the edits' values overflow "
                          f"{h.dtype} on this input; use smaller factors, scales or tensors")


def _sink_hooks(model, sink: dict) -> list:
    """Find sink tokens per layer: φ(x_j) = max_{c∈dims} |x_j,c| / rms(x_j) > τ (METHODS §1d); with
    ``skip_first`` position 0 is never one (ACT leaves the initial sink alone)."""
    eng, dims, tau = model.engine, list(sink["dims"]), float(sink.get("tau", 20.0))
    skip_first = bool(sink.get("skip_first", False))

    def make(l):
        def fn(mod, args, kwargs):
            x = (args[0] if args else kwargs["hidden_states"]).detach().float()
            xn = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
            phi = xn[..., dims].abs().amax(-1)
            found = phi > tau
            if skip_first and eng.offset == 0:
                found[:, 0] = False
            prev = eng.sinks.get(l)
            if prev is not None and eng.offset > 0:
                found = torch.cat([prev[:, :eng.offset], found], 1)
            eng.sinks[l] = found
        return fn
    return [layer.register_forward_pre_hook(make(l), with_kwargs=True) for l, layer in enumerate(model.adapter.layers)]
