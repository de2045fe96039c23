"""The study's W&B runs: recorded by each training, written by the study's own process.

A ``WandbLogger`` inside a training starts and stops W&B's service in the forked rank-0 worker:
about 2.5 s per run on the 2-core machine, three minutes of the default study's 80 final runs.
So each training logs to ``MetricsRecorder`` — a Lightning logger that keeps what Lightning hands
it (every metric with its step, the model's hyperparameters) and writes it to JSON — and the
study's process, where one W&B service lives for the whole study, turns each record into one W&B
run (``publish``): the same group, tags, job type, config and metrics (``trainer/global_step``
as the x-axis, as ``WandbLogger`` defines it) at about 0.2 s each. Offline without an API key;
``wandb sync`` uploads the runs later.
"""

from __future__ import annotations

import json
import os
from argparse import Namespace
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers.logger import Logger
from pytorch_lightning.utilities import rank_zero_only

from examples.wandb_mode import wandb_offline


def _plain(value: Any) -> Any:
    """A JSON-friendly copy of a hyperparameter value."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


class MetricsRecorder(Logger):
    """A Lightning logger that records, on rank 0, every ``log_metrics`` call (metrics and step)
    and the hyperparameters, and writes them to ``path`` as JSON when training ends."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.rows: list[dict[str, float]] = []
        self.hyperparameters: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_hyperparams(
        self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any
    ) -> None:
        items = vars(params) if isinstance(params, Namespace) else dict(params)
        self.hyperparameters.update({str(k): _plain(v) for k, v in items.items()})

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        row = {key: float(value) for key, value in metrics.items()}
        if step is not None:
            row["trainer/global_step"] = step
        self.rows.append(row)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"hyperparameters": self.hyperparameters, "rows": self.rows}
        self.path.write_text(json.dumps(payload))


def publish(
    record: Path,
    *,
    save_dir: Path,
    project: str,
    name: str,
    group: str,
    tags: list[str],
    job_type: str,
    config: dict[str, Any],
) -> None:
    """One W&B run from a ``MetricsRecorder`` file: ``config`` and the recorded hyperparameters
    as its config, every recorded row logged in order."""
    import wandb

    if wandb_offline():
        os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    recorded = json.loads(record.read_text())
    save_dir.mkdir(parents=True, exist_ok=True)
    settings = wandb.Settings(
        console="off",
        disable_git=True,
        disable_code=True,
        x_disable_stats=True,
        x_disable_machine_info=True,
    )
    run = wandb.init(
        project=project,
        name=name,
        group=group,
        tags=tags,
        job_type=job_type,
        config=config,
        dir=str(save_dir),
        settings=settings,
    )
    try:
        run.config.update(recorded["hyperparameters"], allow_val_change=True)
        run.define_metric("trainer/global_step")
        run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
        for row in recorded["rows"]:
            run.log(row)
    finally:
        run.finish()
