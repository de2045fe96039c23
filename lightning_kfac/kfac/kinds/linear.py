"""Linear uses: ``s = L x + b`` with ``L`` a weight (or a row slice of one).

=========================================  ============================================
call                                       weight as a linear map ``s = L x (+ b)``
=========================================  ============================================
``F.linear(x, W, b)``                      ``L = W`` (``W`` may be a row slice of a
                                           parameter, e.g. MHA's ``in_proj_weight``)
``torch.addmm(b, x, W)`` (GPT-2 Conv1D)    ``L = Wᵀ``
``x @ W``, ``torch.matmul/mm(x, W)``       ``L = Wᵀ``
=========================================  ============================================

``F.multi_head_attention_forward`` is run with the tracing mode re-entered, so that its packed or
split projections and its functional ``out_proj`` are seen as linear calls.

Curvature: ``A ⊗ G`` with ``a = [x; 1]`` and ``g`` the per-sample output gradient. Inputs
``(N, ..., d)`` are weight sharing over the middle dimensions (docs/design.md §2-3).
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_kfac.kfac.calls import ParameterView, RecognizedCall, argument, slot
from lightning_kfac.kfac.kinds.base import (
    Kind,
    KroneckerModel,
    SampleLayout,
    SupportedUse,
    move_batch_first,
)

NAME = "linear"


def recognize_linear(func: Any, args: list[Any], kwargs: dict[str, Any]) -> RecognizedCall:
    x, weight = argument(args, kwargs, 0, "input", None), argument(args, kwargs, 1, "weight", None)
    bias = argument(args, kwargs, 2, "bias", None)
    return RecognizedCall(
        NAME, func, args, kwargs, x, weight, bias,
        slot(args, kwargs, 1, "weight"), slot(args, kwargs, 2, "bias"),
    )  # fmt: skip


def recognize_addmm(func: Any, args: list[Any], kwargs: dict[str, Any]) -> RecognizedCall:
    bias, x = argument(args, kwargs, 0, "input", None), argument(args, kwargs, 1, "mat1", None)
    weight = argument(args, kwargs, 2, "mat2", None)
    call = RecognizedCall(
        NAME, func, args, kwargs, x, weight, bias,
        slot(args, kwargs, 2, "mat2"), slot(args, kwargs, 0, "input"), transposed_form=True,
    )  # fmt: skip
    if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1:
        call.unsupported = "addmm with alpha/beta other than 1"
    elif not isinstance(bias, Tensor) or bias.dim() != 1:
        call.unsupported = "addmm whose first argument is not a bias vector"
    return call


def recognize_matmul(func: Any, args: list[Any], kwargs: dict[str, Any]) -> RecognizedCall:
    x, weight = argument(args, kwargs, 0, "input", None), argument(args, kwargs, 1, "other", None)
    call = RecognizedCall(
        NAME, func, args, kwargs, x, weight, None,
        slot(args, kwargs, 1, "other"), None, transposed_form=True,
    )  # fmt: skip
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        call.unsupported = "matmul with a weight that is not a matrix"
    return call


def _without_dispatch(function: types.FunctionType) -> types.FunctionType:
    """A copy of a torch.nn.functional composite whose ``has_torch_function*`` checks are off.

    Called inside the (re-entered) mode, its body runs normally and every torch function it calls
    is seen by the mode; calling the original would dispatch back to the mode without end.
    """
    module_globals = dict(function.__globals__)
    for name in ("has_torch_function", "has_torch_function_unary", "has_torch_function_variadic"):
        module_globals[name] = lambda *args, **kwargs: False
    copy = types.FunctionType(
        function.__code__, module_globals, function.__name__, function.__defaults__,
        function.__closure__,
    )  # fmt: skip
    copy.__kwdefaults__ = function.__kwdefaults__
    return copy


class LinearModel(KroneckerModel):
    """``s = L x + b`` applied to inputs ``(..., d_in)``: positions are the leading dims.

    ``L`` is the passed weight (``F.linear``) or its transpose (``addmm``, ``x @ W``).
    """

    @classmethod
    def problem(
        cls, call: RecognizedCall, weight: ParameterView | None, bias: ParameterView | None
    ) -> str | None:
        """Row slices and transposes of a parameter are linear maps too (MHA's packed
        projections); a bias must match the weight's outputs."""
        if weight is None:
            return "bias of a weight K-FAC does not train (frozen or skipped)"
        for view in (weight, bias):
            if view is not None and (view.selected or view.broadcast):
                return "linear with a view of the parameter that is not a row slice"
        if bias is not None:
            assert call.weight is not None and call.bias is not None  # both resolved
            out_rows = call.weight.shape[-1 if call.transposed_form else 0]
            if bias.transposed or call.bias.shape[0] != out_rows:
                return "linear with a bias that does not match the weight's outputs"
        return None

    @property
    def _matrix_shape(self) -> tuple[int, int]:
        assert self.spec.weight is not None
        rows, cols = self.view_shape(self.spec.weight)
        return (cols, rows) if self.spec.transposed_form else (rows, cols)

    @property
    def in_features(self) -> int:
        return self._matrix_shape[1]

    @property
    def out_features(self) -> int:
        return self._matrix_shape[0]

    def row_count(self, layer_input: Tensor) -> int:
        return layer_input.numel() // self.in_features

    def sample_layout(self, layer_input: Tensor, batch_dim: int, batch_size: int) -> Any:
        """Size 1 along the samples' dimension of a 3-D or higher input (e.g. position features
        ``[1, T, d]``): shared by the samples, broadcast against them later."""
        if layer_input.dim() >= 3 and batch_size > 1 and layer_input.shape[batch_dim] == 1:
            return SampleLayout.BROADCAST
        return SampleLayout.SAMPLES

    def row_mask(self, layer_input: Tensor, batch_dim: int, positions: Tensor) -> Tensor | None:
        return positions_of_rows(layer_input, batch_dim, positions, features=True)

    def a_rows(self, layer_input: Tensor, index: Tensor | None) -> Tensor:
        return feature_rows(layer_input, self.in_features, index)

    def g_rows(self, output_gradient: Tensor, index: Tensor | None) -> Tensor:
        return feature_rows(output_gradient, self.out_features, index)

    @staticmethod
    def _samples(tensor: Tensor, batch_dim: int, batch_size: int | None, features: int) -> Tensor:
        """``[N, T, features]``. A 2-D tensor of ``T·N`` rows holds flattened positions:
        sample-major for ``batch_dim == 0`` (GPT-2 ``Conv1D``'s ``x.view(-1, nx)``),
        position-major for ``batch_dim == 1`` (the ``(L·N, E)`` input of MHA's ``out_proj``)."""
        if tensor.dim() == 2:
            if batch_size is None or tensor.shape[0] % batch_size:
                return tensor.unsqueeze(1)
            if batch_dim == 1:
                return tensor.reshape(-1, batch_size, features).transpose(0, 1)
            return tensor.reshape(batch_size, -1, features)
        rows = move_batch_first(tensor, batch_dim)
        return rows.reshape(rows.shape[0], -1, features)

    def a_sample_sums(
        self, layer_input: Tensor, batch_dim: int, batch_size: int | None = None
    ) -> tuple[Tensor, int]:
        if layer_input.dim() < 2:
            return layer_input.reshape(1, 1, -1), 1
        rows = self._samples(layer_input, batch_dim, batch_size, self.in_features)
        return rows.sum(dim=1).unsqueeze(0), rows.shape[1]

    def g_sample_sums(
        self, output_gradient: Tensor, batch_dim: int, batch_size: int | None = None
    ) -> Tensor:
        if output_gradient.dim() < 2:
            return output_gradient.reshape(1, 1, -1)
        rows = self._samples(output_gradient, batch_dim, batch_size, self.out_features)
        return rows.sum(dim=1).unsqueeze(0)

    def to_matrix(self, weight_grad: Tensor | None, bias_grad: Tensor | None) -> Tensor:
        assert weight_grad is not None
        matrix = weight_grad.mT if self.spec.transposed_form else weight_grad
        return self._with_bias(matrix.unsqueeze(0), bias_grad)

    def from_matrix(self, matrix: Tensor) -> tuple[Tensor | None, Tensor | None]:
        weight, bias = self._split_bias(matrix)
        weight = weight[0]
        return (weight.mT if self.spec.transposed_form else weight), bias


