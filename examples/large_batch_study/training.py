"""One training run of the study: data, network, optimizer, strategy, and what rank 0 records.

The study trains through its own small ``fit`` rather than ``examples/train.py`` so that its runs
do not change when that script does; it shares the data modules (``examples/data.py``) and the
classifier (``examples/model.py``).

``RunRecord`` is the run's record, written by rank 0 as JSON: the test (or validation) accuracy
and loss after every epoch, the clean training loss, the time spent in training steps so far,
K-FAC's preconditioned fraction, and the sharpness at matched training losses.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from examples.data import make_datamodule
from examples.large_batch_study.sharpness import (
    SHARPNESS_ITERATIONS,
    SHARPNESS_TOLERANCE,
    top_hessian_eigenvalue,
)
from examples.model import Classifier
from lightning_kfac import KFACDDPStrategy, KFACOptions, MixupCallback

#: Evaluations of the clean training loss use batches of this many samples (memory bound).
TRAIN_LOSS_BATCH = 8192


class RunRecord(pl.Callback):
    """Rank 0 records the run and writes it to ``path`` as JSON when training ends.

    After every evaluation: ``val_acc`` and ``val_loss`` (the test set, or the validation split
    when tuning), ``train_loss`` (the clean, unmixed loss of the whole training set in eval
    mode), ``train_time_s`` (seconds spent inside training steps so far — forward, backward,
    K-FAC, optimizer — on rank 0, evaluations and start-up excluded) and ``time_s`` (since the
    fit started). When the training loss first falls to each of ``levels``: the top Hessian
    eigenvalue of the loss on the first ``samples`` training samples (``sharpness``). After
    the first step: K-FAC's ``preconditioned_fraction`` (``None`` without K-FAC). At the end:
    ``measure_time_s``, the time this callback spent measuring. With ``train_loss=False`` (tuning
    runs) neither the training loss nor the sharpness is measured (``train_loss`` is NaN).
    """

    def __init__(
        self,
        path: Path,
        datamodule: Any,
        *,
        levels: Sequence[float] = (),
        samples: int = 256,
        train_loss: bool = True,
    ) -> None:
        self.path = path
        self.measure_train_loss = train_loss
        self.datamodule = datamodule
        self.levels = tuple(sorted(levels, reverse=True))
        self.samples = samples
        self.curve: list[dict[str, float]] = []
        self.sharpness: dict[str, dict[str, float]] = {}
        self.preconditioned_fraction: float | None = None
        self.started = 0.0
        self.step_started = 0.0
        self.train_time = 0.0
        self.measure_time = 0.0
        self.threads = 0

    # -- timing ---------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = time.perf_counter()
        self.threads = torch.get_num_threads()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.step_started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.train_time += time.perf_counter() - self.step_started
        if self.preconditioned_fraction is None:
            pre = getattr(trainer.strategy, "preconditioner", None)
            fraction = getattr(pre, "preconditioned_fraction", None)
            if fraction is not None:
                self.preconditioned_fraction = float(fraction)

    # -- evaluations ------------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.global_rank != 0:
            return
        # validation runs under inference mode; the Hessian-vector products need autograd
        started = time.perf_counter()
        train_loss = math.nan
        if self.measure_train_loss:
            with torch.inference_mode(False), torch.enable_grad():
                train_loss = self._measure(trainer, pl_module)
        self.measure_time += time.perf_counter() - started
        metrics = trainer.callback_metrics
        self.curve.append(
            {
                "step": trainer.global_step,
                "epoch": trainer.current_epoch,
                "val_acc": float(metrics.get("val/acc", math.nan)),
                "val_loss": float(metrics.get("val/loss", math.nan)),
                "train_loss": train_loss,
                "train_time_s": self.train_time,
                "time_s": time.perf_counter() - self.started,
            }
        )

    def _measure(self, trainer: pl.Trainer, module: pl.LightningModule) -> float:
        """The clean training loss; then the sharpness at every level it reached first now."""
        x, y = (t.to(module.device) for t in self.datamodule.train_set.tensors)
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                total = sum(
                    float(F.cross_entropy(module(xb), yb, reduction="sum"))
                    for xb, yb in zip(
                        x.split(TRAIN_LOSS_BATCH), y.split(TRAIN_LOSS_BATCH), strict=True
                    )
                )
            loss = total / len(y)
            reached = [
                f"{level:g}"
                for level in self.levels
                if loss <= level and f"{level:g}" not in self.sharpness
            ]
            if reached:
                measured = self._sharpness(module, x[: self.samples], y[: self.samples])
                for level in reached:
                    self.sharpness[level] = {
                        **measured,
                        "train_loss": loss,
                        "step": trainer.global_step,
                    }
        finally:
            module.train(was_training)
        return loss

    @staticmethod
    def _sharpness(module: nn.Module, x: Tensor, y: Tensor) -> dict[str, float]:
        """``λ_max`` of the Hessian of the mean cross-entropy on ``x`` (eval mode), by at most
        ``SHARPNESS_ITERATIONS`` Hessian-vector products; also how many were needed."""
        products = 0

        def loss() -> Tensor:
            nonlocal products
            products += 1
            return F.cross_entropy(module(x), y)

        value = top_hessian_eigenvalue(
            loss,
            module.parameters(),
            iterations=SHARPNESS_ITERATIONS,
            tolerance=SHARPNESS_TOLERANCE,
            generator=torch.Generator().manual_seed(0),
        )
        return {"top_eigenvalue": value, "hessian_vector_products": products}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "curve": self.curve,
            "wall_time_s": time.perf_counter() - self.started,
            "train_time_s": self.train_time,
            "measure_time_s": self.measure_time,
            "sharpness": self.sharpness,
            "preconditioned_fraction": self.preconditioned_fraction,
            "threads_per_rank": self.threads,
            "global_batch": self.datamodule.global_batch_size(),
            "train_samples": len(self.datamodule.train_set),
        }
        self.path.write_text(json.dumps(payload))


class FixedThreads(pl.Callback):
    """Every rank computes with exactly ``threads`` intra-op threads (results of parallel
    reductions can depend on the thread count). Set in ``setup``, which runs in each worker."""

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        torch.set_num_threads(self.threads)


def fit(
    *,
    data: str,
    train_samples: int | None,
    arch: str,
    hidden: int,
    batch_size: int | str,
    base_batch_size: int,
    base_lr: float,
    base_warmup_epochs: float,
    epochs: int,
    optimizer: str,
    kfac: KFACOptions | None,
    mixup: float,
    seed: int,
    validation: bool,
    devices: int,
    threads_per_rank: int,
    history_path: Path,
    levels: Sequence[float] = (),
    sharpness_samples: int = 256,
    logger: Any = None,
    log_every_n_steps: int = 1,
    val_every_n_epochs: int = 1,
    gradient_clip: float | None = None,
) -> dict[str, Any]:
    """Train once on ``devices`` CPU ranks (forked; K-FAC through ``KFACDDPStrategy``); return
    rank 0's record (read back from ``history_path``).

    ``seed`` fixes the initialisation, every rank's data order and mixup's draws; torch runs its
    deterministic algorithms and each rank computes with ``threads_per_rank`` threads, so a rerun
    on the same machine gives the same numbers to the last digit. The evaluation set is scored
    every ``val_every_n_epochs`` epochs (tuning runs: only at the end).
    """
    pl.seed_everything(seed, workers=True, verbose=False)
    datamodule = make_datamodule(
        data, batch_size, validation=validation, seed=seed, train_samples=train_samples
    )
    datamodule.prepare_data()
    model = Classifier(
        input_shape=datamodule.input_shape,
        num_classes=datamodule.num_classes,
        base_lr=base_lr,
        base_batch_size=base_batch_size,
        batch_size=datamodule.global_batch_size(),
        base_warmup_epochs=base_warmup_epochs,
        arch=arch,
        hidden=hidden,
        optimizer=optimizer,
    )
    callbacks: list[pl.Callback] = [
        RunRecord(
            history_path,
            datamodule,
            levels=levels,
            samples=sharpness_samples,
            train_loss=not validation,
        ),
        FixedThreads(threads_per_rank),
    ]
    if mixup > 0:
        callbacks.append(MixupCallback(alpha=mixup))
    strategy: Any = KFACDDPStrategy(kfac, start_method="fork") if kfac else "ddp_fork"
    trainer = pl.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=devices,
        max_epochs=epochs,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=val_every_n_epochs,
        gradient_clip_val=gradient_clip,
        log_every_n_steps=log_every_n_steps,
        deterministic=True,
    )
    trainer.fit(model, datamodule=datamodule)
    return json.loads(history_path.read_text())
