"""Saving figures, the notebook HTML of a finding and the one-page offline report.

Nothing here reaches the network: figures in :func:`finding_html` are inline base64 PNGs, and
:func:`report` writes plotly.js once beside the page, as a local file (no CDN, no ``require``).
"""
from __future__ import annotations

import base64
import html
import io
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import matplotlib as mpl
import pandas as pd

from interp.finding import metric_label, metric_value

from .static import STYLE

VECTOR = {".pdf", ".svg", ".eps", ".ps"}
RASTER = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp"}


def _is_plotly(fig) -> bool:
    return type(fig).__module__.startswith("plotly") or hasattr(fig, "to_plotly_json")


def _is_mpl(fig) -> bool:
    return hasattr(fig, "savefig")


def _mpl_bytes(fig, fmt: str = "png", dpi: int = 200) -> bytes:
    buf = io.BytesIO()
    with mpl.rc_context(STYLE), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing")
        fig.savefig(buf, format=fmt, dpi=dpi, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def _plotly_div(fig, div_id: str | None = None) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id,
                       config={"responsive": True, "displaylogo": False})


def _plotlyjs() -> str:
    from plotly.offline import get_plotlyjs
    return get_plotlyjs()


def save(fig, path: str | Path, dpi: int = 200) -> Path:
    """Write a figure by suffix: matplotlib → PNG (``dpi``, 200 by default) / PDF / SVG (vector, text kept as
    text) / JPG; plotly → self-contained HTML (plotly.js inline, opens offline). A plotly figure to an image
    suffix needs ``kaleido``; a matplotlib figure to ``.html`` becomes a page with the PNG inline."""
    path = Path(path)
    suffix = path.suffix.lower() or (".html" if _is_plotly(fig) else ".png")
    if not path.suffix:
        path = path.with_suffix(suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    if _is_plotly(fig):
        if suffix in (".html", ".htm"):
            path.write_text(fig.to_html(full_html=True, include_plotlyjs=True, include_mathjax=False,
                                        config={"responsive": True, "displaylogo": False}), encoding="utf-8")
        elif suffix == ".json":
            path.write_text(fig.to_json(), encoding="utf-8")
        else:
            try:
                fig.write_image(str(path))
            except (ImportError, ValueError, RuntimeError) as e:
                raise RuntimeError(f"writing a plotly figure as {suffix} needs kaleido ({e}); save it as .html, or "
                                   f"plot with interactive=False for {suffix}") from None
        return path
    if not _is_mpl(fig):
        raise TypeError(f"viz.save: expected a matplotlib or plotly figure, got {type(fig).__name__}")
    if suffix in (".html", ".htm"):
        b64 = base64.b64encode(_mpl_bytes(fig, "png", dpi)).decode()
        path.write_text(f'<!doctype html><meta charset="utf-8"><img alt="figure" style="max-width:100%" '
                        f'src="data:image/png;base64,{b64}">', encoding="utf-8")
        return path
    if suffix not in VECTOR | RASTER:
        raise ValueError(f"viz.save: unsupported suffix {suffix!r}; use .png, .pdf, .svg or .html")
    fmt = {"jpg": "jpeg", "tif": "tiff"}.get(suffix[1:], suffix[1:])
    path.write_bytes(_mpl_bytes(fig, fmt, dpi))
    return path


# ---------------------------------------------------------------------------------------------
def _fmt(v: Any, n: int = 12) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, (list, tuple)):
        flat = [_fmt(x, n) for x in list(v)[:n]]
        return "[" + ", ".join(flat) + (f", … ({len(v)} items)]" if len(v) > n else "]")
    if isinstance(v, dict):
        items = list(v.items())
        s = ", ".join(f"{k}: {_fmt(x, n)}" for k, x in items[:n])
        return "{" + s + (f", … ({len(items)} keys)" if len(items) > n else "") + "}"
    return str(v)


