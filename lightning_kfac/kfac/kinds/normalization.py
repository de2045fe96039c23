"""Normalisation uses: ``F.batch_norm``, ``F.layer_norm``, ``F.group_norm``, ``F.rms_norm``.

Unit-wise natural gradient of the affine parameters (Osawa et al. 2019, SP-NGD §3.3): for channel
``c`` the per-sample gradient ``u_{n,c} = (Σ_p g x̂, Σ_p g)`` of ``(γ_c, β_c)`` — sums over the
positions ``p`` sample ``n``'s ``γ_c`` touches — gives a ``k×k`` Fisher block
``F_c = (1/N) Σ_n u_{n,c} u_{n,c}ᵀ`` (``k`` = trained parameters among ``γ, β``), and the step is
``(F_c + λ I)⁻¹ dθ_c`` (docs/design.md §5).

``x̂`` is the normalised input (batch statistics for ``BatchNorm`` in training, running statistics
in eval mode, per-sample statistics for ``LayerNorm``/``GroupNorm``/``RMSNorm``), recomputed at
backward time from the saved input. For ``BatchNorm`` in training the batch statistics couple the
samples; like SP-NGD, the per-sample gradient treats ``x̂`` as given.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_kfac.kfac.calls import ParameterView, RecognizedCall, argument, slot
from lightning_kfac.kfac.kinds.base import (
    Kind,
    SampleCall,
    SupportedUse,
    UnitWiseModel,
    move_batch_first,
)
from lightning_kfac.kfac.kinds.linear import positions_of_features

NAME = "norm"


def _norm_call(
    func: Any,
    args: list[Any],
    kwargs: dict[str, Any],
    positions: tuple[int, int],
    detail: tuple[Any, ...],
    normalize: Callable[[Tensor], Tensor],
) -> RecognizedCall:
    """A norm call whose weight and bias are the arguments at ``positions``."""
    weight_at, bias_at = positions
    return RecognizedCall(
        NAME, func, args, kwargs, argument(args, kwargs, 0, "input", None),
        argument(args, kwargs, weight_at, "weight", None),
        argument(args, kwargs, bias_at, "bias", None) if bias_at >= 0 else None,
        slot(args, kwargs, weight_at, "weight"),
        slot(args, kwargs, bias_at, "bias") if bias_at >= 0 else None,
        detail=detail, normalize=normalize,
    )  # fmt: skip


def recognize_batch_norm(func: Any, args: list[Any], kwargs: dict[str, Any]) -> RecognizedCall:
    training = bool(argument(args, kwargs, 5, "training", False))
    running = (
        argument(args, kwargs, 1, "running_mean", None),
        argument(args, kwargs, 2, "running_var", None),
    )
    eps = float(argument(args, kwargs, 7, "eps", 1e-5))
    # x̂ is recomputed at backward: keep what normalises it (not part of the use's identity).
    normalize = _batch_norm_normalizer(training, running, eps)
    return _norm_call(func, args, kwargs, (3, 4), ("batch",), normalize)


def _batch_norm_normalizer(
    training: bool, running: tuple[Tensor | None, Tensor | None], eps: float
) -> Callable[[Tensor], Tensor]:
    if training or running[0] is None:

        def normalize(x: Tensor) -> Tensor:
            return F.batch_norm(x, None, None, training=True, eps=eps)

    else:
        mean, var = running[0].detach().clone(), running[1].detach().clone()  # type: ignore[union-attr]

        def normalize(x: Tensor) -> Tensor:
            return F.batch_norm(x, mean, var, training=False, eps=eps)

    return normalize


def recognize_layer_norm(func: Any, args: list[Any], kwargs: dict[str, Any]) -> RecognizedCall:
    shape = tuple(argument(args, kwargs, 1, "normalized_shape", ()))
    eps = float(argument(args, kwargs, 4, "eps", 1e-5))
    return _norm_call(
        func, args, kwargs, (2, 3), ("layer", len(shape)), lambda t: F.layer_norm(t, shape, eps=eps)
    )


def recognize_rms_norm(func: Any, args: list[Any], kwargs: dict[str, Any]) -> RecognizedCall:
    shape = tuple(argument(args, kwargs, 1, "normalized_shape", ()))
    eps = argument(args, kwargs, 3, "eps", None)
    return _norm_call(
        func, args, kwargs, (2, -1), ("rms", len(shape)), lambda t: F.rms_norm(t, shape, eps=eps)
    )


def recognize_group_norm(func: Any, args: list[Any], kwargs: dict[str, Any]) -> RecognizedCall:
    groups = int(argument(args, kwargs, 1, "num_groups", 1))
    eps = float(argument(args, kwargs, 4, "eps", 1e-5))
    return _norm_call(
        func, args, kwargs, (2, 3), ("group", groups), lambda t: F.group_norm(t, groups, eps=eps)
    )


class NormModel(UnitWiseModel):
    """Unit-wise ``(γ, β)`` Fisher blocks of a normalisation layer, one per channel."""

    @classmethod
    def problem(
        cls, call: RecognizedCall, weight: ParameterView | None, bias: ParameterView | None
    ) -> str | None:
        """A norm may train ``β`` alone; slices of its parameters are not modelled."""
        for view in (weight, bias):
            if view is not None and view.is_part:
                return f"{call.kind} with a slice of the parameter"
        return None

    @property
    def channels(self) -> int:
        return math.prod(self.view_shape(self.spec.first_part))

    @property
    def norm_type(self) -> str:
        return str(self.spec.detail[0])

    def channel_first(self) -> bool:
        """BatchNorm and GroupNorm act on ``(N, C, *)``; LayerNorm/RMSNorm on the last dims."""
        return self.norm_type in ("batch", "group")

    def gradient_mask(
        self, layer_input: Tensor, batch_dim: int, positions: Tensor
    ) -> Tensor | None:
        """LayerNorm/RMSNorm over the features of ``(N, T, ...)``: padding positions add
        nothing to the per-sample sums (channel-first norms are not laid out over positions)."""
        if self.channel_first():
            return None
        return positions_of_features(layer_input, batch_dim, positions)

    def begin_samples(
        self,
        layer_input: Tensor,
        call: RecognizedCall,
        batch_dim: int,
        batch_size: int,
        dtype: torch.dtype,
    ) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        # the raw input is kept (converted at backward): no second copy held through the pass
        assert call.normalize is not None
        return layer_input, call.normalize

    def end_samples(
        self,
        begun: tuple[Tensor, Callable[[Tensor], Tensor]],
        output_gradient: Tensor,
        batch_dim: int,
        batch_size: int,
    ) -> SampleCall:
        layer_input, normalize = begun
        with torch.no_grad():
            x_hat = normalize(layer_input.to(output_gradient.dtype))
        return SampleCall(None, 0, self.sample_gradients(x_hat, output_gradient, batch_dim))

    def sample_gradients(self, x_hat: Tensor, output_gradient: Tensor, batch_dim: int) -> Tensor:
        """``u`` ``[N, C, k]``: per-sample ``(Σ_p g x̂, Σ_p g)`` of the trained parameters."""
        channels = self.channels
        if self.channel_first():
            if x_hat.dim() == 1:  # BatchNorm1d on a single unbatched vector: not reachable
                x_hat, output_gradient = x_hat.unsqueeze(0), output_gradient.unsqueeze(0)
            batch = x_hat.shape[0]
            xs = x_hat.reshape(batch, channels, -1)
            gs = output_gradient.reshape(batch, channels, -1)
            parts_gamma, parts_beta = (gs * xs).sum(-1), gs.sum(-1)
        else:
            xs = move_batch_first(x_hat, batch_dim) if x_hat.dim() > 1 else x_hat.unsqueeze(0)
            gs = (
                move_batch_first(output_gradient, batch_dim)
                if output_gradient.dim() > 1
                else output_gradient.unsqueeze(0)
            )
            batch = xs.shape[0]
            xs, gs = xs.reshape(batch, -1, channels), gs.reshape(batch, -1, channels)
            parts_gamma, parts_beta = (gs * xs).sum(1), gs.sum(1)
        parts = []
        if self.spec.weight is not None:
            parts.append(parts_gamma)
        if self.spec.bias is not None:
            parts.append(parts_beta)
        return torch.stack(parts, dim=-1)


_recognizers: dict[Any, Any] = {
    F.batch_norm: recognize_batch_norm,
    F.layer_norm: recognize_layer_norm,
    F.group_norm: recognize_group_norm,
}
if hasattr(F, "rms_norm"):
    _recognizers[F.rms_norm] = recognize_rms_norm

KIND = Kind(
    name=NAME,
    recognizers=_recognizers,
    model=NormModel,
    supported=(
        SupportedUse(
            "`F.batch_norm`, `F.layer_norm`, `F.group_norm`, `F.rms_norm`",
            "`BatchNorm1d/2d/3d`, `LayerNorm`, `GroupNorm`, `RMSNorm` with affine parameters",
            "unit-wise natural gradient: a 2×2 Fisher block per channel for `(γ, β)` (Osawa et "
            "al., SP-NGD)",
        ),
    ),
)
