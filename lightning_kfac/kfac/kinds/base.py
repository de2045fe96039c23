"""What every kind of use provides: a ``Kind`` entry and a ``UseModel``.

A *kind* (one module of ``kinds/``) holds three things:

- its **recognisers**: torch functions it models, mapped to functions that bind a call's
  arguments into a ``RecognizedCall`` (``calls``);
- its **curvature model**, a ``UseModel`` subclass: the factor sides of a use, the conversion of
  the use's gradient to the matrix ``dW`` ``[B, d_g, d_a]`` that the factors precondition (bias as
  the last column) and back, and its **capture rule** — how a call's input and output gradient
  become rows of the shared layout of ``linalg`` (docs/design.md §2):

  - Kronecker kinds (``KroneckerModel``): input rows ``a`` ``[B, M, d_in]`` and output-gradient
    rows ``g`` ``[B, M, d_out]``, or their per-sample sums over positions for K-FAC-reduce;
  - unit-wise kinds (``UnitWiseModel``): per-sample gradients ``u`` ``[N, C, k]`` of ``C``
    independent ``k``-parameter units;

  the accumulation of those rows into factor sums is shared (``accumulation``), never written
  per kind;
- its rows of the **supported-uses table** (``SupportedUse``), from which the README's and
  ``docs/design.md``'s tables are checked (``kinds.supported_uses_markdown``).
"""

from __future__ import annotations

import abc
import dataclasses
import enum
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from lightning_kfac.kfac import linalg
from lightning_kfac.kfac.calls import ParameterView, RecognizedCall, Recognizer
from lightning_kfac.kfac.options import KFACApproximation
from lightning_kfac.kfac.uses import UseSpec


@dataclasses.dataclass(frozen=True)
class SupportedUse:
    """One row of the supported-uses table (README, docs/design.md)."""

    calls: str
    examples: str
    curvature: str


@dataclasses.dataclass(frozen=True)
class Kind:
    """A kind of use: its name, recognisers, curvature model and documentation rows.

    Attributes:
        name: The kind's name (``UseSpec.kind``, the coverage table's ``uses`` column).
        recognizers: Torch function -> recogniser of its calls.
        model: The ``UseModel`` subclass of its uses; None for a kind that only runs composite
            functions whose calls other kinds model (``kinds/recurrent.py``).
        supported: Its rows of the supported-uses table.
        composites: Composite torch functions whose body makes calls of this kind, run with the
            tracing mode re-entered so that those calls are seen
            (``F.multi_head_attention_forward``).
    """

    name: str
    recognizers: Mapping[Any, Recognizer]
    model: type[UseModel] | None
    supported: tuple[SupportedUse, ...]
    composites: Mapping[Any, Callable[..., Any]] = dataclasses.field(default_factory=dict)


def move_batch_first(tensor: Tensor, batch_dim: int) -> Tensor:
    return tensor if batch_dim == 0 else tensor.movedim(batch_dim, 0)


class SampleLayout(enum.Enum):
    """How a call's input relates to the micro-batch's samples."""

    #: Its samples' dimension holds the batch (or it is rows the kind reads per sample).
    SAMPLES = "samples"
    #: Size 1 along the samples' dimension: shared by the samples and broadcast against them.
    BROADCAST = "broadcast"


class FactorSide(NamedTuple):
    """Shape of one factor: ``blocks`` square blocks of side ``dim``, dense or diagonal;
    ``per_block_count``: each block has its own normaliser (an expert's routed rows), so a block
    that saw no rows keeps its running average while the others move."""

    dim: int
    blocks: int
    diagonal: bool
    per_block_count: bool = False


class SampleCall(NamedTuple):
    """A call's per-sample contribution (per-sample capture rule).

    ``g_samples`` holds the call's samples along the model's ``sample_axis``; ``a_sums`` (Kronecker
    kinds under K-FAC-reduce) the per-sample sums of its input rows over ``positions`` positions.
    """

    a_sums: Tensor | None
    positions: int
    g_samples: Tensor


