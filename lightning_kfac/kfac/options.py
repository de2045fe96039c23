"""Option types shared by the K-FAC core: method choices and schedulable values."""

from __future__ import annotations

import enum
from collections.abc import Callable

#: A hyper-parameter given either as a constant or as a function of the optimizer step
#: (the number of completed ``KFACPreconditioner.step`` calls, starting at 0).
Schedule = float | Callable[[int], float]


class StrEnum(str, enum.Enum):
    """A string-valued choice: ``Choice("value")`` and ``Choice.VALUE == "value"`` both work."""

    def __str__(self) -> str:
        return str(self.value)


class ComputeMethod(StrEnum):
    """How the damped Kronecker factors are inverted.

    - ``EIGEN`` (default): eigendecompose ``A = Q_A diag(e_A) Q_A^T`` and
      ``G = Q_G diag(e_G) Q_G^T`` and divide by ``e_G e_A^T + λ`` in the eigenbasis. This is the
      *exact* inverse of the damped Kronecker product ``A ⊗ G + λ I`` (George et al. 2018,
      "EKFAC", §3; Osawa et al. 2019).
    - ``INVERSE``: factored Tikhonov damping with the π correction of Martens & Grosse 2015, §6.3:
      ``(A + π √λ I)^-1 ⊗ (G + √λ / π I)^-1`` with ``π = sqrt((tr A / dim A) / (tr G / dim G))``.
      Cheaper to apply, but only an approximation of ``(A ⊗ G + λ I)^-1``.
    """

    EIGEN = "eigen"
    INVERSE = "inverse"


def evaluate(value: Schedule | None, step: int) -> float | None:
    """Return the value of a constant-or-callable hyper-parameter at ``step``."""
    if value is None:
        return None
    if callable(value):
        return float(value(step))
    return float(value)
