"""Pure-PyTorch K-FAC core: no Lightning, no torch.distributed."""

from lightning_kfac.kfac.distribution import Distributor, LocalDistributor
from lightning_kfac.kfac.factors import KroneckerFactor
from lightning_kfac.kfac.options import ComputeMethod
from lightning_kfac.kfac.preconditioner import KFACNumericalWarning, KFACPreconditioner

__all__ = [
    "ComputeMethod",
    "Distributor",
    "KFACNumericalWarning",
    "KFACPreconditioner",
    "KroneckerFactor",
    "LocalDistributor",
]
