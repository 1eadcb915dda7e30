"""Built-in prompt sets (``interp/data/prompts.json``): natural paragraphs and short factual prompts."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

_PATH = Path(__file__).parent / "data" / "prompts.json"


@lru_cache(maxsize=1)
def _doc() -> dict:
    return json.loads(_PATH.read_text())


def paragraphs() -> list[str]:
    """Natural English paragraphs, each longer than 64 tokens."""
    return list(_doc()["paragraphs"])


def facts() -> list[dict]:
    """Factual prompts with a one-token answer and the subject span: {prompt, answer, subject}."""
    return [dict(f) for f in _doc()["facts"]]


def load_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: a .txt (one per line) or a .json list of strings / {"paragraphs": [...]}."""
    from .errors import InterpError
    p = Path(path)
    if not p.is_file():
        raise InterpError(f"no prompts file at {p}")
    if p.suffix == ".json":
        try:
            doc = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise InterpError(f"{p}: not valid JSON ({e.msg}, line {e.lineno})") from None
        doc = doc.get("paragraphs", doc) if isinstance(doc, dict) else doc
        if not isinstance(doc, list) or not all(isinstance(x, str) for x in doc):
            raise InterpError(f"{p}: expected a JSON list of strings (or {{'paragraphs': [...]}})")
        return doc
    lines = [l.strip() for l in p.read_text().splitlines() if l.strip()]
    if not lines:
        raise InterpError(f"{p} contains no prompts")
    return lines
