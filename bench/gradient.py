"""Bench: a LLaVA-CAM map (interp capture with grad=True, every layer, attention reducers) and a plain
Grad-CAM map (one layer, no reducers) vs one plain forward + backward of the same model on the same inputs.

Model: the AR testbed (LlavaForConditionalGeneration, 3 layers, d = 64) on a batch of held-out prompts of
one length. The plain reference: ``hf(**inputs).logits[:, -1, target].sum()`` and
``torch.autograd.grad`` of it w.r.t. the pixel values (an input-gradient saliency map, the cheapest full
backward). Each row is timed round-robin, ``--repeats`` times after a warm-up; the median is reported.
Target: the CAM maps take <= 1.3x the plain forward + backward.

    .venv/bin/python bench/gradient.py [--batch 64 --repeats 7 --threads 1]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import loadavg, machine, median, offline, reproduce, table, versions  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    offline()
    torch.set_num_threads(args.threads)
    import interp
    from attribution.cam import cam_maps, testbed_batches
    from interp.testbed import load_testbed
    from interp.testbed.localize import localisation_items
    hf, tok, meta = load_testbed("llava_ar")
    model = interp.load(hf, tokenizer=tok, name="testbed-llava-ar")
    batches = testbed_batches(tok, meta, localisation_items(200), batch_size=args.batch)
    inputs, target, _ = max(batches, key=lambda b: len(b[2]))
    n = len(target)
    tgt = torch.tensor(target)

    def plain():
        px = inputs["pixel_values"].clone().requires_grad_(True)
        with torch.enable_grad():
            y = hf(input_ids=inputs["input_ids"], pixel_values=px).logits[:, -1].gather(1, tgt[:, None]).sum()
            torch.autograd.grad(y, px)

    rows = {"plain forward + backward (HF)": plain,
            "LLaVA-CAM, all layers + attention shares": lambda: cam_maps(model, inputs, target),
            "Grad-CAM, one layer": lambda: cam_maps(model, inputs, target, layers=[1])}
    times = {k: [] for k in rows}
    for fn in rows.values():  # warm-up
        fn()
    for _ in range(args.repeats):
        for k, fn in rows.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    base = median(times["plain forward + backward (HF)"])
    out = []
    for k, ts in times.items():
        r = median(ts) / base
        verdict = "" if k.startswith("plain") else ("yes" if r <= 1.3 else "NO")
        out.append([k, f"{median(ts) * 1e3:.1f}", f"{min(ts) * 1e3:.1f}", f"{r:.2f}x", verdict])
    print(f"\nGradient maps vs plain forward + backward: AR testbed, batch {n} x {inputs['input_ids'].shape[1]} "
          f"tokens, {args.threads} thread(s), median of {args.repeats}")
    print(f"machine: {machine()}, load average {loadavg()}\n{versions()}\n")
    print(table(["", "median ms", "min ms", "vs plain", "<= 1.3x"], out))
    print("\nreproduce: " + reproduce("gradient.py", sys.argv[1:]))


if __name__ == "__main__":
    main()
