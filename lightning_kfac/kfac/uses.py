"""Use models: what one *use* of a parameter contributes to K-FAC, per kind.

A use is one call site of a parameter (``UseSpec``): ``F.linear`` inside ``encoder.0.linear1``,
the packed input projection inside a ``MultiheadAttention``, the tied embedding matrix looked up by
``wte`` or multiplied by ``lm_head``... Calls of the same site in one forward (a loop, an unrolled
RNN, a module applied twice) are weight-sharing positions of the same use.

Every model converts to the shared layout of ``linalg`` (docs/design.md §2):

- input rows ``a`` ``[B, M, d_in]`` and output-gradient rows ``g`` ``[B, M, d_out]`` (Kronecker
  kinds), or per-sample unit-wise gradients ``u`` ``[N, C, k]`` (norms);
- the gradient of the use as a matrix ``dW`` ``[B, d_g, d_a]`` (bias as the last column), and back.

============  ================================  =============================================
kind          ``A`` (input side)                ``G`` (output side)
============  ================================  =============================================
linear        ``[x; 1]`` rows, dense or diag    output-gradient rows, dense or diag
conv          KFC patches (+1), one per group   output-gradient rows per location, per group
embedding     one-hot ids: diag(token counts)   output-gradient rows, dense or diag
norm          —                                 unit-wise ``(γ, β)`` Fisher, ``[C, k, k]``
============  ================================  =============================================
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any

import torch
from torch import Tensor

from lightning_kfac.kfac import linalg
from lightning_kfac.kfac.convolution import (
    ConvGeometry,
    patch_covariance_sum,
    patch_rows,
    patch_sums_per_sample,
)
from lightning_kfac.kfac.tracing import ParameterView, RecognizedCall, UseKind


@dataclasses.dataclass(frozen=True)
class UseSpec:
    """The identity of a use, the same on every rank (it travels between ranks, so it is
    picklable and holds only names and numbers).

    Attributes:
        kind: The curvature model.
        site: Qualified name of the module whose forward makes the call (``""``: the root).
        weight: The weight parameter (view) or None (a norm with only ``β`` trained).
        bias: The bias parameter (view) passed with it, or None.
        transposed_form: The call multiplies by the transposed weight (``addmm``, ``x @ W``).
        detail: Kind-specific: conv ``(dims, stride, padding, dilation, groups)``, embedding
            ``(padding_idx,)``, norm ``(type, ...)``.
    """

    kind: UseKind
    site: str
    weight: ParameterView | None
    bias: ParameterView | None
    transposed_form: bool = False
    detail: tuple[Any, ...] = ()

    @property
    def parts(self) -> tuple[ParameterView, ...]:
        return tuple(v for v in (self.weight, self.bias) if v is not None)

    def label(self) -> str:
        where = f"in {self.site!r}" if self.site else "in the root module"
        return f"{self.kind} {where}"

    def to_state(self) -> dict[str, Any]:
        """Plain data (str, int, bool, tuples) for checkpoints loadable with ``weights_only``."""

        def view(v: ParameterView | None) -> tuple[Any, ...] | None:
            return None if v is None else (v.name, v.rows, v.transposed)

        return {
            "kind": str(self.kind),
            "site": self.site,
            "weight": view(self.weight),
            "bias": view(self.bias),
            "transposed_form": self.transposed_form,
            "detail": self.detail,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> UseSpec:
        def view(v: Any) -> ParameterView | None:
            if v is None:
                return None
            name, rows, transposed = v
            return ParameterView(name, None if rows is None else tuple(rows), bool(transposed))

        return cls(
            UseKind(state["kind"]),
            state["site"],
            view(state["weight"]),
            view(state["bias"]),
            bool(state["transposed_form"]),
            _freeze(state["detail"]),
        )


def _freeze(value: Any) -> Any:
    """Lists (from a serialiser) back to the tuples a spec holds."""
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def spec_from_call(
    call: RecognizedCall, site: str, weight: ParameterView | None, bias: ParameterView | None
) -> UseSpec:
    return UseSpec(call.kind, site, weight, bias, call.transposed_form, call.detail)


class UseModel(abc.ABC):
    """Shapes and conversions of one use; no state besides them."""

    def __init__(self, spec: UseSpec, shapes: dict[str, tuple[int, ...]], max_dim: int) -> None:
        self.spec = spec
        self.shapes = shapes  # parameter name -> parameter shape
        self.max_dim = max_dim

    # -- factor sides ------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def factor_sides(self) -> list[tuple[int, int, bool]]:
        """``(dim, blocks, diagonal)`` of each factor: ``[A, G]``, or ``[F]`` for a norm."""

    @property
    def is_unit_wise(self) -> bool:
        return len(self.factor_sides) == 1

    # -- gradient matrix -----------------------------------------------------------------------
    def view_shape(self, part: ParameterView) -> tuple[int, ...]:
        """Shape of the tensor the call received for ``part`` (row slice / transpose)."""
        shape = list(self.shapes[part.name])
        if part.rows is not None:
            shape[0] = part.rows[1] - part.rows[0]
        if part.transposed:
            shape = shape[::-1]
        return tuple(shape)

    @abc.abstractmethod
    def to_matrix(self, weight_grad: Tensor | None, bias_grad: Tensor | None) -> Tensor:
        """Gradients of the passed tensors -> ``dW`` ``[B, d_g, d_a]``."""

    @abc.abstractmethod
    def from_matrix(self, matrix: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """``[B, d_g, d_a]`` -> gradients shaped as the passed weight and bias."""


class KroneckerModel(UseModel):
    """A use whose curvature is ``A ⊗ G`` (linear, conv, embedding)."""

    @property
    @abc.abstractmethod
    def in_features(self) -> int:
        """``d_in`` per block, without the bias."""

    @property
    @abc.abstractmethod
    def out_features(self) -> int:
        """``d_out`` per block."""

    @property
    def blocks(self) -> int:
        return 1

    @property
    def has_bias(self) -> bool:
        return self.spec.bias is not None

    @property
    def a_diagonal(self) -> bool:
        return self.in_features + int(self.has_bias) > self.max_dim

    @property
    def g_diagonal(self) -> bool:
        return self.out_features > self.max_dim

    @property
    def factor_sides(self) -> list[tuple[int, int, bool]]:
        return [
            (self.in_features + int(self.has_bias), self.blocks, self.a_diagonal),
            (self.out_features, self.blocks, self.g_diagonal),
        ]

    # -- capture -----------------------------------------------------------------------------
    @abc.abstractmethod
    def row_count(self, layer_input: Tensor) -> int:
        """``N·T``: the number of rows of this call."""

    @abc.abstractmethod
    def a_rows(self, layer_input: Tensor, index: Tensor | None) -> Tensor:
        """Input -> ``[B, M, d_in]`` (only rows ``index`` when given)."""

    @abc.abstractmethod
    def g_rows(self, output_gradient: Tensor, index: Tensor | None) -> Tensor:
        """Output gradient -> ``[B, M, d_out]`` (only rows ``index`` when given)."""

    def a_statistic(self, layer_input: Tensor, index: Tensor | None) -> Tensor:
        """``Σ a a^T`` (or its diagonal) over the call's rows, bias included."""
        rows = self.a_rows(layer_input, index)
        return linalg.factor_sum(rows, diagonal=self.a_diagonal, append_ones=self.has_bias)

    def g_statistic(self, output_gradient: Tensor, index: Tensor | None) -> Tensor:
        rows = self.g_rows(output_gradient, index)
        return linalg.factor_sum(rows, diagonal=self.g_diagonal, append_ones=False)

    # -- K-FAC-reduce: per-sample sums over positions ---------------------------------------
    def supports_reduce(self) -> bool:
        return True

    @abc.abstractmethod
    def a_sample_sums(
        self, layer_input: Tensor, batch_dim: int, batch_size: int | None = None
    ) -> tuple[Tensor, int]:
        """``(Σ_t a_{n,t}`` ``[B, N, d_in]``, ``T)``."""

    @abc.abstractmethod
    def g_sample_sums(
        self, output_gradient: Tensor, batch_dim: int, batch_size: int | None = None
    ) -> Tensor:
        """``Σ_t g_{n,t}`` ``[B, N, d_out]``."""

    def _with_bias(self, matrix: Tensor, bias_grad: Tensor | None) -> Tensor:
        if not self.has_bias:
            return matrix
        if bias_grad is None:
            bias_grad = matrix.new_zeros(self.blocks * self.out_features)
        column = bias_grad.reshape(self.blocks, self.out_features, 1).to(matrix.dtype)
        return torch.cat([matrix, column], dim=-1)

    def _split_bias(self, matrix: Tensor) -> tuple[Tensor, Tensor | None]:
        if not self.has_bias:
            return matrix, None
        return matrix[..., : self.in_features], matrix[..., self.in_features].reshape(-1)


