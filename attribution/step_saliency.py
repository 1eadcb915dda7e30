"""Step-Saliency / StepFlow: Xu et al., "Reasoning Fails Where Step Flow Breaks" (ACL'26;
XiaoyuXu-Vincent/step-saliency: src/saliency_extractor.py, scripts/analyze_step_saliency.py,
src/interventions/bridge_guard_oeb.py, src/interventions/smi.py). METHODS §4b.

Saliency (rule "ag", head mean; :mod:`attribution.saliency` with ``head_reduce="mean_abs"``):

    I^l[t, k] = (1/H) Σ_h |A^{l,h}[t, k] · ∂L/∂A^{l,h}[t, k]|,   L = LM cross-entropy over the sequence

Steps: the question is step 0; the thinking text is split on ``\\.\\s+`` (pieces < 15 chars, pure
numbers and table rows dropped; a step keeps its closing period); the summary is split on blank lines
(pieces < 10 chars dropped). Callers may pass the steps themselves (strings or char spans). Tokens are
mapped to steps through the tokenizer's character offsets (the source re-tokenises each step
instead); template and dropped text belong to no step.

    M^l[a, b] = mean_{i∈a, j∈b} I^l[i, j]          (a = query step, b = key step)
    M = (1/L) Σ_l M^l

Metrics, on M as in the source: final_block_intensity = mean M[summary, summary];
analysis_block_intensity = mean M[thinking, thinking]; final_heat_anomaly = their ratio.
Shallow Lock-in: lock_in^l = Σ_{0≤a−b≤near} M^l[a,b] / Σ M^l (mass on the current step and the one
before), averaged over the shallow third of layers. Deep Decay: think→summary saliency
t2s^l = mean M^l[summary, thinking]; deep_decay = mean t2s over the deep third / over the shallow third
(< 1: the flow from thinking into the summary fades with depth); deep_decay_share does the same for
the share of the summary rows' mass that lands on thinking steps.

``StepSaliency.to_spec``: OEB (``attn.oeb``, shallow layers 0..round(L/4)−1, the source's 0..6 of 28) with S = the
summary (plus generated tokens) and B = the thinking; SMI (``attn.smi``, layers ≥ round(3L/4), the
source's 21 of 28) with source = the w = 4 tokens before the query ("-5:-1"). The source fires SMI only
at the first token of a new thinking step, where those are the last w tokens of the step just closed;
a replayed spec has no step tracker and injects at every selected query (default: the last token).
"""
from __future__ import annotations

import re
import string
from typing import Sequence

import pandas as pd
import torch

import interp
from attribution.saliency import saliency
from interp.analysis import Analysis
from interp.finding import Finding
from viz import interactive as _interactive
from viz import static as _static

TEMPLATE = "{question}\n<think>\n{thinking}\n</think>\n{summary}"

EXAMPLES: list[dict[str, str]] = [
    {"question": "Tom has 3 boxes of 4 apples. He eats 2 apples. How many are left?",
     "thinking": "The boxes hold 3 * 4 = 12 apples. Tom eats 2 of them. So 12 - 2 = 10 apples are left.",
     "summary": "Tom had 12 apples and ate 2.\n\nThe answer is 10."},
    {"question": "A pen costs 2 dollars and a book costs 5 dollars. Sara buys 2 pens and 1 book. What does she pay?",
     "thinking": "Two pens cost 2 * 2 = 4 dollars. The book adds 5 dollars. In total she pays 4 + 5 = 9 dollars.",
     "summary": "Pens cost 4 dollars and the book 5.\n\nThe answer is 9 dollars."},
    {"question": "A train travels 60 km in one hour. How far does it go in 3 hours at the same speed?",
     "thinking": "The speed is 60 km per hour. In 3 hours it covers 3 * 60 = 180 km. "
                 "Nothing else changes the distance.",
     "summary": "Distance is speed times time.\n\nThe answer is 180 km."},
    {"question": "Mia had 20 stickers. She gave 5 to Ben and bought 8 more. How many does she have?",
     "thinking": "After giving 5 away she has 20 - 5 = 15 stickers. Buying 8 more gives 15 + 8 = 23 stickers.",
     "summary": "She ends with 15 plus 8 stickers.\n\nThe answer is 23."},
]

Span = tuple[int, int]


# ----------------------------------------------------------------------------- segmentation
def _keep(piece: str, min_chars: int) -> bool:
    """The source's filters: too short, a pure number, a table row or a separator."""
    if len(piece) < min_chars:
        return False
    if piece.replace(".", "").replace(",", "").replace("-", "").replace(" ", "").isdigit():
        return False
    if piece.startswith("|") and piece.count("|") > piece.count("\n") * 2:
        return False
    return not (piece.startswith(("|--", "---")) and len(piece) < 20)


