"""The seam between K-FAC's math and the way work is shared among workers.

``KFACPreconditioner`` never talks to a communication library: it hands the two distributed
moments of a step to a ``Distributor``. ``LocalDistributor`` (one worker does everything) lives
here; the torch.distributed implementation lives in ``lightning_kfac.distributed``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from lightning_kfac.kfac.kfac_layer import KFACLayer


class Distributor:
    """Shares K-FAC's work among workers. The base class is the single-worker behaviour."""

    def average_factor_batches(self, batches: list[Tensor]) -> None:
        """Replace each batch estimate, in place, by its average over all workers."""

    def run_decompositions(
        self, layers: Sequence[KFACLayer], decompose: Callable[[KFACLayer], None]
    ) -> None:
        """Make every layer in ``layers`` hold the decomposition ``decompose(layer)`` computes.

        A distributed implementation runs ``decompose`` for each layer on one owner worker and
        sends the result to the others.
        """
        for layer in layers:
            decompose(layer)


class LocalDistributor(Distributor):
    """One worker: nothing to average, every decomposition computed here."""
