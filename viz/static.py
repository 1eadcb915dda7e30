"""Static (matplotlib) figures of findings, with paper-ready defaults.

Every function takes a :class:`interp.finding.Finding` (plus optional keywords) and returns a
:class:`matplotlib.figure.Figure`. Figures are built without ``pyplot`` (no global figure state, no
leaks when plotting many findings) inside :data:`STYLE`: fonts of 9 pt or more, no top/right
spines, colour-blind-safe colours (Okabe-Ito for categories, viridis/cividis for sequential values,
``RdBu_r`` centred at 0 for signed values), axis labels everywhere, token labels on token axes
(``finding.params["tokens"]``) and constrained layout. Tables are produced by other modules, so
every function checks its columns and falls back to :func:`generic` when the ones it needs are
missing.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import matplotlib as mpl
import numpy as np
import pandas as pd
from cycler import cycler
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

# Okabe & Ito (2008) colour-blind-safe palette (yellow last: weak on white)
OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442"]
POS, NEG, GREY = "#0072B2", "#D55E00", "#8c8c8c"
SINK_TYPE_COLORS = {"bos_sink": "#0072B2", "secondary": "#E69F00", "noise": "#9a9a9a"}

STYLE: dict[str, Any] = {
    "font.size": 10, "axes.titlesize": 10.5, "axes.labelsize": 10, "xtick.labelsize": 9, "ytick.labelsize": 9,
    "legend.fontsize": 9, "legend.title_fontsize": 9, "figure.titlesize": 11, "axes.spines.top": False,
    "axes.spines.right": False, "axes.grid": False, "legend.frameon": False, "axes.prop_cycle": cycler(color=OKABE_ITO),
    "image.cmap": "viridis", "svg.fonttype": "none", "pdf.fonttype": 42, "ps.fonttype": 42,
    "savefig.bbox": "tight", "savefig.pad_inches": 0.04, "figure.dpi": 100, "lines.linewidth": 1.6,
    "lines.markersize": 4, "axes.titlelocation": "left",
}

# columns that index rows rather than score them
ID_COLS = {"layer", "head", "prompt", "position", "pos", "token", "dim", "player", "index", "step", "target_id",
           "token_id", "edge", "creation_layer", "seed", "query", "key"}
LABEL_COLS = ("text", "token_str", "label", "name", "target", "token", "player")


# --------------------------------------------------------------------------------------------
# helpers shared with viz.interactive
# --------------------------------------------------------------------------------------------
def to_numpy(x) -> np.ndarray | None:
    """A float numpy array from a tensor / array / list (None stays None)."""
    if x is None:
        return None
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    a = np.asarray(x)
    if a.dtype == bool:
        a = a.astype(float)
    return a.astype(float) if a.dtype.kind in "iuf" else a


def arr(finding, *names) -> np.ndarray | None:
    """The first of ``names`` present in ``finding.arrays``, as a float numpy array."""
    arrays = getattr(finding, "arrays", None) or {}
    for n in names:
        if n in arrays and arrays[n] is not None:
            return to_numpy(arrays[n])
    return None


def clean_token(s: Any, maxlen: int = 14) -> str:
    """A printable token label: visible whitespace, byte-level BPE markers as ␣, truncated."""
    s = "" if s is None else str(s)
    s = s.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r").replace("Ċ", "\\n")
    s = s.replace("Ġ", "␣").replace("▁", "␣")
    if s.startswith(" "):
        s = "␣" + s[1:]
    if not s.strip():
        s = s.replace(" ", "␣") or "∅"
    return s if len(s) <= maxlen else s[: maxlen - 1] + "…"


def mpl_text(s: Any) -> str:
    """Escape matplotlib mathtext (``$``)."""
    return str(s).replace("$", r"\$")


def token_labels(finding, n: int, maxlen: int = 14) -> list[str]:
    """Labels for token positions 0..n-1 from ``params["tokens"]`` (index where missing)."""
    toks = (getattr(finding, "params", None) or {}).get("tokens")
    if isinstance(toks, (list, tuple)) and toks and isinstance(toks[0], (list, tuple)):
        toks = toks[0]  # per-prompt lists: the first prompt's
    if not isinstance(toks, (list, tuple)):
        toks = []
    return [clean_token(toks[i], maxlen) if i < len(toks) else str(i) for i in range(n)]


def step_labels(finding, n: int) -> list[str]:
    p = getattr(finding, "params", None) or {}
    for key in ("steps", "labels", "step_labels"):
        v = p.get(key)
        if isinstance(v, (list, tuple)) and len(v) >= n and all(isinstance(x, (str, int, float)) for x in v[:n]):
            return [clean_token(x, 18) for x in v[:n]]
    return token_labels(finding, n)


def table(finding) -> pd.DataFrame:
    t = getattr(finding, "table", None)
    return t if isinstance(t, pd.DataFrame) else pd.DataFrame(t if t is not None else [])


def has(df: pd.DataFrame, *cols) -> bool:
    return all(c in df.columns for c in cols)


def numeric_cols(df: pd.DataFrame, exclude=ID_COLS) -> list[str]:
    cols = [c for c in df.select_dtypes(include=["number", "bool"]).columns if c not in exclude]
    return [c for c in cols if df[c].dtype != bool] + [c for c in cols if df[c].dtype == bool]


def score_col(df: pd.DataFrame, preferred=("score",)) -> str | None:
    for c in preferred:
        if c in df.columns and pd.api.types.is_numeric_dtype(df[c]):
            return c
    cols = [c for c in numeric_cols(df) if df[c].dtype != bool]
    return cols[0] if cols else None


ERR_SUFFIXES = ("_se", "_sem", "_std", "_err", "_stderr")


def value_error_cols(df: pd.DataFrame, k: int = 3) -> list[tuple[str, str | None]]:
    """Up to ``k`` (value column, its error column or None): ``score`` alone when present; ``x_se``/``x_std``/...
    columns become error bars of ``x`` instead of bars of their own."""
    nums = [c for c in numeric_cols(df) if df[c].dtype != bool]
    errs = {c for c in nums if str(c).endswith(ERR_SUFFIXES)}
    vals = [c for c in nums if c not in errs] or nums
    if "score" in vals:
        vals = ["score"]
    return [(c, next((c + s for s in ERR_SUFFIXES if c + s in errs), None)) for c in vals[:k]]


def pivot(df: pd.DataFrame, row: str, col: str, value: str, agg="mean"):
    """(matrix, row values, col values) of ``value`` over a full integer/categorical grid."""
    d = df[[row, col, value]].copy()
    d[value] = pd.to_numeric(d[value], errors="coerce")
    p = d.pivot_table(index=row, columns=col, values=value, aggfunc=agg, dropna=False)
    rows, cols = list(p.index), list(p.columns)
    if rows and all(isinstance(r, (int, np.integer)) for r in rows):
        rows = list(range(min(0, int(min(rows))), int(max(rows)) + 1))
    if cols and all(isinstance(c, (int, np.integer)) for c in cols):
        cols = list(range(min(0, int(min(cols))), int(max(cols)) + 1))
    p = p.reindex(index=rows, columns=cols)
    return p.to_numpy(dtype=float), rows, cols


def is_signed(M) -> bool:
    m = np.asarray(M, float)
    m = m[np.isfinite(m)]
    return bool(m.size and m.min() < 0 < m.max())


def sym_lim(M) -> float:
    m = np.asarray(M, float)
    m = m[np.isfinite(m)]
    return float(np.abs(m).max()) if m.size and np.abs(m).max() > 0 else 1.0


def title_of(finding, what: str = "") -> str:
    name = (getattr(finding, "model", None) or {}).get("name")
    base = what or getattr(finding, "analysis", "finding")
    return f"{base} — {name}" if name else base


def layer_curve_cols(df: pd.DataFrame) -> list[str]:
    return [c for c in numeric_cols(df) if df[c].dtype != bool][:4]


def image_hwc(img) -> np.ndarray | None:
    """An image array as H×W×C (or H×W) floats in 0..1."""
    a = to_numpy(img)
    if a is None or a.ndim not in (2, 3):
        return None
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.max() > 1.5:  # 0..255
        a = a / 255.0
    return np.clip(a, 0, 1)


def pick_map(finding, kw) -> tuple[np.ndarray | None, str]:
    """The 2-D map to show: ``arrays["map"]`` ([h, w] or [L, h, w]; layer ``kw["layer"]`` or the mean)."""
    m = arr(finding, "map", "cam", "heatmap")
    if m is None:
        return None, ""
    while m.ndim > 3:
        m = m.mean(0)
    if m.ndim == 3:
        layer = kw.get("layer", (getattr(finding, "params", None) or {}).get("layer"))
        if isinstance(layer, (int, np.integer)) and -m.shape[0] <= layer < m.shape[0]:
            return m[layer], f"layer {int(layer) % m.shape[0]}"
        return m.mean(0), f"mean over {m.shape[0]} layers"
    if m.ndim == 1:
        s = int(round(math.sqrt(m.size)))
        m = m.reshape(s, s) if s * s == m.size else m[None]
    return m, ""


def saliency_map(finding, kw) -> tuple[np.ndarray | None, str]:
    """The layer-mean of ``arrays["M"]`` ([L, S, S]) or ``arrays["I"]`` ([L, T, T])."""
    for name in ("M", "I", "saliency"):
        a = arr(finding, name)
        if a is None:
            continue
        while a.ndim > 3:
            a = a.mean(0)
        if a.ndim == 3:
            layer = kw.get("layer")
            if isinstance(layer, (int, np.integer)) and -a.shape[0] <= layer < a.shape[0]:
                return a[layer], f"{name}, layer {int(layer) % a.shape[0]}"
            return a.mean(0), f"{name}, mean over {a.shape[0]} layers"
        if a.ndim == 2:
            return a, name
    return None, ""


def causal_masked(A: np.ndarray) -> np.ndarray:
    """Mask the strictly-upper triangle of a square map when it is identically zero (causal)."""
    if A.ndim == 2 and A.shape[0] == A.shape[1] and A.shape[0] > 1:
        iu = np.triu_indices(A.shape[0], 1)
        if np.all(A[iu] == 0):
            A = A.copy()
            A[iu] = np.nan
    return A


def massive_dims(finding, A: np.ndarray | None = None, k: int = 6) -> list[int]:
    """The (at most ``k``) most massive hidden dims, sorted: the table's/metrics' dims ranked by their largest |h|
    in ``A`` [T, d] (or in the table), else the largest dims of ``A``."""
    df = table(finding)
    cand: list[int] = []
    if "dim" in df.columns and len(df):
        cand = pd.to_numeric(df["dim"], errors="coerce").dropna().astype(int).unique().tolist()
    elif isinstance((finding.metrics or {}).get("dims"), (list, tuple)):
        cand = [int(x) for x in finding.metrics["dims"]]
    if A is not None:
        cand = [c for c in cand if 0 <= c < A.shape[1]] or list(range(A.shape[1]))
        peak = A[:, cand].max(0)
        return sorted(int(cand[i]) for i in np.argsort(-peak)[:k])
    if cand and has(df, "dim", "value"):
        peak = df.assign(a=df["value"].abs()).groupby("dim")["a"].max()
        return sorted(int(d) for d in peak.nlargest(k).index)
    return sorted(cand)[:k]


def lifetime_rows(df: pd.DataFrame, max_bars: int = 40) -> pd.DataFrame:
    d = df.copy()
    d["lifetime"] = pd.to_numeric(d["lifetime"], errors="coerce").fillna(0)
    if len(d) > max_bars:
        d = d.loc[d["lifetime"].nlargest(max_bars).index]
    keys = [c for c in ("prompt", "position") if c in d.columns]
    d = d.sort_values(keys) if keys else d
    multi = "prompt" in d.columns and d["prompt"].nunique() > 1
    tok = d["token"] if "token" in d.columns else pd.Series([""] * len(d), index=d.index)
    labels = []
    for (_, r), t in zip(d.iterrows(), tok):
        lab = clean_token(t, 10) if str(t) != "" else ""
        pos = r.get("position", "")
        lab = f"{lab} ({pos})" if lab else f"{pos}"
        labels.append(f"p{r['prompt']}·{lab}" if multi else lab)
    d["_label"] = labels
    d["_type"] = d["sink_type"].astype(str) if "sink_type" in d.columns else "sink"
    return d.reset_index(drop=True)


def type_color(t: str, i: int) -> str:
    return SINK_TYPE_COLORS.get(t, OKABE_ITO[(i + 2) % len(OKABE_ITO)])


LENS_CELL_CHARS = 12  # a top-1 token is shown whole in its cell up to this many characters
LENS_CHAR_PX = 7.5  # width of one character of the 11 px cell text in the interactive grid (DejaVu Sans, upper bound)


def prompt_tail(text: str, n: int = 26) -> str:
    """The end of a prompt (where the lens reads), whitespace collapsed, "…" where it was cut."""
    t = " ".join(str(text).split())
    return t if len(t) <= n else "…" + t[-(n - 1):].lstrip()


def logit_lens_grid(df: pd.DataFrame, max_cols: int = 20, texts: list[str] | None = None):
    """(layers, column labels, log10(rank+1) [L, C], rank [L, C], prob, top1 [L, C], column prompts) of a
    logit-lens table; ``texts`` (the prompts, ``params["texts"]``) name each column's prompt."""
    d = df.copy()
    if "prompt" not in d.columns:
        d["prompt"] = 0
    if "target" not in d.columns:
        d["target"] = d["target_id"] if "target_id" in d.columns else ""
    keys = list(dict.fromkeys(zip(d["prompt"], d["target"].astype(str))))[:max_cols]
    n_prompts = len({k[0] for k in keys})
    texts = list(texts) if isinstance(texts, (list, tuple)) else None
    col_prompts = [texts[p] if texts is not None and 0 <= int(p) < len(texts) else f"prompt {p}" for p, _ in keys]
    if n_prompts <= 1:
        labels = [clean_token(t, 14) for _, t in keys]
    elif texts is not None:
        labels = [f"{prompt_tail(q)} → {clean_token(t, 12)}" for q, (_, t) in zip(col_prompts, keys)]
    else:
        labels = [f"p{p}: {clean_token(t, 10)}" for p, t in keys]
    layers = sorted(pd.to_numeric(d["layer"]).unique().tolist())
    li = {l: i for i, l in enumerate(layers)}
    rank = np.full((len(layers), len(keys)), np.nan)
    prob = np.full_like(rank, np.nan)
    top1 = np.full(rank.shape, "", dtype=object)
    col = {k: j for j, k in enumerate(keys)}
    for rr in d.to_dict("records"):
        j = col.get((rr["prompt"], str(rr["target"])))
        if j is None:
            continue
        i = li[rr["layer"]]
        if "rank" in rr:
            rank[i, j] = float(rr["rank"])
        if "prob" in rr:
            prob[i, j] = float(rr["prob"])
        if "top1" in rr:
            top1[i, j] = clean_token(rr["top1"], LENS_CELL_CHARS)
    return layers, labels, np.log10(rank + 1), rank, prob, top1, col_prompts


