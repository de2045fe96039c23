"""K-FAC over torch.distributed (no Lightning): collectives, work assignment, distributor."""

from lightning_kfac.distributed.distributor import DistributionMode, TorchDistributedDistributor

__all__ = ["DistributionMode", "TorchDistributedDistributor"]
