"""The distributed guarantees of ``KFACDDPStrategy`` (issue 9), through real gloo processes.

Every distributed run here uses 2 CPU ranks; nothing mocks torch.distributed. Workers cannot
return values, so each rank writes its own file (``tests._dist_models.RankResult``) and the test
compares them. The default suite uses ``ddp_fork`` in-process (a fraction of a second per fit);
runs that need a subprocess (the popen launcher, a stalled rank) or spawn are marked slow.
One-rank runs that must observe warnings or exceptions directly run in this process
(``start_method="popen"`` with one device does not launch anything).
"""

from __future__ import annotations

import copy
import csv
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import BackboneFinetuning
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.overrides import _get_current_function_mode_stack

import lightning_kfac.lightning as unified
from lightning_kfac import (
    KFACCoverageWarning,
    KFACDDPStrategy,
    KFACNumericalWarning,
    KFACOptions,
    KFACPreconditioner,
)
from tests._dist_models import (
    BranchClassifier,
    FinetuneClassifier,
    MoELanguageModel,
    NaNBatchClassifier,
    RankResult,
    RecurrentModel,
    TiedLanguageModel,
    branch_taken,
    load_ranks,
)
from tests.lightning_support import (
    SaveAfterEpoch,
    TinyClassifier,
    destroy_process_group,
    fit_in_process,
    trainer_kwargs,
)

REPO = Path(__file__).resolve().parents[1]
MODES = ["broadcast_decompositions", "broadcast_gradients"]


def fit_two_ranks(
    tmp_path: Path,
    tag: str,
    module: pl.LightningModule,
    *,
    strategy: KFACDDPStrategy | str | None = None,
    ckpt_path: Path | None = None,
    callbacks: tuple[pl.Callback, ...] = (),
    devices: int = 2,
    **overrides: Any,
) -> list[dict[str, Any]]:
    """``trainer.fit`` on ``devices`` forked gloo ranks; every rank's ``RankResult``."""
    if strategy is None:
        strategy = KFACDDPStrategy(start_method="fork")
    trainer = pl.Trainer(
        strategy=strategy,
        devices=devices,
        callbacks=[RankResult(tmp_path, tag), *callbacks],
        **trainer_kwargs(tmp_path, **overrides),
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return load_ranks(tmp_path, tag, devices)


def assert_kfac_ran(results: list[dict[str, Any]], steps: int, mode: str = MODES[0]) -> None:
    """K-FAC ran on every rank: its steps, distributed factors, decompositions (on every rank, or
    only on each block's owner when gradients are broadcast), and gradients it actually changed
    at every step."""
    assert [r["rank"] for r in results] == list(range(len(results)))
    for result in results:
        assert result["world_size"] == len(results)
        assert result["distributor"] == "TorchDistributedDistributor"
        assert result["global_step"] == result["kfac_steps"] == steps
        assert result["observed_steps"] == result["preconditioned_steps"] == steps
        assert result["factors"] and all(all(s) for s in result["seen"].values())
    for name in results[0]["factors"]:
        holders = [all(d is not None for d in r["decompositions"][name]) for r in results]
        if mode == "broadcast_decompositions":
            assert all(holders), name
        else:
            assert sum(holders) == 1, (name, holders)  # the owner's alone


def assert_bitwise_replicas(results: list[dict[str, Any]]) -> None:
    """Every parameter and every factor is bit-for-bit the same on every rank."""
    first, *others = results
    for other in others:
        assert first["params"].keys() == other["params"].keys()
        for name, value in first["params"].items():
            assert torch.equal(value, other["params"][name]), f"{name} differs between ranks"
        assert first["factors"].keys() == other["factors"].keys()
        for name, values in first["factors"].items():
            for mine, theirs in zip(values, other["factors"][name], strict=True):
                assert torch.equal(mine, theirs), f"factor of {name} differs between ranks"


def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARIABLES}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


DIST_VARIABLES = {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "RANK"}


# -- 1. the three launchers ----------------------------------------------------------------------
def test_kfac_ddp_fork_by_name_runs_kfac_on_both_ranks(tmp_path: Path) -> None:
    results = fit_two_ranks(
        tmp_path, "fork", TinyClassifier(batch_size=8), strategy="kfac_ddp_fork", max_steps=4
    )
    assert_kfac_ran(results, 4)
    assert_bitwise_replicas(results)


@pytest.mark.slow
def test_kfac_ddp_popen_by_name_runs_kfac_on_both_ranks(tmp_path: Path) -> None:
    """``kfac_ddp`` (popen): Lightning re-runs the command for rank 1, so the run is a script."""
    command = [sys.executable, "-m", "tests._dist_script", "launch", "--strategy", "kfac_ddp"]
    completed = subprocess.run(
        [*command, "--out", str(tmp_path), "--steps", "4"],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-5000:]
    results = load_ranks(tmp_path, "launch", 2)
    assert_kfac_ran(results, 4)
    assert_bitwise_replicas(results)


