"""The large-batch study's pieces without training: console, data, models, plan, claims,
configurations, report, docs."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from examples.data import FULL_BATCH, DigitsDataModule, MNIST1DDataModule, generate_mnist1d
from examples.large_batch_study.claims import (
    CLAIMS,
    THRESHOLD,
    declare,
    evaluate,
    separated,
    time_verdict,
)
from examples.large_batch_study.console import LIGHTNING_LOGGERS, StudyProgress, quiet_training
from examples.large_batch_study.report import (
    BLOCK_BEGIN,
    BLOCK_END,
    DOC_FILES,
    STUDY_PAGE,
    comparison_table,
    replace_between_markers,
    study_block,
    time_table,
    write_docs,
)
from examples.large_batch_study.study import (
    BENCHMARKS,
    CLAIM_POINTS,
    ISA_ENVIRONMENT,
    PRESETS,
    check_isa,
    choose_lr,
    compare_configurations,
    process_age,
    study_points,
    tie_tolerance,
)
from examples.model import make_network
from lightning_kfac import KFACPreconditioner

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


class Clock:
    """A simulated clock: ``advance`` moves it; the progress display reads it."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_progress_without_a_terminal_prints_promptly_and_stays_short() -> None:
    """Not a terminal: a line when the first run starts, one per note, and otherwise at most one
    per heartbeat when a run starts."""
    err, out, clock = io.StringIO(), io.StringIO(), Clock()
    runs = [("sgd b64", 10.0)] * 4
    progress = StudyProgress(runs, stream=err, out=out, clock=clock, heartbeat=60.0)
    assert not progress.interactive  # StringIO is not a terminal: no bar
    progress.start_run("cnn sgd batch 64 seed 0 (test, lr 0.1)")
    assert "run 1/4: cnn sgd batch 64 seed 0" in out.getvalue()  # at once, before any run ends
    for _ in range(2):
        clock.advance(20.0)
        progress.finish_run()
        progress.start_run("cnn sgd batch 64 seed 1 (test, lr 0.1)")
    assert len(out.getvalue().splitlines()) == 1  # 40 s since the last line: no heartbeat yet
    clock.advance(25.0)
    progress.finish_run()
    progress.start_run("cnn sgd batch 64 seed 3 (test, lr 0.1)")  # 65 s: a heartbeat
    clock.advance(20.0)
    progress.finish_run()
    progress.note("cnn sgd batch 64: test accuracy 0.95")
    progress.close()
    assert err.getvalue() == ""
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert "3/4 runs" in lines[1] and "run 4/4" in lines[1]
    assert "4/4 runs" in lines[2] and lines[2].endswith("test accuracy 0.95")


def test_progress_bar_reports_runs_and_time_left() -> None:
    err, out = io.StringIO(), io.StringIO()
    runs = [("kfac b512", 2.0), ("kfac bfull", 2.0)]
    progress = StudyProgress(runs, stream=err, out=out, interactive=True)
    progress.start_run("cnn kfac batch 512 seed 1 (test, lr 0.01)")
    progress.finish_run()
    progress.start_run("cnn kfac batch full seed 0 (test, lr 0.01)")
    progress.close()
    drawn = err.getvalue()
    assert "run 1/2: cnn kfac batch 512 seed 1" in drawn and "run 2/2: cnn kfac batch full" in drawn
    assert "elapsed" in drawn and "left" in drawn


