"""The large-batch study's report: summaries, tables, figures, checks against the papers, docs.

Everything here is a function of the numbers the runs produced (``study.json``): the generated
block of ``docs/study.md`` is rendered from them and written between the markers ``BLOCK_BEGIN``
and ``BLOCK_END``, so regenerating the study rewrites the block without hand edits (the page's
hand-written reading of the results, outside the markers, is left alone).
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
DOC_FILES = ("study.json", "table.md", "sweep.md", "accuracy.png", "batch_sweep.png")
#: Two means differ when they are this many standard errors apart (see ``compare``).
SIGNIFICANCE = 2.0
#: Matplotlib colours per method, so both figures agree.
COLOURS = {"sgd": "tab:blue", "kfac": "tab:orange", "kfac_mixup": "tab:green"}

Point = dict[str, Any]


# -- summaries -------------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (NaN, NaN when there are none)."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.mean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def steps_to(curve: list[dict[str, float]], target: float) -> float:
    """First optimizer step at which the test accuracy reached ``target`` (NaN if never)."""
    return next((point["step"] for point in curve if point["val_acc"] >= target), math.nan)


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
    """Mean ± std over seeds of the final test accuracy, steps to ``target``, sharpness per
    matched-loss level, final clean training loss; wall time (the only timing, ``_s``)."""
    accuracy = mean_std([r["curve"][-1]["val_acc"] for r in runs])
    steps = [steps_to(r["curve"], target) for r in runs]
    sharpness = {level_key(level): range_summary(sharpness_values(runs, level)) for level in levels}
    return {
        "test_accuracy_mean": accuracy[0],
        "test_accuracy_std": accuracy[1],
        "steps_to_target_mean": mean_std(steps)[0],
        "runs_reaching_target": sum(not math.isnan(s) for s in steps),
        "total_steps": runs[0]["curve"][-1]["step"],
        "global_batch": runs[0]["global_batch"],
        "final_train_loss_mean": mean_std([r["curve"][-1]["train_loss"] for r in runs])[0],
        "sharpness": sharpness,
        "seeds": len(runs),
        "mean_wall_time_s": mean_std([r["wall_time_s"] for r in runs])[0],
        "mean_cpu_time_s": mean_std([r.get("cpu_time_s", math.nan) for r in runs])[0],
    }


def fully_reached(point: Point, level: float) -> bool:
    """Whether every run of ``point`` reached training loss ``level``."""
    return point["sharpness"][level_key(level)]["reached"] == point["seeds"]


def common_level(points: list[Point], levels: Sequence[float]) -> float | None:
    """The lowest matched-loss level that every run of every point reached (None if none)."""
    return next((v for v in sorted(levels) if all(fully_reached(p, v) for p in points)), None)


def figure_level(points: list[Point], levels: Sequence[float]) -> float:
    """The level at which the most points have all their runs (ties: the lower level)."""
    return max(sorted(levels), key=lambda v: sum(fully_reached(p, v) for p in points))


def points_by_key(points: list[Point]) -> dict[tuple[str, str], Point]:
    """The points by ``(method, str(batch_size))``."""
    return {(p["method"], str(p["batch_size"])): p for p in points}


def method_points(points: list[Point], method: str) -> list[Point]:
    """``method``'s points by increasing global batch."""
    return sorted((p for p in points if p["method"] == method), key=lambda p: p["global_batch"])


# -- checks against the papers -------------------------------------------------------------------
def compare(a: tuple[float, float, int], b: tuple[float, float, int], expect_larger: bool) -> str:
    """``"agrees"`` when ``a − b`` has the expected sign and is at least ``SIGNIFICANCE``
    standard errors of the difference (``sqrt(sa²/na + sb²/nb)``), ``"disagrees"`` when it has
    the other sign that clearly, else ``"within noise"``. Arguments: (mean, std, count)."""
    (ma, sa, na), (mb, sb, nb) = a, b
    if any(math.isnan(v) for v in (ma, mb)):
        return "not measured"
    diff = ma - mb if expect_larger else mb - ma
    error = math.sqrt(sa**2 / max(na, 1) + sb**2 / max(nb, 1))
    if diff > SIGNIFICANCE * error and diff > 0:
        return "agrees"
    if -diff > SIGNIFICANCE * error and diff < 0:
        return "disagrees"
    return "within noise"


def accuracy_of(point: Point) -> tuple[float, float, int]:
    return point["test_accuracy_mean"], point["test_accuracy_std"], point["seeds"]


def sharpness_of(point: Point, level: float) -> dict[str, Any]:
    return point["sharpness"][level_key(level)]


def median_sharpness(point: Point, level: float) -> float:
    return sharpness_of(point, level)["median"]


