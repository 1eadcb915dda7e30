"""Token roles and encoded batches.

``Roles`` names sets of positions in one sequence: ``bos`` (position 0), chat-template parts
(``system``, ``user``, ``assistant``), spans between explicit markers, substrings, and sets the
user gives. Specs address tokens by role, so an edit found on one prompt replays on another.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence

import torch

from .errors import InterpError


class Roles(dict):
    """name -> sorted list of token positions for one sequence."""

    def __init__(self, *args, length: int = 0, **kw):
        super().__init__(*args, **kw)
        self.length = length

    def positions(self, selector: str | int | Sequence[int] | None, strict: bool = True) -> list[int]:
        """Resolve a token selector: ``all``, ``last``, ``role:NAME``, ``NAME``, ``3``, ``2:5``, ``[1,4]``.

        ``strict=False`` drops indices beyond this sequence (a spec replayed on a shorter prompt)."""
        n = self.length
        if not strict:
            try:
                return self.positions(selector)
            except InterpError as e:
                if "out of range" not in str(e):
                    raise
                if isinstance(selector, (list, tuple)):
                    return sorted({p for s in selector for p in self.positions(s, strict=False)})
                return []
        if selector is None or selector == "all":
            return list(range(n))
        if isinstance(selector, int):
            return [self._check(selector if selector >= 0 else n + selector)]
        if isinstance(selector, (list, tuple)):
            return sorted({p for s in selector for p in self.positions(s)})
        s = str(selector).strip()
        if s == "last":
            return [n - 1]
        if s == "none":
            return []
        if s.startswith("role:"):
            s = s[5:]
        if s in self:
            return list(self[s])
        if ":" in s:
            a, b = s.split(":", 1)
            try:
                lo, hi = int(a or 0), int(b) if b else n
            except ValueError:
                pass
            else:
                lo, hi = (lo + n if lo < 0 else lo), (hi + n if hi < 0 else hi)
                return list(range(max(0, lo), min(n, hi)))
        try:
            return [self._check(int(s))]
        except ValueError:
            pass
        raise InterpError(f"unknown token selector {selector!r}: roles here are {sorted(self)}; "
                          "selectors are all, last, none, role:NAME, an index, a range a:b, or a list")

    def _check(self, p: int) -> int:
        if not 0 <= p < self.length:
            raise InterpError(f"token position {p} is out of range for a sequence of {self.length} tokens")
        return p

    def to_json(self) -> dict:
        return {"length": self.length, "roles": {k: list(map(int, v)) for k, v in self.items()}}

    @classmethod
    def from_json(cls, d: dict) -> "Roles":
        return cls(d["roles"], length=d["length"])


@dataclass
class Batch:
    """Tokenised inputs plus roles and token strings, one entry per sequence."""

    input_ids: torch.Tensor  # [b, T], right-padded
    attention_mask: torch.Tensor  # [b, T], 1 = real token
    roles: list[Roles]
    tokens: list[list[str]]
    texts: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # e.g. pixel_values

    def model_inputs(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, **self.extra}

    @property
    def lengths(self) -> list[int]:
        return self.attention_mask.sum(1).tolist()

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def _char_span_tokens(offsets: Sequence[tuple[int, int]], start: int, end: int) -> list[int]:
    return [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]


PER_TOKEN_KEYS = ("position_ids", "token_type_ids")  # [b, T] inputs that move with their tokens when re-padding


def encode(model, inputs: Any, *, chat: bool = False, system: str | None = None,
           markers: dict[str, tuple[str, str]] | None = None, roles: dict | None = None,
           add_generation_prompt: bool = True, max_length: int | None = None) -> Batch:
    """Encode ``inputs`` into a right-padded :class:`Batch` with roles, on the model's device.

    ``inputs``: a string, a list of strings, chat messages (one conversation or a list of them), a LongTensor of
    token ids ([T] or [b, T]), a dict / ``BatchEncoding`` (``input_ids``; ``attention_mask`` [b, T] left- or
    right-padded, or [b, 1, T, T] boolean / additive as a plain causal mask with padding; ``pixel_values``, image
    sizes and other model inputs are passed on), or a Batch. Left-padded rows are moved to the right, so roles and
    ``last`` point at real tokens and every input form gives the same captures as the plain string."""
    if isinstance(inputs, Batch):
        return _to_device(inputs, model)
    if isinstance(inputs, torch.Tensor):
        inputs = {"input_ids": inputs}
    if isinstance(inputs, Mapping) and "input_ids" in inputs:
        batch = _encode_ids(model, dict(inputs), roles)
        _check_length(model, batch, max_length)
        return _to_device(batch, model)
    if isinstance(inputs, Mapping):
        raise InterpError(f"a dict of inputs needs 'input_ids' (it has {sorted(inputs)}); for text pass a string")
    tok = model.tokenizer
    if tok is None:
        raise InterpError("this model has no tokenizer: pass tokenizer= to interp.load, or give input_ids")
    if isinstance(inputs, str):
        inputs = [inputs]
    if isinstance(inputs, list) and inputs and isinstance(inputs[0], dict):
        inputs = [inputs]  # one conversation
    if not isinstance(inputs, list) or not inputs:
        raise InterpError(f"cannot encode {type(inputs).__name__}: give a string, a list of strings, "
                          "or a list of chat messages ({'role': ..., 'content': ...})")
    texts, spans = [], []
    for item in inputs:
        if isinstance(item, list) or chat:
            msgs = item if isinstance(item, list) else [{"role": "user", "content": item}]
            if system is not None and msgs[0].get("role") != "system":
                msgs = [{"role": "system", "content": system}] + msgs
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
            cursor, sp = 0, []
            for m in msgs:
                at = text.find(m["content"], cursor)
                if at >= 0:
                    sp.append((m["role"], at, at + len(m["content"])))
                    cursor = at + len(m["content"])
            texts.append(text)
            spans.append(sp)
        elif isinstance(item, str):
            texts.append(item)
            spans.append([])
        else:
            raise InterpError(f"cannot encode an item of type {type(item).__name__} in a batch of prompts")
    add_special = not any(isinstance(i, list) for i in inputs) and not chat
    enc = [tok(t, return_offsets_mapping=True, add_special_tokens=add_special) for t in texts]
    T = max(len(e["input_ids"]) for e in enc)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    ids = torch.full((len(enc), T), pad, dtype=torch.long)
    am = torch.zeros((len(enc), T), dtype=torch.long)
    all_roles, all_tokens = [], []
    for i, (e, text, sp) in enumerate(zip(enc, texts, spans)):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        am[i, :n] = 1
        offs = e["offset_mapping"]
        r = Roles({"bos": [0]}, length=n)
        for role, a, b in sp:
            r.setdefault(role, []).extend(_char_span_tokens(offs, a, b))
        for name, (open_m, close_m) in (markers or {}).items():
            start = 0
            while (a := text.find(open_m, start)) >= 0:
                b = text.find(close_m, a + len(open_m))
                b = len(text) if b < 0 else b
                r.setdefault(name, []).extend(_char_span_tokens(offs, a + len(open_m), b))
                start = b + len(close_m)
        _add_user_roles(r, roles, text, offs)
        for k in r:
            r[k] = sorted(set(r[k]))
        all_roles.append(r)
        all_tokens.append(tok.convert_ids_to_tokens(e["input_ids"]))
    batch = Batch(ids, am, all_roles, all_tokens, texts)
    _check_length(model, batch, max_length)
    return _to_device(batch, model)


def _to_device(batch: Batch, model) -> Batch:
    """``batch`` with its tensors on the model's device (the same object when they are already there)."""
    dev = getattr(model, "device", None)
    if dev is None:
        return batch
    dev = torch.device(dev)
    moved = {k: v.to(dev) if isinstance(v, torch.Tensor) and v.device != dev else v for k, v in batch.extra.items()}
    if batch.input_ids.device == dev and batch.attention_mask.device == dev and all(
            moved[k] is batch.extra[k] for k in moved):
        return batch
    return replace(batch, input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev), extra=moved)


