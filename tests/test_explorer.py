"""viz.explorer: the route explorer page renders offline in headless Chromium without console errors; a click
on a token draws the route into that token; hovering a head shows its attention row and its DLA."""
from __future__ import annotations

import pytest

import interp
from conftest import random_ids, tiny_hf
from probes.dla import dla
from probes.routes import routes, trace_routes
from viz import explorer
from viz.browser import chromium_available


@pytest.fixture(scope="module")
def findings():
    model = interp.load(tiny_hf("llama"), name="tiny-llama")
    ids = random_ids(8)
    return routes(model, ids, tau=0.04), dla(model, ids)


@pytest.mark.skipif(not chromium_available(), reason="headless Chromium is not installed")
def test_click_and_hover_change_what_is_shown(findings, tmp_path):
    r, d = findings
    page = explorer.write([r, d], tmp_path)
    text = page.read_text()
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text
    click = "document.querySelector('.tok[data-i=\"3\"]').dispatchEvent(new MouseEvent('click', {bubbles: true}))"
    hover = "document.querySelector('.head[data-l=\"1\"][data-h=\"2\"]').dispatchEvent(new MouseEvent('mouseenter'))"
    summary = "document.getElementById('summary').textContent"
    n_edges = "document.querySelectorAll('#graph .edge').length"
    errors, (s0, n0, _, s1, n1, _, info, bars) = explorer.interact(page, [
        summary, n_edges, click, summary, n_edges, hover, "document.getElementById('info').textContent",
        "Array.from(document.querySelectorAll('#row .bar')).map(b => +b.dataset.v)"])
    assert errors == []
    assert s0.startswith("Route into token 7") and n0 == len(r.table)
    want = trace_routes({k: r.arrays[k] for k in ("head", "attn_resid", "mlp", "mlp_resid")}, 3, 0.04)
    assert s1.startswith("Route into token 3") and s1 != s0 and n1 == len(want) != n0
    assert info.startswith("L1H2") and f"DLA {float(d.arrays['heads'][1, 2]):.3f}" in info
    row = r.arrays["pattern"][1, 2, 3].tolist()
    assert len(bars) == 8 and all(abs(a - b) < 1e-3 for a, b in zip(bars, row)) and abs(sum(bars) - 1) < 1e-2


def test_refuses_findings_it_cannot_draw(findings, tmp_path):
    r, d = findings
    with pytest.raises(interp.InterpError, match="probes.routes"):
        explorer.write([d], tmp_path)
    with pytest.raises(interp.InterpError, match="Finding"):
        explorer.write("routes.json", tmp_path)


def test_a_saved_finding_draws_the_same_page(findings, tmp_path):
    from interp.finding import Finding
    r, d = findings
    back = Finding.load(r.save(tmp_path / "routes"))
    assert explorer.page_data(back, d) == explorer.page_data(r, d)
