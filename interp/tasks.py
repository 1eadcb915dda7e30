"""Small evaluation task sets and model-agnostic scoring.

A task is a JSONL file under ``interp/data/tasks/`` (one item per line, no header), each item carrying
its ``kind``:

* ``next_token`` -- ``{"prompt", "answer"}``: correct when the greedy next token after the prompt is the
  first token of the answer (``match="all"``: every answer token is the greedy choice, teacher-forced).
* ``choice`` -- ``{"prompt", "choices", "answer"}``: multiple choice by summed log-likelihood of each
  choice's tokens after the prompt; ``answer`` is the index of the right choice.
* ``perplexity`` -- ``{"text"}``: per-item mean token negative log-likelihood (nats).
* ``vqa`` -- a question about an image: :class:`interp.vlm.VQAItem` objects (a task built in Python,
  ``Task(name, "vqa", [VQAItem(...), ...])``), or JSON objects ``{"question", "answer", ...}`` that a registered
  item source turns into VQAItems (the testbed's: ``"scene_seed"``, the scene ``make_scene(scene_seed)``);
  correct when the argmax at the answer position is the answer's first token (AR: the next token after the
  prompt; masked diffusion: the first position of the fully masked answer region); with ``"score": "logprob"``
  (a VQAItem: ``meta={"score": "logprob"}``) the item scores log p(answer's first token) there instead.

    import interp
    from interp.tasks import load_task, score_items, bootstrap_ci
    model = interp.load("smollm2")
    scores = score_items(load_task("capitals"), model)
    mean, lo, hi = bootstrap_ci(scores)

Any item may carry ``"roles": {name: substring of the prompt}``: the tokens of every occurrence become that
role while the item runs, so a spec that addresses ``role:NAME`` (e.g. a knockout from ``role:subject``)
can be evaluated on the task (the shipped capitals items name their ``subject``).

Scoring only needs ``logits_fn(list of token-id lists) -> list of [T, V] logits tensors``, so any model
(hooked, patched, ablated) can be scored; the default runs ``model.hf`` in right-padded batches.
Run ``python scripts/make_tasks.py --score`` (or ``python -m interp.tasks [name ...]``) to print SmolLM2's
score on each task; ``interp.evaluate`` builds on this module to compare a model with and without a spec.
"""
from __future__ import annotations

import contextlib

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .errors import InterpError

TASK_DIR = Path(__file__).parent / "data" / "tasks"

#: required fields of an item, per kind, with the JSON type each must have
KINDS: dict[str, dict[str, tuple[type, ...]]] = {
    "next_token": {"prompt": (str,), "answer": (str,)},
    "choice": {"prompt": (str,), "choices": (list,), "answer": (int,)},
    "perplexity": {"text": (str,)},
    "vqa": {"question": (str,), "answer": (str,)},
}

LogitsFn = Callable[..., Sequence[torch.Tensor]]  # fn(seqs) or fn(seqs, roles) -> one [T, V] tensor per seq


@dataclass
class Task:
    """A loaded task: its name, its kind and its items (plain dicts, as in the file)."""

    name: str
    kind: str
    items: list[dict] = field(default_factory=list)
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, n: int) -> "Task":
        """The first ``n`` items, as a task of the same name and kind."""
        return Task(self.name, self.kind, self.items[:n], self.path)

    def __repr__(self) -> str:
        return f"Task({self.name!r}, kind={self.kind}, n={len(self.items)})"


def list_tasks() -> list[str]:
    """Names of the bundled tasks (the ``*.jsonl`` files under ``interp/data/tasks``)."""
    return sorted(p.stem for p in TASK_DIR.glob("*.jsonl"))


def _resolve(name_or_path: str | Path) -> Path:
    s = str(name_or_path)
    p = Path(s).expanduser()
    looks_like_path = isinstance(name_or_path, Path) or s.endswith(".jsonl") or "/" in s or "\\" in s
    if looks_like_path:
        if p.is_file():
            return p
        if p.exists():
            raise InterpError(f"task path {p} is not a file; pass a .jsonl file or a task name "
                              f"({', '.join(list_tasks())})")
        raise InterpError(f"task file not found: {p}. Pass an existing .jsonl file or a bundled task name "
                          f"({', '.join(list_tasks())})")
    bundled = TASK_DIR / f"{s}.jsonl"
    if bundled.is_file():
        return bundled
    raise InterpError(f"unknown task {s!r}: bundled tasks are {', '.join(list_tasks()) or '(none)'} "
                      f"(in {TASK_DIR}); or pass the path of a .jsonl file")


