"""interp: capture, analyse and intervene on transformer LMs, VLMs and diffusion LMs.

    import interp
    model = interp.load("smollm2")
    trace = interp.capture(model, "The capital of France is", sites="blocks.*.attn.pattern")

Names are imported on first use, so ``import interp`` (and ``interp --help``) does not load torch.
"""
from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    "capture": "capture", "Reducer": "capture", "KeyMass": "capture", "RoleMass": "capture", "QueryRow": "capture",
    "Entropy": "capture", "TopK": "capture",
    "InterpError": "errors", "evaluate": "evaluate", "Finding": "finding", "Model": "model", "load": "model",
    "patch": "patch", "Batch": "roles", "Roles": "roles", "Spec": "spec", "Trace": "trace", "Analysis": "analysis",
}
_SUBMODULES = {"ops", "analysis", "diffusion", "tasks", "prompts", "adapters", "engine", "embedded"}


def _submodule(name: str) -> types.ModuleType:  # plain import statements: nothing is imported by a string
    if name == "capture":
        import interp.capture
    elif name == "errors":
        import interp.errors
    elif name == "evaluate":
        import interp.evaluate
    elif name == "finding":
        import interp.finding
    elif name == "model":
        import interp.model
    elif name == "patch":
        import interp.patch
    elif name == "roles":
        import interp.roles
    elif name == "spec":
        import interp.spec
    elif name == "trace":
        import interp.trace
    elif name == "analysis":
        import interp.analysis
    elif name == "ops":
        import interp.ops
    elif name == "diffusion":
        import interp.diffusion
    elif name == "tasks":
        import interp.tasks
    elif name == "prompts":
        import interp.prompts
    elif name == "adapters":
        import interp.adapters
    elif name == "engine":
        import interp.engine
    elif name == "embedded":
        import interp.embedded
    else:
        raise AttributeError(f"module 'interp' has no attribute {name!r}")
    return sys.modules[f"{__name__}.{name}"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(_submodule(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = _submodule(name)
    else:
        raise AttributeError(f"module 'interp' has no attribute {name!r}")
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """``interp.capture``, ``interp.patch`` and ``interp.evaluate`` are functions named like their submodules:
    importing a submodule must not rebind the package attribute to the module (the function wins)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | _SUBMODULES)


if TYPE_CHECKING:  # pragma: no cover - for type checkers and editors
    from . import analysis, ops
    from .analysis import Analysis
    from .capture import Entropy, KeyMass, QueryRow, Reducer, RoleMass, TopK, capture
    from .errors import InterpError
    from .evaluate import evaluate
    from .finding import Finding
    from .model import Model, load
    from .patch import patch
    from .roles import Batch, Roles
    from .spec import Spec
    from .trace import Trace

__all__ = ["load", "Model", "capture", "Trace", "Roles", "Batch", "Reducer", "KeyMass", "RoleMass", "QueryRow",
           "Entropy", "TopK", "InterpError", "Finding", "Spec", "patch", "evaluate", "Analysis", "__version__"]
