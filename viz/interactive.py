"""Interactive (plotly) figures of findings: the same panels as :mod:`viz.static`, with hover text that
shows every value and its labels. Token axes are numeric with token tick labels (plotly merges repeated
category names), and the token string is repeated in the hover text.
"""
from __future__ import annotations

import html

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .static import (GREY, NEG, OKABE_ITO, POS, arr, causal_masked, clean_token, has, image_hwc, is_signed,
                     knockout_xlabel, LENS_CHAR_PX,
                     layer_curve_cols, lifetime_rows, logit_lens_grid, pick_map, pivot, saliency_map,
                     score_col, step_labels, massive_dims, sym_lim, table, title_of, token_labels, type_color, value_error_cols,
                     LABEL_COLS)

FONT = dict(family="DejaVu Sans, Arial, sans-serif", size=13)


def _h(s) -> str:
    """Plotly reads a subset of HTML in every text: escape tokens such as ``<s>``."""
    return html.escape(str(s), quote=False)


def _hl(labels) -> list[str]:
    return [_h(x) for x in labels]


def _cbar(fig, col: int = 1, title: str = "", n_cols: int = 1) -> dict:
    """A colorbar just right of subplot ``col`` (outside it, clear of the next subplot's axis)."""
    if n_cols == 1:
        x = 1.02
    else:
        dom = fig.layout["xaxis" if col == 1 else f"xaxis{col}"].domain
        x = dom[1] + 0.01
    return dict(title=dict(text=_h(title), side="right"), x=x, xanchor="left", len=0.85, thickness=14)


def _int_axis(values) -> dict:
    """Every integer tick on a short layer/head axis."""
    v = [x for x in values if isinstance(x, (int, np.integer))]
    return dict(tickmode="linear", dtick=1) if v and len(values) <= 24 else {}


def _log_axis(values) -> dict:
    """Log axis with a tick per power of ten when the data span more than two decades."""
    v = np.asarray([x for x in np.ravel(values) if x is not None and np.isfinite(x) and x > 0], float)
    span = np.log10(v.max() / v.min()) if v.size else 0
    return dict(type="log", dtick=1, exponentformat="power" if v.size and v.max() >= 1e5 else "none") if span > 2 \
        else dict(type="log")


def _layout(fig: go.Figure, title: str, height: int = 460, **kw) -> go.Figure:
    base = dict(template="plotly_white", title=dict(text=title, x=0.01, xanchor="left"), font=FONT, height=height,
                margin=dict(l=60, r=30, t=70, b=60), hoverlabel=dict(font_size=12),
                legend=dict(bgcolor="rgba(255,255,255,0.6)"))
    for k, v in kw.items():
        base[k] = {**base[k], **v} if isinstance(base.get(k), dict) and isinstance(v, dict) else v
    fig.update_layout(**base)
    return fig


def _grid(M) -> list:
    """A matrix as nested lists with None for NaN (JSON-safe, shown as gaps)."""
    M = np.asarray(M, float)
    return [[None if not np.isfinite(v) else float(v) for v in row] for row in M]


def _heat_kw(M, cmap="Viridis", signed=None, zmin=None, zmax=None) -> dict:
    if signed is None:
        signed = is_signed(M)
    if signed:
        lim = sym_lim(M)
        return dict(colorscale="RdBu_r", zmid=0, zmin=-lim, zmax=lim)
    kw = dict(colorscale=cmap)
    if zmin is not None:
        kw["zmin"] = zmin
    if zmax is not None:
        kw["zmax"] = zmax
    return kw


def _tick_axis(labels: list[str], max_labels: int = 60) -> dict:
    """Numeric positions with (escaped) text labels: repeated tokens stay distinct."""
    n = len(labels)
    step = 1 if n <= max_labels else int(np.ceil(n / 30))
    return dict(tickmode="array", tickvals=list(range(0, n, step)), ticktext=_hl(labels[::step]))


def _hover_rows(d: pd.DataFrame) -> list[str]:
    return ["<br>".join(f"{_h(k)}: {_h(clean_token(v, 40) if isinstance(v, str) else v)}" for k, v in r.items())
            for r in d.to_dict("records")]


def _layer_head_heat(fig, rows, cols, M, name, col=1, n_cols=1, cmap="Viridis", **hk):
    return go.Heatmap(z=_grid(M), x=cols, y=rows, hoverongaps=False, name=_h(name),
                      colorbar=_cbar(fig, col, name, n_cols),
                      hovertemplate="layer %{y}<br>head %{x}<br>" + _h(name) + " %{z:.4g}<extra></extra>",
                      **_heat_kw(M, cmap, **hk))


def _layer_head_axes(fig, rows, cols, row=None, col=None):
    fig.update_xaxes(title_text="head", row=row, col=col, showgrid=False, zeroline=False, **_int_axis(cols))
    fig.update_yaxes(title_text="layer", autorange="reversed", row=row, col=col, showgrid=False, zeroline=False, **_int_axis(rows))