def _check_item(item: Any, where: str) -> str:
    if not isinstance(item, dict):
        raise InterpError(f"{where}: an item must be a JSON object, got {type(item).__name__}")
    kind = item.get("kind")
    if kind is None:
        raise InterpError(f"{where}: item is missing required field 'kind' (one of {', '.join(KINDS)})")
    if kind not in KINDS:
        raise InterpError(f"{where}: unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    for fname, types in KINDS[kind].items():
        if fname not in item:
            raise InterpError(f"{where}: {kind} item is missing required field {fname!r} "
                              f"(a {kind} item needs {', '.join(KINDS[kind])})")
        v = item[fname]
        if not isinstance(v, types) or (types == (int,) and isinstance(v, bool)):
            raise InterpError(f"{where}: field {fname!r} must be {types[0].__name__}, got {type(v).__name__}")
    if kind == "choice":
        ch = item["choices"]
        if len(ch) < 2 or not all(isinstance(c, str) and c for c in ch):
            raise InterpError(f"{where}: field 'choices' must be a list of at least 2 non-empty strings")
        if not 0 <= item["answer"] < len(ch):
            raise InterpError(f"{where}: field 'answer' is {item['answer']}, not an index into the "
                              f"{len(ch)} choices")
    if kind == "next_token" and not item["answer"]:
        raise InterpError(f"{where}: field 'answer' must be a non-empty string")
    if kind == "perplexity" and not item["text"].strip():
        raise InterpError(f"{where}: field 'text' must be a non-empty string")
    return kind


def load_task(name_or_path: str | Path) -> Task:
    """Load a bundled task by name (``"capitals"``) or any JSONL task file by path; validates every item."""
    if isinstance(name_or_path, Task):
        return name_or_path
    path = _resolve(name_or_path)
    items, kinds = [], set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path.name} line {lineno}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise InterpError(f"{where}: malformed JSON ({e.msg} at column {e.colno}); each line must be "
                                  "one JSON object") from None
            kinds.add(_check_item(item, where))
            items.append(item)
    if not items:
        raise InterpError(f"task file {path} has no items")
    if len(kinds) > 1:
        raise InterpError(f"task file {path} mixes kinds {sorted(kinds)}; one task has one kind")
    return Task(name=path.stem, kind=kinds.pop(), items=items, path=path)


# --------------------------------------------------------------------------------------------- scoring

def default_logits_fn(model, batch_size: int = 32) -> LogitsFn:
    """Run ``model.hf`` on token-id lists in right-padded batches (sorted by length); [T, V] logits each.

    With an interp Model, each batch runs with its roles known to the engine, so active specs resolve
    ``last`` and ``role:bos`` per sequence rather than at the padded end."""
    hf = model.hf
    tok = getattr(model, "tokenizer", None)
    pad = getattr(tok, "pad_token_id", None)
    pad = 0 if pad is None else pad

    def fn(seqs: list[list[int]], roles: list[dict] | None = None) -> list[torch.Tensor]:
        device = next(hf.parameters()).device
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out: list[torch.Tensor | None] = [None] * len(seqs)
        with torch.no_grad():
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                T = max(len(seqs[i]) for i in idx)
                ids = torch.full((len(idx), T), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), T), dtype=torch.long)
                for r, i in enumerate(idx):
                    ids[r, :len(seqs[i])] = torch.tensor(seqs[i], dtype=torch.long)
                    mask[r, :len(seqs[i])] = 1
                running = contextlib.nullcontext()
                if hasattr(model, "engine"):
                    from .roles import Batch, Roles
                    running = model.engine.running(Batch(ids, mask, [
                        Roles({"bos": [0], **(roles[i] if roles else {})}, length=len(seqs[i])) for i in idx],
                        [[] for _ in idx]))
                with running:
                    logits = hf(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()
                for r, i in enumerate(idx):
                    out[i] = logits[r, :len(seqs[i])]
        return out  # type: ignore[return-value]
    return fn


def _tokenizer(model):
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise InterpError("scoring needs a tokenizer: pass an interp Model with .tokenizer "
                          "(interp.load(..., tokenizer=...))")
    return tok


def _ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=True)["input_ids"])


def _item_roles(tok, items: list[dict]) -> list[dict] | None:
    """Token positions of each item's ``roles`` substrings (all occurrences), or None if no item has roles."""
    if not any("roles" in it for it in items):
        return None
    from .roles import _char_span_tokens
    out = []
    for k, it in enumerate(items):
        enc = tok(it["prompt"], return_offsets_mapping=True, add_special_tokens=True)
        r = {}
        for name, sub in it.get("roles", {}).items():
            if not isinstance(sub, str) or not sub:
                raise InterpError(f"item {k}: role {name!r} must be a non-empty substring of its prompt, got {sub!r}")
            hits, start = [], 0
            while (a := it["prompt"].find(sub, start)) >= 0:
                hits += _char_span_tokens(enc["offset_mapping"], a, a + len(sub))
                start = a + len(sub)
            if not hits:
                raise InterpError(f"item {k}: role {name!r} = {sub!r} does not occur in its prompt {it['prompt'][:60]!r}")
            r[name] = sorted(set(hits))
        out.append(r)
    return out


