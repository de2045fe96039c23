"""The examples: CIFAR-10 loader on generated files and train.py (the study: test_study*.py)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from examples.data import (
    CIFAR10_TEST_FILE,
    CIFAR10_TRAIN_FILES,
    CIFAR10DataModule,
    load_cifar10_batch,
)


def write_cifar_files(
    directory: Path, per_file: int = 6
) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Small files in the standard python-version format: a pickled dict with b'data' (uint8,
    [N, 3072] = 1024 red, 1024 green, 1024 blue values, row-major) and b'labels'."""
    rng = np.random.default_rng(0)
    written = {}
    for name in [*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE]:
        data = rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_file).tolist()
        with open(directory / name, "wb") as handle:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels}, handle)
        written[name] = (data, labels)
    return written


def test_cifar10_loader_reads_the_standard_files(tmp_path: Path) -> None:
    written = write_cifar_files(tmp_path)
    images, labels = load_cifar10_batch(tmp_path / "data_batch_3")
    data, expected_labels = written["data_batch_3"]
    assert images.shape == (6, 3, 32, 32) and images.dtype == np.uint8
    assert labels.tolist() == expected_labels
    # channel c, row h, column w is entry c·1024 + h·32 + w of the flat record
    assert images[2, 1, 5, 7] == data[2, 1 * 1024 + 5 * 32 + 7]
    module = CIFAR10DataModule(tmp_path, batch_size=4)
    module.setup()
    assert len(module.train_set) == 30 and len(module.test_set) == 6
    x, y = module.train_set.tensors
    assert x.shape == (30, 3, 32, 32) and y.dtype == torch.int64
    assert float(x.mean()) == pytest.approx(0.0, abs=1e-5)  # standardised with train statistics


def test_cifar10_loader_names_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        CIFAR10DataModule(tmp_path).setup()


def test_train_script_is_a_lightning_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``examples/train.py fit`` with K-FAC (class path and options) and mixup from the command
    line, 2 forked ranks, CSV logger: K-FAC's figures reach the log, the verdict line is printed."""
    from examples.train import main

    cli = main(
        [
            "fit",
            "--data=TeacherStudentDataModule",
            "--data.batch_size=256",
            "--trainer.max_epochs=2",
            "--trainer.logger=CSVLogger",
            f"--trainer.logger.save_dir={tmp_path}",
            "--trainer.strategy=lightning_kfac.KFACDDPStrategy",
            "--trainer.strategy.damping=1e-2",
            "--trainer.strategy.start_method=fork",
            "--trainer.devices=2",
            "--trainer.callbacks+=lightning_kfac.MixupCallback",
            "--trainer.callbacks.alpha=0.4",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert cli.trainer.strategy.kfac_options.damping == 1e-2
    assert cli.model.hparams.input_shape == (32,) and cli.model.hparams.batch_size == 256
    metrics = next(tmp_path.glob("**/metrics.csv")).read_text()
    assert "kfac/damping" in metrics.splitlines()[0] and "mixup/lambda" in metrics
    out = capsys.readouterr().out
    assert "test accuracy" in out and "after 2 epochs (KFACDDPStrategy, 2 processes)" in out


def test_plain_pytorch_example_ends_with_a_verdict(capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("sklearn")
    from examples.digits_plain_pytorch import main

    main(["--epochs", "1"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("verdict: ") and "after 1 epochs at batch 256, seed 0" in last
    assert " wins, test accuracy " in last or "a tie" in last
