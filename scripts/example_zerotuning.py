"""README example: find sink heads on SmolLM2, scale their first-token attention (ZeroTuning-style), and
evaluate the spec on shipped task sets with bootstrap confidence intervals.

    .venv/bin/python scripts/example_zerotuning.py
"""
import torch

import interp
from probes.sinks import sinks

torch.set_num_threads(2)
model = interp.load("smollm2")
finding = sinks(model)
print(finding.summary())
for gamma in (0.6, 1.5):
    spec = finding.to_spec(model=model, gamma=gamma, layers=list(range(2, 10)))
    spec.save(f"out/specs/zerotuning_gamma{gamma}.json")
    n_heads = sum(len(e["heads"]) for e in spec.edits)
    for task in ("capitals", "sentiment"):
        m = interp.evaluate(model, spec, task).metrics
        print(f"gamma={gamma} ({n_heads} sink heads in layers 2-9) {task} (n={m['n']}): "
              f"without {m['without']:.3f} [{m['without_ci'][0]:.3f}, {m['without_ci'][1]:.3f}]  "
              f"with {m['with']:.3f} [{m['with_ci'][0]:.3f}, {m['with_ci'][1]:.3f}]  "
              f"delta {m['delta']:+.3f} [{m['delta_ci'][0]:+.3f}, {m['delta_ci'][1]:+.3f}]")
