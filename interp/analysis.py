"""The analysis contract: one class per analysis, registered by class.

Every analysis of the toolkit is a subclass of :class:`Analysis`::

    class Sinks(Analysis):
        name = "probes.sinks"                 # what its Findings record; unique
        title = "Attention sinks"
        requires = ("causal",)                # model traits it needs: "causal", "diffusion", "vision"
        in_scan = True                        # part of `interp scan`'s default set
        figures = (static_fn, interactive_fn) # matplotlib and plotly figure of a Finding (optional)

        def run(self, model, inputs=None, **params) -> Finding: ...
        def to_spec(self, finding, model, **params) -> Spec: ...   # optional: the intervention it suggests
        def explain(self, finding) -> str: ...                     # one plain sentence: what was found

    sinks = Sinks()                           # the instance is the function: sinks(model, prompts, epsilon=0.3)

Defining the class registers it (:data:`REGISTRY`, keyed by ``name``). ``Finding.to_spec``,
``Finding.plot``, the report and ``interp scan`` look the analysis up there: a Finding read from disk
names a registered analysis or is refused, and nothing is ever imported because a file named it.
Importing ``probes`` and ``attribution`` registers the toolkit's own analyses.

``inputs`` is whatever :func:`interp.inputs.as_batch` takes (a string, strings, chat messages, a
tensor of ids, a dict of tensors, a :class:`~interp.roles.Batch`); ``None`` means the analysis's
built-in inputs, the ones ``interp scan`` uses.
"""
from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from .errors import InterpError

if TYPE_CHECKING:  # pragma: no cover
    from .finding import Finding
    from .spec import Spec

REGISTRY: dict[str, "Analysis"] = {}
TRAITS = ("causal", "diffusion", "vision")
_VIEWS: dict[str, Callable | None] = {"figure": None, "html": None, "trace": None}  # installed by viz


class Analysis:
    """Base class of every analysis; see the module docstring."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ("causal",)
    in_scan: ClassVar[bool] = False
    takes_prompts: ClassVar[bool] = False  # run() takes plain prompts as inputs (`interp scan --prompts` goes there)
    figures: ClassVar[tuple[Callable | None, Callable | None]] = (None, None)

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if not cls.name:
            return  # an abstract intermediate class
        bad = set(cls.requires) - set(TRAITS)
        if bad:
            raise TypeError(f"{cls.__name__}.requires: unknown {sorted(bad)}; use {TRAITS}")
        old = REGISTRY.get(cls.name)
        if old is not None and type(old).__qualname__ != cls.__qualname__:
            raise TypeError(f"analysis name {cls.name!r} is taken by {type(old).__qualname__}")
        REGISTRY[cls.name] = cls()

    # the contract ----------------------------------------------------------------------------------
    def run(self, model, inputs: Any = None, **params: Any) -> "Finding":
        raise NotImplementedError(f"{type(self).__name__}.run")

    def to_spec(self, finding: "Finding", model, **params: Any) -> "Spec":
        raise InterpError(f"{self.name} findings are diagnostic only: there is no spec to export")

    def explain(self, finding: "Finding") -> str:
        """One plain sentence built from the finding's metrics (shown first in reports and summaries)."""
        return ""

    def plot(self, finding: "Finding", interactive: bool = False, **kw: Any):
        """A matplotlib Figure (default) or a plotly Figure (``interactive=True``) of ``finding``: ``figures``
        when the analysis has them, else viz's generic figure (drawn by :func:`viz.plot`)."""
        draw = _VIEWS["figure"]
        if draw is None:
            raise InterpError("figures are drawn by the viz package: `import viz` first")
        return draw(finding, interactive=interactive, **kw)

    def scan(self, model, prompts: list[str] | None = None, **params: Any) -> tuple["Finding", "Spec | None"]:
        """What ``interp scan`` runs: the finding on the built-in inputs (or ``prompts``, where the analysis takes
        plain prompts), and the spec it exports, if any; why there is none goes into the finding's notes.
        ``params`` the analysis' ``run`` does not take are left out."""
        sig = inspect.signature(self.run).parameters
        kw = {k: v for k, v in params.items() if k in sig}
        finding = self.run(model, prompts if self.takes_prompts else None, **kw)
        spec = None
        if self.exports_spec:
            try:
                spec = self.to_spec(finding, model)
            except InterpError as e:
                finding.notes.append(f"no spec exported: {e}")
        return finding, spec

    # conveniences ---------------------------------------------------------------------------------
    def __call__(self, model, inputs: Any = None, **params: Any) -> "Finding":
        return self.run(model, inputs, **params)

    @property
    def exports_spec(self) -> bool:
        return type(self).to_spec is not Analysis.to_spec

    def runs_on(self, model) -> bool:
        return set(self.requires) <= traits(model)

    def __repr__(self) -> str:
        return f"<analysis {self.name}: {self.title or type(self).__name__}>"


def get(name: str) -> Analysis:
    """The registered analysis called ``name``; a clear error (and no import) when there is none."""
    if not isinstance(name, str) or name not in REGISTRY:
        known = ", ".join(sorted(REGISTRY)) or "none yet"
        raise InterpError(f"no registered analysis named {name!r} (registered: {known}). Import the module that "
                          "defines it first (`import probes, attribution` registers the toolkit's own); interp "
                          "never imports a module because a file names it")
    return REGISTRY[name]


def registered(model=None, scan_only: bool = False) -> list[Analysis]:
    """Registered analyses, by name; optionally only those that run on ``model`` or are in the default scan."""
    out = [a for _, a in sorted(REGISTRY.items())]
    if model is not None:
        out = [a for a in out if a.runs_on(model)]
    if scan_only:
        out = [a for a in out if a.in_scan]
    return out


def traits(model) -> set[str]:
    """What a model is: "causal" or "diffusion" (a masked-denoising LM), plus "vision" when it takes images."""
    ad = model.adapter
    return {"causal" if ad.causal else "diffusion"} | ({"vision"} if ad.image_token_id is not None else set())


def install_views(figure: Callable | None = None, html: Callable | None = None, trace: Callable | None = None) -> None:
    """Set what draws a Finding's figure, its notebook HTML and a Trace's figure. ``viz`` installs them when
    imported; the core itself draws nothing."""
    _VIEWS.update(figure=figure, html=html, trace=trace)


def view(kind: str) -> Callable | None:
    return _VIEWS[kind]
