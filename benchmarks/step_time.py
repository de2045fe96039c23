"""Step time of K-FAC against SGD on a small ResNet-style CNN, one process and two.

    python benchmarks/step_time.py [--batch-size 128] [--rounds 7] [--steps 20] [--json out.json]

Methods, measured side by side in round-robin blocks (every round times a block of ``--steps``
steps of each method, so machine-load drift hits all methods alike):

- ``sgd``: forward, backward, SGD step;
- ``kfac_1_10``: the same plus K-FAC with factors every step, decompositions every 10;
- ``kfac_10_100``: factors every 10 steps, decompositions every 100;
- ``*_sampled``: the same with ``factor_max_rows`` (default 1024): each factor batch estimated
  from that many of the layer's N·T rows (unbiased; see ``KFACPreconditioner``).

Two processes run plain ``torch.distributed`` (gloo) with DDP and the K-FAC distributor, each
rank on its own batch of ``--batch-size``. Reported: the median step time of each method and its
ratio to SGD, next to the FLOP-model ratio for the same network:
``(fwd+bwd + factor_flops / f + eigh_flops / i + precondition_flops) / (fwd+bwd)``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from lightning_kfac import KFACPreconditioner
from lightning_kfac.distributed import TorchDistributedDistributor

#: method -> (factor interval, inverse interval, sample rows?) or None for plain SGD
METHODS: dict[str, tuple[int, int, bool] | None] = {
    "sgd": None,
    "kfac_1_10": (1, 10, False),
    "kfac_10_100": (10, 100, False),
    "kfac_1_10_sampled": (1, 10, True),
    "kfac_10_100_sampled": (10, 100, True),
}


class Block(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.shortcut = (
            nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride, bias=False),
                nn.BatchNorm2d(channels_out),
            )
            if stride != 1 or channels_in != channels_out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x), inplace=True)


def make_resnet(num_classes: int = 10) -> nn.Module:
    """A small ResNet for 32x32 inputs: stem 16, stages 16/32/64 (one block each), linear head."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 1, 1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(inplace=True),
        Block(16, 16, 1),
        Block(16, 32, 2),
        Block(32, 64, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )


def flop_model(
    model: nn.Module,
    batch: int,
    factor_interval: int,
    inverse_interval: int,
    max_rows: int | None = None,
) -> dict[str, float]:
    """FLOPs per step: forward+backward (3x forward multiply-adds x2), K-FAC's factor GEMMs
    (2·d²·rows for A and G), symmetric eigendecompositions (~9·d³ each: tridiagonalisation plus
    eigenvectors) and preconditioning (two matrix products each side of dW, every step)."""
    shapes: dict[nn.Module, tuple[int, int]] = {}

    def hook(module: nn.Module, inputs, output) -> None:
        shapes[module] = tuple(output.shape)  # type: ignore[assignment]

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    with torch.no_grad():
        model(torch.zeros(batch, 3, 32, 32))
    for handle in handles:
        handle.remove()
    forward = factors = eigh = precondition = 0.0
    for module, shape in shapes.items():
        if isinstance(module, nn.Conv2d):
            fan_in = (
                module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            )
            rows = batch * shape[2] * shape[3]
            d_out = module.out_channels
        else:
            fan_in, rows, d_out = module.in_features, batch, module.out_features
        d_a = fan_in + int(module.bias is not None)
        forward += 2.0 * fan_in * d_out * rows
        factors += 2.0 * min(rows, max_rows or rows) * (d_a**2 + d_out**2)
        eigh += 9.0 * (d_a**3 + d_out**3)
        precondition += 4.0 * (d_out**2 * d_a + d_out * d_a**2)
    fwd_bwd = 3.0 * forward
    kfac = fwd_bwd + factors / factor_interval + eigh / inverse_interval + precondition
    return {
        "fwd_bwd_flops": fwd_bwd,
        "factor_flops": factors,
        "eigh_flops": eigh,
        "ratio": kfac / fwd_bwd,
    }


