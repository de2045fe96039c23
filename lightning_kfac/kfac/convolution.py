"""Convolution patches for KFC (Grosse & Martens 2016): geometry, patch rows, patch covariance.

(Interim version: patch-GEMM only; the shifted-correlation construction replaces it.)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from lightning_kfac.kfac.linalg import covariance_sum
from lightning_kfac.kfac.options import StrEnum


class CovarianceMethod(StrEnum):
    AUTO = "auto"
    GEMM = "gemm"
    CORRELATION = "correlation"


def _tuple(value: Any, dims: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * dims
    value = tuple(int(v) for v in value)
    return value * dims if len(value) == 1 else value


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    #: (before, after) zero padding per spatial dimension.
    padding: tuple[tuple[int, int], ...]
    groups: int
    in_channels: int

    @property
    def dims(self) -> int:
        return len(self.kernel_size)

    @classmethod
    def from_call(
        cls,
        input_shape: tuple[int, ...],
        weight_shape: tuple[int, ...],
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
    ) -> ConvGeometry:
        dims = len(weight_shape) - 2
        kernel = tuple(weight_shape[2:])
        stride_t, dilation_t = _tuple(stride, dims), _tuple(dilation, dims)
        if isinstance(padding, str):
            if padding == "valid":
                pads = tuple((0, 0) for _ in range(dims))
            else:  # 'same'
                pads = []
                for k, d in zip(kernel, dilation_t, strict=True):
                    total = d * (k - 1)
                    pads.append((total // 2, total - total // 2))
                pads = tuple(pads)
        else:
            pads = tuple((p, p) for p in _tuple(padding, dims))
        return cls(
            kernel, stride_t, dilation_t, pads, int(groups), int(weight_shape[1]) * int(groups)
        )


def patch_view(x: Tensor, geometry: ConvGeometry) -> Tensor:
    """``[N, C, *S]`` -> view ``[N, *out, groups, C/groups, *kernel]`` of the padded input."""
    pad: list[int] = []
    for before, after in reversed(geometry.padding):
        pad += [before, after]
    padded = F.pad(x, pad) if any(pad) else x
    view = padded
    for axis, (k, s, d) in enumerate(
        zip(geometry.kernel_size, geometry.stride, geometry.dilation, strict=True)
    ):
        view = view.unfold(2 + axis, (k - 1) * d + 1, s)
    index = (slice(None),) * (2 + geometry.dims) + tuple(
        slice(None, None, d) for d in geometry.dilation
    )
    view = view[index]
    batch, channels = view.shape[:2]
    out = view.shape[2 : 2 + geometry.dims]
    view = view.reshape(
        batch, geometry.groups, channels // geometry.groups, *out, *geometry.kernel_size
    )
    dims = geometry.dims
    order = (0, *range(3, 3 + dims), 1, 2, *range(3 + dims, 3 + 2 * dims))
    return view.permute(order)


def patch_rows(x: Tensor, geometry: ConvGeometry, index: Tensor | None = None) -> Tensor:
    view = patch_view(x, geometry)
    groups = geometry.groups
    features = view.shape[-geometry.dims - 1] * math.prod(geometry.kernel_size)
    if index is None:
        rows = view.reshape(-1, groups, features)
    else:
        flat = view.reshape(
            view.shape[0] * math.prod(view.shape[1 : 1 + geometry.dims]), groups, -1
        )
        rows = flat[index]
    return rows.transpose(0, 1)


def patch_sums_per_sample(x: Tensor, geometry: ConvGeometry) -> Tensor:
    view = patch_view(x, geometry)
    summed = view.sum(dim=tuple(range(1, 1 + geometry.dims)))
    return summed.reshape(x.shape[0], geometry.groups, -1).transpose(0, 1)


def patch_covariance_sum(
    x: Tensor,
    geometry: ConvGeometry,
    *,
    append_ones: bool,
    method: CovarianceMethod | str = CovarianceMethod.AUTO,
) -> Tensor:
    return covariance_sum(patch_rows(x, geometry), append_ones=append_ones)