# --------------------------------------------------------------------------------------------
# figure scaffolding
# --------------------------------------------------------------------------------------------
def styled(fn: Callable) -> Callable:
    """Build the figure inside the paper style (rcParams are read when artists are created)."""
    @functools.wraps(fn)
    def wrap(finding, **kw):
        with mpl.rc_context(STYLE):
            return fn(finding, **kw)
    return wrap


def new_fig(ncols: int = 1, size=(5.2, 3.6), width_ratios=None):
    fig = Figure(figsize=size, layout="constrained")
    if ncols > 1:
        fig.get_layout_engine().set(wspace=0.07)  # room between a colorbar and the next panel's label
    axes = fig.subplots(1, ncols, gridspec_kw={"width_ratios": width_ratios} if width_ratios else None, squeeze=False)[0]
    return fig, list(axes)


def cmap_with_bad(name: str, bad="#e6e6e6"):
    return mpl.colormaps[name].with_extremes(bad=bad)


def set_ticks(ax, axis: str, values: list, labels: list[str] | None = None, max_labels: int = 48, rotate=None):
    """Label every tick when there are few, else let matplotlib choose integer ticks."""
    n = len(values)
    get = ax.xaxis if axis == "x" else ax.yaxis
    if labels is not None and n <= max_labels:
        pos = list(range(n))
        (ax.set_xticks if axis == "x" else ax.set_yticks)(pos)
        txt = [mpl_text(l) for l in labels]
        if axis == "x":
            rot = rotate if rotate is not None else (0 if _fits(ax, labels) else 90)
            ax.set_xticklabels(txt, rotation=rot, ha="center" if rot in (0, 90) else "right")
        else:
            ax.set_yticklabels(txt)
    else:
        step = max(1, int(math.ceil(n / 16)))
        pos = list(range(0, n, step))
        (ax.set_xticks if axis == "x" else ax.set_yticks)(pos)
        lab = [mpl_text(labels[p]) if labels is not None else str(values[p]) for p in pos]
        (ax.set_xticklabels if axis == "x" else ax.set_yticklabels)(lab, rotation=90 if axis == "x" and labels else 0)
    get.set_tick_params(length=2)


