#!/usr/bin/env python
"""VHD sparsity of an AR testbed checkpoint (probes/VISION_RESULTS.md §3): per layer, max/median over the heads
of the mean VHD at the first generated token of every question of 40 held-out scenes, with and without outlier
pruning (the median as torch.median, the lower middle value for an even head count, and as the mean of the two
middle values), the share of prompts whose own ratio is above 3, and each head's mean VHD; then where each head's
answer query attends (<bos>, the patches of any object, the background patches, the text).

    .venv/bin/python scripts/vhd_sparsity.py [CHECKPOINT]     # default: the committed llava_ar
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import interp  # noqa: E402
from interp.testbed import build_inputs, load_testbed, make_dataset, object_patch_mask  # noqa: E402
from probes import vhd as vhd_mod  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?", default="llava_ar")
    ap.add_argument("--scenes", type=int, default=40)
    a = ap.parse_args(argv)
    hf, tok, meta = load_testbed(a.checkpoint)
    if meta["kind"] != "ar":
        raise SystemExit("scripts/vhd_sparsity.py measures autoregressive testbeds (kind 'ar')")
    m = interp.load(hf, tokenizer=tok, name=Path(a.checkpoint).name)
    scenes = make_dataset(a.scenes, seed=11, split="test")
    for prune in (True, False):
        V = torch.cat([vhd_mod.vhd(m, build_inputs(tok, meta, s, q), n_tokens=1, prune=prune).arrays["vhd"]
                       for s in scenes for q in s.questions(random.Random(0))])  # [prompts, L, H]
        mean = V.mean(0)
        share = ((V.max(-1).values / V.median(-1).values.clamp_min(1e-9)) > 3).float().mean(0)
        print(f"outlier pruning {'on' if prune else 'off'}, {len(V)} prompts")
        print("  max/median of the mean VHD per layer:", " / ".join(f"{float(x):.2f}" for x in mean.max(-1).values / mean.median(-1).values))
        print("  same, median = mean of the middle two:", " / ".join(f"{float(x):.2f}" for x in mean.max(-1).values / mean.quantile(0.5, -1)))
        print("  share of prompts above 3 per layer:  ", " / ".join(f"{float(x):.2f}" for x in share))
        for layer, row in enumerate(mean):
            print(f"  layer {layer} mean VHD per head:", " ".join(f"{float(x):.2f}" for x in row))
    off, n_img = meta["image_token_offset"], meta["n_image_tokens"]
    mass = []
    for s in scenes:
        obj = torch.zeros(n_img, dtype=torch.bool)
        for i in range(len(s.objects)):
            obj |= object_patch_mask(s, i)
        for q in s.questions(random.Random(0)):
            p = interp.capture(m, build_inputs(tok, meta, s, q), sites="blocks.*.attn.pattern").stack("attn.pattern")[:, 0, :, -1]
            img = p[..., off:off + n_img]
            mass.append(torch.stack([p[..., 0], img[..., obj].sum(-1), img[..., ~obj].sum(-1),
                                     p.sum(-1) - p[..., 0] - img.sum(-1)], -1))
    mass = torch.stack(mass).mean(0)  # [L, H, 4]
    print("attention of the answer query, mean over prompts: <bos> / object patches / background patches / text")
    for layer, row in enumerate(mass):
        print(f"  layer {layer}:", "  ".join("/".join(f"{float(x):.2f}" for x in h) for h in row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
