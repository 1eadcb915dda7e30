#!/usr/bin/env python
"""Measure the vision results of probes/VISION_RESULTS.md on the two testbed VLMs (CPU, ~2 minutes).

    .venv/bin/python scripts/vision_results.py [--scenes 200] [--out out/vision]

Writes out/vision/results.json, the findings and the specs; prints the tables of the results file.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import interp  # noqa: E402
from interp.tasks import Task, bootstrap_ci, load_task  # noqa: E402
from interp.testbed import build_inputs, load_testbed, make_dataset  # noqa: E402
from interp.testbed.items import answer_ids, as_vqa_items, encode_items, testbed_meta  # noqa: E402
from interp.testbed.localize import localisation_items  # noqa: E402
from probes import image_attention as ia, visual_sinks as vs, vhd as vhd_mod  # noqa: E402
from probes.knockout import knockout  # noqa: E402

EDGES = [("role:object", "role:question"), ("role:background", "role:question"), ("role:image", "role:question"),
         ("role:image", "role:query"), ("role:object", "role:query"), ("role:background", "role:query"),
         ("role:question", "role:query")]


def ci(x):
    m, lo, hi = bootstrap_ci(list(map(float, x)))
    return {"mean": round(m, 3), "ci": [round(lo, 3), round(hi, 3)]}


def run(name: str, n_scenes: int, out: Path) -> dict:
    hf, tok, meta = load_testbed(name)
    m = interp.load(hf, tokenizer=tok, name=name)
    res: dict = {}
    items = localisation_items(n_scenes, seed=0)  # held-out: test split
    t = time.time()
    # 1. knockout (window 1: one layer at a time in a 3-layer model; window 3 = all layers)
    b = encode_items(m, items)
    y = answer_ids(m, items).tolist()
    ko = {}
    for w, layers in ((1, list(range(m.n_layers))), (3, [1])):
        f = knockout(m, inputs=b, edges=EDGES, window=w, layers=layers, answers=y, progress=False)
        d = f.arrays["per_item"]  # [n, E, layers]
        ko[f"window{w}"] = {
            "n_items": f.metrics["n_items"], "n_dropped": f.metrics["n_dropped"], "layers": layers,
            "edges": {lab: [ci(d[:, e, j]) for j in range(len(layers))] for e, lab in enumerate(f.params["edges"])},
            "object_minus_background_question": [ci(d[:, 0, j] - d[:, 1, j]) for j in range(len(layers))],
            "object_minus_background_query": [ci(d[:, 4, j] - d[:, 5, j]) for j in range(len(layers))]}
        f.save(out / name / f"knockout_w{w}")
    res["knockout"] = ko
    res["scenes"] = n_scenes
    # 2. attention localisation
    vqa = as_vqa_items(items, testbed_meta(m))
    f = ia.image_attention(m, vqa)
    f.save(out / name / "image_attention")
    res["localisation"] = {"table": f.table.round(4).to_dict("records"), **f.metrics}
    # 3. visual sinks (calibrated on the first 40 scenes, and again on another 40: are the dims stable?)
    fs = vs.visual_sinks(m, vqa)
    fs2 = vs.visual_sinks(m, as_vqa_items(localisation_items(40, seed=8), testbed_meta(m)))
    fs.save(out / name / "visual_sinks")
    res["visual_sinks"] = {**fs.metrics, "dims_other_prompts": fs2.metrics["dims"],
                           "heads": fs.table.round(3).to_dict("records")}
    # VHD sparsity: per layer max/median of VHD (mean over prompts), 1 and 3 generated tokens, pruned or not
    scenes = make_dataset(60, seed=11, split="test")
    sp = {}
    for qt, nt in (("colour", 1), ("caption", 3)):
        for prune in (True, False):
            V, ratios = [], []
            for s in scenes:
                q = s.question(qt)
                if q is None:
                    continue
                inp = build_inputs(tok, meta, s, q)
                if meta["kind"] == "diffusion":
                    inp = {"input_ids": torch.cat([inp["input_ids"], torch.full((1, meta["gen_len"]), meta["mask_token_id"])], 1),
                           "pixel_values": inp["pixel_values"]}
                    fv = vhd_mod.vhd(m, inp, answer_ids=[0], position=-meta["gen_len"], prune=prune)
                else:
                    fv = vhd_mod.vhd(m, inp, n_tokens=nt, prune=prune)
                V.append(fv.arrays["vhd"])
                ratios.append(fv.metrics["max_over_median_by_layer"])
            V = torch.cat(V)
            r = torch.tensor(ratios)
            mean = V.mean(0)
            sp[f"{qt}_{nt}tok_{'pruned' if prune else 'unpruned'}"] = {
                "steps": len(V), "ratio_of_mean_vhd": [round(float(x), 2) for x in mean.max(-1).values / mean.median(-1).values],
                "median_per_prompt_ratio": [round(float(x), 2) for x in r.median(0).values],
                "share_of_steps_ratio_gt3": [round(float(x), 3) for x in
                                             ((V.max(-1).values / V.median(-1).values.clamp_min(1e-9)) > 3).float().mean(0)]}
            if meta["kind"] == "diffusion":
                break
        if meta["kind"] == "diffusion":
            break
    res["vhd_sparsity"] = sp
    # 4. specs and their effect on the held-out task (accuracy and log p of the answer's first word)
    cal = localisation_items(40, seed=0)
    r0 = encode_items(m, cal[:1])
    pos = -meta["gen_len"] if meta["kind"] == "diffusion" else -1
    fv = vhd_mod.vhd(m, {"input_ids": r0.input_ids, "pixel_values": r0.extra["pixel_values"]}, position=pos,
                     **({"answer_ids": [0]} if meta["kind"] == "diffusion" else {}))
    specs = {"VAR (p=0.6)": fs.to_spec(model=m, p=0.6),
             "PAI (α=0.5)": f.to_spec(model=m, alpha=0.5),
             "VHR (α=2, last 2 layers)": fv.to_spec(model=m, alpha=2.0, last_n=2)}
    task = load_task("testbed_vqa")
    task_lp = Task("testbed_vqa_logprob", "vqa", [dict(it, score="logprob") for it in task.items])
    ev = {}
    for label, spec in specs.items():
        spec.save(out / name / "specs" / label.split()[0].lower())
        a = interp.evaluate(m, spec, task).metrics
        lp = interp.evaluate(m, spec, task_lp).metrics
        ev[label] = {"edits": spec.edits, "sink": spec.sink, "accuracy": {k: a[k] for k in ("without", "with", "delta", "delta_ci", "changed_items", "n")},
                     "logprob": {k: lp[k] for k in ("without", "with", "delta", "delta_ci", "changed_items")}}
    res["evaluate"] = ev
    res["seconds"] = round(time.time() - t, 1)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("out/vision"))
    ap.add_argument("--testbeds", default="llava_ar,llada_diffusion")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    allres = {n: run(n, a.scenes, a.out) for n in a.testbeds.split(",")}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(allres, indent=1, default=str))
    print(json.dumps(allres, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
