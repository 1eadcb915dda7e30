"""GIFT, EAH and ART measured on a testbed VLM's VQA task (docs/methods.md §8): each analysis' spec, scored with
and without by interp.evaluate (paired 95 % bootstrap CI); GIFT per item with its own saliency
(probes.gift.evaluate_items).

    .venv/bin/python scripts/vlm_seeds_results.py [llava_ar | smol_llava] [--limit N]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import interp  # noqa: E402
import probes  # noqa: E402,F401
from interp.testbed import load_testbed  # noqa: E402
from interp.tasks import Task, load_task  # noqa: E402
from probes.eah import eah  # noqa: E402
from probes.entropy import entropy  # noqa: E402
from probes.gift import evaluate_items, gift  # noqa: E402


def line(name: str, ev) -> str:
    m = ev.metrics
    return (f"{name}: n = {m['n']}, {m['metric']} {m['without']:.3f} [{m['without_ci'][0]:.3f}, {m['without_ci'][1]:.3f}]"
            f" -> {m['with']:.3f} [{m['with_ci'][0]:.3f}, {m['with_ci'][1]:.3f}], delta {m['delta']:+.3f} "
            f"[{m['delta_ci'][0]:+.3f}, {m['delta_ci'][1]:+.3f}], {m['changed_items']} items changed")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="llava_ar")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--only", default="gift,eah,art")
    ap.add_argument("--quick", action="store_true", help="the analyses' own specs only: no controls or variants")
    ap.add_argument("--logprob", action="store_true", help="score log p(answer's first token) instead of accuracy")
    a = ap.parse_args()
    hf, tok, meta = load_testbed(a.model)
    model = interp.load(hf, tokenizer=tok, name=a.model)
    task = load_task("testbed_vqa")
    if a.limit:
        task = Task(task.name, task.kind, task.items[:a.limit], task.path)
    if a.logprob:  # task items follow the model (its prompt template and patch grid)
        task = Task(task.name, task.kind, [{**it, "score": "logprob"} for it in task.items], task.path)
    only = set(a.only.split(","))
    print(f"{a.model}: {model.n_layers} layers x {model.n_heads} heads; task {task.name} n = {len(task.items)}", flush=True)
    t0 = time.time()
    if "eah" in only:
        f = eah(model)
        print("EAH finding:", f.explain(), flush=True)
        print(line(f"EAH copy_head layer {f.params['layer']} <- head {f.metrics['best_head']}",
                   interp.evaluate(model, f.to_spec(model), task)), flush=True)
        for h in range(0 if a.quick else model.n_heads):
            if h != f.metrics["best_head"]:
                print(line(f"  control: copy head {h} instead", interp.evaluate(
                    model, f.to_spec(model, source_head=h), task)), flush=True)
    if "art" in only:
        for eta in (0.9, 0.8):
            f = entropy(model, eta=eta)
            print(f"ART finding (eta {eta}):", f.explain(), flush=True)
            for w in (32,) if a.quick else (32, 64):
                try:
                    s = f.to_spec(model, window=w)
                except interp.InterpError as e:
                    print(f"ART eta {eta} w {w}: no spec ({e})", flush=True)
                    continue
                heads = {e["layers"][0]: e["heads"] for e in s.edits}
                print(line(f"ART eta {eta} w {w} heads {heads}", interp.evaluate(model, s, task)), flush=True)
    if "gift" in only:
        f = gift(model)
        print("GIFT finding:", f.explain(), flush=True)
        ls, enh = f.metrics["layers"], f.metrics["enhance_layers"]
        print(line(f"GIFT l_s {ls} layers {enh} alpha 5", evaluate_items(model, task)), flush=True)
        if model.n_layers >= 3 and not a.quick:
            print(line("GIFT l_s [0] layers 1.. alpha 5", evaluate_items(
                model, task, layers=[0], enhance_layers=list(range(1, model.n_layers)))), flush=True)
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
