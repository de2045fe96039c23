"""The same strategy from the unified ``lightning`` package (``lightning.pytorch``)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

L = pytest.importorskip("lightning.pytorch")

from lightning_kfac.lightning import KFACDDPStrategy  # noqa: E402  (registers in lightning.pytorch)
from tests.lightning_support import (  # noqa: E402
    make_dataset,
    make_network,
    relative_difference,
    run_fresh_python,
)


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


def run_child(code: str) -> str:
    """``code`` in a fresh interpreter importing this checkout (nothing of Lightning imported yet);
    its stdout."""
    return run_fresh_python(code, timeout=150)


def test_names_registered_in_lightning_pytorch_imported_after_lightning_kfac() -> None:
    """``import lightning_kfac`` imports no Lightning; the names reach ``lightning.pytorch`` when
    the user imports it later, and the ``pytorch_lightning`` class given to the unified Trainer
    fails with a message naming the class to use."""
    out = run_child(
        """
        import sys
        import lightning_kfac
        assert "lightning" not in sys.modules and "pytorch_lightning" not in sys.modules
        import lightning.pytorch as L
        from lightning_kfac.lightning import KFACDDPStrategy as Unified
        trainer = L.Trainer(strategy="kfac_ddp", accelerator="cpu", devices=1, logger=False)
        assert type(trainer.strategy) is Unified, trainer.strategy
        from lightning_kfac import KFACDDPStrategy
        try:
            L.Trainer(strategy=KFACDDPStrategy(), accelerator="cpu", devices=1)
        except ValueError as error:
            print("ERROR:", error)
        import pytorch_lightning as pl
        trainer = pl.Trainer(strategy="kfac_ddp_fork", accelerator="cpu", devices=1, logger=False)
        assert type(trainer.strategy) is KFACDDPStrategy
        """
    )
    (error,) = [line for line in out.splitlines() if line.startswith("ERROR:")]
    assert "use lightning_kfac.lightning.KFACDDPStrategy" in error


def test_names_registered_in_lightning_pytorch_imported_before_lightning_kfac() -> None:
    run_child(
        """
        import lightning.pytorch as L
        import lightning_kfac
        from lightning_kfac.lightning import KFACDDPStrategy
        for name in ("kfac_ddp", "kfac_ddp_spawn", "kfac_ddp_fork"):
            trainer = L.Trainer(strategy=name, accelerator="cpu", devices=1, logger=False)
            assert type(trainer.strategy) is KFACDDPStrategy, name
        """
    )


class MixupClassifier(UnifiedClassifier):
    def __init__(self) -> None:
        super().__init__(batch_size=16)
        self.label_types: list[str] = []

    def training_step(self, batch, batch_idx):
        self.label_types.append(type(batch[1]).__name__)
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("module", ["lightning_kfac", "lightning_kfac.lightning"])
def test_mixup_callback_with_the_unified_trainer(tmp_path: Path, module: str) -> None:
    """``lightning_kfac.MixupCallback`` works with ``lightning.pytorch.Trainer`` 2.6 as it is; the
    subclass in ``lightning_kfac.lightning`` is also a ``lightning.pytorch.Callback`` (LightningCLI,
    and ``lightning`` 2.4, whose Trainer rejects other callbacks)."""
    import lightning

    version = tuple(map(int, lightning.__version__.split(".")[:2]))
    if module == "lightning_kfac" and version < (2, 6):
        pytest.skip("lightning < 2.6 accepts only lightning.pytorch callbacks (seen with 2.4.0)")
    callback = importlib.import_module(module).MixupCallback(alpha=0.4)
    assert isinstance(callback, L.Callback) == (module == "lightning_kfac.lightning")
    classifier = MixupClassifier()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        default_root_dir=str(tmp_path),
    )
    trainer.fit(classifier)
    assert classifier.label_types == ["MixedLabels", "MixedLabels"]
