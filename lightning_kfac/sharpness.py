"""Sharpness diagnostic: the top Hessian eigenvalue by power iteration on Hessian-vector products.

Keskar et al. (2017) relate large-batch generalization gaps to sharp minima. Their ε-sharpness
needs an inner L-BFGS-B maximisation; the cheaper standard diagnostic is ``λ_max`` of the loss
Hessian, found by power iteration ``v ← H v / ||H v||`` where ``H v`` is a second backward pass
(Pearlmutter 1994), never forming ``H``. Compare runs at matched training loss: ``λ_max`` collapses
as the loss goes to zero.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn


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
