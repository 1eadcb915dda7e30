"""Figures and reports of :class:`interp.finding.Finding` results.

``plot(finding, interactive=False)`` draws the figures of the finding's registered analysis
(:attr:`interp.analysis.Analysis.figures`) as a matplotlib figure (paper-ready defaults) or a plotly
figure (hover shows values and labels); analyses without figures of their own get a generic plot (image overlay
when ``arrays["map"]`` exists, saliency heatmap for ``arrays["M"]``/``arrays["I"]``, else a layer × head
heatmap or a bar chart of the score columns). ``save`` writes PNG/PDF/SVG or offline HTML,
``finding_html`` is the notebook view, ``report`` the one-page offline report and ``screenshot``
renders a page in headless Chromium and returns its console errors.
"""
from __future__ import annotations

import sys
from typing import Callable

from . import interactive as _i
from . import static as _s
from .browser import chromium_available, screenshot
from .report import finding_html, report, save
from .traces import attention, site_norms

from interp import analysis

GENERIC = (_s.generic, _i.generic)


def plotter(finding, interactive: bool = False) -> Callable:
    """The figure function :func:`plot` uses for this finding: its analysis' own, else a generic one."""
    a = analysis.REGISTRY.get(str(getattr(finding, "analysis", "")))
    fn = a.figures[1 if interactive else 0] if a is not None else None
    if fn is not None:
        return fn
    arrays = getattr(finding, "arrays", None) or {}
    if any(k in arrays for k in ("map", "cam", "heatmap")):
        entry = (_s.image_map, _i.image_map)
    elif any(k in arrays for k in ("M", "I", "saliency")):
        entry = (_s.saliency, _i.saliency)
    else:
        entry = GENERIC
    return entry[1 if interactive else 0]


def plot(finding, interactive: bool = False, **kw):
    """A matplotlib Figure (``interactive=False``) or a plotly Figure of ``finding``; ``kw`` go to the figure
    function (e.g. ``layer=`` for per-layer maps, ``n_tokens=`` for sinks, ``window=`` for massive)."""
    if "IPython" in sys.modules:
        _enable_inline()
    return plotter(finding, interactive)(finding, **kw)


def _enable_inline() -> None:
    """In a Jupyter kernel, show matplotlib Figures as PNG wherever they are returned (our figures are built
    without pyplot, so no backend registers a display for them); done once per kernel."""
    try:
        from IPython import get_ipython
        ip = get_ipython()
        if ip is None or getattr(ip, "_interp_png", False):
            return
        from matplotlib.figure import Figure

        from .report import _mpl_bytes
        ip.display_formatter.formatters["image/png"].for_type(Figure, lambda fig: _mpl_bytes(fig, "png", 110))
        ip._interp_png = True
    except Exception:  # noqa: BLE001 - display is a convenience
        pass


def trace_plot(trace, kind: str = "attn.pattern", interactive: bool = False, **kw):
    """A Trace's figure: ``attn.pattern`` (``layer=``, ``head=`` index or "mean", ``batch=``) or the per-layer,
    per-token norm of a residual-like site (``resid_post``, ``resid_pre``, ``attn.out``, ``mlp.out``)."""
    if "IPython" in sys.modules:
        _enable_inline()
    if kind == "attn.pattern":
        layer = kw.pop("layer", None)
        if layer is None:
            layers = trace.layers("attn.pattern")
            layer = layers[-1] if layers else 0
        return attention(trace, layer, interactive=interactive, **kw)
    return site_norms(trace, kind, interactive=interactive, **kw)


analysis.install_views(figure=plot, html=finding_html, trace=trace_plot)
if "IPython" in sys.modules:
    _enable_inline()

__all__ = ["plot", "save", "finding_html", "report", "screenshot", "chromium_available", "plotter", "attention",
           "site_norms", "trace_plot"]
