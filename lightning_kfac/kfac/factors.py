"""KroneckerFactor: one Kronecker factor (``A`` or ``G``) of one layer, and its decomposition.

The same type serves both sides. A factor goes through three stages each factor update:

1. ``accumulate(sum, count)`` — called from the hooks, possibly several times (gradient
   accumulation, several calls of the module): sums of outer products and their normaliser.
2. ``finalize_batch()`` — stores ``batch = sum / count``, the estimate of the current mini-batch.
   A distributed runner averages ``batch`` across ranks (in place) before stage 3; it may do so
   early, from the backward pass, as soon as a layer's capture is complete.
3. ``update(decay)`` — running average ``F <- decay · F + (1 - decay) · batch``; the first
   update sets ``F = batch`` (DESIGN §2). A non-finite batch is rejected and ``F`` is unchanged.

The decomposition (eigenpairs for the eigen method, a shifted inverse for the inverse method) is
stored beside the running average and recomputed on inverse-update steps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class KroneckerFactor:
    """Running average of a ``[blocks, dim, dim]`` Kronecker factor with its decomposition.

    Args:
        dim: Side of each square block.
        blocks: Number of independent blocks (convolution groups; 1 otherwise).
        dtype: Dtype in which sums and the running average are kept (``factor_dtype``).
    """

    def __init__(self, dim: int, blocks: int, dtype: torch.dtype) -> None:
        self.dim = dim
        self.blocks = blocks
        self.dtype = dtype
        self.value: Tensor | None = None
        self.updates = 0
        #: Tensors of the current decomposition (names depend on the method), or None.
        self.decomposition: dict[str, Tensor] | None = None
        #: True when ``value`` changed after ``decomposition`` was computed from it.
        self.changed_since_decomposition = False
        #: The finalised estimate of the current mini-batch, until ``update`` consumes it.
        self.batch: Tensor | None = None
        self._sum: Tensor | None = None
        self._count = 0.0

    # -- stage 1: accumulation -------------------------------------------------------------
    def accumulate(self, outer_product_sum: Tensor, count: float) -> None:
        """Add ``Σ r r^T`` (shape ``[blocks, dim, dim]``) over ``count`` normalising units."""
        outer_product_sum = outer_product_sum.to(self.dtype)
        if self._sum is None:
            self._sum = outer_product_sum.clone()
        else:
            self._sum.add_(outer_product_sum)
        self._count += count

    @property
    def has_batch(self) -> bool:
        """Whether this step has a batch: accumulated sums or an already finalised estimate."""
        return self.batch is not None or (self._sum is not None and self._count > 0)

    def discard_batch(self) -> None:
        """Forget this step's batch (e.g. a step skipped by the AMP scaler)."""
        self.batch = None
        self._sum = None
        self._count = 0.0

    # -- stage 2: batch estimate -----------------------------------------------------------
    def finalize_batch(self) -> Tensor:
        """Set and return ``batch = Σ r r^T / count`` (idempotent until ``update``)."""
        if self.batch is None:
            if self._sum is None or self._count <= 0:
                raise RuntimeError("finalize_batch() called with nothing accumulated")
            self.batch = self._sum.div_(self._count)
            self._sum = None
            self._count = 0.0
        return self.batch

    # -- stage 3: running average ----------------------------------------------------------
    def update(self, decay: float) -> bool:
        """Fold ``batch`` into the running average; return False (and change nothing) if not finite.

        ``F <- batch`` on the first update, then ``F <- decay · F + (1 - decay) · batch``.
        The batch is consumed either way.
        """
        batch = self.finalize_batch()
        self.batch = None
        if not bool(torch.isfinite(batch).all()):
            return False
        if self.value is None:
            self.value = batch.clone()
        else:
            self.value.mul_(decay).add_(batch, alpha=1.0 - decay)
        self.updates += 1
        self.changed_since_decomposition = True
        return True

    def set_decomposition(self, decomposition: dict[str, Tensor] | None) -> None:
        """Store a freshly computed decomposition of the current ``value`` (None on failure)."""
        self.decomposition = decomposition
        self.changed_since_decomposition = False

    # -- persistence -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Running average and counter; the decomposition only when it is *older* than the value.

        When the value changed after the last decomposition (a factor update between two
        inverse updates), recomputing the decomposition from the saved value would not reproduce
        the run, so the decomposition itself is saved; otherwise it is recomputed on load.
        """
        state: dict[str, Any] = {"value": self.value, "updates": self.updates}
        if self.changed_since_decomposition and self.decomposition is not None:
            state["decomposition"] = dict(self.decomposition)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from ``state_dict``; tensors keep the device of this factor's value if any."""
        value = state["value"]
        if value is not None and value.shape != (self.blocks, self.dim, self.dim):
            raise ValueError(
                f"factor shape {tuple(value.shape)} in the state dict does not match "
                f"{(self.blocks, self.dim, self.dim)}: was the state saved for another model?"
            )
        self.value = None if value is None else value.to(self.dtype).clone()
        self.updates = int(state["updates"])
        saved = state.get("decomposition")
        self.decomposition = None if saved is None else {k: v.clone() for k, v in saved.items()}
        self.changed_since_decomposition = saved is not None
        self.discard_batch()

    def to(self, device: torch.device) -> None:
        """Move stored tensors to ``device`` (after loading a checkpoint mapped to the CPU)."""
        if self.value is not None:
            self.value = self.value.to(device)
        if self.decomposition is not None:
            self.decomposition = {k: v.to(device) for k, v in self.decomposition.items()}