def test_time_left_against_a_simulated_clock() -> None:
    """Runs of two kinds whose true durations differ from the prior cost model by different
    factors: the estimate is the prior until a run finishes, learns one global factor from the
    first run, and is exact once each kind has run once (and stays so)."""
    clock = Clock()
    prior = {"sgd": 10.0, "kfac": 20.0}
    true = {"sgd": 30.0, "kfac": 100.0}  # sgd 3x slower than modelled, kfac 5x
    kinds = ["sgd", "sgd", "kfac", "sgd", "kfac", "kfac"]
    progress = StudyProgress([(k, prior[k]) for k in kinds], out=io.StringIO(), clock=clock)

    def true_left(done: int, into_run: float = 0.0) -> float:
        return sum(true[k] for k in kinds[done:]) - into_run

    assert progress.remaining() == pytest.approx(sum(prior[k] for k in kinds))
    progress.start_run("sgd")
    clock.advance(12.0)  # inside a run, its elapsed time is taken off
    assert progress.remaining() == pytest.approx(sum(prior[k] for k in kinds) - 10.0)
    clock.advance(true["sgd"] - 12.0)
    progress.finish_run()
    # one global factor (3x) so far: sgd exact, kfac 3 x 20 = 60 instead of 100
    assert progress.remaining() == pytest.approx(2 * 30.0 + 3 * 60.0)
    for done, kind in enumerate(kinds[1:], start=1):
        progress.start_run(kind)
        clock.advance(true[kind] / 2)
        if done >= 3:  # both kinds seen: exact, also halfway through a run
            assert progress.remaining() == pytest.approx(true_left(done, true[kind] / 2))
        clock.advance(true[kind] / 2)
        progress.finish_run()
        if done >= 2:
            assert progress.remaining() == pytest.approx(true_left(done + 1))
    assert progress.remaining() == 0.0
    assert progress.elapsed() == pytest.approx(sum(true[k] for k in kinds))


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


def tiny_mnist1d(tmp_path: Path, **kwargs) -> MNIST1DDataModule:
    """MNIST-1D from a small generation: 200 samples per generation (160 train / 40 test)."""
    return MNIST1DDataModule(32, base_samples=200, cache_dir=tmp_path, **kwargs)


def test_mnist1d_is_the_package_generator_with_its_published_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loader gives exactly ``make_dataset(get_dataset_args())``'s arrays (with the sample
    count made small), never downloads, caches them keyed by the arguments, and leaves Python's
    and NumPy's global random state as it found it."""
    mnist1d_data = pytest.importorskip("mnist1d.data")
    from mnist1d.utils import ObjectView

    def no_download(*args, **kwargs):
        raise AssertionError("MNIST-1D must be generated, not downloaded")

    monkeypatch.setattr(mnist1d_data.requests, "get", no_download)
    random.seed(7)
    np.random.seed(7)
    states = random.getstate(), np.random.get_state()[1].copy()
    module = tiny_mnist1d(tmp_path)
    module.prepare_data()
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])

    published = mnist1d_data.get_dataset_args(as_dict=True)
    assert {k: v for k, v in published.items() if k not in ("url", "num_samples")} == {
        k: v for k, v in module.generations()[0].items() if k != "num_samples"
    }
    expected = mnist1d_data.make_dataset(ObjectView({**published, "num_samples": 200}))
    module.setup()
    x, y = module.train_set.tensors
    x_test, y_test = module.test_set.tensors
    assert x.shape == (160, 1, 40) and x_test.shape == (40, 1, 40)
    assert torch.equal(y, torch.from_numpy(expected["y"])) and y.dtype == torch.int64
    assert torch.equal(y_test, torch.from_numpy(expected["y_test"]))
    # standardised with the training set's statistics, otherwise the generator's signals
    raw = torch.from_numpy(expected["x"]).float()
    assert torch.allclose(x.squeeze(1), (raw - raw.mean()) / raw.std(), atol=1e-6)
    assert float(x.mean()) == pytest.approx(0.0, abs=1e-5)

    (cached,) = tmp_path.glob("mnist1d-*.npz")
    monkeypatch.setattr(mnist1d_data, "make_dataset", no_download)  # now from the cache only
    again = generate_mnist1d(module.generations()[0], tmp_path)
    assert np.array_equal(again["x"], expected["x"]) and cached.exists()


