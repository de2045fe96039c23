"""TorchDistributedDistributor: K-FAC's work shared over a torch.distributed process group.

Per factor update, the batch estimates of all layers are averaged in packed, bucketed,
asynchronous all-reduces (``comm.BucketedAllReduce``), started from the backward pass as soon as a
layer's capture is complete. Each layer has one owner rank (``assignment.assign_by_cost``), which
alone eigendecomposes its factors. Then, by ``DistributionMode``:

- ``BROADCAST_DECOMPOSITIONS`` (KAISA's COMM-OPT, default): owners broadcast the decompositions
  (one packed broadcast per rank), and every rank preconditions every layer locally.
- ``BROADCAST_GRADIENTS`` (KAISA's MEM-OPT, Shampoo's DDP distributor): decompositions stay on the
  owner, which preconditions its layers each step and broadcasts the preconditioned gradients;
  other ranks never hold those decompositions (memory per rank ~ 1/world_size).

A decomposition that failed on its owner travels as NaN, and receivers fall back to the raw
gradient for that layer, exactly as the owner does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_kfac.distributed.assignment import assign_by_cost, decomposition_cost
from lightning_kfac.distributed.comm import BucketedAllReduce, broadcast_packed, packed_numel
from lightning_kfac.kfac.distribution import Distributor
from lightning_kfac.kfac.kfac_layer import KFACLayer
from lightning_kfac.kfac.options import ComputeMethod, StrEnum


class DistributionMode(StrEnum):
    """What owners send after decomposing (Pauloski et al. 2021, KAISA, §4)."""

    BROADCAST_DECOMPOSITIONS = "broadcast_decompositions"
    BROADCAST_GRADIENTS = "broadcast_gradients"


class TorchDistributedDistributor(Distributor):
    """Shares K-FAC work among the ranks of ``group``.

    Args:
        layers: The preconditioner's layers, in registration order (same on every rank).
        method: The preconditioner's compute method (shapes of what is broadcast).
        inverse_dtype: Dtype in which decompositions travel.
        group: A process group reserved for K-FAC (default: the whole world).
        mode: See ``DistributionMode``.
        bucket_cap_bytes: Size of the factor all-reduce buckets.
    """

    def __init__(
        self,
        layers: Sequence[KFACLayer],
        *,
        method: ComputeMethod,
        inverse_dtype: torch.dtype,
        group: dist.ProcessGroup | None = None,
        mode: DistributionMode | str = DistributionMode.BROADCAST_DECOMPOSITIONS,
        bucket_cap_bytes: int = 25 * 2**20,
    ) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.method = ComputeMethod(method)
        self.mode = DistributionMode(mode)
        self.inverse_dtype = inverse_dtype
        self._index = {id(layer): index for index, layer in enumerate(layers)}
        costs = [decomposition_cost(layer.a.blocks, layer.a.dim, layer.g.dim) for layer in layers]
        #: Owner rank (within ``group``) of each layer, in registration order.
        self.owners = assign_by_cost(costs, self.world_size)
        factor_dtype = layers[0].factor_dtype if layers else torch.float32
        sizes = [sum(packed_numel(f.blocks, f.dim) for f in layer.factors) for layer in layers]
        self.allreduce = BucketedAllReduce(
            sizes,
            group,
            self.world_size,
            bucket_cap_bytes=bucket_cap_bytes,
            element_size=torch.empty((), dtype=factor_dtype).element_size(),
        )
        #: Bytes this rank sent in broadcasts since ``reset_counters``.
        self.broadcast_bytes = 0

    # -- bookkeeping -----------------------------------------------------------------------
    @property
    def bytes_communicated(self) -> int:
        return self.allreduce.bytes_communicated + self.broadcast_bytes

    def reset_counters(self) -> None:
        self.allreduce.reset_counters()
        self.broadcast_bytes = 0

    def owner(self, layer: KFACLayer) -> int:
        return self.owners[self._index[id(layer)]]

    def _global_rank(self, group_rank: int) -> int:
        if self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    # -- factors ---------------------------------------------------------------------------
    def factors_ready(self, layer: KFACLayer) -> None:
        self.allreduce.mark_ready(self._index[id(layer)], layer.finalize_batches())

    def average_factor_batches(self, layers: Sequence[KFACLayer]) -> None:
        self.allreduce.finish(
            {self._index[id(layer)]: layer.finalize_batches() for layer in layers}
        )

    # -- decompositions --------------------------------------------------------------------
    def run_decompositions(
        self, layers: Sequence[KFACLayer], decompose: Callable[[KFACLayer], None]
    ) -> None:
        for layer in layers:
            if self.owner(layer) == self.rank:
                decompose(layer)
        if self.mode == DistributionMode.BROADCAST_GRADIENTS:
            return  # decompositions stay with their owners
        for owner in range(self.world_size):
            owned = [layer for layer in layers if self.owner(layer) == owner]
            if owned:
                self._broadcast_decompositions(owned, owner)

    def _broadcast_decompositions(self, layers: list[KFACLayer], owner: int) -> None:
        sending = owner == self.rank
        slots: list[tuple[KFACLayer, int, str, Tensor]] = []
        for layer in layers:
            device = layer.adapter.weight.device
            for side, (factor, shapes) in enumerate(
                zip(layer.factors, layer.decomposition_shapes(self.method), strict=True)
            ):
                for name, shape in shapes.items():
                    decomposition = factor.decomposition
                    if sending and decomposition is not None:
                        tensor = decomposition[name].to(self.inverse_dtype)
                    else:  # a receiver's slot, or a failed decomposition sent as NaN
                        fill = float("nan") if sending else 0.0
                        tensor = torch.full(shape, fill, dtype=self.inverse_dtype, device=device)
                    slots.append((layer, side, name, tensor))
        sent = broadcast_packed(
            [t for *_, t in slots], self._global_rank(owner), self.group, self.inverse_dtype
        )
        if sending:
            self.broadcast_bytes += sent
            return
        received: dict[tuple[int, int], dict[str, Tensor]] = {}
        for layer, side, name, tensor in slots:
            received.setdefault((id(layer), side), {})[name] = tensor
        for layer in layers:
            for side, factor in enumerate(layer.factors):
                parts = received[(id(layer), side)]
                finite = all(bool(torch.isfinite(t).all()) for t in parts.values())
                factor.set_decomposition(parts if finite else None)

    # -- preconditioning -------------------------------------------------------------------
    def precondition(
        self,
        items: Sequence[tuple[KFACLayer, Tensor]],
        compute: Callable[[KFACLayer, Tensor], Tensor | None],
    ) -> list[Tensor | None]:
        if self.mode == DistributionMode.BROADCAST_DECOMPOSITIONS:
            return super().precondition(items, compute)
        results: list[Tensor | None] = [None] * len(items)
        for owner in range(self.world_size):
            positions = [i for i, (layer, _) in enumerate(items) if self.owner(layer) == owner]
            if not positions:
                continue
            tensors: list[Tensor] = []
            for i in positions:
                layer, gradient = items[i]
                value = compute(layer, gradient) if owner == self.rank else None
                flag = torch.ones(1, dtype=gradient.dtype, device=gradient.device)
                if value is None:  # the raw gradient stays; the flag says so
                    value, flag = torch.zeros_like(gradient), flag.zero_()
                tensors += [value.contiguous(), flag]
            sent = broadcast_packed(tensors, self._global_rank(owner), self.group, tensors[0].dtype)
            if owner == self.rank:
                self.broadcast_bytes += sent
            for slot, i in enumerate(positions):
                value, flag = tensors[2 * slot], tensors[2 * slot + 1]
                results[i] = value if bool(flag.item()) else None
        return results
