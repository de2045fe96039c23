"""``torch.compile`` under K-FAC: the same coverage and the same steps as eager, the compiled
graphs kept for the steps that trace nothing.

A training forward that traces (discovery, capture steps, models with a tied parameter) runs
eagerly (``torch.compiler.set_stance("force_eager")``) with the sites' hooks on; the others run
the compiled graphs without any of K-FAC's hooks on the compiled modules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_kfac import KFACDDPStrategy, KFACPreconditioner
from tests.helpers import assert_close
from tests.lightning_support import SaveResult, relative_difference, trainer_kwargs

pytestmark = pytest.mark.usefixtures("float64")


def body() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 8 * 8, 10),
    )  # fmt: skip


def batch(step: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(step)
    return torch.randn(16, 3, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)


def train(model: nn.Module, steps: int = 6) -> KFACPreconditioner:
    pre = KFACPreconditioner(model, lr=0.1, factor_update_interval=2, inverse_update_interval=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        x, y = batch(step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
        opt.step()
    return pre


def test_compiled_root_module_takes_the_eager_steps() -> None:
    """The whole model compiled and given to K-FAC as called: its hooks run outside the graph."""
    eager = body()
    pre_eager = train(eager)
    compiled_body = body()
    pre = train(torch.compile(compiled_body, backend="aot_eager"))
    assert pre.preconditioned_fraction == pre_eager.preconditioned_fraction == 1.0
    for mine, theirs in zip(compiled_body.parameters(), eager.parameters(), strict=True):
        assert_close(mine, theirs, rtol=1e-12, atol=1e-14)


def test_compiled_model_takes_the_eager_steps_and_keeps_its_graph() -> None:
    """Inductor: the same steps as eager to float64 round-off; the steps without capture run
    the compiled graph (Dynamo compiles once and never recompiles for K-FAC's sake)."""
    import torch._dynamo

    torch._dynamo.reset()
    eager = body()
    pre_eager = train(eager)
    compiled_body = body()
    compiled = torch.compile(compiled_body)
    counters = torch._dynamo.utils.counters
    counters.clear()
    pre = train(compiled)
    assert pre.preconditioned_fraction == pre_eager.preconditioned_fraction == 1.0
    for mine, theirs in zip(compiled_body.parameters(), eager.parameters(), strict=True):
        assert_close(mine, theirs, rtol=1e-9, atol=1e-12)
    assert counters["stats"]["unique_graphs"] >= 1  # the non-capture steps ran compiled
    assert not counters["recompiles"], dict(counters["recompiles"])


class Classifier(pl.LightningModule):
    """A LightningModule whose network is compiled inside (``torch.compile(net)``), or whose
    ``forward`` is (``compile_forward``)."""

    def __init__(self, how: str, batch_size: int) -> None:  # how: inner, forward, eager
        super().__init__()
        self.how = how
        self.net = body()
        if how == "inner":
            self.net = torch.compile(self.net, backend="aot_eager")
        elif how == "forward":
            self.forward = torch.compile(self.forward, backend="aot_eager")  # type: ignore[method-assign]
        self.batch_size = batch_size

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(3)
        data = TensorDataset(torch.randn(32, 3, 8, 8, generator=gen), torch.randint(0, 10, (32,)))
        return DataLoader(data, batch_size=self.batch_size)


def fit(tmp_path: Path, name: str, how: str, devices: int) -> dict[str, Any]:
    path = tmp_path / f"{name}.pt"
    strategy = KFACDDPStrategy(
        start_method="fork", factor_update_interval=2, inverse_update_interval=2, kl_clip=1e-2
    )
    trainer = pl.Trainer(
        strategy=strategy, devices=devices, max_steps=4, callbacks=[SaveResult(path)],
        **trainer_kwargs(tmp_path),
    )  # fmt: skip
    module = Classifier("eager" if how == "lightning" else how, batch_size=16 // devices)
    if how == "lightning":  # Lightning compiles forward and training_step of the module
        module = torch.compile(module, backend="aot_eager")
    trainer.fit(module)
    return torch.load(path)


@pytest.mark.parametrize("devices", [1, 2])
@pytest.mark.parametrize("how", ["inner", "forward", "lightning"])
def test_compiled_lightning_modules_train_like_eager(
    tmp_path: Path, how: str, devices: int
) -> None:
    compiled = fit(tmp_path, "compiled", how, devices)
    eager = fit(tmp_path, "eager", "eager", devices)
    assert compiled["kfac_steps"] == eager["kfac_steps"] == 4
    assert compiled["preconditioned_fraction"] == eager["preconditioned_fraction"] == 1.0
    params = {k.replace("._orig_mod", ""): v for k, v in compiled["params"].items()}
    assert relative_difference(params, eager["params"]) <= 1e-9
