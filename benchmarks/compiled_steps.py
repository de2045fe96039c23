"""Steps without factor capture under ``torch.compile``: K-FAC keeps the compiled graph.

    python benchmarks/compiled_steps.py [--workload cnn] [--steps 20] [--rounds 5]

Times, side by side in round-robin blocks, the median step (forward, backward, K-FAC, SGD) of
steps that capture no factors (``factor_update_interval`` large, decompositions fixed after the
first step), eager and ``torch.compile``-d (inductor), with and without K-FAC, on the workloads of
``benchmarks/step_time.py``; writes ``benchmarks/compiled_steps.json``. A capture step runs
eagerly by design (``lightning_kfac.kfac.tracing.UseTracker``), so it is not timed here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.step_time import BATCH_SIZES, loss_of, make_batch, make_model
from lightning_kfac import KFACPreconditioner


def stepper(workload: str, compiled: bool, kfac: bool) -> Callable[[], None]:
    model = make_model(workload)
    x, y = make_batch(workload, BATCH_SIZES[workload])
    run = torch.compile(model) if compiled else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    pre = None
    if kfac:  # one capture step, then never again: the timed steps capture nothing
        pre = KFACPreconditioner(  # the module the loop calls (compiled or not)
            run, optimizer=optimizer, factor_update_interval=10**9,
            inverse_update_interval=10**9, report=False,
        )  # fmt: skip

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_of(run, x, y).backward()
        if pre is not None:
            pre.step()
        optimizer.step()

    for _ in range(3):  # the capture step, compilation, warm-up
        step()
    return step


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="cnn", choices=sorted(BATCH_SIZES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default="benchmarks/compiled_steps.json")
    args = parser.parse_args(argv)
    variants = {
        f"{'compiled' if c else 'eager'}{' + K-FAC' if k else ''}": (c, k)
        for c in (False, True)
        for k in (False, True)
    }
    steppers = {name: stepper(args.workload, *spec) for name, spec in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(args.rounds):
        for name, step in steppers.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - start) / args.steps)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"{args.workload}, batch {BATCH_SIZES[args.workload]}, steps without capture:")
    for name, median in medians.items():
        print(f"  {name:<20}{1000 * median:8.1f} ms")
    result = {
        "command": "python benchmarks/compiled_steps.py " + " ".join(argv or sys.argv[1:]),
        "torch": torch.__version__,
        "load_average": os.getloadavg(),
        "median_step_s": medians,
        "times_s": times,
    }
    with open(args.json, "w") as handle:
        json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