def test_mnist1d_larger_training_set_and_validation_split(tmp_path: Path) -> None:
    """More training samples come from further generations (seeds 43, …); the test set stays the
    published one; tuning holds out a fifth of the training set and never sees the test set."""
    pytest.importorskip("mnist1d")
    small = tiny_mnist1d(tmp_path)
    large = tiny_mnist1d(tmp_path, train_samples=450)
    assert [g["seed"] for g in large.generations()] == [42, 43, 44]
    small.setup()
    large.setup()
    assert len(large.train_set) == 450
    assert torch.equal(large.train_set.tensors[1][:160], small.train_set.tensors[1])
    assert torch.equal(large.test_set.tensors[1], small.test_set.tensors[1])
    extra = generate_mnist1d(large.generations()[1], tmp_path)
    assert torch.equal(
        large.train_set.tensors[1][160:360],
        torch.from_numpy(np.concatenate([extra["y"], extra["y_test"]])),
    )
    tune = tiny_mnist1d(tmp_path, validation=True)
    tune.setup()
    assert (len(tune.train_set), len(tune.test_set)) == (128, 32)
    held = {tuple(row.flatten().tolist()) for row in tune.test_set.tensors[0]}
    kept = {tuple(row.flatten().tolist()) for row in tune.train_set.tensors[0]}
    assert not held & kept
    with pytest.raises(ValueError, match="at least 160"):
        tiny_mnist1d(tmp_path, train_samples=100)


# -- models -------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["cnn", "gru", "lstm"])
def test_mnist1d_networks_are_fully_preconditioned(arch: str) -> None:
    """The 1-D CNN and the recurrent models classify ``[N, 1, 40]`` signals, and K-FAC
    preconditions every parameter of them (the GRU/LSTM through the recurrent kind)."""
    torch.manual_seed(0)
    model = make_network((1, 40), 10, arch)
    x, y = torch.randn(8, 1, 40), torch.randint(0, 10, (8,))
    assert model(x).shape == (8, 10)
    pre = KFACPreconditioner(model, damping=1e-2, kl_clip=None)
    F.cross_entropy(model(x), y).backward()
    pre.step()
    assert pre.preconditioned_fraction == 1.0, pre.coverage_report()
    if arch != "cnn":
        assert "rnn.weight_hh_l0" in pre.coverage_report()


def test_recurrent_network_reads_windows_of_the_signal() -> None:
    """Time step t of the GRU sees samples 4t … 4t+3 of the signal."""
    model = make_network((1, 40), 10, "gru")
    seen = []
    model.rnn.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    x = torch.arange(80.0).reshape(2, 1, 40)
    model(x)
    assert seen[0].shape == (2, 10, 4)
    assert seen[0][1, 3].tolist() == [52.0, 53.0, 54.0, 55.0]


# -- plan and tuning -----------------------------------------------------------------------------
def test_every_preset_has_the_claims_points() -> None:
    for benchmark in BENCHMARKS.values():
        for name, preset in PRESETS.items():
            points = study_points(benchmark, preset)
            for model in benchmark.models:
                for method, roles in CLAIM_POINTS.items():
                    for role in roles:
                        assert (model, method, benchmark.batch(role)) in points, (name, method)
    assert PRESETS["default"].seeds >= 5


def test_claims_are_declared_for_the_methods_that_run() -> None:
    every = declare(["cnn", "gru"], list(CLAIM_POINTS))
    assert len(every) == 2 * len(CLAIMS)
    assert {c.test for c in every} == {"accuracy", "not_below", "sharpness", "time"}
    only = declare(["cnn"], ["kfac_mixup", "kfac"])
    assert {c.id for c in only} == {"cnn:mixup_raises_kfac", "cnn:mixup_flatter"}
    assert all("standard errors" in c.declared()["rule"] for c in every if c.test == "accuracy")


def test_choose_lr_scores_an_lr_by_its_worse_seed_and_breaks_ties_downwards() -> None:
    """An lr counts with its worse run (an lr that diverges on one seed loses to a steady one);
    scores within two binomial standard errors of the best are a tie, won by the smaller lr."""
    assert tie_tolerance(0.5, 800) == pytest.approx(2 * math.sqrt(0.25 / 800))
    tuning = {
        0.01: [{"val_acc": 0.60, "val_loss": 1.0}],
        0.03: [{"val_acc": 0.70, "val_loss": 0.8}],
        0.1: [{"val_acc": 0.80, "val_loss": 0.5}],
    }
    assert choose_lr(tuning, 800) == 0.1
    tuning[0.1].append({"val_acc": 0.3, "val_loss": 2.0})  # diverged on the second seed
    assert choose_lr(tuning, 800) == 0.03
    tuning[0.1][1]["val_acc"] = 0.72  # 0.72 vs 0.70: within 2 SE (0.032) -> the smaller lr
    assert choose_lr(tuning, 800) == 0.03
    tuning[0.1][1]["val_acc"] = 0.74  # 0.04 apart: evidence
    assert choose_lr(tuning, 800) == 0.1
    assert choose_lr(tuning, 80) == 0.03  # the same gap on 80 validation samples is a tie


