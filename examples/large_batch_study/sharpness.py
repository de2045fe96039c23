"""The study's sharpness: the top Hessian eigenvalue by power iteration on Hessian-vector products.

Keskar et al. (2017) relate large-batch generalization gaps to sharp minima. Their ε-sharpness
needs an inner L-BFGS-B maximisation; the cheaper standard diagnostic is ``λ_max`` of the loss
Hessian, found by power iteration ``v ← H v / ||H v||`` where ``H v`` is a second backward pass
(Pearlmutter 1994), never forming ``H``. Compare runs at matched training loss: ``λ_max`` collapses
as the loss goes to zero.

The study measures it with ``training.RunRecord`` (at matched training losses, in each run's
record); ``SharpnessCallback`` logs it every few epochs instead. (Formerly
``lightning_kfac.sharpness`` and ``lightning_kfac.SharpnessCallback``: a diagnostic of the
study, not part of K-FAC.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Power iteration for the study's sharpness: at most this many Hessian-vector products, stopping
#: when the estimate changes by less than the tolerance (relative).
SHARPNESS_ITERATIONS = 30
SHARPNESS_TOLERANCE = 1e-3


def hessian_vector_product(
    loss_fn: Callable[[], Tensor], parameters: list[Tensor], vector: list[Tensor]
) -> list[Tensor]:
    """``H v`` of ``loss_fn()`` w.r.t. ``parameters`` by double backward."""
    loss = loss_fn()
    grads = torch.autograd.grad(loss, parameters, create_graph=True)
    dot = sum((g * v).sum() for g, v in zip(grads, vector, strict=True))
    return list(torch.autograd.grad(dot, parameters))


def top_hessian_eigenvalue(
    loss_fn: Callable[[], Tensor],
    parameters: Iterable[Tensor],
    *,
    iterations: int = 50,
    tolerance: float = 1e-4,
    generator: torch.Generator | None = None,
) -> float:
    """Largest-magnitude eigenvalue of the Hessian of ``loss_fn()`` (power iteration).

    Stops when the Rayleigh quotient changes by less than ``tolerance`` (relative) or after
    ``iterations`` HVPs. ``loss_fn`` is re-evaluated for each product (so it should be
    deterministic: fixed data, ``model.eval()`` for dropout/BatchNorm).
    """
    params = [p for p in parameters if p.requires_grad]
    vector = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
    norm = torch.sqrt(sum((v * v).sum() for v in vector))
    vector = [v / norm for v in vector]
    estimate = 0.0
    for _ in range(iterations):
        product = hessian_vector_product(loss_fn, params, vector)
        new_estimate = float(sum((h * v).sum() for h, v in zip(product, vector, strict=True)))
        norm = torch.sqrt(sum((h * h).sum() for h in product))
        if float(norm) == 0.0:
            return 0.0
        vector = [h / norm for h in product]
        if abs(new_estimate - estimate) <= tolerance * max(abs(new_estimate), 1e-12):
            return new_estimate
        estimate = new_estimate
    return estimate


def model_sharpness(
    model: nn.Module,
    batches: list[tuple[Tensor, Tensor]],
    loss: Callable[[Tensor, Tensor], Tensor],
    **options: Any,
) -> float:
    """``λ_max`` of the mean loss of ``model`` over ``batches`` (in eval mode)."""
    was_training = model.training
    model.eval()
    try:

        def loss_fn() -> Tensor:
            total = sum(loss(model(x), y) * len(x) for x, y in batches)
            return total / sum(len(x) for x, _ in batches)

        return top_hessian_eigenvalue(loss_fn, model.parameters(), **options)
    finally:
        model.train(was_training)


class SharpnessCallback(pl.Callback):
    """Every ``every_n_epochs`` epochs, log ``sharpness/top_eigenvalue``: ``λ_max`` of the Hessian
    of ``loss`` over the first ``num_batches`` training batches (clean, unmixed; eval mode), by
    power iteration on Hessian-vector products (``model_sharpness``). Each rank uses its
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
