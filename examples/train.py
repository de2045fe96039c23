"""Train a classifier with Lightning's LightningCLI, optionally with K-FAC and mixup, logged to W&B.

    python examples/train.py fit                                       # digits, SGD, 1 process
    python examples/train.py fit --trainer.devices 2 \\
        --trainer.strategy lightning_kfac.KFACDDPStrategy --trainer.strategy.damping 1e-2 \\
        --trainer.callbacks+ lightning_kfac.MixupCallback --trainer.callbacks.alpha 0.4
    python examples/train.py fit --config config.yaml                # the same, from YAML
    python examples/train.py fit --data CIFAR10DataModule \\
        --data.data_dir ~/data/cifar-10-batches-py --trainer.strategy kfac_ddp
    python examples/train.py fit --print_config                      # the full YAML config

It is Lightning's own ``LightningCLI`` (``jsonargparse``): every Trainer argument is
``--trainer.<name>``, the strategy is a class path with its K-FAC options as
``--trainer.strategy.<name>`` (or a registered name: ``kfac_ddp``, ``kfac_ddp_fork``, ``ddp``),
callbacks are added with ``--trainer.callbacks+``, and ``--config`` reads the same keys from YAML::

    trainer:
      devices: 2
      strategy:
        class_path: lightning_kfac.KFACDDPStrategy
        init_args: {damping: 1.0e-2, inverse_update_interval: 10}
      callbacks:
        - class_path: lightning_kfac.MixupCallback
          init_args: {alpha: 0.4}

Data (``--data``, a subclass of ``examples.data.TensorDataModule``): ``DigitsDataModule``
(scikit-learn's bundled images, default), ``TeacherStudentDataModule`` (synthetic),
``CIFAR10DataModule`` (python-version batch files in ``--data.data_dir``; nothing is downloaded);
``--data.batch_size`` is the global batch. The model's input shape, classes and batch size follow
the data. Logging: ``WandbLogger`` by default — offline unless a W&B API key is configured, with
the ``wandb sync`` command printed — or ``--trainer.logger CSVLogger``.

``fit_run`` below is the same training as one Python call (the large-batch study uses it).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

if __package__ in (None, ""):  # `python examples/train.py`: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.data import make_datamodule
from examples.model import Classifier
from lightning_kfac import KFACDDPStrategy, KFACOptions, MixupCallback
from lightning_kfac.strategy import STRATEGY_NAMES


def wandb_available() -> bool:
    try:
        import wandb  # noqa: F401
    except ImportError:
        return False
    return True


def wandb_has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def wandb_offline() -> bool:
    """Whether W&B runs are written locally only (no API key, or ``WANDB_MODE`` says so)."""
    if "WANDB_MODE" not in os.environ:
        return not wandb_has_api_key()
    return os.environ["WANDB_MODE"] in ("offline", "dryrun", "disabled")


def make_logger(
    kind: str,
    save_dir: Path,
    project: str,
    name: str,
    group: str | None = None,
    quiet: bool = False,
    *,
    tags: list[str] | None = None,
    job_type: str | None = None,
    config: dict[str, Any] | None = None,
    lean: bool = False,
):
    """``WandbLogger`` (offline without an API key), or a CSV logger on request / without wandb.

    ``group``, ``tags``, ``job_type`` and ``config`` go to ``wandb.init``: the W&B UI groups runs by
    ``group`` and filters them by tags; ``config`` holds what the run was asked to do (the model's
    hyperparameters are added by Lightning). ``lean`` skips W&B's console capture and git
    inspection (many short runs in a row: the study).
    """
    save_dir.mkdir(parents=True, exist_ok=True)
    if kind == "wandb" and not wandb_available():
        print("wandb is not installed: logging to CSV instead", flush=True)
        kind = "csv"
    if kind == "csv":
        from pytorch_lightning.loggers import CSVLogger

        return CSVLogger(save_dir, name=name)
    from pytorch_lightning.loggers import WandbLogger

    if wandb_offline():
        os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    extra: dict[str, Any] = {}
    if lean:
        import wandb

        extra["settings"] = wandb.Settings(console="off", disable_git=True, disable_code=True)
    logger = WandbLogger(
        project=project,
        name=name,
        group=group,
        save_dir=str(save_dir),
        tags=tags,
        job_type=job_type,
        config=config,
        **extra,
    )
    # Lightning always passes ``anonymous``; W&B >= 0.19 then warns that the setting does nothing.
    logger._wandb_init.pop("anonymous", None)
    if os.environ.get("WANDB_MODE") in ("offline", "dryrun") and not quiet:
        print(
            f"W&B is offline: the run is written under {save_dir / 'wandb'}; upload it later with\n"
            f"    wandb sync {save_dir / 'wandb'}/offline-run-*",
            flush=True,
        )
    return logger


class History(pl.Callback):
    """Rank 0 writes the run's curve to JSON: test accuracy per validation, the clean training
    loss, time.

    The training loss is the clean (unmixed) loss of the whole training set in eval mode, taken at
    each evaluation. Subclasses measure more there (``after_training_loss``) and add what they
    measured to the JSON (``results``), as the large-batch study's sharpness does.
    """

    def __init__(self, path: Path, datamodule: Any = None) -> None:
        self.path = path
        self.datamodule = datamodule
        self.curve: list[dict[str, float]] = []
        self.start = 0.0
        self.threads = 0
        self.train_loss = float("nan")

    def _measure_training_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Clean training loss of the training set, then ``after_training_loss``."""
        if trainer.global_rank != 0 or self.datamodule is None:
            return
        x, y = (t.to(pl_module.device) for t in self.datamodule.train_set.tensors)
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            self.train_loss = float(torch.nn.functional.cross_entropy(pl_module(x), y))
        pl_module.train(was_training)
        self.after_training_loss(trainer, pl_module, x, y)

    def after_training_loss(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, x: Tensor, y: Tensor
    ) -> None:
        """Called on rank 0 after each evaluation's ``train_loss``, with the training set
        (gradients enabled); nothing here."""

    def results(self) -> dict[str, Any]:
        """What subclasses add to the run's JSON (after ``wall_time_s``); nothing here."""
        return {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.perf_counter()
        self.threads = torch.get_num_threads()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        # validation runs under inference mode; the Hessian-vector products need autograd
        with torch.inference_mode(False), torch.enable_grad():
            self._measure_training_loss(trainer, pl_module)
        metrics = trainer.callback_metrics
        self.curve.append(
            {
                "step": trainer.global_step,
                "epoch": trainer.current_epoch,
                "val_acc": float(metrics.get("val/acc", float("nan"))),
                "val_loss": float(metrics.get("val/loss", float("nan"))),
                "train_loss": self.train_loss,
                "time_s": time.perf_counter() - self.start,
            }
        )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            elapsed = time.perf_counter() - self.start
            payload = {
                "curve": self.curve,
                "wall_time_s": elapsed,
                **self.results(),
                "threads_per_rank": self.threads,
                "global_batch": (
                    self.datamodule.global_batch_size() if self.datamodule is not None else None
                ),
            }
            self.path.write_text(json.dumps(payload))
            logger = trainer.logger
            if logger is not None and type(logger).__name__ == "WandbLogger":
                import wandb

                wandb.finish()  # forked workers exit without atexit hooks: close the run here


class FixedThreads(pl.Callback):
    """Every rank computes with exactly ``threads`` intra-op threads (results of parallel
    reductions can depend on the thread count). Set in ``setup``, which runs in each worker."""

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        torch.set_num_threads(self.threads)


def make_strategy(name: str, devices: int, kfac_options: KFACOptions | dict[str, Any]) -> Any:
    """A ``KFACDDPStrategy`` for the ``kfac_ddp*`` names (with K-FAC options), else the name."""
    if name in STRATEGY_NAMES:
        if isinstance(kfac_options, KFACOptions):
            return KFACDDPStrategy(kfac_options, start_method=STRATEGY_NAMES[name])
        return KFACDDPStrategy(start_method=STRATEGY_NAMES[name], **kfac_options)
    return name


def fit_run(
    *,
    data: str = "digits",
    data_dir: str | None = None,
    batch_size: int | str = 64,
    base_batch_size: int = 32,
    base_lr: float = 0.05,
    base_warmup_epochs: float = 0.1,
    max_epochs: int = 20,
    strategy: str = "auto",
    accelerator: str = "cpu",
    devices: int = 1,
    num_nodes: int = 1,
    precision: str = "32-true",
    mixup_alpha: float = 0.0,
    kfac_options: KFACOptions | dict[str, Any] | None = None,
    seed: int = 0,
    logger: Any = None,
    history_path: Path,
    extra_callbacks: list[pl.Callback] | None = None,
    val_every_n_epochs: int = 1,
    validation: bool = False,
    history: Callable[[Path, Any], History] = History,
    deterministic: bool = True,
    threads_per_rank: int | None = None,
    log_every_n_steps: int = 1,
) -> dict[str, Any]:
    """Train once; return rank 0's history (read back from ``history_path``).

    ``batch_size`` is the global batch (``"full"``: the whole training set per step). ``seed``
    fixes the initialisation, the data order and mixup's draws. ``deterministic`` asks torch for
    deterministic algorithms (``Trainer(deterministic=True)``; the flag stays set in this process
    afterwards, as Lightning leaves it). ``threads_per_rank`` fixes each rank's intra-op threads.
    ``history`` makes the callback that records the run from ``(history_path, datamodule)``
    (``History`` or a subclass that measures more).
    """
    pl.seed_everything(seed, workers=True, verbose=False)
    datamodule = make_datamodule(data, batch_size, data_dir, validation=validation, seed=seed)
    model = Classifier(
        input_shape=datamodule.input_shape,
        num_classes=datamodule.num_classes,
        base_lr=base_lr,
        base_batch_size=base_batch_size,
        batch_size=datamodule.global_batch_size(),
        base_warmup_epochs=base_warmup_epochs,
    )
    callbacks: list[pl.Callback] = [
        history(history_path, datamodule),
        *(extra_callbacks or []),
    ]
    if threads_per_rank is not None:
        callbacks.append(FixedThreads(threads_per_rank))
    if mixup_alpha > 0:
        callbacks.append(MixupCallback(alpha=mixup_alpha))
    trainer = pl.Trainer(
        strategy=make_strategy(strategy, devices, kfac_options or {}),
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        precision=precision,
        max_epochs=max_epochs,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=val_every_n_epochs,
        log_every_n_steps=log_every_n_steps,
        deterministic=deterministic,
    )
    trainer.fit(model, datamodule=datamodule)
    return json.loads(history_path.read_text())


def _train_cli() -> type:
    """The ``LightningCLI`` subclass (defined on first use: ``pytorch_lightning.cli`` imports
    jsonargparse, which only the command line needs)."""
    from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

    class TrainCLI(LightningCLI):
        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            parser.set_defaults({"data": {"class_path": "examples.data.DigitsDataModule"}})
            # The model's shape, classes and (global) batch size follow the data.
            for target, read in (
                ("model.input_shape", lambda data: tuple(data.input_shape)),
                ("model.num_classes", lambda data: data.num_classes),
                ("model.batch_size", lambda data: data.global_batch_size()),
            ):
                parser.link_arguments("data", target, compute_fn=read, apply_on="instantiate")

        def after_fit(self) -> None:
            trainer = self.trainer
            accuracy = trainer.callback_metrics.get("val/acc")
            if trainer.is_global_zero and accuracy is not None:
                # (the Trainer of a fork/spawn launch does not get the workers' step count back)
                print(
                    f"test accuracy {float(accuracy):.4f} after {trainer.max_epochs} epochs "
                    f"({type(trainer.strategy).__name__}, {trainer.world_size} processes)",
                    flush=True,
                )
            if os.environ.get("WANDB_MODE") in ("offline", "dryrun") and any(
                type(logger).__name__ == "WandbLogger" for logger in trainer.loggers
            ):
                print(
                    "W&B is offline: upload the run later with\n"
                    f"    wandb sync {Path(trainer.loggers[0].save_dir) / 'wandb'}/offline-run-*",
                    flush=True,
                )

    return TrainCLI


def main(args: list[str] | None = None) -> Any:
    """Run the command line (``args`` instead of ``sys.argv[1:]``); the ``LightningCLI``."""
    from examples.data import TensorDataModule

    os.environ.setdefault("WANDB_SILENT", "true")
    out = "runs/train"
    return _train_cli()(
        Classifier,
        TensorDataModule,
        subclass_mode_data=True,
        args=args,
        seed_everything_default=0,
        save_config_callback=None,
        parser_kwargs={
            "description": __doc__.splitlines()[0],
            "default_env": False,
            "fit": {"default_config_files": []},
        },
        trainer_defaults={
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 20,
            "check_val_every_n_epoch": 1,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
            "enable_checkpointing": False,
            "enable_model_summary": False,
            "default_root_dir": out,
            "logger": {
                "class_path": "pytorch_lightning.loggers.WandbLogger",
                "init_args": {
                    "project": "lightning-kfac",
                    "save_dir": out,
                    "offline": wandb_offline(),
                },
            },
        },
    )


if __name__ == "__main__":
    main()
