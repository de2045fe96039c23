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

    def factors_ready(self, layer: KFACLayer) -> None:
        """Hint from the backward pass: ``layer`` captured its last micro-batch of this step.

        A distributed implementation may finalise the layer's batch estimates and start
        reducing them here, overlapping communication with the rest of the backward pass.
        """

    def average_factor_batches(self, layers: Sequence[KFACLayer]) -> None:
        """Replace each factor's finalised ``batch``, in place, by its average over all workers.

        Called with the same layers in the same order on every worker.
        """

    def run_decompositions(
        self, layers: Sequence[KFACLayer], decompose: Callable[[KFACLayer], None]
    ) -> None:
        """Make every layer in ``layers`` hold the decomposition ``decompose(layer)`` computes.

        A distributed implementation runs ``decompose`` for each layer on one owner worker and
        sends the result to the others.
        """
        for layer in layers:
            decompose(layer)

    def precondition(
        self,
        items: Sequence[tuple[KFACLayer, Tensor]],
        compute: Callable[[KFACLayer, Tensor], Tensor | None],
    ) -> list[Tensor | None]:
        """Preconditioned matrix (or None: keep the raw gradient) for each ``(layer, gradient)``.

        A distributed implementation may compute each on the layer's owner and send it out.
        """
        return [compute(layer, gradient) for layer, gradient in items]


class LocalDistributor(Distributor):
    """One worker: nothing to average, every decomposition computed here."""
