"""K-FAC over torch.distributed (no Lightning): collectives, work assignment, distributor."""

from lightning_kfac.distributed.distributor import TorchDistributedDistributor
from lightning_kfac.kfac.options import DistributionMode

__all__ = ["DistributionMode", "TorchDistributedDistributor"]