@pytest.mark.slow
def test_kfac_ddp_spawn_by_name_runs_kfac_on_both_ranks(tmp_path: Path) -> None:
    """``kfac_ddp_spawn`` pickles the trainer: strategy, module and callbacks must survive it."""
    results = fit_two_ranks(
        tmp_path, "spawn", TinyClassifier(batch_size=8), strategy="kfac_ddp_spawn", max_steps=4
    )
    assert_kfac_ran(results, 4)
    assert_bitwise_replicas(results)


# -- 2. bitwise-identical replicas ---------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_float32_replicas_stay_bitwise_identical(tmp_path: Path, mode: str) -> None:
    """42 float32 steps, decompositions every 3: every parameter, factor and decomposition is
    bit-for-bit the same on both ranks (the owner keeps exactly what it broadcast)."""
    strategy = KFACDDPStrategy(
        start_method="fork", distribution_mode=mode, inverse_update_interval=3, kl_clip=1e-2
    )
    module = TinyClassifier(batch_size=8, dtype=torch.float32, lr=0.05)
    results = fit_two_ranks(tmp_path, mode, module, strategy=strategy, max_steps=42)
    assert_kfac_ran(results, 42, mode)
    assert_bitwise_replicas(results)
    if mode == "broadcast_decompositions":
        for name, values in results[0]["decompositions"].items():
            for mine, theirs in zip(values, results[1]["decompositions"][name], strict=True):
                for key in mine:
                    assert torch.equal(mine[key], theirs[key]), (name, key)


@pytest.mark.parametrize("mode", MODES)
def test_tied_embedding_replicas_stay_bitwise_identical(tmp_path: Path, mode: str) -> None:
    """A weight shared by the embedding and the LM head: its per-use gradients are all-reduced,
    each use is preconditioned with its own factors; 40 float32 steps stay bit-identical."""
    strategy = KFACDDPStrategy(
        start_method="fork", distribution_mode=mode, inverse_update_interval=3, kl_clip=1e-2
    )
    results = fit_two_ranks(tmp_path, mode, TiedLanguageModel(), strategy=strategy, max_steps=40)
    assert_kfac_ran(results, 40, mode)
    assert_bitwise_replicas(results)
    uses = [name for name in results[0]["factors"] if name.startswith("embedding.weight")]
    assert len(uses) == 2, list(results[0]["factors"])  # the embedding and the head


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("name", "implementation"), [("mixtral", "grouped_mm"), ("qwen2_moe", "eager")]
)
def test_moe_models_are_covered_and_replicas_stay_bitwise_identical(
    tmp_path: Path, name: str, implementation: str, mode: str
) -> None:
    """HF Mixtral and Qwen2-MoE from small configs, experts grouped or one at a time: every
    trainable element preconditioned (experts, router, shared experts, RMSNorm scales), and 10
    float32 steps bit-identical on both ranks."""
    strategy = KFACDDPStrategy(
        start_method="fork", distribution_mode=mode, inverse_update_interval=3, kl_clip=1e-2
    )
    module = MoELanguageModel(name, implementation)
    results = fit_two_ranks(tmp_path, name, module, strategy=strategy, max_steps=10)
    assert_kfac_ran(results, 10, mode)
    assert_bitwise_replicas(results)
    assert results[0]["preconditioned_fraction"] == 1.0
    experts = [n for n in results[0]["factors"] if ".experts." in n]
    assert len(experts) == 4, list(results[0]["factors"])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["lstm_lm", "gru_classifier", "lstm_cell"])
def test_recurrent_models_are_covered_and_replicas_stay_bitwise_identical(
    tmp_path: Path, kind: str, mode: str
) -> None:
    """``nn.LSTM``, ``nn.GRU`` and an ``nn.LSTMCell`` loop as users write them: every trainable
    element preconditioned (each gate projection a block), and 12 float32 steps with factors
    every other step (capture steps unrolled, the others fused) bit-identical on both ranks."""
    strategy = KFACDDPStrategy(
        start_method="fork",
        distribution_mode=mode,
        factor_update_interval=2,
        inverse_update_interval=4,
        kl_clip=1e-2,
    )
    results = fit_two_ranks(tmp_path, kind, RecurrentModel(kind), strategy=strategy, max_steps=12)
    assert_kfac_ran(results, 12, mode)
    assert_bitwise_replicas(results)
    assert results[0]["preconditioned_fraction"] == 1.0
    rnn_blocks = [name for name in results[0]["factors"] if name.startswith("rnn.")]
    expected = {"lstm_lm": 2 * 2, "gru_classifier": 2 * 2, "lstm_cell": 2}[kind]
    assert len(rnn_blocks) == expected, rnn_blocks  # [W_ih b_ih], [W_hh b_hh] per layer-direction