def test_tuning_confirms_the_best_lr_with_a_second_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    """``tune`` runs the grid on one seed, then confirms the best; a failed confirmation hands
    the choice to the runner-up, which is confirmed in turn. Unplanned runs join the progress."""
    import examples.large_batch_study.study as study

    scores = {(0.03, 1000): 0.70, (0.1, 1000): 0.90, (0.3, 1000): 0.95}
    scores |= {(0.3, 1001): 0.20, (0.1, 1001): 0.88}
    trained = []

    def fake(run, ctx):
        trained.append((run.lr, run.seed))
        return {"curve": [{"val_acc": scores[(run.lr, run.seed)], "val_loss": 1.0}]}

    monkeypatch.setattr(study, "train_with_progress", fake)
    benchmark = study.BENCHMARKS["mnist1d"]
    ctx = study.StudyContext(benchmark, study.PRESETS["default"], "default", 2, "csv", Path("."))
    ctx.progress = StudyProgress([("k", 1.0)] * 4, out=io.StringIO())
    lr, tuning = study.tune("cnn", "sgd", 512, ctx)
    assert lr == 0.1
    assert trained == [(0.03, 1000), (0.1, 1000), (0.3, 1000), (0.3, 1001), (0.1, 1001)]
    assert [t["val_acc"] for t in tuning[0.3]] == [0.95, 0.20]
    assert ctx.progress.total_runs == 5  # the second confirmation was not planned


# -- claims --------------------------------------------------------------------------------------
def point(mean: float, std: float, seeds: int = 5, **extra) -> dict:
    return {"test_accuracy_mean": mean, "test_accuracy_std": std, "seeds": seeds, **extra}


def verdict(test: str, a: dict, b: dict) -> dict:
    claim = {"id": "x", "test": test, "a": ["m", "large"], "b": ["n", "large"]}
    return evaluate(claim, {("m", "large"): a, ("n", "large"): b}, [0.5, 0.2])


def test_accuracy_claims_need_the_declared_standard_errors() -> None:
    se = math.sqrt(2 * 0.01**2 / 5)
    just_above, just_below = (THRESHOLD + 0.1) * se, (THRESHOLD - 0.1) * se
    assert verdict("accuracy", point(0.9 + just_above, 0.01), point(0.9, 0.01))["verdict"] == (
        "agrees"
    )
    result = verdict("accuracy", point(0.9 + just_below, 0.01), point(0.9, 0.01))
    assert result["verdict"] == "within noise"
    assert result["z"] == pytest.approx(THRESHOLD - 0.1)
    assert verdict("accuracy", point(0.9, 0.01), point(0.95, 0.01))["verdict"] == "disagrees"
    assert verdict("not_below", point(0.9, 0.01), point(0.95, 0.01))["verdict"] == "disagrees"
    assert verdict("not_below", point(0.949, 0.01), point(0.95, 0.01))["verdict"] == "agrees"
    assert verdict("accuracy", point(0.9, 0.0), point(0.9, 0.0))["verdict"] == "within noise"


