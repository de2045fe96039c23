"""The K-FAC collectives (``lightning_kfac.distributed.comm``) on 2 real gloo processes.

Workers are forked from the test process (``conftest`` keeps it single-threaded, so GNU OpenMP's
fork deadlock cannot happen), meet through a ``file://`` store in ``tmp_path`` (no port to pick)
and write their results to files; the parent compares them. Nothing here mocks torch.distributed.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lightning_kfac import KFACPreconditioner
from lightning_kfac.distributed import TorchDistributedDistributor
from lightning_kfac.distributed.assignment import assign_by_cost
from lightning_kfac.distributed.comm import BucketedAllReduce, broadcast_flat, pack, unpack_
from tests.lightning_support import run_forked

WORLD = 2


# -- running functions on 2 gloo ranks ---------------------------------------------------------
def run_on_two_ranks(
    fn: Callable[..., Any], tmp_path: Path, *args: Any, limit: float = 120.0
) -> list[Any]:
    """``fn(rank, *args)`` on 2 forked gloo processes; their return values, by rank."""
    return run_forked(fn, tmp_path, *args, world=WORLD, limit=limit)


# -- pack / unpack -------------------------------------------------------------------------------
def symmetric(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(shape, generator=gen, dtype=torch.float64)
    return (m + m.mT).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_pack_unpack_round_trip(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    pieces = [
        (symmetric((1, 4, 4), dtype, 1), True),
        (torch.randn(3, generator=gen).to(dtype), False),  # a diagonal factor
        (symmetric((2, 3, 3), dtype, 2), True),  # two blocks (groups)
        (torch.tensor([7.0], dtype=dtype), False),  # a count
        (symmetric((1, 1, 1), dtype, 3), True),
        (torch.randn(2, 5, generator=gen).to(dtype), False),
    ]
    flat = pack(pieces)
    # symmetric pieces travel as their upper triangles
    assert flat.numel() == 10 + 3 + 2 * 6 + 1 + 1 + 10
    assert flat.dtype == dtype
    targets = [(torch.full_like(t, float("nan")), s) for t, s in pieces]
    unpack_(flat, targets)
    for (original, _), (restored, _) in zip(pieces, targets, strict=True):
        assert torch.equal(original, restored)


def test_unpack_rejects_a_buffer_of_another_size() -> None:
    pieces = [(symmetric((1, 3, 3), torch.float32, 0), True)]
    with pytest.raises(RuntimeError, match="7 elements for pieces of 6"):
        unpack_(torch.zeros(7), pieces)


def test_unpack_casts_into_the_pieces_dtype() -> None:
    source = [(symmetric((1, 3, 3), torch.float64, 0), True), (torch.arange(4.0), False)]
    flat = pack(source).to(torch.float64)
    target = [(torch.zeros(1, 3, 3, dtype=torch.float32), True), (torch.zeros(4), False)]
    unpack_(flat, target)
    assert target[0][0].dtype == torch.float32
    assert torch.equal(target[0][0], source[0][0].float())
    assert torch.equal(target[1][0], torch.arange(4.0))


# -- BucketedAllReduce ---------------------------------------------------------------------------
#: Item shapes: (symmetric side and blocks, flat length) — a factor pair with its counts.
ITEMS = [(3, 1, 2), (4, 1, 1), (2, 2, 3), (5, 1, 2), (3, 1, 4)]


def item_pieces(index: int, rank: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, bool]]:
    """Item ``index`` as rank ``rank`` holds it: a symmetric sum, a diagonal, a count. Rank 1
    holds zeros and a zero count for item 2 (a block it did not use)."""
    side, blocks, length = ITEMS[index]
    unused = rank == 1 and index == 2
    matrix = symmetric((blocks, side, side), dtype, 100 * index + rank)
    flat = torch.arange(length, dtype=dtype) * (rank + 1) + index
    count = torch.tensor([8.0 * (rank + 1)], dtype=dtype)
    if unused:
        matrix, flat, count = matrix.zero_(), flat.zero_(), count.zero_()
    return [(matrix, True), (flat, False), (count, False)]


def item_size(index: int) -> int:
    side, blocks, length = ITEMS[index]
    return blocks * side * (side + 1) // 2 + length + 1


def _bucket_orders(rank: int, orders: list[tuple[tuple[int, ...], int]], cap: int) -> dict:
    """For each (readiness order, number marked ready before ``finish``): the sums received, and
    after each ``mark_ready`` which buckets had been launched."""
    dtype = torch.float64
    reducer = BucketedAllReduce(
        [item_size(i) for i in range(len(ITEMS))], None, bucket_cap_bytes=cap, element_size=8
    )
    out: dict[str, Any] = {"buckets": [b.members for b in reducer.buckets], "runs": []}
    for order, early in orders:
        pieces = {i: item_pieces(i, rank, dtype) for i in order}
        launched = []
        for index in order[:early]:
            reducer.mark_ready(index, pieces[index])
            launched.append([b.work is not None for b in reducer.buckets])
        reducer.finish({i: pieces[i] for i in order[early:]})
        sums = {i: [t.clone() for t, _ in pieces[i]] for i in order}
        out["runs"].append({"launched": launched, "sums": sums})
    out["bytes"] = reducer.bytes_communicated
    return out


def _orders_for(rank: int) -> list[tuple[tuple[int, ...], int]]:
    """Every permutation of the items; rank 1 walks them in another order than rank 0, and the
    two ranks hand over different numbers of items through ``mark_ready`` before ``finish``."""
    permutations = list(itertools.permutations(range(len(ITEMS))))
    count = len(permutations)
    orders = []
    for k, permutation in enumerate(permutations):
        mine = permutation if rank == 0 else permutations[(7 * k + 3) % count]
        early = (k + 2 * rank) % (len(ITEMS) + 1)
        orders.append((mine, early))
    return orders


@pytest.mark.parametrize("cap_bytes", [1, 150])
def test_bucketed_all_reduce_sums_under_every_readiness_order(
    tmp_path: Path, cap_bytes: int
) -> None:
    """Every permutation of readiness (different per rank, different split between
    ``mark_ready`` and ``finish``): buckets are launched strictly in bucket order (the launched
    ones are always a prefix), and every item receives the sum over ranks, counts included."""

    def work(rank: int) -> dict:
        return _bucket_orders(rank, _orders_for(rank), cap_bytes)

    results = run_on_two_ranks(work, tmp_path)
    buckets = results[0]["buckets"]
    assert buckets == results[1]["buckets"]
    assert len(buckets) == (len(ITEMS) if cap_bytes == 1 else 3), buckets
    for rank, result in enumerate(results):
        for (order, early), run in zip(_orders_for(rank), result["runs"], strict=True):
            ready: set[int] = set()
            for index, launched in zip(order[:early], run["launched"], strict=True):
                ready.add(index)
                # launched buckets form a prefix, and exactly the complete prefix is launched
                prefix = 0
                while prefix < len(buckets) and set(buckets[prefix]) <= ready:
                    prefix += 1
                assert launched == [b < prefix for b in range(len(buckets))], (order, early)
            for index in range(len(ITEMS)):
                expected = [
                    a + b
                    for (a, _), (b, _) in zip(
                        item_pieces(index, 0, torch.float64),
                        item_pieces(index, 1, torch.float64),
                        strict=True,
                    )
                ]
                for got, want in zip(run["sums"][index], expected, strict=True):
                    torch.testing.assert_close(got, want, rtol=1e-15, atol=1e-15)
                # the counts are summed: the unused item's count is rank 0's alone
                want_count = 8.0 if index == 2 else 24.0
                assert float(run["sums"][index][2]) == want_count
    total = sum(item_size(i) for i in range(len(ITEMS))) * 8 * len(_orders_for(0))
    assert results[0]["bytes"] == results[1]["bytes"] == total


def test_bucketed_all_reduce_reports_items_never_given(tmp_path: Path) -> None:
    def work(rank: int) -> str:
        reducer = BucketedAllReduce([item_size(0), item_size(1)], None, bucket_cap_bytes=1)
        try:
            reducer.finish({0: item_pieces(0, rank, torch.float32)})
        except RuntimeError as error:
            return str(error)
        return "no error"

    messages = run_on_two_ranks(work, tmp_path)
    assert all("items [1] were never given" in m for m in messages), messages


# -- broadcast_flat ------------------------------------------------------------------------------
@pytest.mark.parametrize("src", [0, 1])
def test_broadcast_flat_overwrites_receivers(tmp_path: Path, src: int) -> None:
    def work(rank: int) -> dict:
        gen = torch.Generator().manual_seed(rank)
        tensors = [
            torch.randn(2, 3, 3, generator=gen),
            torch.randn(4, generator=gen, dtype=torch.float64),
            torch.randn(1, generator=gen),
        ]
        sent = [t.clone() for t in tensors]
        nbytes = broadcast_flat(tensors, src, None, torch.float64)
        empty = broadcast_flat([], src, None, torch.float32)
        return {"tensors": tensors, "sent": sent, "bytes": nbytes, "empty": empty}

    results = run_on_two_ranks(work, tmp_path)
    source = results[src]["sent"]
    for result in results:
        assert result["bytes"] == (18 + 4 + 1) * 8  # one float64 buffer
        assert result["empty"] == 0
        for got, want in zip(result["tensors"], source, strict=True):
            assert got.dtype == want.dtype
            assert torch.equal(got, want)  # float32 -> float64 -> float32 is exact


# -- a decomposition that fails on its owner -----------------------------------------------------
FAILING_SIDE = 5  # the A factor of layer 0 (4 inputs + bias): the only factor of side 5
#: Owner of layer 0, as the distributor assigns it (eigh cost: layer 0 A 5, G 6; layer 1 A 7, G 3).
OWNER = assign_by_cost([5**3 + 6**3, 7**3 + 3**3], WORLD)[0]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def _decomposition_run(rank: int, mode: str, failing_steps: int, steps: int) -> dict:
    """K-FAC on 2 ranks without Lightning (gradients averaged as DDP does). On the owner of
    layer 0, ``eigh`` of its ``A`` fails (even in float64) during the first ``failing_steps``
    steps; inverse updates every 3 steps."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pre = KFACPreconditioner(
        model,
        optimizer=optimizer,
        kl_clip=None,
        inverse_update_interval=3,
        distributor=TorchDistributedDistributor(mode=mode),
    )
    real_eigh = torch.linalg.eigh
    fail = {"now": False}

    def eigh(matrix: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if fail["now"] and matrix.shape[-1] == FAILING_SIDE:
            raise torch.linalg.LinAlgError("forced failure")
        return real_eigh(matrix, *args, **kwargs)

    torch.linalg.eigh = eigh  # only in this forked worker
    out: dict[str, Any] = {"steps": []}
    for step in range(steps):
        gen = torch.Generator().manual_seed(10 * step + rank)
        x, y = torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for p in model.parameters():  # what DDP does
            dist.all_reduce(p.grad)
            p.grad.div_(WORLD)
        raw = {n: p.grad.clone() for n, p in model.named_parameters()}
        fail["now"] = step < failing_steps and rank == OWNER
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pre.step()
        optimizer.step()
        out["steps"].append(
            {
                "raw": raw,
                "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
                "decompositions": {
                    name: [
                        None
                        if f.decomposition is None
                        else {k: v.clone() for k, v in f.decomposition.items()}
                        for f in block.factors
                    ]
                    for name, block in pre.blocks.items()
                },
            }
        )
    out["owner"] = pre.distributor.owner(pre.block("0.weight"))
    out["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bit pattern (NaN compares equal to the same NaN)."""
    return tensor.contiguous().view(torch.int32 if tensor.element_size() == 4 else torch.int64)


@pytest.mark.parametrize("mode", ["broadcast_decompositions", "broadcast_gradients"])
def test_failed_decomposition_is_the_same_on_every_rank(tmp_path: Path, mode: str) -> None:
    """The owner's decomposition of layer 0's ``A`` fails: it sends NaN (or, broadcasting
    gradients, a "not ok" flag); owner and receivers keep bit-identical tensors, layer 0 keeps its
    raw (averaged) gradient on every rank, layer 1 is preconditioned, replicas stay identical."""
    results = run_on_two_ranks(_decomposition_run, tmp_path, mode, 3, 3)
    assert results[0]["owner"] == results[1]["owner"] == OWNER
    for step in range(3):
        for r in range(WORLD):
            record = results[r]["steps"][step]
            for name in ("0.weight", "0.bias"):
                assert torch.equal(record["grads"][name], record["raw"][name]), (step, r, name)
            assert not torch.equal(record["grads"]["2.weight"], record["raw"]["2.weight"])
        first, second = (results[r]["steps"][step] for r in range(WORLD))
        for name in first["grads"]:
            assert torch.equal(first["grads"][name], second["grads"][name]), (step, name)
        if mode == "broadcast_decompositions":
            # owner and receivers hold the same thing: no decomposition on both, or bit-identical
            # tensors (NaN for the failed one)
            for name, factors in first["decompositions"].items():
                for mine, theirs in zip(factors, second["decompositions"][name], strict=True):
                    assert (mine is None) == (theirs is None), name
                    if mine is None:
                        continue
                    assert mine.keys() == theirs.keys()
                    for key in mine:
                        assert torch.equal(bits(mine[key]), bits(theirs[key])), (name, key)
            failed = first["decompositions"]["0.weight"][0]
            assert failed is None or all(torch.isnan(t).all() for t in failed.values())
            healthy = first["decompositions"]["2.weight"]
            assert all(torch.isfinite(t).all() for d in healthy for t in d.values())
    for name in results[0]["params"]:
        assert torch.equal(results[0]["params"][name], results[1]["params"][name]), name


@pytest.mark.parametrize("mode", ["broadcast_decompositions", "broadcast_gradients"])
def test_failed_decomposition_recovers_like_one_rank(tmp_path: Path, mode: str) -> None:
    """One rank retries a failed decomposition at the next step, off the inverse schedule
    (``test_faults``). Two ranks must do the same: ``eigh`` fails at step 0 only, so at step 1
    (not an inverse-update step) layer 0 is preconditioned again."""
    results = run_on_two_ranks(_decomposition_run, tmp_path, mode, 1, 2)
    for r in range(WORLD):
        step0, step1 = results[r]["steps"]
        assert torch.equal(step0["grads"]["0.weight"], step0["raw"]["0.weight"])
        assert not torch.equal(step1["grads"]["0.weight"], step1["raw"]["0.weight"]), (
            f"rank {r}: layer 0 still has the raw gradient at step 1: the failed decomposition "
            "was not retried off-schedule, unlike on one rank"
        )
    for name in results[0]["params"]:
        assert torch.equal(results[0]["params"][name], results[1]["params"][name]), name
