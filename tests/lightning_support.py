"""A tiny LightningModule and helpers for strategy tests through real gloo processes.

For training, Lightning always replaces the sampler by a *shuffling* ``DistributedSampler``
(seeded from ``PL_GLOBAL_SEED``, 0 by default). Every rank draws the same permutation ``p`` and
rank ``r`` of ``R`` takes ``p[r], p[r + R], ...``, so step ``k`` of ``R`` ranks with batch ``B``
sees exactly the samples of step ``k`` of one rank with batch ``R·B``: the two runs must produce
the same parameters.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import textwrap
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

SAMPLES = 96
CLASSES = 3


def make_network(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 4, 3, stride=2, groups=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, CLASSES),
    ).to(dtype)


def make_dataset(dtype: torch.dtype = torch.float64) -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, 2, 6, 6, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randint(0, CLASSES, (SAMPLES,), generator=gen)
    return TensorDataset(x, y)


class TinyClassifier(pl.LightningModule):
    """An ordinary LightningModule: nothing in it knows about K-FAC."""

    def __init__(
        self,
        batch_size: int,
        dtype: torch.dtype = torch.float64,
        optimizer: str = "sgd",
        lr: float = 0.1,
        manual: bool = False,
    ) -> None:
        super().__init__()
        self.net = make_network(dtype)
        self.batch_size = batch_size
        self.data_dtype = dtype
        self.optimizer_name = optimizer
        self.lr = lr
        self.automatic_optimization = not manual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        if self.automatic_optimization:
            return loss
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return None

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adamw":
            convs = [p for m in self.net if isinstance(m, nn.Conv2d) for p in m.parameters()]
            head = list(self.net[-1].parameters())
            return torch.optim.AdamW(
                [{"params": convs, "lr": self.lr}, {"params": head, "lr": self.lr / 3}],
                weight_decay=1e-2,
            )
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(make_dataset(self.data_dtype), batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(make_dataset(self.data_dtype), batch_size=32, shuffle=False)


class SaveAfterEpoch(pl.Callback):
    """Every rank calls ``save_checkpoint`` (it has a barrier) after the given epoch (Lightning
    resumes a map-style loader at an epoch boundary, not in the middle of an epoch)."""

    def __init__(self, path: Path, epoch: int) -> None:
        self.path, self.epoch = path, epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.save_checkpoint(self.path)


class SaveResult(pl.Callback):
    """Rank 0 writes the final parameters and K-FAC figures to ``path`` (workers can't return)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        pre = getattr(trainer.strategy, "preconditioner", None)
        torch.save(
            {
                "params": {n: p.detach().clone() for n, p in pl_module.named_parameters()},
                "kfac_steps": None if pre is None else pre.steps,
                "factor_updates": None
                if pre is None
                else {n: block.factors[0].updates for n, block in pre.blocks.items()},
                "factors_seen": None
                if pre is None
                else {
                    n: all(f.seen is not None and bool(f.seen.all()) for f in block.factors)
                    for n, block in pre.blocks.items()
                },
                "preconditioned_fraction": None if pre is None else pre.preconditioned_fraction,
                "factors": None
                if pre is None
                else {n: tuple(f.value for f in block.factors) for n, block in pre.blocks.items()},
                "global_step": trainer.global_step,
                "world_size": trainer.world_size,
                "skipped_steps": None
                if pre is None or pre.amp_skipped_steps is None
                else int(pre.amp_skipped_steps),
                "buckets": _bucket_counts(pre),
                "profiled": sorted(getattr(trainer.profiler, "recorded_durations", {})),
            },
            self.path,
        )


def _bucket_counts(pre: Any) -> dict[str, int] | None:
    allreduce = getattr(getattr(pre, "distributor", None), "allreduce", None)
    if allreduce is None:
        return None
    return {"buckets": len(allreduce.buckets), "launched_early": allreduce.launched_early}


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in a)
    den = sum(float(b[k].double().norm() ** 2) for k in b)
    return (num / den) ** 0.5


def trainer_kwargs(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
        deterministic=False,
    )
    kwargs.update(overrides)
    return kwargs