# -- 3. a branch taken on some ranks only ----------------------------------------------------------
class SkipsABatch(TinyClassifier):
    """``training_step`` returns None for batch 2 of every epoch: Lightning runs no backward and
    takes no optimizer step for it — after its forward (traced by K-FAC), or before any forward
    (``before_forward``: K-FAC never sees that batch)."""

    def __init__(self, *, before_forward: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.before_forward = before_forward

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if batch_idx == 2 and self.before_forward:
            return None
        loss = super().training_step(batch, batch_idx)
        return None if batch_idx == 2 else loss


def test_training_step_returning_none_drops_what_kfac_captured(tmp_path: Path) -> None:
    """Lightning allows skipping a step this way on one process only (it raises in distributed
    training). It still counts the step; K-FAC drops the skipped batch's traced forward and takes
    no step: 8 optimizer steps over batches 0-5 and 0-1 with batch 2 skipped are 7 K-FAC steps,
    nothing left pending, and factors and weights bitwise those of a run that skipped batch 2
    before its forward."""
    runs = {}
    for before_forward in (False, True):
        strategy = KFACDDPStrategy(start_method="popen", kl_clip=1e-2)
        module = SkipsABatch(before_forward=before_forward, batch_size=16, lr=0.05)
        trainer = fit_in_process(tmp_path, module, strategy, max_steps=8)
        pre = strategy.preconditioner
        assert trainer.global_step == 8 and pre.steps == 7
        assert all(block.sums.open_calls == 0 for block in pre.blocks.values())
        tensors = {n: p.detach().clone() for n, p in module.named_parameters()}
        for name, block in pre.blocks.items():
            tensors |= {f"{name}[{i}]": f.value for i, f in enumerate(block.factors)}
        runs[before_forward] = tensors
    assert runs[False].keys() == runs[True].keys()
    for name, value in runs[False].items():
        assert torch.equal(value, runs[True][name]), name


def branch_factors(inputs: torch.Tensor, gradient: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """DESIGN §2 for ``s = W x + b``: ``A = mean a aᵀ``, ``a = [x; 1]``; ``G = mean g gᵀ`` with
    ``g = N ·`` (the hook's gradient of the mean loss)."""
    n = inputs.shape[0]
    a = torch.cat([inputs, torch.ones(n, 1, dtype=inputs.dtype)], dim=1)
    g = n * gradient
    return (a.T @ a / n)[None], (g.T @ g / n)[None]


@pytest.mark.parametrize("mode", ["rank0", "alternating"])
def test_branch_taken_on_some_ranks(tmp_path: Path, mode: str) -> None:
    """``find_unused_parameters=True``; the branch runs on rank 0 only, or on one rank at a time
    (nobody every third step). Every rank still sends the branch's block (zeros, count 0): no
    gloo size mismatch, training completes, replicas stay identical, and the branch's factors
    are the count-weighted average — the batch of the rank that used it, not half of it."""
    steps = 10
    strategy = KFACDDPStrategy(
        start_method="fork",
        find_unused_parameters=True,
        inverse_update_interval=3,
        factor_decay=0.0,  # the factors are the last update's batch estimate
        kl_clip=None,
    )
    results = fit_two_ranks(tmp_path, mode, BranchClassifier(mode), strategy=strategy, max_steps=10)
    assert_bitwise_replicas(results)
    for result in results:
        assert result["global_step"] == result["kfac_steps"] == steps
    last = max(
        (step, rank) for step in range(steps) for rank in range(2) if branch_taken(mode, rank, step)
    )
    inputs, gradient = results[last[1]]["observations"][last[0]]
    assert gradient is not None
    expected = branch_factors(inputs, gradient)
    for result in results:
        got = result["factors"]["branch.weight"]
        for mine, reference in zip(got, expected, strict=True):
            torch.testing.assert_close(mine, reference, rtol=1e-12, atol=1e-14)


def fit_late_branch(tmp_path: Path, steps: int) -> list[dict[str, Any]]:
    strategy = KFACDDPStrategy(
        start_method="fork",
        find_unused_parameters=True,
        inverse_update_interval=3,
        factor_decay=0.0,
        kl_clip=None,
        timeout=timedelta(seconds=20),  # a desynchronised collective fails instead of hanging
    )
    return fit_two_ranks(
        tmp_path, "late", BranchClassifier("late_rank1"), strategy=strategy, max_steps=steps
    )


def test_branch_first_taken_late_on_one_rank(tmp_path: Path) -> None:
    """The branch is first taken at step 2, by rank 1 only: a use that appears after the
    structure was fixed, on one rank. Whatever K-FAC does with it, the ranks must keep issuing
    the same collectives (no hang, no gloo size mismatch) and stay identical."""
    results = fit_late_branch(tmp_path, 8)
    assert_bitwise_replicas(results)
    for result in results:
        assert result["global_step"] == result["kfac_steps"] == 8


def test_branch_first_taken_late_joins_the_structure(tmp_path: Path) -> None:
    """The late use is picked up at the next inverse update (step 3) on every rank, as the
    preconditioner documents for uses first seen after the structure was fixed; its factors are
    then rank 1's batch estimate (rank 0 sends zeros with count 0)."""
    steps = 8
    results = fit_late_branch(tmp_path, steps)
    for result in results:
        assert "branch.weight" in result["factors"], sorted(result["factors"])
    inputs, gradient = results[1]["observations"][steps - 1]
    expected = branch_factors(inputs, gradient)
    for result in results:
        for mine, reference in zip(result["factors"]["branch.weight"], expected, strict=True):
            torch.testing.assert_close(mine, reference, rtol=1e-12, atol=1e-14)


# -- 4. a stalled rank fails within the timeout -------------------------------------------------
@pytest.mark.slow
def test_stalled_rank_fails_within_the_timeout(tmp_path: Path) -> None:
    """``timeout=15 s``; rank 1 sleeps 120 s after its backward pass on an inverse-update step, so
    rank 0 waits in a K-FAC collective (on an inverse-update step: the agreement on new uses) on
    K-FAC's own process group. Both processes must exit with an error within the timeout plus a
    margin; were the group created without the timeout, rank 0 would wait for rank 1 and the run
    would succeed after 120 s."""
    timeout, margin = 15.0, 60.0
    command = [sys.executable, "-m", "tests._dist_script", "stall", "--out", str(tmp_path)]
    command += ["--timeout", str(timeout), "--sleep", "120", "--stall-step", "2"]
    started = time.monotonic()
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # so that a hung run can be killed with its workers
    )
    try:
        output, _ = process.communicate(timeout=60 + timeout + margin)  # 60 s to start up
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the run still hung {time.monotonic() - started:.0f} s after start")
    ended = time.time()
    marker = tmp_path / "stall-started"
    assert marker.exists(), output[-5000:]
    stalled_for = ended - float(marker.read_text())
    assert process.returncode != 0, output[-5000:]
    assert stalled_for < timeout + margin, stalled_for
    assert "Timed out" in output or "timed out" in output.lower(), output[-5000:]
    # rank 0 failed inside K-FAC's collective, not in DDP's
    assert "lightning_kfac/distributed/" in output, output[-5000:]  # a K-FAC collective
    assert not list(tmp_path.glob("stall-rank*.pt"))  # neither rank finished training


# -- 5. non-finite gradients ---------------------------------------------------------------------
NAN_STEP = 2


def read_metric(path: Path, key: str) -> dict[int, float]:
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


def assert_nan_step_skipped(observations: dict[str, Any]) -> None:
    assert not observations["raw_finite"]  # the step's raw gradients were not finite ...
    for name, grad in observations["grads"].items():  # ... and are zeroed on the device
        assert torch.count_nonzero(grad) == 0, name
    for name, before in observations["factors_before"].items():  # factors unchanged
        for old, new in zip(before, observations["factors_after"][name], strict=True):
            assert torch.equal(old, new), name


def assert_skips_logged(tmp_path: Path, steps: int) -> None:
    logged = read_metric(
        tmp_path / "csv" / "version_0" / "metrics.csv", "kfac/nonfinite_skipped_steps"
    )
    assert logged == {s: float(s >= NAN_STEP) for s in range(steps)}, logged


def csv_overrides(tmp_path: Path) -> dict[str, Any]:
    return dict(logger=CSVLogger(tmp_path, name="csv", version=0), log_every_n_steps=1)


def test_nan_batch_on_one_rank_is_skipped(tmp_path: Path) -> None:
    steps = 6
    module = NaNBatchClassifier(NAN_STEP, (0,), batch_size=16, dtype=torch.float32)
    strategy = KFACDDPStrategy(start_method="popen", inverse_update_interval=3)
    with pytest.warns(KFACNumericalWarning, match="skipped steps with non-finite gradients"):
        fit_in_process(tmp_path, module, strategy, max_steps=steps, **csv_overrides(tmp_path))
    assert_nan_step_skipped(module.observations)
    assert int(strategy.preconditioner.nonfinite_steps) == 1
    assert strategy.preconditioner.steps == steps
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert_skips_logged(tmp_path, steps)


@pytest.mark.parametrize("nan_ranks", [(0,), (0, 1)], ids=["rank0", "both"])
def test_nan_batch_on_two_ranks_is_skipped_everywhere(
    tmp_path: Path, nan_ranks: tuple[int, ...]
) -> None:
    steps = 6
    module = NaNBatchClassifier(NAN_STEP, nan_ranks, batch_size=8, dtype=torch.float32)
    strategy = KFACDDPStrategy(start_method="fork", inverse_update_interval=3)
    results = fit_two_ranks(
        tmp_path, "nan", module, strategy=strategy, max_steps=steps, **csv_overrides(tmp_path)
    )
    assert_bitwise_replicas(results)
    for result in results:
        assert_nan_step_skipped(result["observations"])
        assert result["nonfinite_steps"] == 1 and result["kfac_steps"] == steps
        assert all(torch.isfinite(p).all() for p in result["params"].values())
        assert any("skipped steps with non-finite gradients" in w for w in result["warnings"]), (
            result["warnings"]
        )
    assert_skips_logged(tmp_path, steps)


def test_nan_batch_raises_when_asked_one_rank(tmp_path: Path) -> None:
    module = NaNBatchClassifier(NAN_STEP, (0,), batch_size=16, dtype=torch.float32)
    strategy = KFACDDPStrategy(start_method="popen", nonfinite_gradients="raise")
    with pytest.raises(FloatingPointError, match="not finite"):
        fit_in_process(tmp_path, module, strategy, max_steps=4)


def test_nan_batch_raises_when_asked_two_ranks(tmp_path: Path) -> None:
    module = NaNBatchClassifier(NAN_STEP, (1,), batch_size=8, dtype=torch.float32)
    strategy = KFACDDPStrategy(start_method="fork", nonfinite_gradients="raise")
    with pytest.raises(Exception, match="FloatingPointError") as info:
        fit_two_ranks(tmp_path, "raise", module, strategy=strategy, max_steps=4)
    assert "nonfinite_gradients='raise'" in str(info.value)


# -- 6. checkpoints ------------------------------------------------------------------------------
def save_one_rank_checkpoint(tmp_path: Path, **strategy_kwargs: Any) -> Path:
    path = tmp_path / "saved.ckpt"
    strategy = KFACDDPStrategy(start_method="popen", inverse_update_interval=2, **strategy_kwargs)
    trainer = fit_in_process(tmp_path, TinyClassifier(batch_size=16), strategy, max_steps=3)
    trainer.save_checkpoint(path)
    return path


def edit_saved_state(path: Path, edit: Callable[[dict[str, Any]], Any]) -> Any:
    """Apply ``edit`` to the K-FAC state of the checkpoint at ``path``, save it back, and return
    what ``edit`` returned."""
    checkpoint = torch.load(path, weights_only=False)
    result = edit(checkpoint["kfac"])
    torch.save(checkpoint, path)
    return result


def resume_on_one_rank(tmp_path: Path, path: Path) -> None:
    fit_in_process(
        tmp_path,
        TinyClassifier(batch_size=16),
        KFACDDPStrategy(start_method="popen"),
        max_steps=5,
        ckpt_path=path,
    )


def corrupt(state: dict[str, Any], how: str) -> str:
    """Corrupt one saved factor; returns the block's name."""
    name = "net.2.weight"
    factor = state["blocks"][name]["factors"][1]  # its G
    value = factor["value"]
    if how == "huge":
        factor["value"] = value * 1e120
    elif how == "nan":
        factor["value"] = value.clone().fill_(math.nan)
    elif how == "asymmetric":
        value = value.clone()
        value[0, 0, 1] += 1.0
        factor["value"] = value
    elif how == "shape":
        factor["value"] = value[:, :-1, :-1].clone()
    return name


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("huge", "values up to"),
        ("nan", "non-finite"),
        ("asymmetric", "not symmetric"),
        ("shape", "has shape"),
    ],
)
def test_corrupted_factor_in_checkpoint_raises_naming_the_block(
    tmp_path: Path, how: str, message: str
) -> None:
    path = save_one_rank_checkpoint(tmp_path)
    name = edit_saved_state(path, lambda state: corrupt(state, how))
    with pytest.raises(ValueError, match=rf"factor {name}\[1\].*{message}"):
        resume_on_one_rank(tmp_path, path)


