"""The large-batch study's report: summaries, tables, figures, docs.

Everything here is a function of the numbers the runs produced (``study.json``): the generated
block of ``docs/study.md`` is rendered from them and written between the markers ``BLOCK_BEGIN``
and ``BLOCK_END``, so regenerating the study rewrites the block without hand edits (the page's
hand-written reading of the results, outside the markers, is left alone). The claims' verdicts
come from ``claims.py``.
"""

from __future__ import annotations

import math
import shutil
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BLOCK_BEGIN = "<!-- study:begin -->"
BLOCK_END = "<!-- study:end -->"
#: The page with the study's results, relative to the repository; its figures are in ``study/``.
STUDY_PAGE = Path("docs") / "study.md"
#: Files copied to ``docs/study`` by ``write_docs``.
DOC_FILES = (
    "study.json",
    "table.md",
    "time.md",
    "accuracy.png",
    "time.png",
    "batch_sweep.png",
)
#: Matplotlib colours per method, so the figures agree.
COLOURS = {
    "sgd": "tab:blue",
    "adamw": "tab:purple",
    "kfac": "tab:orange",
    "kfac_mixup": "tab:green",
}

Point = dict[str, Any]


# -- summaries -------------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (NaN, NaN when there are none)."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.mean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def first_reaching(curve: list[dict[str, float]], target: float) -> dict[str, float] | None:
    """The first evaluation at which the test accuracy reached ``target`` (None if never)."""
    return next((point for point in curve if point["val_acc"] >= target), None)


def steps_to(curve: list[dict[str, float]], target: float) -> float:
    """First optimizer step at which the test accuracy reached ``target`` (NaN if never)."""
    reached = first_reaching(curve, target)
    return math.nan if reached is None else reached["step"]


def seconds_to(curve: list[dict[str, float]], target: float) -> float:
    """Training seconds (inside training steps, rank 0) until the evaluation that first reached
    ``target`` (NaN if never)."""
    reached = first_reaching(curve, target)
    return math.nan if reached is None else reached.get("train_time_s", math.nan)


def level_key(level: float) -> str:
    return f"{level:g}"


def sharpness_values(runs: list[dict[str, Any]], level: float) -> list[float]:
    """Each run's top Hessian eigenvalue at training loss ``level`` (NaN where never reached)."""
    values = []
    for run in runs:
        measured = (run.get("sharpness") or {}).get(level_key(level))
        values.append(measured["top_eigenvalue"] if measured else math.nan)
    return values


def range_summary(values: Sequence[float]) -> dict[str, Any]:
    """Top Hessian eigenvalues spread by factors across seeds and a run can land on a degenerate
    point (a saturated softmax has almost no curvature), so they are summarised by the median
    and the range, and every value is kept. NaN values are runs that never reached the level."""
    reached = sorted(v for v in values if not math.isnan(v))
    return {
        "median": statistics.median(reached) if reached else math.nan,
        "min": reached[0] if reached else math.nan,
        "max": reached[-1] if reached else math.nan,
        "values": reached,
        "reached": len(reached),
    }


