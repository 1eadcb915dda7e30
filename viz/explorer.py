"""The route explorer: one offline HTML page (inline SVG and JavaScript, no network, no plotly) of a
``probes.routes`` finding.

* tokens × layers as a route graph (layer l's attention from y = l to l + ½, its MLP from l + ½ to l + 1;
  edge width ∝ importance; heads blue, MLP orange, residual grey);
* clicking a token shows the route into it (traced here, in Python, from the finding's importances for every
  token with the finding's τ, exactly as :func:`probes.routes.trace_routes` does);
* hovering a head (in the layer × head grid, or a head edge of the graph) shows its attention row at the
  selected token (the finding's patterns) and its direct logit attribution, when a ``probes.dla`` finding
  is given.

``write(findings, out_dir) -> Path`` writes ``explorer.html``; :func:`interact` loads a page in headless
Chromium over the DevTools pipe (as :mod:`viz.browser` does), runs JavaScript expressions on it (e.g. a
dispatched click) and returns their values with the page's console errors.
"""
from __future__ import annotations

import html
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import torch

from interp.errors import InterpError
from interp.finding import Finding

from . import browser
from .static import clean_token

_KINDS = {"head": 0, "attn": 0, "resid": 1, "mlp": 2}


def _pick(findings: Any) -> tuple[Finding, Finding | None]:
    if isinstance(findings, Finding):
        findings = [findings]
    if not isinstance(findings, Iterable) or isinstance(findings, (str, bytes, dict)):
        raise InterpError(f"explorer.write takes a probes.routes Finding or a list of Findings, got "
                          f"{type(findings).__name__}")
    findings = list(findings)
    routes = [f for f in findings if isinstance(f, Finding) and f.analysis == "probes.routes"]
    dla = [f for f in findings if isinstance(f, Finding) and f.analysis == "probes.dla"]
    if not routes:
        raise InterpError("the explorer draws a probes.routes finding: run probes.routes.routes(model, prompt) and "
                          "pass its Finding (and a probes.dla Finding of the same model for the heads' DLA)")
    r = routes[0]
    if dla and dla[0].model != r.model:
        raise InterpError("the probes.dla finding comes from another model than the routes finding")
    return r, (dla[0] if dla else None)


def page_data(routes: Finding, dla: Finding | None = None) -> dict:
    """What the page draws: tokens, every token's route, the patterns and the heads' DLA."""
    from probes.routes import trace_routes
    a = routes.arrays
    if "head" not in a:
        raise InterpError("this routes finding has no importance arrays (saved without them?): run probes.routes again")
    imp = {k: torch.as_tensor(a[k]) for k in ("head", "attn_resid", "mlp", "mlp_resid")}
    L, T, H, _ = imp["head"].shape
    p = routes.params or {}
    tau, combine = float(p.get("tau", 0.04)), bool(p.get("combine_heads", False))
    toks = [clean_token(t) for t in (p.get("tokens") or range(T))]
    per_token = []
    for i in range(T):
        rows = trace_routes(imp, i, tau, combine)
        per_token.append([[r["layer"], 1 if r["stage"] == "mlp" else 0, _KINDS[r["kind"]], r["head"], r["source"],
                           r["target"], round(r["importance"], 4)] for r in rows])
    pat = a.get("pattern")
    heads_dla = dla.arrays.get("heads") if dla is not None else None
    if heads_dla is not None and tuple(heads_dla.shape) != (L, H):
        raise InterpError(f"the DLA finding has {tuple(heads_dla.shape)} heads, the routes finding ({L}, {H})")
    return {"tokens": toks, "L": L, "H": H, "tau": tau, "start": int(p.get("position", T - 1)), "routes": per_token,
            "pattern": None if pat is None else torch.as_tensor(pat).float().round(decimals=4).tolist(),
            "dla": None if heads_dla is None else torch.as_tensor(heads_dla).float().round(decimals=4).tolist(),
            "dla_target": None if dla is None else (dla.metrics or {}).get("target"),
            "title": "Information-flow routes — " + str((routes.model or {}).get("name", ""))}


def write(findings: Any, out_dir: str | Path, name: str = "explorer.html") -> Path:
    """Write the explorer page of a ``probes.routes`` finding (plus an optional ``probes.dla`` finding, in a list)
    to ``out_dir/name``; returns its path."""
    r, d = _pick(findings)
    data = page_data(r, d)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    blob = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    path.write_text(_PAGE.replace("__TITLE__", html.escape(data["title"])).replace("__DATA__", blob),
                    encoding="utf-8")
    return path