def test_checkpoint_of_unknown_format_raises(tmp_path: Path) -> None:
    path = save_one_rank_checkpoint(tmp_path)
    edit_saved_state(path, lambda state: state.update(version=99))
    with pytest.raises(ValueError, match="unknown format"):
        resume_on_one_rank(tmp_path, path)


def test_corrupted_checkpoint_fails_on_two_ranks(tmp_path: Path) -> None:
    path = save_one_rank_checkpoint(tmp_path)
    name = edit_saved_state(path, lambda state: corrupt(state, "nan"))
    with pytest.raises(Exception, match=rf"factor {name}\[1\] holds non-finite values"):
        fit_two_ranks(
            tmp_path, "corrupt", TinyClassifier(batch_size=8), ckpt_path=path, max_steps=5
        )


def test_resume_with_another_compute_method(tmp_path: Path) -> None:
    """Saved with ``eigen``, resumed with ``inverse``: the decompositions are recomputed from the
    saved factors and training continues with the new method."""
    path = save_one_rank_checkpoint(tmp_path, compute_method="eigen")
    saved = torch.load(path, weights_only=False)["kfac"]
    assert saved["compute_method"] == "eigen" and saved["steps"] == 3
    strategy = KFACDDPStrategy(start_method="popen", compute_method="inverse", kl_clip=1e-2)
    module = TinyClassifier(batch_size=16)
    fit_in_process(tmp_path, module, strategy, max_steps=6, ckpt_path=path)
    pre = strategy.preconditioner
    assert pre.steps == 6
    for block in pre.blocks.values():
        for factor in block.factors:
            assert set(factor.decomposition) == {"inverse"}
            assert bool(torch.isfinite(factor.decomposition["inverse"]).all())
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_plain_ddp_checkpoint_resumes_with_fresh_factors(tmp_path: Path) -> None:
    path = tmp_path / "ddp.ckpt"
    trainer = pl.Trainer(strategy="ddp", devices=1, **trainer_kwargs(tmp_path, max_steps=3))
    trainer.fit(TinyClassifier(batch_size=16))
    trainer.save_checkpoint(path)
    destroy_process_group()
    assert "kfac" not in torch.load(path, weights_only=False)
    strategy = KFACDDPStrategy(start_method="popen")
    with pytest.warns(UserWarning, match="K-FAC starts with fresh factors"):
        trainer = fit_in_process(
            tmp_path, TinyClassifier(batch_size=16), strategy, max_steps=6, ckpt_path=path
        )
    assert trainer.global_step == 6
    assert strategy.preconditioner.steps == 3  # K-FAC ran on the 3 resumed steps
    assert all(
        bool(b.seen()) and b.has_decomposition for b in strategy.preconditioner.blocks.values()
    )


