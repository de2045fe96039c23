"""KroneckerFactor: one curvature factor of one use (``A``, ``G`` or a unit-wise Fisher block).

The same type serves every side. A factor is ``blocks`` independent square blocks of side ``dim``,
kept dense (``[blocks, dim, dim]``) or, for sides above ``max_factor_dim`` and for the one-hot
input of an embedding, diagonal (``[blocks, dim]``, the diagonal of the dense factor).

A factor update has three stages: the capture sums outer products over the step's calls
(``accumulation.UseSums``), a distributed runner sums those over workers (``Distributor``), and
``update(total, count, decay)`` folds the batch estimate ``total / count`` into the running
average ``F ← decay·F + (1 − decay)·batch``; the first accepted batch sets ``F = batch``
(docs/design.md §2). This class is the third stage and holds the decomposition of ``F``.

Everything here stays on the device: a batch that is not finite (or a step the caller marks
as rejected) leaves ``F`` unchanged through ``torch.where``, with no host synchronisation; the
count of rejected batches is read back only when faults are reported.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class KroneckerFactor:
    """Running average of a ``[blocks, dim, dim]`` (or diagonal ``[blocks, dim]``) factor.

    Args:
        dim: Side of each square block.
        blocks: Number of independent blocks (convolution groups, norm channels; else 1).
        dtype: Dtype of the running average (``factor_dtype``).
        diagonal: Keep only the diagonal.
        per_block_count: Each block has its own normaliser (``count`` of shape ``[blocks]``): a
            block whose count is 0 keeps its value, and ``seen`` is per block.
    """

    def __init__(
        self,
        dim: int,
        blocks: int,
        dtype: torch.dtype,
        *,
        diagonal: bool = False,
        per_block_count: bool = False,
    ) -> None:
        self.dim = dim
        self.blocks = blocks
        self.dtype = dtype
        self.diagonal = diagonal
        self.per_block_count = per_block_count
        #: The running average (None before the first update).
        self.value: Tensor | None = None
        #: 0-dim bool: whether ``value`` holds an accepted batch (device-side).
        self.seen: Tensor | None = None
        #: 0-dim int64: batches rejected as non-finite (device-side; read when reporting).
        self.rejected: Tensor | None = None
        #: Number of ``update`` calls.
        self.updates = 0
        #: Tensors of the current decomposition (names depend on the method), or None.
        self.decomposition: dict[str, Tensor] | None = None
        #: True when ``value`` changed after ``decomposition`` was computed from it.
        self.changed_since_decomposition = False

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.blocks, self.dim) if self.diagonal else (self.blocks, self.dim, self.dim)

    @property
    def count_shape(self) -> tuple[int, ...]:
        """Shape of the normaliser: ``(blocks,)`` with per-block counts, else ``()``."""
        return (self.blocks,) if self.per_block_count else ()

    @property
    def seen_shape(self) -> tuple[int, ...]:
        """Shape of ``seen`` (broadcastable against ``value``): per block, or one flag."""
        if not self.per_block_count:
            return ()
        return (self.blocks, 1) if self.diagonal else (self.blocks, 1, 1)

    # -- running average -----------------------------------------------------------------------
    def update(
        self, total: Tensor, count: Tensor, decay: float, accept: Tensor | None = None
    ) -> None:
        """Fold the batch estimate ``total / count`` into the running average, on the device.

        ``F ← d·F + (1 − d)·batch`` with ``d = decay`` once a batch was accepted and ``d = 0``
        before (so the first accepted batch sets ``F``). Nothing changes when ``count`` is 0 (no
        worker captured this factor) or ``accept`` is False (a skipped step); a batch that is not
        finite is rejected too and counted in ``rejected``.
        """
        if self.per_block_count:  # [blocks] -> broadcast over each block
            count = count.reshape(self.blocks, *([1] * (total.dim() - 1)))
        present = count > 0
        batch = (total / torch.where(present, count, torch.ones_like(count))).to(self.dtype)
        if self.value is None:
            self.value = torch.zeros_like(batch)
            self.seen = torch.zeros((), dtype=torch.bool, device=batch.device)
            self.rejected = torch.zeros((), dtype=torch.int64, device=batch.device)
        assert self.seen is not None and self.rejected is not None
        batch_finite = torch.isfinite(batch).all()
        finite = batch_finite & present
        if accept is not None:
            finite = finite & accept
        effective_decay = torch.where(
            self.seen,
            torch.as_tensor(decay, dtype=self.dtype, device=batch.device),
            torch.zeros((), dtype=self.dtype, device=batch.device),
        )
        blended = self.value * effective_decay + batch * (1 - effective_decay)
        self.value = torch.where(finite, blended, self.value)
        self.seen = self.seen | finite.reshape(self.seen_shape)
        self.rejected = self.rejected + (present & ~batch_finite).any().to(torch.int64)
        self.updates += 1
        self.changed_since_decomposition = True

    def set_decomposition(self, decomposition: dict[str, Tensor] | None) -> None:
        """Store a freshly computed decomposition of the current ``value`` (None on failure)."""
        self.decomposition = decomposition
        self.changed_since_decomposition = False

    # -- persistence -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Running average and counters; the decomposition only when it is *older* than the value.

        When the value changed after the last decomposition (a factor update between two
        inverse updates), recomputing the decomposition from the saved value would not reproduce
        the run, so the decomposition itself is saved; otherwise it is recomputed on load.
        """
        state: dict[str, Any] = {
            "value": self.value,
            "seen": self.seen,
            "updates": self.updates,
            "diagonal": self.diagonal,
        }
        if self.changed_since_decomposition and self.decomposition is not None:
            state["decomposition"] = dict(self.decomposition)
        return state

    def check_state(self, state: dict[str, Any], name: str) -> None:
        """Validate a saved state before loading it: shape, finiteness, symmetry.

        Raises ``ValueError`` naming the factor and what is wrong.
        """
        value = state.get("value")
        if bool(state.get("diagonal", False)) != self.diagonal:
            now, saved = ("diagonal", "dense") if self.diagonal else ("dense", "diagonal")
            raise ValueError(
                f"K-FAC checkpoint: factor {name} was saved {saved} but is {now} now "
                "(max_factor_dim changed?)"
            )
        if value is None:
            return
        if tuple(value.shape) != self.shape:
            raise ValueError(
                f"K-FAC checkpoint: factor {name} has shape {tuple(value.shape)}, expected "
                f"{self.shape}: was it saved for another model?"
            )
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"K-FAC checkpoint: factor {name} holds non-finite values")
        magnitude = float(value.abs().max()) if value.numel() else 0.0
        if magnitude > 1e30:
            raise ValueError(
                f"K-FAC checkpoint: factor {name} holds values up to {magnitude:.3g}: corrupted?"
            )
        if not self.diagonal:
            asymmetry = float((value - value.mT).abs().max()) if value.numel() else 0.0
            if asymmetry > 1e-5 * max(magnitude, 1e-30) + 1e-30:
                raise ValueError(
                    f"K-FAC checkpoint: factor {name} is not symmetric (|F − Fᵀ| up to "
                    f"{asymmetry:.3g}): corrupted?"
                )

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        """Restore from ``state_dict`` onto ``device`` (call ``check_state`` first). Sums being
        accumulated for the coming step are kept: they belong to the step, not to the state."""
        value = state["value"]
        self.value = None if value is None else value.to(device=device, dtype=self.dtype).clone()
        seen = state.get("seen")
        if self.value is not None:
            self.seen = (
                torch.ones((), dtype=torch.bool, device=device)
                if seen is None
                else seen.to(device).clone()
            )
            self.rejected = torch.zeros((), dtype=torch.int64, device=device)
        self.updates = int(state["updates"])
        saved = state.get("decomposition")
        self.decomposition = (
            None if saved is None else {k: v.to(device).clone() for k, v in saved.items()}
        )
        self.changed_since_decomposition = saved is not None
