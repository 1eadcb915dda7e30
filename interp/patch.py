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
* ``attn.head_scale``     O'^{h} = α O^{h} (P4).   ``attn.head_ablate``  O'^{h} = 0 or mean_t O^{h}_t.
* ``resid.add``           h'_t = h_t + s·v (P5).   ``resid.suppress_dims`` h'_{t,c} = 0 | mean_c | clamp.
* ``patch``               x'_t = x^{src}_t at a site, from a saved Trace (activation patching).
* ``attn.amplify``        PAI: z'_{qk} = z_{qk} + α|z_{qk}| for image keys k, before the softmax (P1 on logits).
* ``attn.oeb``            Step-Saliency OEB (METHODS §4b): at a query row with p = softmax(z), segment S, bridge B,
  O the rest, τ_B = min(√(|B|/(|B|+|S|)), τ_max), τ_S = 1 − p(O) − τ_B; if p(B) < τ_B (and τ_S > 0):
  z'_k = z_k + log(τ_B/p(B)) on B, z_k + log(τ_S/p(S)) on S, O unchanged, so p'(B) = τ_B and p'(O) = p(O)
  (P1 on the logits, eager). Counts and masses use visible keys only; generated tokens belong to S.
* ``attn.smi``            Step-Saliency SMI: O'^{h}[t] = O^{h}[t] + s · mean_{j∈source} V^{h}[j] (P5 on z).

Edits at their identity parameters (factor 1 for ``attn.scale_weights`` and ``attn.head_scale``, α = 0 for
``attn.amplify``) are skipped, so a neutral spec leaves the logits bit-identical whichever attention path
(SDPA or eager) the engine takes. A row whose every visible key would be blocked keeps its original distribution (blocking is a
finite −1e9 bias, so such a row cannot become NaN).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch

from .engine import AttnCall
from .errors import InterpError
from .roles import Roles
from .spec import Spec

BLOCK = -1e9  # logit bias that removes a key (exp underflows to exactly 0 in fp32)


def _kind(e: dict) -> str:
    op = e["op"]
    if op == "attn.scale_weights":
        return "bias" if e.get("renormalize", True) and "redistribute_to" not in e else "weights"
    if op in ("attn.add_logit_bias", "attn.knockout"):
        return "bias"
    if op == "attn.replace_pattern":
        return "bias" if e["mode"] == "local_window" else "weights"
    if op in ("attn.oeb", "attn.amplify"):
        return "logits"
    if op in ("attn.head_scale", "attn.head_ablate", "attn.smi") or (op == "patch" and e["site"] == "attn.z"):
        return "z"
    return "resid"


def _neutral(e: dict) -> bool:
    """Edits that are the identity at their parameters (METHODS §8 g1): ZeroTuning/ACT/VAR with γ = β = p = 1,
    PAI with α = 0, VHR with α = 1."""
    op = e["op"]
    return (op in ("attn.scale_weights", "attn.head_scale") and float(e["factor"]) == 1.0) or \
        (op == "attn.amplify" and float(e["alpha"]) == 0.0)


class _SpecHook:
    """A compiled Spec: attention edits by layer, plus residual edits as forward hooks."""

    def __init__(self, model, spec: Spec):
        self.model, self.spec = model, spec
        self.engine = model.engine
        n_layers, n_heads = model.n_layers, model.n_heads
        self.by_layer: dict[int, list[tuple[dict, str, int]]] = {}
        for e in spec.edits:
            if _neutral(e):  # an identity edit is not run: the model computes exactly what it computed before
                continue
            layers = list(range(n_layers)) if e["layers"] == "all" else e["layers"]
            for j, l in enumerate(layers):
                self.by_layer.setdefault(l, []).append((e, _kind(e), j))
        self.n_heads = n_heads
        self.bias_cache: dict[tuple, torch.Tensor] = {}  # cleared at every forward (see patch())
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
        """bool [b, length] for a token selector at this call."""
        out = torch.zeros(b, length, dtype=torch.bool)
        if sel == "sink" or (isinstance(sel, list) and "sink" in sel):
            sinks = self.engine.sinks.get(layer)
            if sinks is None:
                raise InterpError("the 'sink' selector needs spec.sink = {'dims': [...], 'tau': ...}")
            out |= sinks[:, :length]
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
            key = (id(e), b, call.q_start, call.q_len, call.k_len, self.engine.step)
            bias = None if _uses_sink(e) else self.bias_cache.get(key)
            if bias is None:
                bias = self._edit_bias(e, b, call, layer)
                if not _uses_sink(e):
                    self.bias_cache[key] = bias
            total = bias if total is None else total + bias
        return None if total is None else total.to(q.dtype)

    def _edit_bias(self, e, b: int, call: AttnCall, layer: int) -> torch.Tensor:
        """[b, 1 | h, q, k] additive logit bias of one edit (one head axis when it applies to every head)."""
        qsel = self._select(e.get("queries", "all"), b, call.k_len, layer)[:, call.q_start:call.q_start + call.q_len]
        op = e["op"]
        qpos = call.q_positions[:, None].float()
        kpos = torch.arange(call.k_len)[None, :].float()
        if op == "attn.add_logit_bias" and "distance" in e:
            d = e["distance"]
            dist = (qpos - kpos).abs() / float(d.get("d0", 1.0))
            g = {"log1p": torch.log1p(dist), "linear": dist, "constant": torch.ones_like(dist)}[d["fn"]]
            val = float(d.get("scale", 1.0)) * g  # [q, k]
            ksel = self._select(e.get("keys", "all"), b, call.k_len, layer)
            edge = qsel[:, :, None] & ksel[:, None, :]
            bias = torch.where(edge, val[None], 0.0)
        elif op == "attn.add_logit_bias" and "tensor" in e:
            t = self.spec.tensors[e["tensor"]].float()
            t = t[..., call.q_start:call.q_start + call.q_len, :call.k_len]
            bias = (t if t.dim() == 3 else t[None]).expand(self.n_heads, -1, -1)[None] * qsel[:, None, :, None]
            bias = bias.expand(b, -1, -1, -1)
        elif op == "attn.replace_pattern":  # local window
            w = int(e["window"])
            far = kpos <= qpos - w
            if e.get("keep_sink", True):
                far[:, 0] = False
            bias = torch.where(qsel[:, :, None] & far[None], BLOCK, 0.0)
        else:
            ksel = self._select(e["keys"] if "keys" in e else "all", b, call.k_len, layer)
            edge = qsel[:, :, None] & ksel[:, None, :]
            if op == "attn.knockout":
                val = BLOCK
            elif op == "attn.scale_weights":
                val = math.log(e["factor"]) if e["factor"] > 0 else BLOCK
            else:
                val = float(e["bias"])
            bias = torch.where(edge, val, 0.0)
        if bias.dim() == 3:
            bias = bias[:, None]
        hm = self.head_masks[id(e)]
        if not hm.all():
            bias = bias * hm[None, :, None, None]
        return bias

    def on_logits(self, layer, logits, call: AttnCall):
        for e, kind, _ in self.by_layer.get(layer, ()):
            if kind == "logits" and self._active(e):
                logits = self._oeb(e, logits, call, layer) if e["op"] == "attn.oeb" else self._amplify(e, logits, call, layer)
        return logits

    def _amplify(self, e, z, call: AttnCall, layer):
        """PAI (Liu et al., ECCV'24): z'_{qk} = z_{qk} + α·|z_{qk}| for k ∈ keys, on the selected query rows."""
        b = z.shape[0]
        qsel = self._select(e.get("queries", "last"), b, call.k_len, layer)[:, call.q_start:call.q_start + call.q_len]
        ksel = self._select(e["keys"], b, call.k_len, layer)
        where = qsel[:, None, :, None] & ksel[:, None, None, :] & self.head_masks[id(e)][None, :, None, None]
        return torch.where(where, z + float(e["alpha"]) * z.abs(), z)

    def _oeb(self, e, z, call: AttnCall, layer):
        """attn.oeb: the KL projection of each selected row onto p(B) = τ_B with p(O) fixed (METHODS §4b)."""
        b, n = z.shape[0], self.engine.batch_len
        qsel = self._select(e.get("queries", "last"), b, call.k_len, layer)[:, call.q_start:call.q_start + call.q_len]
        bsel = self._select(e["bridge"], b, call.k_len, layer)
        ssel = self._select(e["segment"], b, call.k_len, layer)
        if 0 < n < call.k_len:  # tokens generated after the prompt belong to the current segment
            ssel[:, n:] = True
        vis = z > BLOCK / 2  # masked or knocked-out keys are not counted
        B = bsel[:, None, None, :] & vis
        S = ssel[:, None, None, :] & ~bsel[:, None, None, :] & vis
        p = torch.softmax(z.float(), -1)
        pB, pS = (p * B).sum(-1, keepdim=True), (p * S).sum(-1, keepdim=True)
        nB, nS = B.sum(-1, keepdim=True).float(), S.sum(-1, keepdim=True).float()
        tau_b = torch.sqrt(nB / (nB + nS).clamp_min(1)).clamp(max=float(e.get("tau_max", 0.15)))
        tau_s = pB + pS - tau_b  # = 1 − p(O) − τ_B
        rows = qsel[:, None, :, None] & self.head_masks[id(e)][None, :, None, None]
        active = rows & (pB < tau_b) & (pB > 0) & (pS > 0) & (tau_s > 0)
        lam_b = torch.log(tau_b / pB.clamp_min(1e-38))
        lam_s = torch.log(tau_s.clamp_min(1e-38) / pS.clamp_min(1e-38))
        shift = torch.where(B, lam_b, 0.0) + torch.where(S, lam_s, 0.0)
        return torch.where(active, z + shift.to(z.dtype), z)

    def on_weights(self, layer, w, call: AttnCall):
        b = w.shape[0]
        for e, kind, _ in self.by_layer.get(layer, ()):
            if kind != "weights" or not self._active(e):
                continue
            qsel = self._select(e.get("queries", "all"), b, call.k_len, layer)[:, call.q_start:call.q_start + call.q_len]
            hm = self.head_masks[id(e)]
            rows = qsel[:, None, :, None] & hm[None, :, None, None]  # [b, h, q, 1]
            if e["op"] == "attn.scale_weights":
                # w'_qk = w_qk · m_qk with m = γ on K, (1 + gain_q) on R (ACT/VAR: the removed mass goes to R in
                # proportion to its weights), 1 elsewhere; row sums come from GEMVs, not [b, h, q, k] temporaries
                ksel = self._select(e["keys"], b, call.k_len, layer)[:, None, None, :]  # [b, 1, 1, k]
                kidx = ksel[0, 0, 0].nonzero()[:, 0]
                if e.get("redistribute_to") == "all" and len(kidx) <= 64 and (ksel == ksel[:1]).all():
                    w = _scale_few_keys_redistribute_all(w, kidx, float(e["factor"]), rows)
                    continue
                colk = torch.where(ksel, float(e["factor"]), 1.0).to(w.dtype)
                if "redistribute_to" in e:
                    rsel = self._select(e["redistribute_to"], b, call.k_len, layer)[:, None, None, :] & ~ksel
                    rf = rsel.to(w.dtype)
                    removed = torch.matmul(w, (1 - colk).transpose(-1, -2))  # [b, h, q, 1]
                    mass_r = torch.matmul(w, rf.transpose(-1, -2))
                    rows = rows & (mass_r > 0)  # nothing to receive the mass: the row is kept
                    gain = torch.where(rows, removed / mass_r.clamp_min(1e-30), 0.0)
                    scaled = w * torch.addcmul(colk, rf, gain)
                else:
                    scaled = w * colk
                w = scaled if rows.all() else torch.where(rows, scaled, w)
            else:  # copy_head
                src = w[:, int(e["source_head"])][:, None].expand_as(w)
                w = torch.where(rows, src, w)
        return w

    def on_z(self, layer, z, call: AttnCall, v, weights):  # z [b, q, h, d]
        b = z.shape[0]
        for e, kind, j in self.by_layer.get(layer, ()):
            if kind != "z" or not self._active(e):
                continue
            key = "positions" if e["op"] == "patch" else "queries"
            default = "last" if e["op"] == "attn.smi" else "all"
            qsel = self._select(e.get(key, default), b, call.k_len, layer)[:, call.q_start:call.q_start + call.q_len]
            where = qsel[:, :, None, None] & self.head_masks[id(e)][None, None, :, None]
            if e["op"] == "attn.head_scale":
                z = torch.where(where, z * float(e["factor"]), z)
            elif e["op"] == "attn.head_ablate":
                if e.get("mode", "zero") == "zero":
                    repl = torch.zeros_like(z)
                elif "tensor" in e:
                    t = self.spec.tensors[e["tensor"]].to(z.dtype)
                    repl = (t[j] if t.dim() == 3 else t)[None, None].expand_as(z)
                else:  # mean over the real tokens of this run
                    valid = call.query_valid
                    wts = (valid.to(z.dtype) if valid is not None else torch.ones(z.shape[:2], dtype=z.dtype))
                    repl = ((z * wts[..., None, None]).sum(1, keepdim=True) / wts.sum(1).clamp_min(1)[:, None, None, None])
                    repl = repl.expand_as(z)
                z = torch.where(where, repl, z)
            elif e["op"] == "attn.smi":  # z'[t] = z[t] + s · mean_{j∈source} V[j], v [b, h, k, d]
                src = self._select(e["source"], b, call.k_len, layer).to(v.dtype)
                mean_v = torch.einsum("bk,bhkd->bhd", src, v) / src.sum(1).clamp_min(1)[:, None, None]
                z = torch.where(where, z + float(e.get("scale", 0.06)) * mean_v[:, None].to(z.dtype), z)
            else:  # patch attn.z from a source run [b|1, T, h, d]
                src = self.spec.tensors[e["tensor"]].to(z.dtype)
                src = (src[j] if src.dim() == 5 else src)[:, call.q_start:call.q_start + call.q_len]
                z = torch.where(where, src.expand_as(z), z)
        return z

    # residual edits ---------------------------------------------------------------------
    def resid_hooks(self) -> list:
        ad, handles = self.model.adapter, []
        for l, edits in self.by_layer.items():
            for e, kind, j in edits:
                if kind != "resid":
                    continue
                site = e.get("site", "resid_post")
                if site == "resid_pre":
                    handles.append(ad.layers[l].register_forward_pre_hook(self._pre(e, j, l), with_kwargs=True))
                else:
                    module = {"resid_post": ad.layers[l], "attn.out": ad.attn[l], "mlp.out": ad.mlp[l]}[site]
                    handles.append(module.register_forward_hook(self._post(e, j, l), with_kwargs=True))
        return handles

    def _edit_resid(self, e, j, layer, h):
        if not self._active(e):
            return h
        b, T, d = h.shape
        off = self.engine.offset
        sel = self._select(e.get("positions", "all"), b, off + T, layer)[:, off:off + T]
        op = e["op"]
        if op == "resid.add":
            t = self.spec.tensors[e["tensor"]].to(h.dtype)
            vec = t[j] if t.dim() == 2 else t
            return h + float(e.get("scale", 1.0)) * vec * sel[..., None].to(h.dtype)
        if op == "resid.suppress_dims":
            dims = e["dims"]
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
                t = self.spec.tensors[e["tensor"]].to(h.dtype)
                vals[dims] = t[j] if t.dim() == 2 else t
            elif "value" in e:
                vals[dims] = float(e["value"])
            else:
                raise InterpError("resid.suppress_dims mode 'mean' needs 'tensor' (per-dim means) or 'value'")
            return torch.where(where, vals.expand_as(h), h)
        # patch: a source activation [b|1, T, d] (or [n_layers_in_edit, b, T, d])
        src = self.spec.tensors[e["tensor"]].to(h.dtype)
        src = src[j] if src.dim() == 4 else src
        src = src[:, off:off + T]
        if src.shape[1] != T:
            raise InterpError(f"patch source has {src.shape[1]} positions here but the run has {T}: "
                              "patch runs of the same length")
        return torch.where(sel[..., None], src.expand_as(h), h)

    def _pre(self, e, j, layer):
        def fn(mod, args, kwargs):
            if args:
                return (self._edit_resid(e, j, layer, args[0]),) + tuple(args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = self._edit_resid(e, j, layer, kwargs["hidden_states"])
            return args, kwargs
        return fn

    def _post(self, e, j, layer):
        def fn(mod, args, kwargs, out):
            if isinstance(out, tuple):
                return (self._edit_resid(e, j, layer, out[0]),) + tuple(out[1:])
            return self._edit_resid(e, j, layer, out)
        return fn


@contextlib.contextmanager
def patch(model, *specs: Spec, roles: list[Roles] | None = None) -> Iterator[None]:
    """Apply specs (in order) inside the ``with`` block; the model is restored on exit, even on error."""
    if not specs:
        raise InterpError("interp.patch needs at least one Spec")
    compiled = []
    for s in specs:
        if isinstance(s, (str, bytes)) or not isinstance(s, Spec):
            raise InterpError(f"interp.patch takes Spec objects (Spec.load(path)), got {type(s).__name__}")
        s.validate()
        s.check(model)
        compiled.append(_SpecHook(model, s))
    eng, ad = model.engine, model.adapter
    handles = []
    saved = (eng.roles, eng.offset, dict(eng.sinks))
    try:
        handles.append(ad.lm.register_forward_pre_hook(_track_offset(eng, compiled), with_kwargs=True))
        for c in compiled:
            if c.spec.sink is not None:
                handles += _sink_hooks(model, c.spec.sink)
            handles += c.resid_hooks()
        if roles is not None:
            eng.roles = roles
        with eng.using(*compiled):
            yield
    finally:
        for h in handles:
            h.remove()
        eng.roles, eng.offset = saved[0], saved[1]
        eng.sinks.clear()
        eng.sinks.update(saved[2])


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


def _uses_sink(e: dict) -> bool:
    sels = [e.get(k) for k in ("queries", "keys", "redistribute_to")]
    return any(v == "sink" or (isinstance(v, list) and "sink" in v) for v in sels)


def _track_offset(eng, compiled=()):
    def fn(mod, args, kwargs):
        for c in compiled:
            c.bias_cache.clear()
        cache = kwargs.get("past_key_values")
        try:
            eng.offset = int(cache.get_seq_length()) if cache is not None else 0
        except Exception:
            eng.offset = 0
    return fn


def _sink_hooks(model, sink: dict) -> list:
    """Find sink tokens per layer: φ(x_j) = max_{c∈dims} |x_j,c| / rms(x_j) > τ (METHODS §1d)."""
    eng, dims, tau = model.engine, list(sink["dims"]), float(sink.get("tau", 20.0))

    def make(l):
        def fn(mod, args, kwargs):
            x = (args[0] if args else kwargs["hidden_states"]).detach().float()
            xn = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
            phi = xn[..., dims].abs().amax(-1)
            found = phi > tau
            prev = eng.sinks.get(l)
            if prev is not None and eng.offset > 0:
                found = torch.cat([prev[:, :eng.offset], found], 1)
            eng.sinks[l] = found
        return fn
    return [layer.register_forward_pre_hook(make(l), with_kwargs=True) for l, layer in enumerate(model.adapter.layers)]
