"""Embedding uses: ``F.embedding(ids, W)`` with ``W`` ``[V, E]``.

``s = Wᵀ onehot(id)``, so ``L = Wᵀ`` and ``A = diag(token counts) / (N·T)`` exactly (one-hot rows
are orthogonal) — kept as a vector whatever ``max_factor_dim`` — and ``G`` from the output
gradients (docs/design.md §4).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_kfac.kfac.calls import RecognizedCall, argument, slot
from lightning_kfac.kfac.kinds.base import (
    Kind,
    KroneckerModel,
    SampleLayout,
    SupportedUse,
    joined_masks,
)
from lightning_kfac.kfac.kinds.linear import feature_rows, positions_of_rows

NAME = "embedding"


def recognize_embedding(func: Any, args: list[Any], kwargs: dict[str, Any]) -> RecognizedCall:
    ids, weight = (
        argument(args, kwargs, 0, "input", None),
        argument(args, kwargs, 1, "weight", None),
    )
    padding_idx = argument(args, kwargs, 2, "padding_idx", None)
    if padding_idx is not None and padding_idx < 0 and isinstance(weight, Tensor):
        padding_idx += weight.shape[0]
    call = RecognizedCall(
        NAME, func, args, kwargs, ids, weight, None,
        slot(args, kwargs, 1, "weight"), None, detail=(padding_idx,),
    )  # fmt: skip
    if argument(args, kwargs, 5, "scale_grad_by_freq", False):
        call.unsupported = "embedding with scale_grad_by_freq=True (not a Kronecker product)"
    elif argument(args, kwargs, 6, "sparse", False):
        call.unsupported = "embedding with sparse=True (sparse gradients)"
    return call


class EmbeddingModel(KroneckerModel):
    """``F.embedding(ids, W)``: diagonal one-hot ``A`` (token counts), dense or diagonal ``G``."""

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

    def report_notes(self) -> list[str]:
        # the one-hot A is diagonal exactly, not for lack of memory: only G is worth a note
        return ["G diagonal (side > max_factor_dim)"] if self.g_diagonal else []

    def supports_reduce(self) -> bool:
        return False  # a reduced one-hot is dense: always the exact diagonal expand factor

    def row_count(self, layer_input: Tensor) -> int:
        return layer_input.numel()

    def sample_layout(self, layer_input: Tensor, batch_dim: int, batch_size: int) -> Any:
        """Indices ``[1, T]`` shared by the samples (HF's default ``position_ids``) are broadcast
        lookups; indices without a samples' dimension (T5's ``[T, T]`` relative-position
        buckets, ``arange(T)``) would give a gradient summed over the samples: not modelled."""
        ids = layer_input
        if ids.dim() >= 2:
            size = ids.shape[batch_dim]
            if size == batch_size:
                return SampleLayout.SAMPLES
            if size == 1:
                return SampleLayout.BROADCAST
        elif ids.numel() == batch_size or batch_size == 1:
            return SampleLayout.SAMPLES
        return (
            f"embedding lookup of indices {tuple(ids.shape)} without a samples' dimension "
            f"(batch of {batch_size}): its gradient is summed over the samples"
        )

    def row_mask(self, layer_input: Tensor, batch_dim: int, positions: Tensor) -> Tensor | None:
        return positions_of_rows(layer_input, batch_dim, positions, features=False)

    def a_rows(self, layer_input: Tensor, index: Tensor | None) -> Tensor:  # pragma: no cover
        raise NotImplementedError("embedding inputs are counted, not materialised")

    def a_statistic(
        self, layer_input: Tensor, index: Tensor | None, mask: Tensor | None = None
    ) -> Tensor:
        ids = layer_input.reshape(-1)
        if index is not None:
            ids = ids[index]
            mask = None if mask is None else mask[index]
        # index_add_ has a fixed output size (bincount reads the maximum id back: a host sync).
        ones = torch.ones(ids.shape[0], dtype=torch.float64, device=ids.device)
        if mask is not None:  # padding positions are not positions
            ones = ones * mask.to(device=ids.device, dtype=torch.float64)
        counts = torch.zeros(self.in_features, dtype=torch.float64, device=ids.device)
        counts.index_add_(0, ids, ones)
        padding_idx = self.spec.detail[0] if self.spec.detail else None
        if padding_idx is not None:
            # F.embedding blocks the padding row's gradient: its positions act as inputs x = 0
            # (they still count in N·T), so that dW = (1/N) Σ g aᵀ holds with this A.
            counts[padding_idx] = 0.0
        return counts.unsqueeze(0)

    def a_statistic_of_calls(
        self,
        inputs: Sequence[Tensor],
        index: Tensor | None,
        routes: Sequence[Any],
        masks: Sequence[Tensor | None] = (),
    ) -> Tensor:
        ids = torch.cat([ids.reshape(-1) for ids in inputs])
        mask = joined_masks(masks, [x.numel() for x in inputs])
        return self.a_statistic(ids, index, mask)

    def g_rows(self, output_gradient: Tensor, index: Tensor | None) -> Tensor:
        return feature_rows(output_gradient, self.out_features, index)

    def to_matrix(self, weight_grad: Tensor | None, bias_grad: Tensor | None) -> Tensor:
        assert weight_grad is not None
        return weight_grad.mT.unsqueeze(0)

    def from_matrix(self, matrix: Tensor) -> tuple[Tensor | None, Tensor | None]:
        return matrix[0].mT, None


KIND = Kind(
    name=NAME,
    recognizers={F.embedding: recognize_embedding},
    model=EmbeddingModel,
    supported=(
        SupportedUse(
            "`F.embedding`",
            "`nn.Embedding`, tied input embeddings",
            "one-hot `A` kept as token counts (exactly diagonal), dense `G`",
        ),
    ),
)
