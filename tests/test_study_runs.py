"""The large-batch study run for real: identical reruns, W&B runs read back from offline files,
and the ``--quick`` study as a user runs it (console, duration recorded, figures). No test
asserts a wall-clock limit: the study prints its duration against its budget itself."""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
#: A small study that still tunes and runs K-FAC + mixup (every source of randomness we have).
TINY = ["--models", "cnn", "--methods", "kfac_mixup", "--batch-sizes", "large"]
TINY += ["--epochs", "2", "--seeds", "2"]


def without_timings(value: Any) -> str:
    """``value`` as JSON text without its timings: the ``timing`` section and every key ending in
    ``_s``, recursively (as text, so that NaN equals NaN)."""

    def strip(item: Any) -> Any:
        if isinstance(item, dict):
            return {k: strip(v) for k, v in item.items() if not k.endswith("_s") and k != "timing"}
        if isinstance(item, list):
            return [strip(v) for v in item]
        return item

    return json.dumps(strip(value), sort_keys=True)


def wandb_records(path: Path) -> Iterator[Any]:
    """The protobuf records of an offline ``run-*.wandb`` file.

    The file is a ``:W&B`` header (7 bytes) followed by a LevelDB-style log: 32 KiB blocks of
    chunks, each with a 7-byte header (CRC32, length, type: 1 full, 2 first, 3 middle, 4 last).
    """
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    position, pending = 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 2):
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def wandb_run_summary(path: Path) -> dict[str, Any]:
    """Group, tags, job type, config keys and logged metric names of one offline run."""
    summary: dict[str, Any] = {"config": {}, "metrics": set()}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            summary.update(
                group=record.run.run_group,
                tags=list(record.run.tags),
                job_type=record.run.job_type,
                name=record.run.display_name,
            )
            items = record.run.config.update
        elif kind == "config":
            items = record.config.update
        else:
            if kind == "history":
                summary["metrics"] |= {
                    item.key or "/".join(item.nested_key) for item in record.history.item
                }
            continue
        for item in items:
            summary["config"][item.key] = json.loads(item.value_json)
    return summary


def test_reruns_are_identical_and_wandb_runs_are_grouped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    pytest.importorskip("mnist1d")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    import examples.data
    from examples.large_batch_study.study import BENCHMARKS, main

    monkeypatch.setattr(examples.data, "CACHE_DIR", tmp_path / "cache")

    lightning_level = logging.getLogger("pytorch_lightning").level
    first = main([*TINY, "--out", str(tmp_path / "first")])
    second = main([*TINY, "--out", str(tmp_path / "second")])
    # the caller's process is left as it was
    assert not torch.are_deterministic_algorithms_enabled()
    assert logging.getLogger("pytorch_lightning").level == lightning_level
    assert "PL_GLOBAL_SEED" not in os.environ and torch.get_num_threads() == 1
    saved = [json.loads((tmp_path / n / "study.json").read_text()) for n in ("first", "second")]
    assert without_timings(saved[0]) == without_timings(saved[1])
    assert without_timings(saved[0]) == without_timings(first)
    (point,) = first["points"]
    grid = BENCHMARKS["mnist1d"].lr_grids["cnn"]["kfac"]
    assert set(point["tuning"]) == {f"{lr:g}" for lr in grid} and len(point["runs"]) == 2
    assert point["runs"][0]["curve"] != point["runs"][1]["curve"]  # seeds do differ
    assert all(run["threads_per_rank"] == 1 for run in point["runs"])
    assert second["timing"]["wall_time_s"] > 0 and second["timing"]["cpu_time_s"] > 0

    runs = sorted((tmp_path / "first" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2  # the final runs; tuning runs are in study.json only
    summaries = [wandb_run_summary(run) for run in runs]
    for summary in summaries:
        assert summary["group"] == "kfac_mixup" and summary["job_type"] == "test"
        assert {"batch=512", "model=cnn", "data=mnist1d", "test"} <= set(summary["tags"])
        assert summary["config"]["study"]["epochs"] == 2
        assert summary["config"]["study"]["kfac_options"]["damping"] == pytest.approx(3e-2)
        assert summary["config"]["base_lr"] == point["lr"]
        assert {"val/acc", "kfac/damping", "mixup/lambda_mean"} <= summary["metrics"]
    assert sorted(s["config"]["seed"] for s in summaries) == [0, 1]
    assert {f"seed={s}" for s in (0, 1)} <= {t for s in summaries for t in s["tags"]}


@pytest.mark.slow
def test_quick_study_as_a_user_runs_it(tmp_path: Path) -> None:
    """``python examples/large_batch_study --quick`` with its output in a pipe (not a terminal):
    the header and the first run at once, ≤ 70 lines on the console (stdout and stderr), no
    Lightning banners, both tables titled, the duration from process start printed and recorded,
    the figures, one W&B run per final run, and the GRU preconditioned in full."""
    pytest.importorskip("wandb")
    pytest.importorskip("mnist1d")
    env = {**os.environ, "WANDB_MODE": "offline", "LIGHTNING_KFAC_CACHE": str(tmp_path / "cache")}
    env.pop("OMP_NUM_THREADS", None)  # as on a fresh machine
    out = tmp_path / "study"
    result = subprocess.run(
        [sys.executable, "examples/large_batch_study", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    console = result.stdout + result.stderr
    assert result.returncode == 0, console
    assert console.count("\n") <= 70, console
    for banner in ("GPU available", "Initializing distributed", "litlogger", "LeafSpec", "wandb:"):
        assert banner not in console, banner
    lines = result.stdout.splitlines()
    assert lines[0].startswith("large-batch study on MNIST-1D") and "claims declared" in lines[1]
    assert "run 1/20: cnn sgd batch 128 seed 0" in lines[2]  # before the first run ends
    assert (
        "Test accuracy per point" in result.stdout and "Time to 80% test accuracy" in result.stdout
    )
    assert "| cnn | sgd | 128 |" in result.stdout and "batch_sweep.png" in result.stdout
    report = json.loads((out / "study.json").read_text())
    timing = report["timing"]
    assert timing["wall_time_s"] > timing["study_time_s"] > 0 and timing["startup_s"] > 0
    assert timing["budget_s"] == 120 and "from process start" in result.stdout
    assert len(report["verdicts"]) == len(report["claims"]) == 18
    for name in ("accuracy.png", "time.png", "batch_sweep.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = {(p["model"], p["method"], p["global_batch"]): p for p in report["points"]}
    assert {("gru", "sgd", 128), ("gru", "kfac_mixup", 512), ("cnn", "adamw", 512)} <= set(points)
    for (model, method, _), point in points.items():
        if method.startswith("kfac"):
            assert point["preconditioned_fraction"] >= 0.99, (model, method)
    final_runs = sum(len(p["runs"]) for p in report["points"])
    assert len(list((out / "wandb").glob("offline-run-*/run-*.wandb"))) == final_runs