def _split(tok, prompt: str, continuation: str) -> tuple[list[int], int]:
    """Token ids of ``prompt + continuation`` and where the continuation's tokens start in them."""
    full = _ids(tok, prompt + continuation)
    p = _ids(tok, prompt)
    start = 0
    while start < min(len(full), len(p)) and full[start] == p[start]:
        start += 1
    if start >= len(full):
        raise InterpError(f"continuation {continuation!r} adds no token after prompt {prompt[-40:]!r}")
    if start == 0:  # nothing before the continuation to condition on
        raise InterpError(f"prompt {prompt!r} shares no token with prompt+continuation; cannot score it")
    return full, start


def score_items(task: Task | str | Path, model, logits_fn: LogitsFn | None = None, *,
                match: str = "first", batch_size: int = 32) -> list[float]:
    """Per-item scores: 1/0 accuracy (``next_token``, ``choice``) or mean token NLL in nats (``perplexity``).

    ``model`` supplies the tokenizer (and, without ``logits_fn``, the forward pass). ``logits_fn`` maps a
    list of token-id lists to one ``[T, V]`` logits tensor each. For ``next_token``, ``match="first"``
    compares the argmax after the prompt with the answer's first token; ``match="all"`` requires every
    answer token to be the argmax (teacher-forced, i.e. greedy decoding would produce the whole answer).
    """
    task = load_task(task) if not isinstance(task, Task) else task
    if match not in ("first", "all"):
        raise InterpError(f"match must be 'first' or 'all', got {match!r}")
    tok = _tokenizer(model)
    fn = logits_fn or default_logits_fn(model, batch_size=batch_size)

    if task.kind == "next_token":
        split = [_split(tok, it["prompt"], it["answer"]) for it in task.items]
        # only the positions that predict the scored answer tokens are run: the prompt (plus the answer
        # tokens but the last, for match="all")
        ends = [st + 1 if match == "first" else len(full) for full, st in split]

        def correct(i: int, lg: torch.Tensor) -> float:
            (full, st), end = split[i], ends[i]
            return float(lg[st - 1:end - 1].argmax(-1).tolist() == full[st:end])
        return _map_logits(fn, [full[:end - 1] for (full, _), end in zip(split, ends)], correct,
                           roles=_item_roles(tok, task.items))

    if task.kind == "choice":
        seqs, starts, owner = [], [], []
        item_roles = _item_roles(tok, task.items)
        for k, it in enumerate(task.items):
            for c in it["choices"]:
                full, st = _split(tok, it["prompt"], c)
                seqs.append(full), starts.append(st), owner.append(k)

        def loglik(i: int, lg: torch.Tensor) -> float:
            full, st = seqs[i], starts[i]
            lp = torch.log_softmax(lg[st - 1:len(full) - 1].float(), -1)
            return lp.gather(-1, torch.tensor(full[st:], dtype=torch.long)[:, None]).sum().item()
        # the last token is never an input, so single-token choices of one prompt share one forward pass
        lls: list[list[float]] = [[] for _ in task.items]
        roles = [item_roles[k] for k in owner] if item_roles else None
        for k, ll in zip(owner, _map_logits(fn, [full[:-1] for full in seqs], loglik, roles=roles)):
            lls[k].append(ll)
        return [float(max(range(len(ll)), key=ll.__getitem__) == it["answer"]) for ll, it in zip(lls, task.items)]

    if task.kind == "vqa":
        from .vlm import as_items, score_vqa
        items = as_items(task.items, model)
        return score_vqa(model, items, logprob=[it.meta.get("score") == "logprob" for it in items],
                         batch_size=max(batch_size, 64))

    if task.kind == "perplexity":
        seqs = [_ids(tok, it["text"]) for it in task.items]
        for i, s in enumerate(seqs):
            if len(s) < 2:
                raise InterpError(f"perplexity item {i} ({task.items[i]['text']!r}) has fewer than 2 tokens")

        def nll(i: int, lg: torch.Tensor) -> float:
            s = seqs[i]
            lp = torch.log_softmax(lg[:len(s) - 1].float(), -1)
            return -lp.gather(-1, torch.tensor(s[1:], dtype=torch.long)[:, None]).mean().item()
        return _map_logits(fn, [s[:-1] for s in seqs], nll)

    raise InterpError(f"task {task.name!r} has unknown kind {task.kind!r}")