def _encode_ids(model, inputs: dict, roles: dict | None) -> Batch:
    """A Batch from token ids and an optional 2-D or 4-D attention mask, right-padded."""
    ids = inputs.pop("input_ids")
    ids = torch.as_tensor(ids)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool or ids.dim() not in (1, 2):
        raise InterpError(f"input_ids must be integer token ids of shape [T] or [batch, T], got {ids.dtype} "
                          f"of shape {list(ids.shape)}")
    ids = ids.long()
    one_row = ids.dim() == 1
    ids = ids[None] if one_row else ids
    b, T = ids.shape
    if T == 0:
        raise InterpError("input_ids is empty: give at least one token")
    am = inputs.pop("attention_mask", None)
    if am is None:
        am = torch.ones_like(ids)
    else:
        am = torch.as_tensor(am).to(ids.device)
        if one_row and am.dim() == 1:
            am = am[None]
        if am.dim() == 4:
            am = _padding_from_4d(am, b, T, model.adapter.causal)
        elif am.dim() != 2 or tuple(am.shape) != (b, T):
            raise InterpError(f"attention_mask has shape {list(am.shape)} but input_ids has shape {[b, T]}: give "
                              f"a [batch, T] mask of 1 (token) / 0 (padding), or a [batch, 1, T, T] 4-D mask")
        elif not ((am == 0) | (am == 1)).all():
            raise InterpError("a 2-D attention_mask holds 1 for tokens and 0 for padding; this one has other "
                              f"values ({sorted(set(am.unique().tolist()))[:5]})")
        am = am.long()
    lengths = am.sum(1)
    if (lengths == 0).any():
        raise InterpError(f"row {int((lengths == 0).nonzero()[0])} of attention_mask has no token: every row needs one")
    ar = torch.arange(T, device=am.device)
    right = (am == (ar[None] < lengths[:, None]).long()).all(1)
    left = (am == (ar[None] >= T - lengths[:, None]).long()).all(1)
    if not (right | left).all():
        i = int((~(right | left)).nonzero()[0])
        raise InterpError(f"row {i} of attention_mask has padding between tokens ({am[i].tolist()[:32]}); "
                          "interp takes left- or right-padded rows only")
    extra = {k: v for k, v in inputs.items() if v is not None}
    shift = torch.where(right, 0, T - lengths)  # rows that are left-padded move to the right
    if (shift > 0).any():
        per_token = {k: torch.as_tensor(extra[k]) for k in PER_TOKEN_KEYS if k in extra}
        for k, v in per_token.items():
            v = v[None] if v.dim() == 1 else v
            if v.dim() != 2 or v.shape[0] not in (1, b) or v.shape[1] != T:
                raise InterpError(f"{k} has shape {list(v.shape)}; with left padding interp moves it with the "
                                  f"tokens, which needs [{b}, {T}]: pass right-padded inputs instead")
            extra[k] = v.expand(b, T).clone()
        ids, am = ids.clone(), am.clone()
        for i in shift.nonzero()[:, 0].tolist():
            n = int(shift[i])
            for t in [ids, am] + [extra[k] for k in per_token]:
                t[i] = torch.cat([t[i, n:], t[i, :n]])  # the padding goes to the end, in the order it came
    tok = model.tokenizer
    toks = [tok.convert_ids_to_tokens(row.tolist()) if tok else [str(int(t)) for t in row] for row in ids]
    rl = [Roles({"bos": [0]}, length=int(n)) for n in am.sum(1)]
    image_id = model.adapter.image_token_id
    for i, r in enumerate(rl):
        if image_id is not None and (ids[i] == image_id).any():
            r["image"] = torch.nonzero(ids[i] == image_id)[:, 0].tolist()
        _add_user_roles(r, roles, None, None)
    return Batch(ids, am, rl, toks, [], extra)