def _layer_curves(fig, df, row=1, col=1, cols=None):
    cols = cols or layer_curve_cols(df)
    for i, c in enumerate(cols):
        g = df.groupby("layer")[c].agg(["mean", "std", "count"]).sort_index()
        fig.add_trace(go.Scatter(x=g.index.tolist(), y=g["mean"].tolist(), mode="lines+markers", name=_h(c),
                                 line=dict(color=OKABE_ITO[i % len(OKABE_ITO)]),
                                 customdata=np.stack([g["std"].fillna(0), g["count"]], 1).tolist(),
                                 hovertemplate="%{fullData.name}<br>layer %{x}<br>mean %{y:.4g} ± %{customdata[0]:.3g}"
                                 " (n=%{customdata[1]})<extra></extra>"), row=row, col=col)
    fig.update_xaxes(title_text="layer", row=row, col=col)
    fig.update_yaxes(title_text=_h(cols[0]) if len(cols) == 1 else "value", row=row, col=col)


def _empty(fig, text: str):
    fig.add_annotation(text=_h(text), showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5,
                       font=dict(size=15, color="#666"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)


# --------------------------------------------------------------------------------------------
def generic(finding, **kw) -> go.Figure:
    df = table(finding)
    sc = score_col(df)
    if has(df, "layer", "head") and sc is not None:
        M, rows, cols = pivot(df, "layer", "head", sc)
        fig = go.Figure()
        fig.add_trace(_layer_head_heat(fig, rows, cols, M, sc))
        _layer_head_axes(fig, rows, cols)
        return _layout(fig, _h(title_of(finding)), max(380, min(900, 14 * len(rows) + 160)))
    pairs = value_error_cols(df)
    fig = go.Figure()
    if not len(df) or not pairs:
        _empty(fig, "empty table" if not len(df) else "no numeric score column")
        return _layout(fig, _h(title_of(finding)), 300)
    d = df if len(df) <= 40 else df.loc[df[pairs[0][0]].abs().nlargest(40).index]
    lab_col = next((c for c in LABEL_COLS if c in d.columns), None)
    labels = ([clean_token(v, 24) for v in d[lab_col]] if lab_col else
              [str(v) for v in (d["layer"] if "layer" in d.columns else d.index)])
    hover = _hover_rows(d)
    for i, (c, e) in enumerate(pairs):
        fig.add_trace(go.Bar(x=list(range(len(d))), y=pd.to_numeric(d[c], errors="coerce").tolist(), name=_h(c),
                             marker_color=OKABE_ITO[i % len(OKABE_ITO)], hovertext=hover,
                             error_y=dict(type="data", array=pd.to_numeric(d[e], errors="coerce").tolist())
                             if e else None, hovertemplate="%{hovertext}<extra>%{fullData.name}</extra>"))
    fig.update_xaxes(title_text=_h(lab_col or "row"), **_tick_axis(labels))
    fig.update_yaxes(title_text=_h(pairs[0][0]) if len(pairs) == 1 else "value")
    return _layout(fig, _h(title_of(finding)), 420, barmode="group")


def sinks(finding, n_tokens: int = 16, **kw) -> go.Figure:
    """The mean importance of the first keys (left) and the layer × head sink score of token 0 (right, its
    colorbar at the figure's edge so that it never runs into the other panel at narrow widths)."""
    df = table(finding)
    sc = score_col(df)
    if not has(df, "layer", "head") or sc is None:
        return generic(finding, **kw)
    M, rows, cols = pivot(df, "layer", "head", sc)
    imp = arr(finding, "importance")
    two = imp is not None and imp.size > 0
    n = min(n_tokens, imp.shape[-1]) if two else 0
    hc = 2 if two else 1  # the heatmap's column
    fig = make_subplots(1, 2 if two else 1, column_widths=[0.45, 0.55] if two else None, horizontal_spacing=0.12,
                        subplot_titles=([f"mean α of the first {n} keys"] if two else []) +
                        ["α of token 0 (● sink head)"])
    nonneg = not is_signed(M)
    fig.add_trace(_layer_head_heat(fig, rows, cols, M, sc, hc, 1, signed=False if nonneg else None,
                                   zmin=0 if nonneg else None), 1, hc)
    if "is_sink" in df.columns:
        s = df[df["is_sink"].astype(bool)]
        fig.add_trace(go.Scatter(x=s["head"].tolist(), y=s["layer"].tolist(), mode="markers", name="sink head",
                                 marker=dict(color="black", size=7, line=dict(color="white", width=1)),
                                 customdata=s[sc].tolist(), showlegend=False,
                                 hovertemplate="sink head<br>layer %{y}, head %{x}<br>" + _h(sc) +
                                 " %{customdata:.4g}<extra></extra>"), 1, hc)
    _layer_head_axes(fig, rows, cols, 1, hc)
    if two:
        v = imp.reshape(-1, imp.shape[-1]).mean(0) if imp.ndim > 1 else imp
        labels = token_labels(finding, n)
        fig.add_trace(go.Bar(x=list(range(n)), y=v[:n].tolist(), customdata=_hl(labels), showlegend=False,
                             marker_color=[NEG if i == 0 else POS for i in range(n)],
                             hovertemplate="key %{x}: %{customdata}<br>mean α %{y:.4g}<extra></extra>"), 1, 1)
        fig.update_xaxes(title_text="key token", row=1, col=1, **_tick_axis(labels))
        fig.update_yaxes(title_text="mean importance α", row=1, col=1)
    eps = (finding.metrics or {}).get("epsilon")
    t = title_of(finding, "Attention sinks") + (f" (ε = {eps:.3g})" if isinstance(eps, (int, float)) else "")
    return _layout(fig, _h(t), max(420, min(900, 14 * len(rows) + 180)))


def secondary_sinks(finding, max_bars: int = 40, **kw) -> go.Figure:
    df = table(finding)
    if not has(df, "lifetime") or not len(df):
        return generic(finding, **kw)
    d = lifetime_rows(df, max_bars)
    fig = go.Figure()
    types = [t for t in dict.fromkeys(["bos_sink", "secondary", "noise"] + d["_type"].tolist()) if (d["_type"] == t).any()]
    extra = [c for c in ("prompt", "position", "token", "creation_layer", "lifetime") if c in d.columns]
    for i, t in enumerate(types):
        g = d[d["_type"] == t]
        fig.add_trace(go.Bar(x=g.index.tolist(), y=g["lifetime"].tolist(), name=_h(t.replace("_", " ")),
                             marker_color=type_color(t, i), hovertext=_hover_rows(g[extra]),
                             hovertemplate="%{hovertext}<extra>%{fullData.name}</extra>"))
    fig.update_xaxes(title_text="position (token)", **_tick_axis(d["_label"].tolist()))
    fig.update_yaxes(title_text="lifetime (layers)")
    return _layout(fig, _h(title_of(finding, "Secondary sinks")), 440, legend_title_text="sink type")


def massive(finding, window: int = 3, max_tokens: int = 24, **kw) -> go.Figure:
    """Largest |h| per layer (log y) and |h| over the real tokens × a window of dims around the massive dims at
    the first massive layer, on a log colour scale (the colorbar at the figure's edge)."""
    df = table(finding)
    top, med = arr(finding, "top"), arr(finding, "median")
    layer = (finding.metrics or {}).get("first_layer")
    fig = make_subplots(1, 2, horizontal_spacing=0.2, column_widths=[0.45, 0.55],
                        subplot_titles=["largest |h| per layer",
                                        f"|h| at layer {layer}" if layer is not None else "massive activations"])
    if top is None and has(df, "layer", "value") and len(df):
        g = df.assign(a=df["value"].abs()).groupby("layer")["a"].max()
        top = np.full((int(g.index.max()) + 1, 1), np.nan)
        top[g.index.to_numpy(int), 0] = g.to_numpy()
    if top is not None:
        top = np.abs(top.reshape(top.shape[0], -1))
        for k in range(min(3, top.shape[1])):
            fig.add_trace(go.Scatter(x=list(range(len(top))), y=[None if not np.isfinite(v) else float(v) for v in top[:, k]],
                                     mode="lines+markers", name=f"top {k + 1}", line=dict(color=OKABE_ITO[k]),
                                     hovertemplate="layer %{x}<br>%{fullData.name} |h| %{y:.4g}<extra></extra>"), 1, 1)
        if med is not None:
            fig.add_trace(go.Scatter(x=list(range(len(med))), y=np.abs(med).tolist(), mode="lines+markers",
                                     name="median", line=dict(color=GREY, dash="dash"),
                                     hovertemplate="layer %{x}<br>median |h| %{y:.4g}<extra></extra>"), 1, 1)
        fig.update_yaxes(title_text="|activation|", row=1, col=1,
                         **_log_axis(np.concatenate([top.ravel(), np.abs(med).ravel() if med is not None else []])))
        fig.update_xaxes(title_text="layer", row=1, col=1)
    A = arr(finding, "layer_abs")
    if A is not None and A.ndim == 2:
        A = np.abs(A)
        dims = massive_dims(finding, A)
        cols = sorted({c for dm in dims for c in range(dm - window, dm + window + 1) if 0 <= c < A.shape[1]})
        toks = (finding.params or {}).get("tokens")
        T = min(max_tokens, A.shape[0], len(toks) if isinstance(toks, (list, tuple)) and toks else A.shape[0])
        labels = token_labels(finding, T)
        M = A[:T][:, cols]
        Z = np.where(M > 0, np.log10(np.where(M > 0, M, 1.0)), np.nan)  # log colour scale
        lo, hi = (int(np.floor(np.nanmin(Z))), int(np.ceil(np.nanmax(Z)))) if np.isfinite(Z).any() else (0, 1)
        ticks = list(range(lo, hi + 1))
        fig.add_trace(go.Heatmap(z=_grid(Z), x=list(range(len(cols))), y=list(range(T)), colorscale="Viridis",
                                 customdata=[[[_h(labels[t]), cols[j], float(M[t, j])] for j in range(len(cols))]
                                             for t in range(T)],
                                 colorbar=dict(_cbar(fig, 2, "|h| (log)", 1), tickvals=ticks,
                                               ticktext=[f"{10.0 ** k:g}" for k in ticks]),
                                 hovertemplate="token %{y}: %{customdata[0]}<br>dim %{customdata[1]}<br>"
                                 "|h| %{customdata[2]:.4g}<extra></extra>", showlegend=False), 1, 2)
        fig.update_xaxes(title_text="hidden dim (window around massive dims)", row=1, col=2, tickmode="array",
                         tickvals=[j for j, c in enumerate(cols) if c in dims], ticktext=[str(c) for c in cols if c in dims],
                         showgrid=False)
        fig.update_yaxes(title_text="token", autorange="reversed", row=1, col=2, showgrid=False, zeroline=False, **_tick_axis(labels))
    elif len(df) and has(df, "value"):
        d = df.assign(a=df["value"].abs()).sort_values("a", ascending=False).head(24)
        labels = [f"{clean_token(r.get('token_str', r.get('token', '')), 10)}@{r.get('dim', '')}" for _, r in d.iterrows()]
        fig.add_trace(go.Bar(x=list(range(len(d))), y=d["a"].tolist(), marker_color=POS,
                             hovertext=_hover_rows(d.drop(columns="a")), hovertemplate="%{hovertext}<extra></extra>",
                             showlegend=False), 1, 2)
        fig.update_xaxes(title_text="token @ dim", row=1, col=2, **_tick_axis(labels))
        fig.update_yaxes(title_text="|activation|", row=1, col=2)
    return _layout(fig, _h(title_of(finding, "Massive activations")), 500, margin=dict(b=110),
                   legend=dict(orientation="h", x=0, xanchor="left", y=-0.2, yanchor="top"))


def entropy(finding, **kw) -> go.Figure:
    df = table(finding)
    col = "entropy" if "entropy" in df.columns else score_col(df)
    if not has(df, "layer", "head") or col is None:
        return generic(finding, **kw)
    M, rows, cols = pivot(df, "layer", "head", col)
    fin = M[np.isfinite(M)]
    unit = fin.size and fin.min() >= 0 and fin.max() <= 1
    fig = go.Figure()
    fig.add_trace(_layer_head_heat(fig, rows, cols, M, "normalised entropy" if col == "entropy" else col,
                                   cmap="Cividis", signed=False, zmin=0 if unit else None, zmax=1 if unit else None))
    if "uniform" in df.columns:
        u = df[df["uniform"].astype(bool)]
        fig.add_trace(go.Scatter(x=u["head"].tolist(), y=u["layer"].tolist(), mode="markers", name="uniform head",
                                 marker=dict(symbol="square-open", size=14, color="black", line=dict(width=2)),
                                 customdata=u[col].tolist(),
                                 hovertemplate="uniform head<br>layer %{y}, head %{x}<br>" + _h(col) +
                                 " %{customdata:.4g}<extra></extra>"))
    _layer_head_axes(fig, rows, cols)
    return _layout(fig, _h(title_of(finding, "Attention entropy (□ uniform heads)")),
                   max(400, min(900, 14 * len(rows) + 180)), legend=dict(orientation="h", y=-0.2))


def logit_lens(finding, max_cols: int = 20, **kw) -> go.Figure:
    """The rank grid (cells wide enough for their top-1 token; the figure has a fixed width for that) above the
    rank curves; the prompt is in the title (one prompt) or each column's label, and in every hover."""
    df = table(finding)
    if not has(df, "layer", "rank") or not len(df):
        return generic(finding, **kw)
    texts = (finding.params or {}).get("texts")
    layers, labels, R, rank, prob, top1, col_prompts = logit_lens_grid(df, max_cols, texts)
    L, C = R.shape
    chars = max([len(t) for t in top1.ravel()] + [1])
    cell_px = max(44, LENS_CHAR_PX * chars + 12)  # 11 px text: a cell holds its longest top-1 token
    width = max(720, C * cell_px + 260)
    heat_h = 18 * L + 40
    single = len(set(col_prompts)) <= 1
    gap = 90 if single else 230  # room for the grid's column labels (prompt tails are long, rotated)
    fig = make_subplots(2, 1, row_heights=[heat_h, 320], vertical_spacing=gap / (heat_h + 320 + gap),
                        subplot_titles=["log10(rank + 1) per layer (text: top-1 token)", "rank of the target over layers"])
    cd = [[[int(rank[i, j]) if np.isfinite(rank[i, j]) else -1, float(prob[i, j]) if np.isfinite(prob[i, j]) else 0.0,
            _h(top1[i, j]), _h(labels[j]), _h(col_prompts[j])] for j in range(C)] for i in range(L)]
    heat_w = C * cell_px / (width - 160)  # the heatmap's share of the plot width
    fig.add_trace(go.Heatmap(z=_grid(R), x=list(range(C)), y=layers, colorscale="Viridis", reversescale=True, zmin=0,
                             text=[[_h(t) for t in row] for row in top1], texttemplate="%{text}" if L * C <= 600 else None,
                             textfont=dict(size=11), customdata=cd, hoverongaps=False,
                             colorbar=dict(title=dict(text="log10(rank+1)", side="right"), x=min(1.0, heat_w + 0.02),
                                           xanchor="left", y=1, yanchor="top", len=0.5, thickness=14),
                             hovertemplate="prompt %{customdata[4]}<br>layer %{y}<br>target %{customdata[3]}<br>"
                             "rank %{customdata[0]}<br>p %{customdata[1]:.3g}<br>top-1 %{customdata[2]}"
                             "<extra></extra>"), 1, 1)
    fig.layout.annotations[0].update(x=0, xanchor="left")  # the grid's title over the grid
    fig.update_xaxes(title_text="target" if single else "prompt → target", row=1, col=1,
                     showgrid=False, zeroline=False, domain=[0, min(1.0, heat_w)], **_tick_axis(labels))
    fig.update_yaxes(title_text="layer", autorange="reversed", row=1, col=1, showgrid=False, zeroline=False, **_int_axis(layers))
    for j in range(min(C, 10)):
        fig.add_trace(go.Scatter(x=layers, y=(rank[:, j] + 1).tolist(), mode="lines+markers", name=_h(labels[j]),
                                 line=dict(color=OKABE_ITO[j % len(OKABE_ITO)]),
                                 customdata=[[float(p), _h(t)] for p, t in zip(prob[:, j], top1[:, j])],
                                 hovertemplate="%{fullData.name}<br>layer %{x}<br>rank+1 %{y}<br>"
                                 "p %{customdata[0]:.3g}<br>top-1 %{customdata[1]}<extra></extra>"), 2, 1)
    fig.update_yaxes(title_text="rank + 1 (log)", row=2, col=1, **_log_axis(rank[:, :10] + 1))
    fig.update_xaxes(title_text="layer", row=2, col=1)
    title = _h(title_of(finding, "Logit lens"))
    top = 70
    if single and texts:
        title += "<br><sub>prompt: “" + _h(" ".join(str(col_prompts[0]).split())) + "”</sub>"
        top = 100
    legend_h = 21 * min(C, 10)  # one entry a row, below the curves (beside them they would narrow the grid)
    height = top + heat_h + gap + 320 + 90 + legend_h
    plot_h = height - top - (90 + legend_h)  # minus the top and bottom margins
    return _layout(fig, title, height, width=width, margin=dict(t=top, b=90 + legend_h),
                   legend=dict(x=0, xanchor="left", y=-75 / plot_h, yanchor="top"))


def knockout(finding, **kw) -> go.Figure:
    df = table(finding)
    if not has(df, "layer", "delta_pct") or df.empty:  # no item kept: the generic card says so
        return generic(finding, **kw)
    d = df.copy()
    d["edge"] = d["edge"].astype(str) if "edge" in d.columns else "knockout"
    fig = go.Figure()
    for i, (e, g) in enumerate(d.groupby("edge", sort=False)):
        s = g.groupby("layer")["delta_pct"].agg(["mean", "std", "count"]).sort_index()
        fig.add_trace(go.Scatter(x=s.index.tolist(), y=s["mean"].tolist(), mode="lines+markers", name=_h(e),
                                 line=dict(color=OKABE_ITO[i % len(OKABE_ITO)]),
                                 customdata=np.stack([s["std"].fillna(0), s["count"]], 1).tolist(),
                                 hovertemplate="%{fullData.name}<br>layer %{x}<br>Δ %{y:.3g} %"
                                 " ± %{customdata[0]:.3g} (n=%{customdata[1]})<extra></extra>"))
    fig.add_hline(y=0, line=dict(color="gray", dash="dash", width=1))
    fig.update_xaxes(title_text=_h(knockout_xlabel(finding)))
    fig.update_yaxes(title_text="Δ target probability (%)")
    return _layout(fig, _h(title_of(finding, "Attention knockout")), 420, legend_title_text="edge")


def linear(finding, **kw) -> go.Figure:
    df = table(finding)
    cols = [c for c in ("accuracy", "control_accuracy", "selectivity") if c in df.columns]
    if not has(df, "layer") or not cols:
        return generic(finding, **kw)
    fig = go.Figure()
    style = {"accuracy": (OKABE_ITO[0], "solid", "probe accuracy"), "control_accuracy": (OKABE_ITO[1], "dash", "control task"),
             "selectivity": (OKABE_ITO[2], "dot", "selectivity")}
    for c in cols:
        color, dash, name = style[c]
        g = df.groupby("layer")[c].mean().sort_index()
        fig.add_trace(go.Scatter(x=g.index.tolist(), y=g.tolist(), mode="lines+markers", name=name,
                                 line=dict(color=color, dash=dash),
                                 hovertemplate="layer %{x}<br>%{fullData.name} %{y:.3f}<extra></extra>"))
    chance = (finding.metrics or {}).get("chance", (finding.metrics or {}).get("majority"))
    if isinstance(chance, (int, float)):
        fig.add_hline(y=chance, line=dict(color="gray", dash="dot", width=1), annotation_text="chance")
    fig.update_xaxes(title_text="layer")
    fig.update_yaxes(title_text="accuracy")
    concept = (finding.params or {}).get("concept")
    return _layout(fig, _h(title_of(finding, f"Linear probe of {concept}" if concept else "Linear probe")), 420)


def shapley(finding, max_players: int = 40, **kw) -> go.Figure:
    df = table(finding)
    val = "phi" if "phi" in df.columns else score_col(df)
    if val is None or not len(df):
        return generic(finding, **kw)
    d = df if len(df) <= max_players else df.loc[df[val].abs().nlargest(max_players).index]
    if "player" in d.columns:
        d = d.sort_values("player")
    lab_col = next((c for c in ("text", "span", "player") if c in d.columns), None)  # attribution.shapley: "span"
    labels = [clean_token(v, 36) for v in d[lab_col]] if lab_col else [str(i) for i in d.index]
    if lab_col in ("text", "span") and "player" in d.columns:
        labels = [f"{p}: {t}" for p, t in zip(d["player"], labels)]
    full = [_h(v) for v in d[lab_col]] if lab_col in ("text", "span") else _hl(labels)
    phi = pd.to_numeric(d[val], errors="coerce").tolist()
    se_col = next((c for c in ("phi_se", "se", "stderr", "std", "phi_std") if c in d.columns), None)
    fig = go.Figure(go.Bar(x=phi, y=list(range(len(d))), orientation="h", customdata=full,
                           marker_color=[POS if v >= 0 else NEG for v in phi],
                           error_x=dict(type="data", array=pd.to_numeric(d[se_col]).tolist()) if se_col else None,
                           hovertemplate="%{customdata}<br>φ %{x:.4g}<extra></extra>"))
    fig.add_vline(x=0, line=dict(color="gray", width=1))
    fig.update_yaxes(autorange="reversed", title_text="player", **_tick_axis(labels))
    fig.update_xaxes(title_text="Shapley value φ")
    return _layout(fig, _h(title_of(finding, "Shapley attribution")), max(320, min(1000, 24 * len(d) + 140)))


def saliency(finding, **kw) -> go.Figure:
    A, what = saliency_map(finding, kw)
    df = table(finding)
    if A is None:
        return generic(finding, **kw)
    A = causal_masked(A)
    curves = bool(has(df, "layer") and layer_curve_cols(df) and len(df))
    rl, cl = step_labels(finding, A.shape[0]), step_labels(finding, A.shape[1])
    fig = make_subplots(1, 2 if curves else 1, column_widths=[0.55, 0.45] if curves else None, horizontal_spacing=0.25,
                        subplot_titles=[f"saliency ({what})"] + (["per layer"] if curves else []))
    cd = [[[_h(rl[i]), _h(cl[j])] for j in range(A.shape[1])] for i in range(A.shape[0])]
    fig.add_trace(go.Heatmap(z=_grid(A), x=list(range(A.shape[1])), y=list(range(A.shape[0])), customdata=cd,
                             hoverongaps=False, colorbar=_cbar(fig, 1, "saliency", 2 if curves else 1),
                             hovertemplate="target %{y}: %{customdata[0]}<br>source %{x}: %{customdata[1]}<br>"
                             "saliency %{z:.4g}<extra></extra>", **_heat_kw(A)), 1, 1)
    fig.update_xaxes(title_text="source", row=1, col=1, showgrid=False, zeroline=False, **_tick_axis(cl))
    fig.update_yaxes(title_text="target", autorange="reversed", row=1, col=1, showgrid=False, zeroline=False, **_tick_axis(rl))
    if curves:
        _layer_curves(fig, df, 1, 2, [c for c in ("S_wp", "S_pq", "S_ww") if c in df.columns] or None)
    n = max(A.shape)
    return _layout(fig, _h(title_of(finding)), max(460, min(1000, 18 * n + 220)))


def image_map(finding, alpha: float = 0.55, gray_image: bool = True, **kw) -> go.Figure:
    m, what = pick_map(finding, kw)
    df = table(finding)
    if m is None:
        return generic(finding, **kw)
    img = image_hwc(arr(finding, "image", "pixel_values"))
    curves = bool(has(df, "layer") and layer_curve_cols(df) and len(df))
    fig = make_subplots(1, 2 if curves else 1, column_widths=[0.5, 0.5] if curves else None, horizontal_spacing=0.25,
                        subplot_titles=[f"map {m.shape[0]}×{m.shape[1]}" + (f" ({what})" if what else "") +
                                        (" on the image" if img is not None else "")] + (["per layer"] if curves else []))
    h, w = m.shape
    if img is not None:
        H, W = img.shape[:2]
        if gray_image and img.ndim == 3:
            img = img[..., :3] @ np.array([0.299, 0.587, 0.114])
        rgb = img if img.ndim == 3 else np.repeat(img[..., None], 3, -1)
        fig.add_trace(go.Image(z=(rgb[..., :3] * 255).astype(np.uint8), hoverinfo="skip"), 1, 1)
        dx, dy = W / w, H / h
    else:
        dx = dy = 1.0
    label = (finding.params or {}).get("map_label", "relevance")
    fig.add_trace(go.Heatmap(z=_grid(m), x0=dx / 2 - 0.5, dx=dx, y0=dy / 2 - 0.5, dy=dy,
                             opacity=alpha if img is not None else 1.0, hoverongaps=False,
                             colorbar=_cbar(fig, 1, label, 2 if curves else 1),
                             hovertemplate="x %{x:.0f}, y %{y:.0f}<br>value %{z:.4g}<extra></extra>",
                             **_heat_kw(m, "Inferno" if img is not None else "Viridis")), 1, 1)
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False, row=1, col=1)
    fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False, autorange="reversed",
                     scaleanchor="x", row=1, col=1)
    if curves:
        _layer_curves(fig, df, 1, 2)
    return _layout(fig, _h(title_of(finding)), 460)