def summarise_point(
    runs: list[dict[str, Any]], target: float, levels: Sequence[float]
) -> dict[str, Any]:
    """Mean ± std over seeds of the final test accuracy; each run's steps and training seconds to
    ``target``; sharpness per matched-loss level; final clean training loss; K-FAC's
    preconditioned fraction; timings (keys ending in ``_s``, the only numbers that vary)."""
    accuracy = mean_std([r["curve"][-1]["val_acc"] for r in runs])
    steps = [steps_to(r["curve"], target) for r in runs]
    seconds = [seconds_to(r["curve"], target) for r in runs]
    sharpness = {level_key(level): range_summary(sharpness_values(runs, level)) for level in levels}
    fractions = [r.get("preconditioned_fraction") for r in runs]
    total_steps = runs[0]["curve"][-1]["step"]
    train_time = mean_std([r.get("train_time_s", math.nan) for r in runs])[0]
    return {
        "test_accuracy_mean": accuracy[0],
        "test_accuracy_std": accuracy[1],
        "steps_to_target": steps,
        "steps_to_target_mean": mean_std(steps)[0],
        "runs_reaching_target": sum(not math.isnan(s) for s in steps),
        "seconds_to_target": seconds,
        "total_steps": total_steps,
        "global_batch": runs[0]["global_batch"],
        "final_train_loss_mean": mean_std([r["curve"][-1]["train_loss"] for r in runs])[0],
        "sharpness": sharpness,
        "seeds": len(runs),
        "preconditioned_fraction": (
            None if any(f is None for f in fractions) else min(float(f) for f in fractions)
        ),
        "mean_train_time_s": train_time,
        "mean_step_time_s": train_time / max(total_steps, 1),
        "mean_wall_time_s": mean_std([r["wall_time_s"] for r in runs])[0],
        "mean_cpu_time_s": mean_std([r.get("cpu_time_s", math.nan) for r in runs])[0],
    }


def fully_reached(point: Point, level: float) -> bool:
    """Whether every run of ``point`` reached training loss ``level``."""
    return point["sharpness"][level_key(level)]["reached"] == point["seeds"]


def figure_level(points: list[Point], levels: Sequence[float]) -> float:
    """The level at which the most points have all their runs (ties: the lower level)."""
    return max(sorted(levels), key=lambda v: sum(fully_reached(p, v) for p in points))


def points_by_key(points: list[Point]) -> dict[tuple[str, str, str], Point]:
    """The points by ``(model, method, str(batch_size))``."""
    return {(p["model"], p["method"], str(p["batch_size"])): p for p in points}


def models_of(report: dict[str, Any]) -> list[str]:
    """The report's models, in the benchmark's order."""
    present = {p["model"] for p in report["points"]}
    return [m for m in report["benchmark"]["models"] if m in present]


def method_points(points: list[Point], model: str, method: str) -> list[Point]:
    """``model``'s points of ``method`` by increasing global batch."""
    chosen = (p for p in points if p["model"] == model and p["method"] == method)
    return sorted(chosen, key=lambda p: p["global_batch"])


def describe_batch(point: Point) -> str:
    if str(point["batch_size"]) == "full":
        return f"full ({point['global_batch']:,})"
    return str(point["global_batch"])


# -- tables -----------------------------------------------------------------------------------
def fmt_mean_std(mean: float, std: float, pattern: str = "{:.4f}") -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{pattern.format(mean)} ± {pattern.format(std)}"


def sharpness_cell(point: Point, level: float) -> str:
    entry = point["sharpness"][level_key(level)]
    if not entry["reached"]:
        return f"not reached (0/{point['seeds']})"
    cell = f"{entry['median']:.3g} ({entry['min']:.3g}–{entry['max']:.3g})"
    if entry["reached"] < point["seeds"]:
        cell += f" ({entry['reached']}/{point['seeds']} runs)"
    return cell


def steps_cell(point: Point) -> str:
    steps = point["steps_to_target_mean"]
    if math.isnan(steps):
        return f"never (0/{point['seeds']})"
    cell = f"{steps:.0f}"
    if point["runs_reaching_target"] < point["seeds"]:
        cell += f" ({point['runs_reaching_target']}/{point['seeds']} runs)"
    return cell


