"""Checkpoint resume, logged figures and profiling of KFACDDPStrategy (real gloo processes)."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger

from lightning_kfac import KFACDDPStrategy
from tests.lightning_support import (
    SaveAfterEpoch,
    SaveResult,
    TinyClassifier,
    destroy_process_group,
    relative_difference,
    trainer_kwargs,
)

EPOCHS = 3  # 96 samples / (2 ranks x 8) = 6 steps per epoch


def run(
    tmp_path: Path, name: str, devices: int, batch_size: int, *, ckpt_path=None, extra=()
) -> dict:
    # factor updates every step, inverses every 4: the checkpoint after step 12 holds factors
    # newer than their decompositions (last inverse update at step 8), the demanding case.
    strategy = KFACDDPStrategy(start_method="fork", inverse_update_interval=4, kl_clip=1e-2)
    trainer = pl.Trainer(
        strategy=strategy,
        devices=devices,
        max_epochs=EPOCHS,
        callbacks=[SaveResult(tmp_path / f"{name}.pt"), *extra],
        **trainer_kwargs(tmp_path),
    )
    trainer.fit(TinyClassifier(batch_size=batch_size), ckpt_path=ckpt_path)
    return torch.load(tmp_path / f"{name}.pt")


@pytest.mark.parametrize("resume_devices", [2, 1])
def test_resumed_run_matches_uninterrupted_run(tmp_path: Path, resume_devices: int) -> None:
    checkpoint = tmp_path / "epoch1.ckpt"
    full = run(tmp_path, "full", 2, 8, extra=[SaveAfterEpoch(checkpoint, epoch=1)])
    assert checkpoint.exists()
    state = torch.load(checkpoint, weights_only=False)["kfac"]
    assert state["steps"] == 12 and state["last_inverse_step"] == 8
    # 1 rank with twice the batch is the same computation as 2 ranks (see test_strategy).
    resumed = run(tmp_path, "resumed", resume_devices, 16 // resume_devices, ckpt_path=checkpoint)
    assert full["global_step"] == resumed["global_step"] == 18
    assert full["kfac_steps"] == resumed["kfac_steps"] == 18
    assert relative_difference(resumed["params"], full["params"]) <= 1e-9


EXPECTED_KEYS = {
    "kfac/damping",
    "kfac/kl_scale",
    "kfac/factors_time_ms",
    "kfac/inverses_time_ms",
    "kfac/precondition_time_ms",
    "kfac/bytes_communicated",
    "kfac/amp_skipped_steps",
}


def test_figures_reach_the_logger_and_profiler(tmp_path: Path) -> None:
    trainer = pl.Trainer(
        strategy=KFACDDPStrategy(start_method="fork", kl_clip=1e-2),
        devices=2,
        max_steps=4,
        log_every_n_steps=1,
        logger=CSVLogger(tmp_path, name="csv", version=0),
        profiler="simple",
        callbacks=[SaveResult(tmp_path / "result.pt")],
        **{k: v for k, v in trainer_kwargs(tmp_path).items() if k != "logger"},
    )
    trainer.fit(TinyClassifier(batch_size=8))
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert set(rows[0]) >= EXPECTED_KEYS
    kfac_rows = [r for r in rows if r["kfac/damping"]]
    assert len(kfac_rows) == 4
    assert all(float(r["kfac/damping"]) == pytest.approx(1e-3, rel=1e-6) for r in kfac_rows)
    assert all(0 < float(r["kfac/kl_scale"]) <= 1 for r in kfac_rows)
    # every step reduces factors across the 2 ranks: upper triangles of 3 layers' A and G
    assert all(float(r["kfac/bytes_communicated"]) > 0 for r in kfac_rows)
    profiled = torch.load(tmp_path / "result.pt")["profiled"]
    assert {"kfac/factors", "kfac/inverses", "kfac/precondition"} <= set(profiled)


def test_figures_reach_wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    from pytorch_lightning.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(save_dir=str(tmp_path), project="lightning-kfac-tests")
    trainer = pl.Trainer(  # in-process (popen, one device): the run is finished here
        strategy=KFACDDPStrategy(start_method="popen", kl_clip=1e-2),
        devices=1,
        max_steps=3,
        log_every_n_steps=1,
        logger=logger,
        **{k: v for k, v in trainer_kwargs(tmp_path).items() if k != "logger"},
    )
    trainer.fit(TinyClassifier(batch_size=16))
    wandb.finish()
    # finish() returns once the run is closed, but the W&B service may still be writing the
    # run file (CI read a bare header once); teardown waits for the service to exit.
    wandb.teardown()
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    payload = runs[0].read_bytes()
    for key in EXPECTED_KEYS:
        assert key.encode() in payload, key
    assert os.environ.get("WANDB_MODE") == "offline"


class RecordingBar(TQDMProgressBar):
    """A TQDM bar that records what goes through its own ``print``."""

    def __init__(self) -> None:
        super().__init__()
        self.printed: list[str] = []

    def print(self, *args, **kwargs) -> None:
        self.printed.append(" ".join(map(str, args)))
        super().print(*args, **kwargs)


@pytest.mark.parametrize("bar", [True, False])
def test_coverage_table_goes_through_the_progress_bar(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, bar: bool
) -> None:
    """With a progress bar the table is printed by the bar (which clears and redraws its line
    around it) instead of landing in the middle of the bar's line; without one it is info."""
    recording = RecordingBar()
    overrides = dict(trainer_kwargs(tmp_path), enable_progress_bar=bar)
    trainer = pl.Trainer(
        strategy=KFACDDPStrategy(start_method="popen"),
        devices=1,
        max_steps=2,
        callbacks=[recording] if bar else [],
        **overrides,
    )
    with caplog.at_level(logging.INFO):
        try:
            trainer.fit(TinyClassifier(batch_size=16))
        finally:
            destroy_process_group()
    logged = [r.getMessage() for r in caplog.records if "K-FAC coverage" in r.getMessage()]
    if bar:
        assert len(recording.printed) == 1 and "K-FAC coverage: 100.0 %" in recording.printed[0]
        assert not logged
    else:
        assert len(logged) == 1
