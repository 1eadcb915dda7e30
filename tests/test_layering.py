"""The core stands on its own: interp/ (its CLI aside) imports nothing from probes/, attribution/, viz/ or a
testbed, nothing is imported by a string, and a Finding naming an unregistered analysis is refused without
importing anything."""
from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

import pandas as pd
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ABOVE = ("probes", "attribution", "viz")


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    out = []
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.Import):
            out += [(n.lineno, a.name) for a in n.names]
        elif isinstance(n, ast.ImportFrom):
            mod = n.module or ""
            out.append((n.lineno, f"interp.{mod}" if n.level == 1 else mod))
    return out


def test_core_imports_nothing_above_it():
    bad = []
    for f in sorted((ROOT / "interp").rglob("*.py")):
        rel = f.relative_to(ROOT).as_posix()
        if rel.startswith("interp/testbed/") or rel in ("interp/cli.py", "interp/__main__.py"):
            continue
        for line, mod in _imports(f):
            parts = mod.split(".")
            if parts[0] in ABOVE or "testbed" in parts:
                bad.append(f"{rel}:{line} imports {mod}")
    assert bad == []


def test_nothing_is_imported_by_a_string():
    bad = []
    for pkg in ("interp", "probes", "attribution", "viz"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            src = f.read_text()
            if "import_module(" in src or "__import__(" in src:
                bad.append(f.relative_to(ROOT).as_posix())
    assert bad == []


def test_the_trainer_is_not_in_the_installed_package():
    assert not (ROOT / "interp" / "testbed" / "train.py").exists()


def test_unregistered_analysis_is_refused_without_importing(tmp_path):
    """A finding file names a module that does not exist and one that does but is not imported: both refused
    with the registry's message, and neither module is imported (checked in a fresh interpreter)."""
    from interp.finding import Finding
    for name in ("evil.payload", "probes.sinks"):
        path = Finding(name, pd.DataFrame({"x": [1]})).save(tmp_path / name.replace(".", "_"))
        code = (
            "import sys, interp\n"
            "from interp.finding import Finding\n"
            "try:\n"
            f"    Finding.load({str(path)!r})\n"
            "except interp.InterpError as e:\n"
            "    print('refused:', e)\n"
            "print('imported:', sorted(m for m in sys.modules if m.split('.')[0] in ('evil', 'probes', 'viz')))\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert "refused: no registered analysis named" in out.stdout, out.stdout + out.stderr
        assert "imported: []" in out.stdout


def test_a_registered_finding_round_trips_through_the_registry(tmp_path):
    import interp
    import probes  # noqa: F401
    from interp import analysis
    from interp.finding import Finding
    f = Finding("probes.sinks", pd.DataFrame({"layer": [0], "head": [0], "score": [0.5], "is_sink": [True]}),
                metrics={"epsilon": 0.3})
    g = Finding.load(f.save(tmp_path / "f"))
    assert g.analysis == "probes.sinks" and analysis.get(g.analysis).name == "probes.sinks"
    with pytest.raises(interp.InterpError, match="needs the model"):
        g.to_spec()
    with pytest.raises(interp.InterpError, match="no registered analysis"):
        Finding("attribution.nothing_here", pd.DataFrame()).to_spec(model=object())


def test_every_analysis_follows_the_contract():
    import attribution  # noqa: F401
    import probes  # noqa: F401
    from interp import analysis
    assert len(analysis.REGISTRY) >= 1
    for name, a in analysis.REGISTRY.items():
        assert a.name == name and a.title, name
        assert set(a.requires) <= set(analysis.TRAITS), name
        assert type(a).run is not analysis.Analysis.run, f"{name} has no run()"
        assert type(a).__doc__ or type(a).run.__doc__, f"{name} has no docstring"
        assert sys.modules[type(a).__module__].__doc__, f"{type(a).__module__} has no module docstring"
