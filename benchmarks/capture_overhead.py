"""Forward+backward overhead of K-FAC's capture mechanism, side by side with module hooks.

    python benchmarks/capture_overhead.py            # writes benchmarks/capture_overhead.json

K-FAC sees every use of a parameter through a torch function mode (``lightning_kfac.kfac.tracing``)
active inside the modules where uses were found; the previous mechanism was module forward hooks
on ``nn.Linear``/``nn.Conv2d`` plus a tensor hook on each output. Both are timed on the same models
in round-robin blocks (medians), as fwd+bwd time relative to plain fwd+bwd:

- ``hooks (no-op)`` / ``tracer at sites (no-op)``: the mechanisms alone, doing nothing with what
  they see — the pure dispatch cost;
- ``tracer, whole forward (no-op)``: the mode over the entire forward (what the first, discovery
  step costs);
- ``hooks + factors``: module hooks computing ``Σ a aᵀ`` and ``Σ g gᵀ`` for ``nn.Linear``/
  ``nn.Conv2d`` modules only (what module hooks *can* see);
- ``K-FAC capture``: ``KFACPreconditioner`` capturing every use (tracer + factor math; the
  step itself is not timed).

Models: the transformer LM (embedding, encoder layers with MHA, tied head) and the CNN of
``benchmarks/step_time.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_kfac import KFACPreconditioner
from lightning_kfac.kfac import linalg
from lightning_kfac.kfac.calls import RecognizedCall
from lightning_kfac.kfac.tracing import ParameterIndex, UseListener, UseTracker


def workloads() -> dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple[Tensor, Tensor]]]]:
    """The models and batches of ``benchmarks/step_time.py`` (CNN batch 128, LM 16 × 64)."""
    from benchmarks.step_time import make_batch, make_model

    return {
        name: (lambda name=name: make_model(name), lambda name=name, b=b: make_batch(name, b))
        for name, b in (("transformer", 16), ("cnn", 128))
    }


class NoOpListener(UseListener):
    """Traces (at the sites, or the whole forward) and captures nothing."""

    def __init__(self, model: nn.Module, whole: bool) -> None:
        self.index = ParameterIndex(list(model.named_parameters()))
        self.whole = whole

    def on_call(self, call: RecognizedCall, site: str) -> Any:
        return call.run()

    def on_forward_start(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        return self.whole

    def wants(self, site: str) -> bool:
        return True


def hooks(model: nn.Module, compute: bool) -> list[Any]:
    """Forward hook + output tensor hook on every nn.Linear / nn.Conv2d."""
    handles = []
    sums: dict[str, Tensor] = {}

    def forward_hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if compute:
            x = inputs[0].detach()
            if isinstance(module, nn.Conv2d):
                x = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
                x = x.transpose(1, 2)
            rows = x.reshape(1, -1, x.shape[-1])
            sums[f"{id(module)}A"] = linalg.covariance_sum(rows, append_ones=True)

        def gradient_hook(gradient: Tensor) -> None:
            if compute:
                g = gradient.detach()
                if isinstance(module, nn.Conv2d):
                    g = g.flatten(2).transpose(1, 2)
                rows = g.reshape(1, -1, g.shape[-1])
                sums[f"{id(module)}G"] = linalg.covariance_sum(rows, append_ones=False)

        output.register_hook(gradient_hook)

    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            handles.append(module.register_forward_hook(forward_hook))
    return handles


def variants(
    model: nn.Module, batch: tuple[Tensor, Tensor]
) -> tuple[dict[str, Callable[[], None]], float]:
    """The timed variants, and the fraction of parameter elements K-FAC preconditions."""
    from benchmarks.step_time import loss_of

    inputs, targets = batch
    plain = lambda: loss_of(model, inputs, targets).backward()  # noqa: E731
    out: dict[str, Callable[[], None]] = {"plain": plain}

    def with_hooks(compute: bool) -> Callable[[], None]:
        def run() -> None:
            handles = hooks(model, compute)
            try:
                plain()
            finally:
                for handle in handles:
                    handle.remove()

        return run

    out["hooks (no-op)"] = with_hooks(False)
    out["hooks + factors"] = with_hooks(True)

    capture = KFACPreconditioner(model, kl_clip=None)
    plain()
    capture.fix_structure()
    capture.capture_enabled = False  # only inside its own variant
    sites = capture.structure.sites if capture.structure is not None else []

    def with_tracer(whole: bool) -> Callable[[], None]:
        def run() -> None:
            tracker = UseTracker(model, NoOpListener(model, whole))
            if whole:
                tracker.start_discovery()
            else:
                tracker.set_sites(sites)
            try:
                plain()
            finally:
                tracker.remove()

        return run

    out["tracer at sites (no-op)"] = with_tracer(False)
    out["tracer, whole forward (no-op)"] = with_tracer(True)

    def kfac_capture() -> None:
        capture.capture_enabled = True
        try:
            plain()
        finally:
            capture.capture_enabled = False
            capture.discard_captured()

    out["K-FAC capture"] = kfac_capture
    return out, capture.preconditioned_fraction


def measure(blocks: int, repeats: int, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    results: dict[str, Any] = {}
    for name, (make_model, make_batch) in workloads().items():
        torch.manual_seed(0)
        model = make_model()
        batch = make_batch()
        runs, fraction = variants(model, batch)
        for run in runs.values():  # warm up
            model.zero_grad(set_to_none=True)
            run()
        times: dict[str, list[float]] = {key: [] for key in runs}
        for _ in range(blocks):
            for key, run in runs.items():  # round robin: the machine's state is shared
                start = time.perf_counter()
                for _ in range(repeats):
                    model.zero_grad(set_to_none=True)
                    run()
                times[key].append((time.perf_counter() - start) / repeats)
        medians = {key: statistics.median(values) for key, values in times.items()}
        results[name] = {
            "median_ms": {key: 1000 * value for key, value in medians.items()},
            "ratio_to_plain": {key: value / medians["plain"] for key, value in medians.items()},
            "kfac_preconditioned_fraction": fraction,
        }
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = parser.parse_args(argv)
    results = measure(args.blocks, args.repeats, args.threads)
    report = {
        "command": "python benchmarks/capture_overhead.py",
        "torch": torch.__version__,
        "threads": args.threads,
        "blocks": args.blocks,
        "repeats": args.repeats,
        "results": results,
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    for name, result in results.items():
        print(f"\n{name} (K-FAC covers {100 * result['kfac_preconditioned_fraction']:.1f} %)")
        print(f"{'variant':32s} {'fwd+bwd (ms)':>13s} {'x plain':>8s}")
        for key, value in result["median_ms"].items():
            print(f"{key:32s} {value:13.1f} {result['ratio_to_plain'][key]:8.3f}")
    return report


if __name__ == "__main__":
    main()