def localisation(finding, score: str = "pointing", **kw) -> go.Figure:
    """The panels of :func:`viz.static.localisation`, with every score and interval in the hover text."""
    df = table(finding)
    if not has(df, "method", score, f"{score}_lo", f"{score}_hi"):
        return generic(finding, **kw)
    share = arr(finding, "share")
    fig = make_subplots(1, 2 if share is not None else 1, horizontal_spacing=0.12,
                        subplot_titles=[f"{score} vs the question's object"] + (["attention share"] if share is not None else []))
    layered = has(df, "layer") and bool((df.layer >= 0).any())
    hover = "%{fullData.name}<br>%{x}: %{y:.3f} [%{customdata[0]:.3f}, %{customdata[1]:.3f}]<extra></extra>"
    if layered:
        for i, (name, g) in enumerate(df[df.layer >= 0].groupby("method", sort=False)):
            fig.add_trace(go.Scatter(x=g.layer.tolist(), y=g[score].tolist(), mode="lines+markers", name=_h(name),
                                     line=dict(color=OKABE_ITO[i % len(OKABE_ITO)]),
                                     customdata=g[[f"{score}_lo", f"{score}_hi"]].values.tolist(), hovertemplate=hover), 1, 1)
        for _, r in df[df.layer < 0].iterrows():
            fig.add_hline(y=float(r[score]), line=dict(color=GREY, dash="dash"), annotation_text=_h(r.method), row=1, col=1)
        fig.update_xaxes(title_text="layer", row=1, col=1)
    else:
        fig.add_trace(go.Bar(x=[_h(m) for m in df.method], y=df[score].tolist(), name=score, marker_color=POS,
                             error_y=dict(type="data", symmetric=False, array=(df[f"{score}_hi"] - df[score]).tolist(),
                                          arrayminus=(df[score] - df[f"{score}_lo"]).tolist()),
                             customdata=df[[f"{score}_lo", f"{score}_hi"]].values.tolist(), hovertemplate=hover), 1, 1)
    fig.update_yaxes(title_text=f"{score} (95% CI)", range=[0, 1], row=1, col=1)
    if share is not None:
        for i, name in enumerate(("image", "bos", "text")[:share.shape[0]]):
            fig.add_trace(go.Scatter(x=list(range(share.shape[1])), y=share[i].tolist(), mode="lines+markers",
                                     name=f"share: {name}", line=dict(color=OKABE_ITO[i])), 1, 2)
        fig.update_xaxes(title_text="layer", row=1, col=2)
        fig.update_yaxes(title_text="last-token attention share", range=[0, 1], row=1, col=2)
    return _layout(fig, _h(title_of(finding)), 460)


