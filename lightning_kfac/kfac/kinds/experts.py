"""Mixture-of-experts uses: a stacked weight ``W`` ``[E, ·, ·]`` of ``E`` experts.

Three ways models call it (transformers 5's ``experts_implementation`` values among them):

=============================================  ==============================================
call                                           rows of expert ``e``
=============================================  ==============================================
``F.linear(x, W[e])`` (``"eager"``)            every row of ``x``
``F.grouped_mm(x, W or W.mT, offs=offs)``,     rows ``offs[e-1]:offs[e]`` of ``x`` (sorted by
``torch._grouped_mm`` (``"grouped_mm"``)       expert)
``torch.bmm(x, W or W.mT)``, ``x`` ``[E, C, ·]``  ``x[e]``
=============================================  ==============================================

Every form is one use of the whole parameter with one Kronecker block per expert (the factors'
``blocks`` are the experts): ``A_e = (1/R_e) Σ_{rows r → e} a_r a_rᵀ`` over the ``R_e`` rows routed
to ``e`` — a per-expert normaliser, so an expert no rank routed to keeps its ``A`` — and
``G_e = (1/N) Σ_{rows r → e} g_r g_rᵀ`` with ``N`` the forward's samples (rows not routed to
``e`` contribute zero per-sample gradient to it): additive over ranks and micro-batches, and,
wherever an expert is routed rows, exactly an ``nn.Linear`` applied to its routed rows
(docs/design.md, "Mixture-of-experts"). The router and shared experts are ordinary linear uses.

Not modelled (named in the coverage report): gathered per-row weights (``W[expert_ids]``, the
``"batched_mm"`` implementation: a copy of the weight per token), ``bmm`` with the weight first,
expert biases added after the matmul. K-FAC-reduce does not apply (rows of one sample reach
different experts): expert uses always use expand. Splitting the rows of a grouped call by expert
reads its offsets on the host (one synchronisation per call, on capture steps only).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_kfac.kfac import linalg
from lightning_kfac.kfac.calls import ParameterView, RecognizedCall, argument, slot
from lightning_kfac.kfac.kinds.base import FactorSide, Kind, KroneckerModel, SupportedUse
from lightning_kfac.kfac.uses import UseSpec

NAME = "experts"


def _stacked_base(weight: Any) -> Tensor | None:
    """The ``[E, ·, ·]`` tensor ``weight`` selects one matrix of, or None."""
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        return None
    base = weight._base
    return base if base is not None and base.dim() == 3 else None


def recognize_linear(func: Any, args: list[Any], kwargs: dict[str, Any]) -> RecognizedCall | None:
    """``F.linear(x, W[e], b)``: claimed when the weight is one matrix of a stacked tensor."""
    weight = argument(args, kwargs, 1, "weight", None)
    base = _stacked_base(weight)
    if base is None:
        return None
    assert isinstance(weight, Tensor)
    expert = (weight.storage_offset() - base.storage_offset()) // max(base.stride(0), 1)
    call = RecognizedCall(
        NAME, func, args, kwargs, argument(args, kwargs, 0, "input", None), weight,
        argument(args, kwargs, 2, "bias", None),
        slot(args, kwargs, 1, "weight"), slot(args, kwargs, 2, "bias"), routing=int(expert),
    )  # fmt: skip
    if call.bias is not None:
        call.unsupported = "an expert's F.linear with a bias (expert biases are not modelled)"
    return call


def _is_parameter_like(tensor: Any) -> bool:
    """A parameter or a view of one (experts' weights are leaves that require grad)."""
    if not isinstance(tensor, Tensor) or tensor.dim() != 3:
        return False
    leaf = tensor._base if tensor._base is not None else tensor
    return leaf.is_leaf and leaf.requires_grad


def recognize_grouped_mm(
    func: Any, args: list[Any], kwargs: dict[str, Any]
) -> RecognizedCall | None:
    """``grouped_mm(x [S, d_in], W [E, d_in, d_out], offs=[E])`` (or ``x`` ``[E, C, d_in]``)."""
    x, weight = argument(args, kwargs, 0, "mat_a", None), argument(args, kwargs, 1, "mat_b", None)
    if not _is_parameter_like(weight):
        return None
    offs = kwargs.get("offs")
    call = RecognizedCall(
        NAME, func, args, kwargs, x, weight, None, slot(args, kwargs, 1, "mat_b"), None,
        transposed_form=True, routing=offs if offs is not None else "batched",
    )  # fmt: skip
    if kwargs.get("bias") is not None:
        call.unsupported = "grouped_mm with a bias (expert biases are not modelled)"
    elif offs is None and (not isinstance(x, Tensor) or x.dim() != 3):
        call.unsupported = "grouped_mm without offsets on a 2-D input"
    return call


def recognize_bmm(func: Any, args: list[Any], kwargs: dict[str, Any]) -> RecognizedCall | None:
    """``torch.bmm(x [E, C, d_in], W [E, d_in, d_out])``: batch entry ``e`` is expert ``e``."""
    x, weight = argument(args, kwargs, 0, "input", None), argument(args, kwargs, 1, "mat2", None)
    if _is_parameter_like(x) and not _is_parameter_like(weight):
        call = RecognizedCall(NAME, func, args, kwargs, weight, x, None, 0, None)
        call.unsupported = "bmm with the experts' weight first"
        return call
    if not _is_parameter_like(weight):
        return None
    return RecognizedCall(
        NAME, func, args, kwargs, x, weight, None, slot(args, kwargs, 1, "mat2"), None,
        transposed_form=True, routing="batched",
    )  # fmt: skip


class ExpertsModel(KroneckerModel):
    """``s = L_e x`` for the rows routed to expert ``e``, ``L_e`` one matrix of the stack: a
    Kronecker block per expert, ``A`` counted per expert."""

    @classmethod
    def use_of(
        cls,
        call: RecognizedCall,
        site: str,
        weight: ParameterView | None,
        bias: ParameterView | None,
    ) -> UseSpec:
        """One use of the whole stack, however the call selects its experts."""
        assert weight is not None
        whole = ParameterView(weight.name, transposed=weight.transposed)
        # F.linear(x, W[e]) multiplies by W[e]ᵀ as x @ W[e]ᵀ: the form of an untransposed matmul
        transposed_form = call.transposed_form
        return UseSpec(NAME, site, whole, None, transposed_form, ())

    @classmethod
    def problem(
        cls, call: RecognizedCall, weight: ParameterView | None, bias: ParameterView | None
    ) -> str | None:
        if weight is None:
            return "an experts' matmul whose weight K-FAC does not train"
        if weight.rows is not None and not weight.selected:
            return "experts with a slice of the stacked weight"
        return None

    @property
    def _shape(self) -> tuple[int, int, int]:
        assert self.spec.weight is not None
        experts, rows, cols = self.shapes[self.spec.weight.name]
        return experts, rows, cols

    @property
    def _untransposed(self) -> bool:
        """``L_e = W[e]`` (else ``W[e]ᵀ``): F.linear on ``W[e]``, or a matmul by ``W.mT``."""
        assert self.spec.weight is not None
        return self.spec.weight.transposed == self.spec.transposed_form

    @property
    def blocks(self) -> int:
        return self._shape[0]

    @property
    def in_features(self) -> int:
        _, rows, cols = self._shape
        return cols if self._untransposed else rows

    @property
    def out_features(self) -> int:
        _, rows, cols = self._shape
        return rows if self._untransposed else cols

    @property
    def factor_sides(self) -> list[FactorSide]:
        a, g = super().factor_sides
        return [a._replace(per_block_count=True), g]

    def supports_reduce(self) -> bool:
        return False

    # -- rows routed to each expert ------------------------------------------------------------
    def row_count(self, layer_input: Tensor) -> int:
        return layer_input.numel() // layer_input.shape[-1]

    def _routed(self, tensor: Tensor, routing: Any) -> list[tuple[int, Tensor]]:
        """``(expert, rows [R_e, d])`` of one call's input or output gradient."""
        if routing == "batched":
            return [(e, tensor[e].reshape(-1, tensor.shape[-1])) for e in range(tensor.shape[0])]
        rows = tensor.reshape(-1, tensor.shape[-1])
        if isinstance(routing, int):
            return [(routing, rows)]
        ends = routing.tolist()  # one host read of the group offsets
        starts = [0, *ends[:-1]]
        return [(e, rows[s:t]) for e, (s, t) in enumerate(zip(starts, ends, strict=True))]

    def _per_expert(
        self,
        tensors: Sequence[Tensor],
        routes: Sequence[Any],
        index: Tensor | None,
        append_ones: bool,
        diagonal: bool,
        dim: int,
    ) -> Tensor:
        """``Σ r rᵀ`` per expert over the rows of the calls (``index``: rows of their
        concatenation in call order, expert-sorted within each call)."""
        routed = [part for t, r in zip(tensors, routes, strict=True) for part in self._routed(t, r)]
        shape = (self.blocks, dim) if diagonal else (self.blocks, dim, dim)
        total = torch.zeros(shape, dtype=tensors[0].dtype, device=tensors[0].device)
        offset = 0
        for expert, rows in routed:
            count = rows.shape[0]
            if index is not None:
                keep = index[(index >= offset) & (index < offset + count)] - offset
                rows = rows[keep]
            offset += count
            if rows.shape[0]:
                total[expert] += linalg.factor_sum(
                    rows.unsqueeze(0), diagonal=diagonal, append_ones=append_ones
                )[0]
        return total

    def a_count(self, rows: int, routing: Any, device: torch.device) -> Tensor:
        """Rows routed to each expert (from the offsets on the device: no host read)."""
        if isinstance(routing, Tensor):
            ends = routing.to(device=device, dtype=torch.float64)
            return torch.diff(ends, prepend=ends.new_zeros(1))
        counts = torch.zeros(self.blocks, dtype=torch.float64, device=device)
        if routing == "batched":
            return counts + rows / self.blocks
        counts[routing] = rows
        return counts

    def a_statistic_of_calls(
        self,
        inputs: Sequence[Tensor],
        index: Tensor | None,
        routes: Sequence[Any],
        masks: Sequence[Tensor | None] = (),
    ) -> Tensor:
        dim = self.in_features + int(self.has_bias)
        return self._per_expert(inputs, routes, index, self.has_bias, self.a_diagonal, dim)

    def g_statistic_of_calls(
        self,
        gradients: Sequence[Tensor],
        scales: Sequence[float | Tensor],
        index: Tensor | None,
        routes: Sequence[Any],
        masks: Sequence[Tensor | None] = (),
    ) -> Tensor:
        scaled = [g * s for g, s in zip(gradients, scales, strict=True)]
        return self._per_expert(scaled, routes, index, False, self.g_diagonal, self.out_features)

    def g_row_count(self, output_gradient: Tensor) -> int:
        return output_gradient.numel() // output_gradient.shape[-1]

    def a_rows(self, layer_input: Tensor, index: Tensor | None) -> Tensor:  # pragma: no cover
        raise NotImplementedError("expert rows are routed per expert (a_statistic_of_calls)")

    def g_rows(self, output_gradient: Tensor, index: Tensor | None) -> Tensor:  # pragma: no cover
        raise NotImplementedError("expert rows are routed per expert (g_statistic_of_calls)")

    # -- gradient matrix ------------------------------------------------------------------------
    def to_matrix(self, weight_grad: Tensor | None, bias_grad: Tensor | None) -> Tensor:
        """The stack's gradient as the call received it (``[E, ·, ·]``) -> ``[E, d_out, d_in]``."""
        assert weight_grad is not None
        return weight_grad.mT if self.spec.transposed_form else weight_grad

    def from_matrix(self, matrix: Tensor) -> tuple[Tensor | None, Tensor | None]:
        return (matrix.mT if self.spec.transposed_form else matrix), None


#: The grouped matmuls this torch has (``F.grouped_mm`` from 2.10, ``torch._grouped_mm`` before).
_grouped = [f for f in (getattr(torch, "_grouped_mm", None), getattr(F, "grouped_mm", None)) if f]

KIND = Kind(
    name=NAME,
    recognizers={
        F.linear: recognize_linear,
        **dict.fromkeys(_grouped, recognize_grouped_mm),
        torch.bmm: recognize_bmm,
    },
    model=ExpertsModel,
    supported=(
        SupportedUse(
            "`F.linear(x, W[e])`, `F.grouped_mm` / `torch._grouped_mm` with offsets, "
            "`torch.bmm(x, W)` on a stacked `[E, ·, ·]` weight",
            "HF Mixtral / Qwen2-MoE experts (`experts_implementation` `eager` or `grouped_mm`)",
            "one `A ⊗ G` block per expert over the rows routed to it; `A` normalised per expert",
        ),
    ),
)
