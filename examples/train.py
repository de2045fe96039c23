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
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python examples/train.py`: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning_kfac  # noqa: F401  (registers kfac_ddp, kfac_ddp_fork, kfac_ddp_spawn)
from examples.model import Classifier
from examples.wandb_mode import wandb_offline


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
