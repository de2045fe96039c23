"""The main job: does K-FAC + mixup close the large-batch gap? A study on real data, on 2 CPU ranks.

    python examples/large_batch_study               # comparison + reduced batch sweep (≤ 10 min)
    python examples/large_batch_study --sweep full  # more batch sizes and seeds (its own budget)
    python examples/large_batch_study --quick       # the tests' run (≤ 2 min)
    python examples/large_batch_study --write-docs  # then rewrite docs/study and docs/study.md
    python examples/large_batch_study --render-only --write-docs  # the same from runs/study

(``python -m examples.large_batch_study`` from the repository root is the same.)

Methods, all with the same epoch budget on scikit-learn's digits (real 8x8 images, 1,347
training / 450 test images):

- ``sgd``: SGD with momentum, LEGW scaling (You et al. 2019) from batch 32: peak LR × √k and
  warmup epochs × k at batch ``32·k``;
- ``kfac``: the same with ``KFACDDPStrategy``;
- ``kfac_mixup``: K-FAC plus ``MixupCallback(alpha=0.4)`` (Naganuma & Yokota 2019).

Two views of the same runs: the *comparison* (SGD at batch 32 and 512, K-FAC and K-FAC + mixup at
512: ``table.md``, ``accuracy.png``) and the *batch sweep* (test accuracy and sharpness against the
batch size, from 32 to the full training set: ``batch_sweep.png``). Each (method, batch) point is
tuned alike: the same grid of base learning rates, one run each on a validation split held out of
the *training* set; the test set is only seen by the final runs (several seeds).

Reruns of the same command on the same machine give the same numbers to the last digit: every
random draw is seeded (initialisation, data order on every rank, mixup), torch runs its
deterministic algorithms, and every rank computes with one thread. Timings (the ``timing``
section of ``study.json`` and keys ending in ``_s``) are the only numbers that change. Another
CPU may give other numbers (see docs/study.md).

Outputs in ``--out``: ``study.json`` (every number), ``table.md``, ``sweep.md``, ``section.md``
(the generated block of ``docs/study.md``), ``accuracy.png``, ``batch_sweep.png``, ``wandb/``
(one W&B run per training, grouped by method, tagged with batch, seed and stage).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from examples.data import FULL_BATCH
from examples.large_batch_study.console import StudyProgress, format_duration, quiet_training
from examples.large_batch_study.report import (
    comparison_table,
    paper_checks,
    plot_accuracy,
    plot_batch_sweep,
    points_by_key,
    study_block,
    summarise_point,
    sweep_table,
    write_docs,
)
from examples.large_batch_study.sharpness import SharpnessHistory
from examples.train import fit_run, make_logger, wandb_offline
from lightning_kfac import KFACOptions

BatchSize = int | str


@dataclass(frozen=True)
class Method:
    """An optimizer setup: SGD, or K-FAC through ``KFACDDPStrategy``, optionally with mixup."""

    name: str
    title: str
    kfac: bool
    mixup: float


METHODS: dict[str, Method] = {
    "sgd": Method("sgd", "SGD (LEGW)", kfac=False, mixup=0.0),
    "kfac": Method("kfac", "K-FAC", kfac=True, mixup=0.0),
    "kfac_mixup": Method("kfac_mixup", "K-FAC + mixup", kfac=True, mixup=0.4),
}
#: The comparison's rows: name -> (method, batch). Every row is also a point of the sweep.
COMPARISON: dict[str, tuple[str, BatchSize]] = {
    "sgd_small": ("sgd", 32),
    "sgd_large": ("sgd", 512),
    "kfac_large": ("kfac", 512),
    "kfac_mixup_large": ("kfac_mixup", 512),
}
#: LEGW's reference batch: base learning rates and warmup are given at this batch size.
BASE_BATCH = 32
BASE_WARMUP_EPOCHS = 0.1
TARGET_ACCURACY = 0.95
#: Sharpness (top Hessian eigenvalue) is measured where the clean training loss first falls to
#: each of these values: the comparison uses 0.1, the sweep's figure the level reached by the
#: most points (at full batch, SGD stays above both in 30 epochs).
MATCHED_TRAIN_LOSSES = (0.2, 0.1)
#: The Hessian is that of the loss on this many training images (the first ones).
SHARPNESS_SAMPLES = 256
#: Seed of the tuning runs (on the validation split); the final runs use seeds 0, 1, ...
TUNING_SEED = 1000
#: K-FAC's own settings, fixed before the study by probes on the validation split (lr 0.03,
#: batch 512, 30 epochs, seeds 0-2, final validation accuracy). With the earlier network (64
#: channels, 1,025 inputs to the first linear layer): damping 1e-2 with decompositions every 5
#: steps 0.985/0.959/0.922; every step 0.978/0.963/0.963; damping 3e-2 every step
#: 0.978/0.967/0.978; damping 1e-1 every step 0.974/0.974/0.967. With the current network
#: (``examples.model``), every step: 1e-2 0.985/0.981/0.967; 3e-2 0.985/0.970/0.970; 1e-1
#: 0.974/0.974/0.970 — no clear difference, so 3e-2 stayed. (SGD has no counterpart to tune.)
KFAC_OPTIONS = KFACOptions(
    damping=3e-2, factor_update_interval=1, inverse_update_interval=1, kl_clip=1e-2
)
#: Each rank computes with this many threads (2 ranks on a 2-core machine).
THREADS_PER_RANK = 1
#: Digits' training images at the default split (1,797 images, 25% held out for testing).
TRAIN_IMAGES = 1347
#: At most this many logged steps per run (W&B curves), whatever the batch size.
MAX_LOGGED_STEPS = 200
WANDB_PROJECT = "lightning-kfac-study"
#: The command whose results docs/study.md shows (``--write-docs`` publishes only these).
DOCUMENTED_COMMAND = "python examples/large_batch_study"


@dataclass(frozen=True)
class Preset:
    """How much of the study to run.

    Args:
        batch_sizes: Per method, the sweep's batch sizes (``"full"``: the whole training set).
        seeds: Final runs per point (seeds 0 … seeds − 1), scored on the test set.
        epochs: Training epochs of every run (the same budget at every batch size).
        lr_grid: Base learning rates (at batch 32, LEGW-scaled) tried per point on the validation
            split; one value means no tuning.
    """

    batch_sizes: dict[str, tuple[BatchSize, ...]]
    seeds: int
    epochs: int
    lr_grid: tuple[float, ...]

    @property
    def tuning_runs(self) -> int:
        """Validation runs per point: one per learning rate, none without a choice to make."""
        return len(self.lr_grid) if len(self.lr_grid) > 1 else 0


PRESETS: dict[str, Preset] = {
    "quick": Preset(
        batch_sizes={
            "sgd": (32, 512, FULL_BATCH),
            "kfac": (512, FULL_BATCH),
            "kfac_mixup": (512, FULL_BATCH),
        },
        seeds=2,
        epochs=8,
        lr_grid=(0.03,),
    ),
    # K-FAC below batch 512 costs minutes per point on 2 cores (hundreds of steps, each with
    # decompositions), and SGD at 128 took the default to 9.5 minutes quiet (no margin under
    # its 10-minute budget): the default keeps those for the full sweep.
    "reduced": Preset(
        batch_sizes={
            "sgd": (32, 512, FULL_BATCH),
            "kfac": (512, FULL_BATCH),
            "kfac_mixup": (512, FULL_BATCH),
        },
        seeds=3,
        epochs=30,
        lr_grid=(0.01, 0.03, 0.1),
    ),
    "full": Preset(
        batch_sizes={method: (32, 64, 128, 256, 512, 1024, FULL_BATCH) for method in METHODS},
        seeds=5,
        epochs=30,
        lr_grid=(0.01, 0.03, 0.1),
    ),
}


@dataclass(frozen=True)
class Run:
    """One training: a point (method, batch), a learning rate, a seed and a stage."""

    method: str
    batch_size: BatchSize
    lr: float
    seed: int
    stage: str  # "tune" (validation split) or "test" (the final runs)

    @property
    def name(self) -> str:
        return f"{self.stage}-{self.method}-b{self.batch_size}-lr{self.lr:g}-seed{self.seed}"

    @property
    def label(self) -> str:
        """What the progress display shows while the run trains."""
        lr = f"lr {self.lr:g}"
        return f"{self.method} batch {self.batch_size} seed {self.seed} ({self.stage}, {lr})"


@dataclass
class StudyContext:
    """What every run needs to know: settings, output folder, logger, progress."""

    preset: Preset
    sweep: str
    devices: int
    logger: str
    out: Path
    progress: StudyProgress | None = None


def study_points(preset: Preset) -> list[tuple[str, BatchSize]]:
    """Every (method, batch) to run: the sweep's points plus the comparison's, in method order."""
    points = {(m, b) for m, sizes in preset.batch_sizes.items() for b in sizes}
    points |= set(COMPARISON.values())
    order = {name: i for i, name in enumerate(METHODS)}
    return sorted(points, key=lambda p: (order[p[0]], batch_key(p[1])))


def batch_key(batch: BatchSize) -> float:
    """Sort key: numbers ascending, ``"full"`` last."""
    return float("inf") if batch == FULL_BATCH else float(batch)


def steps_per_epoch(batch: BatchSize) -> int:
    """Optimizer steps per epoch on digits' 1,347 training images (approximately, for the ETA
    and the logging interval)."""
    return 1 if batch == FULL_BATCH else max(1, TRAIN_IMAGES // int(batch))


def estimated_cost(method: str, batch: BatchSize, epochs: int) -> float:
    """Rough seconds of one run on 2 ranks, for the ETA only: start-up, steps, evaluations."""
    step_s = 0.05 if METHODS[method].kfac else 0.012
    return 2.0 + epochs * (steps_per_epoch(batch) * step_s + 0.05)


def make_run_logger(run: Run, ctx: StudyContext) -> Any:
    """The final runs' logger (W&B: grouped by method, tagged with batch, seed and stage; the
    study's settings in the run's config). Tuning runs log nothing: their scores are in
    ``study.json``, and a W&B run costs seconds to start."""
    if run.stage == "tune":
        return None
    return make_logger(
        ctx.logger,
        ctx.out,
        WANDB_PROJECT,
        run.name,
        group=run.method,
        quiet=True,
        tags=[f"batch={run.batch_size}", f"seed={run.seed}", run.stage, f"sweep={ctx.sweep}"],
        job_type=run.stage,
        config=run_config(run, ctx),
        lean=True,
    )


def train(run: Run, ctx: StudyContext) -> dict[str, Any]:
    """Train ``run`` on ``ctx.devices`` CPU ranks; return its history (curve, sharpness, …)."""
    method = METHODS[run.method]
    total_steps = ctx.preset.epochs * steps_per_epoch(run.batch_size)
    result = fit_run(
        data="digits",
        batch_size=run.batch_size,
        base_batch_size=BASE_BATCH,
        base_lr=run.lr,
        base_warmup_epochs=BASE_WARMUP_EPOCHS,
        max_epochs=ctx.preset.epochs,
        strategy="kfac_ddp_fork" if method.kfac else "ddp_fork",
        devices=ctx.devices,
        mixup_alpha=method.mixup,
        kfac_options=KFAC_OPTIONS if method.kfac else None,
        seed=run.seed,
        logger=make_run_logger(run, ctx),
        history_path=ctx.out / "runs" / f"{run.name}.json",
        validation=run.stage == "tune",
        history=partial(
            SharpnessHistory,
            levels=None if run.stage == "tune" else MATCHED_TRAIN_LOSSES,
            samples=SHARPNESS_SAMPLES,
        ),
        deterministic=True,
        threads_per_rank=THREADS_PER_RANK,
        log_every_n_steps=max(1, round(total_steps / MAX_LOGGED_STEPS)),
    )
    result.update(asdict(run), name=run.name)
    return result


def run_config(run: Run, ctx: StudyContext) -> dict[str, Any]:
    """The W&B run's config: the run itself and the study's settings."""
    method = METHODS[run.method]
    return {
        "study": {
            "sweep": ctx.sweep,
            "epochs": ctx.preset.epochs,
            "seeds": ctx.preset.seeds,
            "lr_grid": list(ctx.preset.lr_grid),
            "devices": ctx.devices,
            "threads_per_rank": THREADS_PER_RANK,
            "base_batch": BASE_BATCH,
            "kfac_options": KFAC_OPTIONS.to_dict(),
        },
        "method": run.method,
        "kfac": method.kfac,
        "mixup_alpha": method.mixup,
        "global_batch": str(run.batch_size),
        "base_lr": run.lr,
        "seed": run.seed,
        "stage": run.stage,
    }


def train_with_progress(run: Run, ctx: StudyContext) -> dict[str, Any]:
    """``train`` inside the progress display; adds the run's CPU time (all processes)."""
    if ctx.progress is not None:
        ctx.progress.start_run(run.label)
    cpu_before = cpu_seconds()
    result = train(run, ctx)
    result["cpu_time_s"] = cpu_seconds() - cpu_before
    if ctx.progress is not None:
        ctx.progress.finish_run(estimated_cost(run.method, run.batch_size, ctx.preset.epochs))
    return result


