"""The K-FAC core and mixup's pure-torch parts import without Lightning; the Lightning-facing names
say what they need. Each check runs in a fresh interpreter, so nothing imported here leaks in."""

from __future__ import annotations

import json

from tests.lightning_support import run_fresh_python

#: What "Lightning is not installed" hides: the packages and their own dependencies.
LIGHTNING = ("pytorch_lightning", "lightning", "lightning_fabric", "lightning_utilities")
PUBLIC_NAMES = [
    "ComputeMethod",
    "DistributionMode",
    "KFACApproximation",
    "KFACCoverageWarning",
    "KFACDDPStrategy",
    "KFACNumericalWarning",
    "KFACOptions",
    "KFACPreconditioner",
    "MixupCallback",
    "NonFiniteGradients",
    "__version__",
]

#: Put first in the child: a meta-path finder that refuses every Lightning package, as if none
#: were installed (``import`` and ``importlib.util.find_spec`` both see ``ModuleNotFoundError``).
BLOCK_LIGHTNING = f"""
import importlib.abc
import sys

BLOCKED = {LIGHTNING!r}


class NoLightning(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            message = f"No module named {{name!r}} (blocked by the test)"
            raise ModuleNotFoundError(message, name=name)
        return None


sys.meta_path.insert(0, NoLightning())
"""


def run_child(code: str) -> dict:
    """Run ``code`` in a fresh interpreter importing this checkout; return the JSON it prints."""
    return json.loads(run_fresh_python(code, timeout=120).strip().splitlines()[-1])


def test_the_core_imports_and_runs_without_lightning() -> None:
    found = run_child(
        BLOCK_LIGHTNING
        + """
import json

import torch

import lightning_kfac.kfac
import lightning_kfac.distributed
import lightning_kfac.cli
from lightning_kfac import (
    ComputeMethod,
    DistributionMode,
    KFACApproximation,
    KFACCoverageWarning,
    KFACNumericalWarning,
    KFACOptions,
    KFACPreconditioner,
    NonFiniteGradients,
    __version__,
)

import lightning_kfac

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
pre = KFACPreconditioner(model, damping=1e-2, optimizer=optimizer)
x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
torch.nn.functional.cross_entropy(model(x), y).backward()
raw = [p.grad.clone() for p in model.parameters()]
pre.step()
optimizer.step()
changed = any(not torch.equal(r, p.grad) for r, p in zip(raw, model.parameters()))

loaded = sorted(
    name for name in sys.modules
    if name.partition(".")[0] in (*BLOCKED, "torchmetrics", "wandb")
)
print(json.dumps({
    "loaded": loaded,
    "preconditioned": changed,
    "all": lightning_kfac.__all__,
    "dir": [name for name in dir(lightning_kfac) if not name.startswith("_")],
}))
"""
    )
    assert found["loaded"] == []  # nothing of Lightning, torchmetrics or wandb was imported
    assert found["preconditioned"]
    assert found["all"] == PUBLIC_NAMES
    assert set(PUBLIC_NAMES) - {"__version__"} <= set(found["dir"])  # the lazy names too


def test_lightning_names_without_lightning_say_what_to_install() -> None:
    found = run_child(
        BLOCK_LIGHTNING
        + """
import json

errors = {}
for statement in (
    "from lightning_kfac import KFACDDPStrategy",
    "from lightning_kfac import MixupCallback",
    "from lightning_kfac.mixup import MixupCallback",
    "import lightning_kfac.pytorch_lightning",
    "import lightning_kfac.lightning",
):
    try:
        exec(statement)
    except ImportError as error:
        errors[statement] = [type(error).__name__, str(error)]
    else:
        errors[statement] = None
print(json.dumps(errors))
"""
    )
    strategy = found["from lightning_kfac import KFACDDPStrategy"]
    assert strategy[0] == "ImportError"
    assert "lightning_kfac.KFACDDPStrategy needs pytorch_lightning" in strategy[1]
    assert "`lightning`" in strategy[1] and "lightning_kfac.lightning" in strategy[1]
    for statement in (
        "from lightning_kfac import MixupCallback",
        "from lightning_kfac.mixup import MixupCallback",
    ):
        kind, message = found[statement]
        assert kind == "ImportError" and "MixupCallback needs pytorch_lightning" in message
        assert "pip install pytorch-lightning" in message
    # the Lightning modules themselves fail as plain missing modules
    for statement in ("import lightning_kfac.pytorch_lightning", "import lightning_kfac.lightning"):
        assert found[statement][0] == "ModuleNotFoundError"


def test_mixup_pure_parts_work_without_lightning() -> None:
    found = run_child(
        BLOCK_LIGHTNING
        + """
import json

import torch
import torch.nn.functional as F

from lightning_kfac.mixup import (
    MixedLabels,
    MixupLossError,
    mix_inputs,
    sample_lambdas,
    sample_permutation,
)

generator = torch.Generator().manual_seed(0)
x = torch.randn(6, 3, dtype=torch.float64)
y = torch.tensor([0, 1, 2, 0, 1, 2])
lam = sample_lambdas(0.4, 6, generator)
permutation = sample_permutation(6, generator)
mixed = mix_inputs(x, x[permutation], lam)
logits = torch.randn(6, 3, dtype=torch.float64)
labels = MixedLabels(y, lam, labels_b=y[permutation])
expected = lam[0] * F.cross_entropy(logits, y) + (1 - lam[0]) * F.cross_entropy(
    logits, y[permutation]
)
try:
    F.nll_loss(logits.log_softmax(1), labels)
    raised = False
except MixupLossError:
    raised = True
print(json.dumps({
    "exact": bool(torch.allclose(F.cross_entropy(logits, labels), expected)),
    "mixed_shape": list(mixed.shape),
    "raised": raised,
    "loaded": sorted(n for n in sys.modules if n.partition(".")[0] in BLOCKED),
}))
"""
    )
    assert found == {"exact": True, "mixed_shape": [6, 3], "raised": True, "loaded": []}


def test_import_registers_the_strategies_and_lazy_names_resolve() -> None:
    """With Lightning installed, ``import lightning_kfac`` alone registers ``kfac_ddp*`` (as
    Lightning's launchers rely on in the processes they start); the lazy names are the classes."""
    found = run_child(
        """
import json

import lightning_kfac
from pytorch_lightning.strategies import StrategyRegistry

registered = sorted(name for name in StrategyRegistry if name.startswith("kfac_ddp"))
from lightning_kfac import KFACDDPStrategy, MixupCallback
from lightning_kfac.mixup.callback import MixupCallback as DefinedMixup
from lightning_kfac.pytorch_lightning import KFACDDPStrategy as DefinedStrategy

print(json.dumps({
    "registered": registered,
    "same": KFACDDPStrategy is DefinedStrategy and MixupCallback is DefinedMixup,
    "all": lightning_kfac.__all__,
    "dir": [name for name in dir(lightning_kfac) if not name.startswith("_")],
}))
"""
    )
    assert found["registered"] == ["kfac_ddp", "kfac_ddp_fork", "kfac_ddp_spawn"]
    assert found["same"]
    assert found["all"] == PUBLIC_NAMES
    assert set(PUBLIC_NAMES) - {"__version__"} <= set(found["dir"])
