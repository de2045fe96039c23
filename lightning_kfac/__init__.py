"""lightning-kfac: distributed K-FAC and mixup for PyTorch Lightning.

``import lightning_kfac`` registers the strategy names ``kfac_ddp``, ``kfac_ddp_spawn`` and
``kfac_ddp_fork`` with ``pytorch_lightning``; ``import lightning_kfac.lightning`` does the same
for the unified ``lightning.pytorch`` package.
"""

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