def choose_lr(tuning: dict[float, dict[str, float]]) -> float:
    """Highest validation accuracy; ties (270 images: steps of 0.0037) go to lower loss."""
    return max(tuning, key=lambda lr: (tuning[lr]["val_acc"], -tuning[lr]["val_loss"], -lr))


def tune(method: str, batch: BatchSize, ctx: StudyContext) -> dict[float, dict[str, float]]:
    """One run per learning rate of the grid on the validation split: final accuracy and loss."""
    scores = {}
    for lr in ctx.preset.lr_grid:
        final = train_with_progress(Run(method, batch, lr, TUNING_SEED, "tune"), ctx)["curve"][-1]
        scores[lr] = {"val_acc": final["val_acc"], "val_loss": final["val_loss"]}
    return scores


def run_point(method: str, batch: BatchSize, ctx: StudyContext) -> dict[str, Any]:
    """Tune (when the grid has several values), then train every seed; summarise."""
    tuning = tune(method, batch, ctx) if ctx.preset.tuning_runs else {}
    lr = choose_lr(tuning) if tuning else ctx.preset.lr_grid[0]
    runs = [
        train_with_progress(Run(method, batch, lr, seed, "test"), ctx)
        for seed in range(ctx.preset.seeds)
    ]
    point = summarise_point(runs, TARGET_ACCURACY, MATCHED_TRAIN_LOSSES)
    point.update(
        method=method,
        batch_size=batch,
        lr=lr,
        tuning={f"{k:g}": v for k, v in tuning.items()},
        runs=runs,
    )
    return point


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def point_line(point: dict[str, Any]) -> str:
    """One progress line per finished point."""
    tuned = f"lr {point['lr']:g}" + (" (tuned)" if point["tuning"] else "")
    return (
        f"{point['method']:<10} batch {point['batch_size']!s:>4}: test accuracy "
        f"{point['test_accuracy_mean']:.4f} ± {point['test_accuracy_std']:.4f} "
        f"({plural(point['seeds'], 'seed')}, {tuned})"
    )