def _fits(ax, labels) -> bool:
    """Whether horizontal tick labels fit side by side in the axes' width (approximate, before layout)."""
    if not labels:
        return True
    width_pt = ax.get_position().width * ax.figure.get_figwidth() * 72
    char_pt = 0.62 * mpl.rcParams["xtick.labelsize"] if isinstance(mpl.rcParams["xtick.labelsize"], (int, float)) \
        else 5.6
    return max(len(str(l)) for l in labels) * char_pt + 4 <= 0.9 * width_pt / len(labels)


def heat(fig, ax, M, *, xlabel: str, ylabel: str, cbar: str, cmap: str = "viridis", signed: bool | None = None,
         vmin=None, vmax=None, xvals=None, yvals=None, xlabels=None, ylabels=None, norm=None):
    """imshow heatmap (rows = y) with a labelled colorbar; signed data get RdBu_r centred at 0."""
    M = np.asarray(M, float)
    if signed is None:
        signed = is_signed(M)
    if signed and norm is None:
        lim = sym_lim(M)
        cmap, vmin, vmax = "RdBu_r", -lim, lim
    kw = {"norm": norm} if norm is not None else {"vmin": vmin, "vmax": vmax}
    im = ax.imshow(np.ma.masked_invalid(M), cmap=cmap_with_bad(cmap), aspect="auto", interpolation="nearest",
                   origin="upper", **kw)
    cb = fig.colorbar(im, ax=ax, shrink=0.9, pad=0.02)
    cb.set_label(cbar)
    cb.outline.set_visible(False)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    set_ticks(ax, "x", list(xvals) if xvals is not None else list(range(M.shape[1])), xlabels)
    set_ticks(ax, "y", list(yvals) if yvals is not None else list(range(M.shape[0])), ylabels)
    for s in ax.spines.values():
        s.set_visible(False)
    return im


def nice_log_axis(ax, axis: str = "y"):
    """Log axis with plain numbers (1, 2, 5, 10, ... or powers of ten over wide ranges), no 6×10⁰ labels."""
    a = ax.yaxis if axis == "y" else ax.xaxis
    lo, hi = (ax.get_ylim() if axis == "y" else ax.get_xlim())
    lo = max(lo, 1e-12)
    decades = np.log10(hi / lo) if hi > lo else 0
    a.set_major_locator(mpl.ticker.LogLocator(base=10, subs=(1.0,) if decades > 2.5 else (1.0, 2.0, 5.0)))
    a.set_minor_locator(mpl.ticker.LogLocator(base=10, subs=np.arange(2, 10) * 1.0))
    a.set_minor_formatter(mpl.ticker.NullFormatter())
    if 1e-3 <= lo and hi <= 1e5:
        a.set_major_formatter(mpl.ticker.FuncFormatter(lambda v, _: f"{v:g}"))


