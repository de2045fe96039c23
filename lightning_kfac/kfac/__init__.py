"""Pure-PyTorch K-FAC core: no Lightning, no torch.distributed."""

from lightning_kfac.kfac.distribution import Distributor, LocalDistributor
from lightning_kfac.kfac.factors import KroneckerFactor
from lightning_kfac.kfac.faults import KFACCoverageWarning, KFACNumericalWarning
from lightning_kfac.kfac.options import (
    ComputeMethod,
    DistributionMode,
    KFACApproximation,
    KFACOptions,
    NonFiniteGradients,
)
from lightning_kfac.kfac.preconditioner import KFACPreconditioner, StepRecord

__all__ = [
    "ComputeMethod",
    "DistributionMode",
    "Distributor",
    "KFACApproximation",
    "KFACCoverageWarning",
    "KFACNumericalWarning",
    "KFACOptions",
    "KFACPreconditioner",
    "KroneckerFactor",
    "LocalDistributor",
    "NonFiniteGradients",
    "StepRecord",
]
