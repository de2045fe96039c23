"""The examples' learning-rate schedule for large-batch training: LEGW.

LEGW (You et al. 2019, "Large-batch training for LSTM and beyond"): when the batch grows by
``k = batch_size / base_batch_size``, scale the peak learning rate by ``√k`` and the warmup
*epochs* by ``k`` (so the number of warmup *iterations* stays the same), then decay.
``examples.model.Classifier`` uses it, so ``train.py`` and the large-batch study scale their
learning rates alike. (Formerly ``lightning_kfac.schedules``: an example's choice, not K-FAC.)
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable


class Decay(str, enum.Enum):
    """Shape of the schedule after warmup."""

    COSINE = "cosine"
    POLYNOMIAL = "polynomial"
    CONSTANT = "constant"

    def __str__(self) -> str:
        return str(self.value)


def legw_peak_lr(base_lr: float, base_batch_size: int, batch_size: int) -> float:
    """``base_lr · sqrt(batch_size / base_batch_size)`` (LEGW's square-root scaling)."""
    return base_lr * math.sqrt(batch_size / base_batch_size)


def legw_warmup_epochs(base_warmup_epochs: float, base_batch_size: int, batch_size: int) -> float:
    """``base_warmup_epochs · batch_size / base_batch_size`` (warmup iterations unchanged)."""
    return base_warmup_epochs * batch_size / base_batch_size


def legw_lr_lambda(
    *,
    base_batch_size: int,
    batch_size: int,
    base_warmup_epochs: float,
    steps_per_epoch: int,
    total_steps: int,
    decay: Decay | str = Decay.COSINE,
    power: float = 2.0,
) -> Callable[[int], float]:
    """Multiplier of the *base* learning rate at each optimizer step, for ``LambdaLR``.

    Linear warmup from 0 to ``√k`` over ``legw_warmup_epochs(...) · steps_per_epoch`` steps, then
    ``decay`` from ``√k`` to 0 at ``total_steps`` (cosine, ``(1 − t)^power``, or constant)::

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=base_lr)   # the small-batch lr
            fn = legw_lr_lambda(base_batch_size=128, batch_size=4096, base_warmup_epochs=0.25,
                                steps_per_epoch=len(loader), total_steps=self.trainer.max_steps)
            return [opt], [{"scheduler": LambdaLR(opt, fn), "interval": "step"}]
    """
    decay = Decay(decay)
    scale = math.sqrt(batch_size / base_batch_size)
    warmup = legw_warmup_epochs(base_warmup_epochs, base_batch_size, batch_size) * steps_per_epoch
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")

    def multiplier(step: int) -> float:
        if step < warmup:
            return scale * (step + 1) / warmup
        if decay == Decay.CONSTANT:
            return scale
        progress = min(1.0, (step - warmup) / max(1.0, total_steps - warmup))
        if decay == Decay.COSINE:
            return scale * 0.5 * (1.0 + math.cos(math.pi * progress))
        return scale * (1.0 - progress) ** power

    return multiplier