def test_row_sampling_generators_resume_before_the_first_forward() -> None:
    """The smallest form of the resume guarantee, without Lightning: ``load_state_dict`` before
    any forward (as a resume does), then the same steps as the uninterrupted run. The first
    resumed forward samples rows while the loaded state is still pending (it is applied when
    the structure is fixed, at ``step()``): its generators must already be the saved ones."""

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()

    def run(net: nn.Module, pre: KFACPreconditioner, opt: Any, steps: range) -> None:
        for step in steps:
            gen = torch.Generator().manual_seed(step)
            x = torch.randn(16, 6, generator=gen, dtype=torch.float64)
            y = torch.randint(0, 3, (16,), generator=gen)
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            pre.step()
            opt.step()

    def build(net: nn.Module) -> tuple[KFACPreconditioner, torch.optim.Optimizer]:
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        pre = KFACPreconditioner(net, optimizer=opt, factor_max_rows=4, inverse_update_interval=2)
        return pre, opt

    full = model()
    pre, opt = build(full)
    run(full, pre, opt, range(3))
    saved = copy.deepcopy([full.state_dict(), opt.state_dict(), pre.state_dict()])
    run(full, pre, opt, range(3, 6))

    resumed = model()
    resumed.load_state_dict(saved[0])
    pre2, opt2 = build(resumed)
    opt2.load_state_dict(saved[1])
    pre2.load_state_dict(saved[2])
    run(resumed, pre2, opt2, range(3, 6))
    for (name, mine), theirs in zip(resumed.named_parameters(), full.parameters(), strict=True):
        assert torch.equal(mine, theirs), name