def fit_in_process(
    tmp_path: Path, module: pl.LightningModule, strategy: Any, **overrides: Any
) -> pl.Trainer:
    """One rank, in this process (warnings, exceptions and the strategy are observable). Its
    world-size-1 process group is destroyed afterwards: workers forked later in the same test
    must not inherit it (they would skip their own initialisation and hang)."""
    ckpt_path = overrides.pop("ckpt_path", None)
    trainer = pl.Trainer(strategy=strategy, devices=1, **trainer_kwargs(tmp_path, **overrides))
    try:
        trainer.fit(module, ckpt_path=ckpt_path)
    finally:
        destroy_process_group()
    return trainer


def destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "RANK"):
        os.environ.pop(key, None)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def launched_environment(rank: int, world: int, out: Path) -> None:
    """What torchrun (or SLURM) gives each process: Lightning sees processes created externally
    and launches nothing; every process runs the whole script."""
    port = (out / "port").read_text()
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=port,
        WORLD_SIZE=str(world),
        NODE_RANK="0",
        LOCAL_RANK=str(rank),
        RANK=str(rank),
    )


def gloo_process_group(rank: int, world: int, out: Path) -> None:
    """A gloo process group over a file store in ``out``."""
    dist.init_process_group(
        "gloo",
        init_method=f"file://{out / 'store'}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )


def _rank_main(
    rank: int,
    world: int,
    prepare: Callable[[int, int, Path], None],
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    out: Path,
) -> None:
    code = 0
    try:
        prepare(rank, world, out)
        torch.save(fn(rank, *args), out / f"rank{rank}.pt")
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        code = 1
    os._exit(code)  # a forked pytest must not run the parent's exit handlers


def run_forked(
    fn: Callable[..., Any],
    tmp_path: Path,
    *args: Any,
    world: int = 2,
    limit: float = 150.0,
    prepare: Callable[[int, int, Path], None] = gloo_process_group,
) -> list[Any]:
    """``fn(rank, *args)`` in ``world`` forked processes, each first ``prepare``-d (a gloo process
    group, or the environment of ``launched_environment``); the return values, by rank. A rank
    that raises or outlives ``limit`` seconds fails the test with its traceback."""
    out = tmp_path / f"ranks-{time.monotonic_ns()}"
    out.mkdir()
    (out / "port").write_text(str(_free_port()))
    context = multiprocessing.get_context("fork")
    processes = [
        context.Process(target=_rank_main, args=(rank, world, prepare, fn, args, out))
        for rank in range(world)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + limit
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, p in enumerate(processes) if p.is_alive()]
    for rank in hung:
        processes[rank].kill()
        processes[rank].join()
    errors = [
        f"rank {rank}:\n{(out / f'rank{rank}.err').read_text()}"
        for rank in range(world)
        if (out / f"rank{rank}.err").exists()
    ]
    assert not hung, f"ranks {hung} still running after {limit} s (deadlock?)\n" + "\n".join(errors)
    assert not errors, "\n".join(errors)
    assert all(p.exitcode == 0 for p in processes), [p.exitcode for p in processes]
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


def run_as_launched_ranks(
    fn: Callable[..., Any], tmp_path: Path, *args: Any, world: int = 2, limit: float = 150.0
) -> list[Any]:
    """``fn(rank, *args)`` in forked processes that look to Lightning as ``torchrun`` started them
    (so each process keeps its Trainer across several ``fit`` calls, as with the popen launcher,
    at the cost of a fork)."""
    return run_forked(fn, tmp_path, *args, world=world, limit=limit, prepare=launched_environment)


class YourModel(TinyClassifier):
    """ "Your LightningModule" of the README's snippets: float32, and it stops training itself
    after ``steps`` optimizer steps (the snippets set no ``max_epochs``, as a user's would not)."""

    def __init__(self, steps: int = 3) -> None:
        super().__init__(batch_size=8, dtype=torch.float32)
        self.steps = steps

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.trainer.global_step >= self.steps:
            self.trainer.should_stop = True


def run_fresh_python(code: str, timeout: float) -> str:
    """``code`` (dedented) in a fresh interpreter importing this checkout, one intra-op thread;
    its stdout. Fails the test, with the child's output, when the child fails."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout
