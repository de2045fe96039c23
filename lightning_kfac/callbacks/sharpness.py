"""SharpnessCallback: log the top Hessian eigenvalue of the training loss during training."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_kfac.sharpness import model_sharpness


class SharpnessCallback(pl.Callback):
    """Every ``every_n_epochs`` epochs, log ``sharpness/top_eigenvalue``: ``λ_max`` of the Hessian
    of ``loss`` over the first ``num_batches`` training batches (clean, unmixed; eval mode), by
    power iteration on Hessian-vector products (``lightning_kfac.sharpness``). Each rank uses its
    own batches; the logged value is averaged over ranks.

    Args:
        every_n_epochs: Measurement period in epochs (measured at epoch ends).
        num_batches: How many training batches form the fixed measurement set.
        loss: ``loss(model(x), y)``; cross-entropy by default.
        iterations, tolerance: Power-iteration budget.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_batches: int = 2,
        loss: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
        iterations: int = 20,
        tolerance: float = 1e-3,
    ) -> None:
        self.every_n_epochs = every_n_epochs
        self.num_batches = num_batches
        self.loss = loss
        self.iterations = iterations
        self.tolerance = tolerance
        self._batches: list[tuple[Tensor, Tensor]] = []
        #: (global step, value) of every measurement on this rank.
        self.history: list[tuple[int, float]] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if len(self._batches) < self.num_batches:
            x, y = (
                (batch[0], batch[1])
                if isinstance(batch, (list, tuple))
                else (batch["x"], batch["y"])
            )
            self._batches.append((x.detach().clone(), y.detach().clone()))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs or not self._batches:
            return
        generator = torch.Generator().manual_seed(trainer.global_rank)
        with torch.enable_grad():
            value = model_sharpness(
                pl_module,
                self._batches,
                self.loss,
                iterations=self.iterations,
                tolerance=self.tolerance,
                generator=generator,
            )
        self.history.append((trainer.global_step, value))
        pl_module.log("sharpness/top_eigenvalue", value, on_epoch=True, sync_dist=True)
