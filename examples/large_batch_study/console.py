"""What the large-batch study prints: quiet training runs and one progress display for the study.

Two pieces, both scoped to the study so that a user's own code keeps Lightning's and W&B's
normal output:

- ``quiet_training()``: a context manager that lowers Lightning's loggers to WARNING (its per-run
  banners — "GPU available", "Initializing distributed", the litlogger tip, "`Trainer.fit`
  stopped" — are INFO records) and ignores the warnings listed in ``KNOWN_HARMLESS_WARNINGS``;
  everything is restored on exit. DDP workers are forked inside the block and inherit both.
  Warnings not in the list still reach the console.
- ``StudyProgress``: one tqdm bar over all runs (runs done / total, the current model, method,
  batch, seed and stage, elapsed and time left). The time left weighs each run by its predicted
  duration, learnt from the finished runs of its kind. When stderr is not a terminal (a CI log,
  a pipe) the bar is replaced by a line when the first run starts, one per finished point, and
  at most one a minute otherwise, so logs stay short and never silent for long.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator
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
    """Progress over the whole study: runs done, the run in progress, elapsed and time left.

    The time left is the sum of the remaining runs' predicted durations, minus what the current
    run has already taken. A run's prediction is its prior cost (``estimated_cost``: seconds from
    a cost model of its steps) times a correction learnt from the finished runs: the ratio of
    actual to prior seconds of the finished runs of the same *kind* (model, method and batch),
    or, for a kind not seen yet, of all finished runs. So the estimate is exact once every kind
    has run once if durations per kind are steady, and a cost model that is wrong by a constant
    factor is corrected by the first run (the earlier estimate used one global ratio and was
    3½ minutes short when K-FAC's runs were slower than modelled).

    Args:
        runs: ``(kind, prior seconds)`` of every run of the study, in order.
        stream: Where the bar is drawn (stderr by default).
        out: Where lines go (stdout by default).
        interactive: Draw a live bar; default: whether ``stream`` is a terminal. Without a
            terminal (a CI log, a pipe) lines are printed instead: when the first run starts,
            for every ``note`` (one per finished point), and otherwise at most every
            ``heartbeat`` seconds when a run starts, so a log shows progress within a minute.
        clock: Seconds (``time.perf_counter`` by default; tests pass a simulated one).
        started: The clock's value at the study's start (default: now).
    """

    def __init__(
        self,
        runs: list[tuple[str, float]],
        stream: TextIO | None = None,
        out: TextIO | None = None,
        interactive: bool | None = None,
        clock: Callable[[], float] = time.perf_counter,
        heartbeat: float = 60.0,
        started: float | None = None,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.out = out if out is not None else sys.stdout
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.runs = list(runs)
        self.clock, self.heartbeat = clock, heartbeat
        self.started = clock() if started is None else started
        self.runs_done = 0
        self.run_started: float | None = None
        self.last_line = -math.inf
        #: Per kind, and over all kinds: (sum of actual seconds, sum of prior seconds).
        self.actual: dict[str | None, list[float]] = {}
        self.bar: tqdm | None = None
        if self.interactive:
            self.bar = _Bar(
                total=len(self.runs),
                file=self.stream,
                bar_format="{desc} |{bar:18}| {postfix}",
                dynamic_ncols=True,
                leave=False,  # the summary follows
            )

    @property
    def total_runs(self) -> int:
        return len(self.runs)

    def elapsed(self) -> float:
        return self.clock() - self.started

    def predicted(self, index: int) -> float:
        """Predicted seconds of run ``index``: its prior times the learnt correction."""
        kind, prior = self.runs[index]
        for key in (kind, None):
            if key in self.actual:
                seconds, priors = self.actual[key]
                return prior * seconds / priors if priors > 0 else prior
        return prior

    def remaining(self) -> float:
        """Seconds left: the remaining runs' predictions, less the current run's time so far."""
        left = sum(self.predicted(i) for i in range(self.runs_done, len(self.runs)))
        if self.run_started is not None and self.runs_done < len(self.runs):
            current = self.clock() - self.run_started
            left -= min(current, self.predicted(self.runs_done))
        return max(0.0, left)

    def status(self) -> str:
        """``'[1:02 elapsed, 3/40 runs, ~8:10 left]'``."""
        return (
            f"[{format_duration(self.elapsed())} elapsed, {self.runs_done}/{len(self.runs)} runs"
            f", ~{format_duration(self.remaining())} left]"
        )

    def insert_run(self, kind: str, prior: float) -> None:
        """A run the plan did not count, to start next."""
        self.runs.insert(self.runs_done, (kind, prior))
        if self.bar is not None:
            self.bar.total = len(self.runs)

    def start_run(self, label: str) -> None:
        """Show the run that starts now (``label``: model, method, batch, seed, stage)."""
        self.run_started = self.clock()
        text = f"run {self.runs_done + 1}/{len(self.runs)}: {label}"
        if self.bar is not None:
            self.bar.set_description_str(text, refresh=False)
            self.bar.set_postfix_str(
                f"{format_duration(self.elapsed())} elapsed, ~{format_duration(self.remaining())}"
                " left",
                refresh=True,
            )
        elif self.runs_done == 0 or self.clock() - self.last_line >= self.heartbeat:
            self._print(f"{self.status()} {text}")

    def finish_run(self) -> None:
        """The current run finished: learn from its duration."""
        if self.run_started is None:
            raise RuntimeError("finish_run without start_run")
        kind, prior = self.runs[self.runs_done]
        seconds = self.clock() - self.run_started
        for key in (kind, None):
            sums = self.actual.setdefault(key, [0.0, 0.0])
            sums[0] += seconds
            sums[1] += prior
        self.runs_done += 1
        self.run_started = None
        if self.bar is not None:
            self.bar.update(1)

    def note(self, line: str) -> None:
        """Print a line (with elapsed and time left) without breaking the bar."""
        self._print(f"{self.status()} {line}")

    def _print(self, text: str) -> None:
        self.last_line = self.clock()
        if self.bar is not None:
            self.bar.write(text, file=self.out)  # clears the bar, writes, redraws it
        else:
            print(text, file=self.out, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