def _top_table(finding, k: int = 10) -> pd.DataFrame:
    try:
        t = finding.top(k)
    except Exception:  # noqa: BLE001 - no numeric column: the first rows
        t = finding.table.head(k)
    return t


def _df_html(df: pd.DataFrame) -> str:
    d = df.copy()
    for c in d.columns:
        if d[c].dtype == object:
            d[c] = d[c].map(lambda x: _fmt(x, 6) if isinstance(x, (list, tuple, dict)) else x)
    return d.to_html(index=False, escape=True, border=0, classes="interp-table",
                     float_format=lambda x: f"{x:.4g}", na_rep="")


def _metrics_html(metrics: Mapping, style: str = "") -> str:
    if not metrics:
        return "<p class='muted'>no metrics</p>"
    rows = "".join(f"<tr><th>{html.escape(metric_label(k))}</th><td>{html.escape(metric_value(k, v))}</td></tr>"
                   for k, v in metrics.items())
    return f"<table class='interp-table metrics' style='{style}'>{rows}</table>"


def _takeaway(finding) -> str:
    try:
        return finding.explain() or ""
    except Exception as e:  # noqa: BLE001 - a sentence must never break the page
        return f"(no takeaway: {type(e).__name__}: {e})"


def _head(finding) -> str:
    """The takeaway sentence, then the notes (why something was not computed, protocol deviations)."""
    t = _takeaway(finding)
    out = f'<p class="takeaway">{html.escape(t)}</p>' if t else ""
    notes = list(getattr(finding, "notes", []) or [])
    if notes:
        out += "<ul class='notes'>" + "".join(f"<li>{html.escape(str(n))}</li>" for n in notes) + "</ul>"
    return out


_TABLE_CSS = ("border-collapse:collapse;font-size:12px;font-family:ui-monospace,Menlo,Consolas,monospace;"
              "margin:4px 0")


