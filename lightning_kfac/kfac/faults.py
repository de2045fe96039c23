"""What K-FAC tells the user: warnings, each given once, and the device-side fault counters.

Faults are counted on the device during steps (no host synchronisation) and read back here on
inverse-update steps, one host read for all of them.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from lightning_kfac.kfac.blocks import Block
from lightning_kfac.kfac.structure import Structure, format_table

log = logging.getLogger(__name__)


class KFACNumericalWarning(RuntimeWarning):
    """A numerical fault K-FAC recovered from (skipped factor batch, failed decomposition,
    non-finite gradients)."""


class KFACCoverageWarning(UserWarning):
    """Some trainable parameters get no K-FAC step (named in the message, with the reason)."""


class FaultReporter:
    """Warns once per key (a fault of one block, one kind of fault)."""

    def __init__(self) -> None:
        self._reported: set[str] = set()

    def warn_once(
        self, key: str, message: str, category: type[Warning] = KFACNumericalWarning
    ) -> None:
        if key in self._reported:
            return
        self._reported.add(key)
        warnings.warn(message, category, stacklevel=4)

    def coverage(self, structure: Structure) -> None:
        """The coverage table at debug level; a warning naming what is left to the optimizer.

        The table is for whoever asks (``KFACPreconditioner.coverage_report()``;
        ``KFACDDPStrategy`` prints it on rank 0); what users must not miss is a parameter left to
        the optimizer: that is a warning.
        """
        log.debug(format_table(structure.reports, structure.preconditioned_fraction))
        left = structure.left_to_optimizer()
        if left:
            listed = "; ".join(f"{r.name} ({r.detail})" for r in left)
            self.warn_once(
                "coverage:" + ",".join(r.name for r in left),
                f"K-FAC preconditions {100 * structure.preconditioned_fraction:.1f} % of the "
                f"trainable parameter elements; left to the optimizer (raw gradient, not "
                f"KL-clipped): {listed}",
                KFACCoverageWarning,
            )

    def decomposition_faults(
        self, blocks: Iterable[Block], faults: Mapping[str, list[str]]
    ) -> None:
        """Warn once per block and outcome (retried, or left to the raw gradient)."""
        for block in blocks:
            outcome = "retry" if block.has_decomposition else "fallback"
            for fault in faults.get(block.name, []):
                self.warn_once(
                    f"decomposition:{block.name}:{outcome}",
                    f"K-FAC decomposition of {block.name} {fault}"
                    + ("" if block.has_decomposition else "; using the raw gradient for it"),
                )

    def device_faults(
        self,
        blocks: Sequence[Block],
        *,
        nonfinite_steps: Tensor | None,
        nonfinite_results: Tensor | None,
        amp: bool,
    ) -> None:
        """Read the device-side fault counters (one host sync) and warn once per kind."""
        counters: list[Tensor] = []
        labels: list[str] = []
        for block in blocks:
            for side, factor in zip(block.side_names, block.factors, strict=True):
                if factor.rejected is not None:
                    counters.append(factor.rejected)
                    labels.append(f"factor:{block.name}.{side}")
        if nonfinite_steps is not None:
            counters.append(nonfinite_steps)
            labels.append("nonfinite_steps")
        if nonfinite_results is not None:
            counters.append(nonfinite_results)
            labels.append("nonfinite_results")
        for block in blocks:
            if block.sums.unmasked_reduce:
                self.warn_once(
                    f"unmasked_reduce:{block.name}",
                    f"K-FAC: {block.name} saw a padded batch under approximation='reduce', whose "
                    "per-sample sums run over every position: the padding mask applies to the "
                    "expand approximation only",
                )
            if block.sums.mixed_sample_calls:
                self.warn_once(
                    f"mixed_samples:{block.name}",
                    f"K-FAC: {block.name} was called in one forward both on the whole batch and "
                    "on parts of it; its per-sample sums cannot be aligned, so each call's "
                    "samples are counted as samples of their own (an approximation)",
                )
        if not counters:
            return
        values = torch.stack([c.to(torch.int64) for c in counters]).tolist()
        for label, value in zip(labels, values, strict=True):
            if not value:
                continue
            if label.startswith("factor:"):
                if amp:
                    continue  # routine overflow: the scaler skips those steps
                name = label.removeprefix("factor:")
                self.warn_once(
                    label,
                    f"K-FAC skipped a non-finite factor batch for {name}; the running average is "
                    "unchanged (reported once per factor)",
                )
            elif label == "nonfinite_steps":
                self.warn_once(
                    label,
                    "K-FAC skipped steps with non-finite gradients (gradients zeroed, factors "
                    "unchanged; counted in kfac/nonfinite_skipped_steps); pass "
                    "nonfinite_gradients='raise' to stop instead",
                )
            else:
                self.warn_once(
                    label,
                    "K-FAC's preconditioned gradient was not finite for some uses; they kept "
                    "their raw gradient",
                )