def comparison_table(report: dict[str, Any]) -> str:
    """Every point: model, method, batch, tuned lr, test accuracy, final training loss, steps,
    steps to the target, sharpness at each matched loss. No timings: on one machine a rerun
    reproduces this table to the last digit."""
    levels = report["benchmark"]["matched_losses"]
    target = report["benchmark"]["target_accuracy"]
    header = (
        "| model | method | batch | base lr | test accuracy (mean ± std) | final train loss | "
        f"steps | steps to {target:.0%} | "
        + " | ".join(f"λmax at loss {level:g}" for level in levels)
        + " |"
    )
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(levels)]
    for point in report["points"]:
        cells = [
            point["model"],
            point["method"],
            describe_batch(point),
            f"{point['lr']:g}",
            fmt_mean_std(point["test_accuracy_mean"], point["test_accuracy_std"]),
            f"{point['final_train_loss_mean']:.3f}",
            str(point["total_steps"]),
            steps_cell(point),
            *(sharpness_cell(point, level) for level in levels),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def time_cell(values: list[float]) -> str:
    reached = [v for v in values if not math.isnan(v)]
    if not reached:
        return f"never (0/{len(values)})"
    mean, std = mean_std(reached)
    cell = f"{mean:.1f} ± {std:.1f}"
    return cell + (f" ({len(reached)}/{len(values)} runs)" if len(reached) < len(values) else "")


def time_table(report: dict[str, Any]) -> str:
    """Per model, every method at the large batch, and SGD at the small batch for reference:
    steps and training seconds (2 ranks) to the target test accuracy, seconds per step, the
    final accuracy. Seconds vary with the machine and its load (see the study's ``timing``); the
    steps do not."""
    target = report["benchmark"]["target_accuracy"]
    lines = [
        f"| model | method | batch | steps to {target:.0%} | seconds to {target:.0%} "
        "(mean ± std) | ms per step | steps | training seconds | test accuracy |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for point in report["points"]:
        reference = point.get("role") == "small" and point["method"] == "sgd"
        if point.get("role") != "large" and not reference:
            continue
        lines.append(
            f"| {point['model']} | {point['method']} | {describe_batch(point)} | "
            f"{steps_cell(point)} | {time_cell(point['seconds_to_target'])} | "
            f"{1000 * point['mean_step_time_s']:.1f} | {point['total_steps']} | "
            f"{point['mean_train_time_s']:.1f} | {point['test_accuracy_mean']:.4f} |"
        )
    return "\n".join(lines)


def tuning_trial(lr: str, score: dict[str, Any], chosen: bool) -> str:
    """``'0.1 → 0.801'`` (``'(worse of 2 seeds)'`` when confirmed), bold when ``chosen``."""
    seeds = len(score.get("runs", [None]))
    text = f"{lr} → {score['val_acc']:.3f}" + (" (worse of 2 seeds)" if seeds > 1 else "")
    return f"**{text}**" if chosen else text


def tuning_lines(report: dict[str, Any]) -> list[str]:
    """Per tuned point: each lr's validation accuracy (the worse of two seeds where it was
    confirmed), the chosen one in bold; a choice at the edge of the grid is marked (a better
    learning rate may lie outside it)."""
    lines = []
    for point in report["points"]:
        if not point["tuning"]:
            continue

        trials = ", ".join(
            tuning_trial(lr, score, chosen=float(lr) == point["lr"])
            for lr, score in point["tuning"].items()
        )
        grid = [float(lr) for lr in point["tuning"]]
        edge = " (at the edge of its grid)" if point["lr"] in (min(grid), max(grid)) else ""
        lines.append(
            f"{point['model']} {point['method']} at batch {describe_batch(point)}: {trials}{edge}"
        )
    return lines


def coverage_line(report: dict[str, Any]) -> str:
    """K-FAC's preconditioned fraction per model (the smallest over its runs)."""
    parts = []
    for model in models_of(report):
        fractions = [
            p["preconditioned_fraction"]
            for p in report["points"]
            if p["model"] == model and p.get("preconditioned_fraction") is not None
        ]
        if fractions:
            parts.append(f"{model} {100 * min(fractions):.1f} %")
    return ", ".join(parts)


def configurations_table(report: dict[str, Any]) -> str:
    """Both CPU configurations' verdicts side by side (``--compare``)."""
    both = report.get("configurations")
    if not both:
        return ""
    first, second = both["runs"]
    names = [
        f"{r['machine']['isa']} ({r['machine']['torch_cpu_capability']})" for r in (first, second)
    ]
    lines = [
        f"| claim | {names[0]} | z | {names[1]} | z |",
        "|---|---|---:|---|---:|",
    ]

    def z_cell(value: float | None) -> str:
        return "" if value is None or math.isnan(value) else f"{value:+.1f}"

    for claim, verdict in first["verdicts"].items():
        lines.append(
            f"| {claim} | {verdict} | {z_cell(first['z'].get(claim))} | "
            f"{second['verdicts'].get(claim, 'absent')} | {z_cell(second['z'].get(claim))} |"
        )
    return "\n".join(lines)


def configurations_accuracy_table(report: dict[str, Any]) -> str:
    """Both CPU configurations' tuned lr and test accuracy per point."""
    both = report.get("configurations")
    if not both:
        return ""
    first, second = both["runs"]
    lines = [
        f"| point | lr ({first['machine']['isa']}) | test accuracy ({first['machine']['isa']}) | "
        f"lr ({second['machine']['isa']}) | test accuracy ({second['machine']['isa']}) |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, mine in first["points"].items():
        theirs = second["points"].get(key)
        if theirs is None:
            continue
        lines.append(
            f"| {key} | {mine['lr']:g} | "
            f"{fmt_mean_std(mine['test_accuracy_mean'], mine['test_accuracy_std'])} | "
            f"{theirs['lr']:g} | "
            f"{fmt_mean_std(theirs['test_accuracy_mean'], theirs['test_accuracy_std'])} |"
        )
    return "\n".join(lines)


# -- figures ------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mean_curve(runs: list[dict[str, Any]], x: str) -> tuple[list[float], list[float], list[float]]:
    """Mean over runs of ``x`` and of the test accuracy per evaluation, and the accuracy's std."""
    length = min(len(run["curve"]) for run in runs)
    xs = [statistics.mean(run["curve"][i].get(x, math.nan) for run in runs) for i in range(length)]
    accs = [[run["curve"][i]["val_acc"] for run in runs] for i in range(length)]
    mean = [statistics.mean(a) for a in accs]
    std = [statistics.stdev(a) if len(a) > 1 else 0.0 for a in accs]
    return xs, mean, std


def _curves(
    report: dict[str, Any], path: Path, x: str, large_only: bool, xlabel: str, log: bool
) -> None:
    plt = _pyplot()
    models = models_of(report)
    figure, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for point in (p for p in report["points"] if p["model"] == model):
            if large_only and point.get("role") != "large":
                continue
            xs, mean, std = _mean_curve(point["runs"], x)
            colour = COLOURS.get(point["method"])
            style = "--" if point.get("role") == "small" else "-"
            label = f"{point['method']} (batch {describe_batch(point)})"
            ax.plot(xs, mean, label=label, color=colour, linestyle=style)
            low = [m - s for m, s in zip(mean, std, strict=True)]
            high = [m + s for m, s in zip(mean, std, strict=True)]
            ax.fill_between(xs, low, high, alpha=0.15, color=colour)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0.0, 1.0)
        ax.axhline(report["benchmark"]["target_accuracy"], color="grey", ls=":", lw=1)
        ax.set_title(f"{report['benchmark']['data']} {model}: mean ± std over seeds")
        ax.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_accuracy(report: dict[str, Any], path: Path) -> None:
    """Test accuracy against optimizer steps, every point, one panel per model (log x)."""
    _curves(report, path, "step", large_only=False, xlabel="optimizer steps", log=True)


def plot_time(report: dict[str, Any], path: Path) -> None:
    """Test accuracy against training seconds at the large batch, one panel per model."""
    xlabel = "training seconds (2 ranks)"
    _curves(report, path, "train_time_s", large_only=True, xlabel=xlabel, log=False)


def plot_batch_sweep(report: dict[str, Any], path: Path) -> None:
    """Per model: test accuracy and sharpness at matched training loss against the batch size.

    The sharpness panels use ``figure_level``; points whose runs did not all reach it are left
    out and named in the panel.
    """
    plt = _pyplot()
    models = models_of(report)
    level = figure_level(report["points"], report["benchmark"]["matched_losses"])
    figure, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 7.5), squeeze=False)
    for column, model in enumerate(models):
        left, right = axes[0][column], axes[1][column]
        batches: set[int] = set()
        missing: list[str] = []
        for method, spec in report["methods"].items():
            points = method_points(report["points"], model, method)
            if not points:
                continue
            batches |= {p["global_batch"] for p in points}
            style = dict(marker="o", capsize=3, label=spec["title"], color=COLOURS.get(method))
            left.errorbar(
                [p["global_batch"] for p in points],
                [p["test_accuracy_mean"] for p in points],
                yerr=[p["test_accuracy_std"] for p in points],
                **style,
            )
            reached = [p for p in points if fully_reached(p, level)]
            missing += [f"{method} at {describe_batch(p)}" for p in points if p not in reached]
            if reached:
                entries = [p["sharpness"][level_key(level)] for p in reached]
                right.errorbar(
                    [p["global_batch"] for p in reached],
                    [e["median"] for e in entries],
                    yerr=[
                        [e["median"] - e["min"] for e in entries],
                        [e["max"] - e["median"] for e in entries],
                    ],
                    **style,
                )
        for ax in (left, right):
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(batches), [str(b) for b in sorted(batches)])
            ax.minorticks_off()
            ax.set_xlabel("global batch size")
        left.set_ylabel("test accuracy (mean ± std over seeds)")
        left.set_title(f"{model}: test accuracy after {report['preset']['epochs']} epochs")
        left.legend(loc="lower left", fontsize=8)
        if right.has_data():
            right.set_yscale("log")
        if missing:
            note = f"not all runs reached loss {level:g}: " + short_list(missing)
            right.text(0.02, 0.02, note, transform=right.transAxes, fontsize=7)
        right.set_ylabel("top Hessian eigenvalue (median, min–max)")
        right.set_title(f"{model}: sharpness where the training loss first reaches {level:g}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def short_list(items: list[str], shown: int = 3) -> str:
    """``items`` joined by commas, at most ``shown`` of them (then "and N more")."""
    rest = len(items) - shown
    return ", ".join(items[:shown]) + (f" and {rest} more" if rest > 0 else "")


# -- docs/study.md ------------------------------------------------------------------------------
def study_block(report: dict[str, Any], figures: str = "study") -> str:
    """The generated block of ``docs/study.md`` (markers included), rendered from ``report``;
    ``figures``: where the figures and ``study.json`` are, relative to the page."""
    preset, timing, benchmark = report["preset"], report["timing"], report["benchmark"]
    grids = "; ".join(
        f"{model} {kind}: {', '.join(f'{lr:g}' for lr in grid)}"
        for model, kinds in benchmark["lr_grids"].items()
        if model in models_of(report)
        for kind, grid in kinds.items()
    )
    load = timing.get("load_average_at_start")
    load_note = f", 1-minute load average {load:.1f} at the start" if load is not None else ""
    machine = report["machine"]
    lines = [
        BLOCK_BEGIN,
        "<!-- Generated by `python examples/large_batch_study --write-docs` from the run's "
        "study.json: edit examples/large_batch_study/report.py, not this block. -->",
        "",
        f"`{report['command']}` — {benchmark['title']}; {preset['seeds']} seeds per point, "
        f"{preset['epochs']} epochs for every run, {report['devices']} CPU ranks × "
        f"{report['threads_per_rank']} thread, on {machine['cpu']} "
        f"({machine['torch_cpu_capability']}). This run took "
        f"{timing['wall_time_s'] / 60:.1f} minutes from process start (CPU time "
        f"{timing['cpu_time_s'] / 60:.1f} minutes{load_note}; about "
        f"{timing['quiet_estimate_s'] / 60:.1f} minutes on a quiet 2-core machine by the "
        "study's calibration, CPU time × 6.6/9.6); its numbers are in "
        f"[`docs/study/study.json`]({figures}/study.json).",
        "",
        "**Test accuracy per point** (mean ± std over seeds; steps to the target and the top "
        "Hessian eigenvalue where the training loss first reached each level, median (min–max)):",
        "",
        comparison_table(report),
        "",
        f"![test accuracy against optimizer steps]({figures}/accuracy.png)",
        "",
        f"**Time to {benchmark['target_accuracy']:.0%} test accuracy at the large batch** "
        "(2 ranks; seconds inside training steps, evaluations excluded; they vary with the "
        "machine and its load, the steps do not):",
        "",
        time_table(report),
        "",
        f"![test accuracy against training time]({figures}/time.png)",
        "",
        "**Claims**, each with its test declared in `claims.py` before the runs (accuracy: the "
        f"difference of the means against its standard error, {report['threshold_se']:g} SE; "
        "sharpness and time: no overlap between the runs):",
        "",
        *(f"- {verdict['text']}" for verdict in report["verdicts"]),
    ]
    if report.get("configurations"):
        both = report["configurations"]
        same = (
            "every verdict is the same"
            if both["verdicts_identical"]
            else f"verdicts differ: {', '.join(both['flipped'])}"
        )
        lines += [
            "",
            f"**The same study on a second CPU configuration** (`{both['runs'][1]['command']}`: "
            "oneDNN, MKL and torch's kernels limited to AVX2) — " + same + ":",
            "",
            configurations_table(report),
            "",
            configurations_accuracy_table(report),
        ]
    lines += [
        "",
        "How it was run: every point got the same learning-rate trials (base lr at batch "
        f"{benchmark['small_batch']}, LEGW-scaled: × √k, warmup epochs × k at batch "
        f"{benchmark['small_batch']}·k; {grids}), one run each scored on a validation split "
        "held out of the training set — never on the test set; an lr's score is its worse run, "
        "scores within two binomial standard errors of the best tie and the smaller lr wins, "
        "and the chosen lr is confirmed with a second seed (choosing again when it fails):",
        "",
        *(f"- {line}" for line in tuning_lines(report)),
        "",
        f"K-FAC preconditioned {coverage_line(report) or 'nothing (no K-FAC point)'} of the "
        "trainable parameters (`KFACPreconditioner.coverage_report()`; the GRU through the "
        "recurrent kind).",
        "",
        f"![test accuracy and sharpness against the batch size]({figures}/batch_sweep.png)",
        BLOCK_END,
    ]
    return "\n".join(lines)


def replace_between_markers(text: str, section: str) -> str:
    """``text`` with everything from ``BLOCK_BEGIN`` to ``BLOCK_END`` replaced by ``section``."""
    begin, end = text.find(BLOCK_BEGIN), text.find(BLOCK_END)
    if begin < 0 or end < begin:
        raise ValueError(f"the page has no {BLOCK_BEGIN} … {BLOCK_END} block to rewrite")
    return text[:begin] + section + text[end + len(BLOCK_END) :]


def write_docs(report: dict[str, Any], out: Path, repo: Path) -> list[Path]:
    """Copy the study's files to ``repo/docs/study`` and rewrite the generated block of
    ``repo/docs/study.md``."""
    docs = repo / "docs" / "study"
    docs.mkdir(parents=True, exist_ok=True)
    written = []
    for name in DOC_FILES:
        shutil.copyfile(out / name, docs / name)
        written.append(docs / name)
    page = repo / STUDY_PAGE
    page.write_text(replace_between_markers(page.read_text(), study_block(report)))
    written.append(page)
    return written