def note(ax, text: str):
    ax.text(0.5, 0.5, mpl_text(text), ha="center", va="center", transform=ax.transAxes, fontsize=10, color="0.35",
            wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


def layer_curves(ax, df: pd.DataFrame, cols: list[str] | None = None, ylabel: str | None = None):
    """Mean of each numeric column per layer (± std band when several rows share a layer)."""
    cols = cols or layer_curve_cols(df)
    if not cols:
        note(ax, "no numeric columns per layer")
        return
    for i, c in enumerate(cols):
        g = df.groupby("layer")[c].agg(["mean", "std", "count"]).sort_index()
        x = np.asarray(g.index, float)
        ax.plot(x, g["mean"], marker="o", color=OKABE_ITO[i % len(OKABE_ITO)], label=c)
        if (g["count"] > 1).any():
            sd = g["std"].fillna(0).to_numpy()
            ax.fill_between(x, g["mean"] - sd, g["mean"] + sd, color=OKABE_ITO[i % len(OKABE_ITO)], alpha=0.15, lw=0)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel or (cols[0] if len(cols) == 1 else "value"))
    if len(cols) > 1:
        ax.legend()
    ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True))


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------
@styled
def generic(finding, **kw) -> Figure:
    """Layer × head heatmap of the score when the table has ``layer`` and ``head``; else a bar chart of
    the numeric score column(s) (the first 40 rows, by the first score)."""
    df = table(finding)
    sc = score_col(df)
    if has(df, "layer", "head") and sc is not None:
        M, rows, cols = pivot(df, "layer", "head", sc)
        fig, (ax,) = new_fig(1, (5.2, max(3.2, min(9, 0.16 * len(rows) + 1.6))))
        heat(fig, ax, M, xlabel="head", ylabel="layer", cbar=sc, xvals=cols, yvals=rows)
        ax.set_title(title_of(finding))
        return fig
    pairs = value_error_cols(df)
    if not len(df) or not pairs:
        fig, (ax,) = new_fig(1, (5.2, 2.4))
        note(ax, "empty table" if not len(df) else "no numeric score column to plot")
        ax.set_title(title_of(finding))
        return fig
    d = df
    if len(d) > 40:
        d = d.loc[d[pairs[0][0]].abs().nlargest(40).index]
    lab_col = next((c for c in LABEL_COLS if c in d.columns), None)
    if lab_col is not None:
        labels = [clean_token(v, 24) for v in d[lab_col]]
    elif "layer" in d.columns:
        labels = [str(v) for v in d["layer"]]
    else:
        labels = [str(v) for v in d.index]
    n, k = len(d), len(pairs)
    fig, (ax,) = new_fig(1, (max(4.5, min(12, 0.28 * n * max(1, k * 0.6) + 1.8)), 3.6))
    w = 0.8 / k
    x = np.arange(n)
    for i, (c, e) in enumerate(pairs):
        ax.bar(x + (i - (k - 1) / 2) * w, pd.to_numeric(d[c], errors="coerce"), w, label=c,
               color=OKABE_ITO[i % len(OKABE_ITO)], yerr=pd.to_numeric(d[e], errors="coerce") if e else None,
               error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "0.3"})
    if is_signed(d[[c for c, _ in pairs]].to_numpy(float)):
        ax.axhline(0, color="0.3", lw=0.8)
    set_ticks(ax, "x", labels, labels)
    ax.set_xlabel(lab_col or ("layer" if "layer" in d.columns else "row"))
    ax.set_ylabel(pairs[0][0] + (" (± " + pairs[0][1].rsplit("_", 1)[-1] + ")" if pairs[0][1] else "")
                  if k == 1 else "value")
    if k > 1:
        ax.legend()
    ax.set_title(title_of(finding))
    return fig


def fit_title(ax, text: str, **kw) -> None:
    """An axes title wrapped to the axes' width, so that neighbouring titles and colorbars never overlap."""
    import textwrap
    size = mpl.rcParams["axes.titlesize"]
    size = size if isinstance(size, (int, float)) else 10.5
    width_pt = 0.8 * ax.get_position().width * ax.figure.get_figwidth() * 72
    chars = max(14, int(width_pt / (0.58 * size)))
    ax.set_title("\n".join(textwrap.fill(line, chars) for line in mpl_text(text).split("\n")), **kw)


def _sized(size: tuple[float, float], width: float | None) -> tuple[float, float]:
    """A figure size with the caller's ``width`` (inches) when given."""
    return (float(width), size[1]) if width else size


@styled
def sinks(finding, n_tokens: int = 16, width: float | None = None, **kw) -> Figure:
    """Layer × head heatmap of the sink score α of token 0 (sink heads marked) and, when
    ``arrays["importance"]`` [L, H, T] exists, the mean importance of the first ``n_tokens`` keys."""
    df = table(finding)
    sc = score_col(df)
    if not has(df, "layer", "head") or sc is None:
        return generic.__wrapped__(finding, **kw)
    M, rows, cols = pivot(df, "layer", "head", sc)
    imp = arr(finding, "importance")
    two = imp is not None and imp.size > 0
    h = max(3.4, min(9, 0.16 * len(rows) + 1.6))
    fig, axes = new_fig(2 if two else 1, _sized((10.0 if two else 5.4, h), width),
                        width_ratios=[1.1, 1] if two else None)
    ax = axes[0]
    nonneg = np.nanmin(M) >= 0 if np.isfinite(M).any() else True
    heat(fig, ax, M, xlabel="head", ylabel="layer", cbar=f"{sc} (α of token 0)" if sc == "score" else sc,
         signed=False if nonneg else None, vmin=0 if nonneg else None, xvals=cols, yvals=rows)
    eps = (finding.metrics or {}).get("epsilon", (finding.params or {}).get("epsilon"))
    if "is_sink" in df.columns:
        s = df[df["is_sink"].astype(bool)]
        ri = {r: i for i, r in enumerate(rows)}
        ci = {c: i for i, c in enumerate(cols)}
        xs = [ci[c] for c in s["head"] if c in ci]
        ys = [ri[r] for r in s["layer"] if r in ri]
        if xs:
            ax.scatter(xs, ys, s=max(6, min(30, 900 / max(len(rows), len(cols)) ** 1.3)), c="black",
                       edgecolors="white", linewidths=0.6, zorder=3)
        fit_title(ax, f"Sink heads ({len(xs)} marked ●, α > ε={eps:.3g})" if isinstance(eps, (int, float))
                  else f"Sink heads ({len(xs)} marked ●)")
    else:
        fit_title(ax, "Sink score per head")
    if two:
        ax2 = axes[1]
        v = imp.reshape(-1, imp.shape[-1]).mean(0) if imp.ndim > 1 else imp
        n = min(n_tokens, v.shape[0])
        labels = token_labels(finding, n)
        ax2.bar(np.arange(n), v[:n], color=[NEG if i == 0 else POS for i in range(n)], width=0.75)
        set_ticks(ax2, "x", labels, labels)
        ax2.set_xlabel("key token")
        ax2.set_ylabel("mean importance α")
        fit_title(ax2, f"Mean α of the first {n} keys (over layers and heads)")
    fig.suptitle(title_of(finding, "Attention sinks"), x=0.01, ha="left")
    return fig


@styled
def secondary_sinks(finding, max_bars: int = 40, width: float | None = None, **kw) -> Figure:
    """Lifetime (in layers) of each sink position, coloured by type, creation layer annotated."""
    df = table(finding)
    if not has(df, "lifetime") or not len(df):
        return generic.__wrapped__(finding, **kw)
    d = lifetime_rows(df, max_bars)
    n = len(d)
    fig, (ax,) = new_fig(1, _sized((max(4.8, min(12, 0.32 * n + 2)), 3.8), width))
    types = list(dict.fromkeys(["bos_sink", "secondary", "noise"] + d["_type"].tolist()))
    types = [t for t in types if (d["_type"] == t).any()]
    for i, t in enumerate(types):
        m = (d["_type"] == t).to_numpy()
        ax.bar(np.arange(n)[m], d["lifetime"][m], color=type_color(t, i), width=0.75, label=t.replace("_", " "))
    if "creation_layer" in d.columns and n <= 30:
        for i, (lt, cl) in enumerate(zip(d["lifetime"], d["creation_layer"])):
            if pd.notna(cl):
                ax.annotate(f"L{int(cl)}", (i, lt), xytext=(0, 2), textcoords="offset points", ha="center",
                            va="bottom", fontsize=9, color="0.3")
    set_ticks(ax, "x", d["_label"].tolist(), d["_label"].tolist())
    ax.set_xlabel("position (token)")
    ax.set_ylabel("lifetime (layers)")
    ax.margins(y=0.12)
    fig.legend(*ax.get_legend_handles_labels(), title="sink type", loc="outside right upper")
    fit_title(ax, title_of(finding, "Secondary sinks") + ("\n(Lk: creation layer)"
                                                          if "creation_layer" in d.columns and n <= 30 else ""))
    return fig


