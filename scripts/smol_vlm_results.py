#!/usr/bin/env python
"""Vision phenomena on ``smol_llava`` (SmolLM2-135M-Instruct + a trained 16-token vision tower), for
probes/VISION_RESULTS.md §5. CPU, 1 thread.

    .venv/bin/python scripts/smol_vlm_results.py [--scenes 40] [--out out/smol_vlm]

Measures, on held-out scenes (``localisation_items(n, seed=0)``, test split):

1. massive activations (Sun et al., ``probes.massive``) on SmolLM2's own text prompts, and the same finder
   (``find_massive``) on the VQA sequences: do image tokens carry massive activations (TokenTruth's phenomenon)?
   Per layer also the largest |h| at the first token, at the image tokens and at the other text tokens;
2. visual sinks (``probes.visual_sinks``): the sink dims, image sinks per prompt by layer, background share,
   image-centric heads;
3. VHD sparsity (``probes.vhd``): per layer max/median VHD over heads, one answer token per colour question;
4. cross-modal flow (``probes.knockout``): image -> question, image -> last, question -> last, blocked in
   5-layer windows; and ``probes.image_attention`` (attention localisation on the object).

Writes ``out/smol_vlm/results.json`` and prints the tables.
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
from interp.tasks import bootstrap_ci  # noqa: E402
from interp.testbed import build_inputs, load_testbed, make_dataset  # noqa: E402
from interp.testbed.items import answer_ids, as_vqa_items, encode_items, testbed_meta  # noqa: E402
from interp.testbed.localize import localisation_items  # noqa: E402
from probes import image_attention as ia, visual_sinks as vs, vhd as vhd_mod  # noqa: E402
from probes.knockout import knockout  # noqa: E402
from probes.massive import Massive, find_massive  # noqa: E402

EDGES = [("role:image", "role:question"), ("role:image", "role:query"), ("role:question", "role:query"),
         ("role:object", "role:query"), ("role:background", "role:query")]


def ci(x) -> dict | None:
    if len(x) == 0:  # no item answered correctly: nothing to measure
        return None
    m, lo, hi = bootstrap_ci(list(map(float, x)))
    return {"mean": round(m, 2), "ci": [round(lo, 2), round(hi, 2)]}


def massive_on_images(m: interp.Model, batch) -> dict:
    """find_massive on the VQA sequences, and per layer the largest |h| by token kind."""
    H = interp.capture(m, batch, sites="blocks.*.resid_post").stack("resid_post")  # [L, b, T, d]
    valid = batch.attention_mask.bool()
    rows, dense = find_massive(H, valid)
    kinds = {"first": torch.zeros_like(valid), "image": torch.zeros_like(valid)}
    for i, r in enumerate(batch.roles):
        kinds["first"][i, 0] = True
        kinds["image"][i, r["image"]] = True
    kinds["text"] = valid & ~kinds["first"] & ~kinds["image"]
    A = H.abs().amax(-1)  # [L, b, T]
    per_layer = {k: [round(float(A[l][v].max()), 1) for l in range(H.shape[0])] for k, v in kinds.items()}
    med = [round(float(torch.stack([H[l, i][valid[i]].abs().median() for i in range(H.shape[1])]).mean()), 3)
           for l in range(H.shape[0])]
    img_pos = [set(r["image"]) for r in batch.roles]
    hits = [dict(r, kind="image" if r["token"] in img_pos[r["prompt"]] else ("first" if r["token"] == 0 else "text"),
                 token_str=batch.tokens[r["prompt"]][r["token"]]) for r in rows]
    by_kind = {k: sum(h["kind"] == k for h in hits) for k in ("first", "image", "text")}
    img_hits = [h for h in hits if h["kind"] == "image"]
    return {"n_hits": len(hits), "hits_by_kind": by_kind, "dims": sorted({h["dim"] for h in hits}),
            "layers": sorted({h["layer"] for h in hits}), "dense_layers": sorted({l for l, _ in dense}),
            "image_hit_tokens": sorted({h["token"] for h in img_hits}),
            "image_hit_prompts": len({h["prompt"] for h in img_hits}),
            "text_hit_tokens": sorted({h["token_str"] for h in hits if h["kind"] == "text"}),
            "max_abs_by_layer": per_layer, "median_abs_by_layer": med}


def run(n_scenes: int, out: Path, checkpoint: str = "smol_llava") -> dict:
    hf, tok, meta = load_testbed(checkpoint)
    m = interp.load(hf, tokenizer=tok, name="smol_llava")
    res: dict = {"scenes": n_scenes, "n_layers": m.n_layers, "n_heads": m.n_heads, "d_model": m.d_model}
    items = localisation_items(n_scenes, seed=0)
    vqa = as_vqa_items(items, testbed_meta(m))
    batch = encode_items(m, items)
    t = time.time()
    # 1. massive activations: SmolLM2 on text, then the VQA sequences
    fm = Massive().run(m, ablation=False)
    fm.save(out / "massive_text")
    res["massive_text"] = {k: fm.metrics.get(k) for k in ("n_hits", "dims", "first_layer", "layers", "max_abs",
                                                           "token0_is_massive", "first_layer_tokens", "dense_layers")}
    res["massive_image"] = massive_on_images(m, batch)
    res["t_massive"] = round(time.time() - t, 1)
    # 2. visual sinks
    fs = vs.visual_sinks(m, vqa)
    fs.save(out / "visual_sinks")
    res["visual_sinks"] = {**{k: v for k, v in fs.metrics.items()}, "heads": fs.table.round(3).to_dict("records")}
    res["t_visual_sinks"] = round(time.time() - t, 1)
    # 3. VHD sparsity, one answer token per colour question
    V = []
    for s in make_dataset(max(10, n_scenes // 2), seed=11, split="test"):
        q = s.question("colour")
        if q is None:
            continue
        fv = vhd_mod.vhd(m, build_inputs(tok, meta, s, q), n_tokens=1)
        V.append(fv.arrays["vhd"])
    V = torch.cat(V)  # [steps, L, H]
    mean = V.mean(0)
    res["vhd"] = {"steps": len(V),
                  "ratio_of_mean_vhd": [round(float(x), 2) for x in mean.max(-1).values / mean.median(-1).values],
                  "median_per_prompt_ratio": [round(float(x), 2) for x in
                                              (V.max(-1).values / V.median(-1).values.clamp_min(1e-9)).median(0).values],
                  "top_heads": [[int(l), int(h), round(float(mean[l, h]), 3)] for l, h in
                                zip(*torch.unravel_index(mean.flatten().topk(8).indices, mean.shape))]}
    res["t_vhd"] = round(time.time() - t, 1)
    # 4. cross-modal flow: knockout in 5-layer windows, and attention localisation
    y = answer_ids(m, items).tolist()
    layers = list(range(2, m.n_layers, 5))
    f = knockout(m, inputs=batch, edges=EDGES, window=5, layers=layers, answers=y, progress=False)
    f.save(out / "knockout_w5")
    d = f.arrays["per_item"]  # [n, E, layers]
    res["knockout"] = {"n_items": f.metrics["n_items"], "n_dropped": f.metrics["n_dropped"], "window": 5,
                       "layers": layers,
                       "edges": {lab: [ci(d[:, e, j]) for j in range(len(layers))]
                                 for e, lab in enumerate(f.params["edges"])}}
    res["t_knockout"] = round(time.time() - t, 1)
    fa = ia.image_attention(m, vqa, occlusion=False)
    fa.save(out / "image_attention")
    res["image_attention"] = {k: v for k, v in fa.metrics.items() if not isinstance(v, dict) or len(str(v)) < 2000}
    res["seconds"] = round(time.time() - t, 1)
    return res


def table(res: dict) -> str:
    L = res["n_layers"]
    mi = res["massive_image"]["max_abs_by_layer"]
    lines = ["| layer | max abs h: first token | image tokens | other text | median abs h | VHD max/median | "
             "image→query Δ% (window 5) | question→query Δ% |", "|---|---|---|---|---|---|---|---|"]
    ko = res["knockout"]
    ko_at = {l: j for j, l in enumerate(ko["layers"])}
    edges = ko["edges"]
    e_iq = next(k for k in edges if k.startswith("role:image") and "query" in k)
    e_qq = next(k for k in edges if k.startswith("role:question"))
    for l in range(L):
        j = ko_at.get(l)
        a = f"{edges[e_iq][j]['mean']} {edges[e_iq][j]['ci']}" if j is not None and edges[e_iq][j] else ""
        b = f"{edges[e_qq][j]['mean']} {edges[e_qq][j]['ci']}" if j is not None and edges[e_qq][j] else ""
        lines.append(f"| {l} | {mi['first'][l]} | {mi['image'][l]} | {mi['text'][l]} | "
                     f"{res['massive_image']['median_abs_by_layer'][l]} | {res['vhd']['ratio_of_mean_vhd'][l]} | {a} | {b} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=40, help="held-out scenes (localisation_items, test split)")
    ap.add_argument("--out", type=Path, default=Path("out/smol_vlm"), help="findings and results.json go here")
    ap.add_argument("--checkpoint", default="smol_llava", help="testbed name or checkpoint folder")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    res = run(a.scenes, a.out, a.checkpoint)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    short = {k: v for k, v in res.items() if k not in ("visual_sinks", "knockout")}
    print(json.dumps(short, indent=1, default=str))
    vsm = {k: v for k, v in res["visual_sinks"].items() if k != "heads"}
    print(json.dumps(vsm, indent=1, default=str))
    print(json.dumps(res["knockout"], default=str))
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
