"""The same strategy from the unified ``lightning`` package (``lightning.pytorch``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

L = pytest.importorskip("lightning.pytorch")

from lightning_kfac.lightning import KFACDDPStrategy  # noqa: E402  (registers in lightning.pytorch)
from tests.lightning_support import make_dataset, make_network, relative_difference  # noqa: E402


class UnifiedClassifier(L.LightningModule):
    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.net = make_network(torch.float64)
        self.batch_size = batch_size

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self):
        return DataLoader(make_dataset(torch.float64), batch_size=self.batch_size)


class SaveParams(L.Callback):
    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0:
            steps = trainer.strategy.preconditioner.steps
            torch.save({"params": dict(pl_module.named_parameters()), "steps": steps}, self.path)


def run(tmp_path: Path, strategy, devices: int, batch_size: int, name: str) -> dict:
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=devices,
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SaveParams(tmp_path / name)],
        default_root_dir=str(tmp_path),
    )
    trainer.fit(UnifiedClassifier(batch_size))
    return torch.load(tmp_path / name)


def test_unified_package_names_and_equivalence(tmp_path: Path) -> None:
    trainer = L.Trainer(strategy="kfac_ddp", accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy, KFACDDPStrategy)
    assert isinstance(trainer.strategy, L.strategies.DDPStrategy)
    two = run(tmp_path, "kfac_ddp_fork", 2, 8, "two.pt")
    one = run(tmp_path, KFACDDPStrategy(start_method="fork"), 1, 16, "one.pt")
    assert two["steps"] == one["steps"] == 4
    assert relative_difference(two["params"], one["params"]) <= 1e-9
