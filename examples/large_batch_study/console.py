"""What the large-batch study prints: quiet training runs and one progress display for the study.

Two pieces, both scoped to the study so that a user's own code keeps Lightning's and W&B's
normal output:

- ``quiet_training()``: a context manager that lowers Lightning's loggers to WARNING (its per-run
  banners — "GPU available", "Initializing distributed", the litlogger tip, "`Trainer.fit`
  stopped" — are INFO records) and ignores the warnings listed in ``KNOWN_HARMLESS_WARNINGS``;
  everything is restored on exit. DDP workers are forked inside the block and inherit both.
  Warnings not in the list still reach the console.
- ``StudyProgress``: one tqdm bar over all runs (runs done / total, the current method, batch,
  seed and stage, elapsed and ETA). The ETA weighs each run by an estimated cost, since a
  batch-32 run takes many more steps than a full-batch one. When stderr is not a terminal (a CI
  log, a pipe) the bar is replaced by one line per finished sweep point, so logs stay short.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from tqdm import tqdm

#: Logger names whose INFO records are Lightning's per-run banners.
LIGHTNING_LOGGERS = (
    "pytorch_lightning",
    "lightning_fabric",
    "lightning.pytorch",
    "lightning.fabric",
)

#: (message regex, category) of warnings that every study run emits and that need no action.
KNOWN_HARMLESS_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # pytorch_lightning 2.6's own pytree helper still builds torch's deprecated LeafSpec
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    # the study logs every step on purpose; tiny epochs at large batches trigger this
    (r"The number of training batches \(\d+\) is smaller than the logging interval", UserWarning),
    # digits lives in memory: worker processes would only add start-up time
    (r".*does not have many workers which may be a bottleneck", UserWarning),
)


@contextmanager
def quiet_training(level: int = logging.WARNING) -> Iterator[None]:
    """Silence Lightning's INFO banners and the known-harmless warnings inside the block.

    Restores every logger level and the warning filters on exit (also on an exception).
    """
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    saved = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        for message, category in KNOWN_HARMLESS_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        for logger in loggers:
            logger.setLevel(level)
        try:
            yield
        finally:
            for logger, old in zip(loggers, saved, strict=True):
                logger.setLevel(old)


def format_duration(seconds: float) -> str:
    """``83`` -> ``'1:23'``, ``3725`` -> ``'1:02:05'``."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class _Bar(tqdm):
    """tqdm without its monitor thread: DDP workers are forked while the bar is open, and a
    thread holding a lock at fork time can deadlock the child."""

    monitor_interval = 0


class StudyProgress:
    """Progress over the whole study, weighted by each run's estimated cost.

    Args:
        total_runs: Number of training runs in the study.
        total_cost: Sum of the runs' estimated costs (any unit; only ratios matter).
        stream: Where the bar is drawn (stderr by default).
        out: Where ``note`` lines go (stdout by default).
        interactive: Draw a live bar; default: whether ``stream`` is a terminal.
    """

    def __init__(
        self,
        total_runs: int,
        total_cost: float,
        stream: TextIO | None = None,
        out: TextIO | None = None,
        interactive: bool | None = None,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.out = out if out is not None else sys.stdout
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.total_runs, self.total_cost = total_runs, total_cost
        self.runs_done, self.cost_done = 0, 0.0
        self.started = time.perf_counter()
        self.bar: tqdm | None = None
        if self.interactive:
            self.bar = _Bar(
                total=total_cost,
                file=self.stream,
                bar_format="{desc} |{bar:18}| {elapsed} elapsed, ~{remaining} left",
                smoothing=0.0,
                dynamic_ncols=True,
                leave=False,  # the summary follows
            )

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def remaining(self) -> float:
        """Seconds left, from the time per unit of cost so far (NaN before the first run)."""
        if self.cost_done <= 0:
            return float("nan")
        return self.elapsed() / self.cost_done * (self.total_cost - self.cost_done)

    def start_run(self, label: str) -> None:
        """Show the run that starts now (``label``: method, batch, seed, stage)."""
        if self.bar is not None:
            self.bar.set_description_str(
                f"run {self.runs_done + 1}/{self.total_runs}: {label}", refresh=True
            )

    def finish_run(self, cost: float) -> None:
        self.runs_done += 1
        self.cost_done += cost
        if self.bar is not None:
            self.bar.update(cost)

    def note(self, line: str) -> None:
        """Print a line (with elapsed and ETA) without breaking the bar."""
        remaining = self.remaining()
        eta = "" if remaining != remaining else f", ~{format_duration(remaining)} left"
        text = (
            f"[{format_duration(self.elapsed())}, {self.runs_done}/{self.total_runs} runs{eta}] "
            f"{line}"
        )
        if self.bar is not None:
            self.bar.write(text, file=self.out)  # clears the bar, writes, redraws it
        else:
            print(text, file=self.out, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