def _pieces(text: str, sep: str, min_chars: int, keep_period: bool) -> list[Span]:
    """Char spans of the kept pieces of ``text`` split on regex ``sep`` (stripped of whitespace)."""
    out, pos = [], 0
    cuts = [(m.start(), m.end()) for m in re.finditer(sep, text)] + [(len(text), len(text))]
    for a, b in cuts:
        raw = text[pos:a]
        lo = pos + len(raw) - len(raw.lstrip())
        hi = pos + len(raw.rstrip())
        if _keep(text[lo:hi], min_chars):
            out.append((lo, hi + (1 if keep_period and a < len(text) else 0)))
        pos = b
    return out


def split_thinking(thinking: str, min_chars: int = 15) -> list[Span]:
    """Thinking steps: split on ``\\.\\s+``, drop pieces < 15 chars, pure numbers and table rows."""
    return _pieces(thinking, r"\.\s+", min_chars, keep_period=True)


def split_summary(summary: str, min_chars: int = 10) -> list[Span]:
    """Summary steps: split on blank lines, drop pieces < 10 chars and table rows."""
    return _pieces(summary, r"\n\n", min_chars, keep_period=False)


def _given(segment: str, steps: Sequence[str | Span]) -> list[Span]:
    """Caller-given steps: strings (found in order) or (start, end) spans, relative to the segment."""
    out, cursor = [], 0
    for s in steps:
        if isinstance(s, str):
            a = segment.find(s, cursor)
            if a < 0:
                raise interp.InterpError(f"step {s[:60]!r} does not occur (in order) in {segment[:80]!r}")
            out.append((a, a + len(s)))
            cursor = a + len(s)
        else:
            out.append((int(s[0]), int(s[1])))
    return out


def build_text(model, question: str, thinking: str, summary: str, *, template: str = TEMPLATE,
               chat: bool = False) -> tuple[str, dict[str, Span]]:
    """The full text and the char span of each segment. ``chat``: the model's chat template with the
    question as the user turn and ``<think>\\n{thinking}\\n</think>\\n\\n{summary}`` as the assistant turn."""
    parts = {"question": question, "thinking": thinking, "summary": summary}
    if chat:
        text = model.tokenizer.apply_chat_template(
            [{"role": "user", "content": question},
             {"role": "assistant", "content": f"<think>\n{thinking}\n</think>\n\n{summary}"}], tokenize=False)
        spans, cursor = {}, 0
        for k, v in parts.items():
            a = text.find(v, cursor)
            spans[k], cursor = (a, a + len(v)), a + len(v)
        return text, spans
    text, spans = "", {}
    for literal, fld, _, _ in string.Formatter().parse(template):
        text += literal
        if fld:
            spans[fld] = (len(text), len(text) + len(parts[fld]))
            text += parts[fld]
    if set(spans) != set(parts):
        raise interp.InterpError(f"template must contain {{question}}, {{thinking}} and {{summary}}, got {template!r}")
    return text, spans