def separated(lower: Sequence[float], higher: Sequence[float]) -> str:
    """``"agrees"`` when every value of ``lower`` is below every value of ``higher`` (for 3
    against 3 runs a chance of 1 in 20 if both came from one distribution), ``"disagrees"`` when
    every value is above, else ``"within noise"``."""
    if not lower or not higher:
        return "not measured"
    if max(lower) < min(higher):
        return "agrees"
    if min(lower) > max(higher):
        return "disagrees"
    return "within noise"


def describe_batch(point: Point) -> str:
    if str(point["batch_size"]) == "full":
        return f"full batch ({point['global_batch']:,})"
    return f"batch {point['global_batch']}"


def check_line(source: str, claim: str, verdict: str, evidence: str) -> dict[str, str]:
    return {
        "source": source,
        "claim": claim,
        "verdict": verdict,
        "text": f"{source}: {claim} — **{verdict}** ({evidence}).",
    }


def sgd_batch_checks(points: list[Point], levels: Sequence[float]) -> list[dict[str, str]]:
    """Keskar et al.: SGD's accuracy falls and its sharpness rises as the batch grows (sharpness:
    the smallest batch against the largest whose runs reached a common training loss)."""
    sgd = method_points(points, "sgd")
    if len(sgd) < 2:
        return []
    small, large = sgd[0], sgd[-1]
    checks = [
        check_line(
            "Keskar et al. 2017",
            "SGD's test accuracy falls as the batch grows",
            compare(accuracy_of(small), accuracy_of(large), expect_larger=True),
            f"{small['test_accuracy_mean']:.4f} at {describe_batch(small)}, "
            f"{large['test_accuracy_mean']:.4f} at {describe_batch(large)}",
        )
    ]
    for large in reversed(sgd[1:]):
        level = common_level([small, large], levels)
        if level is None:
            continue
        checks.append(
            check_line(
                "Keskar et al. 2017",
                f"SGD's sharpness at matched training loss ({level:g}) rises with the batch",
                separated(
                    sharpness_of(small, level)["values"], sharpness_of(large, level)["values"]
                ),
                f"median top Hessian eigenvalue {median_sharpness(small, level):.3g} at "
                f"{describe_batch(small)}, {median_sharpness(large, level):.3g} at "
                f"{describe_batch(large)}",
            )
        )
        break
    return checks


def shared_batches(points: list[Point], method: str, reference: str) -> list[tuple[Point, Point]]:
    """``(method's point, reference's point)`` at every batch both have, ascending."""
    theirs = {p["global_batch"]: p for p in method_points(points, reference)}
    return [
        (p, theirs[p["global_batch"]])
        for p in method_points(points, method)
        if p["global_batch"] in theirs
    ]


def accuracy_checks(
    points: list[Point], method: str, reference: str, source: str, claim: str
) -> list[dict[str, str]]:
    """``method``'s test accuracy above ``reference``'s at every batch both have."""
    return [
        check_line(
            source,
            f"{claim} at {describe_batch(a)}",
            compare(accuracy_of(a), accuracy_of(b), expect_larger=True),
            f"{a['test_accuracy_mean']:.4f} vs {b['test_accuracy_mean']:.4f}",
        )
        for a, b in shared_batches(points, method, reference)
    ]


def flatness_checks(
    points: list[Point], levels: Sequence[float], method: str, reference: str, source: str
) -> list[dict[str, str]]:
    """``method``'s sharpness below ``reference``'s at every shared batch where both reached a
    common training loss (the lowest such level)."""
    checks = []
    for a, b in shared_batches(points, method, reference):
        level = common_level([a, b], levels)
        if level is None:
            continue
        checks.append(
            check_line(
                source,
                f"mixup makes K-FAC's solution flatter at {describe_batch(a)} (top Hessian "
                f"eigenvalue at training loss {level:g})",
                separated(sharpness_of(a, level)["values"], sharpness_of(b, level)["values"]),
                f"median {median_sharpness(a, level):.3g} vs {median_sharpness(b, level):.3g}",
            )
        )
    return checks


def paper_checks(points: list[Point], levels: Sequence[float]) -> list[dict[str, str]]:
    """The seed papers' claims, each evaluated on this study's numbers (see ``compare``)."""
    naganuma = "Naganuma & Yokota 2019"
    return [
        *sgd_batch_checks(points, levels),
        *accuracy_checks(points, "kfac", "sgd", "Osawa et al. 2019", "K-FAC beats SGD"),
        *accuracy_checks(points, "kfac_mixup", "kfac", naganuma, "mixup raises K-FAC's accuracy"),
        *flatness_checks(points, levels, "kfac_mixup", "kfac", naganuma),
    ]


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