def finding_html(finding, dpi: int = 110, rows: int = 10) -> str:
    """Self-contained HTML of a finding (Jupyter ``_repr_html_``): the summary, the top ``rows`` rows of the
    table and the static figure as an inline base64 PNG (no network needed)."""
    from . import plot
    model = (finding.model or {}).get("name", "?")
    parts = ['<div class="interp-finding" style="font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;'
             'max-width:1100px">',
             f'<div style="font-size:13px;color:#555">{html.escape(finding.analysis)} on {html.escape(str(model))}'
             f' · {len(finding.table)} rows</div>',
             _head(finding).replace('class="takeaway"', 'style="font-size:15px;font-weight:600;margin:4px 0"'),
             f"<details><summary style='cursor:pointer'>metrics</summary>"
             f"{_metrics_html(finding.metrics or {}, _TABLE_CSS)}"
             "</details>"]
    try:
        t = _top_table(finding, rows)
        tab = _df_html(t).replace('class="dataframe interp-table"', f'class="dataframe interp-table" style="{_TABLE_CSS}"')
        parts.append(f"<details open><summary style='cursor:pointer'>top {len(t)} of {len(finding.table)} rows"
                     f"</summary>{tab}</details>")
    except Exception as e:  # noqa: BLE001
        parts.append(f"<p>table unavailable: {html.escape(str(e))}</p>")
    try:
        fig = plot(finding)
        b64 = base64.b64encode(_mpl_bytes(fig, "png", dpi)).decode()
        parts.append(f'<img alt="{html.escape(finding.analysis)} figure" style="max-width:100%;height:auto" '
                     f'src="data:image/png;base64,{b64}"/>')
    except Exception as e:  # noqa: BLE001 - a repr must never raise
        parts.append(f"<p style='color:#b00'>figure failed: {html.escape(type(e).__name__)}: "
                     f"{html.escape(str(e))}</p>")
    parts.append("</div>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(s)).strip("._") or "finding"


def _items(findings) -> list[tuple[str, Any]]:
    from interp.finding import Finding
    if isinstance(findings, Mapping):
        pairs = [(str(k), v) for k, v in findings.items()]
    else:
        if isinstance(findings, (Finding, str, Path)):
            findings = [findings]
        pairs = [(None, f) for f in findings]
    out, seen = [], {}
    for name, f in pairs:
        if isinstance(f, (str, Path)):
            f = Finding.load(f)
        base = _slug(name or f.analysis.replace(".", "_"))
        seen[base] = seen.get(base, 0) + 1
        out.append((base if seen[base] == 1 else f"{base}_{seen[base]}", f))
    return out


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;color:#1b1f24;background:#fafafa}
header{background:#1b2a41;color:#fff;padding:18px 28px}
header h1{margin:0;font-size:24px;font-weight:600}
header p{margin:4px 0 0;color:#c9d3e0;font-size:13px}
main{padding:12px 28px 40px}
nav{font-size:13px;margin:8px 0 14px;line-height:1.8}
nav a{margin-right:14px;color:#0b5cad;text-decoration:none;white-space:nowrap}
section{background:#fff;border:1px solid #e3e6ea;border-radius:6px;margin:16px 0;padding:12px 18px}
section h2{font-size:18px;margin:4px 0 8px}
section h2 small{color:#666;font-weight:400;font-size:13px}
.cols{display:grid;grid-template-columns:minmax(240px,320px) minmax(0,1fr);gap:18px;align-items:start}
@media (max-width:1100px){.cols{grid-template-columns:minmax(0,1fr)}}
p.takeaway{font-size:15px;font-weight:600;margin:2px 0 10px;line-height:1.4}
ul.notes{font-size:12px;color:#8a5a00;margin:0 0 8px;padding-left:18px}
.skipped li{margin:4px 0}
.side{font-size:12px;overflow-x:auto}
.interp-table{border-collapse:collapse;font-size:12px;font-family:ui-monospace,Menlo,Consolas,monospace}
.interp-table th,.interp-table td{border-bottom:1px solid #eceff2;padding:2px 6px;text-align:left;vertical-align:top}
.interp-table th{background:#f3f5f7}
.metrics th{font-weight:600;white-space:nowrap}
.fig{min-height:300px}
.links a{margin-right:10px}
.muted{color:#777}
.scroll{max-height:340px;overflow:auto}
details{margin:4px 0}
summary{cursor:pointer;font-weight:600}
.error{color:#b00020;white-space:pre-wrap}
ul.files{columns:2;font-size:13px}
"""


def report(findings: Iterable | Mapping, out_dir: str | Path, title: str = "interp report", *, subtitle: str = "",
           rows: int = 8, strict: bool = False, skipped: Mapping[str, str] | None = None) -> Path:
    """Write ``out_dir/report.html`` and ``out_dir/figures/<name>.png|.svg``; return the report's path.

    ``findings``: Findings, paths of saved findings (``.json``), or a dict ``{name: finding}``. The page has a
    section per finding (its takeaway sentence first, then notes, metrics, top rows and its interactive plotly
    figure); plotly.js is written once beside the page (``plotly.min.js``), so the page opens offline. ``skipped``
    (``{name: reason}``) lists the analyses that could not run, with why. ``findings/*.json`` and ``specs/*.json`` already in ``out_dir`` are
    linked. A figure that fails is reported in its section (``strict=True``: raise instead)."""
    from . import plot
    out = Path(out_dir)
    figdir = out / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    items = _items(findings)
    nav, sections = [], []
    for name, f in items:
        anchor = f"f-{name}"
        nav.append(f'<a href="#{anchor}">{html.escape(name)}</a>')
        errors, files = [], []
        try:
            sfig = plot(f)
            for ext in (".png", ".svg"):
                p = save(sfig, figdir / f"{name}{ext}")
                files.append(f'<a href="figures/{p.name}">{ext[1:].upper()}</a>')
        except Exception as e:  # noqa: BLE001
            if strict:
                raise
            errors.append(f"static figure failed: {type(e).__name__}: {e}")
            warnings.warn(f"viz.report: static figure of {name} failed: {e}")
        try:
            div = _plotly_div(plot(f, interactive=True), div_id=f"plot-{name}")
        except Exception as e:  # noqa: BLE001
            if strict:
                raise
            errors.append(f"interactive figure failed: {type(e).__name__}: {e}")
            warnings.warn(f"viz.report: interactive figure of {name} failed: {e}")
            div = ""
        model = (f.model or {}).get("name", "")
        try:
            top = _df_html(_top_table(f, rows))
        except Exception as e:  # noqa: BLE001
            top = f"<p class='error'>{html.escape(str(e))}</p>"
        err = "".join(f"<p class='error'>{html.escape(e)}</p>" for e in errors)
        sections.append(f"""
<section id="{anchor}">
 <h2>{html.escape(name)} <small>{html.escape(f.analysis)}{' · ' + html.escape(str(model)) if model else ''}
 · {len(f.table)} rows</small></h2>
 <div class="cols">
  <div class="side">
   {_head(f)}
   <details open><summary>metrics</summary><div class="scroll">{_metrics_html(f.metrics or {})}</div></details>
   <details><summary>top {rows} rows</summary><div class="scroll">{top}</div></details>
   <p class="links">static figure: {' '.join(files) or '—'}</p>
  </div>
  <div class="fig">{err}{div}</div>
 </div>
</section>""")
    links = []
    for sub in ("findings", "specs"):
        files = sorted((out / sub).glob("*.json")) if (out / sub).is_dir() else []
        if files:
            lis = "".join(f'<li><a href="{sub}/{html.escape(p.name)}">{html.escape(p.name)}</a></li>' for p in files)
            links.append(f"<h3>{sub}</h3><ul class='files'>{lis}</ul>")
    files_section = f'<section id="files"><h2>Files</h2>{"".join(links)}</section>' if links else ""
    if skipped:
        lis = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in skipped.items())
        files_section = f'<section id="skipped"><h2>Not run</h2><ul class="skipped">{lis}</ul></section>' + files_section
    (out / "plotly.min.js").write_text(_plotlyjs(), encoding="utf-8")
    explorer = _explorer(items, out)
    if explorer is not None:
        nav.append(f'<a href="{explorer.name}"><b>route explorer</b></a>')
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{_CSS}</style>
<script type="text/javascript">window.PlotlyConfig = {{MathJaxConfig: "local"}};</script>
<script type="text/javascript" src="plotly.min.js"></script>
</head><body>
<header><h1>{html.escape(title)}</h1><p>{html.escape(subtitle or f"{len(items)} findings")}</p></header>
<main>
<nav>{''.join(nav)}{'<a href="#files">files</a>' if links else ''}</nav>
{''.join(sections)}
{files_section}
</main></body></html>
"""
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def _explorer(items: list[tuple[str, Any]], out: Path) -> Path | None:
    """The interactive route explorer beside the report, when a ``probes.routes`` finding is among the items
    (with the ``probes.dla`` finding, if any, for the head hover)."""
    routes = [f for _, f in items if f.analysis == "probes.routes"]
    if not routes:
        return None
    from . import explorer
    dla = [f for _, f in items if f.analysis == "probes.dla"]
    try:
        return explorer.write(routes[:1] + dla[:1], out)
    except Exception as e:  # noqa: BLE001 - the report stands without it
        warnings.warn(f"viz.report: the route explorer could not be written: {e}")
        return None


def report_json_index(out_dir: str | Path) -> dict:
    """The findings/specs JSON files a report in ``out_dir`` links to (for scripts and tests)."""
    out = Path(out_dir)
    return {sub: sorted(p.name for p in (out / sub).glob("*.json")) for sub in ("findings", "specs")
            if (out / sub).is_dir()}


__all__ = ["save", "finding_html", "report", "report_json_index"]
