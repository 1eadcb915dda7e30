"""``interp.evaluate(model, spec, task)``: a task metric with and without a spec, per item and overall,
with a paired bootstrap confidence interval on the difference."""
from __future__ import annotations

import pandas as pd

from .analysis import Analysis
from .errors import InterpError
from .finding import Finding
from .patch import patch
from .spec import Spec
from .tasks import Task, bootstrap_ci, default_logits_fn, load_task, score_items


def evaluate(model, spec: Spec | list[Spec], task: Task | str, *, limit: int | None = None, seed: int = 0) -> Finding:
    """Score ``task`` without and with ``spec``; the Finding's table has one row per item."""
    task = task if isinstance(task, Task) else load_task(task)
    if limit:
        task = Task(task.name, task.kind, task.items[:limit], task.path)
    specs = spec if isinstance(spec, list) else [spec]
    fn = default_logits_fn(model, batch_size=16)
    base = score_items(task, model, fn)
    with patch(model, *specs):
        edited = score_items(task, model, fn)
    diff = [e - b for b, e in zip(base, edited)]
    mb, lb, hb = bootstrap_ci(base, seed=seed)
    me, le, he = bootstrap_ci(edited, seed=seed)
    md, ld, hd = bootstrap_ci(diff, seed=seed)
    metric = "accuracy" if task.kind in ("next_token", "choice", "vqa") else "nll"
    first = task.items[0]
    if task.kind == "vqa" and (first.get("score") if isinstance(first, dict) else first.meta.get("score")) == "logprob":
        metric = "logprob"
    table = pd.DataFrame({"item": range(len(base)), "without": base, "with": edited, "delta": diff})
    metrics = {"task": task.name, "kind": task.kind, "metric": metric, "n": len(base),
               "without": mb, "without_ci": [lb, hb], "with": me, "with_ci": [le, he],
               "delta": md, "delta_ci": [ld, hd], "changed_items": int(sum(d != 0 for d in diff))}
    if metric == "nll":
        import math
        metrics.update({"ppl_without": math.exp(mb), "ppl_with": math.exp(me)})
    return Finding("interp.evaluate", table, {"task": task.name, "limit": limit, "specs": [s.provenance for s in specs]},
                   model.identity(), task.name, metrics)


class Evaluation(Analysis):
    """A spec's measured effect on a task (what :func:`evaluate` returns), registered so its Findings load and
    explain themselves like every other."""

    name = "interp.evaluate"
    title = "A spec's effect on a task"
    requires = ()

    def run(self, model, inputs=None, *, spec: Spec | list[Spec] | None = None, task: Task | str | None = None,
            limit: int | None = None, seed: int = 0) -> Finding:
        """``inputs``: the task (or give ``task=``); ``spec``: the spec(s) to measure."""
        task = task if task is not None else inputs
        if spec is None or task is None:
            raise InterpError("an evaluation needs spec= and a task (a shipped task name, a .jsonl or a Task)")
        return evaluate(model, spec, task, limit=limit, seed=seed)

    def explain(self, finding: Finding) -> str:
        m = finding.metrics
        lo, hi = m["delta_ci"]
        up_is_better = m["metric"] != "nll"
        verdict = ("no change distinguishable from zero" if lo <= 0 <= hi
                   else "better" if (lo > 0) == up_is_better else "worse")
        return (f"On {m['task']} (n = {m['n']}), {m['metric']} goes from {m['without']:.3f} to {m['with']:.3f} under "
                f"the spec: Δ {m['delta']:+.3f}, 95 % paired CI [{lo:+.3f}, {hi:+.3f}] ({verdict}; "
                f"{m['changed_items']} items changed).")