def comparison_table(report: dict[str, Any]) -> str:
    """The comparison's rows: batch, lr, accuracy, steps to target, steps, time, sharpness."""
    level = min(report["matched_train_losses"])
    target = report["target_accuracy"]
    lines = [
        f"| method | batch | base lr | test accuracy (mean ± std) | steps to {target:.0%} "
        f"| total steps | wall time per run (s) | top Hessian eigenvalue at train loss {level:g} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row, point in report["comparison"].items():
        steps = point["steps_to_target_mean"]
        steps_cell = "n/a" if math.isnan(steps) else f"{steps:.0f}"
        if not math.isnan(steps):
            steps_cell += f" ({point['runs_reaching_target']}/{point['seeds']} runs)"
        lines.append(
            f"| {row} | {point['global_batch']} | {point['lr']:g} | "
            f"{fmt_mean_std(point['test_accuracy_mean'], point['test_accuracy_std'])} | "
            f"{steps_cell} | {point['total_steps']} | {point['mean_wall_time_s']:.1f} | "
            f"{sharpness_cell(point, level)} |"
        )
    return "\n".join(lines)


def sweep_table(report: dict[str, Any]) -> str:
    """One row per (method, batch): lr, accuracy, final training loss, sharpness per level."""
    levels = report["matched_train_losses"]
    header = "| method | batch | steps | base lr | test accuracy | final train loss | "
    header += " | ".join(f"λmax at loss {level:g}" for level in levels) + " |"
    lines = [header, "|---|---:|---:|---:|---:|---:|" + "---:|" * len(levels)]
    for point in report["points"]:
        cells = [
            point["method"],
            describe_batch(point).removeprefix("batch "),
            str(point["total_steps"]),
            f"{point['lr']:g}",
            fmt_mean_std(point["test_accuracy_mean"], point["test_accuracy_std"]),
            f"{point['final_train_loss_mean']:.3f}",
            *(sharpness_cell(point, level) for level in levels),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tuning_lines(report: dict[str, Any]) -> list[str]:
    """Per tuned point: each lr's validation accuracy, the chosen one in bold."""
    lines = []
    for point in report["points"]:
        if not point["tuning"]:
            continue
        trials = ", ".join(
            (f"**{lr} → {score['val_acc']:.3f}**" if float(lr) == point["lr"] else "")
            or f"{lr} → {score['val_acc']:.3f}"
            for lr, score in point["tuning"].items()
        )
        lines.append(f"{point['method']} at {describe_batch(point)}: {trials}")
    return lines


# -- figures ------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(report: dict[str, Any], path: Path) -> None:
    """Test accuracy against optimizer steps for the comparison's rows (mean ± std, log x)."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    points = points_by_key(report["points"])
    drawn: set[str] = set()
    for row, summary in report["comparison"].items():
        runs = points[(summary["method"], str(summary["batch_size"]))]["runs"]
        steps = [point["step"] for point in runs[0]["curve"]]
        curves = [[point["val_acc"] for point in run["curve"]] for run in runs]
        mean = [statistics.mean(column) for column in zip(*curves, strict=True)]
        std = [statistics.stdev(c) if len(c) > 1 else 0.0 for c in zip(*curves, strict=True)]
        colour = COLOURS.get(summary["method"])
        style = "--" if summary["method"] in drawn else "-"  # the method's second batch
        drawn.add(summary["method"])
        label = f"{row} (batch {summary['global_batch']})"
        axes.plot(steps, mean, label=label, color=colour, linestyle=style)
        low = [m - s for m, s in zip(mean, std, strict=True)]
        high = [m + s for m, s in zip(mean, std, strict=True)]
        axes.fill_between(steps, low, high, alpha=0.15, color=colour)
    axes.set_xscale("log")
    axes.set_xlabel("optimizer steps")
    axes.set_ylabel("test accuracy")
    axes.set_ylim(0.5, 1.0)
    axes.axhline(report["target_accuracy"], color="grey", linestyle=":", linewidth=1)
    axes.set_title(f"digits: mean ± std over {report['preset']['seeds']} seeds")
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_batch_sweep(report: dict[str, Any], path: Path) -> None:
    """Test accuracy and sharpness at matched training loss against the batch size (log x).

    The sharpness panel uses ``figure_level``; points whose runs did not all reach it are left out
    and named in the panel.
    """
    plt = _pyplot()
    levels = report["matched_train_losses"]
    level = figure_level(report["points"], levels)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    batches: set[int] = set()
    missing: list[str] = []
    for method, spec in report["methods"].items():
        points = method_points(report["points"], method)
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
            entries = [sharpness_of(p, level) for p in reached]
            right.errorbar(
                [p["global_batch"] for p in reached],
                [e["median"] for e in entries],
                yerr=[
                    [e["median"] - e["min"] for e in entries],
                    [e["max"] - e["median"] for e in entries],
                ],
                **style,
            )
    for axes in (left, right):
        axes.set_xscale("log", base=2)
        axes.set_xticks(sorted(batches), [str(b) for b in sorted(batches)])
        axes.minorticks_off()
        axes.set_xlabel("global batch size (largest = full training set)")
    left.set_ylabel("test accuracy (mean ± std over seeds)")
    left.set_title(f"test accuracy after {report['preset']['epochs']} epochs")
    left.legend(loc="lower left")
    notes = [f"not all runs reached loss {level:g}: " + short_list(missing)] if missing else []
    if right.has_data():
        right.set_yscale("log")
        notes += clip_outliers(right, report["points"], level)
    if notes:
        right.text(0.02, 0.02, "\n".join(notes), transform=right.transAxes, fontsize=7)
    right.set_ylabel("top Hessian eigenvalue (median, min–max)")
    right.set_title(f"sharpness where the clean training loss first reaches {level:g}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def short_list(items: list[str], shown: int = 3) -> str:
    """``items`` joined by commas, at most ``shown`` of them (then "and N more")."""
    rest = len(items) - shown
    return ", ".join(items[:shown]) + (f" and {rest} more" if rest > 0 else "")


def clip_outliers(axes: Any, points: list[Point], level: float) -> list[str]:
    """Keep the sharpness axis on the medians: runs far below every median (a saturated softmax
    has almost no curvature) are left off the axis and named instead."""
    plotted = [p for p in points if fully_reached(p, level)]
    bottom = 0.2 * min(sharpness_of(p, level)["median"] for p in plotted)
    axes.set_ylim(bottom=bottom)
    return [
        f"{p['method']} at {describe_batch(p)}: a run at {sharpness_of(p, level)['min']:.1g}, "
        "below the axis"
        for p in plotted
        if sharpness_of(p, level)["min"] < bottom
    ]


# -- docs/study.md ------------------------------------------------------------------------------
def study_block(report: dict[str, Any], figures: str = "study") -> str:
    """The generated block of ``docs/study.md`` (markers included), rendered from ``report``;
    ``figures``: where the figures and ``study.json`` are, relative to the page."""
    preset, timing = report["preset"], report["timing"]
    level = figure_level(report["points"], report["matched_train_losses"])
    load = timing.get("load_average_at_start")
    load_note = f", 1-minute load average {load:.1f} at the start" if load is not None else ""
    lines = [
        BLOCK_BEGIN,
        "<!-- Generated by `python examples/large_batch_study --write-docs` from the run's "
        "study.json: edit examples/large_batch_study/report.py, not this block. -->",
        "",
        f"`{report['command']}` — {preset['seeds']} seeds per point, {preset['epochs']} epochs "
        f"for every run, {report['devices']} CPU ranks × {report['threads_per_rank']} thread. "
        f"This run took {timing['wall_time_s'] / 60:.1f} minutes "
        f"(CPU time {timing['cpu_time_s'] / 60:.1f} minutes{load_note}); its numbers are in "
        f"[`docs/study/study.json`]({figures}/study.json).",
        "",
        "**Comparison** (the study's question: K-FAC + mixup against SGD at a large batch):",
        "",
        comparison_table(report),
        "",
        f"![test accuracy against optimizer steps]({figures}/accuracy.png)",
        "",
        "**Batch-size sweep** (the seed papers' figure: test accuracy and sharpness at matched "
        "training loss against the batch, up to the full training set):",
        "",
        f"![test accuracy and sharpness against the batch size]({figures}/batch_sweep.png)",
        "",
        sweep_table(report),
        "",
        "How it was run: every point got the same learning-rate trials (base lr "
        f"{', '.join(f'{lr:g}' for lr in preset['lr_grid'])} at batch {report['base_batch']}, "
        "LEGW-scaled: × √k, warmup epochs × k at batch 32·k), one run each scored on a "
        "validation split held out of the training set — never on the test set — and the best "
        "validation accuracy chose the learning rate (ties: lower validation loss):",
        "",
        *(f"- {line}" for line in tuning_lines(report)),
        "",
        "Sharpness is the top Hessian eigenvalue (power iteration on Hessian-vector products) of "
        f"the loss on the first {report['sharpness_samples']} training images, measured when the "
        "clean loss of the whole training set first falls to "
        f"{' and '.join(f'{v:g}' for v in report['matched_train_losses'])}; the figure uses "
        f"{level:g}, the level that the most points reached in all their runs. Eigenvalues spread "
        "by factors across seeds, so they are given as median (min–max) and a difference counts "
        "when every run of one point lies beyond every run of the other.",
        "",
        "Checks against the papers, computed from the numbers above (accuracy: a difference "
        f"counts when it exceeds {SIGNIFICANCE:g} standard errors of the difference of the means; "
        "sharpness: when every run of one point lies beyond every run of the other):",
        "",
        *(f"- {check['text']}" for check in report["checks"]),
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
