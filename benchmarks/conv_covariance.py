"""KFC's convolution input factor: patch GEMM against shifted correlations, side by side.

    python benchmarks/conv_covariance.py [--rounds 7] [--threads 1 2] [--json out.json]

For each convolution of the small CNN of the field notes (batch 128, 3x3: C=3 at 32x32, 32 at
16x16 with stride 1 and 2, 64 at 8x8; plus the notes' prototype shapes C=32 at 32x32, 64 at 16x16,
128 at 8x8) and of a small ResNet (stem 16, stages 16/32/64: the stem, the 3x3 convolutions of
each stage, the 1x1 stride-2 shortcuts; the workload ``benchmarks/step_time.py`` timed before its
CNN), both constructions of
:func:`lightning_kfac.kfac.patches.patch_covariance_sum` run in float32 on the same input,
round-robin (every round times one call of each method, so machine-load drift hits both alike);
reported are the median per-call times, the speed-up (GEMM time / correlation time), the FLOP
ratio of the two FLOP models (correlation / GEMM), the method ``auto`` picks, and the float32
error of each method against a float64 reference (max |error| / max |A|). Repeated with 1 and 2
intra-op threads. Inputs are ReLU'd Gaussians (the image layer: plain Gaussians); the bias row is
included where the layer has a bias (the small CNN), as the preconditioner forms it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from lightning_kfac.kfac.patches import (
    ConvGeometry,
    CovarianceMethod,
    choose_method,
    patch_covariance_flops,
    patch_covariance_sum,
)

#: name -> (channels in, spatial size, kernel, stride, padding, bias, first layer?, batch or None)
SHAPES: dict[str, tuple[int, int, int, int, int, bool, bool, int | None]] = {
    "cnn.conv1 3@32x32": (3, 32, 3, 1, 1, True, True, None),
    "cnn.conv2 32@16x16": (32, 16, 3, 1, 1, True, False, None),
    "cnn.conv2 32@16x16 s2": (32, 16, 3, 2, 1, True, False, None),
    "cnn.conv3 64@8x8": (64, 8, 3, 1, 1, True, False, None),
    "notes 32@32x32": (32, 32, 3, 1, 1, True, False, None),
    "notes 64@16x16": (64, 16, 3, 1, 1, True, False, None),
    "notes 128@8x8": (128, 8, 3, 1, 1, True, False, None),
    "resnet.stem 3@32x32": (3, 32, 3, 1, 1, False, True, None),
    "resnet.stage1 16@32x32 (x2)": (16, 32, 3, 1, 1, False, False, None),
    "resnet.stage2.conv1 16@32x32 s2": (16, 32, 3, 2, 1, False, False, None),
    "resnet.stage2.conv2 32@16x16": (32, 16, 3, 1, 1, False, False, None),
    "resnet.stage2.shortcut 1x1 s2": (16, 32, 1, 2, 0, False, False, None),
    "resnet.stage3.conv1 32@16x16 s2": (32, 16, 3, 2, 1, False, False, None),
    "resnet.stage3.conv2 64@8x8": (64, 8, 3, 1, 1, False, False, None),
    "resnet.stage3.shortcut 1x1 s2": (32, 16, 1, 2, 0, False, False, None),
    # where the rule's bounds lie: small images (border terms dominate), larger kernels, and
    # little work in all (small batches: fixed costs of the ~60 operations dominate)
    "bound 64@4x4": (64, 4, 3, 1, 1, False, False, None),
    "bound 128@4x4": (128, 4, 3, 1, 1, False, False, None),
    "bound 64@7x7": (64, 7, 3, 1, 1, False, False, None),
    "bound 5x5 32@16x16": (32, 16, 5, 1, 2, False, False, None),
    "bound 7x7 stem 3@32x32": (3, 32, 7, 1, 3, False, True, None),
    "bound 32@16x16 batch 8": (32, 16, 3, 1, 1, False, False, 8),
    "bound 32@16x16 batch 2": (32, 16, 3, 1, 1, False, False, 2),
    "bound 3@32x32 batch 8": (3, 32, 3, 1, 1, False, True, 8),
    "bound 16@32x32 batch 4": (16, 32, 3, 1, 1, False, False, 4),
}

METHODS = (CovarianceMethod.GEMM, CovarianceMethod.CORRELATION)


def make_case(name: str, batch: int) -> tuple[torch.Tensor, ConvGeometry, bool]:
    channels, size, kernel, stride, padding, bias, first, own_batch = SHAPES[name]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(own_batch or batch, channels, size, size, generator=generator)
    if not first:
        x = x.relu()
    geometry = ConvGeometry.from_call(
        x.shape, (channels, channels, kernel, kernel), stride=stride, padding=padding
    )
    return x, geometry, bias


def float32_errors(
    x: torch.Tensor, geometry: ConvGeometry, bias: bool, methods: list[CovarianceMethod]
) -> dict[str, float]:
    exact = patch_covariance_sum(x.double(), geometry, append_ones=bias, method="gemm")
    scale = float(exact.abs().max())
    errors = {}
    for method in methods:
        got = patch_covariance_sum(x, geometry, append_ones=bias, method=method)
        errors[method.value] = float((got.double() - exact).abs().max()) / scale
    return errors


def time_case(
    x: torch.Tensor,
    geometry: ConvGeometry,
    bias: bool,
    methods: list[CovarianceMethod],
    rounds: int,
) -> dict[str, list[float]]:
    """Per-call seconds of each method, round-robin over ``rounds`` rounds after a warm-up."""
    for method in methods:
        patch_covariance_sum(x, geometry, append_ones=bias, method=method)
    times: dict[str, list[float]] = {method.value: [] for method in methods}
    for _ in range(rounds):
        for method in methods:
            start = time.perf_counter()
            patch_covariance_sum(x, geometry, append_ones=bias, method=method)
            times[method.value].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), help="subset of SHAPES")
    parser.add_argument("--json", default="benchmarks/conv_covariance.json")
    args = parser.parse_args()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    results: dict[str, object] = {
        "description": __doc__.strip().splitlines()[0],
        "measured_under_load": True,
        "note": (
            "2-core CPU shared with other engineers' jobs while measuring: absolute times are "
            "noisy (and inflated by contention); methods alternate within every round and the "
            "medians of the rounds are quoted"
        ),
        "load_average_at_start": load,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "dtype": "float32",
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
    }
    cases = {name: make_case(name, args.batch_size) for name in args.shapes}
    supported = {
        name: [m for m in METHODS if m is CovarianceMethod.GEMM or geometry.correlation_supported]
        for name, (_, geometry, _) in cases.items()
    }
    torch.set_num_threads(max(args.threads))
    errors = {name: float32_errors(*cases[name], supported[name]) for name in cases}
    for threads in args.threads:
        torch.set_num_threads(threads)
        table = {}
        for name, (x, geometry, bias) in cases.items():
            times = time_case(x, geometry, bias, supported[name], args.rounds)
            gemm_flops = patch_covariance_flops(geometry, x.shape, "gemm")
            entry: dict[str, object] = {
                "input_shape": list(x.shape),
                "gemm_ms": 1000 * statistics.median(times["gemm"]),
                "gemm_gflop": gemm_flops / 1e9,
                "auto": choose_method(geometry, x.shape).value,
                "float32_relative_error": errors[name],
                "times_s": times,
            }
            if "correlation" in times:
                correlation_flops = patch_covariance_flops(geometry, x.shape, "correlation")
                entry["correlation_ms"] = 1000 * statistics.median(times["correlation"])
                entry["correlation_gflop"] = correlation_flops / 1e9
                entry["speedup"] = entry["gemm_ms"] / entry["correlation_ms"]  # type: ignore[operator]
                entry["flop_ratio"] = correlation_flops / gemm_flops
            table[name] = entry
        results[f"threads_{threads}"] = table
        print(
            f"\n{threads} thread(s), batch {args.batch_size} unless named, "
            f"median of {args.rounds} rounds"
        )
        print(
            f"{'layer':<34}{'gemm ms':>9}{'corr ms':>9}{'speed-up':>10}{'FLOP ratio':>12}"
            f"{'auto':>13}{'f32 err corr':>14}"
        )
        for name, entry in table.items():
            corr = entry.get("correlation_ms")
            corr_text = f"{corr:>9.1f}" if corr is not None else f"{'-':>9}"
            speed = f"{entry['speedup']:>10.2f}" if corr is not None else f"{'-':>10}"
            ratio = f"{entry['flop_ratio']:>12.2f}" if corr is not None else f"{'-':>12}"
            error = entry["float32_relative_error"].get("correlation")  # type: ignore[union-attr]
            error_text = f"{error:>14.1e}" if error is not None else f"{'-':>14}"
            print(
                f"{name:<34}{entry['gemm_ms']:>9.1f}{corr_text}{speed}{ratio}"
                f"{entry['auto']:>13}{error_text}"
            )
    with open(args.json, "w") as handle:
        json.dump(results, handle, indent=2)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