def test_sharpness_and_time_claims_by_non_overlap() -> None:
    assert separated([1.0, 2.0], [2.5, 3.0]) == "agrees"
    assert separated([1.0, 2.6], [2.5, 3.0]) == "within noise"
    assert separated([4.0], [2.5, 3.0]) == "disagrees"
    nan = math.nan
    assert time_verdict([1.0, 2.0], [nan, nan]) == "agrees"  # never reaching is slowest
    assert time_verdict([1.0, nan], [3.0, 4.0]) == "within noise"
    assert time_verdict([5.0, 6.0], [3.0, 4.0]) == "disagrees"
    assert time_verdict([nan], [nan]) == "not measured"

    def sharp(values: list[float]) -> dict:
        return {"0.5": {"values": values, "reached": len(values)}, "0.2": {"reached": 0}}

    result = verdict(
        "sharpness",
        point(0.9, 0.0, 2, sharpness=sharp([1, 2])),
        point(0.9, 0.0, 2, sharpness=sharp([3, 4])),
    )
    assert result["verdict"] == "agrees" and result["level"] == 0.5
    result = verdict(
        "time", point(0.9, 0.0, seconds_to_target=[1.0]), point(0.9, 0.0, seconds_to_target=[2.0])
    )
    assert result["verdict"] == "agrees"
    assert (
        evaluate({"id": "x", "test": "accuracy", "a": ["m", "large"], "b": ["o", "large"]}, {}, [])[
            "verdict"
        ]
        == "not measured"
    )


# -- two CPU configurations -----------------------------------------------------------------------
def test_compare_configurations_names_flipped_verdicts() -> None:
    def report(isa: str, verdicts: dict[str, str]) -> dict:
        command = "python examples/large_batch_study" + ("" if isa == "native" else " --isa avx2")
        return {
            "command": command,
            "machine": {"isa": isa, "torch_cpu_capability": isa.upper()},
            "points": [
                {
                    "model": "cnn",
                    "method": "sgd",
                    "batch_size": 64,
                    "lr": 0.1,
                    "test_accuracy_mean": 0.9,
                    "test_accuracy_std": 0.01,
                }
            ],
            "verdicts": [{"id": k, "verdict": v, "z": 1.0} for k, v in verdicts.items()],
        }

    native = report("native", {"a": "agrees", "b": "within noise"})
    same = compare_configurations(native, report("avx2", {"a": "agrees", "b": "within noise"}))
    assert same["verdicts_identical"] and same["flipped"] == []
    flipped = compare_configurations(native, report("avx2", {"a": "agrees", "b": "agrees"}))
    assert not flipped["verdicts_identical"] and flipped["flipped"] == ["b"]
    other = report("avx2", {})
    other["command"] += " --quick"
    with pytest.raises(SystemExit, match="differ"):
        compare_configurations(native, other)


def test_isa_configuration_reaches_torch_and_is_checked() -> None:
    """``--isa avx2``'s variables limit torch's kernels when set before torch is imported (what
    ``__main__`` does); the study refuses to run a configuration whose variables are not set."""
    env = {**os.environ, **ISA_ENVIRONMENT["avx2"]}
    capability = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert capability in ("AVX2", "DEFAULT")  # DEFAULT on a CPU without AVX2
    check_isa("native")
    if os.environ.get("ONEDNN_MAX_CPU_ISA") != "AVX2":
        with pytest.raises(SystemExit, match="ONEDNN_MAX_CPU_ISA=AVX2"):
            check_isa("avx2")


def test_process_age_counts_from_the_process_start() -> None:
    assert process_age() >= time.process_time() * 0  # positive
    assert process_age() > 0.1  # the interpreter and pytest started well before this test


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
    from docs/study/study.json exactly as ``--write-docs`` does, and that run is the documented
    command with its second CPU configuration's verdicts."""
    report = json.loads((ROOT / "docs" / "study" / "study.json").read_text())
    page = (ROOT / STUDY_PAGE).read_text()
    begin, end = page.index(BLOCK_BEGIN), page.index(BLOCK_END) + len(BLOCK_END)
    assert page[begin:end] == study_block(report)
    assert (ROOT / "docs/study/table.md").read_text() == comparison_table(report) + "\n"
    assert (ROOT / "docs/study/time.md").read_text() == time_table(report) + "\n"
    assert report["command"] == "python examples/large_batch_study"
    assert report["command"] in page[begin:end]
    assert [run["machine"]["isa"] for run in report["configurations"]["runs"]] == ["native", "avx2"]
    for figure in ("accuracy.png", "time.png", "batch_sweep.png"):
        assert (ROOT / "docs" / "study" / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
