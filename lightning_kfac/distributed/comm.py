"""Collectives for K-FAC on torch.distributed: packed, bucketed, asynchronous.

A *piece* is a tensor with its packing: a symmetric ``[B, d, d]`` factor sends only its upper
triangles (``d(d+1)/2`` numbers per block), anything else (a diagonal factor, a count) is sent
flat. An *item* (one block: its factors' sums and their counts) is a list of pieces.

Items are grouped into fixed buckets of about ``bucket_cap_bytes``; each bucket is one
``all_reduce(SUM)`` on a flat buffer (never one collective per block). Buckets are fixed when the
structure is, and always *launched in bucket order*, whatever order their members become ready
in, so every rank issues the same sequence of collectives. Sums and counts are both summed: the
receiver divides, so ranks are weighted by what they captured and a rank that did not use a block
sends zeros with a zero count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

#: ``(tensor, symmetric)``: a symmetric piece travels as its upper triangles.
Piece = tuple[Tensor, bool]


def piece_numel(shape: Sequence[int], symmetric: bool) -> int:
    """Elements a piece of ``shape`` occupies in a packed buffer."""
    if symmetric:
        *batch, dim, _ = shape
        count = 1
        for size in batch:
            count *= size
        return count * dim * (dim + 1) // 2
    count = 1
    for size in shape:
        count *= size
    return count


def pack(pieces: Sequence[Piece]) -> Tensor:
    """Concatenate the pieces (upper triangles of the symmetric ones) into one flat buffer."""
    parts = []
    for tensor, symmetric in pieces:
        if symmetric:
            dim = tensor.shape[-1]
            rows, cols = torch.triu_indices(dim, dim, device=tensor.device)
            parts.append(tensor[..., rows, cols].reshape(-1))
        else:
            parts.append(tensor.reshape(-1))
    return torch.cat(parts)


def unpack_(flat: Tensor, pieces: Sequence[Piece]) -> None:
    """Write ``flat`` (from ``pack``) back into the pieces' tensors, symmetrically."""
    offset = 0
    for tensor, symmetric in pieces:
        count = piece_numel(tensor.shape, symmetric)
        values = flat[offset : offset + count].to(tensor.dtype)
        if symmetric:
            dim = tensor.shape[-1]
            rows, cols = torch.triu_indices(dim, dim, device=tensor.device)
            values = values.view(*tensor.shape[:-2], -1)
            tensor[..., rows, cols] = values
            tensor[..., cols, rows] = values
        else:
            tensor.copy_(values.view(tensor.shape))
        offset += count
    if offset != flat.numel():
        raise RuntimeError(f"unpack_: {flat.numel()} elements for pieces of {offset}")


@dataclass
class _Bucket:
    members: list[int]  # indices of the items it carries
    #: Pieces of the items that are ready, by item index.
    pieces: dict[int, Sequence[Piece]] = field(default_factory=dict)
    #: The pieces packed into ``buffer``, in packing order (to unpack the sum into).
    sent: list[Piece] = field(default_factory=list)
    buffer: Tensor | None = None
    work: dist.Work | None = None

    @property
    def complete(self) -> bool:
        return len(self.pieces) == len(self.members)


class BucketedAllReduce:
    """Sum items over a process group, a fixed set of buckets at a time.

    Args:
        sizes: Packed element count of each item.
        group: Process group of the collectives (a dedicated one, so that they never interleave
            with DDP's gradient buckets on the default group).
        bucket_cap_bytes: Target bucket size (in bytes of the packed payload).
        element_size: Bytes per element, to size buckets.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        group: dist.ProcessGroup | None,
        *,
        bucket_cap_bytes: int = 25 * 2**20,
        element_size: int = 4,
    ) -> None:
        self.group = group
        self.sizes = list(sizes)
        self.buckets: list[_Bucket] = []
        self._bucket_of: dict[int, int] = {}
        current: list[int] = []
        current_bytes = 0
        # Backward visits uses roughly last to first: bucket them in that order.
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

    def is_ready(self, index: int) -> bool:
        return index in self.buckets[self._bucket_of[index]].pieces

    def _add(self, index: int, pieces: Sequence[Piece]) -> None:
        expected = self.sizes[index]
        actual = sum(piece_numel(t.shape, s) for t, s in pieces)
        if actual != expected:
            raise RuntimeError(f"item {index}: {actual} packed elements, planned {expected}")
        self.buckets[self._bucket_of[index]].pieces.setdefault(index, pieces)

    def mark_ready(self, index: int, pieces: Sequence[Piece]) -> None:
        """Item ``index`` holds its final ``pieces``; launch every bucket that can go now."""
        self._add(index, pieces)
        while self._next_launch < len(self.buckets) and self.buckets[self._next_launch].complete:
            self._launch(self.buckets[self._next_launch])
            self.launched_early += 1
            self._next_launch += 1

    def _launch(self, bucket: _Bucket) -> None:
        bucket.sent = [piece for index in sorted(bucket.pieces) for piece in bucket.pieces[index]]
        bucket.buffer = pack(bucket.sent)
        self.bytes_communicated += bucket.buffer.numel() * bucket.buffer.element_size()
        bucket.work = dist.all_reduce(bucket.buffer, group=self.group, async_op=True)

    def finish(self, items: dict[int, Sequence[Piece]]) -> dict[int, Sequence[Piece]]:
        """Launch what is left (``items`` not marked ready yet), wait, write the sums back.
        Returns every item's pieces (those marked ready early too), now holding the sums."""
        for index, pieces in items.items():
            self._add(index, pieces)
        for bucket in self.buckets[self._next_launch :]:
            if not bucket.complete:
                missing = sorted(set(bucket.members) - set(bucket.pieces))
                raise RuntimeError(f"items {missing} were never given to the all-reduce")
            self._launch(bucket)
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
                assert bucket.buffer is not None
                unpack_(bucket.buffer, bucket.sent)
        summed = {index: p for bucket in self.buckets for index, p in bucket.pieces.items()}
        self.reset_step()
        return summed

    def reset_step(self) -> None:
        """Drop this step's pieces (after ``finish``, or for a skipped step: waits first)."""
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
            bucket.pieces, bucket.sent, bucket.buffer, bucket.work = {}, [], None, None
        self._next_launch = 0


def broadcast_flat(
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
