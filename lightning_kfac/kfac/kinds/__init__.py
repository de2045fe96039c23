"""The registry of kinds of use. Adding a kind = one module in this package + one line in
``KINDS`` (docs/design.md, "Adding a kind of use").

Each kind module defines ``KIND`` (a ``base.Kind``): its recognisers, its ``UseModel`` (curvature
model and capture rule) and its rows of the supported-uses table. Everything else — the tracer,
the capture, the structure and coverage report, the blocks, the distribution — works on any kind
through ``Kind`` and ``UseModel`` alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning_kfac.kfac.calls import RecognizedCall, Recognizer
from lightning_kfac.kfac.kinds import (
    convolution,
    elementwise,
    embedding,
    experts,
    linear,
    normalization,
    recurrent,
)
from lightning_kfac.kfac.kinds.base import (
    Kind,
    KroneckerModel,
    SampleLayout,
    UnitWiseModel,
    UseModel,
)
from lightning_kfac.kfac.uses import UseSpec

#: Every kind of use K-FAC models, in the order of the supported-uses table.
KINDS: tuple[Kind, ...] = (
    linear.KIND,
    convolution.KIND,
    embedding.KIND,
    normalization.KIND,
    elementwise.KIND,
    recurrent.KIND,
    experts.KIND,
)

_BY_NAME: dict[str, Kind] = {kind.name: kind for kind in KINDS}

#: Torch function -> the recognisers of its calls: the first that does not decline a call gets it.
#: A kind later in ``KINDS`` is asked first — later kinds specialise (the experts kind claims the
#: ``F.linear`` calls on one matrix of a stacked weight; the linear kind gets the others).
RECOGNIZERS: dict[Any, tuple[Recognizer, ...]] = {}
for _kind in reversed(KINDS):
    for _function, _recognize in _kind.recognizers.items():
        RECOGNIZERS[_function] = (*RECOGNIZERS.get(_function, ()), _recognize)


def recognize(function: Any, args: list[Any], kwargs: dict[str, Any]) -> RecognizedCall | None:
    """The call bound by the first recogniser of ``function`` that takes it, or None."""
    for recognizer in RECOGNIZERS.get(function, ()):
        call = recognizer(function, args, kwargs)
        if call is not None:
            return call
    return None


#: Composite torch functions run with the tracing mode re-entered, over all kinds.
COMPOSITES: dict[Any, Callable[..., Any]] = {
    function: run for kind in KINDS for function, run in kind.composites.items()
}


def kind_named(name: str) -> Kind:
    """The registered kind called ``name`` (``ValueError`` naming the known kinds otherwise)."""
    kind = _BY_NAME.get(str(name))
    if kind is None or kind.model is None:
        raise ValueError(f"unknown kind of use {name!r}; known: {', '.join(_BY_NAME)}")
    return kind


def make_model(spec: UseSpec, shapes: dict[str, tuple[int, ...]], max_dim: int) -> UseModel:
    """The ``UseModel`` of ``spec`` (``shapes``: parameter name -> shape)."""
    model = kind_named(spec.kind).model
    assert model is not None
    return model(spec, shapes, max_dim)


def supported_uses_markdown() -> str:
    """The supported-uses table (README, docs/design.md), one row per ``SupportedUse``."""
    lines = ["| use | kind | examples | approximation |", "|---|---|---|---|"]
    for kind in KINDS:
        for row in kind.supported:
            lines.append(f"| {row.calls} | {kind.name} | {row.examples} | {row.curvature} |")
    return "\n".join(lines)


__all__ = [
    "COMPOSITES",
    "KINDS",
    "RECOGNIZERS",
    "Kind",
    "KroneckerModel",
    "SampleLayout",
    "UnitWiseModel",
    "UseModel",
    "kind_named",
    "make_model",
    "recognize",
    "supported_uses_markdown",
]