def positions_of_rows(
    tensor: Tensor, batch_dim: int, positions: Tensor, *, features: bool
) -> Tensor | None:
    """The ``[N, T]`` mask ``positions`` in the order of the rows of ``tensor`` — ``(N, T[, d])``
    or ``(T, N[, d])`` by ``batch_dim``, or, with ``features``, ``(N·T, d)`` rows flattened
    sample-major (``batch_dim`` 0) or position-major (1) — or None when ``tensor`` is not laid
    out over those positions."""
    samples, steps = positions.shape
    laid = tensor.shape[:-1] if features else tensor.shape
    if len(laid) == 2:
        if batch_dim == 0 and tuple(laid) == (samples, steps):
            return positions.reshape(-1)
        if batch_dim == 1 and tuple(laid) == (steps, samples):
            return positions.T.reshape(-1)
    if features and len(laid) == 1 and laid[0] == samples * steps and samples * steps > 0:
        return (positions if batch_dim == 0 else positions.T).reshape(-1)
    return None


def positions_of_features(tensor: Tensor, batch_dim: int, positions: Tensor) -> Tensor | None:
    """The ``[N, T]`` mask ``positions`` shaped ``(N, T, 1)`` or ``(T, N, 1)`` to multiply a
    ``(N, T, C)`` / ``(T, N, C)`` tensor (a per-sample rule's output gradient), or None when
    ``tensor`` is not laid out over those positions."""
    if tensor.dim() != 3:
        return None
    mask = positions_of_rows(tensor[..., 0], batch_dim, positions, features=False)
    if mask is None:
        return None
    return mask.reshape(*tensor.shape[:2], 1)


def feature_rows(tensor: Tensor, features: int, index: Tensor | None) -> Tensor:
    """``tensor`` ``(..., features)`` as one block of rows ``[1, M, features]`` (rows ``index``)."""
    rows = tensor.reshape(-1, features)
    return (rows if index is None else rows[index]).unsqueeze(0)


_matmul_forms = (torch.matmul, torch.mm, Tensor.matmul, Tensor.mm, Tensor.__matmul__)

KIND = Kind(
    name=NAME,
    recognizers={
        F.linear: recognize_linear,
        torch.addmm: recognize_addmm,
        **dict.fromkeys(_matmul_forms, recognize_matmul),
    },
    model=LinearModel,
    supported=(
        SupportedUse(
            "`F.linear`, `torch.addmm(b, x, W)`, `x @ W`",
            "`nn.Linear`, MHA q/k/v and output projections (packed or split), GPT-2 `Conv1D`, "
            "tied heads",
            "`A ⊗ G`, exact damped inverse; inputs `(N, ..., d)` are weight sharing over positions",
        ),
    ),
    composites={F.multi_head_attention_forward: _without_dispatch(F.multi_head_attention_forward)},
)