def encode_steps(model, question: str, thinking: str, summary: str, *, thinking_steps=None, summary_steps=None,
                 template: str = TEMPLATE, chat: bool = False) -> tuple[interp.Batch, list[dict]]:
    """Tokenise, segment into steps, and give the batch the roles question / think / summary / step{i}."""
    text, seg = build_text(model, question, thinking, summary, template=template, chat=chat)
    steps = [{"kind": "question", "span": seg["question"]}]
    for kind, key, default, given in (("thinking", "thinking", split_thinking, thinking_steps),
                                      ("summary", "summary", split_summary, summary_steps)):
        a0, b0 = seg[key]
        spans = default(text[a0:b0]) if given is None else _given(text[a0:b0], given)
        steps += [{"kind": kind, "span": (a0 + a, a0 + b)} for a, b in spans]
    enc = model.tokenizer(text, return_offsets_mapping=True, add_special_tokens=not chat)
    offs = enc["offset_mapping"]
    token_step = [-1] * len(offs)
    for i, st in enumerate(steps):
        a, b = st["span"]
        st["text"] = text[a:b]
        st["tokens"] = [t for t, (s, e) in enumerate(offs) if e > s and s < b and e > a and token_step[t] < 0]
        for t in st["tokens"]:
            token_step[t] = i
    empty = [st["text"][:40] for st in steps if not st["tokens"]]
    if empty:
        raise interp.InterpError(f"steps with no tokens: {empty}")
    roles = {"question": steps[0]["tokens"],
             "think": sorted(t for st in steps if st["kind"] == "thinking" for t in st["tokens"]),
             "summary": sorted(t for st in steps if st["kind"] == "summary" for t in st["tokens"])}
    roles.update({f"step{i}": st["tokens"] for i, st in enumerate(steps)})
    ids = torch.tensor([enc["input_ids"]])
    batch = model.encode({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, roles=roles)
    batch.texts = [text]
    return batch, steps


def _parts(inputs, question, thinking, summary) -> dict[str, str]:
    """question / thinking / summary from a dict (or None: EXAMPLES[0]) or the question with the other two."""
    if inputs is None and question is None:
        inputs = EXAMPLES[0] if thinking is None and summary is None else None
    if isinstance(inputs, dict):
        missing = {"question", "thinking", "summary"} - set(inputs)
        if missing:
            raise interp.InterpError(f"step_saliency inputs lack {sorted(missing)}: give a dict with question, thinking "
                                     "and summary (like an entry of EXAMPLES)")
        question, thinking, summary = inputs["question"], inputs["thinking"], inputs["summary"]
    elif isinstance(inputs, str):
        question = inputs
    elif inputs is not None:
        raise interp.InterpError(f"step_saliency takes a dict with question, thinking and summary, not "
                                 f"{type(inputs).__name__}")
    if not all(isinstance(x, str) for x in (question, thinking, summary)):
        raise interp.InterpError("step_saliency needs the question, the thinking and the summary, each a string")
    return {"question": question, "thinking": thinking, "summary": summary}


# ----------------------------------------------------------------------------- pooling and metrics
def step_map(I: torch.Tensor, steps: list[dict]) -> torch.Tensor:
    """M [L, S, S]: M^l[a, b] = mean_{i∈a, j∈b} I^l[i, j] for I [L, T, T]."""
    E = torch.zeros(len(steps), I.shape[-1], dtype=I.dtype)
    for a, st in enumerate(steps):
        E[a, st["tokens"]] = 1.0 / len(st["tokens"])
    return E @ I @ E.T


def _block(M: torch.Tensor, rows: list[int], cols: list[int]) -> torch.Tensor:
    """mean of M[..., rows, cols] (0 where a group is empty)."""
    if not rows or not cols:
        return torch.zeros(M.shape[:-2])
    return M[..., rows, :][..., cols].mean((-1, -2))


def step_metrics(M: torch.Tensor, kinds: list[str], near: int = 1) -> tuple[pd.DataFrame, dict]:
    """Per-layer table and the metrics of the module docstring, for M [L, S, S]."""
    L, S = M.shape[0], M.shape[-1]
    th = [i for i, k in enumerate(kinds) if k == "thinking"]
    su = [i for i, k in enumerate(kinds) if k == "summary"]
    d = torch.arange(S)[:, None] - torch.arange(S)[None, :]
    band = ((d >= 0) & (d <= near)).to(M.dtype)
    lock = (M * band).sum((1, 2)) / M.sum((1, 2)).clamp_min(1e-30)
    t2s = _block(M, su, th)
    share = (M[:, su][:, :, th].sum((1, 2)) / M[:, su].sum((1, 2)).clamp_min(1e-30)) if su and th else torch.zeros(L)
    third = max(1, L // 3)
    sh, dp = slice(0, third), slice(L - third, L)
    Mbar = M.mean(0)
    fin, ana = float(_block(Mbar, su, su)), float(_block(Mbar, th, th))

    def ratio(x, y):
        return float(x / y) if y > 1e-30 else 0.0
    metrics = {
        "n_steps": S, "n_thinking": len(th), "n_summary": len(su),
        "final_block_intensity": fin, "analysis_block_intensity": ana,
        "final_heat_anomaly": ratio(fin, ana) if ana > 1e-10 else 0.0,
        "shallow_lock_in": float(lock[sh].mean()), "deep_lock_in": float(lock[dp].mean()),
        "think_to_summary_shallow": float(t2s[sh].mean()), "think_to_summary_deep": float(t2s[dp].mean()),
        "deep_decay": ratio(t2s[dp].mean(), t2s[sh].mean()),
        "deep_decay_share": ratio(share[dp].mean(), share[sh].mean()),
    }
    table = pd.DataFrame({"layer": range(L), "lock_in": lock.numpy(), "think_to_summary": t2s.numpy(),
                          "think_share_of_summary": share.numpy(), "summary_block": _block(M, su, su).numpy(),
                          "thinking_block": _block(M, th, th).numpy(), "total": M.sum((1, 2)).numpy()})
    table["score"] = table["lock_in"]
    return table, metrics


class StepSaliency(Analysis):
    """Step × step saliency maps M [L, S, S], the StepFlow metrics, and the OEB / SMI repairs as specs."""

    name = "attribution.step_saliency"
    title = "Step-Saliency (StepFlow)"
    requires = ("causal",)
    figures = (_static.saliency, _interactive.saliency)

    def run(self, model: interp.Model, inputs=None, thinking: str | None = None, summary: str | None = None, *,
            question: str | None = None, thinking_steps=None, summary_steps=None, template: str = TEMPLATE,
            chat: bool = False, target="loss", near: int = 1) -> Finding:
        """Step × step saliency maps M [L, S, S] and the StepFlow metrics for one question/thinking/summary.

        ``inputs``: a dict with ``question``, ``thinking`` and ``summary`` (e.g. an entry of :data:`EXAMPLES`),
        or the question string with ``thinking`` and ``summary`` given; None: ``EXAMPLES[0]``."""
        parts = _parts(inputs, question, thinking, summary)
        batch, steps = encode_steps(model, **parts, thinking_steps=thinking_steps, summary_steps=summary_steps,
                                    template=template, chat=chat)
        tok = saliency(model, batch, target=target, head_reduce="mean_abs")
        M = step_map(tok.arrays["I"], steps)
        kinds = [st["kind"] for st in steps]
        table, metrics = step_metrics(M, kinds, near)
        seg = {k: [kinds.index(k), len(kinds) - kinds[::-1].index(k)] if k in kinds else [0, 0]
               for k in ("question", "thinking", "summary")}
        params = {"steps": [st["text"] for st in steps], "kinds": kinds, "seg": seg, "near": near,
                  "target": tok.params["target"], "chat": chat, "template": template, **parts,
                  "step_tokens": [st["tokens"] for st in steps], "tokens": batch.tokens[0]}
        return Finding(self.name, table, params, model.identity(), tok.prompts, metrics,
                       {"M": M, "M_mean": M.mean(0)})

    def __call__(self, model, inputs=None, *args, **params) -> Finding:
        """Also ``step_saliency(model, question, thinking, summary)``, the call before the analysis contract."""
        return self.run(model, inputs, *args, **params)

    def to_spec(self, finding: Finding, model: interp.Model, *, method: str = "oeb", layers: list[int] | None = None,
                heads: list[int] | str = "all", queries="last", tau_max: float = 0.15, segment="role:summary",
                bridge="role:think", scale: float = 0.06, window: int = 4, source=None) -> interp.Spec:
        """OEB in the shallow layers or SMI in the deep layers (module docstring). Replay with the roles of
        :func:`encode_steps` (``model.generate(batch)`` inside ``interp.patch``)."""
        L = model.n_layers
        if method == "oeb":
            layers = list(range(max(1, round(L / 4)))) if layers is None else layers
            edit = {"op": "attn.oeb", "layers": layers, "heads": heads, "queries": queries, "segment": segment,
                    "bridge": bridge, "tau_max": tau_max}
            params = {"tau_max": tau_max}
        elif method == "smi":
            layers = list(range(round(0.75 * L), L)) if layers is None else layers
            edit = {"op": "attn.smi", "layers": layers, "heads": heads, "queries": queries,
                    "source": source if source is not None else f"-{window + 1}:-1", "scale": scale}
            params = {"scale": scale, "window": window}
        else:
            raise interp.InterpError(f"unknown method {method!r}: use 'oeb' or 'smi'")
        keep = {k: finding.params[k] for k in ("steps", "kinds", "target") if k in finding.params}
        return interp.Spec.for_model(model, [edit], analysis=self.name, prompts=finding.prompts,
                                     params={**keep, "method": method, **params,
                                             "metrics": {k: finding.metrics[k] for k in
                                                         ("shallow_lock_in", "deep_decay") if k in finding.metrics}})

    def explain(self, finding: Finding) -> str:
        m = finding.metrics
        decay = m["deep_decay"]
        trend = "fades" if decay < 1 else "grows"
        return (f"Across {m['n_steps']} reasoning steps, the shallow third of the layers keeps "
                f"{100 * m['shallow_lock_in']:.0f} % of its step-to-step saliency on the current and previous step, "
                f"and the flow from the thinking into the summary {trend} with depth (deep layers carry "
                f"{decay:.2f}× the shallow layers' flow).")


step_saliency = StepSaliency()
