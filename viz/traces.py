"""Figures of a :class:`interp.Trace`: an attention pattern with its tokens, and a per-layer summary of any
captured site (``trace.plot(...)`` draws these once viz is imported)."""
from __future__ import annotations

import matplotlib as mpl
import numpy as np
import plotly.graph_objects as go
from matplotlib.figure import Figure

from interp.errors import InterpError

from .static import STYLE, clean_token, heat, new_fig


def _tokens(trace, b: int, n: int) -> list[str]:
    toks = trace.tokens[b] if trace.tokens and b < len(trace.tokens) else [str(i) for i in range(n)]
    return [clean_token(t, 12) for t in toks[:n]]


def attention(trace, layer: int, head: int | str = "mean", batch: int = 0, interactive: bool = False):
    """The captured pattern of one head (or the mean over heads) of ``layer``, queries × keys, tokens on the axes;
    padding left out."""
    name = f"blocks.{layer}.attn.pattern"
    if name not in trace:
        raise InterpError(f"{name} was not captured: capture with sites='blocks.*.attn.pattern' to draw it")
    A = trace[name][batch].float()
    n = int(trace.attention_mask[batch].sum())
    M = (A.mean(0) if head == "mean" else A[int(head)])[:n, :n].numpy()
    toks = _tokens(trace, batch, n)
    what = "mean over heads" if head == "mean" else f"head {head}"
    if interactive:
        fig = go.Figure(go.Heatmap(z=M, x=list(range(n)), y=list(range(n)), colorscale="Viridis", zmin=0,
                                   customdata=np.array([[f"{toks[q]} → {toks[k]}" for k in range(n)] for q in range(n)]),
                                   hovertemplate="%{customdata}<br>weight %{z:.3f}<extra></extra>",
                                   colorbar={"title": "weight"}))
        fig.update_layout(title=f"layer {layer}, {what}", height=520, margin={"l": 60, "r": 20, "t": 50, "b": 60},
                          xaxis={"title": "key", "tickvals": list(range(n)), "ticktext": toks},
                          yaxis={"title": "query", "autorange": "reversed", "tickvals": list(range(n)), "ticktext": toks})
        return fig
    with mpl.rc_context(STYLE):
        size = max(3.6, min(9.0, 0.22 * n + 1.8))
        fig, (ax,) = new_fig(1, (size + 0.9, size))
        M = np.where(np.tril(np.ones_like(M)) > 0, M, np.nan) if np.allclose(np.triu(M, 1), 0) else M
        heat(fig, ax, M, xlabel="key", ylabel="query", cbar="attention weight", vmin=0,
             xlabels=toks, ylabels=toks)
        ax.set_title(f"layer {layer}, {what}")
    return fig


def site_norms(trace, kind: str = "resid_post", batch: int = 0, interactive: bool = False):
    """‖x‖ of each token at each layer for a captured residual-like site (layers × tokens, log colour scale)."""
    layers = trace.layers(kind)
    if not layers:
        raise InterpError(f"no {kind!r} sites in this trace: capture e.g. sites='blocks.*.{kind}'")
    n = int(trace.attention_mask[batch].sum())
    M = np.stack([trace[f"blocks.{l}.{kind}"][batch, :n].float().norm(dim=-1).numpy() for l in layers])
    toks = _tokens(trace, batch, n)
    if interactive:
        fig = go.Figure(go.Heatmap(z=np.log10(M), x=list(range(n)), y=layers, colorscale="Viridis",
                                   customdata=M, hovertemplate="layer %{y}, token %{x}<br>‖x‖ %{customdata:.1f}<extra></extra>",
                                   colorbar={"title": "log10 ‖x‖"}))
        fig.update_layout(title=f"‖{kind}‖ by layer and token", height=460,
                          xaxis={"title": "token", "tickvals": list(range(n)), "ticktext": toks},
                          yaxis={"title": "layer", "autorange": "reversed"})
        return fig
    with mpl.rc_context(STYLE):
        fig, (ax,) = new_fig(1, (max(4.5, min(11.0, 0.3 * n + 2.0)), max(3.0, min(8.0, 0.18 * len(layers) + 1.5))))
        heat(fig, ax, M, xlabel="token", ylabel="layer", cbar=f"‖{kind}‖ (log scale)", xlabels=toks, yvals=layers,
             norm=mpl.colors.LogNorm(vmin=max(float(M.min()), 1e-6), vmax=float(M.max())))
        ax.set_title(f"‖{kind}‖ by layer and token")
    return fig