def _padding_from_4d(mask: torch.Tensor, b: int, T: int, causal: bool) -> torch.Tensor:
    """The [b, T] padding mask of a 4-D mask [b, 1, T, T] (bool: True = may attend; float: additive, 0 = may
    attend, a large negative = masked) that is the plain causal (or, for a bidirectional model, full) mask with
    padding; any other structure (packed sequences, trees, biases) is refused, since the engine would not honour
    it. Rows of padding queries are not checked (HF fills them in different ways)."""
    if mask.shape[0] not in (1, b) or tuple(mask.shape[2:]) != (T, T):
        raise InterpError(f"4-D attention_mask has shape {list(mask.shape)}; for input_ids {[b, T]} it must be "
                          f"[{b}, 1, {T}, {T}]")
    if mask.shape[1] != 1 and not (mask == mask[:, :1]).all():
        raise InterpError("4-D attention_mask differs between heads; interp takes one mask for every head")
    m = mask[:, 0].expand(b, T, T)
    if m.dtype == torch.bool:
        vis = m
    elif m.is_floating_point():
        vis = m == 0
        if not (vis | (m <= torch.finfo(m.dtype).min / 2)).all():
            raise InterpError("this additive 4-D attention_mask holds biases other than 0 (attend) and a large "
                              "negative (masked); interp cannot apply them as a mask: use an attn.add_logit_bias spec")
    else:
        raise InterpError(f"a 4-D attention_mask must be boolean (True = attend) or additive float, not {m.dtype}")
    ar = torch.arange(T, device=m.device)
    future = ar[None, :] > ar[:, None]  # [q, k]: k after q
    real = vis.diagonal(dim1=1, dim2=2).clone()  # a real query sees itself ...
    if causal:  # ... and, in a causal mask, no later key (a fully masked padding row may have been opened to all)
        real &= ~(vis & future).any(-1)
    expected = real[:, None, :] & (~future if causal else True)
    if not ((vis == expected) | ~real[:, :, None]).all():
        kind = "causal" if causal else "full (bidirectional)"
        raise InterpError(f"this 4-D attention_mask is not the plain {kind} mask with padding (packed sequences or "
                          "a custom structure?); interp cannot honour it: pass a 2-D [batch, T] attention_mask, "
                          "one sequence per row")
    return real.long()