@pytest.mark.parametrize(
    ("interval", "epoch"),
    [(3, 1), (5, 0)],
    ids=["decompositions-saved", "decompositions-recomputed"],
)
def test_row_sampled_run_resumes_bitwise(tmp_path: Path, interval: int, epoch: int) -> None:
    """``factor_max_rows`` draws rows from per-block generators, saved in the checkpoint: a resumed
    run equals the uninterrupted one bit for bit. Saved after step 12 with inverse updates every
    3 (the decompositions are older than the factors: saved), or after step 6 with inverse
    updates every 5 (step 5 just decomposed: recomputed on resume)."""

    def strategy() -> KFACDDPStrategy:
        return KFACDDPStrategy(
            start_method="fork", factor_max_rows=16, inverse_update_interval=interval, kl_clip=1e-2
        )

    checkpoint = tmp_path / "mid.ckpt"
    full = fit_two_ranks(
        tmp_path,
        "full",
        TinyClassifier(batch_size=8),
        strategy=strategy(),
        callbacks=(SaveAfterEpoch(checkpoint, epoch),),
        max_epochs=3,
    )
    state = torch.load(checkpoint, weights_only=False)["kfac"]
    assert any(entry["generators"] for entry in state["blocks"].values())  # rows were sampled
    decomposition_saved = any(
        "decomposition" in f for entry in state["blocks"].values() for f in entry["factors"]
    )
    assert decomposition_saved == (interval == 3)
    resumed = fit_two_ranks(
        tmp_path,
        "resumed",
        TinyClassifier(batch_size=8),
        strategy=strategy(),
        ckpt_path=checkpoint,
        max_epochs=3,
    )
    assert full[0]["global_step"] == resumed[0]["global_step"] == 18
    assert full[0]["kfac_steps"] == resumed[0]["kfac_steps"] == 18
    assert_bitwise_replicas(resumed)
    for name, value in full[0]["params"].items():
        assert torch.equal(resumed[0]["params"][name], value), name
    for name, values in full[0]["factors"].items():
        for mine, reference in zip(resumed[0]["factors"][name], values, strict=True):
            assert torch.equal(mine, reference), name