# --------------------------------------------------------------------------------------------
# causal selection: direct logit attribution, activation-patching sweeps, attribution patching
# --------------------------------------------------------------------------------------------
def causal_grid(finding, **kw) -> go.Figure:
    """The panels of :func:`viz.static.causal_grid`, with every cell's value in the hover text."""
    from .static import causal_panels
    panels = causal_panels(finding)
    if not panels:
        return generic(finding, **kw)
    n = len(panels)
    fig = make_subplots(1, n, horizontal_spacing=0.14, subplot_titles=[_h(p[2]) for p in panels])
    L = panels[0][0].shape[0]
    for i, (M, xkind, label, labels) in enumerate(panels, 1):
        xs = list(range(M.shape[1]))
        fig.add_trace(go.Heatmap(z=_grid(M), x=xs, y=list(range(L)), hoverongaps=False, name=_h(label),
                                 colorbar=_cbar(fig, i, label, n),
                                 customdata=[[_h(t) for t in labels]] * L if labels else None,
                                 hovertemplate="layer %{y}<br>" + xkind + " %{x}" +
                                 (" %{customdata}" if labels else "") + "<br>%{z:.4g}<extra></extra>",
                                 **_heat_kw(M, signed=True)), 1, i)
        fig.update_xaxes(title_text=xkind, row=1, col=i, showgrid=False, zeroline=False,
                         **(_tick_axis(labels) if labels else _int_axis(xs)))
        fig.update_yaxes(title_text="layer", autorange="reversed", row=1, col=i, showgrid=False, zeroline=False)
    t = title_of(finding, (finding.params or {}).get("figure_title", ""))
    return _layout(fig, _h(t), max(420, min(900, 14 * L + 180)))


