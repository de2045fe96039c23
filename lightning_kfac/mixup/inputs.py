"""Mixing input batches (pure torch): mixup's weighted sum and CutMix's pasted boxes.

The contract these serve is in :mod:`lightning_kfac.mixup`; random box positions come from the
caller's ``torch.Generator``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def mix_inputs(inputs: Tensor, partner: Tensor, lam: Tensor) -> Tensor:
    """``λ_i x_i + (1 − λ_i) x'_i`` with ``lam`` of shape ``[N]`` (``x' = x[π]`` for mixup).

    Raises:
        TypeError: ``inputs`` are integers or bools (token ids, raw ``uint8`` images): the
            weighted sum would be truncated to one of the two samples.
    """
    if not (inputs.is_floating_point() or inputs.is_complex()):
        raise TypeError(
            f"mixup mixes float inputs, got {inputs.dtype}: λ x + (1 − λ) x' would be truncated "
            "to one of the two samples. Mix embeddings inside the model instead, or convert the "
            "inputs to float first"
        )
    weights = lam.to(device=inputs.device, dtype=inputs.dtype).view(-1, *([1] * (inputs.dim() - 1)))
    return weights * inputs + (1 - weights) * partner


def cutmix_boxes(
    lam: Tensor, height: int, width: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Boxes ``[top, bottom) x [left, right)`` of area ≈ ``(1 − λ) H W``, centred uniformly and
    clipped to the image (Yun et al. 2019). Returns int64 tensors of shape ``[N]``."""
    ratio = torch.sqrt(1.0 - lam)
    box_h = (height * ratio).floor()
    box_w = (width * ratio).floor()
    centre_y = torch.randint(0, height, (lam.numel(),), generator=generator).double()
    centre_x = torch.randint(0, width, (lam.numel(),), generator=generator).double()
    top = (centre_y - box_h / 2).floor().clamp(0, height).long()
    bottom = (centre_y + box_h / 2).floor().clamp(0, height).long()
    left = (centre_x - box_w / 2).floor().clamp(0, width).long()
    right = (centre_x + box_w / 2).floor().clamp(0, width).long()
    return top, bottom, left, right


def cutmix_mask(lam: Tensor, height: int, width: int, generator: torch.Generator) -> Tensor:
    """Boolean ``[N, H, W]`` mask of the pasted boxes of :func:`cutmix_boxes` (True = partner)."""
    top, bottom, left, right = cutmix_boxes(lam, height, width, generator)
    rows = torch.arange(height).view(1, -1, 1)
    cols = torch.arange(width).view(1, 1, -1)
    return (
        (rows >= top.view(-1, 1, 1))
        & (rows < bottom.view(-1, 1, 1))
        & (cols >= left.view(-1, 1, 1))
        & (cols < right.view(-1, 1, 1))
    )


def cutmix_inputs(
    inputs: Tensor, partner: Tensor, lam: Tensor, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Paste a box of ``x'_i`` into ``x_i`` (inputs ``[N, C, H, W]``, ``x' = x[π]`` for CutMix);
    return the mixed inputs and the *exact* ``λ_i = 1 − box area / (H W)`` after clipping.

    Pixels are copied, not combined, so integer images (``uint8``) are fine here."""
    mixed, exact_lam, _ = cutmix_inputs_and_mask(inputs, partner, lam, generator)
    return mixed, exact_lam


def cutmix_inputs_and_mask(
    inputs: Tensor, partner: Tensor, lam: Tensor, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`cutmix_inputs` that also returns the boolean ``[N, H, W]`` box mask (True where
    the pixel comes from the partner): the per-pixel ``λ = 1 − mask`` of dense targets."""
    if inputs.dim() != 4:
        raise ValueError(
            f"CutMix needs image batches [N, C, H, W], got shape {tuple(inputs.shape)}"
        )
    inside = cutmix_mask(lam, *inputs.shape[-2:], generator)
    mixed = torch.where(inside.unsqueeze(1).to(inputs.device), partner, inputs)
    exact_lam = 1.0 - inside.flatten(1).double().mean(1)
    return mixed, exact_lam, inside