@contextmanager
def reproducible_process(threads: int) -> Iterator[None]:
    """One thread in this process (forked workers inherit it: no OpenMP pool to deadlock on);
    on exit, restore the thread count, torch's deterministic-algorithms flag (each run's
    ``Trainer(deterministic=True)`` sets it) and the environment variables the runs set (seeds,
    W&B mode, thread count), so the caller's process is left as it was."""
    keys = ("OMP_NUM_THREADS", "PL_GLOBAL_SEED", "PL_SEED_WORKERS", "WANDB_MODE", "WANDB_SILENT")
    keys += ("CUBLAS_WORKSPACE_CONFIG",)
    saved_env = {key: os.environ.get(key) for key in keys}
    saved_threads = torch.get_num_threads()
    saved_deterministic = torch.are_deterministic_algorithms_enabled()
    saved_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved_deterministic, warn_only=saved_warn_only)
        torch.set_num_threads(saved_threads)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the DDP workers)."""
    own, children = (
        resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=DOCUMENTED_COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tests' run (≤ 2 minutes)")
    parser.add_argument(
        "--sweep",
        choices=["reduced", "full"],
        default="reduced",
        help="reduced (default, ≤ 10 min on 2 cores) or full (more batch sizes and seeds)",
    )
    parser.add_argument("--seeds", type=int, help="final runs per point (preset's by default)")
    parser.add_argument("--epochs", type=int, help="epochs per run (preset's by default)")
    parser.add_argument(
        "--batch-sizes", nargs="+", help="override the sweep's batch sizes (numbers or 'full')"
    )
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), help="subset of methods")
    parser.add_argument("--lr-grid", nargs="+", type=float, help="override the base lr grid")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--logger", default="wandb", choices=["wandb", "csv"])
    parser.add_argument("--out", default="runs/study")
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help="copy the results to docs/study/ and rewrite the generated block of docs/study.md",
    )
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="no training: rebuild tables, figures and checks from --out's study.json",
    )
    return parser.parse_args(argv)


def make_preset(args: argparse.Namespace) -> tuple[str, Preset]:
    """The preset named by ``--quick`` / ``--sweep``, with the command line's overrides."""
    name = "quick" if args.quick else args.sweep
    preset = PRESETS[name]
    sizes = preset.batch_sizes
    if args.batch_sizes:
        parsed = tuple(b if b == FULL_BATCH else int(b) for b in args.batch_sizes)
        sizes = {method: parsed for method in sizes}
    if args.methods:
        sizes = {method: sizes.get(method, ()) for method in args.methods}
    preset = Preset(
        batch_sizes=sizes,
        seeds=args.seeds or preset.seeds,
        epochs=args.epochs or preset.epochs,
        lr_grid=tuple(args.lr_grid) if args.lr_grid else preset.lr_grid,
    )
    return name, preset