class UseModel(abc.ABC):
    """Shapes, conversions and capture rule of one use; no state besides them.

    Args:
        spec: The use.
        shapes: Parameter name -> parameter shape.
        max_dim: A factor side above this is kept diagonal (``max_factor_dim``).
    """

    #: How the coverage table names the treatment of a preconditioned use.
    treatment: ClassVar[str] = "Kronecker"

    def __init__(self, spec: UseSpec, shapes: dict[str, tuple[int, ...]], max_dim: int) -> None:
        self.spec = spec
        self.shapes = shapes
        self.max_dim = max_dim

    # -- what the kind accepts ----------------------------------------------------------------
    @classmethod
    def use_of(
        cls,
        call: RecognizedCall,
        site: str,
        weight: ParameterView | None,
        bias: ParameterView | None,
    ) -> UseSpec:
        """The use a call (with its resolved weight and bias views) belongs to."""
        return UseSpec.of_call(call, site, weight, bias)

    @classmethod
    def problem(
        cls, call: RecognizedCall, weight: ParameterView | None, bias: ParameterView | None
    ) -> str | None:
        """Why this call (with its resolved weight and bias views) cannot be modelled, or None.

        The default: a trained weight passed as it is (not a slice or transpose of a parameter).
        """
        if weight is None:
            return "bias of a weight K-FAC does not train (frozen or skipped)"
        for view in (weight, bias):
            if view is not None and view.is_part:
                return f"{call.kind} with a slice of the parameter"
        return None

    # -- factor sides -------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def factor_sides(self) -> list[FactorSide]:
        """The factors: ``[A, G]`` for a Kronecker use, ``[F]`` for a unit-wise one."""

    def report_notes(self) -> list[str]:
        """Notes for the coverage table (e.g. a factor side kept diagonal)."""
        return []

    def sample_layout(self, layer_input: Tensor, batch_dim: int, batch_size: int) -> Any:
        """``SampleLayout`` of a call's input, or why its gradient cannot be per sample (a
        ``str``: the use is then left to the optimizer and named). Default: per sample."""
        return SampleLayout.SAMPLES

    def row_mask(self, layer_input: Tensor, batch_dim: int, positions: Tensor) -> Tensor | None:
        """Expand rule: which of the call's rows are real positions (``[rows]`` bool, in the
        order of ``a_rows``) under the ``[N, T]`` padding mask ``positions``; None when the call
        is not laid out over those positions (the default: every row counts)."""
        return None

    def gradient_mask(
        self, layer_input: Tensor, batch_dim: int, positions: Tensor
    ) -> Tensor | None:
        """Per-sample rule: a mask broadcastable to the call's output gradient that zeroes the
        padding positions (None: not laid out over the mask's positions)."""
        return None

    def per_sample(self, approximation: KFACApproximation) -> bool:
        """Whether the capture forms per-sample sums first (``SampleCall``) rather than summing
        rows of all positions directly (``KroneckerModel``'s expand rule)."""
        return True

    # -- gradient matrix -----------------------------------------------------------------------
    def view_shape(self, part: ParameterView) -> tuple[int, ...]:
        """Shape of the tensor the call received for ``part`` (row slice, selected matrix,
        transpose of the last two dimensions)."""
        shape = list(self.shapes[part.name])
        if part.rows is not None:
            shape[0] = part.rows[1] - part.rows[0]
        if part.selected:
            shape = shape[1:]
        if part.transposed:
            shape[-2:] = shape[-1], shape[-2]
        return tuple(shape)

    @abc.abstractmethod
    def to_matrix(self, weight_grad: Tensor | None, bias_grad: Tensor | None) -> Tensor:
        """Gradients of the passed tensors -> ``dW`` ``[B, d_g, d_a]`` (a missing gradient of a
        part the use trains counts as zeros)."""

    @abc.abstractmethod
    def from_matrix(self, matrix: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """``[B, d_g, d_a]`` -> gradients shaped as the passed weight and bias."""

    # -- per-sample capture rule ----------------------------------------------------------------
    #: Axis of ``SampleCall.g_samples`` that indexes samples.
    sample_axis: ClassVar[int] = 1

    def begin_samples(
        self,
        layer_input: Tensor,
        call: RecognizedCall,
        batch_dim: int,
        batch_size: int,
        dtype: torch.dtype,
    ) -> Any:
        """Forward half of a call under the per-sample rule: what ``end_samples`` needs
        (``dtype``: the factors')."""
        raise NotImplementedError(f"{type(self).__name__} has no per-sample capture")

    def end_samples(
        self, begun: Any, output_gradient: Tensor, batch_dim: int, batch_size: int
    ) -> SampleCall:
        """Backward half: the call's per-sample contribution (not yet scaled by ``N / s``)."""
        raise NotImplementedError(f"{type(self).__name__} has no per-sample capture")

    def sample_factor_sums(self, a_means: Tensor | None, g_samples: Tensor) -> list[Tensor]:
        """Each factor's sum of outer products over the samples of one forward."""
        raise NotImplementedError(f"{type(self).__name__} has no per-sample capture")


class KroneckerModel(UseModel):
    """A use whose curvature is ``A ⊗ G`` (linear, conv, embedding).

    Expand rule (the default): ``A += Σ_{n,t} a aᵀ`` over the call's ``N·T`` rows, ``G += Σ_{n,t}
    g gᵀ``; reduce rule (``approximation="reduce"``, where ``supports_reduce``): per-sample sums
    over positions first.
    """

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
    def factor_sides(self) -> list[FactorSide]:
        return [
            FactorSide(self.in_features + int(self.has_bias), self.blocks, self.a_diagonal),
            FactorSide(self.out_features, self.blocks, self.g_diagonal),
        ]

    def report_notes(self) -> list[str]:
        sides = [s for s, d in (("A", self.a_diagonal), ("G", self.g_diagonal)) if d]
        return [f"{' and '.join(sides)} diagonal (side > max_factor_dim)"] if sides else []

    def supports_reduce(self) -> bool:
        return True

    def per_sample(self, approximation: KFACApproximation) -> bool:
        return approximation == KFACApproximation.REDUCE and self.supports_reduce()

    # -- expand rule ---------------------------------------------------------------------------
    @abc.abstractmethod
    def row_count(self, layer_input: Tensor) -> int:
        """``N·T``: the number of rows of this call."""

    def g_row_count(self, output_gradient: Tensor) -> int:
        """Number of output-gradient rows of a call (``N·T``)."""
        return output_gradient.numel() // (self.blocks * self.out_features)

    @abc.abstractmethod
    def a_rows(self, layer_input: Tensor, index: Tensor | None) -> Tensor:
        """Input -> ``[B, M, d_in]`` (only rows ``index`` when given)."""

    @abc.abstractmethod
    def g_rows(self, output_gradient: Tensor, index: Tensor | None) -> Tensor:
        """Output gradient -> ``[B, M, d_out]`` (only rows ``index`` when given)."""

    def a_statistic(self, layer_input: Tensor, index: Tensor | None) -> Tensor:
        """``Σ a aᵀ`` (or its diagonal) over the call's rows, bias included."""
        rows = self.a_rows(layer_input, index)
        return linalg.factor_sum(rows, diagonal=self.a_diagonal, append_ones=self.has_bias)

    def g_statistic(self, output_gradient: Tensor, index: Tensor | None) -> Tensor:
        rows = self.g_rows(output_gradient, index)
        return linalg.factor_sum(rows, diagonal=self.g_diagonal, append_ones=False)

    def a_count(self, rows: int, routing: Any, device: torch.device) -> float | Tensor:
        """``A``'s normaliser for a call of ``rows`` rows (per block, on ``device``, for a
        per-block count)."""
        return float(rows)

    def a_statistic_of_calls(
        self,
        inputs: Sequence[Tensor],
        index: Tensor | None,
        routes: Sequence[Any],
        masks: Sequence[Tensor | None] = (),
    ) -> Tensor:
        """``Σ a aᵀ`` over the rows of several calls of the use (rows ``index`` of their
        concatenation, in call order); ``routes``: each call's ``RecognizedCall.routing``;
        ``masks``: each call's real rows (``row_mask``; None: all)."""
        if len(inputs) == 1 and not any(m is not None for m in masks):
            return self.a_statistic(inputs[0], index)
        parts = [self.a_rows(x, None) for x in inputs]
        rows = torch.cat(parts, dim=1)
        mask = joined_masks(masks, [p.shape[1] for p in parts])
        rows = rows if index is None else rows[:, index]
        if mask is not None and index is not None:
            mask = mask[index]
        return linalg.factor_sum(
            rows, diagonal=self.a_diagonal, append_ones=self.has_bias, mask=mask
        )

    def g_statistic_of_calls(
        self,
        gradients: Sequence[Tensor],
        scales: Sequence[float | Tensor],
        index: Tensor | None,
        routes: Sequence[Any],
        masks: Sequence[Tensor | None] = (),
    ) -> Tensor:
        """``Σ g gᵀ`` with ``g = scale · gradient`` over the (real) rows of several calls (one
        call without a mask: its statistic, scaled by ``scale²``)."""
        if len(gradients) == 1 and not any(m is not None for m in masks):
            return self.g_statistic(gradients[0], index) * scales[0] ** 2
        scaled = [g * scale for g, scale in zip(gradients, scales, strict=True)]
        parts = [self.g_rows(g, None) for g in scaled]
        rows = torch.cat(parts, dim=1)
        mask = joined_masks(masks, [p.shape[1] for p in parts])
        rows = rows if index is None else rows[:, index]
        if mask is not None and index is not None:
            mask = mask[index]
        return linalg.factor_sum(rows, diagonal=self.g_diagonal, append_ones=False, mask=mask)

    # -- reduce rule: per-sample sums over positions -------------------------------------------
    def a_sample_sums(
        self, layer_input: Tensor, batch_dim: int, batch_size: int | None = None
    ) -> tuple[Tensor, int]:
        """``(Σ_t a_{n,t}`` ``[B, N, d_in]``, ``T)``."""
        raise NotImplementedError(f"{type(self).__name__} does not support reduce")

    def g_sample_sums(
        self, output_gradient: Tensor, batch_dim: int, batch_size: int | None = None
    ) -> Tensor:
        """``Σ_t g_{n,t}`` ``[B, N, d_out]``."""
        raise NotImplementedError(f"{type(self).__name__} does not support reduce")

    def begin_samples(
        self,
        layer_input: Tensor,
        call: RecognizedCall,
        batch_dim: int,
        batch_size: int,
        dtype: torch.dtype,
    ) -> tuple[Tensor, int]:
        return self.a_sample_sums(layer_input.to(dtype), batch_dim, batch_size)

    def end_samples(
        self, begun: tuple[Tensor, int], output_gradient: Tensor, batch_dim: int, batch_size: int
    ) -> SampleCall:
        a_sums, positions = begun
        return SampleCall(
            a_sums, positions, self.g_sample_sums(output_gradient, batch_dim, batch_size)
        )

    def sample_factor_sums(self, a_means: Tensor | None, g_samples: Tensor) -> list[Tensor]:
        assert a_means is not None
        return [
            linalg.factor_sum(a_means, diagonal=self.a_diagonal, append_ones=self.has_bias),
            linalg.factor_sum(g_samples, diagonal=self.g_diagonal, append_ones=False),
        ]

    # -- gradient matrix helpers ---------------------------------------------------------------
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


def joined_masks(masks: Sequence[Tensor | None], rows: Sequence[int]) -> Tensor | None:
    """The calls' row masks end to end (a call without one keeps all its rows); None if none."""
    if not any(m is not None for m in masks):
        return None
    parts = [
        m.reshape(-1) if m is not None else torch.ones(count, dtype=torch.bool)
        for m, count in zip(masks, rows, strict=True)
    ]
    device = next(m for m in masks if m is not None).device
    return torch.cat([p.to(device) for p in parts])


class UnitWiseModel(UseModel):
    """A use whose curvature is ``C`` independent ``k×k`` blocks, one per unit (channel), from
    per-sample gradients ``u_{n,c}`` of the unit's ``k`` parameters: ``F_c = (1/N) Σ_n u uᵀ``
    (Osawa et al. 2019, SP-NGD, §3.3), preconditioned by ``(F_c + λ I)⁻¹``."""

    treatment: ClassVar[str] = "unit-wise"
    sample_axis: ClassVar[int] = 0  # u: [N, C, k]

    @property
    @abc.abstractmethod
    def channels(self) -> int:
        """``C``, the number of units."""

    @property
    def k(self) -> int:
        return len(self.spec.parts)

    @property
    def factor_sides(self) -> list[FactorSide]:
        return [FactorSide(self.k, self.channels, False)]

    def sample_factor_sums(self, a_means: Tensor | None, g_samples: Tensor) -> list[Tensor]:
        u = g_samples.transpose(0, 1)  # [C, N, k]
        return [u.mT @ u]

    def to_matrix(self, weight_grad: Tensor | None, bias_grad: Tensor | None) -> Tensor:
        if self.spec.bias is not None and bias_grad is None and weight_grad is not None:
            bias_grad = torch.zeros_like(weight_grad)  # β unused this step: a zero gradient
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
