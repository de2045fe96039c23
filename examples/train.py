"""Train a classifier with Lightning, optionally with K-FAC and mixup, logged to W&B.

    python examples/train.py                                   # digits, SGD, 1 process
    python examples/train.py --trainer.strategy kfac_ddp_fork --trainer.devices 2 --mixup 0.4
    python examples/train.py --data cifar10 --data-dir ~/data/cifar-10-batches-py \\
        --trainer.strategy kfac_ddp

Data: ``digits`` (scikit-learn's bundled images, default), ``teacher`` (synthetic
teacher-student), ``cifar10`` (python-version batch files in ``--data-dir``; nothing is
downloaded). Logging: ``WandbLogger`` by default — offline unless a W&B API key is configured,
with the ``wandb sync`` command printed — or ``--logger csv``.
"""

from __future__ import annotations

import argparse
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
from lightning_kfac.cli import add_kfac_arguments, kfac_options_from_args
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits", choices=["digits", "teacher", "cifar10"])
    parser.add_argument("--data-dir")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size")
    parser.add_argument(
        "--base-batch-size", type=int, default=32, help="batch size --lr was tuned at"
    )
    parser.add_argument("--lr", type=float, default=0.05, help="learning rate at --base-batch-size")
    parser.add_argument(
        "--warmup-epochs", type=float, default=0.1, help="warmup at --base-batch-size"
    )
    parser.add_argument("--max-epochs", type=int, default=20)
    parser.add_argument(
        "--trainer.strategy",
        dest="strategy",
        default="auto",
        help="e.g. kfac_ddp, kfac_ddp_fork, ddp, auto",
    )
    parser.add_argument("--trainer.accelerator", dest="accelerator", default="cpu")
    parser.add_argument("--trainer.devices", dest="devices", type=int, default=1)
    parser.add_argument("--trainer.num_nodes", dest="num_nodes", type=int, default=1)
    parser.add_argument("--trainer.precision", dest="precision", default="32-true")
    # --kfac.<name> for every K-FAC option, validated by KFACOptions (this example's damping
    # default is 1e-2, tuned on digits).
    add_kfac_arguments(parser, KFACOptions(damping=1e-2))
    parser.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0: off)")
    parser.add_argument("--logger", default="wandb", choices=["wandb", "csv"])
    parser.add_argument("--out", default="runs/train")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        kfac_options = kfac_options_from_args(args)
    except ValueError as error:  # a bad --kfac.* value: usage message, not a traceback
        parser.error(str(error))
    out = Path(args.out)
    name = f"{args.data}-{args.strategy}-b{args.batch_size}" + (
        f"-mixup{args.mixup}" if args.mixup else ""
    )
    result = fit_run(
        data=args.data,
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        base_batch_size=args.base_batch_size,
        base_lr=args.lr,
        base_warmup_epochs=args.warmup_epochs,
        max_epochs=args.max_epochs,
        strategy=args.strategy,
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
        precision=args.precision,
        mixup_alpha=args.mixup,
        kfac_options=kfac_options,
        seed=args.seed,
        logger=make_logger(args.logger, out, "lightning-kfac", name),
        history_path=out / f"{name}.json",
    )
    final = result["curve"][-1]
    print(
        f"{name}: test accuracy {final['val_acc']:.4f} after {final['step']} steps, "
        f"{result['wall_time_s']:.1f} s"
    )


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
