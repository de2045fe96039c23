"""Step time of K-FAC against SGD, one process and two, next to the FLOP-model bound.

    python benchmarks/step_time.py                       # every workload, 1 and 2 processes
    python benchmarks/step_time.py --reference    # + gpauloski/kfac-pytorch (installed), 1 process

Workloads:

- ``cnn``: 3 × [conv 3×3 + BatchNorm + ReLU (+ 2×2 max-pool)] with 3 → 32 → 64 → 128 channels
  on 32×32 inputs, global pooling and a linear head; batch 128 per process. The convolutions'
  ``A`` factors dominate K-FAC's cost; they are exact, built from shifted correlations where
  that is cheaper (``lightning_kfac.kfac.patches``).
- ``transformer``: a Linear-heavy transformer LM (embedding, 2 encoder layers with MHA,
  d=256, FFN 1024, tied head over 1,000 tokens); batch 16 × 64 tokens per process.
- ``lstm``: a recurrent LM (embedding, 2-layer ``nn.LSTM`` with 256 units, head over 1,000
  tokens); batch 16 × 64 tokens per process. ``sgd`` runs the fused LSTM kernel; K-FAC runs the
  cells unrolled on its capture steps (every step at 1/10, one in ten at 10/100) and the fused
  kernel on the others (``lightning_kfac.kfac.kinds.recurrent``).

Methods, measured side by side in round-robin blocks (every round times a block of ``--steps``
steps of each method, so machine-load drift hits all methods alike):

- ``sgd``: forward, backward, SGD step;
- ``kfac_1_10``: the same plus K-FAC with factors every step, decompositions every 10 (exact);
- ``kfac_10_100``: factors every 10 steps, decompositions every 100 (exact);
- ``*_sampled``: with ``factor_max_rows`` (default 1024): each factor batch estimated from that
  many of a use's N·T rows (unbiased, a different estimator);
- ``reference_1_10`` / ``reference_10_100`` (``--reference DIR``, one process, CNN): the
  reference implementation (gpauloski/kfac-pytorch, KAISA) with the same damping, decay and
  KL-clip. It is not a dependency: point ``--reference`` at a checkout of it.

Two processes run plain ``torch.distributed`` (gloo) with DDP and the K-FAC distributor, each
rank on its own batch. Reported: the median step time of each method and its ratio to SGD, next
to the FLOP-model ratio ``(fwd+bwd + factors / f + eigh / i + precondition) / (fwd+bwd)`` for the
same network, with the conv ``A`` costed by the construction the library uses for each layer.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_kfac import KFACPreconditioner
from lightning_kfac.distributed import TorchDistributedDistributor
from lightning_kfac.kfac.patches import (
    ConvGeometry,
    choose_method,
    patch_covariance_flops,
)

DAMPING, FACTOR_DECAY, KL_CLIP, LR = 1e-3, 0.95, 1e-3, 0.01

#: method -> (factor interval, inverse interval, sample rows?) or None for plain SGD
METHODS: dict[str, tuple[int, int, bool] | None] = {
    "sgd": None,
    "kfac_1_10": (1, 10, False),
    "kfac_10_100": (10, 100, False),
    "kfac_1_10_sampled": (1, 10, True),
    "kfac_10_100_sampled": (10, 100, True),
}
REFERENCE_METHODS = {"reference_1_10": (1, 10), "reference_10_100": (10, 100)}


class SmallCNN(nn.Module):
    """3 × [conv 3×3 + BN + ReLU], 3 → 32 → 64 → 128, pooling, linear head."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = [3, 32, 64, 128]
        for index, (c_in, c_out) in enumerate(itertools.pairwise(channels)):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
            if index < 2:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(128, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class TransformerLM(nn.Module):
    def __init__(self, vocab: int = 1000, dim: int = 256, layers: int = 2) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embedding.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.encoder(self.embedding(tokens)))


class LSTMLM(nn.Module):
    def __init__(self, vocab: int = 1000, dim: int = 256, layers: int = 2) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, dim, num_layers=layers, batch_first=True)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.lstm(self.embedding(tokens))[0])


WORKLOADS: dict[str, Callable[[], nn.Module]] = {
    "cnn": SmallCNN,
    "transformer": TransformerLM,
    "lstm": LSTMLM,
}
BATCH_SIZES = {"cnn": 128, "transformer": 16, "lstm": 16}