def selected_points(preset: Preset, methods: list[str] | None) -> list[tuple[str, BatchSize]]:
    """The study's points; with ``--methods`` only those methods' (comparison rows included)."""
    points = study_points(preset)
    return [p for p in points if methods is None or p[0] in methods]


def run_study(ctx: StudyContext, points: list[tuple[str, BatchSize]]) -> list[dict[str, Any]]:
    """Every point in turn, with one progress line each."""
    per_point = ctx.preset.tuning_runs + ctx.preset.seeds
    costs = [per_point * estimated_cost(m, b, ctx.preset.epochs) for m, b in points]
    ctx.progress = StudyProgress(per_point * len(points), sum(costs))
    results = []
    try:
        with quiet_training():
            for method, batch in points:
                results.append(run_point(method, batch, ctx))
                ctx.progress.note(point_line(results[-1]))
    finally:
        ctx.progress.close()
    return results


def build_report(
    args: argparse.Namespace, name: str, preset: Preset, points: list[dict[str, Any]]
) -> dict[str, Any]:
    """Everything the study measured, as written to ``study.json``."""
    return {
        "command": " ".join([DOCUMENTED_COMMAND, *command_args(args)]),
        "sweep": name,
        "preset": {
            "batch_sizes": {m: [str(b) for b in sizes] for m, sizes in preset.batch_sizes.items()},
            "seeds": preset.seeds,
            "epochs": preset.epochs,
            "lr_grid": list(preset.lr_grid),
        },
        "devices": args.devices,
        "threads_per_rank": THREADS_PER_RANK,
        "methods": {m: asdict(method) for m, method in METHODS.items()},
        "base_batch": BASE_BATCH,
        "tuning_seed": TUNING_SEED,
        "kfac_options": KFAC_OPTIONS.to_dict(),
        "target_accuracy": TARGET_ACCURACY,
        "matched_train_losses": list(MATCHED_TRAIN_LOSSES),
        "sharpness_samples": SHARPNESS_SAMPLES,
        "comparison": comparison_rows(points),
        "points": points,
        "checks": paper_checks(points, MATCHED_TRAIN_LOSSES),
        "machine": machine(),
    }


