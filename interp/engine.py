"""The local execution engine: one attention function and forward hooks, shared by capture and patch.

transformers routes attention through ``ALL_ATTENTION_FUNCTIONS``; interp registers one function,
``"interp"``, with SDPA's mask builder (None for a plain causal call, which the function then treats as
causal itself; without a mask function the model would silently run with no causal mask). For every
attention call it asks the active hooks what they need at that layer:

* nothing, or only an additive logit bias / head-output edits  -> ``scaled_dot_product_attention``
  (the bias rides in the float mask), so an idle engine costs nothing;
* logits or weights, read only (capture of patterns, reducers; no autograd) -> the output still
  comes from SDPA, so such a capture never changes what the model computes (but see the next case),
  and the weights the hooks
  read come from the eager formula, in query chunks when the [b, h, q, k] block would be large;
  when every hook takes rows cut at the last visible key (capture does, unless it keeps logits), a
  causal model's chunks stop there, so the masked upper triangle is never computed; for a plain causal
  call on the CPU the engine calls SDPA's flash kernel itself, which gives the same output and each
  row's log-sum-exp (``AttnCall.lse``: entropy then needs no max pass);
* with ``FUSED_READ_ONLY`` set (opt-in), weights read only and kept by no hook (reducers alone) on a plain
  causal fp32 call on the CPU -> one pass: each query chunk's weights, computed once in cache-sized blocks, give the hooks their rows and
  the output (A V), instead of a flash output plus recomputed weights; the output then equals SDPA's up
  to float rounding (≤ ~1e-6 relative), not bit for bit;
* logits or weights edited (weight edits), or gradients through the pattern -> the eager formula
  gives the output too, in the same chunks, so memory stays linear in length.

Hooks never see the model: they receive tensors and an :class:`AttnCall` describing the call. The
[b, h, q, k] logits and weights live in two buffers the engine reuses from layer to layer (a fresh
block per layer costs more in page faults than the softmax itself), unless a hook keeps them
(``keeps_tensors``).
Leaving any context (normally or by exception) removes its hooks, so the model computes exactly
what it computed before.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass
from typing import Iterator, Protocol

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .errors import InterpError

ATTN_NAME = "interp"
CHUNK_ELEMENTS = 2**24  # largest [b, h, q_chunk, k] block materialised at once (64 MiB in fp32)
FUSED_ELEMENTS = 2**21  # largest [b, h, q_chunk, k] block of the fused read-only path (8 MiB in fp32: stays in cache)
FUSED_ROWS = 256  # and its most query rows (the first chunk computes its upper triangle for nothing)
# Opt-in: reducer-only captures of a plain causal fp32 CPU call take their output from their own one-pass chunks.
# Measured with 2 threads at 4,096 tokens on SmolLM2: 1.74x a plain forward against 1.90x for the default path
# (flash output + recomputed weights), but the output then equals SDPA's only up to rounding (~1e-6), so by
# default a capture keeps what the model computes bit for bit.
FUSED_READ_ONLY = False
CAUSAL_CHUNKS = 8  # query chunks of a read-only causal call: each stops at its last visible key
BLOCK = -1e9  # logit bias that removes a key (exp underflows to exactly 0 in fp32)


@dataclass
class AttnCall:
    """What a hook knows about one attention call."""

    layer: int
    q_start: int  # absolute position of the first query in this chunk
    q_len: int  # queries in this chunk
    k_len: int  # keys (cache included); logits/weights handed to hooks may stop earlier (see AttentionHook)
    n_heads: int
    mask: torch.Tensor | None  # additive float mask for this chunk, [b, 1, q, k], or None
    query_valid: torch.Tensor | None  # bool [b, q] for this chunk (False at padding), or None
    logits: torch.Tensor | None = None  # [b, h, q, k] logits the weights are the softmax of (eager path, unedited weights)
    lse: torch.Tensor | None = None  # [b, h, q] log Σ_k exp(logits), from the SDPA kernel, when it gave it
    k_start: int = 0  # absolute position of key 0 (> 0 when a sliding-window cache dropped earlier keys)

    @functools.cached_property
    def visible(self) -> torch.Tensor | None:
        """bool [b, 1, q, k]: the keys each query of the chunk can see (None: every key), computed once
        for all the hooks of the call."""
        return None if self.mask is None else self.mask > torch.finfo(self.mask.dtype).min / 2

    @property
    def q_positions(self) -> torch.Tensor:
        return torch.arange(self.q_start, self.q_start + self.q_len)

    @property
    def k_positions(self) -> torch.Tensor:
        return torch.arange(self.k_start, self.k_start + self.k_len)


class AttentionHook(Protocol):
    """What capture reducers and patch ops implement. Each ``on_*`` returns a replacement or None.
    A hook with ``read_only = True`` promises never to return a replacement from ``on_logits`` or
    ``on_weights``. ``keeps_tensors(layer)`` names what it keeps a reference to after the call returns,
    a subset of {"logits", "weights"} (both, when the method is absent); the engine reuses the memory of
    what no hook keeps. On the read-only path of a causal model, if every hook has
    ``accepts_visible_prefix(layer)`` true, a chunk's logits/weights stop at its last visible key
    (``weights.shape[-1]`` ≤ ``k_len``; every later key is masked for every query of the chunk)."""

    read_only: bool

    def keeps_tensors(self, layer: int) -> set[str]: ...
    def accepts_visible_prefix(self, layer: int) -> bool: ...

    def needs(self, layer: int) -> set[str]:
        """Subset of {"qk", "bias", "logits", "weights", "z"} this hook touches at ``layer``."""

    def on_qk(self, layer: int, q: torch.Tensor, k: torch.Tensor, call: AttnCall) -> None:
        """Read the call's queries q [b, q, h, d] and keys k [b, k, kv, d] (post-RoPE, what enters the softmax;
        keys per key/value head, query head h reading key head h // (h_total / kv)). The attention is computed
        from views of exactly these tensors, so gradients reach them; a hook must not edit them."""
    def logit_bias(self, layer: int, call: AttnCall, q, k) -> torch.Tensor | None: ...
    def on_logits(self, layer: int, logits: torch.Tensor, call: AttnCall) -> torch.Tensor | None: ...
    def on_weights(self, layer: int, weights: torch.Tensor, call: AttnCall) -> torch.Tensor | None: ...
    def on_z(self, layer: int, z: torch.Tensor, call: AttnCall, v: torch.Tensor, weights) -> torch.Tensor | None: ...


class Engine:
    """Per-model hook registry. Attention modules point at it through ``_interp_engine``.

    One thread at a time: while a thread runs inputs (:meth:`running`) or holds hooks (:meth:`using`), another
    thread that tries either, or runs a forward, gets an :class:`InterpError` (its rows would otherwise mix with
    the first thread's, or run under its edits)."""

    def __init__(self, attn_modules: list[nn.Module], causal: bool = True):
        self.causal = causal  # from the model config (a module's own is_causal flag can be stale)
        self.hooks: list[AttentionHook] = []
        self.query_valid: torch.Tensor | None = None  # bool [b, T] of the running inputs (False at padding)
        self.roles = None  # list[Roles] of the running inputs, for role selectors
        self.batch_len = 0  # padded length of the running inputs (tokens beyond it are generated)
        self.offset = 0  # tokens already in the KV cache (generation)
        self.tracking_offset = 0  # > 0 while a patch reads ``offset`` from the cache at every forward
        self.step: int | None = None  # denoising step (diffusion LMs), for step-scoped edits
        self.sinks: dict[int, torch.Tensor] = {}  # layer -> bool [b, T] sink tokens found at run time
        self._scratch: dict[str, torch.Tensor] = {}  # reused [b, h, q, k] buffers, freed with the last hook
        self._lock = threading.Lock()
        self._owner: int | None = None  # the thread running inputs or holding hooks
        self._depth = 0
        for i, m in enumerate(attn_modules):
            m._interp_engine = self
            m._interp_layer = i

    def needs(self, layer: int) -> set[str]:
        out: set[str] = set()
        for h in self.hooks:
            out |= h.needs(layer)
        return out

    def check_thread(self) -> None:
        """Refuse use from a thread other than the one running inputs or holding hooks."""
        owner = self._owner
        if owner is not None and owner != threading.get_ident():
            raise InterpError("this model is in use by another thread (a capture, patch or generation is running "
                              "there): an interp model serves one thread at a time; load one model per thread or "
                              "serialise the calls with a lock")

    @contextlib.contextmanager
    def claimed(self) -> Iterator[None]:
        """Hold the engine for this thread (re-entrant) while the block runs."""
        me = threading.get_ident()
        with self._lock:
            self.check_thread()
            self._owner = me
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    self._owner = None

    @contextlib.contextmanager
    def running(self, batch) -> Iterator[None]:
        """Make the roles and padding of ``batch`` known to hooks while it runs."""
        with self.claimed():
            saved = (self.query_valid, self.roles, self.batch_len)
            self.query_valid, self.roles = batch.attention_mask.bool(), batch.roles
            self.batch_len = batch.input_ids.shape[1]
            try:
                yield
            finally:
                self.query_valid, self.roles, self.batch_len = saved

    @contextlib.contextmanager
    def using(self, *hooks: AttentionHook) -> Iterator[None]:
        """Add ``hooks`` while the block runs; on exit exactly these are removed (by identity), so contexts
        may close in any order."""
        with self.claimed():
            self.hooks.extend(hooks)
            try:
                yield
            finally:
                for hk in hooks:
                    for i in range(len(self.hooks) - 1, -1, -1):
                        if self.hooks[i] is hk:
                            del self.hooks[i]
                            break
                if not self.hooks:
                    self._scratch.clear()

    def scratch(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A reusable buffer of ``shape`` (dtype and device of ``like``), grown when too small."""
        n = 1
        for d in shape:
            n *= d
        buf = self._scratch.get(name)
        if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
            self._scratch[name] = buf = torch.empty(n, dtype=like.dtype, device=like.device)
        return buf[:n].view(shape)


def interp_attention(module: nn.Module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function. query [b,h,q,d]; key/value [b,kv,k,d]; returns ([b,q,h,d], weights)."""
    engine: Engine | None = getattr(module, "_interp_engine", None)
    layer = getattr(module, "_interp_layer", None)
    if engine is not None:
        engine.check_thread()
    needs = engine.needs(layer) if engine is not None else set()
    softcap = kwargs.get("softcap")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    b, h, q_len, _ = query.shape
    k_len = key.shape[2]
    causal = engine.causal if engine is not None else getattr(module, "is_causal", True)
    q_offset = k_len - q_len if causal else 0  # of the queries among these keys (for the mask)
    # absolute positions: with a KV cache the patch layer tracks the tokens already cached (``engine.offset``);
    # a sliding-window cache hands over only the last keys, so key 0 may sit after position 0
    q_abs = q_offset
    if engine is not None and causal and engine.tracking_offset:
        if q_offset > engine.offset:
            raise InterpError(f"attention at layer {layer} sees {q_offset} cached keys but the patch layer read "
                              f"{engine.offset} from the model's cache: transformers changed how the cache is "
                              "passed, so position-bound edits would hit the wrong tokens")
        q_abs = engine.offset
    k_start = q_abs - q_offset

    def float_mask() -> torch.Tensor | None:
        """The additive float mask [b, 1, q, k]; built here when HF left it out (None: plain causal or full)."""
        m = attention_mask
        if m is not None and m.dtype == torch.bool:
            m = torch.where(m, 0.0, torch.finfo(query.dtype).min).to(query.dtype)
        if m is None and causal and q_len > 1:
            m = _default_mask(causal, q_len, k_len, q_offset, query)
        return m

    def call_for(q0: int, q1: int, full_mask: torch.Tensor | None, k_stop: int | None = None) -> AttnCall:
        mask = full_mask[:, :, q0:q1, :k_stop] if full_mask is not None else None
        qv = engine.query_valid if engine is not None else None
        if qv is not None:
            start = q_abs + q0
            qv = qv[:, start:start + (q1 - q0)] if qv.shape[1] >= start + (q1 - q0) else None
        return AttnCall(layer, q_abs + q0, q1 - q0, k_len, h, mask, qv, k_start=k_start)

    hooks = engine.hooks if engine is not None else []
    if "qk" in needs:  # from here on attention reads views of the tensors the hooks saw (gradients reach them)
        query, key = _read_qk(hooks, layer, query, key, call_for(0, q_len, None))

    # a plain causal self-attention call on the CPU in fp32 (no padding, cache, bias, dropout or extra terms): the
    # engine may call SDPA's flash kernel itself, or compute the output in its own chunks (``fused``)
    plain_causal_cpu = (attention_mask is None and causal and q_len == k_len and q_len > 1 and "bias" not in needs
                        and query.device.type == "cpu" and query.dtype == torch.float32 and engine is not None
                        and key.shape[-1] == value.shape[-1] and not (dropout and module.training)
                        and kwargs.get("position_bias") is None and kwargs.get("s_aux") is None
                        and kwargs.get("sinks") is None)

    def sdpa(want_lse: bool = False):
        """SDPA with the hooks' logit biases in the float mask, then the hooks' head-output edits. Returns
        (output, each row's log-sum-exp [b, h, q] or None). ``want_lse``: for a plain causal call on the CPU,
        call the flash kernel HF's SDPA call runs there: the same output, and the log-sum-exp with it."""
        if want_lse and plain_causal_cpu:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query, key, value, 0.0, True, scale=scaling)
            out = out.transpose(1, 2).contiguous()
        else:
            mask, lse = attention_mask, None  # None / bool / float, as HF built it: SDPA takes each
            if "bias" in needs:
                fm = float_mask()
                bias = _sum_bias(hooks, layer, call_for(0, q_len, fm), query, key)
                if bias is not None:
                    mask = (fm if fm is not None else torch.zeros(1, 1, q_len, k_len, dtype=query.dtype)) + bias
            kw = {k: v for k, v in kwargs.items() if k != "output_attentions"}
            if engine is not None and not causal:
                kw["is_causal"] = False
            out, _ = sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kw)
        if "z" in needs:
            out = _apply_z(hooks, layer, out, call_for(0, q_len, None), repeat_kv(value, h // value.shape[1]), None)
        return out, lse

    def eager(with_output: bool, lse: torch.Tensor | None = None):
        """The eager formula in query chunks (memory linear in length), calling the hooks on logits,
        weights and, ``with_output``, head outputs. Returns (output or None, weights if asked for).
        ``lse`` [b, h, q]: the rows' log-sum-exp from the SDPA kernel, handed to the hooks with each chunk."""
        k = repeat_kv(key, h // key.shape[1])
        v = repeat_kv(value, h // value.shape[1]) if with_output else None  # a read-only call never uses it
        chunk = max(1, CHUNK_ELEMENTS // max(1, b * h * k_len))
        outs, all_weights = [], []
        fm = float_mask()
        # reuse the engine's buffers for what no hook keeps (never under autograd)
        hook_needs = [(hk, hk.needs(layer)) for hk in hooks]
        on_logits = [hk for hk, n in hook_needs if "logits" in n]
        on_weights = [hk for hk, n in hook_needs if "weights" in n]
        readers = [hk for hk, n in hook_needs if n & {"logits", "weights"}]
        kept = set().union(*(_keeps(hk, layer) for hk in readers))
        reuse = engine is not None and query.dtype == torch.float32 and not torch.is_grad_enabled()
        reuse_logits = reuse and "logits" not in kept
        reuse_weights = reuse and "weights" not in kept and not keep_weights
        # read only, causal: each chunk stops at its last visible key (the upper triangle is never computed)
        prefix = (reuse and not with_output and causal and q_len > 1 and softcap is None and not keep_weights
                  and all(getattr(hk, "accepts_visible_prefix", lambda _: False)(layer) for hk in readers))
        if prefix:
            chunk = min(chunk, max(32, -(-q_len // CAUSAL_CHUNKS)))
        for name, used in (("logits", reuse_logits), ("weights", reuse_weights)):
            if used:  # the widest chunk's size at once: growing chunk by chunk would fragment the heap
                engine.scratch(name, (b * h * min(chunk, q_len) * k_len,), query)
        q_flat = k_flat_t = None
        for q0 in range(0, q_len, chunk):
            q1 = min(q_len, q0 + chunk)
            kc = min(k_len, q_offset + q1) if prefix else k_len
            call = call_for(q0, q1, fm, kc if kc < k_len else None)
            qc = q1 - q0
            mask = call.mask
            if softcap is None and mask is not None and mask.shape[0] * mask.shape[1] in (1, b * h):
                # mask + scaling · Q Kᵀ in one GEMM per (batch, head): no [b, h, q, k] temporaries
                out_buf = engine.scratch("logits", (b * h, qc, kc), query) if reuse_logits else None
                if q_flat is None:  # [b·h, q, d] and [b·h, d, k] once per call; chunks are views of them
                    q_flat, k_flat_t = query.reshape(b * h, q_len, -1), k.reshape(b * h, k_len, -1).transpose(1, 2)
                m3 = mask[0] if mask.shape[0] * mask.shape[1] == 1 else mask.reshape(-1, qc, kc)  # [1|b·h, q, k]
                logits = torch.baddbmm(m3, q_flat[:, q0:q1], k_flat_t[:, :, :kc], alpha=scaling,
                                       out=out_buf).view(b, h, qc, kc)
            else:
                logits = torch.matmul(query[:, :, q0:q1], k[:, :, :kc].transpose(2, 3)) * scaling
                if softcap is not None:
                    logits = torch.tanh(logits / softcap) * softcap
                if mask is not None:
                    logits = logits + mask
            if "bias" in needs:
                bias = _sum_bias(hooks, layer, call, query[:, :, q0:q1], k)
                if bias is not None:
                    logits = logits + bias[..., :kc]
            for hk in on_logits:
                new = hk.on_logits(layer, logits, call)
                if new is not None:
                    logits = new
            # (a softmax, not exp(z − lse): ATen's exp leaves its vector path for masked or tiny entries)
            if reuse_weights and logits.dtype == torch.float32:
                weights = torch.ops.aten._softmax.out(logits, -1, False, out=engine.scratch("weights", logits.shape, logits))
            else:
                # at least fp32 (half models), and float64 kept as float64
                weights = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(query.dtype)
            call.logits = logits
            if lse is not None:
                call.lse = lse[:, :, q0:q1]
            for hk in on_weights:
                new = hk.on_weights(layer, weights, call)
                if new is not None:
                    weights, call.logits, call.lse = new, None, None
            if keep_weights:
                all_weights.append(weights)
            if not with_output:
                continue
            if dropout and module.training:
                weights = nn.functional.dropout(weights, p=dropout)
            out = torch.matmul(weights, v).transpose(1, 2)
            if "z" in needs:
                out = _apply_z(hooks, layer, out, call, v, weights)
            outs.append(out)
        weights = (all_weights[0] if len(all_weights) == 1 else torch.cat(all_weights, dim=2)) if keep_weights else None
        out = (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)).contiguous() if with_output else None
        return out, weights

    def fused() -> torch.Tensor:
        """Output and hook calls of a plain causal call from one pass over causal query chunks, for hooks that
        read the weights and keep nothing (reducers): per chunk Z = scaling · Q Kᵀ up to its last visible key
        (the query heads of a key/value head stacked into one GEMM), E = exp(Z) (no max shift: a chunk whose row
        sums leave [1e-30, finfo.max] is redone with the max-shifted softmax), log Z = log Σ_k E, A = E / Σ_k E,
        output A V. The same formula as eager attention (Vaswani et al. 2017), without the [b, h, q, k] block
        and without the second Q Kᵀ and exp a flash output plus recomputed weights cost; the output equals
        SDPA's up to float rounding (not bit for bit). Blocks of ≤ ``FUSED_ELEMENTS`` stay in cache."""
        kvh, d, dv = key.shape[1], query.shape[-1], value.shape[-1]
        G, bk = h // kvh, b * kvh
        qs = (query * scaling).reshape(b, kvh, G, q_len, d)
        kt = key.reshape(bk, k_len, d).transpose(1, 2)  # [b·kv, d, k]: a view when b = 1
        vv = value.reshape(bk, k_len, dv)
        fm = float_mask()  # the hooks' AttnCall.mask (visible keys); the chunks mask their own triangle
        # chunk rows: r · (q0 + r) · b · h ≤ FUSED_ELEMENTS (narrow early chunks take more rows, ≤ FUSED_ROWS), ≥ 16
        # (fewer where CHUNK_ELEMENTS asks for it)
        per = max(1, min(FUSED_ELEMENTS, CHUNK_ELEMENTS) // (b * h))
        least = max(1, min(16, CHUNK_ELEMENTS // max(1, b * h * k_len)))
        bounds, q0 = [], 0
        while q0 < q_len:
            r = int((-q0 + (q0 * q0 + 4 * per) ** 0.5) / 2)
            q1 = min(q_len, q0 + max(least, min(r, FUSED_ROWS)))
            bounds.append((q0, q1))
            q0 = q1
        size = max(b * h * (q1 - q0) * q1 for q0, q1 in bounds)
        z_buf, a_buf = engine.scratch("logits", (size,), query), engine.scratch("weights", (size,), query)
        keep, drop = _triangle(max(q1 - q0 for q0, q1 in bounds), query.dtype)
        out = query.new_empty(b, q_len, h, dv)
        on_logits = [hk for hk in hooks if "logits" in hk.needs(layer)]
        on_weights = [hk for hk in hooks if "weights" in hk.needs(layer)]
        for q0, q1 in bounds:
            r, kc = q1 - q0, q1
            z = torch.bmm(qs[:, :, :, q0:q1].reshape(bk, G * r, d), kt[:, :, :kc],
                          out=z_buf[:bk * G * r * kc].view(bk, G * r, kc))
            # exp before the mask (ATen's exp leaves its vector path for a block that holds masked entries); the
            # keys after each query are then zeroed in E (× 0; an inf there turns the row sum NaN: the softmax redoes
            # it) and set to finfo.min in Z (+ finfo.min rounds to it), broadcast ops being ~4x faster than masked_fill
            a = torch.exp(z, out=a_buf[:z.numel()].view(z.shape))
            a.view(b * h, r, kc)[:, :, q0:].mul_(keep[:r, :r])
            z.view(b * h, r, kc)[:, :, q0:].add_(drop[:r, :r])
            tot = a.sum(-1, keepdim=True)
            lo, hi = torch.aminmax(tot)
            if lo.item() >= 1e-30 and hi.item() <= torch.finfo(z.dtype).max:
                lse = tot.log()
                a.mul_(tot.reciprocal_())
            else:  # overflow or underflow of exp(Z): the max-shifted softmax
                torch.ops.aten._softmax.out(z, -1, False, out=a)
                lse = torch.logsumexp(z, -1, keepdim=True)
            o = torch.bmm(a, vv[:, :kc])
            out[:, q0:q1] = o.view(b, h, r, dv).transpose(1, 2)
            call = call_for(q0, q1, fm, kc if kc < k_len else None)
            logits, weights = z.view(b, h, r, kc), a.view(b, h, r, kc)
            for hk in on_logits:
                hk.on_logits(layer, logits, call)
            call.logits, call.lse = logits, lse.view(b, h, r)
            for hk in on_weights:
                hk.on_weights(layer, weights, call)
        return out

    keep_weights = kwargs.get("output_attentions", False)
    if not needs & {"logits", "weights"} and softcap is None:
        return sdpa()[0], None
    if softcap is None and not torch.is_grad_enabled() and all(
            getattr(hk, "read_only", False) for hk in hooks if hk.needs(layer) & {"logits", "weights"}):
        readers = [hk for hk in hooks if hk.needs(layer) & {"logits", "weights"}]
        if (FUSED_READ_ONLY and plain_causal_cpu and "z" not in needs and not keep_weights
                and not any(_keeps(hk, layer) for hk in readers)
                and all(getattr(hk, "accepts_visible_prefix", lambda _: False)(layer) for hk in readers)):
            # the hooks read the weights and keep nothing: one pass gives them and the output
            return fused(), None
        # The hooks only read logits/weights: the output comes from the same SDPA call as an idle engine
        # (so a capture never changes what the model computes); the weights, for the hooks, from the
        # eager formula. Under autograd the eager output is used, so gradients reach the weights.
        out, lse = sdpa(want_lse=True)  # the log-sum-exp spares entropy a max pass
        return out, eager(with_output=False, lse=lse)[1]
    return eager(with_output=True)


def _default_mask(causal: bool, q_len, k_len, q_offset, query) -> torch.Tensor:
    """Causal (or all-zero for bidirectional models) additive mask [1, 1, q, k]; the same for every layer of
    a forward, so the last one is kept (read only)."""
    return _mask_of(causal, q_len, k_len, q_offset, query.dtype, query.device)


@functools.lru_cache(maxsize=1)
def _mask_of(causal: bool, q_len: int, k_len: int, q_offset: int, dtype, device) -> torch.Tensor:
    m = torch.zeros(q_len, k_len, dtype=dtype, device=device)
    if causal:
        qpos = torch.arange(q_len, device=device)[:, None] + q_offset
        kpos = torch.arange(k_len, device=device)[None, :]
        m = m.masked_fill(kpos > qpos, torch.finfo(dtype).min)
    return m[None, None]


@functools.lru_cache(maxsize=4)
def _triangle(n: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, n] factor (1 on and below the diagonal, else 0) and additive mask (0, else finfo.min) of a square
    block of queries and keys at the same positions."""
    above = torch.ones(n, n, dtype=torch.bool).triu(1)
    return (~above).to(dtype), torch.zeros(n, n, dtype=dtype).masked_fill(above, torch.finfo(dtype).min)


def _keeps(hook, layer: int) -> set[str]:
    """What of the logits/weights ``hook`` may keep after the call (both, unless it says otherwise)."""
    keeps = getattr(hook, "keeps_tensors", None)
    return {"logits", "weights"} if keeps is None else set(keeps(layer))


def _sum_bias(hooks, layer, call, query, key):
    """The hooks' logit biases, summed. A row whose every visible key is blocked (bias ≤ BLOCK/2) gets no bias at
    all and keeps its distribution: with a finite block it would otherwise become uniform over its keys."""
    total = None
    for hk in hooks:
        if "bias" in hk.needs(layer):
            bias = hk.logit_bias(layer, call, query, key)
            if bias is not None:
                total = bias if total is None else total + bias
    if total is not None:
        open_ = total > BLOCK / 2
        vis = call.visible
        if vis is not None:
            kw = total.shape[-1]
            if vis.shape[-1] < kw:  # a chunk cut at its last visible key: the later keys are masked
                vis = torch.cat([vis, vis.new_zeros(*vis.shape[:-1], kw - vis.shape[-1])], -1)
            vis = vis[..., :kw]
            open_ = open_ & vis
        shut = ~open_.any(-1, keepdim=True)
        if vis is not None:
            shut = shut & vis.any(-1, keepdim=True)
        if shut.any():
            total = torch.where(shut, torch.zeros((), dtype=total.dtype), total)
    return total


def _read_qk(hooks, layer, query, key, call):
    """Hand the hooks that read queries and keys the views q [b, q, h, d] and k [b, k, kv, d] of ``query``
    [b, h, q, d] and ``key`` [b, kv, k, d]; return views of those same tensors in the attention layout, so that
    what the attention computes from depends on (and back-propagates to) exactly what the hooks kept."""
    q, k = query.transpose(1, 2), key.transpose(1, 2)
    for hk in hooks:
        if "qk" in hk.needs(layer):
            hk.on_qk(layer, q, k, call)
    return q.transpose(1, 2), k.transpose(1, 2)


def _apply_z(hooks, layer, out, call, value, weights):
    for hk in hooks:
        if "z" in hk.needs(layer):
            new = hk.on_z(layer, out, call, value, weights)
            if new is not None:
                out = new
    return out


def register() -> None:
    """Register the attention function and its mask builder (SDPA's: None for a plain causal or full call,
    else a bool mask) with transformers."""
    AttentionInterface.register(ATTN_NAME, interp_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def entropy(weights: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) along the last axis, 0·log 0 = 0."""
    return -(weights * torch.log(weights.clamp_min(1e-30))).sum(-1)