def make_batch(workload: str, batch: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    if workload == "cnn":
        x = torch.randn(batch, 3, 32, 32, generator=generator)
        return x, torch.randint(0, 10, (batch,), generator=generator)
    tokens = torch.randint(0, 1000, (batch, 64), generator=generator)
    return tokens, tokens


def make_model(workload: str) -> nn.Module:
    torch.manual_seed(0)
    return WORKLOADS[workload]()


def loss_of(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    out = model(x)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


# -- FLOP model --------------------------------------------------------------------------------
def flop_model(
    workload: str,
    batch: int,
    factor_interval: int,
    inverse_interval: int,
    max_rows: int | None = None,
) -> dict[str, float]:
    """FLOPs per step from the library's own blocks (``flop_terms``) and the model ratio
    ``(fwd+bwd + factors / f + eigh / i + precondition) / (fwd+bwd)``."""
    terms = flop_terms(workload, batch, max_rows)
    fwd_bwd = terms["fwd_bwd_flops"]
    kfac = (
        fwd_bwd
        + terms["factor_flops"] / factor_interval
        + terms["eigh_flops"] / inverse_interval
        + terms["precondition_flops"]
    )
    return {**terms, "ratio": kfac / fwd_bwd}


@functools.cache
def flop_terms(workload: str, batch: int, max_rows: int | None) -> dict[str, float]:
    """FLOPs of each K-FAC stage from the library's own blocks (traced on one forward; cached:
    they depend on the workload, batch and row sampling only).

    Forward+backward: 3 × the forward multiply-adds × 2 of every linear/conv use (embeddings are
    lookups). Factors: per dense side ``2·rows·d²`` (a GEMM over the use's rows; a conv ``A``
    costs what ``patch_covariance_flops`` says for the construction ``choose_method`` picks),
    ``2·rows·d`` per diagonal side, ``2·k²`` per sample and channel for a unit-wise block.
    Decompositions: ``9·d³`` per dense side. Preconditioning: ``4·d_G²·d_A + 4·d_G·d_A²``.
    """
    from benchmarks.scale_model import trace

    model = make_model(workload)
    x, _ = make_batch(workload, batch)
    inputs: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):

            def hook(module: nn.Module, args: Any, name: str = name) -> None:
                inputs[name] = tuple(args[0].shape)

            handles.append(module.register_forward_pre_hook(hook))
    blocks = trace(model, (x,), batch_size=batch)
    for handle in handles:
        handle.remove()
    modules = dict(model.named_modules())
    forward = factors = eigh = precondition = 0.0
    for block in blocks:
        forward += batch * block.forward_flops
        precondition += block.precondition_flops
        eigh += block.eigh_flops
        rows = batch * block.rows
        if block.kind == "norm":
            factors += batch * block.factor_flops
            continue
        site = block.name.split("@")[0].removesuffix(".weight")
        module = modules.get(site)
        a_flops, g_flops = block.side_flops(min(rows, max_rows) if max_rows else rows)
        if isinstance(module, nn.Conv2d) and not max_rows and not block.factors[0].diagonal:
            geometry = ConvGeometry.from_call(
                inputs[site], tuple(module.weight.shape), module.stride, module.padding,
                module.dilation, module.groups,
            )  # fmt: skip
            method = choose_method(geometry, inputs[site])
            a_flops = patch_covariance_flops(geometry, inputs[site], method)
        factors += a_flops + g_flops
    return {
        "fwd_bwd_flops": 3.0 * forward,
        "factor_flops": factors,
        "eigh_flops": eigh,
        "precondition_flops": precondition,
    }


# -- steps ------------------------------------------------------------------------------------
def make_step(
    workload: str, method: str, batch: int, distributed: bool, max_rows: int
) -> Callable[[], None]:
    model = make_model(workload)
    x, y = make_batch(workload, batch)
    trained = nn.parallel.DistributedDataParallel(model) if distributed else model
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    step_kfac: Callable[[], None] | None = None
    if method in REFERENCE_METHODS:
        kfac = importlib.import_module("kfac.preconditioner")
        factor_interval, inverse_interval = REFERENCE_METHODS[method]
        reference = kfac.KFACPreconditioner(
            model,
            factor_update_steps=factor_interval,
            inv_update_steps=inverse_interval,
            damping=DAMPING,
            factor_decay=FACTOR_DECAY,
            kl_clip=KL_CLIP,
            lr=LR,
        )
        step_kfac = reference.step
    elif METHODS[method] is not None:
        factor_interval, inverse_interval, sampled = METHODS[method]  # type: ignore[misc]
        distributor = None
        if distributed:
            distributor = TorchDistributedDistributor(group=dist.new_group(backend="gloo"))
        pre = KFACPreconditioner(
            model,
            optimizer=optimizer,
            damping=DAMPING,
            factor_decay=FACTOR_DECAY,
            kl_clip=KL_CLIP,
            factor_update_interval=factor_interval,
            inverse_update_interval=inverse_interval,
            factor_max_rows=max_rows if sampled else None,
            distributor=distributor,
            report=False,
            is_final_backward=lambda: True,
        )
        step_kfac = pre.step

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_of(trained, x, y).backward()
        if step_kfac is not None:
            step_kfac()
        optimizer.step()

    return step


def measure(
    workload: str,
    methods: list[str],
    batch: int,
    rounds: int,
    steps: int,
    distributed: bool,
    max_rows: int,
) -> dict[str, list[float]]:
    """Per-step times (seconds) of every method, round-robin over ``rounds`` blocks."""
    steppers = {}
    for method in methods:
        steppers[method] = make_step(workload, method, batch, distributed, max_rows)
        for _ in range(3):  # warm-up, includes the first factor and inverse updates
            steppers[method]()
    times: dict[str, list[float]] = {method: [] for method in methods}
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
    workload: str, times: dict[str, list[float]], batch: int, max_rows: int
) -> dict[str, dict[str, float]]:
    sgd = statistics.median(times["sgd"])
    summary = {}
    for method, values in times.items():
        median = statistics.median(values)
        entry = {"median_step_s": median, "ratio_to_sgd": median / sgd}
        spec = METHODS.get(method)
        if spec is not None:
            factor_interval, inverse_interval, sampled = spec
            model = flop_model(
                workload, batch, factor_interval, inverse_interval, max_rows if sampled else None
            )
            entry["flop_model_ratio"] = model["ratio"]
        summary[method] = entry
    reference = summary.get("reference_1_10")
    if reference is not None:
        summary["kfac_1_10"]["fraction_of_reference"] = (
            summary["kfac_1_10"]["median_step_s"] / reference["median_step_s"]
        )
    return summary