def make_step(
    model: nn.Module, method: str, batch: int, distributed: bool, max_rows: int
) -> Callable[[], None]:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    trained = nn.parallel.DistributedDataParallel(model) if distributed else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    pre = None
    if METHODS[method] is not None:
        factor_interval, inverse_interval, sampled = METHODS[method]
        pre = KFACPreconditioner(
            model,
            optimizer=optimizer,
            factor_update_interval=factor_interval,
            inverse_update_interval=inverse_interval,
            factor_max_rows=max_rows if sampled else None,
        )
        if distributed:
            pre.distributor = TorchDistributedDistributor(
                list(pre.layers.values()),
                method=pre.compute_method,
                inverse_dtype=pre.inverse_dtype,
                group=dist.new_group(backend="gloo"),
            )
            pre.is_final_backward = lambda: True

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(trained(x), y).backward()
        if pre is not None:
            pre.step()
        optimizer.step()

    return step


def measure(
    batch: int, rounds: int, steps: int, distributed: bool, max_rows: int
) -> dict[str, list[float]]:
    """Per-step times (seconds) of every method, round-robin over ``rounds`` blocks."""
    steppers = {}
    for method in METHODS:
        torch.manual_seed(0)
        steppers[method] = make_step(make_resnet(), method, batch, distributed, max_rows)
        for _ in range(3):  # warm-up, includes the first factor and inverse updates
            steppers[method]()
    times: dict[str, list[float]] = {method: [] for method in METHODS}
    for _ in range(rounds):
        for method, step in steppers.items():
            if distributed:
                dist.barrier()
            start = time.perf_counter()
            for _ in range(steps):
                step()
            if distributed:
                dist.barrier()
            times[method].append((time.perf_counter() - start) / steps)
    return times


def summarise(
    times: dict[str, list[float]], batch: int, max_rows: int
) -> dict[str, dict[str, float]]:
    sgd = statistics.median(times["sgd"])
    summary = {}
    for method, values in times.items():
        median = statistics.median(values)
        entry = {"median_step_s": median, "ratio_to_sgd": median / sgd}
        spec = METHODS[method]
        if spec is not None:
            factor_interval, inverse_interval, sampled = spec
            model = flop_model(
                make_resnet(),
                batch,
                factor_interval,
                inverse_interval,
                max_rows if sampled else None,
            )
            entry["flop_model_ratio"] = model["ratio"]
        summary[method] = entry
    return summary


def _worker(rank: int, world_size: int, args: argparse.Namespace, queue: mp.Queue) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(args.port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        times = measure(
            args.batch_size,
            args.rounds,
            args.steps,
            distributed=True,
            max_rows=args.factor_max_rows,
        )
        if rank == 0:
            queue.put(times)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block (>= 10)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--factor-max-rows", type=int, default=1024)
    parser.add_argument("--port", type=int, default=29533)
    parser.add_argument("--json", default="benchmarks/step_time.json")
    args = parser.parse_args()
    results: dict[str, object] = {
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "steps": args.steps,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
    }
    for world_size in args.processes:
        if world_size == 1:
            times = measure(
                args.batch_size, args.rounds, args.steps, False, max_rows=args.factor_max_rows
            )
        else:
            context = mp.get_context("spawn")
            queue = context.Queue()
            mp.start_processes(
                _worker, args=(world_size, args, queue), nprocs=world_size, start_method="spawn"
            )
            times = queue.get()
        summary = summarise(times, args.batch_size, args.factor_max_rows)
        results[f"processes_{world_size}"] = {"summary": summary, "times_s": times}
        print(
            f"\n{world_size} process(es), batch {args.batch_size} per process, "
            f"median of {args.rounds} blocks of {args.steps} steps"
        )
        print(f"{'method':<21}{'step (ms)':>10}{'x SGD':>8}{'FLOP model':>12}")
        for method, entry in summary.items():
            model_ratio = f"{entry['flop_model_ratio']:.2f}" if "flop_model_ratio" in entry else "-"
            step_ms = 1000 * entry["median_step_s"]
            print(f"{method:<21}{step_ms:>10.1f}{entry['ratio_to_sgd']:>8.2f}{model_ratio:>12}")
    with open(args.json, "w") as handle:
        json.dump(results, handle, indent=2)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