def _add_user_roles(r: Roles, roles: dict | None, text: str | None, offs) -> None:
    """User roles: name -> positions (ints / selector) or a substring of the prompt (all occurrences)."""
    for name, val in (roles or {}).items():
        if isinstance(val, str) and val == "":
            raise InterpError(f"role {name!r} is an empty string: give a substring of the prompt, a selector "
                              "(last, an index, a range a:b) or a list of positions")
        if isinstance(val, str) and text is not None and not val.startswith("role:") and val not in ("last", "all"):
            hits, start = [], 0
            while (a := text.find(val, start)) >= 0:
                hits += _char_span_tokens(offs, a, a + len(val))
                start = a + len(val)
            if not hits:
                raise InterpError(f"role {name!r}: substring {val!r} does not occur in the prompt {text[:80]!r}")
            r[name] = sorted(set(hits))
        elif isinstance(val, str) and text is None:
            try:
                r[name] = r.positions(val)
            except InterpError as e:
                raise InterpError(f"role {name!r}: {e}. Inputs given as token ids have no text to find a "
                                  "substring in: give positions, or pass the prompt as text") from None
        else:
            r[name] = r.positions(val)


def _check_length(model, batch: Batch, max_length: int | None) -> None:
    limit = max_length or model.adapter.max_positions
    T = batch.input_ids.shape[1]
    if limit is not None and T > limit:
        raise InterpError(f"prompt is {T} tokens but {model.name} has a context of {limit}: "
                          "shorten or truncate the prompt")


def iter_positions(roles: Iterable[Roles], selector) -> list[list[int]]:
    return [r.positions(selector) for r in roles]
