"""Gradient routes: from parameters' ``.grad`` to each use's gradient matrix, and back.

A use's gradient is the rows of ``.grad`` it touches (a row slice of ``in_proj_weight``, possibly
transposed) — or, for a parameter with several overlapping uses (a tied embedding and LM head),
the use's own gradient collected through an alias tensor (``UseSums.use_gradients``). Back, each
use's rows are written into ``.grad``; a parameter with overlapping uses gets the sum over its
uses of their preconditioned gradients (docs/design.md §6).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_kfac.kfac.blocks import Block
from lightning_kfac.kfac.calls import ParameterView

#: Per-use gradients by block name: ``"weight"``/``"bias"`` -> the use's own gradient.
UseGradients = Mapping[str, Mapping[str, Tensor]]


class GradientRouter:
    """Reads and writes the gradients of the tracked parameters ``tracked`` (name -> parameter)."""

    def __init__(self, tracked: Mapping[str, nn.Parameter]) -> None:
        self.tracked = tracked

    def _part_gradient(
        self,
        block: Block,
        role: str,
        view: ParameterView | None,
        use_gradients: Mapping[str, Tensor],
    ) -> Tensor | None:
        if view is None:
            return None
        if role in block.alias_parts:
            return use_gradients.get(role)
        grad = self.tracked[view.name].grad
        if grad is None:
            return None
        if view.rows is not None:
            grad = grad[view.rows[0] : view.rows[1]]
        return grad.mT if view.transposed else grad

    def gradient_matrix(self, block: Block, use_gradients: Mapping[str, Tensor]) -> Tensor | None:
        """The block's gradient as ``[B, d_g, d_a]``, or None when its weight has none."""
        spec = block.spec
        weight = self._part_gradient(block, "weight", spec.weight, use_gradients)
        bias = self._part_gradient(block, "bias", spec.bias, use_gradients)
        if (spec.weight is not None and weight is None) or (spec.weight is None and bias is None):
            return None
        return block.model.to_matrix(weight, bias)

    def write_back(
        self, blocks: Sequence[Block], finals: Mapping[str, Tensor], use_gradients: UseGradients
    ) -> None:
        """Write each block's result into ``.grad``: rows of single-use parameters directly,
        the sum over uses for parameters with overlapping uses (a use without a result joins the
        sum with its raw gradient)."""
        sums: dict[str, Tensor] = {}
        for block in blocks:
            final = finals.get(block.name)
            if final is None:
                if not block.alias_parts:
                    continue
                final = self.gradient_matrix(block, use_gradients.get(block.name, {}))
                if final is None:
                    continue
            weight, bias = block.model.from_matrix(final)
            for role, view, value in (
                ("weight", block.spec.weight, weight),
                ("bias", block.spec.bias, bias),
            ):
                if view is None or value is None:
                    continue
                param = self.tracked[view.name]
                if view.transposed:
                    value = value.mT
                if role in block.alias_parts:
                    total = sums.get(view.name)
                    if total is None:
                        total = sums[view.name] = torch.zeros_like(
                            param.grad if param.grad is not None else param
                        )
                    target = total if view.rows is None else total[view.rows[0] : view.rows[1]]
                    target.add_(value.to(target.dtype))
                else:
                    grad = param.grad
                    if grad is None:
                        continue
                    target = grad if view.rows is None else grad[view.rows[0] : view.rows[1]]
                    target.copy_(value.reshape(target.shape))
        for name, total in sums.items():
            param = self.tracked[name]
            if param.grad is None:
                param.grad = total
            else:
                param.grad.copy_(total)
