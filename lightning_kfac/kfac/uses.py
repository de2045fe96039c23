"""The identity of a use: ``UseSpec``, the same on every rank.

A use is one call site of a parameter: ``F.linear`` inside ``encoder.0.linear1``, the packed
input projection inside a ``MultiheadAttention``, the tied embedding matrix looked up by ``wte``
or multiplied by ``lm_head``... Calls of the same site in one forward (a loop, an unrolled RNN, a
module applied twice) are weight-sharing positions of the same use. What a use contributes to
K-FAC is its kind's business (``kinds/``); this module only names it.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

from lightning_kfac.kfac.calls import ParameterView, RecognizedCall


@dataclasses.dataclass(frozen=True)
class UseSpec:
    """The identity of a use, the same on every rank (it travels between ranks, so it is
    picklable and holds only names and numbers).

    Attributes:
        kind: The name of its kind of use (``kinds.KINDS``).
        site: Qualified name of the module whose forward makes the call (``""``: the root).
        weight: The weight parameter (view) or None (a norm with only ``β`` trained).
        bias: The bias parameter (view) passed with it, or None.
        transposed_form: The call multiplies by the transposed weight (``addmm``, ``x @ W``).
        detail: Kind-specific: conv ``(dims, stride, padding, dilation, groups)``, embedding
            ``(padding_idx,)``, norm ``(type, ...)``.
    """

    kind: str
    site: str
    weight: ParameterView | None
    bias: ParameterView | None
    transposed_form: bool = False
    detail: tuple[Any, ...] = ()

    @classmethod
    def of_call(
        cls,
        call: RecognizedCall,
        site: str,
        weight: ParameterView | None,
        bias: ParameterView | None,
    ) -> UseSpec:
        return cls(str(call.kind), site, weight, bias, call.transposed_form, call.detail)

    @property
    def parts(self) -> tuple[ParameterView, ...]:
        return tuple(v for v in (self.weight, self.bias) if v is not None)

    @property
    def first_part(self) -> ParameterView:
        part = self.weight or self.bias
        assert part is not None, "a use has a weight or a bias"
        return part

    def label(self) -> str:
        where = f"in {self.site!r}" if self.site else "in the root module"
        return f"{self.kind} {where}"

    def stable_seed(self) -> int:
        """A seed derived from the identity alone: the same on every rank and in every run,
        whatever other uses the model has (seeds the use's row sampling)."""
        return zlib.crc32(repr(self.to_state()).encode())

    def to_state(self) -> dict[str, Any]:
        """Plain data (str, int, bool, tuples) for checkpoints loadable with ``weights_only``."""

        def view(v: ParameterView | None) -> tuple[Any, ...] | None:
            return None if v is None else (v.name, v.rows, v.transposed, v.selected, v.broadcast)

        return {
            "kind": str(self.kind),
            "site": self.site,
            "weight": view(self.weight),
            "bias": view(self.bias),
            "transposed_form": self.transposed_form,
            "detail": self.detail,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> UseSpec:
        def view(v: Any) -> ParameterView | None:
            if v is None:
                return None
            name, rows, transposed, *flags = v  # states before 0.3: no ``selected``, ``broadcast``
            rows = None if rows is None else tuple(rows)
            selected, broadcast = (bool(f) for f in [*flags, False, False][:2])
            return ParameterView(name, rows, bool(transposed), selected, broadcast)

        return cls(
            str(state["kind"]),
            state["site"],
            view(state["weight"]),
            view(state["bias"]),
            bool(state["transposed_form"]),
            _freeze(state["detail"]),
        )


def _freeze(value: Any) -> Any:
    """Lists (from a serialiser) back to the tuples a spec holds."""
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value
