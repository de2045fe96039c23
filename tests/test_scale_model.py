"""The byte model of ``benchmarks/scale_model.py`` against what the library logs.

Real 2- and 4-process gloo runs (``kfac_ddp_fork``) of small versions of the benchmark's own model
functions — a bottleneck ResNet with BatchNorm and a BERT-style masked LM whose decoder is tied to
the word embeddings — in both distribution modes. Four steps with factor interval 2 and inverse
interval 3 cover every kind of step: factors and decompositions (0), neither (1), factors only (2),
decompositions only (3). The bytes predicted from the traced shapes must equal, as integers, the
``kfac/bytes_communicated`` every rank logged at every step (rank 0's through ``CSVLogger``, every
rank's through ``trainer.callback_metrics``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.scale_model import (
    BertConfig,
    BertForPreTraining,
    ResNet,
    logged_bytes,
    owners,
    pretraining_loss,
    trace,
)
from lightning_kfac import KFACDDPStrategy
from tests.lightning_support import trainer_kwargs

STEPS = 4
FACTOR_INTERVAL, INVERSE_INTERVAL = 2, 3
BATCH = 4  # per rank
VOCAB, LENGTH = 40, 8


class SmallCNN(pl.LightningModule):
    """``ResNet`` of the benchmark with two one-block stages, widths 4 and 8, BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = ResNet(layers=(1, 1), base_width=4, num_classes=3, in_channels=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def example(self) -> tuple[torch.Tensor, ...]:
        return (torch.zeros(2, 2, 16, 16),)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(1)
        data = TensorDataset(
            torch.randn(64, 2, 16, 16, generator=gen), torch.randint(0, 3, (64,), generator=gen)
        )
        return DataLoader(data, batch_size=BATCH)


class SmallLM(pl.LightningModule):
    """``BertForPreTraining`` of the benchmark, one layer of width 16: tied embedding/decoder."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=VOCAB, hidden=16, layers=1, heads=2, intermediate=32, max_positions=16
        )
        self.net = BertForPreTraining(config)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(ids)

    def example(self) -> tuple[torch.Tensor, ...]:
        return (torch.zeros(2, LENGTH, dtype=torch.long),)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids, nsp = batch
        return pretraining_loss(self(ids), ids, nsp)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(1)
        data = TensorDataset(
            torch.randint(0, VOCAB, (64, LENGTH), generator=gen),
            torch.randint(0, 2, (64,), generator=gen),
        )
        return DataLoader(data, batch_size=BATCH)


MODELS = {"cnn": SmallCNN, "lm": SmallLM}


class RecordBytes(pl.Callback):
    """Every rank writes the ``kfac/bytes_communicated`` it logged at each step."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.values: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        value = trainer.callback_metrics["kfac/bytes_communicated"]
        self.values.append(float(value.double()))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        path = self.directory / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.values))


def run(tmp_path: Path, model: str, devices: int, mode: str) -> tuple[list[list[float]], list]:
    """Train; return the bytes every rank logged per step and rank 0's CSV rows."""
    trainer = pl.Trainer(
        strategy=KFACDDPStrategy(
            start_method="fork",
            distribution_mode=mode,
            factor_update_interval=FACTOR_INTERVAL,
            inverse_update_interval=INVERSE_INTERVAL,
            factor_bucket_cap_mb=1e-3,  # several buckets: bucketing must not change the bytes
        ),
        devices=devices,
        max_steps=STEPS,
        log_every_n_steps=1,
        callbacks=[RecordBytes(tmp_path)],
        **trainer_kwargs(tmp_path, logger=CSVLogger(tmp_path, name="csv", version=0)),
    )
    trainer.fit(MODELS[model]())
    per_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(devices)]
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("kfac/bytes_communicated")]
    return per_rank, rows


@pytest.mark.parametrize("mode", ["broadcast_decompositions", "broadcast_gradients"])
@pytest.mark.parametrize("devices", [2, 4])
@pytest.mark.parametrize("model", ["cnn", "lm"])
def test_predicted_bytes_equal_logged_bytes(
    tmp_path: Path, model: str, devices: int, mode: str
) -> None:
    module = MODELS[model]()
    blocks = trace(module, module.example())
    if model == "lm":  # the tied embedding/decoder: two uses whose gradients are all-reduced
        assert sum(b.alias_numel > 0 for b in blocks) == 2
        assert any(f.diagonal for b in blocks for f in b.factors)  # one-hot embedding A
    else:
        assert {b.kind for b in blocks} == {"conv", "norm", "linear"}
    assert len(set(owners(blocks, devices))) == devices  # every rank owns (and sends) something
    expected = [
        logged_bytes(blocks, devices, mode, step, FACTOR_INTERVAL, INVERSE_INTERVAL)
        for step in range(STEPS)
    ]  # [step][rank]
    assert max(max(step) for step in expected) < 2**24  # exact in the float32 Lightning logs

    logged, csv_rows = run(tmp_path, model, devices, mode)

    for rank in range(devices):
        assert [int(v) for v in logged[rank]] == [expected[s][rank] for s in range(STEPS)], rank
        assert all(v == int(v) for v in logged[rank])
    assert [float(r["kfac/bytes_communicated"]) for r in csv_rows] == [
        float(expected[s][0]) for s in range(STEPS)
    ]
    assert [int(r["step"]) for r in csv_rows] == list(range(STEPS))
    # The four steps differ as scheduled: factors at 0 and 2, decompositions at 0 and 3.
    if mode == "broadcast_decompositions":
        assert len({tuple(step) for step in expected}) == 4
