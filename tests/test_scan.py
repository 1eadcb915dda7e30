"""`interp scan` end to end: findings, specs, figures and an offline report that renders without errors."""
import json

import pytest

import viz
from interp.cli import main
from interp.prompts import paragraphs


def test_scan_writes_report_that_renders(tmp_path, smol):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(paragraphs()[:3]))
    out = tmp_path / "out"
    assert main(["scan", "--prompts", str(prompts), "--probes", "sinks,massive,entropy,logit_lens",
                 "--out", str(out)]) == 0
    for name in ("sinks", "massive", "entropy", "logit_lens"):
        assert (out / "findings" / f"{name}.json").exists()
        assert (out / "figures" / f"{name}.png").exists()
    assert (out / "specs" / "sinks.json").exists() and (out / "specs" / "massive.json").exists()
    # every exported spec replays and `interp evaluate` reports its effect on a shipped task
    import interp
    for path in sorted((out / "specs").glob("*.json")):
        res = interp.evaluate(smol, interp.Spec.load(path), "capitals", limit=24)
        lo, hi = res.metrics["delta_ci"]
        assert res.metrics["n"] == 24 and lo <= res.metrics["delta"] <= hi
        assert main(["evaluate", str(path), "capitals", "--limit", "8"]) == 0
    html = (out / "report.html").read_text()
    assert html.count('<script type="text/javascript" src="plotly.min.js">') == 1 and "http" not in html.split("<body>")[0]
    assert (out / "plotly.min.js").stat().st_size > 1_000_000  # plotly.js once, beside the page: opens offline
    if not viz.chromium_available():
        pytest.skip("Debian chromium is not installed (scripts/setup.sh installs it when run as root)")
    errors = viz.screenshot(out / "report.html", tmp_path / "report.png")
    assert errors == []
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_replay_cli_on_a_scan_spec(tmp_path, capsys, smol):
    from probes.sinks import sinks
    spec = sinks(smol, paragraphs()[:2], progress=False).to_spec(model=smol)
    path = spec.save(tmp_path / "s.json")
    assert main(["replay", str(path), "--prompt", "The capital of France is", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "without" in out and "max |Δ logit|" in out
    assert main(["replay", str(tmp_path / "missing.json")]) == 2
