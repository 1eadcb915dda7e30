"""viz: static/interactive figures of every analysis, save formats, notebook HTML, the offline report and
its rendering in headless Chromium (no console errors). Synthetic findings only: fast, no model."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

import attribution  # noqa: F401  (registers the analyses: their figures and takeaway sentences)
import probes  # noqa: F401
import viz
from interp.finding import Finding

MODEL = {"name": "synthetic-tiny", "n_layers": 8}
TOKENS = ["<s>", "ĠThe", "Ġcapital", "Ġof", "ĠFrance", "Ġis", "ĠParis", ".", "\n", "ĠIt", "Ġcosts", "Ġ$5"]


def _f(analysis, table, arrays=None, params=None, metrics=None, notes=None) -> Finding:
    return Finding(analysis, pd.DataFrame(table), params or {}, dict(MODEL), "sha256:synthetic", metrics or {},
                   arrays or {}, notes or [])


def synthetic_findings() -> dict[str, Finding]:
    """One small Finding per analysis the viz package draws (plus generic fallbacks)."""
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    L, H, T = 8, 4, len(TOKENS)
    out: dict[str, Finding] = {}

    # 1. sinks
    imp = torch.rand(L, H, T, generator=g) * 0.1
    imp[:, :, 0] += torch.linspace(0.05, 0.9, L)[:, None] * torch.rand(L, H, generator=g)
    score = imp[..., 0]
    out["sinks"] = _f("probes.sinks", {
        "layer": np.repeat(np.arange(L), H), "head": np.tile(np.arange(H), L), "score": score.reshape(-1).numpy(),
        "is_sink": (score > 0.3).reshape(-1).numpy()}, {"importance": imp}, {"epsilon": 0.3, "tokens": TOKENS},
        {"epsilon": 0.3, "n_sink_heads": int((score > 0.3).sum())})

    # 2. secondary sinks
    rows = []
    for p, (pos, tok, typ, cl, lt) in [(0, (0, "<s>", "bos_sink", 0, 8)), (0, (5, "Ġis", "secondary", 3, 4)),
                                       (0, (7, ".", "secondary", 2, 6)), (0, (9, "ĠIt", "noise", 5, 1)),
                                       (1, (0, "<s>", "bos_sink", 0, 8)), (1, (4, "\n", "secondary", 4, 3))]:
        rows.append({"position": pos, "token": tok, "sink_type": typ, "creation_layer": cl, "lifetime": lt,
                     "prompt": p})
    out["secondary_sinks"] = _f("probes.secondary_sinks", rows)

    # 3. massive activations
    d = 64
    habs = torch.randn(L, T, d, generator=g).abs()
    dims, toks = [17, 40], [0, 7]
    for l in range(2, L):
        for t in toks:
            for c in dims:
                habs[l, t, c] = 300.0 + 40 * l + (c == 17) * 150
    top = habs.reshape(L, -1).topk(3, -1).values
    med = habs.reshape(L, -1).median(-1).values
    rows = [{"layer": l, "prompt": 0, "token": t, "token_str": TOKENS[t], "dim": c, "value": float(habs[l, t, c]),
             "ratio": float(habs[l, t, c] / med[l])} for l in range(2, L) for t in toks for c in dims]
    out["massive"] = _f("probes.massive", rows, {"top": top, "median": med, "layer_abs": habs[2]},
                        {"threshold": 100.0, "tokens": TOKENS}, {"threshold": 100.0, "dims": dims, "first_layer": 2})

    # 4. entropy
    ent = rng.uniform(0.05, 1.0, (L, H))
    out["entropy"] = _f("probes.entropy", {"layer": np.repeat(np.arange(L), H), "head": np.tile(np.arange(H), L),
                                           "entropy": ent.reshape(-1), "uniform": (ent > 0.9).reshape(-1)})

    # 5. logit lens
    rows = []
    tops = ["the", "of", "city", "capital", "France", "Paris", "Paris", "Paris"]
    for p, targets in [(0, [" Paris", " Rome"]), (1, [" Berlin"])]:
        for l in range(L):
            for k, tgt in enumerate(targets):
                rank = (int(5000 * math.exp(-1.2 * l)) if k == 0 and p == 0 else 30 + 3 * l if k == 1
                        else int(800 * math.exp(-0.7 * l)))
                rows.append({"prompt": p, "layer": l, "target": tgt, "target_id": 100 + k, "rank": rank,
                             "prob": 1 / (1 + rank), "logit": 10 - math.log1p(rank),
                             "top1": tops[l] if p == 0 else ["\n", "Ġthe", "Ġ$", "Berlin"][l % 4]})
    out["logit_lens"] = _f("probes.logit_lens", rows, metrics={"final_rank": [[0, 37], [0]]})

    # 6. knockout
    rows = [{"layer": l, "edge": e, "delta_pct": -s * math.exp(-((l - c) ** 2) / 4) + rng.normal(0, 1)}
            for e, s, c in [("last→subject", 60, 3), ("last→last", 20, 6), ("subject→subject", 5, 1)]
            for l in range(L)]
    out["knockout"] = _f("probes.knockout", rows, params={"window": 3})

    # 7. linear probe
    acc = 0.5 + 0.45 / (1 + np.exp(-(np.arange(L) - 3)))
    ctl = 0.5 + 0.1 * rng.random(L)
    out["linear"] = _f("probes.linear", {"layer": np.arange(L), "accuracy": acc, "control_accuracy": ctl,
                                         "selectivity": acc - ctl}, metrics={"chance": 0.5})

    # 8. shapley
    texts = ["3 + 4 = 7", "7 * 2 = 14", "14 - 5 = 9", "9 / 3 = 3", "So the answer is $3.", "x = 12 - 4"]
    out["shapley"] = _f("attribution.shapley", {"player": np.arange(6), "text": texts,
                                                "phi": [0.21, 0.12, -0.05, 0.08, -0.11, 0.02]},
                        metrics={"v_full": 0.9, "v_empty": 0.6})

    # 9. saliency (token map) and step saliency (step map)
    I = torch.rand(L, T, T, generator=g).tril()
    out["saliency"] = _f("attribution.saliency", {"layer": np.arange(L), "flow_to_target": rng.random(L)},
                         {"I": I}, {"tokens": TOKENS})
    S = 6
    M = torch.randn(L, S, S, generator=g).tril()
    out["step_saliency"] = _f("attribution.step_saliency",
                              {"layer": np.arange(L), "step_to_step": rng.random(L), "question_to_step": rng.random(L)},
                              {"M": M}, {"steps": [f"step {i + 1}" for i in range(S)]})

    # 10. image maps
    yy, xx = np.mgrid[0:32, 0:32] / 31
    image = torch.tensor(np.stack([xx, yy, 0.5 * (1 - xx)]), dtype=torch.float32)  # [3, 32, 32] in 0..1
    vmap = torch.rand(L, 8, 8, generator=g)
    vmap[:, 2:4, 5:7] += 2
    out["vhd"] = _f("probes.vhd", {"layer": np.arange(L), "score": vmap.amax((1, 2)).numpy()},
                    {"map": vmap, "image": image})
    out["cam"] = _f("attribution.cam", {"patch": np.arange(49), "score": rng.random(49)},
                    {"map": torch.randn(7, 7, generator=g), "image": image})
    out["diffusion_cam"] = _f("attribution.diffusion_cam", {"layer": np.arange(4), "score": rng.random(4)},
                              {"map": torch.rand(4, 6, 6, generator=g)})

    # generic fallbacks
    out["generic_heads"] = _f("probes.unknown_heads", {"layer": np.repeat(np.arange(4), 3),
                                                       "head": np.tile(np.arange(3), 4), "value": rng.random(12)})
    out["generic_bars"] = _f("probes.unknown_bars", {"name": ["a", "b", "c", "d"], "effect": [0.3, -0.2, 0.5, 0.1],
                                                     "effect_se": [0.05, 0.04, 0.06, 0.02]})
    out["generic_empty"] = _f("probes.unknown_empty", pd.DataFrame(columns=["layer", "score"]),
                              notes=["no rows: the plot says so"])
    return out


FINDINGS = synthetic_findings()
# text that must appear (as SVG text) in each static figure
SVG_TEXT = {"sinks": "head", "secondary_sinks": "lifetime", "massive": "hidden dim", "entropy": "normalised entropy",
            "logit_lens": "Paris", "knockout": "last→subject", "linear": "control task", "shapley": "Shapley value",
            "saliency": "capital", "step_saliency": "step 3", "vhd": "relevance", "cam": "relevance",
            "diffusion_cam": "relevance", "generic_heads": "layer", "generic_bars": "effect",
            "generic_empty": "empty table"}


@pytest.fixture(scope="module")
def findings():
    return FINDINGS


def test_registry_dispatch(findings):
    import matplotlib.figure

    import probes  # noqa: F401  (registers the probes and their figures)
    from interp import analysis
    assert viz.plotter(findings["sinks"]) is analysis.get("probes.sinks").figures[0]
    assert viz.plotter(findings["generic_bars"]) is viz.GENERIC[0]
    unknown_map = Finding("some.new_cam", pd.DataFrame({"x": [1]}), arrays={"map": torch.rand(4, 4)})
    assert viz.plotter(unknown_map).__name__ == "image_map"
    fig = findings["sinks"].plot()  # Finding.plot → viz.plot
    assert isinstance(fig, matplotlib.figure.Figure)


@pytest.mark.parametrize("name", list(SVG_TEXT))
def test_static_figure_saves(name, findings, tmp_path):
    import matplotlib.figure
    fig = viz.plot(findings[name])
    assert isinstance(fig, matplotlib.figure.Figure)
    assert all(t.get_fontsize() >= 9 for ax in fig.axes for t in ax.get_xticklabels() + ax.get_yticklabels())
    for ext, magic in ((".png", b"\x89PNG"), (".pdf", b"%PDF"), (".svg", b"<?xml")):
        p = viz.save(fig, tmp_path / f"{name}{ext}")
        data = p.read_bytes()
        assert len(data) > 1000 and data.startswith(magic), (name, ext)
    svg = (tmp_path / f"{name}.svg").read_text(encoding="utf-8")
    assert "<text" in svg and SVG_TEXT[name] in svg, f"{SVG_TEXT[name]!r} not drawn as text in {name}.svg"


def test_png_dpi(findings, tmp_path):
    from PIL import Image
    fig = viz.plot(findings["linear"])
    viz.save(fig, tmp_path / "a.png")
    w, _ = Image.open(tmp_path / "a.png").size
    assert w > fig.get_size_inches()[0] * 150  # saved at 200 dpi (bbox tight trims a little)


@pytest.mark.parametrize("name", list(SVG_TEXT))
def test_interactive_figure(name, findings, tmp_path):
    import plotly.graph_objects as go
    fig = viz.plot(findings[name], interactive=True)
    assert isinstance(fig, go.Figure)
    assert "cdn." not in fig.to_html(full_html=True, include_plotlyjs=False)
    if name != "generic_empty":
        assert any(getattr(t, "hovertemplate", None) for t in fig.data), "hover shows no values"
    p = viz.save(fig, tmp_path / f"{name}.html")
    page = p.read_text(encoding="utf-8")
    assert "<script src=" not in page and "require(" not in page.split("</script>")[-2][-2000:]
    assert len(page) > 1_000_000  # plotly.js inline: opens offline


def test_finding_html_self_contained(findings):
    for name in ("sinks", "logit_lens", "vhd", "generic_empty"):
        h = findings[name]._repr_html_()
        assert "data:image/png;base64," in h
        assert "<script" not in h and "src=\"http" not in h
        assert findings[name].analysis in h
    assert "<table" in findings["sinks"]._repr_html_()


def _write_report(findings, out):
    (out / "findings").mkdir(parents=True)
    (out / "specs").mkdir()
    findings["sinks"].save(out / "findings" / "sinks.json")
    (out / "specs" / "sinks_zerotuning.json").write_text(json.dumps({"schema": "interp.spec/1"}))
    return viz.report(findings, out, title="Synthetic findings", subtitle="viz test report", strict=True)


@pytest.fixture(scope="module")
def report_dir(findings, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    _write_report(findings, out)
    return out


def test_report_files(findings, report_dir):
    from plotly.offline import get_plotlyjs
    page = (report_dir / "report.html").read_text(encoding="utf-8")
    assert get_plotlyjs()[:300] not in page and "cdn.plot.ly/plotly" not in page  # not inlined, no CDN
    assert page.count('<script type="text/javascript" src="plotly.min.js">') == 1  # once, from the local file
    assert (report_dir / "plotly.min.js").read_text(encoding="utf-8") == get_plotlyjs()
    assert page.count('class="plotly-graph-div"') == len(findings)
    assert 'href="findings/sinks.json"' in page and 'href="specs/sinks_zerotuning.json"' in page
    for name in findings:
        for ext in (".png", ".svg"):
            assert (report_dir / "figures" / f"{name}{ext}").stat().st_size > 1000
        assert f'id="f-{name}"' in page


chromium = pytest.mark.skipif(not viz.chromium_available(), reason="headless chromium is not installed "
                              "(apt-get install chromium); the report's browser check needs it")


@chromium
@pytest.mark.parametrize("width", [900, 1400])
def test_report_renders_without_console_errors(report_dir, width):
    from PIL import Image
    shot = report_dir / f"shot{width}.png"
    errors = viz.screenshot(report_dir / "report.html", shot, width=width, height=1400, method="cdp")
    assert errors == []
    im = Image.open(shot).convert("L")
    assert im.size == (width, 1400)
    assert len(np.unique(np.asarray(im.resize((60, 70))))) > 20  # something was drawn, not a blank page


def test_report_leads_with_each_takeaway(report_dir, findings):
    """The first thing in each finding's section, after its heading, is its takeaway sentence."""
    import html as _html
    import re as _re

    import probes  # noqa: F401  (registers the analyses whose sentences these are)
    page = (report_dir / "report.html").read_text()
    for name, f in findings.items():
        if f'id="f-{name}"' not in page:
            continue
        sec = page.split(f'id="f-{name}"', 1)[1]
        first = _re.search(r'<div class="side">\s*(<[^>]+>)([^<]*)', sec)
        try:
            want = f.explain()
        except Exception as e:  # noqa: BLE001 - a hand-made finding may lack a metric its sentence uses
            want = f"(no takeaway: {type(e).__name__}: {e})"
        if want:
            assert first.group(1) == '<p class="takeaway">' and _html.unescape(first.group(2)) == want, name


@chromium
def test_screenshot_reports_console_errors(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text("<html><body><p>x</p><script>console.log('all-good'); console.error('boom');"
                    "undefinedFunction();</script></body></html>")
    errors = viz.screenshot(page, tmp_path / "bad.png", width=400, height=300, method="cdp")
    assert any("boom" in e for e in errors) and any("undefinedFunction" in e for e in errors)
    assert not any("all-good" in e for e in errors)
    assert (tmp_path / "bad.png").stat().st_size > 0


def test_knockout_that_kept_no_item_draws_a_card():
    """A knockout whose items the model all got wrong has an empty table: both backends draw the generic card
    (which says "empty table") instead of failing."""
    import matplotlib.pyplot as plt
    f = _f("probes.knockout", pd.DataFrame(columns=["layer", "edge", "delta_pct", "sem"]), params={"window": 5})
    fig = viz.plot(f)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert any("empty table" in t for t in texts), texts
    plt.close(fig)
    assert viz.plot(f, interactive=True) is not None