@styled
def massive(finding, window: int = 3, max_tokens: int = 24, width: float | None = None, **kw) -> Figure:
    """Sun et al. (2024): top-1/2/3 |activation| and the median per layer (log y), and |h| over tokens ×
    a window of dims around the massive dims at the first massive layer (``arrays["layer_abs"]``, log colour
    scale, real tokens only), else a bar chart of the hits."""
    df = table(finding)
    top, med = arr(finding, "top"), arr(finding, "median")
    fig, (ax, ax2) = new_fig(2, _sized((10.5, 3.9), width), width_ratios=[1, 1.15])
    # left: per-layer magnitudes
    if top is None and has(df, "layer", "value") and len(df):
        g = df.assign(a=df["value"].abs()).groupby("layer")["a"].max()
        top = np.full((int(g.index.max()) + 1, 1), np.nan)
        top[g.index.to_numpy(int), 0] = g.to_numpy()
    if top is not None:
        top = top.reshape(top.shape[0], -1)
        x = np.arange(top.shape[0])
        for k in range(min(3, top.shape[1])):
            ax.plot(x, np.abs(top[:, k]), marker="o", ms=3, color=OKABE_ITO[k], label=f"top {k + 1}")
        if med is not None:
            ax.plot(np.arange(len(med)), np.abs(med), marker="s", ms=3, ls="--", color=GREY, label="median")
        thr = (finding.metrics or {}).get("threshold")
        if isinstance(thr, (int, float)) and thr > 0:
            ax.axhline(thr, color="0.5", lw=0.8, ls=":", label=f"threshold {thr:g}")
        ax.set_yscale("log")
        nice_log_axis(ax)
        ax.set_xlabel("layer")
        ax.set_ylabel("|activation| (log)")
        ax.legend(ncols=2 if top.shape[1] > 2 else 1)
        ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True))
        fit_title(ax, "Largest |h| per layer")
    else:
        note(ax, "no per-layer magnitudes (arrays 'top'/'median')")
    # right: token × dim window
    A = arr(finding, "layer_abs")
    if A is not None and A.ndim == 2:
        A = np.abs(A)
        dims = massive_dims(finding, A)
        cols: list[int] = []
        for dm in dims:
            win = [c for c in range(dm - window, dm + window + 1) if 0 <= c < A.shape[1] and c not in cols]
            if cols and win and win[0] != cols[-1] + 1:
                cols.append(-1)  # gap
            cols += win
        toks = (finding.params or {}).get("tokens")
        T = min(max_tokens, A.shape[0], len(toks) if isinstance(toks, (list, tuple)) and toks else A.shape[0])
        M = np.stack([A[:T, c] if c >= 0 else np.full(T, np.nan) for c in cols], 1)
        pos = M[np.isfinite(M) & (M > 0)]
        norm = mpl.colors.LogNorm(vmin=max(float(pos.min()), 1e-3), vmax=float(pos.max())) if pos.size else None
        xl = [str(c) if c in dims else "" for c in cols]
        heat(fig, ax2, np.where(M > 0, M, np.nan), xlabel="hidden dim (window around massive dims)", ylabel="token",
             cbar="|activation| (log)", signed=False, norm=norm, xvals=cols, xlabels=xl, yvals=list(range(T)),
             ylabels=token_labels(finding, T), cmap="viridis")
        ax2.set_xticks([i for i, c in enumerate(cols) if c in dims])
        ax2.set_xticklabels([str(c) for c in cols if c in dims], rotation=0)
        layer = (finding.metrics or {}).get("first_layer")
        fit_title(ax2, f"|h| at layer {layer}" if layer is not None else "|h| at the first massive layer")
    elif len(df) and has(df, "value"):
        d = df.assign(a=df["value"].abs())
        keys = [c for c in ("token", "dim") if c in d.columns]
        g = d.groupby(keys, as_index=False).agg(a=("a", "max"), **({"s": ("token_str", "first")}
                                                                     if "token_str" in d.columns else {}))
        g = g.nlargest(24, "a").sort_values(keys)
        labels = [f"{clean_token(r.get('s', r.get('token', '')), 10)}@{int(r['dim'])}" if "dim" in r else
                  clean_token(r.get("s", r.get("token", "")), 10) for _, r in g.iterrows()]
        ax2.bar(np.arange(len(g)), g["a"], color=POS, width=0.7)
        set_ticks(ax2, "x", labels, labels)
        ax2.set_xlabel("token @ dim")
        ax2.set_ylabel("max |activation| over layers")
        fit_title(ax2, "Massive activations")
    else:
        note(ax2, "no massive activations found")
    fig.suptitle(title_of(finding, "Massive activations"), x=0.01, ha="left")
    return fig


@styled
def entropy(finding, width: float | None = None, **kw) -> Figure:
    """Layer × head heatmap of normalised attention entropy (cividis); uniform heads outlined."""
    df = table(finding)
    col = "entropy" if "entropy" in df.columns else score_col(df)
    if not has(df, "layer", "head") or col is None:
        return generic.__wrapped__(finding, **kw)
    M, rows, cols = pivot(df, "layer", "head", col)
    fig, (ax,) = new_fig(1, _sized((5.4, max(3.4, min(9, 0.16 * len(rows) + 1.6))), width))
    fin = M[np.isfinite(M)]
    unit = fin.size and fin.min() >= 0 and fin.max() <= 1
    heat(fig, ax, M, xlabel="head", ylabel="layer", cbar="normalised entropy" if col == "entropy" else col,
         cmap="cividis", signed=False, vmin=0 if unit else None, vmax=1 if unit else None, xvals=cols, yvals=rows)
    n_u = 0
    if "uniform" in df.columns:
        ri = {r: i for i, r in enumerate(rows)}
        ci = {c: i for i, c in enumerate(cols)}
        for _, r in df[df["uniform"].astype(bool)].iterrows():
            if r["layer"] in ri and r["head"] in ci:
                x, y = ci[r["head"]], ri[r["layer"]]
                ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, ec="black", lw=2.0, zorder=3))
                ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, ec="white", lw=0.8, zorder=4))
                n_u += 1
    fit_title(ax, title_of(finding, "Attention entropy") + (f"\n{n_u} uniform heads outlined" if n_u else ""))
    return fig