# -- 7. layers unfrozen during fit ---------------------------------------------------------------
class WatchBackbone(pl.Callback):
    """Per step: whether the backbone has gradients, and whether K-FAC changed them."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self._raw: dict[str, torch.Tensor] = {}

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._raw = {
            n: p.grad.clone()
            for n, p in pl_module.backbone.named_parameters()
            if p.grad is not None
        }

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        grads = {n: p.grad for n, p in pl_module.backbone.named_parameters()}
        pre = trainer.strategy.preconditioner
        self.steps.append(
            {
                "epoch": trainer.current_epoch,
                "has_grad": all(g is not None for g in grads.values()),
                "changed": all(
                    g is not None and not torch.equal(g, self._raw[n]) for n, g in grads.items()
                ),
                "blocks": sorted(pre.blocks),
            }
        )


def test_backbone_unfrozen_during_fit_gets_kfac_steps(tmp_path: Path) -> None:
    """``BackboneFinetuning`` freezes the backbone before training and unfreezes it at epoch 1
    (adding it to the optimizer). From that step on its parameters are traced, get K-FAC blocks
    and preconditioned gradients, and a ``KFACCoverageWarning`` says so.

    One device: DDP does not support parameters whose ``requires_grad`` changes after it wrapped
    the model (its reducer is built once, from the parameters trainable then), so on several
    ranks the unfrozen parameters would not even be all-reduced. Plain DDP has the same limit.
    """
    watch = WatchBackbone()
    module = FinetuneClassifier(batch_size=16)  # 64 samples: 4 steps per epoch
    strategy = KFACDDPStrategy(start_method="popen", inverse_update_interval=2, kl_clip=1e-2)
    with pytest.warns(KFACCoverageWarning, match="became trainable during training"):
        fit_in_process(
            tmp_path,
            module,
            strategy,
            max_epochs=3,
            callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=1), watch],
        )
    frozen = [s for s in watch.steps if s["epoch"] == 0]
    unfrozen = [s for s in watch.steps if s["epoch"] >= 1]
    assert len(frozen) == 4 and len(unfrozen) == 8
    assert not any(s["has_grad"] for s in frozen)
    assert all(s["blocks"] == ["head.weight"] for s in frozen)
    assert all(s["has_grad"] and s["changed"] for s in unfrozen), unfrozen
    assert all("backbone.0.weight" in s["blocks"] for s in unfrozen)
    assert strategy.preconditioner.block("backbone.0.weight").has_decomposition


class ModeProbe(pl.Callback):
    """How many ``TorchFunctionMode``s are pushed when the optimizer steps."""

    def __init__(self) -> None:
        self.depths: list[int] = []

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        self.depths.append(len(_get_current_function_mode_stack()))


def test_tracing_mode_ends_with_each_training_forward(tmp_path: Path) -> None:
    """Lightning runs ``training_step`` through the LightningModule's ``__call__`` (its forward
    redirection) and ``training_step`` calls ``self(x)``: the root forward nests. K-FAC's tracing
    mode is entered for the root forward while it discovers the uses; it must be left when that
    forward ends, not stay pushed for the backward, the optimizer step (whose in-place updates
    it would record as unsupported uses: after the next restructure, e.g. an unfreeze, every
    parameter was "left to the optimizer: used by add_") and the rest of the process."""
    probe = ModeProbe()
    before = len(_get_current_function_mode_stack())
    fit_in_process(
        tmp_path,
        TinyClassifier(batch_size=16),
        KFACDDPStrategy(start_method="popen"),
        max_steps=3,
        callbacks=[probe],
    )
    assert probe.depths == [before] * 3
    assert len(_get_current_function_mode_stack()) == before


# -- 8. options validated in the main process ----------------------------------------------------
BAD_OPTIONS = [
    ("damping", 0.0, "damping must be > 0"),
    ("damping", -1e-3, "damping must be > 0"),
    ("damping", math.nan, "damping must be finite"),
    ("kl_clip", 0.0, "kl_clip must be > 0.*use None"),
    ("factor_decay", 1.5, r"factor_decay must lie in \[0, 1\)"),
    ("factor_decay", -0.1, r"factor_decay must lie in \[0, 1\)"),
    ("factor_update_interval", 0, "factor_update_interval must be a positive integer"),
    ("inverse_update_interval", 0, "inverse_update_interval must be a positive integer"),
    ("inverse_update_interval", 1.5, "inverse_update_interval must be a positive integer"),
    ("factor_max_rows", 0, "factor_max_rows must be a positive integer or None"),
    ("factor_bucket_cap_mb", 0, "factor_bucket_cap_mb must be a positive number"),
    ("factor_dtype", "float16", "factor_dtype='float16' is not supported"),
    ("factor_dtype", "int", "factor_dtype='int' is not supported"),
    ("inverse_dtype", torch.float16, "inverse_dtype=torch.float16 is not supported"),
    ("compute_method", "foo", "compute_method='foo' is not one of 'eigen', 'inverse'"),
    ("distribution_mode", "x", "distribution_mode='x' is not one of 'broadcast_decompositions'"),
    ("nonfinite_gradients", "ignore", "nonfinite_gradients='ignore' is not one of 'skip_step'"),
]


@pytest.mark.parametrize("strategy_class", [KFACDDPStrategy, unified.KFACDDPStrategy])
@pytest.mark.parametrize(("option", "value", "message"), BAD_OPTIONS)
def test_bad_option_raises_at_construction(
    strategy_class: type, option: str, value: Any, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        strategy_class(start_method="fork", **{option: value})
    with pytest.raises(ValueError, match=message):
        KFACOptions(**{option: value})


@pytest.mark.parametrize(
    ("keyword", "suggestion"),
    [
        ("dampin", "damping"),
        ("inverse_update_intervall", "inverse_update_interval"),
        ("factor_max_row", "factor_max_rows"),
        ("find_unused_parameter", "find_unused_parameters"),  # a DDP keyword
    ],
)
def test_misspelt_keyword_suggests_the_closest_name(keyword: str, suggestion: str) -> None:
    with pytest.raises(TypeError, match=rf"'{keyword}' \(did you mean '{suggestion}'\?\)"):
        KFACDDPStrategy(**{keyword: 1})


@pytest.mark.parametrize(
    ("option", "schedule", "message"),
    [
        ("damping", lambda step: 1e-3 if step < 2 else -1.0, "damping must be > 0"),
        ("damping", lambda step: 1e-3 if step < 2 else math.nan, "damping must be finite"),
        ("factor_decay", lambda step: 0.9 if step < 2 else 1.0, "factor_decay must lie in"),
        ("kl_clip", lambda step: 1e-2 if step < 2 else 0.0, "kl_clip must be > 0"),
        ("lr", lambda step: 0.1 if step < 2 else "fast", r"lr\(2\) must be a number"),
    ],
)
def test_schedule_returning_a_bad_value_raises_naming_the_option(
    tmp_path: Path, option: str, schedule: Any, message: str
) -> None:
    strategy = KFACDDPStrategy(
        start_method="popen", inverse_update_interval=1, **{option: schedule}
    )
    with pytest.raises(ValueError, match=message):
        fit_in_process(tmp_path, TinyClassifier(batch_size=16), strategy, max_steps=4)


def test_preconditioner_validates_like_the_strategy() -> None:
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="factor_decay must lie in"):
        KFACPreconditioner(model, factor_decay=1.5, kl_clip=None)
    with pytest.raises(TypeError, match="did you mean 'damping'"):
        KFACPreconditioner(model, dampng=1e-3, kl_clip=None)
