"""The large-batch study's pieces without training: console, data, tuning, report, docs."""

from __future__ import annotations

import io
import json
import logging
import math
import warnings
from pathlib import Path

import pytest

from examples.data import FULL_BATCH, DigitsDataModule
from examples.large_batch_study.console import LIGHTNING_LOGGERS, StudyProgress, quiet_training
from examples.large_batch_study.report import (
    BLOCK_BEGIN,
    BLOCK_END,
    DOC_FILES,
    STUDY_PAGE,
    compare,
    comparison_table,
    replace_between_markers,
    study_block,
    sweep_table,
    write_docs,
)
from examples.large_batch_study.study import COMPARISON, PRESETS, choose_lr, study_points

ROOT = Path(__file__).resolve().parents[1]


# -- console -----------------------------------------------------------------------------------
def test_quiet_training_silences_lightning_banners_and_restores_everything() -> None:
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    levels, filters = [lg.level for lg in loggers], list(warnings.filters)
    with quiet_training():
        assert all(not lg.isEnabledFor(logging.INFO) for lg in loggers)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # what pytest does; our filters must still win
            with quiet_training():
                harmless = "`isinstance(treespec, LeafSpec)` is deprecated, use …"
                warnings.warn(harmless, FutureWarning, stacklevel=1)
                warnings.warn("something the user must see", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something the user must see"]
    assert [lg.level for lg in loggers] == levels
    assert list(warnings.filters) == filters


def test_quiet_training_restores_after_an_exception() -> None:
    logger = logging.getLogger("pytorch_lightning")
    level = logger.level
    with pytest.raises(RuntimeError), quiet_training():
        raise RuntimeError("a run failed")
    assert logger.level == level


def test_progress_without_a_terminal_prints_one_line_per_note() -> None:
    err, out = io.StringIO(), io.StringIO()
    progress = StudyProgress(total_runs=4, total_cost=10.0, stream=err, out=out)
    assert not progress.interactive  # StringIO is not a terminal: no bar
    progress.start_run("sgd batch 32 seed 0 (test, lr 0.1)")
    progress.finish_run(5.0)
    progress.note("sgd batch 32: test accuracy 0.98")
    progress.close()
    assert err.getvalue() == ""
    (line,) = out.getvalue().splitlines()
    assert "1/4 runs" in line and "left]" in line and line.endswith("test accuracy 0.98")


def test_progress_bar_reports_runs_and_eta() -> None:
    err, out = io.StringIO(), io.StringIO()
    progress = StudyProgress(total_runs=2, total_cost=4.0, stream=err, out=out, interactive=True)
    progress.start_run("kfac batch 512 seed 1 (test, lr 0.01)")
    progress.finish_run(2.0)
    progress.start_run("kfac batch full seed 0 (test, lr 0.01)")
    progress.close()
    drawn = err.getvalue()
    assert "run 1/2: kfac batch 512 seed 1" in drawn and "run 2/2: kfac batch full" in drawn
    assert "elapsed" in drawn and "left" in drawn


# -- data ----------------------------------------------------------------------------------------
class _Trainer:
    """What ``TensorDataModule`` reads from its trainer."""

    def __init__(self, world_size: int, global_rank: int) -> None:
        self.world_size, self.global_rank = world_size, global_rank


def rank_batches(module: DigitsDataModule, world: int, epoch: int) -> list[list[list[int]]]:
    """Each rank's batches of one epoch, as lists of training-set indices."""
    module.setup()
    batches = []
    for rank in range(world):
        module.trainer = _Trainer(world, rank)  # type: ignore[assignment]
        loader = module.train_dataloader()
        loader.sampler.set_epoch(epoch)
        batches.append(list(loader.batch_sampler))
    return batches


def test_digits_split_sizes() -> None:
    test = DigitsDataModule(32)
    test.setup()
    tune = DigitsDataModule(32, validation=True)
    tune.setup()
    assert (len(test.train_set), len(test.test_set)) == (1347, 450)
    assert (len(tune.train_set), len(tune.test_set)) == (1077, 270)


def test_full_batch_is_the_whole_training_set_in_one_step_per_rank() -> None:
    module = DigitsDataModule(FULL_BATCH, seed=3)
    assert module.global_batch_size() == 1347
    (rank0,), (rank1,) = rank_batches(module, world=2, epoch=0)
    assert len(rank0) == len(rank1) == 674  # ceil(1347 / 2): the sampler repeats one image
    assert set(rank0) | set(rank1) == set(range(1347))


def test_training_order_is_seeded_and_reshuffled_per_epoch() -> None:
    first = rank_batches(DigitsDataModule(64, seed=5), world=2, epoch=1)
    assert len(first[0]) == 1347 // 64 and len(first[0][0]) == 32
    assert first == rank_batches(DigitsDataModule(64, seed=5), world=2, epoch=1)
    assert first != rank_batches(DigitsDataModule(64, seed=5), world=2, epoch=2)
    assert first != rank_batches(DigitsDataModule(64, seed=6), world=2, epoch=1)
    seen = [{index for batch in rank for index in batch} for rank in first]
    assert not seen[0] & seen[1]  # the ranks split each epoch's permutation


# -- plan and tuning -----------------------------------------------------------------------------
def test_every_preset_contains_the_comparison_and_reaches_full_batch() -> None:
    for name, preset in PRESETS.items():
        points = study_points(preset)
        assert set(COMPARISON.values()) <= set(points), name
        for method in ("sgd", "kfac", "kfac_mixup"):
            assert (method, FULL_BATCH) in points, (name, method)


def test_choose_lr_prefers_accuracy_then_lower_validation_loss() -> None:
    tuning = {
        0.01: {"val_acc": 0.9815, "val_loss": 0.08},
        0.03: {"val_acc": 0.9815, "val_loss": 0.06},
        0.1: {"val_acc": 0.9778, "val_loss": 0.01},
    }
    assert choose_lr(tuning) == 0.03
    tuning[0.1]["val_acc"] = 0.99
    assert choose_lr(tuning) == 0.1


def test_compare_needs_two_standard_errors() -> None:
    assert compare((0.98, 0.005, 5), (0.96, 0.005, 5), expect_larger=True) == "agrees"
    assert compare((0.96, 0.005, 5), (0.98, 0.005, 5), expect_larger=True) == "disagrees"
    assert compare((0.981, 0.01, 3), (0.978, 0.01, 3), expect_larger=True) == "within noise"
    assert compare((math.nan, 0.0, 0), (0.9, 0.0, 3), expect_larger=True) == "not measured"


# -- docs ---------------------------------------------------------------------------------------
def test_replace_between_markers() -> None:
    text = f"intro\n{BLOCK_BEGIN}\nold\n{BLOCK_END}\noutro\n"
    assert replace_between_markers(text, f"{BLOCK_BEGIN}\nnew\n{BLOCK_END}") == (
        f"intro\n{BLOCK_BEGIN}\nnew\n{BLOCK_END}\noutro\n"
    )
    with pytest.raises(ValueError, match="study:begin"):
        replace_between_markers("no markers", "x")


def test_write_docs_rewrites_the_study_page_block_only(tmp_path: Path) -> None:
    """``--write-docs`` copies the results to docs/study/ and rewrites the generated block of
    docs/study.md, keeping the page's hand-written text; the README is not touched."""
    report = json.loads((ROOT / "docs" / "study" / "study.json").read_text())
    out, repo = tmp_path / "out", tmp_path / "repo"
    out.mkdir()
    for name in DOC_FILES:
        (out / name).write_text(f"{name} of this run")
    (repo / "docs").mkdir(parents=True)
    (repo / STUDY_PAGE).write_text(f"# Study\n\n{BLOCK_BEGIN}\nold\n{BLOCK_END}\n\nReading.\n")
    (repo / "README.md").write_text("readme")
    written = write_docs(report, out, repo)
    assert written == [*(repo / "docs" / "study" / name for name in DOC_FILES), repo / STUDY_PAGE]
    assert (repo / STUDY_PAGE).read_text() == f"# Study\n\n{study_block(report)}\n\nReading.\n"
    assert (repo / "README.md").read_text() == "readme"
    for name in DOC_FILES:
        assert (repo / "docs" / "study" / name).read_text() == f"{name} of this run"


def test_docs_are_what_the_published_run_produced() -> None:
    """No hand-edited numbers: docs/study.md's generated block and docs/study/*.md are rendered
    from docs/study/study.json exactly as ``--write-docs`` does."""
    report = json.loads((ROOT / "docs" / "study" / "study.json").read_text())
    page = (ROOT / STUDY_PAGE).read_text()
    begin, end = page.index(BLOCK_BEGIN), page.index(BLOCK_END) + len(BLOCK_END)
    assert page[begin:end] == study_block(report)
    assert (ROOT / "docs/study/table.md").read_text() == comparison_table(report) + "\n"
    assert (ROOT / "docs/study/sweep.md").read_text() == sweep_table(report) + "\n"
    assert report["command"] in page[begin:end]
    for figure in ("accuracy.png", "batch_sweep.png"):
        assert (ROOT / "docs" / "study" / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