def dla(finding, **kw) -> go.Figure:
    """Head contributions and per-layer attention / MLP contributions to the logit (hover: values)."""
    df = table(finding)
    H = arr(finding, "heads")
    if H is None or not has(df, "kind", "layer", "score"):
        return generic(finding, **kw)
    L = H.shape[0]
    fig = make_subplots(1, 2, horizontal_spacing=0.16, subplot_titles=["attention heads", "per layer"])
    fig.add_trace(_layer_head_heat(fig, list(range(L)), list(range(H.shape[1])), H, "direct effect", 1, 2,
                                   signed=True), 1, 1)
    _layer_head_axes(fig, list(range(L)), list(range(H.shape[1])), 1, 1)
    attn = df[df.kind.isin(["head", "attn_bias"])].groupby("layer")["score"].sum().reindex(range(L), fill_value=0)
    mlp = df[df.kind == "mlp"].set_index("layer")["score"].reindex(range(L), fill_value=0)
    for name, s, c in (("attention", attn, POS), ("MLP", mlp, NEG)):
        fig.add_trace(go.Bar(y=list(range(L)), x=s.tolist(), orientation="h", name=name, marker_color=c,
                             hovertemplate=name + "<br>layer %{y}: %{x:.4g}<extra></extra>"), 1, 2)
    fig.update_yaxes(title_text="layer", autorange="reversed", row=1, col=2)
    fig.update_xaxes(title_text="direct effect (logit units)", row=1, col=2)
    return _layout(fig, _h(title_of(finding, "Direct logit attribution")), max(420, min(900, 14 * L + 180)),
                   barmode="group")