@styled
def logit_lens(finding, max_cols: int = 20, **kw) -> Figure:
    """Grid of log10(rank + 1) of each target per layer annotated with the layer's top-1 token (each cell wide
    enough for its token), and the rank over layers; the prompt is named in the title (one prompt) or in
    each column's label (several)."""
    df = table(finding)
    if not has(df, "layer", "rank") or not len(df):
        return generic.__wrapped__(finding, **kw)
    texts = (finding.params or {}).get("texts")
    layers, labels, R, rank, prob, top1, col_prompts = logit_lens_grid(df, max_cols, texts)
    L, C = R.shape
    h = max(3.6, min(10, 0.22 * L + 1.4))
    cell_pt = h * 72 * 0.8 / max(L, 1)
    fs = 9 if cell_pt >= 11 else 8
    chars = max([len(t) for t in top1.ravel()] + [1])
    col_in = max(0.8, (0.62 * fs * chars + 8) / 72)  # a cell holds its longest top-1 token
    fig, (ax, ax2) = new_fig(2, (C * col_in + 1.8 + 4.6, h), width_ratios=[C * col_in + 1.8, 4.6])
    vmax = max(1.0, float(np.nanmax(R))) if np.isfinite(R).any() else 1.0
    cmap = "viridis_r"
    single = len(set(col_prompts)) <= 1
    heat(fig, ax, R, xlabel="target" if single else "prompt → target", ylabel="layer", cbar="log10(rank + 1)",
         cmap=cmap, signed=False, vmin=0, vmax=vmax, xvals=labels, xlabels=labels, yvals=layers,
         ylabels=[str(l) for l in layers])
    if (top1 != "").any() and cell_pt >= 9:
        cm, norm = mpl.colormaps[cmap], mpl.colors.Normalize(0, vmax)
        for i in range(L):
            for j in range(C):
                if top1[i, j]:
                    r, g, b, _ = cm(norm(R[i, j])) if np.isfinite(R[i, j]) else (1, 1, 1, 1)
                    ax.text(j, i, mpl_text(top1[i, j]), ha="center", va="center", fontsize=fs,
                            color="black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white")
    ax.set_title("Target rank per layer (text: top-1 token)")
    x = np.asarray(layers, float)
    if C <= 8:
        for j in range(C):
            ax2.plot(x, rank[:, j] + 1, marker="o", ms=3, color=OKABE_ITO[j % len(OKABE_ITO)],
                     label=mpl_text(labels[j]))
        ax2.legend(fontsize=9 if single else 7, ncols=1 if C <= 4 or not single else 2)
    else:
        q = np.nanpercentile(rank + 1, [25, 50, 75], axis=1)
        ax2.fill_between(x, q[0], q[2], color=POS, alpha=0.2, lw=0, label="IQR")
        ax2.plot(x, q[1], marker="o", ms=3, color=POS, label=f"median over {C}")
        ax2.legend()
    ax2.set_yscale("log")
    nice_log_axis(ax2)
    ax2.set_xlabel("layer")
    ax2.set_ylabel("rank + 1 of target (log)")
    ax2.xaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True))
    ax2.set_title("Rank over layers")
    title = title_of(finding, "Logit lens")
    if single and texts:
        title += f"\nprompt: “{mpl_text(' '.join(str(col_prompts[0]).split()))}”"
    fig.suptitle(title, x=0.01, ha="left")
    return fig


def knockout_xlabel(finding) -> str:
    """Knockout windows are centred on the plotted layer."""
    k = (getattr(finding, "params", None) or {}).get("window")
    return f"layer at the centre of the {k}-layer knockout window" if k else "layer"


@styled
def knockout(finding, **kw) -> Figure:
    """Δ% of the target after knocking out each edge, per layer (one curve per edge; ±std band)."""
    df = table(finding)
    if not has(df, "layer", "delta_pct") or df.empty:  # no item kept: the generic card says so
        return generic.__wrapped__(finding, **kw)
    fig, (ax,) = new_fig(1, (5.6, 3.6))
    d = df.copy()
    d["edge"] = d["edge"].astype(str) if "edge" in d.columns else "knockout"
    for i, (e, g) in enumerate(d.groupby("edge", sort=False)):
        s = g.groupby("layer")["delta_pct"].agg(["mean", "std", "count"]).sort_index()
        x = np.asarray(s.index, float)
        c = OKABE_ITO[i % len(OKABE_ITO)]
        ax.plot(x, s["mean"], marker="o", ms=3, color=c, label=mpl_text(e))
        if (s["count"] > 1).any():
            sd = s["std"].fillna(0).to_numpy()
            ax.fill_between(x, s["mean"] - sd, s["mean"] + sd, color=c, alpha=0.15, lw=0)
    ax.axhline(0, color="0.35", lw=0.8, ls="--", zorder=0)
    ax.set_xlabel(knockout_xlabel(finding))
    ax.set_ylabel("Δ target probability (%)")
    ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True))
    if d["edge"].nunique() > 1 or d["edge"].iloc[0] != "knockout":
        ax.legend(title="edge")
    ax.set_title(title_of(finding, "Attention knockout"))
    return fig


@styled
def linear(finding, **kw) -> Figure:
    """Probe accuracy and control-task accuracy per layer (selectivity = their difference)."""
    df = table(finding)
    if not has(df, "layer") or not any(c in df.columns for c in ("accuracy", "control_accuracy", "selectivity")):
        return generic.__wrapped__(finding, **kw)
    fig, (ax,) = new_fig(1, (5.6, 3.6))
    styles = {"accuracy": (OKABE_ITO[0], "-", "o", "probe accuracy"),
              "control_accuracy": (OKABE_ITO[1], "--", "s", "control task"),
              "selectivity": (OKABE_ITO[2], ":", "^", "selectivity")}
    for c, (col, ls, mk, lab) in styles.items():
        if c in df.columns:
            g = df.groupby("layer")[c].mean().sort_index()
            ax.plot(g.index, g.values, color=col, ls=ls, marker=mk, ms=3.5, label=lab)
    chance = (finding.metrics or {}).get("chance", (finding.metrics or {}).get("majority"))
    if isinstance(chance, (int, float)):
        ax.axhline(chance, color="0.5", lw=0.8, ls=":", label=f"chance ({chance:.2g})")
    ax.set_xlabel("layer")
    ax.set_ylabel("accuracy")
    lo = min(0.0, float(np.nanmin(df[[c for c in styles if c in df.columns]].to_numpy(float))))
    ax.set_ylim(lo - 0.02, 1.02)
    ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True))
    ax.legend()
    concept = (finding.params or {}).get("concept")
    ax.set_title(title_of(finding, f"Linear probe of {concept}" if concept else "Linear probe"))
    return fig


