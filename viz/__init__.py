"""Figures and reports of :class:`interp.finding.Finding` results.

``plot(finding, interactive=False)`` dispatches on ``finding.analysis`` through :data:`REGISTRY`
(``{analysis: (static_fn, interactive_fn)}``) to a matplotlib figure (paper-ready defaults) or a plotly
figure (hover shows values and labels); analyses without an entry get a generic plot (image overlay
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

REGISTRY: dict[str, tuple[Callable | None, Callable | None]] = {
    "probes.sinks": (_s.sinks, _i.sinks),
    "probes.secondary_sinks": (_s.secondary_sinks, _i.secondary_sinks),
    "probes.massive": (_s.massive, _i.massive),
    "probes.entropy": (_s.entropy, _i.entropy),
    "probes.logit_lens": (_s.logit_lens, _i.logit_lens),
    "probes.knockout": (_s.knockout, _i.knockout),
    "probes.linear": (_s.linear, _i.linear),
    "attribution.shapley": (_s.shapley, _i.shapley),
    "attribution.saliency": (_s.saliency, _i.saliency),
    "attribution.step_saliency": (_s.saliency, _i.saliency),
    "probes.vhd": (_s.image_map, _i.image_map),
    "attribution.cam": (_s.image_map, _i.image_map),
    "attribution.diffusion_cam": (_s.image_map, _i.image_map),
    "attribution.localisation": (_s.localisation, _i.localisation),
}
GENERIC = (_s.generic, _i.generic)


def register(analysis: str, static_fn: Callable | None = None, interactive_fn: Callable | None = None) -> None:
    """Add or replace the figures of an analysis (``fn(finding, **kw) -> Figure``; None: the generic one)."""
    REGISTRY[analysis] = (static_fn, interactive_fn)


def plotter(finding, interactive: bool = False) -> Callable:
    """The figure function :func:`plot` uses for this finding."""
    name = str(getattr(finding, "analysis", ""))
    entry = REGISTRY.get(name) or REGISTRY.get(name.removeprefix("interp."))
    if entry is None:
        arrays = getattr(finding, "arrays", None) or {}
        if any(k in arrays for k in ("map", "cam", "heatmap")):
            entry = (_s.image_map, _i.image_map)
        elif any(k in arrays for k in ("M", "I", "saliency")):
            entry = (_s.saliency, _i.saliency)
        else:
            entry = GENERIC
    return entry[1 if interactive else 0] or GENERIC[1 if interactive else 0]


def plot(finding, interactive: bool = False, **kw):
    """A matplotlib Figure (``interactive=False``) or a plotly Figure of ``finding``; ``kw`` go to the figure
    function (e.g. ``layer=`` for per-layer maps, ``n_tokens=`` for sinks, ``window=`` for massive)."""
    if not interactive and "IPython" in sys.modules:
        _enable_inline()
    return plotter(finding, interactive)(finding, **kw)


def _enable_inline() -> None:
    """In a Jupyter kernel, importing pyplot registers the inline PNG formatter, so a returned Figure displays."""
    try:
        from IPython import get_ipython
        if get_ipython() is not None and "matplotlib.pyplot" not in sys.modules:
            import matplotlib.pyplot  # noqa: F401
    except Exception:  # noqa: BLE001 - display is a convenience
        pass


__all__ = ["plot", "save", "finding_html", "report", "screenshot", "chromium_available", "register", "plotter",
           "REGISTRY"]
