"""Collectives for K-FAC on torch.distributed: packed, bucketed, asynchronous.

Factors are symmetric, so only their upper triangles travel: ``d(d+1)/2`` numbers instead of
``d²``. Factors are grouped into fixed buckets of about ``bucket_cap_bytes``; each bucket is one
``all_reduce`` on a flat buffer (never one collective per layer). Buckets are fixed at
construction and always *launched in bucket order*, whatever order their members become ready
in, so every rank issues the same sequence of collectives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor


def pack_upper_triangles(matrices: Sequence[Tensor]) -> Tensor:
    """Concatenate the upper triangles (diagonal included) of ``[B, d, d]`` matrices."""
    parts = []
    for matrix in matrices:
        dim = matrix.shape[-1]
        rows, cols = torch.triu_indices(dim, dim, device=matrix.device)
        parts.append(matrix[..., rows, cols].reshape(-1))
    return torch.cat(parts)


def unpack_upper_triangles_(flat: Tensor, matrices: Sequence[Tensor]) -> None:
    """Write ``flat`` (from ``pack_upper_triangles``) back into ``matrices``, symmetrically."""
    offset = 0
    for matrix in matrices:
        dim = matrix.shape[-1]
        rows, cols = torch.triu_indices(dim, dim, device=matrix.device)
        count = matrix.shape[0] * rows.numel()
        values = flat[offset : offset + count].view(matrix.shape[0], -1).to(matrix.dtype)
        matrix[..., rows, cols] = values
        matrix[..., cols, rows] = values
        offset += count


def packed_numel(blocks: int, dim: int) -> int:
    return blocks * dim * (dim + 1) // 2


@dataclass
class _Bucket:
    members: list[int]  # indices of the items (layers) it carries
    #: Final tensors of the items that are ready, by item index.
    tensors: dict[int, Sequence[Tensor]] = field(default_factory=dict)
    #: The tensors packed into ``buffer``, in packing order (to unpack the average into).
    sent: list[Tensor] = field(default_factory=list)
    buffer: Tensor | None = None
    work: dist.Work | None = None

    @property
    def complete(self) -> bool:
        return len(self.tensors) == len(self.members)


class BucketedAllReduce:
    """Average symmetric matrices over a process group, a fixed set of buckets at a time.

    Args:
        sizes: Packed element count of each item (an item is one layer: its ``A`` and ``G``).
        group: Process group of the collectives (a dedicated one, so that they never interleave
            with DDP's gradient buckets on the default group).
        world_size: Size of ``group``.
        bucket_cap_bytes: Target bucket size (in bytes of the packed payload).
        element_size: Bytes per element, to size buckets.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        group: dist.ProcessGroup | None,
        world_size: int,
        *,
        bucket_cap_bytes: int = 25 * 2**20,
        element_size: int = 4,
    ) -> None:
        self.group = group
        self.world_size = world_size
        self.buckets: list[_Bucket] = []
        self._bucket_of: dict[int, int] = {}
        current: list[int] = []
        current_bytes = 0
        # Backward visits layers roughly last to first: bucket them in that order.
        for index in reversed(range(len(sizes))):
            current.append(index)
            current_bytes += sizes[index] * element_size
            if current_bytes >= bucket_cap_bytes:
                self._add_bucket(current)
                current, current_bytes = [], 0
        if current:
            self._add_bucket(current)
        self._next_launch = 0
        #: Payload bytes sent by this rank since ``reset_counters``.
        self.bytes_communicated = 0
        #: Buckets launched from ``mark_ready`` (during backward) rather than from ``finish``.
        self.launched_early = 0

    def _add_bucket(self, members: list[int]) -> None:
        for index in members:
            self._bucket_of[index] = len(self.buckets)
        self.buckets.append(_Bucket(members=members))

    def reset_counters(self) -> None:
        self.bytes_communicated = 0

    def _add(self, index: int, tensors: Sequence[Tensor]) -> None:
        self.buckets[self._bucket_of[index]].tensors.setdefault(index, tensors)

    def mark_ready(self, index: int, tensors: Sequence[Tensor]) -> None:
        """Item ``index`` holds its final ``tensors``; launch every bucket that can go now."""
        self._add(index, tensors)
        while self._next_launch < len(self.buckets) and self.buckets[self._next_launch].complete:
            self._launch(self.buckets[self._next_launch])
            self.launched_early += 1
            self._next_launch += 1

    def _launch(self, bucket: _Bucket) -> None:
        bucket.sent = [t for index in sorted(bucket.tensors) for t in bucket.tensors[index]]
        bucket.buffer = pack_upper_triangles(bucket.sent)
        self.bytes_communicated += bucket.buffer.numel() * bucket.buffer.element_size()
        bucket.work = dist.all_reduce(bucket.buffer, group=self.group, async_op=True)

    def finish(self, items: dict[int, Sequence[Tensor]]) -> None:
        """Launch what is left (``items`` not marked ready yet), wait, write the averages back."""
        for index, tensors in items.items():
            self._add(index, tensors)
        for bucket in self.buckets[self._next_launch :]:
            if bucket.tensors:
                self._launch(bucket)
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
                assert bucket.buffer is not None
                unpack_upper_triangles_(bucket.buffer.div_(self.world_size), bucket.sent)
            bucket.tensors, bucket.sent, bucket.buffer, bucket.work = {}, [], None, None
        self._next_launch = 0


def broadcast_packed(
    tensors: Sequence[Tensor], src: int, group: dist.ProcessGroup | None, dtype: torch.dtype
) -> int:
    """Broadcast ``tensors`` from global rank ``src`` as one flat buffer; receivers' tensors are
    overwritten in place. Returns the payload bytes."""
    if not tensors:
        return 0
    device = tensors[0].device
    flat = torch.cat([t.reshape(-1).to(device=device, dtype=dtype) for t in tensors])
    dist.broadcast(flat, src=src, group=group)
    offset = 0
    for tensor in tensors:
        count = tensor.numel()
        tensor.copy_(flat[offset : offset + count].view(tensor.shape))
        offset += count
    return flat.numel() * flat.element_size()