def _move_batch_first(tensor: Tensor, batch_dim: int) -> Tensor:
    return tensor if batch_dim == 0 else tensor.movedim(batch_dim, 0)


class LinearModel(KroneckerModel):
    """``s = L x + b`` applied to inputs ``(..., d_in)``: positions are the leading dims.

    ``L`` is the passed weight (``F.linear``) or its transpose (``addmm``, ``x @ W``).
    """

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

    @staticmethod
    def _rows(tensor: Tensor, features: int, index: Tensor | None) -> Tensor:
        rows = tensor.reshape(-1, features)
        return (rows if index is None else rows[index]).unsqueeze(0)

    def a_rows(self, layer_input: Tensor, index: Tensor | None) -> Tensor:
        return self._rows(layer_input, self.in_features, index)

    def g_rows(self, output_gradient: Tensor, index: Tensor | None) -> Tensor:
        return self._rows(output_gradient, self.out_features, index)

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
        rows = _move_batch_first(tensor, batch_dim)
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

    def g_rows(self, output_gradient: Tensor, index: Tensor | None) -> Tensor:
        grads = self._batched(output_gradient)
        batch = grads.shape[0]
        grads = grads.reshape(batch, self.blocks, self.out_features, -1)  # [N, B, d_out, T]
        rows = grads.permute(1, 0, 3, 2).reshape(self.blocks, -1, self.out_features)
        return rows if index is None else rows[:, index]

    def g_statistic(self, output_gradient: Tensor, index: Tensor | None) -> Tensor:
        """``Σ_{n,t} g g^T`` as ``X Xᵀ`` with ``X = [d_out, N·T]``: gathering ``X`` copies whole
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


class EmbeddingModel(KroneckerModel):
    """``F.embedding(ids, W)`` with ``W`` ``[V, E]``: ``s = Wᵀ onehot(id)``, so ``L = Wᵀ``,
    ``A = diag(token counts) / (N·T)`` exactly (one-hot rows are orthogonal) — kept as a vector
    whatever ``max_factor_dim`` — and ``G`` from the output gradients."""

    @property
    def _shape(self) -> tuple[int, ...]:
        assert self.spec.weight is not None
        return self.shapes[self.spec.weight.name]

    @property
    def in_features(self) -> int:
        return self._shape[0]

    @property
    def out_features(self) -> int:
        return self._shape[1]

    @property
    def a_diagonal(self) -> bool:
        return True

    def supports_reduce(self) -> bool:
        return False  # a reduced one-hot is dense: always the exact diagonal expand factor

    def row_count(self, layer_input: Tensor) -> int:
        return layer_input.numel()

    def a_rows(self, layer_input: Tensor, index: Tensor | None) -> Tensor:  # pragma: no cover
        raise NotImplementedError("embedding inputs are counted, not materialised")

    def a_statistic(self, layer_input: Tensor, index: Tensor | None) -> Tensor:
        ids = layer_input.reshape(-1)
        if index is not None:
            ids = ids[index]
        # index_add_ has a fixed output size (bincount reads the maximum id back: a host sync).
        ones = torch.ones(ids.shape[0], dtype=torch.float64, device=ids.device)
        counts = torch.zeros(self.in_features, dtype=torch.float64, device=ids.device)
        counts.index_add_(0, ids, ones)
        padding_idx = self.spec.detail[0] if self.spec.detail else None
        if padding_idx is not None:
            # F.embedding blocks the padding row's gradient: its positions act as inputs x = 0
            # (they still count in N·T), so that dW = (1/N) Σ g aᵀ holds with this A.
            counts[padding_idx] = 0.0
        return counts.unsqueeze(0)

    def g_rows(self, output_gradient: Tensor, index: Tensor | None) -> Tensor:
        return LinearModel._rows(output_gradient, self.out_features, index)

    def a_sample_sums(
        self, layer_input: Tensor, batch_dim: int, batch_size: int | None = None
    ) -> tuple[Tensor, int]:
        raise NotImplementedError  # pragma: no cover

    def g_sample_sums(
        self, output_gradient: Tensor, batch_dim: int, batch_size: int | None = None
    ) -> Tensor:
        raise NotImplementedError  # pragma: no cover

    def to_matrix(self, weight_grad: Tensor | None, bias_grad: Tensor | None) -> Tensor:
        assert weight_grad is not None
        return weight_grad.mT.unsqueeze(0)

    def from_matrix(self, matrix: Tensor) -> tuple[Tensor | None, Tensor | None]:
        return matrix[0].mT, None


class NormModel(UseModel):
    """Unit-wise natural gradient of a normalisation layer's affine parameters (Osawa et al. 2019,
    SP-NGD §3.3): for channel ``c`` the per-sample gradient ``u_{n,c} = (Σ_p g x̂, Σ_p g)`` of
    ``(γ_c, β_c)`` — sums over the positions ``p`` sample ``n``'s ``γ_c`` touches — gives a
    ``k×k`` Fisher block ``F_c = (1/N) Σ_n u_{n,c} u_{n,c}ᵀ`` (``k`` = trained parameters among
    ``γ, β``), and the step is ``(F_c + λ I)^-1 dθ_c``.

    ``x̂`` is the normalised input (batch statistics for ``BatchNorm`` in training, running
    statistics in eval mode, per-sample statistics for ``LayerNorm``/``GroupNorm``/``RMSNorm``),
    recomputed at backward time from the saved input. For ``BatchNorm`` in training the batch
    statistics couple the samples; like SP-NGD, the per-sample gradient treats ``x̂`` as given.
    """

    @property
    def channels(self) -> int:
        part = self.spec.weight or self.spec.bias
        assert part is not None
        return math.prod(self.view_shape(part))

    @property
    def k(self) -> int:
        return len(self.spec.parts)

    @property
    def factor_sides(self) -> list[tuple[int, int, bool]]:
        return [(self.k, self.channels, False)]

    @property
    def norm_type(self) -> str:
        return str(self.spec.detail[0])

    def channel_first(self) -> bool:
        """BatchNorm and GroupNorm act on ``(N, C, *)``; LayerNorm/RMSNorm on the last dims."""
        return self.norm_type in ("batch", "group")

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
            xs = _move_batch_first(x_hat, batch_dim) if x_hat.dim() > 1 else x_hat.unsqueeze(0)
            gs = (
                _move_batch_first(output_gradient, batch_dim)
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

    def to_matrix(self, weight_grad: Tensor | None, bias_grad: Tensor | None) -> Tensor:
        columns = [g.reshape(-1) for g in (weight_grad, bias_grad) if g is not None]
        return torch.stack(columns, dim=-1).unsqueeze(-1)  # [C, k, 1]

    def from_matrix(self, matrix: Tensor) -> tuple[Tensor | None, Tensor | None]:
        columns = matrix[..., 0]  # [C, k]
        index = 0
        weight = bias = None
        if self.spec.weight is not None:
            weight = columns[:, index].reshape(self.view_shape(self.spec.weight))
            index += 1
        if self.spec.bias is not None:
            bias = columns[:, index].reshape(self.view_shape(self.spec.bias))
        return weight, bias


MODELS: dict[UseKind, type[UseModel]] = {
    UseKind.LINEAR: LinearModel,
    UseKind.CONV: ConvModel,
    UseKind.EMBEDDING: EmbeddingModel,
    UseKind.NORM: NormModel,
}


def make_model(spec: UseSpec, shapes: dict[str, tuple[int, ...]], max_dim: int) -> UseModel:
    return MODELS[spec.kind](spec, shapes, max_dim)
