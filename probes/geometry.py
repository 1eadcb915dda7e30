"""Geometry of step representations in multi-step prompts (docs/methods.md §10b).

Each prompt is a chain of steps s = 1…S (default: running sums built in code, "Start with 3. Add 4 to get 7. Add
2 to get 9. …"); step s is represented at layer l by the residual stream at its last token, r^l_{n,s} =
h^l[end of step s of prompt n] (``blocks.{l}.resid_post``). Per layer:

    cos^l[s, s']   = mean_n cos(r^l_{n,s}, r^l_{n,s'})                 (step × step similarity)
    dist^l[s, s']  = ‖μ^l_s − μ^l_{s'}‖ / mean_s ‖μ^l_s‖,  μ^l_s = mean_n r^l_{n,s}   (distance of step centroids)
    order^l        = held-out accuracy of a multinomial logistic regression s ← r^l_{n,s}
                     (prompts split 75/25, so no prompt is in both; chance 1/S)

and a low-rank view: the first two principal components of {r^l_{n,s} − mean} at the layer with the best order
accuracy. This is the plain representational-geometry reading used to ask whether latent reasoning steps are
laid out in order (cosine/PCA views as in representational similarity analysis, Kriegeskorte et al. 2008;
decodability as in linear probes, Alain & Bengio 2016). A caveat the Finding states: step index goes with token
position, so high decodability alone does not show the model represents *steps* rather than positions.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import interp
from interp.analysis import Analysis
from interp.finding import Finding, digest


def chain_prompts(n: int = 24, n_steps: int = 4, seed: int = 0) -> list[list[str]]:
    """``n`` chains of running sums, each as its list of step strings: "Start with a.", "Add b to get a+b.", …"""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = int(rng.integers(1, 10))
        steps = [f"Start with {x}."]
        for _ in range(n_steps - 1):
            b = int(rng.integers(1, 10))
            x += b
            steps.append(f"Add {b} to get {x}.")
        out.append(steps)
    return out


def step_positions(tok, steps: Sequence[str]) -> tuple[list[int], list[int]]:
    """Token ids of " ".join(steps) and the position of each step's last token (by character offsets)."""
    text = " ".join(steps)
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=True)
    ends, at = [], 0
    for s in steps:
        end = at + len(s)  # character end of this step
        pos = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b <= end and b > a]
        ends.append(pos[-1])
        at = end + 1
    return list(enc["input_ids"]), ends


def _figure(finding: Finding, **kw):
    import matplotlib.pyplot as plt
    t = finding.table
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(t.layer, t.order_accuracy, label="step order decoded (held out)")
    a.plot(t.layer, t.cos_adjacent, label="cos, adjacent steps")
    a.plot(t.layer, t.cos_first_last, label="cos, first vs last step")
    a.axhline(finding.metrics["chance"], color="0.5", lw=0.8, ls="--", label="chance")
    a.set_xlabel("layer"), a.set_ylabel("value"), a.legend(fontsize=7)
    pcs, steps = finding.arrays["pca"].numpy(), finding.arrays["step"].numpy()
    sc = b.scatter(pcs[:, 0], pcs[:, 1], c=steps + 1, cmap="viridis", s=14)
    fig.colorbar(sc, ax=b, label="step")
    ev = finding.metrics["pca_explained"]
    b.set_xlabel(f"PC1 ({ev[0] * 100:.0f} %)"), b.set_ylabel(f"PC2 ({ev[1] * 100:.0f} %)")
    b.set_title(f"layer {finding.metrics['pca_layer']}")
    fig.suptitle("Step representations")
    fig.tight_layout()
    return fig