def interact(html_path: str | Path, expressions: list[str], *, timeout: float = 60.0,
             settle_ms: int = 200) -> tuple[list[str], list[Any]]:
    """Load ``html_path`` in headless Chromium, evaluate each JavaScript expression in turn (after the load event;
    e.g. ``el.dispatchEvent(new MouseEvent('click', {bubbles: true}))`` then a read-back) and return the page's
    console errors and the expressions' values."""
    if not browser.chromium_available():
        raise RuntimeError("headless Chromium is not installed (apt-get install chromium)")
    errors: list[str] = []
    values: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="viz-explorer-") as profile:
        pipe = browser._Pipe([browser.chromium_path(), *browser.FLAGS, f"--user-data-dir={profile}",
                              "--remote-debugging-pipe", "--window-size=1400,1000", "about:blank"], timeout)
        try:
            target = pipe.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            sid = pipe.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

            def on_event(m):
                if m.get("sessionId") == sid:
                    e = browser._error_of(m)
                    if e is not None:
                        errors.append(e)
            pipe.on_event = on_event
            for method in ("Page.enable", "Runtime.enable", "Log.enable"):
                pipe.call(method, session=sid)
            nav = pipe.call("Page.navigate", {"url": browser._url(html_path)}, session=sid)
            if nav.get("errorText"):
                errors.append(f"navigation failed: {nav['errorText']}")
            if pipe.wait_event("Page.loadEventFired", sid, timeout) is None:
                errors.append(f"the page did not finish loading within {timeout:.0f} s")
            time.sleep(settle_ms / 1000)
            for ex in expressions:
                res = pipe.call("Runtime.evaluate", {"expression": ex, "returnByValue": True}, session=sid)
                if "exceptionDetails" in res:
                    d = res["exceptionDetails"]
                    errors.append("Uncaught " + str((d.get("exception") or {}).get("description") or d.get("text")))
                    values.append(None)
                else:
                    values.append(res.get("result", {}).get("value"))
        finally:
            pipe.close()
    return errors, values