@styled
def shapley(finding, max_players: int = 40, **kw) -> Figure:
    """Horizontal bars of φ per player (positive blue, negative vermilion; ±SE when given)."""
    df = table(finding)
    val = "phi" if "phi" in df.columns else score_col(df)
    if val is None or not len(df):
        return generic.__wrapped__(finding, **kw)
    d = df
    if len(d) > max_players:
        d = d.loc[d[val].abs().nlargest(max_players).index]
    if "player" in d.columns:
        d = d.sort_values("player")
    lab_col = next((c for c in ("text", "span", "player") if c in d.columns), None)  # attribution.shapley: "span"
    labels = [clean_token(v, 36) for v in d[lab_col]] if lab_col else [str(i) for i in d.index]
    if lab_col in ("text", "span") and "player" in d.columns:
        labels = [f"{p}: {t}" for p, t in zip(d["player"], labels)]
    phi = pd.to_numeric(d[val], errors="coerce").to_numpy()
    se_col = next((c for c in ("phi_se", "se", "stderr", "std", "phi_std") if c in d.columns), None)
    n = len(d)
    fig, (ax,) = new_fig(1, (6.2, max(2.4, min(12, 0.3 * n + 1.2))))
    y = np.arange(n)
    ax.barh(y, phi, color=[POS if v >= 0 else NEG for v in phi], height=0.7,
            xerr=pd.to_numeric(d[se_col], errors="coerce").to_numpy() if se_col else None,
            error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "0.3"})
    ax.axvline(0, color="0.3", lw=0.8)
    ax.set_yticks(y)
    ax.set_yticklabels([mpl_text(l) for l in labels])
    ax.invert_yaxis()
    ax.set_xlabel("Shapley value φ" + (" (±SE)" if se_col else ""))
    ax.set_ylabel("player")
    ax.spines["left"].set_visible(False)
    ax.tick_params(axis="y", length=0)
    ax.set_title(title_of(finding, "Shapley attribution"))
    return fig


@styled
def saliency(finding, max_labels: int = 48, **kw) -> Figure:
    """Heatmap of the layer-mean saliency map (``arrays["M"]`` [L, S, S] or ``arrays["I"]`` [L, T, T]) with
    step/token labels; plus per-layer curves when the table has a ``layer`` column."""
    A, what = saliency_map(finding, kw)
    df = table(finding)
    if A is None:
        return generic.__wrapped__(finding, **kw)
    A = causal_masked(A)
    curves = has(df, "layer") and bool(layer_curve_cols(df)) and len(df)
    n = max(A.shape)
    side = max(3.8, min(8.5, 0.2 * n + 2.2))
    fig, axes = new_fig(2 if curves else 1, (side + 1.0 + (4.6 if curves else 0), side),
                        width_ratios=[side + 1.0, 4.6] if curves else None)
    rl, cl = step_labels(finding, A.shape[0]), step_labels(finding, A.shape[1])
    steps = "steps" in (finding.params or {}) or what.startswith("M")
    heat(fig, axes[0], A, xlabel="source step" if steps else "source token",
         ylabel="target step" if steps else "target token", cbar="saliency", xvals=cl, xlabels=cl, yvals=rl,
         ylabels=rl)
    axes[0].set_title(f"Saliency ({what})")
    if curves:
        flows = [c for c in ("S_wp", "S_pq", "S_ww") if c in df.columns]  # Label Words: the three flows
        layer_curves(axes[1], df, flows or None, ylabel="mean saliency per edge" if flows else None)
        axes[1].set_title("Label-word flows per layer" if flows else "Per layer")
    fig.suptitle(title_of(finding), x=0.01, ha="left")
    return fig


@styled
def image_map(finding, alpha: float = 0.55, gray_image: bool = True, **kw) -> Figure:
    """The map (``arrays["map"]`` [h, w] or [L, h, w]; ``layer=`` picks one, else the mean) over the image
    (``arrays["image"]`` [3, H, W] in 0..1, shown in grey unless ``gray_image=False``; nearest upsampling),
    plus per-layer curves when the table has a ``layer`` column."""
    m, what = pick_map(finding, kw)
    df = table(finding)
    if m is None:
        return generic.__wrapped__(finding, **kw)
    img = image_hwc(arr(finding, "image", "pixel_values"))
    curves = has(df, "layer") and bool(layer_curve_cols(df)) and len(df)
    fig, axes = new_fig(2 if curves else 1, (9.6 if curves else 5.0, 4.0), width_ratios=[1, 1.1] if curves else None)
    ax = axes[0]
    signed = is_signed(m)
    lim = sym_lim(m)
    fin = m[np.isfinite(m)]
    norm = (mpl.colors.Normalize(-lim, lim) if signed else
            mpl.colors.Normalize(float(fin.min()) if fin.size else 0, float(fin.max()) if fin.size else 1))
    cmap = "RdBu_r" if signed else ("inferno" if img is not None else "viridis")
    if img is not None:
        H, W = img.shape[:2]
        if gray_image and img.ndim == 3:  # a grey image keeps the map's colours readable
            img = img[..., :3] @ np.array([0.299, 0.587, 0.114])
        ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="bilinear")
        ax.imshow(m, extent=(-0.5, W - 0.5, H - 0.5, -0.5), alpha=alpha, interpolation="nearest", cmap=cmap, norm=norm)
    else:
        ax.imshow(m, interpolation="nearest", cmap=cmap, norm=norm)
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)
    cb = fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, shrink=0.85, pad=0.02)  # opaque colours
    cb.set_label((finding.params or {}).get("map_label", "relevance"))
    cb.outline.set_visible(False)
    ax.set_title(f"Map {m.shape[0]}×{m.shape[1]}" + (f" ({what})" if what else "") + (" on image" if img is not None
                                                                                        else ""))
    if curves:
        layer_curves(axes[1], df)
        axes[1].set_title("Per layer")
    fig.suptitle(title_of(finding), x=0.01, ha="left")
    return fig


@styled
def localisation(finding, score: str = "pointing", **kw) -> Figure:
    """Localisation scores (``score`` = pointing or energy, with 95% CIs): per-layer curves of each map with the
    references (rows with ``layer = -1``) as dashed lines, or bars when the table has no layers; plus the
    attention shares per layer (``arrays["share"]`` [3, L]: image, bos, text) when present."""
    df = table(finding)
    if not has(df, "method", score, f"{score}_lo", f"{score}_hi"):
        return generic.__wrapped__(finding, **kw)
    share = arr(finding, "share")
    fig, axes = new_fig(2 if share is not None else 1, (10.0 if share is not None else 5.4, 3.8))
    ax = axes[0]
    layered = has(df, "layer") and (df.layer >= 0).any()
    refs = df[df.layer < 0] if layered else df.iloc[0:0]
    if layered:
        for i, (name, g) in enumerate(df[df.layer >= 0].groupby("method", sort=False)):
            c = OKABE_ITO[i % len(OKABE_ITO)]
            ax.plot(g.layer, g[score], marker="o", color=c, label=name)
            ax.fill_between(g.layer, g[f"{score}_lo"], g[f"{score}_hi"], color=c, alpha=0.15, lw=0)
        for j, (_, r) in enumerate(refs.iterrows()):
            ax.axhline(r[score], color=GREY, ls=("--", ":", "-.")[j % 3], lw=1.2, label=f"{r.method} (reference)")
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True))
    else:
        x = np.arange(len(df))
        ax.bar(x, df[score], color=[GREY if m in ("random", "all_objects", "occlusion") else POS for m in df.method])
        ax.errorbar(x, df[score], yerr=[df[score] - df[f"{score}_lo"], df[f"{score}_hi"] - df[score]], fmt="none",
                    ecolor="#333333", capsize=3, lw=1)
        set_ticks(ax, "x", list(x), [str(m) for m in df.method], rotate=30)
    ax.set_ylabel(f"{score} (95% CI)")
    ax.set_ylim(0, 1)
    if layered:
        ax.legend(fontsize=7.5, ncol=2)
    ax.set_title(f"{score} vs the question's object (n={int(df.n.iloc[0]) if has(df, 'n') else '?'})")
    if share is not None:
        for i, name in enumerate(("image", "bos", "text")[:share.shape[0]]):
            axes[1].plot(np.arange(share.shape[1]), share[i], marker="o", color=OKABE_ITO[i], label=name)
        cliff = (finding.metrics or {}).get("cliff_layer")
        if cliff is not None:
            axes[1].axvline(cliff, color=NEG, ls="--", lw=1.2, label=f"cliff layer {cliff}")
        axes[1].set_xlabel("layer")
        axes[1].set_ylabel("last-token attention share")
        axes[1].set_ylim(0, 1)
        axes[1].legend()
        axes[1].xaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True))
        axes[1].set_title("Attention share per layer" + ("" if cliff is not None else " (no cliff)"))
    fig.suptitle(title_of(finding), x=0.01, ha="left")
    return fig


