"""lightning-kfac: distributed K-FAC and mixup for PyTorch Lightning.

``import lightning_kfac`` registers the strategy names ``kfac_ddp``, ``kfac_ddp_spawn`` and
``kfac_ddp_fork`` in each Lightning namespace the process uses — ``pytorch_lightning`` and the
unified package's ``lightning.pytorch`` — whether it was imported before or is imported after
``lightning_kfac`` (a post-import hook: ``lightning_kfac`` imports neither itself, each costs
seconds). ``Trainer(strategy="kfac_ddp")`` then works with either ``Trainer``.

``lightning_kfac.KFACDDPStrategy`` is the ``pytorch_lightning`` class;
``lightning_kfac.lightning.KFACDDPStrategy`` the ``lightning.pytorch`` one (the two namespaces are
separate class hierarchies). Given to the other namespace's ``Trainer``, Lightning's "invalid
strategy" error shows the strategy's ``repr``, which names the class to use. ``MixupCallback``
serves both.

The K-FAC core needs no Lightning: ``import lightning_kfac.kfac`` and ``from lightning_kfac import
KFACPreconditioner`` work without it. The Lightning-facing names (``KFACDDPStrategy``,
``MixupCallback``) are imported on first use (PEP 562); without ``pytorch_lightning`` using them
raises an ``ImportError`` that says what to install.
"""

import functools
import importlib
from typing import TYPE_CHECKING, Any

from lightning_kfac._requires import after_import, lightning_requirement, package_dir
from lightning_kfac.kfac import (
    ComputeMethod,
    DistributionMode,
    KFACApproximation,
    KFACCoverageWarning,
    KFACNumericalWarning,
    KFACOptions,
    KFACPreconditioner,
    NonFiniteGradients,
)

if TYPE_CHECKING:
    from lightning_kfac.mixup.callback import MixupCallback
    from lightning_kfac.pytorch_lightning import KFACDDPStrategy

__version__ = "0.2.0"

__all__ = [
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

#: Lightning-facing names: the module that defines each, and another way to get it (if any).
_LIGHTNING_NAMES = {
    "KFACDDPStrategy": (
        "lightning_kfac.pytorch_lightning",
        " (or, with the unified `lightning` package, "
        "`from lightning_kfac.lightning import KFACDDPStrategy`)",
    ),
    "MixupCallback": ("lightning_kfac.mixup.callback", ""),
}

# Defining a strategy class registers kfac_ddp, kfac_ddp_spawn and kfac_ddp_fork in its
# namespace's StrategyRegistry, so that `Trainer(strategy="kfac_ddp")` works after
# `import lightning_kfac` — also in the processes Lightning's launchers start, which import this
# package again. Done when the user's code imports that namespace (now, if it already has).
for _namespace, _module in (
    ("pytorch_lightning", "lightning_kfac.pytorch_lightning"),
    ("lightning.pytorch", "lightning_kfac.lightning"),
):
    after_import(_namespace, functools.partial(importlib.import_module, _module))
del _namespace, _module


def __getattr__(name: str) -> Any:
    """The Lightning-facing names, imported on first use."""
    if name not in _LIGHTNING_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, alternative = _LIGHTNING_NAMES[name]
    with lightning_requirement(f"lightning_kfac.{name}", alternative):
        value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return package_dir(globals(), __all__)
