"""Shared fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

# Strategy tests fork DDP workers (``kfac_ddp_fork``). GNU OpenMP (libgomp, used by the CPU
# wheels) is not fork-safe: once the parent has run a parallel region with a thread pool, a forked
# child deadlocks in its first parallel op (seen here: a conv2d forward, stack in libgomp). With one
# intra-op thread the parent never starts a pool. Tensors in the unit tests are tiny anyway.
# Lightning raises the thread count of in-process runs unless OMP_NUM_THREADS is set, so set it.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_process_group() -> Iterator[None]:
    """A world-size-1 DDP run in this process leaves the default process group behind."""
    yield
    from tests.lightning_support import destroy_process_group

    destroy_process_group()


@pytest.fixture(autouse=True)
def _restore_environment() -> Iterator[None]:
    """Runs that call ``seed_everything`` set ``PL_GLOBAL_SEED``, which seeds the shuffling of
    Lightning's DistributedSampler in every later run; W&B helpers set ``WANDB_*``. Undo it."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def float64() -> None:
    """Modules and tensors built in the test are float64 (the dense references' dtype); the
    default dtype is restored after each test (``_restore_default_dtype``). Modules of dense
    tests use it for every test: ``pytestmark = pytest.mark.usefixtures("float64")``."""
    torch.set_default_dtype(torch.float64)


@pytest.fixture(autouse=True)
def _restore_default_dtype() -> Iterator[None]:
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture(autouse=True)
def _no_leaked_function_mode() -> Iterator[None]:
    """K-FAC's tracing ``TorchFunctionMode`` must never outlive a forward: a leaked mode would run
    every later torch call (and forked workers') through a stale tracer. Fail the test that
    leaks it, and pop it so the rest of the suite is unaffected."""
    from torch.overrides import _get_current_function_mode_stack

    yield
    leaked = len(_get_current_function_mode_stack())
    while _get_current_function_mode_stack():
        torch._C._pop_torch_function_stack()
    assert leaked == 0, f"{leaked} torch function mode(s) left active by the test"