patching_sweep = causal_grid
atp = causal_grid
# end of causal selection figures


# --------------------------------------------------------------------------------------------
# information-flow routes
# --------------------------------------------------------------------------------------------
def routes(finding, **kw) -> go.Figure:
    """The route graph: tokens × layers, edge width ∝ importance (hover: layer, head, tokens, importance)."""
    from .static import route_segments
    df = table(finding)
    if not has(df, "layer", "stage", "kind", "source", "target", "importance"):
        return generic(finding, **kw)
    toks = list((finding.params or {}).get("tokens") or [])
    T = len(toks) or int(max(df.source.max(), df.target.max()) + 1)
    L = int(df.layer.max()) + 1 if len(df) else 1
    color = {"head": POS, "attn": POS, "mlp": NEG, "resid": "#8c8c8c"}
    fig = go.Figure()
    for (x0, y0, x1, y1, kind, w), r in zip(route_segments(df), df.itertuples()):
        who = f"head {r.head}" if r.head >= 0 else kind
        tip = _h(f"layer {r.layer} {who}: {toks[r.source] if toks else r.source} → "
                 f"{toks[r.target] if toks else r.target}, importance {w:.3f}")
        fig.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines+markers", showlegend=False,
                                 line=dict(color=color.get(kind, "#8c8c8c"), width=0.5 + 6 * w),
                                 marker=dict(size=4), hovertemplate=tip + "<extra></extra>"))
    fig.update_xaxes(tickmode="array", tickvals=list(range(T)), ticktext=_hl(toks) if toks else list(range(T)))
    fig.update_yaxes(title_text="layer", range=[-0.2, L + 0.2])
    return _layout(fig, _h(title_of(finding, "Information-flow routes")), max(420, min(900, 24 * L + 180)))