def _worker(rank: int, world_size: int, args: argparse.Namespace, queue: mp.Queue) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(args.port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results = {}
        for workload in args.workloads:
            results[workload] = measure(
                workload,
                list(METHODS),
                args.batch_size[workload],
                args.rounds,
                args.steps,
                distributed=True,
                max_rows=args.factor_max_rows,
            )
        if rank == 0:
            queue.put(results)
    finally:
        dist.destroy_process_group()


def print_table(title: str, summary: dict[str, dict[str, float]]) -> None:
    print(f"\n{title}")
    print(f"{'method':<22}{'step (ms)':>10}{'x SGD':>8}{'FLOP model':>12}")
    for method, entry in summary.items():
        model_ratio = f"{entry['flop_model_ratio']:.2f}" if "flop_model_ratio" in entry else "-"
        step_ms = 1000 * entry["median_step_s"]
        print(f"{method:<22}{step_ms:>10.1f}{entry['ratio_to_sgd']:>8.2f}{model_ratio:>12}")
    if "fraction_of_reference" in summary.get("kfac_1_10", {}):
        share = summary["kfac_1_10"]["fraction_of_reference"]
        print(f"kfac_1_10 / reference_1_10 = {share:.2f} (speed-up {1 / share:.2f}x)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block (>= 10)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--factor-max-rows", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None, help="1 process: torch threads")
    parser.add_argument(
        "--reference",
        nargs="?",
        const="",
        default=None,
        help="also time gpauloski/kfac-pytorch: its importable `kfac` package, or a checkout DIR",
    )
    parser.add_argument("--port", type=int, default=29533)
    parser.add_argument("--json", default="benchmarks/step_time.json")
    args = parser.parse_args(argv)
    args.batch_size = BATCH_SIZES
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.reference:  # a checkout to import `kfac` from
        sys.path.insert(0, str(Path(args.reference).resolve()))
    results: dict[str, Any] = {
        "command": "python benchmarks/step_time.py " + " ".join(argv or sys.argv[1:]),
        "batch_size_per_process": args.batch_size,
        "rounds": args.rounds,
        "steps": args.steps,
        "torch": torch.__version__,
        "threads_one_process": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
    }
    for world_size in args.processes:
        if world_size == 1:
            per_workload = {}
            for workload in args.workloads:
                methods = list(METHODS)
                if args.reference is not None and workload == "cnn":
                    methods += list(REFERENCE_METHODS)
                per_workload[workload] = measure(
                    workload,
                    methods,
                    args.batch_size[workload],
                    args.rounds,
                    args.steps,
                    False,
                    max_rows=args.factor_max_rows,
                )
        else:
            context = mp.get_context("spawn")
            queue = context.Queue()
            mp.start_processes(
                _worker, args=(world_size, args, queue), nprocs=world_size, start_method="spawn"
            )
            per_workload = queue.get()
        for workload, times in per_workload.items():
            summary = summarise(workload, times, args.batch_size[workload], args.factor_max_rows)
            results[f"{workload}_processes_{world_size}"] = {"summary": summary, "times_s": times}
            print_table(
                f"{workload}, {world_size} process(es), batch {args.batch_size[workload]} per "
                f"process, median of {args.rounds} blocks of {args.steps} steps",
                summary,
            )
    results["load_average_at_end"] = os.getloadavg()
    with open(args.json, "w") as handle:
        json.dump(results, handle, indent=2)
    print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    main()
