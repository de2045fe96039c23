"""Convolution uses: ``F.conv1d/2d/3d`` with any stride, padding, dilation and groups.

Curvature: KFC (Grosse & Martens 2016), one Kronecker block per group. ``A`` sums the outer
products of the input patches over samples and output locations (``patches``: exactly, from the
patch GEMM or from shifted correlations, whichever is cheaper), ``G`` the outer products of the
output gradients at every location (docs/design.md §3).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_kfac.kfac.calls import RecognizedCall, argument, slot
from lightning_kfac.kfac.kinds.base import Kind, KroneckerModel, SupportedUse
from lightning_kfac.kfac.patches import (
    ConvGeometry,
    patch_covariance_sum,
    patch_rows,
    patch_sums_per_sample,
)
from lightning_kfac.kfac.uses import UseSpec

NAME = "conv"


def recognize_conv(dims: int) -> Callable[..., RecognizedCall]:
    def recognize(func: Any, args: list[Any], kwargs: dict[str, Any]) -> RecognizedCall:
        x = argument(args, kwargs, 0, "input", None)
        weight = argument(args, kwargs, 1, "weight", None)
        bias = argument(args, kwargs, 2, "bias", None)
        detail = (
            dims,
            argument(args, kwargs, 3, "stride", 1),
            argument(args, kwargs, 4, "padding", 0),
            argument(args, kwargs, 5, "dilation", 1),
            argument(args, kwargs, 6, "groups", 1),
        )
        detail = tuple(tuple(v) if isinstance(v, list) else v for v in detail)
        return RecognizedCall(
            NAME, func, args, kwargs, x, weight, bias,
            slot(args, kwargs, 1, "weight"), slot(args, kwargs, 2, "bias"), detail=detail,
        )  # fmt: skip

    return recognize


class ConvModel(KroneckerModel):
    """``F.conv1d/2d/3d``: KFC (Grosse & Martens 2016), one Kronecker block per group."""

    def __init__(self, spec: UseSpec, shapes: dict[str, tuple[int, ...]], max_dim: int) -> None:
        super().__init__(spec, shapes, max_dim)
        assert spec.weight is not None
        self.weight_shape = shapes[spec.weight.name]
        self.dims, self.stride, self.padding, self.dilation, self.groups = spec.detail
        self._geometries: dict[tuple[int, ...], ConvGeometry] = {}

    @property
    def blocks(self) -> int:
        return int(self.groups)

    @property
    def in_features(self) -> int:
        return math.prod(self.weight_shape[1:])

    @property
    def out_features(self) -> int:
        return self.weight_shape[0] // self.blocks

    def _batched(self, tensor: Tensor) -> Tensor:
        return tensor.unsqueeze(0) if tensor.dim() == self.dims + 1 else tensor

    def geometry(self, layer_input: Tensor) -> ConvGeometry:
        shape = tuple(self._batched(layer_input).shape)
        geometry = self._geometries.get(shape)
        if geometry is None:
            geometry = ConvGeometry.from_call(
                shape, self.weight_shape, self.stride, self.padding, self.dilation, self.groups
            )
            self._geometries[shape] = geometry
        return geometry

    def row_count(self, layer_input: Tensor) -> int:
        batched = self._batched(layer_input)
        locations = math.prod(self.geometry(layer_input).output_size(tuple(batched.shape[2:])))
        return batched.shape[0] * locations

    def a_rows(self, layer_input: Tensor, index: Tensor | None) -> Tensor:
        return patch_rows(self._batched(layer_input), self.geometry(layer_input), index)

    def a_statistic(self, layer_input: Tensor, index: Tensor | None) -> Tensor:
        if index is None and not self.a_diagonal:
            return patch_covariance_sum(
                self._batched(layer_input), self.geometry(layer_input), append_ones=self.has_bias
            )
        return super().a_statistic(layer_input, index)

    def a_statistic_of_calls(
        self,
        inputs: Sequence[Tensor],
        index: Tensor | None,
        routes: Sequence[Any],
        masks: Sequence[Tensor | None] = (),
    ) -> Tensor:
        """Calls on inputs of one shape are one call on their concatenation (the fast exact
        ``A`` applies to it); rows otherwise."""
        if len(inputs) > 1 and index is None and not self.a_diagonal:
            return _sum_by_shape([self._batched(x) for x in inputs], self.a_statistic)
        return super().a_statistic_of_calls(inputs, index, routes, masks)

    def g_statistic_of_calls(
        self,
        gradients: Sequence[Tensor],
        scales: Sequence[float | Tensor],
        index: Tensor | None,
        routes: Sequence[Any],
        masks: Sequence[Tensor | None] = (),
    ) -> Tensor:
        if len(gradients) > 1 and index is None and not self.g_diagonal:
            scaled = [self._batched(g * s) for g, s in zip(gradients, scales, strict=True)]
            return _sum_by_shape(scaled, self.g_statistic)
        return super().g_statistic_of_calls(gradients, scales, index, routes, masks)

    def g_rows(self, output_gradient: Tensor, index: Tensor | None) -> Tensor:
        grads = self._batched(output_gradient)
        batch = grads.shape[0]
        grads = grads.reshape(batch, self.blocks, self.out_features, -1)  # [N, B, d_out, T]
        rows = grads.permute(1, 0, 3, 2).reshape(self.blocks, -1, self.out_features)
        return rows if index is None else rows[:, index]

    def g_statistic(self, output_gradient: Tensor, index: Tensor | None) -> Tensor:
        """``Σ_{n,t} g gᵀ`` as ``X Xᵀ`` with ``X = [d_out, N·T]``: gathering ``X`` copies whole
        ``T``-runs, where the ``[N·T, d_out]`` rows of ``g_rows`` transpose every element
        (1.3-1.8x faster on the benchmark CNN's layers; the same sum)."""
        if index is not None or self.g_diagonal:
            return super().g_statistic(output_gradient, index)
        grads = self._batched(output_gradient)
        batch = grads.shape[0]
        grads = grads.reshape(batch, self.blocks, self.out_features, -1)  # [N, B, d_out, T]
        columns = grads.permute(1, 2, 0, 3).reshape(self.blocks, self.out_features, -1)
        return columns @ columns.mT

    def a_sample_sums(
        self, layer_input: Tensor, batch_dim: int, batch_size: int | None = None
    ) -> tuple[Tensor, int]:
        batched = self._batched(layer_input)
        sums = patch_sums_per_sample(batched, self.geometry(layer_input))
        return sums, self.row_count(layer_input) // batched.shape[0]

    def g_sample_sums(
        self, output_gradient: Tensor, batch_dim: int, batch_size: int | None = None
    ) -> Tensor:
        grads = self._batched(output_gradient)
        summed = grads.reshape(grads.shape[0], grads.shape[1], -1).sum(-1)  # [N, C_out]
        return summed.reshape(grads.shape[0], self.blocks, self.out_features).transpose(0, 1)

    def to_matrix(self, weight_grad: Tensor | None, bias_grad: Tensor | None) -> Tensor:
        assert weight_grad is not None
        matrix = weight_grad.reshape(self.blocks, self.out_features, self.in_features)
        return self._with_bias(matrix, bias_grad)

    def from_matrix(self, matrix: Tensor) -> tuple[Tensor | None, Tensor | None]:
        weight, bias = self._split_bias(matrix)
        return weight.reshape(self.weight_shape), bias


def _sum_by_shape(
    tensors: Sequence[Tensor], statistic: Callable[[Tensor, Tensor | None], Tensor]
) -> Tensor:
    """``Σ statistic`` over groups of same-shaped tensors, each group concatenated on dim 0."""
    groups: dict[tuple[int, ...], list[Tensor]] = {}
    for tensor in tensors:
        groups.setdefault(tuple(tensor.shape[1:]), []).append(tensor)
    parts = [
        statistic(torch.cat(group) if len(group) > 1 else group[0], None)
        for group in groups.values()
    ]
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


KIND = Kind(
    name=NAME,
    recognizers={
        F.conv1d: recognize_conv(1),
        F.conv2d: recognize_conv(2),
        F.conv3d: recognize_conv(3),
    },
    model=ConvModel,
    supported=(
        SupportedUse(
            "`F.conv1d/2d/3d`",
            "`nn.Conv1d/2d/3d`, any stride / padding (incl. `'same'`, non-zero modes) / dilation "
            "/ groups",
            "KFC `A ⊗ G`, one block per group; exact `A` from shifted correlations where cheaper",
        ),
    ),
)
