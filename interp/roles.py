"""Token roles and encoded batches.

``Roles`` names sets of positions in one sequence: ``bos`` (position 0), chat-template parts
(``system``, ``user``, ``assistant``), spans between explicit markers, substrings, and sets the
user gives. Specs address tokens by role, so an edit found on one prompt replays on another.
"""
from __future__ import annotations

from dataclasses import dataclass, field
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


def encode(model, inputs: Any, *, chat: bool = False, system: str | None = None,
           markers: dict[str, tuple[str, str]] | None = None, roles: dict | None = None,
           add_generation_prompt: bool = True, max_length: int | None = None) -> Batch:
    """Tokenise ``inputs`` (str, list of str, chat messages, a Batch, or a dict of tensors)."""
    if isinstance(inputs, Batch):
        return inputs
    if isinstance(inputs, dict) and "input_ids" in inputs:
        ids = torch.as_tensor(inputs["input_ids"])
        ids = ids[None] if ids.dim() == 1 else ids
        am = torch.as_tensor(inputs.get("attention_mask", torch.ones_like(ids)))
        am = am[None] if am.dim() == 1 else am
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        tok = model.tokenizer
        toks = [[tok.convert_ids_to_tokens(int(t)) if tok else str(int(t)) for t in row] for row in ids]
        rl = [Roles({"bos": [0]}, length=int(am[i].sum())) for i in range(ids.shape[0])]
        image_id = model.adapter.image_token_id
        for i, r in enumerate(rl):
            if image_id is not None and (ids[i] == image_id).any():
                r["image"] = torch.nonzero(ids[i] == image_id)[:, 0].tolist()
            _add_user_roles(r, roles, None, None)
        batch = Batch(ids, am, rl, toks, [], extra)
        _check_length(model, batch, max_length)
        return batch
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
    return batch


def _add_user_roles(r: Roles, roles: dict | None, text: str | None, offs) -> None:
    """User roles: name -> positions (ints / selector) or a substring of the prompt (all occurrences)."""
    for name, val in (roles or {}).items():
        if isinstance(val, str) and text is not None and not val.startswith("role:") and val not in ("last", "all"):
            hits, start = [], 0
            while (a := text.find(val, start)) >= 0:
                hits += _char_span_tokens(offs, a, a + len(val))
                start = a + len(val)
            if not hits:
                raise InterpError(f"role {name!r}: substring {val!r} does not occur in the prompt {text[:80]!r}")
            r[name] = sorted(set(hits))
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