class Geometry(Analysis):
    """Cosines, centroid distances, a PCA view and step-order decodability of step representations per layer."""

    name = "probes.geometry"
    title = "Geometry of reasoning steps"
    in_scan = False
    figures = (_figure, None)

    def run(self, model: interp.Model, inputs: Sequence[Sequence[str]] | None = None, *, n: int = 24,
            n_steps: int = 4, seed: int = 0, test_size: float = 0.25) -> Finding:
        """``inputs``: prompts, each a list of its step strings (joined with spaces), all with the same number
        of steps; None: ``n`` running-sum chains of ``n_steps`` steps (``seed``)."""
        chains = chain_prompts(n, n_steps, seed) if inputs is None else [list(c) for c in inputs]
        if not chains or any(isinstance(c, str) for c in chains) or len({len(c) for c in chains}) != 1 \
                or len(chains[0]) < 2:
            raise interp.InterpError("geometry inputs: a list of prompts, each a list of ≥ 2 step strings, all with "
                                     "the same number of steps (e.g. [['Start with 3.', 'Add 4 to get 7.'], …])")
        if len(chains) < 4:
            raise interp.InterpError(f"{len(chains)} prompts: give at least 4 so that some are held out")
        tok = model.tokenizer
        if tok is None:
            raise interp.InterpError("geometry needs the model's tokenizer to find where each step ends")
        S = len(chains[0])
        reps = []
        for c in chains:
            ids, ends = step_positions(tok, c)
            tr = interp.capture(model, {"input_ids": torch.tensor([ids])}, sites="blocks.*.resid_post")
            reps.append(tr.stack("resid_post")[:, 0, ends].float())  # [L, S, d]
        R = torch.stack(reps, 1).double()  # [L, N, S, d]
        L, N = R.shape[:2]
        Rn = R / R.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        cos = torch.einsum("lnsd,lntd->lst", Rn, Rn) / N  # [L, S, S]
        mu = R.mean(1)  # [L, S, d]
        dist = torch.cdist(mu, mu) / mu.norm(dim=-1).mean(-1)[:, None, None]
        rng = np.random.default_rng(seed)
        test = rng.permutation(N)[:max(1, int(round(test_size * N)))]
        train = np.setdiff1d(np.arange(N), test)
        y = np.tile(np.arange(S), N).reshape(N, S)
        acc = []
        for l in range(L):
            X = R[l].numpy()
            clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
            clf.fit(X[train].reshape(-1, X.shape[-1]), y[train].reshape(-1))
            acc.append(float(clf.score(X[test].reshape(-1, X.shape[-1]), y[test].reshape(-1))))
        adj = [float(np.mean([cos[l, s, s + 1] for s in range(S - 1)])) for l in range(L)]
        table = pd.DataFrame({"layer": np.arange(L), "order_accuracy": acc, "cos_adjacent": adj,
                              "cos_first_last": cos[:, 0, S - 1].numpy(),
                              "centroid_dist_adjacent": [float(np.mean([dist[l, s, s + 1] for s in range(S - 1)]))
                                                         for l in range(L)]})
        best = int(np.argmax(acc))  # ties: the earliest layer
        X = R[best].reshape(N * S, -1).numpy()
        pca = PCA(2).fit(X)
        metrics = {"n_prompts": N, "n_steps": S, "chance": 1 / S, "best_layer": best, "best_order_accuracy": acc[best],
                   "pca_layer": best, "pca_explained": [float(v) for v in pca.explained_variance_ratio_],
                   "cos_adjacent_at_best": adj[best], "cos_first_last_at_best": float(cos[best, 0, S - 1])}
        notes = ["step index goes with token position: decodable order alone does not separate steps from positions"]
        return Finding(self.name, table, {"n": N, "n_steps": S, "seed": seed, "test_size": test_size,
                                          "builtin": inputs is None}, model.identity(), digest(chains), metrics,
                       {"cos": cos.float(), "centroid_dist": dist.float(), "pca": torch.tensor(pca.transform(X)).float(),
                        "step": torch.tensor(y.reshape(-1))}, notes)

    def explain(self, finding: Finding) -> str:
        m = finding.metrics
        return (f"Step order is decodable from layer {m['best_layer']} with {m['best_order_accuracy'] * 100:.0f} % "
                f"held-out accuracy (chance {m['chance'] * 100:.0f} %); there, adjacent steps have cosine "
                f"{m['cos_adjacent_at_best']:.2f} and the first and last {m['cos_first_last_at_best']:.2f}, and two "
                f"principal components hold {sum(m['pca_explained']) * 100:.0f} % of the variance.")


geometry = Geometry()
