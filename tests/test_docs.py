"""The method book (docs/methods.md) resolves every "§" that a docstring of the toolkit cites.

Docstrings under interp/, probes/, attribution/ and viz/ cite sections of the method book as
``METHODS.md §9a``, ``METHODS §1d``, ``METHODS.md section 7`` or ``docs/methods.md §4b``; once a module
cites the book, a bare ``§4a`` in any of its docstrings refers to it too (``VISION_RESULTS.md §3`` and
other documents do not, nor does a paper's own dotted "§3.1"). Each cited section must be a heading
``## §X ...`` of docs/methods.md, and the index at the end of the book must list every module under the
sections it cites.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "docs" / "methods.md"
PACKAGES = ("interp", "probes", "attribution", "viz")

# "METHODS.md §9a", "METHODS §1d", "docs/methods.md §4b", "methods.md section 7"
_BOOK_CITE = re.compile(r"(?:docs/)?(?:METHODS|methods)(?:\.md)?\s*(?:§\s*|section\s+)(\d+[a-z]?)\b")
_BOOK_NAME = re.compile(r"(?:docs/)?(?:METHODS|methods)(?:\.md)?$")
_SECTION = re.compile(r"§\s*(\d+[a-z]?)\b(?!\.\d)")  # "§3.1" is a paper's own section, never the book's
_OTHER_DOC = re.compile(r"([\w./-]+\.md)\s*$")  # "VISION_RESULTS.md " right before a §
_HEADING = re.compile(r"^#{2,4}\s+§(\d+[a-z]?)\b", re.M)


def cited_sections(docstrings: list[str]) -> set[str]:
    """Sections of the method book cited in one module's docstrings (empty if it never names the book)."""
    text = "\n".join(docstrings)
    if not _BOOK_CITE.search(text):
        return set()
    found = set(_BOOK_CITE.findall(text))
    for doc in docstrings:
        for m in _SECTION.finditer(doc):
            other = _OTHER_DOC.search(doc[:m.start()])
            if other and not _BOOK_NAME.search(other.group(1)):
                continue  # a section of another document
            found.add(m.group(1))
    return found


def _docstrings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = [tree] + [n for n in ast.walk(tree)
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    return [d for d in (ast.get_docstring(n, clean=False) for n in nodes) if d]


def citations() -> dict[str, set[str]]:
    """module path (relative to the repository) -> sections it cites."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            secs = cited_sections(_docstrings(path))
            if secs:
                out[path.relative_to(ROOT).as_posix()] = secs
    return out


def headings() -> list[str]:
    return _HEADING.findall(BOOK.read_text(encoding="utf-8"))


def test_citation_parser():
    """The parser reads both spellings, bare § after a citation, 'section N', and skips other documents."""
    assert cited_sections(["Logit lens. METHODS.md §9a."]) == {"9a"}
    assert cited_sections(["OEB (docs/methods.md §4b), see also §8 g1"]) == {"4b", "8"}
    assert cited_sections(["(see METHODS.md section 7)"]) == {"7"}
    assert cited_sections(["METHODS §5", "Wang et al. 2023, §4a"]) == {"5", "4a"}  # bare § in another docstring
    assert cited_sections(["METHODS §1d; probes/VISION_RESULTS.md §3 has the numbers"]) == {"1d"}
    assert cited_sections(["VISION_RESULTS.md §3 only"]) == set()  # never names the book: nothing cited
    assert cited_sections(["a METHODS tuple, §2 of nothing"]) == set()
    assert cited_sections(["METHODS §4a", "anchor re-weighting (Wang et al. 2023, §3.1)"]) == {"4a"}


def test_book_headings_are_unique():
    hs = headings()
    assert len(hs) >= 25, f"only {len(hs)} section headings found in {BOOK}"
    dup = sorted({h for h in hs if hs.count(h) > 1})
    assert not dup, f"sections defined twice in docs/methods.md: {dup}"


# the numbering the docstrings were written against: these sections must keep their numbers
STABLE = ("0", "1", "1a", "1b", "1c", "1d", "2", "3", "4", "4a", "4b", "5", "6", "6a", "6b", "7", "7a", "7b", "8",
          "9", "9a", "9b", "10", "11", "12", "13", "14", "15", "16", "17")


def test_stable_section_numbers_exist():
    missing = [s for s in STABLE if s not in set(headings())]
    assert not missing, f"docs/methods.md lost sections that docstrings may cite: {missing}"


def test_every_cited_section_exists():
    cites = citations()
    # the toolkit cites the book in many modules; a parser that finds nothing would make this test vacuous
    assert len(cites) >= 8, f"only {len(cites)} modules cite the method book: {sorted(cites)}"
    assert sum(map(len, cites.values())) >= 12
    have = set(headings())
    missing = {f"{mod}: §{s}" for mod, secs in cites.items() for s in secs if s not in have}
    assert not missing, f"cited sections without a heading in docs/methods.md: {sorted(missing)}"


def test_index_lists_every_citing_module():
    """The index at the end of the book ("§X → modules") names every module that cites §X."""
    text = BOOK.read_text(encoding="utf-8")
    if "## Index" not in text:
        pytest.fail("docs/methods.md has no '## Index' section")
    index = text.split("## Index", 1)[1]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\|\s*§(\d+[a-z]?)\s*\|([^\n]*)\|\s*$", index, re.M)}
    missing = sorted(f"§{s}: {mod}" for mod, secs in citations().items() for s in secs
                     if mod not in rows.get(s, ""))
    assert not missing, f"the index of docs/methods.md misses these citations: {missing}"


def write_index() -> str:
    """Rewrite the index table at the end of docs/methods.md from the docstrings (rows of tests/ included for
    reference). Run ``python tests/test_docs.py`` after adding or changing a citation."""
    cites = citations()
    for path in sorted((ROOT / "tests").glob("*.py")):
        secs = cited_sections(_docstrings(path)) if path.name != "test_docs.py" else set()
        if secs:
            cites[path.relative_to(ROOT).as_posix()] = secs

    def order(s: str) -> tuple[int, str]:
        m = re.match(r"(\d+)([a-z]?)", s)
        return int(m.group(1)), m.group(2)
    rows = ["| section | cited by |", "|---|---|"]
    for h in sorted(headings(), key=order):
        mods = sorted(m for m, secs in cites.items() if h in secs)
        rows.append(f"| §{h} | {', '.join(f'`{m}`' for m in mods) if mods else '—'} |")
    text = BOOK.read_text(encoding="utf-8")
    if "## Index" not in text:
        raise SystemExit("docs/methods.md has no '## Index' section to rewrite")
    head, tail = text.split("## Index", 1)
    intro = tail.split("| section |", 1)[0]
    BOOK.write_text(head + "## Index" + intro + "\n".join(rows) + "\n", encoding="utf-8")
    return "\n".join(rows)


if __name__ == "__main__":
    print(write_index())
