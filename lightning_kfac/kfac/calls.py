"""What the tracer hands to a kind of use: parameter views and recognised calls.

The tracer (``tracing``) sees every torch function called in the traced forward. A kind's
recogniser (``kinds/``) binds the arguments of a function it models into a ``RecognizedCall``;
``ParameterView`` says how a tensor passed to it relates to a tracked parameter (the whole
parameter, a row slice of it, or its transpose). Both are plain data shared by the kinds, the
tracer and the capture; this module knows no kind.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch import Tensor


@dataclasses.dataclass(frozen=True)
class ParameterView:
    """How a tensor passed to a function relates to a tracked parameter.

    ``tensor == param[rows[0]:rows[1]]`` (``rows`` None: the whole parameter), transposed when
    ``transposed`` (a matrix's two dimensions; the last two of a stack of matrices);
    ``selected``: ``tensor == param[rows[0]]``, one matrix of a stack (an expert's weight);
    ``broadcast``: ``tensor == param.expand(...)`` (a class token expanded over the batch).
    ``rows == (-1, -1)`` marks a view that is none of these (a use no kind can model).
    """

    name: str
    rows: tuple[int, int] | None = None
    transposed: bool = False
    selected: bool = False
    broadcast: bool = False

    @property
    def is_unmodellable(self) -> bool:
        return self.rows == (-1, -1)

    @property
    def is_part(self) -> bool:
        """A row slice, a selection, a transpose or a broadcast, not the parameter as it is."""
        return self.rows is not None or self.transposed or self.selected or self.broadcast


@dataclasses.dataclass
class RecognizedCall:
    """A call of a function some kind of use models, with its arguments bound.

    ``weight`` / ``bias`` are the tensors passed (possibly views of tracked parameters);
    ``weight_slot`` / ``bias_slot`` say where they sit so that ``run`` can substitute aliases.
    """

    kind: str
    func: Callable[..., Any]
    args: list[Any]
    kwargs: dict[str, Any]
    input: Tensor
    weight: Tensor | None
    bias: Tensor | None
    weight_slot: int | str | None
    bias_slot: int | str | None
    #: Kind-specific hashable details (conv geometry, embedding padding_idx, norm type, ...).
    detail: tuple[Any, ...] = ()
    #: True when the weight acts transposed (``addmm``/``matmul``: ``L = Wᵀ``).
    transposed_form: bool = False
    #: Why K-FAC cannot model this call although the function is known (or None).
    unsupported: str | None = None
    #: Norm calls: recomputes ``x̂`` from the saved input at backward (not part of the identity).
    normalize: Callable[[Tensor], Tensor] | None = dataclasses.field(default=None, compare=False)
    #: Which block of the use's factors each row of the call feeds (an expert's index, or the
    #: group offsets of a grouped matmul); None: every block sees its rows (not the identity).
    routing: Any = dataclasses.field(default=None, compare=False)
    #: The output of an earlier recognised call of this forward that this call takes over (a
    #: shift absorbing its scale, ``x * w + b``): that call's capture is withdrawn.
    absorbs: Tensor | None = dataclasses.field(default=None, compare=False)

    def run(self, weight: Tensor | None = None, bias: Tensor | None = None) -> Any:
        """Call the function, with ``weight``/``bias`` substituted when given."""
        args, kwargs = list(self.args), dict(self.kwargs)
        for slot, value in ((self.weight_slot, weight), (self.bias_slot, bias)):
            if value is None or slot is None:
                continue
            if isinstance(slot, int):
                args[slot] = value
            else:
                kwargs[slot] = value
        return self.func(*args, **kwargs)

    @property
    def operation(self) -> str:
        return getattr(self.func, "__name__", str(self.func))


#: A kind's recogniser: ``(func, args, kwargs) -> RecognizedCall``, or None to decline the call
#: (another kind's recogniser of the same function gets it: ``kinds.RECOGNIZERS``).
Recognizer = Callable[[Any, list[Any], dict[str, Any]], RecognizedCall | None]


def argument(
    args: Sequence[Any], kwargs: dict[str, Any], index: int, name: str, default: Any
) -> Any:
    """The argument at position ``index`` or keyword ``name`` (``default`` if neither)."""
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def slot(args: Sequence[Any], kwargs: dict[str, Any], index: int, name: str) -> int | str | None:
    """Where an argument was passed: its position, its keyword, or None (not passed)."""
    if len(args) > index:
        return index
    return name if name in kwargs else None


def tensors_in(args: Sequence[Any], kwargs: dict[str, Any]) -> Iterator[Tensor]:
    """Tensors among the arguments (one level into lists and tuples, as ``torch.cat`` takes)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            yield value
        elif isinstance(value, list | tuple):
            for item in value:
                if isinstance(item, Tensor):
                    yield item