def cpu_model() -> str:
    """The CPU's model name (from ``/proc/cpuinfo`` on Linux)."""
    import platform

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor()


def machine() -> dict[str, Any]:
    """What the numbers depend on beyond the code: the CPU (kernels are chosen by instruction
    set) and the library versions."""
    import platform

    import pytorch_lightning

    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "pytorch_lightning": pytorch_lightning.__version__,
        "python": platform.python_version(),
    }


def comparison_rows(points: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The comparison's rows: each row's point without its runs (those are in ``points``)."""
    by_point = points_by_key(points)
    return {
        row: {k: v for k, v in by_point[(method, str(batch))].items() if k != "runs"}
        for row, (method, batch) in COMPARISON.items()
        if (method, str(batch)) in by_point
    }


def command_args(args: argparse.Namespace) -> list[str]:
    """The options that change what runs (for the report's command line)."""
    parts = ["--quick"] if args.quick else ([] if args.sweep == "reduced" else ["--sweep", "full"])
    for flag, value in (("--seeds", args.seeds), ("--epochs", args.epochs)):
        if value:
            parts += [flag, str(value)]
    for flag, values in (
        ("--batch-sizes", args.batch_sizes),
        ("--methods", args.methods),
        ("--lr-grid", args.lr_grid),
    ):
        if values:
            parts += [flag, *(f"{v:g}" if isinstance(v, float) else str(v) for v in values)]
    if args.devices != 2:
        parts += ["--devices", str(args.devices)]
    return parts


def write_outputs(report: dict[str, Any], out: Path) -> list[Path]:
    """``study.json``, the tables, the docs block and both figures; returns their paths."""
    paths = [out / name for name in ("study.json", "table.md", "sweep.md", "section.md")]
    paths += [out / "accuracy.png", out / "batch_sweep.png"]
    paths[0].write_text(json.dumps(report, indent=1) + "\n")
    paths[1].write_text(comparison_table(report) + "\n")
    paths[2].write_text(sweep_table(report) + "\n")
    paths[3].write_text(study_block(report) + "\n")
    plot_accuracy(report, paths[4])
    plot_batch_sweep(report, paths[5])
    return paths


def print_summary(report: dict[str, Any], paths: list[Path], logger: str, out: Path) -> None:
    """The tables, the checks against the papers, and where everything is."""
    print("\n" + comparison_table(report) + "\n\n" + sweep_table(report) + "\n", flush=True)
    for line in report["checks"]:
        print(f"- {line['text']}", flush=True)
    wall, cpu = report["timing"]["wall_time_s"], report["timing"]["cpu_time_s"]
    print(
        f"\ndone in {format_duration(wall)} (CPU time {format_duration(cpu)}); "
        f"figures: {paths[4]}, {paths[5]}; numbers: {paths[0]}",
        flush=True,
    )
    runs = sum(len(p["runs"]) for p in report["points"])
    if logger == "wandb":
        where = out / "wandb"
        if wandb_offline():
            print(
                f"W&B: {runs} offline runs in {where} (group = method; tags: batch, seed); "
                f"upload with `wandb sync {where}/offline-run-*`",
                flush=True,
            )
        else:
            print(f"W&B: {runs} runs in project {WANDB_PROJECT}, grouped by method", flush=True)


def run_and_report(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Run the study the command line asks for; return its report (``study.json``)."""
    name, preset = make_preset(args)
    ctx = StudyContext(preset, name, args.devices, args.logger, out)
    points = selected_points(preset, args.methods)
    print(
        f"large-batch study on digits ({name} sweep): {plural(len(points), 'point')} × "
        f"({preset.tuning_runs} tuning + "
        f"{plural(preset.seeds, 'seed')}), {plural(preset.epochs, 'epoch')}, "
        f"{args.devices} CPU ranks × {plural(THREADS_PER_RANK, 'thread')}; results in {out}",
        flush=True,
    )
    started, cpu_before, load = time.perf_counter(), cpu_seconds(), os.getloadavg()[0]
    with reproducible_process(THREADS_PER_RANK):
        results = run_study(ctx, points)
    report = build_report(args, name, preset, results)
    report["timing"] = {
        "wall_time_s": time.perf_counter() - started,
        "cpu_time_s": cpu_seconds() - cpu_before,
        "load_average_at_start": load,
    }
    return report


def rerender(out: Path) -> dict[str, Any]:
    """The report of the study in ``out``, its summaries and checks recomputed from the runs
    (after a change to the report's code; no training)."""
    report = json.loads((out / "study.json").read_text())
    for point in report["points"]:
        point.update(
            summarise_point(point["runs"], TARGET_ACCURACY, report["matched_train_losses"])
        )
    report["comparison"] = comparison_rows(report["points"])
    report["checks"] = paper_checks(report["points"], report["matched_train_losses"])
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.write_docs and command_args(args):
        raise SystemExit("--write-docs publishes the documented command only")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = rerender(out) if args.render_only else run_and_report(args, out)
    if args.write_docs and report["command"] != DOCUMENTED_COMMAND:
        raise SystemExit(f"--write-docs publishes `{DOCUMENTED_COMMAND}` only")
    paths = write_outputs(report, out)
    print_summary(report, paths, args.logger, out)
    if args.write_docs:
        written = write_docs(report, out, Path(__file__).resolve().parents[2])
        print(f"rewrote {', '.join(str(p) for p in written)}", flush=True)
    return report