def _takes_roles(fn: LogitsFn) -> bool:
    """Whether ``fn`` accepts a second argument (the roles of each sequence)."""
    import inspect
    try:
        inspect.signature(fn).bind([], [])
        return True
    except (TypeError, ValueError):
        return False


def _map_logits(fn: LogitsFn, seqs: list[list[int]], reduce: Callable[[int, torch.Tensor], float],
                chunk: int = 64, roles: list[dict] | None = None) -> list[float]:
    """``reduce(i, logits of seqs[i])`` for every i, calling ``fn`` once per distinct sequence.

    Distinct sequences go to ``fn`` in length order, ``chunk`` at a time, so only one chunk's logits are
    held in memory at once. With ``roles`` (one dict per sequence) ``fn`` is called as ``fn(seqs, roles)`` if it
    takes a second argument (a logits function that ignores roles cannot resolve role selectors anyway).
    """
    uniq: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(seqs):
        uniq.setdefault(tuple(s), []).append(i)
    keys = sorted(uniq, key=len)
    out: list[float] = [0.0] * len(seqs)
    for c in range(0, len(keys), chunk):
        part = keys[c:c + chunk]
        seqs_part = [list(k) for k in part]
        logits = list(fn(seqs_part, [roles[uniq[k][0]] for k in part]) if roles is not None and _takes_roles(fn)
                      else fn(seqs_part))
        if len(logits) != len(part):
            raise InterpError(f"logits_fn returned {len(logits)} logits tensors for {len(part)} sequences")
        for k, lg in zip(part, logits):
            if not isinstance(lg, torch.Tensor) or lg.dim() != 2 or lg.shape[0] < len(k):
                got = tuple(lg.shape) if isinstance(lg, torch.Tensor) else type(lg).__name__
                raise InterpError(f"logits_fn must return one [T, V] tensor per sequence (T >= its length "
                                  f"{len(k)}); got {got}")
            for i in uniq[k]:
                out[i] = reduce(i, lg)
    return out


def bootstrap_ci(values: Sequence[float], n: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float, float]:
    """Mean of ``values`` with a percentile bootstrap (1 - alpha) confidence interval: (mean, lo, hi)."""
    vals = [float(v) for v in values]
    if not vals:
        raise InterpError("bootstrap_ci needs at least one value")
    if not 0 < alpha < 1:
        raise InterpError(f"alpha must be in (0, 1), got {alpha}")
    mean = sum(vals) / len(vals)
    t = torch.tensor(vals, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(vals), (n, len(vals)), generator=g)
    means = t[idx].mean(1).sort().values
    lo = means[max(0, math.floor(alpha / 2 * n))].item()
    hi = means[min(n - 1, math.ceil((1 - alpha / 2) * n) - 1)].item()
    return mean, lo, hi


def summarize(task: Task | str | Path, model, logits_fn: LogitsFn | None = None, **kw) -> dict:
    """Score a task and summarise it: name, kind, n, mean (accuracy or mean NLL), lo, hi (95% bootstrap)."""
    task = load_task(task) if not isinstance(task, Task) else task
    scores = score_items(task, model, logits_fn, **kw)
    mean, lo, hi = bootstrap_ci(scores)
    return {"task": task.name, "kind": task.kind, "n": len(scores), "mean": mean, "lo": lo, "hi": hi}


def main(argv: list[str] | None = None) -> None:
    """Print each task's score (accuracy or mean NLL, 95% bootstrap CI) and its wall and CPU seconds."""
    import argparse
    import time
    ap = argparse.ArgumentParser(prog="python -m interp.tasks", description="score SmolLM2 (or a model) on tasks")
    ap.add_argument("tasks", nargs="*", help="task names or .jsonl paths (default: all bundled)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--limit", type=int, default=None, help="score only the first N items")
    ap.add_argument("--match", default="first", choices=["first", "all"])
    a = ap.parse_args(argv)
    from .model import load
    model = load(a.model)
    print(f"{'task':<12} {'kind':<11} {'n':>4}  {'score':>7}  {'95% CI':<16}  wall_s  cpu_s  metric")
    for name in a.tasks or [t for t in list_tasks() if not t.startswith("testbed_")]:
        task = load_task(name)
        if a.limit:
            task = task.subset(a.limit)
        t0, c0 = time.time(), time.process_time()
        r = summarize(task, model, match=a.match)
        metric = "mean token NLL (nats)" if r["kind"] == "perplexity" else "accuracy"
        print(f"{r['task']:<12} {r['kind']:<11} {r['n']:>4}  {r['mean']:7.3f}  [{r['lo']:.3f}, {r['hi']:.3f}]  "
              f"{time.time() - t0:6.1f}  {time.process_time() - c0:5.1f}  {metric}", flush=True)


if __name__ == "__main__":
    main()
