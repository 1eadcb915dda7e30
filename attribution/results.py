"""Measure the tables of attribution/RESULTS.md: LLaVA-CAM localisation per layer, attention shares, cliff
layer and truncation on the AR testbed; the Diffusion-CAM ablation on the diffusion testbed.

    .venv/bin/python -m attribution.results [--scenes 70] [--figures out/attribution]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch


def _md(df) -> str:
    cols = ["method", "layer", "pointing", "pointing_lo", "pointing_hi", "energy", "energy_lo", "energy_hi", "n"]
    cols = [c for c in cols if c in df]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df[cols].iterrows():
        lines.append("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=70)
    ap.add_argument("--figures", default=None, help="folder for the PNG figures")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import interp
    from attribution import cam, diffusion_cam
    from interp.testbed import load_testbed
    hf, tok, meta = load_testbed("llava_ar")
    ar = interp.load(hf, tokenizer=tok, name="testbed-llava-ar")
    f = cam.cam_localisation(ar, n_scenes=args.scenes, site="resid_pre", first_token=True)  # the tables' protocol
    print(f"## LLaVA-CAM localisation (AR testbed, {f.metrics['n_items']} items)\n\n{_md(f.table)}\n")
    print(f"attention share (image / bos / text) per layer: "
          f"{[round(x, 3) for x in f.metrics['attn_share_image']]} / {[round(x, 3) for x in f.metrics['attn_share_bos']]}"
          f" / {[round(x, 3) for x in f.metrics['attn_share_text']]}")
    print(f"cliff layer: {f.metrics['cliff_layer']}; truncation accuracy (image blocked after layer l): "
          f"{ {k: round(v, 3) for k, v in f.metrics['truncation_acc'].items()} }\n")
    hf2, tok2, meta2 = load_testbed("llada_diffusion")
    dm = interp.load(hf2, tokenizer=tok2, name="testbed-llada")
    d = diffusion_cam.diffusion_cam_localisation(dm, n_scenes=args.scenes)
    print(f"## Diffusion-CAM ablation (diffusion testbed, {d.metrics['n_items']} items, step {d.metrics['step_used']}, "
          f"layer {d.metrics['layer']}, contrast {d.metrics['contrast']})\n\n{_md(d.table)}\n")
    print("raw map by step / contrast / layer (pointing, energy):")
    for step in (0, None):
        for contrast in ("vocab_sum", "token"):
            for layer in range(dm.n_layers - 1):
                g = diffusion_cam.diffusion_cam_localisation(dm, n_scenes=args.scenes, step=step, layer=layer,
                                                             contrast=contrast, occlusion=False,
                                                             n_boot=200).table.set_index("method")
                print(f"  step {'final' if step is None else step:>5}  {contrast:<9}  layer {layer}: "
                      f"{g.loc['raw', 'pointing']:.3f}, {g.loc['raw', 'energy']:.3f}")
    if args.figures:
        out = Path(args.figures)
        out.mkdir(parents=True, exist_ok=True)
        f.plot().savefig(out / "cam_localisation.png", dpi=120)
        d.plot().savefig(out / "diffusion_cam_ablation.png", dpi=120)
        print(f"figures in {out}")


if __name__ == "__main__":
    main()
