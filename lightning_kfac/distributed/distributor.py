"""TorchDistributedDistributor: K-FAC's work shared over a torch.distributed process group.

Per factor update, the sums of every block (with their counts) are summed over ranks in packed,
bucketed, asynchronous all-reduces (``comm.BucketedAllReduce``), started from the backward pass as
soon as a block's capture is complete; every rank sends every block (zeros and a zero count for
a block it did not use this step), so the collectives are the same on every rank whatever each
used, and the average weights ranks by what they captured. Each block has one owner rank
(``assignment.assign_by_cost``), which alone decomposes its dense factors. Then, by
``DistributionMode``:

- ``BROADCAST_DECOMPOSITIONS`` (KAISA's COMM-OPT, default): owners broadcast the decompositions
  (one packed broadcast per rank), and every rank preconditions every block locally;
- ``BROADCAST_GRADIENTS`` (KAISA's MEM-OPT): decompositions stay on the owner, which preconditions
  its blocks each step and broadcasts the preconditioned gradients.

Replicas stay bitwise identical: every rank reduces the same sums, and every rank preconditions
with the *same tensors* — the owner keeps exactly what it broadcast (same dtype, contiguous), not
its own differently laid out or wider copy.

A decomposition that failed on its owner travels as NaN, and receivers drop it, exactly as the
owner does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_kfac.distributed.assignment import assign_by_cost, decomposition_cost
from lightning_kfac.distributed.comm import BucketedAllReduce, Piece, broadcast_flat, piece_numel
from lightning_kfac.kfac.blocks import Block
from lightning_kfac.kfac.compute import EigenInverse, FactorInverse
from lightning_kfac.kfac.distribution import Distributor, Faults, Result
from lightning_kfac.kfac.factors import KroneckerFactor
from lightning_kfac.kfac.options import DistributionMode
from lightning_kfac.kfac.uses import UseSpec

#: A factor, the decomposition tensors it received, and whether they are all finite (0-d).
Received = tuple[KroneckerFactor, dict[str, Tensor], Tensor]


class TorchDistributedDistributor(Distributor):
    """Shares K-FAC work among the ranks of ``group``.

    Args:
        group: A process group reserved for K-FAC (default: the whole world). Create it with
            the job's timeout, e.g. ``dist.new_group(timeout=...)``: a new group does not inherit
            the default group's timeout.
        mode: See ``DistributionMode``.
        bucket_cap_bytes: Size of the factor all-reduce buckets.
        device: Device of the tensors K-FAC communicates (default: the factors' device, CPU
            before any factor exists).
    """

    def __init__(
        self,
        *,
        group: dist.ProcessGroup | None = None,
        mode: DistributionMode | str = DistributionMode.BROADCAST_DECOMPOSITIONS,
        bucket_cap_bytes: int = 25 * 2**20,
        device: torch.device | None = None,
    ) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.mode = DistributionMode(mode)
        self.bucket_cap_bytes = bucket_cap_bytes
        self.device = device or torch.device("cpu")
        self.inverse: FactorInverse = EigenInverse()
        self.inverse_dtype = torch.float32
        self.owners: list[int] = []
        self._index: dict[int, int] = {}
        self.allreduce: BucketedAllReduce | None = None
        #: Bytes this rank sent in broadcasts and use-gradient all-reduces since ``reset_counters``.
        self.broadcast_bytes = 0

    # -- structure ---------------------------------------------------------------------------
    def _gather(self, obj: object) -> list[object]:
        out: list[object] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def agree_on_uses(
        self, specs: list[UseSpec], unsupported: dict[str, set[str]]
    ) -> tuple[list[UseSpec], dict[str, set[str]]]:
        merged_specs: dict[UseSpec, None] = {}
        merged_unsupported: dict[str, set[str]] = {}
        for rank_specs, rank_unsupported in self._gather((specs, unsupported)):  # type: ignore[misc]
            merged_specs.update(dict.fromkeys(rank_specs))
            for name, operations in rank_unsupported.items():
                merged_unsupported.setdefault(name, set()).update(operations)
        return list(merged_specs), merged_unsupported

    def agree_on_new_uses(self, specs: list[UseSpec]) -> list[UseSpec]:
        merged: dict[UseSpec, None] = {}
        for rank_specs in self._gather(specs):
            merged.update(dict.fromkeys(rank_specs))  # type: ignore[call-overload]
        return list(merged)

    def setup(
        self, blocks: Sequence[Block], inverse: FactorInverse, inverse_dtype: torch.dtype
    ) -> None:
        if self.allreduce is not None:
            self.allreduce.reset_step()
        self.inverse = inverse
        self.inverse_dtype = inverse_dtype
        self._index = {id(block): index for index, block in enumerate(blocks)}
        self.owners = assign_by_cost([decomposition_cost(b) for b in blocks], self.world_size)
        factor_dtype = blocks[0].factor_dtype if blocks else torch.float32
        sizes = [
            sum(
                piece_numel(f.shape, not f.diagonal) + max(1, math.prod(f.count_shape))
                for f in b.factors
            )
            for b in blocks
        ]
        self.allreduce = BucketedAllReduce(
            sizes,
            self.group,
            bucket_cap_bytes=self.bucket_cap_bytes,
            element_size=torch.empty((), dtype=factor_dtype).element_size(),
        )

    # -- bookkeeping -----------------------------------------------------------------------
    @property
    def bytes_communicated(self) -> int:
        sent = self.allreduce.bytes_communicated if self.allreduce is not None else 0
        return sent + self.broadcast_bytes

    def reset_counters(self) -> None:
        if self.allreduce is not None:
            self.allreduce.reset_counters()
        self.broadcast_bytes = 0

    def owner(self, block: Block) -> int:
        return self.owners[self._index[id(block)]]

    def _global_rank(self, group_rank: int) -> int:
        if self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def _device(self, block: Block) -> torch.device:
        for factor in block.factors:
            if factor.value is not None:
                return factor.value.device
        return self.device

    # -- factors ---------------------------------------------------------------------------
    def _pieces(self, block: Block) -> list[Piece]:
        """The block's sums and counts (zeros and count 0 when it captured nothing here)."""
        sums, counts = [], []
        for factor, (total, count) in zip(
            block.factors, block.take_sums(self._device(block)), strict=True
        ):
            sums.append((total, not factor.diagonal))
            counts.append((count.reshape(-1), False))
        return sums + counts

    def factors_ready(self, block: Block) -> None:
        index = self._index.get(id(block))
        if index is None or self.allreduce is None or self.allreduce.is_ready(index):
            return
        self.allreduce.mark_ready(index, self._pieces(block))

    def reduce_factor_sums(
        self, blocks: Sequence[Block]
    ) -> list[list[tuple[Tensor, Tensor]] | None]:
        assert self.allreduce is not None
        pieces: dict[int, list[Piece]] = {}
        for block in blocks:
            index = self._index[id(block)]
            if not self.allreduce.is_ready(index):
                pieces[index] = self._pieces(block)
        held = self.allreduce.finish(pieces)
        out: list[list[Tensor] | None] = []
        for block in blocks:
            item = held[self._index[id(block)]]
            count = len(block.factors)
            sums, counts = item[:count], item[count:]
            out.append(
                [
                    (total, c.reshape(factor.count_shape))
                    for factor, (total, _), (c, _) in zip(block.factors, sums, counts, strict=True)
                ]
            )
        return out

    def discard(self, blocks: Sequence[Block]) -> None:
        """Run the step's reduction anyway (collectives must match on every rank), drop it."""
        if self.allreduce is not None and blocks:
            self.reduce_factor_sums(blocks)

    # -- decompositions --------------------------------------------------------------------
    def run_decompositions(
        self, blocks: Sequence[Block], decompose: Callable[[list[Block]], Faults]
    ) -> Faults:
        owned = [block for block in blocks if self.owner(block) == self.rank]
        faults = decompose(owned) if owned else {}
        if self.mode == DistributionMode.BROADCAST_GRADIENTS:
            return faults  # decompositions stay with their owners
        received: list[Received] = []
        for owner in range(self.world_size):
            members = [block for block in blocks if self.owner(block) == owner]
            if members:
                received += self._broadcast_decompositions(members, owner)
        self._keep_finite(received)
        return faults

    def _broadcast_decompositions(self, blocks: list[Block], owner: int) -> list[Received]:
        """Broadcast ``owner``'s decompositions of ``blocks``; every rank gets, per factor, the
        tensors that travelled and whether they are finite (see ``_keep_finite``)."""
        sending = owner == self.rank
        slots: list[tuple[int, int, str, Tensor]] = []
        for position, block in enumerate(blocks):
            device = self._device(block)
            for side, factor in enumerate(block.factors):
                for name, shape in self.inverse.decomposition_shapes(factor).items():
                    decomposition = factor.decomposition
                    if sending and decomposition is not None:
                        tensor = decomposition[name].to(self.inverse_dtype).contiguous()
                    else:  # a receiver's slot, or a failed decomposition sent as NaN
                        fill = float("nan") if sending else 0.0
                        tensor = torch.full(shape, fill, dtype=self.inverse_dtype, device=device)
                    slots.append((position, side, name, tensor))
        sent = broadcast_flat(
            [t for *_, t in slots], self._global_rank(owner), self.group, self.inverse_dtype
        )
        if sending:
            self.broadcast_bytes += sent
        # Every rank, the owner included, keeps exactly the tensors that travelled (same dtype,
        # same layout): replicas precondition with identical operands.
        received: dict[tuple[int, int], dict[str, Tensor]] = {}
        for position, side, name, tensor in slots:
            received.setdefault((position, side), {})[name] = tensor
        return [
            (
                factor,
                received[(position, side)],
                torch.stack(
                    [torch.isfinite(t).all() for t in received[(position, side)].values()]
                ).all(),
            )
            for position, block in enumerate(blocks)
            for side, factor in enumerate(block.factors)
        ]

    @staticmethod
    def _keep_finite(received: list[Received]) -> None:
        """Install the received decompositions. One that failed travelled as NaN: every rank drops
        it alike, so every rank retries it at the next step (one host read for all of them, on
        inverse-update steps)."""
        if not received:
            return
        finite = torch.stack([ok for *_, ok in received]).tolist()
        for (factor, tensors, _), ok in zip(received, finite, strict=True):
            factor.set_decomposition(tensors if ok else None)

    def share_decompositions(self, blocks: Sequence[Block]) -> Callable[[], None]:
        """In ``broadcast_gradients`` mode decompositions live on their owners only: broadcast
        them (and whether each is older than its factor) so that rank 0 can checkpoint them; the
        returned function drops them again."""
        if self.mode != DistributionMode.BROADCAST_GRADIENTS:
            return lambda: None
        before = [
            (factor, factor.decomposition, factor.changed_since_decomposition)
            for block in blocks
            for factor in block.factors
        ]
        for owner in range(self.world_size):
            members = [b for b in blocks if self.owner(b) == owner and b.has_factors]
            if not members:
                continue
            flags = torch.tensor(
                [
                    [float(f.decomposition is not None), float(f.changed_since_decomposition)]
                    for b in members
                    for f in b.factors
                ],
                device=self._device(members[0]),
            )
            broadcast_flat([flags], self._global_rank(owner), self.group, flags.dtype)
            self._keep_finite(self._broadcast_decompositions(members, owner))
            for (present, changed), factor in zip(
                flags.tolist(), [f for b in members for f in b.factors], strict=True
            ):
                if not present:
                    factor.set_decomposition(None)
                factor.changed_since_decomposition = bool(changed)

        def restore() -> None:
            for factor, decomposition, changed in before:
                factor.decomposition = decomposition
                factor.changed_since_decomposition = changed

        return restore

    # -- use gradients -----------------------------------------------------------------------
    def average_use_gradients(
        self, blocks: Sequence[Block], use_gradients: Mapping[str, Mapping[str, Tensor]]
    ) -> Mapping[str, Mapping[str, Tensor]]:
        slots: list[tuple[Block, str, Tensor]] = []
        for block in blocks:
            held = use_gradients.get(block.name, {})
            for role, view in (("weight", block.spec.weight), ("bias", block.spec.bias)):
                if view is None or role not in block.alias_parts:
                    continue
                tensor = held.get(role)
                if tensor is None:  # this rank's forward did not make this use
                    shape = block.model.view_shape(view)
                    dtype = block.factor_dtype
                    tensor = torch.zeros(shape, dtype=dtype, device=self._device(block))
                slots.append((block, role, tensor))
        if not slots:
            return use_gradients
        dtype = slots[0][2].dtype
        flat = torch.cat([t.reshape(-1).to(dtype) for *_, t in slots])
        dist.all_reduce(flat, group=self.group)
        flat.div_(self.world_size)
        self.broadcast_bytes += flat.numel() * flat.element_size()
        averaged: dict[str, dict[str, Tensor]] = {}
        offset = 0
        for block, role, tensor in slots:
            count = tensor.numel()
            averaged.setdefault(block.name, {})[role] = (
                flat[offset : offset + count].view(tensor.shape).to(tensor.dtype)
            )
            offset += count
        return averaged

    # -- preconditioning -------------------------------------------------------------------
    def precondition(
        self,
        items: Sequence[tuple[Block, Tensor]],
        compute: Callable[[Block, Tensor], Result],
    ) -> list[Result]:
        if self.mode == DistributionMode.BROADCAST_DECOMPOSITIONS:
            return super().precondition(items, compute)
        results: list[Result] = [None] * len(items)
        for owner in range(self.world_size):
            positions = [i for i, (block, _) in enumerate(items) if self.owner(block) == owner]
            if not positions:
                continue
            tensors: list[Tensor] = []
            for i in positions:
                block, gradient = items[i]
                value = compute(block, gradient) if owner == self.rank else None
                flag_numel = max(1, math.prod(block.ok_shape))
                flag = torch.zeros(flag_numel, dtype=gradient.dtype, device=gradient.device)
                if value is None:
                    matrix = torch.zeros_like(gradient)
                else:
                    matrix, ok = value
                    flag = ok.to(gradient.dtype).reshape(-1)
                tensors += [matrix.contiguous(), flag]
            sent = broadcast_flat(tensors, self._global_rank(owner), self.group, tensors[0].dtype)
            if owner == self.rank:
                self.broadcast_bytes += sent
            for slot, i in enumerate(positions):
                matrix, flag = tensors[2 * slot], tensors[2 * slot + 1]
                results[i] = (matrix, flag.reshape(items[i][0].ok_shape) > 0.5)
        return results