_PAGE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font-family:"DejaVu Sans",Arial,sans-serif;margin:16px;color:#222}
#tokens{margin:8px 0;line-height:2.1}
.tok{border:1px solid #bbb;border-radius:3px;padding:1px 4px;margin:1px;cursor:pointer;white-space:pre;font-family:monospace}
.tok.sel{background:#0072B2;color:#fff}.tok.on{border-color:#0072B2}
#wrap{display:flex;gap:18px;align-items:flex-start}
#info{min-width:320px;font-size:13px}.head{cursor:crosshair}
</style></head><body>
<h2>__TITLE__</h2>
<div>Click a token to show the route into it; hover a head (grid, or a blue edge) for its attention row and DLA.</div>
<div id="tokens"></div><div id="summary"></div>
<div id="wrap"><svg id="graph"></svg><div><svg id="heads"></svg><div id="info">hover a head</div><svg id="row"></svg></div></div>
<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const NS = "http://www.w3.org/2000/svg", T = D.tokens.length, DX = 46, DY = 34, PAD = 40;
const COL = ["#0072B2", "#8c8c8c", "#D55E00"];
let sel = D.start;
function el(tag, attrs, parent) {
  const e = document.createElementNS(NS, tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (parent) parent.appendChild(e);
  return e;
}
const X = i => PAD + i * DX, Y = y => PAD + (D.L - y) * DY;
function drawTokens() {
  const box = document.getElementById("tokens");
  D.tokens.forEach((t, i) => {
    const s = document.createElement("span");
    s.className = "tok"; s.dataset.i = i; s.textContent = t; s.title = "token " + i;
    s.addEventListener("click", () => select(i));
    box.appendChild(s);
  });
}
function select(i) {
  sel = i;
  const route = D.routes[i], g = document.getElementById("graph");
  g.innerHTML = "";
  g.setAttribute("width", PAD * 2 + (T - 1) * DX); g.setAttribute("height", PAD * 2 + D.L * DY);
  for (let l = 0; l <= D.L; l++) {
    el("line", {x1: X(0) - 10, x2: X(T - 1) + 10, y1: Y(l), y2: Y(l), stroke: "#eee"}, g);
    el("text", {x: 4, y: Y(l) + 4, "font-size": 10}, g).textContent = l === 0 ? "emb" : "L" + (l - 1);
  }
  const reached = new Set([i]);
  for (const [l, st, kind, h, src, tgt, w] of route) {
    const y0 = l + st * 0.5;
    reached.add(src);
    if (kind === 2) {
      el("rect", {x: X(src) - 3, y: Y(y0 + 0.5) - 3, width: 6, height: 6, fill: COL[2], class: "edge",
                  opacity: 0.3 + 0.7 * w}, g);
      continue;
    }
    const e = el("line", {x1: X(src), y1: Y(y0), x2: X(tgt), y2: Y(y0 + 0.5), stroke: COL[kind],
                          "stroke-width": 0.5 + 6 * w, opacity: 0.4 + 0.6 * w, class: "edge"}, g);
    el("title", {}, e).textContent = (kind === 0 ? (h >= 0 ? "L" + l + "H" + h : "L" + l + " heads") : "residual")
      + ": " + D.tokens[src] + " \u2192 " + D.tokens[tgt] + " (" + w.toFixed(3) + ")";
    if (kind === 0 && h >= 0) e.addEventListener("mouseenter", () => showHead(l, h));
  }
  D.tokens.forEach((t, j) => el("text", {x: X(j), y: Y(0) + 16, "font-size": 10, "text-anchor": "middle",
                                          fill: reached.has(j) ? "#000" : "#bbb"}, g).textContent = t.slice(0, 6));
  document.querySelectorAll(".tok").forEach(s => {
    s.classList.toggle("sel", +s.dataset.i === i); s.classList.toggle("on", reached.has(+s.dataset.i));
  });
  const heads = route.filter(r => r[2] === 0).length;
  document.getElementById("summary").textContent = "Route into token " + i + " (" + D.tokens[i] + "): "
    + route.length + " edges, " + heads + " through heads, reaching " + reached.size + " of " + T
    + " tokens (importance > " + D.tau + ")";
  drawHeads();
}
function drawHeads() {
  const g = document.getElementById("heads"), c = 14;
  g.innerHTML = "";
  g.setAttribute("width", 30 + D.H * c); g.setAttribute("height", 24 + D.L * c);
  el("text", {x: 0, y: 20 + D.L * c, "font-size": 10}, g).textContent = "heads →, layer 0 at the bottom";
  const use = {};
  for (const [l, st, kind, h, src, tgt, w] of D.routes[sel]) if (kind === 0 && h >= 0) use[l + "," + h] = (use[l + "," + h] || 0) + w;
  let m = 1e-9;
  if (D.dla) D.dla.forEach(r => r.forEach(v => { m = Math.max(m, Math.abs(v)); }));
  for (let l = 0; l < D.L; l++) for (let h = 0; h < D.H; h++) {
    let fill = "#f4f4f4";
    if (D.dla) { const v = D.dla[l][h] / m; fill = v >= 0 ? `rgba(0,114,178,${v})` : `rgba(213,94,0,${-v})`; }
    const r = el("rect", {x: 30 + h * c, y: 4 + (D.L - 1 - l) * c, width: c - 1, height: c - 1, fill: fill, class: "head",
                          "data-l": l, "data-h": h, stroke: use[l + "," + h] ? "#000" : "none"}, g);
    r.addEventListener("mouseenter", () => showHead(l, h));
  }
}
function showHead(l, h) {
  const info = document.getElementById("info"), g = document.getElementById("row");
  let s = "L" + l + "H" + h;
  if (D.dla) s += " \u2014 DLA " + D.dla[l][h].toFixed(3) + (D.dla_target ? " (target " + D.dla_target[0] + ")" : "");
  else s += " \u2014 no DLA finding given";
  const row = D.pattern ? D.pattern[l][h][sel] : null;
  info.textContent = s + (row ? "; attention of token " + sel + ":" : "; no attention patterns in the finding");
  info.dataset.head = l + "," + h;
  g.innerHTML = "";
  if (!row) return;
  const w = 16;
  g.setAttribute("width", 10 + T * w); g.setAttribute("height", 110);
  row.forEach((v, j) => {
    const b = el("rect", {x: 5 + j * w, y: 85 - 80 * v, width: w - 2, height: 80 * v, fill: "#0072B2",
                          class: "bar", "data-v": v}, g);
    el("title", {}, b).textContent = D.tokens[j] + ": " + v.toFixed(3);
    el("text", {x: 5 + j * w + w / 2, y: 100, "font-size": 8, "text-anchor": "middle"}, g).textContent = D.tokens[j].slice(0, 3);
  });
}
drawTokens();
select(sel);
</script></body></html>
"""
