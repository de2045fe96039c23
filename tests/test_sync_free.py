"""K-FAC's step reads nothing back from the device except where the algorithm needs it.

On a GPU every ``.item()``, ``bool(tensor)``, ``tolist()`` and every op with a data-dependent
output size (``nonzero``, ``bincount``, ``unique``, ...) stalls the host until the device catches
up. On the CPU there is no such stall to observe, so the test counts them *by construction*: a
``TorchFunctionMode`` records every call of those functions made while K-FAC runs (capture during
forward/backward, and ``step()``). The only ones allowed are the decompositions' own convergence
checks (one ``eigh`` per group of same-shaped factors) and one fault report per inverse update.
(On a CUDA machine, ``torch.cuda.set_sync_debug_mode("error")`` gives the same check: see the
``gpu``-marked twin below.)
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_kfac import KFACPreconditioner

#: Functions that synchronise the host with a CUDA device.
SYNCING = {
    Tensor.item: "item",
    Tensor.__bool__: "bool",
    Tensor.__int__: "int",
    Tensor.__float__: "float",
    Tensor.__index__: "index",
    Tensor.tolist: "tolist",
    Tensor.numpy: "numpy",
    Tensor.nonzero: "nonzero",
    torch.nonzero: "nonzero",
    torch.bincount: "bincount",
    Tensor.bincount: "bincount",
    torch.unique: "unique",
    torch.masked_select: "masked_select",
    Tensor.masked_select: "masked_select",
    torch.linalg.eigh: "eigh",
    torch.linalg.cholesky: "cholesky",
    torch.linalg.inv: "inv",
}


class SyncCounter(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_function__(
        self, func: Any, types: Any, args: Any = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        name = SYNCING.get(func)
        if name is not None:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


class Net(nn.Module):
    """Every kind of use: conv, norm, embedding, linear, a tied head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.embedding = nn.Embedding(10, 4)
        self.layer_norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embedding.weight

    def forward(self, images: Tensor, tokens: Tensor) -> Tensor:
        features = F.relu(self.norm(self.conv(images))).mean((2, 3))  # [N, 4]
        hidden = self.layer_norm(self.embedding(tokens) + features[:, None])  # [N, T, 4]
        return self.head(hidden)


def batch(step: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(step)
    return torch.randn(6, 2, 5, 5, generator=gen), torch.randint(0, 10, (6, 3), generator=gen)


def run_steps(
    steps: int, inverse_update_interval: int, sampled: bool
) -> tuple[list[Counter[str]], KFACPreconditioner]:
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pre = KFACPreconditioner(
        model,
        optimizer=optimizer,
        inverse_update_interval=inverse_update_interval,
        factor_max_rows=20 if sampled else None,
    )
    counts = []
    for step in range(steps):
        images, tokens = batch(step)
        counter = SyncCounter()
        optimizer.zero_grad()
        with counter:
            logits = model(images, tokens)
        loss = F.cross_entropy(logits.reshape(-1, 10), tokens.reshape(-1))
        with counter:
            loss.backward()
            pre.step()
        optimizer.step()
        counts.append(counter.calls)
    return counts, pre


@pytest.mark.parametrize("sampled", [False, True])
def test_steps_without_inverse_update_never_sync(sampled: bool) -> None:
    counts, _ = run_steps(steps=6, inverse_update_interval=3, sampled=sampled)
    # Step 0 traces the uses and fixes the structure (host work by nature); afterwards only
    # inverse-update steps (3) may touch the host.
    for step in (1, 2, 4, 5):
        assert counts[step] == Counter(), (step, counts[step])


def test_inverse_update_syncs_once_per_decomposition_group_and_once_for_the_report() -> None:
    counts, pre = run_steps(steps=4, inverse_update_interval=3, sampled=False)
    calls = counts[3]
    assert set(calls) <= {"eigh", "tolist"}, calls
    assert calls["tolist"] == 1  # the fault report: all device-side counters in one read
    # Same-shaped dense factors share one batched eigh: conv G, embedding G and head A have
    # side 4, both norms' unit-wise blocks side 2, conv A side 19, head G side 10; the
    # embedding's one-hot A is diagonal and needs none.
    groups = {
        (f.dim, f.value.dtype)
        for block in pre.blocks.values()
        for f in block.factors
        if not f.diagonal
    }
    assert {dim for dim, _ in groups} == {19, 10, 4, 2}
    assert calls["eigh"] == len(groups)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sync_debug_mode_errors_on_no_step_without_inverse_update() -> None:
    """GPU twin of the counter above: CUDA raises on any synchronising call."""
    torch.manual_seed(0)
    model = Net().cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pre = KFACPreconditioner(model, optimizer=optimizer, inverse_update_interval=100)
    for step in range(3):
        images, tokens = (t.cuda() for t in batch(step))
        optimizer.zero_grad()
        if step > 0:
            torch.cuda.set_sync_debug_mode("error")
        try:
            logits = model(images, tokens)
            F.cross_entropy(logits.reshape(-1, 10), tokens.reshape(-1)).backward()
            pre.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        optimizer.step()
