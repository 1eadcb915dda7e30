"""The notebooks run top to bottom (executed, not just parsed), every cell that draws leaves an image, no
progress-bar warning leaks, numbers print rounded, and the committed copies carry their outputs."""
import json
import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOK_DIR = Path(__file__).parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
DRAWS = re.compile(r"(\.plot\(|viz\.\w*plot\w*\(|viz\.attention\()")  # a figure as the cell's result
IMAGE = ("image/png", "application/vnd.plotly.v1+json")
LONG_FLOAT = re.compile(r"\d\.\d{9,}")  # 0.21666666666666667: a number nobody rounded


def _figure_cells(nb) -> list[int]:
    """Code cells whose last line draws a figure (what the cell then shows)."""
    out = []
    for i, c in enumerate(nb.cells):
        if c.cell_type == "code" and c.source.strip():
            last = c.source.strip().splitlines()[-1]
            if DRAWS.search(last) and not last.lstrip().startswith(("#", "print")) and "=" not in last.split("(")[0]:
                out.append(i)
    return out


def _check(nb, name: str) -> None:
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{name}: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    figs = _figure_cells(nb)
    assert figs, f"{name} draws no figure"
    for i in figs:
        kinds = {k for o in nb.cells[i].get("outputs", []) for k in o.get("data", {})}
        assert kinds & set(IMAGE), f"{name} cell {i} draws but shows no image ({sorted(kinds)}): {nb.cells[i].source[-80:]!r}"
    for c in nb.cells:
        for o in c.get("outputs", []):
            text = o.get("text", "") + "".join(v for k, v in o.get("data", {}).items() if k == "text/plain")
            assert "IProgress not found" not in text, f"{name}: tqdm could not draw its bar"
            assert not LONG_FLOAT.search(text.split("tensor(")[0]), f"{name}: unrounded number in {text[:200]!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_has_its_outputs(path):
    """Committed executed: a reader sees the figures on the repository page without running anything."""
    nb = nbformat.read(path, as_version=4)
    assert all(c.get("execution_count") for c in nb.cells if c.cell_type == "code" and c.source.strip()), \
        f"{path.name} is committed without outputs: run notebooks/make_notebooks.py"
    _check(nb, path.name)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes_and_shows_its_figures(path):
    import sys
    sys.path.insert(0, str(NOTEBOOK_DIR))
    import make_notebooks
    cells = make_notebooks.NOTEBOOKS[path.name]
    committed = nbformat.read(path, as_version=4)
    assert [c.source for c in committed.cells] == [src for _, src in cells], \
        f"{path.name} differs from notebooks/make_notebooks.py: regenerate it"
    _check(make_notebooks.execute(make_notebooks.build(path.name, cells)), path.name)


def test_every_generated_notebook_is_committed():
    import sys
    sys.path.insert(0, str(NOTEBOOK_DIR))
    import make_notebooks
    assert sorted(make_notebooks.NOTEBOOKS) == [p.name for p in NOTEBOOKS]
    json.dumps(sorted(make_notebooks.NOTEBOOKS))
