"""The seam between K-FAC's math and the way work is shared among workers.

``KFACPreconditioner`` never talks to a communication library: it hands the distributed moments
of a step to a ``Distributor``. The base class is one worker doing everything; the
torch.distributed implementation lives in ``lightning_kfac.distributed``. Every method is called
with the same arguments in the same order on every worker.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lightning_kfac.kfac.blocks import Block
    from lightning_kfac.kfac.compute import FactorInverse
    from lightning_kfac.kfac.uses import UseSpec

#: Block name -> what went wrong decomposing its factors.
Faults = dict[str, list[str]]

#: The result of preconditioning one block: ``(P, ok)`` or None (keep the raw gradient).
Result = tuple[Tensor, Tensor] | None


class Distributor:
    """Shares K-FAC's work among workers. The base class is the single-worker behaviour."""

    #: Device on which tensors the distributor creates live (set by ``setup``).
    device = torch.device("cpu")

    def agree_on_uses(
        self, specs: list[UseSpec], unsupported: dict[str, set[str]]
    ) -> tuple[list[UseSpec], dict[str, set[str]]]:
        """The union over workers of the uses each saw, and of the unsupported operations."""
        return specs, unsupported

    def agree_on_new_uses(self, specs: list[UseSpec]) -> list[UseSpec]:
        """The union over workers of uses seen after the structure was fixed."""
        return specs

    def setup(
        self, blocks: Sequence[Block], inverse: FactorInverse, inverse_dtype: torch.dtype
    ) -> None:
        """The structure is fixed (or changed): plan communication for ``blocks``."""

    def factors_ready(self, block: Block) -> None:
        """Hint from the backward pass: ``block`` captured its last call of this step.

        A distributed implementation may start reducing its sums here, overlapping communication
        with the rest of the backward pass.
        """

    def discard(self, blocks: Sequence[Block]) -> None:
        """Forget this step's sums (a step that is not taken)."""
        for block in blocks:
            block.discard_sums()

    def reduce_factor_sums(
        self, blocks: Sequence[Block]
    ) -> list[list[tuple[Tensor, Tensor]] | None]:
        """Each block's ``(Σ, count)`` per factor, summed over all workers (the batch estimate
        is ``Σ / count``), or None when this worker captured nothing for it and nothing needs to
        be agreed. Consumes the blocks' sums."""
        out: list[list[tuple[Tensor, Tensor]] | None] = []
        for block in blocks:
            if not block.has_sums:
                block.discard_sums()
                out.append(None)
                continue
            out.append(block.take_sums(torch.device("cpu")))
        return out

    def run_decompositions(
        self, blocks: Sequence[Block], decompose: Callable[[list[Block]], Faults]
    ) -> Faults:
        """Make every block in ``blocks`` hold the decompositions ``decompose`` computes (it takes
        a list, so that same-shaped factors are decomposed in one batched call); the faults of
        the decompositions made on this worker."""
        return decompose(list(blocks))

    def share_decompositions(self, blocks: Sequence[Block]) -> Callable[[], None]:
        """Make every worker hold every block's current decomposition (for a checkpoint written by
        one worker); returns the function that undoes it. Called on every worker."""
        return lambda: None

    def average_use_gradients(
        self, blocks: Sequence[Block], use_gradients: Mapping[str, Mapping[str, Tensor]]
    ) -> Mapping[str, Mapping[str, Tensor]]:
        """Per-use gradients of parameters with several uses (block name -> part -> gradient),
        averaged over workers."""
        return use_gradients

    def precondition(
        self,
        items: Sequence[tuple[Block, Tensor]],
        compute: Callable[[Block, Tensor], Result],
    ) -> list[Result]:
        """``(P, ok)`` (or None: keep the raw gradient) for each ``(block, gradient)``."""
        return [compute(block, gradient) for block, gradient in items]


class LocalDistributor(Distributor):
    """One worker: nothing to share."""