# --------------------------------------------------------------------------------------------
# causal selection: direct logit attribution, activation-patching sweeps, attribution patching
# --------------------------------------------------------------------------------------------
def _collapse_positions(M: np.ndarray) -> np.ndarray:
    """[L, H, T] -> [L, H]: per (layer, head) the value of largest magnitude over positions (sign kept)."""
    if M.ndim < 3:
        return M
    idx = np.nanargmax(np.abs(np.nan_to_num(M)), axis=-1)
    return np.take_along_axis(M, idx[..., None], -1)[..., 0]


def causal_panels(finding) -> list[tuple[np.ndarray, str, str, list[str] | None]]:
    """(matrix [layer, x], x-axis label, colorbar label, x tick labels) for each grid of a dla / patching /
    atp finding, named in ``params["panels"]`` as [array, x kind ("head" | "position"), label]."""
    out = []
    for name, xkind, label in (getattr(finding, "params", None) or {}).get("panels", []):
        M = arr(finding, name)
        if M is None:
            continue
        M = _collapse_positions(M) if xkind == "head" else M
        if M.ndim != 2:
            continue
        labels = token_labels(finding, M.shape[1]) if xkind == "position" else None
        out.append((M, xkind, label, labels))
    return out


@styled
def causal_grid(finding, **kw) -> Figure:
    """One signed heatmap per grid (layer × head or layer × position) of a causal-selection finding."""
    panels = causal_panels(finding)
    if not panels:
        return generic.__wrapped__(finding, **kw)
    L = panels[0][0].shape[0]
    fig, axes = new_fig(len(panels), (4.4 * len(panels) + 0.6, max(3.2, min(9.0, 0.2 * L + 1.6))))
    for ax, (M, xkind, label, labels) in zip(axes, panels):
        heat(fig, ax, M, xlabel=xkind, ylabel="layer", cbar=label, signed=True, xlabels=labels)
        ax.set_title(mpl_text(label))
    fig.suptitle(mpl_text(title_of(finding, (finding.params or {}).get("figure_title", ""))), x=0.01, ha="left")
    return fig


@styled
def dla(finding, **kw) -> Figure:
    """Head contributions (layer × head) and, per layer, the attention and MLP contributions to the logit."""
    df = table(finding)
    H = arr(finding, "heads")
    if H is None or not has(df, "kind", "layer", "score"):
        return generic.__wrapped__(finding, **kw)
    L = H.shape[0]
    fig, (a1, a2) = new_fig(2, (10.0, max(3.4, min(9.0, 0.2 * L + 1.8))), width_ratios=[1.1, 1.0])
    heat(fig, a1, H, xlabel="head", ylabel="layer", cbar="direct effect (logit units)", signed=True)
    a1.set_title("Attention heads")
    attn = df[df.kind.isin(["head", "attn_bias"])].groupby("layer")["score"].sum().reindex(range(L), fill_value=0)
    mlp = df[df.kind == "mlp"].set_index("layer")["score"].reindex(range(L), fill_value=0)
    y = np.arange(L)
    a2.barh(y - 0.2, attn.to_numpy(), height=0.4, color=POS, label="attention")
    a2.barh(y + 0.2, mlp.to_numpy(), height=0.4, color=NEG, label="MLP")
    a2.axvline(0, color="0.35", lw=0.8)
    a2.invert_yaxis()
    a2.set_ylabel("layer")
    a2.set_xlabel("direct effect (logit units)")
    emb = df[df.kind == "embed"]["score"]
    a2.set_title("Per layer" + (f" (embedding {float(emb.iloc[0]):+.2f})" if len(emb) else ""))
    a2.legend()
    m = finding.metrics or {}
    what = "logit difference" if m.get("foil") else "logit"
    fig.suptitle(mpl_text(title_of(finding, f"Direct logit attribution of the {what}")), x=0.01, ha="left")
    return fig


patching_sweep = causal_grid
atp = causal_grid
# end of causal selection figures


# --------------------------------------------------------------------------------------------
# information-flow routes
# --------------------------------------------------------------------------------------------
def route_segments(df: pd.DataFrame) -> list[tuple[float, float, float, float, str, float]]:
    """(x0, y0, x1, y1, kind, importance) of each route edge: tokens on x; layer l's attention runs from
    y = l to y = l + 0.5, its MLP from l + 0.5 to l + 1 (y = 0 is the embedding)."""
    out = []
    for r in df.itertuples():
        y0 = r.layer + (0.5 if r.stage == "mlp" else 0.0)
        out.append((float(r.source), y0, float(r.target), y0 + 0.5, str(r.kind), float(r.importance)))
    return out


@styled
def routes(finding, **kw) -> Figure:
    """The route graph: tokens × layers, edge width ∝ importance (heads blue, MLPs orange, residual grey)."""
    df = table(finding)
    if not has(df, "layer", "stage", "kind", "source", "target", "importance"):
        return generic.__wrapped__(finding, **kw)
    toks = list((finding.params or {}).get("tokens") or [])
    T = len(toks) or int(max(df.source.max(), df.target.max()) + 1)
    L = int(df.layer.max()) + 1 if len(df) else 1
    fig, (ax,) = new_fig(1, (max(5.0, min(16.0, 0.45 * T + 2)), max(3.6, min(10.0, 0.3 * L + 2))))
    color = {"head": POS, "attn": POS, "mlp": NEG, "resid": GREY}
    for x0, y0, x1, y1, kind, w in route_segments(df):
        if kind == "mlp":
            ax.plot([x0], [y1], "s", color=NEG, ms=2 + 8 * w, alpha=0.8)
        else:
            ax.plot([x0, x1], [y0, y1], "-", color=color.get(kind, GREY), lw=0.4 + 4 * w, alpha=0.35 + 0.6 * w)
    ax.set_xlim(-0.6, T - 0.4)
    ax.set_ylim(-0.2, L + 0.2)
    ax.set_xticks(range(T))
    ax.set_xticklabels([mpl_text(t) for t in toks] if toks else range(T), rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("layer")
    ax.set_title(mpl_text(f"edges with importance > {(finding.metrics or {}).get('tau', 0):.2f} "
                          "(heads blue, MLP orange, residual grey)"), fontsize=9)
    fig.suptitle(mpl_text(title_of(finding, "Information-flow routes")), x=0.01, ha="left")
    return fig
