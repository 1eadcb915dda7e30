"""Where factual recall travels in SmolLM2, by four causal tools side by side (README "Causal selection" table).

For the built-in capital facts ("The capital of France is" → " Paris", …):

* routes (``probes.routes``, τ = 0.04, one forward per fact): the layers whose head edges go straight from a
  subject token to the last position, with their summed importance;
* knockout (``probes.knockout``, last → subject blocked in 9-layer windows centred on every 3rd layer): the
  window centre with the largest drop of the answer's probability;
* activation patching (``probes.patching``, residual stream, each capital fact restored into the next one's
  prompt): per layer, the share of the logit difference restored by the subject's last token and by the last
  position — the layer where the second overtakes the first is where the information has moved;
* direct logit attribution (``probes.dla``): the top heads writing logit(answer) − logit(foil).

    .venv/bin/python scripts/causal_results.py [--threads 2]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import interp  # noqa: E402
from interp.prompts import facts  # noqa: E402
from probes.dla import dla  # noqa: E402
from probes.knockout import knockout  # noqa: E402
from probes.patching import default_pairs, patching  # noqa: E402
from probes.routes import routes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.time()
    model = interp.load("smollm2")
    fs = [f for f in facts() if f["prompt"].startswith("The capital of")]
    L = model.n_layers
    print(f"SmolLM2-135M-Instruct, {len(fs)} capital facts, {L} layers")

    print("\nroutes (tau = 0.04): direct subject -> last head edges")
    by_layer = torch.zeros(L)
    for f in fs:
        b = model.encode(f["prompt"], roles={"subject": f["subject"]})
        subj = set(b.roles[0]["subject"])
        r = routes(model, b)
        t = r.table
        d = t[(t.kind == "head") & t.source.isin(subj) & (t.target == r.metrics["position"])]
        layers = sorted(set(int(x) for x in d.layer))
        for l, v in d.groupby("layer").importance.sum().items():
            by_layer[int(l)] += float(v) / len(fs)
        print(f"  {f['prompt']!r:32} layers {layers}")
    top = [int(l) for l in by_layer.argsort(descending=True)[:5]]
    print(f"  mean importance by layer (top 5): " + ", ".join(f"{l}: {by_layer[l]:.3f}" for l in top))

    print("\nknockout (last -> subject blocked, 9-layer windows centred on every 3rd layer)")
    ko = knockout(model, [{"prompt": f["prompt"], "subject": f["subject"]} for f in fs],
                  layers=list(range(0, L, 3)), progress=False)
    tab = ko.table
    col = "delta_pct" if "delta_pct" in tab.columns else [c for c in tab.columns if "delta" in c][0]
    mean = tab.groupby("layer")[col].mean()
    print("  mean Δ% by window centre: " + ", ".join(f"{int(l)}: {v:+.1f}" for l, v in mean.items()))
    print(f"  largest drop: window centred on layer {int(mean.idxmin())} ({mean.min():+.1f} %)")

    print("\nactivation patching (resid_pre, clean fact restored into the next fact's prompt, logit difference)")
    clean, corr, ans, foils = default_pairs()
    p = patching(model, clean, corrupted=corr, answers=ans, foils=foils, sites=["resid_pre"])
    arr = p.arrays["resid_pre"]  # [L, T]
    b0 = model.encode(clean[0], roles={"subject": fs[0]["subject"]})
    s_last = max(b0.roles[0]["subject"])
    T = arr.shape[1]
    subj_curve, last_curve = arr[:, s_last], arr[:, T - 1]
    cross = next((l for l in range(L) if last_curve[l] > subj_curve[l]), None)
    print("  layer: restored at subject's last token / at the last position")
    for l in range(0, L, 3):
        print(f"  {l:2d}: {subj_curve[l]:+.2f} / {last_curve[l]:+.2f}")
    print(f"  the last position overtakes the subject at layer {cross}")

    print("\ndirect logit attribution (logit(answer) - logit(next fact's answer), mean over facts)")
    tot = None
    for c, a_, f_ in zip(clean, ans, foils):
        d = dla(model, c, target=a_, foil=f_)
        h = d.table[d.table.kind == "head"].set_index(["layer", "head"]).score
        tot = h if tot is None else tot.add(h, fill_value=0)
    if tot is not None:
        tot = tot / len(clean)
        best = tot.sort_values(ascending=False).head(5)
        print("  top heads: " + ", ".join(f"L{l}H{h} {v:+.2f}" for (l, h), v in best.items()))
    print(f"\n{time.time() - t0:.0f} s; reproduce: .venv/bin/python scripts/causal_results.py --threads {a.threads}")


if __name__ == "__main__":
    main()
